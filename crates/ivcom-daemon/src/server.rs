//! The serving loop: one listening socket per (region, member), the ivshmem-server protocol
//! towards each connected member, all in one thread on one epoll set.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ivcom_ivshmem::protocol::{self, MESSAGE_LEN, PROTOCOL_VERSION, SHM_MESSAGE};
use ivcom_ring::{MappedRegion, ShmRegion};
use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType};

use crate::config::{socket_path, Config, RegionConfig};
use crate::hooks::{RegionHooks, RegionView};

/// Messages queued for one member before it counts as not reading and is disconnected, at
/// least (see [`max_queued`]). QEMU reads everything at once; a member that stops reading must
/// not make the daemon hoard memory and descriptors.
const MIN_MAX_QUEUED: usize = 16 * 1024;

/// The queue limit of a region: room for two full setups (a newcomer's setup alone is
/// `3 + members * vectors` messages), and never less than [`MIN_MAX_QUEUED`].
fn max_queued(cfg: &RegionConfig) -> usize {
    let setup = 3 + cfg.members.len() * usize::from(cfg.vectors);
    MIN_MAX_QUEUED.max(2 * setup)
}

/// Errors that stop the daemon from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A system call on a path failed.
    #[error("{path}: {what}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// Another daemon holds the socket directory.
    #[error("socket directory {dir} is in use by another daemon (it holds the lock {lock})")]
    DirInUse {
        /// The socket directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A live listener answers on a socket path the daemon needs.
    #[error("socket {path} is in use by another daemon (a live listener answers there); stop it or choose another socket_dir")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is where a socket must go.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A plain region's file exists with another size.
    #[error("plain region {region}: {path} exists with {found} bytes but the configuration says {want}; remove it when no QEMU uses it")]
    ShmSizeMismatch {
        /// Region name.
        region: String,
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// Configured size.
        want: u64,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> DaemonError {
    let what = what.into();
    move |e| DaemonError::Sys { what, source: e.into() }
}

fn at(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> DaemonError {
    let path = path.to_owned();
    move |source| DaemonError::Path { path, what, source }
}

/// Where the daemon puts things.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Overrides the configuration's `socket_dir` (`--socket-dir`).
    pub socket_dir: Option<PathBuf>,
    /// Directory of plain regions' files; `/dev/shm`, which is where QEMU's
    /// `memory-backend-file` is pointed by `ivcom qemu-args --plain`.
    pub shm_dir: PathBuf,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self { socket_dir: None, shm_dir: PathBuf::from("/dev/shm") }
    }
}

/// A region's memory: a sealed memfd (doorbell regions) or a file (plain regions), mapped.
/// The mapping outlives every user: hooks are dropped first (see `Daemon`'s field order).
pub(crate) struct Memory {
    fd: Arc<OwnedFd>,
    map: MappedRegion,
}

impl Memory {
    /// Maps the `len`-byte file `fd`, which cannot shrink under us: memfds are sealed
    /// against it; plain files are ours, created or size-checked just before.
    fn map(fd: OwnedFd, len: usize, what: &str) -> Result<Self, DaemonError> {
        let map = MappedRegion::map(fd.as_fd(), 0, len)
            .map_err(|e| DaemonError::Sys { what: format!("mapping {what}"), source: e })?;
        Ok(Self { fd: Arc::new(fd), map })
    }

    pub(crate) fn region(&self) -> &ShmRegion {
        self.map.region()
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// A message waiting to be sent to a member.
struct Outgoing {
    value: i64,
    fd: Option<Arc<OwnedFd>>,
    /// Bytes of it already sent (the descriptor went with the first).
    sent: usize,
}

/// A connected member.
pub(crate) struct Conn {
    sock: OwnedFd,
    gen: u32,
    /// The peer id this connection was given.
    pub(crate) id: u16,
    pub(crate) vectors: Vec<Arc<OwnedFd>>,
    out: VecDeque<Outgoing>,
    want_write: bool,
}

pub(crate) struct Member {
    listener: Option<Listener>,
    pub(crate) conn: Option<Conn>,
    gen: u32,
    /// How many times the member has connected.
    joins: u32,
}

struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    /// (device, inode) of the socket file we made, so that we remove only our own.
    id: (u64, u64),
}

pub(crate) struct Region {
    pub(crate) cfg: RegionConfig,
    max_queued: usize,
    pub(crate) memory: Memory,
    pub(crate) members: Vec<Member>,
    dir: Option<PathBuf>,
}

/// Why a member is being disconnected.
enum Reason {
    Closed,
    Violation(usize),
    Io(io::Error),
    NotReading,
}

/// epoll tokens: bit 0 = connection (1) or listener (0); bits 1..17 = member index;
/// bits 17..41 = region index; bits 41..64 = connection generation.
const STOP_TOKEN: u64 = u64::MAX;
const MAX_REGIONS: usize = 1 << 24;

fn token(region: usize, member: usize, gen: Option<u32>) -> u64 {
    let g = gen.map_or(0, |g| u64::from(g & ((1 << 23) - 1)));
    (g << 41) | ((region as u64) << 17) | ((member as u64) << 1) | u64::from(gen.is_some())
}

fn untoken(t: u64) -> (usize, usize, Option<u32>) {
    let member = ((t >> 1) & 0xffff) as usize;
    let region = ((t >> 17) & ((1 << 24) - 1)) as usize;
    let gen = (t & 1 == 1).then_some((t >> 41) as u32);
    (region, member, gen)
}

/// Stops a running [`Daemon`] from another thread or a signal-handling thread.
#[derive(Debug, Clone)]
pub struct StopHandle {
    fd: Arc<OwnedFd>,
}

impl StopHandle {
    /// Makes [`Daemon::run`] return at its next turn.
    pub fn stop(&self) {
        let _ = ivcom_ivshmem::client::write_eventfd(self.fd.as_fd());
    }
}

/// The daemon: regions created, sockets bound. [`Daemon::run`] serves until stopped; dropping
/// it removes its socket files.
pub struct Daemon {
    // Field order matters: hooks may hold pointers into the regions' mappings, so they drop
    // before `regions` unmaps them.
    hooks: Option<Box<dyn RegionHooks>>,
    regions: Vec<Region>,
    epoll: OwnedFd,
    stop: Arc<OwnedFd>,
    socket_dir: PathBuf,
    _lock: Option<OwnedFd>,
    doomed: Vec<(usize, usize, u32, Reason)>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket_dir", &self.socket_dir)
            .field("regions", &self.regions.iter().map(|r| &r.cfg.name).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Creates every region's memory, binds every member's socket and calls
    /// [`RegionHooks::created`] for each region. Members can connect from now on but are
    /// served only in [`Daemon::run`].
    pub fn new(
        config: &Config,
        opts: &DaemonOptions,
        hooks: Option<Box<dyn RegionHooks>>,
    ) -> Result<Self, DaemonError> {
        if config.regions.len() > MAX_REGIONS {
            return Err(DaemonError::Sys {
                what: format!("{}: {} regions", config.path.display(), config.regions.len()),
                source: io::Error::other("more than 2^24 regions"),
            });
        }
        let socket_dir = config.socket_dir(opts.socket_dir.as_deref());
        raise_fd_limit();
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(sys("creating an epoll set"))?;
        let stop =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(sys("creating an eventfd"))?;
        epoll::add(&epoll, &stop, epoll::EventData::new_u64(STOP_TOKEN), epoll::EventFlags::IN)
            .map_err(sys("watching the stop eventfd"))?;
        let any_sockets = config.regions.iter().any(|r| !r.plain);
        let lock = if any_sockets {
            std::fs::create_dir_all(&socket_dir).map_err(at(&socket_dir, "creating the socket directory"))?;
            Some(lock_dir(&socket_dir)?)
        } else {
            None
        };
        let mut daemon = Daemon {
            hooks,
            regions: Vec::new(),
            epoll,
            stop: Arc::new(stop),
            socket_dir,
            _lock: lock,
            doomed: Vec::new(),
        };
        for (ri, cfg) in config.regions.iter().enumerate() {
            let region = daemon.make_region(ri, cfg, opts)?;
            daemon.regions.push(region);
        }
        for r in &daemon.regions {
            tracing::info!(
                region = %r.cfg.name,
                size = r.cfg.size,
                members = ?r.cfg.members,
                plain = r.cfg.plain,
                "region ready"
            );
            if let Some(h) = daemon.hooks.as_mut() {
                h.created(&RegionView { region: r });
            }
        }
        Ok(daemon)
    }

    fn make_region(
        &self,
        ri: usize,
        cfg: &RegionConfig,
        opts: &DaemonOptions,
    ) -> Result<Region, DaemonError> {
        let len = usize::try_from(cfg.size).map_err(|_| DaemonError::Sys {
            what: format!("region {}", cfg.name),
            source: io::Error::other("size does not fit in memory"),
        })?;
        let memory = if cfg.plain {
            let path = opts.shm_dir.join(cfg.shm_file_name());
            let fd = open_plain(&path, cfg)?;
            Memory::map(fd, len, &cfg.name)?
        } else {
            let fd = rustix::fs::memfd_create(
                format!("ivcom.{}", cfg.name),
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )
            .map_err(sys(format!("region {}: creating a memfd", cfg.name)))?;
            rustix::fs::ftruncate(&fd, cfg.size)
                .map_err(sys(format!("region {}: sizing its memfd", cfg.name)))?;
            rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
                .map_err(sys(format!("region {}: sealing its memfd", cfg.name)))?;
            Memory::map(fd, len, &cfg.name)?
        };
        let mut region =
            Region { cfg: cfg.clone(), max_queued: max_queued(cfg), memory, members: Vec::new(), dir: None };
        if cfg.plain {
            region.members =
                cfg.members.iter().map(|_| Member { listener: None, conn: None, gen: 0, joins: 0 }).collect();
            return Ok(region);
        }
        let dir = self.socket_dir.join(&cfg.name);
        std::fs::create_dir_all(&dir).map_err(at(&dir, "creating the region's socket directory"))?;
        region.dir = Some(dir);
        for (mi, member) in cfg.members.iter().enumerate() {
            let path = socket_path(&self.socket_dir, &cfg.name, member);
            // Push first so that a failure further on still removes what was bound.
            let listener = bind_listener(&path)?;
            epoll::add(
                &self.epoll,
                &listener.fd,
                epoll::EventData::new_u64(token(ri, mi, None)),
                epoll::EventFlags::IN,
            )
            .map_err(sys("watching a listening socket"))?;
            region.members.push(Member { listener: Some(listener), conn: None, gen: 0, joins: 0 });
        }
        Ok(region)
    }

    /// A handle that stops [`Daemon::run`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { fd: self.stop.clone() }
    }

    /// The socket directory in use.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The socket of `member` in `region`, if both exist and the region is not plain.
    pub fn socket_path(&self, region: &str, member: &str) -> Option<PathBuf> {
        let r = self.regions.iter().find(|r| r.cfg.name == region)?;
        let m = r.cfg.peer_id(member)?;
        r.members[usize::from(m)].listener.as_ref().map(|l| l.path.clone())
    }

    /// Serves until [`StopHandle::stop`] is called (a stop requested before the call ends the
    /// call at once). Members stay connected across calls; dropping the daemon disconnects
    /// them. Errors of one member never end it; only a failing epoll set does.
    pub fn run(&mut self) -> Result<(), DaemonError> {
        tracing::info!(socket_dir = %self.socket_dir.display(), "serving");
        let mut events = Vec::with_capacity(64);
        loop {
            events.clear();
            match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(sys("waiting for events")(e)),
            }
            for ev in &events {
                let t = ev.data.u64();
                if t == STOP_TOKEN {
                    // Consume the request, so that `run` can be called again.
                    let mut buf = [0u8; 8];
                    let _ = rustix::io::read(&*self.stop, &mut buf);
                    tracing::info!("stopping");
                    return Ok(());
                }
                let (ri, mi, gen) = untoken(t);
                match gen {
                    None => self.accept(ri, mi),
                    Some(g) => self.conn_event(ri, mi, g, ev.flags),
                }
                self.reap();
            }
        }
    }

    fn accept(&mut self, ri: usize, mi: usize) {
        loop {
            let Some(l) =
                self.regions.get(ri).and_then(|r| r.members.get(mi)).and_then(|m| m.listener.as_ref())
            else {
                return;
            };
            let sock = match rustix::net::accept_with(&l.fd, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
                Ok(s) => s,
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR | Errno::CONNABORTED) => continue,
                Err(e) => {
                    let r = &self.regions[ri];
                    tracing::error!(
                        "region {} member {}: accepting a connection failed: {e}",
                        r.cfg.name,
                        r.cfg.members[mi]
                    );
                    return;
                }
            };
            // The connection we have may have closed already, its event not yet handled (a
            // member that reconnects at once): look before refusing.
            if let Some(gen) = self.regions[ri].members[mi].conn.as_ref().map(|c| c.gen) {
                self.conn_event(ri, mi, gen, epoll::EventFlags::IN);
                self.reap();
            }
            let r = &self.regions[ri];
            if r.members[mi].conn.is_some() {
                tracing::error!(
                    "region {} member {}: refused a second connection: the member is already connected (peer id {mi}); closing the new one",
                    r.cfg.name,
                    r.cfg.members[mi]
                );
                // An invalid version makes QEMU fail at once, where a bare close would leave it
                // spinning in its setup read.
                let _ = protocol::send_message(&sock, protocol::REFUSAL, None);
                drop(sock);
                continue;
            }
            if let Err(e) = self.join(ri, mi, sock) {
                let r = &self.regions[ri];
                tracing::error!(
                    "region {} member {}: cannot serve the connection: {e}",
                    r.cfg.name,
                    r.cfg.members[mi]
                );
            }
        }
    }

    fn join(&mut self, ri: usize, mi: usize, sock: OwnedFd) -> io::Result<()> {
        let vectors = (0..self.regions[ri].cfg.vectors)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let region = &mut self.regions[ri];
        let member = &mut region.members[mi];
        member.gen = member.gen.wrapping_add(1) & ((1 << 23) - 1);
        let gen = member.gen;
        epoll::add(
            &self.epoll,
            &sock,
            epoll::EventData::new_u64(token(ri, mi, Some(gen))),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        )?;
        let id = peer_id(mi, member.joins, region.members.len());
        region.members[mi].joins = region.members[mi].joins.wrapping_add(1);
        let mut conn = Conn { sock, gen, id, vectors, out: VecDeque::new(), want_write: false };
        let id = i64::from(id);
        let push = |c: &mut Conn, value: i64, fd: Option<&Arc<OwnedFd>>| {
            c.out.push_back(Outgoing { value, fd: fd.cloned(), sent: 0 });
        };
        push(&mut conn, PROTOCOL_VERSION, None);
        push(&mut conn, id, None);
        push(&mut conn, SHM_MESSAGE, Some(&region.memory.fd));
        // The others learn about the new peer; the new peer learns about the others.
        for other in region.members.iter_mut() {
            if let Some(o) = other.conn.as_mut() {
                for v in &conn.vectors {
                    push(o, id, Some(v));
                }
                for v in &o.vectors {
                    push(&mut conn, i64::from(o.id), Some(v));
                }
            }
        }
        for v in conn.vectors.clone() {
            push(&mut conn, id, Some(&v));
        }
        region.members[mi].conn = Some(conn);
        tracing::info!("region {} member {} connected as peer {id}", region.cfg.name, region.cfg.members[mi]);
        for oi in 0..region.members.len() {
            self.flush(ri, oi);
        }
        if let Some(h) = self.hooks.as_mut() {
            h.peer_joined(&RegionView { region: &self.regions[ri] }, mi as u16);
        }
        Ok(())
    }

    fn conn_event(&mut self, ri: usize, mi: usize, gen: u32, flags: epoll::EventFlags) {
        let Some(conn) = self.regions.get(ri).and_then(|r| r.members.get(mi)).and_then(|m| m.conn.as_ref())
        else {
            return;
        };
        if conn.gen != gen {
            return; // an event for a connection that is gone
        }
        if flags.contains(epoll::EventFlags::OUT) {
            self.flush(ri, mi);
        }
        let Some(conn) = self.regions[ri].members[mi].conn.as_ref() else { return };
        if flags.intersects(
            epoll::EventFlags::IN
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::HUP
                | epoll::EventFlags::ERR,
        ) {
            // The server never reads from clients except to notice a close: any byte is a
            // protocol violation.
            let mut buf = [0u8; 64];
            let reason = match rustix::net::recv(&conn.sock, &mut buf, RecvFlags::DONTWAIT) {
                Ok((0, _)) => Some(Reason::Closed),
                Ok((n, _)) => Some(Reason::Violation(n)),
                Err(Errno::AGAIN | Errno::INTR) => None,
                Err(Errno::CONNRESET) => Some(Reason::Closed),
                Err(e) => Some(Reason::Io(e.into())),
            };
            if let Some(reason) = reason {
                self.doomed.push((ri, mi, gen, reason));
            }
        }
    }

    /// Sends what is queued for a member until done or its socket is full.
    fn flush(&mut self, ri: usize, mi: usize) {
        let limit = self.regions[ri].max_queued;
        let Some(conn) = self.regions[ri].members[mi].conn.as_mut() else { return };
        while let Some(m) = conn.out.front_mut() {
            let res = if m.sent == 0 {
                protocol::send_message(&conn.sock, m.value, m.fd.as_deref().map(AsFd::as_fd))
            } else {
                protocol::send_bytes(&conn.sock, &protocol::encode(m.value)[m.sent..])
            };
            match res {
                Ok(n) => {
                    m.sent += n;
                    if m.sent >= MESSAGE_LEN {
                        conn.out.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let gone = [Errno::PIPE, Errno::CONNRESET].map(|e| Some(e.raw_os_error()));
                    let reason =
                        if gone.contains(&e.raw_os_error()) { Reason::Closed } else { Reason::Io(e) };
                    self.doomed.push((ri, mi, conn.gen, reason));
                    return;
                }
            }
        }
        if conn.out.len() > limit {
            self.doomed.push((ri, mi, conn.gen, Reason::NotReading));
            return;
        }
        let want = !conn.out.is_empty();
        if want != conn.want_write {
            let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
            if want {
                flags |= epoll::EventFlags::OUT;
            }
            let data = epoll::EventData::new_u64(token(ri, mi, Some(conn.gen)));
            match epoll::modify(&self.epoll, &conn.sock, data, flags) {
                Ok(()) => conn.want_write = want,
                Err(e) => self.doomed.push((ri, mi, conn.gen, Reason::Io(e.into()))),
            }
        }
    }

    /// Disconnects the members marked for it (which may mark more, whose notices failed).
    fn reap(&mut self) {
        while let Some((ri, mi, gen, reason)) = self.doomed.pop() {
            let region = &mut self.regions[ri];
            if region.members[mi].conn.as_ref().is_none_or(|c| c.gen != gen) {
                continue;
            }
            let Some(conn) = region.members[mi].conn.take() else { continue };
            let _ = epoll::delete(&self.epoll, &conn.sock);
            let (name, member) = (&region.cfg.name, &region.cfg.members[mi]);
            match reason {
                Reason::Closed => tracing::info!("region {name} member {member} (peer {mi}) disconnected"),
                Reason::Violation(n) => tracing::error!(
                    "region {name} member {member} (peer {mi}): protocol violation: it sent {n} byte(s), but ivshmem clients never send; disconnecting it"
                ),
                Reason::NotReading => tracing::error!(
                    "region {name} member {member} (peer {mi}): more than {} messages unread; disconnecting it",
                    region.max_queued
                ),
                Reason::Io(e) => tracing::warn!("region {name} member {member} (peer {mi}): {e}; disconnecting it"),
            }
            // Closes the socket and the member's eventfds (queued copies to others close once
            // sent or dropped).
            let gone = i64::from(conn.id);
            drop(conn);
            for o in region.members.iter_mut().filter_map(|m| m.conn.as_mut()) {
                o.out.push_back(Outgoing { value: gone, fd: None, sent: 0 });
            }
            for oi in 0..self.regions[ri].members.len() {
                self.flush(ri, oi);
            }
            if let Some(h) = self.hooks.as_mut() {
                h.peer_left(&RegionView { region: &self.regions[ri] }, mi as u16);
            }
        }
    }
}

/// The peer id of member `mi`'s connection number `joins` in a region of `members` members:
/// `mi` the first time, then `mi + members`, `mi + 2 × members`, ... (within QEMU's 16 bits),
/// so `id % members` is always the member. Ids are not reused while there are fresh ones:
/// QEMU 7.2 frees a peer's eventfd array on its disconnect notice but keeps the pointer, and a
/// later connect message for the same id writes into the freed memory.
pub fn peer_id(mi: usize, joins: u32, members: usize) -> u16 {
    let rounds = (usize::from(u16::MAX) + 1) / members.max(1);
    (mi + (joins as usize % rounds.max(1)) * members) as u16
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Hooks go first (they may hold pointers into the mappings); see the field order.
        self.hooks = None;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Remove only our own socket file, not one a successor bound since.
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|md| (md.dev(), md.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.conn = None;
            m.listener = None;
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d); // only if empty
        }
    }
}

/// Every member holds a socket and one eventfd per vector, and queued notices hold more: raise
/// the soft descriptor limit to the hard one, so that a large configuration does not run out
/// at the default 1024 (running out makes accepts and eventfd creation fail, which is logged).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::debug!("cannot raise the descriptor limit: {e}");
        }
    }
}

/// Takes the socket directory's lock file, so that two daemons never serve the same sockets.
fn lock_dir(dir: &Path) -> Result<OwnedFd, DaemonError> {
    use rustix::fs::FlockOperation;
    let lock = dir.join(".ivcom-daemon.lock");
    let fd = rustix::fs::open(
        &lock,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| at(&lock, "opening the lock file")(e.into()))?;
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(fd),
        Err(Errno::WOULDBLOCK) => Err(DaemonError::DirInUse { dir: dir.to_owned(), lock }),
        Err(e) => Err(at(&lock, "locking")(e.into())),
    }
}

/// Binds a listening socket at `path`, replacing a stale socket file nobody listens on.
fn bind_listener(path: &Path) -> Result<Listener, DaemonError> {
    let addr = SocketAddrUnix::new(path).map_err(|e| at(path, "socket path")(e.into()))?;
    match std::fs::symlink_metadata(path) {
        Ok(md) if !md.file_type().is_socket() => {
            return Err(DaemonError::NotASocket { path: path.to_owned() })
        }
        Ok(_) => {
            let probe = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            )
            .map_err(sys("creating a probe socket"))?;
            match rustix::net::connect(&probe, &addr) {
                // A listener answered, or its backlog is full (it exists).
                Ok(()) | Err(Errno::AGAIN) | Err(Errno::INPROGRESS) => {
                    return Err(DaemonError::SocketInUse { path: path.to_owned() })
                }
                Err(Errno::CONNREFUSED) | Err(Errno::NOENT) => {
                    tracing::info!("replacing stale socket {}", path.display());
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(at(path, "removing the stale socket")(e)),
                    }
                }
                Err(e) => return Err(at(path, "probing the existing socket")(e.into())),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(path, "inspecting the socket path")(e)),
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(sys("creating a socket"))?;
    rustix::net::bind(&fd, &addr).map_err(|e| match e {
        Errno::ADDRINUSE => DaemonError::SocketInUse { path: path.to_owned() },
        e => at(path, "binding")(e.into()),
    })?;
    let md = std::fs::symlink_metadata(path).map_err(at(path, "inspecting the new socket"))?;
    let listener = Listener { fd, path: path.to_owned(), id: (md.dev(), md.ino()) };
    rustix::net::listen(&listener.fd, 64).map_err(|e| at(path, "listening")(e.into()))?;
    Ok(listener)
}

/// Opens (or creates) a plain region's file and makes sure it has the configured size.
fn open_plain(path: &Path, cfg: &RegionConfig) -> Result<OwnedFd, DaemonError> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o660),
    )
    .map_err(|e| at(path, "opening the plain region's file")(e.into()))?;
    let found = rustix::fs::fstat(&fd).map_err(|e| at(path, "inspecting")(e.into()))?.st_size as u64;
    if found == 0 {
        rustix::fs::ftruncate(&fd, cfg.size).map_err(|e| at(path, "sizing")(e.into()))?;
    } else if found != cfg.size {
        return Err(DaemonError::ShmSizeMismatch {
            region: cfg.name.clone(),
            path: path.to_owned(),
            found,
            want: cfg.size,
        });
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_limit_fits_a_full_setup() {
        let members: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        let text = format!("[[group]]\nname='big'\nmembers={members:?}\nsize='1M'\nvectors=64\n");
        let c = Config::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(max_queued(&c.regions[0]), 2 * (3 + 300 * 64));
        let c =
            Config::parse("[[group]]\nname='s'\nmembers=['a']\nsize='1M'\n", Path::new("t.toml")).unwrap();
        assert_eq!(max_queued(&c.regions[0]), MIN_MAX_QUEUED);
    }

    #[test]
    fn tokens_round_trip() {
        for (r, m, g) in [(0, 0, None), (5, 65535, Some(3)), ((1 << 24) - 1, 7, Some((1 << 23) - 1))] {
            let t = token(r, m, g);
            assert_ne!(t, STOP_TOKEN);
            assert_eq!(untoken(t), (r, m, g));
        }
    }
}
