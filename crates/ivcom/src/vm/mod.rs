//! Channels between members of a region shared by VMs and host processes (an ivshmem
//! region): the directory in the region is kept by one agent per member, local processes ask
//! their agent for channels and then move data directly.
//!
//! - [`Port`]: what a member has (memory, peer id, doorbells); [`HostPort`] for host
//!   processes, the guest device in `ivcom-ivshmem` for guests.
//! - [`Agent`]: serves local processes of one member.
//! - [`wire`]: the local protocol between a process and its agent (its packets, encoded and
//!   decoded; also what the fuzz target `agent_wire` feeds).
//! - [`crate::Listener`] and [`crate::Stream`] use the agent when
//!   [`crate::Options::agent`] (or `IVCOM_AGENT`) names its socket.

mod agent;
mod ivshmem;
pub(crate) mod local;
mod port;
pub mod wire;

pub use agent::{Agent, AgentConfig};
pub use ivshmem::{DaemonMember, GuestDevice};
pub use port::{DoorbellShare, HostPort, Port};

use std::io;
use std::os::fd::BorrowedFd;

use ivcom_ring::directory::{self, Geometry, Spec};

/// Writes a fresh, empty directory for `spec` into the first `len` bytes of the file `fd`
/// (a memfd or a `/dev/shm` file that backs an ivshmem region), before any member maps it.
pub fn format_region(fd: BorrowedFd<'_>, len: usize, spec: &Spec) -> io::Result<Geometry> {
    let map = crate::sys::Mapping::map(fd, 0, len)?;
    directory::format(map.region(), spec)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// Records `peer`'s state in the region's peer table, as the daemon does when members join
/// and leave.
pub fn set_peer_state(fd: BorrowedFd<'_>, len: usize, peer: u32, epoch: u64, alive: bool) -> io::Result<()> {
    let map = crate::sys::Mapping::map(fd, 0, len)?;
    let geom = directory::attach(map.region())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let dir = directory::Directory::new(map.region(), geom).map_err(|e| io::Error::other(e.to_string()))?;
    dir.set_peer(peer, directory::PeerState { epoch, alive }).map_err(|e| io::Error::other(e.to_string()))
}
