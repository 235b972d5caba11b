//! `ivcom run`: small C programs (built here with `cc`) run with and without the preload
//! library; their outputs must match, and the run under ivcom must really have used shared
//! memory (the decision log's counters), leaving nothing behind in the runtime directory.
//! Real programs (redis, iperf3) and a client and server in two network namespaces follow.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const IVCOM: &str = env!("CARGO_BIN_EXE_ivcom");
const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/preload");

/// The preload library beside the `ivcom` binary, built if this test run did not build it.
fn preload_lib() -> PathBuf {
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

/// The C test programs, compiled once per test process.
fn c_bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ivcom-ctests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let out = dir.join(name);
    if !out.exists() {
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

/// A private runtime directory and decision log for one test.
struct Scene {
    dir: PathBuf,
}

impl Scene {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ivcom-preload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scene { dir }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("decisions.log")
    }

    fn runtime(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `ivcom run [extra] -- prog args` with this scene's runtime directory and log.
    fn ivcom(&self, extra: &[&str], prog: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(IVCOM);
        c.arg("run").arg("--log").arg(self.log()).args(extra).arg("--").arg(prog).args(args);
        c.env("IVCOM_RUNTIME_DIR", self.runtime()).env("IVCOM_PRELOAD_LIB", preload_lib());
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Sums of the counters the processes logged at exit.
    fn counters(&self) -> BTreeMap<String, u64> {
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

    /// Nothing left in the runtime directory's listener area.
    fn assert_clean(&self) {
        let tcp = self.runtime().join("tcp");
        let left: Vec<_> =
            std::fs::read_dir(&tcp).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", tcp.display());
    }
}

fn sorted_stdout(o: &Output, what: &str) -> Vec<String> {
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

fn output_within(mut c: Command, limit: Duration) -> Output {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
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

/// Runs a C program plainly and under `ivcom run`; the outputs must match and the ivcom run
/// must have carried its data through rings.
fn same_over_shared_memory(name: &str, args: &[&str]) {
    let prog = c_bin(name);
    let scene = Scene::new(&format!("{name}{}", args.join("")));
    let mut plain = Command::new(&prog);
    plain.args(args);
    let want = sorted_stdout(&output_within(plain, Duration::from_secs(120)), &format!("{name} (plain)"));
    let got = sorted_stdout(
        &output_within(scene.ivcom(&[], &prog, args), Duration::from_secs(120)),
        &format!("{name} under ivcom run (log {})", scene.log().display()),
    );
    assert_eq!(
        got,
        want,
        "{name}: output under ivcom run differs from plain TCP\nlog:\n{}",
        scene.log_text()
    );
    let c = scene.counters();
    assert!(
        c.get("accelerated").copied().unwrap_or(0) > 0,
        "{name}: no accelerated connection\nlog:\n{}",
        scene.log_text()
    );
    let ring = c.get("ring_rx").copied().unwrap_or(0) + c.get("ring_tx").copied().unwrap_or(0);
    assert!(ring > 0, "{name}: nothing went through a ring\nlog:\n{}", scene.log_text());
    assert!(scene.log_text().contains("connection accelerated"), "{name}: no acceleration logged");
    scene.assert_clean();
}

#[test]
fn stream_calls() {
    same_over_shared_memory("t_stream", &[]);
}

#[test]
fn stream_calls_over_ipv6() {
    same_over_shared_memory("t_stream", &["6"]);
}

#[test]
fn nonblocking_and_duplicates() {
    same_over_shared_memory("t_nonblock", &[]);
}

#[test]
fn poll_and_select() {
    same_over_shared_memory("t_poll", &[]);
}

#[test]
fn epoll_level_edge_oneshot() {
    same_over_shared_memory("t_epoll", &[]);
}

#[test]
fn fork_patterns() {
    same_over_shared_memory("t_fork", &[]);
}

#[test]
fn threads() {
    same_over_shared_memory("t_threads", &[]);
}

#[test]
fn sendfile_and_splice() {
    same_over_shared_memory("t_files", &[]);
}

#[test]
fn sigpipe_epipe_and_reset() {
    same_over_shared_memory("t_signals", &[]);
}

#[test]
fn killed_peers() {
    same_over_shared_memory("t_crash", &[]);
}

#[test]
fn switched_off_everything_stays_tcp() {
    let prog = c_bin("t_stream");
    let scene = Scene::new("off");
    let o = output_within(scene.ivcom(&["--off"], &prog, &[]), Duration::from_secs(120));
    let want = sorted_stdout(&output_within(Command::new(&prog), Duration::from_secs(120)), "plain");
    assert_eq!(sorted_stdout(&o, "--off"), want);
    assert_eq!(scene.counters().get("accelerated"), None, "{}", scene.log_text());
    scene.assert_clean();
}

/// A child process killed if the test ends early.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `t_split server` (under ivcom or not) and returns it with its port.
fn split_server(scene: &Scene, under_ivcom: bool) -> (Reaped, u16) {
    let prog = c_bin("t_split");
    let portfile = scene.dir.join("port");
    let _ = std::fs::remove_file(&portfile);
    let mut cmd = if under_ivcom {
        scene.ivcom(&[], &prog, &["server", portfile.to_str().unwrap()])
    } else {
        let mut c = Command::new(&prog);
        c.args(["server", portfile.to_str().unwrap()]);
        c
    };
    let child = Reaped(Some(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()));
    let start = Instant::now();
    let port = loop {
        if let Ok(s) = std::fs::read_to_string(&portfile) {
            break s.trim().parse().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "server did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    (child, port)
}

fn split_pair(server_ivcom: bool, client_ivcom: bool) -> Scene {
    let scene = Scene::new(&format!("mixed{}{}", server_ivcom as u8, client_ivcom as u8));
    let (mut server, port) = split_server(&scene, server_ivcom);
    let prog = c_bin("t_split");
    let port = port.to_string();
    let client = if client_ivcom {
        scene.ivcom(&[], &prog, &["client", &port])
    } else {
        let mut c = Command::new(&prog);
        c.args(["client", &port]);
        c
    };
    let out = sorted_stdout(&output_within(client, Duration::from_secs(60)), "client");
    assert_eq!(out, vec!["client: 1049546 bytes echoed intact".to_string()]);
    let s = server.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(sorted_stdout(&s, "server"), vec!["server: echoed 1049546 bytes".to_string()]);
    scene.assert_clean();
    scene
}

#[test]
fn client_under_ivcom_server_not() {
    let scene = split_pair(false, true);
    let log = scene.log_text();
    assert!(log.contains("no listener under ivcom; plain TCP"), "{log}");
    assert!(!log.contains("connection accelerated"), "{log}");
}

#[test]
fn server_under_ivcom_client_not() {
    let scene = split_pair(true, false);
    let log = scene.log_text();
    assert!(log.contains("no registration; plain TCP"), "{log}");
    assert!(!log.contains("connection accelerated"), "{log}");
}

#[test]
fn both_under_ivcom_in_separate_processes() {
    let scene = split_pair(true, true);
    assert!(scene.log_text().contains("connection accelerated"), "{}", scene.log_text());
    assert!(scene.counters().get("ring_rx").copied().unwrap_or(0) >= 2 << 20);
}
