//! Listeners under ivcom announce themselves in `<runtime dir>/tcp`; connecting programs
//! find them there and register their channel before the TCP handshake.
//!
//! An announcement is two files named `<port>-<netns>-<pid>-<n>`: `.ann` (text: what the
//! listener is bound to, and its namespace's addresses when it is bound to a wildcard) and
//! `.sock` (a Unix seqpacket socket that takes registrations). The listener holds a shared
//! `flock` on `.ann` for as long as any process has the listening socket open; a file nobody
//! holds is stale and whoever finds it removes it.
//!
//! A registration is one packet on its own connection to `.sock`: the connection's 4-tuple
//! and the channel's memfd. The connecting side keeps its end open until it sees the claim
//! (or gives up); a registration whose connection has hung up is dropped unclaimed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::net::{is_loopback, is_unspecified, Endpoint, Tuple};

const MAGIC: &[u8; 4] = b"IVTC";
const VERSION: u32 = 1;
const REG_LEN: usize = 4 + 4 + 2 * (16 + 2);

/// Encodes a registration packet.
pub fn encode(t: &Tuple) -> [u8; REG_LEN] {
    let mut b = [0u8; REG_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..24].copy_from_slice(&t.src.ip.octets());
    b[24..26].copy_from_slice(&t.src.port.to_le_bytes());
    b[26..42].copy_from_slice(&t.dst.ip.octets());
    b[42..44].copy_from_slice(&t.dst.port.to_le_bytes());
    b
}

/// Decodes a registration packet; `None` for anything else.
pub fn decode(b: &[u8]) -> Option<Tuple> {
    if b.len() != REG_LEN || &b[..4] != MAGIC || b[4..8] != VERSION.to_le_bytes() {
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
}

impl Announcement {
    fn render(&self) -> String {
        let mut s = format!(
            "ivcom-tcp {VERSION}\nnetns {}\naddr {}\nport {}\nv6only {}\n",
            self.netns, self.bound.ip, self.bound.port, self.v6only as u8
        );
        for l in &self.locals {
            s.push_str(&format!("local {l}\n"));
        }
        s
    }

    fn parse(s: &str) -> Option<Self> {
        let mut lines = s.lines();
        if lines.next()? != format!("ivcom-tcp {VERSION}") {
            return None;
        }
        let (mut netns, mut addr, mut port, mut locals, mut v6only) = (None, None, None, Vec::new(), false);
        for l in lines {
            let (k, v) = l.split_once(' ')?;
            match k {
                "netns" => netns = v.parse().ok(),
                "addr" => addr = v.parse().ok(),
                "port" => port = v.parse().ok(),
                "local" => locals.push(v.parse().ok()?),
                "v6only" => v6only = v == "1",
                _ => {}
            }
        }
        Some(Announcement { netns: netns?, bound: Endpoint { ip: addr?, port: port? }, locals, v6only })
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
}

/// An announced listening socket.
#[derive(Debug)]
pub struct Listening {
    sock: OwnedFd,
    lock: Option<OwnedFd>,
    ann: PathBuf,
    sock_path: PathBuf,
    stash: Mutex<Vec<Pending>>,
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(rustix::io::Errno::NOENT) => {
            if let Some(parent) = dir.parent() {
                ensure_dir(parent)?;
            }
            return ensure_dir(dir);
        }
        Err(e) => return Err(e.into()),
    }
    let st = rustix::fs::stat(dir)?;
    if st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to another user", dir.display()),
        ));
    }
    Ok(())
}

fn unix_addr(p: &Path) -> io::Result<SocketAddrUnix> {
    Ok(SocketAddrUnix::new(p)?)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Listening {
    /// Announces a listener bound to `bound` in namespace `netns`.
    pub fn announce(dir: &Path, bound: Endpoint, netns: u64, v6only: bool) -> io::Result<Self> {
        ensure_dir(dir)?;
        let locals = if is_unspecified(&bound.ip) { crate::net::local_addrs() } else { Vec::new() };
        let ann = Announcement { netns, bound, locals, v6only };
        let stem = format!(
            "{}-{}-{}-{}",
            bound.port,
            netns,
            rustix::process::getpid().as_raw_nonzero(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let sock_path = dir.join(format!("{stem}.sock"));
        let ann_path = dir.join(format!("{stem}.ann"));
        let tmp = dir.join(format!("{stem}.tmp"));
        let _ = rustix::fs::unlink(&sock_path);
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&sock, &unix_addr(&sock_path)?)?;
        rustix::net::listen(&sock, 1024)?;
        let lock = (|| -> io::Result<OwnedFd> {
            let f = rustix::fs::open(
                &tmp,
                OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            rustix::io::write(&f, ann.render().as_bytes())?;
            rustix::fs::flock(&f, FlockOperation::LockShared)?;
            rustix::fs::rename(&tmp, &ann_path)?;
            Ok(f)
        })();
        let lock = match lock {
            Ok(l) => l,
            Err(e) => {
                let _ = rustix::fs::unlink(&tmp);
                let _ = rustix::fs::unlink(&sock_path);
                return Err(e);
            }
        };
        Ok(Listening { sock, lock: Some(lock), ann: ann_path, sock_path, stash: Mutex::new(Vec::new()) })
    }

    /// Where the announcement lives.
    pub fn path(&self) -> &Path {
        &self.ann
    }

    /// Takes the live registration for `tuple`, if there is one: the channel's memfd.
    pub fn take(&self, tuple: &Tuple) -> Option<OwnedFd> {
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        // New registrations first: they were all sent before their TCP handshakes started.
        while let Ok(conn) =
            rustix::net::accept_with(&self.sock, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
        {
            match rustix::net::sockopt::socket_peercred(&conn) {
                Ok(c) if c.uid == rustix::process::geteuid() => {}
                _ => continue,
            }
            let mut buf = [0u8; REG_LEN + 1];
            if let Ok((n, mut fds)) = ivcom::sys::recv_packet(conn.as_fd(), &mut buf) {
                if let (Some(t), 1) = (decode(&buf[..n]), fds.len()) {
                    let region = fds.pop().expect("one descriptor");
                    // A newer registration of the same tuple replaces an older one.
                    stash.retain(|p| p.tuple != t);
                    stash.push(Pending { tuple: t, conn, region });
                }
            }
        }
        // Registrations whose connecting side hung up are dead.
        if !stash.is_empty() {
            let mut fds: Vec<rustix::event::PollFd<'_>> = stash
                .iter()
                .map(|p| rustix::event::PollFd::new(&p.conn, rustix::event::PollFlags::RDHUP))
                .collect();
            let _ = rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }));
            let dead: Vec<bool> = fds
                .iter()
                .map(|f| {
                    f.revents().intersects(
                        rustix::event::PollFlags::HUP
                            | rustix::event::PollFlags::RDHUP
                            | rustix::event::PollFlags::ERR,
                    )
                })
                .collect();
            drop(fds);
            let mut i = 0;
            stash.retain(|_| {
                i += 1;
                !dead[i - 1]
            });
        }
        let at = stash.iter().position(|p| p.tuple == *tuple)?;
        Some(stash.swap_remove(at).region)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Close our hold on the announcement, then remove it if no other process (a fork
        // sharing the listening socket) still holds it.
        self.lock = None;
        remove_if_stale(&self.ann);
        let _ = &self.sock_path;
    }
}

/// Removes an announcement (both files) that no process holds. Returns whether it was stale.
pub fn remove_if_stale(ann: &Path) -> bool {
    let Ok(f) = rustix::fs::open(ann, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) else {
        return false;
    };
    if rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        return false;
    }
    let _ = rustix::fs::unlink(ann.with_extension("sock"));
    let _ = rustix::fs::unlink(ann);
    true
}

/// Removes every stale announcement in `dir` (what `ivcom run` does after its program exits).
pub fn sweep(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "ann") && remove_if_stale(&p) {
            n += 1;
        }
    }
    n
}

/// Finds a live announced listener that a connection to `dst` reaches; returns the path of
/// its registration socket.
pub fn find(dir: &Path, dst: &Endpoint, my_netns: u64) -> Option<PathBuf> {
    let prefix = format!("{}-", dst.port);
    let rd = rustix::fs::Dir::read_from(
        rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?,
    )
    .ok()?;
    let mut addrs: Option<Vec<std::net::Ipv6Addr>> = None;
    let mut my_addrs = || addrs.get_or_insert_with(crate::net::local_addrs).clone();
    // The kernel gives a connection to a listener bound to the exact address before a
    // wildcard one; so do we.
    let mut wildcard: Option<PathBuf> = None;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || !name.ends_with(".ann") {
            continue;
        }
        let path = dir.join(&name);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let Some(a) = Announcement::parse(&text) else { continue };
        if !a.serves(dst, my_netns, &mut my_addrs) {
            continue;
        }
        if remove_if_stale(&path) {
            continue;
        }
        if a.bound.ip == dst.ip {
            return Some(path.with_extension("sock"));
        }
        wildcard.get_or_insert(path.with_extension("sock"));
    }
    wildcard
}

/// Registers a connection with a listener: connects to its registration socket and sends
/// the tuple and the channel's memfd. The returned socket stays open while the registration
/// is meant to be live.
pub fn register(sock: &Path, tuple: &Tuple, region: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let s = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::connect(&s, &unix_addr(sock)?)?;
    ivcom::sys::send_packet(s.as_fd(), &encode(tuple), &[region])?;
    let _ = s.as_raw_fd();
    Ok(s)
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
        let lo = Announcement { netns: 1, bound: ep("127.0.0.1", 80), locals: vec![], v6only: false };
        assert!(lo.serves(&ep("127.0.0.1", 80), 1, &mut { mine }));
        assert!(!lo.serves(&ep("127.0.0.2", 80), 1, &mut { mine }));
        assert!(!lo.serves(&ep("::1", 80), 1, &mut { mine }));
        // Wildcards take their own family; [::] takes IPv4 too unless IPV6_V6ONLY.
        assert!(!wild.serves(&ep("::1", 80), 1, &mut { mine }));
        let six = Announcement { netns: 1, bound: ep("::", 80), locals: vec![], v6only: true };
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
            let a = Announcement { netns, bound: Endpoint { ip: Ipv6Addr::from(ip), port }, locals: vec![Ipv6Addr::from(ip)], v6only };
            proptest::prop_assert_eq!(Announcement::parse(&a.render()), Some(a));
        }
    }
}
