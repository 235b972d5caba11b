//! The handshake spoken by hand, byte for byte as `src/rendezvous.rs` does, so tests can play
//! a listener or connector that deviates from it (other versions, wrong descriptors, forged
//! regions) or that follows it and then misbehaves in the shared memory.
//!
//! Packets: `magic u32 "IVCH" | version u16 | kind u16 | body`, all little-endian.
//! SERVER_HELLO body: `flags u32 | max_message u32 | capacity u64`; CLIENT_HELLO body:
//! `flags u32 | 0u32` with the memfd and two eventfds; ACCEPT carries two eventfds; REFUSE body:
//! `status u32 | reason`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ivcom_ring::layout::{self, off, Direction, Params};
use ivcom_ring::ShmRegion;
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

pub const SERVER_HELLO: u16 = 1;
pub const CLIENT_HELLO: u16 = 2;
pub const ACCEPT: u16 = 3;
pub const REFUSE: u16 = 4;
pub const FLAG_MESSAGES: u32 = 1;
/// REFUSE status codes.
pub const STATUS_VERSION: u32 = 1;
pub const STATUS_PERMISSION: u32 = 2;
pub const STATUS_BAD_REGION: u32 = 3;
pub const STATUS_PROTOCOL: u32 = 5;

/// The 8-byte packet header.
pub fn header(version: u16, kind: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&ivcom::HS_MAGIC.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v
}

/// A SERVER_HELLO of handshake `version`.
pub fn server_hello(version: u16, messages: bool, max_message: u32, capacity: u64) -> Vec<u8> {
    let mut v = header(version, SERVER_HELLO);
    v.extend_from_slice(&(if messages { FLAG_MESSAGES } else { 0 }).to_le_bytes());
    v.extend_from_slice(&max_message.to_le_bytes());
    v.extend_from_slice(&capacity.to_le_bytes());
    v
}

/// A CLIENT_HELLO of handshake `version` (its descriptors go alongside).
pub fn client_hello(version: u16, messages: bool) -> Vec<u8> {
    let mut v = header(version, CLIENT_HELLO);
    v.extend_from_slice(&(if messages { FLAG_MESSAGES } else { 0 }).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?)
}

/// Connects a seqpacket socket to `path`, with 10 s send/receive timeouts.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    set_timeout(fd.as_fd(), Some(Duration::from_secs(10)))?;
    Ok(fd)
}

/// Binds and listens on a seqpacket socket at `path`.
pub fn bind(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 16)?;
    Ok(fd)
}

/// Accepts one connection, with 10 s send/receive timeouts.
pub fn accept(l: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = rustix::net::accept_with(l, SocketFlags::CLOEXEC)?;
    set_timeout(fd.as_fd(), Some(Duration::from_secs(10)))?;
    Ok(fd)
}

pub fn set_timeout(fd: BorrowedFd<'_>, t: Option<Duration>) -> io::Result<()> {
    use rustix::net::sockopt::{set_socket_timeout, Timeout};
    set_socket_timeout(fd, Timeout::Recv, t)?;
    set_socket_timeout(fd, Timeout::Send, t)?;
    Ok(())
}

/// Sends one packet with `fds`.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)), "too many descriptors");
    }
    let n = rustix::net::sendmsg(sock, &[io::IoSlice::new(data)], &mut control, SendFlags::NOSIGNAL)?;
    assert_eq!(n, data.len());
    Ok(())
}

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Packet {
    pub fn magic(&self) -> u32 {
        u32::from_le_bytes(self.bytes[0..4].try_into().unwrap())
    }
    pub fn version(&self) -> u16 {
        u16::from_le_bytes([self.bytes[4], self.bytes[5]])
    }
    pub fn kind(&self) -> u16 {
        u16::from_le_bytes([self.bytes[6], self.bytes[7]])
    }
    pub fn body(&self) -> &[u8] {
        &self.bytes[8..]
    }
    /// Status and reason of a REFUSE.
    pub fn refusal(&self) -> (u32, String) {
        assert_eq!(self.kind(), REFUSE, "expected a REFUSE packet, got kind {}", self.kind());
        let b = self.body();
        (u32::from_le_bytes(b[0..4].try_into().unwrap()), String::from_utf8_lossy(&b[4..]).into_owned())
    }
}

/// Receives one packet (with up to 8 descriptors). A closed connection is `UnexpectedEof`.
pub fn recv(sock: BorrowedFd<'_>) -> io::Result<Packet> {
    let mut buf = vec![0u8; 4096];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [io::IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    if msg.bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the handshake socket"));
    }
    assert!(msg.bytes >= 8, "short packet of {} bytes", msg.bytes);
    buf.truncate(msg.bytes);
    Ok(Packet { bytes: buf, fds })
}

/// What a SERVER_HELLO offers.
#[derive(Debug, Clone, Copy)]
pub struct ServerHello {
    pub messages: bool,
    pub max_message: u32,
    pub capacity: u64,
}

pub fn parse_server_hello(p: &Packet) -> ServerHello {
    assert_eq!(p.magic(), ivcom::HS_MAGIC);
    assert_eq!(p.kind(), SERVER_HELLO, "expected SERVER_HELLO, got {:?}", p);
    let b = p.body();
    assert!(b.len() >= 16);
    ServerHello {
        messages: u32::from_le_bytes(b[0..4].try_into().unwrap()) & FLAG_MESSAGES != 0,
        max_message: u32::from_le_bytes(b[4..8].try_into().unwrap()),
        capacity: u64::from_le_bytes(b[8..16].try_into().unwrap()),
    }
}

/// A new non-blocking eventfd.
pub fn new_eventfd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

/// Adds `n` to an eventfd (ignoring a full counter).
pub fn signal(fd: BorrowedFd<'_>, n: u64) {
    let _ = rustix::io::write(fd, &n.to_ne_bytes());
}

/// A memfd region we created and mapped ourselves (as a connector does), unmapped on drop.
pub struct OwnRegion {
    pub fd: OwnedFd,
    region: ShmRegion,
}

impl OwnRegion {
    /// A zero-filled memfd of `size` bytes carrying `seals` (empty: no seals at all), mapped.
    pub fn new(size: usize, seals: SealFlags) -> Self {
        let fd =
            rustix::fs::memfd_create("ivcom-test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, size as u64).unwrap();
        if !seals.is_empty() {
            rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
        }
        // SAFETY: a fresh kernel-chosen (null hint) shared mapping of a file we just sized to
        // `size` bytes; it overlaps no Rust object. Whoever shrinks it would be us (and the
        // tests that skip the shrink seal never shrink it).
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                size,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap();
        // SAFETY: the mapping is `size` bytes, page-aligned (so 8-aligned), stays mapped until
        // `drop`, and no reference into it is ever created (all access goes through
        // `ShmRegion`'s atomics and copies).
        let region = unsafe { ShmRegion::new(ptr.cast(), size) };
        Self { fd, region }
    }

    /// A sealed region initialised as `layout::init` does for `params`.
    pub fn init(params: &Params) -> Self {
        let r =
            Self::new(params.region_size().unwrap(), SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL);
        layout::init(r.region(), params).unwrap();
        r
    }

    pub fn region(&self) -> &ShmRegion {
        &self.region
    }
}

impl Drop for OwnRegion {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; every use borrows `self`, so none is left.
        let _ = unsafe { rustix::mm::munmap(self.region.as_ptr().cast(), self.region.len()) };
    }
}

/// A connection made by hand: the listener accepted our region and eventfds.
pub struct RawConn {
    pub sock: OwnedFd,
    pub region: OwnRegion,
    pub params: Params,
    /// Ours: the listener signals these (data for us, space for us).
    pub c_rx: OwnedFd,
    pub c_tx: OwnedFd,
    /// The listener's: we signal `l_rx` after publishing data, `l_tx` after freeing space.
    pub l_rx: OwnedFd,
    pub l_tx: OwnedFd,
}

/// Which ring, by index: 0 carries data to the listener (we produce), 1 to us (we consume).
pub const TO_LISTENER: usize = 0;
pub const TO_CONNECTOR: usize = 1;

impl RawConn {
    /// Completes the handshake exactly as `Stream::connect` / `MessageStream::connect` do,
    /// with a region of `capacity` bytes per ring.
    pub fn connect(path: &Path, capacity: u64) -> io::Result<Self> {
        let sock = connect(path)?;
        let hello = parse_server_hello(&recv(sock.as_fd())?);
        let max_message = hello.messages.then_some(hello.max_message);
        let params = Params { capacity: [capacity, capacity], max_message };
        let region = OwnRegion::init(&params);
        let (c_rx, c_tx) = (new_eventfd(), new_eventfd());
        send(
            sock.as_fd(),
            &client_hello(ivcom::HS_VERSION, hello.messages),
            &[region.fd.as_fd(), c_rx.as_fd(), c_tx.as_fd()],
        )?;
        let p = recv(sock.as_fd())?;
        if p.kind() == REFUSE {
            let (code, why) = p.refusal();
            return Err(io::Error::other(format!("refused ({code}): {why}")));
        }
        assert_eq!(p.kind(), ACCEPT);
        let [l_rx, l_tx]: [OwnedFd; 2] = p.fds.try_into().expect("ACCEPT carries 2 descriptors");
        set_timeout(sock.as_fd(), None)?;
        Ok(Self { sock, region, params, c_rx, c_tx, l_rx, l_tx })
    }

    pub fn shm(&self) -> &ShmRegion {
        self.region.region()
    }

    /// Offset of control field `field` (an `off::` constant) of ring `ring`.
    pub fn ctrl(ring: usize, field: usize) -> usize {
        off::RING_CTRL + off::RING_CTRL_SIZE * ring + field
    }

    pub fn load(&self, ring: usize, field: usize) -> u64 {
        self.shm().load_u64(Self::ctrl(ring, field), Ordering::Acquire).unwrap()
    }

    pub fn store(&self, ring: usize, field: usize, v: u64) {
        self.shm().store_u64(Self::ctrl(ring, field), v, Ordering::Release).unwrap()
    }

    pub fn store32(&self, ring: usize, field: usize, v: u32) {
        self.shm().store_u32(Self::ctrl(ring, field), v, Ordering::Release).unwrap()
    }

    /// Data area geometry of ring `ring`.
    pub fn geometry(&self, ring: usize) -> ivcom_ring::RingGeometry {
        self.params.ring(if ring == 0 { Direction::ToListener } else { Direction::ToConnector })
    }

    /// Copies `bytes` into ring `ring` at free-running index `index` (wrapping).
    pub fn put(&self, ring: usize, index: u64, bytes: &[u8]) {
        let g = self.geometry(ring);
        assert!(bytes.len() as u64 <= g.capacity);
        let pos = (index & (g.capacity - 1)) as usize;
        let first = bytes.len().min(g.capacity as usize - pos);
        self.shm().write_bytes(g.data + pos, &bytes[..first]).unwrap();
        self.shm().write_bytes(g.data, &bytes[first..]).unwrap();
    }

    /// Publishes `bytes` on ring 0 the way a correct producer does (assuming room) and
    /// wakes the listener.
    pub fn publish(&self, bytes: &[u8]) {
        let tail = self.load(TO_LISTENER, off::TAIL);
        self.put(TO_LISTENER, tail, bytes);
        self.store(TO_LISTENER, off::TAIL, tail.wrapping_add(bytes.len() as u64));
        signal(self.l_rx.as_fd(), 1);
    }

    /// Consumes everything on ring 1, as a correct consumer does, and wakes the listener.
    pub fn consume_all(&self) -> u64 {
        let tail = self.load(TO_CONNECTOR, off::TAIL);
        let head = self.load(TO_CONNECTOR, off::HEAD);
        self.store(TO_CONNECTOR, off::HEAD, tail);
        signal(self.l_tx.as_fd(), 1);
        tail.wrapping_sub(head)
    }
}
