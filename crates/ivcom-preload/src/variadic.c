/* Variadic C library functions the preload library must intercept, which stable Rust cannot
 * define: each collects its arguments into a va_list and calls the va_list form, which the
 * library (Rust) intercepts. The exported name is a Rust naked function that jumps here with
 * every argument register untouched (`src/lib.rs`). `dprintf` on an accelerated connection
 * must write through the library: glibc's own `dprintf` calls its internal `vdprintf`. */
#include <stdarg.h>

int vdprintf(int fd, const char *fmt, va_list ap);

__attribute__((visibility("hidden"))) int ivcom_dprintf(int fd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int r = vdprintf(fd, fmt, ap);
    va_end(ap);
    return r;
}
