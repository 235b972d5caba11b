//! Command-line arguments of `ivcom bench` and of the hidden `ivcom bench-peer`.

use std::path::PathBuf;

use clap::ValueEnum;

use crate::plan::{Kind, Test};

/// Arguments of `ivcom bench`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// Short run (6 rounds of 120 ms slices; about half a minute in total).
    #[arg(long)]
    pub quick: bool,

    /// Print one JSON object with all results on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also write a chart of latency and throughput to PATH (.svg).
    #[arg(long, value_name = "PATH")]
    pub chart: Option<PathBuf>,

    /// Number of rounds (every cell runs once per round) [default: 10, quick: 6].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: Option<u32>,

    /// Length of one cell's slice in each round, in ms [default: 400, quick: 120].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub duration_ms: Option<u64>,

    /// Run only cells whose `transport/mode/test/size` key contains FILTER
    /// (case-insensitive; `a,b` = either, `a+b` = both), e.g. `ivcom,tcp+rtt`.
    #[arg(long, value_name = "FILTER")]
    pub only: Option<String>,

    /// Do not pin the two peer processes to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,

    /// Run N busy loops (threads that never sleep, not pinned) for the whole run, so that the
    /// figures show a machine without idle CPUs; compare with a run without it.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub load: u32,
}

/// Which side of a cell a peer process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Binds, prints `READY <address>`, echoes (rtt) or reads and counts (stream).
    Server,
    /// Connects to the address and drives the test for its duration.
    Client,
}

/// Arguments of the hidden `ivcom bench-peer` subcommand (one side of one cell slice).
/// Spawned by `ivcom bench`; not meant to be run by hand.
#[derive(clap::Args, Debug, Clone)]
pub struct PeerArgs {
    /// Server or client.
    #[arg(long, value_enum)]
    pub role: Role,

    /// Transport and mode.
    #[arg(long, value_enum)]
    pub kind: Kind,

    /// Which test.
    #[arg(long, value_enum)]
    pub test: Test,

    /// Message / write size in bytes.
    #[arg(long)]
    pub size: usize,

    /// How long the client drives the test, in ms.
    #[arg(long, default_value_t = 0)]
    pub duration_ms: u64,

    /// Rtt: how long the client runs before it starts recording, in ms.
    #[arg(long, default_value_t = 0)]
    pub warmup_ms: u64,

    /// The peer exits by itself (with an error) after this many ms.
    #[arg(long)]
    pub deadline_ms: u64,

    /// Private runtime directory of this bench run (ivcom runtime dir, socket paths).
    #[arg(long)]
    pub dir: PathBuf,

    /// Client: the address the server printed in its ready line.
    #[arg(long)]
    pub addr: Option<String>,

    /// Floors: number of the inherited memfd holding the shared mapping.
    #[arg(long)]
    pub memfd: Option<i32>,

    /// Pin this process to that CPU (failures are ignored).
    #[arg(long)]
    pub cpu: Option<usize>,
}

impl PeerArgs {
    /// Command-line arguments (after the `bench-peer` subcommand) that parse back
    /// into `self`.
    pub fn to_args(&self) -> Vec<String> {
        fn value<T: ValueEnum>(v: &T) -> String {
            v.to_possible_value().map(|p| p.get_name().to_owned()).unwrap_or_default()
        }
        let mut out = vec![
            "--role".to_owned(),
            value(&self.role),
            "--kind".to_owned(),
            value(&self.kind),
            "--test".to_owned(),
            value(&self.test),
            "--size".to_owned(),
            self.size.to_string(),
            "--duration-ms".to_owned(),
            self.duration_ms.to_string(),
            "--warmup-ms".to_owned(),
            self.warmup_ms.to_string(),
            "--deadline-ms".to_owned(),
            self.deadline_ms.to_string(),
            "--dir".to_owned(),
            self.dir.to_string_lossy().into_owned(),
        ];
        if let Some(addr) = &self.addr {
            out.extend(["--addr".to_owned(), addr.clone()]);
        }
        if let Some(fd) = self.memfd {
            out.extend(["--memfd".to_owned(), fd.to_string()]);
        }
        if let Some(cpu) = self.cpu {
            out.extend(["--cpu".to_owned(), cpu.to_string()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        peer: PeerArgs,
    }

    #[test]
    fn peer_args_round_trip() {
        let args = PeerArgs {
            role: Role::Client,
            kind: Kind::CopyFloor,
            test: Test::Stream,
            size: 65536,
            duration_ms: 200,
            warmup_ms: 20,
            deadline_ms: 3200,
            dir: PathBuf::from("/tmp/x y"),
            addr: Some("READY-ish addr".into()),
            memfd: Some(7),
            cpu: Some(1),
        };
        let argv = std::iter::once("peer".to_owned()).chain(args.to_args());
        let back = Wrap::try_parse_from(argv).unwrap().peer;
        assert_eq!(back.to_args(), args.to_args());
        assert_eq!(back.kind, Kind::CopyFloor);
        assert_eq!(back.memfd, Some(7));
    }
}
