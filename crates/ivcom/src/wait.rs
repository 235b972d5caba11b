//! The waiting strategy shared by every blocking call: try, poll within the budget, announce
//! sleep and re-check, sleep on the kernel object; or, in non-blocking mode, arm the wakeup
//! so the pollable descriptor becomes ready, and return `EAGAIN`.

use std::io;
use std::time::{Duration, Instant};

use ivcom_ring::{Ctrl, MessageReader, MessageWriter, RingError, ShmCtrl, StreamReader, StreamWriter};

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
    let mut deadline = None;
    let mut spun = false;
    loop {
        if conn.violated() {
            return Err(violation());
        }
        match attempt(r) {
            Ok(Some(t)) => {
                let ring = r.ring();
                if ring.state().is_armed() {
                    let c = ring.ctrl(shm).map_err(|e| conn.ring_error(e.into()))?;
                    ring.state().end_sleep(&c).map_err(|e| conn.ring_error(e))?;
                }
                return Ok(Some(t));
            }
            Ok(None) => {}
            Err(e) => return Err(conn.ring_error(e)),
        }
        let ring = r.ring();
        let c = ring.ctrl(shm).map_err(|e| conn.ring_error(e.into()))?;
        if ring.state().producer_closed(&c).map_err(|e| conn.ring_error(e))? {
            // The producer closes after its last publish: look once more, then it is the end.
            return match attempt(r) {
                Ok(Some(t)) => Ok(Some(t)),
                Ok(None) => Ok(None),
                Err(e) => Err(conn.ring_error(e)),
            };
        }
        if conn.peer_gone() {
            return conn.read_end(false).map(|_| None);
        }
        let st = ring.state();
        if mode.nonblocking {
            conn.drain_rx();
            st.end_sleep(&c).map_err(|e| conn.ring_error(e))?;
            if !st.prepare_sleep(&c, want).map_err(|e| conn.ring_error(e))? {
                continue;
            }
            conn.check_liveness();
            if conn.peer_gone() {
                continue;
            }
            return Err(would_block());
        }
        if !spun {
            spun = true;
            let ready =
                spin_until(conn.spin, || Ok(st.available(&c, want)? >= want || st.producer_closed(&c)?))
                    .map_err(|e| conn.ring_error(e))?;
            if ready {
                continue;
            }
        }
        if deadline.is_none() {
            deadline = mode.timeout.map(|t| Instant::now() + t);
        }
        if !st.prepare_sleep(&c, want).map_err(|e| conn.ring_error(e))? {
            continue;
        }
        let woken = conn.sleep(true, deadline);
        st.end_sleep(&c).map_err(|e| conn.ring_error(e))?;
        match woken? {
            Woken::TimedOut => return Err(would_block()),
            Woken::Signalled => spun = false,
            Woken::Control => {}
        }
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
    let mut deadline = None;
    let mut spun = false;
    loop {
        if conn.violated() {
            return Err(violation());
        }
        let consumer_closed =
            |c: &ShmCtrl<'_>| -> Result<bool, RingError> { Ok(c.load_consumer_closed() != 0) };
        {
            let ring = w.ring();
            let c = ring.ctrl(shm).map_err(|e| conn.ring_error(e.into()))?;
            if consumer_closed(&c).map_err(|e| conn.ring_error(e))? || conn.peer_gone() {
                return Err(conn.write_end());
            }
        }
        match attempt(w) {
            Ok(Some(t)) => {
                let ring = w.ring();
                let c = ring.ctrl(shm).map_err(|e| conn.ring_error(e.into()))?;
                ring.state().end_sleep(&c).map_err(|e| conn.ring_error(e))?;
                return Ok(t);
            }
            Ok(None) => {}
            Err(e) => return Err(conn.ring_error(e)),
        }
        let ring = w.ring();
        let c = ring.ctrl(shm).map_err(|e| conn.ring_error(e.into()))?;
        let st = ring.state();
        if mode.nonblocking {
            conn.drain_tx();
            st.end_sleep(&c).map_err(|e| conn.ring_error(e))?;
            if !st.prepare_sleep(&c, want).map_err(|e| conn.ring_error(e))? {
                continue;
            }
            conn.check_liveness();
            if conn.peer_gone() {
                continue;
            }
            return Err(would_block());
        }
        if !spun {
            spun = true;
            let ready = spin_until(conn.spin, || Ok(st.free(&c, want)? >= want || consumer_closed(&c)?))
                .map_err(|e| conn.ring_error(e))?;
            if ready {
                continue;
            }
        }
        if deadline.is_none() {
            deadline = mode.timeout.map(|t| Instant::now() + t);
        }
        if !st.prepare_sleep(&c, want).map_err(|e| conn.ring_error(e))? {
            continue;
        }
        let woken = conn.sleep(false, deadline);
        st.end_sleep(&c).map_err(|e| conn.ring_error(e))?;
        match woken? {
            Woken::TimedOut => return Err(would_block()),
            Woken::Signalled => spun = false,
            Woken::Control => {}
        }
    }
}
