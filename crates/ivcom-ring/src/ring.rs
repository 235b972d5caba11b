//! Single-producer single-consumer rings: index arithmetic, validation of the peer's index,
//! event suppression (the wait/wake handshake), and byte-stream and message framing.
//!
//! Indices are free-running `u64` byte counters; a byte at index `i` lives at
//! `data + (i mod capacity)`. The producer owns `tail`, the consumer owns `head`; each keeps
//! its own copy of the index it writes and validates every value of the other's before use.
//!
//! ## Wait/wake handshake
//! A side that finds nothing to do announces sleep by making its sleep sequence odd, issues
//! a full fence, and re-checks; only if there is still nothing to do does it sleep on its
//! kernel object. The other side publishes its index, issues a full fence, and reads the
//! sleep sequence; it signals only for an odd value it has not signalled before. The two
//! fences order "announce; re-check" against "publish; check", so at least one side sees the
//! other's store: either the sleeper sees the new index and does not sleep, or the publisher
//! sees the announcement and signals (`tests/loom.rs` model-checks this).

use crate::layout::{off, RingGeometry, MESSAGE_HEADER};
use crate::shm::{Block, OutOfBounds, ShmRegion};
#[cfg(not(target_arch = "x86_64"))]
use std::sync::atomic::fence;
use std::sync::atomic::Ordering;

/// Why a ring operation failed.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The peer wrote a value no correct peer writes; the channel cannot continue.
    #[error("peer corrupted the ring: {what} (value {value}, allowed {lo}..={hi})")]
    Corrupt { what: &'static str, value: u64, lo: u64, hi: u64 },
    /// A message larger than the channel's maximum.
    #[error("message of {len} bytes exceeds the channel's maximum of {max}")]
    MessageTooLarge { len: usize, max: u32 },
    /// The receive buffer is smaller than the next message (which stays queued).
    #[error("next message is {len} bytes, larger than the {buf}-byte buffer")]
    BufferTooSmall { len: usize, buf: usize },
    /// An access outside the region (cannot happen with validated geometry).
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// Access to one ring's control block. Implemented over shared memory by [`ShmCtrl`] and over
/// loom atomics by the model test, so the protocol code below is the code that is checked.
///
/// Index stores are `Release` and loads `Acquire` (data written before a publish is visible
/// after the index is read); [`Ctrl::fence`] is a sequentially consistent fence.
#[allow(missing_docs)]
pub trait Ctrl {
    fn load_tail(&self) -> u64;
    fn store_tail(&self, v: u64);
    fn load_head(&self) -> u64;
    fn store_head(&self, v: u64);
    fn load_producer_sleep(&self) -> u32;
    fn store_producer_sleep(&self, v: u32);
    fn load_consumer_sleep(&self) -> u32;
    fn store_consumer_sleep(&self, v: u32);
    fn load_producer_closed(&self) -> u32;
    fn store_producer_closed(&self, v: u32);
    fn load_consumer_closed(&self) -> u32;
    fn store_consumer_closed(&self, v: u32);
    fn fence(&self);
}

/// [`Ctrl`] over a control block in shared memory, bounds-checked once when made.
#[derive(Debug, Clone, Copy)]
pub struct ShmCtrl<'a> {
    b: Block<'a, { off::RING_CTRL_SIZE }>,
}

impl<'a> ShmCtrl<'a> {
    /// The control block at `base` of `shm`.
    #[inline]
    pub fn new(shm: &'a ShmRegion, base: usize) -> Result<Self, OutOfBounds> {
        Ok(Self { b: shm.block(base)? })
    }
}

impl Ctrl for ShmCtrl<'_> {
    #[inline]
    fn load_tail(&self) -> u64 {
        // SYNC: pairs with the Release store in `store_tail` on the producer side.
        self.b.u64(off::TAIL).load(Ordering::Acquire)
    }
    #[inline]
    fn store_tail(&self, v: u64) {
        self.b.u64(off::TAIL).store(v, Ordering::Release)
    }
    #[inline]
    fn load_head(&self) -> u64 {
        // SYNC: pairs with the Release store in `store_head` on the consumer side: the consumer
        // has finished copying bytes out before we overwrite them.
        self.b.u64(off::HEAD).load(Ordering::Acquire)
    }
    #[inline]
    fn store_head(&self, v: u64) {
        self.b.u64(off::HEAD).store(v, Ordering::Release)
    }
    #[inline]
    fn load_producer_sleep(&self) -> u32 {
        self.b.u32(off::PRODUCER_SLEEP).load(Ordering::Relaxed)
    }
    #[inline]
    fn store_producer_sleep(&self, v: u32) {
        self.b.u32(off::PRODUCER_SLEEP).store(v, Ordering::Relaxed)
    }
    #[inline]
    fn load_consumer_sleep(&self) -> u32 {
        self.b.u32(off::CONSUMER_SLEEP).load(Ordering::Relaxed)
    }
    #[inline]
    fn store_consumer_sleep(&self, v: u32) {
        self.b.u32(off::CONSUMER_SLEEP).store(v, Ordering::Relaxed)
    }
    #[inline]
    fn load_producer_closed(&self) -> u32 {
        self.b.u32(off::PRODUCER_CLOSED).load(Ordering::Acquire)
    }
    #[inline]
    fn store_producer_closed(&self, v: u32) {
        self.b.u32(off::PRODUCER_CLOSED).store(v, Ordering::Release)
    }
    #[inline]
    fn load_consumer_closed(&self) -> u32 {
        self.b.u32(off::CONSUMER_CLOSED).load(Ordering::Acquire)
    }
    #[inline]
    fn store_consumer_closed(&self, v: u32) {
        self.b.u32(off::CONSUMER_CLOSED).store(v, Ordering::Release)
    }
    #[inline]
    fn fence(&self) {
        // SYNC: the Dekker fence of the wait/wake handshake (module docs).
        full_fence();
    }
}

/// A sequentially consistent fence between our store and the following load of the peer's
/// field, as the wait/wake handshake needs.
///
/// On x86-64 a locked read-modify-write of a stack word is a full barrier for ordinary
/// memory, like `mfence`, and costs less on the CPUs we run on; it is what Linux uses for
/// `smp_mb()`. The `asm!` block is also a compiler barrier (it may touch memory).
#[inline(always)]
pub fn full_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instruction adds zero to the word at the top of our own stack, atomically:
    // the memory is ours, valid and aligned, and its value does not change. It clobbers only
    // the flags.
    unsafe {
        std::arch::asm!("lock or dword ptr [rsp], 0", options(nostack));
    }
    #[cfg(not(target_arch = "x86_64"))]
    fence(Ordering::SeqCst);
}

/// Signals a sleeper at most once per announced sleep.
#[derive(Debug, Clone, Copy, Default)]
struct Suppressor {
    last_signalled: u32,
}

impl Suppressor {
    /// Whether the peer's sleep sequence `seq` asks for a signal we have not sent yet. A
    /// hostile peer can only make us signal more (its own cost) or not at all (its own hang).
    fn should_signal(&mut self, seq: u32) -> bool {
        if seq & 1 == 1 && seq != self.last_signalled {
            self.last_signalled = seq;
            true
        } else {
            false
        }
    }
}

/// The producer's private view of one ring.
#[derive(Debug, Clone)]
pub struct ProducerState {
    tail: u64,
    head_cache: u64,
    cap: u64,
    sleep_seq: u32,
    sup: Suppressor,
}

impl ProducerState {
    /// A producer of an empty ring of `cap` bytes whose indices start at `start`.
    pub fn new(cap: u64, start: u64) -> Self {
        Self { tail: start, head_cache: start, cap, sleep_seq: 0, sup: Suppressor::default() }
    }

    /// The producer's index.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// The consumer's index, as last seen ([`ProducerState::refresh_head`]).
    pub fn consumed(&self) -> u64 {
        self.head_cache
    }

    /// Bytes written and not yet consumed, as last seen.
    pub fn unconsumed(&self) -> u64 {
        self.tail.wrapping_sub(self.head_cache)
    }

    /// Free space; re-reads the consumer's index only if the cached one shows less than `want`.
    pub fn free<C: Ctrl>(&mut self, c: &C, want: u64) -> Result<u64, RingError> {
        let free = self.cap - self.unconsumed();
        if free >= want {
            return Ok(free);
        }
        self.refresh_head(c)?;
        Ok(self.cap - self.unconsumed())
    }

    /// Re-reads and validates the consumer's index.
    pub fn refresh_head<C: Ctrl>(&mut self, c: &C) -> Result<(), RingError> {
        let h = c.load_head();
        // The consumer's index may only move forward, and never past our own: anything else
        // would make us overwrite unread bytes or count free space that does not exist.
        let moved = h.wrapping_sub(self.head_cache);
        let limit = self.tail.wrapping_sub(self.head_cache);
        if moved > limit {
            return Err(RingError::Corrupt {
                what: "consumer index outside [previous head, tail]",
                value: h,
                lo: self.head_cache,
                hi: self.tail,
            });
        }
        self.head_cache = h;
        Ok(())
    }

    /// Publishes `n` more bytes (already copied in). Returns whether the consumer asked to be
    /// woken.
    pub fn publish<C: Ctrl>(&mut self, c: &C, n: u64) -> Result<bool, RingError> {
        debug_assert!(n <= self.cap - self.unconsumed());
        self.tail = self.tail.wrapping_add(n);
        c.store_tail(self.tail);
        c.fence();
        let seq = c.load_consumer_sleep();
        Ok(self.sup.should_signal(seq))
    }

    /// Adopts the published producer index if another process sharing this end (after
    /// `fork`) has moved it forward; used before writing when ends can be shared. The value
    /// is validated like any peer-writable value: forward, and within a capacity of `head`.
    pub fn adopt_published_tail<C: Ctrl>(&mut self, c: &C) -> Result<(), RingError> {
        let t = c.load_tail();
        if t == self.tail {
            return Ok(());
        }
        let bad = |lo: u64, hi: u64| RingError::Corrupt {
            what: "published producer index outside [own tail, head + capacity]",
            value: t,
            lo,
            hi,
        };
        // A sibling may have written any amount since we last did (it read the consumer's
        // index as it went): what bounds the value is the consumer's index now, below.
        if t.wrapping_sub(self.tail) > BACKWARDS {
            return Err(bad(self.tail, self.tail.wrapping_add(self.cap)));
        }
        let old = self.tail;
        self.tail = t;
        if let Err(e) = self.refresh_head(c) {
            self.tail = old;
            return Err(e);
        }
        if t.wrapping_sub(self.head_cache) > self.cap {
            self.tail = old;
            return Err(bad(old, self.head_cache.wrapping_add(self.cap)));
        }
        Ok(())
    }

    /// Announces sleep while waiting for `want` bytes of space (idempotent while announced),
    /// and re-checks. Returns `true`
    /// if the caller should now sleep (and then call [`ProducerState::end_sleep`]), `false` if
    /// space appeared or the consumer closed meanwhile (the announcement is withdrawn).
    pub fn prepare_sleep<C: Ctrl>(&mut self, c: &C, want: u64) -> Result<bool, RingError> {
        // Continue from the published sequence, which another process sharing this end
        // (after fork) may have advanced; odd means an announcement is already up.
        let cur = c.load_producer_sleep();
        self.sleep_seq = if cur & 1 == 1 { cur } else { cur.wrapping_add(1) };
        c.store_producer_sleep(self.sleep_seq);
        c.fence();
        if self.free(c, want)? >= want || c.load_consumer_closed() != 0 {
            self.end_sleep(c)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Withdraws the sleep announcement.
    pub fn end_sleep<C: Ctrl>(&mut self, c: &C) -> Result<(), RingError> {
        if self.sleep_seq & 1 == 1 {
            self.sleep_seq = self.sleep_seq.wrapping_add(1);
            c.store_producer_sleep(self.sleep_seq);
        }
        Ok(())
    }

    /// Marks the ring closed for writing; returns whether to wake the consumer.
    pub fn close<C: Ctrl>(&mut self, c: &C) -> Result<bool, RingError> {
        c.store_producer_closed(1);
        c.fence();
        Ok(self.sup.should_signal(c.load_consumer_sleep()))
    }
}

/// The consumer's private view of one ring.
#[derive(Debug, Clone)]
pub struct ConsumerState {
    head: u64,
    tail_cache: u64,
    cap: u64,
    sleep_seq: u32,
    sup: Suppressor,
}

impl ConsumerState {
    /// A consumer of an empty ring of `cap` bytes whose indices start at `start`.
    pub fn new(cap: u64, start: u64) -> Self {
        Self { head: start, tail_cache: start, cap, sleep_seq: 0, sup: Suppressor::default() }
    }

    /// The consumer's index.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Bytes available as last seen.
    pub fn cached(&self) -> u64 {
        self.tail_cache.wrapping_sub(self.head)
    }

    /// Bytes available; re-reads the producer's index only if the cached one shows less than
    /// `want`.
    pub fn available<C: Ctrl>(&mut self, c: &C, want: u64) -> Result<u64, RingError> {
        let avail = self.cached();
        if avail >= want {
            return Ok(avail);
        }
        self.refresh_tail(c)?;
        Ok(self.cached())
    }

    /// Re-reads and validates the producer's index.
    pub fn refresh_tail<C: Ctrl>(&mut self, c: &C) -> Result<(), RingError> {
        let t = c.load_tail();
        // The producer's index may only move forward, and never more than a capacity ahead of
        // our own: anything else would make us read bytes twice or read unwritten bytes.
        let moved = t.wrapping_sub(self.tail_cache);
        let limit = self.head.wrapping_add(self.cap).wrapping_sub(self.tail_cache);
        if moved > limit {
            return Err(RingError::Corrupt {
                what: "producer index outside [previous tail, head + capacity]",
                value: t,
                lo: self.tail_cache,
                hi: self.head.wrapping_add(self.cap),
            });
        }
        self.tail_cache = t;
        Ok(())
    }

    /// Releases `n` bytes (already copied out). Returns whether the producer asked to be woken.
    pub fn consume<C: Ctrl>(&mut self, c: &C, n: u64) -> Result<bool, RingError> {
        debug_assert!(n <= self.cached());
        self.head = self.head.wrapping_add(n);
        c.store_head(self.head);
        c.fence();
        let seq = c.load_producer_sleep();
        Ok(self.sup.should_signal(seq))
    }

    /// Whether the producer has closed the ring. Check it only after finding the ring empty,
    /// then re-check the ring: the producer closes after its last publish.
    pub fn producer_closed<C: Ctrl>(&self, c: &C) -> Result<bool, RingError> {
        Ok(c.load_producer_closed() != 0)
    }

    /// Adopts the published consumer index if another process sharing this end (after
    /// `fork`) has moved it forward; used before reading when ends can be shared.
    pub fn adopt_published_head<C: Ctrl>(&mut self, c: &C) -> Result<(), RingError> {
        let h = c.load_head();
        if h == self.head {
            return Ok(());
        }
        let bad = |lo: u64, hi: u64| RingError::Corrupt {
            what: "published consumer index outside [own head, tail]",
            value: h,
            lo,
            hi,
        };
        // A sibling may have read any amount since we last did: what bounds the value is the
        // producer's index now, below.
        if h.wrapping_sub(self.head) > BACKWARDS {
            return Err(bad(self.head, self.head.wrapping_add(self.cap)));
        }
        let old = self.head;
        self.head = h;
        if self.tail_cache.wrapping_sub(h) > self.cap {
            // Our cached tail is behind the adopted head: read the producer's index again.
            self.tail_cache = h;
        }
        if let Err(e) = self.refresh_tail(c) {
            self.head = old;
            return Err(e);
        }
        if self.tail_cache.wrapping_sub(h) > self.cap {
            self.head = old;
            return Err(bad(old, self.tail_cache));
        }
        Ok(())
    }

    /// Announces sleep while waiting for data (idempotent while announced), and re-checks. Returns `true` if the caller
    /// should now sleep (and then call [`ConsumerState::end_sleep`]), `false` if data arrived or
    /// the producer closed meanwhile (the announcement is withdrawn).
    pub fn prepare_sleep<C: Ctrl>(&mut self, c: &C, want: u64) -> Result<bool, RingError> {
        // As for the producer: continue from the published sequence.
        let cur = c.load_consumer_sleep();
        self.sleep_seq = if cur & 1 == 1 { cur } else { cur.wrapping_add(1) };
        c.store_consumer_sleep(self.sleep_seq);
        c.fence();
        if self.available(c, want)? >= want || c.load_producer_closed() != 0 {
            self.end_sleep(c)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Withdraws the sleep announcement.
    pub fn end_sleep<C: Ctrl>(&mut self, c: &C) -> Result<(), RingError> {
        if self.sleep_seq & 1 == 1 {
            self.sleep_seq = self.sleep_seq.wrapping_add(1);
            c.store_consumer_sleep(self.sleep_seq);
        }
        Ok(())
    }

    /// For several processes consuming one ring (after `fork`), which share the one
    /// announcement: publishes a fresh announcement (a new odd sequence, which the producer
    /// signals even if it signalled the one before). `stay`: this process sleeps under it;
    /// otherwise it leaves it to the others still asleep, which a wakeup another process took
    /// may have left unannounced.
    pub fn renew_sleep<C: Ctrl>(&mut self, c: &C, stay: bool) {
        let cur = c.load_consumer_sleep();
        let fresh = if cur & 1 == 1 { cur.wrapping_add(2) } else { cur.wrapping_add(1) };
        c.store_consumer_sleep(fresh);
        c.fence();
        self.sleep_seq = if stay { fresh } else { fresh.wrapping_add(1) };
    }

    /// Whether a sleep is announced (odd sequence).
    pub fn is_armed(&self) -> bool {
        self.sleep_seq & 1 == 1
    }

    /// Marks the ring closed for reading; returns whether to wake the producer.
    pub fn close<C: Ctrl>(&mut self, c: &C) -> Result<bool, RingError> {
        c.store_consumer_closed(1);
        c.fence();
        Ok(self.sup.should_signal(c.load_producer_sleep()))
    }
}

fn ring_copy_in(shm: &ShmRegion, g: &RingGeometry, index: u64, src: &[u8]) -> Result<(), OutOfBounds> {
    let pos = (index & (g.capacity - 1)) as usize;
    let first = src.len().min(g.capacity as usize - pos);
    shm.write_bytes(g.data + pos, &src[..first])?;
    if first < src.len() {
        shm.write_bytes(g.data, &src[first..])?;
    }
    Ok(())
}

fn ring_copy_out(shm: &ShmRegion, g: &RingGeometry, index: u64, dst: &mut [u8]) -> Result<(), OutOfBounds> {
    let pos = (index & (g.capacity - 1)) as usize;
    let first = dst.len().min(g.capacity as usize - pos);
    let (a, b) = dst.split_at_mut(first);
    shm.read_bytes(g.data + pos, a)?;
    if !b.is_empty() {
        shm.read_bytes(g.data, b)?;
    }
    Ok(())
}

/// Largest amount published at once by a byte-stream write, so the reader can start copying
/// out while the writer is still copying in.
pub const PUBLISH_CHUNK: usize = 64 * 1024;

/// Writing end of a ring in byte-stream mode.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    g: RingGeometry,
    st: ProducerState,
}

impl StreamWriter {
    /// A writer for the ring at `g` (validated geometry), starting empty at index 0.
    pub fn new(g: RingGeometry) -> Self {
        Self { g, st: ProducerState::new(g.capacity, 0) }
    }

    /// A writer taking over a ring whose producer index is `tail` (a new program image of
    /// the same process, after `exec`); the consumer's index is validated on first use.
    pub fn resume(g: RingGeometry, tail: u64) -> Self {
        Self { g, st: ProducerState::new(g.capacity, tail) }
    }

    /// The control block accessor for this ring.
    #[inline]
    pub fn ctrl<'a>(&self, shm: &'a ShmRegion) -> Result<ShmCtrl<'a>, OutOfBounds> {
        ShmCtrl::new(shm, self.g.ctrl)
    }

    /// The protocol state.
    pub fn state(&mut self) -> &mut ProducerState {
        &mut self.st
    }

    /// Copies as much of `buf` as fits, publishing in chunks of at most [`PUBLISH_CHUNK`];
    /// `wake` runs (at most once per announced sleep) when the reader asked to be woken.
    /// Returns the number of bytes written (0 if the ring is full).
    pub fn try_write(
        &mut self,
        shm: &ShmRegion,
        buf: &[u8],
        wake: &mut impl FnMut(),
    ) -> Result<usize, RingError> {
        let c = self.ctrl(shm)?;
        let mut done = 0;
        while done < buf.len() {
            let free = self.st.free(&c, (buf.len() - done).min(PUBLISH_CHUNK) as u64)?;
            if free == 0 {
                break;
            }
            let n = (buf.len() - done).min(free as usize).min(PUBLISH_CHUNK);
            ring_copy_in(shm, &self.g, self.st.tail, &buf[done..done + n])?;
            if self.st.publish(&c, n as u64)? {
                wake();
            }
            done += n;
        }
        Ok(done)
    }
}

impl StreamWriter {
    /// Copies bytes this writer published, from stream index `from` on, into `buf` (for
    /// handing unread bytes over to another transport after the reader stopped at `from`).
    /// `from` comes from the peer: it must lie within the last capacity's worth of published
    /// bytes (`tail - capacity ..= tail`), which the writer has not overwritten since the
    /// reader's index never passed it. Returns how many bytes were copied (0 at the tail).
    pub fn copy_published(&self, shm: &ShmRegion, from: u64, buf: &mut [u8]) -> Result<usize, RingError> {
        let tail = self.st.tail;
        if from > tail || tail - from > self.g.capacity {
            return Err(RingError::Corrupt {
                what: "stop index outside the ring's published bytes",
                value: from,
                lo: tail.saturating_sub(self.g.capacity),
                hi: tail,
            });
        }
        let n = buf.len().min((tail - from) as usize);
        ring_copy_out(shm, &self.g, from, &mut buf[..n])?;
        Ok(n)
    }
}

/// A published index that moved by more than this is taken as having gone backwards (indices
/// are free-running u64s; no ring moves 2^62 bytes).
const BACKWARDS: u64 = 1 << 62;

/// Reading end of a ring in byte-stream mode.
#[derive(Debug, Clone)]
pub struct StreamReader {
    g: RingGeometry,
    st: ConsumerState,
}

impl StreamReader {
    /// A reader for the ring at `g` (validated geometry), starting empty at index 0.
    pub fn new(g: RingGeometry) -> Self {
        Self { g, st: ConsumerState::new(g.capacity, 0) }
    }

    /// A reader taking over a ring whose consumer index is `head` (after `exec`).
    pub fn resume(g: RingGeometry, head: u64) -> Self {
        Self { g, st: ConsumerState::new(g.capacity, head) }
    }

    /// The control block accessor for this ring.
    #[inline]
    pub fn ctrl<'a>(&self, shm: &'a ShmRegion) -> Result<ShmCtrl<'a>, OutOfBounds> {
        ShmCtrl::new(shm, self.g.ctrl)
    }

    /// The protocol state.
    pub fn state(&mut self) -> &mut ConsumerState {
        &mut self.st
    }

    /// Copies up to `buf.len()` available bytes out; `wake` runs when the writer asked to be
    /// woken. Returns the number of bytes read (0 if the ring is empty).
    pub fn try_read(
        &mut self,
        shm: &ShmRegion,
        buf: &mut [u8],
        wake: &mut impl FnMut(),
    ) -> Result<usize, RingError> {
        let c = self.ctrl(shm)?;
        let avail = self.st.available(&c, buf.len() as u64)?;
        let n = (avail as usize).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        ring_copy_out(shm, &self.g, self.st.head, &mut buf[..n])?;
        if self.st.consume(&c, n as u64)? {
            wake();
        }
        Ok(n)
    }

    /// Copies up to `buf.len()` available bytes out without consuming them (`MSG_PEEK`).
    pub fn try_peek(&mut self, shm: &ShmRegion, buf: &mut [u8]) -> Result<usize, RingError> {
        let c = self.ctrl(shm)?;
        let avail = self.st.available(&c, buf.len() as u64)?;
        let n = (avail as usize).min(buf.len());
        if n > 0 {
            ring_copy_out(shm, &self.g, self.st.head, &mut buf[..n])?;
        }
        Ok(n)
    }

    /// Bytes available now (re-reads the producer's index).
    pub fn available(&mut self, shm: &ShmRegion) -> Result<u64, RingError> {
        let c = self.ctrl(shm)?;
        self.st.refresh_tail(&c)?;
        Ok(self.st.cached())
    }
}

/// Writing end of a ring in message mode: each message is a 4-byte little-endian length and
/// that many bytes, published at once.
#[derive(Debug, Clone)]
pub struct MessageWriter {
    inner: StreamWriter,
    max: u32,
}

impl MessageWriter {
    /// A writer of messages of at most `max` bytes.
    pub fn new(g: RingGeometry, max: u32) -> Self {
        Self { inner: StreamWriter::new(g), max }
    }

    /// The underlying stream writer (for the wait/wake protocol).
    pub fn stream(&mut self) -> &mut StreamWriter {
        &mut self.inner
    }

    /// Space a message of `len` bytes needs.
    pub fn need(len: usize) -> u64 {
        MESSAGE_HEADER + len as u64
    }

    /// Sends `msg` whole if it fits now. Returns `false` if there is not enough space yet.
    pub fn try_send(
        &mut self,
        shm: &ShmRegion,
        msg: &[u8],
        wake: &mut impl FnMut(),
    ) -> Result<bool, RingError> {
        if msg.len() > self.max as usize {
            return Err(RingError::MessageTooLarge { len: msg.len(), max: self.max });
        }
        let w = &mut self.inner;
        let c = w.ctrl(shm)?;
        let need = Self::need(msg.len());
        if w.st.free(&c, need)? < need {
            return Ok(false);
        }
        let tail = w.st.tail;
        ring_copy_in(shm, &w.g, tail, &(msg.len() as u32).to_le_bytes())?;
        ring_copy_in(shm, &w.g, tail.wrapping_add(MESSAGE_HEADER), msg)?;
        if w.st.publish(&c, need)? {
            wake();
        }
        Ok(true)
    }
}

/// Reading end of a ring in message mode.
#[derive(Debug, Clone)]
pub struct MessageReader {
    inner: StreamReader,
    max: u32,
}

impl MessageReader {
    /// A reader of messages of at most `max` bytes.
    pub fn new(g: RingGeometry, max: u32) -> Self {
        Self { inner: StreamReader::new(g), max }
    }

    /// The underlying stream reader (for the wait/wake protocol).
    pub fn stream(&mut self) -> &mut StreamReader {
        &mut self.inner
    }

    /// Length of the next message, if one is queued.
    pub fn peek_len(&mut self, shm: &ShmRegion) -> Result<Option<usize>, RingError> {
        let r = &mut self.inner;
        let c = r.ctrl(shm)?;
        let avail = r.st.available(&c, MESSAGE_HEADER)?;
        if avail == 0 {
            return Ok(None);
        }
        // The producer publishes whole messages, so a published length prefix is never split
        // from its message: a partial one is forged.
        if avail < MESSAGE_HEADER {
            return Err(RingError::Corrupt {
                what: "partial message header",
                value: avail,
                lo: MESSAGE_HEADER,
                hi: r.g.capacity,
            });
        }
        let mut len = [0u8; 4];
        ring_copy_out(shm, &r.g, r.st.head, &mut len)?;
        let len = u32::from_le_bytes(len);
        // Read once, validated here: a length past the agreed maximum or past what was
        // published would make us deliver bytes that are not this message.
        if len > self.max {
            return Err(RingError::Corrupt {
                what: "message length",
                value: len.into(),
                lo: 0,
                hi: self.max.into(),
            });
        }
        let need = MESSAGE_HEADER + u64::from(len);
        if avail < need {
            // Re-read once in case the cached index was stale; whole messages are published.
            r.st.refresh_tail(&c)?;
            if r.st.cached() < need {
                return Err(RingError::Corrupt {
                    what: "message longer than published data",
                    value: need,
                    lo: 0,
                    hi: r.st.cached(),
                });
            }
        }
        Ok(Some(len as usize))
    }

    /// Receives the next message into `buf`; `Ok(None)` if none is queued. A buffer smaller
    /// than the message is an error and the message stays queued.
    pub fn try_recv(
        &mut self,
        shm: &ShmRegion,
        buf: &mut [u8],
        wake: &mut impl FnMut(),
    ) -> Result<Option<usize>, RingError> {
        let Some(len) = self.peek_len(shm)? else { return Ok(None) };
        if buf.len() < len {
            return Err(RingError::BufferTooSmall { len, buf: buf.len() });
        }
        let r = &mut self.inner;
        let c = r.ctrl(shm)?;
        ring_copy_out(shm, &r.g, r.st.head.wrapping_add(MESSAGE_HEADER), &mut buf[..len])?;
        if r.st.consume(&c, MESSAGE_HEADER + len as u64)? {
            wake();
        }
        Ok(Some(len))
    }
}
