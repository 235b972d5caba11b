//! `kill -9` of one side mid-transfer: the survivor's blocked call returns within 1 s, with
//! TCP's results (a reader sees EOF or `ECONNRESET`, a writer `EPIPE` or `ECONNRESET`), and
//! nothing is left behind in the runtime directory or `/dev/shm`.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use ivcom::{Listener, Stream};
use support::{kv, kv_u64, Peer, TestDir};

const NAME: &str = "victim";
const PROGRESS_EVERY: u64 = 8 << 20;
/// ivcom's documented bound for noticing a dead peer.
const BOUND: Duration = Duration::from_secs(1);

#[test]
fn peer_entry() {
    support::peer_main(|role| {
        let side = support::env_str("SIDE");
        let survive = support::env_str("FATE") == "survive";
        // The listener stays alive (and owns its socket file) for the whole transfer.
        let (listener, mut s) = if side == "listen" {
            let l = Listener::bind(NAME).expect("bind");
            support::say("READY");
            let s = l.accept().expect("accept");
            (Some(l), s)
        } else {
            (None, Stream::connect(NAME).expect("connect"))
        };
        let code = match (role, survive) {
            ("reader", true) => survive_reading(&mut s),
            ("reader", false) => read_then_stop(&mut s),
            ("writer", true) => survive_writing(&mut s),
            ("writer", false) => write_forever(&mut s),
            _ => panic!("unknown role {role}"),
        };
        drop(s);
        drop(listener);
        code
    });
}

fn report_end(r: &std::io::Result<usize>, total: u64, last_ok: Instant) {
    support::say(format!(
        "END {} bytes={total} since_last_ok_ms={:.1}",
        support::describe(r),
        last_ok.elapsed().as_secs_f64() * 1e3
    ));
}

/// Reads until the stream ends or fails; reports progress and how it ended.
fn survive_reading(s: &mut Stream) -> i32 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut next = PROGRESS_EVERY;
    let mut last_ok = Instant::now();
    loop {
        let r = s.read(&mut buf);
        match r {
            Ok(n) if n > 0 => {
                last_ok = Instant::now();
                total += n as u64;
                if total >= next {
                    next += PROGRESS_EVERY;
                    support::say(format!("PROGRESS bytes={total}"));
                }
            }
            _ => {
                report_end(&r, total, last_ok);
                return 0;
            }
        }
    }
}

/// Writes until a write fails; reports progress and how it ended.
fn survive_writing(s: &mut Stream) -> i32 {
    let chunk = vec![0x5au8; 64 * 1024];
    let mut total = 0u64;
    let mut next = PROGRESS_EVERY;
    let mut last_ok = Instant::now();
    loop {
        let r = s.write(&chunk);
        match r {
            Ok(n) => {
                last_ok = Instant::now();
                total += n as u64;
                if total >= next {
                    next += PROGRESS_EVERY;
                    support::say(format!("PROGRESS bytes={total}"));
                }
            }
            Err(_) => {
                report_end(&r, total, last_ok);
                return 0;
            }
        }
    }
}

/// The reader that gets killed while its writer is blocked: reads a while, then stops.
fn read_then_stop(s: &mut Stream) -> i32 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total < 2 * PROGRESS_EVERY {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "unexpected end of stream");
        total += n as u64;
    }
    support::say(format!("STOPPED bytes={total}"));
    std::thread::sleep(support::CHILD_TIMEOUT);
    1
}

/// The writer that gets killed mid-transfer.
fn write_forever(s: &mut Stream) -> i32 {
    let chunk = vec![0xa5u8; 48 * 1024];
    loop {
        if let Err(e) = s.write_all(&chunk) {
            eprintln!("victim writer: {e}");
            return 2;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Survivor {
    Reader,
    Writer,
}

/// Runs one scenario: the side at `killed_side` ("listen" or "connect") is killed while the
/// other survives as `survivor`.
fn scenario(tag: &str, survivor: Survivor, killed_side: &str) {
    let _serial = support::serial();
    let dir = TestDir::new(tag);
    let shm_before = support::shm_listing();
    let (survivor_role, victim_role) = match survivor {
        Survivor::Reader => ("reader", "writer"),
        Survivor::Writer => ("writer", "reader"),
    };
    let survivor_side = if killed_side == "listen" { "connect" } else { "listen" };
    let env = |side: &str, fate: &str| vec![("SIDE", side.to_owned()), ("FATE", fate.to_owned())];
    let spawn_survivor =
        || Peer::spawn("survivor", survivor_role, dir.path(), &env(survivor_side, "survive"));
    let spawn_victim = || Peer::spawn("victim", victim_role, dir.path(), &env(killed_side, "die"));
    let (mut surv, mut victim) = if survivor_side == "listen" {
        let mut s = spawn_survivor();
        s.wait_line("READY", Duration::from_secs(60));
        (s, spawn_victim())
    } else {
        let mut v = spawn_victim();
        v.wait_line("READY", Duration::from_secs(60));
        (spawn_survivor(), v)
    };
    if survivor == Survivor::Writer {
        victim.wait_line("STOPPED", Duration::from_secs(60));
    }
    let progress = surv.wait_line("PROGRESS", Duration::from_secs(60));
    if survivor == Survivor::Writer {
        // The reader stopped: the writer fills the ring and blocks waiting for space.
        std::thread::sleep(Duration::from_millis(300));
        assert!(surv.try_wait().is_none(), "survivor exited before the kill:\n{}", surv.log());
    }
    let killed_at = victim.kill();
    let st = surv.wait(Duration::from_secs(30));
    let took = surv.exited_at.unwrap() - killed_at;
    let vst = victim.wait(Duration::from_secs(30));
    let lines = surv.rest_lines(Duration::from_secs(5));
    eprintln!(
        "{tag}: {progress}; survivor exited {:.1} ms after the kill; {lines:?}",
        took.as_secs_f64() * 1e3
    );
    assert!(st.success(), "survivor failed ({st}):\n{}", surv.log());
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(vst.signal(), Some(9), "victim was not killed by SIGKILL ({vst}):\n{}", victim.log());
    }
    let end = support::line(&lines, "END");
    let outcome = kv(end, "outcome").unwrap();
    match survivor {
        // TCP: a reader whose writer died sees end of stream, or a reset if it had sent
        // unread data.
        Survivor::Reader => assert!(
            outcome == "eof" || outcome == format!("{:?}", ErrorKind::ConnectionReset),
            "reader survivor got {end}"
        ),
        // TCP: a writer whose reader died gets EPIPE, or ECONNRESET (unread data).
        Survivor::Writer => {
            assert!(
                [ErrorKind::BrokenPipe, ErrorKind::ConnectionReset]
                    .iter()
                    .any(|k| outcome == format!("{k:?}")),
                "writer survivor got {end}"
            );
            let errno = kv_u64(end, "errno") as i32;
            assert!(errno == libc_epipe() || errno == libc_econnreset(), "errno {errno}: {end}");
        }
    }
    assert!(
        took < BOUND,
        "survivor needed {took:?} after the kill to return and exit (bound {BOUND:?}): {end}"
    );
    let shm_after = support::shm_listing();
    let new: Vec<_> = shm_after.difference(&shm_before).collect();
    assert!(new.is_empty(), "new /dev/shm entries: {new:?}");
    // Both processes are gone; the listener's socket file must be too, even when its owner was
    // the one killed (its file can then only be removed by someone else).
    assert!(
        dir.entries().is_empty(),
        "runtime directory not empty after both peers are gone (killed side: {killed_side}): {:?}",
        dir.entries()
    );
}

fn libc_epipe() -> i32 {
    rustix::io::Errno::PIPE.raw_os_error()
}

fn libc_econnreset() -> i32 {
    rustix::io::Errno::CONNRESET.raw_os_error()
}

#[test]
fn blocked_reader_survives_killed_listener_writer() {
    scenario("rd-kill-listen", Survivor::Reader, "listen");
}

#[test]
fn blocked_reader_survives_killed_connector_writer() {
    scenario("rd-kill-connect", Survivor::Reader, "connect");
}

#[test]
fn blocked_writer_survives_killed_listener_reader() {
    scenario("wr-kill-listen", Survivor::Writer, "listen");
}

#[test]
fn blocked_writer_survives_killed_connector_reader() {
    scenario("wr-kill-connect", Survivor::Writer, "connect");
}
