//! `libivcom_preload.so`: the C ABI of the socket calls `ivcom run` intercepts. Each shim
//! forwards to `ivcom_interpose::ops`, which passes everything that is not an accelerated
//! connection to the C library unchanged. No logic lives here.
//!
//! A panic must not unwind into C: `extern "C"` functions abort on one, and the logic is
//! written not to panic on any input.

#![allow(clippy::missing_safety_doc)]

use ivcom_interpose::ops;
use libc::{c_int, c_uint, c_ulong, c_void, epoll_event, fd_set, iovec, msghdr, nfds_t, pollfd, sigset_t};
use libc::{loff_t, off_t, pid_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval};

macro_rules! shims {
    ($($name:ident($($a:ident: $t:ty),*) -> $r:ty => $body:expr;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> $r {
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
