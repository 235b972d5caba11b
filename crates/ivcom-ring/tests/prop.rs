//! Property tests of the rings against simple models:
//! - byte streams on a real (heap) region against a `VecDeque<u8>`, including wrap-around at
//!   the capacity boundary and with a check that nothing outside the ring's data is touched;
//! - `ProducerState`/`ConsumerState` index arithmetic and event suppression with free-running
//!   indices that wrap past `u64::MAX`;
//! - message framing against a `VecDeque<Vec<u8>>`;
//! - validation of the peer's index: outside its window it is `RingError::Corrupt`, inside it
//!   is accepted.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use ivcom_ring::layout::{self, off};
use ivcom_ring::{
    ConsumerState, Ctrl, Direction, HeapRegion, MessageReader, MessageWriter, Params, ProducerState,
    RingError, ShmRegion, StreamReader, StreamWriter,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A single-threaded `Ctrl` on `Cell`s: the test plays both sides (or a hostile peer) by
/// setting fields directly.
#[derive(Debug, Default)]
struct CellCtrl {
    tail: Cell<u64>,
    head: Cell<u64>,
    producer_sleep: Cell<u32>,
    producer_closed: Cell<u32>,
    consumer_sleep: Cell<u32>,
    consumer_closed: Cell<u32>,
    fences: Cell<u64>,
}

impl CellCtrl {
    fn new(start: u64) -> Self {
        let c = Self::default();
        c.tail.set(start);
        c.head.set(start);
        c
    }
}

impl Ctrl for CellCtrl {
    fn load_tail(&self) -> u64 {
        self.tail.get()
    }
    fn store_tail(&self, v: u64) {
        self.tail.set(v);
    }
    fn load_head(&self) -> u64 {
        self.head.get()
    }
    fn store_head(&self, v: u64) {
        self.head.set(v);
    }
    fn load_producer_sleep(&self) -> u32 {
        self.producer_sleep.get()
    }
    fn store_producer_sleep(&self, v: u32) {
        self.producer_sleep.set(v);
    }
    fn load_consumer_sleep(&self) -> u32 {
        self.consumer_sleep.get()
    }
    fn store_consumer_sleep(&self, v: u32) {
        self.consumer_sleep.set(v);
    }
    fn load_producer_closed(&self) -> u32 {
        self.producer_closed.get()
    }
    fn store_producer_closed(&self, v: u32) {
        self.producer_closed.set(v);
    }
    fn load_consumer_closed(&self) -> u32 {
        self.consumer_closed.get()
    }
    fn store_consumer_closed(&self, v: u32) {
        self.consumer_closed.set(v);
    }
    fn fence(&self) {
        self.fences.set(self.fences.get() + 1);
    }
}

/// A fresh region initialised for `params`.
fn region(params: &Params) -> HeapRegion {
    let heap = HeapRegion::new(params.region_size().unwrap());
    layout::init(heap.region(), params).unwrap();
    heap
}

/// `n` pseudo-random bytes from `seed` (xorshift64*).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A copy of the whole region except ring `dir`'s control block and data area.
fn outside_ring(shm: &ShmRegion, params: &Params, dir: Direction) -> Vec<u8> {
    let mut all = vec![0u8; shm.len()];
    shm.read_bytes(0, &mut all).unwrap();
    let g = params.ring(dir);
    all[g.ctrl..g.ctrl + off::RING_CTRL_SIZE].fill(0);
    all[g.data..g.data + g.capacity as usize].fill(0);
    all
}

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::ToListener), Just(Direction::ToConnector)]
}

fn capacity() -> impl Strategy<Value = u64> {
    prop_oneof![Just(4096u64), Just(8192u64)]
}

/// Lengths biased towards the interesting ones: tiny, around the capacity, anything.
fn length(cap: u64) -> impl Strategy<Value = usize> {
    let cap = cap as usize;
    prop_oneof![0..=16usize, (cap - 16)..=(cap + 16), 0..=cap + 64]
}

fn corrupt(r: &Result<impl std::fmt::Debug, RingError>) -> bool {
    matches!(r, Err(RingError::Corrupt { .. }))
}

// ---------------------------------------------------------------------------------------------
// Byte streams on a region
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum StreamOp {
    /// Write `len` random bytes made from `seed`.
    Write { len: usize, seed: u64 },
    /// Read into a buffer of `len` bytes.
    Read { len: usize },
    /// Ask the reader how much is available.
    Available,
}

fn stream_ops(cap: u64) -> impl Strategy<Value = Vec<StreamOp>> {
    let op = prop_oneof![
        (length(cap), any::<u64>()).prop_map(|(len, seed)| StreamOp::Write { len, seed }),
        length(cap).prop_map(|len| StreamOp::Read { len }),
        Just(StreamOp::Available),
    ];
    proptest::collection::vec(op, 1..48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Writes and reads on one ring move exactly the bytes a `VecDeque` model says, in order,
    /// across any number of wrap-arounds, and touch nothing outside the ring.
    #[test]
    fn stream_matches_model(
        (cap, other, dir, ops) in (capacity(), capacity(), direction())
            .prop_flat_map(|(cap, other, dir)| (Just(cap), Just(other), Just(dir), stream_ops(cap)))
    ) {
        let mut caps = [other, other];
        caps[dir as usize] = cap;
        let params = Params { capacity: caps, max_message: None };
        let heap = region(&params);
        let shm = heap.region();
        let before = outside_ring(shm, &params, dir);
        let g = params.ring(dir);
        let mut w = StreamWriter::new(g);
        let mut r = StreamReader::new(g);
        let mut model: VecDeque<u8> = VecDeque::new();
        let mut wakes = 0u32;
        let mut total = 0u64;
        for op in ops {
            match op {
                StreamOp::Write { len, seed } => {
                    let data = bytes(seed, len);
                    let n = w.try_write(shm, &data, &mut || wakes += 1).unwrap();
                    let expect = len.min(cap as usize - model.len());
                    prop_assert_eq!(n, expect);
                    model.extend(&data[..n]);
                    total += n as u64;
                    prop_assert_eq!(w.state().tail(), total);
                }
                StreamOp::Read { len } => {
                    let mut buf = vec![0xAAu8; len];
                    let n = r.try_read(shm, &mut buf, &mut || wakes += 1).unwrap();
                    prop_assert_eq!(n, len.min(model.len()));
                    let expect: Vec<u8> = model.drain(..n).collect();
                    prop_assert_eq!(&buf[..n], &expect[..]);
                    prop_assert!(buf[n..].iter().all(|&b| b == 0xAA), "bytes past the count were written");
                    prop_assert_eq!(r.state().head(), total - model.len() as u64);
                }
                StreamOp::Available => {
                    prop_assert_eq!(r.available(shm).unwrap(), model.len() as u64);
                }
            }
        }
        // Nobody announced sleep, so nobody may be woken.
        prop_assert_eq!(wakes, 0);
        prop_assert_eq!(outside_ring(shm, &params, dir), before);
        let c = w.ctrl(shm).unwrap();
        prop_assert_eq!(c.load_tail(), total);
        prop_assert_eq!(c.load_head(), total - model.len() as u64);
    }
}

/// A write larger than [`ivcom_ring::ring::PUBLISH_CHUNK`] is published in chunks, and a
/// reader that announced sleep is woken once, not once per chunk.
#[test]
fn large_write_is_chunked_and_wakes_once() {
    let cap = 1u64 << 18;
    let params = Params { capacity: [cap, 4096], max_message: None };
    let heap = region(&params);
    let shm = heap.region();
    let g = params.ring(Direction::ToListener);
    let mut w = StreamWriter::new(g);
    let mut r = StreamReader::new(g);
    let rc = r.ctrl(shm).unwrap();
    assert!(r.state().prepare_sleep(&rc, 1).unwrap(), "empty ring: the reader sleeps");
    let data = bytes(7, 200_000);
    let mut wakes = 0;
    assert_eq!(w.try_write(shm, &data, &mut || wakes += 1).unwrap(), data.len());
    assert_eq!(wakes, 1);
    r.state().end_sleep(&rc).unwrap();
    let mut out = vec![0u8; data.len()];
    assert_eq!(r.try_read(shm, &mut out, &mut || panic!("writer never slept")).unwrap(), data.len());
    assert_eq!(out, data);
}

// ---------------------------------------------------------------------------------------------
// Index arithmetic and event suppression with wrapping indices
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum IndexOp {
    /// Producer publishes `n % (free + 1)` bytes.
    Produce(u64),
    /// Consumer releases `n % (available + 1)` bytes.
    Consume(u64),
    /// `ProducerState::free` with this `want`.
    Free(u64),
    /// `ConsumerState::available` with this `want`.
    Available(u64),
    /// Producer: announce sleep for `want % cap + 1` bytes if not armed, else end the sleep.
    ProducerSleep(u64),
    /// Consumer: announce sleep for `want % cap + 1` bytes if not armed, else end the sleep.
    ConsumerSleep(u64),
    ProducerClose,
    ConsumerClose,
}

fn index_ops() -> impl Strategy<Value = Vec<IndexOp>> {
    let op = prop_oneof![
        4 => any::<u64>().prop_map(IndexOp::Produce),
        4 => any::<u64>().prop_map(IndexOp::Consume),
        2 => (0u64..10_000).prop_map(IndexOp::Free),
        2 => (0u64..10_000).prop_map(IndexOp::Available),
        2 => any::<u64>().prop_map(IndexOp::ProducerSleep),
        2 => any::<u64>().prop_map(IndexOp::ConsumerSleep),
        1 => Just(IndexOp::ProducerClose),
        1 => Just(IndexOp::ConsumerClose),
    ];
    proptest::collection::vec(op, 1..80)
}

fn start_index() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..20_000).prop_map(|d| u64::MAX - d),
        (0u64..20_000).prop_map(|d| d.wrapping_sub(10_000)),
        any::<u64>(),
    ]
}

/// The signal decision a `Suppressor` must make: odd and not signalled before.
fn model_signal(seq: u32, last: &mut u32) -> bool {
    if seq & 1 == 1 && seq != *last {
        *last = seq;
        true
    } else {
        false
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Both states agree with a model of "bytes in flight" whatever the start index, signal
    /// exactly when the peer announced a sleep not yet signalled, and sleep exactly when there
    /// is nothing to do and the peer is open.
    #[test]
    fn states_match_model_with_wrapping_indices(
        cap in prop_oneof![1u64..=8, 4090u64..=4100, Just(1u64 << 30)],
        start in start_index(),
        ops in index_ops(),
    ) {
        let c = CellCtrl::new(start);
        let mut p = ProducerState::new(cap, start);
        let mut q = ConsumerState::new(cap, start);
        let (mut written, mut read) = (0u64, 0u64);
        let (mut p_armed, mut q_armed) = (false, false);
        let (mut p_last, mut q_last) = (0u32, 0u32);
        let (mut p_closed, mut q_closed) = (false, false);
        for op in ops {
            let inflight = written - read;
            prop_assert!(inflight <= cap);
            match op {
                IndexOp::Produce(n) => {
                    if p_closed || p_armed {
                        continue;
                    }
                    let n = n % (cap - inflight + 1);
                    prop_assert!(p.free(&c, n).unwrap() >= n);
                    let woke = p.publish(&c, n).unwrap();
                    prop_assert_eq!(woke, model_signal(c.consumer_sleep.get(), &mut p_last));
                    written += n;
                    prop_assert_eq!(p.tail(), start.wrapping_add(written));
                    prop_assert_eq!(c.tail.get(), start.wrapping_add(written));
                }
                IndexOp::Consume(n) => {
                    if q_closed || q_armed {
                        continue;
                    }
                    let n = n % (inflight + 1);
                    prop_assert!(q.available(&c, n).unwrap() >= n);
                    let woke = q.consume(&c, n).unwrap();
                    prop_assert_eq!(woke, model_signal(c.producer_sleep.get(), &mut q_last));
                    read += n;
                    prop_assert_eq!(q.head(), start.wrapping_add(read));
                    prop_assert_eq!(c.head.get(), start.wrapping_add(read));
                }
                IndexOp::Free(want) => {
                    let f = p.free(&c, want).unwrap();
                    let actual = cap - inflight;
                    // A cached value may be stale but never overstates the space.
                    if f >= want {
                        prop_assert!(f <= actual);
                    } else {
                        prop_assert_eq!(f, actual);
                    }
                    prop_assert_eq!(p.free(&c, cap).unwrap(), actual);
                    prop_assert_eq!(p.unconsumed(), inflight);
                }
                IndexOp::Available(want) => {
                    let a = q.available(&c, want).unwrap();
                    if a >= want {
                        prop_assert!(a <= inflight);
                    } else {
                        prop_assert_eq!(a, inflight);
                    }
                    prop_assert_eq!(q.available(&c, cap).unwrap(), inflight);
                    prop_assert_eq!(q.cached(), inflight);
                }
                IndexOp::ProducerSleep(want) => {
                    if p_armed {
                        p.end_sleep(&c).unwrap();
                        p_armed = false;
                    } else if !p_closed {
                        let want = want % cap + 1;
                        let sleep = p.prepare_sleep(&c, want).unwrap();
                        prop_assert_eq!(sleep, cap - inflight < want && !q_closed);
                        p_armed = sleep;
                    }
                    prop_assert_eq!(c.producer_sleep.get() & 1 == 1, p_armed);
                }
                IndexOp::ConsumerSleep(want) => {
                    if q_armed {
                        q.end_sleep(&c).unwrap();
                        q_armed = false;
                    } else if !q_closed {
                        let want = want % cap + 1;
                        let sleep = q.prepare_sleep(&c, want).unwrap();
                        prop_assert_eq!(sleep, inflight < want && !p_closed);
                        q_armed = sleep;
                    }
                    prop_assert_eq!(c.consumer_sleep.get() & 1 == 1, q_armed);
                    prop_assert_eq!(q.is_armed(), q_armed);
                }
                IndexOp::ProducerClose => {
                    if !p_closed && !p_armed {
                        let woke = p.close(&c).unwrap();
                        prop_assert_eq!(woke, model_signal(c.consumer_sleep.get(), &mut p_last));
                        p_closed = true;
                        prop_assert!(q.producer_closed(&c).unwrap());
                    }
                }
                IndexOp::ConsumerClose => {
                    if !q_closed && !q_armed {
                        let woke = q.close(&c).unwrap();
                        prop_assert_eq!(woke, model_signal(c.producer_sleep.get(), &mut q_last));
                        q_closed = true;
                    }
                }
            }
        }
        prop_assert_eq!(p.free(&c, cap).unwrap(), cap - (written - read));
        prop_assert_eq!(q.available(&c, cap).unwrap(), written - read);
    }
}

// ---------------------------------------------------------------------------------------------
// Message framing
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum MsgOp {
    Send { len: usize, seed: u64 },
    Recv { buf: usize },
    Peek,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every message sent is received whole and in order; a message that does not fit waits;
    /// a too-small buffer leaves the message queued; a too-large message is refused.
    #[test]
    fn messages_match_model(
        (cap, max, dir, ops) in (capacity(), direction()).prop_flat_map(|(cap, dir)| {
            let max = prop_oneof![1u32..=16, (cap as u32 - 100)..=(cap as u32 - 4), 1u32..=(cap as u32 - 4)];
            (Just(cap), max, Just(dir))
        }).prop_flat_map(|(cap, max, dir)| {
            let m = max as usize;
            let len = prop_oneof![0..=8usize, 0..=m, m.saturating_sub(4)..=m + 4];
            let op = prop_oneof![
                3 => (len.clone(), any::<u64>()).prop_map(|(len, seed)| MsgOp::Send { len, seed }),
                3 => len.prop_map(|buf| MsgOp::Recv { buf }),
                1 => Just(MsgOp::Peek),
            ];
            (Just(cap), Just(max), Just(dir), proptest::collection::vec(op, 1..48))
        })
    ) {
        let params = Params { capacity: [cap, cap], max_message: Some(max) };
        let heap = region(&params);
        let shm = heap.region();
        prop_assert_eq!(layout::validate(shm, true).unwrap(), params);
        let before = outside_ring(shm, &params, dir);
        let g = params.ring(dir);
        let mut w = MessageWriter::new(g, max);
        let mut r = MessageReader::new(g, max);
        let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
        let mut inflight = 0u64;
        let mut no_wake = || panic!("nobody sleeps in this test");
        for op in ops {
            match op {
                MsgOp::Send { len, seed } => {
                    let msg = bytes(seed, len);
                    let res = w.try_send(shm, &msg, &mut no_wake);
                    if len > max as usize {
                        prop_assert_eq!(res, Err(RingError::MessageTooLarge { len, max }));
                    } else if MessageWriter::need(len) <= cap - inflight {
                        prop_assert_eq!(res, Ok(true));
                        inflight += MessageWriter::need(len);
                        queue.push_back(msg);
                    } else {
                        prop_assert_eq!(res, Ok(false));
                    }
                }
                MsgOp::Recv { buf } => {
                    let mut out = vec![0u8; buf];
                    let res = r.try_recv(shm, &mut out, &mut no_wake);
                    match queue.front() {
                        None => prop_assert_eq!(res, Ok(None)),
                        Some(front) if front.len() > buf => {
                            prop_assert_eq!(res, Err(RingError::BufferTooSmall { len: front.len(), buf }));
                        }
                        Some(_) => {
                            let front = queue.pop_front().unwrap();
                            prop_assert_eq!(res, Ok(Some(front.len())));
                            prop_assert_eq!(&out[..front.len()], &front[..]);
                            inflight -= MessageWriter::need(front.len());
                        }
                    }
                }
                MsgOp::Peek => {
                    prop_assert_eq!(r.peek_len(shm).unwrap(), queue.front().map(Vec::len));
                }
            }
        }
        // Drain: everything still queued comes out intact.
        let mut out = vec![0u8; max as usize];
        while let Some(front) = queue.pop_front() {
            prop_assert_eq!(r.try_recv(shm, &mut out, &mut no_wake), Ok(Some(front.len())));
            prop_assert_eq!(&out[..front.len()], &front[..]);
        }
        prop_assert_eq!(r.try_recv(shm, &mut out, &mut no_wake), Ok(None));
        prop_assert_eq!(outside_ring(shm, &params, dir), before);
    }
}

// ---------------------------------------------------------------------------------------------
// Validation of the peer's index
// ---------------------------------------------------------------------------------------------

/// A forged offset from the start of the allowed window: inside it or past its end (wrapping
/// all the way round to just below its start).
fn window_offset() -> impl Strategy<Value = (bool, u64)> {
    prop_oneof![
        (any::<bool>(), 0u64..=16),
        (any::<bool>(), any::<u64>()),
        (any::<bool>(), (0u64..=16).prop_map(|d| u64::MAX - d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Consumer side: the producer's index must lie in [previous tail, head + capacity].
    #[test]
    fn consumer_validates_forged_tail(
        cap in prop_oneof![1u64..=64, Just(4096u64)],
        start in start_index(),
        a in any::<u64>(),
        b in any::<u64>(),
        (inside, d) in window_offset(),
    ) {
        let c = CellCtrl::new(start);
        let mut p = ProducerState::new(cap, start);
        let mut q = ConsumerState::new(cap, start);
        // Legitimate history: a bytes published and seen, b of them consumed.
        let a = a % (cap + 1);
        let b = b % (a + 1);
        p.publish(&c, a).unwrap();
        prop_assert_eq!(q.available(&c, cap).unwrap(), a);
        q.consume(&c, b).unwrap();
        let lo = start.wrapping_add(a);
        let hi = start.wrapping_add(b).wrapping_add(cap);
        let width = hi.wrapping_sub(lo);
        let forged = if inside {
            lo.wrapping_add(d % (width + 1))
        } else {
            // Past `hi`: anything from hi + 1 round to lo - 1 (`width <= cap`, so there are
            // `u64::MAX - width > 0` such values).
            hi.wrapping_add(1 + d % (u64::MAX - width))
        };
        c.tail.set(forged);
        let res = q.refresh_tail(&c);
        if inside {
            prop_assert_eq!(res, Ok(()));
            prop_assert_eq!(q.cached(), forged.wrapping_sub(start.wrapping_add(b)));
            prop_assert!(q.cached() <= cap);
        } else {
            prop_assert_eq!(res, Err(RingError::Corrupt {
                what: "producer index outside [previous tail, head + capacity]",
                value: forged, lo, hi,
            }));
            // Refused values change nothing: the state still accepts the true index.
            prop_assert_eq!(q.cached(), a - b);
            c.tail.set(lo);
            prop_assert_eq!(q.available(&c, cap).unwrap(), a - b);
            // And through the other entry points too, when they re-read the index (a full
            // ring never needs to).
            if a - b < cap {
                c.tail.set(forged);
                prop_assert!(corrupt(&q.available(&c, cap)));
                prop_assert!(corrupt(&q.prepare_sleep(&c, cap)));
            }
        }
    }

    /// Producer side: the consumer's index must lie in [previous head, tail].
    #[test]
    fn producer_validates_forged_head(
        cap in prop_oneof![1u64..=64, Just(4096u64)],
        start in start_index(),
        a in any::<u64>(),
        b in any::<u64>(),
        (inside, d) in window_offset(),
    ) {
        let c = CellCtrl::new(start);
        let mut p = ProducerState::new(cap, start);
        let mut q = ConsumerState::new(cap, start);
        let a = a % (cap + 1);
        let b = b % (a + 1);
        p.publish(&c, a).unwrap();
        prop_assert_eq!(q.available(&c, cap).unwrap(), a);
        q.consume(&c, b).unwrap();
        prop_assert_eq!(p.free(&c, cap).unwrap(), cap - (a - b));
        let lo = start.wrapping_add(b);
        let hi = start.wrapping_add(a);
        let width = a - b;
        let forged = if inside {
            lo.wrapping_add(d % (width + 1))
        } else {
            hi.wrapping_add(1 + d % (u64::MAX - width))
        };
        c.head.set(forged);
        let res = p.refresh_head(&c);
        if inside {
            prop_assert_eq!(res, Ok(()));
            prop_assert_eq!(p.unconsumed(), hi.wrapping_sub(forged));
            prop_assert_eq!(p.free(&c, 0).unwrap(), cap - hi.wrapping_sub(forged));
        } else {
            prop_assert_eq!(res, Err(RingError::Corrupt {
                what: "consumer index outside [previous head, tail]",
                value: forged, lo, hi,
            }));
            prop_assert_eq!(p.unconsumed(), a - b);
            if a > b {
                // The cached free space is short of `cap`, so these re-read the forged index.
                prop_assert!(corrupt(&p.free(&c, cap)));
                prop_assert!(corrupt(&p.prepare_sleep(&c, cap)));
            }
            c.head.set(lo);
            prop_assert_eq!(p.free(&c, cap).unwrap(), cap - (a - b));
        }
    }

    /// The same windows through the region and the stream API: a hostile peer's store is
    /// refused with `Corrupt` by `try_read`/`available`/`try_write`, never a panic.
    #[test]
    fn stream_api_validates_forged_indices(
        dir in direction(),
        a in 0usize..=4096,
        b in any::<usize>(),
        (inside, d) in window_offset(),
        forge_tail in any::<bool>(),
    ) {
        let cap = 4096u64;
        let params = Params { capacity: [cap, cap], max_message: None };
        let heap = region(&params);
        let shm = heap.region();
        let g = params.ring(dir);
        let mut w = StreamWriter::new(g);
        let mut r = StreamReader::new(g);
        let b = b % (a + 1);
        let mut nop = || {};
        prop_assert_eq!(w.try_write(shm, &bytes(1, a), &mut nop).unwrap(), a);
        prop_assert_eq!(r.available(shm).unwrap(), a as u64);
        prop_assert_eq!(r.try_read(shm, &mut vec![0; b], &mut nop).unwrap(), b);
        let (a, b) = (a as u64, b as u64);
        if forge_tail {
            // Window [a, b + cap].
            let width = b + cap - a;
            let forged = if inside { a + d % (width + 1) } else { (b + cap).wrapping_add(1 + d % (u64::MAX - width)) };
            shm.store_u64(g.ctrl + off::TAIL, forged, Ordering::Release).unwrap();
            let res = r.available(shm);
            let read = r.try_read(shm, &mut [0; 4096], &mut nop);
            if inside {
                prop_assert_eq!(res, Ok(forged - b));
                prop_assert_eq!(read, Ok((forged - b) as usize));
            } else {
                prop_assert!(corrupt(&res), "{res:?}");
                if a - b < cap {
                    prop_assert!(corrupt(&read), "{read:?}");
                } else {
                    // A full ring is read from the cached index, without re-reading.
                    prop_assert_eq!(read, Ok(cap as usize));
                }
            }
        } else {
            let wc = w.ctrl(shm).unwrap();
            w.state().refresh_head(&wc).unwrap();
            // Window [b, a].
            let width = a - b;
            let forged = if inside { b + d % (width + 1) } else { a.wrapping_add(1 + d % (u64::MAX - width)) };
            shm.store_u64(g.ctrl + off::HEAD, forged, Ordering::Release).unwrap();
            let res = w.try_write(shm, &[0; 4096], &mut nop);
            if inside {
                prop_assert_eq!(res, Ok((cap - (a - forged)) as usize));
            } else if a > b {
                prop_assert!(corrupt(&res), "{res:?}");
            } else {
                // An empty ring never needs the consumer's index: the write fills it. The next
                // write re-reads it, against the window [b, a + cap] that has grown.
                prop_assert_eq!(res, Ok(cap as usize));
                let next = w.try_write(shm, &[0], &mut nop);
                if forged.wrapping_sub(b) <= cap {
                    prop_assert_eq!(next, Ok(usize::from(forged != b)));
                } else {
                    prop_assert!(corrupt(&next), "{next:?}");
                }
            }
        }
        // The header is never touched by ring operations.
        let mut header = vec![0u8; off::RING_CTRL];
        shm.read_bytes(0, &mut header).unwrap();
        let mut fresh = vec![0u8; off::RING_CTRL];
        region(&params).region().read_bytes(0, &mut fresh).unwrap();
        prop_assert_eq!(header, fresh);
    }
}
