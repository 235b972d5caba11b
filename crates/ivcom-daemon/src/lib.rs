//! The host side of ivcom for VMs: a daemon that speaks QEMU's ivshmem-server protocol and
//! decides, from a configuration file, which guests (and host processes) share which region.
//!
//! - [`config`]: the TOML configuration: groups (one region for all members) and pair sets
//!   (one region per unordered pair of members).
//! - [`Daemon`]: creates every region's memory (a sealed memfd, or a `/dev/shm` file for
//!   ivshmem-plain), binds one socket per (region, member) at
//!   `<socket_dir>/<region>/<member>.sock`, and serves the protocol on one epoll loop.
//! - [`RegionHooks`]: callbacks for code that manages the regions' contents;
//!   [`DirectoryHooks`] formats ivcom's directory in each region and keeps its peer table.
//! - [`qemu_args`]: the QEMU options that attach a member to its region.
//!
//! The protocol served, the socket layout and the behaviour on restart are described in
//! `docs/daemon.md`.

pub mod config;
mod directory;
mod hooks;
mod qemu;
mod server;

pub use config::{Config, ConfigError, RegionConfig, RegionKind};
pub use directory::{spec_for, DirectoryHooks};
pub use hooks::{RegionHooks, RegionView, RingError};
pub use qemu::{qemu_args, shell_line, QemuArgsError};
pub use server::{Daemon, DaemonError, DaemonOptions, StopHandle};
