//! Waiting on accelerated connections: blocking reads and writes, `poll`/`ppoll` and
//! `select`/`pselect`. Each first looks at shared memory, then polls it within the spin
//! budget, then announces sleep and blocks in the kernel on the TCP sockets (where a peer's
//! wakeup byte, FIN or RST arrives) together with whatever else the program waits for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::{c_int, c_ulong, nfds_t, pollfd, sigset_t, timespec};

use crate::conn::{Errno, TcpConn, R};
use crate::epoll::EpollSet;
use crate::settings::{self, count, COUNTERS};
use crate::signals::Since;
use crate::table;

/// Longest sleep while another thread of the process waits on the same connection, or while
/// waiting for ring space after the peer's FIN (the kernel then reports TCP readable forever).
pub const SHORT_SLEEP: Duration = Duration::from_millis(2);

/// Longest sleep on a connection another process may hold too (after `fork`): each process
/// announces its sleeps in the same ring words, so one may take a wakeup meant for another.
pub const SHARED_SLEEP: Duration = Duration::from_millis(10);
/// The longest a writer waiting for ring space sleeps before it looks again (`wait_fd`).
pub const WRITER_SLEEP: Duration = Duration::from_millis(100);

/// Remaining time until `deadline`, in the kernel's terms (`None`: forever).
pub fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

fn to_ts(d: Duration) -> timespec {
    timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
}

/// Kernel `ppoll` on `fds` for at most `t` (`None`: forever).
fn kernel_poll(fds: &mut [pollfd], t: Option<Duration>, mask: *const sigset_t) -> c_int {
    let ts = t.map(to_ts);
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const timespec);
    // SAFETY: `fds` is a valid array of its length; `tsp` is null or points to a local.
    unsafe { crate::real::ppoll(fds.as_mut_ptr(), fds.len() as nfds_t, tsp, mask) }
}

/// Whether the kernel says `fd` is writable now.
pub fn kernel_writable(fd: c_int) -> bool {
    let mut p = [pollfd { fd, events: libc::POLLOUT, revents: 0 }];
    kernel_poll(&mut p, Some(Duration::ZERO), std::ptr::null()) > 0 && p[0].revents & libc::POLLOUT != 0
}

/// The shortest adaptive polling budget: about the cost of a system call, so that a wait
/// whose answer is that near never sleeps.
pub const MIN_SPIN: Duration = Duration::from_micros(2);

thread_local! {
    /// When this thread's current wait began to poll.
    static WAIT_START: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    /// This thread's recent wait times (from the start of polling to readiness, by polling
    /// or after a sleep), as an exponentially weighted moving average in nanoseconds (weight
    /// 1/8; `u64::MAX`: no wait yet). Per thread: a thread's waits follow its own traffic
    /// (a client's for answers, a server's for requests). Each sample is capped at 4
    /// budgets, so that one long idle period does not stop polling for long.
    static WAIT_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
}

/// The polling budget now: the configured budget while the recent wait time is within it
/// (polling wins there), [`MIN_SPIN`] when waits are longer (polling would cost more than
/// it saves) or when `near` says no answer is near (the peer sleeps with nothing of
/// ours to read; the machine has no idle CPU). A budget set by `--spin-us` is used as is.
pub fn budget(near: bool) -> Duration {
    let s = settings::get();
    if s.spin_fixed || s.spin.is_zero() {
        return s.spin;
    }
    if !near || !cpu_idle() {
        return MIN_SPIN.min(s.spin);
    }
    let w = WAIT_NS.with(|w| w.get());
    if w == u64::MAX || Duration::from_nanos(w) <= s.spin {
        s.spin
    } else {
        MIN_SPIN.min(s.spin)
    }
}

/// Records one wait that began to poll at this thread's [`WAIT_START`] and ended now.
fn record_wait() {
    let Some(t0) = WAIT_START.with(|s| s.take()) else { return };
    let cap = settings::get().spin.saturating_mul(4).as_nanos() as u64;
    let sample = (t0.elapsed().as_nanos() as u64).min(cap);
    WAIT_NS.with(|w| {
        let old = w.get();
        w.set(if old == u64::MAX { sample } else { old - old / 8 + sample / 8 });
    });
}

/// Whether a CPU is idle for the peer to run on: the kernel's count of runnable tasks
/// (`/proc/loadavg`'s fourth field, read at most every 10 ms) is below the number of CPUs
/// this process may use plus one (the caller itself). Polling while every CPU is busy
/// takes time from the peer it waits for.
fn cpu_idle() -> bool {
    static CHECKED_MS: AtomicU64 = AtomicU64::new(0);
    static IDLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
    let now = crate::wait::mono_ms();
    let last = CHECKED_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10
        && CHECKED_MS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        if let Some(idle) = read_idle() {
            IDLE.store(idle, Ordering::Relaxed);
        }
    }
    IDLE.load(Ordering::Relaxed)
}

fn read_idle() -> Option<bool> {
    static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
    let mut buf = [0u8; 128];
    let fd = rustix::fs::open(
        "/proc/loadavg",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let fd = crate::fds::lift(fd);
    let n = rustix::io::read(&fd, &mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let running: u64 = text.split_whitespace().nth(3)?.split('/').next()?.parse().ok()?;
    Some(running <= cpus)
}

/// Nanoseconds on a monotonic clock since the process's first use of it (for rate limits
/// and fairness, kept in atomics).
pub fn mono_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Milliseconds of [`mono_ns`].
pub fn mono_ms() -> u64 {
    mono_ns() / 1_000_000
}

/// Polls `check` for up to the polling budget ([`budget`]; `near`: whether an answer may be
/// near, see there), and no later than `deadline`. The wait is recorded for the budget when
/// polling wins, or when the sleep that follows ends ([`Armed::slept`]).
pub fn spin_near(deadline: Option<Instant>, near: bool, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    WAIT_START.with(|s| s.set(Some(start)));
    let budget = budget(near);
    if budget.is_zero() {
        return false;
    }
    let hit = spin_for(start, budget, deadline, &mut check);
    if hit {
        record_wait();
    }
    hit
}

/// [`spin_near`] for a wait whose answer may be near.
pub fn spin(deadline: Option<Instant>, check: impl FnMut() -> bool) -> bool {
    spin_near(deadline, true, check)
}

fn spin_for(
    start: Instant,
    budget: Duration,
    deadline: Option<Instant>,
    check: &mut impl FnMut() -> bool,
) -> bool {
    let mut end = start + budget;
    if let Some(d) = deadline {
        end = end.min(d);
    }
    let mut i = 0u32;
    loop {
        if check() {
            return true;
        }
        i = i.wrapping_add(1);
        if i.is_multiple_of(64) && Instant::now() >= end {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Whether shared memory alone shows `c` ready: at least `read_at` bytes in the ring for a
/// reader, `write_at` bytes of ring space for a writer whose data goes into the ring (0: not
/// asked; 1: any; more: a change since an edge was reported, see [`TcpConn::next_at`]).
/// Cheap: the polling loops call it.
pub fn ready_in_memory(c: &TcpConn, read_at: u64, write_at: u64) -> bool {
    (read_at == 1 && c.ring_has_data())
        || (read_at > 1 && c.next_at(true) > read_at)
        || (write_at == 1 && !c.tx_on_tcp() && c.writable(|| false))
        || (write_at > 1 && c.next_at(false) > write_at)
}

/// Sleep announcements on a set of connections ([`TcpConn::arm`]), withdrawn when dropped.
/// Drop it before taking wakeup bytes off the sockets ([`TcpConn::absorb`]).
pub struct Armed<'a> {
    list: Vec<(&'a TcpConn, bool)>,
    ready: bool,
    short: bool,
    shared: bool,
}

impl<'a> Armed<'a> {
    /// Announces sleep on each connection for reading and for writing, as asked: `(c,
    /// read_at, write_at)` as for [`ready_in_memory`]. A threshold above 1 (an edge already
    /// reported) that cannot be reached any more (the peer closed) sleeps without an
    /// announcement, as the kernel's edge-triggered wait would.
    pub fn new(wants: impl IntoIterator<Item = (&'a TcpConn, u64, u64)>) -> Self {
        let mut a = Armed { list: Vec::new(), ready: false, short: false, shared: false };
        for (c, r, w) in wants {
            for (read, at) in [(true, r), (false, w)] {
                if at == 0 {
                    continue;
                }
                let (r_at, w_at) = if read { (at, 0) } else { (0, at) };
                if at > 1 && ready_in_memory(c, r_at, w_at) {
                    a.ready = true;
                    continue;
                }
                if c.arm(read, at) {
                    a.list.push((c, read));
                    a.short |= c.crowded() || (!read && c.peer_closed()) || c.in_handback();
                    // A connection several processes hold: they share one announcement, and a
                    // wakeup byte one of them takes leaves another asleep unannounced, so
                    // sleeps there are capped (readers announce afresh for each other too:
                    // `TcpConn::disarm`).
                    a.shared |= c.shared();
                } else if at == 1 || ready_in_memory(c, r_at, w_at) {
                    a.ready = true;
                }
                // Else a threshold that nothing more will reach (closed): no announcement,
                // and nothing to hurry for.
            }
        }
        a
    }

    /// Something became ready while announcing: do not sleep.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// How long to sleep: until `deadline`, but at most [`SHORT_SLEEP`] while another thread
    /// waits on one of the connections, or a writer waits for space after the peer's FIN.
    pub fn timeout(&self, deadline: Option<Instant>) -> Option<Duration> {
        let t = remaining(deadline);
        let cap = if self.short {
            SHORT_SLEEP
        } else if self.shared {
            SHARED_SLEEP
        } else {
            return t;
        };
        Some(t.map_or(cap, |t| t.min(cap)))
    }

    /// Whether the sleep has a cap ([`Armed::timeout`] is never `None` then).
    pub fn capped(&self) -> bool {
        self.short || self.shared
    }

    /// Counts a sleep that woke with `events` kernel events.
    pub fn slept(&self, events: c_int) {
        record_wait();
        count(&COUNTERS.sleeps, 1);
        if events == 0 && self.capped() {
            count(&COUNTERS.capped, 1);
        }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        for (c, read) in &self.list {
            c.disarm(*read);
        }
    }
}

/// A blocking call's own duplicate (`F_DUPFD_CLOEXEC`) of the program's socket, held while
/// the call sleeps and used for every kernel operation from then on: another thread may close
/// the program's descriptor meanwhile and get its number back for something else, as with
/// TCP, where a blocked call keeps the socket it started on. Closed when dropped.
#[derive(Debug)]
pub struct Held {
    dup: std::os::fd::OwnedFd,
    /// The program's descriptor and the identity of the socket it named.
    orig: c_int,
    ident: table::Ident,
}

impl Held {
    /// Duplicates `fd`, checking that it is still the socket recorded for it (`EBADF` if it
    /// was closed, or now refers to something else: the entry is then dropped as stale).
    pub fn of(fd: c_int) -> R<Held> {
        let want = table::ident(fd).ok_or(libc::EBADF)?;
        // SAFETY: `fd` is borrowed for this one `fcntl`.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let d = crate::fds::dup_own(b).map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))?;
        let got = rustix::fs::fstat(&d).ok().map(|st| table::Ident { dev: st.st_dev, ino: st.st_ino });
        if got != Some(want) {
            table::verify(fd);
            return Err(libc::EBADF);
        }
        Ok(Held { dup: d, orig: fd, ident: want })
    }

    /// Whether the program's descriptor no longer names the socket (closed, or another file
    /// put in its place): one `fstat`.
    pub fn replaced(&self) -> bool {
        table::Ident::of(self.orig) != Some(self.ident)
    }

    /// The duplicate's number.
    pub fn raw(&self) -> c_int {
        use std::os::fd::AsRawFd;
        self.dup.as_raw_fd()
    }
}

/// Whether a blocking call the kernel would restart after a signal (a read, write, `accept`
/// or `connect` on a socket) should go on after the library's own sleep was interrupted:
/// true when every handler installed has `SA_RESTART`. Used only where the sleep itself is a
/// `poll` (which the kernel never restarts); the kernel cannot say which signal ran, so a
/// program with handlers of both kinds gets `EINTR`, which it must handle anyway.
pub fn restart_after_signal() -> bool {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: reading the disposition of a signal into a local; no change is made.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above; a null new action only reads.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL
            && old.sa_sigaction != libc::SIG_IGN
            && old.sa_flags & libc::SA_RESTART == 0
        {
            return false;
        }
    }
    true
}

/// Blocks until `conn` may be readable (`read`) or writable, or `deadline` passes
/// (`Err(EAGAIN)`). Before it sleeps in the kernel it takes its own duplicate of `*fd` into
/// `held` (unless it holds one already) and points `*fd` at it, so the caller goes on with
/// the duplicate; the polling phase before makes no system call.
///
/// Signals act as on a blocking TCP call: the sleep is, where it can be, a blocking
/// `recv(MSG_PEEK)` of one byte on the socket (a peer's wakeup byte, FIN or RST ends it),
/// which the kernel itself restarts after a handler with `SA_RESTART` and ends with `EINTR`
/// after one without, and ends at `SO_RCVTIMEO`. Where it cannot (a write with
/// `SO_SNDTIMEO`, several threads or processes on one connection, a write still going over
/// TCP), the
/// sleep is a `poll`, and an interrupted one ends the call with `EINTR` unless
/// [`restart_after_signal`].
pub fn wait_fd(
    conn: &TcpConn,
    fd: &mut c_int,
    held: &mut Option<Held>,
    read: bool,
    deadline: Option<Instant>,
) -> R<()> {
    let ready = || {
        ready_in_memory(conn, read as u64, (!read) as u64)
            || (read && (conn.peer_closed() || conn.has_error()))
    };
    // A handler that runs while this thread spins or prepares to sleep interrupts the call
    // as it would have interrupted the kernel's (or lets it go on, with SA_RESTART).
    // The kernel never restarts a socket call that has a timeout (signal(7)).
    let sig0 = crate::signals::mark();
    let handled = || match crate::signals::since(sig0) {
        Since::Interrupt => Some(Err(libc::EINTR)),
        Since::Restart if deadline.is_some() => Some(Err(libc::EINTR)),
        Since::Restart => Some(Ok(())),
        Since::Nothing => None,
    };
    // A reader whose peer sleeps with nothing of ours to answer has no answer near.
    let near = !read || !conn.peer_asleep();
    if spin_near(deadline, near, || ready() || crate::signals::since(sig0) != Since::Nothing) {
        return handled().unwrap_or(Ok(()));
    }
    if held.is_none() {
        let h = Held::of(*fd)?;
        *fd = h.raw();
        *held = Some(h);
    }
    let fd = *fd;
    let armed = Armed::new([(conn, read as u64, (!read) as u64)]);
    if armed.ready() {
        return Ok(());
    }
    if let Some(r) = handled() {
        // A restarted call finds the descriptor closed (by the handler, say).
        if r.is_ok() && held.as_ref().is_some_and(Held::replaced) {
            return Err(libc::EBADF);
        }
        return r;
    }
    let closed = conn.peer_closed();
    let tx_tcp = !read && conn.tx_on_tcp();
    let (r, err) = if !armed.capped() && read {
        let mut b = [0u8; 1];
        // SAFETY: a blocking one-byte peek into a local buffer on our own duplicate.
        let r = unsafe { crate::real::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK) };
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // A byte, EOF (0) or an error other than a timeout or a signal: something to look at.
        let r = if r >= 0 {
            1
        } else if e != libc::EAGAIN && e != libc::EINTR {
            // A reset the peek took off the socket: the program's next read reports it.
            conn.note_error(e);
            1
        } else if e == libc::EAGAIN {
            // The socket's receive timeout passed in the kernel (also one it reads back as
            // none: a negative timeout, which never blocks).
            armed.slept(0);
            return Err(libc::EAGAIN);
        } else {
            -1
        };
        (r, e)
    } else {
        let mut events = 0;
        if read || !closed {
            events |= libc::POLLIN | libc::POLLRDHUP;
        }
        if tx_tcp {
            events |= libc::POLLOUT;
        }
        let mut p = [pollfd { fd, events, revents: 0 }];
        // A writer waiting for ring space looks again at least every WRITER_SLEEP: nothing
        // in the kernel wakes it when another thread shuts the connection down for writing
        // (the kernel's own blocked write returns then).
        let t = armed.timeout(deadline);
        let t = if read { t } else { Some(t.map_or(WRITER_SLEEP, |t| t.min(WRITER_SLEEP))) };
        let r = kernel_poll(&mut p, t, std::ptr::null());
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let replaced = held.as_ref().is_some_and(Held::replaced);
        if r < 0 && e == libc::EINTR {
            let interrupt = match crate::signals::since(sig0) {
                Since::Interrupt => true,
                Since::Restart => deadline.is_some(),
                // A handler the library did not install (raw rt_sigaction).
                Since::Nothing => !restart_after_signal(),
            };
            if replaced && !interrupt {
                // Restarted, the kernel's call would find the descriptor closed.
                armed.slept(r);
                return Err(libc::EBADF);
            }
            if replaced || interrupt {
                armed.slept(r);
                return Err(libc::EINTR);
            }
            // Every handler asked for restarting: go on as after a wakeup.
            (0, 0)
        } else {
            (r, e)
        }
    };
    armed.slept(r);
    drop(armed);
    if r < 0 && err == libc::EINTR {
        // The kernel did not restart the peek: a handler without SA_RESTART ran (or another
        // thread took the descriptor away, as the JDK does to end a blocked read).
        return Err(libc::EINTR);
    }
    if r > 0 {
        conn.absorb(fd, false);
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(libc::EAGAIN);
    }
    Ok(())
}

/// The `poll` events of one connection as the program would see them from TCP.
fn revents_of(c: &TcpConn, fd: c_int, events: i16) -> i16 {
    let (inp, out) = (libc::POLLIN | libc::POLLRDNORM, libc::POLLOUT | libc::POLLWRNORM);
    let rd = c.readiness(fd, events & inp != 0, events & out != 0);
    let mut r = 0;
    if rd.readable {
        r |= events & inp;
    }
    if rd.writable {
        r |= events & out;
    }
    if rd.peer_closed {
        r |= events & libc::POLLRDHUP;
    }
    if rd.hangup {
        r |= libc::POLLHUP;
    }
    if rd.error {
        r |= libc::POLLERR | libc::POLLHUP;
    }
    r
}

/// `ppoll` over a mix of accelerated connections and anything else.
///
/// # Safety
/// `fds` points to `n` valid `pollfd`s.
pub unsafe fn poll(fds: *mut pollfd, n: nfds_t, timeout: Option<Duration>, mask: *const sigset_t) -> c_int {
    let mut ours: Vec<(usize, Arc<TcpConn>)> = Vec::new();
    // Epoll instances watching some of our connections: readable when one of those is
    // ready in shared memory, and those are armed while this call sleeps.
    let mut eps: Vec<(usize, Arc<EpollSet>)> = Vec::new();
    if !fds.is_null() && n > 0 {
        // SAFETY: the caller's array.
        let s = unsafe { std::slice::from_raw_parts(fds, n as usize) };
        for (i, p) in s.iter().enumerate() {
            match table::get(p.fd) {
                Some(table::Entry::Conn(c)) if !c.is_plain() => ours.push((i, c)),
                Some(table::Entry::Epoll(e)) if !e.is_empty() => eps.push((i, e)),
                _ => {}
            }
        }
    }
    if ours.is_empty() && eps.is_empty() {
        let ts = timeout.map(to_ts);
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const timespec);
        // SAFETY: the caller's array; `tsp` null or a local.
        return unsafe { crate::real::ppoll(fds, n, tsp, mask) };
    }
    // SAFETY: the caller's array, used by this call alone.
    let app = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
    // A timeout too long to represent waits forever.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut k: Vec<pollfd> = app.to_vec();
    // Duplicates of our sockets, taken before the first sleep; `k` names them from then on.
    let mut held: Vec<Held> = Vec::new();
    let mut spun = false;
    let mut slept = false;
    // A handler that runs before the kernel's sleep interrupts the call as it would have
    // interrupted the kernel's (with a signal mask, only the kernel's sleep counts).
    let sig0 = crate::signals::mark();
    let interrupted = || mask.is_null() && crate::signals::since(sig0) != Since::Nothing;
    // The kernel is asked about the whole set only as often as fairness to the program's
    // other descriptors needs (as for epoll: `crate::epoll::FAIR_CALLS`, `FAIR_TIME`, counted
    // per thread), before a zero-timeout call reports nothing, and after a probe saw
    // something there.
    POLL_FAIR.with(|f| f.call());
    let mut force = false;
    loop {
        for (i, c) in &ours {
            let want = app[*i].events;
            let mut e = 0;
            if !c.peer_closed() {
                e |= libc::POLLIN | libc::POLLRDHUP;
            }
            if want & (libc::POLLOUT | libc::POLLWRNORM) != 0 && c.tx_on_tcp() {
                e |= libc::POLLOUT;
            }
            // Urgent data (`MSG_OOB`) always travels over TCP: the kernel's word on it.
            e |= want & libc::POLLPRI;
            k[*i].events = e;
            k[*i].revents = 0;
        }
        // Urgent data (`MSG_OOB`) is the kernel's alone: a call that asks for it asks there.
        let urgent = ours.iter().any(|(i, c)| app[*i].events & libc::POLLPRI != 0 || c.peer_fin_pending());
        let ask = std::mem::take(&mut force) || urgent || POLL_FAIR.with(|f| f.due());
        if ask {
            let r = kernel_poll(&mut k, Some(Duration::ZERO), std::ptr::null());
            if r < 0 {
                return r;
            }
            POLL_FAIR.with(|f| f.asked());
        } else {
            k.iter_mut().for_each(|p| p.revents = 0);
        }
        let ready = merge(app, &k, &ours, &eps);
        if ready == 0 && !ask && timeout == Some(Duration::ZERO) {
            force = true;
            continue;
        }
        if ready > 0
            || timeout == Some(Duration::ZERO)
            || (slept && deadline.is_some_and(|d| Instant::now() >= d))
        {
            return ready;
        }
        if !spun {
            spun = true;
            let others = ours.len() + eps.len() < app.len() || !eps.is_empty();
            let mut i = 0u32;
            let hit = spin(deadline, || {
                i = i.wrapping_add(1);
                ours.iter().any(|(j, c)| {
                    let w = app[*j].events;
                    ready_in_memory(c, (w & libc::POLLIN != 0) as u64, (w & libc::POLLOUT != 0) as u64)
                }) || eps.iter().any(|(j, e)| app[*j].events & libc::POLLIN != 0 && e.any_ready())
                    || (others && i.is_multiple_of(32) && POLL_FAIR.with(|f| f.due()) && {
                        let mut probe = k.clone();
                        POLL_FAIR.with(|f| f.asked());
                        force = kernel_poll(&mut probe, Some(Duration::ZERO), std::ptr::null()) > 0;
                        force
                    })
                    || interrupted()
            });
            if hit && !interrupted() {
                continue;
            }
        }
        if held.is_empty() {
            // Sockets whose number was reused behind our back are the kernel's from here on.
            ours.retain(|(i, _)| match Held::of(app[*i].fd) {
                Ok(h) => {
                    k[*i].fd = h.raw();
                    held.push(h);
                    true
                }
                Err(_) => {
                    k[*i].fd = app[*i].fd;
                    k[*i].events = app[*i].events;
                    false
                }
            });
            if ours.is_empty() && eps.is_empty() {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                // SAFETY: the caller's array, as given.
                return unsafe { poll(fds, n, if timeout.is_none() { None } else { left }, mask) };
            }
        }
        let inner: Vec<crate::epoll::Watch> = eps
            .iter()
            .filter(|(i, _)| app[*i].events & libc::POLLIN != 0)
            .flat_map(|(_, e)| e.snapshot_deep())
            .collect();
        let armed = Armed::new(
            ours.iter()
                .map(|(i, c)| {
                    let w = app[*i].events;
                    (
                        &**c,
                        (w & (libc::POLLIN | libc::POLLRDNORM) != 0) as u64,
                        (w & (libc::POLLOUT | libc::POLLWRNORM) != 0) as u64,
                    )
                })
                .chain(inner.iter().map(|(c, r, w)| (&**c, *r, *w))),
        );
        if armed.ready() {
            continue;
        }
        if interrupted() {
            set_errno(libc::EINTR);
            return -1;
        }
        let r = kernel_poll(&mut k, armed.timeout(deadline), mask);
        let e = std::io::Error::last_os_error();
        armed.slept(r);
        drop(armed);
        if r < 0 {
            set_errno(e.raw_os_error().unwrap_or(libc::EINTR));
            return -1;
        }
        for (i, c) in &ours {
            if k[*i].revents != 0 {
                c.absorb(k[*i].fd, k[*i].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0);
            }
        }
        slept = true;
    }
}

thread_local! {
    /// When this thread's `poll`/`select` over accelerated connections must ask the kernel
    /// about the whole set.
    static POLL_FAIR: crate::epoll::Fairness = const { crate::epoll::Fairness::new() };
}

/// Writes results into the program's array; returns how many entries are ready.
fn merge(
    app: &mut [pollfd],
    k: &[pollfd],
    ours: &[(usize, Arc<TcpConn>)],
    eps: &[(usize, Arc<EpollSet>)],
) -> c_int {
    for (a, kk) in app.iter_mut().zip(k) {
        a.revents = kk.revents;
    }
    for (i, e) in eps {
        if app[*i].events & libc::POLLIN != 0 && app[*i].revents & libc::POLLIN == 0 && e.any_ready() {
            app[*i].revents |= libc::POLLIN;
        }
    }
    for (i, c) in ours {
        if k[*i].revents != 0 {
            c.absorb(k[*i].fd, k[*i].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0);
        }
        app[*i].revents = if table::tracked(app[*i].fd) {
            revents_of(c, k[*i].fd, app[*i].events) | (k[*i].revents & app[*i].events & libc::POLLPRI)
        } else {
            // Closed by another thread while this call slept (on a duplicate): the kernel
            // reports such a descriptor as invalid.
            libc::POLLNVAL
        };
    }
    app.iter().filter(|p| p.revents != 0).count() as c_int
}

/// Sets `errno`.
pub fn set_errno(e: Errno) {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = e };
}

/// `pselect` by way of [`poll`]. Returns `None` when no accelerated connection is involved
/// (the caller then passes the call on).
///
/// # Safety
/// The sets are null or valid bit arrays covering `nfds` descriptors (programs that watch
/// descriptors at or above `FD_SETSIZE` allocate larger ones, as the kernel allows).
pub unsafe fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    x: *mut libc::fd_set,
    timeout: Option<Duration>,
    mask: *const sigset_t,
) -> Option<c_int> {
    let nfds = nfds.max(0);
    // SAFETY: a bit below nfds of the caller's set.
    let isset = |s: *mut libc::fd_set, fd: c_int| !s.is_null() && unsafe { fd_bit(s, fd) };
    let mut any = false;
    let mut p = Vec::new();
    for fd in 0..nfds {
        let mut e = 0;
        if isset(r, fd) {
            e |= libc::POLLIN;
        }
        if isset(w, fd) {
            e |= libc::POLLOUT;
        }
        if isset(x, fd) {
            e |= libc::POLLPRI;
        }
        if e != 0 {
            // Our connections, and epoll instances watching some (poll arms those).
            any |= match table::get(fd) {
                Some(table::Entry::Conn(c)) => !c.is_plain(),
                Some(table::Entry::Epoll(s)) => !s.is_empty(),
                _ => false,
            };
            p.push(pollfd { fd, events: e, revents: 0 });
        }
    }
    if !any {
        return None;
    }
    // SAFETY: `p` is a local array.
    let n = unsafe { poll(p.as_mut_ptr(), p.len() as nfds_t, timeout, mask) };
    if n < 0 {
        return Some(n);
    }
    for s in [r, w, x] {
        if !s.is_null() {
            // SAFETY: clearing the caller's set, which covers nfds bits.
            unsafe { fd_zero(s, nfds) };
        }
    }
    let mut count = 0;
    for q in &p {
        if q.revents & libc::POLLNVAL != 0 {
            set_errno(libc::EBADF);
            return Some(-1);
        }
        let set = |s: *mut libc::fd_set, on: bool, count: &mut c_int| {
            if on && !s.is_null() {
                // SAFETY: setting a bit of the caller's set, below nfds.
                unsafe { fd_set_bit(s, q.fd) };
                *count += 1;
            }
        };
        let err = q.revents & (libc::POLLERR | libc::POLLHUP) != 0;
        set(r, q.events & libc::POLLIN != 0 && (q.revents & libc::POLLIN != 0 || err), &mut count);
        set(
            w,
            q.events & libc::POLLOUT != 0
                && (q.revents & libc::POLLOUT != 0 || q.revents & libc::POLLERR != 0),
            &mut count,
        );
        set(x, q.events & libc::POLLPRI != 0 && q.revents & libc::POLLPRI != 0, &mut count);
    }
    Some(count)
}

// `select` sets as the kernel reads them: arrays of `unsigned long` words, bit `fd % 64` of
// word `fd / 64`, as long as `nfds` needs (the C library's macros and the `libc` crate's
// stop at `FD_SETSIZE`).
const WORD_BITS: usize = c_ulong::BITS as usize;

/// # Safety
/// `s` covers at least `fd + 1` bits.
unsafe fn fd_bit(s: *const libc::fd_set, fd: c_int) -> bool {
    let fd = fd as usize;
    // SAFETY: within the caller's array.
    unsafe { (*s.cast::<c_ulong>().add(fd / WORD_BITS) >> (fd % WORD_BITS)) & 1 != 0 }
}

/// # Safety
/// `s` covers at least `fd + 1` bits.
unsafe fn fd_set_bit(s: *mut libc::fd_set, fd: c_int) {
    let fd = fd as usize;
    // SAFETY: within the caller's array.
    unsafe { *s.cast::<c_ulong>().add(fd / WORD_BITS) |= 1 << (fd % WORD_BITS) };
}

/// Clears the words that hold bits `0..nfds`.
///
/// # Safety
/// `s` covers at least `nfds` bits (rounded up to whole words, as the kernel writes them).
unsafe fn fd_zero(s: *mut libc::fd_set, nfds: c_int) {
    let words = (nfds as usize).div_ceil(WORD_BITS);
    // SAFETY: within the caller's array.
    unsafe { std::ptr::write_bytes(s.cast::<c_ulong>(), 0, words) };
}
