//! Channels through agents of a shared region, with two host members made by hand (a memfd
//! and one eventfd per member, as the daemon hands out), the test playing the daemon's part
//! in the peer table.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ivcom::vm::{format_region, set_peer_state, Agent, AgentConfig, HostPort};
use ivcom::{Listener, Options, Stream};
use ivcom_ring::directory::Spec;
use sha2::{Digest, Sha256};

const REGION: usize = 4 << 20;

struct Member {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    socket: PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
    }
}

struct Region {
    dir: tempfile_dir::Dir,
    memfd: OwnedFd,
    doorbells: Vec<OwnedFd>,
}

mod tempfile_dir {
    /// A temporary directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ivcom-vmtest-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn region(tag: &str, peers: u32, capacity: u64) -> Region {
    let memfd = rustix::fs::memfd_create("ivcom-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, REGION as u64).unwrap();
    let spec = Spec { peers, listeners_per_peer: 8, slot_capacity: capacity, managed: true };
    format_region(memfd.as_fd(), REGION, &spec).unwrap();
    let doorbells = (0..peers)
        .map(|_| {
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .unwrap()
        })
        .collect();
    Region { dir: tempfile_dir::Dir::new(tag), memfd, doorbells }
}

impl Region {
    fn join(&self, me: u32) -> Member {
        set_peer_state(self.memfd.as_fd(), REGION, me, 1, true).unwrap();
        let peers: HashMap<u32, OwnedFd> = (0..self.doorbells.len() as u32)
            .filter(|&p| p != me)
            .map(|p| (p, self.doorbells[p as usize].try_clone().unwrap()))
            .collect();
        let port = HostPort::new(
            self.memfd.try_clone().unwrap(),
            REGION,
            me,
            self.doorbells[me as usize].try_clone().unwrap(),
            peers,
        )
        .unwrap();
        let socket = self.dir.0.join(format!("agent{me}.sock"));
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = AgentConfig::new(&socket);
        let mut agent = Agent::new(port, cfg).unwrap();
        let s = stop.clone();
        let thread = std::thread::spawn(move || agent.run(&|| s.load(Ordering::Relaxed)));
        Member { stop, thread: Some(thread), socket }
    }

    fn leave(&self, peer: u32) {
        set_peer_state(self.memfd.as_fd(), REGION, peer, 2, false).unwrap();
        rustix::io::write(&self.doorbells[0], &1u64.to_ne_bytes()).unwrap();
        rustix::io::write(&self.doorbells[1], &1u64.to_ne_bytes()).unwrap();
    }
}

fn opts(agent: &Path) -> Options {
    Options::new().agent(agent).handshake_timeout(Duration::from_secs(5))
}

#[test]
fn stream_between_two_members_moves_data_both_ways_and_ends_cleanly() {
    let r = region("basic", 2, 64 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    let listener = Listener::bind_with("echo", &opts(&b.socket)).unwrap();
    let server = std::thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 70_000];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n as u64;
        }
        s.write_all(&hash.finalize()).unwrap();
        total
    });
    let mut c = Stream::connect_with("echo", &opts(&a.socket)).unwrap();
    let mut hash = Sha256::new();
    let mut x = 12345u64;
    let mut sent = 0u64;
    for i in 0..400 {
        let len = 1 + (i * 7919) % 60_000;
        let chunk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        c.write_all(&chunk).unwrap();
        hash.update(&chunk);
        sent += len as u64;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).unwrap();
    assert_eq!(digest, hash.finalize().to_vec(), "SHA-256 of {sent} bytes differs");
    assert_eq!(server.join().unwrap(), sent);
    drop((a, b));
}

#[test]
fn names_are_found_across_members_and_errors_are_clear() {
    let r = region("names", 2, 16 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    let _l = Listener::bind_with("taken", &opts(&b.socket)).unwrap();
    let e = Listener::bind_with("taken", &opts(&a.socket)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let e = Stream::connect_with("nobody", &opts(&a.socket)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let e = Stream::connect_with("x", &opts(Path::new("/nonexistent/agent.sock"))).unwrap_err();
    assert!(e.to_string().contains("ivcom agent"), "{e}");
}

#[test]
fn slots_are_reused_after_close_and_sleeping_peers_are_woken() {
    let r = region("reuse", 2, 16 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    let listener = Listener::bind_with("srv", &opts(&b.socket).spin(Duration::ZERO)).unwrap();
    // Far more connections than a member has slots: closed ones must come back.
    let rounds = 200;
    let server = std::thread::spawn(move || {
        for _ in 0..rounds {
            let mut s = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    let mut sleeps = 0;
    for i in 0..rounds {
        // Zero polling: every wait sleeps, so every reply needs a doorbell and the agent's
        // wakeup of the sleeping process.
        let mut c = Stream::connect_with("srv", &opts(&a.socket).spin(Duration::ZERO)).unwrap();
        c.write_all(&(i as u32).to_le_bytes()).unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), i as u32);
        sleeps += c.stats().sleeps;
    }
    server.join().unwrap();
    assert!(sleeps > 0, "zero polling never slept: the doorbell path was not exercised");
}

#[test]
fn a_member_that_leaves_breaks_its_channels_in_bounded_time() {
    let r = region("leave", 2, 16 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    let listener = Listener::bind_with("srv", &opts(&b.socket)).unwrap();
    let server = std::thread::spawn(move || listener.accept().unwrap());
    let mut c = Stream::connect_with("srv", &opts(&a.socket)).unwrap();
    let _s = server.join().unwrap();
    c.write_all(b"unread").unwrap();
    let start = Instant::now();
    r.leave(1);
    let mut buf = [0u8; 16];
    let res = c.read(&mut buf);
    let took = start.elapsed();
    assert!(
        matches!(&res, Ok(0)) || res.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{res:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    drop(b);
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    let r = region("half", 2, 16 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    let listener = Listener::bind_with("half", &opts(&b.socket)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        // Reply only when told: the client must still be waiting, not at end of stream.
        rx.recv().unwrap();
        s.write_all(b"late reply").unwrap();
        got
    });
    let mut c = Stream::connect_with("half", &opts(&a.socket)).unwrap();
    c.write_all(b"request").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut buf = [0u8; 32];
    let early = c.read(&mut buf);
    assert!(
        early.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "read before the reply must time out, got {early:?}"
    );
    tx.send(()).unwrap();
    c.set_read_timeout(None).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"late reply");
    assert_eq!(server.join().unwrap(), b"request");
    drop((a, b));
}

/// A third member scribbles over the directory and the channel slots while two honest
/// members keep connecting and echoing: calls may fail, but with errors, in bounded time; the
/// agents neither panic nor hang, and once the scribbling stops new channels work again.
#[test]
fn a_hostile_member_cannot_crash_or_hang_the_others() {
    let r = region("hostile", 3, 16 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    set_peer_state(r.memfd.as_fd(), REGION, 2, 1, true).unwrap();
    let map = ivcom_ring::MappedRegion::map(r.memfd.as_fd(), 0, REGION).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let listener = Listener::bind_with("victim", &opts(&b.socket)).unwrap();
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || {
        while !server_stop.load(Ordering::Relaxed) {
            if let Ok(mut s) = listener.accept() {
                let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
                let mut buf = [0u8; 8];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
            }
        }
    });
    let region = map.region();
    let slots_end = REGION;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let start = Instant::now();
    let mut outcomes = (0, 0);
    while start.elapsed() < Duration::from_secs(2) {
        // Scribble: 64 random words past the header, anywhere in the region.
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = 4096 + (x as usize % (slots_end - 4096)) / 8 * 8;
            region.store_u64(off, x.rotate_left(17), Ordering::Relaxed).unwrap();
        }
        let t = Instant::now();
        let res = (|| -> std::io::Result<()> {
            let mut c = Stream::connect_with(
                "victim",
                &opts(&a.socket).handshake_timeout(Duration::from_millis(500)),
            )?;
            c.set_read_timeout(Some(Duration::from_millis(500)))?;
            c.write_all(&x.to_le_bytes())?;
            let mut back = [0u8; 8];
            c.read_exact(&mut back)?;
            Ok(())
        })();
        assert!(t.elapsed() < Duration::from_secs(5), "a call took {:?}", t.elapsed());
        match res {
            Ok(()) => outcomes.0 += 1,
            Err(_) => outcomes.1 += 1,
        }
    }
    eprintln!("under scribbling: {} round trips worked, {} failed with errors", outcomes.0, outcomes.1);
    drop(map);
    // Honest again: the agents must still be alive and serving. They rewrite what they own
    // as they use it; the scribbled peer table is the daemon's to restore.
    for p in 0..3 {
        set_peer_state(r.memfd.as_fd(), REGION, p, 1, true).unwrap();
    }
    // Members repair their entries every 100 ms: within a second the name is back.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut c = loop {
        match Stream::connect_with("victim", &opts(&a.socket)) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no new channel after the scribbling: {e}"),
        }
    };
    c.write_all(b"8 bytes!").unwrap();
    let mut back = [0u8; 8];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"8 bytes!");
    stop.store(true, Ordering::Relaxed);
    // Stopping b's agent ends the server's accept with an error. Dropping a member joins its
    // agent thread, which must not have panicked or failed.
    drop(b);
    server.join().unwrap();
    drop(a);
}

/// A member that cannot receive doorbells (an ivshmem-plain device, or a doorbell device
/// without VFIO): its agent polls the region, backing off when idle.
#[derive(Debug)]
struct Polling(HostPort);

impl ivcom::vm::Port for Polling {
    fn me(&self) -> u32 {
        self.0.me()
    }
    fn region(&self) -> &ivcom_ring::ShmRegion {
        self.0.region()
    }
    fn share_memory(&self) -> (std::os::fd::BorrowedFd<'_>, u64) {
        self.0.share_memory()
    }
    fn ring(&self, _peer: u32) {}
    fn share_doorbell(&self, _peer: u32, _vector: u16) -> Option<ivcom::vm::DoorbellShare<'_>> {
        Some(ivcom::vm::DoorbellShare::Nothing)
    }
    fn vectors(&self) -> u16 {
        0
    }
    fn vector_fd(&self, _vector: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// No daemon and no doorbells, as with ivshmem-plain: members keep their own peer entries and
/// heartbeats, agents poll. Channels still work both ways and sleeping processes are woken;
/// a member whose heartbeat stops counts as gone.
#[test]
fn unmanaged_polling_members_work_and_notice_a_silent_peer() {
    let memfd = rustix::fs::memfd_create("ivcom-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, REGION as u64).unwrap();
    let spec = Spec { peers: 2, listeners_per_peer: 4, slot_capacity: 16 * 1024, managed: false };
    format_region(memfd.as_fd(), REGION, &spec).unwrap();
    let dir = tempfile_dir::Dir::new("polling");
    let start_member = |me: u32| {
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let port =
            Polling(HostPort::new(memfd.try_clone().unwrap(), REGION, me, efd, HashMap::new()).unwrap());
        let socket = dir.0.join(format!("poll{me}.sock"));
        let mut cfg = AgentConfig::new(&socket);
        cfg.heartbeat_timeout = Duration::from_millis(500);
        let mut agent = Agent::new(port, cfg).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || agent.run(&|| s.load(Ordering::Relaxed)));
        Member { stop, thread: Some(thread), socket }
    };
    let a = start_member(0);
    let b = start_member(1);
    // Peers see each other only once heartbeats moved: retry (bounded) until the name is found.
    let listener = Listener::bind_with("plain", &opts(&b.socket).spin(Duration::ZERO)).unwrap();
    let server = std::thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest.len()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = loop {
        match Stream::connect_with("plain", &opts(&a.socket).spin(Duration::ZERO)) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    c.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    assert!(c.stats().sleeps >= 1, "the reply was waited for asleep: the polling agent woke us");
    c.write_all(&[7u8; 100_000]).unwrap();
    drop(c);
    assert_eq!(server.join().unwrap(), 100_000);
    // b stops without saying so (its agent thread ends; its heartbeat stands still): a's
    // agent must stop counting it as present.
    drop(b);
    let dir_map = ivcom_ring::MappedRegion::map(memfd.as_fd(), 0, REGION).unwrap();
    let geom = ivcom_ring::directory::attach(dir_map.region()).unwrap();
    let d = ivcom_ring::directory::Directory::new(dir_map.region(), geom).unwrap();
    // An agent that stops cleanly marks itself gone; the heartbeat rule covers one that dies.
    assert!(!d.peer(1).unwrap().alive, "a stopped member's entry says so");
    let e = Stream::connect_with("plain", &opts(&a.socket).handshake_timeout(Duration::from_millis(500)))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    drop(a);
}

/// tokio over agent channels: readiness of the listener (the agent's socket) and of the
/// streams (eventfds the agent or the peer signals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_streams_through_agents() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = region("tokio", 2, 16 * 1024);
    let a = r.join(0);
    let b = r.join(1);
    let listener = ivcom::tokio::AsyncListener::bind("atok", &opts(&b.socket)).unwrap();
    let server = tokio::spawn(async move {
        let mut s = listener.accept().await.unwrap();
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.write_all(&total.to_le_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut c =
        ivcom::tokio::AsyncStream::connect("atok", &opts(&a.socket).spin(Duration::ZERO)).await.unwrap();
    let chunk = vec![0x5au8; 100_000];
    for _ in 0..50 {
        c.write_all(&chunk).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(u64::from_le_bytes(back), 5_000_000);
    server.await.unwrap();
    drop((a, b));
}
