//! Rendezvous without a daemon: a listener is a Unix seqpacket socket named in the runtime
//! directory; connecting hands over a sealed memfd and wakeup eventfds with `SCM_RIGHTS`, and
//! the Unix connection stays open as the liveness channel. `docs/protocols.md` describes the
//! packets byte for byte.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ivcom_ring::layout::{self, Direction, Params, HEADER_SIZE, MAX_CAPACITY};

use crate::config::{self, Options, DEFAULT_CAPACITY};
use crate::conn::{Conn, ConnParts, ListenerFile};
use crate::rundir::{RuntimeDir, SocketSpec};
use crate::signal::Signal;
use crate::sys::{self, Mapping};

/// `b"IVCH"` as a little-endian u32: first field of every handshake packet.
pub const HS_MAGIC: u32 = u32::from_le_bytes(*b"IVCH");
/// Handshake protocol version.
pub const HS_VERSION: u16 = 1;
const SERVER_HELLO: u16 = 1;
const CLIENT_HELLO: u16 = 2;
const ACCEPT: u16 = 3;
const REFUSE: u16 = 4;
const FLAG_MESSAGES: u32 = 1;

/// Reasons in a REFUSE packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Status {
    Version = 1,
    Permission = 2,
    BadRegion = 3,
    Mode = 4,
    Protocol = 5,
}

impl Status {
    fn kind(code: u32) -> io::ErrorKind {
        match code {
            2 => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidData,
        }
    }
}

/// Most bytes of a handshake packet.
const MAX_PACKET: usize = 512;

fn header(kind: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&HS_MAGIC.to_le_bytes());
    v.extend_from_slice(&HS_VERSION.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v
}

fn refuse_packet(status: Status, reason: &str) -> Vec<u8> {
    let mut v = header(REFUSE);
    v.extend_from_slice(&(status as u32).to_le_bytes());
    let mut end = reason.len().min(MAX_PACKET - v.len());
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    v.extend_from_slice(&reason.as_bytes()[..end]);
    v
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A received handshake packet, its header checked.
struct Packet {
    kind: u16,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// How a packet failed to arrive.
enum RecvFail {
    /// The other side closed the connection.
    Closed,
    /// The other side speaks another handshake version.
    Version(io::Error),
    Error(io::Error),
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Receives one packet. A different handshake version is reported with `other_version`.
fn recv(sock: BorrowedFd<'_>, who: &str) -> Result<Packet, RecvFail> {
    let mut buf = [0u8; MAX_PACKET];
    let (n, fds) = sys::recv_packet(sock, &mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => RecvFail::Error(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{who} did not answer the handshake in time"),
        )),
        // The other side closed with our packet unread.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => RecvFail::Closed,
        _ => RecvFail::Error(e),
    })?;
    if n == 0 {
        return Err(RecvFail::Closed);
    }
    let b = &buf[..n];
    if n < 8 || le_u32(b, 0) != HS_MAGIC {
        return Err(RecvFail::Error(bad_data(format!(
            "{who} does not speak the ivcom handshake (bad magic)"
        ))));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != HS_VERSION {
        return Err(RecvFail::Version(bad_data(format!(
            "{who} speaks ivcom handshake version {version}, this build speaks version {HS_VERSION}"
        ))));
    }
    Ok(Packet { kind: u16::from_le_bytes([b[6], b[7]]), body: b[8..].to_vec(), fds })
}

fn refused_error(who: &str, body: &[u8]) -> io::Error {
    if body.len() < 4 {
        return bad_data(format!("{who} refused the connection"));
    }
    let code = le_u32(body, 0);
    let reason = String::from_utf8_lossy(&body[4..]);
    io::Error::new(Status::kind(code), format!("{who} refused the connection: {reason}"))
}

/// Sends a refusal (best effort: the peer may be gone) and returns `err`.
fn refuse(sock: BorrowedFd<'_>, status: Status, err: io::Error) -> io::Error {
    let _ = sys::send_packet(sock, &refuse_packet(status, &err.to_string()), &[]);
    err
}

/// The socket file of listener `name` in a runtime directory.
fn socket_file(name: &str) -> io::Result<String> {
    config::check_name(name)?;
    Ok(format!("{name}.sock"))
}

/// How long a dropped listener waits for the directory lock before leaving its socket file
/// (a stale file is replaced by the next bind of the name).
const DROP_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an accepted connection produced no channel.
pub(crate) enum AcceptError {
    /// The listening socket itself failed (or the agent connection did).
    Listener(io::Error),
    /// One connector was refused (access policy, handshake, region); the listener is fine.
    Refused(io::Error),
}

impl From<AcceptError> for io::Error {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::Listener(e) | AcceptError::Refused(e) => e,
        }
    }
}

/// A named listener for channels from co-resident processes.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    name: String,
    /// The verified runtime directory (`None` through a VM agent).
    dir: Option<RuntimeDir>,
    /// Name of the socket file in `dir`.
    file: String,
    path: PathBuf,
    ino: (u64, u64),
    opts: Options,
    messages: bool,
    /// Listening through a VM agent: `fd` is our connection to it, `path` its socket.
    via_agent: bool,
}

impl Listener {
    /// Listens on `name` with default options.
    pub fn bind(name: &str) -> io::Result<Self> {
        Self::bind_with(name, &Options::new())
    }

    /// Listens on `name` in the runtime directory. Fails with `AddrInUse` if a live listener
    /// has the name; a socket file left by a dead listener is replaced.
    pub fn bind_with(name: &str, opts: &Options) -> io::Result<Self> {
        bind(name, opts, false)
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the socket file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a connection and completes its handshake (each handshake is bounded by
    /// [`Options::handshake_timeout`]). A connector refused by the access policy, or failing
    /// the handshake (protocol error, bad or oversized region, silence past the timeout),
    /// returns that connector's error: `PermissionDenied`, `InvalidData` or `TimedOut`. The
    /// listener stays usable: call `accept` again (or use [`Listener::incoming`], which skips
    /// refused connectors). Connections that close before saying anything are skipped.
    pub fn accept(&self) -> io::Result<crate::Stream> {
        self.accept_conn().map(crate::Stream::from_conn)
    }

    /// An endless iterator over accepted channels. Connectors that are refused (access
    /// policy, handshake or region errors) are logged at warn level (`tracing`) and skipped,
    /// so a `for s in listener.incoming() { let s = s?; ... }` loop keeps serving after an
    /// unauthorised attempt; the errors it yields are failures of the listening socket itself
    /// (for example `EMFILE`).
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<crate::Stream>> + '_ {
        std::iter::repeat_with(move || loop {
            match self.accept_inner() {
                Ok(c) => return Ok(crate::Stream::from_conn(c)),
                Err(AcceptError::Refused(e)) => {
                    tracing::warn!("ivcom: refused a connection to {:?}: {e}", self.name);
                }
                Err(AcceptError::Listener(e)) => return Err(e),
            }
        })
    }

    pub(crate) fn accept_conn(&self) -> io::Result<Conn> {
        self.accept_inner().map_err(io::Error::from)
    }

    pub(crate) fn accept_inner(&self) -> Result<Conn, AcceptError> {
        if self.via_agent {
            let spin = self.opts.spin_budget_or(config::DEFAULT_VM_SPIN).map_err(AcceptError::Listener)?;
            return crate::vm::local::accept(self.fd.as_fd(), spin).map_err(AcceptError::Listener);
        }
        loop {
            let sock = sys::accept(self.fd.as_fd()).map_err(AcceptError::Listener)?;
            match serve(sock, &self.opts, self.messages, &self.name) {
                Ok(c) => return Ok(c),
                Err(RecvFail::Closed) => {
                    tracing::debug!("ivcom: a connection to {} closed during the handshake", self.name);
                    continue;
                }
                Err(RecvFail::Version(e) | RecvFail::Error(e)) => return Err(AcceptError::Refused(e)),
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.via_agent {
            return; // the agent withdraws the name when our socket closes
        }
        // Remove our socket file, unless another listener has already replaced it.
        let Some(dir) = &self.dir else { return };
        match dir.lock(DROP_LOCK_TIMEOUT) {
            Ok(_lock) => {
                let _ = dir.unlink_if(&self.file, self.ino);
            }
            Err(e) => tracing::warn!("ivcom: leaving socket file {}: {e}", self.path.display()),
        }
    }
}

/// What a name and mode must be to go through a VM agent.
fn check_agent_request(name: &str, messages: bool) -> io::Result<()> {
    config::check_name(name)?;
    if messages {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "message channels through a VM agent are not supported",
        ));
    }
    Ok(())
}

pub(crate) fn bind(name: &str, opts: &Options, messages: bool) -> io::Result<Listener> {
    if let Some(agent) = opts.agent_socket() {
        check_agent_request(name, messages)?;
        opts.spin_budget()?;
        let fd = crate::vm::local::bind(&agent, name, opts.handshake())?;
        return Ok(Listener {
            fd,
            name: name.to_owned(),
            dir: None,
            file: String::new(),
            path: agent,
            ino: (0, 0),
            opts: opts.clone(),
            messages,
            via_agent: true,
        });
    }
    let file = socket_file(name)?;
    opts.capacity_limit()?;
    opts.spin_budget()?;
    let dir = RuntimeDir::resolve(opts)?;
    let path = dir.path().join(&file);
    // Serialises the check-and-replace of a stale file among ivcom processes; bounded, as
    // anyone who can open the directory can hold it.
    let _lock = dir.lock(sys::DIR_LOCK_TIMEOUT)?;
    // The socket file gets its mode before the socket listens; a stale file left by a dead
    // listener is replaced, a live listener's never. Holding the directory lock, no other ivcom
    // process can bind or replace it meanwhile; only we can write in the verified directory.
    let spec = SocketSpec {
        kind: rustix::net::SocketType::SEQPACKET,
        nonblocking: false,
        uid: None,
        gid: None,
        mode: opts.socket_file_mode(),
        backlog: 128,
    };
    let (fd, ino) = dir.listen_unix(&file, &spec).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("listener name {name:?} is already taken by a live listener ({})", path.display()),
        ),
        io::ErrorKind::AlreadyExists => io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; remove it to listen on {name:?}", path.display()),
        ),
        _ => e,
    })?;
    Ok(Listener {
        fd,
        name: name.to_owned(),
        dir: Some(dir),
        file,
        path,
        ino,
        opts: opts.clone(),
        messages,
        via_agent: false,
    })
}

/// The listener's side of the handshake on an accepted connection.
fn serve(sock: OwnedFd, opts: &Options, messages: bool, name: &str) -> Result<Conn, RecvFail> {
    let s = sock.as_fd();
    let fail = RecvFail::Error;
    sys::set_timeouts(s, Some(opts.handshake())).map_err(fail)?;
    let cred = sys::peer_cred(s).map_err(fail)?;
    let own = sys::euid();
    if !opts.access_policy().allows(own, cred.uid.as_raw(), cred.gid.as_raw()) {
        let e = io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "uid {} (pid {}) may not connect to {name:?}: access policy is {:?}",
                cred.uid.as_raw(),
                cred.pid.as_raw_nonzero(),
                opts.access_policy()
            ),
        );
        return Err(fail(refuse(s, Status::Permission, e)));
    }
    let mut hello = header(SERVER_HELLO);
    hello.extend_from_slice(&(if messages { FLAG_MESSAGES } else { 0 }).to_le_bytes());
    hello.extend_from_slice(&(if messages { opts.max_message_size() } else { 0 }).to_le_bytes());
    let cap = opts.chosen_capacity().map_err(fail)?.unwrap_or(0) as u64;
    hello.extend_from_slice(&cap.to_le_bytes());
    let limit = opts.capacity_limit().map_err(fail)?;
    hello.extend_from_slice(&limit.to_le_bytes());
    sys::send_packet(s, &hello, &[]).map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => RecvFail::Closed,
        _ => fail(e),
    })?;

    let p = match recv(s, "connecting peer") {
        Ok(p) => p,
        Err(RecvFail::Version(e)) => return Err(fail(refuse(s, Status::Version, e))),
        Err(RecvFail::Error(e)) => return Err(fail(refuse(s, Status::Protocol, e))),
        Err(RecvFail::Closed) => return Err(RecvFail::Closed),
    };
    match p.kind {
        CLIENT_HELLO if p.body.len() >= 8 => {
            let client_messages = le_u32(&p.body, 0) & FLAG_MESSAGES != 0;
            if client_messages != messages {
                let kind = |m: bool| if m { "message" } else { "stream" };
                let e = bad_data(format!(
                    "connecting peer opened a {} connection to a {} listener",
                    kind(client_messages),
                    kind(messages)
                ));
                return Err(fail(refuse(s, Status::Mode, e)));
            }
        }
        REFUSE => return Err(fail(refused_error("connecting peer", &p.body))),
        k => {
            let e = bad_data(format!("connecting peer sent handshake packet kind {k}, expected a hello"));
            return Err(fail(refuse(s, Status::Protocol, e)));
        }
    }
    let [memfd, c_rx, c_tx]: [OwnedFd; 3] = p.fds.try_into().map_err(|v: Vec<OwnedFd>| {
        fail(refuse(
            s,
            Status::Protocol,
            bad_data(format!("connecting peer passed {} descriptors, expected 3", v.len())),
        ))
    })?;
    let region_fail = |e: io::Error| fail(refuse(s, Status::BadRegion, e));
    let too_big = |what: String, allowed: u64| {
        bad_data(format!(
            "connecting peer's {what} is more than the {allowed} allowed by this listener's limit of \
             {limit} bytes of ring per direction (Options::max_capacity)"
        ))
    };
    // The connector chose the region's size and we are about to map it: refuse one larger than
    // two rings of our limit before mapping anything (a peer pinning memory charged to us).
    let max_size = HEADER_SIZE as u64 + 2 * limit.min(MAX_CAPACITY);
    let size = rustix::fs::fstat(&memfd).map_err(|e| region_fail(e.into()))?.st_size as u64;
    if size > max_size {
        return Err(region_fail(too_big(format!("region of {size} bytes"), max_size)));
    }
    let size = sys::check_memfd(memfd.as_fd(), max_size).map_err(region_fail)?;
    sys::check_eventfd(c_rx.as_fd()).map_err(region_fail)?;
    sys::check_eventfd(c_tx.as_fd()).map_err(region_fail)?;
    let map = Mapping::map(memfd.as_fd(), 0, size).map_err(region_fail)?;
    let params = layout::validate(map.region(), messages).map_err(|e| {
        let status = if matches!(e, layout::LayoutError::ModeMismatch { .. }) {
            Status::Mode
        } else {
            Status::BadRegion
        };
        fail(refuse(s, status, bad_data(format!("connecting peer's region: {e}"))))
    })?;
    if let Some(c) = params.capacity.iter().copied().find(|&c| c > limit) {
        return Err(region_fail(too_big(format!("ring capacity of {c} bytes"), limit)));
    }
    if let Some(max) = params.max_message {
        if max > opts.max_message_size() {
            let e = bad_data(format!(
                "connecting peer's maximum message {max} exceeds ours ({})",
                opts.max_message_size()
            ));
            return Err(fail(refuse(s, Status::BadRegion, e)));
        }
    }
    let l_rx = sys::new_eventfd().map_err(fail)?;
    let l_tx = sys::new_eventfd().map_err(fail)?;
    sys::send_packet(s, &header(ACCEPT), &[l_rx.as_fd(), l_tx.as_fd()]).map_err(fail)?;
    sys::set_timeouts(s, None).map_err(fail)?;
    Conn::new(ConnParts {
        map,
        ctrl: sock,
        own_rx: l_rx,
        own_tx: l_tx,
        peer_rx: Signal::EventFd(c_rx),
        peer_tx: Signal::EventFd(c_tx),
        rx_geom: params.ring(Direction::ToListener),
        tx_geom: params.ring(Direction::ToConnector),
        max_message: params.max_message,
        spin: opts.spin_budget().map_err(fail)?,
        listener_file: None,
    })
    .map_err(fail)
}

/// The connecting side of the handshake.
pub(crate) fn connect(name: &str, opts: &Options, messages: bool) -> io::Result<Conn> {
    if let Some(agent) = opts.agent_socket() {
        check_agent_request(name, messages)?;
        let spin = opts.spin_budget_or(config::DEFAULT_VM_SPIN)?;
        return crate::vm::local::connect(&agent, name, opts.handshake(), spin);
    }
    let file = socket_file(name)?;
    let chosen = opts.chosen_capacity()?;
    let spin = opts.spin_budget()?;
    let own = sys::euid();
    let policy = opts.access_policy();
    let dir_path = opts.resolved_runtime_dir();
    // Whoever owns the directory (or may write in it) decides which socket sits at a name: it
    // must be us, root, or a uid our policy trusts, and nobody else may write in it.
    let dir = RuntimeDir::open_existing(&dir_path, |uid, gid| policy.allows(own, uid, gid)).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "no ivcom listener named {name:?} (runtime directory {} does not exist)",
                    dir_path.display()
                ),
            )
        } else {
            io::Error::new(e.kind(), format!("cannot connect to {name:?}: {e}"))
        }
    })?;
    let path = dir.path().join(&file);
    let addr = dir.unix_addr(&file)?;
    let sock = sys::connect_seqpacket_at(&addr).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("no ivcom listener named {name:?} ({}: {e})", path.display()),
        ),
        k => io::Error::new(k, format!("cannot connect to {}: {e}", path.display())),
    })?;
    let s = sock.as_fd();
    // The listening process proves who it is before anything of ours moves: a socket bound by
    // a uid we do not trust is left at once, unspoken to.
    let cred = sys::peer_cred(s)?;
    if !policy.allows(own, cred.uid.as_raw(), cred.gid.as_raw()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "listener socket {} is served by uid {} (gid {}, pid {}), which this process (uid {own}) \
                 does not trust (access policy {policy:?}); nothing was sent",
                path.display(),
                cred.uid.as_raw(),
                cred.gid.as_raw(),
                cred.pid.as_raw_nonzero(),
            ),
        ));
    }
    let listener_file =
        dir.stat(&file).ok().map(|st| ListenerFile { dir, file, id: crate::rundir::file_id(&st) });
    sys::set_timeouts(s, Some(opts.handshake()))?;
    let closed = || {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("listener {name:?} closed the connection during the handshake"),
        )
    };
    let p = match recv(s, "listener") {
        Ok(p) => p,
        Err(RecvFail::Closed) => return Err(closed()),
        Err(RecvFail::Version(e)) => {
            // Tell the listener what we speak, so it can report the mismatch too.
            let _ = sys::send_packet(s, &refuse_packet(Status::Version, &e.to_string()), &[]);
            return Err(e);
        }
        Err(RecvFail::Error(e)) => return Err(refuse(s, Status::Protocol, e)),
    };
    match p.kind {
        SERVER_HELLO if p.body.len() >= 16 => {}
        REFUSE => return Err(refused_error("listener", &p.body)),
        k => {
            let e = bad_data(format!(
                "listener sent handshake packet kind {k} ({} bytes), expected its hello",
                p.body.len()
            ));
            return Err(refuse(s, Status::Protocol, e));
        }
    }
    let server_messages = le_u32(&p.body, 0) & FLAG_MESSAGES != 0;
    if server_messages != messages {
        let kind = |m: bool| if m { "message" } else { "stream" };
        let e = bad_data(format!(
            "listener {name:?} is a {} listener, this is a {} connection",
            kind(server_messages),
            kind(messages)
        ));
        return Err(refuse(s, Status::Mode, e));
    }
    let offered = le_u64(&p.body, 8);
    // Listeners since the capacity limit say the largest ring they accept (0: not said).
    let limit = if p.body.len() >= 24 { le_u64(&p.body, 16) } else { 0 };
    let capacity = match chosen {
        Some(c) if limit != 0 && c as u64 > limit => {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ring capacity {c} exceeds the limit of listener {name:?} ({limit} bytes per direction; \
                     its Options::max_capacity)"
                ),
            );
            return Err(refuse(s, Status::BadRegion, e));
        }
        Some(c) => c as u64,
        None if offered != 0 && config::check_capacity(offered as usize).is_ok() => offered,
        None if limit != 0 && (DEFAULT_CAPACITY as u64) > limit => {
            // The largest power of two within the listener's limit.
            (1u64 << (63 - limit.leading_zeros())).max(layout::MIN_CAPACITY)
        }
        None => DEFAULT_CAPACITY as u64,
    };
    let max_message = if messages {
        let max = le_u32(&p.body, 4).min(opts.max_message_size());
        Some(max)
    } else {
        None
    };
    let params = Params { capacity: [capacity, capacity], max_message };
    let size =
        params.region_size().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let memfd = sys::create_memfd(size)?;
    let map = Mapping::map(memfd.as_fd(), 0, size)?;
    layout::init(map.region(), &params).map_err(|e| io::Error::other(e.to_string()))?;
    let c_rx = sys::new_eventfd()?;
    let c_tx = sys::new_eventfd()?;
    let mut hello = header(CLIENT_HELLO);
    hello.extend_from_slice(&(if messages { FLAG_MESSAGES } else { 0 }).to_le_bytes());
    hello.extend_from_slice(&0u32.to_le_bytes());
    sys::send_packet(s, &hello, &[memfd.as_fd(), c_rx.as_fd(), c_tx.as_fd()])?;
    drop(memfd);
    let p = match recv(s, "listener") {
        Ok(p) => p,
        Err(RecvFail::Closed) => return Err(closed()),
        Err(RecvFail::Version(e) | RecvFail::Error(e)) => return Err(e),
    };
    match p.kind {
        ACCEPT => {}
        REFUSE => return Err(refused_error("listener", &p.body)),
        k => {
            return Err(refuse(
                s,
                Status::Protocol,
                bad_data(format!("listener sent packet kind {k}, expected accept")),
            ))
        }
    }
    let [l_rx, l_tx]: [OwnedFd; 2] = p.fds.try_into().map_err(|v: Vec<OwnedFd>| {
        bad_data(format!("listener passed {} descriptors, expected 2", v.len()))
    })?;
    sys::check_eventfd(l_rx.as_fd())?;
    sys::check_eventfd(l_tx.as_fd())?;
    sys::set_timeouts(s, None)?;
    Conn::new(ConnParts {
        map,
        ctrl: sock,
        own_rx: c_rx,
        own_tx: c_tx,
        peer_rx: Signal::EventFd(l_rx),
        peer_tx: Signal::EventFd(l_tx),
        rx_geom: params.ring(Direction::ToConnector),
        tx_geom: params.ring(Direction::ToListener),
        max_message,
        spin,
        listener_file,
    })
}
