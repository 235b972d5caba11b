//! Helpers shared by the multi-process tests: re-executing the test binary as a peer process,
//! bounded waits on children, private runtime directories, and a raw speaker of the handshake.
//!
//! A test binary has a `#[test] fn peer_entry()` that calls [`peer_main`]: it returns at once
//! unless `IVCOM_TEST_ROLE` is set, in which case it runs that role and exits the process. The
//! parent starts peers with [`Peer::spawn`]; every wait on a peer is bounded and a peer that
//! overstays is killed by its PID (never by name).

#![allow(dead_code)]

pub mod raw;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Environment variable naming the role a re-executed test binary plays.
pub const ROLE_ENV: &str = "IVCOM_TEST_ROLE";
/// Prefix of the lines a peer prints for its parent to parse.
pub const TAG: &str = "@ivcom-peer@";
/// Default bound on any child process.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// The role of this process, if it is a re-executed peer.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok().filter(|r| !r.is_empty())
}

/// Runs the role of a re-executed peer and exits with its code; returns at once in the test
/// process itself. A panicking role exits with 101 after unwinding (so listeners and streams
/// are dropped and their files removed).
pub fn peer_main(run: impl FnOnce(&str) -> i32) {
    let Some(role) = role() else { return };
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&role))).unwrap_or(101);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}

/// Prints one tagged line for the parent and flushes it.
pub fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{TAG} {}", line.as_ref());
    let _ = out.flush();
}

/// A required environment variable of a peer role.
pub fn env_str(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("peer role needs ${name}"))
}

/// A numeric environment variable of a peer role, with a default.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("${name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The value of `key=value` in a whitespace-separated line.
pub fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Like [`kv`], parsed as a number; panics with the line if absent.
pub fn kv_u64(line: &str, key: &str) -> u64 {
    kv(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// Serialises the heavy tests of one binary (each runs two busy processes; the machine may
/// have few CPUs, and the timing assertions must not suffer from a neighbouring test).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private runtime directory under the system temporary directory, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    /// A fresh, empty directory of mode 0700.
    pub fn new(tag: &str) -> Self {
        Self::with_mode(tag, 0o700)
    }

    /// A fresh, empty directory with `mode`.
    pub fn with_mode(tag: &str, mode: u32) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("ivcom-mp-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Names of the entries in the directory.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Names in `/dev/shm` (POSIX shared memory), to check that nothing is left behind.
pub fn shm_listing() -> BTreeSet<String> {
    match std::fs::read_dir("/dev/shm") {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// A command that re-executes this test binary as the peer `role`, with the runtime
/// directory `dir`.
pub fn peer_command(role: &str, dir: &Path, envs: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["peer_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env(ivcom::ENV_RUNTIME_DIR, dir)
        .env_remove(ivcom::ENV_CAPACITY)
        .env_remove(ivcom::ENV_SPIN_US)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// A running peer process whose output is collected by two threads.
pub struct Peer {
    pub name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    /// When the peer was seen to have exited (by [`Peer::wait`]).
    pub exited_at: Option<Instant>,
}

impl Peer {
    /// Starts `role` as a peer process.
    pub fn spawn(name: &str, role: &str, dir: &Path, envs: &[(&str, String)]) -> Self {
        Self::spawn_cmd(name, peer_command(role, dir, envs))
    }

    /// Starts a prepared command.
    pub fn spawn_cmd(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start peer {name}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (l1, l2) = (log.clone(), log.clone());
        let n1 = name.to_owned();
        let n2 = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l1.lock().unwrap().push(format!("[{n1} out] {line}"));
                // libtest may have printed "test peer_entry ... " on the same line first.
                if let Some(at) = line.find(TAG) {
                    let _ = tx.send(line[at + TAG.len()..].trim().to_owned());
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(format!("[{n2} err] {line}"));
            }
        });
        Self { name: name.to_owned(), child: Some(child), status: None, lines: rx, log, exited_at: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the peer printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the next tagged line starting with `prefix` (earlier other lines are
    /// skipped); panics with the peer's output after `timeout` or if it exits first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!(
                        "peer {} printed no {prefix:?} line within {timeout:?}; output:\n{}",
                        self.name,
                        self.log()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.wait(Duration::from_secs(10));
                    panic!(
                        "peer {} exited ({st}) before printing {prefix:?}; output:\n{}",
                        self.name,
                        self.log()
                    )
                }
            }
        }
    }

    /// The tagged lines printed so far and not consumed by [`Peer::wait_line`].
    pub fn drain_lines(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits for a tagged line until the output ends (after the peer exited).
    pub fn rest_lines(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut v = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => v.push(l),
                Err(_) => return v,
            }
        }
    }

    /// Kills the peer with SIGKILL (by its PID) and returns when the signal was sent.
    pub fn kill(&mut self) -> Instant {
        if let Some(c) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = c.kill();
            }
        }
        Instant::now()
    }

    /// Whether the peer has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.status = Some(st);
                    self.exited_at = Some(Instant::now());
                }
            }
        }
        self.status
    }

    /// Waits for the peer to exit; after `timeout` kills it and panics with its output. Polls
    /// every millisecond, so [`Peer::exited_at`] is accurate to about that.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return st;
            }
            if Instant::now() >= deadline {
                self.kill();
                if let Some(c) = self.child.as_mut() {
                    let _ = c.wait();
                }
                panic!(
                    "peer {} did not exit within {timeout:?} (killed); output:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for a successful exit and returns all remaining tagged lines.
    pub fn finish(&mut self, timeout: Duration) -> Vec<String> {
        let st = self.wait(timeout);
        let lines = self.rest_lines(Duration::from_secs(5));
        assert!(st.success(), "peer {} failed ({st}); output:\n{}", self.name, self.log());
        lines
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The first line of `lines` starting with `prefix`.
pub fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
}

/// Describes an I/O outcome for a peer's report: `eof`, or the error kind and message.
pub fn describe(r: &std::io::Result<usize>) -> String {
    match r {
        Ok(0) => "outcome=eof".to_owned(),
        Ok(n) => format!("outcome=ok({n})"),
        Err(e) => {
            format!("outcome={:?} errno={} msg={:?}", e.kind(), e.raw_os_error().unwrap_or(0), e.to_string())
        }
    }
}

/// Waits until `path` exists (a peer bound its listener), bounded.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}
