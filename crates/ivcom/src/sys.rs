//! Platform calls, in one place (also used by the preload library): memfd regions, mappings,
//! eventfds, waiting, Unix seqpacket sockets with descriptor passing, peer credentials,
//! directory locks.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::event::{eventfd, EventfdFlags, Timespec};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

pub use ivcom_ring::shm::{check_memfd, create_memfd};

/// A shared mapping of (part of) a file; unmapped on drop.
pub use ivcom_ring::MappedRegion as Mapping;

/// A new non-blocking eventfd.
pub fn new_eventfd() -> io::Result<OwnedFd> {
    Ok(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

/// Checks that a descriptor received from a peer is an eventfd (so signalling it can neither
/// block nor write into a file), and makes it non-blocking.
pub fn check_eventfd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer sent {} where an eventfd was expected", link.display()),
        ));
    }
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Adds one to an eventfd. A full counter (EAGAIN) already means "signalled".
#[inline]
pub fn signal(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Resets an eventfd to zero (non-blocking).
#[inline]
pub fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd, &mut buf);
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The eventfd was signalled.
    Signalled,
    /// The control socket has an event: the peer closed it or sent something.
    Control,
    /// The timeout passed.
    TimedOut,
}

/// The set a sleeper waits on: its eventfd edge-triggered, so that every signal wakes one
/// wait and the counter never needs draining (one system call per sleep), and the control
/// socket level-triggered, so that a dead peer keeps waking it.
pub fn sleep_set(efd: BorrowedFd<'_>, ctrl: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::event::epoll;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(&ep, efd, epoll::EventData::new_u64(0), epoll::EventFlags::IN | epoll::EventFlags::ET)?;
    epoll::add(&ep, ctrl, epoll::EventData::new_u64(1), epoll::EventFlags::IN | epoll::EventFlags::RDHUP)?;
    Ok(ep)
}

/// Sleeps on a [`sleep_set`] until its eventfd is signalled, the control socket has an
/// event, or `timeout` passes.
pub fn wait(set: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<Woken> {
    use rustix::event::epoll;
    let ts = timeout.map(|t| Timespec { tv_sec: t.as_secs() as i64, tv_nsec: t.subsec_nanos() as i64 });
    let mut buf = [MaybeUninit::<epoll::Event>::uninit(); 2];
    loop {
        match epoll::wait(set, &mut buf, ts.as_ref()) {
            Ok(([], _)) => return Ok(Woken::TimedOut),
            Ok((events, _)) => {
                let control = events.iter().any(|e| e.data.u64() == 1);
                return Ok(if control { Woken::Control } else { Woken::Signalled });
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// State of the control socket, checked without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Open, nothing pending.
    Alive,
    /// The peer closed its end (it exited, was killed, or dropped the connection).
    Closed,
    /// The peer sent data, which it never does after the handshake.
    Violated,
}

/// Checks the control socket without blocking.
pub fn liveness(ctrl: BorrowedFd<'_>) -> Liveness {
    let mut b = [MaybeUninit::<u8>::uninit(); 1];
    match rustix::net::recv(ctrl, &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((_, 0)) => Liveness::Closed,
        Ok(_) => Liveness::Violated,
        Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Liveness::Alive,
        Err(_) => Liveness::Closed,
    }
}

/// Whether a freshly connected socket is reset (its listener went away) within `t`, rather
/// than answered or left waiting.
pub fn reset_within(sock: BorrowedFd<'_>, t: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let ts = Timespec { tv_sec: t.as_secs() as i64, tv_nsec: t.subsec_nanos() as i64 };
    let mut fds = [PollFd::new(&sock, PollFlags::IN | PollFlags::RDHUP)];
    match poll(&mut fds, Some(&ts)) {
        Ok(1) => {
            // Reset without a word, or hung up with nothing but the end of stream to read.
            let r = fds[0].revents();
            let hung_up = r.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::RDHUP);
            !r.contains(PollFlags::IN) || (hung_up && liveness(sock) == Liveness::Closed)
        }
        _ => false,
    }
}

/// An epoll instance watching `fds` for input: a single descriptor that polls readable when
/// any of them is.
pub fn epoll_of(fds: &[BorrowedFd<'_>]) -> io::Result<OwnedFd> {
    use rustix::event::epoll;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    for (i, fd) in fds.iter().enumerate() {
        epoll::add(&ep, fd, epoll::EventData::new_u64(i as u64), epoll::EventFlags::IN)?;
    }
    Ok(ep)
}

fn unix_addr(path: &Path) -> io::Result<SocketAddrUnix> {
    SocketAddrUnix::new(path).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is unusable: {e}", path.display()),
        )
    })
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?)
}

/// Binds a listening seqpacket socket at `path`.
pub fn bind_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    rustix::net::bind(&fd, &unix_addr(path)?)?;
    rustix::net::listen(&fd, 128)?;
    Ok(fd)
}

/// Connects a seqpacket socket to `path`.
pub fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    loop {
        match rustix::net::connect(&fd, &unix_addr(path)?) {
            Ok(()) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Binds a listening seqpacket socket at `addr` (for example a [`crate::rundir::RuntimeDir`]
/// address, which reaches the directory through its descriptor).
pub fn bind_seqpacket_at(addr: &SocketAddrUnix) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    rustix::net::bind(&fd, addr)?;
    rustix::net::listen(&fd, 128)?;
    Ok(fd)
}

/// Connects a seqpacket socket to `addr`.
pub fn connect_seqpacket_at(addr: &SocketAddrUnix) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    loop {
        match rustix::net::connect(&fd, addr) {
            Ok(()) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Accepts one connection.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    loop {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets the receive and send timeouts of a socket.
pub fn set_timeouts(fd: BorrowedFd<'_>, t: Option<Duration>) -> io::Result<()> {
    use rustix::net::sockopt::{set_socket_timeout, Timeout};
    set_socket_timeout(fd, Timeout::Recv, t)?;
    set_socket_timeout(fd, Timeout::Send, t)?;
    Ok(())
}

/// A connected pair of seqpacket sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?)
}

/// Most descriptors one handshake message carries.
pub const MAX_FDS: usize = 5;

/// Sends one packet with `fds` attached.
pub fn send_packet(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors for one packet"));
    }
    let iov = [io::IoSlice::new(data)];
    loop {
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short handshake send")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one packet into `buf`, with up to [`MAX_FDS`] descriptors. Returns the packet
/// length (0 when the peer closed) and the descriptors; a truncated packet is an error.
pub fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.flags.intersects(rustix::net::ReturnFlags::TRUNC | rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "oversized handshake packet from peer"));
    }
    Ok((msg.bytes, fds))
}

/// Credentials of the process at the other end of a Unix socket.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<rustix::net::UCred> {
    Ok(rustix::net::sockopt::socket_peercred(sock)?)
}

/// An exclusive `flock` on a directory, released on drop. Serialises the check-and-replace of
/// stale socket files among ivcom processes without creating any file. Anyone who can open the
/// directory can hold the same lock, so taking it is always bounded by a timeout.
#[derive(Debug)]
pub struct DirLock {
    _fd: OwnedFd,
}

/// How long ivcom waits for a runtime directory's lock before giving up.
pub const DIR_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest sleep between two attempts to take a [`DirLock`].
const LOCK_RETRY_MAX: Duration = Duration::from_millis(20);

impl DirLock {
    /// Locks `dir` (opened without following a final symlink), waiting at most
    /// [`DIR_LOCK_TIMEOUT`].
    pub fn acquire(dir: &Path) -> io::Result<Self> {
        use rustix::fs::{open, Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = open(dir, flags, Mode::empty())?;
        Self::acquire_fd(fd, DIR_LOCK_TIMEOUT, dir)
    }

    /// Locks the directory open at `fd` (a fresh open of it: `flock` locks belong to the open
    /// file description), retrying `LOCK_EX | LOCK_NB` until `timeout` has passed. `dir` names
    /// it in errors. Errors: `TimedOut` when another process held it all along.
    pub fn acquire_fd(fd: OwnedFd, timeout: Duration, dir: &Path) -> io::Result<Self> {
        use rustix::fs::FlockOperation;
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = Duration::from_micros(200);
        loop {
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Self { _fd: fd }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "runtime directory {} stayed locked by another process for {timeout:?}; \
                                 whoever holds the lock can open the directory: check who (`fuser -v {}`)",
                                dir.display(),
                                dir.display()
                            ),
                        ));
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(LOCK_RETRY_MAX);
                }
                Err(e) => {
                    let e = io::Error::from(e);
                    return Err(io::Error::new(e.kind(), format!("cannot lock {}: {e}", dir.display())));
                }
            }
        }
    }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}
