//! Two processes move 1 GiB through a `Stream`, with random write sizes and pseudo-random
//! data; both compute SHA-256 of what they saw and the parent compares. Then again with a
//! slow reader, so the writer is back-pressured and must really sleep for space.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use ivcom::{Listener, Options, Stream};
use support::{kv, kv_u64, line, Peer, TestDir};

const NAME: &str = "transfer";
const GIB: u64 = 1 << 30;
const MAX_WRITE: usize = 256 * 1024;

#[test]
fn peer_entry() {
    support::peer_main(|role| match role {
        "sink" => sink(),
        "source" => source(),
        r => panic!("unknown role {r}"),
    });
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn print_stats(s: &ivcom::Stats) {
    support::say(format!(
        "STATS bytes_sent={} bytes_received={} messages_sent={} messages_received={} signals_sent={} sleeps={}",
        s.bytes_sent, s.bytes_received, s.messages_sent, s.messages_received, s.signals_sent, s.sleeps
    ));
}

/// Listener side: reads to end of stream, hashing. `SLOW=1` reads small random amounts and
/// pauses every few MiB.
fn sink() -> i32 {
    let slow = support::env_u64("SLOW", 0) != 0;
    let seed = support::env_u64("SEED", 1);
    let listener = Listener::bind(NAME).expect("bind");
    support::say("READY");
    let mut s = listener.accept().expect("accept");
    drop(listener);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let mut buf = vec![0u8; MAX_WRITE];
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut next_pause = 4 << 20;
    let t0 = Instant::now();
    loop {
        let want = if slow { rng.gen_range(1..=4096) } else { buf.len() };
        let n = s.read(&mut buf[..want]).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if slow && total >= next_pause {
            next_pause += rng.gen_range(2u64..=6) << 20;
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let st = s.stats();
    support::say(format!("RESULT bytes={total} sha256={} secs={secs:.2}", hex(&hasher.finalize())));
    print_stats(&st);
    drop(s);
    0
}

/// Connecting side: writes `TOTAL` bytes in random sizes of 1 B ..= 256 KiB, hashing.
fn source() -> i32 {
    let total = support::env_u64("TOTAL", GIB);
    let seed = support::env_u64("SEED", 1);
    let mut s = Stream::connect_with(NAME, &Options::new()).expect("connect");
    let mut sizes = SmallRng::seed_from_u64(seed);
    let mut data = SmallRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1);
    let mut buf = vec![0u8; MAX_WRITE];
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut writes = 0u64;
    let t0 = Instant::now();
    while sent < total {
        let n = sizes.gen_range(1..=MAX_WRITE).min((total - sent) as usize);
        data.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        s.write_all(&buf[..n]).expect("write");
        sent += n as u64;
        writes += 1;
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let secs = t0.elapsed().as_secs_f64();
    let st = s.stats();
    support::say(format!(
        "RESULT bytes={sent} sha256={} writes={writes} secs={secs:.2}",
        hex(&hasher.finalize())
    ));
    print_stats(&st);
    drop(s);
    0
}

struct Outcome {
    source: Vec<String>,
    sink: Vec<String>,
}

fn run(tag: &str, slow: bool, seed: u64) -> Outcome {
    let _serial = support::serial();
    let dir = TestDir::new(tag);
    let envs = [("SLOW", (slow as u8).to_string()), ("SEED", seed.to_string()), ("TOTAL", GIB.to_string())];
    let t0 = Instant::now();
    let mut sink = Peer::spawn("sink", "sink", dir.path(), &envs);
    sink.wait_line("READY", Duration::from_secs(60));
    let mut source = Peer::spawn("source", "source", dir.path(), &envs);
    let source_lines = source.finish(support::CHILD_TIMEOUT);
    let sink_lines = sink.finish(support::CHILD_TIMEOUT);
    eprintln!("{tag}: 1 GiB in {:.1} s", t0.elapsed().as_secs_f64());
    for l in source_lines.iter().chain(&sink_lines) {
        eprintln!("{tag}: {l}");
    }
    assert!(dir.entries().is_empty(), "runtime directory not empty: {:?}", dir.entries());
    Outcome { source: source_lines, sink: sink_lines }
}

fn check_same(o: &Outcome) {
    let (w, r) = (line(&o.source, "RESULT"), line(&o.sink, "RESULT"));
    assert_eq!(kv_u64(w, "bytes"), GIB, "writer: {w}");
    assert_eq!(kv_u64(r, "bytes"), GIB, "reader: {r}");
    let (hw, hr) = (kv(w, "sha256").unwrap(), kv(r, "sha256").unwrap());
    assert_eq!(hw.len(), 64);
    assert_eq!(hw, hr, "SHA-256 of the data written and read differ");
    let (ws, rs) = (line(&o.source, "STATS"), line(&o.sink, "STATS"));
    assert_eq!(kv_u64(ws, "bytes_sent"), GIB, "{ws}");
    assert_eq!(kv_u64(ws, "bytes_received"), 0, "{ws}");
    assert_eq!(kv_u64(rs, "bytes_received"), GIB, "{rs}");
    assert_eq!(kv_u64(rs, "bytes_sent"), 0, "{rs}");
}

#[test]
fn one_gib_random_writes_arrive_intact() {
    let o = run("fast", false, 0x1234_5678);
    check_same(&o);
}

#[test]
fn one_gib_to_a_slow_reader_back_pressures_the_writer() {
    let o = run("slow", true, 0xabcd_ef01);
    check_same(&o);
    let ws = line(&o.source, "STATS");
    assert!(kv_u64(ws, "sleeps") > 0, "the writer never slept waiting for space: {ws}");
    // Each sleep of the writer needs a wakeup from the reader.
    assert!(kv_u64(line(&o.sink, "STATS"), "signals_sent") > 0, "{}", line(&o.sink, "STATS"));
}
