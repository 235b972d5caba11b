//! The serving loop: one listening socket per (region, member), the ivshmem-server protocol
//! towards each connected member, all in one thread on one epoll set.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ivcom::rundir::{DirAccess, DirLock, DirRefusal, Existing, RuntimeDir, SocketSpec};
use ivcom_ivshmem::protocol::{self, MESSAGE_LEN, PROTOCOL_VERSION, SHM_MESSAGE};
use ivcom_ring::{MappedRegion, ShmRegion};
use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SocketFlags, SocketType};

use crate::config::{Binding, Config, RegionConfig};
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
    /// A socket directory, or a directory on the way to it, is not one only the daemon
    /// controls (someone else owns it, others can write it, a symlink is in its place, ...).
    #[error("socket directory: {path} is owned by uid {uid} (group {gid}, mode {mode:04o}): {why}; refusing to use it")]
    Dir {
        /// The directory (or the entry in its place).
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
        /// Its permission bits (with the set-id and sticky bits).
        mode: u32,
        /// What is wrong.
        why: String,
    },
    /// A plain region's file exists and is not provably this daemon's own.
    #[error("plain region {region}: {path} already exists, owned by uid {uid} (group {gid}, mode {mode:04o}): {why}; refusing to use it (remove it if it is a leftover)")]
    ShmNotOurs {
        /// Region name.
        region: String,
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
        /// Its mode bits.
        mode: u32,
        /// What is wrong with it.
        why: String,
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

/// A socket directory's error: a refusal keeps its path, owner, group, mode and reason; any
/// other failure names the directory and what was being done.
fn dir_error(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> DaemonError {
    let path = path.to_owned();
    move |e| match DirRefusal::of(&e) {
        Some(r) => DaemonError::Dir {
            path: r.path.clone(),
            uid: r.uid,
            gid: r.gid,
            mode: r.mode,
            why: r.why.clone(),
        },
        None => DaemonError::Path { path, what, source: e },
    }
}

/// The access of the daemon's socket directories: 0700, or 0750 with the configured group.
fn dir_access(group: Option<u32>) -> DirAccess {
    group.map_or(DirAccess::Private, DirAccess::Group)
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
    /// Every peer id this connection has been told of (its own, the peers present when it
    /// joined, those that joined since): none of them is issued again while it is connected.
    seen: SeenIds,
}

/// A set of peer ids (a bitmap of all 65536).
struct SeenIds(Box<[u64; 1024]>);

impl SeenIds {
    fn new() -> Self {
        Self(Box::new([0; 1024]))
    }
    fn insert(&mut self, id: u16) {
        self.0[usize::from(id) / 64] |= 1 << (id % 64);
    }
    fn contains(&self, id: u16) -> bool {
        self.0[usize::from(id) / 64] & (1 << (id % 64)) != 0
    }
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
    /// The region's socket directory and the socket's name in it.
    dir: Arc<RuntimeDir>,
    name: String,
    path: PathBuf,
    /// (device, inode) of the socket file we made, so that we remove only our own.
    id: (u64, u64),
}

pub(crate) struct Region {
    pub(crate) cfg: RegionConfig,
    max_queued: usize,
    pub(crate) memory: Memory,
    pub(crate) members: Vec<Member>,
    /// The region's socket directory, and the socket directory it is in.
    dir: Option<(Arc<RuntimeDir>, Arc<RuntimeDir>)>,
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
    sockets: Option<Arc<RuntimeDir>>,
    dir_access: DirAccess,
    _lock: Option<DirLock>,
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
        let dir_access = dir_access(config.socket_group);
        let (sockets, lock) = if any_sockets {
            let dir = RuntimeDir::open_service(&socket_dir, dir_access, Existing::Enforce)
                .map_err(dir_error(&socket_dir, "opening the socket directory"))?;
            let lock = lock_dir(&dir)?;
            (Some(Arc::new(dir)), Some(lock))
        } else {
            (None, None)
        };
        let mut daemon = Daemon {
            hooks,
            regions: Vec::new(),
            epoll,
            stop: Arc::new(stop),
            socket_dir,
            sockets,
            dir_access,
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
            let fd = open_plain(&opts.shm_dir, cfg)?;
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
        let sockets = self.sockets.clone().expect("socket directory opened for doorbell regions");
        let dir =
            Arc::new(sockets.subdir_with(&cfg.name, self.dir_access, Existing::Enforce).map_err(
                dir_error(&sockets.path().join(&cfg.name), "opening the region's socket directory"),
            )?);
        region.dir = Some((dir.clone(), sockets));
        for (mi, member) in cfg.members.iter().enumerate() {
            let listener = bind_listener(&dir, &format!("{member}.sock"), cfg.bindings[mi].as_ref())?;
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
            // Who is connecting: the member's binding (or, unbound, the daemon's own uid)
            // decides, whatever the socket file's mode let through.
            let r = &self.regions[ri];
            let binding = r.cfg.bindings[mi].as_ref();
            match rustix::net::sockopt::socket_peercred(&sock) {
                Ok(c)
                    if Binding::allows(
                        binding,
                        rustix::process::geteuid().as_raw(),
                        c.uid.as_raw(),
                        c.gid.as_raw(),
                    ) => {}
                Ok(c) => {
                    tracing::error!(
                        "region {} member {}: refused a connection from pid {} uid {} gid {}: the member admits {}",
                        r.cfg.name,
                        r.cfg.members[mi],
                        c.pid.as_raw_nonzero(),
                        c.uid.as_raw(),
                        c.gid.as_raw(),
                        describe_binding(binding)
                    );
                    let _ = protocol::send_message(&sock, protocol::REFUSAL, None);
                    continue;
                }
                Err(e) => {
                    tracing::error!(
                        "region {} member {}: cannot read the credentials of a connection ({e}); closing it",
                        r.cfg.name,
                        r.cfg.members[mi]
                    );
                    continue;
                }
            }
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
        let region = &self.regions[ri];
        let Some((id, next)) = free_peer_id(region, mi) else {
            tracing::error!(
                "region {} member {}: refused the connection: every peer id of this member ({}) was seen by a member still connected, and reissuing one would make it mistake the newcomer for the peer it saw leave; the member can connect again once those members reconnect",
                region.cfg.name,
                region.cfg.members[mi],
                peer_ids(mi, region.members.len()).count()
            );
            let _ = protocol::send_message(&sock, protocol::REFUSAL, None);
            return Ok(());
        };
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
        region.members[mi].joins = next;
        let mut conn =
            Conn { sock, gen, id, vectors, out: VecDeque::new(), want_write: false, seen: SeenIds::new() };
        conn.seen.insert(id);
        let id16 = id;
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
                o.seen.insert(id16);
                conn.seen.insert(o.id);
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

/// The peer ids member `mi` of a region of `members` members may have: `mi`, `mi + members`,
/// `mi + 2 × members`, ... up to 65535 (QEMU's 16 bits), so that `id % members` is always
/// the member.
fn peer_ids(mi: usize, members: usize) -> impl Iterator<Item = u16> {
    (mi..=usize::from(u16::MAX)).step_by(members.max(1)).map(|id| id as u16)
}

/// The id for member `mi`'s next connection, and the member's next `joins` value: the first of
/// its ids, going round from where the last one was taken, that no connected member has been
/// told of. `None` when every one has been: reissuing one would tell a member that saw that
/// id leave that it joined again, and QEMU 7.2 frees a peer's eventfd array on its disconnect
/// notice but keeps the pointer, so a later connect message for the same id writes into the
/// freed memory.
fn free_peer_id(region: &Region, mi: usize) -> Option<(u16, u32)> {
    let ids: Vec<u16> = peer_ids(mi, region.members.len()).collect();
    let start = region.members[mi].joins as usize % ids.len();
    (0..ids.len()).map(|k| (start + k) % ids.len()).find_map(|k| {
        let id = ids[k];
        let seen = region.members.iter().filter_map(|m| m.conn.as_ref()).any(|c| c.seen.contains(id));
        (!seen).then_some((id, (k + 1) as u32))
    })
}

fn describe_binding(b: Option<&Binding>) -> String {
    match b {
        None => format!(
            "only the daemon's uid {} and root (it has no [members] binding)",
            rustix::process::geteuid().as_raw()
        ),
        Some(b) => {
            let mut v = Vec::new();
            if let Some(u) = b.uid {
                v.push(format!("uid {u}"));
            }
            if let Some(g) = b.gid {
                v.push(format!("gid {g}"));
            }
            format!("{} (and root)", v.join(" with "))
        }
    }
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
        let _ = self.dir.unlink_if(&self.name, self.id);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.conn = None;
            m.listener = None;
        }
        if let Some((_, parent)) = &self.dir {
            let _ = parent.remove_dir(&self.cfg.name); // only if empty
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
/// Never blocks: the lock is tried once; a held lock is [`DaemonError::DirInUse`]. The file is
/// reached through the checked directory ([`RuntimeDir::lock_file`]).
fn lock_dir(dir: &RuntimeDir) -> Result<DirLock, DaemonError> {
    let name = ".ivcom-daemon.lock";
    let lock = dir.path().join(name);
    dir.lock_file(name, std::time::Duration::ZERO).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => DaemonError::DirInUse { dir: dir.path().to_owned(), lock: lock.clone() },
        _ => at(&lock, "locking")(e),
    })
}

/// Binds member socket `name` in the region's directory `dir` with
/// [`RuntimeDir::listen_unix`]: a stale socket file nobody listens on is replaced, and the
/// socket gets the owner and mode of the member's binding ([`Binding::socket_owner`]) before
/// it listens. Everything goes through the directory's descriptor; nobody else can write the
/// directory, so the entry cannot be swapped between the calls.
fn bind_listener(
    dir: &Arc<RuntimeDir>,
    name: &str,
    binding: Option<&Binding>,
) -> Result<Listener, DaemonError> {
    let path = dir.path().join(name);
    let (uid, gid, mode) = Binding::socket_owner(binding);
    let spec = SocketSpec { kind: SocketType::STREAM, nonblocking: true, uid, gid, mode, backlog: 64 };
    let (fd, id) = dir.listen_unix(name, &spec).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => DaemonError::SocketInUse { path: path.clone() },
        io::ErrorKind::AlreadyExists => DaemonError::NotASocket { path: path.clone() },
        _ => at(&path, "binding the socket")(e),
    })?;
    Ok(Listener { fd, dir: dir.clone(), name: name.to_owned(), path, id })
}

/// Opens a plain region's file in `shm_dir` (`/dev/shm`): created exclusively (`O_CREAT |
/// O_EXCL | O_NOFOLLOW`) with mode 0600, or 0660 and the region's `shm_group`. A file already
/// there is used only if it is provably this daemon's own from an earlier run: a regular file
/// (not a symlink), owned by our effective uid, with one link, no permission beyond the mode
/// we would give it (nobody else can hold it open for writing, and so truncate it under the
/// guests: SIGBUS for everyone mapping it) and the configured size. Anything else is
/// [`DaemonError::ShmNotOurs`] naming its owner and mode.
fn open_plain(shm_dir: &Path, cfg: &RegionConfig) -> Result<OwnedFd, DaemonError> {
    let name = cfg.shm_file_name();
    let path = shm_dir.join(&name);
    let want_mode = if cfg.shm_group.is_some() { 0o660 } else { 0o600 };
    let dir = rustix::fs::open(shm_dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| at(shm_dir, "opening the shm directory")(e.into()))?;
    let me = rustix::process::geteuid().as_raw();
    let fd = match rustix::fs::openat(
        &dir,
        &name,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => {
            if let Some(g) = cfg.shm_group {
                rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(g)))
                    .map_err(|e| at(&path, "setting the group")(e.into()))?;
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(want_mode))
                .map_err(|e| at(&path, "setting the mode")(e.into()))?;
            rustix::fs::ftruncate(&fd, cfg.size).map_err(|e| at(&path, "sizing")(e.into()))?;
            return Ok(fd);
        }
        Err(Errno::EXIST) => {
            // Look before opening: a symlink, FIFO or someone else's file is refused by what
            // `lstat` says, without opening it.
            let st = rustix::fs::statat(&dir, &name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| at(&path, "inspecting the existing file")(e.into()))?;
            check_own_plain(cfg, &path, &st, me, want_mode)?;
            let fd = rustix::fs::openat(
                &dir,
                &name,
                OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| at(&path, "opening the existing file")(e.into()))?;
            let now = rustix::fs::fstat(&fd).map_err(|e| at(&path, "inspecting")(e.into()))?;
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                return Err(plain_refusal(cfg, &path, &now, "it was replaced while being opened".into()));
            }
            check_own_plain(cfg, &path, &now, me, want_mode)?;
            fd
        }
        Err(e) => return Err(at(&path, "creating the plain region's file")(e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| at(&path, "inspecting")(e.into()))?;
    if st.st_size as u64 != cfg.size {
        return Err(DaemonError::ShmSizeMismatch {
            region: cfg.name.clone(),
            path,
            found: st.st_size as u64,
            want: cfg.size,
        });
    }
    // Narrower than we would make it (0600 where 0660 is configured): widen to the mode.
    if let Some(g) = cfg.shm_group {
        rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(g)))
            .map_err(|e| at(&path, "setting the group")(e.into()))?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(want_mode))
        .map_err(|e| at(&path, "setting the mode")(e.into()))?;
    Ok(fd)
}

fn plain_refusal(cfg: &RegionConfig, path: &Path, st: &rustix::fs::Stat, why: String) -> DaemonError {
    DaemonError::ShmNotOurs {
        region: cfg.name.clone(),
        path: path.to_owned(),
        uid: st.st_uid,
        gid: st.st_gid,
        mode: st.st_mode & 0o7777,
        why,
    }
}

/// Whether an existing plain region file is provably ours (see [`open_plain`]).
fn check_own_plain(
    cfg: &RegionConfig,
    path: &Path,
    st: &rustix::fs::Stat,
    me: u32,
    want_mode: u32,
) -> Result<(), DaemonError> {
    let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
    let why = if ft == rustix::fs::FileType::Symlink {
        Some("it is a symbolic link".to_owned())
    } else if ft != rustix::fs::FileType::RegularFile {
        Some(format!("it is not a regular file ({ft:?})"))
    } else if st.st_uid != me {
        Some(format!("it is not owned by this daemon's uid {me}, so someone else created it and can read, write and truncate it"))
    } else if st.st_nlink != 1 {
        Some(format!("it has {} links", st.st_nlink))
    } else if st.st_mode & 0o7777 & !want_mode != 0 {
        Some(format!("its mode allows more than {want_mode:04o}, so others may hold it open and truncate it"))
    } else if st.st_mode & 0o070 != 0 && cfg.shm_group != Some(st.st_gid) {
        Some(format!("its group {} may write it, which is not the configured shm_group", st.st_gid))
    } else {
        None
    };
    match why {
        Some(why) => Err(plain_refusal(cfg, path, st, why)),
        None => Ok(()),
    }
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
