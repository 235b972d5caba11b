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

/// The pid of the process at the other end of a Unix socket (`SO_PEERCRED`), as this process
/// sees it; `None` when it is in a pid namespace we cannot see.
fn peer_pid(sock: BorrowedFd<'_>) -> Option<i32> {
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
    (r == 0 && c.pid > 0).then_some(c.pid)
}

/// Largest `/proc/PID/net/tcp{,6}` read (about 150 bytes a socket).
const MAX_TCP_TABLE: u64 = 64 << 20;

/// Whether `/proc/PID/net/tcp{,6}` lists socket `inode` as listening on `port`.
fn listens(pid: i32, inode: u64, port: u16) -> Result<bool, String> {
    use std::io::Read;
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_TCP_TABLE).read_to_string(&mut text))
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(ino)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let lport = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && lport == Some(port) && ino.parse::<u64>().ok() == Some(inode) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Checks that the process serving the registration connection `reg` holds the listening
/// socket `a` names, listening on `a`'s port in `a`'s network namespace (see the module docs).
pub fn announcer(reg: BorrowedFd<'_>, a: &crate::announce::Announcement) -> Result<(), String> {
    let (fd, inode) = a.listener.ok_or("the announcement names no listening socket")?;
    let pid = peer_pid(reg).ok_or("its server is in a pid namespace this process cannot see")?;
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| format!("cannot look at the descriptors of its server, pid {pid} ({e})"))?;
    if link.as_os_str() != std::ffi::OsStr::new(&format!("socket:[{inode}]")) {
        return Err(format!("its server, pid {pid}, does not hold the announced listening socket"));
    }
    if !listens(pid, inode, a.bound.port)? {
        return Err(format!("pid {pid}'s socket {inode} is not listening on port {}", a.bound.port));
    }
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = rustix::fs::stat(ns_path.as_str()).map_err(|e| format!("cannot look at {ns_path}: {e}"))?;
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
    Ok(())
}
