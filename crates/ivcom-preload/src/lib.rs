//! `libivcom_preload.so`: the C ABI of the socket calls `ivcom run` intercepts. Each shim
//! forwards to `ivcom_interpose::ops`, which passes everything that is not an accelerated
//! connection to the C library unchanged. No logic lives here.
//!
//! The shims are `extern "C-unwind"`: a thread cancelled (`pthread_cancel`) while blocked in
//! a call the library serves is unwound through the library's frames by the C library's
//! forced unwind, which runs their destructors (locks, descriptors and sleep counts are
//! released) on its way to the program's cleanup handlers; with `extern "C"` the process
//! would abort there. The logic is written not to panic on any input (a panic reaching the
//! C library's frames, which have no unwind tables for it, aborts).

#![allow(clippy::missing_safety_doc)]

use ivcom_interpose::exec::{self, ListKind};
use ivcom_interpose::{fds, ops, real, signals};
use libc::{c_char, mode_t, posix_spawn_file_actions_t as Fa, posix_spawnattr_t, FILE};
use libc::{c_int, c_uint, c_ulong, c_void, epoll_event, fd_set, iovec, msghdr, nfds_t, pollfd, sigset_t};
use libc::{loff_t, off_t, pid_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval};

macro_rules! shims {
    ($($name:ident($($a:ident: $t:ty),*) -> $r:ty => $body:expr;)*) => {$(
        #[no_mangle]
        #[allow(unused_unsafe)]
        pub unsafe extern "C-unwind" fn $name($($a: $t),*) -> $r {
            let _in = fds::entered();
            // SAFETY: the program calls this with the C function's contract, which the
            // forwarded-to function requires.
            unsafe { $body }
        }
    )*};
}

shims! {
    connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => ops::connect(fd, addr, len);
    listen(fd: c_int, backlog: c_int) -> c_int => ops::listen(fd, backlog);
    accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => ops::accept4(fd, addr, len, 0, false);
    accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int => ops::accept4(fd, addr, len, flags, true);
    close(fd: c_int) -> c_int => ops::close(fd);
    close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int => ops::close_range(first, last, flags);
    shutdown(fd: c_int, how: c_int) -> c_int => ops::shutdown(fd, how);
    read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t => ops::read(fd, buf, n);
    write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t => ops::write(fd, buf, n);
    readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t => ops::readv(fd, iov, cnt);
    writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t => ops::writev(fd, iov, cnt);
    recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t => ops::recv(fd, buf, n, flags);
    send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t => ops::send(fd, buf, n, flags);
    recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t => ops::recvfrom(fd, buf, n, flags, addr, len);
    sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t => ops::sendto(fd, buf, n, flags, addr, len);
    recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t => ops::recvmsg(fd, msg, flags);
    sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t => ops::sendmsg(fd, msg, flags);
    dup(fd: c_int) -> c_int => ops::dup(fd);
    dup2(fd: c_int, to: c_int) -> c_int => ops::dup3(fd, to, 0, false);
    dup3(fd: c_int, to: c_int, flags: c_int) -> c_int => ops::dup3(fd, to, flags, true);
    fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int => ops::fcntl(fd, cmd, arg);
    fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int => ops::fcntl(fd, cmd, arg);
    ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int => ops::ioctl(fd, req, arg);
    poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int => ops::poll(fds, n, timeout);
    ppoll(fds: *mut pollfd, n: nfds_t, ts: *const timespec, mask: *const sigset_t) -> c_int => ops::ppoll(fds, n, ts, mask);
    select(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, tv: *mut timeval) -> c_int => ops::select(n, r, w, e, tv);
    pselect(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, ts: *const timespec, mask: *const sigset_t) -> c_int => ops::pselect(n, r, w, e, ts, mask);
    epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int => ops::epoll_ctl(epfd, op, fd, ev);
    epoll_wait(epfd: c_int, ev: *mut epoll_event, max: c_int, timeout: c_int) -> c_int => ops::epoll_pwait(epfd, ev, max, timeout, std::ptr::null());
    epoll_pwait(epfd: c_int, ev: *mut epoll_event, max: c_int, timeout: c_int, mask: *const sigset_t) -> c_int => ops::epoll_pwait(epfd, ev, max, timeout, mask);
    sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t => ops::sendfile(out, inp, off, n);
    sendfile64(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t => ops::sendfile(out, inp, off, n);
    splice(inp: c_int, ioff: *mut loff_t, out: c_int, ooff: *mut loff_t, n: size_t, flags: c_uint) -> ssize_t => ops::splice(inp, ioff, out, ooff, n, flags);
    fork() -> pid_t => ops::fork();
    vfork() -> pid_t => ops::vfork();
    fdopen(fd: c_int, mode: *const c_char) -> *mut FILE => ops::fdopen(fd, mode);
    vdprintf(fd: c_int, fmt: *const c_char, ap: *mut c_void) -> c_int => ops::vdprintf(fd, fmt, ap);
    clone(f: Option<real::CloneFn>, stack: *mut c_void, flags: c_int, arg: *mut c_void, ptid: *mut pid_t, tls: *mut c_void, ctid: *mut pid_t) -> c_int => ops::clone(f, stack, flags, arg, ptid, tls, ctid);
    recvmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int, t: *mut timespec) -> c_int => ops::recvmmsg(fd, v, n, flags, t);
    sendmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int) -> c_int => ops::sendmmsg(fd, v, n, flags);
    epoll_pwait2(epfd: c_int, ev: *mut epoll_event, max: c_int, t: *const timespec, mask: *const sigset_t) -> c_int => ops::epoll_pwait2(epfd, ev, max, t, mask);
    setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int => ops::setsockopt(fd, level, name, val, len);
    getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int => ops::getsockopt(fd, level, name, val, len);
    __read_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t) -> ssize_t => {
        if n > buflen { libc::abort() }
        ops::read(fd, buf, n)
    };
    __recv_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int) -> ssize_t => {
        if n > buflen { libc::abort() }
        ops::recv(fd, buf, n, flags)
    };
    __recvfrom_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t => {
        if n > buflen { libc::abort() }
        ops::recvfrom(fd, buf, n, flags, addr, len)
    };
    __poll_chk(fds: *mut pollfd, n: nfds_t, timeout: c_int, fdslen: size_t) -> c_int => {
        if (fdslen / std::mem::size_of::<pollfd>()) < n as usize { libc::abort() }
        ops::poll(fds, n, timeout)
    };
    __ppoll_chk(fds: *mut pollfd, n: nfds_t, ts: *const timespec, mask: *const sigset_t, fdslen: size_t) -> c_int => {
        if (fdslen / std::mem::size_of::<pollfd>()) < n as usize { libc::abort() }
        ops::ppoll(fds, n, ts, mask)
    };
}

// Signal handlers, counted per thread so that the library's waits end as the kernel's
// (`ivcom_interpose::signals`); glibc's `signal` family calls its internal `sigaction`.
shims! {
    sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int => signals::sigaction(sig, act, old);
    signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::signal(sig, handler, false);
    bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::signal(sig, handler, false);
    sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::signal(sig, handler, true);
    __sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::signal(sig, handler, true);
    siginterrupt(sig: c_int, flag: c_int) -> c_int => signals::siginterrupt(sig, flag);
}

// Calls that make a new descriptor: an entry still recorded at its number is stale.
shims! {
    socket(domain: c_int, ty: c_int, proto: c_int) -> c_int => fds::fresh(real::socket(domain, ty, proto));
    socketpair(domain: c_int, ty: c_int, proto: c_int, sv: *mut c_int) -> c_int => fds::fresh_pair(real::socketpair(domain, ty, proto, sv), sv);
    pipe(p: *mut c_int) -> c_int => fds::fresh_pair(real::pipe(p), p);
    pipe2(p: *mut c_int, flags: c_int) -> c_int => fds::fresh_pair(real::pipe2(p, flags), p);
    open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int => fds::fresh(real::open(path, flags, mode));
    open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int => fds::fresh(real::open64(path, flags, mode));
    openat(dir: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int => fds::fresh(real::openat(dir, path, flags, mode));
    openat64(dir: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int => fds::fresh(real::openat64(dir, path, flags, mode));
    __open_2(path: *const c_char, flags: c_int) -> c_int => fds::fresh(real::__open_2(path, flags));
    __open64_2(path: *const c_char, flags: c_int) -> c_int => fds::fresh(real::__open64_2(path, flags));
    __openat_2(dir: c_int, path: *const c_char, flags: c_int) -> c_int => fds::fresh(real::__openat_2(dir, path, flags));
    __openat64_2(dir: c_int, path: *const c_char, flags: c_int) -> c_int => fds::fresh(real::__openat64_2(dir, path, flags));
    creat(path: *const c_char, mode: mode_t) -> c_int => fds::fresh(real::creat(path, mode));
    creat64(path: *const c_char, mode: mode_t) -> c_int => fds::fresh(real::creat64(path, mode));
    eventfd(init: c_uint, flags: c_int) -> c_int => fds::fresh(real::eventfd(init, flags));
    epoll_create(size: c_int) -> c_int => ops::epoll_created(real::epoll_create(size));
    epoll_create1(flags: c_int) -> c_int => ops::epoll_created(real::epoll_create1(flags));
    signalfd(fd: c_int, mask: *const sigset_t, flags: c_int) -> c_int => fds::fresh(real::signalfd(fd, mask, flags));
    timerfd_create(clock: c_int, flags: c_int) -> c_int => fds::fresh(real::timerfd_create(clock, flags));
    memfd_create(name: *const c_char, flags: c_uint) -> c_int => fds::fresh(real::memfd_create(name, flags));
    inotify_init() -> c_int => fds::fresh(real::inotify_init());
    inotify_init1(flags: c_int) -> c_int => fds::fresh(real::inotify_init1(flags));
    mkstemp(t: *mut c_char) -> c_int => fds::fresh(real::mkstemp(t));
    mkstemp64(t: *mut c_char) -> c_int => fds::fresh(real::mkstemp64(t));
    mkostemp(t: *mut c_char, flags: c_int) -> c_int => fds::fresh(real::mkostemp(t, flags));
    mkostemp64(t: *mut c_char, flags: c_int) -> c_int => fds::fresh(real::mkostemp64(t, flags));
    mkstemps(t: *mut c_char, suffix: c_int) -> c_int => fds::fresh(real::mkstemps(t, suffix));
    mkostemps(t: *mut c_char, suffix: c_int, flags: c_int) -> c_int => fds::fresh(real::mkostemps(t, suffix, flags));
    fopen(path: *const c_char, mode: *const c_char) -> *mut FILE => fds::fresh_file(real::fopen(path, mode));
    fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE => fds::fresh_file(real::fopen64(path, mode));
    tmpfile() -> *mut FILE => fds::fresh_file(real::tmpfile());
    tmpfile64() -> *mut FILE => fds::fresh_file(real::tmpfile64());
    freopen(path: *const c_char, mode: *const c_char, f: *mut FILE) -> *mut FILE => fds::freopen(path, mode, f, false);
    freopen64(path: *const c_char, mode: *const c_char, f: *mut FILE) -> *mut FILE => fds::freopen(path, mode, f, true);
    fclose(f: *mut FILE) -> c_int => fds::fclose(f);
    closefrom(first: c_int) -> () => fds::closefrom(first);
}

// exec and spawn: what crosses into the new image (`ivcom_interpose::exec`).
shims! {
    execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int => exec::execve(path, argv, envp);
    execv(path: *const c_char, argv: *const *const c_char) -> c_int => exec::execve(path, argv, exec::environ());
    execvp(file: *const c_char, argv: *const *const c_char) -> c_int => exec::execvpe(file, argv, exec::environ());
    execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int => exec::execvpe(file, argv, envp);
    fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int => exec::fexecve(fd, argv, envp);
    execveat(dirfd: c_int, path: *const c_char, argv: *const *const c_char, envp: *const *const c_char, flags: c_int) -> c_int => exec::execveat(dirfd, path, argv, envp, flags);
    posix_spawn(pid: *mut pid_t, path: *const c_char, fa: *const Fa, attr: *const posix_spawnattr_t, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int => exec::posix_spawn(pid, path, fa, attr, argv, envp, false);
    posix_spawnp(pid: *mut pid_t, path: *const c_char, fa: *const Fa, attr: *const posix_spawnattr_t, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int => exec::posix_spawn(pid, path, fa, attr, argv, envp, true);
    system(cmd: *const c_char) -> c_int => exec::around_shell("system", || real::system(cmd));
    popen(cmd: *const c_char, mode: *const c_char) -> *mut FILE => exec::around_shell("popen", || real::popen(cmd, mode));
}

// posix_spawn file actions are recorded as they are made (glibc keeps them opaque).
macro_rules! fa_shims {
    ($($name:ident($($a:ident: $t:ty),*) => $rec:expr;)*) => {$(
        #[no_mangle]
        #[allow(unused_unsafe)]
        pub unsafe extern "C-unwind" fn $name($($a: $t),*) -> c_int {
            let _in = fds::entered();
            // SAFETY: the program's call, with the C function's contract.
            let r = unsafe { real::$name($($a),*) };
            if r == 0 {
                // SAFETY: the arguments the C library just accepted.
                unsafe { $rec };
            }
            r
        }
    )*};
}

fa_shims! {
    posix_spawn_file_actions_init(fa: *mut Fa) => exec::fa_reset(fa, true);
    posix_spawn_file_actions_destroy(fa: *mut Fa) => exec::fa_reset(fa, false);
    posix_spawn_file_actions_addclose(fa: *mut Fa, fd: c_int) => exec::fa_close(fa, fd);
    posix_spawn_file_actions_adddup2(fa: *mut Fa, fd: c_int, to: c_int) => exec::fa_dup2(fa, fd, to);
    posix_spawn_file_actions_addopen(fa: *mut Fa, fd: c_int, path: *const c_char, oflag: c_int, mode: mode_t) => exec::fa_open(fa, fd, path, oflag, mode);
    posix_spawn_file_actions_addclosefrom_np(fa: *mut Fa, from: c_int) => exec::fa_closefrom(fa, from);
    posix_spawn_file_actions_addchdir_np(fa: *mut Fa, path: *const c_char) => exec::fa_chdir(fa, path);
    posix_spawn_file_actions_addfchdir_np(fa: *mut Fa, fd: c_int) => exec::fa_fchdir(fa, fd);
    posix_spawn_file_actions_addtcsetpgrp_np(fa: *mut Fa, fd: c_int) => exec::fa_tcsetpgrp(fa, fd);
}

// `execl`, `execlp`, `execle` are variadic, which stable Rust cannot define. On x86-64 and
// AArch64 Linux, variadic pointer arguments are passed exactly as the same number of fixed
// ones (registers, then 8-byte stack slots in order), so these read a fixed number of them:
// up to LIST_ARGS - 1 program arguments (beyond that, and for `execle` without room for the
// environment after the null, the call fails with E2BIG). Reading slots the caller did not
// fill reads its own stack frame, which is mapped, and the values past the null are unused.
macro_rules! exec_list {
    ($($name:ident => $kind:expr;)*) => {$(
        #[no_mangle]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "C-unwind" fn $name(
            path: *const c_char,
            a0: *const c_char, a1: *const c_char, a2: *const c_char, a3: *const c_char,
            a4: *const c_char, a5: *const c_char, a6: *const c_char, a7: *const c_char,
            a8: *const c_char, a9: *const c_char, a10: *const c_char, a11: *const c_char,
            a12: *const c_char, a13: *const c_char, a14: *const c_char, a15: *const c_char,
            a16: *const c_char, a17: *const c_char, a18: *const c_char, a19: *const c_char,
            a20: *const c_char, a21: *const c_char, a22: *const c_char, a23: *const c_char,
            a24: *const c_char, a25: *const c_char, a26: *const c_char, a27: *const c_char,
            a28: *const c_char, a29: *const c_char, a30: *const c_char, a31: *const c_char,
        ) -> c_int {
            let args = [
                a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17,
                a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31,
            ];
            // SAFETY: the program's arguments, in order, up to the terminating null.
            unsafe { exec::execl($kind, path, &args) }
        }
    )*};
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
exec_list! {
    execl => ListKind::Path;
    execlp => ListKind::Search;
    execle => ListKind::Env;
}

// `dprintf` is variadic: its body is C (`src/variadic.c`, built by build.rs), reached by a
// jump that leaves every argument register (and the vector-register count in `al`) as the
// caller set them, so the C function sees the call exactly as made.
extern "C" {
    fn ivcom_dprintf(fd: c_int, fmt: *const c_char, ...) -> c_int;
}

/// `dprintf`: see `src/variadic.c`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dprintf() {
    core::arch::naked_asm!("jmp {f}", f = sym ivcom_dprintf)
}

/// `dprintf`: see `src/variadic.c`.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dprintf() {
    core::arch::naked_asm!("b {f}", f = sym ivcom_dprintf)
}

/// `syscall` is variadic; on x86-64 and AArch64 its (at most six) integer arguments arrive
/// as fixed ones do, so the shim reads six (see `exec_list!` on reading unfilled slots).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[no_mangle]
pub unsafe extern "C-unwind" fn syscall(
    n: libc::c_long,
    a0: libc::c_long,
    a1: libc::c_long,
    a2: libc::c_long,
    a3: libc::c_long,
    a4: libc::c_long,
    a5: libc::c_long,
) -> libc::c_long {
    let _in = fds::entered();
    // SAFETY: the program's call, with `syscall`'s contract.
    unsafe { ops::syscall(n, [a0, a1, a2, a3, a4, a5]) }
}

extern "C" fn at_exit() {
    ops::at_exit();
}

extern "C" fn init() {
    ops::at_start();
    // SAFETY: registering a plain function to run at exit.
    unsafe { libc::atexit(at_exit) };
}

/// Runs `init` when the library is loaded.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
