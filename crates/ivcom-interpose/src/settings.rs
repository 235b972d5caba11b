//! Settings read once from the environment, the decision log, and the counters.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use ivcom::rundir::{DirAccess, RuntimeDir};

/// `IVCOM_ACCEL=0` (or `off`, `no`, `false`) turns acceleration off: every call goes to the
/// kernel unchanged.
pub const ENV_ACCEL: &str = "IVCOM_ACCEL";
/// `IVCOM_PRELOAD_LOG=stderr` or `IVCOM_PRELOAD_LOG=/path/file` logs each decision (one line each) and the
/// counters at exit.
pub const ENV_LOG: &str = "IVCOM_PRELOAD_LOG";
/// `IVCOM_SPIN_US`: how long a waiting call polls shared memory before it sleeps (default 100).
pub const ENV_SPIN: &str = "IVCOM_SPIN_US";
/// `IVCOM_RING_KIB`: capacity of each direction's ring of a new connection (default 4096: as
/// much as loopback TCP's socket buffers take from a writer whose peer does not read).
pub const ENV_RING: &str = "IVCOM_RING_KIB";
/// `IVCOM_MAX_RING_KIB`: the largest ring (per direction) an accepting side takes from a
/// connecting one (default 4096, and never less than its own `IVCOM_RING_KIB`); a larger
/// registration stays on plain TCP. Ring pages are charged to whoever touches them, so this
/// bounds the memory a connecting peer can make a server hold.
pub const ENV_MAX_RING: &str = "IVCOM_MAX_RING_KIB";

/// What the environment asked for.
#[derive(Debug)]
pub struct Settings {
    /// Acceleration on.
    pub enabled: bool,
    /// Polling budget before sleeping: the most an adaptive budget grows to, or, when
    /// `spin_fixed`, the budget itself.
    pub spin: Duration,
    /// The budget was set (`IVCOM_SPIN_US`, `ivcom run --spin-us`): it does not adapt.
    pub spin_fixed: bool,
    /// Ring capacity per direction (a power of two).
    pub ring: u64,
    /// Largest region an accepting side maps (header and two rings of at most
    /// `IVCOM_MAX_RING_KIB`).
    pub max_region: u64,
    /// Where listeners are announced: `<runtime dir>/tcp`, opened and verified as the user's
    /// own ([`ivcom::rundir`]); `Err` says why there is none (then nothing is accelerated).
    pub dir: Result<RuntimeDir, String>,
    log: Option<OwnedFd>,
}

fn parse_env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Settings {
    fn load() -> Self {
        let enabled = !matches!(
            std::env::var(ENV_ACCEL).unwrap_or_default().to_ascii_lowercase().as_str(),
            "0" | "off" | "no" | "false"
        );
        let spin_set = parse_env::<u64>(ENV_SPIN);
        let spin = Duration::from_micros(spin_set.unwrap_or(100).min(1_000_000));
        let spin_fixed = spin_set.is_some();
        let kib = parse_env::<u64>(ENV_RING).unwrap_or(4096).clamp(4, 64 * 1024);
        let ring = (kib * 1024).next_power_of_two();
        let max_kib = parse_env::<u64>(ENV_MAX_RING).unwrap_or(4096).clamp(4, 64 * 1024);
        let max_ring = (max_kib * 1024).next_power_of_two().max(ring);
        let max_region = ivcom_ring::layout::HEADER_SIZE as u64 + 2 * max_ring;
        let dir = runtime_dir();
        let log = match std::env::var_os(ENV_LOG) {
            Some(v) if v == "stderr" => rustix::io::dup(rustix::stdio::stderr()).ok(),
            Some(v) if !v.is_empty() => open_log(&PathBuf::from(v)),
            _ => None,
        }
        .map(crate::fds::lift);
        Settings { enabled, spin, spin_fixed, ring, max_region, dir, log }
    }
}

/// The verified `tcp` directory under the runtime directory.
pub fn runtime_dir() -> Result<RuntimeDir, String> {
    RuntimeDir::resolve(&ivcom::Options::new())
        .and_then(|d| d.subdir("tcp", DirAccess::Private))
        .map(|d| d.with_fd(crate::fds::lift))
        .map_err(|e| e.to_string())
}

/// Opens the decision log for appending: created 0600, never through a symbolic link, and
/// only a regular file of our own user (forks and exec'd programs append to the same file).
fn open_log(path: &std::path::Path) -> Option<OwnedFd> {
    check_log(path).ok()
}

/// Opens the decision log as the library does (created 0600, never through a symbolic link,
/// only a regular file of our own user), saying why a path cannot be it (for
/// `ivcom run --log`).
pub fn check_log(path: &std::path::Path) -> Result<OwnedFd, String> {
    use rustix::fs::{Mode, OFlags};
    let f = rustix::fs::open(
        path,
        OFlags::WRONLY
            | OFlags::APPEND
            | OFlags::CREATE
            | OFlags::CLOEXEC
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => {
            format!("{} is a symbolic link; the log is never written through one", path.display())
        }
        e => format!("cannot open {}: {e}", path.display()),
    })?;
    let st = rustix::fs::fstat(&f).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(format!("{} belongs to uid {}, not to this user", path.display(), st.st_uid));
    }
    Ok(f)
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// The settings (read on first use).
pub fn get() -> &'static Settings {
    SETTINGS.get_or_init(Settings::load)
}

/// Whether decisions are logged.
pub fn logging() -> bool {
    get().log.is_some()
}

/// Appends one line to the decision log, if there is one.
pub fn log(args: std::fmt::Arguments<'_>) {
    if let Some(fd) = &get().log {
        let line = format!("ivcom[{}]: {}\n", rustix::process::getpid().as_raw_nonzero(), args);
        let _ = rustix::io::write(fd.as_fd(), line.as_bytes());
    }
}

/// Logs a decision (formatting costs nothing when there is no log).
#[macro_export]
macro_rules! decision {
    ($($t:tt)*) => {
        if $crate::settings::logging() {
            $crate::settings::log(format_args!($($t)*));
        }
    };
}

/// Process-wide counters, logged at exit.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections this process carries over shared memory (either end).
    pub accelerated: AtomicU64,
    /// Connections that stayed on (or went back to) plain TCP although the peer was announced.
    pub fallbacks: AtomicU64,
    /// Bytes written into rings.
    pub ring_tx: AtomicU64,
    /// Bytes read from rings.
    pub ring_rx: AtomicU64,
    /// Wakeup bytes sent over TCP.
    pub doorbells: AtomicU64,
    /// Sleeps in the kernel while waiting on accelerated connections.
    pub sleeps: AtomicU64,
    /// Of those, sleeps cut short by the safety cap (several waiters, or waiting for space
    /// after the peer's FIN) that found nothing.
    pub capped: AtomicU64,
    /// Accelerated connections this process handed back to the kernel's TCP connection
    /// (each with its reason in the log), or followed the peer's handback of.
    pub handbacks: AtomicU64,
}

/// The counters.
pub static COUNTERS: Counters = Counters {
    accelerated: AtomicU64::new(0),
    fallbacks: AtomicU64::new(0),
    ring_tx: AtomicU64::new(0),
    ring_rx: AtomicU64::new(0),
    doorbells: AtomicU64::new(0),
    sleeps: AtomicU64::new(0),
    capped: AtomicU64::new(0),
    handbacks: AtomicU64::new(0),
};

/// Zeroes the counters (in a child after `fork`: it logs its own, not its parent's).
pub fn reset_counters() {
    let c = &COUNTERS;
    for a in [
        &c.accelerated,
        &c.fallbacks,
        &c.ring_tx,
        &c.ring_rx,
        &c.doorbells,
        &c.sleeps,
        &c.capped,
        &c.handbacks,
    ] {
        a.store(0, Ordering::Relaxed);
    }
}

/// Adds `n` to a counter.
#[inline]
pub fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Logs the counters (at exit).
pub fn log_counters() {
    let c = &COUNTERS;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    if g(&c.accelerated) + g(&c.fallbacks) + g(&c.ring_tx) + g(&c.ring_rx) == 0 {
        return;
    }
    decision!(
        "exit: accelerated={} fallbacks={} ring_tx={} ring_rx={} doorbells={} sleeps={} capped={} handbacks={}",
        g(&c.accelerated),
        g(&c.fallbacks),
        g(&c.ring_tx),
        g(&c.ring_rx),
        g(&c.doorbells),
        g(&c.sleeps),
        g(&c.capped),
        g(&c.handbacks)
    );
}
