//! The intercepted calls. Each takes the C arguments, passes anything that is not one of our
//! connections straight to the C library, and returns what the C function would, with
//! `errno` set the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::{c_int, c_uint, c_ulong, c_void, epoll_event, iovec, msghdr, nfds_t, pollfd, sigset_t};
use libc::{loff_t, off_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval};

use crate::announce::{self, Listening};
use crate::conn::{iov_len, Handback, TcpConn, R};
use crate::epoll::{self, EpollSet};
use crate::net::{self, Endpoint, Tuple};
use crate::real;
use crate::settings::{self, count, COUNTERS};
use crate::table::{self, Entry, MAX_FD};
use crate::wait::{self, set_errno};

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn fail<T: From<i8>>(e: c_int) -> T {
    set_errno(e);
    T::from(-1)
}

fn eligible(fd: c_int) -> bool {
    fd >= 0 && (fd as usize) < MAX_FD && settings::get().enabled
}

/// `connect`: registers a channel first when the destination is an announced listener.
///
/// # Safety
/// The C contract of `connect`.
pub unsafe fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if table::tracked(fd) {
        // SAFETY: passed on unchanged.
        let r = unsafe { real::connect(fd, addr, len) };
        // SAFETY: the family field of the caller's address, when it has one.
        let unspec = !addr.is_null()
            && len as usize >= 2
            && unsafe { (*addr).sa_family } == libc::AF_UNSPEC as libc::sa_family_t;
        if r == 0 && unspec && matches!(table::get(fd), Some(Entry::Conn(_))) {
            // The kernel dissolved the connection (and reset it): so is its channel; a
            // next `connect` on this socket is a new connection.
            let e = errno();
            crate::decision!(
                "connect fd {fd} with AF_UNSPEC: connection dissolved; its channel is forgotten"
            );
            drop(table::remove(fd));
            set_errno(e);
        }
        return r;
    }
    if !eligible(fd) {
        // SAFETY: passed on unchanged.
        return unsafe { real::connect(fd, addr, len) };
    }
    // SAFETY: the caller's address of `len` bytes.
    let prepared = unsafe { net::from_c(addr, len) }.and_then(|dst| prepare(fd, dst));
    // SAFETY: passed on unchanged.
    let r = unsafe { real::connect(fd, addr, len) };
    let e = errno();
    // The kernel picked the source port as it would without the library (no search of our
    // own, no bind before the connect): now the 4-tuple is known and the registration the
    // listener's `accept` waits for goes out.
    let started = r == 0 || e == libc::EINPROGRESS || e == libc::EINTR;
    if let Some((_, dst, ..)) = prepared.as_ref().filter(|_| !started) {
        crate::decision!(
            "connect fd {fd} to {dst} failed ({}); registration withdrawn",
            std::io::Error::from_raw_os_error(e)
        );
    }
    if let Some((conn, dst)) = prepared.filter(|_| started).and_then(|p| register(fd, p)) {
        conn.tcp_option(0).store(
            net::sockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        TcpConn::set_nodelay(fd);
        table::set(fd, Entry::Conn(Arc::new(conn)));
        crate::decision!("connect fd {fd} to {dst}: channel registered, waiting for the claim");
    }
    set_errno(e);
    r
}

/// What [`prepare`] readies before the TCP `connect`: the channel, the destination, the
/// registration connection, and the announcement's registration socket (for the log).
type Prepared = (TcpConn, Endpoint, std::os::fd::OwnedFd, String);

/// After the TCP `connect` on `fd` started: records the 4-tuple and sends the registration.
fn register(fd: c_int, (conn, dst, reg, sock): Prepared) -> Option<(TcpConn, Endpoint)> {
    use std::os::fd::AsFd;
    let Some(local) = net::local(fd).filter(|l| l.port() != 0) else {
        crate::decision!("connect fd {fd} to {dst}: no source port after connect; plain TCP");
        return None;
    };
    let tuple = Tuple { src: Endpoint::of(local), dst };
    if let Err(e) = conn
        .set_tuple(&tuple)
        .and_then(|()| announce::send_registration(reg.as_fd(), &tuple, conn.region_fd(), fd))
    {
        crate::decision!("connect fd {fd}: registration with {sock} failed ({e}); plain TCP");
        count(&COUNTERS.fallbacks, 1);
        return None;
    }
    conn.hold_registration(reg);
    Some((conn, dst))
}

fn prepare(fd: c_int, dst: std::net::SocketAddr) -> Option<Prepared> {
    net::tcp_domain(fd)?;
    let s = settings::get();
    let dst_ep = Endpoint::of(dst);
    let dir = match &s.dir {
        Ok(d) => d,
        Err(why) => {
            crate::decision!("connect fd {fd} to {dst_ep}: no usable runtime directory ({why}); plain TCP");
            return None;
        }
    };
    let my_netns = net::netns();
    let Some(found) = announce::find(dir, &dst_ep, my_netns) else {
        crate::decision!("connect fd {fd} to {dst_ep}: no listener under ivcom; plain TCP");
        return None;
    };
    if found.announcement.netns != my_netns && !crate::verify::can_check_other_netns() {
        // We could not check the listener's claim (crate::verify): do not offer a channel.
        crate::decision!(
            "connect fd {fd} to {dst_ep}: listener is in another network namespace and this process cannot verify it (no CAP_NET_ADMIN); plain TCP"
        );
        return None;
    }
    // A placeholder 4-tuple until `connect` picks the source port (`register`).
    let tuple = Tuple { src: Endpoint::of(net::local(fd)?), dst: dst_ep };
    let conn = match TcpConn::connector(s.ring, &tuple) {
        Ok(x) => x,
        Err(e) => {
            crate::decision!("connect fd {fd}: cannot create a channel ({e}); plain TCP");
            return None;
        }
    };
    match announce::open_registration(dir, &found, &dst_ep) {
        Ok(reg) => Some((conn, dst_ep, reg, found.sock)),
        Err(e) => {
            announce::forget_found(&dst_ep, my_netns);
            crate::decision!("connect fd {fd}: registration with {} failed ({e}); plain TCP", found.sock);
            count(&COUNTERS.fallbacks, 1);
            None
        }
    }
}

/// `listen`: announces TCP listeners.
///
/// # Safety
/// The C contract of `listen`.
pub unsafe fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: passed on unchanged.
    let r = unsafe { real::listen(fd, backlog) };
    if r != 0 || !eligible(fd) || table::tracked(fd) {
        return r;
    }
    let e = errno();
    if let Some(domain) = net::tcp_domain(fd) {
        if let Some(local) = net::local(fd) {
            let v6only = domain == libc::AF_INET6 && net::v6only(fd);
            let announced = match &settings::get().dir {
                Ok(dir) => Listening::announce(dir, fd, Endpoint::of(local), net::netns(), v6only),
                Err(why) => Err(std::io::Error::other(format!("no usable runtime directory: {why}"))),
            };
            match announced {
                Ok(l) => {
                    crate::decision!("listen fd {fd} on {local}: announced as {}", l.name());
                    table::set(fd, Entry::Listener(Arc::new(l)));
                }
                Err(err) => crate::decision!("listen fd {fd} on {local}: not announced ({err})"),
            }
        }
    }
    set_errno(e);
    r
}

/// `accept4` (and `accept` with no flags): claims registered channels.
///
/// # Safety
/// The C contract of `accept4`.
pub unsafe fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
    four: bool,
) -> c_int {
    let r = if four {
        // SAFETY: passed on unchanged.
        unsafe { real::accept4(fd, addr, len, flags) }
    } else {
        // SAFETY: passed on unchanged.
        unsafe { real::accept(fd, addr, len) }
    };
    crate::fds::fresh(r);
    if r < 0 || !table::tracked(fd) {
        return r;
    }
    let e = errno();
    if let Some(Entry::Listener(l)) = table::get(fd) {
        claim(&l, r);
    }
    set_errno(e);
    r
}

fn claim(l: &Listening, nfd: c_int) {
    let (Some(peer), Some(local)) = (net::peer(nfd), net::local(nfd)) else { return };
    if nfd as usize >= MAX_FD {
        return;
    }
    let tuple = Tuple { src: Endpoint::of(peer), dst: Endpoint::of(local) };
    let Some(reg) = l.take(&tuple, nfd) else {
        crate::decision!("accept fd {nfd} from {peer}: no registration; plain TCP");
        return;
    };
    let announce::Registration { region, conn: reg } = reg;
    match TcpConn::acceptor(region, settings::get().max_region) {
        Ok(c) => {
            // The connecting side uses the ring only once it has checked this socket.
            if let Err(e) = announce::confirm(&reg) {
                crate::decision!("accept fd {nfd} from {peer}: the connecting side gave up ({e}); plain TCP");
                return;
            }
            c.tcp_option(0).store(
                net::sockopt(nfd, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
            TcpConn::set_nodelay(nfd);
            table::set(nfd, Entry::Conn(Arc::new(c)));
            count(&COUNTERS.accelerated, 1);
            crate::decision!("accept fd {nfd} from {peer}: channel claimed; connection accelerated");
        }
        Err(e) => {
            crate::decision!("accept fd {nfd} from {peer}: registered channel refused ({e}); plain TCP")
        }
    }
}

/// `close`.
///
/// # Safety
/// The C contract of `close`.
pub unsafe fn close(fd: c_int) -> c_int {
    if crate::fds::program_call() {
        if crate::fds::is_own(fd) {
            // Not the program's: as without the library, there is nothing open there.
            return fail(libc::EBADF);
        }
    } else {
        crate::fds::closing_own(fd);
    }
    let e = forget_closing(fd);
    // SAFETY: passed on unchanged.
    let r = unsafe { real::close(fd) };
    let err = errno();
    drop(e);
    set_errno(err);
    r
}

/// Forgets `fd`, which the program is about to close (by `close`, `fclose`, `freopen`);
/// returns the entry, to be dropped after the descriptor is closed. An entry whose
/// descriptor no longer refers to what it was recorded for is dropped as stale.
pub fn forget_closing(fd: c_int) -> Option<Entry> {
    if !table::tracked(fd) || !table::verify(fd) {
        return None;
    }
    // Whether another process holds the socket, asked before this process's copy is
    // released below.
    let shared = table::conn(fd).is_none_or(|c| c.shared());
    let e = table::remove(fd);
    if let Some(Entry::Conn(c)) = &e {
        if Arc::strong_count(c) == 1 {
            c.end_unclaimed(fd);
            if !c.is_plain() && !shared {
                // This was the last copy of the socket.
                if c.has_unread() {
                    c.push_before_close(fd);
                    // Closing with unread data resets a TCP connection (at once, lingering
                    // or not); our unread data is in the ring, not in the kernel, so ask for
                    // the reset.
                    let lg = libc::linger { l_onoff: 1, l_linger: 0 };
                    // SAFETY: setting SO_LINGER from a local struct on the program's socket.
                    unsafe {
                        crate::real::setsockopt(
                            fd,
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            std::ptr::addr_of!(lg).cast(),
                            std::mem::size_of::<libc::linger>() as socklen_t,
                        )
                    };
                } else {
                    c.settle_before_fin(fd, Instant::now() + crate::conn::FIN_WAIT);
                    if let Ok(Some(t)) = rustix::net::sockopt::socket_linger(crate::conn::borrow(fd)) {
                        if !t.is_zero() {
                            c.linger(fd, t);
                        }
                    }
                    // Nor must wakeup bytes the program never saw make the kernel reset it.
                    c.take_arrived_wakes(fd);
                    c.announce_fin();
                }
            }
        }
    }
    e
}

/// `close_range`.
///
/// # Safety
/// The C contract of `close_range`.
pub unsafe fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let mut dropped = Vec::new();
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        let hi = (last as u64).min(MAX_FD as u64 - 1);
        let mut fd = first as u64;
        while fd <= hi {
            if let Some(e) = table::remove(fd as c_int) {
                dropped.push(e);
            }
            fd += 1;
        }
    }
    let own = if crate::fds::program_call() {
        crate::fds::own_in(first.min(c_int::MAX as c_uint) as c_int, last.min(c_int::MAX as c_uint) as c_int)
    } else {
        Vec::new()
    };
    let r = if own.is_empty() || flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0 {
        // SAFETY: passed on unchanged.
        unsafe { real::close_range(first, last, flags) }
    } else {
        // The library's own descriptors stay open: close the ranges between them.
        let mut r = 0;
        let mut from = first as u64;
        for o in own.iter().map(|&o| o as u64).chain(std::iter::once(last as u64 + 1)) {
            if o > from {
                // SAFETY: closing the program's own descriptors in a part of its range.
                let x = unsafe { real::close_range(from as c_uint, (o - 1) as c_uint, flags) };
                if x != 0 {
                    r = x;
                    break;
                }
            }
            from = o + 1;
        }
        r
    };
    let err = errno();
    drop(dropped);
    set_errno(err);
    r
}

fn tcp_opt_index(level: c_int, name: c_int) -> Option<usize> {
    match (level, name) {
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => Some(0),
        (libc::IPPROTO_TCP, libc::TCP_CORK) => Some(1),
        _ => None,
    }
}

/// `setsockopt`: on our connections `TCP_NODELAY` and `TCP_CORK` are remembered for the
/// program but not applied (wakeup bytes must not wait); everything else goes through.
///
/// # Safety
/// The C contract of `setsockopt`.
pub unsafe fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int {
    if let Some(what) = changes_what_reads_see(level, name, val, len).filter(|_| table::tracked(fd)) {
        hand_back(fd, &format!("socket option {what}"), Handback::Now);
    }
    if let (libc::SOL_SOCKET, Some(send), Some(c)) =
        (level, timeout_option(name), if table::tracked(fd) { table::conn(fd) } else { None })
    {
        // SAFETY: passed on unchanged.
        let r = unsafe { real::setsockopt(fd, level, name, val, len) };
        if r == 0 && !val.is_null() && len as usize >= std::mem::size_of::<i64>() {
            // SAFETY: the first field of the program's timeval (a 64-bit `tv_sec` in both
            // the old and the new layout on 64-bit Linux).
            let sec = unsafe { val.cast::<i64>().read_unaligned() };
            c.timeout_passed(send).store(sec < 0, std::sync::atomic::Ordering::Relaxed);
        }
        return r;
    }
    if let (Some(i), true) = (tcp_opt_index(level, name), table::tracked(fd)) {
        if let Some(c) = table::conn(fd) {
            if val.is_null() || (len as usize) < std::mem::size_of::<c_int>() {
                return fail(libc::EINVAL);
            }
            // SAFETY: the program's int option value (length checked).
            let v = unsafe { val.cast::<c_int>().read_unaligned() };
            c.tcp_option(i).store(v, std::sync::atomic::Ordering::Relaxed);
            return 0;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::setsockopt(fd, level, name, val, len) }
}

/// Socket options under which the kernel's reads or readiness differ from what the library
/// gives from a ring: a low-water mark above one byte, a peek offset, receive timestamps,
/// `TCP_INQ` (control messages with the queue length).
fn changes_what_reads_see(
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> Option<&'static str> {
    let int = || {
        // SAFETY: the program's option value, read only when it is at least an int.
        (!val.is_null() && len as usize >= std::mem::size_of::<c_int>())
            .then(|| unsafe { val.cast::<c_int>().read_unaligned() })
    };
    let on = |name: &'static str, set: bool| set.then_some(name);
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_RCVLOWAT) => on("SO_RCVLOWAT", int().is_some_and(|v| v > 1)),
        (libc::SOL_SOCKET, libc::SO_PEEK_OFF) => on("SO_PEEK_OFF", int().is_some_and(|v| v >= 0)),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMP | libc::SO_TIMESTAMPNS | libc::SO_TIMESTAMPING) => {
            on("receive timestamps", int().is_some_and(|v| v != 0))
        }
        (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => on("SO_RXQ_OVFL", int().is_some_and(|v| v != 0)),
        // Completions of MSG_ZEROCOPY sends come on the kernel's error queue.
        (libc::SOL_SOCKET, libc::SO_ZEROCOPY) => on("SO_ZEROCOPY", int().is_some_and(|v| v != 0)),
        (libc::IPPROTO_TCP, libc::TCP_INQ) => on("TCP_INQ", int().is_some_and(|v| v != 0)),
        _ => None,
    }
}

/// `getsockopt`: reports the program's own `TCP_NODELAY`/`TCP_CORK` on our connections.
///
/// # Safety
/// The C contract of `getsockopt`.
pub unsafe fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    if let (Some(i), true) = (tcp_opt_index(level, name), table::tracked(fd)) {
        if let Some(c) = table::conn(fd) {
            // SAFETY: the program's length word.
            if val.is_null() || len.is_null() || (unsafe { *len } as usize) < std::mem::size_of::<c_int>() {
                return fail(libc::EINVAL);
            }
            let v = (c.tcp_option(i).load(std::sync::atomic::Ordering::Relaxed) != 0) as c_int;
            // SAFETY: the program's buffer and length (checked above).
            unsafe {
                val.cast::<c_int>().write_unaligned(v);
                *len = std::mem::size_of::<c_int>() as socklen_t;
            }
            return 0;
        }
    }
    if (level, name) == (libc::IPPROTO_TCP, libc::TCP_INFO) && !val.is_null() && !len.is_null() {
        if let Some(c) = table::conn(fd) {
            // SAFETY: passed on; the kernel writes at most `*len` bytes.
            let r = unsafe { real::getsockopt(fd, level, name, val, len) };
            if r == 0 {
                // SAFETY: the kernel wrote `*len` bytes of a `tcp_info` into the program's
                // buffer; only fields inside them are touched.
                unsafe { add_ring_bytes(&c, val, *len as usize) };
            }
            return r;
        }
    }
    if (level, name) == (libc::SOL_SOCKET, libc::SO_ERROR) && !val.is_null() && !len.is_null() {
        // A reset the library learned of took the kernel's pending error: report it here
        // once, as the kernel would have.
        // SAFETY: the program's length word (checked non-null).
        if unsafe { *len } as usize >= std::mem::size_of::<c_int>() {
            if let Some(e) = table::conn(fd).and_then(|c| c.socket_error(fd)) {
                // SAFETY: the program's buffer and length (checked above).
                unsafe {
                    val.cast::<c_int>().write_unaligned(e);
                    *len = std::mem::size_of::<c_int>() as socklen_t;
                }
                return 0;
            }
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::getsockopt(fd, level, name, val, len) }
}

/// `TCP_INFO`'s byte counters as over TCP: what the rings carried added, the wakeup bytes
/// taken out (`tcpi_bytes_acked`, `tcpi_bytes_received`, when `len` covers them).
///
/// # Safety
/// `val` holds `len` bytes of a `tcp_info` the kernel wrote.
unsafe fn add_ring_bytes(c: &crate::conn::TcpConn, val: *mut c_void, len: usize) {
    let (tx, rx, sent, taken) = c.ring_totals();
    let fix = |off: usize, ring: u64, wakes: u64| {
        if off + 8 <= len {
            // SAFETY: inside the `len` bytes the kernel wrote (checked), unaligned access.
            unsafe {
                let p = val.cast::<u8>().add(off).cast::<u64>();
                p.write_unaligned(p.read_unaligned().saturating_sub(wakes).saturating_add(ring));
            }
        }
    };
    fix(std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked), tx, sent);
    fix(std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received), rx, taken);
}

/// `shutdown`.
///
/// # Safety
/// The C contract of `shutdown`.
pub unsafe fn shutdown(fd: c_int, how: c_int) -> c_int {
    if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
        if let Some(c) = if table::tracked(fd) { table::conn(fd) } else { None } {
            // The FIN follows our ring's bytes (`TcpConn::settle_before_fin`).
            if !c.shared() {
                c.settle_before_fin(fd, Instant::now() + crate::conn::FIN_WAIT);
            } else {
                c.push_before_close(fd);
            }
        }
    }
    // SAFETY: passed on unchanged.
    let r = unsafe { real::shutdown(fd, how) };
    if r == 0 {
        if let Some(c) = table::conn(fd) {
            c.shutdown(how);
            if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
                c.announce_fin();
            }
        }
    }
    r
}

fn nonblocking(fd: c_int) -> bool {
    // SAFETY: F_GETFL takes no argument.
    let fl = unsafe { real::fcntl(fd, libc::F_GETFL, 0) };
    fl >= 0 && fl & libc::O_NONBLOCK != 0
}

/// `Some(true)` for the send timeout options (`SO_SNDTIMEO`, old and new layout),
/// `Some(false)` for the receive ones.
fn timeout_option(name: c_int) -> Option<bool> {
    const SO_RCVTIMEO_NEW: c_int = 66;
    const SO_SNDTIMEO_NEW: c_int = 67;
    match name {
        libc::SO_RCVTIMEO | SO_RCVTIMEO_NEW => Some(false),
        libc::SO_SNDTIMEO | SO_SNDTIMEO_NEW => Some(true),
        _ => None,
    }
}

/// The deadline of a blocking call on connection `c` from its socket's receive or send
/// timeout (`opt`); `None`: none. A negative timeout has passed already.
fn sock_timeout(c: &TcpConn, fd: c_int, opt: c_int) -> Option<Instant> {
    if c.timeout_passed(opt == libc::SO_SNDTIMEO).load(std::sync::atomic::Ordering::Relaxed) {
        return Some(Instant::now());
    }
    let mut tv = timeval { tv_sec: 0, tv_usec: 0 };
    let mut len = std::mem::size_of::<timeval>() as socklen_t;
    // SAFETY: reading a timeval option into a local.
    let r = unsafe {
        crate::real::getsockopt(fd, libc::SOL_SOCKET, opt, std::ptr::addr_of_mut!(tv).cast(), &mut len)
    };
    if r != 0 || (tv.tv_sec == 0 && tv.tv_usec == 0) {
        return None;
    }
    Instant::now()
        .checked_add(Duration::new(tv.tv_sec.max(0) as u64, (tv.tv_usec.clamp(0, 999_999) as u32) * 1000))
}

fn advance(iov: &[iovec], mut skip: usize) -> Vec<iovec> {
    let mut out = Vec::with_capacity(iov.len());
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: stays inside the program's buffer.
        let base = unsafe { v.iov_base.cast::<u8>().add(skip) };
        out.push(iovec { iov_base: base.cast(), iov_len: v.iov_len - skip });
        skip = 0;
    }
    out
}

/// Hands connection `fd` back to TCP (now) before a call the library does not follow
/// (`why`); afterwards `table::conn(fd)` is `None` and the call goes to the kernel (unless
/// the peer closed with bytes this process still reads from the ring: they are read first).
fn hand_back(fd: c_int, why: &str, how: Handback) {
    if let Some(c) = if table::tracked(fd) { table::conn(fd) } else { None } {
        let e = errno();
        c.hand_back(fd, why, how);
        set_errno(e);
    }
}

/// Reads from a connection into `iov` as `recvmsg` would. `None`: not ours.
fn recv_conn(fd: c_int, iov: &[iovec], flags: c_int) -> Option<ssize_t> {
    if flags & (libc::MSG_OOB | libc::MSG_ERRQUEUE) != 0 {
        // The urgent byte is outside the stream and always travels over TCP (a sender
        // hands back to send it), and the error queue is the kernel's: whatever the ring
        // holds, the kernel answers.
        return None;
    }
    let c = table::conn(fd)?;
    if flags & libc::MSG_TRUNC != 0 {
        // TCP discards the bytes (or, with MSG_PEEK, only looks) and says how many; the
        // buffer may be null.
        let mut scratch = vec![0u8; iov_len(iov).min(1 << 20)];
        let one = [iovec { iov_base: scratch.as_mut_ptr().cast(), iov_len: scratch.len() }];
        return Some(match recv_inner(&c, fd, &one, flags & !libc::MSG_TRUNC) {
            Ok(n) => n as ssize_t,
            Err(e) => fail(e),
        });
    }
    if flags & (libc::MSG_PEEK | libc::MSG_WAITALL) == libc::MSG_PEEK | libc::MSG_WAITALL {
        return Some(match peek_all(&c, fd, iov, flags) {
            Ok(n) => n as ssize_t,
            Err(e) => fail(e),
        });
    }
    Some(match recv_inner(&c, fd, iov, flags) {
        Ok(n) => n as ssize_t,
        Err(e) => fail(e),
    })
}

/// `MSG_PEEK | MSG_WAITALL`: as TCP, waits until the whole length can be seen (or EOF, an
/// error, a signal, the receive timeout), without consuming. Polls every millisecond while
/// part of it is there.
fn peek_all(c: &TcpConn, fd: c_int, iov: &[iovec], flags: c_int) -> R<usize> {
    let total = iov_len(iov);
    let deadline = sock_timeout(c, fd, libc::SO_RCVTIMEO);
    loop {
        let n = recv_inner(c, fd, iov, flags & !libc::MSG_WAITALL)?;
        if n >= total || n == 0 || c.peer_closed() || c.has_error() || c.is_plain() {
            return Ok(n);
        }
        if flags & libc::MSG_DONTWAIT != 0 || nonblocking(fd) {
            return Ok(n);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn recv_inner(c: &TcpConn, fd: c_int, iov: &[iovec], flags: c_int) -> R<usize> {
    // Once this call sleeps, it holds its own duplicate of the socket and uses only that.
    let mut fd = fd;
    let mut held: Option<wait::Held> = None;
    let total = iov_len(iov);
    let waitall = flags & libc::MSG_WAITALL != 0 && flags & libc::MSG_PEEK == 0;
    let mut got = 0usize;
    let mut deadline: Option<Option<Instant>> = None;
    loop {
        if c.is_plain() {
            if got > 0 {
                return Ok(got);
            }
            let rest = advance(iov, got);
            let mut m: msghdr = unsafe_zeroed_msghdr();
            m.msg_iov = rest.as_ptr().cast_mut();
            m.msg_iovlen = rest.len() as _;
            // SAFETY: the program's buffers.
            let n = unsafe { real::recvmsg(fd, &mut m, flags) };
            return if n < 0 { Err(errno()) } else { Ok(n as usize) };
        }
        let r = if got == 0 { c.try_recv(fd, iov, flags) } else { c.try_recv(fd, &advance(iov, got), flags) };
        match r {
            Ok(0) => return Ok(got),
            Ok(n) => {
                got += n;
                if !waitall || got >= total {
                    return Ok(got);
                }
            }
            Err(libc::EAGAIN) => {
                if got > 0 && !waitall {
                    return Ok(got);
                }
                if flags & libc::MSG_DONTWAIT != 0 || nonblocking(fd) {
                    return if got > 0 { Ok(got) } else { Err(libc::EAGAIN) };
                }
                let d = *deadline.get_or_insert_with(|| sock_timeout(c, fd, libc::SO_RCVTIMEO));
                if let Err(e) = wait::wait_fd(c, &mut fd, &mut held, true, d) {
                    return if got > 0 { Ok(got) } else { Err(e) };
                }
            }
            Err(e) => return if got > 0 { Ok(got) } else { Err(e) },
        }
    }
}

fn unsafe_zeroed_msghdr() -> msghdr {
    // SAFETY: all-zero bytes are a valid msghdr.
    unsafe { std::mem::zeroed() }
}

/// Writes `iov` to a connection as `sendmsg` would. `None`: not ours.
fn send_conn(fd: c_int, iov: &[iovec], flags: c_int) -> Option<ssize_t> {
    if flags & libc::MSG_OOB != 0 {
        hand_back(fd, "urgent data (MSG_OOB)", Handback::Now);
    }
    let c = table::conn(fd)?;
    Some(match send_inner(&c, fd, iov, flags) {
        Ok(n) => n as ssize_t,
        Err(e) => fail(e),
    })
}

fn send_inner(c: &TcpConn, fd: c_int, iov: &[iovec], flags: c_int) -> R<usize> {
    // Once this call sleeps, it holds its own duplicate of the socket and uses only that.
    let mut fd = fd;
    let mut held: Option<wait::Held> = None;
    let total = iov_len(iov);
    let mut sent = 0usize;
    let mut nb: Option<bool> = None;
    let mut deadline: Option<Option<Instant>> = None;
    loop {
        let r =
            if sent == 0 { c.try_send(fd, iov, flags) } else { c.try_send(fd, &advance(iov, sent), flags) };
        match r {
            Ok(n) => {
                sent += n;
                if sent >= total
                    || *nb.get_or_insert_with(|| flags & libc::MSG_DONTWAIT != 0 || nonblocking(fd))
                {
                    return Ok(sent);
                }
            }
            Err(libc::EAGAIN) => {
                if *nb.get_or_insert_with(|| flags & libc::MSG_DONTWAIT != 0 || nonblocking(fd)) {
                    return if sent > 0 { Ok(sent) } else { Err(libc::EAGAIN) };
                }
                let d = *deadline.get_or_insert_with(|| sock_timeout(c, fd, libc::SO_SNDTIMEO));
                if let Err(e) = wait::wait_fd(c, &mut fd, &mut held, false, d) {
                    return if sent > 0 { Ok(sent) } else { Err(e) };
                }
            }
            Err(e) => return if sent > 0 { Ok(sent) } else { Err(e) },
        }
    }
}

fn one(buf: *const c_void, n: size_t) -> [iovec; 1] {
    [iovec { iov_base: buf.cast_mut(), iov_len: n }]
}

/// `read`.
///
/// # Safety
/// The C contract of `read`.
pub unsafe fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    if table::tracked(fd) {
        if let Some(r) = recv_conn(fd, &one(buf, n), 0) {
            return r;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::read(fd, buf, n) }
}

/// `write`.
///
/// # Safety
/// The C contract of `write`.
pub unsafe fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if table::tracked(fd) {
        if let Some(r) = send_conn(fd, &one(buf, n), 0) {
            return r;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::write(fd, buf, n) }
}

fn iov_slice<'a>(iov: *const iovec, cnt: c_int) -> Option<&'a [iovec]> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) || (iov.is_null() && cnt > 0) {
        return None;
    }
    if cnt == 0 {
        return Some(&[]);
    }
    // SAFETY: the program's iovec array of `cnt` entries.
    Some(unsafe { std::slice::from_raw_parts(iov, cnt as usize) })
}

/// `readv`.
///
/// # Safety
/// The C contract of `readv`.
pub unsafe fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if table::tracked(fd) {
        if let Some(v) = iov_slice(iov, cnt) {
            if let Some(r) = recv_conn(fd, v, 0) {
                return r;
            }
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::readv(fd, iov, cnt) }
}

/// `writev`.
///
/// # Safety
/// The C contract of `writev`.
pub unsafe fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if table::tracked(fd) {
        if let Some(v) = iov_slice(iov, cnt) {
            if let Some(r) = send_conn(fd, v, 0) {
                return r;
            }
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::writev(fd, iov, cnt) }
}

/// `recv`.
///
/// # Safety
/// The C contract of `recv`.
pub unsafe fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    if table::tracked(fd) {
        if let Some(r) = recv_conn(fd, &one(buf, n), flags) {
            return r;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::recv(fd, buf, n, flags) }
}

/// `send`.
///
/// # Safety
/// The C contract of `send`.
pub unsafe fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    if table::tracked(fd) {
        if let Some(r) = send_conn(fd, &one(buf, n), flags) {
            return r;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::send(fd, buf, n, flags) }
}

/// `recvfrom` (a connected TCP socket reports no source address).
///
/// # Safety
/// The C contract of `recvfrom`.
pub unsafe fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if table::tracked(fd) {
        if let Some(r) = recv_conn(fd, &one(buf, n), flags) {
            if r >= 0 && !addr.is_null() && !len.is_null() {
                // SAFETY: the program's length word.
                unsafe { *len = 0 };
            }
            return r;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::recvfrom(fd, buf, n, flags, addr, len) }
}

/// `sendto` (the address is ignored on a connected TCP socket).
///
/// # Safety
/// The C contract of `sendto`.
pub unsafe fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if table::tracked(fd) {
        if let Some(r) = send_conn(fd, &one(buf, n), flags) {
            return r;
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::sendto(fd, buf, n, flags, addr, len) }
}

/// `recvmsg`.
///
/// # Safety
/// The C contract of `recvmsg`.
pub unsafe fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    if table::tracked(fd) && !msg.is_null() {
        // SAFETY: the program's msghdr.
        let m = unsafe { &mut *msg };
        if let Some(v) = iov_slice(m.msg_iov, m.msg_iovlen as c_int) {
            if let Some(r) = recv_conn(fd, v, flags) {
                if r >= 0 {
                    m.msg_namelen = 0;
                    m.msg_controllen = 0;
                    m.msg_flags = 0;
                }
                return r;
            }
        }
    }
    // SAFETY: passed on unchanged.
    let r = unsafe { real::recvmsg(fd, msg, flags) };
    if r >= 0 {
        // SAFETY: the header the kernel just filled in.
        unsafe { crate::fds::fresh_rights(msg) };
    }
    r
}

/// `sendmsg`.
///
/// # Safety
/// The C contract of `sendmsg`.
pub unsafe fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if table::tracked(fd) && !msg.is_null() {
        // SAFETY: the program's msghdr.
        let m = unsafe { &*msg };
        if let Some(v) = iov_slice(m.msg_iov, m.msg_iovlen as c_int) {
            if let Some(r) = send_conn(fd, v, flags) {
                return r;
            }
        }
    }
    // Our connections leaving for another process go back to TCP first: the receiver
    // reads and writes the socket itself.
    // SAFETY: the program's message header.
    for passed in unsafe { crate::fds::rights_in(msg) } {
        hand_back(passed, "the descriptor is sent to another process (SCM_RIGHTS)", Handback::Leaving);
    }
    // SAFETY: passed on unchanged.
    unsafe { real::sendmsg(fd, msg, flags) }
}

/// `vdprintf` (and `dprintf`, whose shim calls this): on an accelerated connection the
/// text is formatted by the C library (`vasprintf`) and written through the library; on
/// anything else the C library's own `vdprintf` runs.
///
/// # Safety
/// The C contract of `vdprintf`; `ap` is the caller's `va_list` as the platform passes it.
pub unsafe fn vdprintf(fd: c_int, fmt: *const libc::c_char, ap: *mut c_void) -> c_int {
    extern "C" {
        fn vasprintf(out: *mut *mut libc::c_char, fmt: *const libc::c_char, ap: *mut c_void) -> c_int;
    }
    if !table::tracked(fd) || table::conn(fd).is_none() {
        // SAFETY: passed on unchanged.
        return unsafe { real::vdprintf(fd, fmt, ap) };
    }
    let mut text: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: the program's format and arguments; the C library allocates `text`.
    let n = unsafe { vasprintf(&mut text, fmt, ap) };
    if n < 0 {
        return -1;
    }
    let mut done = 0usize;
    let mut r = n;
    while done < n as usize {
        // SAFETY: the formatted text of `n` bytes.
        let w = unsafe { write(fd, text.add(done).cast(), n as usize - done) };
        if w < 0 {
            r = -1;
            break;
        }
        done += w as usize;
    }
    let e = errno();
    // SAFETY: allocated by vasprintf.
    unsafe { libc::free(text.cast()) };
    set_errno(e);
    r
}

/// `recvmmsg` on a connection: one `recvmsg` per entry, as the kernel does for a stream
/// socket (blocking for each unless `MSG_DONTWAIT`; after the first with
/// `MSG_WAITFORONE`); stops at an error after the first entry, or when `timeout` has passed
/// after an entry (the kernel checks it only then, too).
///
/// # Safety
/// The C contract of `recvmmsg`.
pub unsafe fn recvmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int, t: *mut timespec) -> c_int {
    if !table::tracked(fd) || table::conn(fd).is_none() || v.is_null() {
        // SAFETY: passed on unchanged.
        return unsafe { real::recvmmsg(fd, v, n, flags, t) };
    }
    let deadline = ts_timeout(t).and_then(|d| Instant::now().checked_add(d));
    let mut f = flags & !libc::MSG_WAITFORONE;
    let done = each_message(v, n, |e| {
        // SAFETY: the program's message header.
        let r = unsafe { recvmsg(fd, &mut e.msg_hdr, f) };
        if flags & libc::MSG_WAITFORONE != 0 {
            f |= libc::MSG_DONTWAIT;
        }
        (r, r >= 0 && deadline.is_some_and(|d| Instant::now() >= d))
    });
    if done < 0 {
        return -1;
    }
    if let Some(d) = deadline {
        if !t.is_null() {
            let left = d.saturating_duration_since(Instant::now());
            // SAFETY: the program's timespec; the kernel writes back the time left.
            unsafe { *t = timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ } };
        }
    }
    done as c_int
}

/// `sendmmsg` on a connection: one `sendmsg` per entry; stops at an error after the first
/// entry or at a short write, as the kernel does.
///
/// # Safety
/// The C contract of `sendmmsg`.
pub unsafe fn sendmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int) -> c_int {
    if !table::tracked(fd) || table::conn(fd).is_none() || v.is_null() {
        // SAFETY: passed on unchanged.
        return unsafe { real::sendmmsg(fd, v, n, flags) };
    }
    each_message(v, n, |e| {
        // SAFETY: the program's message header.
        let r = unsafe { sendmsg(fd, &e.msg_hdr, flags) };
        let whole = iov_slice(e.msg_hdr.msg_iov, e.msg_hdr.msg_iovlen as c_int).map_or(0, iov_len);
        (r, r >= 0 && (r as usize) < whole)
    })
}

/// The `mmsg` calls' walk over the program's `n` entries at `v` (at most `UIO_MAXIOV`):
/// `one` handles an entry and says how many bytes it moved (negative: failed) and whether to
/// stop after it; the length is stored in the entry. Returns how many entries were done, or
/// -1 when the first one failed (errno set by it), as the kernel does.
fn each_message(
    v: *mut libc::mmsghdr,
    n: c_uint,
    mut one: impl FnMut(&mut libc::mmsghdr) -> (ssize_t, bool),
) -> c_int {
    let mut done: c_uint = 0;
    while done < n.min(libc::UIO_MAXIOV as c_uint) {
        // SAFETY: entry `done` of the program's array of `n` (non-null, checked by callers).
        let e = unsafe { &mut *v.add(done as usize) };
        let (r, stop) = one(e);
        if r < 0 {
            if done == 0 {
                return -1;
            }
            break;
        }
        e.msg_len = r as c_uint;
        done += 1;
        if stop {
            break;
        }
    }
    done as c_int
}

/// `dup`.
///
/// # Safety
/// The C contract of `dup`.
pub unsafe fn dup(fd: c_int) -> c_int {
    // SAFETY: passed on unchanged.
    let r = unsafe { real::dup(fd) };
    if r >= 0 && table::tracked(fd) {
        table::copy(fd, r);
    } else {
        crate::fds::fresh(r);
    }
    r
}

/// `dup2` and `dup3`.
///
/// # Safety
/// The C contract of `dup3` (`three` false: `dup2`).
pub unsafe fn dup3(fd: c_int, to: c_int, flags: c_int, three: bool) -> c_int {
    // SAFETY: passed on unchanged.
    let r = unsafe {
        if three {
            real::dup3(fd, to, flags)
        } else {
            real::dup2(fd, to)
        }
    };
    if r >= 0 && fd != to {
        let e = errno();
        table::copy(fd, to);
        set_errno(e);
    }
    r
}

/// `fcntl` (duplicating commands keep the table in step).
///
/// # Safety
/// The C contract of `fcntl`.
pub unsafe fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    if table::tracked(fd) && ((cmd == libc::F_SETFL && arg as c_int & libc::O_ASYNC != 0) || cmd == F_SETSIG)
    {
        // Signal-driven I/O: the kernel signals what arrives on TCP, so everything must.
        hand_back(fd, "signal-driven I/O (O_ASYNC)", Handback::Now);
    }
    // SAFETY: passed on unchanged.
    let r = unsafe { real::fcntl(fd, cmd, arg) };
    if r >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        if table::tracked(fd) {
            table::copy(fd, r);
        } else {
            crate::fds::fresh(r);
        }
    }
    r
}

/// `F_SETSIG` (linux/fcntl.h): the signal `O_ASYNC` sends.
const F_SETSIG: c_int = 10;

/// `SIOCOUTQ` (linux/sockios.h, = `TIOCOUTQ`): bytes sent but not acknowledged.
const SIOCOUTQ: c_ulong = 0x5411;
/// `SIOCOUTQNSD` (linux/sockios.h): bytes not sent yet.
const SIOCOUTQNSD: c_ulong = 0x894B;

/// `SIOCATMARK` (linux/sockios.h): whether the urgent mark is reached.
const SIOCATMARK: c_ulong = 0x8905;

/// `ioctl`: `FIONREAD` counts what the ring holds.
///
/// # Safety
/// The C contract of `ioctl`.
pub unsafe fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    if req == libc::FIONREAD && !arg.is_null() {
        if let Some(c) = table::conn(fd) {
            let n = c.pending_bytes(fd).min(c_int::MAX as usize) as c_int;
            // SAFETY: FIONREAD's argument is an int the program gave us.
            unsafe { *arg.cast::<c_int>() = n };
            return 0;
        }
    } else if (req == SIOCOUTQ || req == SIOCOUTQNSD)
        && !arg.is_null()
        && table::conn(fd).is_some_and(|c| !c.tx_on_tcp())
    {
        // Bytes written into the ring are in memory the peer reads: delivered, as data in
        // the peer's receive buffer is acknowledged over TCP (the kernel's count would show
        // our wakeup bytes instead).
        // SAFETY: the argument is an int the program gave us.
        unsafe { *arg.cast::<c_int>() = 0 };
        return 0;
    } else if req == SIOCATMARK && !arg.is_null() && table::conn(fd).is_some_and(|c| c.ahead_of_kernel(fd)) {
        // Bytes in the ring (or wakeup bytes not yet taken) come before anything in the
        // kernel's stream, so the urgent mark, which is there, is not reached yet.
        // SAFETY: SIOCATMARK's argument is an int the program gave us.
        unsafe { *arg.cast::<c_int>() = 0 };
        return 0;
    } else if ![libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX, SIOCATMARK, SIOCOUTQ, SIOCOUTQNSD]
        .contains(&req)
        && table::tracked(fd)
    {
        // A request whose answer depends on the kernel's view of the stream (SIOCOUTQ,
        // SIOCATMARK, ...): that view must be the whole truth first.
        hand_back(fd, &format!("ioctl {req:#x}"), Handback::Now);
    }
    // SAFETY: passed on unchanged.
    unsafe { real::ioctl(fd, req, arg) }
}

fn ms_timeout(ms: c_int) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

fn ts_timeout(ts: *const timespec) -> Option<Duration> {
    if ts.is_null() {
        return None;
    }
    // SAFETY: the program's timespec.
    let t = unsafe { *ts };
    Some(Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32))
}

/// `poll`.
///
/// # Safety
/// The C contract of `poll`.
pub unsafe fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { wait::poll(fds, n, ms_timeout(timeout), std::ptr::null()) }
}

/// `ppoll`.
///
/// # Safety
/// The C contract of `ppoll`.
pub unsafe fn ppoll(fds: *mut pollfd, n: nfds_t, ts: *const timespec, mask: *const sigset_t) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { wait::poll(fds, n, ts_timeout(ts), mask) }
}

/// `select`.
///
/// # Safety
/// The C contract of `select`.
pub unsafe fn select(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    x: *mut libc::fd_set,
    tv: *mut timeval,
) -> c_int {
    let t = if tv.is_null() {
        None
    } else {
        // SAFETY: the program's timeval.
        let t = unsafe { *tv };
        Some(Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.clamp(0, 999_999) as u32) * 1000))
    };
    let start = Instant::now();
    // SAFETY: the caller's sets.
    match unsafe { wait::select(n, r, w, x, t, std::ptr::null()) } {
        Some(res) => {
            if let (Some(t), false) = (t, tv.is_null()) {
                // Linux reports the time left.
                let left = t.saturating_sub(start.elapsed());
                // SAFETY: the program's timeval.
                unsafe { *tv = timeval { tv_sec: left.as_secs() as _, tv_usec: left.subsec_micros() as _ } };
            }
            res
        }
        // SAFETY: passed on unchanged.
        None => unsafe { real::select(n, r, w, x, tv) },
    }
}

/// `pselect`.
///
/// # Safety
/// The C contract of `pselect`.
pub unsafe fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    x: *mut libc::fd_set,
    ts: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    // SAFETY: the caller's sets.
    match unsafe { wait::select(n, r, w, x, ts_timeout(ts), mask) } {
        Some(res) => res,
        // SAFETY: passed on unchanged.
        None => unsafe { real::pselect(n, r, w, x, ts, mask) },
    }
}

fn epoll_set(epfd: c_int, create: bool) -> Option<Arc<EpollSet>> {
    match table::get(epfd) {
        Some(Entry::Epoll(s)) => Some(s),
        Some(_) => None,
        None if create => {
            let s = Arc::new(EpollSet::new(epfd));
            table::set(epfd, Entry::Epoll(s.clone())).then_some(s)
        }
        None => None,
    }
}

/// `epoll_create`/`epoll_create1` returned `r`: every epoll instance gets an (empty) set,
/// so that one registered in another instance, or polled, is known as one.
pub fn epoll_created(r: c_int) -> c_int {
    let r = crate::fds::fresh(r);
    if r >= 0 {
        let e = errno();
        table::set(r, Entry::Epoll(Arc::new(EpollSet::new(r))));
        set_errno(e);
    }
    r
}

/// `epoll_ctl`: our connections are registered with a tag and tracked here; an epoll
/// instance registered in another is recorded (the kernel keeps the program's registration).
///
/// # Safety
/// The C contract of `epoll_ctl`.
pub unsafe fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int {
    // Not checked against the recorded identity here: event loops re-arm with `epoll_ctl`
    // once or more per request, and an `fstat` each would add a system call to the busy
    // path. A number reused behind our back was already forgotten when a call returned it.
    let entry = if table::tracked(fd) { table::get(fd) } else { None };
    if let Some(set) = epoll_set(epfd, false) {
        set.release_inherited(epfd);
        if let Some(Entry::Conn(c)) = &entry {
            if c.is_plain() || c.ring_given_up() {
                // The kernel's registration is the program's now: ours is stale.
                set.forget_handed_back(fd);
            }
        }
    }
    let conn = match entry {
        Some(Entry::Conn(c)) if !c.is_plain() && !c.ring_given_up() => c,
        Some(Entry::Epoll(inner)) => {
            // SAFETY: passed on unchanged.
            let r = unsafe { real::epoll_ctl(epfd, op, fd, ev) };
            if r == 0 {
                if let Some(outer) = epoll_set(epfd, op != libc::EPOLL_CTL_DEL) {
                    if op == libc::EPOLL_CTL_DEL || ev.is_null() {
                        outer.forget(fd);
                    } else {
                        // SAFETY: the program's event, just accepted by the kernel.
                        outer.put_nested(fd, inner, unsafe { &*ev });
                    }
                }
            }
            return r;
        }
        _ => {
            // SAFETY: passed on unchanged.
            return unsafe { real::epoll_ctl(epfd, op, fd, ev) };
        }
    };
    let Some(set) = epoll_set(epfd, op != libc::EPOLL_CTL_DEL) else {
        // SAFETY: passed on unchanged.
        return unsafe { real::epoll_ctl(epfd, op, fd, ev) };
    };
    let app = match op {
        libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD => {
            if ev.is_null() {
                return fail(libc::EFAULT);
            }
            // SAFETY: the program's event.
            let app = unsafe { *ev };
            // The kernel's rule for EPOLLEXCLUSIVE (epoll_ctl(2)), which our registration in
            // the kernel (no EPOLLONESHOT or EPOLLRDHUP there) would not meet.
            let exclusive_ok = (libc::EPOLLIN
                | libc::EPOLLOUT
                | libc::EPOLLERR
                | libc::EPOLLHUP
                | libc::EPOLLWAKEUP
                | libc::EPOLLET
                | libc::EPOLLEXCLUSIVE) as u32;
            if app.events & libc::EPOLLEXCLUSIVE as u32 != 0
                && (op == libc::EPOLL_CTL_MOD || app.events & !exclusive_ok != 0)
            {
                return fail(libc::EINVAL);
            }
            Some(app)
        }
        _ => None,
    };
    set.ctl(epfd, op, fd, conn, app)
}

/// An `epoll_wait`-family call on `epfd` with `timeout` (`None`: forever). `kernel` makes
/// the C library's call with a timeout. While no connection of ours is registered it is the
/// kernel's wait, counted as a waiter, so that an `epoll_ctl` adding one from another thread
/// rings the instance's bell; this wait then goes on in shared memory.
fn epoll_dispatch(
    epfd: c_int,
    ev: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    mask: *const sigset_t,
    kernel: impl Fn(Option<Duration>) -> c_int,
) -> c_int {
    if ev.is_null()
        && max > 0
        && table::tracked(epfd)
        && epoll_set(epfd, false).is_some_and(|s| !s.is_empty())
    {
        // The kernel's answer when it has an event to copy out; ours may be in memory only.
        return fail(libc::EFAULT);
    }
    let set = (max > 0 && !ev.is_null() && table::tracked(epfd)).then(|| epoll_set(epfd, false)).flatten();
    if let Some(s) = &set {
        s.release_inherited(epfd);
    }
    let Some(set) = set else { return kernel(timeout) };
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        // A timeout too long to represent waits forever.
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if !set.is_empty() {
            // SAFETY: the caller's array of `max` events.
            return unsafe { epoll::wait(epfd, &set, ev, max, left, mask) };
        }
        let waiting = set.waiting();
        if !set.is_empty() {
            // Registered meanwhile (before this thread counted as waiting).
            drop(waiting);
            continue;
        }
        let r = kernel(left);
        drop(waiting);
        if r <= 0 || !set.has_bell() {
            return r;
        }
        // SAFETY: the kernel wrote `r` events into the caller's array.
        let out = unsafe { std::slice::from_raw_parts_mut(ev, r as usize) };
        let n = set.strip_bell(out, r as usize);
        if n > 0 || timeout == Some(Duration::ZERO) || deadline.is_some_and(|d| Instant::now() >= d) {
            return n as c_int;
        }
    }
}

/// `epoll_wait` and `epoll_pwait`.
///
/// # Safety
/// The C contract of `epoll_pwait`.
pub unsafe fn epoll_pwait(
    epfd: c_int,
    ev: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const sigset_t,
) -> c_int {
    epoll_dispatch(epfd, ev, max, ms_timeout(timeout), mask, |t| {
        let ms = t.map_or(-1, |t| t.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int);
        // SAFETY: the caller's contract, with the time left.
        unsafe { real::epoll_pwait(epfd, ev, max, ms, mask) }
    })
}

/// `epoll_pwait2` (a `timespec` timeout).
///
/// # Safety
/// The C contract of `epoll_pwait2`.
pub unsafe fn epoll_pwait2(
    epfd: c_int,
    ev: *mut epoll_event,
    max: c_int,
    t: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    epoll_dispatch(epfd, ev, max, ts_timeout(t), mask, |left| {
        let ts = left.map(|d| timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ });
        let tp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const timespec);
        // SAFETY: the caller's contract, with the time left.
        unsafe { real::epoll_pwait2(epfd, ev, max, tp, mask) }
    })
}

/// `fdopen`: stdio reads and writes through the C library's internals, past the library, so
/// a connection gets a stream only after it went back to TCP.
///
/// # Safety
/// The C contract of `fdopen`.
pub unsafe fn fdopen(fd: c_int, mode: *const libc::c_char) -> *mut libc::FILE {
    hand_back(fd, "stdio on the connection (fdopen)", Handback::Leaving);
    // SAFETY: passed on unchanged.
    unsafe { real::fdopen(fd, mode) }
}

/// `syscall`: `io_uring_setup` first hands every connection back to TCP (a ring's I/O
/// reaches sockets past the library); everything else is passed on.
///
/// # Safety
/// The C contract of `syscall` with `n`'s arguments.
pub unsafe fn syscall(n: libc::c_long, a: [libc::c_long; 6]) -> libc::c_long {
    if n == libc::SYS_io_uring_setup {
        for (fd, c) in table::conns() {
            c.hand_back(fd, "io_uring_setup (a ring's I/O goes past the library)", Handback::Leaving);
        }
    }
    // SAFETY: passed on unchanged.
    unsafe { real::syscall(n, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// `sendfile`: into a connection, bytes are read from the file and written to the ring.
///
/// # Safety
/// The C contract of `sendfile`.
pub unsafe fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    let Some(c) = (if table::tracked(out) { table::conn(out) } else { None }) else {
        // SAFETY: passed on unchanged.
        return unsafe { real::sendfile(out, inp, off, n) };
    };
    let mut buf = vec![0u8; n.min(256 * 1024)];
    let mut done = 0usize;
    while done < n {
        let want = (n - done).min(buf.len());
        // SAFETY: reading into our own buffer; `off` is the program's offset word.
        let got = unsafe {
            if off.is_null() {
                real::read(inp, buf.as_mut_ptr().cast(), want)
            } else {
                libc::pread(inp, buf.as_mut_ptr().cast(), want, *off)
            }
        };
        if got < 0 {
            return if done > 0 { done as ssize_t } else { -1 };
        }
        if got == 0 {
            break;
        }
        let put = match send_inner(&c, out, &one(buf.as_ptr().cast(), got as usize), 0) {
            Ok(p) => p,
            Err(e) => return if done > 0 { done as ssize_t } else { fail(e) },
        };
        if put < got as usize && off.is_null() {
            // The file position moved past bytes we could not send: put it back.
            // SAFETY: seeking the program's file by what was not sent.
            unsafe { libc::lseek(inp, -((got as usize - put) as off_t), libc::SEEK_CUR) };
        }
        if !off.is_null() {
            // SAFETY: the program's offset word.
            unsafe { *off += put as off_t };
        }
        done += put;
        if put < got as usize {
            break;
        }
    }
    done as ssize_t
}

/// `splice` from or to a connection (the other end is a pipe).
///
/// # Safety
/// The C contract of `splice`.
pub unsafe fn splice(
    inp: c_int,
    ioff: *mut loff_t,
    out: c_int,
    ooff: *mut loff_t,
    n: size_t,
    flags: c_uint,
) -> ssize_t {
    let from = if table::tracked(inp) { table::conn(inp) } else { None };
    let to = if table::tracked(out) { table::conn(out) } else { None };
    let mut buf = vec![0u8; n.min(64 * 1024)];
    if let Some(c) = from {
        // Peek, hand to the pipe, then consume exactly what the pipe took.
        // SPLICE_F_NONBLOCK is about the pipe; the socket blocks as its own flags say.
        let f = libc::MSG_PEEK;
        let got = match recv_inner(&c, inp, &one(buf.as_mut_ptr().cast(), buf.len()), f) {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        if got == 0 {
            return 0;
        }
        // SAFETY: writing our own buffer to the program's pipe.
        let w = unsafe { real::write(out, buf.as_ptr().cast(), got) };
        if w <= 0 {
            return w;
        }
        let _ = recv_inner(&c, inp, &one(buf.as_mut_ptr().cast(), w as usize), libc::MSG_WAITALL);
        return w;
    }
    if let Some(c) = to {
        // A connection that refuses writes (reset, shut down) fails the call as the
        // kernel's splice does, before it takes anything out of the pipe.
        if let Err(e) = send_inner(&c, out, &one(buf.as_ptr().cast(), 0), 0) {
            return fail(e);
        }
        // SAFETY: reading the program's pipe into our buffer.
        let got = unsafe { real::read(inp, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            return got;
        }
        return match send_inner(&c, out, &one(buf.as_ptr().cast(), got as usize), 0) {
            Ok(p) => p as ssize_t,
            Err(e) => fail(e),
        };
    }
    // SAFETY: passed on unchanged.
    unsafe { real::splice(inp, ioff, out, ooff, n, flags) }
}

/// `vfork`, run as `fork`. A `vfork` child runs in its parent's memory, so the library's
/// bookkeeping of whatever it does before its `exec` (CPython's subprocess points
/// descriptors at a connection and closes every other one) would be the parent's. The
/// interposed `vfork` cannot return twice through a frame of its own either, so the child
/// gets a copy of the memory: for a program that keeps to what `vfork` allows, that is
/// indistinguishable apart from the cost of copying the page tables.
///
/// # Safety
/// The C contract of `vfork`.
pub unsafe fn vfork() -> libc::pid_t {
    // SAFETY: the caller's contract, which `fork`'s contains.
    unsafe { fork() }
}

/// `clone`: a child that shares our memory but is not a thread of this process
/// (`CLONE_VM` without `CLONE_THREAD`) runs with the library passing every call straight to
/// the C library ([`table::foreign`]), so nothing it does touches this process's
/// connections. The argument list is `clone`'s full one; the C library reads the optional
/// ones only where `flags` asks for them.
///
/// # Safety
/// The C contract of `clone`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn clone(
    f: Option<real::CloneFn>,
    stack: *mut c_void,
    flags: c_int,
    arg: *mut c_void,
    ptid: *mut libc::pid_t,
    tls: *mut c_void,
    ctid: *mut libc::pid_t,
) -> c_int {
    let vm = flags & libc::CLONE_VM != 0 && flags & libc::CLONE_THREAD == 0;
    if vm {
        table::vm_child_starting();
    }
    // SAFETY: passed on unchanged.
    let r = unsafe { real::clone(f, stack, flags, arg, ptid, tls, ctid) };
    if vm && (r < 0 || flags & libc::CLONE_VFORK != 0) {
        // The parent resumes only after a CLONE_VFORK child exec'd or exited.
        let e = errno();
        table::vm_child_done();
        set_errno(e);
    }
    r
}

/// `fork`, with the table consistent in the child.
///
/// # Safety
/// The C contract of `fork`.
pub unsafe fn fork() -> libc::pid_t {
    // The child holds every connection too (counted before, so that no process of either
    // takes the connection for unshared in between).
    let conns = table::conns();
    for (_, c) in &conns {
        c.count_holder(true);
    }
    // SAFETY: passed on unchanged.
    let r = table::around_fork(|| unsafe { real::fork() });
    if r < 0 {
        let e = errno();
        for (_, c) in &conns {
            c.count_holder(false);
        }
        set_errno(e);
    }
    drop(conns);
    if r >= 0 {
        let e = errno();
        crate::exec::after_fork();
        if r == 0 {
            crate::conn::note_pid();
            settings::reset_counters();
            for set in table::epoll_sets() {
                set.mark_inherited();
            }
            table::after_fork_in_child();
            crate::exec::after_fork_in_child();
        }
        set_errno(e);
    }
    r
}

/// At start: takes over the accelerated connections a previous program image of this
/// process passed on at its `exec` (`crate::exec::at_start`).
pub fn at_start() {
    crate::exec::at_start();
}

/// At exit: what peers that handed back did not read of our rings goes over TCP (the
/// kernel's close follows); withdraw announcements no other process holds; log the counters.
pub fn at_exit() {
    // One wait for all of them together, however many there are.
    let deadline = Instant::now() + crate::conn::FIN_WAIT;
    let mut seen = std::collections::HashSet::new();
    for (fd, c) in table::conns() {
        if seen.insert(Arc::as_ptr(&c)) && !c.shared() {
            c.settle_before_fin(fd, deadline);
        }
    }
    for l in table::drain_listeners() {
        drop(l);
    }
    settings::log_counters();
}
