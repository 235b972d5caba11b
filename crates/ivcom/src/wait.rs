//! The waiting strategy shared by every blocking call: try, poll within the budget, announce
//! sleep and re-check, sleep on the kernel object; or, in non-blocking mode, arm the wakeup
//! so the pollable descriptor becomes ready, and return `EAGAIN`.

use std::io;
use std::time::{Duration, Instant};

use ivcom_ring::{
    ConsumerState, Ctrl, MessageReader, MessageWriter, ProducerState, RingError, ShmCtrl, StreamReader,
    StreamWriter,
};

use crate::conn::{spin_until, violation, would_block, Conn};
use crate::sys::Woken;

/// Blocking behaviour of one half.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Mode {
    pub nonblocking: bool,
    pub timeout: Option<Duration>,
}

impl Mode {
    pub(crate) fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot set a zero duration timeout"));
        }
        self.timeout = t;
        Ok(())
    }
}

/// Gives the byte ring under a reading endpoint.
pub(crate) trait RxRing {
    fn ring(&mut self) -> &mut StreamReader;
}
impl RxRing for StreamReader {
    fn ring(&mut self) -> &mut StreamReader {
        self
    }
}
impl RxRing for MessageReader {
    fn ring(&mut self) -> &mut StreamReader {
        self.stream()
    }
}

/// Gives the byte ring under a writing endpoint.
pub(crate) trait TxRing {
    fn ring(&mut self) -> &mut StreamWriter;
}
impl TxRing for StreamWriter {
    fn ring(&mut self) -> &mut StreamWriter {
        self
    }
}
impl TxRing for MessageWriter {
    fn ring(&mut self) -> &mut StreamWriter {
        self.stream()
    }
}

/// One side of a ring in the wait/wake protocol.
trait Sleeper {
    /// Whether this side waits for data (the consumer) rather than for space.
    const READS: bool;
    /// Announces sleep and re-checks; `true` means sleep now.
    fn prepare(&mut self, c: &ShmCtrl<'_>, want: u64) -> Result<bool, RingError>;
    /// Withdraws the announcement.
    fn end(&mut self, c: &ShmCtrl<'_>) -> Result<(), RingError>;
    /// Whether a retry can make progress: `want` bytes of data or space, or the peer closed
    /// its side.
    fn ready(&mut self, c: &ShmCtrl<'_>, want: u64) -> Result<bool, RingError>;
}

impl Sleeper for ConsumerState {
    const READS: bool = true;
    fn prepare(&mut self, c: &ShmCtrl<'_>, want: u64) -> Result<bool, RingError> {
        self.prepare_sleep(c, want)
    }
    fn end(&mut self, c: &ShmCtrl<'_>) -> Result<(), RingError> {
        self.end_sleep(c)
    }
    #[inline]
    fn ready(&mut self, c: &ShmCtrl<'_>, want: u64) -> Result<bool, RingError> {
        Ok(self.available(c, want)? >= want || self.producer_closed(c)?)
    }
}

impl Sleeper for ProducerState {
    const READS: bool = false;
    fn prepare(&mut self, c: &ShmCtrl<'_>, want: u64) -> Result<bool, RingError> {
        self.prepare_sleep(c, want)
    }
    fn end(&mut self, c: &ShmCtrl<'_>) -> Result<(), RingError> {
        self.end_sleep(c)
    }
    #[inline]
    fn ready(&mut self, c: &ShmCtrl<'_>, want: u64) -> Result<bool, RingError> {
        Ok(self.free(c, want)? >= want || c.load_consumer_closed() != 0)
    }
}

/// How far one blocking call has got in waiting.
struct Waiter {
    mode: Mode,
    deadline: Option<Instant>,
    spun: bool,
}

impl Waiter {
    fn new(mode: Mode) -> Self {
        Self { mode, deadline: None, spun: false }
    }

    /// Waits until a retry may make progress. `Ok(())` means try again; an error is the
    /// call's result (`WouldBlock` in non-blocking mode or after the timeout).
    fn wait<S: Sleeper>(&mut self, conn: &Conn, st: &mut S, c: &ShmCtrl<'_>, want: u64) -> io::Result<()> {
        let ring_err = |e| conn.ring_error(e);
        if self.mode.nonblocking {
            // Arm the wakeup so the pollable descriptor turns ready, then report EAGAIN.
            if S::READS {
                conn.drain_rx();
            } else {
                conn.drain_tx();
            }
            st.end(c).map_err(ring_err)?;
            if st.prepare(c, want).map_err(ring_err)? {
                conn.check_liveness();
                if !conn.peer_gone() {
                    return Err(would_block());
                }
            }
            return Ok(());
        }
        if !self.spun {
            self.spun = true;
            if spin_until(conn.spin, || st.ready(c, want)).map_err(ring_err)? {
                return Ok(());
            }
        }
        if self.deadline.is_none() {
            self.deadline = self.mode.timeout.map(|t| Instant::now() + t);
        }
        if !st.prepare(c, want).map_err(ring_err)? {
            return Ok(());
        }
        let woken = conn.sleep(S::READS, self.deadline);
        st.end(c).map_err(ring_err)?;
        match woken? {
            Woken::TimedOut => Err(would_block()),
            Woken::Signalled => {
                self.spun = false;
                Ok(())
            }
            Woken::Control => Ok(()),
        }
    }
}

/// Runs `attempt` until it yields something, waiting for data in between. `Ok(None)` is the
/// end of the stream (the peer closed cleanly, or went away after reading all we sent).
pub(crate) fn recv<R: RxRing, T>(
    conn: &Conn,
    mode: Mode,
    r: &mut R,
    want: u64,
    mut attempt: impl FnMut(&mut R) -> Result<Option<T>, RingError>,
) -> io::Result<Option<T>> {
    let shm = conn.shm();
    let ring_err = |e| conn.ring_error(e);
    let mut waiter = Waiter::new(mode);
    loop {
        if conn.violated() {
            return Err(violation());
        }
        if let Some(t) = attempt(r).map_err(ring_err)? {
            let ring = r.ring();
            if ring.state().is_armed() {
                let c = ring.ctrl(shm).map_err(|e| ring_err(e.into()))?;
                ring.state().end_sleep(&c).map_err(ring_err)?;
            }
            return Ok(Some(t));
        }
        let ring = r.ring();
        let c = ring.ctrl(shm).map_err(|e| ring_err(e.into()))?;
        if ring.state().producer_closed(&c).map_err(ring_err)? {
            // The producer closes after its last publish: look once more, then it is the end.
            return attempt(r).map_err(ring_err);
        }
        if conn.peer_gone() {
            return conn.read_end(false).map(|_| None);
        }
        waiter.wait(conn, ring.state(), &c, want)?;
    }
}

/// Runs `attempt` until it yields something, waiting for `want` bytes of space in between.
/// Fails with `EPIPE`/`ECONNRESET` once the peer stops reading or goes away.
pub(crate) fn send<W: TxRing, T>(
    conn: &Conn,
    mode: Mode,
    w: &mut W,
    want: u64,
    mut attempt: impl FnMut(&mut W) -> Result<Option<T>, RingError>,
) -> io::Result<T> {
    let shm = conn.shm();
    let ring_err = |e| conn.ring_error(e);
    let mut waiter = Waiter::new(mode);
    loop {
        if conn.violated() {
            return Err(violation());
        }
        let c = w.ring().ctrl(shm).map_err(|e| ring_err(e.into()))?;
        if c.load_consumer_closed() != 0 || conn.peer_gone() {
            return Err(conn.write_end());
        }
        if let Some(t) = attempt(w).map_err(ring_err)? {
            let ring = w.ring();
            let c = ring.ctrl(shm).map_err(|e| ring_err(e.into()))?;
            ring.state().end_sleep(&c).map_err(ring_err)?;
            return Ok(t);
        }
        let ring = w.ring();
        let c = ring.ctrl(shm).map_err(|e| ring_err(e.into()))?;
        waiter.wait(conn, ring.state(), &c, want)?;
    }
}
