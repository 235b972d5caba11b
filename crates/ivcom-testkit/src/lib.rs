//! Test-only helpers for the security tests and the tests of real programs (never linked into
//! a shipped binary).
//!
//! The security tests act out attacks as another local user would: they need root to create
//! two unprivileged users ([`users`]) (the attackers make their own user and network namespaces
//! with `unshare`), and they bound every child process they start ([`run_bounded`],
//! [`Bounded`]), ending only those, by PID. Run
//! without root, [`users`] returns `None` and the tests print a note and pass without
//! asserting anything (the README's test command runs them as root in CI).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Names of the two unprivileged users the tests create (or reuse): a victim and an attacker.
pub const USER_NAMES: [&str; 2] = ["ivcomsec-victim", "ivcomsec-attacker"];

/// An unprivileged local user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

fn lookup(name: &str) -> Option<User> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = line.trim().split(':').collect();
    Some(User { name: name.to_owned(), uid: f.get(2)?.parse().ok()?, gid: f.get(3)?.parse().ok()? })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The victim and the attacker, created with `useradd` if they do not exist; `None` (with a
/// note on stderr naming `test`) when not running as root.
pub fn users(test: &str) -> Option<(User, User)> {
    if !is_root() {
        eprintln!("note: {test} needs root (it creates unprivileged users); skipped");
        return None;
    }
    let [a, b] = USER_NAMES.map(ensure_user);
    Some((a, b))
}

/// Name of the unprivileged user that real servers run as in the tests when the tests run as
/// root (PostgreSQL refuses root; nginx and memcached would switch their workers to a user of
/// their own).
pub const SERVICE_USER: &str = "ivcomtest-svc";

/// The user real servers (and their clients) run as: [`SERVICE_USER`], created if needed, when
/// running as root; `None` otherwise (they run as the user running the tests).
pub fn service_user() -> Option<User> {
    is_root().then(|| ensure_user(SERVICE_USER))
}

/// The system user `name`, created with `useradd` (no home, no login) if it does not exist.
/// Needs root.
fn ensure_user(name: &str) -> User {
    // useradd locks /etc/passwd: tests of one process create the users one at a time.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    if lookup(name).is_none() {
        let st = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name])
            .status()
            .expect("run useradd");
        // Another test process may have created it at the same moment.
        assert!(st.success() || lookup(name).is_some(), "useradd {name} failed");
    }
    lookup(name).unwrap_or_else(|| panic!("user {name} missing after useradd"))
}

impl User {
    /// A command that runs `program` as this user (no supplementary groups), with an
    /// environment holding only `PATH`, `HOME=/` and `TMPDIR=/tmp`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
            .env("HOME", "/")
            .env("TMPDIR", "/tmp")
            .uid(self.uid)
            .gid(self.gid);
        c
    }
}

/// A fresh scratch directory `/tmp/ivcomsec-<name>-<pid>`, mode 0755 (every user can reach
/// what is below it), removed when dropped.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates it (replacing a leftover of the same name).
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ivcomsec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch directory");
        chmod(&p, 0o755);
        Scratch(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A subdirectory owned by `user` with `mode`.
    pub fn dir_for(&self, sub: &str, user: &User, mode: u32) -> PathBuf {
        let p = self.0.join(sub);
        std::fs::create_dir_all(&p).expect("create directory");
        chown(&p, user.uid, user.gid);
        chmod(&p, mode);
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `chmod` that panics with the path on failure.
pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// `chown` (not following a final symlink) that panics with the path on failure.
pub fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

/// A child process that is killed (by its PID, with its process group) if still running when
/// dropped.
#[derive(Debug)]
pub struct Bounded(pub Child);

impl Bounded {
    /// Starts `cmd` in a process group of its own, stdout and stderr piped.
    pub fn spawn(cmd: &mut Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        Bounded(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    /// Waits at most `limit`; kills it when it overstays. Returns its output and whether it
    /// exited by itself in time.
    pub fn finish(mut self, limit: Duration) -> (Output, bool) {
        let deadline = Instant::now() + limit;
        let mut in_time = true;
        loop {
            match self.0.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    in_time = false;
                    self.kill();
                    break;
                }
            }
        }
        let status = self.0.wait().expect("wait for child");
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut o) = self.0.stdout.take() {
            let _ = o.read_to_end(&mut stdout);
        }
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_end(&mut stderr);
        }
        (Output { status, stdout, stderr }, in_time)
    }

    fn kill(&mut self) {
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: signalling the process group of a child we started (its pgid is its pid).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.0.kill();
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` to completion within `limit` (killing it if it overstays); returns its output
/// and whether it finished in time.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (Output, bool) {
    Bounded::spawn(cmd).finish(limit)
}

/// Replaying fuzz corpora in the normal test suite: the seeds of `fuzz/corpus/<target>/`, and
/// a fixed-seed generator for random inputs and mutations of the seeds (so failures
/// reproduce).
pub mod fuzz {
    use std::path::{Path, PathBuf};

    /// The seed files of `fuzz/corpus/<target>/`, sorted by name, with their bytes.
    pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = corpus_dir(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                (p, b)
            })
            .collect()
    }

    /// `fuzz/corpus/<target>` of the workspace.
    pub fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
    }

    /// The seeds of one target: (file name, bytes).
    pub type Seeds<'a> = Vec<(&'a str, Vec<u8>)>;
    /// Seeds of each target, as a generator makes them: (target, seeds).
    pub type Generated<'a> = [(&'a str, Seeds<'a>)];

    /// Asserts that the committed seeds are exactly what the generators make (so they stay in
    /// step with the input format).
    pub fn assert_seeds_current(generated: &Generated<'_>) {
        for (target, seeds) in generated {
            for (name, data) in seeds {
                let path = corpus_dir(target).join(name);
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(on_disk == *data, "{} is stale: run regenerate_seed_corpus", path.display());
            }
        }
    }

    /// Writes the generated seeds into `fuzz/corpus/<target>/`.
    pub fn write_seeds(generated: &Generated<'_>) {
        for (target, seeds) in generated {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for (name, data) in seeds {
                std::fs::write(dir.join(name), data).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            }
        }
    }

    /// xorshift64*: a fixed-seed generator.
    #[derive(Debug, Clone)]
    pub struct Rng(pub u64);

    impl Rng {
        /// The next 64 random bits.
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A number in `0..n` (`n` > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        /// `n` random bytes.
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }

    /// A few random edits of `seed`: byte flips, bytes set to or inserted from `alphabet`,
    /// deletions.
    pub fn mutate(rng: &mut Rng, seed: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + rng.below(6) {
            let at = if v.is_empty() { 0 } else { rng.below(v.len()) };
            match rng.below(4) {
                0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
                1 if !v.is_empty() => v[at] = alphabet[rng.below(alphabet.len())],
                2 => v.insert(at, alphabet[rng.below(alphabet.len())]),
                _ if !v.is_empty() => {
                    v.remove(at);
                }
                _ => {}
            }
        }
        v
    }
}
