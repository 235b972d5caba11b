//! Listeners under ivcom announce themselves in `<runtime dir>/tcp`; connecting programs
//! find them there and register their channel before the TCP handshake.
//!
//! An announcement is two files named `<port>-<netns>-<pid>-<n>`: `.ann` (text: what the
//! listener is bound to, and its namespace's addresses when it is bound to a wildcard) and
//! `.sock` (a Unix seqpacket socket that takes registrations). The listener holds a shared
//! `flock` on `.ann` for as long as any process has the listening socket open; a file nobody
//! holds is stale and whoever finds it removes it.
//!
//! A registration is one packet on its own connection to `.sock`: the connection's 4-tuple,
//! the channel's memfd and the connecting TCP socket itself. The accepting side claims the
//! channel only if that socket is the other end of the connection it accepted, and answers
//! with a claim packet carrying its accepted socket, which the connecting side checks the same
//! way before it uses the ring ([`crate::verify`]). Nothing in the runtime directory is
//! trusted further: the directory must be the user's own ([`ivcom::rundir`]), files are opened
//! relative to it without following links or blocking, must be the user's regular files and
//! are read with a size bound, and both ends of a registration connection check each other's
//! credentials (`SO_PEERCRED`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ivcom::rundir::RuntimeDir;
use libc::c_int;
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::net::{is_loopback, is_unspecified, Endpoint, Tuple};

const MAGIC: &[u8; 4] = b"IVTC";
const VERSION: u16 = 2;
/// Packet kinds on a registration connection.
const KIND_REGISTER: u16 = 1;
const KIND_CLAIM: u16 = 2;
const HEADER_LEN: usize = 8;
const REG_LEN: usize = HEADER_LEN + 2 * (16 + 2);

/// Largest announcement file read (a wildcard listener lists its namespace's addresses).
pub const MAX_ANNOUNCEMENT: u64 = 64 * 1024;
/// Most registrations a listener keeps waiting for their connections to be accepted; past
/// it the oldest are dropped (their connections stay on plain TCP). Each holds three
/// descriptors (the registration connection, the memfd, the connecting socket).
pub const MAX_PENDING: usize = 256;
/// Most directory entries looked at per `connect` (the directory is the user's own; this only
/// bounds the work a flooded directory can cause).
const MAX_SCAN: usize = 4096;

fn header(kind: u16) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&kind.to_le_bytes());
    b
}

fn kind_of(b: &[u8]) -> Option<u16> {
    if b.len() < HEADER_LEN || &b[..4] != MAGIC || b[4..6] != VERSION.to_le_bytes() {
        return None;
    }
    Some(u16::from_le_bytes([b[6], b[7]]))
}

/// Encodes a registration packet.
pub fn encode(t: &Tuple) -> [u8; REG_LEN] {
    let mut b = [0u8; REG_LEN];
    b[..HEADER_LEN].copy_from_slice(&header(KIND_REGISTER));
    b[8..24].copy_from_slice(&t.src.ip.octets());
    b[24..26].copy_from_slice(&t.src.port.to_le_bytes());
    b[26..42].copy_from_slice(&t.dst.ip.octets());
    b[42..44].copy_from_slice(&t.dst.port.to_le_bytes());
    b
}

/// Decodes a registration packet; `None` for anything else.
pub fn decode(b: &[u8]) -> Option<Tuple> {
    if b.len() != REG_LEN || kind_of(b)? != KIND_REGISTER {
        return None;
    }
    let ip = |r: std::ops::Range<usize>| -> Option<std::net::Ipv6Addr> {
        Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&b[r]).ok()?))
    };
    let port = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    Some(Tuple {
        src: Endpoint { ip: ip(8..24)?, port: port(24) },
        dst: Endpoint { ip: ip(26..42)?, port: port(42) },
    })
}

/// Whether `b` is a claim packet.
pub fn is_claim(b: &[u8]) -> bool {
    b.len() == HEADER_LEN && kind_of(b) == Some(KIND_CLAIM)
}

/// What an `.ann` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Network namespace of the listener.
    pub netns: u64,
    /// Bound address (may be a wildcard) and port.
    pub bound: Endpoint,
    /// The namespace's addresses, for a wildcard listener.
    pub locals: Vec<std::net::Ipv6Addr>,
    /// An IPv6 listener that takes no IPv4 connections (`IPV6_V6ONLY`).
    pub v6only: bool,
    /// The listening socket in the announcing process: its descriptor number there and its
    /// inode (what a connecting side checks before it registers, [`crate::verify::announcer`]).
    pub listener: Option<(i32, u64)>,
}

impl Announcement {
    /// The text of the `.ann` file.
    pub fn render(&self) -> String {
        let mut s = format!(
            "ivcom-tcp {VERSION}\nnetns {}\naddr {}\nport {}\nv6only {}\n",
            self.netns, self.bound.ip, self.bound.port, self.v6only as u8
        );
        if let Some((fd, ino)) = self.listener {
            s.push_str(&format!("fd {fd}\ninode {ino}\n"));
        }
        for l in &self.locals {
            s.push_str(&format!("local {l}\n"));
        }
        s
    }

    /// Parses an announcement (untrusted text of the user's own runtime directory).
    pub fn parse(s: &str) -> Option<Self> {
        let mut lines = s.lines();
        if lines.next()? != format!("ivcom-tcp {VERSION}") {
            return None;
        }
        let (mut netns, mut addr, mut port, mut locals, mut v6only) = (None, None, None, Vec::new(), false);
        let (mut fd, mut inode) = (None, None);
        for l in lines {
            let (k, v) = l.split_once(' ')?;
            match k {
                "netns" => netns = v.parse().ok(),
                "addr" => addr = v.parse().ok(),
                "port" => port = v.parse().ok(),
                "local" => locals.push(v.parse().ok()?),
                "v6only" => v6only = v == "1",
                "fd" => fd = v.parse().ok(),
                "inode" => inode = v.parse().ok(),
                _ => {}
            }
        }
        let listener = fd.zip(inode);
        Some(Announcement {
            netns: netns?,
            bound: Endpoint { ip: addr?, port: port? },
            locals,
            v6only,
            listener,
        })
    }

    /// Whether a connection from namespace `my_netns` (whose own addresses `my_addrs` gives)
    /// to `dst` reaches this listener.
    pub fn serves(
        &self,
        dst: &Endpoint,
        my_netns: u64,
        my_addrs: &mut dyn FnMut() -> Vec<std::net::Ipv6Addr>,
    ) -> bool {
        if self.bound.port != dst.port {
            return false;
        }
        // A wildcard listener takes its own family: IPv4 only for 0.0.0.0; IPv6, and IPv4 too
        // unless IPV6_V6ONLY, for [::].
        let v4 = dst.ip.to_ipv4_mapped().is_some();
        let wildcard_ok = if self.bound.ip.to_ipv4_mapped().is_some() { v4 } else { !v4 || !self.v6only };
        let addr_ok =
            |ip: &std::net::Ipv6Addr| (is_unspecified(&self.bound.ip) && wildcard_ok) || self.bound.ip == *ip;
        if self.netns == my_netns {
            addr_ok(&dst.ip) && (is_loopback(&dst.ip) || my_addrs().contains(&dst.ip))
        } else {
            // Another namespace: reachable at one of its own addresses, never at loopback,
            // and not if the address is also ours (then the connection stays in our namespace).
            !is_loopback(&dst.ip)
                && (self.bound.ip == dst.ip
                    || (is_unspecified(&self.bound.ip) && self.locals.contains(&dst.ip)))
                && !my_addrs().contains(&dst.ip)
        }
    }
}

/// A registration waiting for its connection to be accepted.
#[derive(Debug)]
struct Pending {
    tuple: Tuple,
    conn: OwnedFd,
    region: OwnedFd,
    /// The connecting side's TCP socket, until it is checked: proof of which connection
    /// this is. Checked as soon as it is connected and then closed at once (a descriptor we
    /// hold keeps the connecting side's socket open: its FIN would wait for us).
    socket: Option<OwnedFd>,
}

/// A registration matched to an accepted connection.
#[derive(Debug)]
pub struct Registration {
    /// The channel's memfd (untrusted: validate before use).
    pub region: OwnedFd,
    /// The registration connection, to answer with the claim ([`confirm`]).
    pub conn: OwnedFd,
}

/// Tells the connecting side on `conn` that its channel is claimed. Failure only means the
/// connecting side gave up (it then stays on TCP).
pub fn confirm(conn: &OwnedFd) -> io::Result<()> {
    ivcom::sys::send_packet(conn.as_fd(), &header(KIND_CLAIM), &[])
}

/// An announced listening socket.
#[derive(Debug)]
pub struct Listening {
    sock: OwnedFd,
    lock: Option<OwnedFd>,
    dir: &'static RuntimeDir,
    stem: String,
    stash: Mutex<Vec<Pending>>,
    /// Registration connections accepted before their packet arrived, with when each was
    /// first seen.
    unread: Mutex<Vec<(OwnedFd, Instant)>>,
}

/// The longest an `accept` waits for the registration of a connecting side whose
/// registration connection is open but whose packet has not arrived: it connects its TCP
/// socket first (the kernel picks the source port, as without the library) and sends the
/// 4-tuple right after, so the packet normally follows within microseconds; the wait covers
/// a connecting side that was preempted in between. A connection whose registration comes
/// later stays plain TCP.
pub const REGISTRATION_WAIT: Duration = Duration::from_millis(50);

/// A registration connection whose packet has not arrived after this long is not waited for
/// (a connecting side that died, or one that will never send).
const UNREAD_FRESH: Duration = Duration::from_millis(200);

/// A registration connection that sent nothing for this long is dropped.
const UNREAD_MAX_AGE: Duration = Duration::from_secs(10);

static SEQ: AtomicU32 = AtomicU32::new(0);

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

impl Listening {
    /// Announces the listening socket `fd`, bound to `bound` in namespace `netns`, in `dir`
    /// (the verified `tcp` directory).
    pub fn announce(
        dir: &'static RuntimeDir,
        fd: c_int,
        bound: Endpoint,
        netns: u64,
        v6only: bool,
    ) -> io::Result<Self> {
        // SAFETY: `fd` is the program's listening socket, open for the `listen` call we serve.
        let ino = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) })?.st_ino;
        let locals = if is_unspecified(&bound.ip) { crate::net::local_addrs() } else { Vec::new() };
        let ann = Announcement { netns, bound, locals, v6only, listener: Some((fd, ino)) };
        let stem = format!(
            "{}-{}-{}-{}",
            bound.port,
            netns,
            rustix::process::getpid().as_raw_nonzero(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let (sock_name, ann_name, tmp) =
            (format!("{stem}.sock"), format!("{stem}.ann"), format!("{stem}.tmp"));
        let _ = dir.unlink(&sock_name);
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&sock, &dir.unix_addr(&sock_name)?)?;
        let lock = (|| -> io::Result<OwnedFd> {
            // Only we may register: the directory is ours, and so is the socket file.
            dir.chmod(&sock_name, 0o600)?;
            rustix::net::listen(&sock, MAX_PENDING as i32)?;
            let f = dir.open_file(
                &tmp,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
                Mode::from_raw_mode(0o600),
            )?;
            rustix::io::write(&f, ann.render().as_bytes())?;
            rustix::fs::flock(&f, FlockOperation::LockShared)?;
            dir.rename(&tmp, &ann_name)?;
            Ok(f)
        })();
        let lock = match lock {
            Ok(l) => crate::fds::lift(l),
            Err(e) => {
                let _ = dir.unlink(&tmp);
                let _ = dir.unlink(&sock_name);
                return Err(e);
            }
        };
        let sock = crate::fds::lift(sock);
        Ok(Listening {
            sock,
            lock: Some(lock),
            dir,
            stem,
            stash: Mutex::new(Vec::new()),
            unread: Mutex::new(Vec::new()),
        })
    }

    /// The name of the announcement file in the runtime directory's `tcp/`.
    pub fn name(&self) -> String {
        format!("{}.ann", self.stem)
    }

    /// Takes in the registrations that arrived (at most [`MAX_PENDING`] kept). A
    /// registration connection accepted before its packet arrived is kept and read later.
    fn collect(&self, stash: &mut Vec<Pending>, our_netns: u64) {
        let mut unread = self.unread.lock().unwrap_or_else(|e| e.into_inner());
        let mut waiting: Vec<(OwnedFd, Instant)> = std::mem::take(&mut *unread);
        let now = Instant::now();
        for _ in 0..MAX_PENDING {
            let Ok(conn) = rustix::net::accept_with(&self.sock, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
            else {
                break;
            };
            // Only our own user registers (the socket file is 0600 in our own directory;
            // this also holds if either was changed behind our back).
            match rustix::net::sockopt::socket_peercred(&conn) {
                Ok(c) if c.uid.as_raw() == euid() => waiting.push((crate::fds::lift(conn), now)),
                _ => continue,
            }
        }
        for (conn, since) in waiting {
            let mut buf = [0u8; REG_LEN + 1];
            let (n, fds) = match ivcom::sys::recv_packet(conn.as_fd(), &mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if unread.len() < MAX_PENDING && since.elapsed() < UNREAD_MAX_AGE {
                        unread.push((conn, since));
                    }
                    continue;
                }
                Err(_) => continue,
            };
            let (Some(tuple), Ok([region, socket])) = (decode(&buf[..n]), <[OwnedFd; 2]>::try_from(fds))
            else {
                continue;
            };
            if stash.len() >= MAX_PENDING {
                stash.remove(0);
            }
            let (region, socket) = (crate::fds::lift(region), crate::fds::lift(socket));
            stash.push(Pending { tuple, conn, region, socket: Some(socket) });
        }
        drop(unread);
        // Check the sockets that are connected by now and let go of them.
        for p in stash.iter_mut() {
            let Some(s) = &p.socket else { continue };
            let ours = Tuple { src: p.tuple.dst, dst: p.tuple.src };
            match crate::verify::other_end(s.as_fd(), &ours, our_netns) {
                Ok(()) => p.socket = None,
                Err(crate::verify::NotOurPeer::NotConnected) => {}
                Err(e) => {
                    crate::decision!("registration from {} ignored: {e}", p.tuple.src);
                    p.tuple = Tuple::UNKNOWN;
                    p.socket = None;
                }
            }
        }
        stash.retain(|p| p.tuple != Tuple::UNKNOWN);
        // Registrations whose connecting side hung up are dead.
        if stash.is_empty() {
            return;
        }
        use rustix::event::{PollFd, PollFlags};
        let mut fds: Vec<PollFd<'_>> = stash.iter().map(|p| PollFd::new(&p.conn, PollFlags::RDHUP)).collect();
        let _ = rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }));
        let dead: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR))
            .collect();
        drop(fds);
        let mut i = 0;
        stash.retain(|_| {
            i += 1;
            !dead[i - 1]
        });
    }

    /// Takes the registration of the connection `accepted` (whose ends are `tuple`: the peer
    /// as `src`, our address as `dst`), if there is one whose connecting socket proves to be
    /// the other end of it. Registrations for the tuple that fail the proof are dropped, and
    /// why is logged.
    pub fn take(&self, tuple: &Tuple, accepted: c_int) -> Option<Registration> {
        let our_netns = crate::verify::netns_cookie(accepted)?;
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + REGISTRATION_WAIT;
        loop {
            self.collect(&mut stash, our_netns);
            // A registration checked in `collect` proved a connected socket with this very
            // 4-tuple in our namespace (or one we vouch for), which the kernel gives to one
            // connection only: ours.
            if let Some(at) = stash.iter().position(|p| p.tuple == *tuple && p.socket.is_none()) {
                let p = stash.swap_remove(at);
                return Some(Registration { region: p.region, conn: p.conn });
            }
            // Registrations still on their way: wait (bounded) for their packets.
            let left = deadline.saturating_duration_since(Instant::now());
            let unread = self.unread.lock().unwrap_or_else(|e| e.into_inner());
            let fresh: Vec<&(OwnedFd, Instant)> =
                unread.iter().filter(|(_, since)| since.elapsed() < UNREAD_FRESH).collect();
            if fresh.is_empty() || left.is_zero() {
                return None;
            }
            use rustix::event::{PollFd, PollFlags};
            let mut fds: Vec<PollFd<'_>> =
                fresh.iter().map(|(c, _)| PollFd::new(c, PollFlags::IN | PollFlags::RDHUP)).collect();
            let t = rustix::event::Timespec { tv_sec: 0, tv_nsec: left.as_nanos().min(999_999_999) as i64 };
            if rustix::event::poll(&mut fds, Some(&t)).unwrap_or(0) == 0 {
                return None;
            }
        }
    }
}
impl Drop for Listening {
    fn drop(&mut self) {
        // Close our hold on the announcement, then remove it if no other process (a fork
        // sharing the listening socket) still holds it.
        self.lock = None;
        remove_if_stale(self.dir, &self.name());
    }
}

/// Opens an announcement file without following a link or blocking (a FIFO planted in its
/// place must not hang us), and checks that it is a regular file of ours of bounded size.
fn open_announcement(dir: &RuntimeDir, name: &str) -> Option<(OwnedFd, u64)> {
    let f = dir.open_file(name, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&f).ok()?;
    let regular = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
    (regular && st.st_uid == euid() && (st.st_size as u64) <= MAX_ANNOUNCEMENT)
        .then_some((f, st.st_size as u64))
}

/// Reads and parses an announcement (see [`open_announcement`]); at most
/// [`MAX_ANNOUNCEMENT`] bytes are read whatever the file claims.
fn read_announcement(f: &OwnedFd, size: u64) -> Option<Announcement> {
    let mut buf = vec![0u8; size.min(MAX_ANNOUNCEMENT) as usize];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(f, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
    Announcement::parse(std::str::from_utf8(&buf[..got]).ok()?)
}

/// Removes an announcement (both files) that no process holds. Returns whether it was stale.
pub fn remove_if_stale(dir: &RuntimeDir, ann: &str) -> bool {
    let Some((f, _)) = open_announcement(dir, ann) else { return false };
    if rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        return false;
    }
    if let Some(stem) = ann.strip_suffix(".ann") {
        let _ = dir.unlink(&format!("{stem}.sock"));
    }
    let _ = dir.unlink(ann);
    true
}

/// Names of the entries of `dir` (at most [`MAX_SCAN`]).
fn entries(dir: &RuntimeDir) -> Vec<String> {
    let Ok(mut rd) = rustix::fs::Dir::read_from(dir.fd()) else { return Vec::new() };
    let mut out = Vec::new();
    while let Some(Ok(e)) = rd.read() {
        if out.len() >= MAX_SCAN {
            break;
        }
        if let Ok(n) = e.file_name().to_str() {
            out.push(n.to_owned());
        }
    }
    out
}

/// Removes every stale announcement in `dir` (what `ivcom run` does after its program exits).
pub fn sweep(dir: &RuntimeDir) -> usize {
    entries(dir).iter().filter(|n| n.ends_with(".ann") && remove_if_stale(dir, n)).count()
}

/// A live announced listener that a connection reaches.
#[derive(Debug, Clone)]
pub struct Found {
    /// Name of its registration socket in the directory.
    pub sock: String,
    /// What it announced.
    pub announcement: Announcement,
}

/// Recent answers of [`find`]: destination and namespace, the directory's modification time
/// they were read under, when, and the answer.
type FindCache = Vec<((Endpoint, u64), (i64, i64), Instant, Option<Found>)>;
static FIND_CACHE: Mutex<FindCache> = Mutex::new(Vec::new());

/// How long a [`find`] answer is reused while the directory did not change.
pub const FIND_TTL: Duration = Duration::from_secs(1);

/// Forgets what [`find`] answered for `dst` (its registration failed: the listener may have
/// died without withdrawing its announcement, which a fresh scan removes).
pub fn forget_found(dst: &Endpoint, my_netns: u64) {
    FIND_CACHE.lock().unwrap_or_else(|e| e.into_inner()).retain(|(k, ..)| *k != (*dst, my_netns));
}

/// Finds a live announced listener that a connection to `dst` reaches. An answer is reused
/// for [`FIND_TTL`] while the directory's modification time stays what it was (announcing
/// and withdrawing change it; one `fstat` instead of a scan per connection), unless that time
/// was too recent to tell changes apart (the file system's clock is coarse).
pub fn find(dir: &RuntimeDir, dst: &Endpoint, my_netns: u64) -> Option<Found> {
    let key = (*dst, my_netns);
    let mtime = rustix::fs::fstat(dir.fd()).ok().map(|st| (st.st_mtime, st.st_mtime_nsec as i64));
    if let Some(m) = mtime {
        let cache = FIND_CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((.., found)) =
            cache.iter().find(|(k, at, when, _)| *k == key && *at == m && when.elapsed() < FIND_TTL)
        {
            return found.clone();
        }
    }
    let found = scan(dir, dst, my_netns);
    if let Some(m) = mtime {
        // Only an answer read well after the last change: a change within the same tick of
        // the file system's clock would leave the time as it is.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let changed = Duration::new(m.0.max(0) as u64, m.1.clamp(0, 999_999_999) as u32);
        if now.saturating_sub(changed) > Duration::from_millis(50) {
            let mut cache = FIND_CACHE.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|(k, ..)| *k != key);
            if cache.len() >= 64 {
                cache.remove(0);
            }
            cache.push((key, m, Instant::now(), found.clone()));
        }
    }
    found
}

fn scan(dir: &RuntimeDir, dst: &Endpoint, my_netns: u64) -> Option<Found> {
    let prefix = format!("{}-", dst.port);
    let mut addrs: Option<Vec<std::net::Ipv6Addr>> = None;
    let mut my_addrs = || addrs.get_or_insert_with(crate::net::local_addrs).clone();
    // The kernel gives a connection to a listener bound to the exact address before a
    // wildcard one; so do we.
    let mut wildcard: Option<Found> = None;
    for name in entries(dir) {
        if !name.starts_with(&prefix) || !name.ends_with(".ann") {
            continue;
        }
        let Some((f, size)) = open_announcement(dir, &name) else { continue };
        let Some(a) = read_announcement(&f, size) else { continue };
        drop(f);
        if !a.serves(dst, my_netns, &mut my_addrs) || remove_if_stale(dir, &name) {
            continue;
        }
        let found = Found { sock: name.replace(".ann", ".sock"), announcement: a };
        if found.announcement.bound.ip == dst.ip {
            return Some(found);
        }
        wildcard.get_or_insert(found);
    }
    wildcard
}

/// Opens a registration with a listener, before the TCP `connect` to `dst`: connects to its
/// registration socket in `dir` and checks that a process of our own user serves it, one
/// that holds the announced listening socket. The listener's `accept` waits (at most
/// [`REGISTRATION_WAIT`]) for the packet [`send_registration`] sends on it once the TCP
/// socket is connected. The socket stays open while the registration is meant to be live;
/// the claim arrives on it ([`recv_claim`]).
pub fn open_registration(dir: &RuntimeDir, found: &Found, dst: &Endpoint) -> io::Result<OwnedFd> {
    let sock = found.sock.as_str();
    let s = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::connect(&s, &dir.unix_addr(sock)?)?;
    let cred = rustix::net::sockopt::socket_peercred(&s)?;
    if cred.uid.as_raw() != euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{sock} is served by uid {}, not ours", cred.uid.as_raw()),
        ));
    }
    // Anyone of our user can write an announcement: only the process that holds the
    // listening socket gets the channel and our socket.
    crate::verify::announcer(s.as_fd(), &found.announcement, dst)
        .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, format!("{sock}: {why}")))?;
    Ok(s)
}

/// Sends the registration on `reg` ([`open_registration`]): the 4-tuple, the channel's memfd
/// and the connecting TCP socket `tcp` (connected, or connecting: the listener checks it once
/// it is connected).
pub fn send_registration(
    reg: BorrowedFd<'_>,
    tuple: &Tuple,
    region: BorrowedFd<'_>,
    tcp: c_int,
) -> io::Result<()> {
    // SAFETY: `tcp` is the program's socket for the `connect` call we serve; it is open for
    // the duration of this call.
    let tcp = unsafe { BorrowedFd::borrow_raw(tcp) };
    ivcom::sys::send_packet(reg, &encode(tuple), &[region, tcp])
}

/// What arrived on a registration connection.
#[derive(Debug)]
pub enum Claim {
    /// Nothing yet.
    NotYet,
    /// The claim (from the process that holds the listening socket: [`open_registration`] checked it).
    Claimed,
    /// The connection ended or carried something else: no claim will come.
    Never(String),
}

/// Reads the claim from a registration connection, without blocking.
pub fn recv_claim(reg: BorrowedFd<'_>) -> Claim {
    let mut buf = [0u8; HEADER_LEN + 1];
    match ivcom::sys::recv_packet(reg, &mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Claim::NotYet,
        Err(e) => Claim::Never(format!("registration connection failed ({e})")),
        Ok((0, _)) => Claim::Never("the listener's side closed the registration without a claim".into()),
        Ok((n, fds)) if fds.is_empty() && is_claim(&buf[..n]) => Claim::Claimed,
        Ok(_) => Claim::Never("malformed claim".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ep(s: &str, port: u16) -> Endpoint {
        Endpoint::of(std::net::SocketAddr::new(s.parse().unwrap(), port))
    }

    #[test]
    fn registration_round_trips_and_rejects_garbage() {
        let t = Tuple { src: ep("127.0.0.1", 40000), dst: ep("::1", 80) };
        assert_eq!(decode(&encode(&t)), Some(t));
        let mut b = encode(&t);
        b[0] = b'X';
        assert_eq!(decode(&b), None);
        assert_eq!(decode(&encode(&t)[..10]), None);
    }

    #[test]
    fn announcement_round_trips() {
        let a = Announcement {
            netns: 7,
            bound: ep("0.0.0.0", 6379),
            locals: vec![ep("10.0.0.2", 0).ip],
            v6only: true,
            listener: None,
        };
        assert_eq!(Announcement::parse(&a.render()), Some(a));
        assert_eq!(Announcement::parse("nonsense"), None);
    }

    #[test]
    fn who_reaches_whom() {
        let mine = || vec![ep("127.0.0.1", 0).ip, ep("10.0.0.1", 0).ip];
        let wild = Announcement {
            netns: 1,
            bound: ep("0.0.0.0", 80),
            locals: vec![ep("10.0.0.2", 0).ip],
            v6only: false,
            listener: None,
        };
        // Same namespace: loopback and own addresses reach a wildcard listener.
        assert!(wild.serves(&ep("127.0.0.1", 80), 1, &mut { mine }));
        assert!(wild.serves(&ep("127.0.0.5", 80), 1, &mut { mine }));
        assert!(!wild.serves(&ep("127.0.0.1", 81), 1, &mut { mine }));
        assert!(!wild.serves(&ep("192.0.2.1", 80), 1, &mut { mine }), "a remote host");
        // Another namespace: only at that namespace's own addresses.
        assert!(wild.serves(&ep("10.0.0.2", 80), 2, &mut { mine }));
        assert!(!wild.serves(&ep("127.0.0.1", 80), 2, &mut { mine }));
        assert!(!wild.serves(&ep("10.0.0.1", 80), 2, &mut { mine }));
        // A listener bound to one address is reached only there.
        let lo = Announcement {
            netns: 1,
            bound: ep("127.0.0.1", 80),
            locals: vec![],
            v6only: false,
            listener: None,
        };
        assert!(lo.serves(&ep("127.0.0.1", 80), 1, &mut { mine }));
        assert!(!lo.serves(&ep("127.0.0.2", 80), 1, &mut { mine }));
        assert!(!lo.serves(&ep("::1", 80), 1, &mut { mine }));
        // Wildcards take their own family; [::] takes IPv4 too unless IPV6_V6ONLY.
        assert!(!wild.serves(&ep("::1", 80), 1, &mut { mine }));
        let six =
            Announcement { netns: 1, bound: ep("::", 80), locals: vec![], v6only: true, listener: None };
        assert!(six.serves(&ep("::1", 80), 1, &mut { mine }));
        assert!(!six.serves(&ep("127.0.0.1", 80), 1, &mut { mine }));
        let dual = Announcement { v6only: false, ..six };
        assert!(dual.serves(&ep("127.0.0.1", 80), 1, &mut { mine }));
        let _ = Ipv6Addr::LOCALHOST;
    }

    proptest::proptest! {
        /// Whatever a process of the same user sends or writes, reading it neither panics
        /// nor accepts something malformed; well-formed values round-trip.
        #[test]
        fn untrusted_input_is_parsed_safely(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
                                            text in ".{0,200}",
                                            netns in proptest::prelude::any::<u64>(),
                                            ip in proptest::prelude::any::<[u8; 16]>(),
                                            port in proptest::prelude::any::<u16>(),
                                            v6only in proptest::prelude::any::<bool>()) {
            if let Some(t) = decode(&bytes) {
                proptest::prop_assert_eq!(encode(&t).to_vec(), bytes.clone());
            }
            let _ = Announcement::parse(&text);
            let a = Announcement { netns, bound: Endpoint { ip: Ipv6Addr::from(ip), port }, locals: vec![Ipv6Addr::from(ip)], v6only, listener: Some((port as i32, netns)) };
            proptest::prop_assert_eq!(Announcement::parse(&a.render()), Some(a));
        }
    }
}
