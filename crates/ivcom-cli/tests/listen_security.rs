//! `ivcom listen` under attack by another local user (run as root, acting as unprivileged
//! users with `ivcom-testkit`; without root the test prints a note and passes).

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ivcom_testkit::{chown, run_bounded, users, Bounded, Scratch, User};

const BIN: &str = env!("CARGO_BIN_EXE_ivcom");
const T: Duration = Duration::from_secs(60);

/// Runs `ivcom connect` as `user` with `input` on its stdin, bounded; returns its output.
fn connect_as(user: &User, args: &[&str], input: &[u8]) -> (std::process::Output, bool) {
    let mut cmd = user.command(BIN);
    cmd.arg("connect").args(args).stdin(Stdio::piped());
    let mut b = Bounded::spawn(&mut cmd);
    let mut sin = b.0.stdin.take().unwrap();
    sin.write_all(input).unwrap();
    drop(sin);
    b.finish(T)
}

/// (e) A connector of a uid that `ivcom listen --access uids:X` does not admit is refused,
/// and the listener keeps running: the admitted connector (uid X) still gets its data through.
#[test]
fn refused_connector_does_not_end_ivcom_listen() {
    let Some((victim, attacker)) = users("refused_connector_does_not_end_ivcom_listen") else { return };
    let scratch = Scratch::new("cli-listen");
    // The victim's runtime directory, shared read-only with the attacker's group (the
    // co-tenant setup of docs/deployment.md): both other parties can reach the socket.
    let rt = scratch.dir_for("rt", &victim, 0o750);
    chown(&rt, victim.uid, attacker.gid);
    let rt_s = rt.to_str().unwrap();
    // The admitted party: uid 65534 in the shared group.
    let admitted = User { name: "uid65534".into(), uid: 65534, gid: attacker.gid };
    let probe = run_bounded(admitted.command(BIN).arg("--version"), T);
    if !probe.0.status.success() {
        eprintln!("note: uid 65534 cannot run {BIN}; skipped");
        return;
    }

    let gid = attacker.gid.to_string();
    let mut lcmd = victim.command(BIN);
    lcmd.args(["listen", "svc", "--runtime-dir", rt_s, "--access", "uids:65534", "--dir-group", &gid])
        .stdin(Stdio::null());
    let mut listener = Bounded::spawn(&mut lcmd);
    let sock = rt.join("svc.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(listener.0.try_wait().unwrap().is_none(), "ivcom listen exited before listening");
        assert!(t0.elapsed() < T, "listener never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }

    let trust_victim = format!("uids:{}", victim.uid);
    let (out, in_time) = connect_as(
        &attacker,
        &["svc", "--runtime-dir", rt_s, "--access", &trust_victim],
        b"injected by attacker",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("attacker: {:?} {err}", out.status);
    assert!(in_time && !out.status.success(), "the attacker's connect was not refused: {err}");
    assert!(err.contains(&format!("uid {}", attacker.uid)), "the refusal does not name the uid: {err}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(listener.0.try_wait().unwrap().is_none(), "ivcom listen ended after a refused connection");

    let (out, in_time) = connect_as(
        &admitted,
        &["svc", "--runtime-dir", rt_s, "--access", &trust_victim],
        b"hello from uid 65534",
    );
    eprintln!("admitted: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(in_time && out.status.success(), "the admitted connector failed");
    let (lout, in_time) = listener.finish(T);
    let lerr = String::from_utf8_lossy(&lout.stderr);
    eprintln!("listener: {:?} {lerr}", lout.status);
    assert!(in_time && lout.status.success(), "ivcom listen failed: {lerr}");
    assert_eq!(String::from_utf8_lossy(&lout.stdout), "hello from uid 65534");
    assert!(
        lerr.contains(&format!("uid {}", attacker.uid)),
        "the listener did not report the refusal: {lerr}"
    );
}
