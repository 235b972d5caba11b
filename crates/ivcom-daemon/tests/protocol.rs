//! The daemon against a client written from QEMU's ivshmem spec (`ivcom_ivshmem::client`):
//! ids, shared memory, eventfds, doorbells, joins and departures, refusals, start-up errors.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::{config, start, temp_dir, Recorder};
use ivcom_daemon::{Config, Daemon, DaemonError, DaemonOptions};
use ivcom_ivshmem::client::{Client, ClientError, PeerEvent};

const T: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(200);

const LAB: &str = r#"
[[group]]
name = "lab"
members = ["vm1", "vm2", "host"]
size = "1M"
vectors = 2
"#;

fn inode(fd: std::os::fd::BorrowedFd<'_>) -> (u64, u64) {
    let st = rustix::fs::fstat(fd).unwrap();
    (st.st_dev, st.st_ino)
}

fn joined(ev: Vec<PeerEvent>) -> (u16, usize) {
    match ev.as_slice() {
        [PeerEvent::Joined { id, fds }] => (*id, fds.len()),
        other => panic!("expected one Joined, got {other:?}"),
    }
}

fn left(ev: Vec<PeerEvent>) -> u16 {
    match ev.as_slice() {
        [PeerEvent::Left { id }] => *id,
        other => panic!("expected one Left, got {other:?}"),
    }
}

#[test]
fn two_clients_get_ids_share_memory_and_vectors() {
    let rec = Recorder { marker: Some(b"made by the daemon".to_vec()), ..Recorder::default() };
    let d = start(LAB, rec);
    // The first client has no other peer to count vectors from: it waits for them to settle.
    let mut a = Client::connect(&d.sock("lab", "vm1"), T).unwrap();
    assert_eq!(a.id(), 0);
    // Settling is time-based: on a loaded machine a vector may come late, through poll_events.
    let end = std::time::Instant::now() + T;
    while a.vectors().len() < 2 && std::time::Instant::now() < end {
        assert!(a.poll_events().unwrap().is_empty());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(a.vectors().len(), 2);
    assert!(a.peers().is_empty());
    // The second counts the vectors from the first one's run of messages.
    let b = Client::connect(&d.sock("lab", "vm2"), T).unwrap();
    assert_eq!(b.id(), 1);
    assert_eq!(b.vectors().len(), 2);
    assert_eq!(b.peers().keys().copied().collect::<Vec<_>>(), [0]);
    assert_eq!(b.peers()[&0].len(), 2);
    assert_eq!(joined(a.wait_events(T).unwrap()), (1, 2));
    assert_eq!(a.peers()[&1].len(), 2);

    // Same memory: the same file, and bytes written through one mapping are read through
    // the other; the daemon's own mapping wrote the marker before anyone connected.
    assert_eq!(inode(a.shm()), inode(b.shm()));
    assert_eq!(a.shm_size().unwrap(), 1 << 20);
    let ma = a.map_shm().unwrap();
    let mb = b.map_shm().unwrap();
    let mut got = [0u8; 18];
    mb.region().read_bytes(0, &mut got).unwrap();
    assert_eq!(&got, b"made by the daemon");
    ma.region().write_bytes(4096, b"hello from a").unwrap();
    let mut got = [0u8; 12];
    mb.region().read_bytes(4096, &mut got).unwrap();
    assert_eq!(&got, b"hello from a");
    // The memfd is sealed against resizing (so no member can SIGBUS the others).
    let seals = rustix::fs::fcntl_get_seals(a.shm()).unwrap();
    assert!(seals.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW));
    assert!(d.rec.wait_for("joined lab 1", T));
    assert_eq!(d.rec.lines()[..3], ["created lab", "joined lab 0", "joined lab 1"]);
}

#[test]
fn connect_with_known_vector_count() {
    let d = start(LAB, Recorder::default());
    let a = Client::connect_with_vectors(&d.sock("lab", "host"), 2, T).unwrap();
    assert_eq!((a.id(), a.vectors().len()), (2, 2));
}

#[test]
fn doorbells_reach_the_right_peer_and_vector() {
    let d = start(LAB, Recorder::default());
    let mut a = Client::connect_with_vectors(&d.sock("lab", "vm1"), 2, T).unwrap();
    let mut b = Client::connect_with_vectors(&d.sock("lab", "vm2"), 2, T).unwrap();
    let c = Client::connect_with_vectors(&d.sock("lab", "host"), 2, T).unwrap();
    assert_eq!(c.id(), 2);
    a.wait_events(T).unwrap();
    b.wait_events(T).unwrap();
    assert_eq!(a.peers().len(), 2);
    assert_eq!(b.peers().len(), 2);

    // a rings b on vector 1: only b's vector 1 fires.
    a.ring(1, 1).unwrap();
    assert_eq!(b.wait_interrupt(1, T).unwrap(), Some(1));
    assert_eq!(b.wait_interrupt(0, SHORT).unwrap(), None);
    assert_eq!(c.wait_interrupt(1, SHORT).unwrap(), None);
    assert_eq!(a.wait_interrupt(1, SHORT).unwrap(), None);
    // c rings a on vector 0, twice: a sees the count.
    c.ring(0, 0).unwrap();
    c.ring(0, 0).unwrap();
    assert_eq!(a.wait_interrupt(0, T).unwrap(), Some(2));
    assert_eq!(b.wait_interrupt(0, SHORT).unwrap(), None);
    // b rings c on vector 0.
    b.ring(2, 0).unwrap();
    assert_eq!(c.wait_interrupt(0, T).unwrap(), Some(1));
    assert!(matches!(a.ring(1, 2), Err(ClientError::NoSuchVector { peer: 1, vector: 2 })));
    assert!(matches!(a.ring(7, 0), Err(ClientError::NoSuchVector { .. })));
}

#[test]
fn hook_rings_a_joining_peer() {
    let rec = Recorder { ring_on_join: true, ..Recorder::default() };
    let d = start(LAB, rec);
    let a = Client::connect_with_vectors(&d.sock("lab", "vm2"), 2, T).unwrap();
    assert_eq!(a.wait_interrupt(0, T).unwrap(), Some(1));
    assert_eq!(a.wait_interrupt(1, SHORT).unwrap(), None);
}

#[test]
fn disconnect_notice_then_reconnect_with_a_fresh_id_and_fresh_eventfds() {
    let d = start(LAB, Recorder::default());
    let mut a = Client::connect_with_vectors(&d.sock("lab", "vm1"), 2, T).unwrap();
    let b = Client::connect_with_vectors(&d.sock("lab", "vm2"), 2, T).unwrap();
    let old = match a.wait_events(T).unwrap().pop() {
        Some(PeerEvent::Joined { id: 1, fds }) => fds,
        other => panic!("{other:?}"),
    };
    drop(b);
    assert_eq!(left(a.wait_events(T).unwrap()), 1);
    assert!(a.peers().is_empty());
    assert!(d.rec.wait_for("left lab 1", T));

    // A new id, never the old one (QEMU 7.2 writes into freed memory when an id it was told
    // is gone comes back): member index plus the member count, so id % 3 is still vm2.
    let b = Client::connect_with_vectors(&d.sock("lab", "vm2"), 2, T).unwrap();
    assert_eq!(b.id(), 1 + 3);
    assert_eq!(b.peers()[&0].len(), 2);
    assert_eq!(joined(a.wait_events(T).unwrap()), (4, 2));
    // The old eventfds are not the new ones: ringing through an old one reaches nobody.
    ivcom_ivshmem::client::write_eventfd(old[0].as_fd()).unwrap();
    assert_eq!(b.wait_interrupt(0, SHORT).unwrap(), None);
    a.ring(4, 0).unwrap();
    assert_eq!(b.wait_interrupt(0, T).unwrap(), Some(1));
    assert!(d.rec.wait_for("joined lab 1", T));
    let lines = d.rec.lines();
    assert_eq!(lines.iter().filter(|l| *l == "joined lab 1").count(), 2, "{lines:?}");
}

#[test]
fn pair_regions_are_isolated() {
    let d = start(
        r#"
[[pairs]]
name = "mesh"
members = ["a", "b", "c"]
size = "1M"
"#,
        Recorder::default(),
    );
    // No socket for c in a's and b's region.
    assert!(d.sock("mesh.a.b", "a").exists());
    assert!(!d.sock("mesh.a.b", "c").exists());
    let ab_a = Client::connect_with_vectors(&d.sock("mesh.a.b", "a"), 1, T).unwrap();
    let mut ac_a = Client::connect_with_vectors(&d.sock("mesh.a.c", "a"), 1, T).unwrap();
    let ac_c = Client::connect_with_vectors(&d.sock("mesh.a.c", "c"), 1, T).unwrap();
    let bc_c = Client::connect_with_vectors(&d.sock("mesh.b.c", "c"), 1, T).unwrap();
    assert_eq!((ab_a.id(), ac_a.id(), ac_c.id(), bc_c.id()), (0, 0, 1, 1));
    assert_ne!(inode(ab_a.shm()), inode(ac_a.shm()));
    assert_ne!(inode(ac_c.shm()), inode(bc_c.shm()));
    assert_eq!(inode(ac_a.shm()), inode(ac_c.shm()));
    let m_ab = ab_a.map_shm().unwrap();
    let m_ac = ac_c.map_shm().unwrap();
    let m_bc = bc_c.map_shm().unwrap();
    m_ab.region().write_bytes(0, b"secret of a and b").unwrap();
    let mut got = [0u8; 17];
    m_ac.region().read_bytes(0, &mut got).unwrap();
    assert_eq!(got, [0; 17]);
    m_bc.region().read_bytes(0, &mut got).unwrap();
    assert_eq!(got, [0; 17]);
    let ab_b = Client::connect_with_vectors(&d.sock("mesh.a.b", "b"), 1, T).unwrap();
    ab_b.map_shm().unwrap().region().read_bytes(0, &mut got).unwrap();
    assert_eq!(&got, b"secret of a and b");
    // Doorbells stay within a pair: c in mesh.a.c knows only a (peer 0 there).
    assert_eq!(ac_c.peers().keys().copied().collect::<Vec<_>>(), [0]);
    assert!(bc_c.peers().is_empty());
    assert_eq!(joined(ac_a.wait_events(T).unwrap()), (1, 1));
    ac_a.ring(1, 0).unwrap();
    assert_eq!(ac_c.wait_interrupt(0, T).unwrap(), Some(1));
    assert_eq!(bc_c.wait_interrupt(0, SHORT).unwrap(), None);
}

#[test]
fn second_connection_for_a_member_is_refused_first_keeps_working() {
    let d = start(LAB, Recorder::default());
    let mut a = Client::connect_with_vectors(&d.sock("lab", "vm1"), 2, T).unwrap();
    match Client::connect_with_vectors(&d.sock("lab", "vm1"), 2, T) {
        Err(ClientError::Refused) => {}
        other => panic!("expected the second connection to be refused, got {other:?}"),
    }
    // Nothing was announced for it, and the first connection still serves.
    assert!(a.poll_events().unwrap().is_empty());
    let b = Client::connect_with_vectors(&d.sock("lab", "vm2"), 2, T).unwrap();
    assert_eq!(joined(a.wait_events(T).unwrap()), (1, 2));
    b.ring(0, 1).unwrap();
    assert_eq!(a.wait_interrupt(1, T).unwrap(), Some(1));
}

#[test]
fn client_that_sends_bytes_is_disconnected_others_keep_working() {
    let d = start(LAB, Recorder::default());
    let mut a = Client::connect_with_vectors(&d.sock("lab", "vm1"), 2, T).unwrap();
    let c = Client::connect_with_vectors(&d.sock("lab", "host"), 2, T).unwrap();
    assert_eq!(joined(a.wait_events(T).unwrap()), (2, 2));

    let mut g = UnixStream::connect(d.sock("lab", "vm2")).unwrap();
    g.set_read_timeout(Some(T)).unwrap();
    assert_eq!(joined(a.wait_events(T).unwrap()), (1, 2));
    g.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(left(a.wait_events(T).unwrap()), 1);
    assert!(d.rec.wait_for("left lab 1", T));
    // The daemon closed it: after the setup bytes, end of stream.
    let mut rest = Vec::new();
    let _ = g.read_to_end(&mut rest);
    assert!(rest.len() <= 8 * (3 + 2 * 2 + 2), "{} bytes", rest.len());

    // The others still ring each other, and vm2 can come back.
    a.ring(2, 0).unwrap();
    assert_eq!(c.wait_interrupt(0, T).unwrap(), Some(1));
    let b = Client::connect_with_vectors(&d.sock("lab", "vm2"), 2, T).unwrap();
    assert_eq!(b.id(), 1 + 3, "a fresh id for the member's second connection");
    assert_eq!(joined(a.wait_events(T).unwrap()), (4, 2));
}

#[test]
fn member_that_never_reads_is_disconnected_others_keep_working() {
    let d = start(
        "[[group]]\nname = 'busy'\nmembers = ['stuck', 'churn', 'ok']\nsize = '1M'\nvectors = 64\n",
        Recorder::default(),
    );
    // Connected, never reads: every join and departure of `churn` queues 65 messages for it.
    let stuck = UnixStream::connect(d.sock("busy", "stuck")).unwrap();
    assert!(d.rec.wait_for("joined busy 0", T));
    let mut ok = Client::connect_with_vectors(&d.sock("busy", "ok"), 64, T).unwrap();
    let mut gone = false;
    let mut cycles = 0;
    for _ in 0..1000 {
        let c = Client::connect_with_vectors(&d.sock("busy", "churn"), 64, T).unwrap();
        cycles += 1;
        drop(c);
        ok.poll_events().unwrap(); // this one keeps up
        if d.rec.lines().iter().any(|l| l == "left busy 0") {
            gone = true;
            break;
        }
    }
    assert!(gone, "a member that never reads was never disconnected");
    drop(stuck);
    // The reader is still served: it sees the churn and rings work.
    let c = Client::connect_with_vectors(&d.sock("busy", "churn"), 64, T).unwrap();
    let end = std::time::Instant::now() + T;
    let joins = |r: &Recorder| r.lines().iter().filter(|l| *l == "joined busy 1").count();
    while joins(&d.rec) < cycles + 1 {
        assert!(std::time::Instant::now() < end, "the daemon never saw the last join");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Everything for `ok` is sent now; read until it is all in (the last is c's join).
    let mut last = None;
    loop {
        assert!(std::time::Instant::now() < end, "the reading member stopped getting notices");
        let ev = ok.wait_events(SHORT).unwrap();
        // Each connection of `churn` (member 1 of 3) had a fresh id: 1, 4, 7, ...
        if ev.is_empty() && matches!(last, Some(PeerEvent::Joined { id, .. }) if id == c.id()) {
            break;
        }
        last = ev.into_iter().last().or(last);
    }
    assert_eq!(c.id() % 3, 1);
    assert_eq!(ok.peers()[&c.id()].len(), 64);
    ok.ring(c.id(), 63).unwrap();
    assert_eq!(c.wait_interrupt(63, T).unwrap(), Some(1));
}

#[test]
fn socket_directory_in_use_by_another_daemon() {
    let d = start(LAB, Recorder::default());
    let cfg = config(LAB, &d.dir);
    let opts = DaemonOptions { socket_dir: Some(d.socket_dir.clone()), shm_dir: d.dir.join("shm") };
    let e = Daemon::new(&cfg, &opts, None).unwrap_err();
    assert!(matches!(e, DaemonError::DirInUse { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("in use by another daemon") && msg.contains(&d.socket_dir.display().to_string()),
        "{msg}"
    );
    // The first daemon is undisturbed.
    let a = Client::connect_with_vectors(&d.sock("lab", "vm1"), 2, T).unwrap();
    assert_eq!(a.id(), 0);
}

#[test]
fn socket_path_with_a_live_listener_is_an_error() {
    let dir = temp_dir("live");
    let sock_dir = dir.join("vm");
    std::fs::create_dir_all(sock_dir.join("lab")).unwrap();
    let path = sock_dir.join("lab").join("vm2.sock");
    let _other = UnixListener::bind(&path).unwrap();
    let cfg = config(LAB, &dir);
    let opts = DaemonOptions { socket_dir: Some(sock_dir.clone()), shm_dir: dir.clone() };
    let e = Daemon::new(&cfg, &opts, None).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DaemonError::SocketInUse { .. }), "{e:?}");
    assert!(msg.contains("vm2.sock") && msg.contains("in use by another daemon"), "{msg}");
    // What it had bound already (vm1.sock) was cleaned up; the foreign socket was left alone.
    assert!(!sock_dir.join("lab").join("vm1.sock").exists());
    assert!(path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stale_socket_is_replaced_and_sockets_removed_on_stop() {
    let dir = temp_dir("stale");
    let sock_dir = dir.join("vm");
    std::fs::create_dir_all(sock_dir.join("lab")).unwrap();
    let path = sock_dir.join("lab").join("vm1.sock");
    drop(UnixListener::bind(&path).unwrap()); // the file stays, nobody listens
    assert!(path.exists());
    let cfg = config(LAB, &dir);
    let opts = DaemonOptions { socket_dir: Some(sock_dir.clone()), shm_dir: dir.clone() };
    let mut daemon = Daemon::new(&cfg, &opts, None).unwrap();
    assert_eq!(daemon.socket_path("lab", "vm1").as_deref(), Some(path.as_path()));
    let stop = daemon.stop_handle();
    let t = std::thread::spawn(move || {
        daemon.run().unwrap();
        daemon
    });
    let mut a = Client::connect_with_vectors(&path, 2, T).unwrap();
    assert_eq!(a.id(), 0);
    stop.stop();
    let mut daemon = t.join().unwrap();
    // Stopped, not dropped: members stay; run again serves on.
    let t = std::thread::spawn(move || {
        daemon.run().unwrap();
        daemon
    });
    let _b = Client::connect_with_vectors(&sock_dir.join("lab").join("vm2.sock"), 2, T).unwrap();
    assert!(matches!(a.wait_events(T).unwrap().as_slice(), [PeerEvent::Joined { id: 1, .. }]));
    stop.stop();
    let daemon = t.join().unwrap();
    drop(daemon);
    assert!(matches!(a.wait_events(T), Err(ClientError::Closed)));
    for m in ["vm1", "vm2", "host"] {
        assert!(!sock_dir.join("lab").join(format!("{m}.sock")).exists());
    }
    assert!(!sock_dir.join("lab").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_region_is_a_file_of_the_configured_size() {
    let dir = temp_dir("plain");
    let text = "[[group]]\nname = 'flat'\nmembers = ['g1', 'g2']\nsize = '2M'\nplain = true\n";
    let cfg = config(text, &dir);
    let shm = dir.join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let opts = DaemonOptions { socket_dir: Some(dir.join("vm")), shm_dir: shm.clone() };
    let rec = Recorder { marker: Some(b"plain".to_vec()), ..Recorder::default() };
    let daemon = Daemon::new(&cfg, &opts, Some(Box::new(rec.clone()))).unwrap();
    let file = shm.join("ivcom.flat");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 << 20);
    assert_eq!(&std::fs::read(&file).unwrap()[..5], b"plain");
    assert_eq!(daemon.socket_path("flat", "g1"), None);
    assert!(!dir.join("vm").exists(), "no sockets for plain regions");
    drop(daemon);
    // Kept across restarts (running guests still map it) ...
    assert!(file.exists());
    let daemon = Daemon::new(&cfg, &opts, None).unwrap();
    drop(daemon);
    // ... but a file of another size is not silently resized under them.
    std::fs::write(&file, b"short").unwrap();
    let e = Daemon::new(&cfg, &opts, None).unwrap_err().to_string();
    assert!(e.contains("exists with 5 bytes") && e.contains("2097152"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configs_are_clear_errors() {
    let cases: &[(&str, &str)] = &[
        ("[[group]]\nname='a'\nmembers=['x','x']\nsize='1M'\n", "duplicate member \"x\""),
        (
            "[[group]]\nname='a'\nmembers=['x']\nsize='1M'\n[[group]]\nname='a'\nmembers=['y']\nsize='1M'\n",
            "duplicate name \"a\"",
        ),
        (
            "[[group]]\nname='m.a.b'\nmembers=['x']\nsize='1M'\n[[pairs]]\nname='m'\nmembers=['a','b']\nsize='1M'\n",
            "duplicate region name \"m.a.b\"",
        ),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='3M'\n", "size \"3M\" must be a power of two from 1M to 1G"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='2G'\n", "must be a power of two from 1M to 1G"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='512K'\n", "must be a power of two from 1M to 1G"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='lots'\n", "size \"lots\" is not a number"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize=-1\n", "size -1 is negative"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\nvectors=0\n", "vectors = 0; must be 1 to 64"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\nvectors=65\n", "vectors = 65; must be 1 to 64"),
        ("[[group]]\nname='a/b'\nmembers=['x']\nsize='1M'\n", "has the character '/'"),
        ("[[group]]\nname='a'\nmembers=['../x']\nsize='1M'\n", "has the character '/'"),
        ("[[group]]\nname='..'\nmembers=['x']\nsize='1M'\n", "is not allowed"),
        ("[[group]]\nname=''\nmembers=['x']\nsize='1M'\n", "must be 1 to 64 characters"),
        ("[[pairs]]\nname='p'\nmembers=['x']\nsize='1M'\n", "needs at least 2 member(s)"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\ncolour='red'\n", "unknown field `colour`"),
        ("sockets='/x'\n", "unknown field `sockets`"),
        ("[[group]]\nname='a'\nmembers=['x']\n", "missing field `size`"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\nplain=true\nvectors=2\n", "vectors has no meaning for a plain region"),
        ("socket_dir='relative/dir'\n", "must be an absolute path"),
        ("[[group]\n", "TOML parse error"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\nring='3K'\n", "ring \"3K\" must be a power of two from 16K"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\nring='256K'\n", "to 1/8 of the size"),
        ("[[group]]\nname='a'\nmembers=['x']\nsize='1M'\nring=1024\n", "ring 1024 must be"),
    ];
    for (text, want) in cases {
        let path = std::path::Path::new("/etc/ivcom/bad.toml");
        let e = Config::parse(text, path).unwrap_err().to_string();
        assert!(e.starts_with("/etc/ivcom/bad.toml: "), "no file name in {e:?}");
        assert!(e.contains(want), "for {text:?}: expected {want:?} in {e:?}");
    }
    let e = Config::load(std::path::Path::new("/nonexistent/ivcom.toml")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/ivcom.toml: cannot read the configuration"), "{e}");
}
