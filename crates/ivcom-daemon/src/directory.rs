//! The daemon's part in ivcom's region format (`docs/vm-region-layout.md`): it formats each
//! region's directory before any member can map it, and keeps the peer table: each join and
//! departure moves that peer's epoch on and rings every connected member, whose agents then
//! notice in bounded time (a guest cannot see QEMU's disconnect notices; this is how it
//! learns that a peer powered off).

use std::collections::HashMap;

use ivcom_ring::directory::{self, Directory, Geometry, PeerState, Spec};

use crate::hooks::{RegionHooks, RegionView};

/// Listener entries per member.
pub const LISTENERS_PER_PEER: u32 = 16;
/// Channel slots each member should get at least, where the region is large enough; the
/// ring capacity of a slot is chosen to fit them.
const TARGET_SLOTS: usize = 8;
const MIN_SLOT_CAPACITY: u64 = 16 * 1024;
const MAX_SLOT_CAPACITY: u64 = 1 << 20;

/// The directory layout for a region of `size` bytes shared by `peers` members: rings of
/// `ring` bytes per direction if given, else as large as lets each member have 8 channels
/// (16 KiB to 1 MiB).
pub fn spec_for(size: u64, peers: u32, managed: bool, ring: Option<u64>) -> Spec {
    let per_ring = size / (u64::from(peers.max(1)) * TARGET_SLOTS as u64 * 2 + 2);
    let cap = if per_ring.is_power_of_two() { per_ring } else { per_ring.next_power_of_two() / 2 };
    let slot_capacity = ring.unwrap_or_else(|| cap.clamp(MIN_SLOT_CAPACITY, MAX_SLOT_CAPACITY));
    Spec { peers, listeners_per_peer: LISTENERS_PER_PEER, slot_capacity, managed }
}

/// [`RegionHooks`] that format ivcom directories and keep their peer tables.
#[derive(Debug, Default)]
pub struct DirectoryHooks {
    /// Per region: its geometry, and each peer's epoch as we last published it (our own
    /// record; the region's copy may have been overwritten by a hostile member).
    regions: HashMap<String, (Geometry, Vec<u64>)>,
}

impl DirectoryHooks {
    /// New hooks.
    pub fn new() -> Self {
        Self::default()
    }

    fn publish(&mut self, region: &RegionView<'_>, peer: u16, alive: bool) {
        let Some((geom, epochs)) = self.regions.get_mut(region.name()) else { return };
        let Ok(dir) = Directory::new(region.memory(), *geom) else { return };
        let Some(e) = epochs.get_mut(usize::from(peer)) else { return };
        *e += 1;
        if let Some(id) = region.ivshmem_id(peer) {
            let _ = dir.set_ivshmem_id(peer.into(), id);
        }
        if let Err(err) = dir.set_peer(peer.into(), PeerState { epoch: *e, alive }) {
            tracing::warn!(region = region.name(), peer, "cannot update the peer table: {err}");
        }
        // Wake every connected member (the one that joined too) so its agent looks.
        let members: Vec<u16> = region.members().map(|(id, _)| id).collect();
        for id in members {
            if region.is_connected(id) {
                let _ = region.ring(id, 0);
            }
        }
    }
}

impl RegionHooks for DirectoryHooks {
    fn created(&mut self, region: &RegionView<'_>) {
        let peers = region.members().count() as u32;
        let spec = spec_for(region.size(), peers, !region.is_plain(), region.ring_capacity());
        let mem = region.memory();
        // A plain region's file may outlive us, with guests still using it: keep a directory
        // that is already there and has the shape we would give it.
        let planned = Geometry::plan(mem.len(), &spec);
        if region.is_plain() {
            if let (Ok(g), Ok(p)) = (directory::attach(mem), &planned) {
                if g == *p {
                    tracing::info!(
                        region = region.name(),
                        "keeping the existing directory of the plain region"
                    );
                    self.regions.insert(region.name().to_owned(), (g, vec![0; peers as usize]));
                    return;
                }
            }
        }
        match directory::format(mem, &spec) {
            Ok(g) => {
                tracing::info!(
                    region = region.name(),
                    slots_per_member = g.slots_per_peer,
                    ring_kib = g.slot_capacity / 1024,
                    "directory formatted"
                );
                self.regions.insert(region.name().to_owned(), (g, vec![0; peers as usize]));
            }
            Err(e) => tracing::error!(region = region.name(), "cannot format the region's directory: {e}"),
        }
    }

    fn peer_joined(&mut self, region: &RegionView<'_>, peer: u16) {
        self.publish(region, peer, true);
    }

    fn peer_left(&mut self, region: &RegionView<'_>, peer: u16) {
        self.publish(region, peer, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_fit_their_regions() {
        for size in [1u64 << 20, 4 << 20, 16 << 20, 256 << 20] {
            for peers in [1, 2, 3, 8, 64] {
                let spec = spec_for(size, peers, true, None);
                match Geometry::plan(size as usize, &spec) {
                    Ok(g) => assert!(g.slots_per_peer >= 1),
                    // Tiny regions for many peers cannot hold a slot each: a clear error.
                    Err(e) => assert!(size <= 4 << 20 && peers >= 8, "{size} {peers}: {e}"),
                }
            }
        }
        assert_eq!(spec_for(16 << 20, 2, true, None).slot_capacity, 256 * 1024);
        assert_eq!(spec_for(64 << 20, 3, true, Some(1 << 20)).slot_capacity, 1 << 20);
    }
}
