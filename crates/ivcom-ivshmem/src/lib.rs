//! QEMU's ivshmem device, from both sides of it.
//!
//! - [`protocol`]: the ivshmem-server wire protocol (QEMU `docs/specs/ivshmem-spec.rst`),
//!   the messages a server sends and a client receives.
//! - [`client`]: a client of that protocol, as QEMU is one; a host process joins a region
//!   through it.
//! - [`guest`]: inside a guest: finding ivshmem PCI devices, mapping BAR2, the doorbell
//!   registers, and receiving doorbells through VFIO (MSI-X to an eventfd) or by polling.

pub mod client;
pub mod guest;
pub mod protocol;
