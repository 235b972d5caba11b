//! The two real kinds of member: a host process that joined through the daemon (the
//! ivshmem-server protocol, as QEMU does), and a guest that owns an ivshmem PCI device.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use ivcom_ivshmem::client::{Client, ClientError};
use ivcom_ivshmem::guest::{Access, Device, DeviceInfo};
use ivcom_ring::ShmRegion;

use super::port::{DoorbellShare, Port};
use crate::sys::{self, Mapping};

fn client_err(e: ClientError) -> io::Error {
    io::Error::other(e.to_string())
}

/// A host process that is a member of a region through the daemon's socket for it.
#[derive(Debug)]
pub struct DaemonMember {
    client: Client,
    map: Mapping,
}

impl DaemonMember {
    /// Connects to the daemon's socket for one (region, member), as QEMU would.
    pub fn join(socket: &Path, timeout: Duration) -> io::Result<Self> {
        let client = Client::connect(socket, timeout).map_err(|e| {
            io::Error::new(io::ErrorKind::ConnectionRefused, format!("cannot join {}: {e}", socket.display()))
        })?;
        if client.vectors().is_empty() {
            return Err(io::Error::other("the daemon gave us no interrupt vector"));
        }
        let len = usize::try_from(client.shm_size()?).map_err(|_| io::Error::other("region too large"))?;
        let map = Mapping::map(client.shm(), 0, len)?;
        for fd in client.vectors() {
            sys::check_eventfd(fd.as_fd())?;
        }
        Ok(Self { client, map })
    }
}

impl Port for DaemonMember {
    fn me(&self) -> u32 {
        self.client.id().into()
    }
    fn region(&self) -> &ShmRegion {
        self.map.region()
    }
    fn share_memory(&self) -> (BorrowedFd<'_>, u64) {
        (self.client.shm(), 0)
    }
    fn ring(&self, peer: u32) {
        if let Ok(p) = u16::try_from(peer) {
            let _ = self.client.ring(p, 0);
        }
    }
    fn share_doorbell(&self, peer: u32, vector: u16) -> Option<DoorbellShare<'_>> {
        let p = u16::try_from(peer).ok()?;
        let fds = if p == self.client.id() { self.client.vectors() } else { self.client.peers().get(&p)? };
        fds.get(usize::from(vector)).or(fds.first()).map(|fd| DoorbellShare::EventFd(fd.as_fd()))
    }
    fn vectors(&self) -> u16 {
        u16::try_from(self.client.vectors().len()).unwrap_or(u16::MAX)
    }
    fn vector_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.client.vectors().get(usize::from(vector)).map(|fd| fd.as_fd())
    }
    fn events_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.client.as_fd())
    }
    fn on_events(&mut self) -> io::Result<()> {
        // The client keeps the peers' eventfds current itself; the directory's peer table
        // tells the agent who is there.
        self.client.poll_events().map(drop).map_err(|e| match e {
            ClientError::Closed => {
                io::Error::new(io::ErrorKind::ConnectionAborted, "the daemon closed our membership")
            }
            e => client_err(e),
        })
    }
}

/// A guest's ivshmem device.
#[derive(Debug)]
pub struct GuestDevice {
    dev: Device,
    region: ShmRegion,
    me: u32,
}

impl GuestDevice {
    /// Opens the device: through VFIO when `vfio` and possible (doorbells wake us), else
    /// through sysfs (we poll). `peer_id` overrides the device's IVPosition, which reads 0 on
    /// ivshmem-plain devices.
    pub fn open(info: &DeviceInfo, vfio: Option<bool>, peer_id: Option<u32>) -> io::Result<Self> {
        let dev = match vfio {
            None => Device::open_best(info)?,
            Some(true) => Device::open(info, Access::Vfio)?,
            Some(false) => Device::open(info, Access::Sysfs)?,
        };
        let (ptr, len) = dev.memory();
        if !(ptr as usize).is_multiple_of(8) {
            return Err(io::Error::other("BAR2 mapping is not aligned"));
        }
        // SAFETY: `ptr..ptr + len` is the device's BAR2 mapping, valid until `dev` is dropped;
        // `dev` lives in the same struct and is dropped after every use of `region` (the
        // struct hands out borrows only). The mapping is page-aligned, and nothing creates
        // references into it.
        let region = unsafe { ShmRegion::new(ptr, len) };
        let me = peer_id.unwrap_or_else(|| dev.peer_id().into());
        Ok(Self { dev, region, me })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }
}

impl Port for GuestDevice {
    fn me(&self) -> u32 {
        self.me
    }
    fn region(&self) -> &ShmRegion {
        &self.region
    }
    fn share_memory(&self) -> (BorrowedFd<'_>, u64) {
        let s = self.dev.share();
        (s.memory_fd, s.memory_offset)
    }
    fn ring(&self, peer: u32) {
        if let Ok(p) = u16::try_from(peer) {
            let _ = self.dev.ring(p, 0);
        }
    }
    fn share_doorbell(&self, peer: u32, vector: u16) -> Option<DoorbellShare<'_>> {
        if !self.dev.info().doorbell {
            return Some(DoorbellShare::Nothing);
        }
        let p = u16::try_from(peer).ok()?;
        let s = self.dev.share();
        let value = u32::from(p) << 16 | u32::from(vector);
        Some(if s.doorbell_is_mmap {
            let page = rustix::param::page_size() as u64;
            let map_offset = s.doorbell_offset & !(page - 1);
            DoorbellShare::Mmio {
                fd: s.doorbell_fd,
                map_offset,
                map_len: page as usize,
                reg: (s.doorbell_offset - map_offset) as usize,
                value,
            }
        } else {
            DoorbellShare::Pwrite { fd: s.doorbell_fd, offset: s.doorbell_offset, value }
        })
    }
    fn vectors(&self) -> u16 {
        self.dev.vectors()
    }
    fn vector_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.dev.vector_fd(vector)
    }
}
