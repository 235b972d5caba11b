//! A client of the ivshmem-server protocol, written from QEMU's spec (see [`crate::protocol`]).
//!
//! QEMU's ivshmem-doorbell device is one such client; a host process joins a region as a peer
//! through [`Client`]: it gets its peer id, the shared memory, the eventfds that interrupt every
//! other peer, and its own eventfds that other peers interrupt. Later joins and departures come
//! as [`PeerEvent`]s from [`Client::poll_events`], which never blocks; the client is an
//! [`AsFd`] that polls readable when there may be news.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ivcom_ring::MappedRegion;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::protocol::{
    Message, MessageReader, ReadError, ReadOutcome, PROTOCOL_VERSION, REFUSAL, SHM_MESSAGE,
};

/// How long [`Client::connect`] waits for more of its own vectors once they started coming and
/// nothing tells it how many there are (no other peer was connected to count from).
const SETTLE: Duration = Duration::from_millis(50);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the server's socket failed.
    #[error("cannot connect to the ivshmem server at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Reading from the server failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A socket or descriptor operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The server speaks another protocol version.
    #[error("the ivshmem server speaks protocol version {got}, this client speaks {PROTOCOL_VERSION}")]
    Version {
        /// The version the server sent.
        got: i64,
    },
    /// The server broke the protocol.
    #[error("ivshmem protocol violation by the server: {0}")]
    Protocol(String),
    /// The process serving the socket is neither root nor of our own uid (`SO_PEERCRED`):
    /// whoever it is could hand us any memory and doorbells, so nothing is read from it.
    #[error("{path} is served by uid {uid} (pid {pid}), neither root nor this process's uid {own}; refusing to use it")]
    Untrusted {
        /// Socket path.
        path: PathBuf,
        /// The serving process's uid.
        uid: u32,
        /// Its pid (0 when it is in another pid namespace).
        pid: i32,
        /// Our effective uid.
        own: u32,
    },
    /// The server refused the connection (it sent [`REFUSAL`] instead of the version; the
    /// ivcom daemon does this when the member is connected already, when the connecting
    /// process's credentials are not the member's binding, and when no peer id is free).
    #[error("the ivshmem server refused the connection (the member is connected already, this process's uid/gid is not the member's, or no peer id is free: the daemon's log says which)")]
    Refused,
    /// The setup did not finish in time.
    #[error("the ivshmem server did not finish the setup within {0:?}")]
    Timeout(Duration),
    /// The server closed the connection.
    #[error("the ivshmem server closed the connection")]
    Closed,
    /// No such peer or vector to ring.
    #[error("cannot ring peer {peer} vector {vector}: no such peer or vector")]
    NoSuchVector {
        /// Peer id.
        peer: u16,
        /// Vector.
        vector: usize,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// Something that happened to the other peers after [`Client::connect`] returned.
#[derive(Debug)]
pub enum PeerEvent {
    /// A peer connected. `fds` are the caller's own copies of the eventfds that interrupt it
    /// (vector 0 first); the client keeps its own for [`Client::ring`].
    Joined {
        /// Peer id.
        id: u16,
        /// One eventfd per vector.
        fds: Vec<OwnedFd>,
    },
    /// A peer disconnected; its eventfds are closed.
    Left {
        /// Peer id.
        id: u16,
    },
}

/// A connection to an ivshmem server, after the setup messages.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    reader: MessageReader,
    id: u16,
    shm: OwnedFd,
    vectors: Vec<OwnedFd>,
    peers: BTreeMap<u16, Vec<OwnedFd>>,
    /// The peer whose run of connect messages is being received.
    joining: Option<u16>,
    events: VecDeque<PeerEvent>,
    closed: bool,
}

impl Client {
    /// Connects to the server at `path` and receives the setup: version, own id, shared memory,
    /// the other peers' eventfds and its own.
    ///
    /// The spec does not say how many vectors there are. When another peer is already
    /// connected its run of messages gives the number; otherwise this waits for own-vector
    /// messages until none came for a short while (50 ms). Own-vector messages that come later
    /// still are taken by [`Client::poll_events`]. Use [`Client::connect_with_vectors`] when
    /// the number is known.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_inner(path, None, timeout)
    }

    /// Like [`Client::connect`], for a server known to hand out `vectors` vectors per peer:
    /// returns as soon as that many of its own eventfds arrived.
    pub fn connect_with_vectors(path: &Path, vectors: usize, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_inner(path, Some(vectors.max(1)), timeout)
    }

    fn connect_inner(path: &Path, expected: Option<usize>, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        let connect_err = |source: io::Error| ClientError::Connect { path: path.to_owned(), source };
        let sock =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)
                .map_err(|e| connect_err(e.into()))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| connect_err(e.into()))?;
        rustix::net::connect(&sock, &addr).map_err(|e| connect_err(e.into()))?;
        // The server must be the daemon we mean: root, or our own user (a daemon run by us).
        let cred = rustix::net::sockopt::socket_peercred(&sock).map_err(|e| connect_err(e.into()))?;
        let own = rustix::process::geteuid().as_raw();
        if cred.uid.as_raw() != 0 && cred.uid.as_raw() != own {
            return Err(ClientError::Untrusted {
                path: path.to_owned(),
                uid: cred.uid.as_raw(),
                pid: cred.pid.as_raw_nonzero().get(),
                own,
            });
        }
        rustix::io::ioctl_fionbio(&sock, true)
            .map_err(|e| io_err("making the socket non-blocking")(e.into()))?;

        let mut reader = MessageReader::new();
        let version = next_message(&sock, &mut reader, deadline, timeout)?;
        if version.value == REFUSAL && version.fd.is_none() {
            return Err(ClientError::Refused);
        }
        if version.value != PROTOCOL_VERSION {
            return Err(ClientError::Version { got: version.value });
        }
        if version.fd.is_some() {
            return Err(ClientError::Protocol("the version message came with a descriptor".into()));
        }
        let idm = next_message(&sock, &mut reader, deadline, timeout)?;
        let id = match (idm.peer_id(), &idm.fd) {
            (Some(id), None) => id,
            _ => {
                return Err(ClientError::Protocol(format!(
                    "expected the own peer id (0..=65535, no descriptor), got {}{}",
                    idm.value,
                    if idm.fd.is_some() { " with a descriptor" } else { "" }
                )))
            }
        };
        let shm = next_message(&sock, &mut reader, deadline, timeout)?;
        let shm = match (shm.value, shm.fd) {
            (SHM_MESSAGE, Some(fd)) => fd,
            (v, fd) => {
                return Err(ClientError::Protocol(format!(
                    "expected the shared memory message (-1 with a descriptor), got {v}{}",
                    if fd.is_some() { " with a descriptor" } else { " without a descriptor" }
                )))
            }
        };
        let mut client = Client {
            sock,
            reader,
            id,
            shm,
            vectors: Vec::new(),
            peers: BTreeMap::new(),
            joining: None,
            events: VecDeque::new(),
            closed: false,
        };
        // Runs of existing peers, then the own run.
        let mut want = expected;
        loop {
            if let Some(n) = want {
                if client.vectors.len() >= n {
                    break;
                }
            }
            let settling = want.is_none() && !client.vectors.is_empty();
            let limit = if settling { deadline.min(Instant::now() + SETTLE) } else { deadline };
            let msg = match next_message_until(&client.sock, &mut client.reader, limit) {
                Ok(Some(m)) => m,
                Ok(None) if settling => break,
                Ok(None) => return Err(ClientError::Timeout(timeout)),
                Err(e) => return Err(e),
            };
            if client.vectors.is_empty() && msg.value != i64::from(id) {
                // Still the existing peers: the initial state, not events.
                let Some(peer) = msg.peer_id() else {
                    return Err(ClientError::Protocol(format!(
                        "unexpected message {} during setup",
                        msg.value
                    )));
                };
                let Some(fd) = msg.fd else {
                    return Err(ClientError::Protocol(format!(
                        "peer {peer} announced without a descriptor during setup"
                    )));
                };
                client.peers.entry(peer).or_default().push(fd);
                continue;
            }
            if client.vectors.is_empty() && want.is_none() {
                // Every existing peer came with one eventfd per vector: count from them.
                want = client.peers.values().map(Vec::len).max();
            }
            client.handle(msg)?;
        }
        Ok(client)
    }

    /// This client's peer id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The shared memory descriptor.
    pub fn shm(&self) -> BorrowedFd<'_> {
        self.shm.as_fd()
    }

    /// Size of the shared memory in bytes (what QEMU makes BAR2's size).
    pub fn shm_size(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(&self.shm)?.st_size as u64)
    }

    /// Maps the whole shared memory read-write.
    pub fn map_shm(&self) -> io::Result<MappedRegion> {
        let len = usize::try_from(self.shm_size()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "shared memory size out of range"))?;
        MappedRegion::map(self.shm.as_fd(), 0, len)
    }

    /// The eventfds this client is interrupted on, vector 0 first.
    pub fn vectors(&self) -> &[OwnedFd] {
        &self.vectors
    }

    /// The other connected peers and the eventfds that interrupt them, vector 0 first.
    pub fn peers(&self) -> &BTreeMap<u16, Vec<OwnedFd>> {
        &self.peers
    }

    /// Rings `peer` on `vector` (writes 1 to its eventfd). Ringing the own id interrupts this
    /// client itself.
    pub fn ring(&self, peer: u16, vector: usize) -> Result<(), ClientError> {
        let fds = if peer == self.id { Some(&self.vectors) } else { self.peers.get(&peer) };
        let fd = fds.and_then(|f| f.get(vector)).ok_or(ClientError::NoSuchVector { peer, vector })?;
        write_eventfd(fd.as_fd()).map_err(io_err("ringing a peer"))
    }

    /// Waits up to `timeout` for an interrupt on the own `vector` and consumes it; returns how
    /// many rings were pending, or `None` if none came in time.
    pub fn wait_interrupt(&self, vector: usize, timeout: Duration) -> Result<Option<u64>, ClientError> {
        let fd = self.vectors.get(vector).ok_or(ClientError::NoSuchVector { peer: self.id, vector })?;
        let deadline = Instant::now() + timeout;
        loop {
            if !poll_readable(fd.as_fd(), deadline).map_err(io_err("waiting for an interrupt"))? {
                return Ok(None);
            }
            let mut buf = [0u8; 8];
            match rustix::io::read(fd, &mut buf) {
                Ok(8) => return Ok(Some(u64::from_ne_bytes(buf))),
                Ok(_) => return Err(ClientError::Protocol("an own vector is not an eventfd".into())),
                // Someone else (another holder of the same eventfd) consumed it first.
                Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
                Err(e) => return Err(io_err("reading an interrupt")(e.into())),
            }
        }
    }

    /// Takes what the server sent since the last call, without blocking: peers that joined or
    /// left (in order). `Err(ClientError::Closed)` once the server closed the connection.
    pub fn poll_events(&mut self) -> Result<Vec<PeerEvent>, ClientError> {
        while !self.closed {
            match self.reader.read(&self.sock)? {
                ReadOutcome::Message(m) => self.handle(m)?,
                ReadOutcome::Incomplete => break,
                ReadOutcome::Closed => {
                    self.closed = true;
                    self.flush_joining();
                }
            }
        }
        let out: Vec<_> = self.events.drain(..).collect();
        if out.is_empty() && self.closed {
            return Err(ClientError::Closed);
        }
        Ok(out)
    }

    /// Waits up to `timeout` for at least one event (a convenience over polling the client's
    /// descriptor and calling [`Client::poll_events`]). Returns an empty list on timeout.
    pub fn wait_events(&mut self, timeout: Duration) -> Result<Vec<PeerEvent>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.poll_events()?;
            if !ev.is_empty() {
                return Ok(ev);
            }
            if !poll_readable(self.sock.as_fd(), deadline).map_err(io_err("waiting for the server"))? {
                return Ok(Vec::new());
            }
        }
    }

    fn flush_joining(&mut self) {
        if let Some(id) = self.joining.take() {
            if let Some(fds) = self.peers.get(&id) {
                let fds = fds.iter().filter_map(|f| f.try_clone().ok()).collect();
                self.events.push_back(PeerEvent::Joined { id, fds });
            }
        }
    }

    /// Interprets one message after the own id and memory arrived.
    fn handle(&mut self, msg: Message) -> Result<(), ClientError> {
        if msg.value == SHM_MESSAGE {
            // QEMU reports this and carries on with the memory it has; so do we.
            tracing::warn!("ivshmem server sent a second shared memory message; ignored");
            return Ok(());
        }
        let Some(peer) = msg.peer_id() else {
            return Err(ClientError::Protocol(format!("invalid message {}", msg.value)));
        };
        if self.joining.is_some_and(|j| j != peer) {
            self.flush_joining();
        }
        match msg.fd {
            Some(fd) if peer == self.id => self.vectors.push(fd),
            None if peer == self.id => {
                return Err(ClientError::Protocol(format!("disconnect notice for the own id {peer}")))
            }
            Some(fd) => {
                let fresh = !self.peers.contains_key(&peer);
                if fresh {
                    self.joining = Some(peer);
                }
                let fds = self.peers.entry(peer).or_default();
                fds.push(fd);
                if self.joining == Some(peer) && !self.vectors.is_empty() && fds.len() >= self.vectors.len() {
                    self.flush_joining();
                }
            }
            None => {
                if self.peers.remove(&peer).is_some() {
                    self.events.push_back(PeerEvent::Left { id: peer });
                } else {
                    tracing::warn!(peer, "ivshmem server announced the departure of an unknown peer");
                }
            }
        }
        Ok(())
    }
}

impl AsFd for Client {
    /// The socket to the server: readable when [`Client::poll_events`] may have news.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for Client {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Writes 1 to an eventfd.
pub fn write_eventfd(fd: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        match rustix::io::write(fd, &1u64.to_ne_bytes()) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Polls `fd` for readability until `deadline`; false on timeout.
fn poll_readable(fd: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec::try_from(left).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) if Instant::now() >= deadline => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the next whole message, waiting until `deadline`; `None` on timeout.
fn next_message_until(
    sock: &OwnedFd,
    reader: &mut MessageReader,
    deadline: Instant,
) -> Result<Option<Message>, ClientError> {
    loop {
        match reader.read(sock)? {
            ReadOutcome::Message(m) => return Ok(Some(m)),
            ReadOutcome::Closed => return Err(ClientError::Closed),
            ReadOutcome::Incomplete => {
                if !poll_readable(sock.as_fd(), deadline).map_err(io_err("waiting for the server"))? {
                    return Ok(None);
                }
            }
        }
    }
}

fn next_message(
    sock: &OwnedFd,
    reader: &mut MessageReader,
    deadline: Instant,
    timeout: Duration,
) -> Result<Message, ClientError> {
    next_message_until(sock, reader, deadline)?.ok_or(ClientError::Timeout(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::send_message_all;
    use std::os::unix::net::UnixListener;

    /// A scripted server: accepts one connection and sends `script` (value, with a memfd?).
    fn server(tag: &str, script: Script, hold: Duration) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("ivcom-client-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
            for (v, with_fd) in script {
                send_message_all(&s, v, with_fd.then(|| fd.as_fd())).unwrap();
            }
            std::thread::sleep(hold);
            drop(s);
            let _ = std::fs::remove_dir_all(&dir);
        });
        (path, t)
    }

    const T: Duration = Duration::from_secs(10);

    /// Messages a scripted server sends: the value, and whether a memfd goes with it.
    type Script = Vec<(i64, bool)>;

    #[test]
    fn setup_from_a_scripted_server() {
        // Version, id 3, memory, peer 1 with two vectors, own two vectors, then later: peer 5
        // joins, peer 1 leaves.
        let script = vec![(0, false), (3, false), (-1, true), (1, true), (1, true), (3, true), (3, true)];
        let late = vec![(5, true), (5, true), (1, false)];
        let (path, t) = server("ok", script.into_iter().chain(late).collect(), Duration::from_millis(300));
        let mut c = Client::connect(&path, T).unwrap();
        assert_eq!((c.id(), c.vectors().len(), c.shm_size().unwrap()), (3, 2, 1 << 20));
        let mut events = Vec::new();
        while events.len() < 2 {
            let ev = c.wait_events(T).unwrap();
            assert!(!ev.is_empty(), "events did not come");
            events.extend(ev);
        }
        assert!(matches!(&events[0], PeerEvent::Joined { id: 5, fds } if fds.len() == 2), "{events:?}");
        assert!(matches!(&events[1], PeerEvent::Left { id: 1 }), "{events:?}");
        assert_eq!(c.peers().keys().copied().collect::<Vec<_>>(), [5]);
        t.join().unwrap();
        assert!(matches!(c.wait_events(T), Err(ClientError::Closed)));
    }

    #[test]
    fn bad_servers_are_clear_errors() {
        let cases: Vec<(&str, Script, &str)> = vec![
            ("version", vec![(1, false)], "speaks protocol version 1"),
            ("refused", vec![(REFUSAL, false)], "refused the connection"),
            ("idfd", vec![(0, false), (2, true)], "expected the own peer id"),
            ("bigid", vec![(0, false), (70000, false)], "expected the own peer id"),
            ("noshm", vec![(0, false), (2, false), (-1, false)], "expected the shared memory message"),
            ("closed", vec![(0, false), (2, false)], "closed the connection"),
        ];
        for (tag, script, want) in cases {
            let (path, t) = server(tag, script, Duration::ZERO);
            let e = Client::connect(&path, T).unwrap_err().to_string();
            assert!(e.contains(want), "{tag}: {e}");
            t.join().unwrap();
        }
        // A server that says nothing: a timeout, not a hang.
        let (path, t) = server("silent", vec![], Duration::from_millis(800));
        let e = Client::connect(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e}");
        t.join().unwrap();
    }
}
