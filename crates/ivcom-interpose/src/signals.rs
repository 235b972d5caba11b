//! The program's signal handlers, run through a trampoline that counts, per thread, the
//! handlers that ran, so that a blocking call the library serves ends as the kernel's own
//! would (POSIX, "Interruption of system calls"; signal(7)): with `EINTR` once a handler
//! without `SA_RESTART` ran in the waiting thread, going on after one with it, and
//! `poll`/`select`/`epoll` with `EINTR` after any. A kernel call is interrupted only while the
//! thread is inside it; the library's calls also spin in user space before they sleep, and a
//! handler that runs then is seen only through these counts.
//!
//! `sigaction` (and `signal`, `bsd_signal`, `sysv_signal`, `siginterrupt`, which glibc
//! implements with its internal `sigaction`) install the trampoline in place of a handler
//! and keep the program's own handler aside; what the program reads back is its own
//! handler. Handlers installed around the C library (raw `rt_sigaction`, static programs)
//! are not counted: for them the library falls back to what the kernel's `poll` reports.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

use libc::{c_int, c_void, siginfo_t};

/// Signal numbers are below this (Linux: 64 signals, numbered from 1).
const NSIG: usize = 65;

/// The program's action for one signal while the trampoline stands in for it.
struct Action {
    handler: AtomicUsize,
    flags: AtomicI32,
}

#[allow(clippy::declare_interior_mutable_const)]
const NONE: Action = Action { handler: AtomicUsize::new(0), flags: AtomicI32::new(0) };
static ACTIONS: [Action; NSIG] = [NONE; NSIG];
/// Serialises the program's changes of disposition (the trampoline only loads).
static CHANGE: Mutex<()> = Mutex::new(());

thread_local! {
    // Plain cells with constant initial values and no destructor: the trampoline's access
    // is a thread-local load and store, safe in a signal handler.
    static RAN: Cell<u64> = const { Cell::new(0) };
    static RAN_NO_RESTART: Cell<u64> = const { Cell::new(0) };
}

/// The handlers counted in this thread so far: `(all, without SA_RESTART)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(u64, u64);

/// What ran in this thread since a [`Mark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// No handler.
    Nothing,
    /// Only handlers with `SA_RESTART`: a restartable call goes on.
    Restart,
    /// A handler without `SA_RESTART`: the call ends with `EINTR`.
    Interrupt,
}

/// This thread's counts now.
#[inline]
pub fn mark() -> Mark {
    Mark(RAN.with(Cell::get), RAN_NO_RESTART.with(Cell::get))
}

/// What ran in this thread since `m`.
#[inline]
pub fn since(m: Mark) -> Since {
    let now = mark();
    if now.1 != m.1 {
        Since::Interrupt
    } else if now.0 != m.0 {
        Since::Restart
    } else {
        Since::Nothing
    }
}

extern "C" fn trampoline(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let Some(a) = usize::try_from(sig).ok().and_then(|s| ACTIONS.get(s)) else { return };
    let h = a.handler.load(Ordering::Acquire);
    let flags = a.flags.load(Ordering::Acquire);
    RAN.with(|c| c.set(c.get().wrapping_add(1)));
    if flags & libc::SA_RESTART == 0 {
        RAN_NO_RESTART.with(|c| c.set(c.get().wrapping_add(1)));
    }
    if flags & libc::SA_RESETHAND as c_int != 0 {
        // The kernel has put the default action back.
        a.handler.store(libc::SIG_DFL, Ordering::Release);
    }
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed `h` with SA_SIGINFO, as a three-argument handler,
        // and the kernel passed us the arguments for it.
        let f: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed `h` without SA_SIGINFO, as a one-argument handler.
        let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

fn tramp() -> usize {
    trampoline as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize
}

/// `sigaction`: the trampoline stands in for a program's handler; the old action given back
/// is the program's own.
///
/// # Safety
/// The C contract of `sigaction`.
pub unsafe fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let slot = usize::try_from(sig).ok().filter(|&s| s > 0 && s < NSIG).map(|s| &ACTIONS[s]);
    let Some(a) = slot.filter(|_| sig != libc::SIGKILL && sig != libc::SIGSTOP) else {
        // SAFETY: passed on unchanged.
        return unsafe { crate::real::sigaction(sig, act, old) };
    };
    let _g = CHANGE.lock().unwrap_or_else(|e| e.into_inner());
    let (h0, f0) = (a.handler.load(Ordering::Acquire), a.flags.load(Ordering::Acquire));
    // SAFETY: a zeroed sigaction is a valid value to be overwritten by the kernel's.
    let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
    let r = if act.is_null() {
        // SAFETY: reading the current action into a local.
        unsafe { crate::real::sigaction(sig, std::ptr::null(), &mut prev) }
    } else {
        // SAFETY: the caller passed a valid action.
        let mut mine = unsafe { *act };
        let h = mine.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            a.flags.store(mine.sa_flags, Ordering::Release);
            a.handler.store(h, Ordering::Release);
            mine.sa_sigaction = tramp();
            mine.sa_flags |= libc::SA_SIGINFO;
        }
        // SAFETY: installing a valid action from a local; the old one into a local.
        let r = unsafe { crate::real::sigaction(sig, &mine, &mut prev) };
        if r != 0 {
            a.flags.store(f0, Ordering::Release);
            a.handler.store(h0, Ordering::Release);
        }
        r
    };
    if r == 0 && !old.is_null() {
        if prev.sa_sigaction == tramp() {
            prev.sa_sigaction = h0;
            prev.sa_flags = f0;
        }
        // SAFETY: the caller passed room for the old action.
        unsafe { *old = prev };
    }
    r
}

/// Signals whose handlers `signal` installs without `SA_RESTART` (`siginterrupt`), as glibc
/// keeps them.
static INTERRUPTING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `signal` and `bsd_signal` (BSD semantics, as glibc's): the handler stays installed,
/// the signal is blocked while it runs, and interrupted calls restart unless `siginterrupt`
/// said otherwise. `sysv` (`sysv_signal`): reset to the default on delivery, not blocked,
/// not restarted. Returns the previous handler, or `SIG_ERR`.
///
/// # Safety
/// The C contract of `signal`.
pub unsafe fn signal(sig: c_int, handler: libc::sighandler_t, sysv: bool) -> libc::sighandler_t {
    if sig <= 0 || sig as usize >= NSIG {
        crate::wait::set_errno(libc::EINVAL);
        return libc::SIG_ERR;
    }
    // SAFETY: a zeroed sigaction is valid; the fields below are set.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    if sysv {
        act.sa_flags = (libc::SA_RESETHAND | libc::SA_NODEFER) as c_int;
    } else {
        // SAFETY: adding a valid signal number to a local set.
        unsafe { libc::sigaddset(&mut act.sa_mask, sig) };
        if INTERRUPTING.load(Ordering::Relaxed) & (1u64 << (sig - 1)) == 0 {
            act.sa_flags = libc::SA_RESTART;
        }
    }
    // SAFETY: a zeroed sigaction to receive the old one.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both point to locals.
    if unsafe { sigaction(sig, &act, &mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// `siginterrupt`: whether the handler of `sig` interrupts calls (`flag` non-zero: no
/// `SA_RESTART`) or lets them restart.
///
/// # Safety
/// The C contract of `siginterrupt`.
pub unsafe fn siginterrupt(sig: c_int, flag: c_int) -> c_int {
    if sig <= 0 || sig as usize >= NSIG {
        crate::wait::set_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: a zeroed sigaction to receive the current one.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reading into a local.
    if unsafe { sigaction(sig, std::ptr::null(), &mut act) } != 0 {
        return -1;
    }
    let bit = 1u64 << (sig - 1);
    if flag != 0 {
        INTERRUPTING.fetch_or(bit, Ordering::Relaxed);
        act.sa_flags &= !libc::SA_RESTART;
    } else {
        INTERRUPTING.fetch_and(!bit, Ordering::Relaxed);
        act.sa_flags |= libc::SA_RESTART;
    }
    // SAFETY: installing the program's own action (read above) with the flag changed.
    unsafe { sigaction(sig, &act, std::ptr::null_mut()) }
}
