//! Host processes as members of a daemon's region, end to end with the real binaries:
//! `ivcom daemon`, one `ivcom agent --join` per member, and `ivcom listen/connect --agent`
//! piping data across. Then a member's agent is killed, as a guest that powers off, and the
//! survivor's channel ends in bounded time.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_ivcom");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ivcom-vmhost-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn wait_for(p: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < end, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon serving group `lab` of members a and b, and an agent for each.
fn setup(dir: &Path) -> (Proc, Proc, Proc, PathBuf, PathBuf) {
    let cfg = dir.join("ivcom.toml");
    std::fs::write(&cfg, "[[group]]\nname = \"lab\"\nmembers = [\"a\", \"b\"]\nsize = \"4M\"\nvectors = 4\n")
        .unwrap();
    let socks = dir.join("vm");
    let daemon = Proc(
        Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(&cfg)
            .arg("--socket-dir")
            .arg(&socks)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut agents = Vec::new();
    let mut sockets = Vec::new();
    for m in ["a", "b"] {
        let member_sock = socks.join("lab").join(format!("{m}.sock"));
        wait_for(&member_sock);
        let agent_sock = dir.join(format!("agent-{m}.sock"));
        agents.push(Proc(
            Command::new(BIN)
                .args(["agent", "--join"])
                .arg(&member_sock)
                .arg("--socket")
                .arg(&agent_sock)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        wait_for(&agent_sock);
        sockets.push(agent_sock);
    }
    let b = agents.pop().unwrap();
    let a = agents.pop().unwrap();
    let sb = sockets.pop().unwrap();
    let sa = sockets.pop().unwrap();
    (daemon, a, b, sa, sb)
}

/// `ivcom listen|connect NAME --agent AGENT` with all three standard streams piped.
fn nc(verb: &str, agent: &Path, name: &str) -> Proc {
    Proc(
        Command::new(BIN)
            .args([verb, name, "--agent"])
            .arg(agent)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn listen(agent: &Path, name: &str) -> Proc {
    nc("listen", agent, name)
}

fn connect(agent: &Path, name: &str) -> Proc {
    nc("connect", agent, name)
}

fn wait_listening(l: &mut Proc) {
    let mut err = l.0.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 256];
    let end = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("listening") {
        assert!(Instant::now() < end, "listener never said it listens: {}", String::from_utf8_lossy(&seen));
        let n = err.read(&mut b).unwrap();
        assert!(n > 0, "listener exited: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&b[..n]);
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
}

#[test]
fn host_members_pipe_data_through_the_daemons_region() {
    let dir = temp_dir("pipe");
    let (_d, _a, _b, sa, sb) = setup(&dir);
    let mut l = listen(&sb, "copy");
    // Nothing to send back: the listener's side ends when its stdin does.
    drop(l.0.stdin.take());
    wait_listening(&mut l);
    let mut c = connect(&sa, "copy");
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut cin = c.0.stdin.take().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        cin.write_all(&d2).unwrap();
    });
    let mut got = Vec::new();
    l.0.stdout.take().unwrap().read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
    let st = c.0.wait().unwrap();
    assert!(st.success(), "connect: {st}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_member_that_dies_ends_the_others_channel_in_bounded_time() {
    let dir = temp_dir("die");
    let (_d, a, mut b, sa, sb) = setup(&dir);
    let mut l = listen(&sb, "held");
    wait_listening(&mut l);
    let mut c = connect(&sa, "held");
    // The connecting side sends and half-closes; it then waits for the other side's end.
    let mut cin = c.0.stdin.take().unwrap();
    cin.write_all(b"hello\n").unwrap();
    drop(cin);
    let mut out = l.0.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello\n");
    // Member b goes away the hard way (its agent and its process), as a guest that powers off.
    let start = Instant::now();
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    l.0.kill().unwrap();
    l.0.wait().unwrap();
    // The connecting side's channel ends: `ivcom connect` exits by itself.
    let end = start + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = c.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the survivor did not notice within 5 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("survivor ended after {:?} with {status}", start.elapsed());
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}
