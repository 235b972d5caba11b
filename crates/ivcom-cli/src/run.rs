//! `ivcom run -- CMD`: runs a program with the preload library, so its TCP connections to
//! co-resident programs also under ivcom go over shared memory (docs/preload.md).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::Args;
use ivcom_interpose::settings::{ENV_ACCEL, ENV_LOG, ENV_MAX_RING, ENV_RING, ENV_SPIN};

/// Environment variable naming the preload library to use instead of the one next to `ivcom`.
pub const ENV_LIB: &str = "IVCOM_PRELOAD_LIB";
const LIB_NAME: &str = "libivcom_preload.so";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run the program with the library loaded but every connection on plain TCP (the same
    /// as IVCOM_ACCEL=0), for side-by-side comparisons.
    #[arg(long)]
    off: bool,
    /// Log each decision (which connections are accelerated and why others are not) and the
    /// counters at exit to FILE, or to stderr with `--log stderr`.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// How long a waiting call polls shared memory before sleeping, in microseconds.
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,
    /// Ring capacity per direction of each new connection, in KiB (rounded up to a power of two).
    #[arg(long, value_name = "KIB")]
    ring_kib: Option<u64>,
    /// The largest ring per direction, in KiB, that accepted connections may bring (larger
    /// registrations stay on plain TCP; default 4096, never less than --ring-kib).
    #[arg(long, value_name = "KIB")]
    max_ring_kib: Option<u64>,
    /// The program and its arguments (put `--` before them; an unknown option before the
    /// program is an error, not a program name).
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Where the preload library is: `$IVCOM_PRELOAD_LIB`, or beside the `ivcom` executable
/// (cargo puts both in `target/<profile>/`).
pub fn library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_LIB).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{ENV_LIB}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the ivcom executable")?;
    let dir = exe.parent().context("the ivcom executable has no directory")?;
    for cand in [dir.join(LIB_NAME), dir.join("..").join(LIB_NAME)] {
        if cand.is_file() {
            return Ok(cand.canonicalize().unwrap_or(cand));
        }
    }
    bail!(
        "{LIB_NAME} is not beside {} (build it with `cargo build --release`, which builds the whole workspace, or set {ENV_LIB})",
        exe.display()
    )
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    let lib = library()?;
    let mut preload = OsString::from(&lib);
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(" ");
        preload.push(old);
    }
    let mut cmd = Command::new(&a.command[0]);
    cmd.args(&a.command[1..]).env("LD_PRELOAD", preload);
    if a.off {
        cmd.env(ENV_ACCEL, "0");
    }
    if let Some(l) = &a.log {
        let abs = if l.as_os_str() == "stderr" || l.is_absolute() {
            l.clone()
        } else {
            std::env::current_dir()?.join(l)
        };
        if abs.as_os_str() != "stderr" {
            if let Err(why) = ivcom_interpose::settings::check_log(&abs) {
                bail!("--log: {why}");
            }
        }
        cmd.env(ENV_LOG, abs);
    }
    if let Some(s) = a.spin_us {
        cmd.env(ENV_SPIN, s.to_string());
    }
    if let Some(r) = a.ring_kib {
        if r == 0 {
            bail!("--ring-kib must be at least 4");
        }
        cmd.env(ENV_RING, r.to_string());
    }
    if let Some(r) = a.max_ring_kib {
        if r < 4 {
            bail!("--max-ring-kib must be at least 4");
        }
        cmd.env(ENV_MAX_RING, r.to_string());
    }
    let dir = ivcom_interpose::settings::runtime_dir();
    if let (Err(why), false) = (&dir, a.off) {
        eprintln!("ivcom run: {why}; every connection stays on plain TCP");
    }
    let mut child =
        cmd.spawn().with_context(|| format!("cannot run {}", PathBuf::from(&a.command[0]).display()))?;
    // SIGTERM and SIGHUP sent to `ivcom run` are meant for the program (SIGINT from a
    // terminal reaches the whole process group already).
    let pid = child.id() as i32;
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP])
            .context("cannot install signal handlers")?;
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
            unsafe { libc_kill(pid, sig) };
        }
    });
    let status = child.wait().context("waiting for the program")?;
    handle.close();
    let _ = forwarder.join();
    // Announcements of listeners that died without closing (killed) are withdrawn here.
    if let Ok(dir) = &dir {
        ivcom_interpose::announce::sweep(dir);
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    })
}
