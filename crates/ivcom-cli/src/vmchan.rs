//! `ivcom vm-chan ...`: hidden commands that measure ivcom channels between members of a
//! shared region (guests, or a guest and the host), through their agents. They print marker
//! lines (`@@ivcom chan-... key=value ...`) that the VM harness collects.
//!
//! - `vm-chan serve NAME`: accepts connections; each starts with one byte: `E` echoes
//!   messages of the size that follows (u32), `S` reads to end of stream and answers with the
//!   SHA-256 of what it read.
//! - `vm-chan rtt NAME --size N --count C`: round trips, latency percentiles and doorbells
//!   (signals) per message.
//! - `vm-chan transfer NAME --bytes N`: streams N pseudo-random bytes, compares the SHA-256
//!   the server computed with its own, reports MB/s and signals per write.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use sha2::{Digest, Sha256};

/// Commands measuring channels through an agent.
#[derive(Subcommand, Debug)]
pub enum VmChanCommand {
    /// Serve echo and sink connections on NAME (until killed, or --connections are done).
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
    /// Stream BYTES and compare SHA-256 with the server.
    Transfer {
        /// Listener name.
        name: String,
        /// Bytes to send.
        #[arg(long, default_value_t = 256 << 20)]
        bytes: u64,
        /// Bytes per write call.
        #[arg(long, default_value_t = 64 * 1024)]
        write_size: usize,
        /// Label printed in the marker.
        #[arg(long, default_value = "transfer")]
        label: String,
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
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < end => {
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
        VmChanCommand::Transfer { name, bytes, write_size, label, chan } => {
            transfer(&name, bytes, write_size, &label, &chan)
        }
    }
}

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
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            b'S' => {
                let mut hash = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                    total += n as u64;
                }
                let digest = hash.finalize();
                s.write_all(&digest)?;
                println!("@@ivcom chan-sink bytes={total} sha256={}", hex(&digest));
            }
            k => bail!("unknown request kind {k}"),
        }
    }
    Ok(())
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
        out[..4].copy_from_slice(&i.to_le_bytes());
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
    let msgs = f64::from(warm + count) * 2.0;
    let signals = (after.signals_sent - before.signals_sent) as f64;
    println!(
        "@@ivcom chan-rtt label={label} size={size} count={count} p50_ns={} p99_ns={} p999_ns={} signals_per_msg={:.4} sleeps={}",
        pct(0.5),
        pct(0.99),
        pct(0.999),
        signals / msgs,
        after.sleeps - before.sleeps
    );
    Ok(())
}

fn transfer(name: &str, bytes: u64, write_size: usize, label: &str, chan: &ChanArgs) -> Result<()> {
    ensure!(write_size > 0 && write_size <= 16 << 20, "--write-size must be 1..=16777216");
    let mut s = chan.connect(name)?;
    s.write_all(b"S")?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; write_size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    let before = s.stats();
    let mut sent = 0u64;
    let mut writes = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(write_size as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        hash.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        sent += n as u64;
        writes += 1;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs).context("reading the server's SHA-256")?;
    let secs = start.elapsed().as_secs_f64();
    let after = s.stats();
    let ours = hash.finalize();
    let ok = ours.as_slice() == theirs;
    println!(
        "@@ivcom chan-transfer label={label} bytes={sent} secs={secs:.3} mb_per_s={:.1} signals_per_write={:.5} sha256={} match={}",
        sent as f64 / secs / 1e6,
        (after.signals_sent - before.signals_sent) as f64 / writes as f64,
        hex(&ours),
        if ok { "yes" } else { "NO" }
    );
    ensure!(ok, "SHA-256 mismatch: sent {} server read {}", hex(&ours), hex(&theirs));
    Ok(())
}
