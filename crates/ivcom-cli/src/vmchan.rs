//! `ivcom vm-chan ...`: hidden commands that measure ivcom channels between members of a
//! shared region (guests, or a guest and the host), through their agents. They print marker
//! lines (`@@ivcom chan-... key=value ...`) that the VM harness collects.
//!
//! - `vm-chan serve NAME`: accepts connections; each starts with one byte saying what the
//!   client wants: `E` echoes messages of the size that follows (u32); `S` receives the number
//!   of bytes that follows (u64) into memory, says `K` as soon as the last byte arrived, then
//!   hashes and answers with the SHA-256; `D` discards until the stream ends or breaks (the
//!   power-off test; u64: after how many bytes to print a progress marker); `I` measures the
//!   guest's CPU use while it waits for one byte (the idle test).
//! - `vm-chan rtt NAME --size N --count C`: round trips, latency percentiles and doorbells
//!   (signals) per message.
//! - `vm-chan transfer NAME --bytes N`: sends N pseudo-random bytes generated before the clock
//!   starts; the clock stops when the server says it has them all; then both hash (at the same
//!   time, each on its own machine) and the server's SHA-256 is compared with ours. `--cut` instead expects the stream to break (the
//!   server's machine powers off) and reports how long the break took to notice.
//! - `vm-chan idle NAME --secs S`: holds a channel open and idle (both ends blocked in a
//!   read) and reports the CPU use of this machine meanwhile.
//!
//! What is timed in a transfer (the same as `ivcom vm tcp`'s bulk transfer, so the two compare):
//! from the first write (after the receiver said it is ready, its buffer allocated and
//! touched) until the receiver's one-byte acknowledgement that all bytes are in its memory.
//! Generating the data, and hashing it on both sides after the acknowledgement, are not timed
//! (SHA-256 runs at ~60-90 MB/s in a TCG guest: timing it would measure the hash).

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use sha2::{Digest, Sha256};

/// Commands measuring channels through an agent.
#[derive(Subcommand, Debug)]
pub enum VmChanCommand {
    /// Serve echo, sink and idle connections on NAME (until killed, or --connections are done).
    Serve {
        /// Listener name.
        name: String,
        /// Stop after this many connections.
        #[arg(long)]
        connections: Option<u32>,
        #[command(flatten)]
        chan: ChanArgs,
    },
    /// Round trips of SIZE-byte messages.
    Rtt {
        /// Listener name.
        name: String,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Round trips measured (after 10% warm-up).
        #[arg(long, default_value_t = 10_000)]
        count: u32,
        /// Label printed in the marker.
        #[arg(long, default_value = "rtt")]
        label: String,
        #[command(flatten)]
        chan: ChanArgs,
    },
    /// Send BYTES and compare SHA-256 with the server (or, with --cut, expect a break).
    Transfer {
        /// Listener name.
        name: String,
        /// Bytes to send (at most 1 GiB unless --cut).
        #[arg(long, default_value_t = 256 << 20)]
        bytes: u64,
        /// Bytes per write call.
        #[arg(long, default_value_t = 64 * 1024)]
        write_size: usize,
        /// Label printed in the marker.
        #[arg(long, default_value = "transfer")]
        label: String,
        /// Expect the stream to break (the server's machine goes away): send a repeated
        /// 16 MiB block until a write fails, and report how long after the last progress it
        /// failed. Succeeds only if it breaks before BYTES are sent and before --write-timeout.
        #[arg(long)]
        cut: bool,
        /// With --cut: the server prints a progress marker after this many bytes.
        #[arg(long, default_value_t = 64 << 20)]
        progress_bytes: u64,
        /// Give up on a write that cannot progress for this many seconds.
        #[arg(long, default_value_t = 30)]
        write_timeout: u64,
        #[command(flatten)]
        chan: ChanArgs,
    },
    /// Hold an idle channel open for SECS and report this machine's CPU use meanwhile.
    Idle {
        /// Listener name.
        name: String,
        /// Seconds to stay idle.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[command(flatten)]
        chan: ChanArgs,
    },
}

#[derive(Args, Debug)]
pub struct ChanArgs {
    /// The agent's socket [env: IVCOM_AGENT].
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// Polling budget in µs before sleeping; 0 sleeps at once (interrupt-driven).
    #[arg(long)]
    spin_us: Option<u64>,
    /// How long connecting may take, in seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
}

impl ChanArgs {
    fn options(&self) -> ivcom::Options {
        let mut o = ivcom::Options::new().handshake_timeout(Duration::from_secs(self.connect_timeout));
        if let Some(a) = &self.agent {
            o = o.agent(a);
        }
        if let Some(s) = self.spin_us {
            o = o.spin(Duration::from_micros(s));
        }
        o
    }

    /// Connects, retrying while the listener is not there yet (the other guest may still be
    /// booting), up to the connect timeout.
    fn connect(&self, name: &str) -> Result<ivcom::Stream> {
        let end = Instant::now() + Duration::from_secs(self.connect_timeout);
        loop {
            match ivcom::Stream::connect_with(name, &self.options()) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("connecting to {name:?}")),
            }
        }
    }
}

pub fn run(cmd: VmChanCommand) -> Result<()> {
    match cmd {
        VmChanCommand::Serve { name, connections, chan } => serve(&name, connections, &chan),
        VmChanCommand::Rtt { name, size, count, label, chan } => rtt(&name, size, count, &label, &chan),
        VmChanCommand::Transfer {
            name,
            bytes,
            write_size,
            label,
            cut,
            progress_bytes,
            write_timeout,
            chan,
        } => {
            ensure!(write_size > 0 && write_size <= 16 << 20, "--write-size must be 1..=16777216");
            if cut {
                transfer_cut(&name, bytes, write_size, progress_bytes, write_timeout, &label, &chan)
            } else {
                transfer(&name, bytes, write_size, write_timeout, &label, &chan)
            }
        }
        VmChanCommand::Idle { name, secs, chan } => idle(&name, secs, &chan),
    }
}

/// Largest transfer the sink keeps in memory.
const MAX_SINK: u64 = 1 << 30;

fn serve(name: &str, connections: Option<u32>, chan: &ChanArgs) -> Result<()> {
    let listener = ivcom::Listener::bind_with(name, &chan.options())
        .with_context(|| format!("listening on {name:?}"))?;
    println!("@@ivcom chan-listening name={name}");
    let mut served = 0;
    while connections.is_none_or(|n| served < n) {
        let mut s = listener.accept().context("accepting")?;
        served += 1;
        let mut kind = [0u8; 1];
        s.read_exact(&mut kind).context("reading the request kind")?;
        match kind[0] {
            b'E' => {
                let mut len = [0u8; 4];
                s.read_exact(&mut len)?;
                let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
                loop {
                    match s.read_exact(&mut buf) {
                        Ok(()) => s.write_all(&buf)?,
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            b'S' => sink(name, &mut s)?,
            b'D' => discard(name, &mut s),
            b'I' => {
                let t = Instant::now();
                let before = CpuTimes::now()?;
                let mut one = [0u8; 1];
                let got = s.read(&mut one);
                let after = CpuTimes::now()?;
                println!(
                    "@@ivcom chan-idle-server name={name} secs={:.2} cpu_busy_pct={:.1} ended={}",
                    t.elapsed().as_secs_f64(),
                    after.busy_pct_since(&before),
                    match got {
                        Ok(1) => "byte",
                        Ok(_) => "eof",
                        Err(_) => "error",
                    }
                );
            }
            k => bail!("unknown request kind {k}"),
        }
    }
    Ok(())
}

/// `S`: receive a known number of bytes into memory, acknowledge, then hash and answer.
fn sink(name: &str, s: &mut ivcom::Stream) -> Result<()> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let total = u64::from_le_bytes(len);
    ensure!(total <= MAX_SINK, "sink of {total} bytes refused (at most {MAX_SINK})");
    let mut buf = touched(total as usize);
    s.write_all(b"R")?;
    let before = s.stats();
    let mut got = 0usize;
    let mut reads = 0u64;
    let mut t0 = None;
    while got < buf.len() {
        let n = s.read(&mut buf[got..])?;
        ensure!(n > 0, "stream ended after {got} of {total} bytes");
        t0.get_or_insert_with(Instant::now);
        got += n;
        reads += 1;
    }
    let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    s.write_all(b"K")?;
    let after = s.stats();
    let th = Instant::now();
    let digest = Sha256::digest(&buf);
    let hash_secs = th.elapsed().as_secs_f64();
    s.write_all(&digest)?;
    println!(
        "@@ivcom chan-sink name={name} bytes={total} reads={reads} secs={secs:.3} mb_per_s={:.1} hash_secs={hash_secs:.3} signals_sent={} sleeps={} sha256={}",
        total as f64 / secs.max(1e-9) / 1e6,
        after.signals_sent - before.signals_sent,
        after.sleeps - before.sleeps,
        hex(&digest)
    );
    Ok(())
}

/// `D`: read and drop until the stream ends or breaks; says when `progress` bytes went by.
fn discard(name: &str, s: &mut ivcom::Stream) {
    let mut len = [0u8; 8];
    if s.read_exact(&mut len).is_err() {
        return;
    }
    let progress = u64::from_le_bytes(len);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut said = false;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => {
                println!("@@ivcom chan-discard-error name={name} bytes={total} error={:?}", e.kind());
                return;
            }
        }
        if !said && total >= progress {
            said = true;
            println!("@@ivcom chan-sink-progress name={name} bytes={total}");
        }
    }
    println!("@@ivcom chan-discard name={name} bytes={total}");
}

/// A zeroed buffer whose pages are all mapped already (page faults in a TCG guest are slow,
/// and are not what a transfer should measure).
fn touched(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for i in (0..len).step_by(4096) {
        // SAFETY: i < len; a volatile store so the write is not elided.
        unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(i), 0) };
    }
    buf
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn rtt(name: &str, size: u32, count: u32, label: &str, chan: &ChanArgs) -> Result<()> {
    ensure!(size > 0 && size <= 1 << 20, "--size must be 1..=1048576");
    ensure!(count > 0, "--count must be positive");
    let mut s = chan.connect(name)?;
    s.write_all(b"E")?;
    s.write_all(&size.to_le_bytes())?;
    let mut out = vec![0u8; size as usize];
    let mut back = vec![0u8; size as usize];
    let warm = count / 10;
    let mut samples = Vec::with_capacity(count as usize);
    let before = s.stats();
    for i in 0..warm + count {
        let k = out.len().min(4);
        out[..k].copy_from_slice(&i.to_le_bytes()[..k]);
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        let dt = t.elapsed();
        ensure!(back == out, "echo {i} came back different");
        if i >= warm {
            samples.push(dt.as_nanos() as u64);
        }
    }
    let after = s.stats();
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    let mean = samples.iter().sum::<u64>() / samples.len() as u64;
    // Each round trip is one message from us; our signals are the doorbells we rang.
    let msgs = f64::from(warm + count);
    let signals = (after.signals_sent - before.signals_sent) as f64;
    println!(
        "@@ivcom chan-rtt label={label} size={size} count={count} mean_ns={mean} p50_ns={} p99_ns={} p999_ns={} signals_per_msg={:.4} sleeps={}",
        pct(0.5),
        pct(0.99),
        pct(0.999),
        signals / msgs,
        after.sleeps - before.sleeps
    );
    Ok(())
}

/// A deterministic pseudo-random byte stream (xorshift64).
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        let mut x = self.0;
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        self.0 = x;
    }
}

fn transfer(
    name: &str,
    bytes: u64,
    write_size: usize,
    write_timeout: u64,
    label: &str,
    chan: &ChanArgs,
) -> Result<()> {
    ensure!(
        bytes > 0 && bytes <= MAX_SINK,
        "--bytes must be 1..={MAX_SINK} (the receiver keeps it in memory)"
    );
    // Not timed: making the data (before) and hashing it (after, while the receiver hashes).
    let t = Instant::now();
    let mut data = vec![0u8; bytes as usize];
    Pattern(0x9e37_79b9_7f4a_7c15).fill(&mut data);
    let gen_secs = t.elapsed().as_secs_f64();

    let mut s = chan.connect(name)?;
    s.set_write_timeout(Some(Duration::from_secs(write_timeout)))?;
    s.set_read_timeout(Some(Duration::from_secs(write_timeout.max(60))))?;
    s.write_all(b"S")?;
    s.write_all(&bytes.to_le_bytes())?;
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready).context("waiting for the receiver to be ready")?;
    ensure!(ready[0] == b'R', "receiver said {:?}, not ready", ready[0]);

    // Timed: from the first write until the receiver has every byte in its memory.
    let before = s.stats();
    let start = Instant::now();
    let mut writes = 0u64;
    for chunk in data.chunks(write_size) {
        s.write_all(chunk)?;
        writes += 1;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).context("waiting for the receiver's acknowledgement")?;
    let secs = start.elapsed().as_secs_f64();
    let after = s.stats();
    ensure!(ack[0] == b'K', "receiver acknowledged with {:?}", ack[0]);

    let t = Instant::now();
    let ours = Sha256::digest(&data);
    let hash_secs = t.elapsed().as_secs_f64();
    s.shutdown(std::net::Shutdown::Write)?;
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs).context("reading the receiver's SHA-256")?;
    let ok = ours.as_slice() == theirs;
    println!(
        "@@ivcom chan-transfer label={label} bytes={bytes} write_size={write_size} writes={writes} secs={secs:.3} mb_per_s={:.1} gen_secs={gen_secs:.3} hash_secs={hash_secs:.3} signals_sent={} signals_per_write={:.5} sleeps={} sha256={} peer_sha256={} match={}",
        bytes as f64 / secs / 1e6,
        after.signals_sent - before.signals_sent,
        (after.signals_sent - before.signals_sent) as f64 / writes as f64,
        after.sleeps - before.sleeps,
        hex(&ours),
        hex(&theirs),
        if ok { "yes" } else { "NO" }
    );
    ensure!(ok, "SHA-256 mismatch: sent {} receiver has {}", hex(&ours), hex(&theirs));
    Ok(())
}

/// Streams until a write fails (the receiver's machine went away). Prints
/// `chan-transfer-cut ... stalled_secs=` (time from the last write that made progress to the
/// error) and succeeds only if the stream broke before `bytes` and before the write timeout.
fn transfer_cut(
    name: &str,
    bytes: u64,
    write_size: usize,
    progress: u64,
    write_timeout: u64,
    label: &str,
    chan: &ChanArgs,
) -> Result<()> {
    let mut block = vec![0u8; 16 << 20];
    Pattern(0x2545_f491_4f6c_dd1d).fill(&mut block);
    let mut s = chan.connect(name)?;
    s.set_write_timeout(Some(Duration::from_secs(write_timeout)))?;
    s.write_all(b"D")?;
    s.write_all(&progress.to_le_bytes())?;
    println!("@@ivcom chan-transfer-cut-start label={label}");
    let start = Instant::now();
    let mut last = Instant::now();
    let mut sent = 0u64;
    let mut off = 0usize;
    let err = loop {
        if sent >= bytes {
            break None;
        }
        let n = (bytes - sent).min(write_size as u64) as usize;
        let n = n.min(block.len() - off);
        match s.write(&block[off..off + n]) {
            Ok(0) => break Some(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
            Ok(k) => {
                sent += k as u64;
                off = (off + k) % block.len();
                last = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    let stalled = last.elapsed().as_secs_f64();
    let Some(e) = err else {
        println!("@@ivcom chan-transfer-cut label={label} bytes_sent={sent} broke=no");
        bail!("the stream did not break: all {bytes} bytes were sent");
    };
    let timed_out = e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut;
    println!(
        "@@ivcom chan-transfer-cut label={label} bytes_sent={sent} secs={:.3} broke={} stalled_secs={stalled:.3} error={:?} message={}",
        start.elapsed().as_secs_f64(),
        if timed_out { "timeout" } else { "yes" },
        e.kind(),
        e.to_string().replace(char::is_whitespace, "_")
    );
    ensure!(!timed_out, "no error within the {write_timeout} s write timeout: the break went unnoticed");
    Ok(())
}

/// Aggregate CPU times of this machine from /proc/stat, in clock ticks.
struct CpuTimes {
    total: u64,
    idle: u64,
}

impl CpuTimes {
    fn now() -> Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|f| f.parse().unwrap_or(0)).collect();
        ensure!(v.len() >= 5, "short cpu line in /proc/stat: {line:?}");
        // user nice system idle iowait irq softirq steal
        Ok(CpuTimes { total: v.iter().sum(), idle: v[3] + v[4] })
    }

    fn busy_pct_since(&self, before: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(before.total);
        let idle = self.idle.saturating_sub(before.idle);
        if total == 0 {
            return 0.0;
        }
        100.0 * total.saturating_sub(idle) as f64 / total as f64
    }
}

fn idle(name: &str, secs: f64, chan: &ChanArgs) -> Result<()> {
    ensure!(secs > 0.0 && secs <= 600.0, "--secs must be in (0, 600]");
    let mut s = chan.connect(name)?;
    s.write_all(b"I")?;
    s.set_read_timeout(Some(Duration::from_secs_f64(secs)))?;
    let before_stats = s.stats();
    let t = Instant::now();
    let before = CpuTimes::now()?;
    let mut one = [0u8; 1];
    let got = s.read(&mut one);
    let after = CpuTimes::now()?;
    let waited = t.elapsed().as_secs_f64();
    let after_stats = s.stats();
    match got {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok(n) => bail!("the idle channel delivered {n} bytes"),
        Err(e) => return Err(e).context("reading on the idle channel"),
    }
    s.write_all(b"x")?;
    println!(
        "@@ivcom chan-idle name={name} secs={waited:.2} cpu_busy_pct={:.1} sleeps={} ticks={}",
        after.busy_pct_since(&before),
        after_stats.sleeps - before_stats.sleeps,
        after.total.saturating_sub(before.total)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_continues_across_fills() {
        let mut whole = vec![0u8; 64];
        Pattern(7).fill(&mut whole);
        let mut p = Pattern(7);
        let mut parts = vec![0u8; 64];
        p.fill(&mut parts[..32]);
        p.fill(&mut parts[32..]);
        assert_eq!(whole, parts);
        assert_ne!(whole[..8], whole[8..16]);
    }

    #[test]
    fn cpu_times_read() {
        let a = CpuTimes::now().unwrap();
        let b = CpuTimes::now().unwrap();
        assert!(b.total >= a.total);
        let pct = b.busy_pct_since(&a);
        assert!((0.0..=100.0).contains(&pct));
    }

    #[test]
    fn touched_is_zeroed() {
        let b = touched(10_000);
        assert_eq!(b.len(), 10_000);
        assert!(b.iter().all(|&x| x == 0));
    }
}
