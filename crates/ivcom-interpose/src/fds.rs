//! Descriptors made or closed behind the table's back. Every intercepted call that returns
//! a new descriptor passes it through [`fresh`]: the kernel only hands out free numbers, so
//! an entry still recorded at that number is for a socket that was closed without our
//! `close` seeing it, and is dropped before the program sees the number. `fclose`,
//! `freopen` and `closefrom` close through C library internals and are followed here too.
//! None of this makes a system call unless an entry is found stale.

use libc::{c_int, FILE};

use crate::table;
use crate::wait::set_errno;

fn keep_errno(f: impl FnOnce()) {
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    f();
    set_errno(e);
}

/// A call returned descriptor `r` (negative: it failed): forget whatever was recorded there.
#[inline]
pub fn fresh(r: c_int) -> c_int {
    if r >= 0 && table::tracked(r) {
        keep_errno(|| table::forget_stale(r));
    }
    r
}

/// [`fresh`] for the two descriptors `pipe`/`socketpair` wrote to `fds` when `r` is 0.
///
/// # Safety
/// `fds` points to two ints when `r` is 0.
pub unsafe fn fresh_pair(r: c_int, fds: *const c_int) -> c_int {
    if r == 0 && !fds.is_null() {
        // SAFETY: the caller's two-int array, written by the successful call.
        let (a, b) = unsafe { (*fds, *fds.add(1)) };
        fresh(a);
        fresh(b);
    }
    r
}

/// [`fresh`] for the descriptor under a new stream.
///
/// # Safety
/// `f` is null or a stream the C library just returned.
pub unsafe fn fresh_file(f: *mut FILE) -> *mut FILE {
    if !f.is_null() {
        // SAFETY: a valid stream.
        fresh(unsafe { libc::fileno(f) });
    }
    f
}

/// The descriptor under stream `f`, if it has one and it is tracked.
///
/// # Safety
/// `f` is null or a valid stream.
unsafe fn tracked_fileno(f: *mut FILE) -> Option<c_int> {
    if f.is_null() {
        return None;
    }
    // SAFETY: a valid stream.
    let fd = unsafe { libc::fileno(f) };
    (fd >= 0 && table::tracked(fd)).then_some(fd)
}

/// `fclose`: the stream's descriptor is closed by the C library's own `close`; the entry
/// goes as with our `close` (`crate::ops::close`).
///
/// # Safety
/// The C contract of `fclose`.
pub unsafe fn fclose(f: *mut FILE) -> c_int {
    // SAFETY: the caller's stream.
    let dropped = unsafe { tracked_fileno(f) }.and_then(crate::ops::forget_closing);
    // SAFETY: passed on unchanged.
    let r = unsafe { crate::real::fclose(f) };
    keep_errno(|| drop(dropped));
    r
}

/// `freopen` and `freopen64`: the stream's old descriptor is closed, a new one opened.
///
/// # Safety
/// The C contract of `freopen`.
pub unsafe fn freopen(
    path: *const libc::c_char,
    mode: *const libc::c_char,
    f: *mut FILE,
    large: bool,
) -> *mut FILE {
    // SAFETY: the caller's stream.
    let dropped = unsafe { tracked_fileno(f) }.and_then(crate::ops::forget_closing);
    // SAFETY: passed on unchanged.
    let r = unsafe {
        if large {
            crate::real::freopen64(path, mode, f)
        } else {
            crate::real::freopen(path, mode, f)
        }
    };
    keep_errno(|| drop(dropped));
    // SAFETY: the stream just returned.
    unsafe { fresh_file(r) }
}

/// `closefrom`.
pub fn closefrom(first: c_int) {
    table::forget_from(first);
    // SAFETY: passed on unchanged.
    unsafe { crate::real::closefrom(first) };
}

/// `recvmsg` passed descriptors in (`SCM_RIGHTS`): they are new numbers.
///
/// # Safety
/// `msg` is the program's message header, just filled in by a successful `recvmsg`.
pub unsafe fn fresh_rights(msg: *const libc::msghdr) {
    if msg.is_null() {
        return;
    }
    // SAFETY: the caller's header.
    let m = unsafe { &*msg };
    if m.msg_control.is_null() || m.msg_controllen < std::mem::size_of::<libc::cmsghdr>() as _ {
        return;
    }
    // SAFETY: walking the control buffer the kernel just filled, with the C library's macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<c_int>();
                let n = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..n {
                    fresh(data.add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
}
