//! `ivcom`: the command-line front end. Each subcommand is a thin layer over the libraries.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

mod agent;
mod run;
mod vmchan;
mod vmtest;

/// Shared-memory channels between co-resident processes, containers and VMs.
#[derive(Parser, Debug)]
#[command(name = "ivcom", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure ivcom side by side with TCP, Unix sockets and shared-memory floors.
    Bench(ivcom_bench::BenchArgs),
    /// Accept one connection on NAME and pipe stdin/stdout through it (like `nc -l`).
    /// Refused connection attempts (another uid, a bad handshake) are reported and skipped.
    Listen {
        /// Listener name (1-64 of A-Z a-z 0-9 . _ -).
        name: String,
        #[command(flatten)]
        chan: ChannelArgs,
        /// Who may connect: same-uid, group:GID, uids:UID[,UID...], or anyone.
        #[arg(long, default_value = "same-uid", value_parser = parse_access)]
        access: ivcom::Access,
        /// Largest ring capacity per direction, in bytes, a connector may choose
        /// [default: 4194304, or --capacity if larger].
        #[arg(long)]
        max_capacity: Option<usize>,
        /// Share the runtime directory with this group (mode 0750, group GID) so that its
        /// members can reach the socket [default: the group of --access group:GID; else private, 0700].
        #[arg(long, value_name = "GID")]
        dir_group: Option<u32>,
    },
    /// Connect to NAME and pipe stdin/stdout through the channel (like `nc`).
    Connect {
        /// Listener name.
        name: String,
        #[command(flatten)]
        chan: ChannelArgs,
        /// Which listeners to trust (the uid serving the socket and owning the runtime
        /// directory): same-uid, group:GID, uids:UID[,UID...], or anyone. Root is always trusted.
        #[arg(long, default_value = "same-uid", value_parser = parse_access)]
        access: ivcom::Access,
    },
    /// Run a program so that its TCP connections to co-resident programs that also run under
    /// ivcom go over shared memory; every other connection stays plain TCP (docs/preload.md).
    Run(run::RunArgs),
    /// Serve QEMU's ivshmem-server protocol for the regions of a configuration file, in the
    /// foreground, until SIGINT or SIGTERM (see docs/daemon.md).
    Daemon(DaemonArgs),
    /// Print the QEMU options that attach MEMBER to REGION of a daemon configuration.
    QemuArgs(QemuArgsArgs),
    /// Serve local processes' channels over a shared VM region: in a guest for its ivshmem
    /// device, on the host for a membership through the daemon (see docs/vm.md).
    Agent(agent::AgentArgs),
    /// Internal: one side of a benchmark cell, started by `ivcom bench`.
    #[command(hide = true)]
    BenchPeer(ivcom_bench::PeerArgs),
    /// Internal: guest-side commands of the VM test harness (scripts/vm-test.sh).
    #[command(hide = true, subcommand)]
    Vm(vmtest::VmCommand),
    /// Internal: measure channels through a VM agent (scripts/vm-test.sh).
    #[command(hide = true, subcommand)]
    VmChan(vmchan::VmChanCommand),
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Configuration file (TOML: `[[group]]` and `[[pairs]]` tables).
    #[arg(long)]
    config: PathBuf,
    /// Directory of the members' sockets; overrides the file's socket_dir.
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Leave the regions as they are (zeroed) instead of formatting ivcom's directory in each
    /// and keeping its peer table (docs/vm-region-layout.md).
    #[arg(long)]
    no_directory: bool,
}

#[derive(Args, Debug)]
struct QemuArgsArgs {
    /// Configuration file the daemon runs with.
    #[arg(long)]
    config: PathBuf,
    /// Region name (a group's name, or SET.A.B for a pair of a `[[pairs]]` set).
    #[arg(long)]
    region: String,
    /// The member the QEMU is.
    #[arg(long)]
    member: String,
    /// The ivshmem-plain form (for regions with plain = true).
    #[arg(long)]
    plain: bool,
    /// Directory of the members' sockets, if the daemon runs with --socket-dir.
    #[arg(long)]
    socket_dir: Option<PathBuf>,
}

/// Runs the daemon until SIGINT or SIGTERM; dropping it removes its sockets.
fn daemon(args: &DaemonArgs) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let cfg = ivcom_daemon::Config::load(&args.config)?;
    let opts = ivcom_daemon::DaemonOptions { socket_dir: args.socket_dir.clone(), ..Default::default() };
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let hooks: Option<Box<dyn ivcom_daemon::RegionHooks>> =
        (!args.no_directory).then(|| Box::new(ivcom_daemon::DirectoryHooks::new()) as _);
    let mut d = ivcom_daemon::Daemon::new(&cfg, &opts, hooks)?;
    let (stop, sig) = (d.stop_handle(), signals.handle());
    let waiter = std::thread::spawn(move || {
        if let Some(s) = signals.forever().next() {
            tracing::info!("signal {s}: stopping");
            stop.stop();
        }
    });
    let served = d.run();
    drop(d);
    sig.close();
    let _ = waiter.join();
    Ok(served?)
}

fn qemu_args(args: &QemuArgsArgs) -> Result<()> {
    let cfg = ivcom_daemon::Config::load(&args.config)?;
    let dir = cfg.socket_dir(args.socket_dir.as_deref());
    let words = ivcom_daemon::qemu_args(&cfg, &dir, &args.region, &args.member, args.plain)?;
    println!("{}", ivcom_daemon::shell_line(&words));
    Ok(())
}

#[derive(Args, Debug)]
struct ChannelArgs {
    /// Runtime directory holding listener sockets [env: IVCOM_RUNTIME_DIR].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Ring capacity per direction in bytes (power of two, 4096..=1073741824) [env: IVCOM_CAPACITY].
    #[arg(long)]
    capacity: Option<usize>,
    /// Polling budget in microseconds before sleeping; 0 sleeps at once [env: IVCOM_SPIN_US].
    #[arg(long)]
    spin_us: Option<u64>,
    /// Reach the listener through this VM agent's socket (another VM or the host) [env: IVCOM_AGENT].
    #[arg(long)]
    agent: Option<PathBuf>,
}

impl ChannelArgs {
    fn options(&self) -> ivcom::Options {
        let mut o = ivcom::Options::new();
        if let Some(d) = &self.runtime_dir {
            o = o.runtime_dir(d);
        }
        if let Some(a) = &self.agent {
            o = o.agent(a);
        }
        if let Some(c) = self.capacity {
            o = o.capacity(c);
        }
        if let Some(s) = self.spin_us {
            o = o.spin(Duration::from_micros(s));
        }
        o
    }
}

fn parse_access(s: &str) -> Result<ivcom::Access, String> {
    let bad = |what: &str| format!("invalid {what} in access policy {s:?}");
    Ok(match s.split_once(':') {
        None if s == "same-uid" => ivcom::Access::SameUid,
        None if s == "anyone" => ivcom::Access::Anyone,
        Some(("group", g)) => ivcom::Access::Group(g.parse().map_err(|_| bad("gid"))?),
        Some(("uids", list)) => ivcom::Access::Uids(
            list.split(',').map(|u| u.trim().parse().map_err(|_| bad("uid"))).collect::<Result<_, _>>()?,
        ),
        _ => {
            return Err(format!(
                "unknown access policy {s:?}: use same-uid, group:GID, uids:UID[,UID...] or anyone"
            ))
        }
    })
}

/// Copies stdin into the stream and the stream to stdout until both directions end.
fn pipe(stream: ivcom::Stream) -> Result<()> {
    let (mut rx, mut tx) = stream.split();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            tx.write_all(&buf[..n])?;
        }
        tx.shutdown()
    });
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 256 * 1024];
    let read_result = loop {
        match rx.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => stdout.write_all(&buf[..n]).context("writing stdout")?,
            Err(e) => break Err(e),
        }
    };
    stdout.flush()?;
    read_result.context("reading from the channel")?;
    match writer.join() {
        Ok(r) => r.context("writing to the channel")?,
        Err(_) => bail!("stdin thread panicked"),
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(args) => ivcom_bench::run(&args),
        Command::BenchPeer(args) => ivcom_bench::peer_main(&args),
        Command::Daemon(args) => daemon(&args),
        Command::QemuArgs(args) => qemu_args(&args),
        Command::Vm(cmd) => vmtest::run(cmd),
        Command::Agent(args) => agent::run(&args),
        Command::VmChan(cmd) => vmchan::run(cmd),
        Command::Run(_) => unreachable!("handled in main"),
        Command::Listen { name, chan, access, max_capacity, dir_group } => {
            let mut opts = chan.options().access(access);
            if let Some(max) = max_capacity {
                opts = opts.max_capacity(max);
            }
            if let Some(g) = dir_group {
                opts = opts.dir_access(ivcom::rundir::DirAccess::Group(g));
            }
            let listener = ivcom::Listener::bind_with(&name, &opts)
                .with_context(|| format!("cannot listen on {name:?}"))?;
            eprintln!("ivcom: listening on {name:?} ({})", listener.path().display());
            // `incoming` reports refused connectors (a warning) and keeps waiting for one it
            // admits; only a failure of the listening socket itself ends it.
            let stream =
                listener.incoming().next().expect("incoming never ends").context("accepting a connection")?;
            drop(listener);
            pipe(stream)
        }
        Command::Connect { name, chan, access } => {
            let stream = ivcom::Stream::connect_with(&name, &chan.options().access(access))
                .with_context(|| format!("cannot connect to {name:?}"))?;
            pipe(stream)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = cli.command {
        // The program's own exit status is ours.
        return run::run(args).unwrap_or_else(|e| {
            eprintln!("ivcom: {e:#}");
            ExitCode::from(127)
        });
    }
    // The daemon reports connections at info level; everything else only warns.
    tracing_subscriber_init(if matches!(cli.command, Command::Daemon(_) | Command::Agent(_)) {
        "info"
    } else {
        "warn"
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ivcom: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `IVCOM_LOG` (e.g. `IVCOM_LOG=debug`).
fn tracing_subscriber_init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IVCOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).init();
}
