//! What an agent needs from its membership of a shared region: the memory, its own peer id,
//! a way to ring each peer, and something to wait on for its own doorbells. A guest gets these
//! from its ivshmem device; a host process from the daemon (as QEMU does).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ivcom_ring::ShmRegion;

use crate::sys::{self, Mapping};

/// How a local process rings a peer by itself (the agent hands it these descriptors).
#[derive(Debug, Clone, Copy)]
pub enum DoorbellShare<'a> {
    /// Add one to this eventfd (a host peer ringing anyone: each vector is an eventfd).
    EventFd(BorrowedFd<'a>),
    /// Write the 32-bit little-endian `value` at `offset` of `fd` (a VFIO device region).
    Pwrite {
        /// The device file.
        fd: BorrowedFd<'a>,
        /// Offset of the doorbell register in it.
        offset: u64,
        /// The value to write: `peer << 16 | vector`.
        value: u32,
    },
    /// Map `map_len` bytes of `fd` at `map_offset` and store `value` at `reg` in the mapping
    /// (a sysfs `resource0` register page).
    Mmio {
        /// The register file.
        fd: BorrowedFd<'a>,
        /// Offset to map from (page-aligned).
        map_offset: u64,
        /// Bytes to map.
        map_len: usize,
        /// Offset of the doorbell register in the mapping.
        reg: usize,
        /// The value to store: `peer << 16 | vector`.
        value: u32,
    },
    /// Nothing to ring (ivshmem-plain): the peer's agent polls.
    Nothing,
}

/// One member's view of a shared region.
pub trait Port: Send {
    /// Our peer id.
    fn me(&self) -> u32;
    /// The whole region, mapped in this process.
    fn region(&self) -> &ShmRegion;
    /// A descriptor and base offset through which another local process maps the region
    /// (`mmap(fd, base + offset_in_region)`).
    fn share_memory(&self) -> (BorrowedFd<'_>, u64);
    /// Rings `peer`'s doorbell. Unknown or departed peers are ignored.
    fn ring(&self, peer: u32);
    /// How a local process rings `peer` on the peer's interrupt `vector` itself; `None` if
    /// the peer has no doorbell now. A port that cannot address that vector rings vector 0
    /// (the peer's agent then wakes the process).
    fn share_doorbell(&self, peer: u32, vector: u16) -> Option<DoorbellShare<'_>>;
    /// How many interrupt vectors we receive doorbells on (each readable through
    /// [`Port::vector_fd`]); 0 if doorbells cannot be received and the agent must poll.
    fn vectors(&self) -> u16;
    /// Readable when our doorbell `vector` rang.
    fn vector_fd(&self, vector: u16) -> Option<BorrowedFd<'_>>;
    /// Readable when our shared doorbell (vector 0) rang; `None` if the agent must poll.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.vector_fd(0)
    }
    /// Clears the doorbell readiness after a wakeup.
    fn drain_wake(&self) {
        if let Some(fd) = self.wake_fd() {
            sys::drain(fd);
        }
    }
    /// Readable when the membership changed (peers joined or left); `None` if nothing tells.
    fn events_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Takes in membership changes after `events_fd` turned readable. An error means the
    /// membership itself is gone (the daemon closed our connection).
    fn on_events(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A member that holds the region as a file and every peer's doorbells as eventfds: a host
/// process that joined through the daemon, or two members made by hand in tests.
#[derive(Debug)]
pub struct HostPort {
    me: u32,
    memory: OwnedFd,
    map: Mapping,
    own: OwnedFd,
    peers: HashMap<u32, OwnedFd>,
}

impl HostPort {
    /// A member `me` of the region in `memory` (a file of `len` bytes), woken through `own`
    /// (our vector-0 eventfd) and ringing peer `p` through `peers[p]` (its vector-0 eventfd).
    pub fn new(
        memory: OwnedFd,
        len: usize,
        me: u32,
        own: OwnedFd,
        peers: HashMap<u32, OwnedFd>,
    ) -> io::Result<Self> {
        sys::check_eventfd(own.as_fd())?;
        for fd in peers.values() {
            sys::check_eventfd(fd.as_fd())?;
        }
        let map = Mapping::map(memory.as_fd(), 0, len)?;
        Ok(Self { me, memory, map, own, peers })
    }

    /// Records that `peer` (re)joined with a new doorbell, or left (`None`).
    pub fn set_peer(&mut self, peer: u32, doorbell: Option<OwnedFd>) -> io::Result<()> {
        match doorbell {
            Some(fd) => {
                sys::check_eventfd(fd.as_fd())?;
                self.peers.insert(peer, fd);
            }
            None => {
                self.peers.remove(&peer);
            }
        }
        Ok(())
    }
}

impl Port for HostPort {
    fn me(&self) -> u32 {
        self.me
    }
    fn region(&self) -> &ShmRegion {
        self.map.region()
    }
    fn share_memory(&self) -> (BorrowedFd<'_>, u64) {
        (self.memory.as_fd(), 0)
    }
    fn ring(&self, peer: u32) {
        if peer == self.me {
            sys::signal(self.own.as_fd());
        } else if let Some(fd) = self.peers.get(&peer) {
            sys::signal(fd.as_fd());
        }
    }
    fn share_doorbell(&self, peer: u32, _vector: u16) -> Option<DoorbellShare<'_>> {
        if peer == self.me {
            return Some(DoorbellShare::EventFd(self.own.as_fd()));
        }
        self.peers.get(&peer).map(|fd| DoorbellShare::EventFd(fd.as_fd()))
    }
    fn vectors(&self) -> u16 {
        1
    }
    fn vector_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        (vector == 0).then(|| self.own.as_fd())
    }
}
