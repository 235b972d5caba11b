//! Socket addresses: conversion from and to C `sockaddr`s, the 4-tuple both ends of a
//! connection see, this network namespace's identity and addresses, source-address choice.

use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{c_int, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};

/// An address as both ends compare it: IPv4 as IPv4-mapped IPv6, so an IPv6 socket that
/// sees `::ffff:127.0.0.1` and an IPv4 socket that sees `127.0.0.1` agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The address (IPv4 mapped into IPv6).
    pub ip: Ipv6Addr,
    /// The port.
    pub port: u16,
}

impl Endpoint {
    /// The normalised form of `a`.
    pub fn of(a: SocketAddr) -> Self {
        Endpoint { ip: norm(a.ip()), port: a.port() }
    }

    /// The IP address in its natural family.
    pub fn ip(&self) -> IpAddr {
        match self.ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(self.ip),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", SocketAddr::new(self.ip(), self.port))
    }
}

/// A connection as both ends name it: (connecting side, listening side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// The connecting socket's address.
    pub src: Endpoint,
    /// The address the connection was made to.
    pub dst: Endpoint,
}

impl Tuple {
    /// A placeholder where the tuple is not needed (the accepting side, which checks the
    /// connector's socket when it claims).
    pub const UNKNOWN: Tuple = Tuple {
        src: Endpoint { ip: Ipv6Addr::UNSPECIFIED, port: 0 },
        dst: Endpoint { ip: Ipv6Addr::UNSPECIFIED, port: 0 },
    };

    /// The 36-byte form recorded in a channel's region (see `ivcom_ring::layout::off::TCP_TUPLE`).
    pub fn to_bytes(&self) -> [u8; 36] {
        let mut b = [0u8; 36];
        b[..16].copy_from_slice(&self.src.ip.octets());
        b[16..18].copy_from_slice(&self.src.port.to_le_bytes());
        b[18..34].copy_from_slice(&self.dst.ip.octets());
        b[34..36].copy_from_slice(&self.dst.port.to_le_bytes());
        b
    }
}

/// IPv4 mapped into IPv6; IPv6 unchanged.
pub fn norm(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Whether `ip` (normalised) is a loopback address: 127.0.0.0/8 or ::1.
pub fn is_loopback(ip: &Ipv6Addr) -> bool {
    match ip.to_ipv4_mapped() {
        Some(v4) => v4.is_loopback(),
        None => ip.is_loopback(),
    }
}

/// Whether `ip` (normalised) is the wildcard address of either family.
pub fn is_unspecified(ip: &Ipv6Addr) -> bool {
    ip.is_unspecified() || ip.to_ipv4_mapped() == Some(Ipv4Addr::UNSPECIFIED)
}

/// Reads a C socket address of family `AF_INET` or `AF_INET6`.
///
/// # Safety
/// `addr` points to `len` readable bytes (or is null).
pub unsafe fn from_c(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); unaligned reads because
    // the caller's buffer need not be aligned.
    let family = unsafe { std::ptr::addr_of!((*addr).sa_family).read_unaligned() } as c_int;
    match family {
        libc::AF_INET if len as usize >= size_of::<sockaddr_in>() => {
            // SAFETY: `len` covers a whole sockaddr_in.
            let a = unsafe { addr.cast::<sockaddr_in>().read_unaligned() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
            // SAFETY: `len` covers a whole sockaddr_in6.
            let a = unsafe { addr.cast::<sockaddr_in6>().read_unaligned() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `a` as a C socket address of `family` (an IPv4 address becomes IPv4-mapped for `AF_INET6`).
pub fn to_c(a: SocketAddr, family: c_int) -> Option<(sockaddr_storage, socklen_t)> {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut st: sockaddr_storage = unsafe { zeroed() };
    match family {
        libc::AF_INET => {
            let v4 = match a.ip() {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
            };
            let sin = sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(v4).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::addr_of_mut!(st).cast::<sockaddr_in>().write(sin) };
            Some((st, size_of::<sockaddr_in>() as socklen_t))
        }
        libc::AF_INET6 => {
            let sin6 = sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: norm(a.ip()).octets() },
                sin6_scope_id: match a {
                    SocketAddr::V6(v6) => v6.scope_id(),
                    SocketAddr::V4(_) => 0,
                },
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::addr_of_mut!(st).cast::<sockaddr_in6>().write(sin6) };
            Some((st, size_of::<sockaddr_in6>() as socklen_t))
        }
        _ => None,
    }
}

type NameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

fn name_of(fd: c_int, f: NameFn) -> Option<SocketAddr> {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut st: sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_storage>() as socklen_t;
    // SAFETY: `st` is writable for `len` bytes; the kernel writes at most that much.
    let r = unsafe { f(fd, std::ptr::addr_of_mut!(st).cast(), &mut len) };
    if r != 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` bytes of `st` (bounded by its size).
    unsafe { from_c(std::ptr::addr_of!(st).cast(), len.min(size_of::<sockaddr_storage>() as socklen_t)) }
}

/// The socket's own address.
pub fn local(fd: c_int) -> Option<SocketAddr> {
    name_of(fd, libc::getsockname)
}

/// The connected peer's address.
pub fn peer(fd: c_int) -> Option<SocketAddr> {
    name_of(fd, libc::getpeername)
}

/// An int socket option, as the kernel has it.
pub fn sockopt(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    sockopt_int(fd, level, name)
}

fn sockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `v` is a writable int and `len` says so.
    let r = unsafe { crate::real::getsockopt(fd, level, name, std::ptr::addr_of_mut!(v).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// The socket's domain if it is a TCP socket of `AF_INET` or `AF_INET6`.
pub fn tcp_domain(fd: c_int) -> Option<c_int> {
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return None;
    }
    (sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? == libc::SOCK_STREAM
        && sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)? == libc::IPPROTO_TCP)
        .then_some(domain)
}

/// Whether an IPv6 socket refuses IPv4 (`IPV6_V6ONLY`).
pub fn v6only(fd: c_int) -> bool {
    sockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_some_and(|v| v != 0)
}

/// Identity of this process's network namespace (the inode of `/proc/self/ns/net`).
pub fn netns() -> u64 {
    rustix::fs::stat("/proc/self/ns/net").map(|s| s.st_ino).unwrap_or(0)
}

/// The addresses of this network namespace's interfaces.
pub fn local_addrs() -> Vec<Ipv6Addr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        let len = size_of::<sockaddr_storage>() as socklen_t;
        // SAFETY: ifa_addr is null or points to a sockaddr of its family's size.
        if let Some(a) = unsafe { from_c(ifa.ifa_addr, len) } {
            out.push(norm(a.ip()));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}
