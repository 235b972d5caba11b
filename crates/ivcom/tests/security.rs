//! Attacks on the channel library by another local user, acted out as that user would
//! (`ivcom-testkit` creates an unprivileged victim and attacker; run as root, as CI does;
//! without root each test prints a note and passes). Each test asserts what the attacker
//! obtains (nothing) and what the victim gets (its real peer or a clear error).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ivcom::rundir::DirAccess;
use ivcom::{Access, Listener, Options, Stream};
use ivcom_testkit::{chmod, chown, users, Scratch, User};
use support::{kv, raw, Peer};

const NAME: &str = "svc";
const SECRET: &str = "victim-secret-data";
const T: Duration = Duration::from_secs(60);

#[test]
fn peer_entry() {
    support::peer_main(|role| match role {
        "listen_report" => listen_report(),
        "connect_send" => connect_send(),
        "bind_once" => bind_once(),
        "lock_hold" => lock_hold(),
        "bind_loop" => bind_loop(),
        "swap_loop" => swap_loop(),
        r => panic!("unknown role {r}"),
    });
}

// ---- roles -------------------------------------------------------------------------------

/// Binds NAME open to anyone (as an attacker's listener would), optionally widens its
/// directory afterwards (`SEC_DIR_MODE`), and reports every byte any connector sends.
fn listen_report() -> i32 {
    let opts = Options::new().access(Access::Anyone).socket_mode(0o666);
    let l = Listener::bind_with(NAME, &opts).expect("bind");
    if let Ok(m) = std::env::var("SEC_DIR_MODE") {
        let mode = u32::from_str_radix(&m, 8).expect("octal SEC_DIR_MODE");
        std::fs::set_permissions(l.path().parent().unwrap(), std::fs::Permissions::from_mode(mode))
            .expect("chmod dir");
    }
    support::say(format!("READY path={}", l.path().display()));
    loop {
        match l.accept() {
            Ok(mut s) => {
                support::say("ACCEPTED");
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                support::say(format!("GOT {}", String::from_utf8_lossy(&buf)));
            }
            Err(e) => support::say(format!("ACCEPT_ERR kind={:?}", e.kind())),
        }
    }
}

/// Connects to NAME (runtime directory from the environment: explicit or the fallback) and
/// sends the secret.
fn connect_send() -> i32 {
    match Stream::connect(NAME) {
        Err(e) => support::say(format!("CONNECT ok=0 kind={:?} msg={:?}", e.kind(), e.to_string())),
        Ok(mut s) => {
            let sent = s.write_all(SECRET.as_bytes()).is_ok();
            drop(s);
            support::say(format!("CONNECT ok=1 sent={}", sent as u8));
        }
    }
    0
}

/// Binds NAME once with the options the environment gives (`SEC_DIR_GROUP`).
fn bind_once() -> i32 {
    let mut opts = Options::new();
    if let Ok(g) = std::env::var("SEC_DIR_GROUP") {
        opts = opts.dir_access(DirAccess::Group(g.parse().expect("gid")));
    }
    match Listener::bind_with(NAME, &opts) {
        Ok(l) => support::say(format!("BIND ok=1 path={}", l.path().display())),
        Err(e) => support::say(format!("BIND ok=0 kind={:?} msg={:?}", e.kind(), e.to_string())),
    }
    0
}

/// Holds an exclusive flock on `SEC_LOCK_DIR` until killed.
fn lock_hold() -> i32 {
    use rustix::fs::{flock, open, FlockOperation, Mode, OFlags};
    let dir = support::env_str("SEC_LOCK_DIR");
    let fd = open(dir.as_str(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).expect("open dir");
    flock(&fd, FlockOperation::LockExclusive).expect("flock");
    support::say("LOCKED");
    std::thread::sleep(Duration::from_secs(600));
    0
}

/// Binds and drops NAME `SEC_ROUNDS` times with a socket mode open to all (0666), as a victim
/// listener for anyone would; reports how many binds worked.
fn bind_loop() -> i32 {
    let rounds = support::env_u64("SEC_ROUNDS", 500);
    let opts = Options::new().access(Access::Anyone);
    let (mut ok, mut err, mut last) = (0, 0, String::new());
    for _ in 0..rounds {
        match Listener::bind_with(NAME, &opts) {
            Ok(l) => {
                ok += 1;
                drop(l);
            }
            Err(e) => {
                err += 1;
                last = format!("{:?}", e.to_string());
            }
        }
    }
    support::say(format!("LOOP ok={ok} err={err} last={last}"));
    0
}

/// Keeps replacing `SEC_SWAP_DIR/NAME.sock` with a symlink to `SEC_SWAP_TARGET` until killed.
fn swap_loop() -> i32 {
    let dir = PathBuf::from(support::env_str("SEC_SWAP_DIR"));
    let target = support::env_str("SEC_SWAP_TARGET");
    let tmp = dir.join(format!(".swap-{}", std::process::id()));
    let sock = dir.join(format!("{NAME}.sock"));
    support::say("SWAPPING");
    loop {
        let _ = std::fs::remove_file(&tmp);
        if std::os::unix::fs::symlink(&target, &tmp).is_ok() {
            let _ = std::fs::rename(&tmp, &sock);
        }
    }
}

// ---- helpers -----------------------------------------------------------------------------

/// This test binary re-run as `user` in `role`, with the environment `User::command` gives
/// (`TMPDIR=/tmp`, no `XDG_RUNTIME_DIR`) plus `envs`.
fn as_user(user: &User, role: &str, envs: &[(&str, &str)]) -> Peer {
    let mut cmd = user.command(std::env::current_exe().expect("current_exe"));
    cmd.args(["peer_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(support::ROLE_ENV, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Peer::spawn_cmd(&format!("{}:{role}", user.name), cmd)
}

/// Whether the unprivileged users can run this test binary at all.
fn runnable(test: &str) -> Option<(User, User)> {
    let (victim, attacker) = users(test)?;
    let probe = victim.command(std::env::current_exe().unwrap()).arg("--list").output();
    match probe {
        Ok(o) if o.status.success() => Some((victim, attacker)),
        other => {
            eprintln!("note: {test}: the unprivileged users cannot run the test binary ({other:?}); skipped");
            None
        }
    }
}

/// A world-writable, sticky directory like `/tmp`, for a victim's `$TMPDIR` (so the test does
/// not race other tests over the real `/tmp/ivcom-UID`).
fn sticky_tmp(scratch: &Scratch) -> PathBuf {
    let p = scratch.path().join("tmp");
    std::fs::create_dir(&p).unwrap();
    chmod(&p, 0o1777);
    p
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Ends an attacker's listener and returns what it reported receiving.
fn got_lines(p: &mut Peer) -> Vec<String> {
    p.kill();
    p.wait(T);
    let mut v = p.drain_lines();
    v.retain(|l| l.starts_with("GOT") || l.starts_with("ACCEPTED"));
    v
}

// ---- tests -------------------------------------------------------------------------------

/// (a) The attacker creates the victim's fallback runtime directory (`$TMPDIR/ivcom-UID`, no
/// `XDG_RUNTIME_DIR`) before the victim's first use, open to all, with a listener of its own
/// at the victim's name. The victim's connect and bind fail naming path, owner and mode; the
/// attacker receives nothing.
#[test]
fn squatted_fallback_runtime_dir_is_refused() {
    let Some((victim, attacker)) = runnable("squatted_fallback_runtime_dir_is_refused") else { return };
    let scratch = Scratch::new("squat");
    let tmp = sticky_tmp(&scratch);
    let fallback = tmp.join(format!("ivcom-{}", victim.uid));
    let tmp_s = tmp.to_str().unwrap();
    let dir_s = fallback.to_str().unwrap();
    let mut squatter = as_user(
        &attacker,
        "listen_report",
        &[("IVCOM_RUNTIME_DIR", dir_s), ("SEC_DIR_MODE", "777"), ("TMPDIR", tmp_s)],
    );
    squatter.wait_line("READY", T);
    assert_eq!(std::fs::metadata(&fallback).unwrap().uid(), attacker.uid);

    let (line, bind, got) = victim_connects_and_binds(&victim, tmp_s, &mut squatter);

    assert!(got.is_empty(), "the attacker received a connection: {got:?}");
    for l in [&line, &bind] {
        assert_eq!(kv(l, "ok"), Some("0"), "the victim used the attacker's directory: {l}");
        assert_eq!(kv(l, "kind"), Some("PermissionDenied"), "{l}");
        assert!(l.contains(dir_s), "the error does not name the directory: {l}");
        assert!(l.contains(&format!("owner uid {}", attacker.uid)), "the error does not name the owner: {l}");
        assert!(l.contains("mode 0777"), "the error does not name the mode: {l}");
    }
}

/// The victim, with `TMPDIR=tmp`, connects and then binds through its default runtime
/// directory; returns its two report lines and what the attacker's listener received.
fn victim_connects_and_binds(victim: &User, tmp: &str, attacker: &mut Peer) -> (String, String, Vec<String>) {
    let mut c = as_user(victim, "connect_send", &[("TMPDIR", tmp)]);
    let line = c.wait_line("CONNECT", T);
    c.finish(T);
    let mut b = as_user(victim, "bind_once", &[("TMPDIR", tmp)]);
    let bind = b.wait_line("BIND", T);
    b.finish(T);
    let got = got_lines(attacker);
    eprintln!("victim connect: {line}\nvictim bind: {bind}\nattacker: {got:?}");
    (line, bind, got)
}

/// (b) The victim's fallback runtime directory is a symlink the attacker planted, pointing to
/// a directory of the attacker's holding a listener: refused, nothing reaches the attacker.
#[test]
fn symlinked_runtime_dir_is_refused() {
    let Some((victim, attacker)) = runnable("symlinked_runtime_dir_is_refused") else { return };
    let scratch = Scratch::new("symdir");
    let tmp = sticky_tmp(&scratch);
    let evil = scratch.dir_for("evil", &attacker, 0o700);
    let evil_rt = evil.join("rt");
    let mut l = as_user(
        &attacker,
        "listen_report",
        &[("IVCOM_RUNTIME_DIR", evil_rt.to_str().unwrap()), ("SEC_DIR_MODE", "777")],
    );
    l.wait_line("READY", T);
    chmod(&evil, 0o755);
    let link = tmp.join(format!("ivcom-{}", victim.uid));
    // The attacker plants the link (as the attacker, in the sticky directory).
    let st = attacker
        .command("ln")
        .args(["-s", evil_rt.to_str().unwrap(), link.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());

    let tmp_s = tmp.to_str().unwrap();
    let (line, bind, got) = victim_connects_and_binds(&victim, tmp_s, &mut l);
    assert!(got.is_empty(), "the attacker received a connection: {got:?}");
    for l in [&line, &bind] {
        assert_eq!(kv(l, "ok"), Some("0"), "the victim followed the symlink: {l}");
        assert!(l.contains("symbolic link"), "{l}");
        assert!(l.contains(link.to_str().unwrap()), "{l}");
    }
}

/// (c) An attacker who can write in the directory where the victim's listener socket is
/// named (the squatted fallback, open to all) keeps swapping the socket's name for a symlink
/// to a private file of the victim's while the victim binds a listener open to all (0666)
/// again and again: the victim's file keeps mode 0600.
#[test]
fn socket_mode_is_never_set_through_a_swapped_symlink() {
    let Some((victim, attacker)) = runnable("socket_mode_is_never_set_through_a_swapped_symlink") else {
        return;
    };
    let scratch = Scratch::new("swap");
    let tmp = sticky_tmp(&scratch);
    let home = scratch.dir_for("home", &victim, 0o755);
    let secret = home.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    chown(&secret, victim.uid, victim.gid);
    chmod(&secret, 0o600);
    // The attacker creates the victim's fallback directory, open to all.
    let rt = tmp.join(format!("ivcom-{}", victim.uid));
    let st = attacker.command("mkdir").args(["-m", "777", rt.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
    let mut swapper = as_user(
        &attacker,
        "swap_loop",
        &[("SEC_SWAP_DIR", rt.to_str().unwrap()), ("SEC_SWAP_TARGET", secret.to_str().unwrap())],
    );
    swapper.wait_line("SWAPPING", T);
    let mut v = as_user(&victim, "bind_loop", &[("TMPDIR", tmp.to_str().unwrap()), ("SEC_ROUNDS", "3000")]);
    let line = v.wait_line("LOOP", Duration::from_secs(300));
    v.finish(T);
    swapper.kill();
    swapper.wait(T);
    eprintln!("victim: {line}; secret mode {:o}", mode_of(&secret));
    assert_eq!(mode_of(&secret), 0o600, "the victim's bind changed the mode of its private file");
    // And the attacker's directory was never used.
    assert_eq!(kv(&line, "ok"), Some("0"), "{line}");
}

/// (d) The victim shares its runtime directory with the attacker's group (0750, as
/// docs/deployment.md describes for co-tenant containers); the attacker holds `flock` on it
/// forever. The victim's bind ends with a clear `TimedOut` naming the directory, not a hang.
#[test]
fn a_held_directory_lock_does_not_hang_bind() {
    let Some((victim, attacker)) = runnable("a_held_directory_lock_does_not_hang_bind") else { return };
    let scratch = Scratch::new("lock");
    let rt = scratch.dir_for("rt", &victim, 0o750);
    chown(&rt, victim.uid, attacker.gid);
    let rt_s = rt.to_str().unwrap();
    let mut holder = as_user(&attacker, "lock_hold", &[("SEC_LOCK_DIR", rt_s)]);
    holder.wait_line("LOCKED", T);
    let gid = attacker.gid.to_string();
    let mut b = as_user(&victim, "bind_once", &[("IVCOM_RUNTIME_DIR", rt_s), ("SEC_DIR_GROUP", &gid)]);
    // Bounded: a bind that hangs is killed and the line never comes.
    let line = b.wait_line("BIND", T);
    b.finish(T);
    holder.kill();
    holder.wait(T);
    eprintln!("victim bind: {line}");
    assert_eq!(kv(&line, "ok"), Some("0"), "{line}");
    assert_eq!(kv(&line, "kind"), Some("TimedOut"), "{line}");
    assert!(line.contains(rt_s), "the error does not name the directory: {line}");
}

/// (f) A connector asking for 256 MiB rings is refused by a default listener, with an error
/// naming the limit on both sides, whether it goes through the library (which reads the
/// limit from the listener's hello) or builds the region itself; the listener keeps serving.
#[test]
fn huge_ring_is_refused_by_a_default_listener() {
    let scratch = Scratch::new("huge");
    let rt = scratch.path().join("rt");
    let opts = Options::new().runtime_dir(&rt);
    let l = std::sync::Arc::new(Listener::bind_with(NAME, &opts).unwrap());
    let huge = 256 << 20;

    let l2 = l.clone();
    let acc = std::thread::spawn(move || l2.accept().map(|_| ()));
    let e = Stream::connect_with(NAME, &opts.clone().capacity(huge)).map(|_| ()).unwrap_err();
    eprintln!("library connector: {e}");
    assert!(e.to_string().contains("4194304"), "the error does not name the limit: {e}");
    let le = acc.join().unwrap().unwrap_err();
    eprintln!("listener: {le}");
    assert!(le.to_string().contains("4194304"), "{le}");

    // A connector that ignores the advertised limit and sends a 512 MiB region.
    let l2 = l.clone();
    let acc = std::thread::spawn(move || l2.accept().map(|_| ()));
    let re = match raw::RawConn::connect(&rt.join(format!("{NAME}.sock")), huge as u64) {
        Ok(_) => panic!("the listener accepted a 256 MiB ring"),
        Err(e) => e,
    };
    eprintln!("raw connector: {re}");
    assert!(re.to_string().contains(&format!("refused ({})", raw::STATUS_BAD_REGION)), "{re}");
    assert!(re.to_string().contains("max_capacity"), "{re}");
    let le = acc.join().unwrap().unwrap_err();
    assert_eq!(le.kind(), ErrorKind::InvalidData, "{le}");
    assert!(le.to_string().contains("max_capacity"), "{le}");

    // Still serving: a connector within the limit gets its channel.
    let l2 = l.clone();
    let acc = std::thread::spawn(move || l2.accept());
    let mut c = Stream::connect_with(NAME, &opts).unwrap();
    let mut s = acc.join().unwrap().unwrap();
    c.write_all(b"ok").unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok");
    // A listener configured for larger rings takes them.
    let big = Options::new().runtime_dir(&rt).max_capacity(16 << 20);
    let l = Listener::bind_with("big", &big).unwrap();
    let acc = std::thread::spawn(move || l.accept().map(|_| ()));
    Stream::connect_with("big", &big.clone().capacity(16 << 20)).unwrap();
    acc.join().unwrap().unwrap();
}

/// (g) A listener socket bound by the attacker ends up in the victim's own runtime directory
/// (root moves it there, as a careless bind mount into a container would). The victim's
/// connector checks the listening process's credentials, refuses it naming the attacker's uid,
/// and sends nothing: the attacker's listener sees no connection.
#[test]
fn connector_refuses_a_listener_of_another_uid() {
    let Some((victim, attacker)) = runnable("connector_refuses_a_listener_of_another_uid") else { return };
    let scratch = Scratch::new("peercred");
    let vrt = scratch.dir_for("victim-rt", &victim, 0o700);
    let art = scratch.dir_for("attacker-home", &attacker, 0o755).join("rt");
    let mut l = as_user(&attacker, "listen_report", &[("IVCOM_RUNTIME_DIR", art.to_str().unwrap())]);
    l.wait_line("READY", T);
    std::fs::rename(art.join(format!("{NAME}.sock")), vrt.join(format!("{NAME}.sock"))).unwrap();

    let mut c = as_user(&victim, "connect_send", &[("IVCOM_RUNTIME_DIR", vrt.to_str().unwrap())]);
    let line = c.wait_line("CONNECT", T);
    c.finish(T);
    let got = got_lines(&mut l);
    eprintln!("victim: {line}\nattacker: {got:?}");
    assert!(got.is_empty(), "the attacker's listener got a connection: {got:?}");
    assert_eq!(kv(&line, "ok"), Some("0"), "{line}");
    assert_eq!(kv(&line, "kind"), Some("PermissionDenied"), "{line}");
    assert!(line.contains(&format!("uid {}", attacker.uid)), "the error does not name the uid: {line}");
    assert!(line.contains("pid "), "{line}");
}
