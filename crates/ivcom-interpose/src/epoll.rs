//! epoll over accelerated connections. The kernel instance stays the program's; each of our
//! connections is registered in it edge-triggered for input, output and hang-up with a tag
//! in place of the program's data, so its wakeups, FIN and RST still end the kernel wait.
//! Readiness itself (level or edge, `EPOLLONESHOT`) is computed here from shared memory, and
//! reported with the program's own data.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libc::{c_int, epoll_event, sigset_t};

use crate::conn::TcpConn;
use crate::wait::{ready_in_memory, set_errno, Armed};

const TAG: u64 = 0x1f0c_a11e_0000_0000;
const TAG_MASK: u64 = 0xffff_ffff_0000_0000;

/// What we register in the kernel for a connection whose program registration asks for
/// `want`: input (the peer's wakeup bytes, FIN, RST) and hang-up, edge-triggered; output
/// only if the program asks for it (writability of the TCP socket matters only while writes
/// still go over TCP); urgent data (`EPOLLPRI`) if asked, since it always travels over TCP;
/// `EPOLLEXCLUSIVE` as the program asked, so that the kernel applies its rules to the
/// registration (one waiter woken; `EPOLL_CTL_MOD` refused). An instance must not look ready
/// to `poll` or to an outer instance for an event its program did not ask for.
pub fn kernel_event(fd: c_int, want: u32) -> epoll_event {
    let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
    events |= want & (libc::EPOLLOUT | libc::EPOLLEXCLUSIVE | libc::EPOLLPRI) as u32;
    if want & libc::EPOLLEXCLUSIVE as u32 != 0 {
        // The kernel takes EPOLLEXCLUSIVE only with IN, OUT, ET and WAKEUP; a FIN still
        // makes the socket readable.
        events &= !((libc::EPOLLRDHUP | libc::EPOLLPRI) as u32);
    }
    epoll_event { events, u64: TAG | fd as u32 as u64 }
}

/// The program's registration of one of our connections in an instance.
#[derive(Debug)]
pub struct Reg {
    conn: Arc<TcpConn>,
    /// The descriptor to ask the kernel through: the registered number, or, once that was
    /// closed while a `dup` of it stays open, the dup (see [`EpollSet::moved`]).
    io_fd: c_int,
    events: u32,
    data: u64,
    disabled: bool,
    last_in: Option<u64>,
    last_out: Option<u64>,
    /// The kernel reported urgent data (`EPOLLPRI`, asked by the program) since the last
    /// report: urgent data travels over TCP only.
    urgent: bool,
    /// The events of our registration in the kernel ([`kernel_event`] of every event set the
    /// program asked for since it was added: an event once asked for stays, so that an event
    /// loop that turns `EPOLLOUT` on and off per request needs no system call to do so).
    kernel: u32,
    /// The program removed the registration (`EPOLL_CTL_DEL`) but the kernel keeps ours, so
    /// that adding it again costs no system call: reported nowhere, and removed from the
    /// kernel when the connection goes back to TCP or its number is closed.
    parked: bool,
}

impl Reg {
    /// Whether the registration takes part in waits: the program has it and it is enabled.
    fn live(&self) -> bool {
        !self.disabled && !self.parked
    }
}

/// An epoll instance registered in this one (epoll inside epoll). The kernel keeps the
/// program's own registration; what the kernel cannot see is readiness that lives in shared
/// memory among the inner instance's connections, which is added here.
#[derive(Debug)]
struct Nested {
    set: Arc<EpollSet>,
    events: u32,
    data: u64,
    disabled: bool,
}

/// How deep epoll instances are followed inside each other (the kernel allows 5 levels).
const MAX_DEPTH: usize = 5;

/// Our registrations in one epoll instance: each epoll instance the program creates has
/// one (empty until it watches one of our connections, or an instance that does).
#[derive(Debug)]
pub struct EpollSet {
    /// The instance's descriptor number when it was created (for removing registrations the
    /// program no longer has; a `dup` of the instance is not followed).
    epfd: c_int,
    regs: Mutex<BTreeMap<c_int, Reg>>,
    nested: Mutex<BTreeMap<c_int, Nested>>,
    /// Where the next [`EpollSet::collect`] starts: after the last connection it reported,
    /// so that a wait for fewer events than are ready takes turns, as the kernel's ready
    /// list does (a reported level-triggered item goes to its end).
    next: std::sync::atomic::AtomicI32,
    /// Threads in an `epoll_wait` on this instance now (see [`EpollSet::waiting`]).
    waiters: AtomicU32,
    /// An eventfd of the library's, registered in the instance once a connection of ours
    /// is: an `epoll_ctl` adding or changing one while a thread waits rings it, so that the
    /// waiter looks again and arms the connection (its peer sends wakeups only then).
    bell: OnceLock<OwnedFd>,
    /// The instance came to this process through `fork`: the kernel's instance is shared
    /// with the parent, whose registrations of our connections this process cannot see
    /// change (see [`EpollSet::release_inherited`]).
    inherited: std::sync::atomic::AtomicBool,
    /// When the kernel's instance was last asked (`epoll_wait` with a zero timeout or a
    /// sleep), and how many waits since: see [`EpollSet::kernel_due`].
    fair: Fairness,
}

/// The most waits in a row that answer from shared memory alone, without asking the
/// kernel's instance about the program's other descriptors (plain sockets, pipes, timers).
pub const FAIR_CALLS: u32 = 32;
/// The longest time between two looks at the kernel's instance while a wait answers from
/// shared memory or polls it: the bound on the latency the library adds to a descriptor that
/// is not one of its connections (docs/performance.md).
pub const FAIR_TIME: Duration = Duration::from_micros(100);

/// When a wait over accelerated connections must ask the kernel about everything else it
/// watches: after [`FAIR_CALLS`] waits or [`FAIR_TIME`] without asking. One per epoll
/// instance, and one per thread for `poll`/`select`.
#[derive(Debug)]
pub struct Fairness {
    /// When the kernel was last asked, in nanoseconds of [`crate::wait::mono_ns`].
    asked_ns: std::sync::atomic::AtomicU64,
    /// Waits since.
    calls: AtomicU32,
}

impl Default for Fairness {
    fn default() -> Self {
        Self::new()
    }
}

impl Fairness {
    /// Due at the first wait.
    pub const fn new() -> Self {
        Fairness { asked_ns: std::sync::atomic::AtomicU64::new(0), calls: AtomicU32::new(FAIR_CALLS) }
    }

    /// Counts a wait (once per call, at its start).
    pub fn call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the kernel must be asked now.
    pub fn due(&self) -> bool {
        self.calls.load(Ordering::Relaxed) >= FAIR_CALLS
            || crate::wait::mono_ns().saturating_sub(self.asked_ns.load(Ordering::Relaxed))
                >= FAIR_TIME.as_nanos() as u64
    }

    /// The kernel was asked just now.
    pub fn asked(&self) {
        self.asked_ns.store(crate::wait::mono_ns(), Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
    }
}

/// A connection a wait watches, with the bytes to wait for in its ring to read and free in
/// it to write (0: not asked; see [`crate::wait::ready_in_memory`]).
pub type Watch = (Arc<TcpConn>, u64, u64);

/// The data of the bell's registration (no descriptor number is `u32::MAX`).
const BELL: u64 = TAG | 0xffff_ffff;

/// A thread waiting on an instance, counted while it lives.
pub struct Waiting<'a>(&'a EpollSet);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpollSet {
    /// The (empty) record of instance `epfd`.
    pub fn new(epfd: c_int) -> Self {
        EpollSet {
            epfd,
            regs: Mutex::default(),
            nested: Mutex::default(),
            next: Default::default(),
            waiters: AtomicU32::new(0),
            bell: OnceLock::new(),
            inherited: Default::default(),
            fair: Fairness::new(),
        }
    }

    /// Whether a wait must ask the kernel's instance now: [`FAIR_CALLS`] waits answered
    /// without it, [`FAIR_TIME`] passed since it was last asked, a registration asks for
    /// urgent data (`EPOLLPRI`: it travels over TCP only, so only the kernel knows of it), or
    /// a peer announced its FIN ([`TcpConn::peer_fin_pending`]).
    fn kernel_due(&self) -> bool {
        self.fair.due()
            || self
                .regs()
                .values()
                .any(|r| r.live() && (r.events & libc::EPOLLPRI as u32 != 0 || r.conn.peer_fin_pending()))
    }

    /// The kernel's instance was asked just now.
    fn consulted(&self) {
        self.fair.asked();
    }

    /// Removes our registration of `fd` from the kernel's instance (the program no longer
    /// has it there).
    fn kernel_del(&self, epfd: c_int, fd: c_int) {
        let mut ev = epoll_event { events: 0, u64: 0 };
        // SAFETY: removing our own registration from the program's instance.
        unsafe { crate::real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// `epoll_ctl` on connection `fd` of ours (`ev`: the program's event, for `ADD` and
    /// `MOD`). Changes that leave our registration in the kernel as it is cost no system
    /// call: a `MOD` only records the program's events, a `DEL` parks the registration and a
    /// later `ADD` takes it back. Returns `epoll_ctl`'s result (errno set on failure).
    pub fn ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        conn: Arc<TcpConn>,
        ev: Option<epoll_event>,
    ) -> c_int {
        let fail = |e: c_int| {
            set_errno(e);
            -1
        };
        let mut regs = self.regs();
        let cur = regs.get(&fd).map(|r| (Arc::ptr_eq(&r.conn, &conn), r.parked, r.kernel));
        // A registration parked for another connection that had this number: ours is gone
        // from the kernel with that connection's file (see `moved`).
        let (known, parked, kernel) = match cur {
            Some((true, parked, kernel)) => (true, parked, kernel),
            Some((false, parked, _)) => {
                if parked {
                    regs.remove(&fd);
                }
                (false, false, 0)
            }
            None => (false, false, 0),
        };
        match op {
            libc::EPOLL_CTL_DEL => {
                if known && parked {
                    return fail(libc::ENOENT);
                }
                if !known {
                    drop(regs);
                    // SAFETY: passed on unchanged (the kernel says whether it has one).
                    let r = unsafe { crate::real::epoll_ctl(epfd, op, fd, std::ptr::null_mut()) };
                    if r == 0 {
                        self.forget(fd);
                    }
                    return r;
                }
                if let Some(r) = regs.get_mut(&fd) {
                    if r.kernel & libc::EPOLLEXCLUSIVE as u32 != 0 {
                        // Not kept: an exclusive registration cannot be changed later.
                        let old = regs.remove(&fd);
                        drop(regs);
                        self.kernel_del(epfd, fd);
                        drop(old);
                        return 0;
                    }
                    r.parked = true;
                }
                0
            }
            libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD => {
                let Some(app) = ev else { return fail(libc::EFAULT) };
                if op == libc::EPOLL_CTL_ADD && known && !parked {
                    return fail(libc::EEXIST);
                }
                if op == libc::EPOLL_CTL_MOD && known && parked {
                    return fail(libc::ENOENT);
                }
                if op == libc::EPOLL_CTL_MOD && known && kernel & libc::EPOLLEXCLUSIVE as u32 != 0 {
                    // epoll_ctl(2): an exclusive registration cannot be modified.
                    return fail(libc::EINVAL);
                }
                let exclusive = (app.events | kernel) & libc::EPOLLEXCLUSIVE as u32 != 0;
                let mut k = kernel_event(fd, app.events);
                let kop = if known && !exclusive {
                    k.events |= kernel;
                    (k.events != kernel).then_some(libc::EPOLL_CTL_MOD)
                } else if known {
                    // An exclusive registration is never changed in place.
                    regs.remove(&fd);
                    self.kernel_del(epfd, fd);
                    Some(libc::EPOLL_CTL_ADD)
                } else {
                    Some(op)
                };
                let reg = Reg {
                    conn,
                    io_fd: fd,
                    events: app.events,
                    data: app.u64,
                    disabled: false,
                    last_in: None,
                    last_out: None,
                    urgent: false,
                    kernel: k.events,
                    parked: false,
                };
                // Recorded before the kernel's registration, whose first event may reach a
                // waiting thread at once (an edge-triggered one would be lost without it).
                let old = regs.insert(fd, reg);
                drop(regs);
                if let Some(kop) = kop {
                    self.install_bell(epfd);
                    // SAFETY: our event for the program's instance.
                    let r = unsafe { crate::real::epoll_ctl(epfd, kop, fd, &mut k) };
                    if r != 0 {
                        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
                        self.restore(fd, old);
                        return fail(e);
                    }
                }
                drop(old);
                // A thread already waiting on the instance has not armed this connection.
                self.ring();
                0
            }
            _ => fail(libc::EINVAL),
        }
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, BTreeMap<c_int, Reg>> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the calling thread as waiting on the instance until the guard drops.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        Waiting(self)
    }

    /// Registers the bell in instance `epfd` (once): before the first connection of ours.
    pub fn install_bell(&self, epfd: c_int) {
        if self.bell.get().is_some() {
            return;
        }
        let Ok(fd) = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        ) else {
            return;
        };
        let fd = crate::fds::lift(fd);
        let mut ev = epoll_event { events: libc::EPOLLIN as u32, u64: BELL };
        // SAFETY: registering our own eventfd in the program's instance.
        if unsafe { crate::real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } == 0 {
            let _ = self.bell.set(fd);
        }
    }

    /// Whether the bell is registered.
    pub fn has_bell(&self) -> bool {
        self.bell.get().is_some()
    }

    /// A registration of ours changed: wake the threads waiting on the instance, if any, so
    /// that they look again (after the change: the caller made it first).
    pub fn ring(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            if let Some(b) = self.bell.get() {
                let _ = rustix::io::write(b, &1u64.to_ne_bytes());
            }
        }
    }

    /// Takes the bell's events out of the kernel's answer `ev[..n]` (resetting it); returns
    /// how many events are left.
    pub fn strip_bell(&self, ev: &mut [epoll_event], n: usize) -> usize {
        let mut k = 0;
        for i in 0..n {
            if ev[i].u64 == BELL {
                self.drain_bell();
            } else {
                ev[k] = ev[i];
                k += 1;
            }
        }
        k
    }

    fn drain_bell(&self) {
        if let Some(b) = self.bell.get() {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(b.as_fd(), &mut buf);
        }
    }

    /// In a child after `fork`: the instance is shared with the parent.
    pub fn mark_inherited(&self) {
        if self.regs().values().any(|r| !r.conn.is_plain()) {
            self.inherited.store(true, Ordering::Relaxed);
        }
    }

    /// A process that uses an instance it shares with another through `fork` (both may
    /// change and wait on it; the kernel keeps one set of registrations, the library's
    /// records are each process's own): the connections registered in it go back to TCP,
    /// and their kernel registrations become the program's own, so that the kernel's
    /// epoll semantics hold for both processes. The other process follows the handback at
    /// its next call on each connection. Called on this process's first `epoll_ctl` or wait
    /// on the instance after the `fork`.
    pub fn release_inherited(&self, epfd: c_int) {
        if !self.inherited.swap(false, Ordering::Relaxed) {
            return;
        }
        let regs = std::mem::take(&mut *self.regs());
        for (fd, reg) in regs {
            if reg.conn.is_plain() || reg.conn.ring_given_up() {
                // Already the kernel's (the registration there may be newer than ours).
                continue;
            }
            reg.conn.hand_back(
                reg.io_fd,
                "an epoll instance shared with another process (fork) watches it",
                crate::conn::Handback::Now,
            );
            if reg.parked {
                self.kernel_del(epfd, fd);
                continue;
            }
            let mut back = epoll_event { events: reg.events, u64: reg.data };
            // SAFETY: modifying a registration of the program's epoll instance.
            unsafe { crate::real::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut back) };
        }
    }

    /// Puts back what [`EpollSet::ctl`] replaced (the kernel refused the registration).
    fn restore(&self, fd: c_int, old: Option<Reg>) {
        let gone = match old {
            Some(r) => self.regs().insert(fd, r),
            None => self.regs().remove(&fd),
        };
        drop(gone);
    }

    fn nested(&self) -> std::sync::MutexGuard<'_, BTreeMap<c_int, Nested>> {
        self.nested.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or updates) the program's registration of the epoll instance `fd`.
    pub fn put_nested(&self, fd: c_int, set: Arc<EpollSet>, ev: &epoll_event) {
        self.nested().insert(fd, Nested { set, events: ev.events, data: ev.u64, disabled: false });
    }

    /// Forgets `fd` (removed, or closed), whether a connection or an epoll instance.
    pub fn forget(&self, fd: c_int) {
        let r = self.regs().remove(&fd);
        let n = self.nested().remove(&fd);
        drop((r, n));
    }

    /// Connection `fd` went back to TCP and the program's `epoll_ctl` on it goes to the
    /// kernel: forgets our registration, and takes it out of the kernel if the program had
    /// removed it (parked), so that the kernel's answer is the program's.
    pub fn forget_handed_back(&self, fd: c_int) {
        let r = self.regs().remove(&fd);
        if r.as_ref().is_some_and(|r| r.parked) {
            self.kernel_del(self.epfd, fd);
        }
        drop(r);
    }

    /// Descriptor `fd` of connection `conn` is being closed while `to` stays open:
    /// registrations that asked the kernel through `fd` ask through `to`; one the program had
    /// removed (parked) is taken out of the kernel now, while `fd` still names the socket.
    pub fn moved(&self, fd: c_int, conn: &Arc<TcpConn>, to: c_int) {
        let mut regs = self.regs();
        if regs.get(&fd).is_some_and(|r| r.parked && Arc::ptr_eq(&r.conn, conn)) {
            let r = regs.remove(&fd);
            drop(regs);
            self.kernel_del(self.epfd, fd);
            drop(r);
            regs = self.regs();
        }
        for r in regs.values_mut().filter(|r| r.io_fd == fd && Arc::ptr_eq(&r.conn, conn)) {
            r.io_fd = to;
        }
    }

    /// Forgets connection `conn`, whose last descriptor (`fd`) is closed: its registration
    /// at `fd` and any it kept at numbers closed before while `fd` stayed open.
    pub fn forget_conn(&self, fd: c_int, conn: &Arc<TcpConn>) {
        let mut regs = self.regs();
        let gone: Vec<Reg> = {
            let keys: Vec<c_int> = regs
                .iter()
                .filter(|(k, r)| **k == fd || Arc::ptr_eq(&r.conn, conn))
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| regs.remove(&k)).collect()
        };
        drop(regs);
        drop(gone);
    }

    /// Whether no connection is registered, here or in an instance registered here.
    pub fn is_empty(&self) -> bool {
        self.is_empty_at(0)
    }

    fn is_empty_at(&self, depth: usize) -> bool {
        if !self.regs().is_empty() {
            return false;
        }
        depth >= MAX_DEPTH || self.nested_sets().iter().all(|s| s.is_empty_at(depth + 1))
    }

    fn nested_sets(&self) -> Vec<Arc<EpollSet>> {
        self.nested().values().filter(|n| !n.disabled).map(|n| n.set.clone()).collect()
    }

    /// Whether an `epoll_wait` on this instance would report one of our connections now
    /// (data, EOF or an error in shared memory; an edge not yet reported): what makes the
    /// instance itself readable to `poll` or to an outer instance.
    pub fn any_ready(&self) -> bool {
        self.any_ready_at(0)
    }

    fn any_ready_at(&self, depth: usize) -> bool {
        // (fd, connection, events, last input and output signatures reported)
        type Seen = (c_int, Arc<TcpConn>, u32, Option<u64>, Option<u64>);
        let regs: Vec<Seen> = self
            .regs()
            .iter()
            .filter(|(_, r)| r.live() && !r.conn.is_plain() && !r.conn.ring_given_up())
            .map(|(fd, r)| (*fd, r.conn.clone(), r.events, r.last_in, r.last_out))
            .collect();
        for (fd, c, want, last_in, last_out) in regs {
            let (i, o) = event_parts(&c, fd, want);
            let et = want & libc::EPOLLET as u32 != 0;
            if (i != 0 && (!et || last_in != Some(c.in_signature())))
                || (o != 0 && (!et || last_out != Some(c.out_signature())))
            {
                return true;
            }
        }
        depth < MAX_DEPTH && self.nested_sets().iter().any(|s| s.any_ready_at(depth + 1))
    }

    /// Every connection registered here or in an instance registered here, with what a wait
    /// waits for on it ([`Watch`]).
    pub fn snapshot_deep(&self) -> Vec<Watch> {
        let mut out = self.snapshot();
        let mut todo = self.nested_sets();
        let mut depth = 0;
        while !todo.is_empty() && depth < MAX_DEPTH {
            let mut next = Vec::new();
            for s in &todo {
                out.extend(s.snapshot());
                next.extend(s.nested_sets());
            }
            todo = next;
            depth += 1;
        }
        out
    }

    /// Copies the kernel's events out, turning ours into readiness bookkeeping.
    fn translate(&self, epfd: c_int, kev: &[epoll_event], out: &mut [epoll_event], mut n: usize) -> usize {
        for ev in kev {
            let data = ev.u64;
            if data == BELL {
                self.drain_bell();
            } else if data & TAG_MASK == TAG {
                let fd = (data & 0xffff_ffff) as u32 as c_int;
                let mut regs = self.regs();
                let Some(reg) = regs.get_mut(&fd) else { continue };
                if reg.parked && (reg.conn.is_plain() || reg.conn.ring_given_up()) {
                    // Went back to plain TCP while the program had removed it.
                    regs.remove(&fd);
                    drop(regs);
                    self.kernel_del(epfd, fd);
                    continue;
                }
                if reg.conn.is_plain() || reg.conn.ring_given_up() {
                    // Went back to plain TCP: hand the registration back to the kernel.
                    let mut back = epoll_event { events: reg.events, u64: reg.data };
                    // SAFETY: modifying a registration of the program's epoll instance.
                    unsafe { crate::real::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut back) };
                    let (events, d) =
                        (ev.events & (reg.events | (libc::EPOLLERR | libc::EPOLLHUP) as u32), reg.data);
                    regs.remove(&fd);
                    if events != 0 && n < out.len() {
                        out[n] = epoll_event { events, u64: d };
                        n += 1;
                    }
                    continue;
                }
                reg.urgent |= ev.events & reg.events & libc::EPOLLPRI as u32 != 0;
                let (c, io_fd) = (reg.conn.clone(), reg.io_fd);
                drop(regs);
                c.absorb(io_fd, ev.events & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0);
            } else if n < out.len() {
                out[n] = *ev;
                n += 1;
            }
        }
        n
    }

    /// Appends ready connections to `out` from `n`.
    fn collect(&self, out: &mut [epoll_event], mut n: usize) -> usize {
        use std::sync::atomic::Ordering;
        let mut regs = self.regs();
        let start = self.next.load(Ordering::Relaxed);
        let mut last = None;
        let visit = |reg: &mut Reg| {
            if !reg.live() || reg.conn.is_plain() || reg.conn.ring_given_up() {
                return None;
            }
            let c = &reg.conn;
            let want = reg.events;
            let et = want & libc::EPOLLET as u32 != 0;
            let (mut in_part, mut out_part) = event_parts(c, reg.io_fd, want);
            if et {
                if in_part != 0 {
                    let sig = c.in_signature();
                    if reg.last_in == Some(sig) {
                        in_part = 0;
                    } else {
                        reg.last_in = Some(sig);
                    }
                }
                if out_part != 0 {
                    let sig = c.out_signature();
                    if reg.last_out == Some(sig) {
                        out_part = 0;
                    } else {
                        reg.last_out = Some(sig);
                    }
                }
            }
            let ev =
                in_part | out_part | if std::mem::take(&mut reg.urgent) { libc::EPOLLPRI as u32 } else { 0 };
            if ev == 0 {
                return None;
            }
            if want & libc::EPOLLONESHOT as u32 != 0 {
                reg.disabled = true;
            }
            Some(epoll_event { events: ev, u64: reg.data })
        };
        let mut walk = |part: &mut dyn Iterator<Item = (&c_int, &mut Reg)>| {
            for (&fd, reg) in part {
                if n >= out.len() {
                    break;
                }
                if let Some(e) = visit(reg) {
                    out[n] = e;
                    n += 1;
                    last = Some(fd);
                }
            }
        };
        walk(&mut regs.range_mut(start..));
        walk(&mut regs.range_mut(..start));
        if let Some(fd) = last {
            self.next.store(fd.saturating_add(1), Ordering::Relaxed);
        }
        drop(regs);
        // Inner epoll instances whose connections are ready in shared memory (unless the
        // kernel already reported the instance in this round).
        let inner: Vec<(c_int, Arc<EpollSet>, u32, u64)> = self
            .nested()
            .iter()
            .filter(|(_, x)| !x.disabled && x.events & libc::EPOLLIN as u32 != 0)
            .map(|(fd, x)| (*fd, x.set.clone(), x.events, x.data))
            .collect();
        for (fd, set, events, data) in inner {
            if n >= out.len() {
                break;
            }
            if out[..n].iter().any(|e| e.u64 == data) || !set.any_ready() {
                continue;
            }
            out[n] = epoll_event { events: libc::EPOLLIN as u32, u64: data };
            n += 1;
            if events & libc::EPOLLONESHOT as u32 != 0 {
                if let Some(x) = self.nested().get_mut(&fd) {
                    x.disabled = true;
                }
            }
        }
        n
    }

    fn snapshot(&self) -> Vec<Watch> {
        let at =
            |asked: bool, et: bool, last: Option<u64>, sig: &dyn Fn() -> u64, read: bool, c: &TcpConn| {
                if !asked {
                    0
                } else if et && last.is_some() && last == Some(sig()) {
                    // The edge was reported: only a change is news.
                    c.next_at(read)
                } else {
                    1
                }
            };
        self.regs()
            .values()
            .filter(|r| r.live())
            .map(|r| {
                let (c, et) = (&r.conn, r.events & libc::EPOLLET as u32 != 0);
                let i =
                    at(r.events & libc::EPOLLIN as u32 != 0, et, r.last_in, &|| c.in_signature(), true, c);
                let o = at(
                    r.events & libc::EPOLLOUT as u32 != 0,
                    et,
                    r.last_out,
                    &|| c.out_signature(),
                    false,
                    c,
                );
                (c.clone(), i, o)
            })
            .collect()
    }
}

/// The input and output parts of the events connection `fd` has for a registration that
/// asks for `want` (level-triggered view; edges are the caller's).
fn event_parts(c: &TcpConn, fd: c_int, want: u32) -> (u32, u32) {
    let rd = c.readiness(fd, want & libc::EPOLLIN as u32 != 0, want & libc::EPOLLOUT as u32 != 0);
    let mut in_part = 0u32;
    if rd.readable {
        in_part |= libc::EPOLLIN as u32;
    }
    if rd.peer_closed {
        in_part |= want & libc::EPOLLRDHUP as u32;
    }
    if rd.hangup {
        in_part |= libc::EPOLLHUP as u32;
    }
    if rd.error {
        in_part |= (libc::EPOLLERR | libc::EPOLLHUP) as u32;
    }
    (in_part, if rd.writable { libc::EPOLLOUT as u32 } else { 0 })
}

/// `epoll_pwait` on an instance where some of our connections are registered.
///
/// # Safety
/// `events` points to `max` writable `epoll_event`s.
pub unsafe fn wait(
    epfd: c_int,
    set: &EpollSet,
    events: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    mask: *const sigset_t,
) -> c_int {
    let _waiting = set.waiting();
    let max = max as usize;
    // SAFETY: the caller's array of `max` events.
    let out = unsafe { std::slice::from_raw_parts_mut(events, max) };
    let mut kev = vec![epoll_event { events: 0, u64: 0 }; max];
    // A timeout too long to represent waits forever.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let kernel = |kev: &mut [epoll_event], t: Option<Duration>, mask: *const sigset_t| -> c_int {
        let ms = t.map_or(-1, |t| t.as_micros().div_ceil(1000).min(i32::MAX as u128) as c_int);
        // SAFETY: `kev` is a local array of its length.
        unsafe { crate::real::epoll_pwait(epfd, kev.as_mut_ptr(), kev.len() as c_int, ms, mask) }
    };
    let mut spun = false;
    // A handler that runs before the kernel's sleep interrupts the call as it would have
    // interrupted the kernel's (with a signal mask, only the kernel's sleep counts).
    let sig0 = crate::signals::mark();
    let interrupted = || mask.is_null() && crate::signals::since(sig0) != crate::signals::Since::Nothing;
    set.fair.call();
    loop {
        // Readiness in shared memory needs no system call; the kernel's instance (the
        // program's other descriptors, and FIN, RST and wakeups on ours) is asked only as
        // often as fairness to the other descriptors needs (`kernel_due`), and before a
        // call that must not wait says that nothing is ready.
        let mut n = 0;
        let mut asked = false;
        loop {
            if asked || set.kernel_due() {
                let k = kernel(&mut kev, Some(Duration::ZERO), std::ptr::null());
                if k < 0 {
                    return k;
                }
                set.consulted();
                n = set.translate(epfd, &kev[..k as usize], out, 0);
                asked = true;
            }
            n = set.collect(out, n);
            if n > 0 || asked || timeout != Some(Duration::ZERO) {
                break;
            }
            asked = true;
        }
        if n > 0 || timeout == Some(Duration::ZERO) || deadline.is_some_and(|d| Instant::now() >= d) {
            return n as c_int;
        }
        let snap = set.snapshot_deep();
        if !spun {
            spun = true;
            let mut i = 0u32;
            let mut probed = 0;
            let near = snap.iter().any(|(c, _, w)| *w > 0 || !c.peer_asleep());
            let hit = crate::wait::spin_near(deadline, near, || {
                i = i.wrapping_add(1);
                snap.iter().any(|(c, r, w)| ready_in_memory(c, *r, *w))
                    || (i.is_multiple_of(32) && set.kernel_due() && {
                        // Now and then, whether anything else in the set is ready.
                        probed = kernel(&mut kev, Some(Duration::ZERO), std::ptr::null()).max(0);
                        set.consulted();
                        probed > 0
                    })
                    || interrupted()
            });
            if probed > 0 {
                let mut n = set.translate(epfd, &kev[..probed as usize], out, 0);
                n = set.collect(out, n);
                if n > 0 {
                    return n as c_int;
                }
            }
            if hit && !interrupted() {
                continue;
            }
        }
        let armed = Armed::new(snap.iter().map(|(c, r, w)| (&**c, *r, *w)));
        if armed.ready() {
            continue;
        }
        if interrupted() {
            set_errno(libc::EINTR);
            return -1;
        }
        let k = kernel(&mut kev, armed.timeout(deadline), mask);
        let e = std::io::Error::last_os_error();
        set.consulted();
        armed.slept(k);
        drop(armed);
        if k < 0 {
            set_errno(e.raw_os_error().unwrap_or(libc::EINTR));
            return -1;
        }
        let mut n = set.translate(epfd, &kev[..k as usize], out, 0);
        n = set.collect(out, n);
        if n > 0 {
            return n as c_int;
        }
    }
}
