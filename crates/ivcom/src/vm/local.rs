//! The process side of the agent protocol: listening, accepting and connecting through the
//! agent, and turning a `CHANNEL` packet and its descriptors into a channel whose data path
//! is direct.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use ivcom_ring::layout::{self, Direction};

use super::wire::{Channel, Packet, MAX_PACKET};
use crate::conn::{Conn, ConnParts};
use crate::signal::Signal;
use crate::sys::{self, Mapping};

fn agent_unreachable(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot reach the ivcom agent at {} ({e}); is `ivcom agent` running?", path.display()),
    )
}

/// Connects to the agent socket at `agent` and checks who serves it: only an agent of our own
/// effective uid or of root is trusted with our channels (`SO_PEERCRED`), so a socket
/// another user put where we look (a stale `IVCOM_AGENT`, a directory they control) gets
/// nothing from us. Errors: `PermissionDenied` naming the socket and its server's uid.
fn connect_agent(agent: &Path) -> io::Result<OwnedFd> {
    let sock = sys::connect_seqpacket(agent).map_err(|e| agent_unreachable(agent, e))?;
    let cred = sys::peer_cred(sock.as_fd())?;
    let (uid, me) = (cred.uid.as_raw(), sys::euid());
    if uid != 0 && uid != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the agent socket {} is served by uid {uid} (pid {}), neither root nor our uid {me}; refusing to use it",
                agent.display(),
                cred.pid.as_raw_nonzero()
            ),
        ));
    }
    Ok(sock)
}

fn recv(sock: BorrowedFd<'_>) -> io::Result<(Packet, Vec<OwnedFd>)> {
    let mut buf = [0u8; MAX_PACKET];
    let (n, fds) = sys::recv_packet(sock, &mut buf).map_err(|e| {
        if e.kind() == io::ErrorKind::ConnectionReset {
            io::Error::new(
                e.kind(),
                "the ivcom agent reset the connection (an agent whose --access does not admit this uid does that; its log says)",
            )
        } else {
            e
        }
    })?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the ivcom agent closed the connection",
        ));
    }
    Ok((Packet::decode(&buf[..n])?, fds))
}

/// Sends a request. An agent that does not admit this process answers with `ERROR` and
/// closes at once, so the send may find the connection gone: that answer is then the error.
fn send_request(sock: BorrowedFd<'_>, p: &Packet) -> io::Result<()> {
    match sys::send_packet(sock, &p.encode(), &[]) {
        Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
            match recv(sock) {
                Ok((Packet::Error { errno, message }, _)) => Err(error_of(errno, message)),
                _ => Err(e),
            }
        }
        r => r,
    }
}

fn error_of(errno: i32, message: String) -> io::Error {
    let kind = io::Error::from_raw_os_error(errno).kind();
    io::Error::new(kind, message)
}

/// Asks the agent at `agent` to listen on `name`; the returned socket then carries one
/// `CHANNEL` per accepted connection.
pub(crate) fn bind(agent: &Path, name: &str, timeout: Duration) -> io::Result<OwnedFd> {
    let sock = connect_agent(agent)?;
    sys::set_timeouts(sock.as_fd(), Some(timeout))?;
    send_request(sock.as_fd(), &Packet::Bind { name: name.to_owned() })?;
    match recv(sock.as_fd())?.0 {
        Packet::Ok => {
            sys::set_timeouts(sock.as_fd(), None)?;
            Ok(sock)
        }
        Packet::Error { errno, message } => Err(error_of(errno, message)),
        p => Err(io::Error::new(io::ErrorKind::InvalidData, format!("agent answered {p:?} to a bind"))),
    }
}

/// Waits for the next connection on a socket [`bind`] returned.
pub(crate) fn accept(sock: BorrowedFd<'_>, spin: Duration) -> io::Result<Conn> {
    match recv(sock)? {
        (Packet::Channel(c), fds) => conn(c, fds, spin),
        (Packet::Error { errno, message }, _) => Err(error_of(errno, message)),
        (p, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("agent sent {p:?} to a listener"))),
    }
}

/// Connects to the listener `name` anywhere in the region through the agent at `agent`.
pub(crate) fn connect(agent: &Path, name: &str, timeout: Duration, spin: Duration) -> io::Result<Conn> {
    let sock = connect_agent(agent)?;
    // The agent answers by the deadline we give it; the socket timeout is a backstop.
    sys::set_timeouts(sock.as_fd(), Some(timeout + Duration::from_secs(2)))?;
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    send_request(sock.as_fd(), &Packet::Connect { timeout_ms, name: name.to_owned() })?;
    match recv(sock.as_fd())? {
        (Packet::Channel(c), fds) => conn(c, fds, spin),
        (Packet::Error { errno, message }, _) => Err(error_of(errno, message)),
        (p, _) => {
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("agent answered {p:?} to a connect")))
        }
    }
}

fn doorbell(c: &Channel, fd: Option<OwnedFd>) -> io::Result<Signal> {
    let Some(fd) = fd else { return Ok(Signal::Nothing) };
    let s = match c.doorbell_kind {
        0 => Signal::EventFd(fd),
        1 => Signal::Pwrite { fd, offset: c.doorbell_offset, value: c.doorbell_value },
        _ => {
            let map_offset = c.doorbell_offset & !4095;
            let len = usize::try_from(c.doorbell_map_len).map_err(|_| bad("doorbell mapping too large"))?;
            let map = Mapping::map(fd.as_fd(), map_offset, len)?;
            Signal::Mmio { map, reg: (c.doorbell_offset - map_offset) as usize, value: c.doorbell_value }
        }
    };
    s.check()?;
    Ok(s)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("agent's channel: {what}"))
}

fn conn(c: Channel, fds: Vec<OwnedFd>, spin: Duration) -> io::Result<Conn> {
    let want = if c.doorbell_kind == 3 { 4 } else { 5 };
    if fds.len() != want {
        return Err(bad(&format!("{} descriptors instead of {want}", fds.len())));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted");
    let (mem, ctrl, own_rx, own_tx) = (next(), next(), next(), next());
    let door = if want == 5 { Some(next()) } else { None };
    sys::check_eventfd(own_rx.as_fd())?;
    sys::check_eventfd(own_tx.as_fd())?;
    let len = usize::try_from(c.mem_len).map_err(|_| bad("slot too large"))?;
    let map = Mapping::map(mem.as_fd(), c.mem_offset, len)?;
    let params = layout::validate_shape(map.region(), false)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("channel slot: {e}")))?;
    let (rx, tx) = if c.listener_side {
        (Direction::ToListener, Direction::ToConnector)
    } else {
        (Direction::ToConnector, Direction::ToListener)
    };
    let door2 = door.as_ref().map(OwnedFd::try_clone).transpose()?;
    Conn::new(ConnParts {
        map,
        ctrl,
        own_rx,
        own_tx,
        peer_rx: doorbell(&c, door)?,
        peer_tx: doorbell(&c, door2)?,
        rx_geom: params.ring(rx),
        tx_geom: params.ring(tx),
        max_message: None,
        spin,
        listener_file: None,
    })
}
