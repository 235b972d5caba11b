//! One side of one cell slice, run in its own process (`ivcom bench-peer`).
//!
//! Protocol on stdout (one line each): the server prints `READY <address>` once it
//! is bound; both sides print `RESULT <json>` (a [`PeerReport`]) when done.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cli::{PeerArgs, Role};
use crate::floors::{self, SharedMap};
use crate::hist;
use crate::plan::{Kind, Test};
use crate::transports::{self, ConnRun, Outcome};

/// Prefix of the server's ready line.
pub const READY: &str = "READY ";
/// Prefix of a peer's result line.
pub const RESULT: &str = "RESULT ";

/// ivcom counters as sent from a peer to the orchestrator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRecord {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub signals_sent: u64,
    pub sleeps: u64,
}

impl From<ivcom::Stats> for StatsRecord {
    fn from(s: ivcom::Stats) -> Self {
        StatsRecord {
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            messages_sent: s.messages_sent,
            messages_received: s.messages_received,
            signals_sent: s.signals_sent,
            sleeps: s.sleeps,
        }
    }
}

/// What a peer reports at the end of its slice.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    /// Round trips, or write / read calls.
    pub ops: u64,
    /// Stream reader: bytes read.
    pub bytes: u64,
    /// Stream reader: ns from the first byte to the end of the stream.
    pub elapsed_ns: u64,
    /// Rtt client: V2-serialized HdrHistogram of round-trip ns, hex-encoded.
    pub hist_hex: Option<String>,
    /// ivcom transports: the stream's counters at the end.
    pub stats: Option<StatsRecord>,
}

impl PeerReport {
    fn from_outcome(o: Outcome) -> Result<PeerReport> {
        Ok(PeerReport {
            ops: o.ops,
            bytes: o.bytes,
            elapsed_ns: o.elapsed_ns,
            hist_hex: o.hist.as_ref().map(hist::encode).transpose()?,
            stats: o.stats.map(StatsRecord::from),
        })
    }

    fn from_floor(o: floors::FloorOutcome) -> Result<PeerReport> {
        Ok(PeerReport {
            ops: o.ops,
            bytes: o.bytes,
            elapsed_ns: o.elapsed_ns,
            hist_hex: o.hist.as_ref().map(hist::encode).transpose()?,
            stats: None,
        })
    }
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Pins the calling thread (the peer is single-threaded apart from its watchdog,
/// which is started after this) to `cpu`; failures are ignored.
pub fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Exits the process with an error if the peer is still running after `deadline`.
fn start_watchdog(deadline: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        eprintln!("bench-peer: deadline of {} ms passed, exiting", deadline.as_millis());
        std::process::exit(124);
    });
}

/// Entry point of `ivcom bench-peer`.
pub fn main(args: &PeerArgs) -> Result<()> {
    // If the orchestrator dies, so do we.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    if let Some(cpu) = args.cpu {
        pin_to(cpu);
    }
    start_watchdog(Duration::from_millis(args.deadline_ms.max(1)));
    if !args.kind.runs(args.test, args.size) {
        bail!("{:?} does not run {:?} at {} B", args.kind, args.test, args.size);
    }
    if args.size == 0 {
        bail!("size must be positive");
    }
    let duration = Duration::from_millis(args.duration_ms);
    let warmup = Duration::from_millis(args.warmup_ms);
    let report = if args.kind.is_floor() {
        run_floor(args, duration, warmup)?
    } else {
        run_socket(args, duration, warmup)?
    };
    say(&format!("{RESULT}{}", serde_json::to_string(&report)?))
}

fn run_socket(args: &PeerArgs, duration: Duration, warmup: Duration) -> Result<PeerReport> {
    let (size, test) = (args.size, args.test);
    let outcome = match args.role {
        Role::Server => {
            let (server, addr) = transports::bind(args.kind, &args.dir)?;
            say(&format!("{READY}{addr}"))?;
            transports::accept_and(server, |c: &mut dyn ConnRun| match test {
                Test::Rtt => c.rtt_server(size),
                Test::Stream => c.stream_reader(size),
            })?
        }
        Role::Client => {
            let addr = args.addr.as_deref().context("client needs --addr")?;
            transports::connect_and(args.kind, &args.dir, addr, |c: &mut dyn ConnRun| match test {
                Test::Rtt => c.rtt_client(size, duration, warmup),
                Test::Stream => c.stream_writer(size, duration),
            })?
        }
    }
    .with_context(|| {
        let role = match args.role {
            Role::Server => "server",
            Role::Client => "client",
        };
        format!("{}/{} {role}, {} test", args.kind.transport(), args.kind.mode(), test.name())
    })?;
    PeerReport::from_outcome(outcome)
}

fn run_floor(args: &PeerArgs, duration: Duration, warmup: Duration) -> Result<PeerReport> {
    let fd = args.memfd.context("floors need --memfd")?;
    let map = SharedMap::from_inherited_fd(fd, floors::map_len(args.kind))
        .with_context(|| format!("mapping inherited memfd {fd}"))?;
    if args.role == Role::Server {
        say(&format!("{READY}memfd:{fd}"))?;
    }
    let outcome = match (args.kind, args.role) {
        (Kind::SpinFloor, Role::Server) => floors::spin_server(&map),
        (Kind::SpinFloor, Role::Client) => floors::spin_client(&map, duration, warmup),
        (Kind::CopyFloor, Role::Server) => floors::copy_reader(&map, args.size),
        (Kind::CopyFloor, Role::Client) => floors::copy_writer(&map, args.size, duration),
        (kind, _) => bail!("{kind:?} is not a floor"),
    };
    PeerReport::from_floor(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_round_trip() {
        let r = PeerReport {
            ops: 3,
            bytes: 0,
            elapsed_ns: 0,
            hist_hex: Some("00ff".into()),
            stats: Some(StatsRecord { signals_sent: 2, ..StatsRecord::default() }),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<PeerReport>(&s).unwrap(), r);
    }
}
