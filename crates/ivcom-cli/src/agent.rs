//! `ivcom agent`: serves local processes of one member of a shared region (a guest's ivshmem
//! device, or a host process joining through the daemon).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ivcom::vm::{Agent, AgentConfig, DaemonMember, GuestDevice, Port};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Socket for local processes (they set IVCOM_AGENT to it) [default: RUNTIME_DIR/agent.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Join as a host member through the daemon's socket for that (region, member).
    #[arg(long, conflicts_with_all = ["device", "device_access", "peer_id"])]
    join: Option<PathBuf>,
    /// The guest's ivshmem device: a PCI address such as 0000:00:03.0, or "auto" for the only one.
    #[arg(long)]
    device: Option<String>,
    /// How to open the device: "vfio" (doorbells wake us), "sysfs" (we poll), or "best".
    #[arg(long, value_parser = ["best", "vfio", "sysfs"])]
    device_access: Option<String>,
    /// Which local processes the agent serves (checked with SO_PEERCRED): same-uid (and
    /// root), group:GID, uids:UID[,UID...] or anyone. The socket's mode follows.
    #[arg(long, default_value = "same-uid", value_parser = parse_agent_access)]
    access: ivcom::Access,
    /// Our peer id on an ivshmem-plain device, whose IVPosition register reads 0.
    #[arg(long)]
    peer_id: Option<u32>,
    /// Longest interval between scans of the region when no doorbell can wake us, in ms.
    #[arg(long, default_value_t = 20)]
    poll_idle_ms: u64,
    /// Runtime directory for the default socket path [env: IVCOM_RUNTIME_DIR].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
}

/// `--access`: the listener's policy syntax; the device modes it meant before get a pointer to
/// `--device-access`.
fn parse_agent_access(s: &str) -> Result<ivcom::Access, String> {
    if matches!(s, "best" | "vfio" | "sysfs") {
        return Err(format!("{s:?} is a device access mode: use --device-access {s}"));
    }
    crate::parse_access(s)
}

/// Runs an agent until SIGINT or SIGTERM.
pub fn run(args: &AgentArgs) -> Result<()> {
    let socket = match &args.socket {
        Some(s) => s.clone(),
        None => {
            let mut o = ivcom::Options::new();
            if let Some(d) = &args.runtime_dir {
                o = o.runtime_dir(d);
            }
            o.resolved_runtime_dir().join("agent.sock")
        }
    };
    let mut cfg = AgentConfig::new(&socket).access(args.access.clone());
    if args.poll_idle_ms == 0 {
        bail!("--poll-idle-ms must be at least 1");
    }
    cfg.poll_idle = Duration::from_millis(args.poll_idle_ms);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    match (&args.join, &args.device) {
        (Some(path), _) => {
            let member = DaemonMember::join(path, Duration::from_secs(10))?;
            serve(member, cfg, &stop)
        }
        (None, Some(dev)) => {
            let devices = ivcom_ivshmem::guest::find_devices().context("listing PCI devices")?;
            let info = if dev == "auto" {
                match devices.as_slice() {
                    [one] => one.clone(),
                    [] => bail!("no ivshmem device (PCI 1af4:1110) in this machine"),
                    many => bail!(
                        "{} ivshmem devices ({}); name one with --device",
                        many.len(),
                        many.iter().map(|d| d.bdf.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                }
            } else {
                devices
                    .iter()
                    .find(|d| d.bdf == *dev)
                    .cloned()
                    .with_context(|| format!("no ivshmem device at {dev}"))?
            };
            let vfio = match args.device_access.as_deref() {
                Some("vfio") => Some(true),
                Some("sysfs") => Some(false),
                _ => None,
            };
            let port = GuestDevice::open(&info, vfio, args.peer_id)
                .with_context(|| format!("opening ivshmem device {}", info.bdf))?;
            tracing::info!("device {} opened through {:?}", info.bdf, port.device().access());
            serve(port, cfg, &stop)
        }
        (None, None) => bail!(
            "say which membership to serve: --device BDF|auto (in a guest) or --join SOCKET (on the host)"
        ),
    }
}

fn serve<P: Port>(port: P, cfg: AgentConfig, stop: &AtomicBool) -> Result<()> {
    let mut agent = Agent::new(port, cfg)?;
    eprintln!("ivcom agent: peer {} ready", agent.peer_id());
    agent.run(&|| stop.load(Ordering::Relaxed))?;
    Ok(())
}
