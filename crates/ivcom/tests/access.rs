//! Who may connect, and who may not: peers of another uid (policy and socket-file mode),
//! handshake and layout version mismatches, and exclusive names (a live listener keeps its
//! name; a killed one's stale socket file is replaced).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ivcom::rundir::DirAccess;
use ivcom::{Access, Listener, Options, Stream};
use ivcom_ring::layout::{off, Params};
use support::raw;
use support::{kv, Peer, TestDir};

const NAME: &str = "gate";
const NOBODY: u32 = 65534;

#[test]
fn peer_entry() {
    support::peer_main(|role| match role {
        "connect_echo" => connect_echo(),
        "hold" => hold(),
        r => panic!("unknown role {r}"),
    });
}

/// Connects, sends "ping" and expects it back; reports how that went.
fn connect_echo() -> i32 {
    let uid = rustix::process::geteuid().as_raw();
    match Stream::connect(NAME) {
        Err(e) => support::say(format!("CONNECT uid={uid} ok=0 kind={:?} msg={:?}", e.kind(), e.to_string())),
        Ok(mut s) => {
            s.write_all(b"ping").expect("write");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).expect("read");
            support::say(format!("CONNECT uid={uid} ok=1 echo={}", String::from_utf8_lossy(&b)));
        }
    }
    0
}

/// Binds the name and keeps accepting until killed.
fn hold() -> i32 {
    let l = Listener::bind(NAME).expect("bind");
    support::say("READY");
    loop {
        match l.accept() {
            Ok(_) => support::say("ACCEPTED"),
            Err(e) => support::say(format!("ACCEPT_ERR kind={:?} msg={:?}", e.kind(), e.to_string())),
        }
    }
}

/// Why uid 65534 cannot run this test binary, if it cannot.
fn not_runnable_by_nobody() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let mode = std::fs::metadata(&exe).ok()?.permissions().mode();
    if mode & 0o005 != 0o005 {
        return Some(format!("{} has mode {mode:o} (others cannot execute it)", exe.display()));
    }
    let mut d = exe.parent();
    while let Some(p) = d {
        let m = std::fs::metadata(p).ok()?.permissions().mode();
        if m & 0o001 == 0 {
            return Some(format!("{} has mode {m:o} (others cannot traverse it)", p.display()));
        }
        d = p.parent();
    }
    None
}

fn spawn_as_nobody(dir: &Path) -> Peer {
    let mut cmd = support::peer_command("connect_echo", dir, &[]);
    cmd.uid(NOBODY).gid(NOBODY);
    Peer::spawn_cmd("nobody", cmd)
}

/// Runs `accept` in a thread; the result comes through the channel.
fn accept_async(l: &std::sync::Arc<Listener>) -> mpsc::Receiver<std::io::Result<Stream>> {
    let (tx, rx) = mpsc::channel();
    let l = l.clone();
    thread::spawn(move || {
        let r = l.accept();
        drop(l);
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn peer_of_another_uid_is_refused_unless_allowed() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to run a peer as uid {NOBODY}");
        return;
    }
    if let Some(why) = not_runnable_by_nobody() {
        eprintln!("SKIPPED: uid {NOBODY} cannot run the test binary: {why}");
        return;
    }
    // The directory is shared with the peer's group (0750, group nobody): its owner alone
    // may create names in it, members of the group may reach them.
    let dir = TestDir::with_mode("uid", 0o750);
    std::os::unix::fs::chown(dir.path(), None, Some(NOBODY)).unwrap();
    let shared = || Options::new().runtime_dir(dir.path()).dir_access(DirAccess::Group(NOBODY));
    let t = Duration::from_secs(60);

    // Socket file open to all, default policy (same uid): the handshake refuses.
    let l = std::sync::Arc::new(Listener::bind_with(NAME, &shared().socket_mode(0o666)).unwrap());
    let accepted = accept_async(&l);
    let mut p = spawn_as_nobody(dir.path());
    let line = p.wait_line("CONNECT", t);
    p.finish(t);
    assert_eq!(kv(&line, "uid"), Some("65534"), "{line}");
    assert_eq!(kv(&line, "ok"), Some("0"), "a peer of another uid connected: {line}");
    assert_eq!(kv(&line, "kind"), Some("PermissionDenied"), "{line}");
    assert!(line.contains("uid 65534"), "the refusal does not name the uid: {line}");
    let e = accepted.recv_timeout(t).unwrap().map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("uid 65534"), "{e}");
    drop(l);

    // The same peer, allowed by uid.
    let l =
        std::sync::Arc::new(Listener::bind_with(NAME, &shared().access(Access::Uids(vec![NOBODY]))).unwrap());
    let accepted = accept_async(&l);
    let mut p = spawn_as_nobody(dir.path());
    let mut s = accepted.recv_timeout(t).unwrap().expect("accept of an allowed uid");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    s.write_all(&b).unwrap();
    let line = p.wait_line("CONNECT", t);
    p.finish(t);
    assert_eq!(kv(&line, "ok"), Some("1"), "{line}");
    assert_eq!(kv(&line, "echo"), Some("ping"), "{line}");
    drop(s);
    drop(l);

    // Default socket mode (0600): the peer cannot even open the socket.
    let l = Listener::bind_with(NAME, &shared()).unwrap();
    let mode = std::fs::metadata(l.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut p = spawn_as_nobody(dir.path());
    let line = p.wait_line("CONNECT", t);
    p.finish(t);
    assert_eq!(kv(&line, "ok"), Some("0"), "{line}");
    assert_eq!(kv(&line, "kind"), Some("PermissionDenied"), "{line}");
    drop(l);
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}

#[test]
fn listener_speaking_handshake_version_2_is_refused() {
    let dir = TestDir::new("srv-v2");
    let ls = raw::bind(&dir.path().join(format!("{NAME}.sock"))).unwrap();
    let t = thread::spawn(move || {
        let s = raw::accept(ls.as_fd()).unwrap();
        raw::send(s.as_fd(), &raw::server_hello(2, false, 0, 0), &[]).unwrap();
        raw::recv(s.as_fd())
    });
    let e = Stream::connect_with(NAME, &Options::new().runtime_dir(dir.path())).map(|_| ()).unwrap_err();
    eprintln!("connect: {e}");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("version 2"), "{e}");
    // The connector tells the listener what it speaks.
    let p = t.join().unwrap().expect("the connector sent nothing back");
    let (status, reason) = p.refusal();
    eprintln!("raw listener got REFUSE {status}: {reason}");
    assert_eq!(status, raw::STATUS_VERSION);
    assert!(reason.contains("version 2"), "{reason}");
}

#[test]
fn connector_speaking_handshake_version_2_is_refused() {
    let dir = TestDir::new("cli-v2");
    let l = Listener::bind_with(NAME, &Options::new().runtime_dir(dir.path())).unwrap();
    let path = l.path().to_owned();
    let t = thread::spawn(move || {
        let s = raw::connect(&path).unwrap();
        raw::parse_server_hello(&raw::recv(s.as_fd()).unwrap());
        let params = Params { capacity: [4096, 4096], max_message: None };
        let region = raw::OwnRegion::init(&params);
        let (a, b) = (raw::new_eventfd(), raw::new_eventfd());
        raw::send(s.as_fd(), &raw::client_hello(2, false), &[region.fd.as_fd(), a.as_fd(), b.as_fd()])
            .unwrap();
        raw::recv(s.as_fd())
    });
    let e = l.accept().map(|_| ()).unwrap_err();
    eprintln!("accept: {e}");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("version 2"), "{e}");
    let p = t.join().unwrap().expect("the listener sent no REFUSE");
    let (status, reason) = p.refusal();
    assert_eq!(status, raw::STATUS_VERSION, "{reason}");
    assert!(reason.contains("version 2"), "{reason}");
}

#[test]
fn region_of_layout_version_2_is_refused() {
    let dir = TestDir::new("layout-v2");
    let l = Listener::bind_with(NAME, &Options::new().runtime_dir(dir.path())).unwrap();
    let path = l.path().to_owned();
    let t = thread::spawn(move || {
        let s = raw::connect(&path).unwrap();
        raw::parse_server_hello(&raw::recv(s.as_fd()).unwrap());
        let params = Params { capacity: [4096, 4096], max_message: None };
        let region = raw::OwnRegion::init(&params);
        region.region().store_u32(off::VERSION, 2, std::sync::atomic::Ordering::Relaxed).unwrap();
        let (a, b) = (raw::new_eventfd(), raw::new_eventfd());
        let hello = raw::client_hello(ivcom::HS_VERSION, false);
        raw::send(s.as_fd(), &hello, &[region.fd.as_fd(), a.as_fd(), b.as_fd()]).unwrap();
        raw::recv(s.as_fd())
    });
    let e = l.accept().map(|_| ()).unwrap_err();
    eprintln!("accept: {e}");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("layout version 2"), "{e}");
    let p = t.join().unwrap().expect("the listener sent no REFUSE");
    let (status, reason) = p.refusal();
    assert_eq!(status, raw::STATUS_BAD_REGION, "{reason}");
    assert!(reason.contains("layout version 2"), "{reason}");
}

#[test]
fn a_live_name_is_exclusive_and_a_killed_listeners_file_is_replaced() {
    let dir = TestDir::new("names");
    let opts = Options::new().runtime_dir(dir.path());
    let mut holder = Peer::spawn("holder", "hold", dir.path(), &[]);
    holder.wait_line("READY", Duration::from_secs(60));
    let e = Listener::bind_with(NAME, &opts).unwrap_err();
    eprintln!("second bind: {e}");
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
    assert!(e.to_string().contains("already taken"), "{e}");
    // Our bind probed the live listener with a connection; see what its accept made of it.
    thread::sleep(Duration::from_millis(200));
    for l in holder.drain_lines() {
        eprintln!("holder after the probe: {l}");
    }
    holder.kill();
    let st = holder.wait(Duration::from_secs(30));
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(9));
    }
    // The killed listener could not remove its socket file.
    assert_eq!(dir.entries(), vec![format!("{NAME}.sock")]);
    let l = std::sync::Arc::new(Listener::bind_with(NAME, &opts).expect("bind over a stale socket file"));
    let accepted = accept_async(&l);
    let mut c = Stream::connect_with(NAME, &opts).unwrap();
    let mut s = accepted.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    c.write_all(b"new").unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"new");
    drop((c, s, l));
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}
