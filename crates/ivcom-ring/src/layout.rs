//! Region layout, version 1: the one place that knows offsets.
//!
//! ```text
//! offset  size  field                       written by
//! 0       8     magic "IVCOMRGN"            creator, once
//! 8       4     version = 1                 creator, once
//! 12      4     header_size = 4096          creator, once
//! 16      8     region_size                 creator, once
//! 24      4     flags (bit 0: message mode) creator, once
//! 28      4     max_message (0 in stream mode)
//! 32      8     ring 0 data offset          creator, once
//! 40      8     ring 0 capacity
//! 48      8     ring 1 data offset
//! 56      8     ring 1 capacity
//! 64      64    reserved, zero
//! 128     512   ring 0 control (connector -> listener)
//! 640     512   ring 1 control (listener -> connector)
//! 1152    2944  reserved, zero
//! 4096    cap0  ring 0 data
//! 4096+cap0 cap1 ring 1 data
//! ```
//! Each ring control block is four 128-byte lines, one per writer and purpose:
//! `+0` tail (u64, producer), `+128` head (u64, consumer), `+256` producer sleep sequence
//! (u32) and producer-closed flag (u32), `+384` consumer sleep sequence (u32) and
//! consumer-closed flag (u32). All integers are little-endian. `docs/region-layout.md` is the
//! byte-for-byte description with the rules each side follows.

use crate::shm::{OutOfBounds, ShmRegion};
use std::sync::atomic::Ordering;

/// `b"IVCOMRGN"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"IVCOMRGN");
/// Layout version this crate speaks.
pub const VERSION: u32 = 1;
/// Size of the header page that precedes the ring data.
pub const HEADER_SIZE: usize = 4096;
/// Spacing that keeps fields written by different sides on different cache lines (x86-64
/// prefetches lines in pairs, hence 128 rather than 64).
pub const LINE: usize = 128;
/// Smallest ring capacity accepted.
pub const MIN_CAPACITY: u64 = 4096;
/// Largest ring capacity accepted.
pub const MAX_CAPACITY: u64 = 1 << 30;
/// Flag bit: the rings carry length-prefixed messages instead of a byte stream.
pub const FLAG_MESSAGES: u32 = 1;

/// Header field offsets.
#[allow(missing_docs)]
pub mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const REGION_SIZE: usize = 16;
    pub const FLAGS: usize = 24;
    pub const MAX_MESSAGE: usize = 28;
    /// Ring `r`'s data offset is at `RING_DATA_OFFSET + 16 * r`.
    pub const RING_DATA_OFFSET: usize = 32;
    /// Ring `r`'s capacity is at `RING_CAPACITY + 16 * r`.
    pub const RING_CAPACITY: usize = 40;
    /// Ring `r`'s control block starts at `RING_CTRL + RING_CTRL_SIZE * r`.
    pub const RING_CTRL: usize = 128;
    pub const RING_CTRL_SIZE: usize = 4 * super::LINE;
    /// Within a control block: producer index.
    pub const TAIL: usize = 0;
    /// Within a control block: consumer index.
    pub const HEAD: usize = super::LINE;
    /// Within a control block: producer's sleep sequence (odd = asleep waiting for space).
    pub const PRODUCER_SLEEP: usize = 2 * super::LINE;
    /// Within a control block: non-zero once the producer will write no more.
    pub const PRODUCER_CLOSED: usize = 2 * super::LINE + 4;
    /// Within a control block: consumer's sleep sequence (odd = asleep waiting for data).
    pub const CONSUMER_SLEEP: usize = 3 * super::LINE;
    /// Within a control block: non-zero once the consumer will read no more.
    pub const CONSUMER_CLOSED: usize = 3 * super::LINE + 4;
    /// TCP handoff (channels that shadow a TCP connection, made by the preload library):
    /// `u32` written by the listener's side only: non-zero once it has claimed the channel.
    pub const TCP_CLAIM: usize = 2048;
    /// TCP handoff: `u64` written by the listener's side only: data bytes it has read from
    /// TCP (before the connecting side's switch point); lets a new program image resume.
    pub const TCP_READ: usize = 2048 + 8;
    /// TCP handoff: `u64` written by the connecting side only: `0` while it still writes its
    /// data over TCP; `n + 1` once it has switched to ring 0 after `n` bytes sent over TCP.
    pub const TCP_SWITCH: usize = 2048 + super::LINE;
    /// TCP handoff: `u64` written by the connecting side only: bytes it has sent over TCP.
    pub const TCP_SENT: usize = 2048 + super::LINE + 8;
    /// TCP handoff: the connection's tuple, written by the connecting side before it
    /// registers: its address (16 bytes, IPv6 or IPv4-mapped), port (u16), then the
    /// destination's address and port. 36 bytes.
    pub const TCP_TUPLE: usize = 2048 + super::LINE + 16;
    /// TCP handoff: `u32` written by the connecting side when it creates the region: the
    /// handoff protocol version ([`super::tcp::HANDOFF_VERSION`]).
    pub const TCP_VERSION: usize = 2048 + 4;
    /// TCP handback: one line per side (`+ LINE * side`, side 0 = connecting, 1 =
    /// listener's), fields below.
    pub const TCP_HANDBACK: usize = 2048 + 2 * super::LINE;
    /// Within a handback line: `u64`, wakeup bytes this side has reserved to send over TCP,
    /// times two, plus bit 0 once frozen (by either side): no more are sent.
    pub const HB_WAKES: usize = 0;
    /// Within a handback line: `u64`, wakeup bytes this side has finished sending.
    pub const HB_SENT: usize = 8;
    /// Within a handback line: `u64`, wakeup bytes this side has taken off TCP (the peer's).
    pub const HB_TAKEN: usize = 16;
    /// Within a handback line: `u64`, `0` or `h + 1`: this side stopped reading the peer's
    /// ring at index `h`; the peer sends what follows over TCP.
    pub const HB_RX_STOP: usize = 24;
    /// Within a handback line: `u64`, `0` or `t + 1`: this side stopped writing its ring at
    /// index `t`; what it sends next goes over TCP.
    pub const HB_TX_STOP: usize = 32;
    /// Within a handback line: `u32`, pid of the process of this side that writes its ring
    /// now, 0 if none (taken only while several processes hold the connection).
    pub const HB_TX_LOCK: usize = 40;
    /// Within a handback line: `u32`, as [`HB_TX_LOCK`] for reading the peer's ring.
    pub const HB_RX_LOCK: usize = 44;
    /// Within a handback line: `u32`, how many processes of this side sleep waiting to read
    /// (counted only while several processes hold the connection, under [`HB_RX_LOCK`]).
    pub const HB_RX_SLEEPERS: usize = 48;
    /// Within a handback line: `u32`, how many processes beyond one hold this side's socket
    /// (added at `fork`, taken off when a process closes its last descriptor of it).
    pub const HB_HOLDERS: usize = 52;
}

const _: () = assert!(off::RING_CTRL + 2 * off::RING_CTRL_SIZE <= HEADER_SIZE);
const _: () = assert!(off::RING_CTRL + 2 * off::RING_CTRL_SIZE <= off::TCP_CLAIM);
const _: () = assert!(off::TCP_SWITCH + LINE <= HEADER_SIZE);
const _: () = assert!(off::TCP_TUPLE + 36 <= off::TCP_SWITCH + LINE);
const _: () = assert!(off::TCP_HANDBACK + 2 * LINE <= HEADER_SIZE);

/// The two handoff words of a channel that shadows a TCP connection (see
/// `docs/region-layout.md`, "TCP handoff"). Each has one writer; the other side only loads.
pub mod tcp {
    use super::off;
    use crate::shm::{OutOfBounds, ShmRegion};
    use std::sync::atomic::Ordering;

    /// Listener's side: marks the channel claimed. Nothing may be sent on the TCP connection
    /// by the listener's side before this store.
    pub fn claim(region: &ShmRegion) -> Result<(), OutOfBounds> {
        region.store_u32(off::TCP_CLAIM, 1, Ordering::Release)
    }

    /// Listener's side: records how many data bytes it has read from TCP.
    pub fn store_read(region: &ShmRegion, n: u64) -> Result<(), OutOfBounds> {
        region.store_u64(off::TCP_READ, n, Ordering::Release)
    }

    /// The listener's side's count of data bytes read from TCP.
    pub fn read_count(region: &ShmRegion) -> Result<u64, OutOfBounds> {
        region.load_u64(off::TCP_READ, Ordering::Acquire)
    }

    /// Connecting side: records how many bytes it has sent over TCP.
    pub fn store_sent(region: &ShmRegion, n: u64) -> Result<(), OutOfBounds> {
        region.store_u64(off::TCP_SENT, n, Ordering::Release)
    }

    /// The connecting side's count of bytes sent over TCP.
    pub fn sent_count(region: &ShmRegion) -> Result<u64, OutOfBounds> {
        region.load_u64(off::TCP_SENT, Ordering::Acquire)
    }

    /// Connecting side: records the connection's tuple (36 bytes, see [`off::TCP_TUPLE`]).
    pub fn store_tuple(region: &ShmRegion, tuple: &[u8; 36]) -> Result<(), OutOfBounds> {
        region.write_bytes(off::TCP_TUPLE, tuple)
    }

    /// The recorded tuple (a peer-written value: only ever compared, never trusted).
    pub fn tuple(region: &ShmRegion) -> Result<[u8; 36], OutOfBounds> {
        let mut b = [0u8; 36];
        region.read_bytes(off::TCP_TUPLE, &mut b)?;
        Ok(b)
    }

    /// The producer index of ring `g` as published (for resuming after `exec`).
    pub fn published_tail(region: &ShmRegion, g: &crate::RingGeometry) -> Result<u64, OutOfBounds> {
        region.load_u64(g.ctrl + off::TAIL, Ordering::Acquire)
    }

    /// The consumer index of ring `g` as published (for resuming after `exec`).
    pub fn published_head(region: &ShmRegion, g: &crate::RingGeometry) -> Result<u64, OutOfBounds> {
        region.load_u64(g.ctrl + off::HEAD, Ordering::Acquire)
    }

    /// Whether the listener's side has claimed the channel.
    pub fn claimed(region: &ShmRegion) -> Result<bool, OutOfBounds> {
        Ok(region.load_u32(off::TCP_CLAIM, Ordering::Acquire)? != 0)
    }

    /// Connecting side: announces that its first `tcp_bytes` bytes went over TCP and the rest
    /// of its stream goes through ring 0. Published before any byte enters ring 0 and before
    /// any wakeup byte is sent over TCP.
    pub fn publish_switch(region: &ShmRegion, tcp_bytes: u64) -> Result<(), OutOfBounds> {
        region.store_u64(off::TCP_SWITCH, tcp_bytes.saturating_add(1), Ordering::Release)
    }

    /// The connecting side's switch offset, if published. A peer-written value: the caller
    /// checks it against what it has already read from TCP.
    pub fn switch_offset(region: &ShmRegion) -> Result<Option<u64>, OutOfBounds> {
        let v = region.load_u64(off::TCP_SWITCH, Ordering::Acquire)?;
        Ok(v.checked_sub(1))
    }

    /// The handoff protocol this build speaks: counted wakeup bytes and the handback lines.
    pub const HANDOFF_VERSION: u32 = 2;

    /// Connecting side, at creation: records [`HANDOFF_VERSION`].
    pub fn set_version(region: &ShmRegion) -> Result<(), OutOfBounds> {
        region.store_u32(off::TCP_VERSION, HANDOFF_VERSION, Ordering::Release)
    }

    /// The handoff protocol version the connecting side recorded.
    pub fn version(region: &ShmRegion) -> Result<u32, OutOfBounds> {
        region.load_u32(off::TCP_VERSION, Ordering::Acquire)
    }

    /// The handback line of `side` (0: connecting side, 1: listener's side).
    fn hb(region: &ShmRegion, side: usize) -> Result<crate::shm::Block<'_, { super::LINE }>, OutOfBounds> {
        region.block::<{ super::LINE }>(off::TCP_HANDBACK + super::LINE * side.min(1))
    }

    /// `side` is about to send one wakeup byte: counts it, unless its wakeups are frozen
    /// (then it must not send). Every wakeup byte is counted before it is sent.
    pub fn reserve_wake(region: &ShmRegion, side: usize) -> Result<bool, OutOfBounds> {
        let w = hb(region, side)?.u64(off::HB_WAKES);
        let mut v = w.load(Ordering::Acquire);
        loop {
            if v & 1 != 0 {
                return Ok(false);
            }
            match w.compare_exchange_weak(v, v.wrapping_add(2), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(true),
                Err(x) => v = x,
            }
        }
    }

    /// `side` finished sending a wakeup byte it reserved.
    pub fn wake_sent(region: &ShmRegion, side: usize) -> Result<(), OutOfBounds> {
        hb(region, side)?.u64(off::HB_SENT).fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Freezes `side`'s wakeups (either side may) and returns how many it reserved: the
    /// final count.
    pub fn freeze_wakes(region: &ShmRegion, side: usize) -> Result<u64, OutOfBounds> {
        Ok(hb(region, side)?.u64(off::HB_WAKES).fetch_or(1, Ordering::AcqRel) >> 1)
    }

    /// `side`'s wakeup count and whether it is frozen (final).
    pub fn wakes(region: &ShmRegion, side: usize) -> Result<(u64, bool), OutOfBounds> {
        let v = hb(region, side)?.u64(off::HB_WAKES).load(Ordering::Acquire);
        Ok((v >> 1, v & 1 != 0))
    }

    /// One more process of `side` sleeps waiting to read; returns how many do now.
    pub fn rx_sleepers_enter(region: &ShmRegion, side: usize) -> Result<u32, OutOfBounds> {
        Ok(hb(region, side)?.u32(off::HB_RX_SLEEPERS).fetch_add(1, Ordering::AcqRel).wrapping_add(1))
    }

    /// One more process holds `side`'s socket (before a `fork`).
    pub fn holders_add(region: &ShmRegion, side: usize) -> Result<(), OutOfBounds> {
        hb(region, side)?.u32(off::HB_HOLDERS).fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// A process of `side` no longer holds its socket (closed it, or its `fork` failed).
    pub fn holders_release(region: &ShmRegion, side: usize) -> Result<(), OutOfBounds> {
        let _ =
            hb(region, side)?
                .u32(off::HB_HOLDERS)
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(1)));
        Ok(())
    }

    /// How many processes beyond one hold `side`'s socket.
    pub fn holders(region: &ShmRegion, side: usize) -> Result<u32, OutOfBounds> {
        Ok(hb(region, side)?.u32(off::HB_HOLDERS).load(Ordering::Acquire))
    }

    /// How many processes of `side` sleep waiting to read.
    pub fn rx_sleepers(region: &ShmRegion, side: usize) -> Result<u32, OutOfBounds> {
        Ok(hb(region, side)?.u32(off::HB_RX_SLEEPERS).load(Ordering::Acquire))
    }

    /// One process of `side` stopped sleeping to read; returns how many still do (a count
    /// the peer zeroed stays at zero).
    pub fn rx_sleepers_leave(region: &ShmRegion, side: usize) -> Result<u32, OutOfBounds> {
        let w = hb(region, side)?.u32(off::HB_RX_SLEEPERS);
        let prev =
            w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(1))).unwrap_or(0);
        Ok(prev.saturating_sub(1))
    }

    /// How many of its wakeup bytes `side` has finished sending.
    pub fn wakes_sent(region: &ShmRegion, side: usize) -> Result<u64, OutOfBounds> {
        Ok(hb(region, side)?.u64(off::HB_SENT).load(Ordering::Acquire))
    }

    /// Wakeup bytes `side` has taken off TCP.
    pub fn taken(region: &ShmRegion, side: usize) -> Result<u64, OutOfBounds> {
        Ok(hb(region, side)?.u64(off::HB_TAKEN).load(Ordering::Acquire))
    }

    /// Records the wakeup bytes `side` has taken off TCP.
    pub fn store_taken(region: &ShmRegion, side: usize, n: u64) -> Result<(), OutOfBounds> {
        hb(region, side)?.u64(off::HB_TAKEN).store(n, Ordering::Release);
        Ok(())
    }

    /// Where `side` stopped reading its peer's ring, if it did.
    pub fn rx_stop(region: &ShmRegion, side: usize) -> Result<Option<u64>, OutOfBounds> {
        Ok(hb(region, side)?.u64(off::HB_RX_STOP).load(Ordering::Acquire).checked_sub(1))
    }

    /// `side` stops reading its peer's ring at index `head`.
    pub fn store_rx_stop(region: &ShmRegion, side: usize, head: u64) -> Result<(), OutOfBounds> {
        hb(region, side)?.u64(off::HB_RX_STOP).store(head.saturating_add(1), Ordering::Release);
        Ok(())
    }

    /// Where `side` stopped writing its ring, if it did.
    pub fn tx_stop(region: &ShmRegion, side: usize) -> Result<Option<u64>, OutOfBounds> {
        Ok(hb(region, side)?.u64(off::HB_TX_STOP).load(Ordering::Acquire).checked_sub(1))
    }

    /// Which of a side's two locks ([`off::HB_TX_LOCK`], [`off::HB_RX_LOCK`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Lock {
        /// Writing the side's ring.
        Tx,
        /// Reading the peer's ring.
        Rx,
    }

    fn lock_word(
        region: &ShmRegion,
        side: usize,
        which: Lock,
    ) -> Result<&std::sync::atomic::AtomicU32, OutOfBounds> {
        let off = match which {
            Lock::Tx => off::HB_TX_LOCK,
            Lock::Rx => off::HB_RX_LOCK,
        };
        Ok(hb(region, side)?.u32(off))
    }

    /// Takes `side`'s lock `which` for process `pid` if it is free (or `pid` holds it).
    pub fn try_lock(region: &ShmRegion, side: usize, which: Lock, pid: u32) -> Result<bool, OutOfBounds> {
        let w = lock_word(region, side, which)?;
        Ok(match w.compare_exchange(0, pid, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => true,
            Err(h) => h == pid,
        })
    }

    /// The pid holding `side`'s lock `which` (0: free).
    pub fn lock_holder(region: &ShmRegion, side: usize, which: Lock) -> Result<u32, OutOfBounds> {
        Ok(lock_word(region, side, which)?.load(Ordering::Relaxed))
    }

    /// Takes the lock from `dead` (a holder that no longer exists) for `pid`.
    pub fn steal_lock(
        region: &ShmRegion,
        side: usize,
        which: Lock,
        dead: u32,
        pid: u32,
    ) -> Result<bool, OutOfBounds> {
        let w = lock_word(region, side, which)?;
        Ok(w.compare_exchange(dead, pid, Ordering::Acquire, Ordering::Relaxed).is_ok())
    }

    /// Releases `side`'s lock `which` held by `pid`.
    pub fn unlock(region: &ShmRegion, side: usize, which: Lock, pid: u32) -> Result<(), OutOfBounds> {
        let _ =
            lock_word(region, side, which)?.compare_exchange(pid, 0, Ordering::Release, Ordering::Relaxed);
        Ok(())
    }

    /// `side` stops writing its ring at index `tail`.
    pub fn store_tx_stop(region: &ShmRegion, side: usize, tail: u64) -> Result<(), OutOfBounds> {
        hb(region, side)?.u64(off::HB_TX_STOP).store(tail.saturating_add(1), Ordering::Release);
        Ok(())
    }
}
const _: () = assert!(cfg!(target_endian = "little"), "the region layout is little-endian");

/// Which way a ring carries data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ring 0: written by the side that connected, read by the listener's side.
    ToListener = 0,
    /// Ring 1: written by the listener's side, read by the side that connected.
    ToConnector = 1,
}

/// What a region holds, as the creator chose it and the other side validated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Capacity of ring 0 and ring 1 in bytes (powers of two).
    pub capacity: [u64; 2],
    /// Message mode: `Some(max)` carries messages of at most `max` bytes.
    pub max_message: Option<u32>,
}

/// Where one ring lives inside the region, from validated header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    /// Offset of the control block.
    pub ctrl: usize,
    /// Offset of the data area.
    pub data: usize,
    /// Capacity in bytes (a power of two).
    pub capacity: u64,
}

/// Why a region or its parameters were refused.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("region is {len} bytes, too small for a header")]
    TooSmall { len: usize },
    #[error("region magic is {found:#018x}, not an ivcom region")]
    BadMagic { found: u64 },
    #[error("region layout version {found}, this build speaks version {VERSION}")]
    VersionMismatch { found: u32 },
    #[error("header field {field} is {value}, expected {expected}")]
    BadField { field: &'static str, value: u64, expected: String },
    #[error("ring capacity {value} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}")]
    BadCapacity { value: u64 },
    #[error("maximum message size {value} does not fit a ring of {capacity} bytes")]
    BadMaxMessage { value: u32, capacity: u64 },
    #[error("region is in {found} mode, expected {expected} mode")]
    ModeMismatch { found: &'static str, expected: &'static str },
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// Largest framing overhead of one message (the length prefix).
pub const MESSAGE_HEADER: u64 = 4;

impl Params {
    /// Checks the parameters on their own (the creator calls this before creating).
    pub fn check(&self) -> Result<(), LayoutError> {
        for &c in &self.capacity {
            check_capacity(c)?;
        }
        if let Some(max) = self.max_message {
            let smallest = self.capacity[0].min(self.capacity[1]);
            if max == 0 || u64::from(max) + MESSAGE_HEADER > smallest {
                return Err(LayoutError::BadMaxMessage { value: max, capacity: smallest });
            }
        }
        Ok(())
    }

    /// Total region size for these parameters.
    pub fn region_size(&self) -> Result<usize, LayoutError> {
        self.check()?;
        let total = HEADER_SIZE as u64 + self.capacity[0] + self.capacity[1];
        usize::try_from(total).map_err(|_| LayoutError::BadCapacity { value: total })
    }

    /// Geometry of ring `dir`.
    pub fn ring(&self, dir: Direction) -> RingGeometry {
        let r = dir as usize;
        let data = HEADER_SIZE as u64 + if r == 0 { 0 } else { self.capacity[0] };
        RingGeometry {
            ctrl: off::RING_CTRL + off::RING_CTRL_SIZE * r,
            data: data as usize,
            capacity: self.capacity[r],
        }
    }
}

fn check_capacity(c: u64) -> Result<(), LayoutError> {
    if !c.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&c) {
        return Err(LayoutError::BadCapacity { value: c });
    }
    Ok(())
}

/// Writes a fresh header for `params` into a zeroed region of exactly `params.region_size()`
/// bytes. Called by the creator before any peer can see the region.
pub fn init(region: &ShmRegion, params: &Params) -> Result<(), LayoutError> {
    let size = params.region_size()?;
    if region.len() != size {
        return Err(LayoutError::BadField {
            field: "region_size",
            value: region.len() as u64,
            expected: size.to_string(),
        });
    }
    region.zero(0, HEADER_SIZE)?;
    let r = Ordering::Relaxed;
    region.store_u64(off::MAGIC, MAGIC, r)?;
    region.store_u32(off::VERSION, VERSION, r)?;
    region.store_u32(off::HEADER_SIZE, HEADER_SIZE as u32, r)?;
    region.store_u64(off::REGION_SIZE, size as u64, r)?;
    region.store_u32(off::FLAGS, if params.max_message.is_some() { FLAG_MESSAGES } else { 0 }, r)?;
    region.store_u32(off::MAX_MESSAGE, params.max_message.unwrap_or(0), r)?;
    for dir in [Direction::ToListener, Direction::ToConnector] {
        let g = params.ring(dir);
        let i = dir as usize;
        region.store_u64(off::RING_DATA_OFFSET + 16 * i, g.data as u64, r)?;
        region.store_u64(off::RING_CAPACITY + 16 * i, g.capacity, r)?;
    }
    Ok(())
}

/// Reads and validates the header of a region another party created. Each field is read once;
/// the returned [`Params`] are the values to use from now on (the header is never re-read, so
/// a peer changing it later changes nothing).
///
/// `expect_messages` is the mode the caller wants; a region in the other mode is refused.
pub fn validate(region: &ShmRegion, expect_messages: bool) -> Result<Params, LayoutError> {
    let params = validate_shape(region, expect_messages)?;
    let r = Ordering::Acquire;
    for dir in [Direction::ToListener, Direction::ToConnector] {
        // A new region starts with both rings empty and open.
        let ctrl = params.ring(dir).ctrl;
        for (name, o) in [("tail", off::TAIL), ("head", off::HEAD)] {
            let v = region.load_u64(ctrl + o, r)?;
            if v != 0 {
                return Err(bad(name, v, 0));
            }
        }
        for (name, o) in [
            ("producer sleep", off::PRODUCER_SLEEP),
            ("producer closed", off::PRODUCER_CLOSED),
            ("consumer sleep", off::CONSUMER_SLEEP),
            ("consumer closed", off::CONSUMER_CLOSED),
        ] {
            let v = region.load_u32(ctrl + o, r)?;
            if v != 0 {
                return Err(bad(name, v.into(), 0));
            }
        }
    }
    Ok(params)
}

/// Validates the header like [`validate`] but not that the rings are new: for a side that
/// attaches to a channel its peer may already be using (the rings' indices are validated by
/// every ring operation in any case).
pub fn validate_shape(region: &ShmRegion, expect_messages: bool) -> Result<Params, LayoutError> {
    if region.len() < HEADER_SIZE {
        return Err(LayoutError::TooSmall { len: region.len() });
    }
    let r = Ordering::Acquire;
    let magic = region.load_u64(off::MAGIC, r)?;
    if magic != MAGIC {
        return Err(LayoutError::BadMagic { found: magic });
    }
    let version = region.load_u32(off::VERSION, r)?;
    if version != VERSION {
        return Err(LayoutError::VersionMismatch { found: version });
    }
    let header_size = region.load_u32(off::HEADER_SIZE, r)?;
    if header_size as usize != HEADER_SIZE {
        return Err(bad("header_size", header_size.into(), HEADER_SIZE));
    }
    let flags = region.load_u32(off::FLAGS, r)?;
    if flags & !FLAG_MESSAGES != 0 {
        return Err(bad("flags", flags.into(), "0 or 1"));
    }
    let is_messages = flags & FLAG_MESSAGES != 0;
    if is_messages != expect_messages {
        let name = |m: bool| if m { "message" } else { "stream" };
        return Err(LayoutError::ModeMismatch { found: name(is_messages), expected: name(expect_messages) });
    }
    let max_message = region.load_u32(off::MAX_MESSAGE, r)?;
    if !is_messages && max_message != 0 {
        return Err(bad("max_message", max_message.into(), 0));
    }
    let capacity = [region.load_u64(off::RING_CAPACITY, r)?, region.load_u64(off::RING_CAPACITY + 16, r)?];
    let params = Params { capacity, max_message: is_messages.then_some(max_message) };
    // Capacities, message size and therefore the total are checked here, before any offset
    // derived from them is used: a forged capacity must not send us past the mapping.
    let size = params.region_size()?;
    let region_size = region.load_u64(off::REGION_SIZE, r)?;
    if region_size != size as u64 || region.len() != size {
        return Err(bad("region_size", region_size, format!("{size} (mapping is {} bytes)", region.len())));
    }
    for dir in [Direction::ToListener, Direction::ToConnector] {
        let i = dir as usize;
        let data = region.load_u64(off::RING_DATA_OFFSET + 16 * i, r)?;
        let want = params.ring(dir).data;
        if data != want as u64 {
            return Err(bad(if i == 0 { "ring 0 data offset" } else { "ring 1 data offset" }, data, want));
        }
    }
    Ok(params)
}

fn bad(field: &'static str, value: u64, expected: impl ToString) -> LayoutError {
    LayoutError::BadField { field, value, expected: expected.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::HeapRegion;

    fn params() -> Params {
        Params { capacity: [4096, 8192], max_message: None }
    }

    #[test]
    fn init_then_validate_round_trips() {
        let p = params();
        let heap = HeapRegion::new(p.region_size().unwrap());
        init(heap.region(), &p).unwrap();
        assert_eq!(validate(heap.region(), false).unwrap(), p);
        assert!(matches!(validate(heap.region(), true), Err(LayoutError::ModeMismatch { .. })));
    }

    #[test]
    fn forged_fields_are_refused() {
        let p = params();
        let heap = HeapRegion::new(p.region_size().unwrap());
        let r = heap.region();
        let o = Ordering::Relaxed;
        init(r, &p).unwrap();
        r.store_u32(off::VERSION, 2, o).unwrap();
        assert_eq!(validate(r, false), Err(LayoutError::VersionMismatch { found: 2 }));
        init(r, &p).unwrap();
        r.store_u64(off::RING_CAPACITY + 16, 1 << 40, o).unwrap();
        assert!(matches!(validate(r, false), Err(LayoutError::BadCapacity { .. })));
        init(r, &p).unwrap();
        r.store_u64(off::RING_CAPACITY, 8192, o).unwrap();
        assert!(matches!(validate(r, false), Err(LayoutError::BadField { field: "region_size", .. })));
        init(r, &p).unwrap();
        r.store_u64(off::MAGIC, 7, o).unwrap();
        assert!(matches!(validate(r, false), Err(LayoutError::BadMagic { .. })));
        init(r, &p).unwrap();
        r.store_u64(p.ring(Direction::ToConnector).ctrl + off::TAIL, 5, o).unwrap();
        assert!(matches!(validate(r, false), Err(LayoutError::BadField { field: "tail", .. })));
    }

    #[test]
    fn params_are_bounded() {
        assert!(Params { capacity: [4095, 4096], max_message: None }.check().is_err());
        assert!(Params { capacity: [4096, 3 << 12], max_message: None }.check().is_err());
        assert!(Params { capacity: [4096, 4096], max_message: Some(4093) }.check().is_err());
        assert!(Params { capacity: [4096, 4096], max_message: Some(4092) }.check().is_ok());
        assert!(Params { capacity: [4096, 4096], max_message: Some(0) }.check().is_err());
    }
}
