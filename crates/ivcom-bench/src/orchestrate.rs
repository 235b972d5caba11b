//! The parent process of `ivcom bench`: plans the rounds, spawns a server and a
//! client peer per cell slice, bounds them in time, and merges what they report.

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::chart;
use crate::cli::{BenchArgs, PeerArgs, Role};
use crate::floors;
use crate::peer::{PeerReport, READY, RESULT};
use crate::plan::{self, Cell, Settings};
use crate::report::{self, Accum};

/// A cell that failed this many slices is not run again.
const MAX_FAILURES: u32 = 2;

/// The private runtime directory of one run, removed when dropped.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> Result<RuntimeDir> {
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);
        let path = base.join(format!("ivcom-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // ivcom refuses a runtime directory open to others.
        std::fs::DirBuilder::new().mode(0o700).create(path.join("ivcom"))?;
        Ok(RuntimeDir(path))
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes `ivcom-bench-PID` directories left by runs that were interrupted (e.g. with
/// Ctrl-C): ours (same uid), untouched for an hour, and whose process is gone.
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    let uid = rustix::process::geteuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) =
            name.to_str().and_then(|n| n.strip_prefix("ivcom-bench-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(meta) = e.metadata() else { continue };
        let old = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age.as_secs() > 3600);
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if meta.is_dir() && meta.uid() == uid && old && !alive && pid != std::process::id() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// CPUs for the server and the client: the first two this process may run on.
fn pick_cpus(no_pin: bool) -> (Option<usize>, Option<usize>) {
    if no_pin {
        return (None, None);
    }
    let Ok(set) = rustix::thread::sched_getaffinity(None) else {
        return (None, None);
    };
    let mut cpus = (0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c));
    match (cpus.next(), cpus.next()) {
        (Some(a), Some(b)) => (Some(a), Some(b)),
        (Some(a), None) => (Some(a), Some(a)),
        _ => (None, None),
    }
}

/// Order of the cells in round `round`: a fixed pseudo-random permutation per round,
/// so that slow drifts of the machine are spread over all cells.
fn round_order(n: usize, round: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (u64::from(round) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// Everything a slice needs from the run.
struct Ctx {
    exe: PathBuf,
    dir: PathBuf,
    settings: Settings,
    cpus: (Option<usize>, Option<usize>),
}

/// A spawned peer; killed (by PID) and reaped on drop if still running.
struct Peer {
    what: &'static str,
    child: Child,
    lines: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
    reaped: bool,
}

impl Peer {
    fn spawn(ctx: &Ctx, args: &PeerArgs, what: &'static str) -> Result<Peer> {
        let mut cmd = Command::new(&ctx.exe);
        // "adaptive" means ivcom's built-in defaults: drop any IVCOM_* overrides.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("IVCOM_") {
                cmd.env_remove(key);
            }
        }
        // Peer errors are reported through their stderr: keep it to the message.
        cmd.env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0");
        let mut child = cmd
            .arg("bench-peer")
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {what} peer {}", ctx.exe.display()))?;
        let stdout = child.stdout.take().context("peer stdout")?;
        let mut stderr = child.stderr.take().context("peer stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Ok(Peer { what, child, lines, stderr: Some(stderr), reaped: false })
    }

    /// The next stdout line with `prefix` (the rest of it), before `deadline`.
    fn line_with(&mut self, prefix: &str, deadline: Instant) -> Result<String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.to_owned());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    let tail = self.stderr_tail();
                    bail!("{} peer timed out{tail}", self.what);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_until(deadline);
                    let tail = self.stderr_tail();
                    bail!(
                        "{} peer exited ({}) without a {:?} line{tail}",
                        self.what,
                        status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                        prefix.trim(),
                    );
                }
            }
        }
    }

    /// Waits for the peer's result line and its successful exit, before `deadline`.
    fn finish(mut self, deadline: Instant) -> Result<PeerReport> {
        let json = self.line_with(RESULT, deadline)?;
        let report: PeerReport =
            serde_json::from_str(&json).with_context(|| format!("{} peer sent a bad result", self.what))?;
        let status = self.wait_until(deadline)?;
        if !status.success() {
            let tail = self.stderr_tail();
            bail!("{} peer exited with {status}{tail}", self.what);
        }
        Ok(report)
    }

    /// Reaps the child, killing it if it is still running at `deadline`.
    fn wait_until(&mut self, deadline: Instant) -> Result<std::process::ExitStatus> {
        // Its stdout closing means it is exiting: wait for that without polling.
        while let Ok(_line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {}
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.reaped = true;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("{} peer did not exit in time", self.what);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn kill(&mut self) {
        if !self.reaped {
            // Child::kill sends SIGKILL to this child's PID.
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// The end of what the peer wrote on stderr, for error messages.
    fn stderr_tail(&mut self) -> String {
        if !self.reaped {
            return String::new();
        }
        let text = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            return String::new();
        }
        let tail: String = text.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
        format!(": {tail}")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one slice of `cell`: spawns the server, waits for its ready line, spawns the
/// client with the server's address, and collects both reports.
fn run_slice(ctx: &Ctx, cell: &Cell) -> Result<(PeerReport, PeerReport)> {
    let s = &ctx.settings;
    let memfd: Option<OwnedFd> = if cell.kind.is_floor() {
        Some(floors::create_memfd(floors::map_len(cell.kind)).context("memfd for floor")?)
    } else {
        None
    };
    let deadline_ms = (s.slice + s.grace).as_millis() as u64;
    let base = PeerArgs {
        role: Role::Server,
        kind: cell.kind,
        test: cell.test,
        size: cell.size,
        duration_ms: s.slice.as_millis() as u64,
        warmup_ms: s.warmup().as_millis() as u64,
        deadline_ms,
        dir: ctx.dir.clone(),
        addr: None,
        memfd: memfd.as_ref().map(floors::fd_number),
        cpu: ctx.cpus.0,
    };
    let start = Instant::now();
    let deadline = start + s.slice + s.grace + Duration::from_millis(500);
    let mut server = Peer::spawn(ctx, &base, "server")?;
    let addr = server.line_with(READY, start + s.grace)?;
    let client_args = PeerArgs { role: Role::Client, addr: Some(addr), cpu: ctx.cpus.1, ..base };
    let client = Peer::spawn(ctx, &client_args, "client")?;
    let client_report = client.finish(deadline);
    if client_report.is_err() {
        // Do not wait for a server whose client is gone.
        server.kill();
    }
    let client_report = client_report?;
    let server_report = server.finish(deadline)?;
    drop(memfd);
    Ok((client_report, server_report))
}

fn progress_bar(total: u64, hidden: bool) -> ProgressBar {
    if hidden || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} slices, {elapsed} elapsed, ~{eta} left  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Entry point of `ivcom bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(path) = &args.chart {
        chart::check_path(path)?;
    }
    let settings = Settings::from_args(args);
    let cells = plan::cells(args.only.as_deref());
    if cells.is_empty() {
        bail!(
            "--only {:?} matches no cell (keys look like tcp/nodelay/rtt/1KiB)",
            args.only.as_deref().unwrap_or("")
        );
    }
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let rt = RuntimeDir::create()?;
    let load = Load::start(args.load);
    let ctx = Ctx { exe, dir: rt.0.clone(), settings, cpus: pick_cpus(args.no_pin) };
    let total = u64::from(settings.rounds) * cells.len() as u64;
    let pb = progress_bar(total, args.json);
    let started = Instant::now();
    let mut acc: Vec<Accum> = cells.iter().copied().map(Accum::new).collect();
    for round in 0..settings.rounds {
        for idx in round_order(cells.len(), round) {
            let a = &mut acc[idx];
            pb.set_message(format!("round {}/{}: {}", round + 1, settings.rounds, a.cell));
            if a.failed >= MAX_FAILURES {
                pb.inc(1);
                continue;
            }
            let outcome = run_slice(&ctx, &a.cell).and_then(|(c, s)| a.add(&c, &s));
            if let Err(e) = outcome {
                a.failed += 1;
                let note = if a.failed >= MAX_FAILURES { " (giving up on this cell)" } else { "" };
                pb.suspend(|| eprintln!("warning: {}: {e:#}{note}", a.cell));
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    drop(load);
    drop(rt);

    let results: Vec<_> = acc.iter().map(Accum::finish).collect();
    let failed = acc.iter().filter(|a| a.ok == 0).count();
    if args.json {
        println!("{}", report::to_json(&results, args.load)?);
    } else {
        let pin = match ctx.cpus {
            (Some(a), Some(b)) => format!("server on CPU {a}, client on CPU {b}"),
            _ => "unpinned".to_owned(),
        };
        let mut note =
            format!("{} rounds x {} ms per cell, {pin}", settings.rounds, settings.slice.as_millis());
        if args.load > 0 {
            note += &format!(", {} busy loop(s) running (--load)", args.load);
        }
        print!("{}", report::table(&results, &note));
        println!(
            "\n{} cells, {} slices in {:.1} s; figures from one interleaved run, compare ratios.",
            cells.len(),
            total,
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(path) = &args.chart {
        chart::write(path, &results).with_context(|| format!("writing chart {}", path.display()))?;
        if !args.json {
            println!("chart written to {}", path.display());
        }
    }
    if failed == cells.len() {
        return Err(anyhow!("every cell failed"));
    }
    Ok(())
}

/// Busy loops that run until dropped (`--load`).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(n: u32) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_order_is_a_permutation_that_varies() {
        let a = round_order(33, 0);
        let b = round_order(33, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..33).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(round_order(1, 5), vec![0]);
        assert!(round_order(0, 5).is_empty());
    }

    #[test]
    fn runtime_dir_is_removed() {
        let path = {
            let rt = RuntimeDir::create().unwrap();
            assert!(rt.0.join("ivcom").is_dir());
            rt.0.clone()
        };
        assert!(!path.exists());
    }
}
