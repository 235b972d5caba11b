//! What the daemon tells other code about its regions: [`RegionHooks`], called with a
//! [`RegionView`] of the region concerned.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use ivcom_ring::ShmRegion;

use crate::server::Region;

/// Callbacks from the daemon's serving loop. Every method has a no-op default. They run on the
/// daemon's thread, inside its loop: a slow hook delays every member of every region.
///
/// Order of events for one member:
/// - [`created`](RegionHooks::created): once per region, from [`Daemon::new`](crate::Daemon::new),
///   after the memory is created and mapped and before any member can have connected (the
///   daemon accepts connections only in [`Daemon::run`](crate::Daemon::run)).
/// - [`peer_joined`](RegionHooks::peer_joined): after the member's eventfds were created, its
///   setup messages (version, id, memory, the other peers, its own vectors) and the join
///   notices to the other connected members were sent or queued. The member counts as
///   connected ([`RegionView::is_connected`]); its vectors can be rung.
/// - [`peer_left`](RegionHooks::peer_left): after the daemon closed the member's socket and its
///   eventfds, and after the disconnect notice was sent or queued to every remaining member.
///   The member no longer counts as connected.
pub trait RegionHooks: Send {
    /// Once per region after its memory is created and mapped, before any member connects.
    fn created(&mut self, region: &RegionView<'_>) {
        let _ = region;
    }
    /// A member connected and was given peer id `peer`.
    fn peer_joined(&mut self, region: &RegionView<'_>, peer: u16) {
        let _ = (region, peer);
    }
    /// The member with peer id `peer` disconnected (or was disconnected).
    fn peer_left(&mut self, region: &RegionView<'_>, peer: u16) {
        let _ = (region, peer);
    }
}

/// Errors ringing a member from a hook.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The peer id is not a member of the region, or is not connected.
    #[error("region {region}: peer {peer} is not connected")]
    NotConnected {
        /// Region name.
        region: String,
        /// Peer id.
        peer: u16,
    },
    /// The region has fewer vectors.
    #[error("region {region}: no vector {vector} (the region has {vectors})")]
    NoSuchVector {
        /// Region name.
        region: String,
        /// Vector asked for.
        vector: u16,
        /// Vectors per member.
        vectors: u16,
    },
    /// Plain regions have no doorbells.
    #[error("region {region} is plain: it has no doorbells")]
    Plain {
        /// Region name.
        region: String,
    },
    /// Writing the eventfd failed.
    #[error("region {region}: ringing peer {peer}: {source}")]
    Io {
        /// Region name.
        region: String,
        /// Peer id.
        peer: u16,
        /// Cause.
        source: io::Error,
    },
}

/// A region as the daemon holds it, lent to a hook for the duration of the call.
pub struct RegionView<'a> {
    pub(crate) region: &'a Region,
}

impl RegionView<'_> {
    /// The region's name.
    pub fn name(&self) -> &str {
        &self.region.cfg.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.cfg.size
    }

    /// Interrupt vectors per member.
    pub fn vectors(&self) -> u16 {
        self.region.cfg.vectors
    }

    /// The configured ring capacity of the region's channels, if any (`ring` in the file).
    pub fn ring_capacity(&self) -> Option<u64> {
        self.region.cfg.ring
    }

    /// Whether the region is a plain `/dev/shm` file (no doorbells, no sockets).
    pub fn is_plain(&self) -> bool {
        self.region.cfg.plain
    }

    /// The daemon's mapping of the whole region, through `ivcom-ring`'s bounds-checked door
    /// (copies and atomics only, never references).
    ///
    /// Contract for the raw pointer ([`ShmRegion::as_ptr`]) and for any `ShmRegion` built from
    /// it: the mapping stays valid until the [`Daemon`](crate::Daemon) is dropped; the daemon
    /// drops its hooks before it unmaps, so a hook may keep the pointer for as long as it
    /// lives. Every guest and host member may write any byte at any time: treat all contents
    /// as hostile and changing.
    pub fn memory(&self) -> &ShmRegion {
        self.region.memory.region()
    }

    /// The region's memory descriptor (a sealed memfd, or the plain region's file).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.memory.fd().as_fd()
    }

    /// Members and their peer ids, in id order.
    pub fn members(&self) -> impl Iterator<Item = (u16, &str)> + '_ {
        self.region.cfg.members.iter().enumerate().map(|(i, m)| (i as u16, m.as_str()))
    }

    /// The member name of `peer`.
    pub fn member(&self, peer: u16) -> Option<&str> {
        self.region.cfg.members.get(usize::from(peer)).map(String::as_str)
    }

    /// The ivshmem peer id of member `peer`'s current connection (QEMU's IVPosition and
    /// doorbell address): `peer` the first time, `peer + members` after a reconnect, and so on.
    pub fn ivshmem_id(&self, peer: u16) -> Option<u16> {
        self.region.members.get(usize::from(peer)).and_then(|m| m.conn.as_ref()).map(|c| c.id)
    }

    /// Whether `peer` is connected now.
    pub fn is_connected(&self, peer: u16) -> bool {
        self.region.members.get(usize::from(peer)).is_some_and(|m| m.conn.is_some())
    }

    /// Rings a connected member: writes 1 to its eventfd for `vector`, as a peer's doorbell
    /// write would. A guest sees an MSI-X interrupt on that vector.
    pub fn ring(&self, peer: u16, vector: u16) -> Result<(), RingError> {
        let region = || self.name().to_owned();
        if self.is_plain() {
            return Err(RingError::Plain { region: region() });
        }
        let conn = self
            .region
            .members
            .get(usize::from(peer))
            .and_then(|m| m.conn.as_ref())
            .ok_or_else(|| RingError::NotConnected { region: region(), peer })?;
        let fd = conn.vectors.get(usize::from(vector)).ok_or_else(|| RingError::NoSuchVector {
            region: region(),
            vector,
            vectors: self.vectors(),
        })?;
        ivcom_ivshmem::client::write_eventfd(fd.as_fd()).map_err(|source| RingError::Io {
            region: region(),
            peer,
            source,
        })
    }
}
