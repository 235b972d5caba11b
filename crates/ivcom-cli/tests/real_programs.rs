//! Real programs under `ivcom run` on both ends: a Python asyncio server and client, a Python
//! program that starts subprocesses while connected, curl against nginx, Node.js as an HTTP
//! client and server, PostgreSQL with pgbench, memcached with memslap and a Python client.
//!
//! Each test runs the pair plainly, then both ends under `ivcom run` (a private runtime
//! directory and decision log, [`Scene`]); the results must be right and the same both times,
//! and the decision log's counters must show that connections went through shared memory.
//! The programs come from Debian packages (`scripts/deps.sh` installs them; a missing one
//! fails the test and names its package); the Python and JavaScript programs are in
//! `tests/programs/`. Servers listen on 127.0.0.1 only, every run is bounded in count and
//! time, and every process is ended by the test that started it. Run as root, the servers
//! and their clients run as an unprivileged user (`ivcom_testkit::service_user`): PostgreSQL
//! refuses root, and nginx and memcached started by root would serve from another user than
//! their clients.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ivcom_testkit::User;
use sha2::{Digest, Sha256};

mod support;
use support::{free_port, need, output_within, spawn_group, wait_until, Reaped, Scene};

/// Where the Python and JavaScript programs are.
const PROGRAMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs");
/// The longest a client run may take before it is killed (and the test fails).
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// The longest a server may take to start listening, or to exit once it is told to.
const SERVER_LIMIT: Duration = Duration::from_secs(60);

fn program(name: &str) -> PathBuf {
    Path::new(PROGRAMS).join(name)
}

/// One run of a pair: plainly or with both ends under `ivcom run` (the scene's runtime
/// directory and log), as the service user when there is one.
struct Side<'a> {
    scene: &'a Scene,
    ivcom: bool,
    user: Option<&'a User>,
}

impl<'a> Side<'a> {
    /// The plain run and the run under ivcom of a test, in that order.
    fn both(scene: &'a Scene, user: Option<&'a User>) -> [Side<'a>; 2] {
        [Side { scene, ivcom: false, user }, Side { scene, ivcom: true, user }]
    }

    fn tag(&self) -> &'static str {
        if self.ivcom {
            "ivcom"
        } else {
            "plain"
        }
    }

    /// A file or directory of this run in the scene's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.scene.dir.join(format!("{}-{name}", self.tag()))
    }

    /// A directory of this run, owned by the user the programs run as.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.path(name);
        std::fs::create_dir_all(&d).unwrap();
        if let Some(u) = self.user {
            ivcom_testkit::chown(&d, u.uid, u.gid);
        }
        d
    }

    fn cmd(&self, prog: &Path, args: &[&str]) -> Command {
        let mut c = if self.ivcom {
            self.scene.ivcom(&[], prog, args)
        } else {
            let mut c = Command::new(prog);
            c.args(args);
            c
        };
        c.stdin(Stdio::null());
        if let Some(u) = self.user {
            c.uid(u.uid).gid(u.gid).env("HOME", &self.scene.dir);
        }
        c
    }

    /// Runs a client to its end (killed after [`RUN_LIMIT`]); it must succeed. Its stdout.
    fn run(&self, prog: &Path, args: &[&str]) -> String {
        let o = output_within(self.cmd(prog, args), RUN_LIMIT);
        let what = format!("{} {args:?} ({})", prog.display(), self.tag());
        assert!(
            o.status.success(),
            "{what} failed: {:?}\nstdout:\n{}\nstderr:\n{}\ndecision log:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts a server, its stdout and stderr going to `<tag>-<name>.out` in the scene.
    fn spawn(&self, name: &str, prog: &Path, args: &[&str]) -> Server {
        let out = self.path(&format!("{name}.out"));
        let f = std::fs::File::create(&out).unwrap();
        let mut c = self.cmd(prog, args);
        c.stdout(f.try_clone().unwrap()).stderr(f);
        Server { child: Reaped(Some(spawn_group(&mut c))), out, what: format!("{name} ({})", self.tag()) }
    }

    /// Waits until something listens on 127.0.0.1:`port` and, under ivcom, has announced it
    /// (the library announces right after the real `listen`: a client connecting in between
    /// would stay on plain TCP).
    fn wait_listening(&self, port: u16) {
        wait_until(&format!("a server listening on port {port} ({})", self.tag()), SERVER_LIMIT, || {
            listening(port) && (!self.ivcom || announced(self.scene, port))
        });
    }

    /// The end of the decision log, for failure messages.
    fn log_tail(&self) -> String {
        let log = self.scene.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A server started by [`Side::spawn`]: its process group is killed if the test ends early.
struct Server {
    child: Reaped,
    out: PathBuf,
    what: String,
}

impl Server {
    /// Waits until its output holds `text`.
    fn wait_output(&self, text: &str) {
        wait_until(&format!("{} prints {text:?}", self.what), SERVER_LIMIT, || {
            std::fs::read_to_string(&self.out).map(|o| o.contains(text)).unwrap_or(false)
        });
    }

    /// Waits for it to exit by itself; it must succeed. Its output.
    fn finish(self) -> String {
        let o = self.child.finish(SERVER_LIMIT, &self.what);
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(o.status.success(), "{} failed: {:?}\n{text}", self.what, o.status);
        text
    }

    /// Sends it SIGTERM (`ivcom run` passes it on to the program) and waits for it to exit;
    /// it must exit successfully. Its output.
    fn stop(self) -> String {
        if let Some(c) = &self.child.0 {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        self.finish()
    }
}

/// Whether a TCP socket listens on 127.0.0.1:`port` in this network namespace.
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
            })
        })
        .unwrap_or(false)
}

/// Whether a listener on `port` is announced in the scene's runtime directory.
fn announced(scene: &Scene, port: u16) -> bool {
    let prefix = format!("{port}-");
    std::fs::read_dir(scene.runtime().join("tcp"))
        .map(|r| {
            r.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&prefix) && n.ends_with(".ann")
            })
        })
        .unwrap_or(false)
}

/// Waits for the port file a program writes once it listens; its port.
fn port_from(file: &Path) -> String {
    wait_until(&format!("{} written", file.display()), SERVER_LIMIT, || file.exists());
    std::fs::read_to_string(file).unwrap().trim().to_string()
}

/// The user the servers run as (see the module's documentation), and a scene given to it.
fn scene_for(name: &str) -> (Scene, Option<User>) {
    let scene = Scene::new(name);
    let user = ivcom_testkit::service_user();
    if let Some(u) = &user {
        scene.give_to(u.uid, u.gid);
    }
    (scene, user)
}

/// The acceleration a run under ivcom must show: connections claimed on both sides and at
/// least `ring_bytes` carried through rings (received, summed over the processes).
fn assert_accelerated(scene: &Scene, what: &str, ring_bytes: u64) {
    let log = scene.log_text();
    assert!(
        log.contains("channel claimed; connection accelerated"),
        "{what}: no accepted connection accelerated\n{log}"
    );
    assert!(
        log.contains("listener claimed the channel; connection accelerated"),
        "{what}: no connect accelerated\n{log}"
    );
    assert!(scene.counter("accelerated") >= 2, "{what}: counters {:?}\n{log}", scene.counters());
    let rx = scene.counter("ring_rx");
    assert!(
        rx >= ring_bytes,
        "{what}: {rx} bytes received through rings, expected at least {ring_bytes}\n{log}"
    );
    assert!(!log.contains("violated"), "{what}: {log}");
    scene.assert_clean();
}

fn python() -> PathBuf {
    need("python3")
}

/// A PostgreSQL server program of Debian's `postgresql` package (in
/// /usr/lib/postgresql/VERSION/bin; the newest version when there are several).
fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let p = e.path().join("bin").join(name);
                    p.is_file().then_some((v, p))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!(
            "/usr/lib/postgresql/*/bin/{name} is needed: apt-get install postgresql (scripts/deps.sh, which scripts/test.sh runs first, installs it)"
        )
    })
}

fn sha256_file(p: &Path) -> String {
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    format!("{:x}", Sha256::digest(&data))
}

/// `n` bytes that do not repeat in any short period (a counter run through SHA-256).
fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut i = 0u64;
    while out.len() < n {
        out.extend_from_slice(&Sha256::digest([seed.to_le_bytes(), i.to_le_bytes()].concat()));
        i += 1;
    }
    out.truncate(n);
    out
}

// --- (a) Python asyncio ------------------------------------------------------------------

/// The asyncio line server and `conns` concurrent clients; the two summary lines.
fn asyncio_pair(side: &Side<'_>, conns: usize) -> (String, String) {
    let prog = program("asyncio_lines.py");
    let portfile = side.path(&format!("asyncio-{conns}.port"));
    let n = conns.to_string();
    let server = side.spawn(
        "asyncio-server",
        &python(),
        &[prog.to_str().unwrap(), "server", portfile.to_str().unwrap(), &n],
    );
    let port = port_from(&portfile);
    let client = side.run(&python(), &[prog.to_str().unwrap(), "client", &port, &n]);
    (server.finish(), client)
}

#[test]
fn python_asyncio_line_server_and_client() {
    let scene = Scene::new("py-asyncio");
    let [plain, ivcom] = Side::both(&scene, None);
    // 8 connections at once, each 200 rounds and a burst of 21 lines of up to 256 KiB.
    let want = (
        "server: 8 connections, 1768 lines\n".to_string(),
        "client: 8 connections, 1768 lines, every reply correct\n".to_string(),
    );
    assert_eq!(asyncio_pair(&plain, 8), want, "plain TCP");
    assert_eq!(asyncio_pair(&ivcom, 8), want, "under ivcom run\nlog:\n{}", scene.log_text());
    // Each connection sends about 1 MB (its burst) to the server.
    assert_accelerated(&scene, "asyncio", 1_000_000);
}

#[test]
fn python_asyncio_every_concurrent_connection_accelerated() {
    let scene = Scene::new("py-asyncio-all");
    let [_, ivcom] = Side::both(&scene, None);
    let conns = 32;
    let (server, client) = asyncio_pair(&ivcom, conns);
    assert!(
        server.starts_with("server: 32 connections") && client.contains("every reply correct"),
        "{server}{client}"
    );
    let log = scene.log_text();
    assert_eq!(log.matches("listener claimed the channel; connection accelerated").count(), conns, "{log}");
    assert_eq!(log.matches("channel claimed; connection accelerated").count(), conns, "{log}");
    assert!(!log.contains("plain TCP"), "{log}");
}

// --- (b) Python subprocesses while connected --------------------------------------------

#[test]
fn python_subprocesses_while_connected() {
    let scene = Scene::new("py-subprocess");
    let prog = program("subprocesses.py");
    let mut outs = Vec::new();
    for side in Side::both(&scene, None) {
        let portfile = side.path("subprocess.port");
        let server = side.spawn(
            "subprocess-server",
            &python(),
            &[prog.to_str().unwrap(), "server", portfile.to_str().unwrap()],
        );
        let port = port_from(&portfile);
        let client = side.run(&python(), &[prog.to_str().unwrap(), "client", &port]);
        outs.push((server.finish(), client));
    }
    let want = (
        "server: 87 requests, subprocesses started during 3 of them\n".to_string(),
        "client: 83 rounds, 3 times subprocesses on each side, 1 MiB round trip intact\n".to_string(),
    );
    assert_eq!(outs[0], want, "plain TCP");
    assert_eq!(outs[1], want, "under ivcom run\nlog:\n{}", scene.log_text());
    assert_accelerated(&scene, "subprocesses", 2 << 20);
}

// --- (c) curl against nginx -------------------------------------------------------------

/// nginx in the foreground (master and two workers) serving `www` on 127.0.0.1:`port`, with
/// everything it writes in `dir`.
fn nginx_config(dir: &Path, www: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
}}
",
        www = www.display()
    )
}

#[test]
fn curl_against_nginx() {
    let (scene, user) = scene_for("nginx");
    // The files: 1 MiB, a small one, and eight of 64 KiB fetched in parallel.
    let www = scene.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let mut files = vec![
        ("big.bin".to_string(), pseudo_random(1 << 20, 1)),
        ("small.txt".to_string(), b"a small file\n".to_vec()),
    ];
    for i in 0..8 {
        files.push((format!("part{i}.bin"), pseudo_random(64 << 10, 100 + i)));
    }
    for (name, data) in &files {
        std::fs::write(www.join(name), data).unwrap();
    }
    let nginx = need("nginx");
    let curl = need("curl");
    for side in Side::both(&scene, user.as_ref()) {
        let dir = side.dir("nginx");
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_config(&dir, &www, port)).unwrap();
        let error_log = dir.join("error.log");
        let server = side.spawn(
            "nginx",
            &nginx,
            &["-p", dir.to_str().unwrap(), "-e", error_log.to_str().unwrap(), "-c", conf.to_str().unwrap()],
        );
        side.wait_listening(port);
        let got = side.dir("downloads");
        let url = |name: &str| format!("http://127.0.0.1:{port}/{name}");
        // One connection for two requests (keep-alive), then eight at once.
        let out = |name: &str| got.join(name).to_string_lossy().into_owned();
        let (a, b) = (out("big.bin"), out("small.txt"));
        side.run(
            &curl,
            &["-sS", "--fail", "--max-time", "60", "-o", &a, &url("big.bin"), "-o", &b, &url("small.txt")],
        );
        let mut args: Vec<String> = [
            "-sS",
            "--fail",
            "--max-time",
            "60",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "8",
        ]
        .map(String::from)
        .to_vec();
        for i in 0..8 {
            let name = format!("part{i}.bin");
            args.extend(["-o".to_string(), out(&name), url(&name)]);
        }
        side.run(&curl, &args.iter().map(String::as_str).collect::<Vec<_>>());
        for (name, data) in &files {
            assert_eq!(
                sha256_file(&got.join(name)),
                format!("{:x}", Sha256::digest(data)),
                "{name} came back different ({})\nlog:\n{}",
                side.tag(),
                side.log_tail()
            );
        }
        let text = server.stop();
        let access = std::fs::read_to_string(dir.join("access.log")).unwrap();
        assert_eq!(access.lines().filter(|l| l.contains("\" 200 ")).count(), 10, "{access}\n{text}");
    }
    assert_accelerated(&scene, "nginx", 1 << 20);
}

// --- (d) Node.js ------------------------------------------------------------------------

/// The HTTP server and client of `http_pair.js`; their outputs.
fn node_pair(side: &Side<'_>, server_args: &[&str]) -> (String, String) {
    let node = need("node");
    let prog = program("http_pair.js");
    let portfile = side.path(&format!("node{}.port", server_args.len()));
    let mut args = vec![prog.to_str().unwrap(), "server", portfile.to_str().unwrap()];
    args.extend_from_slice(server_args);
    let server = side.spawn("node-server", &node, &args);
    let port = port_from(&portfile);
    let client = side.run(&node, &[prog.to_str().unwrap(), "client", &port]);
    (server.finish(), client)
}

const NODE_WANT: (&str, &str) =
    ("server: 218 requests\n", "client: 218 requests, every answer correct, 1 MiB POST intact\n");

#[test]
fn node_http_client_and_server() {
    let scene = Scene::new("node");
    let [plain, ivcom] = Side::both(&scene, None);
    let want = (NODE_WANT.0.to_string(), NODE_WANT.1.to_string());
    assert_eq!(node_pair(&plain, &[]), want, "plain TCP");
    assert_eq!(node_pair(&ivcom, &[]), want, "under ivcom run\nlog:\n{}", scene.log_text());
    // The 200 GETs one after another on the first connection carry about 100 KB.
    assert_accelerated(&scene, "node", 64 << 10);
}

#[test]
fn node_http_server_closes_right_after_its_last_answer() {
    let scene = Scene::new("node-close");
    let [plain, ivcom] = Side::both(&scene, None);
    let want = (NODE_WANT.0.to_string(), NODE_WANT.1.to_string());
    assert_eq!(node_pair(&plain, &["close-after-last"]), want, "plain TCP");
    assert_eq!(node_pair(&ivcom, &["close-after-last"]), want, "under ivcom run\nlog:\n{}", scene.log_text());
    assert_accelerated(&scene, "node", 1 << 20);
}

// --- (e) PostgreSQL and pgbench ---------------------------------------------------------

/// The lines of a pgbench run that say what it did (transactions processed and failed).
fn pgbench_result(out: &str) -> Vec<String> {
    let lines: Vec<String> = out
        .lines()
        .filter(|l| {
            l.starts_with("number of transactions actually processed")
                || l.starts_with("number of failed transactions")
        })
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 2, "pgbench printed no result:\n{out}");
    lines
}

#[test]
fn postgresql_with_pgbench() {
    let (scene, user) = scene_for("postgres");
    let (initdb, postgres, pgbench, psql) =
        (pg_bin("initdb"), pg_bin("postgres"), pg_bin("pgbench"), pg_bin("psql"));
    let mut results = Vec::new();
    for side in Side::both(&scene, user.as_ref()) {
        let data = side.dir("pgdata");
        let sockets = side.dir("pgsock");
        // initdb runs plainly: it starts a server of its own with no network.
        let mut init = Command::new(&initdb);
        init.args([
            "-D",
            data.to_str().unwrap(),
            "--auth=trust",
            "--no-sync",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if let Some(u) = &user {
            init.uid(u.uid).gid(u.gid).env("HOME", &scene.dir);
        }
        let o = output_within(init, RUN_LIMIT);
        assert!(
            o.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let port = free_port();
        let p = port.to_string();
        let server = side.spawn(
            "postgres",
            &postgres,
            &[
                "-D",
                data.to_str().unwrap(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("port={port}"),
                "-c",
                &format!("unix_socket_directories={}", sockets.display()),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=20",
            ],
        );
        side.wait_listening(port);
        // It listens before it has recovered the database and accepts connections.
        server.wait_output("database system is ready to accept connections");
        let conn = ["-h", "127.0.0.1", "-p", &p, "-U", "postgres"];
        let bench = |extra: &[&str]| {
            let mut a = conn.to_vec();
            a.extend_from_slice(extra);
            a.push("postgres");
            side.run(&pgbench, &a)
        };
        bench(&["-i", "-s", "1", "-q"]);
        let mut r = Vec::new();
        // Select-only, read-write (TPC-B-like), and (below) select-only with a new connection
        // per transaction.
        r.extend(pgbench_result(&bench(&["-S", "-c", "4", "-j", "2", "-t", "500"])));
        r.extend(pgbench_result(&bench(&["-c", "4", "-j", "2", "-t", "200"])));
        // What the read-write run did adds up: every transaction moved one delta into an
        // account, a teller and a branch, and wrote one history row.
        let mut q = conn.to_vec();
        q.extend_from_slice(&[
            "-d",
            "postgres",
            "-tA",
            "-c",
            "select (select count(*) from pgbench_history), (select sum(delta) from pgbench_history) = (select sum(abalance) from pgbench_accounts) and (select sum(delta) from pgbench_history) = (select sum(bbalance) from pgbench_branches) and (select sum(delta) from pgbench_history) = (select sum(tbalance) from pgbench_tellers)",
        ]);
        r.push(side.run(&psql, &q).trim().to_string());
        // (pgbench empties pgbench_history before each run.)
        r.extend(pgbench_result(&bench(&["-C", "-S", "-c", "2", "-j", "2", "-t", "100"])));
        let log = server.stop();
        assert!(log.contains("database system is shut down"), "{log}");
        results.push(r);
    }
    let want = [
        "number of transactions actually processed: 2000/2000",
        "number of failed transactions: 0 (0.000%)",
        "number of transactions actually processed: 800/800",
        "number of failed transactions: 0 (0.000%)",
        "800|t",
        "number of transactions actually processed: 200/200",
        "number of failed transactions: 0 (0.000%)",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(results[0], want, "plain TCP");
    assert_eq!(results[1], want, "under ivcom run\nlog:\n{}", scene.log_text());
    // pgbench -i sends the 100 000 rows of pgbench_accounts (COPY, about 1.5 MB).
    assert_accelerated(&scene, "postgres", 1 << 20);
}

// --- (f) memcached ----------------------------------------------------------------------

/// The server's counters that say what the clients did.
fn memcached_counts(stats: &str) -> Vec<String> {
    let keep =
        ["cmd_get", "cmd_set", "get_hits", "get_misses", "incr_hits", "delete_hits", "total_connections"];
    let v: Vec<String> = stats
        .lines()
        .filter(|l| keep.contains(&l.split(' ').next().unwrap_or("")))
        .map(str::to_string)
        .collect();
    assert_eq!(v.len(), keep.len(), "stats:\n{stats}");
    v
}

#[test]
fn memcached_with_memslap_and_a_python_client() {
    let (scene, user) = scene_for("memcached");
    let memcached = need("memcached");
    let memcslap = need("memcslap");
    let client = program("memcache_client.py");
    let mut results = Vec::new();
    for side in Side::both(&scene, user.as_ref()) {
        let port = free_port();
        let p = port.to_string();
        let server = side.spawn(
            "memcached",
            &memcached,
            &["-l", "127.0.0.1", "-p", &p, "-U", "0", "-t", "2", "-m", "64"],
        );
        side.wait_listening(port);
        let servers = format!("127.0.0.1:{port}");
        // Four threads setting, four getting, two multi-getting over the binary protocol.
        for args in [
            ["-t", "set", "-c", "4", "-e", "2000"].as_slice(),
            &["-t", "get", "-c", "4", "-e", "2000"],
            &["-t", "mget", "-c", "2", "-e", "2000", "--binary"],
        ] {
            let mut a = vec!["-s", &servers];
            a.extend_from_slice(args);
            let out = side.run(&memcslap, &a);
            assert!(
                out.contains("Time total") && !out.to_lowercase().contains("error"),
                "memcslap {args:?}:\n{out}"
            );
        }
        let checked = side.run(&python(), &[client.to_str().unwrap(), &p, "check"]);
        let stats = side.run(&python(), &[client.to_str().unwrap(), &p, "stats"]);
        server.stop();
        results.push((checked, memcached_counts(&stats)));
    }
    assert_eq!(
        results[0].0,
        "client: 70 values of 0 B to 512 KiB stored and read back, 100 incr, 10 deletes\n"
    );
    assert_eq!(
        results[1],
        results[0],
        "under ivcom run (left) and plain (right) differ\nlog:\n{}",
        scene.log_text()
    );
    // The Python client alone reads back about 8 MB of values.
    assert_accelerated(&scene, "memcached", 4 << 20);
}
