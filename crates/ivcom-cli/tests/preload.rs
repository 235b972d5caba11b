//! `ivcom run`: small C programs (built here with `cc`) run with and without the preload
//! library; their outputs must match, and the run under ivcom must really have used shared
//! memory (the decision log's counters), leaving nothing behind in the runtime directory.
//! Real programs (redis, iperf3) and a client and server in two network namespaces follow.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{
    c_bin, free_port, maybe_ivcom, need, output_within, sorted_stdout, spawn_group, wait_until, Reaped, Scene,
};

/// Runs a C program plainly and under `ivcom run`; the outputs must match and the ivcom run
/// must have carried its data through rings.
fn same_over_shared_memory(name: &str, args: &[&str]) {
    same_over_shared_memory_with(name, &[], args);
}

/// As [`same_over_shared_memory`], with `ivcom run` options `flags`.
fn same_over_shared_memory_with(name: &str, flags: &[&str], args: &[&str]) {
    let prog = c_bin(name);
    let scene = Scene::new(&format!("{name}{}{}", flags.join("").replace('-', ""), args.join("")));
    let mut plain = Command::new(&prog);
    plain.args(args);
    let want = sorted_stdout(&output_within(plain, Duration::from_secs(120)), &format!("{name} (plain)"));
    let got = sorted_stdout(
        &output_within(scene.ivcom(flags, &prog, args), Duration::from_secs(120)),
        &format!("{name} under ivcom run {flags:?} (log {})", scene.log().display()),
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
fn signals_before_the_kernel_sleep() {
    same_over_shared_memory("t_sigspin", &[]);
    // Every signal lands while the library still polls shared memory.
    same_over_shared_memory_with("t_sigspin", &["--spin-us", "2000000"], &[]);
}

#[test]
fn epoll_instance_shared_across_fork() {
    same_over_shared_memory("t_epollfork", &[]);
}

#[test]
fn buffering_as_large_as_tcp() {
    same_over_shared_memory("t_buffer", &[]);
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
fn exec_takes_connections_over() {
    same_over_shared_memory("t_exec", &[]);
}

#[test]
fn readiness_through_every_wait() {
    same_over_shared_memory("t_waits", &[]);
}

#[test]
fn signals_interrupt_blocking_calls() {
    same_over_shared_memory("t_intr", &[]);
}

#[test]
fn children_sharing_memory_or_closing_everything() {
    same_over_shared_memory("t_share", &[]);
}

#[test]
fn descriptor_budget_and_message_vectors() {
    same_over_shared_memory("t_budget", &[]);
}

#[test]
fn handback_to_tcp_when_the_library_cannot_follow() {
    same_over_shared_memory("t_handback", &[]);
    let scene = Scene::new("t_handback-counters");
    let prog = c_bin("t_handback");
    let o = output_within(scene.ivcom(&[], &prog, &[]), Duration::from_secs(120));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = scene.log_text();
    for why in [
        "exec of an image without the library",
        "stdio on the connection (fdopen)",
        "the descriptor is sent to another process (SCM_RIGHTS)",
    ] {
        assert!(
            log.contains(&format!("connection handed back to TCP: {why}")),
            "no handback for {why}:\n{log}"
        );
    }
    assert!(log.contains("the peer handed the connection back to TCP: following"), "{log}");
    // Counted by the processes that exit through `exit` (the server: its stdio and SCM_RIGHTS
    // handbacks); the forked client and the exec'd handler end with `_exit`/exec.
    assert!(scene.counters().get("handbacks").copied().unwrap_or(0) >= 2, "{log}");
    scene.assert_clean();
}

#[test]
fn two_processes_writing_one_connection_at_once() {
    same_over_shared_memory("t_twowriters", &[]);
}

#[test]
fn connection_first_used_by_a_forked_child() {
    same_over_shared_memory("t_forkfirst", &[]);
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
    let child = Reaped(Some(spawn_group(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))));
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

struct Redis {
    _child: Reaped,
    port: String,
}

fn start_redis(scene: &Scene, under: bool) -> Redis {
    let server = need("redis-server");
    let port = free_port().to_string();
    let dir = scene.dir.join("redis");
    std::fs::create_dir_all(&dir).unwrap();
    let args = [
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir.to_str().unwrap(),
    ];
    // In a process group of its own: dropping it ends `ivcom run` and redis-server together
    // (killing `ivcom run` alone would leave redis-server running).
    let child = spawn_group(
        maybe_ivcom(under.then_some(scene), &server, &args).stdout(Stdio::null()).stderr(Stdio::null()),
    );
    let r = Redis { _child: Reaped(Some(child)), port };
    wait_until("redis-server answers PING", Duration::from_secs(20), || {
        Command::new(need("redis-cli"))
            .args(["-p", &r.port, "ping"])
            .output()
            .map(|o| o.stdout.starts_with(b"PONG"))
            .unwrap_or(false)
    });
    r
}

fn redis_cli(scene: Option<&Scene>, port: &str, args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    let mut all = vec!["-p", port];
    all.extend_from_slice(args);
    let mut c = maybe_ivcom(scene, &need("redis-cli"), &all);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        if let Some(i) = input {
            stdin.write_all(i).unwrap();
        }
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// Runs redis-benchmark; every test it runs must report a rate and no error.
fn redis_benchmark(scene: Option<&Scene>, port: &str, args: &[&str]) -> String {
    let mut all = vec!["-p", port, "-q"];
    all.extend_from_slice(args);
    let o = output_within(maybe_ivcom(scene, &need("redis-benchmark"), &all), Duration::from_secs(180));
    let text = String::from_utf8_lossy(&o.stdout).replace('\r', "\n");
    assert!(
        o.status.success(),
        "redis-benchmark {args:?} failed: {text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("err "),
        "redis-benchmark {args:?} reported errors:\n{text}"
    );
    assert!(text.contains("requests per second"), "redis-benchmark {args:?}: no result:\n{text}");
    text
}

#[test]
fn redis_under_ivcom() {
    let scene = Scene::new("redis");
    let r = start_redis(&scene, true);
    let s = Some(&scene);
    // Data: a 1 MiB value in and out, byte for byte.
    let value: String = (0..(1 << 20)).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
    let _ = redis_cli(s, &r.port, &["-x", "set", "big"], Some(value.as_bytes()));
    let back = redis_cli(s, &r.port, &["get", "big"], None);
    assert_eq!(String::from_utf8_lossy(&back).trim_end(), value, "1 MiB value did not come back intact");
    // Load: one client without pipelining, pipelining, fifty clients.
    let one = redis_benchmark(s, &r.port, &["-n", "20000", "-c", "1", "-P", "1", "-t", "set,get"]);
    assert!(one.contains("SET:") && one.contains("GET:"), "{one}");
    redis_benchmark(s, &r.port, &["-n", "50000", "-c", "4", "-P", "16", "-t", "set,get,lpush,lpop"]);
    redis_benchmark(s, &r.port, &["-n", "20000", "-c", "50", "-t", "set,get"]);
    // A background save while a benchmark runs: the forked child saves, the parent keeps
    // serving the accelerated connections.
    let bench = {
        let mut c = scene.ivcom(
            &[],
            &need("redis-benchmark"),
            &["-p", &r.port, "-q", "-n", "60000", "-c", "8", "-t", "set", "-r", "100000"],
        );
        Reaped(Some(spawn_group(c.stdout(Stdio::piped()).stderr(Stdio::piped()))))
    };
    std::thread::sleep(Duration::from_millis(200));
    let reply = redis_cli(s, &r.port, &["bgsave"], None);
    assert!(
        String::from_utf8_lossy(&reply).contains("Background saving started"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let o = bench.finish(Duration::from_secs(180), "redis-benchmark during the background save");
    let text = String::from_utf8_lossy(&o.stdout).replace('\r', "\n");
    assert!(
        o.status.success() && text.contains("requests per second") && !text.to_lowercase().contains("error"),
        "{text}"
    );
    wait_until("the background save finishes", Duration::from_secs(60), || {
        let info =
            String::from_utf8_lossy(&redis_cli(s, &r.port, &["info", "persistence"], None)).into_owned();
        info.contains("rdb_bgsave_in_progress:0")
    });
    let info = String::from_utf8_lossy(&redis_cli(s, &r.port, &["info", "persistence"], None)).into_owned();
    assert!(info.contains("rdb_last_bgsave_status:ok"), "{info}");
    assert!(scene.dir.join("redis/dump.rdb").is_file(), "no dump.rdb");
    let keys: u64 =
        String::from_utf8_lossy(&redis_cli(s, &r.port, &["dbsize"], None)).trim().parse().unwrap();
    assert!(keys > 1000, "dbsize {keys}");
    redis_cli(s, &r.port, &["shutdown", "nosave"], None);
    drop(r);
    let log = scene.log_text();
    assert!(log.contains("accept") && log.contains("connection accelerated"), "{log}");
    assert!(scene.counters().get("ring_rx").copied().unwrap_or(0) > 1 << 20, "{log}");
    assert!(!log.contains("violated"), "{log}");
}

/// A daemon known by the pid it wrote to `pidfile`, killed (by that pid) when dropped if it is
/// still running: the test shuts it down itself, but a test that fails half-way must not leave
/// it running.
struct DaemonByPidFile {
    pidfile: std::path::PathBuf,
    /// Its program's name (`/proc/PID/comm`), so that a pid reused since is left alone.
    name: &'static str,
}

impl Drop for DaemonByPidFile {
    fn drop(&mut self) {
        let Some(pid) =
            std::fs::read_to_string(&self.pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == self.name {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[test]
fn redis_daemonized() {
    // `--daemonize yes`: redis forks, the parent exits (and so does `ivcom run`), the daemon
    // keeps its announced listener and accelerates connections.
    let scene = Scene::new("redis-daemon");
    let port = free_port().to_string();
    let pidfile = scene.dir.join("redis.pid");
    let _daemon = DaemonByPidFile { pidfile: pidfile.clone(), name: "redis-server" };
    let dir = scene.dir.join("redis");
    std::fs::create_dir_all(&dir).unwrap();
    let st = scene
        .ivcom(
            &[],
            &need("redis-server"),
            &[
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--pidfile",
                pidfile.to_str().unwrap(),
                "--dir",
                dir.to_str().unwrap(),
            ],
        )
        .status()
        .unwrap();
    assert!(st.success());
    wait_until("the daemon answers", Duration::from_secs(20), || {
        Command::new(need("redis-cli"))
            .args(["-p", &port, "ping"])
            .output()
            .map(|o| o.stdout.starts_with(b"PONG"))
            .unwrap_or(false)
    });
    redis_benchmark(Some(&scene), &port, &["-n", "5000", "-c", "1", "-t", "set,get"]);
    redis_cli(Some(&scene), &port, &["shutdown", "nosave"], None);
    wait_until("the daemon exits", Duration::from_secs(20), || {
        Command::new(need("redis-cli"))
            .args(["-p", &port, "ping"])
            .output()
            .map(|o| !o.stdout.starts_with(b"PONG"))
            .unwrap_or(true)
    });
    let log = scene.log_text();
    assert!(log.contains("channel claimed; connection accelerated"), "{log}");
    wait_until("the daemon withdraws its announcement", Duration::from_secs(20), || {
        std::fs::read_dir(scene.runtime().join("tcp")).map(|r| r.count() == 0).unwrap_or(true)
    });
}

#[test]
fn redis_mixed_with_plain_tcp() {
    // A server under ivcom, a client that is not; then the reverse.
    let scene = Scene::new("redis-mixed");
    let r = start_redis(&scene, true);
    redis_benchmark(None, &r.port, &["-n", "5000", "-c", "2", "-t", "set,get"]);
    drop(r);
    let r = start_redis(&scene, false);
    redis_benchmark(Some(&scene), &r.port, &["-n", "5000", "-c", "2", "-t", "set,get"]);
    drop(r);
    let log = scene.log_text();
    assert!(!log.contains("connection accelerated"), "{log}");
    assert!(
        log.contains("no registration; plain TCP") && log.contains("no listener under ivcom; plain TCP"),
        "{log}"
    );
}

/// One iperf3 run under ivcom (both sides); returns (sent, received) bytes.
fn iperf3(scene: &Scene, reverse: bool) -> (f64, f64) {
    let iperf = need("iperf3");
    let port = free_port().to_string();
    let server = spawn_group(
        scene.ivcom(&[], &iperf, &["-s", "-1", "-p", &port]).stdout(Stdio::null()).stderr(Stdio::null()),
    );
    let mut server = Reaped(Some(server));
    // Wait for its announcement (a probe connection would take iperf3's one test).
    let tcp = scene.runtime().join("tcp");
    wait_until("iperf3 -s announces its listener", Duration::from_secs(20), || {
        std::fs::read_dir(&tcp)
            .map(|r| r.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&format!("{port}-"))))
            .unwrap_or(false)
    });
    let mut args = vec!["-c", "127.0.0.1", "-p", &port, "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let o = output_within(scene.ivcom(&[], &iperf, &args), Duration::from_secs(60));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "iperf3 {args:?}: {text}");
    let j: serde_json::Value = serde_json::from_str(&text).expect("iperf3 JSON");
    assert!(j.get("error").is_none(), "{text}");
    let sent = j["end"]["sum_sent"]["bytes"].as_f64().unwrap();
    let recv = j["end"]["sum_received"]["bytes"].as_f64().unwrap();
    let _ = server.0.take().unwrap().wait();
    (sent, recv)
}

#[test]
fn iperf3_both_directions_under_ivcom() {
    let scene = Scene::new("iperf3");
    for reverse in [false, true] {
        let (sent, recv) = iperf3(&scene, reverse);
        assert!(sent > 1e6 && recv > 1e6, "reverse={reverse}: sent {sent} received {recv}");
        assert!(recv <= sent, "received more than was sent");
    }
    let log = scene.log_text();
    assert!(log.contains("connection accelerated"), "{log}");
    assert!(scene.counters().get("ring_rx").copied().unwrap_or(0) > 1 << 20, "{log}");
    scene.assert_clean();
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn ip(args: &[&str]) {
        let o = Command::new(need("ip")).args(args).output().unwrap();
        assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }

    fn new(subnet: u8) -> Self {
        let id = std::process::id() % 100_000;
        let names = [format!("ivct-a-{id}"), format!("ivct-b-{id}")];
        let n = Netns { names: names.clone() };
        let (va, vb) = (format!("iva{id}"), format!("ivb{id}"));
        for ns in &names {
            Self::ip(&["netns", "add", ns]);
        }
        Self::ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        for (i, (ns, dev)) in names.iter().zip([&va, &vb]).enumerate() {
            Self::ip(&["link", "set", dev, "netns", ns]);
            Self::ip(&["-n", ns, "addr", "add", &format!("10.{subnet}.0.{}/24", i + 1), "dev", dev]);
            Self::ip(&["-n", ns, "link", "set", dev, "up"]);
            Self::ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// `cmd` run inside namespace `i`.
    fn exec(&self, i: usize, cmd: Command) -> Command {
        let mut c = Command::new(need("ip"));
        c.args(["netns", "exec", &self.names[i]]).arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn containers_in_two_network_namespaces() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("note: creating network namespaces needs root; skipped");
        return;
    }
    let subnet = 200 + (std::process::id() % 50) as u8;
    let ns = Netns::new(subnet);
    let scene = Scene::new("netns");
    let prog = c_bin("t_split");
    let portfile = scene.dir.join("port");
    // The server in namespace b, under ivcom; the runtime directory is shared (a bind mount
    // between containers; here the same filesystem).
    let mut server = ns.exec(1, scene.ivcom(&[], &prog, &["server", portfile.to_str().unwrap()]));
    let mut server = Reaped(Some(spawn_group(server.stdout(Stdio::piped()).stderr(Stdio::piped()))));
    wait_until("the server in namespace b", Duration::from_secs(20), || portfile.exists());
    let port = std::fs::read_to_string(&portfile).unwrap().trim().to_string();
    let dst = format!("10.{subnet}.0.2");
    let client = ns.exec(0, scene.ivcom(&[], &prog, &["client", &port, &dst]));
    let out = sorted_stdout(&output_within(client, Duration::from_secs(60)), "client in namespace a");
    assert_eq!(out, vec!["client: 1049546 bytes echoed intact".to_string()]);
    let s = server.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(sorted_stdout(&s, "server in namespace b"), vec!["server: echoed 1049546 bytes".to_string()]);
    let log = scene.log_text();
    assert!(log.contains(&format!("connect fd 3 to {dst}:{port}: channel registered")), "{log}");
    assert!(log.contains("connection accelerated"), "{log}");
    assert!(scene.counters().get("ring_rx").copied().unwrap_or(0) >= 2 << 20, "{log}");
    // A client in the server's own namespace, at that namespace's (non-loopback) address.
    std::fs::remove_file(&portfile).unwrap();
    let mut server2 = ns.exec(1, scene.ivcom(&[], &prog, &["server", portfile.to_str().unwrap()]));
    let mut server2 = Reaped(Some(spawn_group(server2.stdout(Stdio::piped()).stderr(Stdio::piped()))));
    wait_until("the second server in namespace b", Duration::from_secs(20), || portfile.exists());
    let port2 = std::fs::read_to_string(&portfile).unwrap().trim().to_string();
    let local = ns.exec(1, scene.ivcom(&[], &prog, &["client", &port2, &dst]));
    let out = sorted_stdout(&output_within(local, Duration::from_secs(60)), "client in namespace b");
    assert_eq!(out, vec!["client: 1049546 bytes echoed intact".to_string()]);
    assert!(server2.0.take().unwrap().wait_with_output().unwrap().status.success());
    assert!(
        scene.log_text().contains(&format!("connect fd 3 to {dst}:{port2}: channel registered")),
        "{}",
        scene.log_text()
    );
    // The same client to an address of its own namespace reaches nothing there: plain TCP
    // is tried and refused, as without ivcom.
    let refused = ns.exec(0, scene.ivcom(&[], &prog, &["client", &port, &format!("10.{subnet}.0.1")]));
    let o = output_within(refused, Duration::from_secs(30));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("connect"), "{}", String::from_utf8_lossy(&o.stderr));
    scene.assert_clean();
}

#[test]
fn exec_children_are_under_ivcom_too() {
    // The client is a child a shell execs; it inherits the preload and is accelerated.
    let scene = Scene::new("exec");
    let (mut server, port) = split_server(&scene, true);
    let prog = c_bin("t_split");
    let script = format!("exec {} client {port}", prog.display());
    let out = sorted_stdout(
        &output_within(scene.ivcom(&[], Path::new("/bin/sh"), &["-c", &script]), Duration::from_secs(60)),
        "sh -c",
    );
    assert_eq!(out, vec!["client: 1049546 bytes echoed intact".to_string()]);
    let s = server.0.take().unwrap().wait_with_output().unwrap();
    assert!(s.status.success());
    assert!(scene.log_text().contains("connect: listener claimed the channel"), "{}", scene.log_text());
    scene.assert_clean();
}

#[test]
fn setup_failures_fall_back_to_tcp() {
    // A runtime directory that cannot be created: nothing is announced, everything works.
    let scene = Scene::new("broken-dir");
    let blocker = scene.dir.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let prog = c_bin("t_stream");
    let want = sorted_stdout(&output_within(Command::new(&prog), Duration::from_secs(120)), "plain");
    let mut c = scene.ivcom(&[], &prog, &[]);
    c.env("IVCOM_RUNTIME_DIR", blocker.join("run"));
    let got =
        sorted_stdout(&output_within(c, Duration::from_secs(120)), "under ivcom with a broken runtime dir");
    assert_eq!(got, want);
    let log = scene.log_text();
    assert!(log.contains("not announced"), "{log}");
    assert!(!log.contains("connection accelerated"), "{log}");
}

#[test]
fn what_only_the_kernel_knows() {
    same_over_shared_memory("t_kernelview", &[]);
    let scene = Scene::new("t_kernelview-log");
    let o = output_within(scene.ivcom(&[], &c_bin("t_kernelview"), &[]), Duration::from_secs(60));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = scene.log_text();
    for why in [
        "urgent data (MSG_OOB)",
        "socket option SO_RCVLOWAT",
        "socket option SO_PEEK_OFF",
        "signal-driven I/O (O_ASYNC)",
    ] {
        assert!(
            log.contains(&format!("connection handed back to TCP: {why}")),
            "no handback for {why}:\n{log}"
        );
    }
    scene.assert_clean();
}

/// epoll_ctl churn as event loops make it per request (no system call under `ivcom run`),
/// with the kernel's answers, and plain descriptors reported beside an always-ready one.
#[test]
fn epoll_ctl_churn_and_fairness_to_plain_descriptors() {
    same_over_shared_memory("t_epollctl", &[]);
}

/// The polling budget adapts: waits longer than the budget stop costing CPU, and answers
/// still arrive when they come at once again.
#[test]
fn waiting_adapts_to_slow_answers_and_still_wakes() {
    // Its check is CPU time, which the other tests running beside it on a busy machine
    // inflate (per-call costs, not polling): a second run decides a first that lost to load.
    if std::panic::catch_unwind(|| same_over_shared_memory("t_adaptive", &[])).is_err() {
        same_over_shared_memory("t_adaptive", &[]);
    }
}

#[test]
fn epoll_registration_lifetime_turns_and_nested_fin() {
    same_over_shared_memory("t_epollmore", &[]);
}

#[test]
fn two_processes_reading_one_connection_at_once() {
    same_over_shared_memory("t_tworeaders", &[]);
}

#[test]
fn cancelled_threads_blocked_in_socket_calls() {
    same_over_shared_memory("t_cancel", &[]);
}
