//! Proof that a socket a peer handed us is the other end of our TCP connection.
//!
//! Announcements, registrations and the claim word of a region can all be written by any
//! process of the user, so none of them proves who holds the other end of a connection. The
//! kernel does: the two ends exchange their TCP sockets over the registration connection
//! (`SCM_RIGHTS`), and each side checks the one it received:
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
//!   without it a connection between namespaces stays on plain TCP: both ends apply the same
//!   rule, so they agree.

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
