//! Real QEMUs against the daemon: two `ivshmem-doorbell` devices (QEMU started with `-S`, no
//! guest needed: the device talks to the server while it is realized) plus a host member
//! through the spec client. Skipped, with a note, if `qemu-system-x86_64` is not installed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{config, start, Recorder};
use ivcom_ivshmem::client::{Client, PeerEvent};

const QEMU: &str = "qemu-system-x86_64";
const T: Duration = Duration::from_secs(60);

fn qemu_installed() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A QEMU process, killed (by PID) and reaped on drop.
struct Qemu {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Qemu {
    fn start(args: &[String], stderr: std::path::PathBuf) -> Self {
        let child = Command::new(QEMU)
            .args(["-accel", "tcg", "-machine", "q35", "-m", "64", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-monitor", "none", "-serial", "none", "-S"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Qemu { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn terminate(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "QEMU ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("QEMU exited ({st}): {}", self.stderr());
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_qemus_and_a_host_member_share_a_region() {
    if !qemu_installed() {
        eprintln!("note: {QEMU} is not installed; skipping the QEMU test (apt-get install qemu-system-x86)");
        return;
    }
    let text = r#"
[[group]]
name = "vms"
members = ["vm1", "vm2", "host"]
size = "1M"
vectors = 1
"#;
    let d = start(text, Recorder::default());
    let cfg = config(text, &d.dir);
    let args = |m: &str| ivcom_daemon::qemu_args(&cfg, &d.socket_dir, "vms", m, false).unwrap();

    let mut q1 = Qemu::start(&args("vm1"), d.dir.join("q1.err"));
    assert!(d.rec.wait_for("joined vms 0", T), "first QEMU never connected: {}", q1.stderr());
    let mut q2 = Qemu::start(&args("vm2"), d.dir.join("q2.err"));
    assert!(d.rec.wait_for("joined vms 1", T), "second QEMU never connected: {}", q2.stderr());
    q1.assert_running();
    q2.assert_running();

    // A second QEMU for vm1 is refused and fails at once (rather than hanging).
    let mut dup = Qemu::start(&args("vm1"), d.dir.join("dup.err"));
    let end = Instant::now() + T;
    let st = loop {
        if let Some(st) = dup.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "a refused QEMU kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success());
    assert!(dup.stderr().contains("server sent version -1, expecting 0"), "{}", dup.stderr());

    // The host joins as the third member and sees both QEMUs, one vector each.
    let mut host = Client::connect(&d.sock("vms", "host"), T).unwrap();
    assert_eq!(host.id(), 2);
    assert_eq!(host.vectors().len(), 1);
    assert_eq!(host.peers().keys().copied().collect::<Vec<_>>(), [0, 1]);
    assert!(host.peers().values().all(|v| v.len() == 1));
    // Ringing a QEMU's eventfd is harmless with the CPU stopped; it must not upset QEMU.
    host.ring(0, 0).unwrap();

    // One QEMU exits: the daemon notices, the host gets the disconnect notice, the other QEMU
    // takes its notice without complaint.
    q2.terminate();
    assert!(d.rec.wait_for("left vms 1", T), "daemon did not see QEMU 2 leave");
    let end = Instant::now() + T;
    let ev = loop {
        let ev = host.wait_events(Duration::from_millis(500)).unwrap();
        if !ev.is_empty() || Instant::now() > end {
            break ev;
        }
    };
    assert!(matches!(ev.as_slice(), [PeerEvent::Left { id: 1 }]), "{ev:?}");
    assert_eq!(host.peers().keys().copied().collect::<Vec<_>>(), [0]);

    // A QEMU for vm2 again gets a fresh id (1 + 3 members), and the host sees it join. Reusing
    // id 1 would make QEMU 1 write into memory it freed on the disconnect notice.
    let mut q2 = Qemu::start(&args("vm2"), d.dir.join("q2b.err"));
    let ev = host.wait_events(T).unwrap();
    assert!(matches!(ev.as_slice(), [PeerEvent::Joined { id: 4, fds }] if fds.len() == 1), "{ev:?}");
    std::thread::sleep(Duration::from_millis(300));
    q1.assert_running();
    q2.assert_running();
    // QEMU reports protocol trouble (unexpected messages, invalid peers, too many eventfds)
    // on stderr.
    assert_eq!(q1.stderr().trim(), "", "QEMU 1 complained");
    assert_eq!(q2.stderr().trim(), "", "QEMU 2 complained");
    let lines = d.rec.lines();
    assert_eq!(
        lines,
        ["created vms", "joined vms 0", "joined vms 1", "joined vms 2", "left vms 1", "joined vms 1"],
        "{lines:?}"
    );
}
