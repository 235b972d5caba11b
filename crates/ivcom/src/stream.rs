//! Byte-stream channels: [`Stream`] and its halves.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ivcom_ring::{StreamReader, StreamWriter};

use crate::conn::{Conn, Stats};
use crate::wait::{self, Mode};

/// A byte-stream channel to a co-resident peer, with TCP's semantics: in order, no loss, no
/// duplication, back-pressure, half-close, and `ECONNRESET`/`EPIPE`/EOF when the peer goes.
///
/// Made by [`Stream::connect`] or [`crate::Listener::accept`]. `AsRawFd` gives a descriptor
/// that polls readable when a read may make progress (data, end of stream, or the peer gone);
/// [`Stream::write_ready_fd`] is the same for writes. Either is meaningful in non-blocking
/// mode, where a call that returns `WouldBlock` arms it.
#[derive(Debug)]
pub struct Stream {
    rx: ReadHalf,
    tx: WriteHalf,
}

/// The reading half of a [`Stream`].
#[derive(Debug)]
pub struct ReadHalf {
    conn: Arc<Conn>,
    ring: StreamReader,
    mode: Mode,
    shut: bool,
}

/// The writing half of a [`Stream`].
#[derive(Debug)]
pub struct WriteHalf {
    conn: Arc<Conn>,
    ring: StreamWriter,
    mode: Mode,
    shut: bool,
}

impl Stream {
    pub(crate) fn from_conn(conn: Conn) -> Self {
        let conn = Arc::new(conn);
        Self {
            rx: ReadHalf {
                ring: StreamReader::new(conn.rx_geom),
                conn: conn.clone(),
                mode: Mode::default(),
                shut: false,
            },
            tx: WriteHalf { ring: StreamWriter::new(conn.tx_geom), conn, mode: Mode::default(), shut: false },
        }
    }

    /// Connects to the listener `name` with default options.
    pub fn connect(name: &str) -> io::Result<Self> {
        Self::connect_with(name, &crate::Options::new())
    }

    /// Connects to the listener `name`.
    pub fn connect_with(name: &str, opts: &crate::Options) -> io::Result<Self> {
        crate::rendezvous::connect(name, opts, false).map(Self::from_conn)
    }

    /// Splits into halves that can be used from two threads.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.rx, self.tx)
    }

    /// Joins two halves of the same stream.
    pub fn unsplit(rx: ReadHalf, tx: WriteHalf) -> io::Result<Self> {
        if !Arc::ptr_eq(&rx.conn, &tx.conn) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "halves of different streams"));
        }
        Ok(Self { rx, tx })
    }

    /// Counters of this endpoint.
    pub fn stats(&self) -> Stats {
        stats(&self.rx.conn)
    }

    /// Closes the reading side, the writing side, or both (like `shutdown(2)`).
    pub fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.rx.shutdown()?;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            self.tx.shutdown()?;
        }
        Ok(())
    }

    /// Sets non-blocking mode for reads and writes.
    pub fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        self.rx.set_nonblocking(nonblocking);
        self.tx.set_nonblocking(nonblocking);
        Ok(())
    }

    /// Sets the read timeout (`None` blocks forever); a read that times out fails with
    /// `WouldBlock`, as a socket's does.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.rx.mode.set_timeout(t)
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.tx.mode.set_timeout(t)
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> Option<Duration> {
        self.rx.mode.timeout
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> Option<Duration> {
        self.tx.mode.timeout
    }

    /// Bytes that can be read now without waiting.
    pub fn available(&mut self) -> io::Result<usize> {
        self.rx.available()
    }

    /// A descriptor that polls readable when a write may make progress.
    pub fn write_ready_fd(&self) -> BorrowedFd<'_> {
        self.tx.conn.tx_ready_fd().as_fd()
    }
}

pub(crate) fn stats(conn: &Conn) -> Stats {
    Stats {
        bytes_sent: conn.tx.bytes.get(),
        bytes_received: conn.rx.bytes.get(),
        messages_sent: conn.tx.messages.get(),
        messages_received: conn.rx.messages.get(),
        signals_sent: conn.tx.signals.get() + conn.rx.signals.get(),
        sleeps: conn.tx.sleeps.get() + conn.rx.sleeps.get(),
    }
}

impl ReadHalf {
    /// Reads into `buf`; `Ok(0)` is the end of the stream.
    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.shut {
            return Ok(0);
        }
        let conn = &*self.conn;
        let shm = conn.shm();
        let got = wait::recv(conn, self.mode, &mut self.ring, 1, |r| {
            let n = r.try_read(shm, buf, &mut || conn.signal_peer_tx())?;
            Ok((n > 0).then_some(n))
        })?;
        let n = got.unwrap_or(0);
        if n > 0 {
            conn.rx.bytes.add(n as u64);
            conn.rx.messages.add(1);
        }
        Ok(n)
    }

    /// Sets non-blocking mode for this half.
    pub fn set_nonblocking(&mut self, nonblocking: bool) {
        self.mode.nonblocking = nonblocking;
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.mode.set_timeout(t)
    }

    /// Bytes that can be read now without waiting.
    pub fn available(&mut self) -> io::Result<usize> {
        let conn = &*self.conn;
        self.ring.available(conn.shm()).map(|n| n as usize).map_err(|e| conn.ring_error(e))
    }

    /// Stops reading: later reads return end of stream, and the peer's writes fail with
    /// `EPIPE`.
    pub fn shutdown(&mut self) -> io::Result<()> {
        if !self.shut {
            self.shut = true;
            self.conn.close_reading(&mut self.ring)?;
        }
        Ok(())
    }

    /// Counters of the stream this half belongs to.
    pub fn stats(&self) -> Stats {
        stats(&self.conn)
    }
}

impl WriteHalf {
    fn write_inner(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.shut {
            return Err(io::Error::from_raw_os_error(rustix::io::Errno::PIPE.raw_os_error()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let conn = &*self.conn;
        let shm = conn.shm();
        let mut done = 0;
        // Like a blocking TCP send, a blocking write returns once everything is queued; a
        // non-blocking or timed-out one returns what fit.
        while done < buf.len() {
            let r = wait::send(conn, self.mode, &mut self.ring, 1, |w| {
                let n = w.try_write(shm, &buf[done..], &mut || conn.signal_peer_rx())?;
                Ok((n > 0).then_some(n))
            });
            match r {
                Ok(n) => done += n,
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        conn.tx.bytes.add(done as u64);
        conn.tx.messages.add(1);
        Ok(done)
    }

    /// Sets non-blocking mode for this half.
    pub fn set_nonblocking(&mut self, nonblocking: bool) {
        self.mode.nonblocking = nonblocking;
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.mode.set_timeout(t)
    }

    /// Ends the stream: the peer reads end of stream after everything written so far.
    pub fn shutdown(&mut self) -> io::Result<()> {
        if !self.shut {
            self.shut = true;
            self.conn.close_writing(&mut self.ring)?;
        }
        Ok(())
    }

    /// A descriptor that polls readable when a write may make progress.
    pub fn write_ready_fd(&self) -> BorrowedFd<'_> {
        self.conn.tx_ready_fd().as_fd()
    }

    /// Counters of the stream this half belongs to.
    pub fn stats(&self) -> Stats {
        stats(&self.conn)
    }
}

impl Drop for ReadHalf {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf)
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rx.read_inner(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.write_inner(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.rx.conn.rx_ready_fd().as_raw_fd()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.conn.rx_ready_fd().as_fd()
    }
}

impl AsRawFd for ReadHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.conn.rx_ready_fd().as_raw_fd()
    }
}

impl AsFd for ReadHalf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.rx_ready_fd().as_fd()
    }
}

impl AsRawFd for WriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.conn.tx_ready_fd().as_raw_fd()
    }
}

impl AsFd for WriteHalf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.tx_ready_fd().as_fd()
    }
}
