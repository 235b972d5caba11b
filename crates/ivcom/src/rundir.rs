//! Runtime directories that only their owner controls.
//!
//! A [`RuntimeDir`] is a directory opened once (`O_DIRECTORY | O_NOFOLLOW`) and verified
//! through that descriptor: it is a directory, its owner is this process's effective uid, and
//! nobody else may write in it (nor, unless a group is configured, look into it). Every entry
//! below it is then reached relative to the descriptor (`openat`, `fstatat`, `unlinkat`,
//! `renameat`, and Unix socket addresses of the form `/proc/self/fd/N/NAME`), so renaming or
//! replacing the directory's path after it was opened cannot redirect anything.
//!
//! A directory another user created, one with a too-wide mode, or a symbolic link is refused
//! with an error that names the path, its owner and its mode, and says what to do.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

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
}

impl DirAccess {
    /// The mode a directory with this access is created with.
    pub fn mode(self) -> u32 {
        match self {
            DirAccess::Private => 0o700,
            DirAccess::Group(_) => 0o750,
        }
    }

    /// The group a directory with this access belongs to, if one is configured.
    pub fn group(self) -> Option<u32> {
        match self {
            DirAccess::Private => None,
            DirAccess::Group(g) => Some(g),
        }
    }
}

/// A verified runtime directory, held open.
#[derive(Debug)]
pub struct RuntimeDir {
    fd: OwnedFd,
    path: PathBuf,
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
    /// Opens `path` (creating it, and missing parents owned by us, with the access's mode) and
    /// verifies it through the opened descriptor: `fstat` says directory, owner == effective
    /// uid, no write permission for group/others, and for `Private` no read/search for
    /// group/others (for `Group(g)`: group `g` when the group has any permission, `r-x` for the
    /// group at most, nothing for others). A symlink at the last component is refused
    /// (`O_NOFOLLOW`).
    ///
    /// Errors: `PermissionDenied` (or the OS error's kind) with a message naming the path, its
    /// owner uid and its mode, and what to do.
    pub fn open(path: &Path, access: DirAccess) -> io::Result<Self> {
        let (fd, created) = open_or_create(path, access)?;
        let dir = RuntimeDir { fd, path: path.to_path_buf() };
        if created {
            dir.set_access(access)?;
        }
        dir.verify(access)?;
        Ok(dir)
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
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty()).map_err(|e| open_error(path, e))?;
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
        check_entry(name)?;
        let path = self.path.join(name);
        let created = match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(access.mode())) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(ctx(e, || format!("cannot create runtime directory {}", path.display()))),
        };
        let fd = rustix::fs::openat(&self.fd, name, dir_flags(), Mode::empty())
            .map_err(|e| open_error(&path, e))?;
        let dir = RuntimeDir { fd, path };
        if created {
            dir.set_access(access)?;
        }
        dir.verify(access)?;
        Ok(dir)
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

    fn fstat(&self) -> io::Result<Stat> {
        rustix::fs::fstat(&self.fd).map_err(|e| ctx(e, || format!("cannot stat {}", self.path.display())))
    }

    /// Gives a directory we just created its exact mode (`mkdir` applies the umask) and group.
    fn set_access(&self, access: DirAccess) -> io::Result<()> {
        set_access(self.fd.as_fd(), &self.path, access)
    }

    /// The checks of [`RuntimeDir::open`], through the descriptor.
    fn verify(&self, access: DirAccess) -> io::Result<()> {
        let st = self.fstat()?;
        check_is_dir(&self.path, &st)?;
        let own = euid();
        if st.st_uid != own {
            return Err(refusal(
                &self.path,
                &st,
                &format!(
                    "ivcom needs a runtime directory owned by this process's uid {own}, as whoever owns it \
                     controls every name in it; remove it (if you trust it was left by mistake) or set \
                     IVCOM_RUNTIME_DIR or XDG_RUNTIME_DIR to a directory of yours"
                ),
            ));
        }
        let mode = st.st_mode & 0o777;
        match access {
            DirAccess::Private if mode & 0o077 != 0 => Err(refusal(
                &self.path,
                &st,
                "a private runtime directory must give others no access; `chmod 700` it (or \
                 configure a group with Options::dir_access)",
            )),
            DirAccess::Group(_) if mode & 0o027 != 0 => Err(refusal(
                &self.path,
                &st,
                "a group-shared runtime directory may give its group r-x at most and others nothing; \
                 `chmod 750` it",
            )),
            DirAccess::Group(g) if mode & 0o070 != 0 && st.st_gid != g => Err(refusal(
                &self.path,
                &st,
                &format!("its group is gid {}, not the configured gid {g}; `chgrp {g}` it", st.st_gid),
            )),
            _ => Ok(()),
        }
    }
}

/// The (device, inode) pair that identifies a file, from its `stat`.
// The fields' widths differ between targets; on some the casts are no-ops.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn file_id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

fn set_access(fd: BorrowedFd<'_>, path: &Path, access: DirAccess) -> io::Result<()> {
    if let Some(g) = access.group() {
        rustix::fs::fchown(fd, None, Some(rustix::fs::Gid::from_raw(g))).map_err(|e| {
            ctx(e, || {
                format!("cannot give runtime directory {} to group {g} (are you a member?)", path.display())
            })
        })?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(access.mode()))
        .map_err(|e| ctx(e, || format!("cannot set the mode of runtime directory {}", path.display())))
}

fn check_is_dir(path: &Path, st: &Stat) -> io::Result<()> {
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(refusal(path, st, "it is not a directory"));
    }
    Ok(())
}

fn refusal(path: &Path, st: &Stat, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing runtime directory {} (owner uid {}, group gid {}, mode {:04o}): {what}",
            path.display(),
            st.st_uid,
            st.st_gid,
            st.st_mode & 0o7777
        ),
    )
}

/// The error of an `O_NOFOLLOW | O_DIRECTORY` open, naming a symlink or non-directory.
fn open_error(path: &Path, e: Errno) -> io::Error {
    match e {
        Errno::LOOP | Errno::NOTDIR => match rustix::fs::lstat(path) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => refusal(
                path,
                &st,
                "it is a symbolic link (whoever controls its target controls every name in it); \
                 remove it or point ivcom at the real directory",
            ),
            Ok(st) => refusal(path, &st, "it is not a directory"),
            Err(_) => ctx(e, || format!("cannot open runtime directory {}", path.display())),
        },
        _ => ctx(e, || format!("cannot open runtime directory {}", path.display())),
    }
}

/// Opens `path`, creating it and any missing parents (ours, with the access's mode and group)
/// first. Returns whether we created the last component.
fn open_or_create(path: &Path, access: DirAccess) -> io::Result<(OwnedFd, bool)> {
    match rustix::fs::open(path, dir_flags(), Mode::empty()) {
        Ok(fd) => return Ok((fd, false)),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(open_error(path, e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            create_parents(parent, access)?;
        }
    }
    let created = match rustix::fs::mkdir(path, Mode::from_raw_mode(access.mode())) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(ctx(e, || format!("cannot create runtime directory {}", path.display()))),
    };
    let fd = rustix::fs::open(path, dir_flags(), Mode::empty()).map_err(|e| open_error(path, e))?;
    Ok((fd, created))
}

/// Creates the missing ancestors of a runtime directory, each with the access's mode and group.
fn create_parents(dir: &Path, access: DirAccess) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            create_parents(parent, access)?;
        }
    }
    match rustix::fs::mkdir(dir, Mode::from_raw_mode(access.mode())) {
        Ok(()) => {
            let fd = rustix::fs::open(dir, dir_flags(), Mode::empty()).map_err(|e| open_error(dir, e))?;
            // Only a directory we own gets its mode fixed; verification of the runtime
            // directory itself happens after.
            if rustix::fs::fstat(&fd)?.st_uid == euid() {
                set_access(fd.as_fd(), dir, access)?;
            }
            Ok(())
        }
        Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(ctx(e, || format!("cannot create directory {}", dir.display()))),
    }
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
        for (mode, ok) in [(0o700, true), (0o755, false), (0o711, false), (0o770, false), (0o1777, false)] {
            std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = RuntimeDir::open(&t.0, DirAccess::Private);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
                let msg = e.to_string();
                assert!(msg.contains(&t.0.display().to_string()), "{msg}");
                assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
                assert!(msg.contains(&format!("owner uid {}", euid())), "{msg}");
                assert!(msg.contains("chmod 700"), "{msg}");
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
        // A private open of it is refused (its group may read it), a group open of a private
        // directory is fine.
        assert!(RuntimeDir::open(&p, DirAccess::Private).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        RuntimeDir::open(&p, DirAccess::Group(gid)).unwrap();
        for bad in [0o770, 0o751, 0o755] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = RuntimeDir::open(&p, DirAccess::Group(gid)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{bad:o}");
            assert!(e.to_string().contains("chmod 750"), "{e}");
        }
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
}
