/* Helpers shared by the preload test programs. Each program prints what a user would check,
 * one line per check, so that its output with and without `ivcom run` can be compared. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);              \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, " (errno %d %s)\n", errno, strerror(errno));      \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

__attribute__((unused)) static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
__attribute__((unused)) static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* CPU time of the calling thread, in milliseconds. */
__attribute__((unused)) static double thread_cpu_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* epoll_wait for at most `ms`, going on after a signal (EINTR). */
__attribute__((unused)) static int wait_ms(int ep, struct epoll_event *ev, int max, int ms) {
    int r;
    do r = epoll_wait(ep, ev, max, ms);
    while (r < 0 && errno == EINTR);
    return r;
}

/* The loopback address of the family (::1 when v6, else 127.0.0.1) and `port`. */
static socklen_t loopback(int v6, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        a->sin6_port = htons((uint16_t)port);
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a->sin_port = htons((uint16_t)port);
    return sizeof *a;
}

/* A listening socket on 127.0.0.1 (or ::1 when v6) at an ephemeral port. */
__attribute__((unused)) static int listen_any(int v6, int *port) {
    int s = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
    CHECK(s >= 0, "socket");
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss;
    socklen_t len = loopback(v6, 0, &ss);
    CHECK(bind(s, (struct sockaddr *)&ss, len) == 0, "bind");
    CHECK(listen(s, 64) == 0, "listen");
    len = sizeof ss;
    CHECK(getsockname(s, (struct sockaddr *)&ss, &len) == 0, "getsockname");
    *port = ntohs(v6 ? ((struct sockaddr_in6 *)&ss)->sin6_port : ((struct sockaddr_in *)&ss)->sin_port);
    return s;
}

__attribute__((unused)) static int connect_to(int v6, int port, int nonblock) {
    int s = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    CHECK(s >= 0, "socket");
    struct sockaddr_storage ss;
    socklen_t len = loopback(v6, port, &ss);
    int r = connect(s, (struct sockaddr *)&ss, len);
    CHECK(r == 0 || (nonblock && errno == EINPROGRESS), "connect");
    return s;
}

__attribute__((unused)) static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        CHECK(w > 0, "write");
        p += w;
        n -= (size_t)w;
    }
}

__attribute__((unused)) static void read_exact(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        CHECK(r > 0, "read_exact: got %zd with %zu left", r, n);
        p += r;
        n -= (size_t)r;
    }
}

/* Writes bytes `b` to non-blocking `fd` until the kernel (or the ring) takes no more
 * (EAGAIN); returns how many it took. */
__attribute__((unused)) static size_t write_until_full(int fd, char b) {
    static char chunk[65536];
    memset(chunk, b, sizeof chunk);
    size_t total = 0;
    for (;;) {
        ssize_t w = write(fd, chunk, sizeof chunk);
        if (w < 0) {
            CHECK(errno == EAGAIN || errno == EWOULDBLOCK, "write until full");
            return total;
        }
        total += (size_t)w;
        CHECK(total < (1u << 30), "never full");
    }
}

/* Deterministic pseudo-random bytes. */
__attribute__((unused)) static void fill(unsigned char *b, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (unsigned char)x;
    }
}

__attribute__((unused)) static uint64_t fnv(const unsigned char *b, size_t n, uint64_t h) {
    if (h == 0) h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

__attribute__((unused)) static void msleep(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

__attribute__((unused)) static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Runs `client(port)` in a child process, `server(listener)` here; returns after both end.
 * Fails if the child failed. */
__attribute__((unused)) static void pair(int v6, void (*server)(int listener), void (*client)(int port)) {
    int port;
    int l = listen_any(v6, &port);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        close(l);
        client(port);
        fflush(stdout);
        _exit(0);
    }
    server(l);
    close(l);
    int st;
    CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "client child failed (status %d)", st);
}

__attribute__((unused)) static int accept_one(int l) {
    int c = accept(l, NULL, NULL);
    CHECK(c >= 0, "accept");
    return c;
}

/* Both ends of one loopback connection in this process (`*c` connected, `*s` accepted),
 * with one byte each way already exchanged, so that under `ivcom run` the rings carry what
 * follows. */
__attribute__((unused)) static void local_pair(int *c, int *s) {
    int port;
    int l = listen_any(0, &port);
    *c = connect_to(0, port, 0);
    *s = accept_one(l);
    close(l);
    char b;
    write_all(*c, "h", 1);
    read_exact(*s, &b, 1);
    write_all(*s, "h", 1);
    read_exact(*c, &b, 1);
}
