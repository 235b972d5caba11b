//! `ivcom bench`: ivcom side by side with TCP, Unix sockets and shared-memory floors.
//!
//! The orchestrator ([`run`]) runs several rounds; in each round every cell
//! (transport × mode × test × size) gets one time slice, run by two fresh peer
//! processes (`ivcom bench-peer`, [`peer_main`]) pinned to different CPUs while the
//! orchestrator waits idle. Histograms and byte counts are merged across rounds, so
//! the machine's noise is spread over all cells; compare the ratios, which are taken
//! within one interleaved run.

mod chart;
mod cli;
mod floors;
mod hist;
mod orchestrate;
mod peer;
mod plan;
mod report;
mod transports;

pub use cli::{BenchArgs, PeerArgs, Role};
pub use plan::{Kind, Test};

/// Runs `ivcom bench`: measures, then prints the table (or JSON) and writes the chart.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    orchestrate::run(args)
}

/// Runs one peer of one cell slice (`ivcom bench-peer`, spawned by [`run`]).
pub fn peer_main(args: &PeerArgs) -> anyhow::Result<()> {
    peer::main(args)
}
