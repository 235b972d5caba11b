//! Runtime directories that only their owner controls.
//!
//! A [`RuntimeDir`] is a directory opened once (`O_DIRECTORY | O_NOFOLLOW`) and verified
//! through that descriptor: it is a directory, its owner is this process's effective uid, and
//! nobody else may write in it (nor, unless a group is configured, look into it). Every entry
//! below it is then reached relative to the descriptor (`openat`, `fstatat`, `unlinkat`,
//! `renameat`, `fchownat`, and Unix socket addresses of the form `/proc/self/fd/N/NAME`), so
//! renaming or replacing the directory's path after it was opened cannot redirect anything.
//!
//! A directory another user created, one with a too-wide mode, or a symbolic link is refused
//! with an error that names the path, its owner and its mode, and says what to do (a
//! [`DirRefusal`] inside the [`io::Error`]).
//!
//! The library's runtime directory is opened with [`RuntimeDir::open`]. A service's own
//! socket directory (the VM daemon's, an agent's) is opened with [`RuntimeDir::open_service`],
//! which also checks every directory on the way to it and says what happens to one that
//! already exists ([`Existing`]); [`RuntimeDir::listen_unix`] binds a listening socket in it
//! with its owner and mode set before it listens.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, Stat, Uid};
use rustix::io::Errno;
use rustix::net::{SocketFlags, SocketType};

pub use crate::sys::DirLock;

/// Who besides the owner may use a runtime directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirAccess {
    /// Only the owner: mode 0700.
    #[default]
    Private,
    /// Members of the group with this gid may look up and list entries (to connect to a
    /// listener whose socket mode lets them): mode 0750, the directory's group set to the gid.
    /// Only the owner may create, rename or remove entries.
    Group(u32),
    /// Everyone may pass through the directory to an entry whose name they know (to connect
    /// to a socket whose mode lets them), but not list it: mode 0711. Only the owner may
    /// create, rename or remove entries. For an agent socket that admits other uids.
    Traverse,
}

impl DirAccess {
    /// The mode a directory with this access is created with.
    pub fn mode(self) -> u32 {
        match self {
            DirAccess::Private => 0o700,
            DirAccess::Group(_) => 0o750,
            DirAccess::Traverse => 0o711,
        }
    }

    /// The group a directory with this access belongs to, if one is configured.
    pub fn group(self) -> Option<u32> {
        match self {
            DirAccess::Private | DirAccess::Traverse => None,
            DirAccess::Group(g) => Some(g),
        }
    }
}

/// What [`RuntimeDir::open_service`] and [`RuntimeDir::subdir_with`] do with a directory
/// that already exists (one they create always gets exactly the access's mode and group).
/// In every case it must be a directory owned by the effective uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refused if group or others can write it (or, for [`DirAccess::Group`], a group other
    /// than the configured one may look into it); read and search permission beyond what the
    /// [`DirAccess`] allows is taken away (`fchmod` through the opened descriptor: nobody else
    /// could write in it, so nothing in it is theirs). As [`RuntimeDir::open`] does.
    Verify,
    /// Refused if group or others can write it; otherwise given exactly the access's mode and
    /// group. For a directory this program alone uses (the VM daemon's socket directories).
    Enforce,
    /// Refused if group or others can write it; otherwise left as it is. For a directory
    /// shared with other programs of the same user (an agent's socket in a runtime
    /// directory).
    Keep,
}

/// Why a directory was refused: its path, owner, group, mode and what is wrong. The
/// constructors of [`RuntimeDir`] return it inside an [`io::Error`] of kind
/// `PermissionDenied`, whose message is this one; [`DirRefusal::of`] gets it back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing runtime directory {} (owner uid {uid}, group gid {gid}, mode {mode:04o}): {why}", .path.display())]
pub struct DirRefusal {
    /// The directory (or the entry in its place, or a directory on the way to it).
    pub path: PathBuf,
    /// Its owner's uid.
    pub uid: u32,
    /// Its group's gid.
    pub gid: u32,
    /// Its permission bits with the set-id and sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// What is wrong, and what to do.
    pub why: String,
}

impl DirRefusal {
    /// The refusal carried by `e`, if `e` is one.
    pub fn of(e: &io::Error) -> Option<&DirRefusal> {
        e.get_ref()?.downcast_ref()
    }
}

/// How [`RuntimeDir::listen_unix`] makes a listening Unix socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketSpec {
    /// `SocketType::STREAM` or `SocketType::SEQPACKET`.
    pub kind: SocketType,
    /// Whether the listening socket is non-blocking.
    pub nonblocking: bool,
    /// Owner to give the socket file (`None`: ours).
    pub uid: Option<u32>,
    /// Group to give the socket file (`None`: ours).
    pub gid: Option<u32>,
    /// Permission bits of the socket file (connecting needs write permission on it).
    pub mode: u32,
    /// `listen` backlog.
    pub backlog: i32,
}

/// A verified runtime directory, held open.
#[derive(Debug)]
pub struct RuntimeDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl RuntimeDir {
    /// The same directory through the descriptor `f` makes of this one's (for a caller that
    /// keeps its own descriptors at numbers of its choosing, such as the preload library;
    /// `f` must return a descriptor of the same open directory).
    pub fn with_fd(self, f: impl FnOnce(OwnedFd) -> OwnedFd) -> Self {
        RuntimeDir { fd: f(self.fd), path: self.path }
    }
}

/// Flags of every open of a runtime directory: a real directory, never through a final
/// symlink. `O_RDONLY` rather than `O_PATH` so that `flock` and `fchmod` work on it.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn ctx(e: impl Into<io::Error>, what: impl FnOnce() -> String) -> io::Error {
    let e = e.into();
    io::Error::new(e.kind(), format!("{}: {e}", what()))
}

/// A single entry name: not empty, no `/`, not `.` or `..`, no NUL.
fn check_entry(name: &str) -> io::Result<()> {
    let mut c = Path::new(name).components();
    match (c.next(), c.next()) {
        (Some(Component::Normal(_)), None) if !name.contains('/') && !name.contains('\0') => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single directory entry name"),
        )),
    }
}

impl RuntimeDir {
    /// Opens `path` (creating it, and missing parents, with the access's mode and group) and
    /// verifies it through the opened descriptor: `fstat` says directory, owner == effective
    /// uid, no write permission for group/others, and for `Private` no read/search for
    /// group/others (for `Group(g)`: group `g` when the group has any permission, `r-x` for the
    /// group at most, nothing for others; for `Traverse`: search (`x`) at most for group and
    /// others). Read or search permission beyond that on a directory of ours that nobody else
    /// can write (a `mkdir -p` with the usual umask gives 0755) is taken away, not refused.
    /// A symlink at the last component is refused (`O_NOFOLLOW`).
    ///
    /// Errors: `PermissionDenied` (or the OS error's kind) with a message naming the path, its
    /// owner uid and its mode, and what to do (a [`DirRefusal`]).
    pub fn open(path: &Path, access: DirAccess) -> io::Result<Self> {
        let fd = open_dir(path, access, Existing::Verify, false)?;
        Ok(RuntimeDir { fd, path: path.to_path_buf() })
    }

    /// Opens a service's own directory (the VM daemon's socket directory, an agent's): like
    /// [`RuntimeDir::open`], and also every directory on the way to it, from `/` down, must be
    /// owned by root or the effective uid and writable by nobody else unless it is sticky
    /// (`/tmp`), or another user could replace what is below it. Symlinks on the way are
    /// followed (`/var/run`) and the directory they reach is checked; one at the last
    /// component is refused. Missing components are created with the access's mode and group;
    /// an existing last component is treated as `existing` says. A relative `path` is taken
    /// from the current directory; [`RuntimeDir::path`] is then the absolute path.
    ///
    /// Errors: `PermissionDenied` with a [`DirRefusal`] naming the directory at fault (the
    /// last component or one on the way), its owner, group and mode; the OS error's kind,
    /// with the path, when a call fails.
    pub fn open_service(path: &Path, access: DirAccess, existing: Existing) -> io::Result<Self> {
        let path = std::path::absolute(path)
            .map_err(|e| ctx(e, || format!("cannot make {} absolute", path.display())))?;
        let fd = open_dir(&path, access, existing, true)?;
        Ok(RuntimeDir { fd, path })
    }

    /// The runtime directory of `opts` (explicit, `$IVCOM_RUNTIME_DIR`,
    /// `$XDG_RUNTIME_DIR/ivcom`, `/run/ivcom` for root, else `$TMPDIR/ivcom-UID`), opened and
    /// verified as by [`RuntimeDir::open`] with the access of [`crate::Options::dir_access`].
    /// The per-user fallback gets the same checks: one someone else created is refused, never
    /// silently used.
    pub fn resolve(opts: &crate::Options) -> io::Result<Self> {
        Self::open(&opts.resolved_runtime_dir(), opts.runtime_dir_access())
    }

    /// Opens an existing runtime directory to reach listeners in it, without creating
    /// anything. Its owner must be this process's effective uid, root, or one that
    /// `trusted(owner uid, directory gid)` accepts (the owner could plant any socket in it; a
    /// non-root owner can only give it a group it belongs to); nobody but the owner may write
    /// in it.
    /// A symlink at the last component is refused.
    ///
    /// Errors: `NotFound` when it does not exist; `PermissionDenied` naming the path, owner and
    /// mode otherwise.
    pub fn open_existing(path: &Path, trusted: impl Fn(u32, u32) -> bool) -> io::Result<Self> {
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty())
            .map_err(|e| open_error(rustix::fs::CWD, path.as_os_str(), path, e))?;
        let dir = RuntimeDir { fd, path: path.to_path_buf() };
        let st = dir.fstat()?;
        check_is_dir(path, &st)?;
        let own = euid();
        if st.st_uid != own && st.st_uid != 0 && !trusted(st.st_uid, st.st_gid) {
            return Err(refusal(
                path,
                &st,
                &format!(
                    "it is owned by uid {} whom this process (uid {own}) does not trust: whoever owns \
                     the directory can put any listener in it; use a directory of yours or root's, or \
                     allow that uid (Options::access on the connecting side)",
                    st.st_uid
                ),
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(refusal(
                path,
                &st,
                "others than its owner may write in it (anyone who can could plant a listener); \
                 the owner should `chmod go-w` it",
            ));
        }
        Ok(dir)
    }

    /// The path the directory was opened at (for messages; every use goes through the
    /// descriptor).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A subdirectory (`mkdirat` + `openat` with `O_NOFOLLOW`), created and verified like
    /// [`RuntimeDir::open`].
    pub fn subdir(&self, name: &str, access: DirAccess) -> io::Result<RuntimeDir> {
        self.subdir_with(name, access, Existing::Verify)
    }

    /// A subdirectory, created with the access's mode and group, an existing one treated as
    /// `existing` says (see [`RuntimeDir::open_service`]). Errors as [`RuntimeDir::open`];
    /// `InvalidInput` if `name` is not a single entry name.
    pub fn subdir_with(&self, name: &str, access: DirAccess, existing: Existing) -> io::Result<RuntimeDir> {
        check_entry(name)?;
        let path = self.path.join(name);
        let fd = open_child(self.fd.as_fd(), OsStr::new(name), &path, access, existing)?;
        Ok(RuntimeDir { fd, path })
    }

    /// The address to bind or connect a Unix socket named `name` in this directory through the
    /// descriptor (`/proc/self/fd/N/NAME`), so that renaming or replacing the path after
    /// [`RuntimeDir::open`] cannot redirect it. Errors (`InvalidInput`) if `name` is not a
    /// single entry or the address is longer than `sun_path` allows (107 bytes).
    pub fn unix_addr(&self, name: &str) -> io::Result<rustix::net::SocketAddrUnix> {
        check_entry(name)?;
        let addr = format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd());
        rustix::net::SocketAddrUnix::new(addr.as_str()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket address {addr} (for {}) is unusable: {e}", self.path.join(name).display()),
            )
        })
    }

    /// Exclusive lock on the directory: `flock(LOCK_EX | LOCK_NB)` on a fresh open of it,
    /// retried until `timeout`, then `TimedOut` naming the directory. Released when the guard
    /// drops. Serialises ivcom processes (and threads) that check and replace entries.
    pub fn lock(&self, timeout: Duration) -> io::Result<DirLock> {
        let fd = rustix::fs::openat(&self.fd, ".", dir_flags(), Mode::empty())
            .map_err(|e| ctx(e, || format!("cannot reopen runtime directory {}", self.path.display())))?;
        DirLock::acquire_fd(fd, timeout, &self.path)
    }

    /// Exclusive lock on the lock file `name` in the directory (created 0600 if missing;
    /// opened `O_NOFOLLOW | O_NONBLOCK` and required to be a regular file, so that neither a
    /// symlink nor a FIFO planted there is followed or blocks): `flock(LOCK_EX | LOCK_NB)`
    /// retried until `timeout` (`Duration::ZERO`: tried once). Released when the guard drops.
    /// Unlike [`RuntimeDir::lock`] it can be held for a whole run without keeping other users
    /// of the directory out.
    ///
    /// Errors: `TimedOut` when another process held it all along; `InvalidData` when the entry
    /// is not a regular file; the OS error's kind, naming the file, otherwise.
    pub fn lock_file(&self, name: &str, timeout: Duration) -> io::Result<DirLock> {
        let path = self.path.join(name);
        let fd = self.open_file(
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NONBLOCK,
            Mode::from_raw_mode(0o600),
        )?;
        let st = rustix::fs::fstat(&fd).map_err(|e| ctx(e, || format!("cannot stat {}", path.display())))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lock file {} is not a regular file", path.display()),
            ));
        }
        DirLock::acquire_fd(fd, timeout, &path)
    }

    /// `openat` relative to the directory, with `O_NOFOLLOW | O_CLOEXEC` added.
    pub fn open_file(&self, name: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        check_entry(name)?;
        rustix::fs::openat(&self.fd, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode)
            .map_err(|e| ctx(e, || format!("cannot open {}", self.path.join(name).display())))
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of an entry.
    pub fn stat(&self, name: &str) -> io::Result<Stat> {
        check_entry(name)?;
        Ok(rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// `unlinkat` of an entry (not a directory).
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        check_entry(name)?;
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Removes entry `name` if it is still the file with (device, inode) `id` (as
    /// [`RuntimeDir::listen_unix`] returns it), not one that replaced it since. Returns
    /// whether it removed it; a missing entry is `Ok(false)`.
    pub fn unlink_if(&self, name: &str, id: (u64, u64)) -> io::Result<bool> {
        match self.stat(name) {
            Ok(st) if file_id(&st) == id => {
                self.unlink(name)?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `unlinkat(AT_REMOVEDIR)` of a subdirectory; the OS refuses (`DirectoryNotEmpty`) one
    /// that is not empty.
    pub fn remove_dir(&self, name: &str) -> io::Result<()> {
        check_entry(name)?;
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
    }

    /// `renameat` of an entry to another name in the same directory (replacing it).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_entry(from)?;
        check_entry(to)?;
        Ok(rustix::fs::renameat(&self.fd, from, &self.fd, to)?)
    }

    /// Sets the permission bits of an entry, never through a symlink: the entry is opened with
    /// `O_PATH | O_NOFOLLOW`, checked not to be a link, and changed through that descriptor
    /// (`/proc/self/fd/N`), so swapping the name for a link meanwhile cannot redirect it.
    /// Errors: `InvalidInput` when the entry is a symlink.
    pub fn chmod(&self, name: &str, mode: u32) -> io::Result<()> {
        check_entry(name)?;
        let what = || format!("cannot change the mode of {}", self.path.join(name).display());
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ctx(e, what))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| ctx(e, what))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: it is a symbolic link", what()),
            ));
        }
        let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
        rustix::fs::chmod(via.as_str(), Mode::from_raw_mode(mode & 0o7777)).map_err(|e| ctx(e, what))
    }

    /// Gives an entry owner `uid` and/or group `gid` (`fchownat(AT_SYMLINK_NOFOLLOW)`: a
    /// symlink itself, never its target). Changing the owner needs `CAP_CHOWN`; the group, a
    /// group the caller is in.
    pub fn chown(&self, name: &str, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        check_entry(name)?;
        rustix::fs::chownat(
            &self.fd,
            name,
            uid.map(Uid::from_raw),
            gid.map(Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ctx(e, || format!("cannot change the owner of {}", self.path.join(name).display())))
    }

    /// Binds a listening Unix socket `name` in the directory (through its descriptor, as
    /// [`RuntimeDir::unix_addr`]): bound at a temporary name (`.ivcom-bind.PID.N`), given the
    /// owner, group and mode of `spec`, listening, and only then moved to `name`
    /// (`renameat2(RENAME_NOREPLACE)`), so nobody ever finds `name` with other permissions or
    /// not yet listening. A socket file already at `name` is replaced if nobody listens on it
    /// (a connect is refused; the probe never blocks), never a live listener's, never
    /// anything that is not a socket. Returns the listening socket (close-on-exec) and the
    /// socket file's (device, inode), for [`RuntimeDir::unlink_if`]. Nobody else may write in
    /// the directory, so no entry can be swapped between these calls; callers that share the
    /// directory with other processes of theirs serialise with [`RuntimeDir::lock`].
    ///
    /// Errors: `AddrInUse` when a live listener answers at `name` (or a socket appeared there
    /// meanwhile); `AlreadyExists` when something that is not a socket is there; otherwise the
    /// OS error's kind with the path (the temporary file is removed again).
    pub fn listen_unix(&self, name: &str, spec: &SocketSpec) -> io::Result<(OwnedFd, (u64, u64))> {
        let addr = self.unix_addr(name)?;
        let path = self.path.join(name);
        let mut flags = SocketFlags::CLOEXEC;
        if spec.nonblocking {
            flags |= SocketFlags::NONBLOCK;
        }
        let socket = |flags| {
            rustix::net::socket_with(rustix::net::AddressFamily::UNIX, spec.kind, flags, None)
                .map_err(|e| ctx(e, || format!("cannot create a socket for {}", path.display())))
        };
        let in_use = || {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use: a live listener answers there", path.display()),
            )
        };
        match self.stat(name) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Socket => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket; refusing to replace it", path.display()),
                ))
            }
            Ok(_) => {
                let probe = socket(SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)?;
                match rustix::net::connect(&probe, &addr) {
                    // A listener answered, or its backlog is full (it exists).
                    Ok(()) | Err(Errno::AGAIN | Errno::INPROGRESS) => return Err(in_use()),
                    Err(Errno::CONNREFUSED) => {
                        tracing::info!("ivcom: replacing stale socket file {}", path.display());
                        match self.unlink(name) {
                            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                                return Err(ctx(e, || {
                                    format!("cannot remove stale socket {}", path.display())
                                }))
                            }
                            _ => {}
                        }
                    }
                    Err(Errno::NOENT) => {}
                    Err(e) => {
                        return Err(ctx(e, || format!("cannot probe the socket at {}", path.display())))
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e, || format!("cannot inspect {}", path.display()))),
        }
        // Bound at a temporary name, made ready there and only then moved to `name` (never
        // over an entry that appeared meanwhile), so nobody ever sees `name` with another
        // owner or mode, or not listening yet.
        static BINDS: AtomicU64 = AtomicU64::new(0);
        let tmp = format!(".ivcom-bind.{}.{}", std::process::id(), BINDS.fetch_add(1, Ordering::Relaxed));
        let fd = socket(flags)?;
        rustix::net::bind(&fd, &self.unix_addr(&tmp)?)
            .map_err(|e| ctx(e, || format!("cannot bind {}", self.path.join(&tmp).display())))?;
        let id = file_id(&self.stat(&tmp).map_err(|e| ctx(e, || format!("cannot stat {}", path.display())))?);
        let ready = (|| {
            if spec.uid.is_some() || spec.gid.is_some() {
                self.chown(&tmp, spec.uid, spec.gid)?;
            }
            self.chmod(&tmp, spec.mode)?;
            rustix::net::listen(&fd, spec.backlog)
                .map_err(|e| ctx(e, || format!("cannot listen on {}", path.display())))?;
            self.rename_new(&tmp, name).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => in_use(),
                _ => ctx(e, || format!("cannot move the new socket to {}", path.display())),
            })
        })();
        if let Err(e) = ready {
            let _ = self.unlink_if(&tmp, id);
            return Err(e);
        }
        Ok((fd, id))
    }

    /// `renameat2(RENAME_NOREPLACE)` of an entry to a name that must not exist (`AlreadyExists`
    /// if it does). Where the file system lacks `RENAME_NOREPLACE`, a plain `renameat` after
    /// checking that `to` is absent.
    fn rename_new(&self, from: &str, to: &str) -> io::Result<()> {
        check_entry(from)?;
        check_entry(to)?;
        match rustix::fs::renameat_with(&self.fd, from, &self.fd, to, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(Errno::INVAL) => match self.stat(to) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.rename(from, to),
                Err(e) => Err(e),
                Ok(_) => Err(io::ErrorKind::AlreadyExists.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn fstat(&self) -> io::Result<Stat> {
        rustix::fs::fstat(&self.fd).map_err(|e| ctx(e, || format!("cannot stat {}", self.path.display())))
    }
}

/// The (device, inode) pair that identifies a file, from its `stat`.
// The fields' widths differ between targets; on some the casts are no-ops.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn file_id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// Gives a directory its access's exact mode (`mkdir` applies the umask) and group.
fn set_access(fd: BorrowedFd<'_>, path: &Path, access: DirAccess) -> io::Result<()> {
    if let Some(g) = access.group() {
        rustix::fs::fchown(fd, None, Some(Gid::from_raw(g))).map_err(|e| {
            ctx(e, || {
                format!("cannot give runtime directory {} to group {g} (are you a member?)", path.display())
            })
        })?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(access.mode()))
        .map_err(|e| ctx(e, || format!("cannot set the mode of runtime directory {}", path.display())))
}

/// Opens directory `path`, creating missing components with the access's mode and group,
/// and checks its last component through the descriptor ([`settle`]). With `ancestors`, the
/// path is walked from the root and each directory on the way is checked
/// ([`check_ancestor`]); without, an existing directory is opened in one call.
fn open_dir(path: &Path, access: DirAccess, existing: Existing, ancestors: bool) -> io::Result<OwnedFd> {
    if !ancestors {
        match rustix::fs::open(path, dir_flags(), Mode::empty()) {
            Ok(fd) => {
                settle(fd.as_fd(), path, access, existing, false)?;
                return Ok(fd);
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(open_error(rustix::fs::CWD, path.as_os_str(), path, e)),
        }
    }
    let mut names: Vec<&OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::ParentDir => names.push(OsStr::new("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let Some((last, on_the_way)) = names.split_last() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot be a runtime directory", path.display()),
        ));
    };
    let (start, mut at) = if path.is_absolute() { ("/", PathBuf::from("/")) } else { (".", PathBuf::new()) };
    let walk = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut cur = rustix::fs::open(start, walk, Mode::empty())
        .map_err(|e| ctx(e, || format!("cannot open {start} on the way to {}", path.display())))?;
    for name in on_the_way {
        at.push(name);
        // Symlinks on the way are followed (`/var/run`); the directory reached is checked.
        let next = match rustix::fs::openat(&cur, *name, walk, Mode::empty()) {
            Ok(fd) => fd,
            // Ours, new: created with the access, checked as `Keep` (a racing creator's is
            // refused).
            Err(Errno::NOENT) => open_child(cur.as_fd(), name, &at, access, Existing::Keep)?,
            Err(e) => return Err(open_error(cur.as_fd(), name, &at, e)),
        };
        if ancestors {
            let st =
                rustix::fs::fstat(&next).map_err(|e| ctx(e, || format!("cannot stat {}", at.display())))?;
            check_ancestor(&at, &st)?;
        }
        cur = next;
    }
    at.push(last);
    open_child(cur.as_fd(), last, &at, access, existing)
}

/// Opens directory `name` in `parent` without following a symlink, creating it with the
/// access's mode and group if missing, and settles it ([`settle`]). `path` names it.
fn open_child(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    path: &Path,
    access: DirAccess,
    existing: Existing,
) -> io::Result<OwnedFd> {
    let (fd, created) = match rustix::fs::openat(parent, name, dir_flags(), Mode::empty()) {
        Ok(fd) => (fd, false),
        Err(Errno::NOENT) => {
            let created = match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(access.mode())) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(ctx(e, || format!("cannot create directory {}", path.display()))),
            };
            let fd = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())
                .map_err(|e| open_error(parent, name, path, e))?;
            (fd, created)
        }
        Err(e) => return Err(open_error(parent, name, path, e)),
    };
    settle(fd.as_fd(), path, access, existing, created)?;
    Ok(fd)
}

/// Checks a directory just opened at `path`: a directory, ours; one we `created` gets the
/// access's mode and group, an existing one is treated as `existing` says.
fn settle(
    fd: BorrowedFd<'_>,
    path: &Path,
    access: DirAccess,
    existing: Existing,
    created: bool,
) -> io::Result<()> {
    let st = rustix::fs::fstat(fd).map_err(|e| ctx(e, || format!("cannot stat {}", path.display())))?;
    check_is_dir(path, &st)?;
    let own = euid();
    if st.st_uid != own {
        let why = match existing {
            Existing::Verify => format!(
                "ivcom needs a runtime directory owned by this process's uid {own}, as whoever owns it \
                 controls every name in it; remove it (if you trust it was left by mistake) or set \
                 IVCOM_RUNTIME_DIR or XDG_RUNTIME_DIR to a directory of yours"
            ),
            Existing::Enforce | Existing::Keep => format!(
                "it must be owned by this process's uid {own}, as whoever owns it controls every name \
                 in it; remove it (if you trust it was left by mistake) or choose a directory of yours"
            ),
        };
        return Err(refusal(path, &st, &why));
    }
    if created {
        return set_access(fd, path, access);
    }
    let unwritable = || {
        if st.st_mode & 0o022 != 0 {
            return Err(refusal(path, &st, "group or others can write it; `chmod go-w` it"));
        }
        Ok(())
    };
    match existing {
        Existing::Verify => {
            unwritable()?;
            narrow(fd, path, &st, access)
        }
        Existing::Keep => unwritable(),
        Existing::Enforce => {
            unwritable()?;
            set_access(fd, path, access)
        }
    }
}

/// Takes away read and search permission that `access` does not give (the directory is ours
/// and nobody else can write it), then checks the result.
fn narrow(fd: BorrowedFd<'_>, path: &Path, st: &Stat, access: DirAccess) -> io::Result<()> {
    let allowed = access.mode();
    let mode = st.st_mode & 0o7777;
    if let DirAccess::Group(g) = access {
        if mode & 0o070 & allowed != 0 && st.st_gid != g {
            return check_mode(path, st, access);
        }
    }
    if mode & !allowed != 0 {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & allowed)).map_err(|e| {
            ctx(e, || {
                format!("cannot narrow runtime directory {} to mode {:04o}", path.display(), mode & allowed)
            })
        })?;
        tracing::info!(
            "ivcom: runtime directory {} narrowed from mode {mode:04o} to {:04o}",
            path.display(),
            mode & allowed
        );
    }
    check_mode(path, &rustix::fs::fstat(fd)?, access)
}

/// The mode checks of [`RuntimeDir::open`] for `access`.
fn check_mode(path: &Path, st: &Stat, access: DirAccess) -> io::Result<()> {
    let mode = st.st_mode & 0o777;
    match access {
        DirAccess::Private if mode & 0o077 != 0 => Err(refusal(
            path,
            st,
            "a private runtime directory must give others no access; `chmod 700` it (or \
             configure a group with Options::dir_access)",
        )),
        DirAccess::Group(_) if mode & 0o027 != 0 => Err(refusal(
            path,
            st,
            "a group-shared runtime directory may give its group r-x at most and others nothing; \
             `chmod 750` it",
        )),
        DirAccess::Group(g) if mode & 0o070 != 0 && st.st_gid != g => Err(refusal(
            path,
            st,
            &format!("its group is gid {}, not the configured gid {g}; `chgrp {g}` it", st.st_gid),
        )),
        DirAccess::Traverse if mode & 0o066 != 0 => Err(refusal(
            path,
            st,
            "a directory others may only pass through gives them search (x) at most; `chmod 711` it",
        )),
        DirAccess::Private | DirAccess::Group(_) | DirAccess::Traverse => Ok(()),
    }
}

/// Checks a directory on the way to a service's directory: owned by root or us, and writable
/// by nobody else unless it is sticky (then others cannot rename or remove what we own in it).
fn check_ancestor(path: &Path, st: &Stat) -> io::Result<()> {
    let own = euid();
    if st.st_uid != 0 && st.st_uid != own {
        return Err(refusal(
            path,
            st,
            &format!(
                "a directory on the way to ours must be owned by root or uid {own}, or another user \
                 could replace what is below it"
            ),
        ));
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
        return Err(refusal(
            path,
            st,
            "group or others can write this directory on the way to ours and it is not sticky",
        ));
    }
    Ok(())
}

fn check_is_dir(path: &Path, st: &Stat) -> io::Result<()> {
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(refusal(path, st, "it is not a directory"));
    }
    Ok(())
}

fn refusal(path: &Path, st: &Stat, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        DirRefusal {
            path: path.to_owned(),
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
            why: why.to_owned(),
        },
    )
}

/// The error of opening directory `name` in `parent` (`path` names it): a symlink or a
/// non-directory in its place is a refusal naming that entry's owner and mode.
fn open_error(parent: BorrowedFd<'_>, name: &OsStr, path: &Path, e: Errno) -> io::Error {
    if matches!(e, Errno::LOOP | Errno::NOTDIR) {
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                return refusal(
                    path,
                    &st,
                    "it is a symbolic link (whoever controls its target controls every name in it); \
                     remove it or point ivcom at the real directory",
                )
            }
            Ok(st) => return refusal(path, &st, "it is not a directory"),
            Err(_) => {}
        }
    }
    if e == Errno::ACCESS {
        if let Ok(st) = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            if st.st_uid != euid() {
                return refusal(
                    path,
                    &st,
                    &format!(
                        "it belongs to uid {} and this process (uid {}) may not open it; ivcom needs a \
                         runtime directory of its own: remove it (if you trust it was left by mistake) \
                         or set IVCOM_RUNTIME_DIR or XDG_RUNTIME_DIR to a directory of yours",
                        st.st_uid,
                        euid()
                    ),
                );
            }
        }
    }
    ctx(e, || format!("cannot open runtime directory {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh scratch directory (0700) removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ivcom-rundir-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cwd_stat(path: &Path) -> Stat {
        rustix::fs::statat(rustix::fs::CWD, path, AtFlags::SYMLINK_NOFOLLOW).expect("stat")
    }

    fn mode_of(p: &Path) -> u32 {
        cwd_stat(p).st_mode & 0o7777
    }

    #[test]
    fn creates_private_directory_and_parents_0700() {
        let t = Tmp::new("create");
        let p = t.0.join("a/b/ivcom");
        let d = RuntimeDir::open(&p, DirAccess::Private).unwrap();
        assert_eq!(d.path(), p);
        assert_eq!(mode_of(&p), 0o700);
        assert_eq!(mode_of(&t.0.join("a")), 0o700);
        assert_eq!(mode_of(&t.0.join("a/b")), 0o700);
        // Opening again verifies and succeeds.
        RuntimeDir::open(&p, DirAccess::Private).unwrap();
    }

    #[test]
    fn refuses_modes_open_to_others() {
        let t = Tmp::new("modes");
        // Readable or searchable by others: narrowed to 0700. Writable by others: refused.
        for (mode, ok) in [(0o700, true), (0o755, true), (0o711, true), (0o770, false), (0o1777, false)] {
            std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = RuntimeDir::open(&t.0, DirAccess::Private);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            match r {
                Ok(_) => assert_eq!(mode_of(&t.0), 0o700, "mode {mode:o} narrowed"),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
                    let msg = e.to_string();
                    assert!(msg.contains(&t.0.display().to_string()), "{msg}");
                    assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
                    assert!(msg.contains(&format!("owner uid {}", euid())), "{msg}");
                    assert!(msg.contains("chmod go-w"), "{msg}");
                    assert_eq!(mode_of(&t.0) & 0o777, mode & 0o777, "a refused directory is left as it was");
                }
            }
        }
    }

    #[test]
    fn refuses_a_directory_of_another_owner() {
        if euid() != 0 {
            eprintln!("note: needs root to give a directory to another uid; the security tests cover it");
            return;
        }
        let t = Tmp::new("owner");
        std::os::unix::fs::chown(&t.0, Some(65534), None).unwrap();
        let e = RuntimeDir::open(&t.0, DirAccess::Private).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("owner uid 65534"), "{e}");
        assert!(e.to_string().contains("mode 0700"), "{e}");
        // Reaching listeners in it needs the owner's trust (root is always trusted).
        let e = RuntimeDir::open_existing(&t.0, |_, _| false).unwrap_err();
        assert!(e.to_string().contains("does not trust"), "{e}");
        RuntimeDir::open_existing(&t.0, |u, _| u == 65534).unwrap();
    }

    #[test]
    fn group_access_allows_group_read_search_only() {
        let t = Tmp::new("group");
        let gid = rustix::process::getegid().as_raw();
        let p = t.0.join("shared");
        let d = RuntimeDir::open(&p, DirAccess::Group(gid)).unwrap();
        assert_eq!(mode_of(d.path()), 0o750);
        assert_eq!(cwd_stat(&p).st_gid, gid);
        // A private open of it takes the group's access away; a group open of a private
        // directory is fine.
        RuntimeDir::open(&p, DirAccess::Private).unwrap();
        assert_eq!(mode_of(&p), 0o700);
        RuntimeDir::open(&p, DirAccess::Group(gid)).unwrap();
        for wide in [0o751, 0o755] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(wide)).unwrap();
            RuntimeDir::open(&p, DirAccess::Group(gid)).unwrap();
            assert_eq!(mode_of(&p), 0o750, "{wide:o} narrowed");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = RuntimeDir::open(&p, DirAccess::Group(gid)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        // Group bits for a group other than the configured one.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = RuntimeDir::open(&p, DirAccess::Group(gid.wrapping_add(12345))).unwrap_err();
        assert!(e.to_string().contains("chgrp"), "{e}");
    }

    #[test]
    fn refuses_symlink_and_non_directory() {
        let t = Tmp::new("link");
        let real = t.0.join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.0.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = RuntimeDir::open(&link, DirAccess::Private).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(e.to_string().contains(&link.display().to_string()), "{e}");
        let e = RuntimeDir::open_existing(&link, |_, _| true).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let file = t.0.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = RuntimeDir::open(&file, DirAccess::Private).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let d = RuntimeDir::open(&real, DirAccess::Private).unwrap();
        assert!(d.subdir("..", DirAccess::Private).is_err());
        std::os::unix::fs::symlink(&t.0, real.join("sub")).unwrap();
        let e = d.subdir("sub", DirAccess::Private).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn entries_are_reached_through_the_descriptor() {
        let t = Tmp::new("fd");
        let p = t.0.join("rt");
        let d = RuntimeDir::open(&p, DirAccess::Private).unwrap();
        // Moving the directory's path away does not move what the descriptor reaches.
        let moved = t.0.join("moved");
        std::fs::rename(&p, &moved).unwrap();
        std::fs::create_dir(&p).unwrap();
        let f = d
            .open_file("f", OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, Mode::from_raw_mode(0o600))
            .unwrap();
        drop(f);
        assert!(moved.join("f").exists());
        assert!(!p.join("f").exists());
        d.rename("f", "g").unwrap();
        assert_eq!(FileType::from_raw_mode(d.stat("g").unwrap().st_mode), FileType::RegularFile);
        d.chmod("g", 0o640).unwrap();
        assert_eq!(mode_of(&moved.join("g")), 0o640);
        // A symlink entry is neither followed by open_file nor by chmod.
        let target = t.0.join("target");
        std::fs::write(&target, b"secret").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&target, moved.join("l")).unwrap();
        assert!(d.chmod("l", 0o666).is_err());
        assert!(d.open_file("l", OFlags::RDONLY, Mode::empty()).is_err());
        assert_eq!(mode_of(&target), 0o600);
        assert_eq!(FileType::from_raw_mode(d.stat("l").unwrap().st_mode), FileType::Symlink);
        d.unlink("l").unwrap();
        d.unlink("g").unwrap();
        assert!(d.stat("g").is_err());
        // A socket bound through the descriptor's address lands in the opened directory.
        let addr = d.unix_addr("s.sock").unwrap();
        let sock =
            rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::STREAM, None)
                .unwrap();
        rustix::net::bind(&sock, &addr).unwrap();
        assert!(moved.join("s.sock").exists());
        assert!(d.unix_addr("a/b").is_err());
        assert!(d.unix_addr(&"n".repeat(100)).is_err());
        subdir_checks(&d, &moved);
    }

    fn subdir_checks(d: &RuntimeDir, at: &Path) {
        let s = d.subdir("tcp", DirAccess::Private).unwrap();
        assert_eq!(s.path(), d.path().join("tcp"));
        assert_eq!(mode_of(&at.join("tcp")), 0o700);
        std::fs::set_permissions(at.join("tcp"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(d.subdir("tcp", DirAccess::Private).is_err());
    }

    #[test]
    fn lock_is_exclusive_and_bounded() {
        let t = Tmp::new("lock");
        let d = RuntimeDir::open(&t.0, DirAccess::Private).unwrap();
        let held = d.lock(Duration::from_secs(1)).unwrap();
        let e = d.lock(Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains(&t.0.display().to_string()), "{e}");
        drop(held);
        d.lock(Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn open_existing_checks_owner_and_writers_but_creates_nothing() {
        let t = Tmp::new("existing");
        let e = RuntimeDir::open_existing(&t.0.join("none"), |_, _| false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(!t.0.join("none").exists());
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        RuntimeDir::open_existing(&t.0, |_, _| false).unwrap();
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = RuntimeDir::open_existing(&t.0, |_, _| true).unwrap_err();
        assert!(e.to_string().contains("write"), "{e}");
    }
    #[test]
    fn service_dir_checks_every_directory_on_the_way() {
        let t = Tmp::new("service");
        let p = t.0.join("a/b/vm");
        let d = RuntimeDir::open_service(&p, DirAccess::Private, Existing::Enforce).unwrap();
        assert_eq!(d.path(), p);
        for sub in ["a", "a/b", "a/b/vm"] {
            assert_eq!(mode_of(&t.0.join(sub)), 0o700, "{sub}");
        }
        // A directory on the way that others can write and that is not sticky: another user
        // could rename ours away and put theirs in its place.
        std::fs::set_permissions(t.0.join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = RuntimeDir::open_service(&p, DirAccess::Private, Existing::Enforce).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let r = DirRefusal::of(&e).expect("a refusal");
        assert_eq!((r.path.as_path(), r.uid, r.mode), (t.0.join("a").as_path(), euid(), 0o777), "{e}");
        assert!(r.why.contains("on the way") && r.why.contains("not sticky"), "{e}");
        // Sticky, like /tmp: fine.
        std::fs::set_permissions(t.0.join("a"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        RuntimeDir::open_service(&p, DirAccess::Private, Existing::Enforce).unwrap();
        // The library's own open does not look at the way there.
        std::fs::set_permissions(t.0.join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
        RuntimeDir::open(&p, DirAccess::Private).unwrap();
        if euid() == 0 {
            // A directory on the way owned by someone else (neither root nor us).
            std::fs::set_permissions(t.0.join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(t.0.join("a"), Some(65534), None).unwrap();
            let e = RuntimeDir::open_service(&p, DirAccess::Private, Existing::Enforce).unwrap_err();
            let r = DirRefusal::of(&e).expect("a refusal");
            assert_eq!((r.path.as_path(), r.uid), (t.0.join("a").as_path(), 65534), "{e}");
            assert!(e.to_string().contains("owned by root or uid 0"), "{e}");
        }
    }

    #[test]
    fn service_dir_existing_is_enforced_kept_or_refused() {
        let t = Tmp::new("existing-svc");
        let p = t.0.join("vm");
        std::fs::create_dir(&p).unwrap();
        // Narrower than writable by others: Keep leaves it, Verify takes read and search away,
        // Enforce brings it to the access.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        RuntimeDir::open_service(&p, DirAccess::Private, Existing::Keep).unwrap();
        assert_eq!(mode_of(&p), 0o755);
        RuntimeDir::open_service(&p, DirAccess::Private, Existing::Verify).unwrap();
        assert_eq!(mode_of(&p), 0o700);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        RuntimeDir::open_service(&p, DirAccess::Private, Existing::Enforce).unwrap();
        assert_eq!(mode_of(&p), 0o700);
        // Writable by others: refused whatever `existing` says, and left as it is.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        for existing in [Existing::Keep, Existing::Enforce] {
            let e = RuntimeDir::open_service(&p, DirAccess::Private, existing).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            let r = DirRefusal::of(&e).expect("a refusal");
            assert_eq!(
                (r.path.as_path(), r.uid, r.gid, r.mode),
                (p.as_path(), euid(), cwd_stat(&p).st_gid, 0o777)
            );
            assert!(r.why.contains("others can write"), "{e}");
            assert_eq!(mode_of(&p), 0o777);
        }
        // A symlink in place of the directory is refused, naming the link's owner.
        std::os::unix::fs::symlink(&t.0, t.0.join("link")).unwrap();
        let e = RuntimeDir::open_service(&t.0.join("link"), DirAccess::Private, Existing::Keep).unwrap_err();
        let r = DirRefusal::of(&e).expect("a refusal");
        assert!(r.why.contains("symbolic link") && r.uid == euid(), "{e}");
        // A subdirectory is treated the same way.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let d = RuntimeDir::open_service(&p, DirAccess::Private, Existing::Enforce).unwrap();
        std::fs::create_dir(p.join("lab")).unwrap();
        std::fs::set_permissions(p.join("lab"), std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(d.subdir("lab", DirAccess::Private).is_err(), "group-writable");
        std::fs::set_permissions(p.join("lab"), std::fs::Permissions::from_mode(0o755)).unwrap();
        d.subdir_with("lab", DirAccess::Private, Existing::Enforce).unwrap();
        assert_eq!(mode_of(&p.join("lab")), 0o700);
        d.remove_dir("lab").unwrap();
        assert!(!p.join("lab").exists());
    }

    #[test]
    fn traverse_access_lets_others_search_only() {
        let t = Tmp::new("traverse");
        let p = t.0.join("agent");
        RuntimeDir::open_service(&p, DirAccess::Traverse, Existing::Keep).unwrap();
        assert_eq!(mode_of(&p), 0o711);
        RuntimeDir::open(&p, DirAccess::Traverse).unwrap();
        RuntimeDir::open(&p, DirAccess::Private).unwrap();
        assert_eq!(mode_of(&p), 0o700, "a private open takes search away");
        // Read permission is taken away; write permission is refused.
        for (mode, ok) in [(0o700, true), (0o701, true), (0o755, true), (0o731, false), (0o715, true)] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = RuntimeDir::open(&p, DirAccess::Traverse);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod go-w"), "{e}");
            }
        }
    }

    fn listen_spec(mode: u32) -> SocketSpec {
        SocketSpec { kind: SocketType::STREAM, nonblocking: true, uid: None, gid: None, mode, backlog: 8 }
    }

    #[test]
    fn listen_unix_gives_the_socket_its_mode_and_replaces_only_stale_files() {
        let t = Tmp::new("listen");
        let d = RuntimeDir::open(&t.0, DirAccess::Private).unwrap();
        let gid = rustix::process::getegid().as_raw();
        let spec = SocketSpec { gid: Some(gid), ..listen_spec(0o640) };
        let (live, id) = d.listen_unix("s.sock", &spec).unwrap();
        let st = cwd_stat(&t.0.join("s.sock"));
        assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Socket);
        assert_eq!((st.st_mode & 0o7777, st.st_gid, file_id(&st)), (0o640, gid, id));
        // It listens: a client connects through the path.
        std::os::unix::net::UnixStream::connect(t.0.join("s.sock")).unwrap();
        // A live listener's name is not taken over, and its file stays.
        let e = d.listen_unix("s.sock", &listen_spec(0o600)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert_eq!(file_id(&cwd_stat(&t.0.join("s.sock"))), id);
        // Once it is gone, its file is stale and replaced.
        drop(live);
        let (_again, id2) = d.listen_unix("s.sock", &listen_spec(0o600)).unwrap();
        assert_eq!(mode_of(&t.0.join("s.sock")), 0o600);
        std::os::unix::net::UnixStream::connect(t.0.join("s.sock")).unwrap();
        // Only the file we made is removed (the file system may reuse the old inode number,
        // so another file is one with another number).
        assert!(!d.unlink_if("s.sock", (id2.0, id2.1 ^ 1)).unwrap());
        assert!(t.0.join("s.sock").exists());
        assert!(d.unlink_if("s.sock", id2).unwrap());
        assert!(!t.0.join("s.sock").exists());
        assert!(!d.unlink_if("s.sock", id2).unwrap());
        // Something that is not a socket is never replaced.
        std::fs::write(t.0.join("f.sock"), b"data").unwrap();
        let e = d.listen_unix("f.sock", &listen_spec(0o600)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(t.0.join("f.sock")).unwrap(), b"data");
        assert!(d.listen_unix("../s.sock", &listen_spec(0o600)).is_err());
        // No temporary name is left behind.
        let mut names: Vec<String> = std::fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        names.sort();
        assert_eq!(names, ["f.sock"]);
    }

    #[test]
    fn lock_file_is_exclusive_and_never_blocks_on_a_planted_entry() {
        let t = Tmp::new("lockfile");
        let d = RuntimeDir::open(&t.0, DirAccess::Private).unwrap();
        let held = d.lock_file("x.lock", Duration::ZERO).unwrap();
        assert_eq!(mode_of(&t.0.join("x.lock")), 0o600);
        let e = d.lock_file("x.lock", Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // The directory itself is not locked by it.
        d.lock(Duration::ZERO).unwrap();
        drop(held);
        d.lock_file("x.lock", Duration::ZERO).unwrap();
        // A FIFO (whose open would block) and a symlink are refused at once.
        rustix::fs::mknodat(&d.fd, "fifo", FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let e = d.lock_file("fifo", Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        std::os::unix::fs::symlink(t.0.join("x.lock"), t.0.join("link")).unwrap();
        assert!(d.lock_file("link", Duration::ZERO).is_err());
    }
}
