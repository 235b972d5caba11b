//! Many channels in one region shared by several peers (an ivshmem region shared by VMs and
//! host processes): a peer table, a listener directory, and channel slots, each slot a
//! version-1 channel region of its own (see [`crate::layout`]).
//!
//! ```text
//! offset           size            what                                   written by
//! 0                4096            directory header                        formatter, once
//! peers_off        peers*128       peer table: +0 state word               daemon
//!                                              +64 heartbeat               the peer itself
//! listeners_off    peers*L*128     listener entries, L per peer            their owner
//! descs_off        peers*K*128     slot descriptors, K per peer:
//!                                    +0..64 connector half                  the slot's owner
//!                                    +64..128 listener half                 the addressed listener
//! slots_off        peers*K*slot    channel slots (each a v1 channel region) both ends
//! ```
//!
//! Every word has exactly one writer. Peers never use read-modify-write atomics on each
//! other's words: under software emulation (QEMU TCG with one vCPU) a guest's locked
//! instruction is not atomic with respect to another guest, and a hostile peer could break any
//! protocol that relied on it anyway. Each peer keeps the authoritative state of what it owns in
//! its own memory ([`Owned`]) and only publishes it; what it reads from others is validated on
//! every read. `docs/vm-region-layout.md` is the byte-for-byte description.

use std::sync::atomic::{fence, Ordering};

use crate::layout::{self, LayoutError, Params};
use crate::shm::{OutOfBounds, ShmRegion};

/// `b"IVCOMDIR"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"IVCOMDIR");
/// Directory layout version.
pub const VERSION: u32 = 1;
/// Size of the directory header.
pub const HEADER_SIZE: usize = 4096;
/// Size of one peer-table entry, listener entry and slot descriptor.
pub const ENTRY: usize = 128;
/// Most peers a directory holds (ivshmem peer ids are u16; groups are small).
pub const MAX_PEERS: u32 = 64;
/// Most listener entries per peer.
pub const MAX_LISTENERS: u32 = 64;
/// Most channel slots per peer.
pub const MAX_SLOTS: u32 = 256;
/// Longest listener name.
pub const MAX_NAME: usize = 64;
/// The addressed peer of a slot descriptor that addresses nobody.
pub const NOBODY: u32 = u32::MAX;
/// Largest interrupt vector a descriptor may name (ivshmem allows 64 per peer); larger values
/// read as 0.
pub const MAX_VECTOR: u32 = 63;
/// Header flag: a daemon maintains the peer table (otherwise liveness is by heartbeat).
pub const FLAG_MANAGED: u32 = 1;

/// Header field offsets.
#[allow(missing_docs)]
pub mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const REGION_SIZE: usize = 16;
    pub const PEERS: usize = 24;
    pub const LISTENERS_PER_PEER: usize = 28;
    pub const SLOTS_PER_PEER: usize = 32;
    pub const FLAGS: usize = 36;
    pub const SLOT_CAPACITY: usize = 40;
    pub const SLOT_SIZE: usize = 48;
    pub const PEERS_OFF: usize = 56;
    pub const LISTENERS_OFF: usize = 64;
    pub const DESCS_OFF: usize = 72;
    pub const SLOTS_OFF: usize = 80;
    /// Peer entry: daemon's word, `epoch << 1 | alive`.
    pub const PEER_STATE: usize = 0;
    /// Peer entry: the member's current ivshmem peer id plus one (0: not published, the id
    /// is the member index), written by the daemon.
    pub const PEER_IVSHMEM_ID: usize = 8;
    /// Peer entry: the peer's own heartbeat counter.
    pub const PEER_HEARTBEAT: usize = 64;
    /// Listener entry: `generation << 32 | state`.
    pub const L_WORD: usize = 0;
    /// Listener entry: name length.
    pub const L_NAME_LEN: usize = 8;
    /// Listener entry: name bytes.
    pub const L_NAME: usize = 16;
    /// Descriptor, connector half: `generation << 32 | state`.
    pub const C_WORD: usize = 0;
    /// Descriptor, connector half: addressed listener's peer id.
    pub const C_PEER: usize = 8;
    /// Descriptor, connector half: addressed listener's entry index (within its peer).
    pub const C_INDEX: usize = 12;
    /// Descriptor, connector half: addressed listener's generation.
    pub const C_LGEN: usize = 16;
    /// Descriptor, connector half: flags (bit 0: message mode).
    pub const C_FLAGS: usize = 20;
    /// Descriptor, connector half: the listener peer's epoch when the request was made.
    pub const C_EPOCH: usize = 24;
    /// Descriptor, connector half: the interrupt vector the connector receives this
    /// channel's doorbells on (0: its agent's shared vector).
    pub const C_VECTOR: usize = 32;
    /// Descriptor, listener half: `generation << 32 | state`.
    pub const A_WORD: usize = 64;
    /// Descriptor, listener half: the interrupt vector the listener receives this channel's
    /// doorbells on, written before it answers `accepted`.
    pub const A_VECTOR: usize = 72;
}

/// State of a listener entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    /// Unused (or being rewritten).
    Free = 0,
    /// Accepting connections under its name.
    Listening = 1,
}

/// The connector's state of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectorState {
    /// Never used.
    Idle = 0,
    /// Asking the addressed listener to accept.
    Request = 1,
    /// The connector has finished with this generation (closed, or gave up waiting).
    Closed = 2,
}

/// The listener's answer for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerAnswer {
    /// Not answered.
    None = 0,
    /// Accepted: the channel is open.
    Accepted = 1,
    /// Refused (no such listener any more, or it is full).
    Refused = 2,
    /// The listener's side has finished with this generation.
    Closed = 3,
}

/// A directory or one of its entries that cannot be used.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirError {
    #[error("not an ivcom directory region (magic {found:#018x})")]
    BadMagic { found: u64 },
    #[error("directory layout version {found}, this build speaks version {VERSION}")]
    VersionMismatch { found: u32 },
    #[error("directory header field {field} is {value}, expected {expected}")]
    BadField { field: &'static str, value: u64, expected: String },
    #[error("region of {len} bytes is too small for {what}")]
    TooSmall { len: usize, what: String },
    #[error("listener name must be 1-{MAX_NAME} bytes of A-Z a-z 0-9 . _ -")]
    BadName,
    #[error("peer {0} is outside the directory")]
    BadPeer(u32),
    #[error("the name is already bound in this region")]
    NameInUse,
    #[error("no free {0} left for this peer in the region")]
    Full(&'static str),
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// What the formatter chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Peer ids `0..peers` may use the region.
    pub peers: u32,
    /// Listener entries per peer.
    pub listeners_per_peer: u32,
    /// Ring capacity per direction of each channel slot (power of two).
    pub slot_capacity: u64,
    /// Whether a daemon maintains the peer table.
    pub managed: bool,
}

/// Validated shape of a directory: every offset the rest of the code uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Region size in bytes.
    pub region_size: usize,
    /// Number of peers.
    pub peers: u32,
    /// Listener entries per peer.
    pub listeners_per_peer: u32,
    /// Slots per peer.
    pub slots_per_peer: u32,
    /// Header flags.
    pub flags: u32,
    /// Ring capacity per direction in each slot.
    pub slot_capacity: u64,
    /// Bytes per slot (a page multiple).
    pub slot_size: usize,
    /// Offset of the peer table.
    pub peers_off: usize,
    /// Offset of the listener entries.
    pub listeners_off: usize,
    /// Offset of the slot descriptors.
    pub descs_off: usize,
    /// Offset of the first slot (page-aligned).
    pub slots_off: usize,
}

const PAGE: usize = 4096;

fn align_up(v: usize, a: usize) -> Option<usize> {
    v.checked_add(a - 1).map(|v| v / a * a)
}

impl Geometry {
    /// Lays out a region of `region_size` bytes for `spec`, giving each peer as many slots as
    /// fit (at most [`MAX_SLOTS`]).
    pub fn plan(region_size: usize, spec: &Spec) -> Result<Self, DirError> {
        if spec.peers == 0 || spec.peers > MAX_PEERS {
            return Err(bad("peers", spec.peers.into(), format!("1..={MAX_PEERS}")));
        }
        if spec.listeners_per_peer == 0 || spec.listeners_per_peer > MAX_LISTENERS {
            return Err(bad(
                "listeners_per_peer",
                spec.listeners_per_peer.into(),
                format!("1..={MAX_LISTENERS}"),
            ));
        }
        let params = Params { capacity: [spec.slot_capacity; 2], max_message: None };
        let slot_size = params.region_size()?;
        let p = spec.peers as usize;
        let peers_off = HEADER_SIZE;
        let listeners_off = peers_off + p * ENTRY;
        let descs_off = listeners_off + p * spec.listeners_per_peer as usize * ENTRY;
        // Descriptors and slots both scale with the slot count: find the largest that fits.
        let per_slot = ENTRY + slot_size;
        let room = region_size.saturating_sub(descs_off + PAGE);
        let k = (room / (p * per_slot)).min(MAX_SLOTS as usize);
        if k == 0 {
            return Err(DirError::TooSmall {
                len: region_size,
                what: format!("{p} peers with one channel slot of {slot_size} bytes each"),
            });
        }
        let g = Geometry {
            region_size,
            peers: spec.peers,
            listeners_per_peer: spec.listeners_per_peer,
            slots_per_peer: k as u32,
            flags: if spec.managed { FLAG_MANAGED } else { 0 },
            slot_capacity: spec.slot_capacity,
            slot_size,
            peers_off,
            listeners_off,
            descs_off,
            slots_off: align_up(descs_off + p * k * ENTRY, PAGE).expect("small"),
        };
        g.check()?;
        Ok(g)
    }

    /// Recomputes every offset from the counts and checks that the stored ones agree and that
    /// everything lies inside the region. All arithmetic is checked: the inputs may be forged.
    fn check(&self) -> Result<(), DirError> {
        if self.peers == 0 || self.peers > MAX_PEERS {
            return Err(bad("peers", self.peers.into(), format!("1..={MAX_PEERS}")));
        }
        if self.listeners_per_peer == 0 || self.listeners_per_peer > MAX_LISTENERS {
            return Err(bad(
                "listeners_per_peer",
                self.listeners_per_peer.into(),
                format!("1..={MAX_LISTENERS}"),
            ));
        }
        if self.slots_per_peer == 0 || self.slots_per_peer > MAX_SLOTS {
            return Err(bad("slots_per_peer", self.slots_per_peer.into(), format!("1..={MAX_SLOTS}")));
        }
        if self.flags & !FLAG_MANAGED != 0 {
            return Err(bad("flags", self.flags.into(), "0 or 1"));
        }
        let slot_size = Params { capacity: [self.slot_capacity; 2], max_message: None }.region_size()?;
        if self.slot_size != slot_size {
            return Err(bad("slot_size", self.slot_size as u64, slot_size));
        }
        let p = self.peers as usize;
        let k = self.slots_per_peer as usize;
        let l = self.listeners_per_peer as usize;
        let expect = [
            ("peers_off", self.peers_off, HEADER_SIZE),
            ("listeners_off", self.listeners_off, HEADER_SIZE + p * ENTRY),
            ("descs_off", self.descs_off, HEADER_SIZE + p * ENTRY + p * l * ENTRY),
        ];
        for (field, got, want) in expect {
            if got != want {
                return Err(bad(field, got as u64, want));
            }
        }
        let slots_off = align_up(self.descs_off + p * k * ENTRY, PAGE).expect("small");
        if self.slots_off != slots_off {
            return Err(bad("slots_off", self.slots_off as u64, slots_off));
        }
        let end = (p * k).checked_mul(slot_size).and_then(|s| s.checked_add(slots_off));
        match end {
            Some(end) if end <= self.region_size => Ok(()),
            _ => Err(DirError::TooSmall { len: self.region_size, what: format!("{} slots", p * k) }),
        }
    }

    /// Total number of slots.
    pub fn slots(&self) -> u32 {
        self.peers * self.slots_per_peer
    }

    /// The peer that owns (allocates) slot `slot`.
    pub fn slot_owner(&self, slot: u32) -> u32 {
        slot / self.slots_per_peer
    }

    /// `(offset, length)` of slot `slot`'s channel region; `slot < self.slots()`.
    pub fn slot_range(&self, slot: u32) -> (usize, usize) {
        assert!(slot < self.slots());
        (self.slots_off + slot as usize * self.slot_size, self.slot_size)
    }

    fn peer_entry(&self, peer: u32) -> usize {
        self.peers_off + peer as usize * ENTRY
    }

    fn listener_entry(&self, peer: u32, index: u32) -> usize {
        self.listeners_off + (peer * self.listeners_per_peer + index) as usize * ENTRY
    }

    fn desc(&self, slot: u32) -> usize {
        self.descs_off + slot as usize * ENTRY
    }
}

fn bad(field: &'static str, value: u64, expected: impl ToString) -> DirError {
    DirError::BadField { field, value, expected: expected.to_string() }
}

/// Writes a fresh directory into a zeroed region. Called by the region's creator (the
/// daemon) before any peer can map it.
pub fn format(region: &ShmRegion, spec: &Spec) -> Result<Geometry, DirError> {
    let g = Geometry::plan(region.len(), spec)?;
    region.zero(0, g.slots_off)?;
    let r = Ordering::Relaxed;
    region.store_u64(off::MAGIC, MAGIC, r)?;
    region.store_u32(off::VERSION, VERSION, r)?;
    region.store_u32(off::HEADER_SIZE, HEADER_SIZE as u32, r)?;
    region.store_u64(off::REGION_SIZE, g.region_size as u64, r)?;
    region.store_u32(off::PEERS, g.peers, r)?;
    region.store_u32(off::LISTENERS_PER_PEER, g.listeners_per_peer, r)?;
    region.store_u32(off::SLOTS_PER_PEER, g.slots_per_peer, r)?;
    region.store_u32(off::FLAGS, g.flags, r)?;
    region.store_u64(off::SLOT_CAPACITY, g.slot_capacity, r)?;
    region.store_u64(off::SLOT_SIZE, g.slot_size as u64, r)?;
    region.store_u64(off::PEERS_OFF, g.peers_off as u64, r)?;
    region.store_u64(off::LISTENERS_OFF, g.listeners_off as u64, r)?;
    region.store_u64(off::DESCS_OFF, g.descs_off as u64, r)?;
    region.store_u64(off::SLOTS_OFF, g.slots_off as u64, Ordering::Release)?;
    Ok(g)
}

/// Reads and validates a directory header. Each field is read once; the returned geometry is
/// what to use from then on.
pub fn attach(region: &ShmRegion) -> Result<Geometry, DirError> {
    if region.len() < HEADER_SIZE {
        return Err(DirError::TooSmall { len: region.len(), what: "a directory header".into() });
    }
    let a = Ordering::Acquire;
    let magic = region.load_u64(off::MAGIC, a)?;
    if magic != MAGIC {
        return Err(DirError::BadMagic { found: magic });
    }
    let version = region.load_u32(off::VERSION, a)?;
    if version != VERSION {
        return Err(DirError::VersionMismatch { found: version });
    }
    let header = region.load_u32(off::HEADER_SIZE, a)?;
    if header as usize != HEADER_SIZE {
        return Err(bad("header_size", header.into(), HEADER_SIZE));
    }
    let region_size = region.load_u64(off::REGION_SIZE, a)?;
    if region_size != region.len() as u64 {
        return Err(bad("region_size", region_size, region.len()));
    }
    let word = |o| region.load_u64(o, a).map(|v| usize::try_from(v).unwrap_or(usize::MAX));
    let g = Geometry {
        region_size: region.len(),
        peers: region.load_u32(off::PEERS, a)?,
        listeners_per_peer: region.load_u32(off::LISTENERS_PER_PEER, a)?,
        slots_per_peer: region.load_u32(off::SLOTS_PER_PEER, a)?,
        flags: region.load_u32(off::FLAGS, a)?,
        slot_capacity: region.load_u64(off::SLOT_CAPACITY, a)?,
        slot_size: word(off::SLOT_SIZE)?,
        peers_off: word(off::PEERS_OFF)?,
        listeners_off: word(off::LISTENERS_OFF)?,
        descs_off: word(off::DESCS_OFF)?,
        slots_off: word(off::SLOTS_OFF)?,
    };
    g.check()?;
    Ok(g)
}

/// Checks a listener name: 1..=64 bytes of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), DirError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DirError::BadName)
    }
}

fn pack(gen: u32, state: u8) -> u64 {
    u64::from(gen) << 32 | u64::from(state)
}

fn unpack(w: u64) -> (u32, u32) {
    ((w >> 32) as u32, w as u32)
}

/// A peer as the peer table shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    /// Incremented by the daemon each time the peer joins or leaves.
    pub epoch: u64,
    /// Whether the peer is connected.
    pub alive: bool,
}

/// A listener someone published, as read (validated) from its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerRef {
    /// Owning peer.
    pub peer: u32,
    /// Entry index within the owner's entries.
    pub index: u32,
    /// Generation of the binding.
    pub gen: u32,
}

/// A connection request addressed to one of our listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Slot holding the channel.
    pub slot: u32,
    /// Slot generation.
    pub gen: u32,
    /// Connecting peer (the slot's owner).
    pub from: u32,
    /// Our listener entry it addresses.
    pub index: u32,
    /// That entry's generation as the connector saw it.
    pub lgen: u32,
    /// Our epoch as the connector saw it.
    pub epoch: u64,
    /// The vector the connector receives this channel's doorbells on.
    pub vector: u32,
}

/// A view of a validated directory. Reads of peer-written words validate each value; writes
/// go only to words this peer owns.
#[derive(Debug, Clone, Copy)]
pub struct Directory<'a> {
    region: &'a ShmRegion,
    geom: Geometry,
}

impl<'a> Directory<'a> {
    /// Wraps a region whose geometry [`attach`] or [`format()`] produced.
    pub fn new(region: &'a ShmRegion, geom: Geometry) -> Result<Self, DirError> {
        if region.len() != geom.region_size {
            return Err(bad("region_size", region.len() as u64, geom.region_size));
        }
        geom.check()?;
        Ok(Self { region, geom })
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// The region.
    pub fn region(&self) -> &'a ShmRegion {
        self.region
    }

    fn check_peer(&self, peer: u32) -> Result<(), DirError> {
        if peer < self.geom.peers {
            Ok(())
        } else {
            Err(DirError::BadPeer(peer))
        }
    }

    /// The peer table entry of `peer`.
    pub fn peer(&self, peer: u32) -> Result<PeerState, DirError> {
        self.check_peer(peer)?;
        let w = self.region.load_u64(self.geom.peer_entry(peer) + off::PEER_STATE, Ordering::Acquire)?;
        Ok(PeerState { epoch: w >> 1, alive: w & 1 != 0 })
    }

    /// Daemon: records `peer`'s state.
    pub fn set_peer(&self, peer: u32, s: PeerState) -> Result<(), DirError> {
        self.check_peer(peer)?;
        let w = s.epoch << 1 | u64::from(s.alive);
        self.region.store_u64(self.geom.peer_entry(peer) + off::PEER_STATE, w, Ordering::SeqCst)?;
        Ok(())
    }

    /// Daemon: publishes member `peer`'s current ivshmem peer id.
    pub fn set_ivshmem_id(&self, peer: u32, id: u16) -> Result<(), DirError> {
        self.check_peer(peer)?;
        self.region.store_u32(
            self.geom.peer_entry(peer) + off::PEER_IVSHMEM_ID,
            u32::from(id) + 1,
            Ordering::SeqCst,
        )?;
        Ok(())
    }

    /// The ivshmem peer id that reaches member `peer`: the published one if it is consistent
    /// (`id % peers == peer`), else `peer` itself.
    pub fn ivshmem_id(&self, peer: u32) -> Result<u16, DirError> {
        self.check_peer(peer)?;
        let v = self.region.load_u32(self.geom.peer_entry(peer) + off::PEER_IVSHMEM_ID, Ordering::Acquire)?;
        let id = v.wrapping_sub(1);
        Ok(match u16::try_from(id) {
            Ok(id) if v != 0 && u32::from(id) % self.geom.peers == peer => id,
            _ => peer as u16,
        })
    }

    /// The member an ivshmem peer id belongs to.
    pub fn member_of(&self, ivshmem_id: u32) -> u32 {
        ivshmem_id % self.geom.peers
    }

    /// `peer`'s heartbeat counter.
    pub fn heartbeat(&self, peer: u32) -> Result<u64, DirError> {
        self.check_peer(peer)?;
        Ok(self.region.load_u64(self.geom.peer_entry(peer) + off::PEER_HEARTBEAT, Ordering::Acquire)?)
    }

    /// Publishes our heartbeat counter.
    pub fn set_heartbeat(&self, me: u32, beat: u64) -> Result<(), DirError> {
        self.check_peer(me)?;
        self.region.store_u64(self.geom.peer_entry(me) + off::PEER_HEARTBEAT, beat, Ordering::Release)?;
        Ok(())
    }

    /// Reads listener entry `(peer, index)`: its generation and name if it is listening and
    /// was read consistently (the owner did not rewrite it while we read).
    pub fn listener(&self, peer: u32, index: u32) -> Result<Option<(u32, String)>, DirError> {
        self.check_peer(peer)?;
        if index >= self.geom.listeners_per_peer {
            return Ok(None);
        }
        let e = self.geom.listener_entry(peer, index);
        let w1 = self.region.load_u64(e + off::L_WORD, Ordering::Acquire)?;
        let (gen, state) = unpack(w1);
        if state != ListenerState::Listening as u32 {
            return Ok(None);
        }
        let len = self.region.load_u32(e + off::L_NAME_LEN, Ordering::Acquire)? as usize;
        if len == 0 || len > MAX_NAME {
            return Ok(None);
        }
        let mut name = [0u8; MAX_NAME];
        self.region.read_bytes(e + off::L_NAME, &mut name[..len])?;
        fence(Ordering::Acquire);
        if self.region.load_u64(e + off::L_WORD, Ordering::Relaxed)? != w1 {
            return Ok(None);
        }
        match std::str::from_utf8(&name[..len]) {
            Ok(s) if check_name(s).is_ok() => Ok(Some((gen, s.to_owned()))),
            _ => Ok(None),
        }
    }

    /// Finds a listening entry named `name` among the peers `alive` accepts, skipping
    /// `except`.
    pub fn lookup(
        &self,
        name: &str,
        alive: &dyn Fn(u32) -> bool,
        except: Option<(u32, u32)>,
    ) -> Result<Option<ListenerRef>, DirError> {
        for peer in 0..self.geom.peers {
            if !alive(peer) {
                continue;
            }
            for index in 0..self.geom.listeners_per_peer {
                if except == Some((peer, index)) {
                    continue;
                }
                if let Some((gen, n)) = self.listener(peer, index)? {
                    if n == name {
                        return Ok(Some(ListenerRef { peer, index, gen }));
                    }
                }
            }
        }
        Ok(None)
    }

    fn publish_listener(&self, me: u32, index: u32, gen: u32, name: Option<&str>) -> Result<(), DirError> {
        let e = self.geom.listener_entry(me, index);
        match name {
            None => self.region.store_u64(
                e + off::L_WORD,
                pack(gen, ListenerState::Free as u8),
                Ordering::SeqCst,
            )?,
            Some(n) => {
                // Free first, so a reader never pairs the new name with the old word.
                self.region.store_u64(
                    e + off::L_WORD,
                    pack(gen, ListenerState::Free as u8),
                    Ordering::SeqCst,
                )?;
                self.region.store_u32(e + off::L_NAME_LEN, n.len() as u32, Ordering::Relaxed)?;
                self.region.write_bytes(e + off::L_NAME, n.as_bytes())?;
                self.region.store_u64(
                    e + off::L_WORD,
                    pack(gen, ListenerState::Listening as u8),
                    Ordering::SeqCst,
                )?;
            }
        }
        Ok(())
    }

    /// The slot descriptor's connector half, as published (validated by the caller against
    /// what it expects).
    fn connector_word(&self, slot: u32) -> Result<(u32, u32), DirError> {
        Ok(unpack(self.region.load_u64(self.geom.desc(slot) + off::C_WORD, Ordering::Acquire)?))
    }

    /// The listener's answer for `slot`: `(generation, answer)`, or `None` if the word holds
    /// no valid answer.
    pub fn answer(&self, slot: u32) -> Result<Option<(u32, ListenerAnswer)>, DirError> {
        let (gen, a) = unpack(self.region.load_u64(self.geom.desc(slot) + off::A_WORD, Ordering::Acquire)?);
        let a = match a {
            0 => ListenerAnswer::None,
            1 => ListenerAnswer::Accepted,
            2 => ListenerAnswer::Refused,
            3 => ListenerAnswer::Closed,
            _ => return Ok(None),
        };
        Ok(Some((gen, a)))
    }

    /// The request in `slot` if it is a well-formed request addressed to one of `me`'s
    /// listeners.
    pub fn request(&self, slot: u32, me: u32) -> Result<Option<Request>, DirError> {
        if slot >= self.geom.slots() {
            return Ok(None);
        }
        let d = self.geom.desc(slot);
        let (gen, state) = self.connector_word(slot)?;
        if state != ConnectorState::Request as u32 {
            return Ok(None);
        }
        let a = Ordering::Acquire;
        let peer = self.region.load_u32(d + off::C_PEER, a)?;
        let index = self.region.load_u32(d + off::C_INDEX, a)?;
        let lgen = self.region.load_u32(d + off::C_LGEN, a)?;
        let flags = self.region.load_u32(d + off::C_FLAGS, a)?;
        let epoch = self.region.load_u64(d + off::C_EPOCH, a)?;
        let vector = self.region.load_u32(d + off::C_VECTOR, a)?;
        fence(Ordering::Acquire);
        if self.connector_word(slot)? != (gen, state) {
            return Ok(None);
        }
        if peer != me || index >= self.geom.listeners_per_peer || flags != 0 {
            return Ok(None);
        }
        let vector = if vector <= MAX_VECTOR { vector } else { 0 };
        Ok(Some(Request { slot, gen, from: self.geom.slot_owner(slot), index, lgen, epoch, vector }))
    }

    /// If `slot`'s connector has finished with a generation addressed to `me` that `me` has
    /// not yet finished with (answered `Closed` or `Refused`), that generation: the listener
    /// then closes its end if it has one, and answers `Closed`.
    pub fn finished_by_connector(&self, slot: u32, me: u32) -> Result<Option<u32>, DirError> {
        if slot >= self.geom.slots() {
            return Ok(None);
        }
        let (gen, state) = self.connector_word(slot)?;
        if state != ConnectorState::Closed as u32 {
            return Ok(None);
        }
        let peer = self.region.load_u32(self.geom.desc(slot) + off::C_PEER, Ordering::Acquire)?;
        if peer != me {
            return Ok(None);
        }
        match self.answer(slot)? {
            Some((g, ListenerAnswer::Closed | ListenerAnswer::Refused)) if g == gen => Ok(None),
            _ => Ok(Some(gen)),
        }
    }

    /// Whether the connector still holds `slot` in generation `gen` as a request or open
    /// channel (not closed or reused).
    pub fn connector_holds(&self, slot: u32, gen: u32) -> Result<bool, DirError> {
        Ok(self.connector_word(slot)? == (gen, ConnectorState::Request as u32))
    }

    /// Listener: publishes the vector we receive `slot`'s doorbells on (before answering).
    pub fn set_listener_vector(&self, slot: u32, vector: u32) -> Result<(), DirError> {
        if slot >= self.geom.slots() {
            return Err(bad("slot", slot.into(), format!("< {}", self.geom.slots())));
        }
        self.region.store_u32(self.geom.desc(slot) + off::A_VECTOR, vector, Ordering::Release)?;
        Ok(())
    }

    /// The vector the listener of `slot` receives its doorbells on (0 if out of range).
    pub fn listener_vector(&self, slot: u32) -> Result<u32, DirError> {
        if slot >= self.geom.slots() {
            return Ok(0);
        }
        let v = self.region.load_u32(self.geom.desc(slot) + off::A_VECTOR, Ordering::Acquire)?;
        Ok(if v <= MAX_VECTOR { v } else { 0 })
    }

    /// Listener: publishes our answer for `slot` generation `gen`.
    pub fn set_answer(&self, slot: u32, gen: u32, a: ListenerAnswer) -> Result<(), DirError> {
        if slot >= self.geom.slots() {
            return Err(bad("slot", slot.into(), format!("< {}", self.geom.slots())));
        }
        self.region.store_u64(self.geom.desc(slot) + off::A_WORD, pack(gen, a as u8), Ordering::SeqCst)?;
        Ok(())
    }
}

/// One of our slots, as we (its owner) know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotUse {
    /// Free to use; `gen` is the generation the next use takes.
    Free { gen: u32 },
    /// In use (requesting or open) in generation `gen`, to listener `to`.
    Busy { gen: u32, to: ListenerRef, epoch: u64 },
    /// We are done with generation `gen`; waiting for the listener to finish with it too.
    Draining { gen: u32, to: ListenerRef, epoch: u64 },
}

/// What this peer owns in a directory: its listener entries and slots. The authoritative
/// copy lives here, in private memory; the region only gets what others need to read.
#[derive(Debug)]
pub struct Owned {
    me: u32,
    listeners: Vec<Option<(u32, String)>>,
    listener_gens: Vec<u32>,
    slots: Vec<SlotUse>,
    /// The vector we published with each slot's current request.
    vectors: Vec<u32>,
}

impl Owned {
    /// Takes ownership of peer `me`'s entries, publishing them all as free. Generations start
    /// past whatever the region shows, so that a restarted peer never reuses a generation
    /// another peer may still hold a stale reference to.
    pub fn claim(dir: &Directory<'_>, me: u32) -> Result<Self, DirError> {
        dir.check_peer(me)?;
        let g = dir.geom;
        let mut listener_gens = Vec::new();
        for index in 0..g.listeners_per_peer {
            let e = g.listener_entry(me, index);
            let (gen, _) = unpack(dir.region.load_u64(e + off::L_WORD, Ordering::Acquire)?);
            let gen = gen.wrapping_add(1);
            dir.publish_listener(me, index, gen, None)?;
            listener_gens.push(gen);
        }
        // Slots a former incarnation of us left in use are closed now, and reused only once
        // their listener has finished with them (or left).
        let mut slots = Vec::new();
        for i in 0..g.slots_per_peer {
            let slot = me * g.slots_per_peer + i;
            let (gen, state) = dir.connector_word(slot)?;
            let d = g.desc(slot);
            let to = ListenerRef {
                peer: dir.region.load_u32(d + off::C_PEER, Ordering::Acquire)?,
                index: dir.region.load_u32(d + off::C_INDEX, Ordering::Acquire)?,
                gen: dir.region.load_u32(d + off::C_LGEN, Ordering::Acquire)?,
            };
            // In use (requesting or open), or closed by us but not yet let go by its listener.
            let finished = matches!(dir.answer(slot)?, Some((a, ListenerAnswer::Closed | ListenerAnswer::Refused)) if a == gen);
            let held = (state == ConnectorState::Request as u32 || state == ConnectorState::Closed as u32)
                && to.peer < g.peers
                && !finished;
            if !held {
                // Addressed to nobody, so no listener mistakes it for one of its channels.
                dir.region.store_u32(d + off::C_PEER, NOBODY, Ordering::Relaxed)?;
            }
            dir.region.store_u64(
                d + off::C_WORD,
                pack(gen, ConnectorState::Closed as u8),
                Ordering::SeqCst,
            )?;
            slots.push(if held {
                SlotUse::Draining { gen, to, epoch: dir.peer(to.peer)?.epoch }
            } else {
                SlotUse::Free { gen: gen.wrapping_add(1) }
            });
        }
        let vectors = vec![0; slots.len()];
        Ok(Self { me, listeners: vec![None; g.listeners_per_peer as usize], listener_gens, slots, vectors })
    }

    /// Our peer id.
    pub fn me(&self) -> u32 {
        self.me
    }

    /// Publishes a listener named `name`. Fails with [`DirError::NameInUse`] if a live peer
    /// (or we) already listen on it. Two peers binding one name at the same moment may both
    /// fail; neither ever succeeds alongside the other.
    /// `alive` says which peers' names count.
    pub fn bind(
        &mut self,
        dir: &Directory<'_>,
        name: &str,
        alive: &dyn Fn(u32) -> bool,
    ) -> Result<ListenerRef, DirError> {
        check_name(name)?;
        if self.listeners.iter().flatten().any(|(_, n)| n == name) || dir.lookup(name, alive, None)?.is_some()
        {
            return Err(DirError::NameInUse);
        }
        let index =
            self.listeners.iter().position(Option::is_none).ok_or(DirError::Full("listener entries"))?;
        let i = index as u32;
        let gen = self.listener_gens[index].wrapping_add(1);
        self.listener_gens[index] = gen;
        dir.publish_listener(self.me, i, gen, Some(name))?;
        fence(Ordering::SeqCst);
        // Both binders publish before they look again, so at least one sees the other.
        if dir.lookup(name, alive, Some((self.me, i)))?.is_some() {
            dir.publish_listener(self.me, i, gen, None)?;
            return Err(DirError::NameInUse);
        }
        self.listeners[index] = Some((gen, name.to_owned()));
        Ok(ListenerRef { peer: self.me, index: i, gen })
    }

    /// Withdraws a listener.
    pub fn unbind(&mut self, dir: &Directory<'_>, l: ListenerRef) -> Result<(), DirError> {
        let Some(entry) = self.listeners.get_mut(l.index as usize) else { return Ok(()) };
        if entry.as_ref().map(|(g, _)| *g) == Some(l.gen) {
            *entry = None;
            dir.publish_listener(self.me, l.index, l.gen, None)?;
        }
        Ok(())
    }

    /// Whether `r` addresses a listener we currently have, in the generation it names, and
    /// our current epoch.
    pub fn addresses_us(&self, r: &Request, epoch: u64) -> bool {
        r.epoch == epoch
            && self.listeners.get(r.index as usize).and_then(|e| e.as_ref()).map(|(g, _)| *g) == Some(r.lgen)
    }

    /// Takes a free slot and publishes a request to `to` (whose peer epoch is `epoch`), after
    /// writing a fresh channel header into the slot. Slots whose listener has not finished
    /// with them are reused only once it answers `Closed`/`Refused` or its epoch changes.
    pub fn request(
        &mut self,
        dir: &Directory<'_>,
        to: ListenerRef,
        epoch: u64,
        gone: &dyn Fn(u32, u64) -> bool,
    ) -> Result<(u32, u32), DirError> {
        self.request_with_vector(dir, to, epoch, 0, gone)
    }

    /// [`Owned::request`], telling the listener to ring us on interrupt `vector` for this
    /// channel (0: the agent's shared vector).
    pub fn request_with_vector(
        &mut self,
        dir: &Directory<'_>,
        to: ListenerRef,
        epoch: u64,
        vector: u32,
        gone: &dyn Fn(u32, u64) -> bool,
    ) -> Result<(u32, u32), DirError> {
        dir.check_peer(to.peer)?;
        self.reclaim(dir, gone)?;
        let i = self
            .slots
            .iter()
            .position(|s| matches!(s, SlotUse::Free { .. }))
            .ok_or(DirError::Full("channel slots"))?;
        let SlotUse::Free { gen } = self.slots[i] else { unreachable!() };
        let g = dir.geom;
        let slot = self.me * g.slots_per_peer + i as u32;
        let (o, len) = g.slot_range(slot);
        let d = g.desc(slot);
        let r = dir.region;
        // The word keeps the previous generation (closed, and let go by its listener) until
        // the new request is complete: a listener never sees the new generation half-made,
        // nor the new generation as closed.
        r.zero(o, layout::HEADER_SIZE)?;
        init_slot_header(r, o, len, g.slot_capacity)?;
        r.store_u32(d + off::C_PEER, to.peer, Ordering::Relaxed)?;
        r.store_u32(d + off::C_INDEX, to.index, Ordering::Relaxed)?;
        r.store_u32(d + off::C_LGEN, to.gen, Ordering::Relaxed)?;
        r.store_u32(d + off::C_FLAGS, 0, Ordering::Relaxed)?;
        r.store_u64(d + off::C_EPOCH, epoch, Ordering::Relaxed)?;
        r.store_u32(d + off::C_VECTOR, vector, Ordering::Relaxed)?;
        r.store_u64(d + off::C_WORD, pack(gen, ConnectorState::Request as u8), Ordering::SeqCst)?;
        self.slots[i] = SlotUse::Busy { gen, to, epoch };
        self.vectors[i] = vector;
        Ok((slot, gen))
    }

    /// Ends our use of `slot` generation `gen` (closed, refused or given up): publishes
    /// `Closed`; the slot becomes free once the listener has finished too.
    pub fn release(
        &mut self,
        dir: &Directory<'_>,
        slot: u32,
        gen: u32,
        gone: &dyn Fn(u32, u64) -> bool,
    ) -> Result<(), DirError> {
        let Some(i) = slot.checked_sub(self.me * dir.geom.slots_per_peer) else { return Ok(()) };
        let Some(s) = self.slots.get_mut(i as usize) else { return Ok(()) };
        if let SlotUse::Busy { gen: g, to, epoch } = *s {
            if g == gen {
                dir.region.store_u64(
                    dir.geom.desc(slot) + off::C_WORD,
                    pack(gen, ConnectorState::Closed as u8),
                    Ordering::SeqCst,
                )?;
                *s = SlotUse::Draining { gen, to, epoch };
            }
        }
        self.reclaim(dir, gone)
    }

    /// Frees draining slots whose listener has finished with them or whose listener peer
    /// `gone(peer, epoch)` says has left (or rejoined) since the request was made in `epoch`.
    pub fn reclaim(&mut self, dir: &Directory<'_>, gone: &dyn Fn(u32, u64) -> bool) -> Result<(), DirError> {
        let base = self.me * dir.geom.slots_per_peer;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let SlotUse::Draining { gen, to, epoch } = *s else { continue };
            let done = matches!(dir.answer(base + i as u32)?, Some((g, ListenerAnswer::Closed | ListenerAnswer::Refused)) if g == gen);
            if done || gone(to.peer, epoch) {
                *s = SlotUse::Free { gen: gen.wrapping_add(1) };
            }
        }
        Ok(())
    }

    /// Writes again whatever of ours in the region differs from what we know it to be (a
    /// hostile member may have overwritten it): listener entries and slot descriptors. Cheap
    /// when nothing changed (reads only), so an agent calls it periodically.
    pub fn republish(&self, dir: &Directory<'_>) -> Result<(), DirError> {
        let g = dir.geom;
        let r = dir.region;
        for (i, entry) in self.listeners.iter().enumerate() {
            let index = i as u32;
            let e = g.listener_entry(self.me, index);
            let gen = self.listener_gens[i];
            let ok = match entry {
                Some((lgen, name)) => dir.listener(self.me, index)? == Some((*lgen, name.clone())),
                None => {
                    r.load_u64(e + off::L_WORD, Ordering::Acquire)? == pack(gen, ListenerState::Free as u8)
                }
            };
            if !ok {
                match entry {
                    Some((lgen, name)) => dir.publish_listener(self.me, index, *lgen, Some(name))?,
                    None => dir.publish_listener(self.me, index, gen, None)?,
                }
            }
        }
        for (i, s) in self.slots.iter().enumerate() {
            let slot = self.me * g.slots_per_peer + i as u32;
            let d = g.desc(slot);
            let (word, to, epoch) = match *s {
                SlotUse::Busy { gen, to, epoch } => {
                    (pack(gen, ConnectorState::Request as u8), Some(to), epoch)
                }
                SlotUse::Draining { gen, to, epoch } => {
                    (pack(gen, ConnectorState::Closed as u8), Some(to), epoch)
                }
                SlotUse::Free { gen } => (pack(gen.wrapping_sub(1), ConnectorState::Closed as u8), None, 0),
            };
            let fields_ok = match to {
                Some(t) => {
                    r.load_u32(d + off::C_PEER, Ordering::Acquire)? == t.peer
                        && r.load_u32(d + off::C_INDEX, Ordering::Acquire)? == t.index
                        && r.load_u32(d + off::C_LGEN, Ordering::Acquire)? == t.gen
                        && r.load_u32(d + off::C_FLAGS, Ordering::Acquire)? == 0
                        && r.load_u64(d + off::C_EPOCH, Ordering::Acquire)? == epoch
                        && r.load_u32(d + off::C_VECTOR, Ordering::Acquire)? == self.vectors[i]
                }
                None => r.load_u32(d + off::C_PEER, Ordering::Acquire)? == NOBODY,
            };
            if fields_ok && r.load_u64(d + off::C_WORD, Ordering::Acquire)? == word {
                continue;
            }
            match to {
                Some(t) => {
                    r.store_u32(d + off::C_PEER, t.peer, Ordering::Relaxed)?;
                    r.store_u32(d + off::C_INDEX, t.index, Ordering::Relaxed)?;
                    r.store_u32(d + off::C_LGEN, t.gen, Ordering::Relaxed)?;
                    r.store_u32(d + off::C_FLAGS, 0, Ordering::Relaxed)?;
                    r.store_u64(d + off::C_EPOCH, epoch, Ordering::Relaxed)?;
                    r.store_u32(d + off::C_VECTOR, self.vectors[i], Ordering::Relaxed)?;
                }
                None => r.store_u32(d + off::C_PEER, NOBODY, Ordering::Relaxed)?,
            }
            r.store_u64(d + off::C_WORD, word, Ordering::SeqCst)?;
        }
        Ok(())
    }

    /// Slots in use, draining or free: `(busy, draining, free)`.
    pub fn slot_counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for s in &self.slots {
            match s {
                SlotUse::Busy { .. } => c.0 += 1,
                SlotUse::Draining { .. } => c.1 += 1,
                SlotUse::Free { .. } => c.2 += 1,
            }
        }
        c
    }
}

/// Writes a v1 channel header for a stream channel with `capacity` per direction into the
/// slot of `len` bytes at `o`.
fn init_slot_header(r: &ShmRegion, o: usize, len: usize, capacity: u64) -> Result<(), DirError> {
    let params = Params { capacity: [capacity; 2], max_message: None };
    layout::init(&*r.sub(o, len)?, &params)?;
    Ok(())
}
