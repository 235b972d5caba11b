//! Helpers shared by the tests of `ivcom run`: the preload library, the C test programs of
//! `tests/preload/`, a private runtime directory and decision log per test ([`Scene`]), and
//! bounded child processes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `ivcom` binary under test.
pub const IVCOM: &str = env!("CARGO_BIN_EXE_ivcom");
/// Where the C test programs are.
pub const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/preload");

/// The preload library beside the `ivcom` binary, built if this test run did not build it.
pub fn preload_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = Path::new(IVCOM).parent().expect("bin dir").to_path_buf();
        let lib = dir.join("libivcom_preload.so");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "ivcom-preload"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo to build the preload library");
        assert!(st.success(), "building the preload library failed");
        assert!(lib.is_file(), "{} missing after the build", lib.display());
        lib
    })
    .clone()
}

/// `tests/preload/NAME.c`, compiled once per test process into a directory every user can
/// read (the security tests run the programs as other users).
pub fn c_bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ivcom-ctests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    });
    let out = dir.join(name);
    if !out.exists() {
        // Threads of one test process may compile the same program at once: each writes its
        // own file, and the rename makes one of them the program.
        let tmp = dir.join(format!("{name}.{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        let st = Command::new("cc")
            .args(["-O1", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(&tmp)
            .arg(Path::new(SRC).join(format!("{name}.c")))
            .status()
            .expect("a C compiler (`cc`) is needed for these tests: apt-get install gcc");
        assert!(st.success(), "compiling {name}.c failed");
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// A private runtime directory and decision log for one test, under
/// `/tmp/ivcom-preload-NAME-PID` (removed when the test passes, kept for a look when it fails).
pub struct Scene {
    pub dir: PathBuf,
}

impl Scene {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ivcom-preload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scene { dir }
    }

    /// Gives the scene to `uid`:`gid` (its programs run as that user): its directory
    /// (mode 0755, for the log the programs create) and the runtime directory (0700).
    pub fn give_to(&self, uid: u32, gid: u32) {
        std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(self.runtime()).unwrap();
        std::os::unix::fs::chown(self.runtime(), Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(self.runtime(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("decisions.log")
    }

    pub fn runtime(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `ivcom run [extra] -- prog args` with this scene's runtime directory and log.
    pub fn ivcom(&self, extra: &[&str], prog: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(IVCOM);
        c.arg("run").arg("--log").arg(self.log()).args(extra).arg("--").arg(prog).args(args);
        c.env("IVCOM_RUNTIME_DIR", self.runtime()).env("IVCOM_PRELOAD_LIB", preload_lib());
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Sums of the counters the processes logged at exit.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut sums = BTreeMap::new();
        for line in self.log_text().lines().filter(|l| l.contains("exit:")) {
            for kv in line.split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    if let Ok(v) = v.parse::<u64>() {
                        *sums.entry(k.to_string()).or_insert(0) += v;
                    }
                }
            }
        }
        sums
    }

    /// One counter's sum (0 when no process logged it).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters().get(name).copied().unwrap_or(0)
    }

    /// Nothing left in the runtime directory's listener area.
    pub fn assert_clean(&self) {
        let tcp = self.runtime().join("tcp");
        let left: Vec<_> =
            std::fs::read_dir(&tcp).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", tcp.display());
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `prog args` under ivcom (`Some(scene)`) or plain.
pub fn maybe_ivcom(scene: Option<&Scene>, prog: &Path, args: &[&str]) -> Command {
    match scene {
        Some(s) => s.ivcom(&[], prog, args),
        None => {
            let mut c = Command::new(prog);
            c.args(args);
            c
        }
    }
}

/// The lines of a successful run's stdout, sorted.
pub fn sorted_stdout(o: &Output, what: &str) -> Vec<String> {
    assert!(
        o.status.success(),
        "{what} failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
    v.sort();
    v
}

/// Runs `c` in its own process group; on timeout the whole group is killed (a program's
/// forked children hold its output pipes too).
pub fn output_within(mut c: Command, limit: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn().expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "timed out after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process (spawned with [`spawn_group`]) whose whole process group is killed if the
/// test ends early: `ivcom run` and the program it started.
pub struct Reaped(pub Option<Child>);

impl Reaped {
    /// Waits at most `limit` for it to exit by itself (its group is killed after that, and the
    /// test fails); returns its output.
    pub fn finish(mut self, limit: Duration, what: &str) -> Output {
        let mut child = self.0.take().expect("not finished yet");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                self.0 = Some(child);
                drop(self);
                panic!("{what}: still running after {limit:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `c` as the leader of a new process group (so that [`Reaped`] ends `ivcom run` and
/// the program it started together).
pub fn spawn_group(c: &mut Command) -> Child {
    use std::os::unix::process::CommandExt;
    c.process_group(0).spawn().expect("spawn")
}

/// The Debian package that provides `tool` (scripts/deps.sh installs them all).
fn package_of(tool: &str) -> &'static str {
    match tool {
        "redis-server" => "redis-server",
        "redis-cli" | "redis-benchmark" => "redis-tools",
        "iperf3" => "iperf3",
        "ip" => "iproute2",
        "python3" => "python3",
        "node" => "nodejs",
        "curl" => "curl",
        "nginx" => "nginx",
        "memcached" => "memcached",
        "memcslap" => "libmemcached-tools",
        "setpriv" => "util-linux",
        _ => "the package that provides it",
    }
}

/// The program `tool` where Debian installs it; the test fails, naming the package, if it is
/// not there.
pub fn need(tool: &str) -> PathBuf {
    let p = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    p.unwrap_or_else(|| {
        panic!(
            "{tool} is needed: apt-get install {} (scripts/deps.sh, which scripts/test.sh runs first, installs it)",
            package_of(tool)
        )
    })
}

/// A free TCP port on loopback (the kernel's pick, released for the program to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 50 ms until it holds; fails the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
