//! Shared helpers: a daemon running on a thread with a hook that records what it saw.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ivcom_daemon::{Config, Daemon, DaemonOptions, RegionHooks, RegionView, StopHandle};

/// Every wait in these tests is bounded; this catches anything that is not.
pub fn watchdog() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The daemon's log, shown for failing tests (`IVCOM_LOG=info` for more).
        let filter = tracing_subscriber::EnvFilter::try_from_env("IVCOM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(300));
            eprintln!("watchdog: tests still running after 300 s; aborting");
            std::process::abort();
        });
    });
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "ivcom-daemon-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Records hook calls as text lines: `created R`, `joined R P`, `left R P`.
#[derive(Clone, Default)]
pub struct Recorder {
    pub log: Arc<Mutex<Vec<String>>>,
    /// A marker the `created` hook writes at offset 0 of each region (through the daemon's
    /// mapping).
    pub marker: Option<Vec<u8>>,
    /// Ring every joining peer's vector 0 from the `peer_joined` hook.
    pub ring_on_join: bool,
}

impl Recorder {
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) until `line` was recorded.
    pub fn wait_for(&self, line: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.lines().iter().any(|l| l == line) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl RegionHooks for Recorder {
    fn created(&mut self, region: &RegionView<'_>) {
        if let Some(m) = &self.marker {
            region.memory().write_bytes(0, m).unwrap();
        }
        self.log.lock().unwrap().push(format!("created {}", region.name()));
    }
    fn peer_joined(&mut self, region: &RegionView<'_>, peer: u16) {
        assert!(region.is_connected(peer));
        if self.ring_on_join {
            region.ring(peer, 0).unwrap();
        }
        self.log.lock().unwrap().push(format!("joined {} {peer}", region.name()));
    }
    fn peer_left(&mut self, region: &RegionView<'_>, peer: u16) {
        assert!(!region.is_connected(peer));
        self.log.lock().unwrap().push(format!("left {} {peer}", region.name()));
    }
}

/// A daemon serving on a thread; stopped and joined on drop.
pub struct Running {
    pub dir: PathBuf,
    pub socket_dir: PathBuf,
    pub rec: Recorder,
    stop: StopHandle,
    thread: Option<JoinHandle<Daemon>>,
}

impl Running {
    pub fn sock(&self, region: &str, member: &str) -> PathBuf {
        self.socket_dir.join(region).join(format!("{member}.sock"))
    }

    /// Stops the daemon and gives it back (dropping it removes its sockets).
    pub fn stop(mut self) -> Daemon {
        self.stop_inner().unwrap()
    }

    fn stop_inner(&mut self) -> Option<Daemon> {
        self.stop.stop();
        let t = self.thread.take()?;
        let end = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(Instant::now() < end, "daemon did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(t.join().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            drop(self.stop_inner());
        } else {
            self.stop.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn config(text: &str, dir: &Path) -> Config {
    Config::parse(text, &dir.join("ivcom.toml")).unwrap()
}

pub fn start(text: &str, rec: Recorder) -> Running {
    watchdog();
    let dir = temp_dir("d");
    let socket_dir = dir.join("vm");
    let cfg = config(text, &dir);
    let opts = DaemonOptions { socket_dir: Some(socket_dir.clone()), shm_dir: dir.join("shm") };
    std::fs::create_dir_all(&opts.shm_dir).unwrap();
    let mut daemon = Daemon::new(&cfg, &opts, Some(Box::new(rec.clone()))).unwrap();
    let stop = daemon.stop_handle();
    let thread = std::thread::spawn(move || {
        daemon.run().unwrap();
        daemon
    });
    Running { dir, socket_dir, rec, stop, thread: Some(thread) }
}
