//! What is measured: transports, tests, sizes, and the per-run settings.

use std::fmt;
use std::time::Duration;

use clap::ValueEnum;

use crate::cli::BenchArgs;

/// A transport in a given mode, i.e. one column family of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Kind {
    /// `ivcom::Stream`, default options (poll within a budget, then sleep).
    IvcomAdaptive,
    /// `ivcom::Stream` with a zero spin budget (sleeps on every wait).
    IvcomSleep,
    /// TCP over 127.0.0.1 with `TCP_NODELAY` on both sides.
    Tcp,
    /// Unix stream socket.
    Uds,
    /// Two processes ping-pong a counter on a shared cache line.
    SpinFloor,
    /// Raw SPSC two-copy byte ring in shared memory, no notification.
    CopyFloor,
}

impl Kind {
    /// All kinds, in report order.
    pub const ALL: [Kind; 6] =
        [Kind::SpinFloor, Kind::CopyFloor, Kind::IvcomAdaptive, Kind::IvcomSleep, Kind::Uds, Kind::Tcp];

    /// The `transport` name used in the report and the JSON output.
    pub fn transport(self) -> &'static str {
        match self {
            Kind::IvcomAdaptive | Kind::IvcomSleep => "ivcom",
            Kind::Tcp => "tcp",
            Kind::Uds => "uds",
            Kind::SpinFloor => "spin-floor",
            Kind::CopyFloor => "copy-floor",
        }
    }

    /// The `mode` name used in the report and the JSON output.
    pub fn mode(self) -> &'static str {
        match self {
            Kind::IvcomAdaptive => "adaptive",
            Kind::IvcomSleep => "sleep",
            Kind::Tcp => "nodelay",
            Kind::Uds => "stream",
            Kind::SpinFloor | Kind::CopyFloor => "raw",
        }
    }

    /// Whether this kind is an ivcom stream (and so reports `Stats`).
    pub fn is_ivcom(self) -> bool {
        matches!(self, Kind::IvcomAdaptive | Kind::IvcomSleep)
    }

    /// Whether this kind is a shared-memory floor that needs a memfd.
    pub fn is_floor(self) -> bool {
        matches!(self, Kind::SpinFloor | Kind::CopyFloor)
    }

    /// Whether this kind takes part in `test` at `size` (the spin floor only
    /// ping-pongs a counter, so it has just the 64 B round trip).
    pub fn runs(self, test: Test, size: usize) -> bool {
        match self {
            Kind::SpinFloor => test == Test::Rtt && size == 64,
            Kind::CopyFloor => test == Test::Stream,
            _ => true,
        }
    }
}

/// The two measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Test {
    /// Round-trip latency: write N, peer echoes N back.
    Rtt,
    /// One-way streaming throughput, measured on the reader side.
    Stream,
}

impl Test {
    /// The `test` name used in the report and the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Test::Rtt => "rtt",
            Test::Stream => "stream",
        }
    }

    /// Message sizes measured by this test.
    pub fn sizes(self) -> &'static [usize] {
        match self {
            Test::Rtt => &[64, 1024, 16 * 1024],
            Test::Stream => &[64, 1024, 64 * 1024, 1024 * 1024],
        }
    }
}

/// One measured combination; every cell gets one slice per round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cell {
    /// Transport and mode.
    pub kind: Kind,
    /// Which test.
    pub test: Test,
    /// Message (rtt) or write (stream) size in bytes.
    pub size: usize,
}

impl Cell {
    /// The string `--only` filters on, e.g. `tcp/nodelay/rtt/1KiB`.
    pub fn filter_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.kind.transport(),
            self.kind.mode(),
            self.test.name(),
            size_label(self.size).replace(' ', "")
        )
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {} {}",
            self.kind.transport(),
            self.kind.mode(),
            self.test.name(),
            size_label(self.size)
        )
    }
}

/// Human label for a byte size: `64 B`, `1 KiB`, `16 KiB`, `1 MiB`.
pub fn size_label(size: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if size >= MIB && size.is_multiple_of(MIB) {
        format!("{} MiB", size / MIB)
    } else if size >= KIB && size.is_multiple_of(KIB) {
        format!("{} KiB", size / KIB)
    } else {
        format!("{size} B")
    }
}

/// Whether `cell` passes the `--only` filter: comma-separated alternatives, each of
/// which may combine several `+`-joined substrings that must all match
/// (case-insensitive) the cell's key `transport/mode/test/size`.
pub fn matches_filter(cell: &Cell, filter: Option<&str>) -> bool {
    let Some(filter) = filter else { return true };
    let key = cell.filter_key().to_ascii_lowercase();
    filter
        .split(',')
        .map(str::trim)
        .filter(|alt| !alt.is_empty())
        .any(|alt| alt.split('+').map(|s| s.trim().to_ascii_lowercase()).all(|s| key.contains(&s)))
}

/// All cells selected by the filter, in report order (rtt first, then stream).
pub fn cells(filter: Option<&str>) -> Vec<Cell> {
    let mut out = Vec::new();
    for test in [Test::Rtt, Test::Stream] {
        for kind in Kind::ALL {
            for &size in test.sizes() {
                if !kind.runs(test, size) {
                    continue;
                }
                let cell = Cell { kind, test, size };
                if matches_filter(&cell, filter) {
                    out.push(cell);
                }
            }
        }
    }
    out
}

/// Run-wide timing settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How many times every cell is run.
    pub rounds: u32,
    /// Length of one cell's slice in one round.
    pub slice: Duration,
    /// Extra time a peer may take beyond its slice before it is killed.
    pub grace: Duration,
}

impl Settings {
    /// Settings for `--quick` / default, with the explicit overrides applied.
    pub fn from_args(args: &BenchArgs) -> Settings {
        let (rounds, slice_ms) = if args.quick { (6, 120) } else { (10, 400) };
        let rounds = args.rounds.unwrap_or(rounds).max(1);
        let slice = Duration::from_millis(args.duration_ms.unwrap_or(slice_ms).max(1));
        Settings { rounds, slice, grace: Duration::from_secs(3) }
    }

    /// Round trips in the first part of each slice that are not recorded.
    pub fn warmup(&self) -> Duration {
        (self.slice / 10).min(Duration::from_millis(20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(1024), "1 KiB");
        assert_eq!(size_label(16 * 1024), "16 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(1500), "1500 B");
    }

    #[test]
    fn plan_has_all_cells() {
        let all = cells(None);
        // rtt: 4 transports x 3 sizes + spin floor x 1; stream: 5 x 4.
        assert_eq!(all.len(), 4 * 3 + 1 + 5 * 4);
        assert!(all.iter().all(|c| c.kind != Kind::SpinFloor || (c.test == Test::Rtt && c.size == 64)));
        assert!(all.iter().all(|c| c.kind != Kind::CopyFloor || c.test == Test::Stream));
    }

    #[test]
    fn filter() {
        let rtt_tcp = cells(Some("tcp/nodelay/rtt"));
        assert_eq!(rtt_tcp.len(), 3);
        let ivcom = cells(Some("IVCOM"));
        assert_eq!(ivcom.len(), 2 * 3 + 2 * 4);
        let both = cells(Some("spin, copy"));
        assert_eq!(both.len(), 1 + 4);
        let and = cells(Some("ivcom+stream+1KiB"));
        assert_eq!(and.len(), 2);
        assert!(cells(Some("nothing-like-this")).is_empty());
    }
}
