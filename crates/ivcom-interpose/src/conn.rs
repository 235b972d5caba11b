//! One TCP connection carried over a shared-memory channel: the data path and its readiness.
//!
//! The TCP connection stays open beside the channel. It gives the real addresses, the
//! kernel's reference counting across `dup`/`fork`/`close`, FIN or RST when a process dies,
//! and it carries the wakeups: a side that sleeps announces it in the ring, and the other side
//! then sends one byte over TCP, which the kernel reports to whatever the sleeper waits in.
//!
//! Handoff (layout: `docs/region-layout.md`, "TCP handoff"): the connecting side registers the
//! channel before its TCP handshake and keeps writing over TCP until it sees the listener's
//! claim; it then publishes how many bytes it sent over TCP and writes the rest into ring 0.
//! The listener's side claims when its program accepts the connection, before anything can be
//! sent, so every byte it sends over TCP is a wakeup. Each side reads TCP data up to the
//! other's switch point, then the ring; bytes past the switch point are wakeups.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use ivcom_ring::layout::{self, tcp, Direction, Params};
use ivcom_ring::{MappedRegion, ShmRegion, StreamReader, StreamWriter};
use libc::{c_int, iovec};

use crate::settings::{count, COUNTERS};

/// An errno value.
pub type Errno = c_int;
/// A result carrying an errno.
pub type R<T> = Result<T, Errno>;

/// The name of our memfds (`/proc/PID/fd/N` -> `/memfd:ivcom-tcp (deleted)`).
pub const MEMFD_NAME: &str = "ivcom-tcp";

/// Largest region the listener's side maps (two 64 MiB rings and the header).
pub const MAX_REGION: u64 = 4096 + 2 * (64 << 20);

/// Which end of the connection this process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Called `connect`: creates the channel, writes ring 0.
    Connector,
    /// Accepted the connection: claims the channel, writes ring 1.
    Acceptor,
}

/// A connection's private state as one program image hands it to the next across `exec`
/// ([`TcpConn::private_state`], [`TcpConn::resume`]; encoded by `crate::exec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Private {
    /// Which end the socket is.
    pub side: Side,
    /// Connector: the listener's claim was seen (and accepted) by this side.
    pub claim_seen: bool,
    /// Connector: writes go to the ring (the switch point is published).
    pub switched: bool,
    /// Producer index of the ring this side writes.
    pub tx_tail: u64,
    /// Consumer index of the ring this side reads.
    pub rx_head: u64,
    /// Connector: data bytes sent over TCP before the switch.
    pub tcp_sent: u64,
    /// Acceptor: data bytes read from TCP.
    pub tcp_read: u64,
    /// Acceptor: the connector's switch point, once read.
    pub peer_switch: Option<u64>,
    /// `shutdown(SHUT_RD)` was called.
    pub shut_rd: bool,
    /// `shutdown(SHUT_WR)` was called.
    pub shut_wr: bool,
    /// The peer's FIN was seen.
    pub eof: bool,
    /// Another process may hold the socket ([`TcpConn::mark_shared`]).
    pub shared: bool,
    /// A socket error seen (errno), 0 if none.
    pub error: c_int,
    /// `error` was reported to the program already.
    pub error_reported: bool,
    /// The program's `TCP_NODELAY` and `TCP_CORK`.
    pub tcp_opts: [c_int; 2],
}

#[derive(Debug)]
struct Tx {
    w: StreamWriter,
    /// Writes go to the ring (the connector switches once it sees the claim).
    switched: bool,
    /// Bytes the connector sent over TCP before switching.
    tcp_sent: u64,
    sleepers: u32,
    /// Handback: the peer stopped reading our ring; the ring's bytes from this index to our
    /// tail still go over TCP before anything else.
    push: Option<u64>,
    /// Handback done for this direction: writes go to the kernel as they are.
    plain_tcp: bool,
}

#[derive(Debug)]
struct Rx {
    r: StreamReader,
    /// Data bytes read from TCP (the acceptor's count, compared with the switch point).
    tcp_read: u64,
    /// The connector's switch point, once published.
    peer_switch: Option<u64>,
    /// The kernel reported TCP data that is not wakeups.
    tcp_data: bool,
    sleepers: u32,
    /// This process counts itself among its side's sleeping readers (a shared connection).
    counted_sleep: bool,
    /// Handback done for this direction: what TCP carries is data.
    plain_tcp: bool,
}

/// Where the next bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxMode {
    /// TCP carries data: at most `limit` more bytes of it, if known.
    Tcp { limit: Option<u64> },
    /// The ring carries data; TCP carries only wakeups (and FIN/RST).
    Ring,
    /// Handback: the ring part is over; this many of the peer's wakeup bytes are still to be
    /// taken off TCP before its data.
    Skip(u64),
    /// Handback done: TCP carries data.
    Plain,
}

/// What `poll` and `epoll` report for a connection, in TCP's terms.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    /// Data, EOF or an error to read (if input was asked for).
    pub readable: bool,
    /// Room to write (if output was asked for).
    pub writable: bool,
    /// The peer's FIN has arrived (`POLLRDHUP`).
    pub peer_closed: bool,
    /// Both directions are shut (`POLLHUP`).
    pub hangup: bool,
    /// A socket error not yet reported to the program (`POLLERR`, with `POLLHUP`).
    pub error: bool,
}

/// A connection carried (or about to be carried) over a channel.
#[derive(Debug)]
pub struct TcpConn {
    map: MappedRegion,
    /// The region's memfd, close-on-exec: only an `exec` that continues under the library
    /// passes it on, for that `exec` alone (`crate::exec`).
    region_fd: OwnedFd,
    /// The memfd's inode: the region's identity, to find the other end in this process.
    region_ino: u64,
    side: Side,
    plain: AtomicBool,
    claim_seen: AtomicBool,
    /// Mirror of the connector's `Tx::switched`, readable without the lock.
    switched: AtomicBool,
    registration: Mutex<Option<OwnedFd>>,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    eof: AtomicBool,
    /// The connection's error (a reset): sticky, the connection is dead once set.
    error: AtomicI32,
    /// `error` was reported to the program (by a read, a write or `SO_ERROR`): as with the
    /// kernel's `sk_err`, it is reported once; afterwards reads see EOF, writes `EPIPE`, and
    /// poll no longer shows `POLLERR`.
    error_reported: AtomicBool,
    shut_rd: AtomicBool,
    shut_wr: AtomicBool,
    sleepers: AtomicU32,
    /// How many descriptor numbers of this process refer to the connection in the library's
    /// table (`dup`, `dup2`): an epoll registration lives while any of them is open.
    fd_refs: AtomicU32,
    /// Another process may hold the socket too (this one forked since, or inherited it):
    /// closing here is then not necessarily the socket's last close.
    shared: AtomicBool,
    /// What the program set for `TCP_NODELAY` and `TCP_CORK` (the kernel keeps NODELAY on).
    tcp_opts: [AtomicI32; 2],
    /// `SO_RCVTIMEO` / `SO_SNDTIMEO` set to a negative time (a deadline already passed: the
    /// kernel's calls then never block), which the kernel reads back as no timeout.
    timeo_passed: [AtomicBool; 2],
    /// A write of the program's met the kernel's `EPIPE` without our own shutdown: the
    /// connection was reset (its error already reported), a hang-up for `poll`.
    reset_seen: AtomicBool,
    /// When a write last asked the kernel whether the peer closed (ns since `EPOCH`).
    last_close_check: AtomicU64,
    /// Orders "announce sleep" against "take wakeup bytes off TCP" among this process's
    /// threads (see [`TcpConn::drain`]).
    wake_lock: Mutex<()>,
    events: AtomicU64,
    /// Handback: reading, and writing, go to TCP as they are now (mirrors of the locked
    /// states, for [`TcpConn::finish_handback`]).
    rx_handed: AtomicBool,
    tx_handed: AtomicBool,
    /// Handback: ring bytes the peer did not read still wait to go over TCP.
    push_pending: AtomicBool,
    /// Whether a closed peer was probed for a reset ([`TcpConn::closed_with_our_data_unread`]).
    probed: AtomicBool,
    /// The claim word is set but its message went to another process: hand back.
    unverified_claim: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Borrows a descriptor the program handed us for the duration of its call.
pub(crate) fn borrow(fd: c_int) -> BorrowedFd<'static> {
    // SAFETY: `fd` is a descriptor the program passed to the call we are serving; it stays
    // open while that call runs, which is as long as the borrow is used.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// This process's pid, for the side locks ([`note_pid`] after `fork`).
static PID: AtomicU32 = AtomicU32::new(0);

/// Records this process's pid (at start, and in the child after `fork`).
pub fn note_pid() {
    PID.store(rustix::process::getpid().as_raw_nonzero().get() as u32, Ordering::Relaxed);
}

fn pid() -> u32 {
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    note_pid();
    PID.load(Ordering::Relaxed)
}

/// Whether process `pid` exists (a lock holder that died leaves its pid in the word).
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// One of this side's cross-process locks, held by this process (see [`TcpConn::side_lock`]).
struct SideLock<'a> {
    region: &'a ShmRegion,
    side: usize,
    which: tcp::Lock,
    pid: u32,
}

impl Drop for SideLock<'_> {
    fn drop(&mut self) {
        let _ = tcp::unlock(self.region, self.side, self.which, self.pid);
    }
}

fn errno() -> Errno {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

const EAGAIN: Errno = libc::EAGAIN;

static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// The socket's pending error (`SO_ERROR`), or `ECONNRESET` if it has none.
fn sock_error(fd: c_int) -> Errno {
    let mut e: c_int = 0;
    let mut l = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: reading SO_ERROR into a local int.
    unsafe {
        crate::real::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::addr_of_mut!(e).cast(),
            &mut l,
        )
    };
    if e != 0 {
        e
    } else {
        libc::ECONNRESET
    }
}

/// Total length of an iovec array.
pub fn iov_len(iov: &[iovec]) -> usize {
    iov.iter().fold(0usize, |a, v| a.saturating_add(v.iov_len))
}

/// A copy of `iov` covering at most `limit` bytes.
fn iov_truncated(iov: &[iovec], limit: usize) -> Vec<iovec> {
    let mut out = Vec::with_capacity(iov.len());
    let mut left = limit;
    for v in iov {
        if left == 0 {
            break;
        }
        let n = v.iov_len.min(left);
        out.push(iovec { iov_base: v.iov_base, iov_len: n });
        left -= n;
    }
    out
}

fn msghdr_of(iov: &[iovec]) -> libc::msghdr {
    // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_ptr().cast_mut();
    m.msg_iovlen = iov.len() as _;
    m
}

/// The program's buffer described by `v`.
///
/// # Safety
/// `v` describes memory the program gave us for the current call, writable for `iov_len`.
unsafe fn buf_mut<'a>(v: &iovec) -> &'a mut [u8] {
    if v.iov_len == 0 || v.iov_base.is_null() {
        return &mut [];
    }
    // SAFETY: the caller's contract; the program's buffer is not shared memory.
    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast(), v.iov_len) }
}

/// # Safety
/// `v` describes memory the program gave us for the current call, readable for `iov_len`.
unsafe fn buf<'a>(v: &iovec) -> &'a [u8] {
    if v.iov_len == 0 || v.iov_base.is_null() {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(v.iov_base.cast(), v.iov_len) }
}

/// The longest a FIN waits for the peer to read our ring ([`TcpConn::settle_before_fin`]).
pub const FIN_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// When a handback ([`TcpConn::hand_back`]) must be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handback {
    /// At the program's next calls on the connection (nothing waits for it).
    Lazy,
    /// Before the call that asked for it goes to the kernel; this process goes on reading
    /// the connection through the library (a socket option, an `ioctl`, `MSG_OOB`).
    Now,
    /// Before this process stops serving the connection: an exec of an image without the
    /// library, the descriptor leaving for another process, I/O that bypasses the library.
    Leaving,
}

impl TcpConn {
    fn new(map: MappedRegion, region_fd: OwnedFd, side: Side, params: &Params) -> Self {
        let acceptor = side == Side::Acceptor;
        let (mine, theirs) = if acceptor {
            (Direction::ToConnector, Direction::ToListener)
        } else {
            (Direction::ToListener, Direction::ToConnector)
        };
        // Never inherited across exec unasked: a memfd passed on by a previous program image
        // arrives without the flag (`F_SETFD` on an open descriptor cannot fail).
        let _ = rustix::io::fcntl_setfd(&region_fd, rustix::io::FdFlags::CLOEXEC);
        let region_fd = crate::fds::lift(region_fd);
        let region_ino = rustix::fs::fstat(&region_fd).map_or(0, |st| st.st_ino);
        TcpConn {
            map,
            region_fd,
            region_ino,
            side,
            plain: AtomicBool::new(false),
            claim_seen: AtomicBool::new(acceptor),
            switched: AtomicBool::new(acceptor),
            registration: Mutex::new(None),
            tx: Mutex::new(Tx {
                w: StreamWriter::new(params.ring(mine)),
                switched: acceptor,
                tcp_sent: 0,
                sleepers: 0,
                push: None,
                plain_tcp: false,
            }),
            rx: Mutex::new(Rx {
                r: StreamReader::new(params.ring(theirs)),
                tcp_read: 0,
                peer_switch: None,
                tcp_data: false,
                sleepers: 0,
                counted_sleep: false,
                plain_tcp: false,
            }),
            eof: AtomicBool::new(false),
            error: AtomicI32::new(0),
            error_reported: AtomicBool::new(false),
            shut_rd: AtomicBool::new(false),
            shut_wr: AtomicBool::new(false),
            sleepers: AtomicU32::new(0),
            fd_refs: AtomicU32::new(0),
            shared: AtomicBool::new(false),
            last_close_check: AtomicU64::new(0),
            tcp_opts: [AtomicI32::new(0), AtomicI32::new(0)],
            timeo_passed: [AtomicBool::new(false), AtomicBool::new(false)],
            reset_seen: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            events: AtomicU64::new(0),
            rx_handed: AtomicBool::new(false),
            tx_handed: AtomicBool::new(false),
            push_pending: AtomicBool::new(false),
            probed: AtomicBool::new(false),
            unverified_claim: AtomicBool::new(false),
        }
    }

    /// A new channel for connection `tuple` that this process is making (register
    /// [`TcpConn::region_fd`] with the listener).
    pub fn connector(ring: u64, tuple: &crate::net::Tuple) -> io::Result<Self> {
        let params = Params { capacity: [ring, ring], max_message: None };
        let size = params.region_size().map_err(io::Error::other)?;
        let fd = ivcom_ring::shm::create_memfd_named(MEMFD_NAME, size)?;
        let map = MappedRegion::map(fd.as_fd(), 0, size)?;
        layout::init(map.region(), &params).map_err(io::Error::other)?;
        tcp::store_tuple(map.region(), &tuple.to_bytes()).map_err(io::Error::other)?;
        tcp::set_version(map.region()).map_err(io::Error::other)?;
        Ok(Self::new(map, fd, Side::Connector, &params))
    }

    /// Records the connection's 4-tuple in the region (a connecting side knows its source
    /// port once `connect` has picked it).
    pub fn set_tuple(&self, tuple: &crate::net::Tuple) -> io::Result<()> {
        tcp::store_tuple(self.region(), &tuple.to_bytes()).map_err(io::Error::other)
    }

    /// The region's memfd.
    pub fn region_fd(&self) -> BorrowedFd<'_> {
        self.region_fd.as_fd()
    }

    /// Takes over a connection a previous program image of this process carried (after
    /// `exec`): `fd` is the memfd it passed on, `p` the private state it passed with it
    /// ([`TcpConn::private_state`]), `registration` its registration connection if it still
    /// held one. Nothing the peer can write is trusted here: the ring indices, counts and
    /// flags come from `p` (the region's own indices are adopted later only as they are on
    /// every use, validated). The region's shape is validated as at accept.
    pub fn resume(fd: OwnedFd, p: &Private, registration: Option<OwnedFd>) -> io::Result<Self> {
        let size = ivcom_ring::shm::check_memfd(fd.as_fd(), MAX_REGION)?;
        let map = MappedRegion::map(fd.as_fd(), 0, size)?;
        let params = layout::validate_shape(map.region(), false)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let side = p.side;
        let (mine, theirs) = match side {
            Side::Acceptor => (Direction::ToConnector, Direction::ToListener),
            Side::Connector => (Direction::ToListener, Direction::ToConnector),
        };
        let (gm, gt) = (params.ring(mine), params.ring(theirs));
        let c = Self::new(map, fd, side, &params);
        {
            let mut tx = lock(&c.tx);
            tx.w = StreamWriter::resume(gm, p.tx_tail);
            if side == Side::Connector {
                tx.switched = p.switched;
                tx.tcp_sent = p.tcp_sent;
            }
            c.switched.store(tx.switched, Ordering::Release);
        }
        {
            let mut rx = lock(&c.rx);
            rx.r = StreamReader::resume(gt, p.rx_head);
            if side == Side::Acceptor {
                rx.tcp_read = p.tcp_read;
                rx.peer_switch = p.peer_switch;
            }
        }
        c.claim_seen.store(side == Side::Acceptor || p.claim_seen, Ordering::Release);
        c.shut_rd.store(p.shut_rd, Ordering::Relaxed);
        c.shut_wr.store(p.shut_wr, Ordering::Relaxed);
        c.eof.store(p.eof, Ordering::Relaxed);
        c.shared.store(p.shared, Ordering::Relaxed);
        c.error.store(p.error, Ordering::Relaxed);
        c.error_reported.store(p.error_reported, Ordering::Relaxed);
        c.tcp_opts[0].store(p.tcp_opts[0], Ordering::Relaxed);
        c.tcp_opts[1].store(p.tcp_opts[1], Ordering::Relaxed);
        *lock(&c.registration) = registration.map(crate::fds::lift);
        Ok(c)
    }

    /// This process's own state of the connection, which a new program image needs to take
    /// it over after `exec` and must not read back from the peer-writable region.
    pub fn private_state(&self) -> Private {
        let (tx_tail, switched, tcp_sent) = {
            let mut tx = lock(&self.tx);
            (tx.w.state().tail(), tx.switched, tx.tcp_sent)
        };
        let (rx_head, tcp_read, peer_switch) = {
            let mut rx = lock(&self.rx);
            (rx.r.state().head(), rx.tcp_read, rx.peer_switch)
        };
        Private {
            side: self.side,
            claim_seen: self.claim_seen.load(Ordering::Acquire),
            switched,
            tx_tail,
            rx_head,
            tcp_sent,
            tcp_read,
            peer_switch,
            shut_rd: self.shut_rd.load(Ordering::Relaxed),
            shut_wr: self.shut_wr.load(Ordering::Relaxed),
            eof: self.eof.load(Ordering::Acquire),
            shared: self.shared.load(Ordering::Relaxed),
            error: self.error.load(Ordering::Relaxed),
            error_reported: self.error_reported.load(Ordering::Relaxed),
            tcp_opts: [self.tcp_opts[0].load(Ordering::Relaxed), self.tcp_opts[1].load(Ordering::Relaxed)],
        }
    }

    /// Notes that another process may hold the socket too (after `fork`).
    pub fn mark_shared(&self) {
        self.shared.store(true, Ordering::Relaxed);
    }

    /// Before the last close of a connecting socket whose registration no listener claimed:
    /// the registration message, which carries a duplicate of the socket, may still wait
    /// unread at the announcing process (one that never accepts, such as a socket-activation
    /// manager whose service accepts), and that duplicate would keep the close from sending
    /// FIN. Shut the socket down for both directions first, unless unread bytes make the
    /// kernel's close a reset, the program set `SO_LINGER`, or another process may hold it.
    pub fn end_unclaimed(&self, fd: c_int) {
        if self.side != Side::Connector
            || self.claim_seen.load(Ordering::Acquire)
            || self.shared.load(Ordering::Relaxed)
        {
            return;
        }
        if rustix::net::sockopt::socket_linger(borrow(fd)).is_ok_and(|l| l.is_some()) {
            // The program asked for a lingering or resetting close: the kernel's own.
            return;
        }
        let mut unread: c_int = 0;
        // SAFETY: FIONREAD into a local int.
        if unsafe { crate::real::ioctl(fd, libc::FIONREAD, std::ptr::addr_of_mut!(unread).cast()) } == 0
            && unread == 0
        {
            let _ = rustix::net::shutdown(borrow(fd), rustix::net::Shutdown::Both);
        }
    }

    /// Whether another process may hold the socket too: this one forked since (or inherited
    /// it), and the processes of this side that held it have not all closed it but one. (A
    /// process that ends without closing still counts: the connection stays shared.)
    pub fn shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed) && tcp::holders(self.region(), self.me()).map_or(true, |n| n > 0)
    }

    /// One more process is about to hold the socket (`fork`), or, `add` false, one less
    /// (this one closed its last descriptor of it, or the `fork` failed).
    pub fn count_holder(&self, add: bool) {
        let _ = if add {
            tcp::holders_add(self.region(), self.me())
        } else {
            tcp::holders_release(self.region(), self.me())
        };
    }

    /// The registration connection's descriptor while this (connecting) side still holds it.
    pub fn registration_raw(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        lock(&self.registration).as_ref().map(|f| f.as_raw_fd())
    }

    /// Claims the channel a connecting peer registered (an untrusted memfd of at most
    /// `max_region` bytes).
    pub fn acceptor(fd: OwnedFd, max_region: u64) -> io::Result<Self> {
        let size = ivcom_ring::shm::check_memfd(fd.as_fd(), max_region.min(MAX_REGION))?;
        let map = MappedRegion::map(fd.as_fd(), 0, size)?;
        // Not `validate`: the connecting side may already have announced sleep on its ring.
        let params = layout::validate_shape(map.region(), false)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if tcp::claimed(map.region()).map_err(io::Error::other)? {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "channel already claimed"));
        }
        let v = tcp::version(map.region()).map_err(io::Error::other)?;
        if v != tcp::HANDOFF_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("handoff protocol {v}, this library speaks {}", tcp::HANDOFF_VERSION),
            ));
        }
        tcp::claim(map.region()).map_err(io::Error::other)?;
        Ok(Self::new(map, fd, Side::Acceptor, &params))
    }

    fn region(&self) -> &ShmRegion {
        self.map.region()
    }

    /// While several processes hold the connection (after `fork`, or an image that took it
    /// over), each ring operation of this side takes the side's lock for writing (or
    /// reading), so that two processes writing (or reading) at the same instant do not both
    /// use the same ring positions: each call's bytes stay whole, as the kernel keeps them for
    /// TCP. A holder that died is replaced; one that holds it for a second (a peer that
    /// forged the word, which only this side's own operations use) is waited out no longer.
    fn side_lock(&self, which: tcp::Lock) -> Option<SideLock<'_>> {
        if !self.shared() {
            return None;
        }
        let region = self.region();
        let (side, pid) = (self.me(), pid());
        let start = std::time::Instant::now();
        let mut i = 0u32;
        loop {
            if tcp::try_lock(region, side, which, pid).unwrap_or(false) {
                return Some(SideLock { region, side, which, pid });
            }
            i = i.wrapping_add(1);
            if i.is_multiple_of(64) {
                let h = tcp::lock_holder(region, side, which).unwrap_or(0);
                if h != 0 && !alive(h) {
                    let _ = tcp::steal_lock(region, side, which, h, pid);
                    continue;
                }
                if start.elapsed() > std::time::Duration::from_secs(1) {
                    crate::decision!(
                        "the connection's {which:?} lock was held by pid {h} for 1 s; going on without it"
                    );
                    return None;
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// This side's index in the handback lines (0: connecting side, 1: listener's).
    fn me(&self) -> usize {
        match self.side {
            Side::Connector => 0,
            Side::Acceptor => 1,
        }
    }

    fn peer(&self) -> usize {
        1 - self.me()
    }

    /// Sends one wakeup byte over TCP (`flags`: the send's; `MSG_DONTWAIT` is added),
    /// counted in the region before it leaves, so that a handback knows how many of our TCP
    /// bytes are wakeups. Sends nothing once our wakeups are frozen (a handback is under
    /// way). Returns `send`'s result, or `None` if frozen.
    fn send_wake(&self, fd: c_int, flags: c_int) -> Option<isize> {
        let region = self.region();
        if !tcp::reserve_wake(region, self.me()).unwrap_or(false) {
            return None;
        }
        // SAFETY: sending one byte from a local.
        let r = unsafe { crate::real::send(fd, [0u8].as_ptr().cast(), 1, flags | libc::MSG_DONTWAIT) };
        let e = errno();
        if r == 1 {
            count(&COUNTERS.doorbells, 1);
        }
        // A byte that did not leave is still counted: the peer, handing back, then waits
        // for it until its deadline (it takes nothing that is not there).
        let _ = tcp::wake_sent(region, self.me());
        if r < 0 {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = e };
        }
        Some(r)
    }

    /// Wakes the peer (see [`TcpConn::send_wake`]).
    fn wake(&self, fd: c_int) {
        let _ = self.send_wake(fd, libc::MSG_NOSIGNAL);
    }

    /// How many of the peer's wakeup bytes are still ahead of us on TCP (counted before
    /// they were sent, so never more than it sent); peer-written counts bound only what we
    /// take off the peer's own stream.
    fn wakes_ahead(&self) -> u64 {
        let region = self.region();
        match (tcp::wakes(region, self.peer()), tcp::taken(region, self.me())) {
            (Ok((w, _)), Ok(t)) => w.saturating_sub(t),
            _ => 0,
        }
    }

    /// Takes up to `max` of the peer's wakeup bytes off TCP without waiting; notes EOF and
    /// errors. Returns how many it took.
    fn take_wakes(&self, fd: c_int, max: u64) -> u64 {
        use rustix::net::RecvFlags;
        let mut scratch = [0u8; 256];
        let mut took = 0u64;
        while took < max {
            let want = ((max - took) as usize).min(scratch.len());
            match rustix::net::recv(borrow(fd), &mut scratch[..want], RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.eof.store(true, Ordering::Release);
                    break;
                }
                Ok((n, _)) => took += n as u64,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    self.set_error(e.raw_os_error());
                    break;
                }
            }
        }
        if took > 0 {
            let region = self.region();
            let t = tcp::taken(region, self.me()).unwrap_or(0);
            let _ = tcp::store_taken(region, self.me(), t + took);
        }
        took
    }

    /// Wakeup bytes must leave at once: Nagle's algorithm would hold one back behind an
    /// unacknowledged one until the peer's delayed ACK (up to 40 ms). The program's own
    /// `TCP_NODELAY`/`TCP_CORK` settings are kept aside ([`TcpConn::tcp_option`]).
    pub fn set_nodelay(fd: c_int) {
        let one: c_int = 1;
        // SAFETY: setting an int option from a local.
        unsafe {
            crate::real::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
    }

    /// The program's view of `TCP_NODELAY` (index 0) and `TCP_CORK` (1) on this connection.
    pub fn tcp_option(&self, which: usize) -> &AtomicI32 {
        &self.tcp_opts[which.min(1)]
    }

    /// Whether the program's receive (`send` false) or send timeout is negative (see
    /// `timeo_passed`).
    pub fn timeout_passed(&self, send: bool) -> &AtomicBool {
        &self.timeo_passed[send as usize]
    }

    /// Keeps the registration connection open until the claim is seen.
    pub fn hold_registration(&self, s: OwnedFd) {
        *lock(&self.registration) = Some(crate::fds::lift(s));
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Whether the connection runs as plain TCP (the peer never claimed): pass everything on.
    #[inline]
    pub fn is_plain(&self) -> bool {
        self.plain.load(Ordering::Relaxed)
    }

    fn become_plain(&self, why: &str) {
        if !self.plain.swap(true, Ordering::Relaxed) {
            *lock(&self.registration) = None;
            count(&COUNTERS.fallbacks, 1);
            crate::decision!("connection stays on plain TCP: {why}");
        }
    }

    /// Whether the listener's side claimed the channel (the connector learns it lazily).
    fn claimed(&self) -> bool {
        if self.claim_seen.load(Ordering::Acquire) {
            return true;
        }
        if self.side == Side::Acceptor || self.is_plain() || !tcp::claimed(self.region()).unwrap_or(false) {
            return false;
        }
        // The claim word only says that the claim message should be on the registration
        // connection, which reaches the process that holds the listening socket (checked at
        // registration); that message settles it.
        let mut reg = lock(&self.registration);
        let Some(r) = reg.as_ref() else { return false };
        let why = match crate::announce::recv_claim(r.as_fd()) {
            crate::announce::Claim::NotYet => return false,
            crate::announce::Claim::Never(why) => why,
            crate::announce::Claim::Claimed => {
                *reg = None;
                drop(reg);
                self.claim_seen.store(true, Ordering::Release);
                count(&COUNTERS.accelerated, 1);
                crate::decision!("connect: listener claimed the channel; connection accelerated");
                return true;
            }
        };
        *reg = None;
        drop(reg);
        if tcp::claimed(self.region()).unwrap_or(false) {
            // The listener's side did claim, but the message proving it went to another
            // process of ours (a fork that read it first, then closed the connection): the
            // claim cannot be checked here, so the connection goes back to TCP (the peer
            // follows), which needs no trust in it.
            self.unverified_claim.store(true, Ordering::Release);
            crate::decision!(
                "connect: the claim was read by another process of ours ({why}); handing back to TCP"
            );
            return false;
        }
        self.become_plain(&why);
        false
    }

    /// After the kernel reported POLLERR: keep the socket's error (a reset), if it has one.
    fn note_sock_error(&self, fd: c_int) {
        let e = sock_error(fd);
        if e != 0 {
            self.set_error(e);
        }
    }

    /// `SO_ERROR`: the connection's error not yet reported, after asking the kernel whether
    /// the peer closed and, if it closed with our bytes unread, reset (as its kernel would have
    /// at once over TCP).
    pub fn socket_error(&self, fd: c_int) -> Option<Errno> {
        if !self.has_error() && !self.is_plain() {
            self.note_hangup(fd);
            if self.eof.load(Ordering::Acquire) && !self.has_error() {
                self.closed_with_our_data_unread(fd);
            }
        }
        self.report_error()
    }

    /// One more descriptor number refers to the connection (see `fd_refs`).
    pub fn fd_added(&self) {
        self.fd_refs.fetch_add(1, Ordering::Relaxed);
    }

    /// One descriptor number less refers to the connection; true if it was the last.
    pub fn fd_removed(&self) -> bool {
        self.fd_refs.fetch_sub(1, Ordering::Relaxed) <= 1
    }

    /// The connection's error, if it was not reported to the program yet; reporting it now
    /// (the kernel's `sock_error`: `SO_ERROR`, or the first read or write after a reset).
    pub fn report_error(&self) -> Option<Errno> {
        let e = self.error.load(Ordering::Relaxed);
        (e != 0 && !self.error_reported.swap(true, Ordering::Relaxed)).then_some(e)
    }

    /// Keeps an error the kernel reported on the socket to one of the library's own calls
    /// (which took it off the socket: the kernel reports it once).
    pub fn note_error(&self, e: Errno) {
        self.set_error(e);
    }

    fn set_error(&self, e: Errno) {
        let _ = self.error.compare_exchange(0, e, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn rx_mode(&self, rx: &mut Rx) -> R<RxMode> {
        if rx.plain_tcp {
            return Ok(RxMode::Plain);
        }
        let m = self.rx_mode_accelerated(rx)?;
        let region = self.region();
        let (me, peer) = (self.me(), self.peer());
        match m {
            RxMode::Ring => {}
            // We handed back before the claim was seen here: the listener's side sends its
            // ring's bytes over TCP after its wakeup bytes.
            RxMode::Tcp { limit: None }
                if self.side == Side::Connector && tcp::rx_stop(region, me).ok().flatten().is_some() => {}
            // The connecting side handed back before it ever switched: all of its TCP
            // stream is data.
            RxMode::Tcp { limit: None }
                if self.side == Side::Acceptor && tcp::tx_stop(region, peer).ok().flatten().is_some() =>
            {
                rx.plain_tcp = true;
                return Ok(RxMode::Plain);
            }
            _ => return Ok(m),
        }
        // Handback: the ring part ends where we stopped reading, or where the peer stopped
        // writing; then the peer's wakeup bytes (a final count once frozen), then data.
        let stop = match tcp::rx_stop(region, me).ok().flatten() {
            Some(h) => Some(h),
            None => tcp::tx_stop(region, peer).ok().flatten(),
        };
        let Some(stop) = stop else { return Ok(RxMode::Ring) };
        if rx.r.state().head() < stop {
            return Ok(RxMode::Ring);
        }
        match tcp::wakes(region, peer) {
            Ok((_, true)) => {}
            _ => return Ok(RxMode::Ring),
        }
        let ahead = self.wakes_ahead();
        if ahead > 0 {
            return Ok(RxMode::Skip(ahead));
        }
        rx.plain_tcp = true;
        self.rx_handed.store(true, Ordering::Release);
        Ok(RxMode::Plain)
    }

    fn rx_mode_accelerated(&self, rx: &mut Rx) -> R<RxMode> {
        match self.side {
            Side::Connector => Ok(if self.claimed() { RxMode::Ring } else { RxMode::Tcp { limit: None } }),
            Side::Acceptor => {
                if rx.peer_switch.is_none() {
                    let n = tcp::switch_offset(self.region()).map_err(|_| libc::EIO)?;
                    if let Some(n) = n {
                        if n < rx.tcp_read {
                            // A peer that claims to have sent less than we already read.
                            self.set_error(libc::ECONNRESET);
                            return Err(libc::ECONNRESET);
                        }
                    }
                    rx.peer_switch = n;
                }
                Ok(match rx.peer_switch {
                    Some(n) if rx.tcp_read >= n => RxMode::Ring,
                    Some(n) => RxMode::Tcp { limit: Some(n - rx.tcp_read) },
                    None => RxMode::Tcp { limit: None },
                })
            }
        }
    }

    /// Reads wakeup bytes off TCP; notes EOF and errors. Only while no thread of this process
    /// is announced asleep (for data or for space): the byte may be its wakeup, and it may be
    /// about to block in the kernel. A thread that announces after we took bytes re-checks
    /// the ring after announcing, and sees what those bytes stood for; `wake_lock` makes the
    /// two exclusive. Otherwise only FIN and RST are noted.
    /// `_held`: the caller holds the receive lock (the lock order is `rx`, then `wake_lock`).
    fn drain(&self, _held: &Rx, fd: c_int) {
        let _w = lock(&self.wake_lock);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.note_hangup(fd);
            return;
        }
        // Only the wakeup bytes the peer counted: anything past them is data it sent after
        // handing the connection back, for whoever reads next.
        let ahead = self.wakes_ahead();
        if ahead == 0 || self.take_wakes(fd, ahead.min(64 * 256)) == 0 {
            self.note_hangup(fd);
        }
    }

    /// One non-blocking read attempt into `iov` (`MSG_PEEK` honoured; `MSG_WAITALL` is the
    /// caller's loop). `Err(EAGAIN)` when nothing is there yet.
    pub fn try_recv(&self, fd: c_int, iov: &[iovec], flags: c_int) -> R<usize> {
        let peek = flags & libc::MSG_PEEK != 0;
        let want = iov_len(iov);
        if self.shut_rd.load(Ordering::Relaxed) && !self.has_unread() {
            // As the kernel's: what arrived is still read after `SHUT_RD`, then EOF.
            return Ok(0);
        }
        self.progress(fd);
        let mut rx = lock(&self.rx);
        let _side = self.side_lock(tcp::Lock::Rx);
        for _ in 0..8 {
            match self.rx_mode(&mut rx)? {
                RxMode::Skip(n) => {
                    if self.take_wakes(fd, n) == 0 {
                        if self.eof.load(Ordering::Acquire) {
                            return Ok(0);
                        }
                        if self.has_error() {
                            return self.report_error().map_or(Ok(0), Err);
                        }
                        return Err(EAGAIN);
                    }
                    continue;
                }
                RxMode::Plain => {
                    drop(rx);
                    self.finish_handback(fd);
                    let m = msghdr_of(iov);
                    let mut m = m;
                    // SAFETY: `m` describes the program's own buffers for this call.
                    let n = unsafe {
                        crate::real::recvmsg(fd, &mut m, (flags & !libc::MSG_WAITALL) | libc::MSG_DONTWAIT)
                    };
                    return if n < 0 { Err(errno()) } else { Ok(n as usize) };
                }
                RxMode::Tcp { limit } => {
                    let lim = limit.map_or(want, |l| want.min(l.min(usize::MAX as u64) as usize));
                    let part = iov_truncated(iov, lim);
                    let mut m = msghdr_of(&part);
                    let f = (flags & !libc::MSG_WAITALL) | libc::MSG_DONTWAIT;
                    // SAFETY: `m` describes the program's own buffers for this call.
                    let n = unsafe { crate::real::recvmsg(fd, &mut m, f) };
                    if n < 0 {
                        let e = errno();
                        if e == EAGAIN && self.rx_mode(&mut rx)? == RxMode::Ring {
                            continue;
                        }
                        rx.tcp_data = false;
                        return Err(e);
                    }
                    let n = n as usize;
                    match self.side {
                        Side::Connector => {
                            if n == 0
                                && !self.claim_seen.load(Ordering::Acquire)
                                && tcp::claimed(self.region()).unwrap_or(false)
                            {
                                // The listener's side claimed, wrote into the ring and closed,
                                // and the proof of its claim went to another process of ours:
                                // the EOF comes after what it wrote (handed back at the next
                                // call, which reads the ring to its end first).
                                self.eof.store(true, Ordering::Release);
                                self.unverified_claim.store(true, Ordering::Release);
                                return Err(EAGAIN);
                            }
                            let claim_word = n > 0 && tcp::claimed(self.region()).unwrap_or(false);
                            if self.claimed() || claim_word {
                                // Sent after the claim: wakeups, not data (counted as taken).
                                // A claim whose proof another process of ours read: hand
                                // back at the next call.
                                if !peek {
                                    let t = tcp::taken(self.region(), self.me()).unwrap_or(0);
                                    let _ = tcp::store_taken(self.region(), self.me(), t + n as u64);
                                }
                                if !self.claim_seen.load(Ordering::Acquire) {
                                    self.unverified_claim.store(true, Ordering::Release);
                                    return Err(EAGAIN);
                                }
                                continue;
                            }
                            if n == 0 {
                                self.eof.store(true, Ordering::Release);
                            } else {
                                self.become_plain("the listener sent data without claiming the channel");
                            }
                            return Ok(n);
                        }
                        Side::Acceptor => {
                            if n == 0 {
                                self.eof.store(true, Ordering::Release);
                                if self.rx_mode(&mut rx)? == RxMode::Ring {
                                    continue;
                                }
                                return Ok(0);
                            }
                            let mut n = n as u64;
                            if limit.is_none() {
                                // Published meanwhile? Bytes past the switch point were wakeups.
                                if let Ok(Some(sw)) = tcp::switch_offset(self.region()) {
                                    if sw < rx.tcp_read {
                                        self.set_error(libc::ECONNRESET);
                                        return Err(libc::ECONNRESET);
                                    }
                                    rx.peer_switch = Some(sw);
                                    n = n.min(sw - rx.tcp_read);
                                }
                            }
                            if n < lim as u64 {
                                rx.tcp_data = false;
                            }
                            if !peek {
                                rx.tcp_read += n;
                                let _ = tcp::store_read(self.region(), rx.tcp_read);
                            }
                            if n == 0 {
                                continue;
                            }
                            return Ok(n as usize);
                        }
                    }
                }
                RxMode::Ring => {
                    let got = self.ring_read(&mut rx, fd, iov, peek)?;
                    if got > 0 || want == 0 {
                        return Ok(got);
                    }
                    // Empty: take wakeups off TCP, learn about FIN/RST, and look once more
                    // (the peer publishes before it closes).
                    self.drain(&rx, fd);
                    let got = self.ring_read(&mut rx, fd, iov, peek)?;
                    if got > 0 {
                        return Ok(got);
                    }
                    let e = self.error.load(Ordering::Relaxed);
                    if e == libc::EPIPE {
                        // A reset after the peer's FIN that a byte of ours provoked (a
                        // wakeup TCP would not have sent): a read sees the EOF.
                        return Ok(0);
                    }
                    if e != 0 {
                        return self.report_error().map_or(Ok(0), Err);
                    }
                    if self.eof.load(Ordering::Acquire) {
                        if self.closed_with_our_data_unread(fd) {
                            return self.report_error().map_or(Ok(0), Err);
                        }
                        return Ok(0);
                    }
                    return Err(EAGAIN);
                }
            }
        }
        Err(EAGAIN)
    }

    fn ring_read(&self, rx: &mut Rx, fd: c_int, iov: &[iovec], peek: bool) -> R<usize> {
        // A forked sibling may have read from this end since we last did.
        let region = self.region();
        if let Ok(c) = rx.r.ctrl(region) {
            rx.r.state().adopt_published_head(&c).map_err(|e| self.violated(e))?;
        }
        let mut got = 0usize;
        let mut wake = false;
        if peek {
            // A peek fills every buffer in turn, as a read would, without consuming.
            let mut tmp = vec![0u8; iov_len(iov).min(1 << 20)];
            let n = rx.r.try_peek(self.region(), &mut tmp).map_err(|e| self.violated(e))?;
            for v in iov {
                // SAFETY: the program's buffer for this call.
                let b = unsafe { buf_mut(v) };
                let k = b.len().min(n - got);
                b[..k].copy_from_slice(&tmp[got..got + k]);
                got += k;
                if got == n {
                    break;
                }
            }
            return Ok(got);
        }
        for v in iov {
            // SAFETY: the program's buffer for this call.
            let b = unsafe { buf_mut(v) };
            if b.is_empty() {
                continue;
            }
            let n = rx.r.try_read(self.region(), b, &mut || wake = true).map_err(|e| self.violated(e))?;
            got += n;
            if n < b.len() {
                break;
            }
        }
        if wake {
            // Our TCP bytes count as data for the listener's side until we publish where
            // our data switched to the ring: publish first.
            self.ensure_switched();
            self.wake(fd);
        }
        if got > 0 && !peek {
            count(&COUNTERS.ring_rx, got as u64);
        }
        Ok(got)
    }

    /// Connector: publishes the switch point (if the claim is seen and it is not published
    /// yet), so that a wakeup byte sent now is not taken for data.
    fn ensure_switched(&self) {
        if self.side == Side::Acceptor || self.switched.load(Ordering::Acquire) || !self.claimed() {
            return;
        }
        let mut tx = lock(&self.tx);
        self.switch_now(&mut tx);
    }

    fn switch_now(&self, tx: &mut Tx) {
        if !tx.switched && tcp::publish_switch(self.region(), tx.tcp_sent).is_ok() {
            tx.switched = true;
            self.switched.store(true, Ordering::Release);
        }
    }

    fn violated(&self, e: ivcom_ring::RingError) -> Errno {
        crate::decision!("peer violated the channel protocol: {e}; connection reset");
        self.set_error(libc::ECONNRESET);
        libc::ECONNRESET
    }

    /// One write attempt from `iov`. Before the switch it is the kernel's own (blocking or
    /// not, as the program asked); in the ring it never blocks (`Err(EAGAIN)` when full).
    pub fn try_send(&self, fd: c_int, iov: &[iovec], flags: c_int) -> R<usize> {
        if iov_len(iov) == 0 && !self.has_error() {
            // Nothing to carry: the kernel's answer for an empty write (0, or the error of
            // our own shutdown) is TCP's.
            let m = msghdr_of(iov);
            // SAFETY: `m` describes the program's own (empty) buffers for this call.
            let n = unsafe { crate::real::sendmsg(fd, &m, flags | libc::MSG_DONTWAIT) };
            return if n < 0 { Err(errno()) } else { Ok(n as usize) };
        }
        if self.unverified_claim.load(Ordering::Acquire) {
            self.progress(fd);
        }
        let mut tx = lock(&self.tx);
        let _side = self.side_lock(tcp::Lock::Tx);
        if let Some(r) = self.tx_handback(&mut tx, fd) {
            r?;
            drop(tx);
            self.finish_handback(fd);
            let m = msghdr_of(iov);
            // SAFETY: `m` describes the program's own buffers for this call.
            let n = unsafe { crate::real::sendmsg(fd, &m, flags | libc::MSG_DONTWAIT) };
            return if n < 0 { Err(errno()) } else { Ok(n as usize) };
        }
        if !tx.switched {
            if self.claimed() && !self.is_plain() {
                self.switch_now(&mut tx);
            } else if self.unverified_claim.load(Ordering::Acquire) {
                // Not over TCP yet: the handback (next call) says where TCP data starts.
                return Err(EAGAIN);
            } else {
                let m = msghdr_of(iov);
                // SAFETY: `m` describes the program's own buffers for this call.
                let n = unsafe { crate::real::sendmsg(fd, &m, flags) };
                if n < 0 {
                    return Err(errno());
                }
                tx.tcp_sent += n as u64;
                let _ = tcp::store_sent(self.region(), tx.tcp_sent);
                return Ok(n as usize);
            }
        }
        self.notice_close(fd);
        let e = self.error.load(Ordering::Relaxed);
        if e != 0 {
            // The first call after a reset reports it (the kernel's `sock_error`); later
            // writes get the kernel's EPIPE below.
            if let Some(e) = self.report_error() {
                return Err(e);
            }
        }
        if self.shut_wr.load(Ordering::Relaxed) || e != 0 || self.eof.load(Ordering::Acquire) {
            // Let the kernel answer as TCP would: EPIPE (and SIGPIPE unless MSG_NOSIGNAL)
            // after our shutdown or the peer's reset; a write to a peer that closed provokes
            // its reset, and the byte is a harmless wakeup if it only half-closed.
            if let Some(r) = self.send_wake(fd, flags & libc::MSG_NOSIGNAL) {
                if r < 0 && errno() != EAGAIN {
                    let e = errno();
                    if e == libc::EPIPE && !self.shut_wr.load(Ordering::Relaxed) {
                        // The kernel refused a write of the program's: the connection is
                        // reset, which `poll` reports as a hang-up from now on.
                        self.reset_seen.store(true, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
        }
        // A forked sibling may have written to this end since we last did.
        if let Ok(c) = tx.w.ctrl(self.region()) {
            tx.w.state().adopt_published_tail(&c).map_err(|e| self.violated(e))?;
        }
        let mut put = 0usize;
        let mut wake = false;
        for v in iov {
            // SAFETY: the program's buffer for this call.
            let b = unsafe { buf(v) };
            if b.is_empty() {
                continue;
            }
            let n = tx.w.try_write(self.region(), b, &mut || wake = true).map_err(|e| self.violated(e))?;
            put += n;
            if n < b.len() {
                break;
            }
        }
        if wake {
            self.wake(fd);
        }
        if put == 0 && iov_len(iov) > 0 {
            return Err(EAGAIN);
        }
        count(&COUNTERS.ring_tx, put as u64);
        Ok(put)
    }

    /// Asks the kernel (at most once per millisecond) whether the peer has closed or reset,
    /// so writes to a closed peer fail as they would over TCP instead of filling the ring.
    fn notice_close(&self, fd: c_int) {
        if self.eof.load(Ordering::Relaxed) || self.error.load(Ordering::Relaxed) != 0 {
            return;
        }
        let now = EPOCH.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64 + 1;
        let last = self.last_close_check.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1_000_000 {
            return;
        }
        self.last_close_check.store(now, Ordering::Relaxed);
        self.note_hangup(fd);
    }

    /// Asks the kernel, without taking any byte off the socket, whether the peer's FIN or a
    /// reset has arrived, and notes it.
    fn note_hangup(&self, fd: c_int) {
        let mut p = [libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 }];
        // SAFETY: a local pollfd array of length 1.
        if unsafe { crate::real::poll(p.as_mut_ptr(), 1, 0) } == 1 {
            if p[0].revents & libc::POLLRDHUP != 0 {
                self.eof.store(true, Ordering::Release);
            }
            if p[0].revents & libc::POLLERR != 0 {
                self.note_sock_error(fd);
            }
        }
    }

    /// At the peer's FIN, with bytes we wrote still unread in our ring: did the peer close
    /// its socket (or die) without reading them? Over TCP its kernel would then have reset the
    /// connection, and our reads end with `ECONNRESET` rather than EOF; but the unread bytes
    /// were in our ring, not in its socket. Asked once per connection: one probe byte (a
    /// counted wakeup), which a closed socket answers with a reset (a half-closed one that
    /// still reads takes it as a wakeup), then up to 20 ms for the reset to arrive.
    fn closed_with_our_data_unread(&self, fd: c_int) -> bool {
        if self.probed.swap(true, Ordering::Relaxed) {
            return self.has_error();
        }
        let unread = self.tx_unread() > 0;
        if !unread || self.send_wake(fd, libc::MSG_NOSIGNAL).is_none_or(|r| r < 0) {
            return self.has_error();
        }
        let mut p = [libc::pollfd { fd, events: 0, revents: 0 }];
        // SAFETY: a local pollfd array of length 1; POLLERR is always reported.
        if unsafe { crate::real::poll(p.as_mut_ptr(), 1, 20) } == 1 && p[0].revents & libc::POLLERR != 0 {
            // The kernel calls a reset after the peer's FIN `EPIPE`; over TCP the peer's
            // close with our bytes unread would have been a reset without a FIN.
            let _ = sock_error(fd);
            let _ = self.error.compare_exchange(0, libc::ECONNRESET, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.has_error()
    }

    /// Whether something the program reads comes before the kernel's own stream on `fd`:
    /// bytes in the ring, or wakeup bytes still to be taken off TCP (taken now if they
    /// arrived). For `SIOCATMARK`, whose mark is in the kernel's stream.
    pub fn ahead_of_kernel(&self, fd: c_int) -> bool {
        self.has_unread() || !self.take_arrived_wakes(fd)
    }

    /// Takes the peer's counted wakeup bytes that arrived off the socket (only while the
    /// ring carries the data: TCP bytes are the program's); returns whether none is left to
    /// come. Before the last close, so that the kernel does not answer it with a reset for
    /// bytes the program never saw, and for [`TcpConn::ahead_of_kernel`].
    pub fn take_arrived_wakes(&self, fd: c_int) -> bool {
        let mut rx = lock(&self.rx);
        let _side = self.side_lock(tcp::Lock::Rx);
        let ahead = match self.rx_mode(&mut rx) {
            Ok(RxMode::Ring) => self.wakes_ahead(),
            Ok(RxMode::Skip(n)) => n,
            _ => return true,
        };
        ahead == 0 || self.take_wakes(fd, ahead) == ahead
    }

    /// For `TCP_INFO`: bytes of ours the peer has consumed from the ring, bytes we consumed
    /// from the peer's ring, and the wakeup bytes we sent and took off TCP (which the kernel
    /// counts as data).
    pub fn ring_totals(&self) -> (u64, u64, u64, u64) {
        let region = self.region();
        let tx_done = {
            let mut tx = lock(&self.tx);
            match tx.w.ctrl(region) {
                Ok(c) => {
                    // Another process of this side may have written since.
                    let _ = tx.w.state().adopt_published_tail(&c);
                    let _ = tx.w.state().refresh_head(&c);
                    tx.w.state().consumed()
                }
                Err(_) => 0,
            }
        };
        let rx_done = {
            let mut rx = lock(&self.rx);
            if let Ok(c) = rx.r.ctrl(region) {
                let _ = rx.r.state().adopt_published_head(&c);
            }
            rx.r.state().head()
        };
        let sent = tcp::wakes_sent(region, self.me()).unwrap_or(0);
        let taken = tcp::taken(region, self.me()).unwrap_or(0);
        (tx_done, rx_done, sent, taken)
    }

    /// Whether data the peer sent is still unread here.
    pub fn has_unread(&self) -> bool {
        matches!(self.ring_bytes(), Some(Ok(n)) if n > 0)
    }

    /// Whether writes go over TCP (the connector before the claim; after a handback).
    pub fn tx_on_tcp(&self) -> bool {
        let tx = lock(&self.tx);
        tx.plain_tcp || tx.push.is_some() || (!tx.switched && !self.claimed())
    }

    /// Whether a handback is under way here (ring bytes still to be pushed over TCP): waits
    /// are kept short so that the push goes on even if the program only reads.
    pub fn in_handback(&self) -> bool {
        self.push_pending.load(Ordering::Relaxed)
    }

    /// The writing half of a handback. `None`: none under way, write as usual. `Some(Ok)`:
    /// writes go to the kernel as they are. `Some(Err(EAGAIN))`: ring bytes the peer did not
    /// read are still being sent over TCP ahead of anything new.
    fn tx_handback(&self, tx: &mut Tx, fd: c_int) -> Option<R<()>> {
        if tx.plain_tcp {
            return Some(Ok(()));
        }
        let region = self.region();
        if tx.push.is_none() {
            if tcp::tx_stop(region, self.me()).ok().flatten().is_some() {
                // Another process of this side (a fork, a spawned image) handed the
                // connection back: our writes go to TCP too.
                tx.plain_tcp = true;
                self.tx_handed.store(true, Ordering::Release);
                crate::decision!("another process on this end handed the connection back to TCP: following");
                return Some(Ok(()));
            }
            // The peer stopped reading our ring (it handed the connection back): stop
            // writing it; what it did not read goes over TCP before anything else.
            let stop = tcp::rx_stop(region, self.peer()).ok().flatten()?;
            if let Ok(c) = tx.w.ctrl(region) {
                let _ = tx.w.state().adopt_published_tail(&c);
            }
            let tail = tx.w.state().tail();
            let _ = tcp::store_tx_stop(region, self.me(), tail);
            // Our wakeup bytes (frozen by the peer) leave before the pushed bytes: one
            // another thread counted may still be on its way out.
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
            while tcp::wakes_sent(region, self.me()).unwrap_or(0)
                < tcp::wakes(region, self.me()).map_or(0, |w| w.0)
                && std::time::Instant::now() < deadline
            {
                std::thread::yield_now();
            }
            count(&COUNTERS.handbacks, 1);
            crate::decision!(
                "the peer handed the connection back to TCP: following ({} ring bytes to send over TCP)",
                tail.saturating_sub(stop)
            );
            tx.push = Some(stop);
            self.push_pending.store(true, Ordering::Relaxed);
        }
        Some(self.push(tx, fd))
    }

    /// Sends the ring bytes the peer did not read over TCP (without waiting).
    fn push(&self, tx: &mut Tx, fd: c_int) -> R<()> {
        let region = self.region();
        let mut buf = [0u8; 16 * 1024];
        while let Some(from) = tx.push {
            let n = tx.w.copy_published(region, from, &mut buf).map_err(|e| self.violated(e))?;
            if n == 0 {
                tx.push = None;
                tx.plain_tcp = true;
                self.push_pending.store(false, Ordering::Relaxed);
                self.tx_handed.store(true, Ordering::Release);
                return Ok(());
            }
            // SAFETY: sending from a local buffer.
            let r = unsafe {
                crate::real::send(fd, buf.as_ptr().cast(), n, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if r < 0 {
                let e = errno();
                if e != EAGAIN && e != libc::EINTR {
                    self.set_error(e);
                    self.push_pending.store(false, Ordering::Relaxed);
                }
                return Err(if e == libc::EINTR { EAGAIN } else { e });
            }
            tx.push = Some(from + r as u64);
        }
        Ok(())
    }

    /// Before the last close of this side, or its `shutdown` for writing: a peer that
    /// handed back (stopped reading our ring) gets what it did not read over TCP now, ahead
    /// of the FIN, as the kernel would still deliver bytes a closed socket had taken; waits
    /// for room in the socket at most 2 s.
    pub fn push_before_close(&self, fd: c_int) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut tx = lock(&self.tx);
        let _side = self.side_lock(tcp::Lock::Tx);
        while let Some(Err(e)) = self.tx_handback(&mut tx, fd) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if e != EAGAIN {
                break;
            }
            if left.is_zero() {
                crate::decision!("close: ring bytes the peer did not read could not all be sent over TCP");
                break;
            }
            let mut p = [libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }];
            // SAFETY: a local pollfd array of length 1.
            unsafe { crate::real::poll(p.as_mut_ptr(), 1, left.as_millis().clamp(1, 100) as c_int) };
        }
    }

    /// Whether this side (this process or another of it, after `fork`) handed the
    /// connection back and has read its ring to where it stopped: from here its readiness
    /// is the kernel's.
    pub fn ring_given_up(&self) -> bool {
        let region = self.region();
        let Some(stop) = tcp::rx_stop(region, self.me()).ok().flatten() else { return false };
        let mut rx = lock(&self.rx);
        if let Ok(c) = rx.r.ctrl(region) {
            let _ = rx.r.state().adopt_published_head(&c);
        }
        rx.r.state().head() >= stop
    }

    /// Before this side's FIN (the last close, `shutdown` for writing, exit): once the FIN
    /// is out, no byte can follow it over TCP, and bytes still in our ring reach a peer that
    /// later hands back while leaving the library (an exec of an image without it, such as
    /// an inetd-style service) only over TCP. So wait, at most `FIN_WAIT`, until the peer
    /// has read our ring, handed back (then what it did not read is pushed ahead of the
    /// FIN), or closed, or `deadline` (at most [`FIN_WAIT`] from now). Costs nothing when
    /// the peer has read everything already; not done on a non-blocking socket (an event
    /// loop's close must not block; such servers are not what execs a service on a
    /// connection).
    pub fn settle_before_fin(&self, fd: c_int, deadline: std::time::Instant) {
        // SAFETY: F_GETFL takes no argument.
        let nonblocking = unsafe { crate::real::fcntl(fd, libc::F_GETFL, 0) } & libc::O_NONBLOCK != 0;
        if !nonblocking {
            self.wait_peer_read(fd, deadline.min(std::time::Instant::now() + FIN_WAIT));
        }
        self.push_before_close(fd);
    }

    /// Waits until `deadline` while the peer has not read what is in our ring; returns
    /// early once it has, once it handed back (what it did not read is then ours to push
    /// over TCP), or once it is gone. Looks every millisecond.
    fn wait_peer_read(&self, fd: c_int, deadline: std::time::Instant) {
        while self.tx_unread() > 0
            && !self.tx_handed.load(Ordering::Acquire)
            && tcp::rx_stop(self.region(), self.peer()).ok().flatten().is_none()
        {
            self.note_hangup(fd);
            if self.eof.load(Ordering::Acquire) || self.has_error() || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Bytes we wrote into our ring that the peer has not read yet.
    fn tx_unread(&self) -> u64 {
        let mut tx = lock(&self.tx);
        let region = self.region();
        match tx.w.ctrl(region) {
            Ok(c) if tx.w.state().refresh_head(&c).is_ok() => tx.w.state().unconsumed(),
            _ => 0,
        }
    }

    /// A close under `SO_LINGER` with a timeout (`linger`): as the kernel's, it returns
    /// once the peer has our data (here: read it from the ring, or taken over what it did
    /// not read by a handback), the peer is gone, or the time is up.
    pub fn linger(&self, fd: c_int, linger: std::time::Duration) {
        self.wait_peer_read(fd, std::time::Instant::now() + linger);
    }

    /// Moves a handback along where the program does not write (reads, readiness): pushes
    /// what can be pushed.
    fn progress(&self, fd: c_int) {
        if self.unverified_claim.swap(false, Ordering::AcqRel) {
            self.hand_back(fd, "the claim was read by another process of this end", Handback::Lazy);
        }
        if self.push_pending.load(Ordering::Relaxed)
            || (!self.tx_handed.load(Ordering::Relaxed)
                && (tcp::rx_stop(self.region(), self.peer()).ok().flatten().is_some()
                    || tcp::tx_stop(self.region(), self.me()).ok().flatten().is_some()))
        {
            let mut tx = lock(&self.tx);
            let _side = self.side_lock(tcp::Lock::Tx);
            let _ = self.tx_handback(&mut tx, fd);
        }
    }

    /// Both halves of a handback are done: the connection is plain TCP from here on, with
    /// the program's own `TCP_NODELAY`/`TCP_CORK`.
    pub fn finish_handback(&self, fd: c_int) {
        if self.is_plain()
            || !self.rx_handed.load(Ordering::Acquire)
            || !self.tx_handed.load(Ordering::Acquire)
        {
            return;
        }
        for (i, name) in [(0, libc::TCP_NODELAY), (1, libc::TCP_CORK)] {
            let v = self.tcp_opts[i].load(Ordering::Relaxed);
            // SAFETY: setting an int option from a local.
            unsafe {
                crate::real::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    name,
                    std::ptr::addr_of!(v).cast(),
                    std::mem::size_of::<c_int>() as libc::socklen_t,
                )
            };
        }
        if !self.plain.swap(true, Ordering::AcqRel) {
            *lock(&self.registration) = None;
            crate::decision!("handback complete: the connection is plain TCP");
        }
    }

    /// After our own handback: waits (at most `wait`) until the peer has read our ring up to
    /// where we stopped, or has stopped reading it itself (then we push the rest over TCP).
    fn settle_ring_remainder(&self, tx: &mut Tx, fd: c_int, wait: std::time::Duration) {
        let region = self.region();
        let Some(stop) = tcp::tx_stop(region, self.me()).ok().flatten() else { return };
        let deadline = std::time::Instant::now() + wait;
        loop {
            let head = match tx.w.ctrl(region) {
                Ok(c) => {
                    if tx.w.state().refresh_head(&c).is_err() {
                        return;
                    }
                    tx.w.state().consumed()
                }
                Err(_) => return,
            };
            if head >= stop {
                return;
            }
            if let Some(h) = tcp::rx_stop(region, self.peer()).ok().flatten() {
                // The peer leaves too: the bytes it did not read go over TCP now.
                tx.push = Some(h);
                tx.plain_tcp = false;
                self.push_pending.store(true, Ordering::Relaxed);
                while let Err(e) = self.push(tx, fd) {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if e != EAGAIN || left.is_zero() {
                        break;
                    }
                    let mut p = [libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }];
                    // SAFETY: a local pollfd array of length 1.
                    unsafe { crate::real::poll(p.as_mut_ptr(), 1, left.as_millis().clamp(1, 100) as c_int) };
                }
                tx.plain_tcp = true;
                return;
            }
            if std::time::Instant::now() >= deadline || self.peer_closed() || self.has_error() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
    }

    /// Hands the connection back to the kernel's TCP connection beside it, in both
    /// directions, for `why` (logged): from here on this process's reads and writes go to the
    /// kernel as they are, and so will the peer's once it follows. What we wrote into the ring
    /// the peer reads from the ring before our TCP data; what the peer wrote that we did not
    /// read it sends over TCP; the wakeup bytes each side sent are counted, so they are taken
    /// off TCP exactly. `how` says when the program needs it done ([`Handback`]): unless
    /// lazily, the peer's wakeup bytes are taken off here before it returns (at most `WAIT`
    /// in all), so that whatever reads the socket next finds only data. Returns false where that cannot
    /// be done (the listener's side has not read the connecting side's first TCP bytes yet
    /// and wakeup bytes already follow them); the connection is then left as it was.
    pub fn hand_back(&self, fd: c_int, why: &str, how: Handback) -> bool {
        let now = how != Handback::Lazy;
        const WAIT: std::time::Duration = std::time::Duration::from_secs(2);
        if self.is_plain() {
            return true;
        }
        let mut rx = lock(&self.rx);
        let mut tx = lock(&self.tx);
        let side_rx = self.side_lock(tcp::Lock::Rx);
        let side_tx = self.side_lock(tcp::Lock::Tx);
        let region = self.region();
        let (me, peer) = (self.me(), self.peer());
        if tcp::rx_stop(region, me).ok().flatten().is_some() {
            return true; // already under way
        }
        // Data bytes of the connecting side still to read over TCP before its wakeups.
        let unread_first = match (self.side, rx.peer_switch) {
            (Side::Acceptor, Some(n)) => n.saturating_sub(rx.tcp_read),
            (Side::Acceptor, None) => {
                tcp::switch_offset(region).ok().flatten().map_or(0, |n| n.saturating_sub(rx.tcp_read))
            }
            _ => 0,
        };
        if now && unread_first > 0 && self.wakes_ahead() > 0 {
            crate::decision!(
                "cannot hand the connection back to TCP ({why}): wakeup bytes follow data not read yet"
            );
            return false;
        }
        if let Some(t) = tcp::tx_stop(region, peer).ok().flatten() {
            let head = rx.r.state().head();
            if t > head {
                // Both ends leave at once: the peer stopped writing its ring before we read it.
                crate::decision!(
                    "handback ({why}): {} byte(s) the peer wrote into shared memory before it handed back are still unread; only the library's own reads get them",
                    t - head
                );
            }
        }
        let deadline = std::time::Instant::now() + WAIT;
        let mut final_wake = false;
        if tx.push.is_some() || tcp::rx_stop(region, peer).ok().flatten().is_some() {
            // The peer stopped reading first: what it did not read goes over TCP first.
            while let Some(Err(e)) = self.tx_handback(&mut tx, fd) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if e != EAGAIN || !now || left.is_zero() {
                    break;
                }
                let mut p = [libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }];
                // SAFETY: a local pollfd array of length 1.
                unsafe { crate::real::poll(p.as_mut_ptr(), 1, left.as_millis().clamp(1, 100) as c_int) };
            }
        }
        if !tx.plain_tcp && tx.push.is_none() {
            // Writing: stop at our tail; the peer reads the ring up to it, then our TCP bytes.
            if self.side == Side::Connector && !tx.switched && self.claim_seen.load(Ordering::Acquire) {
                self.switch_now(&mut tx);
            }
            if let Ok(c) = tx.w.ctrl(region) {
                let _ = tx.w.state().adopt_published_tail(&c);
            }
            // Another process of ours (a fork) may have switched and written the ring.
            let switched = tx.switched || tcp::switch_offset(region).ok().flatten().is_some();
            let tail = if switched { tx.w.state().tail() } else { 0 };
            let _ = tcp::store_tx_stop(region, me, tail);
            // One last wakeup so that a peer sleeping on this connection looks: counted
            // now, sent once everything below is published (a peer woken earlier could go
            // back to sleep before our stop indices are there).
            final_wake = switched && tcp::reserve_wake(region, me).unwrap_or(false);
            tx.plain_tcp = true;
            self.tx_handed.store(true, Ordering::Release);
        }
        let _ = tcp::freeze_wakes(region, me);
        // Reading: stop at our head; the peer sends what we did not read over TCP, after
        // its wakeup bytes, whose count is final from here. A peer whose FIN has arrived
        // writes nothing more and may never follow (it closed): unless this process is
        // leaving the connection, it reads that ring to the end itself first (the stop is
        // the peer's final producer index), and its reads reach TCP after that.
        self.note_hangup(fd);
        let peer_done = self.eof.load(Ordering::Acquire);
        let stop = match rx.r.ctrl(region) {
            Ok(c) => {
                let _ = rx.r.state().adopt_published_head(&c);
                let head = rx.r.state().head();
                match rx.r.state().available(&c, u64::MAX) {
                    Ok(n) if peer_done && how != Handback::Leaving => head + n,
                    Ok(n) if peer_done && n > 0 => {
                        crate::decision!(
                            "handback ({why}): {n} byte(s) the peer wrote into shared memory before it closed are still unread and cannot follow this process"
                        );
                        head
                    }
                    _ => head,
                }
            }
            Err(_) => rx.r.state().head(),
        };
        let _ = tcp::freeze_wakes(region, peer);
        let _ = tcp::store_rx_stop(region, me, stop);
        if final_wake {
            // SAFETY: sending one byte from a local.
            let r = unsafe {
                crate::real::send(fd, [0u8].as_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if r == 1 {
                count(&COUNTERS.doorbells, 1);
            }
            let _ = tcp::wake_sent(region, me);
            // What we wrote into the ring and the peer has not read yet: give it a moment to
            // read it, or to stop reading too (it hands back as well), in which case we send
            // it over TCP ourselves, before anything the program writes from now on.
            self.settle_ring_remainder(&mut tx, fd, if now { WAIT / 10 } else { WAIT / 2 });
        }
        count(&COUNTERS.handbacks, 1);
        crate::decision!("connection handed back to TCP: {why}");
        if now && unread_first == 0 && rx.r.state().head() >= stop {
            loop {
                let ahead = self.wakes_ahead();
                if ahead == 0 {
                    break;
                }
                if self.take_wakes(fd, ahead) > 0 {
                    continue;
                }
                if self.eof.load(Ordering::Acquire) || self.has_error() {
                    break;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    crate::decision!("handback: {ahead} wakeup byte(s) of the peer did not arrive");
                    break;
                }
                let mut p = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
                // SAFETY: a local pollfd array of length 1.
                unsafe { crate::real::poll(p.as_mut_ptr(), 1, left.as_millis().clamp(1, 100) as c_int) };
            }
            rx.plain_tcp = true;
            self.rx_handed.store(true, Ordering::Release);
        }
        drop((side_tx, side_rx));
        drop(tx);
        drop(rx);
        self.finish_handback(fd);
        // The other end in this very process (a program that talks to itself): it follows
        // now, as it may not touch the connection before this end waits on it (a parent
        // that only waits for the child it forked to exec a shell on this end). Where this
        // process is leaving, what that end must push goes out before it leaves.
        for (pfd, pc) in crate::table::conns() {
            if !std::ptr::eq(&*pc, self)
                && pc.side != self.side
                && self.region_ino != 0
                && pc.region_ino == self.region_ino
            {
                pc.progress(pfd);
                if how == Handback::Leaving {
                    pc.push_before_close(pfd);
                }
            }
        }
        true
    }

    /// Takes note of what the kernel reported on the TCP socket (after `poll`/`epoll`);
    /// `hangup`: it reported a FIN, hang-up or error.
    pub fn absorb(&self, fd: c_int, hangup: bool) {
        self.events.fetch_add(1, Ordering::Relaxed);
        let mut rx = lock(&self.rx);
        let side = self.side_lock(tcp::Lock::Rx);
        match self.rx_mode(&mut rx) {
            Ok(RxMode::Ring) => self.drain(&rx, fd),
            Ok(RxMode::Tcp { .. }) => {
                use rustix::net::RecvFlags;
                let mut b = [0u8; 1];
                match rustix::net::recv(borrow(fd), &mut b[..], RecvFlags::DONTWAIT | RecvFlags::PEEK) {
                    Ok((0, _)) => self.eof.store(true, Ordering::Release),
                    Ok(_) => {
                        if self.side == Side::Connector && self.claimed() {
                            self.drain(&rx, fd);
                        } else {
                            if self.side == Side::Connector {
                                if tcp::claimed(self.region()).unwrap_or(false) {
                                    // Claimed, but the proof went to another process of ours.
                                    self.unverified_claim.store(true, Ordering::Release);
                                } else {
                                    // The claim is queued before any byte the claiming side sends.
                                    self.become_plain("the listener sent data without claiming the channel");
                                }
                            }
                            rx.tcp_data = true;
                        }
                    }
                    Err(rustix::io::Errno::AGAIN) => rx.tcp_data = false,
                    Err(e) => self.set_error(e.raw_os_error()),
                }
            }
            Ok(RxMode::Skip(n)) => {
                self.take_wakes(fd, n);
            }
            Ok(RxMode::Plain) | Err(_) => {}
        }
        drop(side);
        drop(rx);
        if hangup {
            // The FIN or reset may sit behind the wakeup bytes just taken; an edge-triggered
            // registration reports it only this once.
            self.note_hangup(fd);
        }
        self.progress(fd);
    }

    /// Whether the kernel has something to read on `fd` (data, EOF or an error).
    fn kernel_readable(fd: c_int) -> bool {
        let mut p = [libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 }];
        // SAFETY: a local pollfd array of length 1.
        unsafe { crate::real::poll(p.as_mut_ptr(), 1, 0) == 1 }
    }

    /// Readable as the program would see it: data, EOF or an error is there.
    pub fn readable(&self, fd: c_int) -> bool {
        if self.eof.load(Ordering::Acquire)
            || self.error.load(Ordering::Relaxed) != 0
            || self.shut_rd.load(Ordering::Relaxed)
        {
            return true;
        }
        let mut rx = lock(&self.rx);
        match self.rx_mode(&mut rx) {
            Ok(RxMode::Ring) => {
                // What the kernel reported before the switch was data up to the switch
                // point (read since) or wakeups: it says nothing about the ring.
                rx.tcp_data = false;
                rx.r.available(self.region()).map(|n| n > 0).unwrap_or(true)
            }
            Ok(RxMode::Tcp { .. }) => rx.tcp_data,
            Ok(RxMode::Skip(n)) => {
                // Readable once the wakeup bytes are off and data (or EOF) follows them.
                self.take_wakes(fd, n);
                self.wakes_ahead() == 0 && Self::kernel_readable(fd)
            }
            Ok(RxMode::Plain) => Self::kernel_readable(fd),
            Err(_) => true,
        }
    }

    /// Data is in the ring now (cheap: for polling loops).
    pub fn ring_has_data(&self) -> bool {
        // A broken ring counts as ready: the next read reports the error.
        match self.ring_bytes() {
            Some(Ok(n)) => n > 0,
            Some(Err(_)) => true,
            None => false,
        }
    }

    /// Says in shared memory, just before this side's FIN goes out over TCP (`shutdown` for
    /// writing, the last `close`), that it is coming: the ring's producer-closed flag, which a
    /// peer waiting in `epoll`/`poll` takes as a reason to ask the kernel at once (the FIN,
    /// and `EPOLLRDHUP`, are the kernel's news) instead of at its next fairness turn.
    pub fn announce_fin(&self) {
        let tx = lock(&self.tx);
        if !tx.switched || tx.plain_tcp {
            return;
        }
        if let Ok(c) = tx.w.ctrl(self.region()) {
            use ivcom_ring::ring::Ctrl;
            c.store_producer_closed(1);
        }
    }

    /// The peer announced its FIN ([`TcpConn::announce_fin`]) and it has not been seen yet.
    pub fn peer_fin_pending(&self) -> bool {
        if self.eof.load(Ordering::Acquire) || self.is_plain() {
            return false;
        }
        let rx = lock(&self.rx);
        match rx.r.ctrl(self.region()) {
            Ok(c) => {
                use ivcom_ring::ring::Ctrl;
                c.load_producer_closed() != 0
            }
            Err(_) => false,
        }
    }

    /// Bytes waiting in the ring; `None` while data still comes over TCP.
    fn ring_bytes(&self) -> Option<Result<u64, ivcom_ring::RingError>> {
        let mut rx = lock(&self.rx);
        match self.rx_mode(&mut rx) {
            Ok(RxMode::Ring) => Some(rx.r.available(self.region())),
            _ => None,
        }
    }

    /// Whether the peer sleeps waiting to read with nothing of ours left to read: it is busy
    /// elsewhere or idle, so an answer from it is not near (a hint for the polling budget;
    /// read from peer-writable memory, never trusted for more).
    pub fn peer_asleep(&self) -> bool {
        let mut tx = lock(&self.tx);
        if !tx.switched || tx.plain_tcp {
            return false;
        }
        let region = self.region();
        match tx.w.ctrl(region) {
            Ok(c) => {
                use ivcom_ring::ring::Ctrl;
                c.load_consumer_sleep() & 1 == 1
                    && tx.w.state().refresh_head(&c).is_ok()
                    && tx.w.state().unconsumed() == 0
            }
            Err(_) => false,
        }
    }

    /// The bytes in the ring to read (`read`) or free in it to write, as the next threshold
    /// to wait for: one more than now (a change), or 1 when the ring is not in use.
    pub fn next_at(&self, read: bool) -> u64 {
        if read {
            match self.ring_bytes() {
                Some(Ok(n)) => n.saturating_add(1),
                _ => 1,
            }
        } else {
            if self.tx_on_tcp() {
                return 1;
            }
            let mut tx = lock(&self.tx);
            let region = self.region();
            match tx.w.ctrl(region) {
                Ok(c) => tx.w.state().free(&c, 1).map_or(1, |f| f.saturating_add(1)),
                Err(_) => 1,
            }
        }
    }

    /// Readiness as the program would see it from TCP, for the directions it asks about.
    pub fn readiness(&self, fd: c_int, want_in: bool, want_out: bool) -> Readiness {
        self.progress(fd);
        Readiness {
            readable: want_in && self.readable(fd),
            writable: want_out && self.writable(|| crate::wait::kernel_writable(fd)),
            peer_closed: self.peer_closed(),
            hangup: (self.peer_closed() && self.write_shut())
                || self.has_error()
                || self.reset_seen.load(Ordering::Relaxed),
            error: self.has_error() && !self.error_reported.load(Ordering::Relaxed),
        }
    }

    /// Writable as the program would see it. `kernel_out`: what the kernel says about TCP
    /// writability (used while writes still go over TCP).
    pub fn writable(&self, kernel_out: impl FnOnce() -> bool) -> bool {
        if self.error.load(Ordering::Relaxed) != 0 || self.shut_wr.load(Ordering::Relaxed) {
            return true;
        }
        if self.tx_on_tcp() {
            return kernel_out();
        }
        let mut tx = lock(&self.tx);
        let region = self.region();
        match tx.w.ctrl(region) {
            Ok(c) => tx.w.state().free(&c, 1).map(|f| f > 0).unwrap_or(true),
            Err(_) => true,
        }
    }

    /// EOF from the peer has been seen.
    pub fn peer_closed(&self) -> bool {
        self.eof.load(Ordering::Acquire)
    }

    /// A TCP error has been seen.
    pub fn has_error(&self) -> bool {
        self.error.load(Ordering::Relaxed) != 0
    }

    /// This side shut down writing.
    pub fn write_shut(&self) -> bool {
        self.shut_wr.load(Ordering::Relaxed)
    }

    /// Changes whenever new input may have arrived (for edge-triggered readiness).
    pub fn in_signature(&self) -> u64 {
        let mut rx = lock(&self.rx);
        let avail = rx.r.available(self.region()).unwrap_or(0);
        self.events.load(Ordering::Relaxed).wrapping_add(rx.r.state().head().wrapping_add(avail) << 20)
    }

    /// Changes whenever space may have been freed (for edge-triggered readiness).
    pub fn out_signature(&self) -> u64 {
        let mut tx = lock(&self.tx);
        let region = self.region();
        let head = match tx.w.ctrl(region) {
            Ok(c) => {
                let _ = tx.w.state().refresh_head(&c);
                tx.w.state().consumed()
            }
            Err(_) => 0,
        };
        self.events.load(Ordering::Relaxed).wrapping_add(head << 20)
    }

    /// Announces that this process will sleep waiting to read (or to write) until at least
    /// `at` bytes (1 or more) are in the ring (or free in it), and re-checks. Returns `false`
    /// if it should not sleep after all. Pair every `true` with [`TcpConn::disarm`].
    pub fn arm(&self, read: bool, at: u64) -> bool {
        let at = at.max(1);
        let ok = if read {
            let mut rx = lock(&self.rx);
            let _w = lock(&self.wake_lock);
            self.sleepers.fetch_add(1, Ordering::Relaxed);
            let region = self.region();
            match rx.r.ctrl(region) {
                Ok(c) if rx.sleepers == 0 => {
                    // Several processes reading one connection share one announcement:
                    // counted, and renewed by each (see `disarm`), under their side lock.
                    let _side = self.side_lock(tcp::Lock::Rx);
                    if _side.is_some() {
                        rx.r.state().renew_sleep(&c, true);
                    }
                    // Announce even while data still comes over TCP: the peer may switch.
                    if rx.r.state().prepare_sleep(&c, at).unwrap_or(false) {
                        rx.sleepers = 1;
                        if _side.is_some() {
                            let _ = tcp::rx_sleepers_enter(region, self.me());
                            rx.counted_sleep = true;
                        }
                        true
                    } else {
                        if _side.is_some() && tcp::rx_sleepers(region, self.me()).unwrap_or(0) > 0 {
                            // Data is there, but the announcement is the others' too.
                            rx.r.state().renew_sleep(&c, false);
                        }
                        false
                    }
                }
                Ok(c) => {
                    if rx.r.state().available(&c, at).map(|n| n < at).unwrap_or(false) {
                        rx.sleepers += 1;
                        true
                    } else {
                        false
                    }
                }
                Err(_) => false,
            }
        } else {
            let mut tx = lock(&self.tx);
            let _w = lock(&self.wake_lock);
            self.sleepers.fetch_add(1, Ordering::Relaxed);
            if !tx.switched {
                tx.sleepers += 1;
                true
            } else {
                let region = self.region();
                let sleep = match tx.w.ctrl(region) {
                    Ok(c) if tx.sleepers == 0 => tx.w.state().prepare_sleep(&c, at).unwrap_or(false),
                    Ok(c) => tx.w.state().free(&c, at).map(|n| n < at).unwrap_or(false),
                    Err(_) => false,
                };
                if sleep {
                    tx.sleepers += 1;
                }
                sleep
            }
        };
        if !ok {
            self.sleepers.fetch_sub(1, Ordering::Relaxed);
        }
        ok
    }

    /// Withdraws an announcement made by [`TcpConn::arm`].
    pub fn disarm(&self, read: bool) {
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        let region = self.region();
        if read {
            let mut rx = lock(&self.rx);
            rx.sleepers = rx.sleepers.saturating_sub(1);
            if rx.sleepers == 0 {
                if let Ok(c) = rx.r.ctrl(region) {
                    let _side = if rx.counted_sleep { self.side_lock(tcp::Lock::Rx) } else { None };
                    let others = if std::mem::take(&mut rx.counted_sleep) {
                        tcp::rx_sleepers_leave(region, self.me()).unwrap_or(0)
                    } else {
                        0
                    };
                    if others > 0 {
                        // Another process of this side still sleeps, perhaps on a wakeup this
                        // one took: announce afresh for it rather than withdraw.
                        rx.r.state().renew_sleep(&c, false);
                    } else {
                        let _ = rx.r.state().end_sleep(&c);
                    }
                }
            }
        } else {
            let mut tx = lock(&self.tx);
            tx.sleepers = tx.sleepers.saturating_sub(1);
            if tx.sleepers == 0 && tx.switched {
                if let Ok(c) = tx.w.ctrl(region) {
                    let _ = tx.w.state().end_sleep(&c);
                }
            }
        }
    }

    /// More than one thread of this process waits on this connection (a wakeup one of them
    /// takes off TCP may be the other's, so sleeps are kept short).
    pub fn crowded(&self) -> bool {
        self.sleepers.load(Ordering::Relaxed) > 1
    }

    /// `shutdown(2)` bookkeeping (the caller also shuts the TCP socket down).
    pub fn shutdown(&self, how: c_int) {
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            self.shut_rd.store(true, Ordering::Relaxed);
        }
        if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
            self.shut_wr.store(true, Ordering::Relaxed);
        }
    }

    /// Bytes ready to read (`FIONREAD`).
    pub fn pending_bytes(&self, fd: c_int) -> usize {
        let mut rx = lock(&self.rx);
        match self.rx_mode(&mut rx) {
            Ok(RxMode::Ring) => rx.r.available(self.region()).unwrap_or(0) as usize,
            Ok(RxMode::Tcp { limit }) => {
                let mut n: c_int = 0;
                // SAFETY: FIONREAD writes one int.
                unsafe { crate::real::ioctl(fd, libc::FIONREAD, std::ptr::addr_of_mut!(n).cast()) };
                let n = n.max(0) as u64;
                match limit {
                    // Every byte before the switch point is here: what the ring holds follows
                    // them (over TCP it would all be in the socket).
                    Some(l) if n >= l => (l + rx.r.available(self.region()).unwrap_or(0)) as usize,
                    Some(l) => n.min(l) as usize,
                    None => n as usize,
                }
            }
            Ok(RxMode::Skip(_)) => 0,
            Ok(RxMode::Plain) => {
                let mut n: c_int = 0;
                // SAFETY: FIONREAD writes one int.
                unsafe { crate::real::ioctl(fd, libc::FIONREAD, std::ptr::addr_of_mut!(n).cast()) };
                n.max(0) as usize
            }
            Err(_) => 0,
        }
    }
}
