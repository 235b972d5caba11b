//! The C library's own socket functions, found with `dlsym(RTLD_NEXT)` on first use, for the
//! calls the preload passes through. The library's internal system calls go through rustix,
//! which makes them directly, so they never come back into the shims.

use libc::{c_char, mode_t, pid_t, posix_spawn_file_actions_t, posix_spawnattr_t, FILE};
use libc::{c_int, c_uint, c_ulong, c_void, epoll_event, fd_set, iovec, msghdr, nfds_t, pollfd, sigset_t};
use libc::{loff_t, off_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The entry point `clone` runs in the child.
pub type CloneFn = extern "C" fn(*mut c_void) -> c_int;

fn resolve(name: &std::ffi::CStr) -> usize {
    // SAFETY: `dlsym` with RTLD_NEXT and a NUL-terminated name has no other precondition.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if p.is_null() {
        // Every function here is part of glibc; without it nothing sensible can continue.
        let msg = b"ivcom preload: a C library function is missing\n";
        // SAFETY: writing a static buffer to stderr, then aborting.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
    p as usize
}

macro_rules! real {
    ($($name:ident($($a:ident: $t:ty),*) -> $r:ty;)*) => {$(
        /// The C library's function of this name.
        ///
        /// # Safety
        /// The C function's own contract.
        #[inline]
        pub unsafe fn $name($($a: $t),*) -> $r {
            static ADDR: AtomicUsize = AtomicUsize::new(0);
            let mut f = ADDR.load(Ordering::Relaxed);
            if f == 0 {
                let name = concat!(stringify!($name), "\0").as_bytes();
                f = resolve(std::ffi::CStr::from_bytes_with_nul(name).expect("NUL-terminated"));
                ADDR.store(f, Ordering::Relaxed);
            }
            // SAFETY: `f` is the address glibc gave for this symbol, whose C prototype is the
            // one written here.
            // "C-unwind": a cancellation point (`pthread_cancel`) unwinds out of it.
            let f: unsafe extern "C-unwind" fn($($t),*) -> $r = unsafe { std::mem::transmute(f) };
            // SAFETY: the caller upholds the C function's contract.
            unsafe { f($($a),*) }
        }
    )*};
}

real! {
    sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int;
    socket(domain: c_int, ty: c_int, proto: c_int) -> c_int;
    connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    listen(fd: c_int, backlog: c_int) -> c_int;
    accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int;
    close(fd: c_int) -> c_int;
    close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int;
    shutdown(fd: c_int, how: c_int) -> c_int;
    read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t;
    write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t;
    readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t;
    writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t;
    recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t;
    send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t;
    recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t;
    sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t;
    recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t;
    sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t;
    recvmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int, t: *mut timespec) -> c_int;
    sendmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int) -> c_int;
    dup(fd: c_int) -> c_int;
    dup2(fd: c_int, to: c_int) -> c_int;
    dup3(fd: c_int, to: c_int, flags: c_int) -> c_int;
    fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int;
    poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int;
    ppoll(fds: *mut pollfd, n: nfds_t, ts: *const timespec, mask: *const sigset_t) -> c_int;
    select(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, tv: *mut timeval) -> c_int;
    pselect(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, ts: *const timespec, mask: *const sigset_t) -> c_int;
    epoll_create(size: c_int) -> c_int;
    epoll_create1(flags: c_int) -> c_int;
    epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int;
    epoll_wait(epfd: c_int, ev: *mut epoll_event, max: c_int, timeout: c_int) -> c_int;
    epoll_pwait(epfd: c_int, ev: *mut epoll_event, max: c_int, timeout: c_int, mask: *const sigset_t) -> c_int;
    sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t;
    splice(inp: c_int, ioff: *mut loff_t, out: c_int, ooff: *mut loff_t, n: size_t, flags: c_uint) -> ssize_t;
    fork() -> libc::pid_t;
    fdopen(fd: c_int, mode: *const c_char) -> *mut FILE;
    syscall(n: libc::c_long, a0: libc::c_long, a1: libc::c_long, a2: libc::c_long, a3: libc::c_long, a4: libc::c_long, a5: libc::c_long) -> libc::c_long;
    vdprintf(fd: c_int, fmt: *const c_char, ap: *mut c_void) -> c_int;
    epoll_pwait2(epfd: c_int, ev: *mut epoll_event, max: c_int, t: *const timespec, mask: *const sigset_t) -> c_int;
    clone(f: Option<CloneFn>, stack: *mut c_void, flags: c_int, arg: *mut c_void, ptid: *mut pid_t, tls: *mut c_void, ctid: *mut pid_t) -> c_int;
    setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int;
    getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int;
    execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    execveat(dirfd: c_int, path: *const c_char, argv: *const *const c_char, envp: *const *const c_char, flags: c_int) -> c_int;
    posix_spawn(pid: *mut pid_t, path: *const c_char, fa: *const posix_spawn_file_actions_t, attr: *const posix_spawnattr_t, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int;
    posix_spawnp(pid: *mut pid_t, path: *const c_char, fa: *const posix_spawn_file_actions_t, attr: *const posix_spawnattr_t, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int;
    posix_spawn_file_actions_init(fa: *mut posix_spawn_file_actions_t) -> c_int;
    posix_spawn_file_actions_destroy(fa: *mut posix_spawn_file_actions_t) -> c_int;
    posix_spawn_file_actions_addclose(fa: *mut posix_spawn_file_actions_t, fd: c_int) -> c_int;
    posix_spawn_file_actions_adddup2(fa: *mut posix_spawn_file_actions_t, fd: c_int, to: c_int) -> c_int;
    posix_spawn_file_actions_addopen(fa: *mut posix_spawn_file_actions_t, fd: c_int, path: *const c_char, oflag: c_int, mode: mode_t) -> c_int;
    posix_spawn_file_actions_addclosefrom_np(fa: *mut posix_spawn_file_actions_t, from: c_int) -> c_int;
    posix_spawn_file_actions_addchdir_np(fa: *mut posix_spawn_file_actions_t, path: *const c_char) -> c_int;
    posix_spawn_file_actions_addfchdir_np(fa: *mut posix_spawn_file_actions_t, fd: c_int) -> c_int;
    posix_spawn_file_actions_addtcsetpgrp_np(fa: *mut posix_spawn_file_actions_t, fd: c_int) -> c_int;
    system(cmd: *const c_char) -> c_int;
    popen(cmd: *const c_char, mode: *const c_char) -> *mut FILE;
    fclose(f: *mut FILE) -> c_int;
    closefrom(first: c_int) -> ();
    open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int;
    open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int;
    openat(dir: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int;
    openat64(dir: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int;
    __open_2(path: *const c_char, flags: c_int) -> c_int;
    __open64_2(path: *const c_char, flags: c_int) -> c_int;
    __openat_2(dir: c_int, path: *const c_char, flags: c_int) -> c_int;
    __openat64_2(dir: c_int, path: *const c_char, flags: c_int) -> c_int;
    creat(path: *const c_char, mode: mode_t) -> c_int;
    creat64(path: *const c_char, mode: mode_t) -> c_int;
    socketpair(domain: c_int, ty: c_int, proto: c_int, sv: *mut c_int) -> c_int;
    pipe(fds: *mut c_int) -> c_int;
    pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    eventfd(init: c_uint, flags: c_int) -> c_int;
    signalfd(fd: c_int, mask: *const sigset_t, flags: c_int) -> c_int;
    timerfd_create(clock: c_int, flags: c_int) -> c_int;
    memfd_create(name: *const c_char, flags: c_uint) -> c_int;
    inotify_init() -> c_int;
    inotify_init1(flags: c_int) -> c_int;
    fopen(path: *const c_char, mode: *const c_char) -> *mut FILE;
    fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE;
    freopen(path: *const c_char, mode: *const c_char, f: *mut FILE) -> *mut FILE;
    freopen64(path: *const c_char, mode: *const c_char, f: *mut FILE) -> *mut FILE;
    tmpfile() -> *mut FILE;
    tmpfile64() -> *mut FILE;
    mkstemp(t: *mut c_char) -> c_int;
    mkstemp64(t: *mut c_char) -> c_int;
    mkostemp(t: *mut c_char, flags: c_int) -> c_int;
    mkostemp64(t: *mut c_char, flags: c_int) -> c_int;
    mkstemps(t: *mut c_char, suffix: c_int) -> c_int;
    mkostemps(t: *mut c_char, suffix: c_int, flags: c_int) -> c_int;
}
