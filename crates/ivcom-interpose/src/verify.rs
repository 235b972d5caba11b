//! Who is at the other end: the process behind an announcement, and the socket a
//! registration hands over.
//!
//! **The announcer.** Anyone of the user can write an announcement, so before a connecting
//! side sends anything to a registration socket it checks, through the kernel, that the
//! process serving that socket (`SO_PEERCRED`: the process that called `listen` on it) holds
//! the listening TCP socket the announcement names: `/proc/PID/fd/N` is that socket's inode,
//! which `/proc/PID/net/tcp{,6}` lists as listening on the port, in that process's network
//! namespace (ours, or one owned by the same user namespace). A process that merely wrote the
//! announcement, or relays registrations to the real listener, fails this check and gets
//! nothing (no memfd, no socket). A process in a pid namespace we cannot see (the kernel
//! reports pid 0), or one we may not inspect, cannot be checked: plain TCP.
//!
//! **The registration.**
//! A registration can be sent by any process of the user for any 4-tuple (they are in
//! `/proc/net/tcp`), so it carries the connecting TCP socket itself (`SCM_RIGHTS`), and the
//! listening side checks it:
//!
//! - it is a connected TCP socket (`getpeername` succeeds only once the handshake is done);
//! - its local address is our peer's and its peer address is our local one (the 4-tuple
//!   mirrored);
//! - it lives in our network namespace (`SO_NETNS_COOKIE`, Linux 5.14), where the kernel lets
//!   only one established socket have that 4-tuple: ours is the other end, so that socket is
//!   the one our peer holds;
//! - or, for a connection between two namespaces (containers), its namespace is owned by the
//!   same user namespace as ours (`SIOCGSKNS`, then `NS_GET_USERNS`): such a namespace was made
//!   by whoever made ours (the host's root, or a rootless container's user namespace), not
//!   by an unprivileged user who could give a namespace of their own any addresses and
//!   connections. Reading a socket's namespace needs `CAP_NET_ADMIN` over its owner, so
//!   without it a connection between namespaces stays on plain TCP.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use libc::c_int;

use crate::net::{self, Endpoint, Tuple};

/// `SO_NETNS_COOKIE` (Linux 5.14+; not in every libc release).
const SO_NETNS_COOKIE: c_int = 71;

/// The cookie of the network namespace `fd` lives in: a 64-bit id the kernel never reuses
/// while it runs.
pub fn netns_cookie(fd: c_int) -> Option<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` is a writable u64 and `len` says so.
    let r = unsafe {
        crate::real::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize == std::mem::size_of::<u64>()).then_some(v)
}

/// An ioctl that returns a new descriptor (`SIOCGSKNS`, `NS_GET_USERNS`).
fn fd_ioctl(fd: c_int, req: libc::c_ulong) -> std::io::Result<OwnedFd> {
    // SAFETY: both requests take no argument and return a new descriptor or -1.
    let r = unsafe { libc::ioctl(fd, req as _) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Identity (device, inode) of the user namespace that owns the network namespace `ns`.
fn owner_of(ns: &OwnedFd) -> std::io::Result<(u64, u64)> {
    const NS_GET_USERNS: libc::c_ulong = 0xb701; // _IO(0xb7, 0x1)
    let user = fd_ioctl(ns.as_raw_fd(), NS_GET_USERNS)?;
    let st = rustix::fs::fstat(&user)?;
    Ok((st.st_dev, st.st_ino))
}

/// Identity of the user namespace owning the network namespace socket `fd` lives in.
fn socket_netns_owner(fd: c_int) -> std::io::Result<(u64, u64)> {
    const SIOCGSKNS: libc::c_ulong = 0x894c;
    owner_of(&fd_ioctl(fd, SIOCGSKNS)?)
}

/// Identity of the user namespace owning this process's network namespace.
fn own_netns_owner() -> std::io::Result<(u64, u64)> {
    let ns = rustix::fs::open(
        "/proc/self/ns/net",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    owner_of(&ns)
}

/// Whether this process may check sockets of other network namespaces (see the module
/// docs): it holds `CAP_NET_ADMIN`. A connecting side without it does not register with a
/// listener of another namespace, since it could not check the listener's claim.
pub fn can_check_other_netns() -> bool {
    rustix::thread::capabilities(None)
        .is_ok_and(|c| c.effective.contains(rustix::thread::CapabilitySet::NET_ADMIN))
}

/// Why a socket handed to us is not the other end of our connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOurPeer {
    /// Not a TCP socket of `AF_INET`/`AF_INET6`.
    NotTcp,
    /// Not connected (yet), so it cannot be anyone's other end.
    NotConnected,
    /// Its addresses do not mirror our connection's.
    Tuple {
        /// What the passed socket says (its local, its peer).
        got: Tuple,
    },
    /// It lives in a network namespace we cannot vouch for.
    Namespace(String),
}

impl std::fmt::Display for NotOurPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotOurPeer::NotTcp => write!(f, "the socket passed is not a TCP socket"),
            NotOurPeer::NotConnected => write!(f, "the socket passed is not connected"),
            NotOurPeer::Tuple { got } => {
                write!(
                    f,
                    "the socket passed is {} -> {}, not the other end of this connection",
                    got.src, got.dst
                )
            }
            NotOurPeer::Namespace(why) => {
                write!(f, "the socket passed is in another network namespace: {why}")
            }
        }
    }
}

/// Checks that `passed` is the other end of the connection whose ends are `ours`
/// (`ours.src`: our local address, `ours.dst`: our peer's) in the network namespace with
/// cookie `our_netns`.
pub fn other_end(passed: BorrowedFd<'_>, ours: &Tuple, our_netns: u64) -> Result<(), NotOurPeer> {
    let fd = passed.as_raw_fd();
    if net::tcp_domain(fd).is_none() {
        return Err(NotOurPeer::NotTcp);
    }
    let (Some(l), Some(p)) = (net::local(fd), net::peer(fd)) else {
        return Err(NotOurPeer::NotConnected);
    };
    let got = Tuple { src: Endpoint::of(l), dst: Endpoint::of(p) };
    if got.src != ours.dst || got.dst != ours.src {
        return Err(NotOurPeer::Tuple { got });
    }
    match netns_cookie(fd) {
        Some(c) if c == our_netns => Ok(()),
        Some(_) => match (socket_netns_owner(fd), own_netns_owner()) {
            (Ok(theirs), Ok(mine)) if theirs == mine => Ok(()),
            (Ok(_), Ok(_)) => Err(NotOurPeer::Namespace("it is owned by another user namespace".into())),
            (Err(e), _) | (_, Err(e)) => Err(NotOurPeer::Namespace(format!("cannot check its owner ({e})"))),
        },
        None => Err(NotOurPeer::Namespace("the kernel does not report namespace cookies".into())),
    }
}

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the process at the other end of a Unix socket.
const SO_PEERPIDFD: c_int = 77;

/// The process at the other end of a Unix socket (the one that called `listen` or `connect`
/// on it): its pid as this process sees it, and a pidfd that pins it (`SO_PEERPIDFD`). `Err`
/// when it is in a pid namespace we cannot see, has exited, or the kernel has no pidfds.
fn peer_process(sock: BorrowedFd<'_>) -> Result<(i32, OwnedFd), String> {
    let mut c = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a writable ucred and `len` says so.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(c).cast(),
            &mut len,
        )
    };
    if r != 0 || c.pid <= 0 {
        return Err("its server is in a pid namespace this process cannot see".into());
    }
    let mut pidfd: c_int = -1;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `pidfd` is a writable int and `len` says so.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            std::ptr::addr_of_mut!(pidfd).cast(),
            &mut len,
        )
    };
    if r != 0 || pidfd < 0 {
        return Err(format!(
            "its server, pid {}, cannot be pinned ({}): it has exited, or the kernel is older than 6.5",
            c.pid,
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // A socket keeps the credentials of the process that called `listen` after it exits;
    // its pid may be another process's by now.
    if !alive(&pidfd) {
        return Err(format!("its server, pid {}, has exited (that pid may be another process's now)", c.pid));
    }
    Ok((c.pid, pidfd))
}

/// Whether the process a pidfd refers to is still running (it polls readable once it exits).
fn alive(pidfd: &OwnedFd) -> bool {
    let mut p = [libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: a local pollfd array of length 1, no waiting.
    unsafe { libc::poll(p.as_mut_ptr(), 1, 0) == 0 }
}

/// Largest `/proc/PID/net/tcp{,6}` read (about 150 bytes a socket).
const MAX_TCP_TABLE: u64 = 64 << 20;

/// The listening sockets `/proc/PID/net/tcp{,6}` lists (those of PID's network namespace):
/// where each listens, and its inode.
fn listeners(pid: i32) -> Result<Vec<(Endpoint, u64)>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    for (table, v6) in [("tcp", false), ("tcp6", true)] {
        let path = format!("/proc/{pid}/net/{table}");
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_TCP_TABLE).read_to_string(&mut text))
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A"), Some(ino)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            if let (Some(at), Ok(ino)) = (proc_endpoint(local, v6), ino.parse::<u64>()) {
                out.push((at, ino));
            }
        }
    }
    Ok(out)
}

/// The listening TCP sockets of this process's network namespace (where each listens, and
/// its inode), from the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`, sock_diag(7),
/// `inet_diag_req_v2` asking for `TCP_LISTEN` only): the kernel walks only its table of
/// listening sockets, so the cost does not grow with established and `TIME_WAIT` sockets as
/// a read of `/proc/net/tcp` does (a client making a connection per request, with 27 000
/// `TIME_WAIT` sockets around, spent milliseconds per `connect` there). Written here rather
/// than with a netlink crate: two fixed-layout messages on the `connect` path of every
/// accelerated connection, in a preload library that keeps its dependencies few.
fn listeners_here() -> Result<Vec<(Endpoint, u64)>, String> {
    use rustix::net::{AddressFamily, Protocol, RecvFlags, SendFlags, SocketFlags, SocketType};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    // struct inet_diag_msg (linux/inet_diag.h): id at 4 (sport, dport big-endian; src
    // address 16 bytes), inode at 68; 72 bytes.
    const MSG_LEN: usize = 72;
    let s = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(Protocol::from_raw(
            std::num::NonZeroU32::new(libc::NETLINK_SOCK_DIAG as u32).unwrap_or(std::num::NonZeroU32::MIN),
        )),
    )
    .map_err(|e| format!("cannot open a sock_diag socket: {e}"))?;
    let s = crate::fds::lift(s);
    let mut out = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        // struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes).
        let mut req = [0u8; 72];
        req[0..4].copy_from_slice(&72u32.to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&seq.to_ne_bytes());
        req[16] = family;
        req[17] = libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        rustix::net::send(&s, &req, SendFlags::empty())
            .map_err(|e| format!("sock_diag request failed: {e}"))?;
        let mut buf = vec![0u8; 32 << 10];
        'dump: loop {
            let n = rustix::net::recv(&s, &mut buf[..], RecvFlags::empty())
                .map_err(|e| format!("sock_diag answer failed: {e}"))?
                .0;
            let mut at = 0usize;
            while at + 16 <= n {
                let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let len = word(at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    return Err("malformed sock_diag answer".into());
                }
                match kind as c_int {
                    libc::NLMSG_DONE => break 'dump,
                    libc::NLMSG_ERROR => return Err("the kernel refused the sock_diag request".into()),
                    _ if kind == SOCK_DIAG_BY_FAMILY && len >= 16 + MSG_LEN => {
                        let m = &buf[at + 16..at + 16 + MSG_LEN];
                        let port = u16::from_be_bytes([m[4], m[5]]);
                        let ip = if m[0] == libc::AF_INET as u8 {
                            std::net::Ipv4Addr::new(m[8], m[9], m[10], m[11]).to_ipv6_mapped()
                        } else {
                            let mut a = [0u8; 16];
                            a.copy_from_slice(&m[8..24]);
                            std::net::Ipv6Addr::from(a)
                        };
                        let inode = u32::from_ne_bytes([m[68], m[69], m[70], m[71]]) as u64;
                        out.push((Endpoint { ip, port }, inode));
                    }
                    _ => {}
                }
                at += len.next_multiple_of(4);
            }
        }
    }
    Ok(out)
}

/// How specifically a socket listening at `at` matches a connection to `dst` (higher wins,
/// as in the kernel's lookup: the exact address, then the wildcard of the destination's
/// family, then the IPv6 wildcard for IPv4, which only a dual-stack socket takes); `None`:
/// it does not match.
fn specificity(at: &Endpoint, dst: &Endpoint) -> Option<u8> {
    if at.port != dst.port {
        return None;
    }
    let v4 = dst.ip.to_ipv4_mapped().is_some();
    if at.ip == dst.ip {
        Some(3)
    } else if v4 && at.ip.to_ipv4_mapped() == Some(std::net::Ipv4Addr::UNSPECIFIED) {
        Some(2)
    } else if at.ip.is_unspecified() {
        Some(1)
    } else {
        None
    }
}

/// An address of `/proc/net/tcp{,6}` (`0100007F:1F90`: the address as the kernel's 32-bit
/// words in host byte order, hexadecimal, then the port).
fn proc_endpoint(s: &str, v6: bool) -> Option<Endpoint> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| ip.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()))
        .collect::<Option<_>>()?;
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b.get_mut(i * 4..i * 4 + 4)?.copy_from_slice(&w.to_ne_bytes());
    }
    let ip = match (v6, words.len()) {
        (false, 1) => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_ipv6_mapped(),
        (true, 4) => std::net::Ipv6Addr::from(b),
        _ => return None,
    };
    Some(Endpoint { ip, port })
}

/// Checks that the process serving the registration connection `reg` holds the listening
/// socket `a` names, listening where `a` says and where a connection to `dst` arrives (the
/// exact address or a wildcard of its family), in `a`'s network namespace (see the module
/// docs). The process is pinned by a pidfd for the whole check, so its pid cannot be another
/// process's by the end.
pub fn announcer(
    reg: BorrowedFd<'_>,
    a: &crate::announce::Announcement,
    dst: &Endpoint,
) -> Result<(), String> {
    let (fd, inode) = a.listener.ok_or("the announcement names no listening socket")?;
    let (pid, pidfd) = peer_process(reg)?;
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| format!("cannot look at the descriptors of its server, pid {pid} ({e})"))?;
    if link.as_os_str() != std::ffi::OsStr::new(&format!("socket:[{inode}]")) {
        return Err(format!("its server, pid {pid}, does not hold the announced listening socket"));
    }
    // It must be the one socket a connection to `dst` reaches in its namespace: the most
    // specific listener there, and alone at that level (another process of the user could
    // listen beside it on another address, or join a SO_REUSEPORT group; then we cannot
    // tell whose our connection is).
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = rustix::fs::stat(ns_path.as_str()).map_err(|e| format!("cannot look at {ns_path}: {e}"))?;
    let all = if ns.st_ino == crate::net::netns() { listeners_here()? } else { listeners(pid)? };
    let Some(&(at, _)) = all.iter().find(|(_, i)| *i == inode) else {
        return Err(format!("pid {pid}'s socket {inode} is not listening"));
    };
    let mine = specificity(&at, dst);
    let best = all.iter().filter_map(|(e, _)| specificity(e, dst)).max();
    let rivals = all.iter().filter(|(e, i)| *i != inode && specificity(e, dst) == mine).count();
    if at != a.bound || mine.is_none() || mine != best || rivals > 0 {
        return Err(format!(
            "pid {pid}'s socket {inode} listening at {at} is not the one listener a connection to {dst} reaches (announced: {})",
            a.bound
        ));
    }
    if ns.st_ino != a.netns {
        return Err(format!(
            "pid {pid} is in network namespace {}, not the announced {}",
            ns.st_ino, a.netns
        ));
    }
    if ns.st_ino != crate::net::netns() {
        let f = rustix::fs::open(
            ns_path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("cannot open {ns_path}: {e}"))?;
        match (owner_of(&f), own_netns_owner()) {
            (Ok(theirs), Ok(mine)) if theirs == mine => {}
            (Ok(_), Ok(_)) => {
                return Err(format!("pid {pid}'s network namespace is owned by another user namespace"))
            }
            (Err(e), _) | (_, Err(e)) => {
                return Err(format!("cannot check the owner of pid {pid}'s network namespace ({e})"))
            }
        }
    }
    // Still the same process: what /proc showed under its pid was its own.
    if !alive(&pidfd) {
        return Err(format!("its server, pid {pid}, exited during the check"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses() {
        let e = proc_endpoint("0100007F:1F90", false).unwrap();
        assert_eq!((e.ip(), e.port), ("127.0.0.1".parse().unwrap(), 8080));
        let e = proc_endpoint("00000000000000000000000001000000:0050", true).unwrap();
        assert_eq!((e.ip(), e.port), ("::1".parse().unwrap(), 80));
        let e = proc_endpoint("0000000000000000FFFF00000100007F:0050", true).unwrap();
        assert_eq!((e.ip(), e.port), ("127.0.0.1".parse().unwrap(), 80));
        assert_eq!(proc_endpoint("zz:1", false), None);
        assert_eq!(proc_endpoint("0100007F", false), None);
    }

    /// The kernel's socket diagnostics list the same listeners as `/proc/net/tcp{,6}`.
    #[test]
    fn sock_diag_lists_what_proc_lists() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let mut want = vec![v4.local_addr().unwrap()];
        want.extend(v6.as_ref().map(|l| l.local_addr().unwrap()));
        let here = listeners_here().unwrap();
        let proc = listeners(std::process::id() as i32).unwrap();
        for (l, a) in [Some(&v4), v6.as_ref()].into_iter().flatten().zip(&want) {
            let ino = rustix::fs::fstat(l).unwrap().st_ino;
            let e = Endpoint::of(*a);
            assert!(here.contains(&(e, ino)), "{a} (inode {ino}) missing from {here:?}");
            assert!(proc.contains(&(e, ino)), "{a} (inode {ino}) missing from /proc");
        }
        let mut a: Vec<_> = here.iter().map(|x| x.1).collect();
        let mut b: Vec<_> = proc.iter().map(|x| x.1).collect();
        a.sort_unstable();
        b.sort_unstable();
        // Other processes may open or close listeners meanwhile: ours are the check above;
        // the two lists still agree on most entries.
        let common = a.iter().filter(|i| b.contains(i)).count();
        assert!(common * 2 >= a.len().max(b.len()), "sock_diag {a:?} vs /proc {b:?}");
    }
}
