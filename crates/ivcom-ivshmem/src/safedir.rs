//! Directories only their owner controls, and the socket files in them: for the daemon's
//! socket directory and the agent's, whose sockets decide who may act as a member.
//!
//! A [`SafeDir`] is an opened directory descriptor (`O_DIRECTORY | O_NOFOLLOW`), checked with
//! `fstat`: a directory owned by the effective uid that neither group nor others can write.
//! Every ancestor on the way to it must be owned by root or the effective uid and not be
//! writable by others unless it is sticky (`/tmp`, `/dev/shm`). Missing components are created
//! with the mode (and group) asked for. Everything below it is reached relative to the
//! descriptor: sockets are bound through `/proc/self/fd/N/NAME`, so a path swapped after the
//! check cannot redirect them, and their owner and mode are set with `fchownat`/`fchmodat` in
//! a directory nobody else can write, so no entry can be replaced in between.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;

/// Why a directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A system call on the path failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The directory (or entry).
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The directory (or an ancestor) is not one only its owner controls.
    #[error("{path} is owned by uid {uid} (group {gid}, mode {mode:04o}): {why}; refusing to use it")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
        /// Its permission bits (with the set-id and sticky bits).
        mode: u32,
        /// What is wrong.
        why: String,
    },
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(Errno) -> DirError + 'a {
    move |e| DirError::Io { path: path.to_owned(), what, source: e.into() }
}

/// Owner, group and mode bits of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Owner uid.
    pub uid: u32,
    /// Group gid.
    pub gid: u32,
    /// Permission bits with set-id and sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl Owner {
    fn of(st: &rustix::fs::Stat) -> Self {
        Self { uid: st.st_uid, gid: st.st_gid, mode: st.st_mode & 0o7777 }
    }
}

/// An entry of a [`SafeDir`], as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Owner, group and mode.
    pub owner: Owner,
    /// File type (a symlink is reported as one, not followed).
    pub kind: rustix::fs::FileType,
    /// (device, inode).
    pub id: (u64, u64),
}

/// How a directory is created, and whether an existing one is brought to that mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirMode {
    /// Permission bits for a directory created here (e.g. `0o700`, or `0o750` with a group).
    pub mode: u32,
    /// Group to give it (`None`: the creator's).
    pub gid: Option<u32>,
    /// Whether an existing leaf directory that passes the checks is set to `mode` and `gid`
    /// (a directory this program alone uses) or left as it is (a directory shared with other
    /// programs of the same user, such as the runtime directory).
    pub enforce: bool,
}

impl DirMode {
    /// `0o700`, or `0o750` with group `gid`; enforced.
    pub fn private(gid: Option<u32>) -> Self {
        Self { mode: if gid.is_some() { 0o750 } else { 0o700 }, gid, enforce: true }
    }
}

/// An opened directory only its owner (this process's effective uid) can change.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks a leaf directory: ours, a directory, and nobody else can write it.
fn check_leaf(path: &Path, st: &rustix::fs::Stat) -> Result<(), DirError> {
    let o = Owner::of(st);
    let unsafe_ =
        |why: String| DirError::Unsafe { path: path.to_owned(), uid: o.uid, gid: o.gid, mode: o.mode, why };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return Err(unsafe_("not a directory".into()));
    }
    let me = euid();
    if o.uid != me {
        return Err(unsafe_(format!("it must be owned by this process's uid {me}")));
    }
    if o.mode & 0o022 != 0 {
        return Err(unsafe_("group or others can write it".into()));
    }
    Ok(())
}

/// Checks an ancestor: owned by root or us, and not writable by others unless sticky.
fn check_ancestor(path: &Path, st: &rustix::fs::Stat) -> Result<(), DirError> {
    let o = Owner::of(st);
    let unsafe_ =
        |why: String| DirError::Unsafe { path: path.to_owned(), uid: o.uid, gid: o.gid, mode: o.mode, why };
    let me = euid();
    if o.uid != 0 && o.uid != me {
        return Err(unsafe_(format!(
            "a directory on the way to ours must be owned by root or uid {me}, or another user could replace what is below it"
        )));
    }
    if o.mode & 0o022 != 0 && o.mode & 0o1000 == 0 {
        return Err(unsafe_(
            "group or others can write this directory on the way to ours and it is not sticky".into(),
        ));
    }
    Ok(())
}

impl SafeDir {
    /// Opens the absolute directory `path`, creating missing components with `how.mode` and
    /// `how.gid`, and checks it and its ancestors (see the module docs).
    ///
    /// Errors: [`DirError::Unsafe`] naming the path, owner, group and mode of a directory
    /// someone else owns or can write (or a symlink in place of a directory we create);
    /// [`DirError::Io`] when a call fails.
    pub fn open(path: &Path, how: DirMode) -> Result<Self, DirError> {
        if !path.is_absolute() {
            return Err(DirError::Io {
                path: path.to_owned(),
                what: "opening a directory",
                source: io::Error::new(io::ErrorKind::InvalidInput, "the path must be absolute"),
            });
        }
        let comps: Vec<Component<'_>> = path.components().collect();
        let root = rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io_err(Path::new("/"), "opening"))?;
        let mut cur = root;
        let mut at = PathBuf::from("/");
        let last = comps.len().saturating_sub(1);
        for (i, c) in comps.iter().enumerate() {
            let name = match c {
                Component::RootDir => continue,
                Component::CurDir => continue,
                Component::Normal(n) => *n,
                Component::ParentDir => std::ffi::OsStr::new(".."),
                Component::Prefix(_) => unreachable!("no prefixes on Unix"),
            };
            at.push(name);
            let leaf = i == last;
            if leaf {
                let fd = Self::open_leaf(&cur, name, &at, how)?;
                return Ok(Self { fd, path: at });
            }
            // Ancestors: symlinks that root or we own are followed (`/var/run`); the
            // directory reached is checked.
            let next = match rustix::fs::openat(
                &cur,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    Self::make(&cur, name, &at, how)?;
                    // A directory we just made: from here on everything is new and ours.
                    rustix::fs::openat(
                        &cur,
                        name,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io_err(&at, "opening the directory just created"))?
                }
                Err(e) => return Err(io_err(&at, "opening")(e)),
            };
            let st = rustix::fs::fstat(&next).map_err(io_err(&at, "inspecting"))?;
            check_ancestor(&at, &st)?;
            cur = next;
        }
        // `path` was `/`.
        let st = rustix::fs::fstat(&cur).map_err(io_err(&at, "inspecting"))?;
        check_leaf(&at, &st)?;
        Ok(Self { fd: cur, path: at })
    }

    /// Creates `name` in `parent` with the requested mode and group.
    fn make(parent: &OwnedFd, name: &std::ffi::OsStr, at: &Path, how: DirMode) -> Result<(), DirError> {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(how.mode & 0o777)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io_err(at, "creating")(e)),
        }
        // The mode and group are set on the opened leaf (the umask may have cut the mode).
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Self::open_error(parent, name, at, e))?;
        let st = rustix::fs::fstat(&fd).map_err(io_err(at, "inspecting"))?;
        check_leaf(at, &st)?;
        Self::set(&fd, at, &st, how)
    }

    fn set(fd: &OwnedFd, at: &Path, st: &rustix::fs::Stat, how: DirMode) -> Result<(), DirError> {
        if let Some(g) = how.gid {
            if st.st_gid != g {
                rustix::fs::fchown(fd, None, Some(Gid::from_raw(g)))
                    .map_err(io_err(at, "setting the group"))?;
            }
        }
        if st.st_mode & 0o7777 != how.mode {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(how.mode)).map_err(io_err(at, "setting the mode"))?;
        }
        Ok(())
    }

    fn open_error(parent: &OwnedFd, name: &std::ffi::OsStr, at: &Path, e: Errno) -> DirError {
        if e == Errno::LOOP || e == Errno::NOTDIR {
            // A symlink or a file where our directory goes: name its owner and mode.
            if let Ok(st) = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                let o = Owner::of(&st);
                let what = if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink
                {
                    "a symbolic link"
                } else {
                    "not a directory"
                };
                return DirError::Unsafe {
                    path: at.to_owned(),
                    uid: o.uid,
                    gid: o.gid,
                    mode: o.mode,
                    why: format!("it is {what}, where a directory of ours goes"),
                };
            }
        }
        io_err(at, "opening")(e)
    }

    fn open_leaf(
        parent: &OwnedFd,
        name: &std::ffi::OsStr,
        at: &Path,
        how: DirMode,
    ) -> Result<OwnedFd, DirError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(io_err(at, "inspecting"))?;
                check_leaf(at, &st)?;
                if how.enforce {
                    Self::set(&fd, at, &st, how)?;
                }
                return Ok(fd);
            }
            Err(Errno::NOENT) => {
                Self::make(parent, name, at, how)?;
                rustix::fs::openat(parent, name, flags, Mode::empty())
            }
            Err(e) => return Err(Self::open_error(parent, name, at, e)),
        };
        let fd = fd.map_err(|e| Self::open_error(parent, name, at, e))?;
        let st = rustix::fs::fstat(&fd).map_err(io_err(at, "inspecting"))?;
        check_leaf(at, &st)?;
        Ok(fd)
    }

    /// The subdirectory `name` (one component), created and checked like [`SafeDir::open`].
    pub fn subdir(&self, name: &str, how: DirMode) -> Result<Self, DirError> {
        let at = self.path.join(name);
        let fd = Self::open_leaf(&self.fd, std::ffi::OsStr::new(name), &at, how)?;
        Ok(Self { fd, path: at })
    }

    /// The directory's path, as opened (for messages and for clients that connect by path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path of entry `name` through this descriptor (`/proc/self/fd/N/NAME`), for
    /// `bind` and `connect`, which take no directory descriptor.
    pub fn via_fd(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    /// Owner, group, mode, type, device and inode of entry `name`, not following a symlink;
    /// `None` if there is none.
    pub fn entry(&self, name: &str) -> io::Result<Option<Entry>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Entry {
                owner: Owner::of(&st),
                kind: rustix::fs::FileType::from_raw_mode(st.st_mode),
                id: (st.st_dev, st.st_ino),
            })),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives entry `name` owner `uid`/`gid` (where given) and permission bits `mode`. Safe in
    /// a [`SafeDir`]: nobody else can replace the entry between the two calls.
    pub fn set_entry(&self, name: &str, uid: Option<u32>, gid: Option<u32>, mode: u32) -> io::Result<()> {
        if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
            rustix::fs::chownat(&self.fd, name, u, g, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        rustix::fs::chmodat(&self.fd, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
        Ok(())
    }

    /// Removes entry `name` if it is still the file with (device, inode) `id`.
    pub fn remove_if(&self, name: &str, id: (u64, u64)) {
        if matches!(self.entry(name), Ok(Some(e)) if e.id == id) {
            let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
        }
    }

    /// Removes entry `name` (a file, not a directory).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the subdirectory `name` if it is empty.
    pub fn remove_empty_dir(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ivcom-safedir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn creates_private_and_refuses_wide_or_links() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("a");
        let d = SafeDir::open(&base.join("x/y"), DirMode::private(None)).unwrap();
        let md = std::fs::metadata(d.path()).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o700);
        assert_eq!(std::fs::metadata(base.join("x")).unwrap().permissions().mode() & 0o777, 0o700);
        // A group- or world-writable leaf is refused, naming path and mode.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = SafeDir::open(&base.join("x/y"), DirMode::private(None)).unwrap_err().to_string();
        assert!(e.contains("mode 0777") && e.contains("x/y"), "{e}");
        // A symlink in place of the leaf is refused.
        std::os::unix::fs::symlink("/tmp", base.join("x/link")).unwrap();
        let e = SafeDir::open(&base.join("x/link"), DirMode::private(None)).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // An existing own directory with a narrower-than-writable mode is brought to ours.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = SafeDir::open(&base.join("x/y"), DirMode::private(None)).unwrap();
        assert_eq!(std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o7777, 0o700);
        let _ = std::fs::remove_dir_all(&base);
    }
}
