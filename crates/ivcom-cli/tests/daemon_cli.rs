//! `ivcom daemon` and `ivcom qemu-args` as a user runs them: serving members, logging a
//! protocol violation by name, stopping on SIGTERM/SIGINT with its sockets removed, clear
//! errors for bad configurations and a busy socket directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ivcom_ivshmem::client::{Client, PeerEvent};

const BIN: &str = env!("CARGO_BIN_EXE_ivcom");
const T: Duration = Duration::from_secs(20);

const LAB: &str = r#"
[[group]]
name = "lab"
members = ["vm1", "vm2", "host"]
size = "1M"
vectors = 2
"#;

fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ivcom-daemon-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A child killed (by PID) and reaped if the test ends early.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < end, "process did not finish within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_path(p: &Path) {
    let end = Instant::now() + T;
    while !p.exists() {
        assert!(Instant::now() < end, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_daemon(dir: &Path, config: &Path, extra: &[&str]) -> Guard {
    Guard(Some(
        Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(config)
            .args(extra)
            .arg("--socket-dir")
            .arg(dir.join("vm"))
            .env("IVCOM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.err")).unwrap())
            .spawn()
            .unwrap(),
    ))
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(child), sig).unwrap();
}

fn serve_then_stop_on(sig: rustix::process::Signal, tag: &str) {
    let dir = temp_dir(tag);
    let cfg = dir.join("ivcom.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let mut g = spawn_daemon(&dir, &cfg, &[]);
    let sock = |m: &str| dir.join("vm").join("lab").join(format!("{m}.sock"));
    wait_for_path(&sock("host"));

    let mut a = Client::connect_with_vectors(&sock("vm1"), 2, T).unwrap();
    // The daemon formatted ivcom's directory into the region before anyone connected.
    let mut magic = [0u8; 8];
    a.map_shm().unwrap().region().read_bytes(0, &mut magic).unwrap();
    assert_eq!(&magic, b"IVCOMDIR");
    let b = Client::connect(&sock("vm2"), T).unwrap();
    assert_eq!((a.id(), b.id(), b.vectors().len()), (0, 1, 2));
    assert!(matches!(a.wait_events(T).unwrap().as_slice(), [PeerEvent::Joined { id: 1, .. }]));
    b.ring(0, 1).unwrap();
    assert_eq!(a.wait_interrupt(1, T).unwrap(), Some(1));

    // A member that talks is cut off, with the region and member named in the log.
    let mut bad = UnixStream::connect(sock("host")).unwrap();
    bad.set_read_timeout(Some(T)).unwrap();
    bad.write_all(b"hello?").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    let end = Instant::now() + T;
    let log = loop {
        let log = std::fs::read_to_string(dir.join("daemon.err")).unwrap();
        if log.contains("protocol violation") || Instant::now() > end {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(log.contains("region lab member host (peer 2): protocol violation"), "{log}");

    let child = g.0.as_mut().unwrap();
    signal(child, sig);
    let st = wait_bounded(child, T);
    assert!(st.success(), "daemon exited with {st}");
    for m in ["vm1", "vm2", "host"] {
        assert!(!sock(m).exists(), "{m}.sock left behind");
    }
    // The members see the server gone.
    let end = Instant::now() + T;
    loop {
        match a.poll_events() {
            Err(ivcom_ivshmem::client::ClientError::Closed) => break,
            _ => assert!(Instant::now() < end, "client never saw the daemon go"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_serves_and_stops_on_sigterm() {
    serve_then_stop_on(rustix::process::Signal::TERM, "term");
}

#[test]
fn daemon_stops_on_sigint() {
    serve_then_stop_on(rustix::process::Signal::INT, "int");
}

#[test]
fn no_directory_leaves_regions_zeroed() {
    let dir = temp_dir("nodir");
    let cfg = dir.join("ivcom.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let mut g = spawn_daemon(&dir, &cfg, &["--no-directory"]);
    let sock = dir.join("vm").join("lab").join("vm1.sock");
    wait_for_path(&dir.join("vm").join("lab").join("host.sock"));
    let a = Client::connect_with_vectors(&sock, 2, T).unwrap();
    let mut head = [0xffu8; 4096];
    a.map_shm().unwrap().region().read_bytes(0, &mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0));
    let child = g.0.as_mut().unwrap();
    signal(child, rustix::process::Signal::TERM);
    assert!(wait_bounded(child, T).success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_rejects_a_bad_config_by_name() {
    let dir = temp_dir("bad");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[[group]]\nname='lab'\nmembers=['vm1','vm1']\nsize='16M'\n").unwrap();
    let out = Command::new(BIN).args(["daemon", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: [[group]] \"lab\": duplicate member \"vm1\"", cfg.display())),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn second_daemon_on_the_same_sockets_fails() {
    let dir = temp_dir("twice");
    let cfg = dir.join("ivcom.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let mut first = spawn_daemon(&dir, &cfg, &[]);
    wait_for_path(&dir.join("vm").join("lab").join("host.sock"));
    let out = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&cfg)
        .arg("--socket-dir")
        .arg(dir.join("vm"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another daemon"), "{err}");
    // The first still serves.
    let c = Client::connect(&dir.join("vm").join("lab").join("vm2.sock"), T).unwrap();
    assert_eq!(c.id(), 1);
    let child = first.0.as_mut().unwrap();
    signal(child, rustix::process::Signal::TERM);
    assert!(wait_bounded(child, T).success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_args_prints_both_forms() {
    let dir = temp_dir("qargs");
    let cfg = dir.join("ivcom.toml");
    std::fs::write(
        &cfg,
        "socket_dir = '/run/ivcom/vm'\n[[group]]\nname='lab'\nmembers=['vm1','vm2']\nsize='16M'\nvectors=4\n\
         [[group]]\nname='flat'\nmembers=['vm1','vm2']\nsize='4M'\nplain=true\n\
         [[pairs]]\nname='mesh'\nmembers=['a','b','c']\nsize='1M'\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).arg("qemu-args").arg("--config").arg(&cfg).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, _) = run(&["--region", "lab", "--member", "vm2"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "-chardev socket,path=/run/ivcom/vm/lab/vm2.sock,id=ivcom-lab -device ivshmem-doorbell,chardev=ivcom-lab,vectors=4"
    );
    let (ok, out, _) = run(&["--region", "mesh.a.c", "--member", "c", "--socket-dir", "/tmp/s"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "-chardev socket,path=/tmp/s/mesh.a.c/c.sock,id=ivcom-mesh.a.c -device ivshmem-doorbell,chardev=ivcom-mesh.a.c,vectors=1"
    );
    let (ok, out, _) = run(&["--region", "flat", "--member", "vm1", "--plain"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "-object memory-backend-file,size=4194304,share=on,mem-path=/dev/shm/ivcom.flat,id=ivcom-flat -device ivshmem-plain,memdev=ivcom-flat"
    );
    // Without socket_dir in the file: the environment decides.
    let bare = dir.join("bare.toml");
    std::fs::write(&bare, LAB).unwrap();
    let with_env = |vars: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["qemu-args", "--region", "lab", "--member", "host", "--config"]).arg(&bare);
        cmd.env_remove("IVCOM_RUNTIME_DIR").env_remove("XDG_RUNTIME_DIR");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_owned()
    };
    assert_eq!(
        with_env(&[("IVCOM_RUNTIME_DIR", "/r"), ("XDG_RUNTIME_DIR", "/x")]),
        "socket,path=/r/vm/lab/host.sock,id=ivcom-lab"
    );
    assert_eq!(with_env(&[("XDG_RUNTIME_DIR", "/x")]), "socket,path=/x/ivcom/vm/lab/host.sock,id=ivcom-lab");
    let uid = rustix::process::geteuid().as_raw();
    let fallback = if uid == 0 {
        "/run/ivcom-vm".to_string()
    } else {
        std::env::temp_dir().join(format!("ivcom-{uid}/vm")).display().to_string()
    };
    assert_eq!(with_env(&[]), format!("socket,path={fallback}/lab/host.sock,id=ivcom-lab"));
    let (ok, _, err) = run(&["--region", "lab", "--member", "vm1", "--plain"]);
    assert!(!ok && err.contains("served through doorbell sockets"), "{err}");
    let (ok, _, err) = run(&["--region", "mesh.a.b", "--member", "c"]);
    assert!(!ok && err.contains("\"c\" is not a member of region \"mesh.a.b\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
