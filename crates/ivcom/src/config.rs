//! Per-listener and per-connection settings, with their environment-variable overrides.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ivcom_ring::layout::{MAX_CAPACITY, MIN_CAPACITY};

use crate::rundir::DirAccess;

/// Environment variable naming the runtime directory where listeners live.
pub const ENV_RUNTIME_DIR: &str = "IVCOM_RUNTIME_DIR";
/// Environment variable with the polling budget in microseconds (0 = sleep at once).
pub const ENV_SPIN_US: &str = "IVCOM_SPIN_US";
/// Environment variable with the ring capacity in bytes (per direction).
pub const ENV_CAPACITY: &str = "IVCOM_CAPACITY";

/// Environment variable naming the socket of the VM agent to use instead of the runtime
/// directory (see [`Options::agent`]).
pub const ENV_AGENT: &str = "IVCOM_AGENT";

/// Default ring capacity per direction.
pub const DEFAULT_CAPACITY: usize = 1 << 20;
/// Default polling budget before sleeping. Waking a sleeping peer costs about 5-10 µs on
/// the hosts we measured (docs/performance.md); polling somewhat longer than that catches
/// replies of request-response peers and keeps streaming free of signals.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// Default polling budget of channels through a VM agent. Waking a sleeping peer there
/// takes a doorbell (an interrupt into the guest, then its agent's wakeup of the process):
/// about 5-20 µs on KVM and 100-300 µs under software emulation (docs/vm-harness.md). A
/// budget shorter than that lets a busy pair fall into alternating sleeps.
pub const DEFAULT_VM_SPIN: Duration = Duration::from_micros(500);
/// Default largest ring capacity per direction a listener accepts from a connector (unless
/// its own [`Options::capacity`] is larger): a connector chooses the region's size, and the
/// listener maps it, so this bounds the memory one connection can make a listener hold.
pub const DEFAULT_MAX_CAPACITY: usize = 4 << 20;
/// Default maximum message size of message channels.
pub const DEFAULT_MAX_MESSAGE: u32 = 64 * 1024;
/// Default time a handshake step may take before it is abandoned.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may connect to a listener (checked with the connecting process's credentials).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Access {
    /// Processes of the listener's effective uid (and root).
    #[default]
    SameUid,
    /// Processes whose effective gid is the given group, or of the same uid.
    Group(u32),
    /// Processes of any of these uids, or of the same uid.
    Uids(Vec<u32>),
    /// Anyone who can open the socket file (its mode still applies).
    Anyone,
}

impl Access {
    /// Whether a peer with `uid`/`gid` may connect to a listener running as `own_uid` (on a
    /// listener), or may serve a connector running as `own_uid` (on a connector).
    pub fn allows(&self, own_uid: u32, uid: u32, gid: u32) -> bool {
        if uid == own_uid || uid == 0 {
            return true;
        }
        match self {
            Access::SameUid => false,
            Access::Group(g) => *g == gid,
            Access::Uids(list) => list.contains(&uid),
            Access::Anyone => true,
        }
    }

    /// The socket-file mode that matches this policy.
    pub fn default_mode(&self) -> u32 {
        match self {
            Access::SameUid => 0o600,
            Access::Group(_) => 0o660,
            Access::Uids(_) | Access::Anyone => 0o666,
        }
    }
}

/// Settings for listeners and connections. Unset values come from the environment, then
/// from defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    runtime_dir: Option<PathBuf>,
    capacity: Option<usize>,
    spin: Option<Duration>,
    access: Access,
    mode: Option<u32>,
    handshake_timeout: Option<Duration>,
    max_message: Option<u32>,
    agent: Option<PathBuf>,
    dir_access: Option<DirAccess>,
    max_capacity: Option<usize>,
}

impl Options {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Directory where listeners' sockets live (default: `$IVCOM_RUNTIME_DIR`,
    /// `$XDG_RUNTIME_DIR/ivcom`, `/run/ivcom` for root, else `$TMPDIR/ivcom-UID`). It must be
    /// owned by this process's uid and closed to others (see [`crate::rundir::RuntimeDir`]).
    pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = Some(dir.into());
        self
    }

    /// Who besides its owner may use the runtime directory a listener binds in (default:
    /// [`DirAccess::Group`] of the group of [`Access::Group`], else [`DirAccess::Private`]).
    /// A directory is created with this access and refused if it is wider.
    pub fn dir_access(mut self, access: DirAccess) -> Self {
        self.dir_access = Some(access);
        self
    }

    /// The runtime directory's access chosen explicitly or implied by [`Options::access`].
    pub fn runtime_dir_access(&self) -> DirAccess {
        self.dir_access.unwrap_or(match self.access {
            Access::Group(g) => DirAccess::Group(g),
            _ => DirAccess::Private,
        })
    }

    /// Ring capacity per direction in bytes: a power of two from 4 KiB to 1 GiB. Set on the
    /// connecting side it is used as is; set on a listener it is offered to connectors that
    /// did not choose. Default 1 MiB (or `$IVCOM_CAPACITY`).
    pub fn capacity(mut self, bytes: usize) -> Self {
        self.capacity = Some(bytes);
        self
    }

    /// Largest ring capacity per direction, in bytes, a listener accepts from a connector
    /// (default: [`DEFAULT_MAX_CAPACITY`] or the listener's own [`Options::capacity`] if
    /// larger). A connector asking for more is refused (`REFUSE`, bad region) with an error
    /// naming the limit on both sides. Ignored on the connecting side.
    pub fn max_capacity(mut self, bytes: usize) -> Self {
        self.max_capacity = Some(bytes);
        self
    }

    /// The largest ring capacity a listener with these options accepts, validated against its
    /// own offered capacity.
    pub(crate) fn capacity_limit(&self) -> io::Result<u64> {
        let own = self.chosen_capacity()?;
        match self.max_capacity {
            Some(max) => {
                if max < MIN_CAPACITY as usize {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "maximum ring capacity {max} is below the smallest ring ({MIN_CAPACITY} bytes)"
                        ),
                    ));
                }
                if let Some(c) = own.filter(|&c| c > max) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("ring capacity {c} exceeds the maximum ring capacity {max} set for the same listener"),
                    ));
                }
                Ok(max as u64)
            }
            None => Ok(DEFAULT_MAX_CAPACITY.max(own.unwrap_or(0)) as u64),
        }
    }

    /// Polling budget before a wait sleeps (default 50 µs, 500 µs through a VM agent, or
    /// `$IVCOM_SPIN_US`); zero sleeps at once on every wait.
    pub fn spin(mut self, budget: Duration) -> Self {
        self.spin = Some(budget);
        self
    }

    /// Which peers a listener admits, and which a connector trusts (default: same uid; root
    /// is always admitted and trusted). A listener checks the connecting process's
    /// credentials; a connector checks the listening process's credentials and the owner of
    /// the runtime directory it connects through (a directory owned by an untrusted uid, or
    /// writable by others, is refused), so that only a listener of a trusted uid can receive
    /// what it sends.
    pub fn access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Mode of a listener's socket file (default follows [`Options::access`]).
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    /// How long a handshake step may take (default 10 s).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = Some(t);
        self
    }

    /// Largest message of a message channel (default 64 KiB); must fit the ring.
    pub fn max_message(mut self, bytes: u32) -> Self {
        self.max_message = Some(bytes);
        self
    }

    /// Reach listeners through the agent of a shared VM region at `socket` (`ivcom agent`)
    /// instead of the runtime directory: the peer may then be in another VM or on the host.
    /// Default: `$IVCOM_AGENT` if set. Channels through an agent are streams whose capacity the
    /// region fixes; access is whatever the region's membership allows.
    pub fn agent(mut self, socket: impl Into<PathBuf>) -> Self {
        self.agent = Some(socket.into());
        self
    }

    /// The agent socket chosen explicitly or by environment.
    pub(crate) fn agent_socket(&self) -> Option<PathBuf> {
        self.agent
            .clone()
            .or_else(|| std::env::var_os(ENV_AGENT).filter(|v| !v.is_empty()).map(PathBuf::from))
    }

    /// The capacity chosen explicitly or by environment, validated.
    pub(crate) fn chosen_capacity(&self) -> io::Result<Option<usize>> {
        let c = match self.capacity {
            Some(c) => Some(c),
            None => env_parse::<usize>(ENV_CAPACITY)?,
        };
        if let Some(c) = c {
            check_capacity(c)?;
        }
        Ok(c)
    }

    pub(crate) fn spin_budget(&self) -> io::Result<Duration> {
        self.spin_budget_or(DEFAULT_SPIN)
    }

    /// The polling budget chosen explicitly or by environment, else `default`.
    pub(crate) fn spin_budget_or(&self, default: Duration) -> io::Result<Duration> {
        Ok(match self.spin {
            Some(s) => s,
            None => env_parse::<u64>(ENV_SPIN_US)?.map(Duration::from_micros).unwrap_or(default),
        })
    }

    pub(crate) fn access_policy(&self) -> &Access {
        &self.access
    }

    pub(crate) fn socket_file_mode(&self) -> u32 {
        self.mode.unwrap_or_else(|| self.access.default_mode())
    }

    pub(crate) fn handshake(&self) -> Duration {
        self.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT)
    }

    pub(crate) fn max_message_size(&self) -> u32 {
        self.max_message.unwrap_or(DEFAULT_MAX_MESSAGE)
    }

    /// The runtime directory these options resolve to.
    pub fn resolved_runtime_dir(&self) -> PathBuf {
        if let Some(d) = &self.runtime_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os(ENV_RUNTIME_DIR).filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return Path::new(&d).join("ivcom");
        }
        let uid = crate::sys::euid();
        if uid == 0 {
            PathBuf::from("/run/ivcom")
        } else {
            std::env::temp_dir().join(format!("ivcom-{uid}"))
        }
    }
}

/// Checks a ring capacity.
pub(crate) fn check_capacity(c: usize) -> io::Result<()> {
    let c64 = c as u64;
    if !c64.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&c64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ring capacity {c} must be a power of two from {MIN_CAPACITY} to {MAX_CAPACITY} bytes"),
        ));
    }
    Ok(())
}

fn env_parse<T: std::str::FromStr>(var: &str) -> io::Result<Option<T>> {
    match std::env::var(var) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{var}={v:?} is not a valid number"))
        }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{var} is not valid UTF-8")))
        }
    }
}

/// Checks a listener name: 1 to 64 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid listener name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "bench-1", "x.y_z", &"n".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"n".repeat(65), "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capacities() {
        assert!(check_capacity(4096).is_ok());
        assert!(check_capacity(1 << 30).is_ok());
        for bad in [0, 4095, 4097, 6000, 1 << 31] {
            assert!(check_capacity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn access_policy() {
        assert!(Access::SameUid.allows(1000, 1000, 5));
        assert!(!Access::SameUid.allows(1000, 1001, 5));
        assert!(Access::Group(5).allows(1000, 1001, 5));
        assert!(!Access::Group(5).allows(1000, 1001, 6));
        assert!(Access::Uids(vec![7, 8]).allows(1000, 8, 0));
        assert!(!Access::Uids(vec![7, 8]).allows(1000, 9, 0));
        assert!(Access::Anyone.allows(1000, 9, 0));
    }
}
