//! The fuzz logic, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and the regular
//! test `crates/ivcom-ring/tests/fuzz_corpus.rs`, which replays `fuzz/corpus/<target>/` and
//! random inputs in the normal test suite. Both include this file with `#[path]`; it depends
//! on `ivcom-ring` and `std` only.
//!
//! - [`region_header`]: arbitrary bytes become a region; `layout::validate` in both modes must
//!   not panic, must not write, and what it accepts must satisfy the layout's bounds.
//! - [`ring_ops`]: a region made by `layout::init`, then a sequence of operations decoded
//!   from the input that interleaves a hostile peer's stores into the ring (indices, sleep
//!   and closed words, data bytes, the next message's length prefix) with our readers',
//!   writers' and states' calls. Errors are fine; a panic, an out-of-bounds access, a state
//!   believing in more than a ring's worth of bytes, or a write outside the ring are not.
//!
//! Input format of [`ring_ops`] (bytes past the end read as zero): one configuration byte
//! (see [`Config::decode`]), then operations, each an opcode byte (see [`Op`]) and its
//! arguments. [`Ops`] encodes the same format for hand-made seeds.
#![allow(dead_code)]

use std::sync::atomic::Ordering;

use ivcom_ring::layout::{self, off, Direction, Params, HEADER_SIZE, MESSAGE_HEADER};
use ivcom_ring::{
    HeapRegion, MessageReader, MessageWriter, RingError, ShmCtrl, ShmRegion, StreamReader, StreamWriter,
};

/// Largest region `region_header` allocates (a header claiming more is tried at its own length).
const MAX_FUZZ_REGION: u64 = 1 << 22;

/// Reads little-endian integers off the input; past its end every read is zero.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
        }
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

// ---------------------------------------------------------------------------------------------
// region_header
// ---------------------------------------------------------------------------------------------

/// Input: one byte choosing the region's length, then the region's first bytes (the rest of
/// the region is zero).
///
/// Length modes (`byte % 4`): 0: the length of the rest of the input; 1: the `region_size`
/// the header claims (if at most 4 MiB), so consistent headers can pass; 2: the smallest
/// valid region (4096 + 2 * 4096); 3: `byte * 8` (always below a header's size).
///
/// Returns in how many of the two modes the header was accepted (0 or 1).
pub fn region_header(data: &[u8]) -> usize {
    let (mode, rest) = match data.split_first() {
        Some((&m, rest)) => (m, rest),
        None => (0, data),
    };
    let claimed = rest.get(off::REGION_SIZE..off::REGION_SIZE + 8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    });
    let len = match mode % 4 {
        0 => rest.len(),
        1 => match claimed {
            Some(c) if c <= MAX_FUZZ_REGION => c as usize,
            _ => rest.len(),
        },
        2 => HEADER_SIZE + 2 * layout::MIN_CAPACITY as usize,
        _ => usize::from(mode) * 8,
    };
    let heap = HeapRegion::new(len);
    let shm = heap.region();
    let n = rest.len().min(len);
    shm.write_bytes(0, &rest[..n]).expect("in bounds");
    // `validate` reads the header page only; the bytes the input set (and a little more)
    // are compared afterwards to check it wrote nothing.
    let watched = len.min(HEADER_SIZE.max(n) + 64);
    let before = snapshot_prefix(shm, watched);

    let mut accepted = 0;
    for expect_messages in [false, true] {
        let Ok(params) = layout::validate(shm, expect_messages) else { continue };
        check_params(shm, &params, expect_messages);
        accepted += 1;
    }
    assert!(accepted <= 1, "accepted in both modes");
    assert!(snapshot_prefix(shm, watched) == before, "validate wrote to the region");
    accepted
}

/// What an accepted header must satisfy.
fn check_params(shm: &ShmRegion, params: &Params, expect_messages: bool) {
    assert_eq!(params.check(), Ok(()), "accepted params fail their own check: {params:?}");
    assert_eq!(params.region_size(), Ok(shm.len()), "accepted params disagree with the mapping");
    assert_eq!(params.max_message.is_some(), expect_messages);
    let mut ends = Vec::new();
    for dir in [Direction::ToListener, Direction::ToConnector] {
        let g = params.ring(dir);
        assert!(g.capacity.is_power_of_two());
        assert!((layout::MIN_CAPACITY..=layout::MAX_CAPACITY).contains(&g.capacity));
        assert!(g.ctrl >= off::RING_CTRL && g.ctrl + off::RING_CTRL_SIZE <= HEADER_SIZE);
        assert!(g.data >= HEADER_SIZE);
        let end = g.data as u64 + g.capacity;
        assert!(end <= shm.len() as u64, "ring data past the mapping: {g:?}");
        ends.push((g.data as u64, end));
        if let Some(max) = params.max_message {
            assert!(max > 0 && u64::from(max) + MESSAGE_HEADER <= g.capacity);
        }
    }
    assert!(ends[0].1 <= ends[1].0 || ends[1].1 <= ends[0].0, "rings overlap: {ends:?}");
    // What `init` writes for these params validates to the same params.
    let fresh = HeapRegion::new(shm.len());
    layout::init(fresh.region(), params).expect("init of accepted params");
    assert_eq!(layout::validate(fresh.region(), expect_messages).as_ref(), Ok(params));
}

fn snapshot(shm: &ShmRegion) -> Vec<u8> {
    snapshot_prefix(shm, shm.len())
}

fn snapshot_prefix(shm: &ShmRegion, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    shm.read_bytes(0, &mut v).expect("in bounds");
    v
}

// ---------------------------------------------------------------------------------------------
// ring_ops
// ---------------------------------------------------------------------------------------------

/// The region and ring a `ring_ops` run works on.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub params: Params,
    pub dir: Direction,
}

impl Config {
    /// Bit 0: message mode; bit 1: ring 1 (to connector) instead of ring 0; bit 2: the ring
    /// under test has 8192 bytes instead of 4096; bit 3: the other ring has 8192; bits 4..8
    /// choose the maximum message size (1, 16, capacity - 4, or one in between).
    pub fn decode(b: u8) -> Self {
        let messages = b & 1 != 0;
        let dir = if b & 2 != 0 { Direction::ToConnector } else { Direction::ToListener };
        let cap = if b & 4 != 0 { 8192 } else { 4096 };
        let other = if b & 8 != 0 { 8192 } else { 4096 };
        let mut capacity = [other, other];
        capacity[dir as usize] = cap;
        let smallest = capacity[0].min(capacity[1]) as u32;
        let sel = b >> 4;
        let max = match sel % 4 {
            0 => 1,
            1 => 16,
            2 => smallest - MESSAGE_HEADER as u32,
            _ => 1 + u32::from(sel) * 251,
        };
        Self { params: Params { capacity, max_message: messages.then_some(max) }, dir }
    }

    /// Inverse of [`Config::decode`] for seed building.
    pub fn encode(messages: bool, dir: Direction, cap8k: bool, other8k: bool, max_sel: u8) -> u8 {
        u8::from(messages)
            | (dir as u8) << 1
            | u8::from(cap8k) << 2
            | u8::from(other8k) << 3
            | (max_sel & 15) << 4
    }
}

/// Operation codes of `ring_ops` (the opcode byte is taken modulo [`Op::COUNT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Peer stores the producer index: a [`PeerValue`] relative to the current tail.
    PeerTail,
    /// Peer stores the consumer index: a [`PeerValue`] relative to the current head.
    PeerHead,
    /// Peer stores a u32 into the producer sleep word.
    PeerProducerSleep,
    /// Peer stores a u32 into the producer closed word.
    PeerProducerClosed,
    /// Peer stores a u32 into the consumer sleep word.
    PeerConsumerSleep,
    /// Peer stores a u32 into the consumer closed word.
    PeerConsumerClosed,
    /// Peer writes bytes into the data area: u16 position, u8 length, the bytes (wrapping).
    PeerData,
    /// Peer writes a u32 length prefix at the next message's position (our reader's head).
    PeerLengthPrefix,
    /// `StreamWriter::try_write` of u16 bytes.
    StreamWrite,
    /// `StreamReader::try_read` into a u16-byte buffer.
    StreamRead,
    /// `StreamReader::available`.
    StreamAvailable,
    /// `MessageWriter::try_send` of a u16-byte message.
    MessageSend,
    /// `MessageReader::try_recv` into a u16-byte buffer.
    MessageRecv,
    /// `MessageReader::peek_len`.
    MessagePeek,
    /// A `ProducerState` method of the stream writer: u8 selector, u16 argument.
    StreamWriterState,
    /// A `ConsumerState` method of the stream reader: u8 selector, u16 argument.
    StreamReaderState,
    /// A `ProducerState` method of the message writer: u8 selector, u16 argument.
    MessageWriterState,
    /// A `ConsumerState` method of the message reader: u8 selector, u16 argument.
    MessageReaderState,
}

impl Op {
    pub const COUNT: u8 = 18;

    fn decode(b: u8) -> Self {
        use Op::*;
        const ALL: [Op; Op::COUNT as usize] = [
            PeerTail,
            PeerHead,
            PeerProducerSleep,
            PeerProducerClosed,
            PeerConsumerSleep,
            PeerConsumerClosed,
            PeerData,
            PeerLengthPrefix,
            StreamWrite,
            StreamRead,
            StreamAvailable,
            MessageSend,
            MessageRecv,
            MessagePeek,
            StreamWriterState,
            StreamReaderState,
            MessageWriterState,
            MessageReaderState,
        ];
        ALL[usize::from(b % Self::COUNT)]
    }
}

/// How a peer's index store is chosen (selector byte `% 4`, then its argument):
/// 0: an absolute u64; 1: current value + signed i16; 2: current value + capacity + signed i16;
/// 3: current value - capacity + signed i16.
pub fn peer_value(inp: &mut Input, current: u64, cap: u64) -> u64 {
    match inp.u8() % 4 {
        0 => inp.u64(),
        1 => current.wrapping_add(inp.u16() as i16 as u64),
        2 => current.wrapping_add(cap).wrapping_add(inp.u16() as i16 as u64),
        _ => current.wrapping_sub(cap).wrapping_add(inp.u16() as i16 as u64),
    }
}

/// Our side of the ring: both ends, in both framings (several producers or consumers on one
/// ring are hostile to each other, which is fine: each validates what it reads).
struct Ends {
    sw: StreamWriter,
    sr: StreamReader,
    mw: MessageWriter,
    mr: MessageReader,
}

/// A failure of ours, not the peer's: these must never come back from ring operations on a
/// validated geometry.
fn check_err(e: &RingError) {
    assert!(!matches!(e, RingError::OutOfBounds(_)), "out-of-bounds access on validated geometry: {e}");
}

fn ok_or_check<T>(r: Result<T, RingError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            check_err(&e);
            None
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Runs one `ring_ops` input.
pub fn ring_ops(data: &[u8]) {
    let mut inp = Input::new(data);
    let cfg = Config::decode(inp.u8());
    let params = cfg.params;
    let heap = HeapRegion::new(params.region_size().expect("decoded params are valid"));
    let shm = heap.region();
    layout::init(shm, &params).expect("init");
    assert_eq!(layout::validate(shm, params.max_message.is_some()), Ok(params));
    let g = params.ring(cfg.dir);
    let cap = g.capacity;
    // Everything outside this ring's control block and data area, which nothing may change.
    let outside = |shm: &ShmRegion| {
        let mut v = snapshot(shm);
        v[g.ctrl..g.ctrl + off::RING_CTRL_SIZE].fill(0);
        v[g.data..g.data + cap as usize].fill(0);
        v
    };
    let before = outside(shm);
    let max = params.max_message.unwrap_or(layout::MIN_CAPACITY as u32 - MESSAGE_HEADER as u32);
    let mut ends = Ends {
        sw: StreamWriter::new(g),
        sr: StreamReader::new(g),
        mw: MessageWriter::new(g, max),
        mr: MessageReader::new(g, max),
    };
    let ctrl = ShmCtrl::new(shm, g.ctrl).expect("validated geometry");
    let mut wakes = 0u64;
    let mut ops = 0;
    while !inp.is_empty() && ops < 4096 {
        ops += 1;
        step(&mut inp, shm, &ctrl, g.ctrl, g.data, cap, max, &mut ends, &mut wakes);
    }
    assert!(outside(shm) == before, "a ring operation wrote outside its ring");
}

#[allow(clippy::too_many_arguments)]
fn step(
    inp: &mut Input,
    shm: &ShmRegion,
    ctrl: &ShmCtrl,
    ctrl_off: usize,
    data_off: usize,
    cap: u64,
    max: u32,
    e: &mut Ends,
    wakes: &mut u64,
) {
    let r = Ordering::Relaxed;
    let mut wake = || *wakes += 1;
    match Op::decode(inp.u8()) {
        Op::PeerTail => {
            let cur = shm.load_u64(ctrl_off + off::TAIL, r).expect("in bounds");
            let v = peer_value(inp, cur, cap);
            shm.store_u64(ctrl_off + off::TAIL, v, Ordering::Release).expect("in bounds");
        }
        Op::PeerHead => {
            let cur = shm.load_u64(ctrl_off + off::HEAD, r).expect("in bounds");
            let v = peer_value(inp, cur, cap);
            shm.store_u64(ctrl_off + off::HEAD, v, Ordering::Release).expect("in bounds");
        }
        Op::PeerProducerSleep => {
            shm.store_u32(ctrl_off + off::PRODUCER_SLEEP, inp.u32(), r).expect("in bounds")
        }
        Op::PeerProducerClosed => {
            shm.store_u32(ctrl_off + off::PRODUCER_CLOSED, inp.u32(), r).expect("in bounds")
        }
        Op::PeerConsumerSleep => {
            shm.store_u32(ctrl_off + off::CONSUMER_SLEEP, inp.u32(), r).expect("in bounds")
        }
        Op::PeerConsumerClosed => {
            shm.store_u32(ctrl_off + off::CONSUMER_CLOSED, inp.u32(), r).expect("in bounds")
        }
        Op::PeerData => {
            let pos = u64::from(inp.u16());
            let len = u64::from(inp.u8());
            for i in 0..len {
                let at = data_off + ((pos + i) & (cap - 1)) as usize;
                shm.write_bytes(at, &[inp.u8()]).expect("in bounds");
            }
        }
        Op::PeerLengthPrefix => {
            let head = e.mr.stream().state().head();
            let v = inp.u32().to_le_bytes();
            for (i, b) in v.iter().enumerate() {
                let at = data_off + (head.wrapping_add(i as u64) & (cap - 1)) as usize;
                shm.write_bytes(at, &[*b]).expect("in bounds");
            }
        }
        Op::StreamWrite => {
            let len = usize::from(inp.u16()) % (2 * cap as usize + 1);
            let buf = pattern(len, inp.u8());
            if let Some(n) = ok_or_check(e.sw.try_write(shm, &buf, &mut wake)) {
                assert!(n <= len);
            }
        }
        Op::StreamRead => {
            let len = usize::from(inp.u16()) % (2 * cap as usize + 1);
            let mut buf = vec![0u8; len];
            if let Some(n) = ok_or_check(e.sr.try_read(shm, &mut buf, &mut wake)) {
                assert!(n <= len);
            }
        }
        Op::StreamAvailable => {
            if let Some(n) = ok_or_check(e.sr.available(shm)) {
                assert!(n <= cap, "reader believes {n} bytes are available in a {cap}-byte ring");
            }
        }
        Op::MessageSend => {
            let len = usize::from(inp.u16()) % (max as usize + 64);
            let msg = pattern(len, inp.u8());
            match e.mw.try_send(shm, &msg, &mut wake) {
                Err(RingError::MessageTooLarge { len: l, max: m }) => {
                    assert!(l == len && m == max && len > max as usize)
                }
                Err(err) => check_err(&err),
                Ok(_) => assert!(len <= max as usize),
            }
        }
        Op::MessageRecv => {
            let len = usize::from(inp.u16()) % (max as usize + 64);
            let mut buf = vec![0u8; len];
            match e.mr.try_recv(shm, &mut buf, &mut wake) {
                Ok(Some(n)) => assert!(n <= len && n <= max as usize),
                Ok(None) => {}
                Err(RingError::BufferTooSmall { len: l, buf: b }) => {
                    assert!(b == len && l > len && l <= max as usize)
                }
                Err(err) => check_err(&err),
            }
        }
        Op::MessagePeek => {
            if let Some(Some(n)) = ok_or_check(e.mr.peek_len(shm)) {
                assert!(n <= max as usize);
            }
        }
        Op::StreamWriterState => producer_op(inp, ctrl, cap, e.sw.state(), &mut wake),
        Op::StreamReaderState => consumer_op(inp, ctrl, cap, e.sr.state(), &mut wake),
        Op::MessageWriterState => producer_op(inp, ctrl, cap, e.mw.stream().state(), &mut wake),
        Op::MessageReaderState => consumer_op(inp, ctrl, cap, e.mr.stream().state(), &mut wake),
    }
}

/// One `ProducerState` method, selected by a byte; `publish` only of space known to be free
/// (its precondition).
fn producer_op(
    inp: &mut Input,
    c: &ShmCtrl,
    cap: u64,
    st: &mut ivcom_ring::ProducerState,
    wake: &mut impl FnMut(),
) {
    let sel = inp.u8() % 6;
    let arg = u64::from(inp.u16());
    match sel {
        0 => {
            if let Some(f) = ok_or_check(st.free(c, arg)) {
                assert!(f <= cap, "producer believes {f} bytes are free in a {cap}-byte ring");
            }
        }
        1 => {
            ok_or_check(st.refresh_head(c));
        }
        2 => {
            let want = arg % cap + 1;
            ok_or_check(st.prepare_sleep(c, want));
        }
        3 => {
            ok_or_check(st.end_sleep(c));
        }
        4 => {
            if ok_or_check(st.close(c)) == Some(true) {
                wake();
            }
        }
        _ => {
            if let Some(f) = ok_or_check(st.free(c, arg)) {
                if ok_or_check(st.publish(c, arg.min(f))) == Some(true) {
                    wake();
                }
            }
        }
    }
    assert!(st.unconsumed() <= cap, "producer believes {} bytes are unconsumed", st.unconsumed());
}

/// One `ConsumerState` method, selected by a byte; `consume` only of bytes known to be there.
fn consumer_op(
    inp: &mut Input,
    c: &ShmCtrl,
    cap: u64,
    st: &mut ivcom_ring::ConsumerState,
    wake: &mut impl FnMut(),
) {
    let sel = inp.u8() % 7;
    let arg = u64::from(inp.u16());
    match sel {
        0 => {
            if let Some(a) = ok_or_check(st.available(c, arg)) {
                assert!(a <= cap, "consumer believes {a} bytes are available in a {cap}-byte ring");
            }
        }
        1 => {
            ok_or_check(st.refresh_tail(c));
        }
        2 => {
            let want = arg % cap + 1;
            // A second `prepare_sleep` without `end_sleep` in between makes the sequence even
            // again (not armed) while still answering "sleep": a misuse of ours that the
            // real callers must avoid, so the check only holds from an unarmed state.
            let was_armed = st.is_armed();
            if ok_or_check(st.prepare_sleep(c, want)) == Some(true) && !was_armed {
                assert!(st.is_armed());
            }
        }
        3 => {
            ok_or_check(st.end_sleep(c));
            assert!(!st.is_armed());
        }
        4 => {
            if ok_or_check(st.close(c)) == Some(true) {
                wake();
            }
        }
        5 => {
            ok_or_check(st.producer_closed(c));
        }
        _ => {
            let n = arg.min(st.cached());
            if ok_or_check(st.consume(c, n)) == Some(true) {
                wake();
            }
        }
    }
    assert!(st.cached() <= cap, "consumer believes {} bytes are available", st.cached());
}

// ---------------------------------------------------------------------------------------------
// Seed building
// ---------------------------------------------------------------------------------------------

/// Builds `ring_ops` inputs op by op (for hand-made seeds).
pub struct Ops(pub Vec<u8>);

impl Ops {
    pub fn new(config: u8) -> Self {
        Self(vec![config])
    }
    fn op(mut self, op: Op) -> Self {
        self.0.push(op as u8);
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn peer_tail_abs(self, v: u64) -> Self {
        self.op(Op::PeerTail).bytes(&[0]).bytes(&v.to_le_bytes())
    }
    pub fn peer_tail_rel(self, delta: i16, plus_cap: bool) -> Self {
        self.op(Op::PeerTail).bytes(&[if plus_cap { 2 } else { 1 }]).bytes(&delta.to_le_bytes())
    }
    pub fn peer_head_abs(self, v: u64) -> Self {
        self.op(Op::PeerHead).bytes(&[0]).bytes(&v.to_le_bytes())
    }
    pub fn peer_head_rel(self, delta: i16) -> Self {
        self.op(Op::PeerHead).bytes(&[1]).bytes(&delta.to_le_bytes())
    }
    pub fn peer_u32(self, op: Op, v: u32) -> Self {
        self.op(op).bytes(&v.to_le_bytes())
    }
    pub fn peer_data(self, pos: u16, data: &[u8]) -> Self {
        self.op(Op::PeerData).bytes(&pos.to_le_bytes()).bytes(&[data.len() as u8]).bytes(data)
    }
    pub fn peer_len_prefix(self, v: u32) -> Self {
        self.op(Op::PeerLengthPrefix).bytes(&v.to_le_bytes())
    }
    pub fn write(self, len: u16) -> Self {
        self.op(Op::StreamWrite).bytes(&len.to_le_bytes()).bytes(&[0x5a])
    }
    pub fn read(self, len: u16) -> Self {
        self.op(Op::StreamRead).bytes(&len.to_le_bytes())
    }
    pub fn available(self) -> Self {
        self.op(Op::StreamAvailable)
    }
    pub fn send(self, len: u16) -> Self {
        self.op(Op::MessageSend).bytes(&len.to_le_bytes()).bytes(&[0xa5])
    }
    pub fn recv(self, len: u16) -> Self {
        self.op(Op::MessageRecv).bytes(&len.to_le_bytes())
    }
    pub fn peek(self) -> Self {
        self.op(Op::MessagePeek)
    }
    /// `op` is one of the four `*State` ops; `sel` the method selector.
    pub fn state(self, op: Op, sel: u8, arg: u16) -> Self {
        self.op(op).bytes(&[sel]).bytes(&arg.to_le_bytes())
    }
}

// ---------------------------------------------------------------------------------------------
// directory_ops
// ---------------------------------------------------------------------------------------------

/// The multi-channel directory (`ivcom_ring::directory`) against a hostile peer.
///
/// Input: one configuration byte (peers `1 + b % 4`, slot capacity `4096 << (b / 4 % 3)`),
/// then operations, each an opcode byte (`% 8`) and its arguments:
/// 0: the peer stores a u64 (offset u32, value u64) anywhere past the header;
/// 1: the peer stores a u32 likewise; 2: we bind name `n<u8 % 4>`; 3: we look a name up and
/// request a channel to it; 4: we answer the requests addressed to us (accept if the u8 is
/// even) and acknowledge finished ones; 5: we release one of our channels (u8 picks);
/// 6: we reclaim; 7: the peer rewrites a header field (offset u8 * 8, value u64) and we
/// attach again.
/// Errors are fine; a panic, an access outside the region, a slot we do not own, or a
/// request or name outside the validated bounds are not.
pub fn directory_ops(data: &[u8]) {
    use ivcom_ring::directory::{self, Directory, ListenerAnswer, Owned, PeerState, Spec};

    const SIZE: usize = 512 * 1024;
    let mut inp = Input::new(data);
    let cfg = inp.u8();
    let spec = Spec {
        peers: 1 + u32::from(cfg % 4),
        listeners_per_peer: 4,
        slot_capacity: 4096 << (cfg / 4 % 3),
        managed: true,
    };
    let heap = HeapRegion::new(SIZE);
    let shm = heap.region();
    let Ok(geom) = directory::format(shm, &spec) else { return };
    let dir = Directory::new(shm, geom).expect("formatted geometry");
    for p in 0..geom.peers {
        dir.set_peer(p, PeerState { epoch: 1, alive: true }).unwrap();
    }
    let alive = |p: u32| dir.peer(p).map(|s| s.alive).unwrap_or(false);
    let gone = |p: u32, e: u64| dir.peer(p).map(|s| s.epoch != e || !s.alive).unwrap_or(true);
    let mut me = Owned::claim(&dir, 0).unwrap();
    let mut held: Vec<(u32, u32)> = Vec::new();
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        steps += 1;
        match inp.u8() % 8 {
            0 => {
                let o = 4096 + (inp.u32() as usize % (geom.slots_off - 4096)) / 8 * 8;
                shm.store_u64(o, inp.u64(), Ordering::Relaxed).unwrap();
            }
            1 => {
                let o = 4096 + (inp.u32() as usize % (geom.slots_off - 4096)) / 4 * 4;
                shm.store_u32(o, inp.u32(), Ordering::Relaxed).unwrap();
            }
            2 => {
                let _ = me.bind(&dir, &format!("n{}", inp.u8() % 4), &alive);
            }
            3 => {
                let name = format!("n{}", inp.u8() % 4);
                if let Ok(Some(l)) = dir.lookup(&name, &alive, None) {
                    assert!(l.peer < geom.peers && l.index < geom.listeners_per_peer);
                    let epoch = dir.peer(l.peer).map(|s| s.epoch).unwrap_or(0);
                    if let Ok((slot, gen)) = me.request(&dir, l, epoch, &gone) {
                        assert_eq!(geom.slot_owner(slot), 0, "allocated a slot we do not own");
                        let (o, len) = geom.slot_range(slot);
                        assert!(o + len <= SIZE);
                        held.push((slot, gen));
                    }
                }
            }
            4 => {
                let accept = inp.u8().is_multiple_of(2);
                for slot in 0..geom.slots() + 2 {
                    if let Ok(Some(r)) = dir.request(slot, 0) {
                        assert!(
                            r.slot < geom.slots() && r.index < geom.listeners_per_peer && r.from < geom.peers
                        );
                        assert!(r.vector <= directory::MAX_VECTOR);
                        assert!(dir.listener_vector(slot).unwrap() <= directory::MAX_VECTOR);
                        let a = if accept && me.addresses_us(&r, 1) {
                            ListenerAnswer::Accepted
                        } else {
                            ListenerAnswer::Refused
                        };
                        dir.set_answer(slot, r.gen, a).unwrap();
                    }
                    if let Ok(Some(gen)) = dir.finished_by_connector(slot, 0) {
                        dir.set_answer(slot, gen, ListenerAnswer::Closed).unwrap();
                    }
                }
            }
            5 => {
                if !held.is_empty() {
                    let (slot, gen) = held.swap_remove(inp.u8() as usize % held.len());
                    me.release(&dir, slot, gen, &gone).unwrap();
                }
            }
            6 => me.reclaim(&dir, &gone).unwrap(),
            _ => {
                let o = (inp.u8() as usize % 12) * 8;
                shm.store_u64(o, inp.u64(), Ordering::Relaxed).unwrap();
                if let Ok(g) = directory::attach(shm) {
                    // What attach accepts lies inside the region.
                    let (o, len) = g.slot_range(g.slots() - 1);
                    assert!(o + len <= SIZE);
                    assert!(Directory::new(shm, g).is_ok());
                }
            }
        }
        let (busy, draining, free) = me.slot_counts();
        assert_eq!(busy + draining + free, geom.slots_per_peer as usize);
    }
}
