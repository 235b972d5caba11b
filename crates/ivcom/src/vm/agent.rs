//! The agent: one per member of a shared region (per guest device, or per host process that
//! joined through the daemon). It owns the member's entries in the region's directory, serves
//! local processes over a Unix socket, hands each of them the descriptors to map its channel
//! slot and ring its peer directly (the data path never goes through the agent), and turns
//! its member's doorbells into wakeups of the local processes that sleep.
//!
//! Why an agent: a VFIO device can be opened by one process only, the directory entries of a
//! member need one writer, and a guest's doorbell vector is one per device, not one per
//! channel.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ivcom_ring::directory::{self, Directory, Geometry, ListenerAnswer, ListenerRef, Owned, FLAG_MANAGED};
use ivcom_ring::layout::{self, Direction, Params};
use ivcom_ring::{Ctrl, ShmCtrl};
use rustix::event::epoll;

use crate::rundir::{DirAccess, DirRefusal, Existing, RuntimeDir, SocketSpec};

use super::port::{DoorbellShare, Port};
use super::wire::{self, Channel, Packet};
use crate::{sys, Access};

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where local processes reach the agent.
    pub socket: PathBuf,
    /// Which local processes the agent serves, checked with `SO_PEERCRED` on every
    /// connection (default [`Access::SameUid`]: the agent's own uid, and root). A process the
    /// policy does not admit gets an `ERROR` packet (`EACCES`) and is disconnected; the agent
    /// goes on serving the others.
    pub access: Access,
    /// Socket file mode (default: [`Access::default_mode`] of `access`, set by
    /// [`AgentConfig::access`]).
    pub mode: u32,
    /// How often the directory is scanned when no doorbell can wake us (polling), at the
    /// busiest; idle scans back off to [`AgentConfig::poll_idle`].
    pub poll_busy: Duration,
    /// Longest interval between scans when polling and idle (bounds idle CPU cost).
    pub poll_idle: Duration,
    /// How long a peer's heartbeat may stand still before, in a region no daemon manages,
    /// the peer counts as gone.
    pub heartbeat_timeout: Duration,
    /// How long to wait for our own entry in the daemon's peer table to show us alive.
    pub join_timeout: Duration,
}

impl AgentConfig {
    /// Defaults for an agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            access: Access::SameUid,
            mode: Access::SameUid.default_mode(),
            poll_busy: Duration::from_micros(200),
            poll_idle: Duration::from_millis(20),
            heartbeat_timeout: Duration::from_secs(2),
            join_timeout: Duration::from_secs(5),
        }
    }

    /// Sets the access policy and the socket mode that goes with it.
    pub fn access(mut self, access: Access) -> Self {
        self.mode = access.default_mode();
        self.access = access;
        self
    }
}

/// Interval of heartbeats and of deadline checks when doorbells wake us.
const TICK: Duration = Duration::from_millis(100);

const T_LISTEN: u64 = 1 << 40;
const T_WAKE: u64 = 2 << 40;
const T_EVENTS: u64 = 3 << 40;
const T_CLIENT: u64 = 4 << 40;
const T_CHAN: u64 = 5 << 40;
const T_PENDING: u64 = 6 << 40;
const T_MASK: u64 = 0xff << 40;

/// A local process connected to us.
struct Client {
    sock: OwnedFd,
    listeners: Vec<ListenerRef>,
}

/// A connect request of a local process, waiting for the listener's answer.
struct Pending {
    sock: OwnedFd,
    slot: u32,
    gen: u32,
    to: ListenerRef,
    epoch: u64,
    deadline: Instant,
    /// Our interrupt vector for this channel (0: the shared one).
    vector: u16,
}

/// One open channel of a local process.
struct Chan {
    slot: u32,
    gen: u32,
    listener_side: bool,
    peer: u32,
    peer_epoch: u64,
    ctrl: OwnedFd,
    own_rx: OwnedFd,
    own_tx: OwnedFd,
    /// Ring control offsets (region-absolute) of the ring we read and the ring we write.
    rx: usize,
    tx: usize,
    /// The peer finished or went away; the process has been told.
    peer_done: bool,
    /// Our interrupt vector for this channel (0: the shared one, demultiplexed by us).
    vector: u16,
    /// (sleep sequence, index) at the last wakeup we gave the reader and the writer.
    rx_woken: (u32, u64),
    tx_woken: (u32, u64),
}

/// How we judge a peer's liveness in a region no daemon manages.
#[derive(Clone, Copy)]
struct Beat {
    value: u64,
    since: Instant,
}

/// Who counts as present: the daemon's peer table, or in a region no daemon manages, the
/// peer's own entry and its heartbeat.
struct Live {
    me: u32,
    managed: bool,
    beats: Vec<Beat>,
    timeout: Duration,
}

impl Live {
    /// Whether `peer` counts as present now.
    fn alive(&self, dir: &Directory<'_>, peer: u32) -> bool {
        if peer == self.me {
            return true;
        }
        let Ok(s) = dir.peer(peer) else { return false };
        s.alive && (self.managed || self.beats[peer as usize].since.elapsed() < self.timeout)
    }

    /// Whether `peer`, which had `epoch` when a channel with it began, has since gone.
    fn gone(&self, dir: &Directory<'_>, peer: u32, epoch: u64) -> bool {
        match dir.peer(peer) {
            Ok(s) => s.epoch != epoch || !self.alive(dir, peer),
            Err(_) => true,
        }
    }
}

/// The agent of one member.
pub struct Agent<P: Port> {
    port: P,
    cfg: AgentConfig,
    geom: Geometry,
    owned: Owned,
    me: u32,
    epoch: u64,
    managed: bool,
    live: Live,
    listen: OwnedFd,
    /// The socket's directory, its name there and its (device, inode), to remove only it.
    socket_dir: RuntimeDir,
    socket_name: String,
    socket_id: (u64, u64),
    euid: u32,
    epoll: OwnedFd,
    clients: HashMap<RawFd, Client>,
    pending: HashMap<RawFd, Pending>,
    chans: HashMap<RawFd, Chan>,
    heartbeat: u64,
    /// Peers' epochs as we last saw them, to notice joins and departures.
    epochs: Vec<(u64, bool)>,
    /// Interrupt vectors not given to a channel: a channel with its own vector has its
    /// process woken by the interrupt itself, without us in between.
    free_vectors: Vec<u16>,
}

impl<P: Port> std::fmt::Debug for Agent<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("me", &self.me).field("socket", &self.cfg.socket).finish()
    }
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl<P: Port> Agent<P> {
    /// Attaches to the region's directory as member `port.me()` and starts listening for
    /// local processes. In a region a daemon manages, waits (bounded) until the daemon's peer
    /// table shows us.
    pub fn new(port: P, cfg: AgentConfig) -> io::Result<Self> {
        let region = port.region();
        let geom = directory::attach(region)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("region directory: {e}")))?;
        // The daemon gives a member a new ivshmem id on each connection (member index plus a
        // multiple of the member count); the directory is indexed by member.
        let me = port.me() % geom.peers;
        let managed = geom.flags & FLAG_MANAGED != 0;
        let dir = Directory::new(region, geom).map_err(|e| other(e.to_string()))?;
        let epoch = if managed {
            let start = Instant::now();
            loop {
                let s = dir.peer(me).map_err(|e| other(e.to_string()))?;
                if s.alive {
                    break s.epoch;
                }
                if start.elapsed() > cfg.join_timeout {
                    return Err(other(format!(
                        "the daemon's peer table does not show peer {me} alive after {:?}",
                        cfg.join_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            // No daemon: we keep our own entry, one more epoch per start.
            let s = dir.peer(me).map_err(|e| other(e.to_string()))?;
            let epoch = s.epoch.wrapping_add(1);
            dir.set_peer(me, directory::PeerState { epoch, alive: true })
                .map_err(|e| other(e.to_string()))?;
            epoch
        };
        let owned = Owned::claim(&dir, me).map_err(|e| other(e.to_string()))?;
        let now = Instant::now();
        let beats =
            (0..geom.peers).map(|p| Beat { value: dir.heartbeat(p).unwrap_or(0), since: now }).collect();
        let epochs =
            (0..geom.peers).map(|p| dir.peer(p).map(|s| (s.epoch, s.alive)).unwrap_or((0, false))).collect();

        let heartbeat_timeout = cfg.heartbeat_timeout;
        let (listen, socket_dir, socket_name, socket_id) = bind_socket(&cfg.socket, &cfg.access, cfg.mode)?;
        let port_vectors = port.vectors();
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let ev = epoll::EventFlags::IN;
        epoll::add(&epoll, &listen, epoll::EventData::new_u64(T_LISTEN), ev)?;
        if let Some(fd) = port.wake_fd() {
            epoll::add(&epoll, fd, epoll::EventData::new_u64(T_WAKE), ev)?;
        }
        if let Some(fd) = port.events_fd() {
            epoll::add(&epoll, fd, epoll::EventData::new_u64(T_EVENTS), ev)?;
        }
        tracing::info!(
            "agent: peer {me} of {} (epoch {epoch}, {}), {} channel slots of {} KiB per direction, socket {}",
            geom.peers,
            if managed { "daemon-managed" } else { "unmanaged: heartbeats" },
            geom.slots_per_peer,
            geom.slot_capacity / 1024,
            cfg.socket.display()
        );
        Ok(Self {
            port,
            cfg,
            geom,
            owned,
            me,
            epoch,
            managed,
            listen,
            socket_dir,
            socket_name,
            socket_id,
            euid: sys::euid(),
            epoll,
            clients: HashMap::new(),
            pending: HashMap::new(),
            chans: HashMap::new(),
            live: Live { me, managed, beats, timeout: heartbeat_timeout },
            heartbeat: 0,
            epochs,
            free_vectors: (1..port_vectors).rev().collect(),
        })
    }

    /// Our peer id.
    pub fn peer_id(&self) -> u32 {
        self.me
    }

    /// Serves until `stop` returns true (checked at least every 100 ms) or the membership
    /// ends.
    pub fn run(&mut self, stop: &dyn Fn() -> bool) -> io::Result<()> {
        let polling = self.port.wake_fd().is_none();
        let mut interval = if polling { self.cfg.poll_busy } else { TICK };
        let mut last_beat = Instant::now();
        let mut buf = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 64];
        while !stop() {
            let t = interval.min(TICK);
            let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: t.subsec_nanos() as i64 };
            let tokens: Vec<u64> = match epoll::wait(&self.epoll, &mut buf, Some(&timeout)) {
                Ok((events, _)) => events.iter().map(|e| e.data.u64()).collect(),
                Err(rustix::io::Errno::INTR) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut busy = false;
            for t in tokens {
                busy = true;
                match t & T_MASK {
                    T_LISTEN => self.accept_client(),
                    T_WAKE => {
                        // A doorbell: first wake the local sleepers it is most likely for, so
                        // their wakeup does not wait for the rest of the scan.
                        self.port.drain_wake();
                        self.wake_all();
                    }
                    T_EVENTS => self.port.on_events()?,
                    T_CLIENT => self.client_readable((t & !T_MASK) as RawFd),
                    T_CHAN => self.chan_closed((t & !T_MASK) as RawFd),
                    T_PENDING => self.pending_closed((t & !T_MASK) as RawFd),
                    _ => {}
                }
            }
            busy |= self.scan();
            if last_beat.elapsed() >= TICK {
                last_beat = Instant::now();
                self.beat();
            }
            if polling {
                interval = if busy { self.cfg.poll_busy } else { (interval * 2).min(self.cfg.poll_idle) };
            }
        }
        Ok(())
    }

    fn beat(&mut self) {
        self.heartbeat += 1;
        let dir = view(&self.port, self.geom);
        let _ = dir.set_heartbeat(self.me, self.heartbeat);
        // Repair what a hostile member may have overwritten of ours.
        let _ = self.owned.republish(&dir);
        if !self.managed {
            let _ = dir.set_peer(self.me, directory::PeerState { epoch: self.epoch, alive: true });
        }
        let now = Instant::now();
        for p in 0..self.geom.peers {
            let v = dir.heartbeat(p).unwrap_or(0);
            let b = &mut self.live.beats[p as usize];
            if v != b.value {
                *b = Beat { value: v, since: now };
            }
        }
    }

    fn accept_client(&mut self) {
        let Ok(sock) = sys::accept(self.listen.as_fd()) else { return };
        // Who is connecting: the policy decides, whatever the socket file's mode let through.
        match sys::peer_cred(sock.as_fd()) {
            Ok(c) if self.cfg.access.allows(self.euid, c.uid.as_raw(), c.gid.as_raw()) => {}
            Ok(c) => {
                let message = format!(
                    "the ivcom agent at {} does not serve uid {} gid {} (its access policy is {:?})",
                    self.cfg.socket.display(),
                    c.uid.as_raw(),
                    c.gid.as_raw(),
                    self.cfg.access
                );
                tracing::warn!("agent: refused pid {}: {message}", c.pid.as_raw_nonzero());
                let _ = rustix::io::ioctl_fionbio(&sock, true);
                let p = Packet::Error { errno: libc_errno::EACCES, message };
                let _ = sys::send_packet(sock.as_fd(), &p.encode(), &[]);
                // Read what it sent already (a few packets at most): closing with unread data
                // would reset the connection and the process would not see the message.
                let mut buf = [0u8; wire::MAX_PACKET];
                for _ in 0..4 {
                    if !matches!(rustix::net::recv(&sock, &mut buf, rustix::net::RecvFlags::DONTWAIT), Ok((n, _)) if n > 0)
                    {
                        break;
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!("agent: cannot read a connection's credentials ({e}); closing it");
                return;
            }
        }
        // Never block on a local process: one that does not take its connections (a full
        // socket buffer) gets them refused instead of stalling every member's channels.
        if rustix::io::ioctl_fionbio(&sock, true).is_err() {
            return;
        }
        let fd = sock.as_raw_fd();
        if epoll::add(
            &self.epoll,
            &sock,
            epoll::EventData::new_u64(T_CLIENT | fd as u64),
            epoll::EventFlags::IN,
        )
        .is_err()
        {
            return;
        }
        self.clients.insert(fd, Client { sock, listeners: Vec::new() });
    }

    fn drop_client(&mut self, fd: RawFd) {
        if let Some(c) = self.clients.remove(&fd) {
            let _ = epoll::delete(&self.epoll, &c.sock);
            let dir = view(&self.port, self.geom);
            for l in c.listeners {
                let _ = self.owned.unbind(&dir, l);
            }
        }
    }

    fn client_readable(&mut self, fd: RawFd) {
        let mut buf = [0u8; wire::MAX_PACKET];
        let Some(c) = self.clients.get(&fd) else { return };
        let packet = match sys::recv_packet(c.sock.as_fd(), &mut buf) {
            Ok((0, _)) | Err(_) => return self.drop_client(fd),
            Ok((n, _fds)) => Packet::decode(&buf[..n]),
        };
        match packet {
            Ok(Packet::Bind { name }) => self.bind(fd, &name),
            Ok(Packet::Connect { timeout_ms, name }) => self.connect(fd, timeout_ms, &name),
            Ok(p) => {
                self.reply_error(fd, libc_errno::EPROTO, &format!("unexpected packet {p:?}"));
                self.drop_client(fd);
            }
            Err(e) => {
                self.reply_error(fd, libc_errno::EPROTO, &e.to_string());
                self.drop_client(fd);
            }
        }
    }

    fn reply_error(&self, fd: RawFd, errno: i32, message: &str) {
        if let Some(c) = self.clients.get(&fd) {
            let p = Packet::Error { errno, message: message.to_owned() };
            let _ = sys::send_packet(c.sock.as_fd(), &p.encode(), &[]);
        }
    }

    fn bind(&mut self, fd: RawFd, name: &str) {
        let dir = view(&self.port, self.geom);
        let alive = |p| self.live.alive(&dir, p);
        let res = self.owned.bind(&dir, name, &alive);
        match res {
            Ok(l) => {
                let c = self.clients.get_mut(&fd).expect("client");
                c.listeners.push(l);
                let _ = sys::send_packet(c.sock.as_fd(), &Packet::Ok.encode(), &[]);
                tracing::debug!("agent: {name:?} bound as listener {}:{}", l.peer, l.index);
            }
            Err(e) => {
                let errno = match e {
                    directory::DirError::NameInUse => libc_errno::EADDRINUSE,
                    directory::DirError::BadName => libc_errno::EINVAL,
                    directory::DirError::Full(_) => libc_errno::ENOBUFS,
                    _ => libc_errno::EIO,
                };
                self.reply_error(fd, errno, &format!("cannot listen on {name:?}: {e}"));
                self.drop_client(fd);
            }
        }
    }

    fn connect(&mut self, fd: RawFd, timeout_ms: u32, name: &str) {
        let dir = view(&self.port, self.geom);
        let alive = |p| self.live.alive(&dir, p);
        let target = match dir.lookup(name, &alive, None) {
            Ok(Some(l)) => l,
            Ok(None) => {
                self.reply_error(
                    fd,
                    libc_errno::ECONNREFUSED,
                    &format!("no ivcom listener named {name:?} in the region"),
                );
                return self.drop_client(fd);
            }
            Err(e) => {
                self.reply_error(fd, libc_errno::EIO, &e.to_string());
                return self.drop_client(fd);
            }
        };
        let epoch = dir.peer(target.peer).map(|s| s.epoch).unwrap_or(0);
        let gone = |p, e| self.live.gone(&dir, p, e);
        let vector = self.free_vectors.pop().unwrap_or(0);
        let res = self.owned.request_with_vector(&dir, target, epoch, vector.into(), &gone);
        if res.is_err() && vector != 0 {
            self.free_vectors.push(vector);
        }
        match res {
            Ok((slot, gen)) => {
                let c = self.clients.remove(&fd).expect("client");
                let _ = epoll::delete(&self.epoll, &c.sock);
                if epoll::add(
                    &self.epoll,
                    &c.sock,
                    epoll::EventData::new_u64(T_PENDING | fd as u64),
                    epoll::EventFlags::IN,
                )
                .is_err()
                {
                    self.abandon(slot, gen, target.peer, vector);
                    return;
                }
                let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1).into());
                self.pending
                    .insert(fd, Pending { sock: c.sock, slot, gen, to: target, epoch, deadline, vector });
                ring(&self.port, self.geom, target.peer);
            }
            Err(e) => {
                self.reply_error(fd, libc_errno::ENOBUFS, &format!("cannot connect to {name:?}: {e}"));
                self.drop_client(fd);
            }
        }
    }

    /// A connecting process went away before its answer.
    fn pending_closed(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            let _ = epoll::delete(&self.epoll, &p.sock);
            self.abandon(p.slot, p.gen, p.to.peer, p.vector);
        }
    }

    /// Gives up our (connector) end of a slot: closes both rings from our side, so a
    /// listener that accepted sees the end, and releases the slot.
    fn abandon(&mut self, slot: u32, gen: u32, peer: u32, vector: u16) {
        self.free_vector(vector);
        let (o, _) = self.geom.slot_range(slot);
        let params = slot_params(&self.geom);
        let region = self.port.region();
        close_side(
            region,
            o + params.ring(Direction::ToListener).ctrl,
            o + params.ring(Direction::ToConnector).ctrl,
        );
        let dir = view(&self.port, self.geom);
        let gone = |p, e| self.live.gone(&dir, p, e);
        let _ = self.owned.release(&dir, slot, gen, &gone);
        ring(&self.port, self.geom, peer);
    }

    fn free_vector(&mut self, vector: u16) {
        if vector != 0 && !self.free_vectors.contains(&vector) {
            self.free_vectors.push(vector);
        }
    }

    /// Our eventfd for a channel: the interrupt vector's own, when the channel has one,
    /// else a new one we signal when the shared vector rings.
    fn wakeup_fd(&self, vector: u16) -> io::Result<OwnedFd> {
        match self.port.vector_fd(vector).filter(|_| vector != 0) {
            Some(fd) => Ok(fd.try_clone_to_owned()?),
            None => sys::new_eventfd(),
        }
    }

    /// Makes the descriptors for a new channel and sends them to the process on `sock`.
    /// `vector` is ours for this channel, `peer_vector` the peer's.
    #[allow(clippy::too_many_arguments)]
    fn open_chan(
        &mut self,
        sock: BorrowedFd<'_>,
        slot: u32,
        gen: u32,
        listener_side: bool,
        peer: u32,
        peer_epoch: u64,
        vector: u16,
        peer_vector: u16,
    ) -> io::Result<()> {
        let (o, len) = self.geom.slot_range(slot);
        let params = slot_params(&self.geom);
        let (rx_dir, tx_dir) = if listener_side {
            (Direction::ToListener, Direction::ToConnector)
        } else {
            (Direction::ToConnector, Direction::ToListener)
        };
        let (ctrl_ours, ctrl_theirs) = sys::seqpacket_pair()?;
        // With a vector of our own, reader and writer share its eventfd: the peer rings one
        // vector for data and for space.
        let own_rx = self.wakeup_fd(vector)?;
        let own_tx = if vector != 0 { own_rx.try_clone()? } else { sys::new_eventfd()? };
        let (mem_fd, mem_base) = self.port.share_memory();
        let door = self
            .port
            .share_doorbell(
                view(&self.port, self.geom).ivshmem_id(peer).unwrap_or(peer as u16).into(),
                peer_vector,
            )
            .ok_or_else(|| other(format!("peer {peer} has no doorbell")))?;
        let (kind, value, d_off, d_len, d_fd) = match door {
            DoorbellShare::EventFd(fd) => (0u8, 0, 0, 0, Some(fd)),
            DoorbellShare::Pwrite { fd, offset, value } => (1, value, offset, 0, Some(fd)),
            DoorbellShare::Mmio { fd, map_offset, map_len, reg, value } => {
                (2, value, map_offset + reg as u64, map_len as u64, Some(fd))
            }
            DoorbellShare::Nothing => (3, 0, 0, 0, None),
        };
        let ch = Channel {
            listener_side,
            doorbell_kind: kind,
            doorbell_value: value,
            mem_offset: mem_base + o as u64,
            mem_len: len as u64,
            doorbell_offset: d_off,
            doorbell_map_len: d_len,
            peer,
        };
        let mut fds = vec![mem_fd, ctrl_theirs.as_fd(), own_rx.as_fd(), own_tx.as_fd()];
        fds.extend(d_fd);
        sys::send_packet(sock, &Packet::Channel(ch).encode(), &fds)?;
        let fd = ctrl_ours.as_raw_fd();
        epoll::add(
            &self.epoll,
            &ctrl_ours,
            epoll::EventData::new_u64(T_CHAN | fd as u64),
            epoll::EventFlags::IN,
        )?;
        self.chans.insert(
            fd,
            Chan {
                slot,
                gen,
                listener_side,
                peer,
                peer_epoch,
                ctrl: ctrl_ours,
                own_rx,
                own_tx,
                rx: o + params.ring(rx_dir).ctrl,
                tx: o + params.ring(tx_dir).ctrl,
                peer_done: false,
                vector,
                rx_woken: (0, 0),
                tx_woken: (0, 0),
            },
        );
        Ok(())
    }

    /// The local process closed its channel (or died): finish our end of the slot.
    fn chan_closed(&mut self, fd: RawFd) {
        let Some(ch) = self.chans.remove(&fd) else { return };
        let _ = epoll::delete(&self.epoll, &ch.ctrl);
        self.free_vector(ch.vector);
        let region = self.port.region();
        close_side(region, ch.tx, ch.rx);
        let dir = view(&self.port, self.geom);
        if ch.listener_side {
            let _ = dir.set_answer(ch.slot, ch.gen, ListenerAnswer::Closed);
        } else {
            let gone = |p, e| self.live.gone(&dir, p, e);
            let _ = self.owned.release(&dir, ch.slot, ch.gen, &gone);
        }
        ring(&self.port, self.geom, ch.peer);
    }

    /// Wakes the local processes that sleep with data or space ready.
    fn wake_all(&mut self) {
        let region = self.port.region();
        for c in self.chans.values_mut() {
            wake_sleepers(region, c);
        }
    }

    /// One pass over everything shared: peers, requests to us, answers to our requests,
    /// channels whose peer finished, sleepers to wake. Returns whether anything happened.
    fn scan(&mut self) -> bool {
        let mut busy = false;
        let dir = view(&self.port, self.geom);

        // Peers that joined or left.
        for p in 0..self.geom.peers {
            let now = dir.peer(p).map(|s| (s.epoch, s.alive)).unwrap_or((0, false));
            if now != self.epochs[p as usize] {
                tracing::info!(
                    "agent: peer {p} is now {} (epoch {})",
                    if now.1 { "up" } else { "down" },
                    now.0
                );
                self.epochs[p as usize] = now;
                busy = true;
            }
        }
        if self.managed && dir.peer(self.me).map(|s| s.epoch) != Ok(self.epoch) {
            tracing::warn!("agent: the daemon's peer table no longer shows our epoch {}", self.epoch);
        }

        // Requests to our listeners, and connectors that finished.
        let mut to_open = Vec::new();
        for slot in 0..self.geom.slots() {
            if let Ok(Some(req)) = dir.request(slot, self.me) {
                let answered =
                    matches!(dir.answer(slot), Ok(Some((g, a))) if g == req.gen && a != ListenerAnswer::None);
                if !answered {
                    busy = true;
                    let client = self
                        .clients
                        .iter()
                        .find(|(_, c)| c.listeners.iter().any(|l| l.index == req.index && l.gen == req.lgen))
                        .map(|(fd, _)| *fd);
                    match client {
                        Some(cfd) if self.owned.addresses_us(&req, self.epoch) => to_open.push((cfd, req)),
                        _ => {
                            let _ = dir.set_answer(slot, req.gen, ListenerAnswer::Refused);
                            ring(&self.port, self.geom, req.from);
                        }
                    }
                }
            }
            if let Ok(Some(gen)) = dir.finished_by_connector(slot, self.me) {
                let open =
                    self.chans.values_mut().find(|c| c.listener_side && c.slot == slot && c.gen == gen);
                match open {
                    Some(c) => {
                        if !c.peer_done {
                            c.peer_done = true;
                            let _ = rustix::net::shutdown(&c.ctrl, rustix::net::Shutdown::Write);
                            busy = true;
                        }
                    }
                    None => {
                        let _ = dir.set_answer(slot, gen, ListenerAnswer::Closed);
                    }
                }
            }
        }
        for (cfd, req) in to_open {
            let peer_epoch = view(&self.port, self.geom).peer(req.from).map(|s| s.epoch).unwrap_or(0);
            let sock = self.clients.get(&cfd).map(|c| c.sock.try_clone());
            // The slot's header must be a fresh channel before we hand it out.
            let (o, len) = self.geom.slot_range(req.slot);
            let fresh =
                self.port.region().sub(o, len).map(|r| layout::validate(&r, false).is_ok()).unwrap_or(false);
            let vector = self.free_vectors.pop().unwrap_or(0);
            let peer_vector = u16::try_from(req.vector).unwrap_or(0);
            let ok = match sock {
                Some(Ok(sock)) if fresh => self
                    .open_chan(
                        sock.as_fd(),
                        req.slot,
                        req.gen,
                        true,
                        req.from,
                        peer_epoch,
                        vector,
                        peer_vector,
                    )
                    .is_ok(),
                _ => false,
            };
            if !ok {
                self.free_vector(vector);
            }
            let dir = view(&self.port, self.geom);
            if ok {
                let _ = dir.set_listener_vector(req.slot, vector.into());
            }
            let answer = if ok { ListenerAnswer::Accepted } else { ListenerAnswer::Refused };
            let _ = dir.set_answer(req.slot, req.gen, answer);
            ring(&self.port, self.geom, req.from);
        }

        // Answers to our requests.
        let mut done = Vec::new();
        let dir = view(&self.port, self.geom);
        for (&fd, p) in &self.pending {
            let answer = dir.answer(p.slot).ok().flatten();
            let outcome = match answer {
                Some((g, ListenerAnswer::Accepted)) if g == p.gen => Some(Ok(())),
                Some((g, ListenerAnswer::Refused | ListenerAnswer::Closed)) if g == p.gen => {
                    Some(Err((libc_errno::ECONNREFUSED, "the listener refused the connection".to_owned())))
                }
                _ if self.live.gone(&dir, p.to.peer, p.epoch) => {
                    Some(Err((libc_errno::ECONNREFUSED, format!("peer {} left before answering", p.to.peer))))
                }
                _ if Instant::now() >= p.deadline => {
                    Some(Err((libc_errno::ETIMEDOUT, "the listener did not answer in time".to_owned())))
                }
                _ => None,
            };
            if let Some(o) = outcome {
                done.push((fd, o));
            }
        }
        for (fd, outcome) in done {
            busy = true;
            let p = self.pending.remove(&fd).expect("pending");
            let _ = epoll::delete(&self.epoll, &p.sock);
            let peer_vector = view(&self.port, self.geom)
                .listener_vector(p.slot)
                .ok()
                .and_then(|v| u16::try_from(v).ok())
                .unwrap_or(0);
            let res = outcome.and_then(|()| {
                self.open_chan(
                    p.sock.as_fd(),
                    p.slot,
                    p.gen,
                    false,
                    p.to.peer,
                    p.epoch,
                    p.vector,
                    peer_vector,
                )
                .map_err(|e| (libc_errno::EIO, e.to_string()))
            });
            if let Err((errno, message)) = res {
                let _ = sys::send_packet(p.sock.as_fd(), &Packet::Error { errno, message }.encode(), &[]);
                self.abandon(p.slot, p.gen, p.to.peer, p.vector);
            }
        }

        // Open channels: peers that finished or went away, sleepers to wake.
        let dir = view(&self.port, self.geom);
        let region = self.port.region();
        for c in self.chans.values_mut() {
            if !c.peer_done {
                let finished = if c.listener_side {
                    false // seen above through `finished_by_connector`
                } else {
                    matches!(dir.answer(c.slot), Ok(Some((g, ListenerAnswer::Closed | ListenerAnswer::Refused))) if g == c.gen)
                };
                let gone = match dir.peer(c.peer) {
                    Ok(s) => s.epoch != c.peer_epoch || !s.alive || !self.live.alive(&dir, c.peer),
                    Err(_) => true,
                };
                if finished || gone {
                    c.peer_done = true;
                    busy = true;
                    let _ = rustix::net::shutdown(&c.ctrl, rustix::net::Shutdown::Write);
                }
            }
            busy |= wake_sleepers(region, c);
        }

        let dir = view(&self.port, self.geom);
        let gone = |p, e| self.live.gone(&dir, p, e);
        let _ = self.owned.reclaim(&dir, &gone);
        busy
    }
}

impl<P: Port> Drop for Agent<P> {
    fn drop(&mut self) {
        let fds: Vec<RawFd> = self.chans.keys().copied().collect();
        for fd in fds {
            self.chan_closed(fd);
        }
        let fds: Vec<RawFd> = self.pending.keys().copied().collect();
        for fd in fds {
            self.pending_closed(fd);
        }
        let fds: Vec<RawFd> = self.clients.keys().copied().collect();
        for fd in fds {
            self.drop_client(fd);
        }
        if !self.managed {
            let dir = view(&self.port, self.geom);
            let _ = dir.set_peer(self.me, directory::PeerState { epoch: self.epoch, alive: false });
        }
        let _ = self.socket_dir.unlink_if(&self.socket_name, self.socket_id);
    }
}

/// Rings member `peer` at its current ivshmem id.
fn ring<P: Port>(port: &P, geom: Geometry, peer: u32) {
    let id = view(port, geom).ivshmem_id(peer).unwrap_or(peer as u16);
    port.ring(id.into());
}

/// The directory of `port`'s region, whose geometry was validated when the agent attached.
fn view<P: Port>(port: &P, geom: Geometry) -> Directory<'_> {
    Directory::new(port.region(), geom).expect("geometry validated at attach, region unchanged")
}

/// Geometry of every slot's channel (stream mode, the directory's capacity both ways).
fn slot_params(g: &Geometry) -> Params {
    Params { capacity: [g.slot_capacity; 2], max_message: None }
}

/// Marks our side of a channel closed: no more writes into `tx`, no more reads from `rx`.
fn close_side(region: &ivcom_ring::ShmRegion, tx: usize, rx: usize) {
    if let Ok(c) = ShmCtrl::new(region, tx) {
        c.store_producer_closed(1);
    }
    if let Ok(c) = ShmCtrl::new(region, rx) {
        c.store_consumer_closed(1);
    }
}

/// Wakes the local reader if it sleeps and data or the end arrived, and the local writer if
/// it sleeps and space or the end arrived; each at most once per change.
fn wake_sleepers(region: &ivcom_ring::ShmRegion, c: &mut Chan) -> bool {
    let mut woke = false;
    if let Ok(rx) = ShmCtrl::new(region, c.rx) {
        let seq = rx.load_consumer_sleep();
        let tail = rx.load_tail();
        if seq & 1 == 1
            && (tail != rx.load_head() || rx.load_producer_closed() != 0)
            && c.rx_woken != (seq, tail)
        {
            c.rx_woken = (seq, tail);
            sys::signal(c.own_rx.as_fd());
            woke = true;
        }
    }
    if let Ok(tx) = ShmCtrl::new(region, c.tx) {
        let seq = tx.load_producer_sleep();
        let head = tx.load_head();
        if seq & 1 == 1 && c.tx_woken != (seq, head) {
            c.tx_woken = (seq, head);
            sys::signal(c.own_tx.as_fd());
            woke = true;
        }
    }
    woke
}

/// The access of a directory the agent creates for its socket: reachable by exactly the
/// processes `access` admits.
fn dir_access_for(access: &Access) -> DirAccess {
    match access {
        Access::SameUid => DirAccess::Private,
        Access::Group(g) => DirAccess::Group(*g),
        // Others may pass through to the socket, not list or change the directory.
        Access::Uids(_) | Access::Anyone => DirAccess::Traverse,
    }
}

/// Binds the agent's socket: its directory is opened and checked with
/// [`RuntimeDir::open_service`] (ours, nobody else can write it or a directory on the way to
/// it, no symlink; created with [`dir_access_for`] if missing, an existing one is left as it
/// is), and the socket is bound with [`RuntimeDir::listen_unix`]: through that descriptor,
/// given its mode (and for [`Access::Group`] its group) before it listens. A stale socket
/// file is replaced, never a live agent's. Returns the listening socket, the directory, the
/// socket's name and its (device, inode).
fn bind_socket(
    path: &Path,
    access: &Access,
    mode: u32,
) -> io::Result<(OwnedFd, RuntimeDir, String, (u64, u64))> {
    let bad = |what: &str| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("agent socket {}: {what}", path.display()))
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("the path must end in a UTF-8 file name"))?
        .to_owned();
    let parent = path.parent().ok_or_else(|| bad("no directory"))?;
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let dir = RuntimeDir::open_service(parent, dir_access_for(access), Existing::Keep).map_err(|e| {
        match DirRefusal::of(&e) {
            Some(r) => io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "agent socket directory: {} is owned by uid {} (group {}, mode {:04o}): {}; refusing to use it",
                    r.path.display(),
                    r.uid,
                    r.gid,
                    r.mode,
                    r.why
                ),
            ),
            None => e,
        }
    })?;
    if let Ok(st) = rustix::fs::fstat(dir.fd()) {
        let reach = match access {
            Access::SameUid => 0,
            Access::Group(_) => 0o010,
            Access::Uids(_) | Access::Anyone => 0o001,
        };
        if st.st_mode & reach != reach {
            tracing::warn!(
                "agent: {} has mode {:04o}: the processes --access admits cannot reach the socket in it",
                dir.path().display(),
                st.st_mode & 0o7777
            );
        }
    }
    let spec = SocketSpec {
        kind: rustix::net::SocketType::SEQPACKET,
        // A connection gone before `accept` never stalls the loop.
        nonblocking: true,
        uid: None,
        gid: match access {
            Access::Group(g) => Some(*g),
            _ => None,
        },
        mode,
        backlog: 128,
    };
    let (fd, id) = dir.listen_unix(&name, &spec).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => {
            io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use by another agent", path.display()))
        }
        _ => e,
    })?;
    Ok((fd, dir, name, id))
}

/// The errno values the agent reports, from rustix so that they match the platform.
mod libc_errno {
    use rustix::io::Errno;
    pub const EPROTO: i32 = Errno::PROTO.raw_os_error();
    pub const EACCES: i32 = Errno::ACCESS.raw_os_error();
    pub const EADDRINUSE: i32 = Errno::ADDRINUSE.raw_os_error();
    pub const EINVAL: i32 = Errno::INVAL.raw_os_error();
    pub const ENOBUFS: i32 = Errno::NOBUFS.raw_os_error();
    pub const EIO: i32 = Errno::IO.raw_os_error();
    pub const ECONNREFUSED: i32 = Errno::CONNREFUSED.raw_os_error();
    pub const ETIMEDOUT: i32 = Errno::TIMEDOUT.raw_os_error();
}
