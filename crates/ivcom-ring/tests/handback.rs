//! Property test of the TCP handback protocol (`docs/protocols.md`, "Handback"; the region
//! words are `layout::tcp`): two sides of a switched connection exchange data through the
//! rings, send counted wakeup bytes over their TCP streams, and at arbitrary points either
//! side (or both, one after the other) hands the connection back, while the other keeps
//! writing and reading in any interleaving, or closes and does nothing more. Whatever happens, each side must read exactly the
//! bytes the other wrote, in order: none lost, duplicated or reordered, no wakeup byte taken
//! for data and no data byte taken for a wakeup.
//!
//! The sides follow the rules `crates/ivcom-interpose/src/conn.rs` implements: reading goes
//! ring → (after the stop index) the peer's remaining counted wakeup bytes → TCP data; writing
//! goes ring → (once the peer stopped reading) push the unread ring bytes over TCP → TCP.
//! TCP streams are in-order byte queues here; data bytes are never 0, wakeup bytes always are,
//! so a miscount shows up as a wrong byte.

use std::collections::VecDeque;

use ivcom_ring::layout::{self, tcp};
use ivcom_ring::{Direction, HeapRegion, Params, ShmRegion, StreamReader, StreamWriter};
use proptest::prelude::*;

const CAP: u64 = 4096;

#[derive(Debug)]
struct Side {
    idx: usize,
    w: StreamWriter,
    r: StreamReader,
    /// Everything this side's program wrote (accepted bytes), in order.
    wrote: Vec<u8>,
    /// Everything this side's program read, in order.
    read: Vec<u8>,
    next: u8,
    rx_plain: bool,
    tx_plain: bool,
    push: Option<u64>,
    /// The program closed its socket (FIN sent): the side does nothing more.
    closed: bool,
}

impl Side {
    fn new(idx: usize, params: &Params) -> Side {
        let (mine, theirs) = if idx == 0 {
            (Direction::ToListener, Direction::ToConnector)
        } else {
            (Direction::ToConnector, Direction::ToListener)
        };
        Side {
            idx,
            w: StreamWriter::new(params.ring(mine)),
            r: StreamReader::new(params.ring(theirs)),
            wrote: Vec::new(),
            read: Vec::new(),
            next: 1,
            rx_plain: false,
            tx_plain: false,
            push: None,
            closed: false,
        }
    }

    fn peer(&self) -> usize {
        1 - self.idx
    }

    fn data(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let b = self.next;
                self.next = if self.next == 255 { 1 } else { self.next + 1 };
                b
            })
            .collect()
    }

    /// A counted wakeup byte onto our TCP stream (`out`), unless frozen.
    fn wake(&self, shm: &ShmRegion, out: &mut VecDeque<u8>) {
        if tcp::reserve_wake(shm, self.idx).unwrap() {
            out.push_back(0);
            tcp::wake_sent(shm, self.idx).unwrap();
        }
    }

    /// The writing rules: push first if the peer stopped reading; then the ring or TCP.
    fn write(&mut self, shm: &ShmRegion, n: usize, out: &mut VecDeque<u8>) {
        self.follow_tx(shm, out);
        let bytes = self.data(n);
        if self.tx_plain {
            out.extend(&bytes);
            self.wrote.extend(&bytes);
            return;
        }
        let mut wake = false;
        let put = self.w.try_write(shm, &bytes, &mut || wake = true).unwrap();
        self.wrote.extend(&bytes[..put]);
        // Bytes that did not fit were never accepted: give their values back.
        for _ in put..n {
            self.next = if self.next == 1 { 255 } else { self.next - 1 };
        }
        if wake || put > 0 {
            self.wake(shm, out);
        }
    }

    fn follow_tx(&mut self, shm: &ShmRegion, out: &mut VecDeque<u8>) {
        if self.tx_plain {
            return;
        }
        if self.push.is_none() {
            if tcp::tx_stop(shm, self.idx).unwrap().is_some() {
                self.tx_plain = true;
                return;
            }
            let Some(stop) = tcp::rx_stop(shm, self.peer()).unwrap() else { return };
            tcp::store_tx_stop(shm, self.idx, self.w.state().tail()).unwrap();
            self.push = Some(stop);
        }
        let mut buf = [0u8; 512];
        while let Some(from) = self.push {
            let n = self.w.copy_published(shm, from, &mut buf).unwrap();
            if n == 0 {
                self.push = None;
                self.tx_plain = true;
                break;
            }
            out.extend(&buf[..n]);
            self.push = Some(from + n as u64);
        }
    }

    /// The reading rules: ring up to the stop index, then the peer's counted wakeup bytes,
    /// then TCP data. Reads at most `n` bytes.
    fn read_some(&mut self, shm: &ShmRegion, n: usize, inp: &mut VecDeque<u8>, out: &mut VecDeque<u8>) {
        self.follow_tx(shm, out);
        for _ in 0..4 {
            if self.rx_plain {
                let k = n.min(inp.len());
                self.read.extend(inp.drain(..k));
                return;
            }
            let stop = tcp::rx_stop(shm, self.idx).unwrap().or(tcp::tx_stop(shm, self.peer()).unwrap());
            let ring_done = stop.is_some_and(|s| self.r.state().head() >= s);
            if !ring_done {
                let mut buf = vec![0u8; n];
                let mut wake = false;
                let got = self.r.try_read(shm, &mut buf, &mut || wake = true).unwrap();
                self.read.extend(&buf[..got]);
                if wake {
                    self.wake(shm, out);
                }
                // Take the wakeup bytes that are there (counted ones only).
                self.take(shm, inp);
                if got > 0 || stop.is_none() {
                    return;
                }
                continue;
            }
            let (_, frozen) = tcp::wakes(shm, self.peer()).unwrap();
            if !frozen {
                return;
            }
            if self.take(shm, inp) {
                self.rx_plain = true;
            } else {
                return;
            }
        }
    }

    /// Takes the peer's counted wakeup bytes that have arrived; true when none is left.
    fn take(&mut self, shm: &ShmRegion, inp: &mut VecDeque<u8>) -> bool {
        let (w, _) = tcp::wakes(shm, self.peer()).unwrap();
        let taken = tcp::taken(shm, self.idx).unwrap();
        let k = (w - taken).min(inp.len() as u64);
        for _ in 0..k {
            assert_eq!(inp.pop_front(), Some(0), "side {} took a data byte for a wakeup", self.idx);
        }
        tcp::store_taken(shm, self.idx, taken + k).unwrap();
        taken + k == w
    }

    /// The library's `hand_back`. A side whose peer already
    /// handed back with ring bytes this side has not read yet does not: that is the limit
    /// both ends leaving the library at once meet (docs/preload.md), so the model reads them
    /// first, as a side still under the library does.
    /// Hands the connection back; `peer_closed`: the peer's FIN has arrived (it writes
    /// nothing more, and it will not follow: this side reads the peer's ring to its end).
    fn hand_back(
        &mut self,
        shm: &ShmRegion,
        inp: &mut VecDeque<u8>,
        out: &mut VecDeque<u8>,
        peer_closed: bool,
    ) {
        if tcp::rx_stop(shm, self.idx).unwrap().is_some() {
            return;
        }
        if let Some(t) = tcp::tx_stop(shm, self.peer()).unwrap() {
            while self.r.state().head() < t {
                self.read_some(shm, 1 << 16, inp, out);
            }
        }
        if tcp::rx_stop(shm, self.peer()).unwrap().is_some() || self.push.is_some() {
            // The peer stopped reading first: what it did not read goes over TCP first.
            self.follow_tx(shm, out);
        }
        if !self.tx_plain {
            tcp::store_tx_stop(shm, self.idx, self.w.state().tail()).unwrap();
            self.wake(shm, out);
            self.tx_plain = true;
        }
        tcp::freeze_wakes(shm, self.idx).unwrap();
        tcp::freeze_wakes(shm, self.peer()).unwrap();
        let stop = if peer_closed {
            self.r.state().head() + self.r.available(shm).unwrap()
        } else {
            self.r.state().head()
        };
        tcp::store_rx_stop(shm, self.idx, stop).unwrap();
    }

    /// The program's last close: what a peer that stopped reading first left in our ring
    /// goes over TCP first (the library pushes it before the kernel's close); then FIN.
    fn close(&mut self, shm: &ShmRegion, out: &mut VecDeque<u8>) {
        self.follow_tx(shm, out);
        self.closed = true;
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(usize, usize),
    Read(usize, usize),
    Wake(usize),
    HandBack(usize),
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 1..3000usize).prop_map(|(s, n)| Op::Write(s, n)),
        4 => (0..2usize, 1..3000usize).prop_map(|(s, n)| Op::Read(s, n)),
        1 => (0..2usize).prop_map(Op::Wake),
        1 => (0..2usize).prop_map(Op::HandBack),
        1 => (0..2usize).prop_map(Op::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn handback_loses_duplicates_and_reorders_nothing(ops in proptest::collection::vec(op(), 1..120)) {
        let params = Params { capacity: [CAP, CAP], max_message: None };
        let heap = HeapRegion::new(params.region_size().unwrap());
        let shm = heap.region();
        layout::init(shm, &params).unwrap();
        tcp::set_version(shm).unwrap();
        let mut sides = [Side::new(0, &params), Side::new(1, &params)];
        // TCP streams: pipes[i] carries what side i sends.
        let mut pipes = [VecDeque::new(), VecDeque::new()];
        for o in ops {
            let s = match o {
                Op::Write(s, _) | Op::Read(s, _) | Op::Wake(s) | Op::HandBack(s) | Op::Close(s) => s,
            };
            if sides[s].closed {
                continue;
            }
            match o {
                Op::Write(s, n) => sides[s].write(shm, n, &mut pipes[s]),
                Op::Read(s, n) => {
                    let [a, b] = &mut pipes;
                    let (inp, out) = if s == 0 { (b, a) } else { (a, b) };
                    sides[s].read_some(shm, n, inp, out);
                }
                Op::Wake(s) => sides[s].wake(shm, &mut pipes[s]),
                Op::HandBack(s) => {
                    let [a, b] = &mut pipes;
                    let (inp, out) = if s == 0 { (b, a) } else { (a, b) };
                    let peer_closed = sides[1 - s].closed;
                    sides[s].hand_back(shm, inp, out, peer_closed);
                }
                Op::Close(s) => sides[s].close(shm, &mut pipes[s]),
            }
        }
        // Drain: both sides read until nothing moves any more.
        for _ in 0..64 {
            let [a, b] = &mut pipes;
            let [s0, s1] = &mut sides;
            if !s0.closed {
                s0.read_some(shm, 1 << 16, b, a);
            }
            if !s1.closed {
                s1.read_some(shm, 1 << 16, a, b);
            }
        }
        for s in 0..2 {
            let p = 1 - s;
            if sides[s].closed {
                // It stopped reading: what it read is where the peer's stream began.
                prop_assert!(sides[p].wrote.starts_with(&sides[s].read), "side {} read something else than side {} wrote", s, p);
            } else {
                prop_assert_eq!(&sides[s].read, &sides[p].wrote, "side {} read something else than side {} wrote", s, p);
            }
        }
    }
}
