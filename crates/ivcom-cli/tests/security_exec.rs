//! Security of `ivcom run` around `exec` and descriptor numbers (issue 8, items 4 and 5).
//! Each test runs a C program from `tests/preload/` plainly and under `ivcom run`, as root,
//! and compares what a user would check: what an attacker obtains (nothing), and what the
//! victim gets (its real peer). Each run under ivcom must really have been accelerated.
//!
//! - An exec'd helper that runs as another user without the library inherits no memfd of a
//!   channel: it cannot read the client's data nor answer in the server's place.
//! - An exec that continues under the library still takes the connection over.
//! - A socket closed behind the library's back (`fclose` of an `fdopen`ed socket) does not
//!   turn a file opened at its number into the connection.
//! - A thread blocked reading a socket that another thread closes keeps its socket (as with
//!   TCP); the descriptor that gets the number is left alone.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ivcom_testkit::{run_bounded, users, Scratch};

mod support;
use support::{c_bin, preload_lib, IVCOM};

const LIMIT: Duration = Duration::from_secs(60);

fn lines(o: &Output, what: &str, in_time: bool) -> Vec<String> {
    assert!(
        in_time && o.status.success(),
        "{what} failed (in time: {in_time}): {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
    v.sort();
    v
}

/// Runs `prog args` plainly and under `ivcom run`; returns both outputs (sorted lines) and
/// the decision log of the ivcom run, which must show an accelerated connection.
fn plain_and_ivcom(scratch: &Scratch, prog: &Path, args: &[&str]) -> (Vec<String>, Vec<String>, String) {
    let (o, t) = run_bounded(Command::new(prog).args(args), LIMIT);
    let plain = lines(&o, "plain run", t);
    let log = scratch.path().join("decisions.log");
    let mut c = Command::new(IVCOM);
    c.arg("run").arg("--log").arg(&log).arg("--").arg(prog).args(args);
    c.env("IVCOM_RUNTIME_DIR", scratch.path().join("run")).env("IVCOM_PRELOAD_LIB", preload_lib());
    let (o, t) = run_bounded(&mut c, LIMIT);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let under = lines(&o, &format!("run under ivcom (log:\n{log_text})"), t);
    assert!(log_text.contains("connection accelerated"), "no accelerated connection; log:\n{log_text}");
    (plain, under, log_text)
}

fn helper_line(out: &[String]) -> &str {
    out.iter().find(|l| l.starts_with("helper")).map(String::as_str).unwrap_or("")
}

/// A root server forks, drops to the attacker user and execs a helper with `LD_PRELOAD`
/// removed; its accepted socket is close-on-exec. The helper finds no memfd (so it neither
/// reads the client's secret nor can write a reply into the ring); the client gets the
/// real server's reply.
#[test]
fn exec_without_library_as_another_user_gets_no_channel() {
    let Some((_victim, attacker)) = users("exec_without_library_as_another_user_gets_no_channel") else {
        return;
    };
    let s = Scratch::new("exec-cloexec");
    let prog = c_bin("t_sec_exec");
    let (uid, gid) = (attacker.uid.to_string(), attacker.gid.to_string());
    let (plain, under, log) = plain_and_ivcom(&s, &prog, &["cloexec", &uid, &gid]);
    let h = helper_line(&under);
    assert!(h.contains(&format!("(uid {uid})")), "the helper did not run as the attacker: {under:?}");
    assert!(
        h.contains("memfds 0, client's secret seen 0, forged replies sent 0"),
        "the attacker's helper obtained something of the channel: {h}\nlog:\n{log}"
    );
    assert!(under.contains(&"client: got reply 'REAL-REPLY'".to_string()), "client: {under:?}");
    assert_eq!(under, plain, "under ivcom run the outcome differs from plain TCP");
}

/// Same, with the accepted socket left open across the exec: the helper (no library) still
/// gets no memfd, and the connection is closed for it (logged) instead of being left
/// half-working; the client gets the real server's reply.
#[test]
fn exec_without_library_with_socket_inherited_gets_no_memory() {
    let Some((_victim, attacker)) = users("exec_without_library_with_socket_inherited_gets_no_memory") else {
        return;
    };
    let s = Scratch::new("exec-inherit");
    let prog = c_bin("t_sec_exec");
    let (uid, gid) = (attacker.uid.to_string(), attacker.gid.to_string());
    let (plain, under, log) = plain_and_ivcom(&s, &prog, &["inherit", &uid, &gid]);
    let h = helper_line(&under);
    assert!(
        h.contains("memfds 0, client's secret seen 0"),
        "the helper obtained channel memory: {h}\nlog:\n{log}"
    );
    assert!(log.contains("does not continue under ivcom"), "the exec decision was not logged:\n{log}");
    assert!(under.contains(&"client: got reply 'REAL-REPLY'".to_string()), "client: {under:?}");
    assert_eq!(under, plain, "under ivcom run the outcome differs from plain TCP");
}

/// An exec whose new image continues under the library takes the connection over (both
/// sides exec; the conversation continues intact), passed at the exec, not found by scanning.
#[test]
fn exec_under_library_takes_connection_over() {
    if users("exec_under_library_takes_connection_over").is_none() {
        return;
    }
    let s = Scratch::new("exec-takeover");
    let prog = c_bin("t_exec");
    let (plain, under, log) = plain_and_ivcom(&s, &prog, &[]);
    assert_eq!(under, plain, "under ivcom run the outcome differs from plain TCP\nlog:\n{log}");
    assert!(
        log.matches("exec: took over accelerated connection").count() >= 2,
        "the new images did not take the connection over:\n{log}"
    );
    assert!(log.contains("exec: passing 1 accelerated connection(s)"), "not passed at the exec:\n{log}");
}

/// `fclose` of an `fdopen`ed accelerated socket, then a file opened at the same number: what
/// is written goes into the file and reads return the file's bytes; the peer receives none.
#[test]
fn fclosed_socket_number_reused_by_a_file() {
    if users("fclosed_socket_number_reused_by_a_file").is_none() {
        return;
    }
    let s = Scratch::new("fclose");
    let prog = c_bin("t_sec_fds");
    let file = s.path().join("file");
    let (plain, under, log) = plain_and_ivcom(&s, &prog, &["fclose", file.to_str().expect("utf-8 path")]);
    assert!(
        under.contains(&"client: received 0 bytes from the server before the end ''".to_string()),
        "the peer received the file's data: {under:?}\nlog:\n{log}"
    );
    assert!(
        under.contains(&"server: file at the socket's old number 1, holds 'file-data|'".to_string()),
        "the file did not get its data at the reused number: {under:?}"
    );
    assert_eq!(under, plain, "under ivcom run the outcome differs from plain TCP");
}

/// A thread blocked in `read` on an accelerated socket while another thread closes it and
/// gets the number back for a socket pair with data waiting: the blocked read returns the
/// peer's data (as over TCP), and nothing is taken from or sent into the pair.
#[test]
fn blocked_read_keeps_its_socket_when_the_number_is_reused() {
    if users("blocked_read_keeps_its_socket_when_the_number_is_reused").is_none() {
        return;
    }
    let s = Scratch::new("async-close");
    let prog = c_bin("t_sec_fds");
    let (plain, under, log) = plain_and_ivcom(&s, &prog, &["async", "-"]);
    assert!(
        under.contains(&"server: the pair's end at the socket's old number 1 holds 'PAIRDATA'".to_string()),
        "the pair's data was taken: {under:?}\nlog:\n{log}"
    );
    assert!(under.contains(&"server: bytes that reached the pair's other end: 0".to_string()), "{under:?}");
    assert!(under.contains(&"server: the blocked read returned 8 bytes 'PEERDATA'".to_string()), "{under:?}");
    assert_eq!(under, plain, "under ivcom run the outcome differs from plain TCP");
}
