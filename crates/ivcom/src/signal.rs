//! How one side wakes the other: an eventfd (same kernel; a host process waking a guest,
//! whose ivshmem vector is an eventfd), or an ivshmem doorbell register (a guest waking a
//! peer: one write, one VM exit).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use crate::sys::{self, Mapping};

/// A way to wake the peer, held by one channel endpoint.
#[derive(Debug)]
pub(crate) enum Signal {
    /// Add one to an eventfd.
    EventFd(OwnedFd),
    /// Write a 32-bit `value` at `offset` of a device file (a VFIO region: the doorbell
    /// register of an ivshmem BAR0).
    Pwrite { fd: OwnedFd, offset: u64, value: u32 },
    /// Store `value` into a mapped register page at `reg`.
    Mmio { map: Mapping, reg: usize, value: u32 },
    /// Nothing to do: the peer polls (ivshmem-plain).
    Nothing,
}

impl Signal {
    /// Wakes the peer; `false` if there is nothing to do (the peer polls). Failures are not
    /// reported: a peer we cannot wake is one whose death the liveness channel reports.
    #[inline]
    pub(crate) fn raise(&self) -> bool {
        match self {
            Signal::EventFd(fd) => sys::signal(fd.as_fd()),
            Signal::Pwrite { fd, offset, value } => {
                let _ = rustix::io::pwrite(fd, &value.to_le_bytes(), *offset);
            }
            Signal::Mmio { map, reg, value } => {
                let _ = map.region().store_u32(*reg, *value, Ordering::SeqCst);
            }
            Signal::Nothing => return false,
        }
        true
    }

    /// Checks what a peer process handed us before we ever use it.
    pub(crate) fn check(&self) -> io::Result<()> {
        match self {
            Signal::EventFd(fd) => sys::check_eventfd(fd.as_fd()),
            Signal::Pwrite { .. } | Signal::Nothing => Ok(()),
            Signal::Mmio { map, reg, .. } => {
                if reg.checked_add(4).is_some_and(|e| e <= map.region().len()) && reg.is_multiple_of(4) {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::InvalidData, "doorbell register outside its mapping"))
                }
            }
        }
    }
}
