//! Message channels: whole messages up to a configured maximum, in order, never split or
//! merged.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use ivcom_ring::{MessageReader, MessageWriter};

use crate::conn::{Conn, Stats};
use crate::rendezvous::{self, Listener};
use crate::wait::{self, Mode};
use crate::Options;

/// A named listener for message channels.
#[derive(Debug)]
pub struct MessageListener {
    inner: Listener,
}

impl MessageListener {
    /// Listens on `name` with default options.
    pub fn bind(name: &str) -> io::Result<Self> {
        Self::bind_with(name, &Options::new())
    }

    /// Listens on `name`; [`Options::max_message`] is the largest message it accepts.
    pub fn bind_with(name: &str, opts: &Options) -> io::Result<Self> {
        rendezvous::bind(name, opts, true).map(|inner| Self { inner })
    }

    /// Waits for a connection and completes its handshake.
    pub fn accept(&self) -> io::Result<MessageStream> {
        self.inner.accept_conn().map(MessageStream::from_conn)
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }
}

/// A channel of whole messages.
#[derive(Debug)]
pub struct MessageStream {
    conn: Conn,
    rx: MessageReader,
    tx: MessageWriter,
    rx_mode: Mode,
    tx_mode: Mode,
    rx_shut: bool,
    tx_shut: bool,
    max: u32,
}

impl MessageStream {
    fn from_conn(conn: Conn) -> Self {
        let max = conn.max_message.unwrap_or(0);
        Self {
            rx: MessageReader::new(conn.rx_geom, max),
            tx: MessageWriter::new(conn.tx_geom, max),
            conn,
            rx_mode: Mode::default(),
            tx_mode: Mode::default(),
            rx_shut: false,
            tx_shut: false,
            max,
        }
    }

    /// Connects to the message listener `name` with default options.
    pub fn connect(name: &str) -> io::Result<Self> {
        Self::connect_with(name, &Options::new())
    }

    /// Connects to the message listener `name`. The maximum message size is the smaller of
    /// the listener's and [`Options::max_message`].
    pub fn connect_with(name: &str, opts: &Options) -> io::Result<Self> {
        rendezvous::connect(name, opts, true).map(Self::from_conn)
    }

    /// Largest message this channel carries.
    pub fn max_message(&self) -> usize {
        self.max as usize
    }

    /// Sends one message, waiting for space if needed. A message larger than
    /// [`MessageStream::max_message`] fails with `InvalidInput`.
    pub fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        if self.tx_shut {
            return Err(io::Error::from_raw_os_error(rustix::io::Errno::PIPE.raw_os_error()));
        }
        let conn = &self.conn;
        let shm = conn.shm();
        let need = MessageWriter::need(msg.len());
        wait::send(conn, self.tx_mode, &mut self.tx, need, |w| {
            Ok(w.try_send(shm, msg, &mut || conn.signal_peer_rx())?.then_some(()))
        })?;
        conn.tx.bytes.add(msg.len() as u64);
        conn.tx.messages.add(1);
        Ok(())
    }

    /// Receives one message into `buf`, waiting if none is queued. `Ok(None)` means the peer
    /// closed; a buffer smaller than the message fails with `InvalidInput` and leaves the
    /// message queued.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.rx_shut {
            return Ok(None);
        }
        let conn = &self.conn;
        let shm = conn.shm();
        let got = wait::recv(conn, self.rx_mode, &mut self.rx, 4, |r| {
            r.try_recv(shm, buf, &mut || conn.signal_peer_tx())
        })?;
        if let Some(n) = got {
            conn.rx.bytes.add(n as u64);
            conn.rx.messages.add(1);
        }
        Ok(got)
    }

    /// Receives one message into a new vector; `Ok(None)` means the peer closed.
    pub fn recv_vec(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; self.max as usize];
        Ok(self.recv(&mut buf)?.map(|n| {
            buf.truncate(n);
            buf
        }))
    }

    /// Length of the next message if one is queued now.
    pub fn peek_len(&mut self) -> io::Result<Option<usize>> {
        let conn = &self.conn;
        self.rx.peek_len(conn.shm()).map_err(|e| conn.ring_error(e))
    }

    /// Sets non-blocking mode: `send` and `recv` fail with `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&mut self, nonblocking: bool) {
        self.rx_mode.nonblocking = nonblocking;
        self.tx_mode.nonblocking = nonblocking;
    }

    /// Sets the receive timeout.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.rx_mode.set_timeout(t)
    }

    /// Sets the send timeout.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.tx_mode.set_timeout(t)
    }

    /// Ends sending: the peer receives `None` after the messages sent so far.
    pub fn shutdown_send(&mut self) -> io::Result<()> {
        if !self.tx_shut {
            self.tx_shut = true;
            self.conn.close_writing(self.tx.stream())?;
        }
        Ok(())
    }

    /// Ends receiving: later `recv`s return `None`, the peer's sends fail with `EPIPE`.
    pub fn shutdown_recv(&mut self) -> io::Result<()> {
        if !self.rx_shut {
            self.rx_shut = true;
            self.conn.close_reading(self.rx.stream())?;
        }
        Ok(())
    }

    /// Counters of this endpoint.
    pub fn stats(&self) -> Stats {
        crate::stream::stats(&self.conn)
    }

    /// A descriptor that polls readable when a send may make progress.
    pub fn write_ready_fd(&self) -> BorrowedFd<'_> {
        self.conn.tx_ready_fd().as_fd()
    }
}

impl Drop for MessageStream {
    fn drop(&mut self) {
        let _ = self.shutdown_send();
        let _ = self.shutdown_recv();
    }
}

impl AsRawFd for MessageStream {
    fn as_raw_fd(&self) -> RawFd {
        self.conn.rx_ready_fd().as_raw_fd()
    }
}

impl AsFd for MessageStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.rx_ready_fd().as_fd()
    }
}
