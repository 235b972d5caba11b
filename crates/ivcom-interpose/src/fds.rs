//! Descriptors made or closed behind the table's back. Every intercepted call that returns
//! a new descriptor passes it through [`fresh`]: the kernel only hands out free numbers, so
//! an entry still recorded at that number is for a socket that was closed without our
//! `close` seeing it, and is dropped before the program sees the number. `fclose`,
//! `freopen` and `closefrom` close through C library internals and are followed here too.
//! None of this makes a system call unless an entry is found stale.
//!
//! The library's own long-lived descriptors (region memfds, registration and announcement
//! sockets, locks, the log) are kept out of the program's way ([`lift`]): numbered at or above
//! the soft `RLIMIT_NOFILE`, where the program cannot allocate, so that a program sized to
//! its limit reaches as many connections as over TCP; and recorded, so that a program that
//! closes every descriptor it does not know (`close_range`, `closefrom`, a loop over
//! `/proc/self/fd`) gets `EBADF` for them, as it would without the library, instead of
//! closing them.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

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
    if r >= LOWEST_OWN.load(Ordering::Relaxed) {
        // Closed behind our back (not through `close`): no longer ours.
        disown(r);
    }
    r
}

/// The library's own descriptors ([`lift`]); [`LOWEST_OWN`] is the smallest of them, so
/// that `close` of any lower number (nearly all of the program's) takes no lock.
static OWN: Mutex<BTreeSet<c_int>> = Mutex::new(BTreeSet::new());
static LOWEST_OWN: AtomicI32 = AtomicI32::new(c_int::MAX);

fn own() -> std::sync::MutexGuard<'static, BTreeSet<c_int>> {
    OWN.lock().unwrap_or_else(|e| e.into_inner())
}

fn disown(fd: c_int) {
    let mut o = own();
    if o.remove(&fd) {
        LOWEST_OWN.store(o.first().copied().unwrap_or(c_int::MAX), Ordering::Relaxed);
    }
}

/// Whether `fd` is one of the library's own descriptors.
#[inline]
pub fn is_own(fd: c_int) -> bool {
    fd >= LOWEST_OWN.load(Ordering::Relaxed) && own().contains(&fd)
}

/// The library's own descriptors in `first..=last`, in order.
pub fn own_in(first: c_int, last: c_int) -> Vec<c_int> {
    if last < LOWEST_OWN.load(Ordering::Relaxed) || first > last {
        return Vec::new();
    }
    own().range(first..=last).copied().collect()
}

thread_local! {
    /// How deep this thread is in intercepted calls: 1 inside a call the program made, more
    /// when the library's own work calls an intercepted function (its `close` of a descriptor
    /// of its own goes through the C library's `close`, which is ours).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Held for the duration of an intercepted call ([`entered`]).
#[derive(Debug)]
pub struct Entered(());

impl Drop for Entered {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Marks this thread as inside an intercepted call until the guard is dropped.
#[inline]
pub fn entered() -> Entered {
    DEPTH.with(|d| d.set(d.get() + 1));
    Entered(())
}

/// Whether the current intercepted call was made by the program (not by the library's own
/// work from inside another one).
#[inline]
pub fn program_call() -> bool {
    DEPTH.with(|d| d.get() == 1)
}

/// The library is closing `fd` itself: it is no longer one of its own.
#[inline]
pub fn closing_own(fd: c_int) {
    if fd >= LOWEST_OWN.load(Ordering::Relaxed) {
        disown(fd);
    }
}

/// Makes `fd` one of the library's own descriptors: moved to a number at or above the soft
/// `RLIMIT_NOFILE` when the hard limit leaves room (the soft limit is raised for the one
/// `F_DUPFD_CLOEXEC` and put back: three system calls), else into the top quarter of the
/// program's range (at most 4096 numbers; the program, which gets the lowest free numbers,
/// reaches those last), and recorded. Close-on-exec either way.
pub fn lift(fd: OwnedFd) -> OwnedFd {
    let fd = match lift_under(fd, &nofile(false)) {
        Ok(fd) => fd,
        // The limit changed since it was read: read it again.
        Err(fd) => lift_under(fd, &nofile(true)).unwrap_or_else(|fd| fd),
    };
    let raw = fd.as_raw_fd();
    let mut o = own();
    o.insert(raw);
    LOWEST_OWN.fetch_min(raw, Ordering::Relaxed);
    drop(o);
    fd
}

/// [`lift`]'s move under the limit `lim`; `Err` gives the descriptor back when the move
/// failed.
fn lift_under(fd: OwnedFd, lim: &rustix::process::Rlimit) -> Result<OwnedFd, OwnedFd> {
    Ok(match lim.current {
        Some(soft) if (fd.as_raw_fd() as u64) < soft => {
            let room_above = lim.maximum.is_none_or(|hard| soft < hard);
            if room_above {
                match above_limit(fd.as_fd(), lim) {
                    Some(d) => d,
                    None => return Err(fd),
                }
            } else if (fd.as_raw_fd() as u64) < top_window(soft) {
                match rustix::io::fcntl_dupfd_cloexec(&fd, top_window(soft) as c_int) {
                    Ok(d) => d,
                    Err(_) => return Err(fd),
                }
            } else {
                fd
            }
        }
        _ => fd,
    })
}

/// A close-on-exec duplicate of `fd` numbered at or above the soft `RLIMIT_NOFILE`.
pub fn dup_own(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let lim = nofile(true);
    let d = match above_limit(fd, &lim) {
        Some(d) => d,
        None => {
            let from = lim.current.map_or(0, top_window).min(c_int::MAX as u64) as c_int;
            rustix::io::fcntl_dupfd_cloexec(fd, from).or_else(|_| rustix::io::fcntl_dupfd_cloexec(fd, 0))?
        }
    };
    Ok(lift(d))
}

/// `RLIMIT_NOFILE`, read at most every 100 ms: every connection lifts several descriptors,
/// and a program changes its limit rarely (one lowered meanwhile makes a `dup` above the old
/// limit fail, which falls back as a failed `dup` always did: the descriptor stays where it
/// is, or goes to the lowest free number).
fn nofile(fresh: bool) -> rustix::process::Rlimit {
    static CACHE: Mutex<Option<(u64, rustix::process::Rlimit)>> = Mutex::new(None);
    let now = crate::wait::mono_ms();
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    match &*c {
        Some((at, lim)) if !fresh && now.saturating_sub(*at) < 100 => *lim,
        _ => {
            let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
            *c = Some((now, lim));
            lim
        }
    }
}

/// The first number of the top of the descriptor range under soft limit `soft`, where the
/// library keeps its own when the hard limit leaves no room above: the upper quarter, at
/// most 4096 numbers.
fn top_window(soft: u64) -> u64 {
    soft - (soft / 4).min(4096)
}

/// A close-on-exec duplicate of `fd` at or above the soft limit of `lim` (the current
/// `RLIMIT_NOFILE`), raising the soft limit for the moment of the `dup`; `None` where the
/// hard limit leaves no room above.
fn above_limit(fd: BorrowedFd<'_>, lim: &rustix::process::Rlimit) -> Option<OwnedFd> {
    use rustix::process::{prlimit, Resource, Rlimit};
    let soft = lim.current?;
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if soft >= hard || soft > c_int::MAX as u64 {
        return None;
    }
    let raised = Rlimit { current: Some(hard.min(soft + (1 << 16))), maximum: lim.maximum };
    // The limit as it was is put back (`lim` may be a cached reading).
    let was = prlimit(None, Resource::Nofile, raised).ok()?;
    let d = rustix::io::fcntl_dupfd_cloexec(fd, soft as c_int).ok();
    let _ = prlimit(None, Resource::Nofile, was);
    if was.current != lim.current {
        // The program changed it meanwhile: not under the limit it set.
        return None;
    }
    d
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

/// `closefrom`: as `close_range(first, ~0, 0)`, which keeps the library's own descriptors.
pub fn closefrom(first: c_int) {
    if own_in(first.max(0), c_int::MAX).is_empty() {
        table::forget_from(first);
        // SAFETY: passed on unchanged.
        unsafe { crate::real::closefrom(first) };
    } else {
        table::forget_from(first);
        // SAFETY: the C contract of closefrom, as close_range.
        unsafe { crate::ops::close_range(first.max(0) as libc::c_uint, libc::c_uint::MAX, 0) };
    }
}

/// The descriptors a message passes (`SCM_RIGHTS`): in the program's header for `sendmsg`,
/// or the one the kernel just filled for `recvmsg`. Looks only when it has control data.
///
/// # Safety
/// `msg` is null or the program's valid message header.
pub unsafe fn rights_in(msg: *const libc::msghdr) -> Vec<c_int> {
    let mut out = Vec::new();
    if msg.is_null() {
        return out;
    }
    // SAFETY: the caller's header.
    let m = unsafe { &*msg };
    if m.msg_control.is_null() || m.msg_controllen < std::mem::size_of::<libc::cmsghdr>() as _ {
        return out;
    }
    // SAFETY: walking the program's control buffer with the C library's macros, within
    // msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<c_int>();
                let n = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..n {
                    out.push(data.add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    out
}

/// `recvmsg` passed descriptors in (`SCM_RIGHTS`): they are new numbers.
///
/// # Safety
/// `msg` is the program's message header, just filled in by a successful `recvmsg`.
pub unsafe fn fresh_rights(msg: *const libc::msghdr) {
    // SAFETY: the caller's header, as `rights_in` requires.
    for fd in unsafe { rights_in(msg) } {
        fresh(fd);
    }
}
