//! Stand-alone driver of the benchmark, equivalent to `ivcom bench` / `ivcom bench-peer`:
//!
//! ```text
//! cargo run --release -p ivcom-bench --example bench -- bench --quick
//! ```

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ivcom benchmark driver")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare ivcom with TCP, Unix sockets and shared-memory floors.
    Bench(ivcom_bench::BenchArgs),
    /// One side of one benchmark slice (spawned by `bench`).
    #[command(hide = true)]
    BenchPeer(ivcom_bench::PeerArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Bench(args) => ivcom_bench::run(&args),
        Cmd::BenchPeer(args) => ivcom_bench::peer_main(&args),
    }
}
