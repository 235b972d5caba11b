//! The multi-channel directory: format/attach, listeners, requests, answers, slot reuse; a
//! property test against a model; hostile bytes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use ivcom_ring::directory::{
    self, attach, format, off, DirError, Directory, ListenerAnswer, Owned, PeerState, Spec,
};
use ivcom_ring::{layout, HeapRegion};
use proptest::prelude::*;

const MIB: usize = 1 << 20;

fn spec(peers: u32) -> Spec {
    Spec { peers, listeners_per_peer: 4, slot_capacity: 16 * 1024, managed: true }
}

/// Liveness as the peer table shows it (a daemon keeps it).
fn alive<'a>(dir: &Directory<'a>) -> impl Fn(u32) -> bool + 'a {
    let dir = *dir;
    move |p| dir.peer(p).map(|s| s.alive).unwrap_or(false)
}

/// A peer is gone for a request made in `epoch` once its epoch moved or it is dead.
fn gone<'a>(dir: &Directory<'a>) -> impl Fn(u32, u64) -> bool + 'a {
    let dir = *dir;
    move |p, epoch| dir.peer(p).map(|s| s.epoch != epoch || !s.alive).unwrap_or(true)
}

fn formatted(peers: u32, size: usize) -> HeapRegion {
    let heap = HeapRegion::new(size);
    format(heap.region(), &spec(peers)).unwrap();
    let dir = Directory::new(heap.region(), attach(heap.region()).unwrap()).unwrap();
    for p in 0..peers {
        dir.set_peer(p, PeerState { epoch: 1, alive: true }).unwrap();
    }
    heap
}

#[test]
fn format_then_attach_agree_and_slots_fit() {
    let heap = HeapRegion::new(4 * MIB);
    let g = format(heap.region(), &spec(3)).unwrap();
    assert_eq!(attach(heap.region()).unwrap(), g);
    assert!(g.slots_per_peer >= 1);
    let (o, len) = g.slot_range(g.slots() - 1);
    assert!(o + len <= 4 * MIB);
    assert_eq!(o % 4096, 0);
}

#[test]
fn forged_headers_are_refused() {
    let heap = HeapRegion::new(MIB);
    let r = heap.region();
    let cases: [(usize, u64, bool); 6] = [
        (off::MAGIC, 1, false),
        (off::SLOTS_OFF, 4096, false),
        (off::SLOT_SIZE, 1 << 40, false),
        (off::DESCS_OFF, u64::MAX, false),
        (off::REGION_SIZE, 2 * MIB as u64, false),
        (off::VERSION, 9, true),
    ];
    for (field, value, is_u32) in cases {
        format(r, &spec(2)).unwrap();
        if is_u32 {
            r.store_u32(field, value as u32, Ordering::Relaxed).unwrap();
        } else {
            r.store_u64(field, value, Ordering::Relaxed).unwrap();
        }
        assert!(attach(r).is_err(), "field at {field} forged to {value} was accepted");
    }
    format(r, &spec(2)).unwrap();
    r.store_u32(off::PEERS, 1000, Ordering::Relaxed).unwrap();
    assert!(matches!(attach(r), Err(DirError::BadField { field: "peers", .. })));
    assert!(matches!(format(&r.sub(0, 8192).unwrap(), &spec(2)), Err(DirError::TooSmall { .. })));
}

#[test]
fn listeners_are_found_by_name_from_another_peer_and_names_are_unique() {
    let heap = formatted(2, MIB);
    let dir = Directory::new(heap.region(), attach(heap.region()).unwrap()).unwrap();
    let mut a = Owned::claim(&dir, 0).unwrap();
    let mut b = Owned::claim(&dir, 1).unwrap();
    let l = a.bind(&dir, "echo", &alive(&dir)).unwrap();
    assert_eq!(dir.lookup("echo", &alive(&dir), None).unwrap(), Some(l));
    assert_eq!(b.bind(&dir, "echo", &alive(&dir)), Err(DirError::NameInUse));
    assert_eq!(a.bind(&dir, "echo", &alive(&dir)), Err(DirError::NameInUse));
    assert_eq!(a.bind(&dir, "bad/name", &alive(&dir)), Err(DirError::BadName));
    a.unbind(&dir, l).unwrap();
    assert_eq!(dir.lookup("echo", &alive(&dir), None).unwrap(), None);
    let l2 = b.bind(&dir, "echo", &alive(&dir)).unwrap();
    assert_eq!(l2.peer, 1);
    for i in 0..3 {
        a.bind(&dir, &format!("n{i}"), &alive(&dir)).unwrap();
    }
    a.bind(&dir, "n3", &alive(&dir)).unwrap();
    assert_eq!(a.bind(&dir, "n4", &alive(&dir)), Err(DirError::Full("listener entries")));
    // A dead peer's names do not count.
    dir.set_peer(1, PeerState { epoch: 2, alive: false }).unwrap();
    assert_eq!(dir.lookup("echo", &alive(&dir), None).unwrap(), None);
}

#[test]
fn request_accept_close_and_reuse() {
    let heap = formatted(2, MIB);
    let dir = Directory::new(heap.region(), attach(heap.region()).unwrap()).unwrap();
    let mut a = Owned::claim(&dir, 0).unwrap();
    let mut b = Owned::claim(&dir, 1).unwrap();
    let l = b.bind(&dir, "srv", &alive(&dir)).unwrap();
    let epoch = dir.peer(1).unwrap().epoch;
    let (slot, gen) = a.request(&dir, l, epoch, &gone(&dir)).unwrap();
    let req = dir.request(slot, 1).unwrap().expect("request visible to the listener");
    assert_eq!((req.from, req.index, req.lgen), (0, l.index, l.gen));
    assert!(b.addresses_us(&req, epoch));
    assert!(dir.request(slot, 0).unwrap().is_none(), "not addressed to peer 0");
    // The slot holds a fresh channel header the listener can validate.
    let (o, len) = dir.geometry().slot_range(slot);
    layout::validate(&heap.region().sub(o, len).unwrap(), false).unwrap();
    dir.set_answer(slot, gen, ListenerAnswer::Accepted).unwrap();
    assert_eq!(dir.answer(slot).unwrap(), Some((gen, ListenerAnswer::Accepted)));
    // The connector finishes first: the slot drains until the listener finishes too.
    a.release(&dir, slot, gen, &gone(&dir)).unwrap();
    assert!(!dir.connector_holds(slot, gen).unwrap());
    assert_eq!(a.slot_counts().1, 1);
    dir.set_answer(slot, gen, ListenerAnswer::Closed).unwrap();
    a.reclaim(&dir, &gone(&dir)).unwrap();
    assert_eq!(a.slot_counts().1, 0);
}

#[test]
fn slots_of_an_unanswering_listener_return_when_it_leaves() {
    let heap = formatted(2, MIB);
    let dir = Directory::new(heap.region(), attach(heap.region()).unwrap()).unwrap();
    let mut a = Owned::claim(&dir, 0).unwrap();
    let mut b = Owned::claim(&dir, 1).unwrap();
    let l = b.bind(&dir, "srv", &alive(&dir)).unwrap();
    let total = dir.geometry().slots_per_peer as usize;
    let mut held = Vec::new();
    for _ in 0..total {
        held.push(a.request(&dir, l, 1, &gone(&dir)).unwrap());
    }
    assert_eq!(a.request(&dir, l, 1, &gone(&dir)), Err(DirError::Full("channel slots")));
    for (slot, gen) in held {
        a.release(&dir, slot, gen, &gone(&dir)).unwrap();
    }
    assert_eq!(a.slot_counts(), (0, total, 0), "never answered: not reusable yet");
    dir.set_peer(1, PeerState { epoch: 2, alive: false }).unwrap();
    a.reclaim(&dir, &gone(&dir)).unwrap();
    assert_eq!(a.slot_counts(), (0, 0, total));
}

#[test]
fn a_restarted_peer_ignores_requests_made_to_its_former_self() {
    let heap = formatted(2, MIB);
    let dir = Directory::new(heap.region(), attach(heap.region()).unwrap()).unwrap();
    let mut a = Owned::claim(&dir, 0).unwrap();
    let mut b = Owned::claim(&dir, 1).unwrap();
    let l = b.bind(&dir, "srv", &alive(&dir)).unwrap();
    let (slot, _) = a.request(&dir, l, 1, &gone(&dir)).unwrap();
    // Peer 1 restarts (new epoch), claims its entries again and binds the same name.
    dir.set_peer(1, PeerState { epoch: 3, alive: true }).unwrap();
    let mut b2 = Owned::claim(&dir, 1).unwrap();
    let l2 = b2.bind(&dir, "srv", &alive(&dir)).unwrap();
    assert_ne!(l2.gen, l.gen, "generations move on across a restart");
    let req = dir.request(slot, 1).unwrap().unwrap();
    assert!(!b2.addresses_us(&req, 3));
}

#[test]
fn random_bytes_never_panic_and_attach_refuses_or_validates() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let heap = formatted(3, MIB);
    let r = heap.region();
    let g = attach(r).unwrap();
    let dir = Directory::new(r, g).unwrap();
    let mut me = Owned::claim(&dir, 0).unwrap();
    // A hostile peer scribbles over everything but the header (which we read once at attach).
    for round in 0..200 {
        for _ in 0..64 {
            let o = (next() as usize % (g.slots_off - 4096)) / 8 * 8 + 4096;
            r.store_u64(o, next(), Ordering::Relaxed).unwrap();
        }
        let name = format!("x{}", round % 5);
        let _ = me.bind(&dir, &name, &alive(&dir));
        for p in 0..g.peers + 2 {
            let _ = dir.peer(p);
            for i in 0..g.listeners_per_peer + 1 {
                if let Ok(Some((_, n))) = dir.listener(p, i) {
                    directory::check_name(&n).unwrap();
                }
            }
        }
        for s in 0..g.slots() + 3 {
            if let Some(req) = dir.request(s, 0).unwrap() {
                assert!(req.slot < g.slots() && req.index < g.listeners_per_peer && req.from < g.peers);
            }
            let _ = dir.answer(s);
        }
        if let Ok(Some(l)) = dir.lookup(&name, &|_| true, None) {
            if let Ok((slot, gen)) = me.request(&dir, l, 0, &gone(&dir)) {
                assert_eq!(g.slot_owner(slot), 0, "only our own slots are allocated");
                me.release(&dir, slot, gen, &gone(&dir)).unwrap();
            }
        }
        me.reclaim(&dir, &gone(&dir)).unwrap();
    }
}

#[derive(Debug, Clone)]
enum Op {
    Bind { peer: u32, name: u8 },
    Unbind { peer: u32, name: u8 },
    Connect { from: u32, name: u8 },
    Answer { accept: bool },
    CloseConnector { n: usize },
    CloseListener { n: usize },
    Restart { peer: u32 },
    Republish { peer: u32, scribble: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3u32, 0..4u8).prop_map(|(peer, name)| Op::Bind { peer, name }),
        (0..3u32, 0..4u8).prop_map(|(peer, name)| Op::Unbind { peer, name }),
        (0..3u32, 0..4u8).prop_map(|(from, name)| Op::Connect { from, name }),
        any::<bool>().prop_map(|accept| Op::Answer { accept }),
        (0..8usize).prop_map(|n| Op::CloseConnector { n }),
        (0..8usize).prop_map(|n| Op::CloseListener { n }),
        (0..3u32).prop_map(|peer| Op::Restart { peer }),
        (0..3u32, any::<u64>()).prop_map(|(peer, scribble)| Op::Republish { peer, scribble }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Three honest peers doing random binds, connects, answers, closes and restarts. The
    /// model: a slot is never handed out again while the listener side of its previous
    /// generation is open, names bound successfully are unique among live peers, and every
    /// slot comes back once both sides are done.
    #[test]
    fn directory_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let heap = formatted(3, 2 * MIB);
        let r = heap.region();
        let dir = Directory::new(r, attach(r).unwrap()).unwrap();
        let mut owned: Vec<Owned> = (0..3).map(|p| Owned::claim(&dir, p).unwrap()).collect();
        let mut epochs = [1u64; 3];
        let mut bound: HashMap<(u32, u8), directory::ListenerRef> = HashMap::new();
        // Requests not yet answered, open channels as (slot, gen, connector, listener).
        let mut pending: Vec<(u32, u32, u32, u32)> = Vec::new();
        let mut open_conn: Vec<(u32, u32, u32)> = Vec::new();
        let mut open_listen: Vec<(u32, u32, u32)> = Vec::new();
        for op in ops {
            match op {
                Op::Bind { peer, name } => {
                    let res = owned[peer as usize].bind(&dir, &format!("n{name}"), &alive(&dir));
                    let taken = bound.keys().any(|&(_, n)| n == name);
                    match res {
                        Ok(l) => { prop_assert!(!taken, "name bound twice"); bound.insert((peer, name), l); }
                        Err(DirError::NameInUse) => prop_assert!(taken),
                        Err(DirError::Full(_)) => {}
                        Err(e) => prop_assert!(false, "bind: {e}"),
                    }
                }
                Op::Unbind { peer, name } => {
                    if let Some(l) = bound.remove(&(peer, name)) {
                        owned[peer as usize].unbind(&dir, l).unwrap();
                    }
                }
                Op::Connect { from, name } => {
                    let found = dir.lookup(&format!("n{name}"), &alive(&dir), None).unwrap();
                    let expect = bound.iter().find(|(&(_, n), _)| n == name).map(|(_, l)| *l);
                    prop_assert_eq!(found, expect);
                    if let Some(l) = found {
                        match owned[from as usize].request(&dir, l, epochs[l.peer as usize], &gone(&dir)) {
                            Ok((slot, gen)) => {
                                let busy = open_listen.iter().chain(&open_conn).any(|&(s, _, _)| s == slot)
                                    || pending.iter().any(|&(s, ..)| s == slot);
                                prop_assert!(!busy, "slot {} reused while in use", slot);
                                pending.push((slot, gen, from, l.peer));
                            }
                            Err(DirError::Full(_)) => {}
                            Err(e) => prop_assert!(false, "request: {e}"),
                        }
                    }
                }
                Op::Answer { accept } => {
                    if let Some((slot, gen, from, to)) = pending.pop() {
                        let req = dir.request(slot, to).unwrap();
                        let ours = req.filter(|q| owned[to as usize].addresses_us(q, epochs[to as usize]));
                        if accept && ours.is_some() {
                            dir.set_answer(slot, gen, ListenerAnswer::Accepted).unwrap();
                            open_conn.push((slot, gen, from));
                            open_listen.push((slot, gen, to));
                        } else {
                            dir.set_answer(slot, gen, ListenerAnswer::Refused).unwrap();
                            owned[from as usize].release(&dir, slot, gen, &gone(&dir)).unwrap();
                        }
                    }
                }
                Op::CloseConnector { n } => {
                    if !open_conn.is_empty() {
                        let (slot, gen, from) = open_conn.remove(n % open_conn.len());
                        owned[from as usize].release(&dir, slot, gen, &gone(&dir)).unwrap();
                    }
                }
                Op::CloseListener { n } => {
                    if !open_listen.is_empty() {
                        let (slot, gen, _) = open_listen.remove(n % open_listen.len());
                        dir.set_answer(slot, gen, ListenerAnswer::Closed).unwrap();
                    }
                }
                Op::Republish { peer, scribble } => {
                    // Someone overwrites a word of this peer's entries or descriptors; the
                    // owner writes back what it knows.
                    let g = *dir.geometry();
                    let lo = g.listeners_off + peer as usize * g.listeners_per_peer as usize * 128;
                    let o = if scribble % 2 == 0 {
                        lo + (scribble as usize / 2 % (g.listeners_per_peer as usize * 16)) * 8
                    } else {
                        // Only the connector half: the answer word is the listener's.
                        let w = scribble as usize / 2 % (g.slots_per_peer as usize * 8);
                        g.descs_off + ((peer * g.slots_per_peer) as usize + w / 8) * 128 + (w % 8) * 8
                    };
                    r.store_u64(o, scribble, Ordering::Relaxed).unwrap();
                    owned[peer as usize].republish(&dir).unwrap();
                }
                Op::Restart { peer } => {
                    epochs[peer as usize] += 1;
                    dir.set_peer(peer, PeerState { epoch: epochs[peer as usize], alive: true }).unwrap();
                    owned[peer as usize] = Owned::claim(&dir, peer).unwrap();
                    bound.retain(|&(p, _), _| p != peer);
                    // Its ends of channels die with it; the other ends close theirs.
                    open_listen.retain(|&(_, _, p)| p != peer);
                    open_conn.retain(|&(_, _, p)| p != peer);
                    for &(slot, gen, from, to) in &pending {
                        if to == peer && from != peer {
                            owned[from as usize].release(&dir, slot, gen, &gone(&dir)).unwrap();
                        }
                    }
                    pending.retain(|&(_, _, f, t)| f != peer && t != peer);
                }
            }
        }
        // Everyone finishes: every slot must come back.
        for (slot, gen, _) in open_listen.drain(..) {
            dir.set_answer(slot, gen, ListenerAnswer::Closed).unwrap();
        }
        for (slot, gen, from) in open_conn.drain(..) {
            owned[from as usize].release(&dir, slot, gen, &gone(&dir)).unwrap();
        }
        for (slot, gen, from, _) in pending.drain(..) {
            dir.set_answer(slot, gen, ListenerAnswer::Refused).unwrap();
            owned[from as usize].release(&dir, slot, gen, &gone(&dir)).unwrap();
        }
        // Listeners acknowledge what their connectors finished.
        for p in 0..3 {
            for slot in 0..dir.geometry().slots() {
                if let Some(gen) = dir.finished_by_connector(slot, p).unwrap() {
                    dir.set_answer(slot, gen, ListenerAnswer::Closed).unwrap();
                }
            }
        }
        for o in owned.iter_mut() {
            o.reclaim(&dir, &gone(&dir)).unwrap();
            let (busy, draining, _) = o.slot_counts();
            prop_assert_eq!((busy, draining), (0, 0));
        }
    }
}

#[test]
fn ivshmem_ids_are_published_per_member_and_checked() {
    let heap = formatted(3, MIB);
    let dir = Directory::new(heap.region(), attach(heap.region()).unwrap()).unwrap();
    // Unpublished: the member index.
    assert_eq!(dir.ivshmem_id(2).unwrap(), 2);
    // Member 1 reconnected: id 1 + 3.
    dir.set_ivshmem_id(1, 4).unwrap();
    assert_eq!(dir.ivshmem_id(1).unwrap(), 4);
    assert_eq!(dir.member_of(4), 1);
    // A forged id that belongs to another member is not used.
    heap.region()
        .store_u32(dir.geometry().peers_off + 128 + directory::off::PEER_IVSHMEM_ID, 5 + 1, Ordering::Relaxed)
        .unwrap();
    assert_eq!(dir.ivshmem_id(1).unwrap(), 1);
    assert!(dir.ivshmem_id(3).is_err());
}
