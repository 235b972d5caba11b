//! The `ivcom` binary as a user runs it: `listen`/`connect` piping data, clear errors for bad
//! input, and `bench --json` producing the documented shape.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ivcom");

fn runtime_dir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ivcom-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    // Runtime directories must be closed to others.
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    p
}

/// Waits for `child` for at most `limit`, killing it (by PID, via `Child::kill`) if it runs on.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn listen_and_connect_pipe_both_ways() {
    let dir = runtime_dir("pipe");
    let mut server = Command::new(BIN)
        .args(["listen", "demo", "--runtime-dir"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = dir.join("demo.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "listener never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let to_server: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let to_client = b"reply from the listening side\n".repeat(1000);
    let mut client = Command::new(BIN)
        .args(["connect", "demo", "--runtime-dir"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sin = server.stdin.take().unwrap();
    let reply = to_client.clone();
    let feed_server = std::thread::spawn(move || sin.write_all(&reply).unwrap());
    let mut cin = client.stdin.take().unwrap();
    let data = to_server.clone();
    let feed_client = std::thread::spawn(move || cin.write_all(&data).unwrap());
    let server_out = std::thread::spawn(move || {
        let out = server.wait_with_output().unwrap();
        (out.status, out.stdout)
    });
    let client_out = client.wait_with_output().unwrap();
    feed_server.join().unwrap();
    feed_client.join().unwrap();
    let (st, received) = server_out.join().unwrap();
    assert!(st.success() && client_out.status.success());
    assert_eq!(received, to_server);
    assert_eq!(client_out.stdout, to_client);
    // The listener removed its socket file when done.
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = runtime_dir("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["connect", "no-such-listener"], "no ivcom listener named"),
        (&["listen", "../escape"], "invalid listener name"),
        (&["connect", "x", "--capacity", "1000"], "power of two"),
        (&["listen", "x", "--access", "everyone"], "unknown access policy"),
    ];
    for (args, expect) in cases {
        let mut child = Command::new(BIN)
            .args(*args)
            .arg("--runtime-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let st = wait_bounded(&mut child, Duration::from_secs(20));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!st.success(), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: stderr {err:?} lacks {expect:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_refuses_an_unknown_option_instead_of_running_it() {
    for (args, expect) in
        [(&["run", "--bogus", "--", "true"][..], "--bogus"), (&["run", "--of", "--", "true"], "--off")]
    {
        let o = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains("unexpected argument") && err.contains(expect), "{args:?}: stderr {err:?}");
    }
    // (Programs with options of their own after `--` run in every preload test.)
}

#[test]
fn bench_json_has_the_documented_shape() {
    let mut child = Command::new(BIN)
        .args(["bench", "--json", "--rounds", "1", "--duration-ms", "200", "--only", "rtt+64B,stream+64KiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(wait_bounded(&mut child, Duration::from_secs(120)).success());
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    let results = v["results"].as_array().expect("results array");
    let find = |t: &str, m: &str, test: &str| {
        results.iter().find(|r| r["transport"] == t && r["mode"] == m && r["test"] == test).cloned()
    };
    for (t, m) in [("ivcom", "adaptive"), ("ivcom", "sleep"), ("tcp", "nodelay"), ("uds", "stream")] {
        let rtt = find(t, m, "rtt").unwrap_or_else(|| panic!("no {t}/{m} rtt in {out}"));
        assert_eq!(rtt["size"], 64);
        assert!(rtt["p50_ns"].as_f64().unwrap() > 0.0);
        assert!(rtt["p99_ns"].as_f64().unwrap() >= rtt["p50_ns"].as_f64().unwrap());
        let st = find(t, m, "stream").unwrap_or_else(|| panic!("no {t}/{m} stream in {out}"));
        assert_eq!(st["size"], 65536);
        assert!(st["mb_per_s"].as_f64().unwrap() > 0.0);
        assert!(st["p50_ns"].is_null());
        assert_eq!(st["signals_per_msg"].is_null(), t != "ivcom");
    }
    assert!(find("spin-floor", "raw", "rtt").is_some());
    assert!(find("copy-floor", "raw", "stream").is_some());
}

#[test]
fn bench_runs_beside_busy_loops_with_load() {
    let o = Command::new(BIN)
        .args([
            "bench",
            "--json",
            "--load",
            "2",
            "--rounds",
            "1",
            "--duration-ms",
            "100",
            "--only",
            "ivcom+rtt+64B,uds+rtt+64B",
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "bench --load failed");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["load"], 2);
    let results = v["results"].as_array().expect("results array");
    for (t, m) in [("ivcom", "adaptive"), ("ivcom", "sleep"), ("uds", "stream")] {
        let r = results
            .iter()
            .find(|r| r["transport"] == t && r["mode"] == m && r["test"] == "rtt")
            .unwrap_or_else(|| panic!("no {t}/{m} rtt under load"));
        assert!(r["p50_ns"].as_f64().unwrap() > 0.0);
    }
    let bad = Command::new(BIN).args(["bench", "--load", "x"]).stderr(Stdio::piped()).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--load"));
}
