//! What both halves of a connected channel share: the mapping, the wakeup descriptors, the
//! control socket that tells us the peer is gone, and the counters.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use ivcom_ring::{Ctrl, RingError, RingGeometry, ShmCtrl, ShmRegion, StreamReader, StreamWriter};

use crate::signal::Signal;
use crate::sys::{self, Liveness, Mapping, Woken};

/// Counters of one channel endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes written into the channel.
    pub bytes_sent: u64,
    /// Bytes read from the channel.
    pub bytes_received: u64,
    /// Write calls (stream) or messages (message channels) that moved data out.
    pub messages_sent: u64,
    /// Read calls (stream) or messages (message channels) that moved data in.
    pub messages_received: u64,
    /// Wakeup signals sent to the peer (each one a system call).
    pub signals_sent: u64,
    /// Times this endpoint slept in the kernel waiting for data or space.
    pub sleeps: u64,
}

/// A counter with a single writer: a plain load and store, no locked instruction.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters written by the reading half.
#[derive(Debug, Default)]
pub(crate) struct RxCounters {
    pub bytes: Counter,
    pub messages: Counter,
    pub signals: Counter,
    pub sleeps: Counter,
}

/// Counters written by the writing half.
#[derive(Debug, Default)]
pub(crate) struct TxCounters {
    pub bytes: Counter,
    pub messages: Counter,
    pub signals: Counter,
    pub sleeps: Counter,
}

const ALIVE: u8 = 0;
const GONE: u8 = 1;
const VIOLATED: u8 = 2;

/// The shared state of one connected endpoint.
#[derive(Debug)]
pub(crate) struct Conn {
    map: Mapping,
    ctrl: OwnedFd,
    /// We sleep here waiting for data; the peer signals it.
    own_rx: OwnedFd,
    /// We sleep here waiting for space; the peer signals it.
    own_tx: OwnedFd,
    /// We signal here after publishing data.
    peer_rx: Signal,
    /// We signal here after freeing space.
    peer_tx: Signal,
    /// epoll of `own_rx` and `ctrl`: readable when a read may make progress.
    rx_ready: OwnedFd,
    /// epoll of `own_tx` and `ctrl`: readable when a write may make progress.
    tx_ready: OwnedFd,
    /// What a blocked reader sleeps on (`sys::sleep_set` of `own_rx` and `ctrl`).
    rx_sleep: OwnedFd,
    /// What a blocked writer sleeps on.
    tx_sleep: OwnedFd,
    pub rx_geom: RingGeometry,
    pub tx_geom: RingGeometry,
    pub max_message: Option<u32>,
    pub spin: Duration,
    state: AtomicU8,
    pub rx: RxCounters,
    pub tx: TxCounters,
    /// On the connecting side: the listener's socket file, to remove if the peer dies and
    /// leaves it stale.
    pub listener_file: Option<ListenerFile>,
}

/// How long a probe of a listener whose process may be exiting waits to be reset.
const STALE_PROBE_WAIT: Duration = Duration::from_millis(100);

/// How long the connecting side waits for the runtime directory's lock to clean up a stale
/// socket file (it gives up quietly: the next bind of the name replaces the file).
const STALE_LOCK_TIMEOUT: Duration = Duration::from_millis(200);

/// A listener's socket file as the connecting side saw it.
#[derive(Debug)]
pub(crate) struct ListenerFile {
    /// The verified runtime directory it is in.
    pub dir: crate::rundir::RuntimeDir,
    /// Its name there.
    pub file: String,
    pub id: (u64, u64),
}

impl ListenerFile {
    /// Removes the file if it is still the one we connected to and nobody listens on it
    /// (its listener was killed). Serialised with binds by the directory lock; everything
    /// goes through the directory's descriptor.
    fn remove_if_stale(&self) {
        let Ok(_lock) = self.dir.lock(STALE_LOCK_TIMEOUT) else { return };
        let Ok(st) = self.dir.stat(&self.file) else { return };
        if crate::rundir::file_id(&st) != self.id {
            return;
        }
        let Ok(addr) = self.dir.unix_addr(&self.file) else { return };
        let stale = match sys::connect_seqpacket_at(&addr) {
            Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
            // A killed process closes its descriptors one by one: its listening socket may
            // still accept for a moment after our connection to it broke. It is stale if the
            // probe is reset soon; a live listener answers or stays quiet.
            Ok(probe) => sys::reset_within(probe.as_fd(), STALE_PROBE_WAIT),
        };
        if stale {
            tracing::debug!(
                "ivcom: removing stale socket file {}",
                self.dir.path().join(&self.file).display()
            );
            let _ = self.dir.unlink(&self.file);
        }
    }
}

/// Descriptors and geometry a handshake produces.
pub(crate) struct ConnParts {
    pub map: Mapping,
    pub ctrl: OwnedFd,
    pub own_rx: OwnedFd,
    pub own_tx: OwnedFd,
    pub peer_rx: Signal,
    pub peer_tx: Signal,
    pub rx_geom: RingGeometry,
    pub tx_geom: RingGeometry,
    pub max_message: Option<u32>,
    pub spin: Duration,
    pub listener_file: Option<ListenerFile>,
}

impl Conn {
    pub(crate) fn new(p: ConnParts) -> io::Result<Self> {
        let rx_ready = sys::epoll_of(&[p.own_rx.as_fd(), p.ctrl.as_fd()])?;
        let tx_ready = sys::epoll_of(&[p.own_tx.as_fd(), p.ctrl.as_fd()])?;
        let rx_sleep = sys::sleep_set(p.own_rx.as_fd(), p.ctrl.as_fd())?;
        let tx_sleep = sys::sleep_set(p.own_tx.as_fd(), p.ctrl.as_fd())?;
        Ok(Self {
            map: p.map,
            ctrl: p.ctrl,
            own_rx: p.own_rx,
            own_tx: p.own_tx,
            peer_rx: p.peer_rx,
            peer_tx: p.peer_tx,
            rx_ready,
            tx_ready,
            rx_sleep,
            tx_sleep,
            rx_geom: p.rx_geom,
            tx_geom: p.tx_geom,
            max_message: p.max_message,
            spin: p.spin,
            state: AtomicU8::new(ALIVE),
            rx: RxCounters::default(),
            tx: TxCounters::default(),
            listener_file: p.listener_file,
        })
    }

    #[inline]
    pub(crate) fn shm(&self) -> &ShmRegion {
        self.map.region()
    }

    pub(crate) fn rx_ready_fd(&self) -> &OwnedFd {
        &self.rx_ready
    }

    pub(crate) fn tx_ready_fd(&self) -> &OwnedFd {
        &self.tx_ready
    }

    /// Closes our reading side of `ring` (the peer's writes then fail with `EPIPE`), waking
    /// the peer's writer if it sleeps.
    pub(crate) fn close_reading(&self, ring: &mut StreamReader) -> io::Result<()> {
        let c = ring.ctrl(self.shm()).map_err(|e| self.ring_error(e.into()))?;
        if ring.state().close(&c).map_err(|e| self.ring_error(e))? {
            self.signal_peer_tx();
        }
        Ok(())
    }

    /// Closes our writing side of `ring` (the peer reads end of stream after the data),
    /// waking the peer's reader if it sleeps.
    pub(crate) fn close_writing(&self, ring: &mut StreamWriter) -> io::Result<()> {
        let c = ring.ctrl(self.shm()).map_err(|e| self.ring_error(e.into()))?;
        if ring.state().close(&c).map_err(|e| self.ring_error(e))? {
            self.signal_peer_rx();
        }
        Ok(())
    }

    /// Wakes the peer's reader (after we published data).
    #[inline]
    pub(crate) fn signal_peer_rx(&self) {
        if self.peer_rx.raise() {
            self.tx.signals.add(1);
        }
    }

    /// Wakes the peer's writer (after we freed space).
    #[inline]
    pub(crate) fn signal_peer_tx(&self) {
        if self.peer_tx.raise() {
            self.rx.signals.add(1);
        }
    }

    pub(crate) fn drain_rx(&self) {
        sys::drain(self.own_rx.as_fd());
    }

    pub(crate) fn drain_tx(&self) {
        sys::drain(self.own_tx.as_fd());
    }

    /// Sleeps on our data (`rx`) or space (`tx`) eventfd, or until the peer goes away or
    /// `deadline` passes.
    pub(crate) fn sleep(&self, rx: bool, deadline: Option<Instant>) -> io::Result<Woken> {
        let timeout = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(t) if !t.is_zero() => Some(t),
                _ => return Ok(Woken::TimedOut),
            },
            None => None,
        };
        if rx {
            self.rx.sleeps.add(1);
        } else {
            self.tx.sleeps.add(1);
        }
        let set = if rx { &self.rx_sleep } else { &self.tx_sleep };
        let woken = sys::wait(set.as_fd(), timeout)?;
        if woken == Woken::Control {
            self.check_liveness();
        }
        Ok(woken)
    }

    /// Looks at the control socket without blocking and records what it shows.
    pub(crate) fn check_liveness(&self) {
        if self.state.load(Ordering::Relaxed) != ALIVE {
            return;
        }
        match sys::liveness(self.ctrl.as_fd()) {
            Liveness::Alive => {}
            Liveness::Closed => {
                self.mark(GONE);
                if let Some(f) = &self.listener_file {
                    if !self.peer_closed_cleanly() {
                        f.remove_if_stale();
                    }
                }
            }
            Liveness::Violated => self.mark(VIOLATED),
        }
    }

    /// Whether the peer closed both directions itself (a killed peer closes neither).
    fn peer_closed_cleanly(&self) -> bool {
        match (ShmCtrl::new(self.shm(), self.rx_geom.ctrl), ShmCtrl::new(self.shm(), self.tx_geom.ctrl)) {
            (Ok(rx), Ok(tx)) => rx.load_producer_closed() != 0 && tx.load_consumer_closed() != 0,
            _ => false,
        }
    }

    fn mark(&self, s: u8) {
        let _ = self.state.compare_exchange(ALIVE, s, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records that the peer broke the protocol; every later call fails.
    pub(crate) fn mark_violated(&self) {
        self.mark(VIOLATED);
    }

    /// Whether the peer has gone away or broken the protocol.
    #[inline]
    pub(crate) fn peer_gone(&self) -> bool {
        self.state.load(Ordering::Relaxed) != ALIVE
    }

    pub(crate) fn violated(&self) -> bool {
        self.state.load(Ordering::Relaxed) == VIOLATED
    }

    /// Whether data we wrote is still unread by the peer (a peer that died then "reset" the
    /// connection, as a TCP peer with unread data does).
    fn unread_outbound(&self) -> bool {
        match ShmCtrl::new(self.shm(), self.tx_geom.ctrl) {
            Ok(c) => c.load_tail() != c.load_head(),
            Err(_) => true,
        }
    }

    /// What a read returns once the ring is empty and the peer is gone.
    pub(crate) fn read_end(&self, producer_closed: bool) -> io::Result<usize> {
        if self.violated() {
            return Err(violation());
        }
        if producer_closed || !self.unread_outbound() {
            Ok(0)
        } else {
            Err(io::Error::from_raw_os_error(rustix::io::Errno::CONNRESET.raw_os_error()))
        }
    }

    /// What a write returns once the peer is gone or closed its reading side.
    pub(crate) fn write_end(&self) -> io::Error {
        if self.violated() {
            return violation();
        }
        if self.peer_gone() && self.unread_outbound() {
            io::Error::from_raw_os_error(rustix::io::Errno::CONNRESET.raw_os_error())
        } else {
            io::Error::from_raw_os_error(rustix::io::Errno::PIPE.raw_os_error())
        }
    }

    /// Turns a ring error into the error the caller sees, marking the channel broken when the
    /// peer corrupted it.
    pub(crate) fn ring_error(&self, e: RingError) -> io::Error {
        match e {
            RingError::MessageTooLarge { .. } | RingError::BufferTooSmall { .. } => {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            }
            RingError::Corrupt { .. } | RingError::OutOfBounds(_) => {
                self.mark_violated();
                tracing::warn!("ivcom: closing channel: {e}");
                io::Error::new(io::ErrorKind::InvalidData, e)
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A connecting side that outlives a killed listener removes its stale socket file.
        if self.listener_file.is_some() {
            self.check_liveness();
        }
    }
}

/// The error of a channel whose peer broke the protocol.
pub(crate) fn violation() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "ivcom: peer violated the channel protocol; channel closed")
}

/// `EAGAIN`, as a non-blocking or timed-out socket call returns it.
pub(crate) fn would_block() -> io::Error {
    io::Error::from_raw_os_error(rustix::io::Errno::AGAIN.raw_os_error())
}

/// Polls `ready` for up to `budget`; returns its first `true` or `false` when the budget ran
/// out.
#[inline]
pub(crate) fn spin_until(
    budget: Duration,
    mut ready: impl FnMut() -> Result<bool, RingError>,
) -> Result<bool, RingError> {
    if budget.is_zero() {
        return Ok(false);
    }
    // A reply that is already on its way arrives within a few hundred iterations; only then
    // is the clock worth reading.
    for _ in 0..256 {
        if ready()? {
            return Ok(true);
        }
        std::hint::spin_loop();
    }
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if ready()? {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= budget {
            return Ok(false);
        }
    }
}
