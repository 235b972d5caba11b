//! The ivshmem-server wire protocol, as QEMU's `docs/specs/ivshmem-spec.rst` defines it.
//!
//! The server talks, the client only listens: every message is one signed 64-bit integer in
//! little-endian byte order, optionally accompanied by one file descriptor (`SCM_RIGHTS`).
//! What a message means depends on where it comes in the stream:
//!
//! 1. the protocol version, [`PROTOCOL_VERSION`], no descriptor;
//! 2. the client's own peer id (0..=65535), no descriptor;
//! 3. [`SHM_MESSAGE`] (-1) with the shared memory descriptor;
//! 4. for every other peer already connected: its id, once per vector, each time with the
//!    eventfd that interrupts that peer on that vector (vector 0 first);
//! 5. the client's own id, once per vector, with the eventfds the client receives its own
//!    interrupts on.
//!
//! After that, at any time: a new peer's id with one eventfd per vector (a peer joined), or
//! a known peer's id with no descriptor (that peer left).
//!
//! Each message is one `sendmsg` call; a Unix stream socket never merges a message that carries
//! descriptors with the bytes of the next one, so a reader taking 8 bytes at a time sees each
//! descriptor with the message it belongs to. [`MessageReader`] still copes with a message that
//! arrives in pieces.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The only protocol version there is (the first message of every connection).
pub const PROTOCOL_VERSION: i64 = 0;

/// The value of the message that carries the shared memory descriptor.
pub const SHM_MESSAGE: i64 = -1;

/// What a server sends instead of the version to refuse a connection, then closes it (an ivcom
/// convention, not in QEMU's spec). Any version but 0 makes QEMU fail at once ("server sent
/// version -1, expecting 0"); a bare close would not: QEMU 7.2 reads the setup with a loop that
/// does not stop at end of file and spins until killed.
pub const REFUSAL: i64 = -1;

/// Largest peer id: the doorbell register has 16 bits for it.
pub const MAX_PEER_ID: u16 = u16::MAX;

/// Bytes in one message.
pub const MESSAGE_LEN: usize = 8;

/// Room for descriptors in one `recvmsg`: a conforming server sends one per message; a few more
/// fit so that a misbehaving one is reported rather than silently truncated by the kernel.
const MAX_FDS_PER_READ: usize = 4;

/// Encodes one message value as it goes on the wire.
pub fn encode(value: i64) -> [u8; MESSAGE_LEN] {
    value.to_le_bytes()
}

/// Decodes one message value from the wire.
pub fn decode(bytes: [u8; MESSAGE_LEN]) -> i64 {
    i64::from_le_bytes(bytes)
}

/// One message: a value and the descriptor that came with it, if any.
#[derive(Debug)]
pub struct Message {
    /// The 64-bit value.
    pub value: i64,
    /// The descriptor sent with the message.
    pub fd: Option<OwnedFd>,
}

impl Message {
    /// The value as a peer id, if it is one (0..=65535).
    pub fn peer_id(&self) -> Option<u16> {
        u16::try_from(self.value).ok()
    }
}

/// Sends `value`, with `fd` attached if given, in one `sendmsg`.
///
/// Returns the number of bytes sent: [`MESSAGE_LEN`] normally; fewer only if the socket is
/// non-blocking and its buffer filled up in the middle (the descriptor then went with the
/// first byte, and the caller sends the rest with [`send_bytes`]). A non-blocking socket with
/// a full buffer gives `ErrorKind::WouldBlock`. `SIGPIPE` is never raised.
pub fn send_message(sock: impl AsFd, value: i64, fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    let bytes = encode(value);
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for one descriptor in a control buffer"));
        }
    }
    let iov = [io::IoSlice::new(&bytes)];
    loop {
        match rustix::net::sendmsg(sock.as_fd(), &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends plain bytes (the rest of a message whose start went out earlier), without `SIGPIPE`.
pub fn send_bytes(sock: impl AsFd, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match rustix::net::send(sock.as_fd(), bytes, SendFlags::NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends a whole message on a blocking socket (a convenience for servers that block).
pub fn send_message_all(sock: impl AsFd, value: i64, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = encode(value);
    let mut sent = send_message(sock.as_fd(), value, fd)?;
    while sent < MESSAGE_LEN {
        match send_bytes(sock.as_fd(), &bytes[sent..])? {
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
            n => sent += n,
        }
    }
    Ok(())
}

/// What a read from the server produced.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A whole message.
    Message(Message),
    /// Part of a message arrived, or nothing was there (non-blocking socket); read again later.
    Incomplete,
    /// The server closed the connection at a message boundary.
    Closed,
}

/// Errors a message reader reports.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("reading from the ivshmem server: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection in the middle of a message.
    #[error("the ivshmem server closed the connection in the middle of a message ({got} of 8 bytes)")]
    TruncatedMessage {
        /// Bytes of the message that had arrived.
        got: usize,
    },
    /// More than one descriptor came with one message (the kernel may have dropped some).
    #[error("the ivshmem server sent more than one descriptor with one message")]
    TooManyFds,
}

/// Reassembles messages from a stream socket: 8 bytes each, with the descriptor that came with
/// any of their bytes.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: [u8; MESSAGE_LEN],
    filled: usize,
    fds: VecDeque<OwnedFd>,
}

impl MessageReader {
    /// A reader at a message boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads at most the rest of one message with one `recvmsg` call. On a blocking socket this
    /// waits for data; on a non-blocking one an empty socket gives [`ReadOutcome::Incomplete`].
    pub fn read(&mut self, sock: impl AsFd) -> Result<ReadOutcome, ReadError> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [io::IoSliceMut::new(&mut self.buf[self.filled..])];
        let msg = loop {
            match rustix::net::recvmsg(sock.as_fd(), &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(m) => break m,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(ReadOutcome::Incomplete),
                Err(e) => return Err(ReadError::Io(e.into())),
            }
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                self.fds.extend(rights);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            // The kernel closed descriptors that did not fit: more than one per message.
            return Err(ReadError::TooManyFds);
        }
        if msg.bytes == 0 {
            return if self.filled == 0 && self.fds.is_empty() {
                Ok(ReadOutcome::Closed)
            } else {
                Err(ReadError::TruncatedMessage { got: self.filled })
            };
        }
        self.filled += msg.bytes;
        if self.filled < MESSAGE_LEN {
            return Ok(ReadOutcome::Incomplete);
        }
        self.filled = 0;
        if self.fds.len() > 1 {
            self.fds.clear();
            return Err(ReadError::TooManyFds);
        }
        Ok(ReadOutcome::Message(Message { value: decode(self.buf), fd: self.fds.pop_front() }))
    }

    /// True if part of a message has been read.
    pub fn in_message(&self) -> bool {
        self.filled != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap()
    }

    #[test]
    fn encode_decode_round_trip() {
        for v in [0i64, 1, -1, 7, 65535, 65536, i64::MAX, i64::MIN, -2] {
            assert_eq!(decode(encode(v)), v);
        }
        assert_eq!(encode(-1), [0xff; 8]);
        assert_eq!(encode(0x0102), [2, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn messages_with_and_without_fds_round_trip() {
        let (a, b) = pair();
        let ev = rustix::event::eventfd(5, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        send_message_all(&a, PROTOCOL_VERSION, None).unwrap();
        send_message_all(&a, 3, None).unwrap();
        send_message_all(&a, SHM_MESSAGE, Some(ev.as_fd())).unwrap();
        send_message_all(&a, 9, Some(ev.as_fd())).unwrap();
        let mut r = MessageReader::new();
        let mut next = || loop {
            match r.read(&b).unwrap() {
                ReadOutcome::Message(m) => return m,
                ReadOutcome::Incomplete => continue,
                ReadOutcome::Closed => panic!("closed"),
            }
        };
        let m = next();
        assert_eq!((m.value, m.fd.is_none()), (0, true));
        let m = next();
        assert_eq!((m.value, m.fd.is_none(), m.peer_id()), (3, true, Some(3)));
        let m = next();
        assert_eq!((m.value, m.peer_id()), (-1, None));
        // The received descriptor is the same eventfd: its counter reads back.
        let mut buf = [0u8; 8];
        rustix::io::read(m.fd.as_ref().unwrap(), &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 5);
        let m = next();
        assert_eq!(m.value, 9);
        assert!(m.fd.is_some());
        drop(a);
        assert!(matches!(r.read(&b).unwrap(), ReadOutcome::Closed));
    }

    #[test]
    fn two_descriptors_with_one_message_is_an_error() {
        let (a, b) = pair();
        let e1 = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let e2 = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [e1.as_fd(), e2.as_fd()];
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let bytes = encode(4);
        rustix::net::sendmsg(&a, &[io::IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL).unwrap();
        let mut r = MessageReader::new();
        assert!(matches!(r.read(&b), Err(ReadError::TooManyFds)));
    }

    #[test]
    fn message_in_pieces_is_reassembled_and_truncation_detected() {
        let (a, b) = pair();
        let bytes = encode(0x1234);
        let mut r = MessageReader::new();
        send_bytes(&a, &bytes[..3]).unwrap();
        assert!(matches!(r.read(&b).unwrap(), ReadOutcome::Incomplete));
        assert!(r.in_message());
        send_bytes(&a, &bytes[3..]).unwrap();
        match r.read(&b).unwrap() {
            ReadOutcome::Message(m) => assert_eq!(m.value, 0x1234),
            other => panic!("unexpected {other:?}"),
        }
        send_bytes(&a, &bytes[..5]).unwrap();
        drop(a);
        assert!(matches!(r.read(&b).unwrap(), ReadOutcome::Incomplete));
        assert!(matches!(r.read(&b), Err(ReadError::TruncatedMessage { got: 5 })));
    }
}
