//! `exec` and `posix_spawn`: what of an accelerated connection crosses into a new program
//! image. Region memfds are close-on-exec; nothing of a channel crosses unasked.
//!
//! At an intercepted exec whose new image continues under this library (its environment
//! keeps this library in `LD_PRELOAD`, the target is a dynamically linked ELF of our kind or a
//! script whose interpreter is, and nothing puts the loader into secure-execution mode), each
//! accelerated connection whose socket survives the exec (no `FD_CLOEXEC`) has its memfd
//! (and its registration connection, while it holds one) made inheritable for that exec
//! only, and its private state is passed in [`ENV_INHERIT`], added to the environment given
//! to the real call. The new image's start-up ([`at_start`]) reads and removes that variable,
//! checks each entry against the descriptors themselves and takes the connections over.
//!
//! Any other exec (`LD_PRELOAD` without us, a static or foreign target, a set-id target):
//! no memfd crosses; the sockets stay as the program left them, so a child that only holds a
//! connection keeps it open as over TCP (one that reads or writes it would meet the peer's
//! wakeup bytes, not its data: handing the connection back to TCP is not built yet). If the
//! exec fails, every flag is put back.
//!
//! Format of the variable (one line; the version first):
//! `IVCOM_INHERIT=1:ENTRY;ENTRY;...`, each `ENTRY` thirteen comma-separated fields:
//! `fd,memfd,reg,side,flags,tx_tail,rx_head,tcp_sent,tcp_read,peer_switch,error,nodelay,cork`
//! (decimal; `reg` -1 when none; `side` `c` or `a`; `flags` bits 1 claim seen, 2 switched,
//! 4 `SHUT_RD`, 8 `SHUT_WR`, 16 peer FIN seen, 32 another process may hold the socket; `peer_switch` `-` when unknown).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use libc::{c_char, c_int, mode_t, pid_t};
use rustix::io::FdFlags;

use crate::conn::{Private, Side, TcpConn};
use crate::net::{self, Endpoint, Tuple};
use crate::real;
use crate::table::{self, Entry, Ident, MAX_FD};
use crate::wait::set_errno;

/// The environment variable that carries connections into the next program image.
pub const ENV_INHERIT: &str = "IVCOM_INHERIT";
const VERSION: &str = "1";

/// In-process execs between making descriptors inheritable and the real call (a `fork` in
/// another thread meanwhile makes them close-on-exec again in its child).
pub static EXEC_PENDING: AtomicUsize = AtomicUsize::new(0);

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: every descriptor borrowed here is one the program or this library holds open
    // for the duration of the call being served; a closed number only makes calls fail.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

// ---------------------------------------------------------------------------------------
// The hand-over record.

/// One inherited descriptor of an accelerated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherit {
    /// The TCP socket's descriptor (in the new image).
    pub fd: RawFd,
    /// The region's memfd.
    pub memfd: RawFd,
    /// The registration connection (connector before the claim is settled), or -1.
    pub reg: RawFd,
    /// The private state.
    pub state: Private,
}

const F_CLAIM: u32 = 1;
const F_SWITCHED: u32 = 2;
const F_SHUT_RD: u32 = 4;
const F_SHUT_WR: u32 = 8;
const F_EOF: u32 = 16;
const F_SHARED: u32 = 32;
const F_ERR_REPORTED: u32 = 64;

/// Encodes entries as the value of [`ENV_INHERIT`].
pub fn encode(entries: &[Inherit]) -> String {
    let mut s = format!("{VERSION}:");
    for (i, e) in entries.iter().enumerate() {
        let p = &e.state;
        let flags = (p.claim_seen as u32 * F_CLAIM)
            | (p.switched as u32 * F_SWITCHED)
            | (p.shut_rd as u32 * F_SHUT_RD)
            | (p.shut_wr as u32 * F_SHUT_WR)
            | (p.eof as u32 * F_EOF)
            | (p.shared as u32 * F_SHARED)
            | (p.error_reported as u32 * F_ERR_REPORTED);
        if i > 0 {
            s.push(';');
        }
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            e.fd,
            e.memfd,
            e.reg,
            if p.side == Side::Connector { 'c' } else { 'a' },
            flags,
            p.tx_tail,
            p.rx_head,
            p.tcp_sent,
            p.tcp_read,
            p.peer_switch.map_or_else(|| "-".to_string(), |v| v.to_string()),
            p.error,
            p.tcp_opts[0],
            p.tcp_opts[1],
        ));
    }
    s
}

/// Decodes the value of [`ENV_INHERIT`]. Entries that do not parse are left out (with their
/// position in the error list); a wrong version yields nothing.
pub fn decode(v: &str) -> (Vec<Inherit>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let Some(rest) = v.strip_prefix(VERSION).and_then(|r| r.strip_prefix(':')) else {
        bad.push(format!("unknown format {:?}", v.chars().take(16).collect::<String>()));
        return (out, bad);
    };
    for (i, item) in rest.split(';').enumerate().filter(|(_, s)| !s.is_empty()).take(MAX_FD) {
        match decode_one(item) {
            Some(e) => out.push(e),
            None => bad.push(format!("entry {i} malformed")),
        }
    }
    (out, bad)
}

fn decode_one(item: &str) -> Option<Inherit> {
    let f: Vec<&str> = item.split(',').collect();
    if f.len() != 13 {
        return None;
    }
    let fd_of = |s: &str| s.parse::<RawFd>().ok().filter(|v| (0..MAX_FD as RawFd).contains(v));
    let fd = fd_of(f[0])?;
    let memfd = fd_of(f[1])?;
    let reg = if f[2] == "-1" { -1 } else { fd_of(f[2])? };
    let side = match f[3] {
        "c" => Side::Connector,
        "a" => Side::Acceptor,
        _ => return None,
    };
    let flags: u32 = f[4].parse().ok().filter(|v| *v < 2 * F_ERR_REPORTED)?;
    let n = |s: &str| s.parse::<u64>().ok();
    let peer_switch = if f[9] == "-" { None } else { Some(n(f[9])?) };
    let i = |s: &str| s.parse::<c_int>().ok();
    Some(Inherit {
        fd,
        memfd,
        reg,
        state: Private {
            side,
            claim_seen: flags & F_CLAIM != 0,
            switched: flags & F_SWITCHED != 0,
            shut_rd: flags & F_SHUT_RD != 0,
            shut_wr: flags & F_SHUT_WR != 0,
            eof: flags & F_EOF != 0,
            shared: flags & F_SHARED != 0,
            error_reported: flags & F_ERR_REPORTED != 0,
            tx_tail: n(f[5])?,
            rx_head: n(f[6])?,
            tcp_sent: n(f[7])?,
            tcp_read: n(f[8])?,
            peer_switch,
            error: i(f[10]).filter(|e| (0..4096).contains(e))?,
            tcp_opts: [i(f[11])?, i(f[12])?],
        },
    })
}

// ---------------------------------------------------------------------------------------
// Does the new image continue under this library?

/// What an exec is asked to run.
#[derive(Debug)]
pub enum Target<'a> {
    /// A path (relative to the working directory).
    Path(&'a CStr),
    /// `execveat(dirfd, path, .., flags)`.
    At(RawFd, &'a CStr, c_int),
    /// `fexecve(fd, ..)`.
    Fd(RawFd),
    /// `execvp`-style: searched in `PATH` unless it holds a `/`.
    Search(&'a CStr),
}

/// This library's file (found with `dladdr` on one of its own functions).
fn own_library() -> Option<Ident> {
    static OWN: std::sync::OnceLock<Option<Ident>> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| {
        // SAFETY: `dladdr` writes into a local `Dl_info` for an address inside this library.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        let here = own_library as *const () as *const libc::c_void;
        // SAFETY: as above.
        if unsafe { libc::dladdr(here, &mut info) } == 0 || info.dli_fname.is_null() {
            return None;
        }
        // SAFETY: `dli_fname` is a NUL-terminated string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_fname) };
        let st = rustix::fs::stat(name).ok()?;
        Some(Ident { dev: st.st_dev, ino: st.st_ino })
    })
}

fn env_value<'a>(env: &[&'a CStr], key: &str) -> Option<&'a [u8]> {
    env.iter().rev().find_map(|e| {
        let b = e.to_bytes();
        b.strip_prefix(key.as_bytes()).and_then(|r| r.strip_prefix(b"="))
    })
}

/// Why the new image would not continue under the library, if it would not.
fn not_continuing(env: &[&CStr], target: &Target<'_>) -> Option<String> {
    let Some(own) = own_library() else { return Some("this library's own file is unknown".into()) };
    let preload = env_value(env, "LD_PRELOAD").unwrap_or_default();
    let ours = preload.split(|b| *b == b':' || *b == b' ' || *b == b'\t').any(|p| {
        p.contains(&b'/')
            && CString::new(p)
                .ok()
                .and_then(|c| rustix::fs::stat(c.as_c_str()).ok())
                .is_some_and(|st| Ident { dev: st.st_dev, ino: st.st_ino } == own)
    });
    if !ours {
        return Some("its environment does not preload this library".into());
    }
    if let Some(v) = env_value(env, crate::settings::ENV_ACCEL) {
        if matches!(v.to_ascii_lowercase().as_slice(), b"0" | b"off" | b"no" | b"false") {
            return Some("its environment turns acceleration off".into());
        }
    }
    // Secure-execution mode ignores LD_PRELOAD paths.
    if rustix::process::getuid() != rustix::process::geteuid()
        || rustix::process::getgid() != rustix::process::getegid()
    {
        return Some("this process runs set-id (secure execution)".into());
    }
    let file = match open_target(target) {
        Ok(f) => f,
        Err(e) => return Some(format!("its target cannot be inspected ({e})")),
    };
    image_kind(file.as_fd_borrowed(), 1).err()
}

enum Opened {
    Owned(OwnedFd),
    Borrowed(RawFd),
}

impl Opened {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        match self {
            Opened::Owned(o) => {
                use std::os::fd::AsFd;
                o.as_fd()
            }
            Opened::Borrowed(fd) => borrow(*fd),
        }
    }
}

fn open_ro(dir: Option<RawFd>, path: &CStr, nofollow: bool) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let mut fl = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK;
    if nofollow {
        fl |= OFlags::NOFOLLOW;
    }
    Ok(match dir {
        Some(d) => rustix::fs::openat(borrow(d), path, fl, Mode::empty())?,
        None => rustix::fs::open(path, fl, Mode::empty())?,
    })
}

fn search_path(file: &CStr) -> Option<CString> {
    if file.to_bytes().contains(&b'/') {
        return Some(file.to_owned());
    }
    let path = std::env::var_os("PATH").map(|p| p.into_encoded_bytes()).unwrap_or(b"/bin:/usr/bin".to_vec());
    for dir in path.split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut cand = dir.to_vec();
        cand.push(b'/');
        cand.extend_from_slice(file.to_bytes());
        let Ok(c) = CString::new(cand) else { continue };
        if rustix::fs::access(c.as_c_str(), rustix::fs::Access::EXEC_OK).is_ok()
            && rustix::fs::stat(c.as_c_str()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        {
            return Some(c);
        }
    }
    None
}

fn open_target(t: &Target<'_>) -> std::io::Result<Opened> {
    Ok(match t {
        Target::Path(p) => Opened::Owned(open_ro(None, p, false)?),
        Target::Search(f) => {
            let p = search_path(f).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
            Opened::Owned(open_ro(None, &p, false)?)
        }
        Target::At(dir, p, flags) => {
            if p.to_bytes().is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
                Opened::Borrowed(*dir)
            } else {
                Opened::Owned(open_ro(Some(*dir), p, flags & libc::AT_SYMLINK_NOFOLLOW != 0)?)
            }
        }
        Target::Fd(fd) => Opened::Borrowed(*fd),
    })
}

fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> bool {
    matches!(rustix::io::pread(fd, &mut *buf, off), Ok(n) if n == buf.len())
}

/// `Ok` when `fd` is an image that loads this library: a dynamically linked ELF of this
/// process's class, byte order and machine, not set-id; or a `#!` script whose interpreter
/// is one (`depth` levels of interpreters are followed).
fn image_kind(fd: BorrowedFd<'_>, depth: u32) -> Result<(), String> {
    let file = match rustix::fs::fstat(fd) {
        Ok(st) => st,
        Err(_) => {
            // An O_PATH descriptor: reopen it for reading.
            let p = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| e.to_string())?;
            let o = open_ro(None, &p, false).map_err(|e| format!("its target cannot be read ({e})"))?;
            return image_kind_of(o.as_raw_fd(), depth);
        }
    };
    if file.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
        return Err("its target is set-id (secure execution ignores LD_PRELOAD)".into());
    }
    let mut head = [0u8; 64];
    let n = rustix::io::pread(fd, &mut head[..], 0).unwrap_or(0);
    if n >= 2 && head.starts_with(b"#!") {
        if depth == 0 {
            return Err("its target is a script run by a script".into());
        }
        let mut line = [0u8; 256];
        let n = rustix::io::pread(fd, &mut line[..], 0).unwrap_or(0);
        let l = &line[2..n];
        let l = &l[l.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(l.len())..];
        let end = l.iter().position(|b| matches!(*b, b' ' | b'\t' | b'\n' | 0)).unwrap_or(l.len());
        let interp = CString::new(&l[..end]).map_err(|_| "its script names no interpreter".to_string())?;
        let o = open_ro(None, &interp, false).map_err(|e| format!("its interpreter cannot be read ({e})"))?;
        return image_kind_of(o.as_raw_fd(), depth - 1);
    }
    if n < 64 || &head[..4] != b"\x7fELF" {
        return Err("its target is not an ELF executable".into());
    }
    let class64 = cfg!(target_pointer_width = "64");
    let little = cfg!(target_endian = "little");
    if head[4] != if class64 { 2 } else { 1 } || head[5] != if little { 1 } else { 2 } {
        return Err("its target is an ELF of another class or byte order".into());
    }
    let u16_at = |o: usize| {
        let b = [head[o], head[o + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let machine: Option<u16> = if cfg!(target_arch = "x86_64") {
        Some(62)
    } else if cfg!(target_arch = "aarch64") {
        Some(183)
    } else {
        None
    };
    if machine.is_some_and(|m| m != u16_at(18)) {
        return Err("its target is an ELF for another machine".into());
    }
    if !class64 {
        return Err("32-bit images are not inspected".into());
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&head[32..40]);
    let phoff = if little { u64::from_le_bytes(w) } else { u64::from_be_bytes(w) };
    let (phentsize, phnum) = (u16_at(54) as u64, u16_at(56).min(512) as u64);
    if phentsize < 4 {
        return Err("its target's program headers are malformed".into());
    }
    for i in 0..phnum {
        let mut t = [0u8; 4];
        let Some(off) = phoff.checked_add(i * phentsize) else { break };
        if !pread_exact(fd, &mut t, off) {
            break;
        }
        let ty = if little { u32::from_le_bytes(t) } else { u32::from_be_bytes(t) };
        if ty == libc::PT_INTERP {
            return Ok(());
        }
    }
    Err("its target is statically linked (no PT_INTERP)".into())
}

fn image_kind_of(fd: RawFd, depth: u32) -> Result<(), String> {
    image_kind(borrow(fd), depth)
}

// ---------------------------------------------------------------------------------------
// Planning one exec.

/// What to change for one exec, and how to put it back.
struct Plan {
    env: Vec<CString>,
    restore: Vec<(RawFd, FdFlags)>,
}

/// The program's environment array as a list (a null `envp` is empty, as for the kernel).
///
/// # Safety
/// `envp` is null or a null-terminated array of NUL-terminated strings.
unsafe fn env_list<'a>(envp: *const *const c_char) -> Vec<&'a CStr> {
    let mut out = Vec::new();
    if envp.is_null() {
        return out;
    }
    let mut i = 0;
    loop {
        // SAFETY: the caller's null-terminated array.
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            break;
        }
        // SAFETY: each entry is a NUL-terminated string.
        out.push(unsafe { CStr::from_ptr(p) });
        i += 1;
    }
    out
}

fn with_inherit(env: &[&CStr], value: Option<String>) -> Vec<CString> {
    let key = format!("{ENV_INHERIT}=");
    let mut out: Vec<CString> =
        env.iter().filter(|e| !e.to_bytes().starts_with(key.as_bytes())).map(|e| (*e).to_owned()).collect();
    if let Some(v) = value {
        if let Ok(c) = CString::new(format!("{key}{v}")) {
            out.push(c);
        }
    }
    out
}

fn env_ptrs(env: &[CString]) -> Vec<*const c_char> {
    env.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

fn getfd(fd: RawFd) -> Option<FdFlags> {
    rustix::io::fcntl_getfd(borrow(fd)).ok()
}

/// The accelerated connections whose descriptor survives an exec as the descriptors stand
/// now (checked against their recorded identity), grouped by connection.
fn survivors() -> Vec<(Arc<TcpConn>, Vec<RawFd>)> {
    let mut groups: Vec<(Arc<TcpConn>, Vec<RawFd>)> = Vec::new();
    for (fd, c) in table::conns() {
        let Some(fl) = getfd(fd) else { continue };
        if fl.contains(FdFlags::CLOEXEC) || !table::verify(fd) {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &c)) {
            Some((_, fds)) => fds.push(fd),
            None => groups.push((c, vec![fd])),
        }
    }
    groups
}

fn set_flag(restore: &mut Vec<(RawFd, FdFlags)>, fd: RawFd, cloexec: bool) {
    let Some(fl) = getfd(fd) else { return };
    let want = if cloexec { fl | FdFlags::CLOEXEC } else { fl - FdFlags::CLOEXEC };
    if want != fl && rustix::io::fcntl_setfd(borrow(fd), want).is_ok() {
        restore.push((fd, fl));
    }
}

fn entries_for(c: &TcpConn, fds: &[RawFd]) -> Vec<Inherit> {
    let state = c.private_state();
    let memfd = c.region_fd().as_raw_fd();
    let reg = c.registration_raw().unwrap_or(-1);
    fds.iter().map(|&fd| Inherit { fd, memfd, reg, state: state.clone() }).collect()
}

impl Plan {
    /// For an exec of this process (`execve` and friends, or a `vfork` child's).
    fn in_process(env: &[&CStr], target: &Target<'_>) -> Plan {
        let groups = survivors();
        let mut restore = Vec::new();
        if groups.is_empty() {
            return Plan { env: with_inherit(env, None), restore };
        }
        let mut entries = Vec::new();
        match not_continuing(env, target) {
            None => {
                for (c, fds) in &groups {
                    set_flag(&mut restore, c.region_fd().as_raw_fd(), false);
                    if let Some(r) = c.registration_raw() {
                        set_flag(&mut restore, r, false);
                    }
                    entries.extend(entries_for(c, fds));
                }
                crate::decision!("exec: passing {} accelerated connection(s) to the new image", groups.len());
            }
            Some(why) => {
                // Its sockets stay as the program left them; their memory does not cross (the
                // memfds are close-on-exec): each connection goes back to plain TCP first, so
                // that the new image reads and writes the connection itself.
                crate::decision!(
                    "exec: the new image does not continue under ivcom ({why}); {} accelerated connection(s) it keeps go back to TCP",
                    groups.len()
                );
                hand_back_all(&groups, &format!("exec of an image without the library ({why})"));
            }
        }
        let value = (!entries.is_empty()).then(|| encode(&entries));
        Plan { env: with_inherit(env, value), restore }
    }

    fn undo(&mut self) {
        for (fd, fl) in self.restore.drain(..).rev() {
            let _ = rustix::io::fcntl_setfd(borrow(fd), fl);
        }
    }
}

/// Runs an exec of this process: `call` is the real function, given the environment to pass.
///
/// # Safety
/// `envp` is null or a valid environment array.
pub unsafe fn exec_with(
    target: Target<'_>,
    envp: *const *const c_char,
    call: impl FnOnce(*const *const c_char) -> c_int,
) -> c_int {
    if table::conns().is_empty() {
        return call(envp);
    }
    // SAFETY: the caller's contract.
    let env = unsafe { env_list(envp) };
    let mut plan = Plan::in_process(&env, &target);
    let ptrs = env_ptrs(&plan.env);
    EXEC_PENDING.fetch_add(1, Ordering::SeqCst);
    let r = call(ptrs.as_ptr());
    let e = errno();
    plan.undo();
    EXEC_PENDING.fetch_sub(1, Ordering::SeqCst);
    set_errno(e);
    r
}

/// After `fork`, in both processes: every connection's socket is now held by two.
pub fn after_fork() {
    for c in table::all_conns() {
        c.mark_shared();
    }
}

/// In a child of `fork` while another thread of the parent was between making memfds
/// inheritable and its exec: make them close-on-exec again here.
pub fn after_fork_in_child() {
    if EXEC_PENDING.load(Ordering::SeqCst) == 0 {
        return;
    }
    for (_, c) in table::conns() {
        let _ = rustix::io::fcntl_setfd(c.region_fd(), FdFlags::CLOEXEC);
        if let Some(r) = c.registration_raw() {
            let _ = rustix::io::fcntl_setfd(borrow(r), FdFlags::CLOEXEC);
        }
    }
}

/// The environment of this process, as `execv`/`execvp`/`execl` pass it.
pub fn environ() -> *const *const c_char {
    extern "C" {
        static environ: *const *const c_char;
    }
    // SAFETY: reading the C library's `environ` pointer.
    unsafe { environ }
}

// ---------------------------------------------------------------------------------------
// The exec family (glibc's own `execv`, `execvp`, `execl`... call its internal `execve`, not
// ours, so each is intercepted).

/// `execve`.
///
/// # Safety
/// The C contract of `execve`.
pub unsafe fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    if path.is_null() {
        // SAFETY: passed on unchanged.
        return unsafe { real::execve(path, argv, envp) };
    }
    // SAFETY: the caller's NUL-terminated path and environment.
    unsafe { exec_with(Target::Path(CStr::from_ptr(path)), envp, |e| real::execve(path, argv, e)) }
}

/// `execvpe` (and `execvp` with `environ`).
///
/// # Safety
/// The C contract of `execvpe`.
pub unsafe fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    if file.is_null() {
        // SAFETY: passed on unchanged.
        return unsafe { real::execvpe(file, argv, envp) };
    }
    // SAFETY: the caller's NUL-terminated name and environment.
    unsafe { exec_with(Target::Search(CStr::from_ptr(file)), envp, |e| real::execvpe(file, argv, e)) }
}

/// `fexecve`.
///
/// # Safety
/// The C contract of `fexecve`.
pub unsafe fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: the caller's environment.
    unsafe { exec_with(Target::Fd(fd), envp, |e| real::fexecve(fd, argv, e)) }
}

/// `execveat`.
///
/// # Safety
/// The C contract of `execveat`.
pub unsafe fn execveat(
    dirfd: c_int,
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    flags: c_int,
) -> c_int {
    if path.is_null() {
        // SAFETY: passed on unchanged.
        return unsafe { real::execveat(dirfd, path, argv, envp, flags) };
    }
    // SAFETY: the caller's NUL-terminated path and environment.
    unsafe {
        exec_with(Target::At(dirfd, CStr::from_ptr(path), flags), envp, |e| {
            real::execveat(dirfd, path, argv, e, flags)
        })
    }
}

/// Which of `execl`, `execlp`, `execle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `execl`: a path, the caller's environment.
    Path,
    /// `execlp`: searched in `PATH`.
    Search,
    /// `execle`: the environment follows the terminating null argument.
    Env,
}

/// `execl`, `execlp`, `execle`, given the variable arguments read as `args` (the C ABI
/// shim reads a fixed number of them: `args` must hold the terminating null, and for
/// `execle` the environment after it; otherwise `E2BIG`).
///
/// # Safety
/// The C contract of the function; `args` are the caller's arguments in order.
pub unsafe fn execl(kind: ListKind, path: *const c_char, args: &[*const c_char]) -> c_int {
    let Some(end) = args.iter().position(|a| a.is_null()) else {
        set_errno(libc::E2BIG);
        return -1;
    };
    let argv: Vec<*const c_char> = args[..=end].to_vec();
    let envp = match kind {
        ListKind::Env => match args.get(end + 1) {
            Some(e) => *e as *const *const c_char,
            None => {
                set_errno(libc::E2BIG);
                return -1;
            }
        },
        _ => environ(),
    };
    // SAFETY: the caller's contract.
    unsafe {
        if kind == ListKind::Search {
            execvpe(path, argv.as_ptr(), envp)
        } else {
            execve(path, argv.as_ptr(), envp)
        }
    }
}

// ---------------------------------------------------------------------------------------
// posix_spawn: the file actions are recorded as the program adds them, so that the child's
// descriptors can be worked out and our own actions appended to a copy.

/// One recorded file action.
#[derive(Debug, Clone)]
enum Action {
    Close(c_int),
    Dup2(c_int, c_int),
    Open(c_int, CString, c_int, mode_t),
    ClosefromNp(c_int),
    ChdirNp(CString),
    FchdirNp(c_int),
    TcsetpgrpNp(c_int),
}

type Key = usize;
static ACTIONS: Mutex<BTreeMap<Key, Vec<Action>>> = Mutex::new(BTreeMap::new());

fn actions() -> std::sync::MutexGuard<'static, BTreeMap<Key, Vec<Action>>> {
    ACTIONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `posix_spawn_file_actions_init`/`destroy`: starts or ends the record of `fa`.
pub fn fa_reset(fa: *mut libc::posix_spawn_file_actions_t, alive: bool) {
    let mut a = actions();
    if alive {
        a.insert(fa as Key, Vec::new());
    } else {
        a.remove(&(fa as Key));
    }
}

fn fa_push(fa: *const libc::posix_spawn_file_actions_t, act: Action) {
    actions().entry(fa as Key).or_default().push(act);
}

/// Records a close action (after the C library accepted it).
pub fn fa_close(fa: *mut libc::posix_spawn_file_actions_t, fd: c_int) {
    fa_push(fa, Action::Close(fd));
}
/// Records a dup2 action.
pub fn fa_dup2(fa: *mut libc::posix_spawn_file_actions_t, fd: c_int, to: c_int) {
    fa_push(fa, Action::Dup2(fd, to));
}
/// Records an open action.
///
/// # Safety
/// `path` is a NUL-terminated string.
pub unsafe fn fa_open(
    fa: *mut libc::posix_spawn_file_actions_t,
    fd: c_int,
    path: *const c_char,
    oflag: c_int,
    mode: mode_t,
) {
    // SAFETY: the caller's string.
    let p = unsafe { CStr::from_ptr(path) }.to_owned();
    fa_push(fa, Action::Open(fd, p, oflag, mode));
}
/// Records a closefrom action.
pub fn fa_closefrom(fa: *mut libc::posix_spawn_file_actions_t, from: c_int) {
    fa_push(fa, Action::ClosefromNp(from));
}
/// Records a chdir action.
///
/// # Safety
/// `path` is a NUL-terminated string.
pub unsafe fn fa_chdir(fa: *mut libc::posix_spawn_file_actions_t, path: *const c_char) {
    // SAFETY: the caller's string.
    let p = unsafe { CStr::from_ptr(path) }.to_owned();
    fa_push(fa, Action::ChdirNp(p));
}
/// Records an fchdir action.
pub fn fa_fchdir(fa: *mut libc::posix_spawn_file_actions_t, fd: c_int) {
    fa_push(fa, Action::FchdirNp(fd));
}
/// Records a tcsetpgrp action.
pub fn fa_tcsetpgrp(fa: *mut libc::posix_spawn_file_actions_t, fd: c_int) {
    fa_push(fa, Action::TcsetpgrpNp(fd));
}

/// A file actions object of ours, destroyed when dropped.
struct OwnActions(Box<libc::posix_spawn_file_actions_t>);

impl OwnActions {
    fn new() -> Option<Self> {
        // SAFETY: an all-zero object is what `init` expects to overwrite.
        let mut b: Box<libc::posix_spawn_file_actions_t> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: initialising our own object (the real function: it is not recorded).
        (unsafe { real::posix_spawn_file_actions_init(&mut *b) } == 0).then_some(OwnActions(b))
    }

    fn add(&mut self, a: &Action) -> bool {
        let fa: *mut libc::posix_spawn_file_actions_t = &mut *self.0;
        // SAFETY: our own initialised object; strings are NUL-terminated.
        let r = unsafe {
            match a {
                Action::Close(fd) => real::posix_spawn_file_actions_addclose(fa, *fd),
                Action::Dup2(a, b) => real::posix_spawn_file_actions_adddup2(fa, *a, *b),
                Action::Open(fd, p, o, m) => {
                    real::posix_spawn_file_actions_addopen(fa, *fd, p.as_ptr(), *o, *m)
                }
                Action::ClosefromNp(fd) => real::posix_spawn_file_actions_addclosefrom_np(fa, *fd),
                Action::ChdirNp(p) => real::posix_spawn_file_actions_addchdir_np(fa, p.as_ptr()),
                Action::FchdirNp(fd) => real::posix_spawn_file_actions_addfchdir_np(fa, *fd),
                Action::TcsetpgrpNp(fd) => real::posix_spawn_file_actions_addtcsetpgrp_np(fa, *fd),
            }
        };
        r == 0
    }

    fn ptr(&self) -> *const libc::posix_spawn_file_actions_t {
        &*self.0
    }
}

impl Drop for OwnActions {
    fn drop(&mut self) {
        // SAFETY: destroying our own initialised object.
        unsafe { real::posix_spawn_file_actions_destroy(&mut *self.0) };
    }
}

/// Where each connection's descriptors end up in a spawned child: `(conn, child fds,
/// memfd still open in the child)`.
fn simulate(groups: &[(Arc<TcpConn>, Vec<RawFd>)], acts: &[Action]) -> Vec<(Arc<TcpConn>, Vec<RawFd>, bool)> {
    // child fd -> (group index, close-on-exec)
    let mut map: BTreeMap<RawFd, (usize, bool)> = BTreeMap::new();
    for (gi, (c, _)) in groups.iter().enumerate() {
        // Every descriptor of the connection, close-on-exec or not: a dup2 may copy one.
        for (fd, d) in table::conns() {
            if Arc::ptr_eq(&d, c) {
                let cx = getfd(fd).is_none_or(|f| f.contains(FdFlags::CLOEXEC));
                map.insert(fd, (gi, cx));
            }
        }
    }
    let mut memfd_open: Vec<bool> = vec![true; groups.len()];
    let memfds: Vec<RawFd> = groups.iter().map(|(c, _)| c.region_fd().as_raw_fd()).collect();
    let kill = |map: &mut BTreeMap<RawFd, (usize, bool)>, open: &mut Vec<bool>, fd: RawFd| {
        map.remove(&fd);
        for (i, m) in memfds.iter().enumerate() {
            if *m == fd {
                open[i] = false;
            }
        }
    };
    for a in acts {
        match a {
            Action::Close(fd) | Action::Open(fd, ..) => kill(&mut map, &mut memfd_open, *fd),
            Action::Dup2(a, b) if a == b => {
                if let Some(v) = map.get_mut(a) {
                    v.1 = false;
                }
            }
            Action::Dup2(a, b) => {
                let src = map.get(a).copied();
                kill(&mut map, &mut memfd_open, *b);
                if let Some((g, _)) = src {
                    map.insert(*b, (g, false));
                }
            }
            Action::ClosefromNp(from) => {
                let hi: Vec<RawFd> = map.range(*from..).map(|(k, _)| *k).collect();
                for fd in hi {
                    kill(&mut map, &mut memfd_open, fd);
                }
                for (i, m) in memfds.iter().enumerate() {
                    if *m >= *from {
                        memfd_open[i] = false;
                    }
                }
            }
            _ => {}
        }
    }
    let mut out: Vec<(Arc<TcpConn>, Vec<RawFd>, bool)> =
        groups.iter().enumerate().map(|(i, (c, _))| (c.clone(), Vec::new(), memfd_open[i])).collect();
    for (fd, (g, cx)) in map {
        if !cx {
            out[g].1.push(fd);
        }
    }
    out.retain(|(_, fds, _)| !fds.is_empty());
    out
}

/// `posix_spawn` and `posix_spawnp` (`search`): the same rules as an exec, for the child.
///
/// # Safety
/// The C contract of `posix_spawn`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn posix_spawn(
    pid: *mut pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
    search: bool,
) -> c_int {
    let call = |fa: *const libc::posix_spawn_file_actions_t, envp: *const *mut c_char| {
        // SAFETY: the caller's contract; `fa` and `envp` are the program's or ours, valid.
        unsafe {
            if search {
                real::posix_spawnp(pid, path, fa, attr, argv, envp)
            } else {
                real::posix_spawn(pid, path, fa, attr, argv, envp)
            }
        }
    };
    let groups: Vec<(Arc<TcpConn>, Vec<RawFd>)> = {
        let mut g: Vec<(Arc<TcpConn>, Vec<RawFd>)> = Vec::new();
        for (fd, c) in table::conns() {
            if !table::verify(fd) {
                continue;
            }
            match g.iter_mut().find(|(x, _)| Arc::ptr_eq(x, &c)) {
                Some((_, v)) => v.push(fd),
                None => g.push((c, vec![fd])),
            }
        }
        g
    };
    if groups.is_empty() || path.is_null() {
        return call(fa, envp);
    }
    let recorded: Option<Vec<Action>> = if fa.is_null() {
        Some(Vec::new())
    } else {
        // SAFETY: the program's initialised file actions. glibc's `<spawn.h>` lays it out as
        // `{ int __allocated; int __used; ... }`: the second int is the count of actions.
        let used = unsafe { fa.cast::<c_int>().add(1).read() }.max(0) as usize;
        actions().get(&(fa as Key)).filter(|v| v.len() == used).cloned()
    };
    // SAFETY: the caller's environment array.
    let env = unsafe { env_list(envp.cast()) };
    // SAFETY: the caller's NUL-terminated path.
    let p = unsafe { CStr::from_ptr(path) };
    let target = if search { Target::Search(p) } else { Target::Path(p) };
    let Some(recorded) = recorded else {
        // File actions we did not see being made: the child gets what they give it, and no
        // channel memory (the memfds are close-on-exec).
        crate::decision!("posix_spawn: file actions not recorded; no channel passed to the child");
        hand_back_all(&survivors(), "posix_spawn with file actions the library did not see");
        let envv = with_inherit(&env, None);
        let ptrs = env_ptrs(&envv);
        return call(fa, ptrs.as_ptr().cast());
    };
    let child = simulate(&groups, &recorded);
    let Some(mut own) = OwnActions::new() else { return libc::ENOMEM };
    for a in &recorded {
        if !own.add(a) {
            return libc::ENOMEM;
        }
    }
    let mut entries = Vec::new();
    let why = if child.is_empty() { None } else { not_continuing(&env, &target) };
    if why.is_none() {
        // Connections whose memory the program's own actions close in the child (a
        // `closefrom` below the memfd): the child reads the socket itself.
        let cut: Vec<(Arc<TcpConn>, Vec<RawFd>)> = groups
            .iter()
            .filter(|(g, _)| child.iter().any(|(c, _, open)| !*open && Arc::ptr_eq(g, c)))
            .cloned()
            .collect();
        hand_back_all(&cut, "posix_spawn: the child's file actions close the channel's memory");
    }
    if let Some(w) = &why {
        let leaving: Vec<(Arc<TcpConn>, Vec<RawFd>)> =
            groups.iter().filter(|(g, _)| child.iter().any(|(c, _, _)| Arc::ptr_eq(g, c))).cloned().collect();
        hand_back_all(&leaving, &format!("posix_spawn of an image without the library ({w})"));
    }
    // The child holds these sockets too (whether it continues under the library or not).
    let mut held: Vec<&Arc<TcpConn>> = Vec::new();
    for (c, _, _) in &child {
        if !held.iter().any(|h| Arc::ptr_eq(h, c)) {
            c.mark_shared();
            c.count_holder(true);
            held.push(c);
        }
    }
    for (c, fds, memfd_open) in &child {
        if why.is_none() && *memfd_open {
            let m = c.region_fd().as_raw_fd();
            own.add(&Action::Dup2(m, m));
            let mut es = entries_for(c, fds);
            let reg_open = c.registration_raw().is_some_and(|r| {
                !recorded.iter().any(|a| match a {
                    Action::Close(f) | Action::Open(f, ..) => *f == r,
                    Action::Dup2(_, b) => *b == r,
                    Action::ClosefromNp(f) => r >= *f,
                    _ => false,
                })
            });
            if reg_open {
                let r = c.registration_raw().unwrap_or(-1);
                own.add(&Action::Dup2(r, r));
            } else {
                for e in &mut es {
                    e.reg = -1;
                }
            }
            entries.extend(es);
        }
    }
    if !child.is_empty() {
        match &why {
            None => crate::decision!("posix_spawn: passing {} accelerated connection(s) to the child", child.len()),
            Some(w) => crate::decision!(
                "posix_spawn: the child does not continue under ivcom ({w}); it keeps the socket(s) of {} accelerated connection(s) but not their channel",
                child.len()
            ),
        }
    }
    let envv = with_inherit(&env, (!entries.is_empty()).then(|| encode(&entries)));
    let ptrs = env_ptrs(&envv);
    let r = call(own.ptr(), ptrs.as_ptr().cast());
    if r != 0 {
        for c in held {
            c.count_holder(false);
        }
    }
    r
}

/// `system` and `popen` run `/bin/sh` through the C library's internal spawn, which passes
/// neither our variable nor our file actions: the shell keeps the sockets the program left
/// inheritable and gets no channel memory (the memfds are close-on-exec).
pub fn around_shell<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let groups = survivors();
    if !groups.is_empty() {
        crate::decision!(
            "{what}: the shell keeps the socket(s) of {} accelerated connection(s); they go back to TCP",
            groups.len()
        );
        hand_back_all(&groups, &format!("{what} runs a shell without the library"));
    }
    f()
}

/// Hands each connection back to TCP (`TcpConn::hand_back`, leaving), through one of its
/// descriptors in this process.
fn hand_back_all(groups: &[(Arc<TcpConn>, Vec<RawFd>)], why: &str) {
    for (c, fds) in groups {
        if let Some(&fd) = fds.first() {
            c.hand_back(fd, why, crate::conn::Handback::Leaving);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The new image.

fn is_our_memfd(fd: RawFd) -> bool {
    let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else { return false };
    let l = link.to_string_lossy();
    let want = format!("/memfd:{}", crate::conn::MEMFD_NAME);
    (l == want || l.starts_with(&format!("{want} ")))
        && ivcom_ring::shm::check_memfd(borrow(fd), crate::conn::MAX_REGION).is_ok()
}

fn is_registration_socket(fd: RawFd) -> bool {
    let b = borrow(fd);
    rustix::net::sockopt::socket_domain(b).is_ok_and(|d| d == rustix::net::AddressFamily::UNIX)
        && rustix::net::sockopt::socket_type(b).is_ok_and(|t| t == rustix::net::SocketType::SEQPACKET)
}

/// Whether socket `fd` is the connection whose tuple the region of `memfd` records, seen
/// from `side`.
fn tuple_matches(fd: RawFd, memfd: RawFd, side: Side) -> Result<(), String> {
    if net::tcp_domain(fd).is_none() {
        return Err("not a TCP socket".into());
    }
    let (Some(local), Some(peer)) = (net::local(fd), net::peer(fd)) else {
        return Err("not a connected socket".into());
    };
    let (l, p) = (Endpoint::of(local), Endpoint::of(peer));
    let want = match side {
        Side::Connector => Tuple { src: l, dst: p }.to_bytes(),
        Side::Acceptor => Tuple { src: p, dst: l }.to_bytes(),
    };
    let size =
        ivcom_ring::shm::check_memfd(borrow(memfd), crate::conn::MAX_REGION).map_err(|e| e.to_string())?;
    let map = ivcom_ring::MappedRegion::map(borrow(memfd), 0, size).map_err(|e| e.to_string())?;
    let t = ivcom_ring::layout::tcp::tuple(map.region()).map_err(|e| e.to_string())?;
    if t == want {
        Ok(())
    } else {
        Err(format!("the region records another connection than {l} - {p}"))
    }
}

/// At start: takes over the connections the previous program image passed in
/// [`ENV_INHERIT`] (and removes the variable). Each entry must name a connected TCP socket
/// whose addresses are the tuple its region records and a sealed memfd of ours; memfds and
/// registration connections not taken are closed.
pub fn at_start() {
    let Some(v) = std::env::var_os(ENV_INHERIT) else { return };
    let key = CString::new(ENV_INHERIT).expect("no NUL");
    // SAFETY: start-up of the library, before the program's own code runs.
    unsafe { libc::unsetenv(key.as_ptr()) };
    let (entries, bad) = decode(&v.to_string_lossy());
    for b in bad {
        crate::decision!("exec: {ENV_INHERIT}: {b}; ignored");
    }
    let mut conns: BTreeMap<RawFd, Arc<TcpConn>> = BTreeMap::new();
    // Memfds verified as ours, and those whose ownership was taken (resumed, or closed by a
    // failed resume).
    let mut ours: Vec<RawFd> = Vec::new();
    let mut consumed: Vec<RawFd> = Vec::new();
    let mut regs_seen: Vec<RawFd> = Vec::new();
    let mut regs_taken: Vec<RawFd> = Vec::new();
    let mut stdio: Vec<(RawFd, Arc<TcpConn>)> = Vec::new();
    for e in &entries {
        if e.reg >= 0 && !regs_seen.contains(&e.reg) {
            regs_seen.push(e.reg);
        }
        if e.fd == e.memfd || e.fd == e.reg || e.memfd == e.reg {
            crate::decision!("exec: entry for fd {} reuses a descriptor; ignored", e.fd);
            continue;
        }
        if !ours.contains(&e.memfd) {
            if !is_our_memfd(e.memfd) {
                crate::decision!(
                    "exec: fd {} is not a sealed ivcom memfd; fd {} left as it is",
                    e.memfd,
                    e.fd
                );
                continue;
            }
            ours.push(e.memfd);
        }
        if let Err(why) = tuple_matches(e.fd, e.memfd, e.state.side) {
            crate::decision!("exec: fd {} not taken over ({why})", e.fd);
            continue;
        }
        let conn = match conns.get(&e.memfd) {
            Some(c) => c.clone(),
            None if consumed.contains(&e.memfd) => continue,
            None => {
                consumed.push(e.memfd);
                // SAFETY: the memfd passed on by the previous image (checked above) becomes
                // the connection's; no other owner exists in this image.
                let owned = unsafe { OwnedFd::from_raw_fd(e.memfd) };
                let reg = (e.reg >= 0 && !regs_taken.contains(&e.reg) && is_registration_socket(e.reg)).then(
                    || {
                        regs_taken.push(e.reg);
                        let _ = rustix::io::fcntl_setfd(borrow(e.reg), FdFlags::CLOEXEC);
                        // SAFETY: the registration connection passed on with it; no other owner.
                        unsafe { OwnedFd::from_raw_fd(e.reg) }
                    },
                );
                match TcpConn::resume(owned, &e.state, reg) {
                    Ok(c) => {
                        let c = Arc::new(c);
                        conns.insert(e.memfd, c.clone());
                        c
                    }
                    Err(err) => {
                        // The memfd (and registration) were closed with the failed connection.
                        crate::decision!("exec: cannot take over fd {} ({err})", e.fd);
                        continue;
                    }
                }
            }
        };
        if table::set(e.fd, Entry::Conn(conn.clone())) {
            crate::decision!("exec: took over accelerated connection fd {}", e.fd);
            if e.fd <= 2 {
                stdio.push((e.fd, conn.clone()));
            }
        }
    }
    // On standard input, output or error the program may use stdio, which reads and writes
    // through the C library's internals, past the library: hand those back, once every
    // connection is taken over (the other end may be here too, and then follows at once).
    for (fd, conn) in stdio {
        conn.hand_back(
            fd,
            "the connection is a standard stream of the new image (stdio)",
            crate::conn::Handback::Leaving,
        );
    }
    for m in ours {
        if !consumed.contains(&m) {
            // SAFETY: an inherited memfd of ours that nothing in this image uses.
            unsafe { real::close(m) };
        }
    }
    for r in regs_seen {
        if !regs_taken.contains(&r) && is_registration_socket(r) {
            // SAFETY: an inherited registration connection that nothing in this image uses.
            unsafe { real::close(r) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(fd: RawFd) -> Inherit {
        Inherit {
            fd,
            memfd: fd + 1,
            reg: -1,
            state: Private {
                side: Side::Connector,
                claim_seen: true,
                switched: true,
                tx_tail: 1 << 40,
                rx_head: 7,
                tcp_sent: 12,
                tcp_read: 0,
                peer_switch: None,
                shut_rd: false,
                shut_wr: true,
                eof: false,
                shared: true,
                error: 104,
                error_reported: true,
                tcp_opts: [1, 0],
            },
        }
    }

    #[test]
    fn round_trip() {
        let mut b = sample(9);
        b.state.side = Side::Acceptor;
        b.state.peer_switch = Some(33);
        b.reg = 40;
        let v = vec![sample(5), b];
        let (got, bad) = decode(&encode(&v));
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(got, v);
    }

    #[test]
    fn rejects_bad_entries() {
        assert!(decode("2:5,6,-1,c,0,0,0,0,0,-,0,0,0").0.is_empty());
        let (got, bad) =
            decode("1:5,6,-1,x,0,0,0,0,0,-,0,0,0;-3,6,-1,c,0,0,0,0,0,-,0,0,0;5,6,-1,c,0,0,0,0,0,-,0,0");
        assert!(got.is_empty());
        assert_eq!(bad.len(), 3);
        let (got, _) = decode("1:70000,6,-1,c,0,0,0,0,0,-,0,0,0");
        assert!(got.is_empty(), "descriptor out of range accepted");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,200}") {
            let _ = decode(&s);
            let _ = decode(&format!("1:{s}"));
        }
    }
}
