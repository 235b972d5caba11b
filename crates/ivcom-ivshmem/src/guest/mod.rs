//! Inside a Linux guest: finding QEMU ivshmem PCI devices and using them.
//!
//! An ivshmem device (PCI `1af4:1110`, QEMU `docs/specs/ivshmem-spec.rst`) has
//! - BAR0: 256 bytes of registers: IntrMask (0), IntrStatus (4), IVPosition (8, our peer id),
//!   Doorbell (12, write `(peer << 16) | vector` to interrupt a peer);
//! - BAR1: the MSI-X table, on `ivshmem-doorbell` only (that is how the two kinds differ);
//! - BAR2: the shared memory.
//!
//! Two ways in, both root-only:
//! - [`Access::Sysfs`]: `mmap` of `/sys/bus/pci/devices/BDF/resource2` (memory) and
//!   `resource0` (registers). Doorbells can be *sent*; none can be received (no interrupt
//!   reaches user space), so a receiver polls the shared memory.
//! - [`Access::Vfio`]: the device is bound to `vfio-pci` and owned through
//!   `/dev/vfio`. BAR2 is mapped through the device fd, Bus Master is switched on (without it
//!   no MSI-X message ever arrives), and each MSI-X vector is wired to an eventfd that becomes
//!   readable when a peer rings it ([`Device::vector_fd`], [`Device::wait`]). Needs an IOMMU
//!   in the guest (QEMU: `-machine q35 -device intel-iommu`, kernel `intel_iommu=on`) and the
//!   modules vfio, vfio_iommu_type1, vfio-pci. One process at a time can hold a VFIO group.
//!
//! The memory is peer-writable: [`Device::memory`] hands out a raw pointer, never a
//! reference; callers copy in and out and validate what they read.

mod vfio;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ivcom_ring::MappedRegion;
use rustix::event::{EventfdFlags, PollFd, PollFlags};

/// PCI vendor id of ivshmem (Red Hat / virtio).
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device id of ivshmem (both plain and doorbell).
pub const DEVICE_ID: u16 = 0x1110;

/// BAR0 register offsets (ivshmem-spec, "PCI device registers").
pub mod regs {
    /// Interrupt Mask (reserved on revision 1 devices).
    pub const INTR_MASK: u64 = 0;
    /// Interrupt Status (reserved on revision 1 devices).
    pub const INTR_STATUS: u64 = 4;
    /// IVPosition: this device's peer id (0 on a plain device).
    pub const IV_POSITION: u64 = 8;
    /// Doorbell: write `(peer_id << 16) | vector` to interrupt a peer.
    pub const DOORBELL: u64 = 12;
}

const SYSFS_PCI: &str = "/sys/bus/pci/devices";
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_CAP_ID_MSIX: u8 = 0x11;

/// What `find_devices` learns about one ivshmem device from sysfs, without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// PCI address, e.g. `0000:00:03.0`.
    pub bdf: String,
    /// `/sys/bus/pci/devices/<bdf>`.
    pub sysfs: PathBuf,
    /// Size of BAR0 (registers).
    pub bar0_size: u64,
    /// Size of BAR2 (shared memory).
    pub bar2_size: u64,
    /// True for `ivshmem-doorbell` (has an MSI-X capability and BAR1); false for `ivshmem-plain`.
    pub doorbell: bool,
    /// MSI-X table size (interrupt vectors), 0 on a plain device.
    pub msix_vectors: u16,
    /// The driver bound now (`vfio-pci`, `uio_pci_generic`, ...), if any.
    pub driver: Option<String>,
    /// IOMMU group number, if the guest has an IOMMU.
    pub iommu_group: Option<u32>,
}

/// Lists the ivshmem devices in `/sys/bus/pci/devices`, sorted by PCI address.
pub fn find_devices() -> io::Result<Vec<DeviceInfo>> {
    find_devices_in(Path::new(SYSFS_PCI))
}

/// [`find_devices`] under another sysfs directory (tests point it at a fake tree).
pub fn find_devices_in(dir: &Path) -> io::Result<Vec<DeviceInfo>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let id = |f: &str| fs::read_to_string(path.join(f)).ok().and_then(|s| parse_hex(&s));
        if id("vendor") != Some(u64::from(VENDOR_ID)) || id("device") != Some(u64::from(DEVICE_ID)) {
            continue;
        }
        out.push(describe(&path)?);
    }
    out.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(out)
}

fn describe(path: &Path) -> io::Result<DeviceInfo> {
    let bdf = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("odd sysfs entry name"))?
        .to_owned();
    let bars = parse_resource(&fs::read_to_string(path.join("resource"))?);
    let bar = |i: usize| bars.get(i).copied().unwrap_or(0);
    let msix = fs::read(path.join("config")).ok().and_then(|c| msix_table_size(&c));
    let link_name = |f: &str| {
        fs::read_link(path.join(f))
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
    };
    Ok(DeviceInfo {
        bdf,
        sysfs: path.to_path_buf(),
        bar0_size: bar(0),
        bar2_size: bar(2),
        doorbell: msix.is_some() || bar(1) > 0,
        msix_vectors: msix.unwrap_or(0),
        driver: link_name("driver"),
        iommu_group: link_name("iommu_group").and_then(|g| g.parse().ok()),
    })
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Sizes of the BARs from sysfs `resource` ("start end flags" per line, hex).
fn parse_resource(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace().map(parse_hex);
            match (f.next().flatten(), f.next().flatten()) {
                (Some(s), Some(e)) if e > s => e - s + 1,
                _ => 0,
            }
        })
        .collect()
}

/// Walks the PCI capability list in `config` for MSI-X; returns its table size.
/// The walk is bounded (48 capabilities at most) so a looping list cannot hang it.
fn msix_table_size(config: &[u8]) -> Option<u16> {
    let status = u16::from_le_bytes([*config.get(6)?, *config.get(7)?]);
    if status & 0x10 == 0 {
        return None;
    }
    let mut pos = usize::from(*config.get(0x34)? & 0xfc);
    for _ in 0..48 {
        if pos < 0x40 {
            return None;
        }
        let id = *config.get(pos)?;
        if id == PCI_CAP_ID_MSIX {
            let ctrl = u16::from_le_bytes([*config.get(pos + 2)?, *config.get(pos + 3)?]);
            return Some((ctrl & 0x7ff) + 1);
        }
        pos = usize::from(*config.get(pos + 1)? & 0xfc);
    }
    None
}

/// How a [`Device`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `mmap` of the sysfs `resource0`/`resource2` files: memory and sending doorbells,
    /// no receiving (poll the memory).
    Sysfs,
    /// Owned through VFIO (bound to vfio-pci): memory, sending, and receiving doorbells as
    /// eventfd wakeups.
    Vfio,
}

/// A shared read/write mapping of part of a file (a BAR). Unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    map: MappedRegion,
}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset` (a multiple of the page size) shared, read/write.
    /// This is how another process maps what [`Device::share`] handed it.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Mapping> {
        Ok(Mapping { map: MappedRegion::map(fd, offset, len)? })
    }

    /// Start and length of the mapping. The pointer is valid for `len` bytes while `self`
    /// lives; the memory may change at any time (another guest writes it).
    pub fn as_ptr(&self) -> (*mut u8, usize) {
        (self.map.region().as_ptr(), self.map.region().len())
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let (ptr, len) = self.as_ptr();
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(off % 4 == 0 && off.checked_add(4).is_some_and(|end| end <= len), "register out of range");
        // SAFETY: in bounds and 4-aligned (checked above; the mapping is page-aligned); MMIO
        // registers are read with one volatile 32-bit access.
        unsafe { ptr.add(off).cast::<u32>().read_volatile() }
    }

    fn write_u32(&self, offset: u64, value: u32) {
        let (ptr, len) = self.as_ptr();
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(off % 4 == 0 && off.checked_add(4).is_some_and(|end| end <= len), "register out of range");
        // SAFETY: in bounds and 4-aligned (checked above); one volatile 32-bit MMIO store.
        unsafe { ptr.add(off).cast::<u32>().write_volatile(value) }
    }
}

/// A way to ring doorbells: the BAR0 registers, mapped or reached by pread/pwrite on a fd.
/// [`Device`] has one; another process builds one from [`Shared`] with [`Doorbell::from_shared`].
#[derive(Debug)]
pub struct Doorbell {
    inner: Regs,
}

#[derive(Debug)]
enum Regs {
    /// BAR0 mapped; register offsets index the mapping at `base`.
    Mapped { map: Mapping, base: u64 },
    /// BAR0 reached with pread/pwrite at `base + register` on `file`.
    Io { file: File, base: u64 },
}

impl Doorbell {
    /// A doorbell over what another process received: `fd` (a dup, e.g. from SCM_RIGHTS),
    /// and `shared`'s `doorbell_offset`/`doorbell_is_mmap`.
    pub fn from_shared(fd: OwnedFd, doorbell_offset: u64, doorbell_is_mmap: bool) -> io::Result<Doorbell> {
        let base = doorbell_offset
            .checked_sub(regs::DOORBELL)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "doorbell offset below 12"))?;
        Doorbell::over(File::from(fd), base, doorbell_is_mmap)
    }

    /// BAR0 at `base` in `file`: mapped if `mmap`, else reached by pread/pwrite.
    fn over(file: File, base: u64, mmap: bool) -> io::Result<Doorbell> {
        let inner = if mmap {
            let page = rustix::param::page_size() as u64;
            let map_off = base & !(page - 1);
            let map = Mapping::map(file.as_fd(), map_off, page as usize)?;
            Regs::Mapped { map, base: base - map_off }
        } else {
            Regs::Io { file, base }
        };
        Ok(Doorbell { inner })
    }

    /// Interrupts `peer` on `vector`: writes `(peer << 16) | vector` to the Doorbell register.
    /// QEMU drops the write silently if that peer or vector is not connected.
    pub fn ring(&self, peer: u16, vector: u16) -> io::Result<()> {
        self.write(regs::DOORBELL, (u32::from(peer) << 16) | u32::from(vector))
    }

    fn read(&self, reg: u64) -> io::Result<u32> {
        match &self.inner {
            Regs::Mapped { map, base } => Ok(map.read_u32(base + reg)),
            Regs::Io { file, base } => {
                let mut b = [0u8; 4];
                let n = rustix::io::pread(file, &mut b, base + reg)?;
                if n != 4 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short register read"));
                }
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    fn write(&self, reg: u64, value: u32) -> io::Result<()> {
        match &self.inner {
            Regs::Mapped { map, base } => {
                map.write_u32(base + reg, value);
                Ok(())
            }
            Regs::Io { file, base } => {
                let n = rustix::io::pwrite(file, &value.to_le_bytes(), base + reg)?;
                if n != 4 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "short register write"));
                }
                Ok(())
            }
        }
    }
}

/// An open ivshmem device: BAR2 mapped, registers reachable, and (VFIO) MSI-X vectors.
#[derive(Debug)]
pub struct Device {
    info: DeviceInfo,
    access: Access,
    peer_id: u16,
    memory: Mapping,
    /// The fd BAR2 was mapped from and the offset in it (resource2 at 0, or the VFIO device).
    memory_file: File,
    memory_offset: u64,
    doorbell: Doorbell,
    /// The fd and offset of BAR0 as handed to other processes.
    doorbell_file: File,
    doorbell_offset: u64,
    doorbell_is_mmap: bool,
    /// Eventfds wired to MSI-X vectors 0.. (VFIO only).
    vectors: Vec<OwnedFd>,
    /// Kept last: closing it releases the VFIO group (after the mappings are gone).
    _vfio: Option<vfio::VfioDevice>,
}

/// What another local process needs to use the device without owning it: send the fds over
/// a Unix socket (SCM_RIGHTS) with the numbers, then on the other side
/// - memory: `Mapping::map(memory_fd, memory_offset, memory_len)` (a plain shared `mmap`);
/// - doorbells: `Doorbell::from_shared(doorbell_fd, doorbell_offset, doorbell_is_mmap)`; by
///   hand: if `doorbell_is_mmap`, `mmap` the page holding `doorbell_offset` and store a u32
///   there, else `pwrite` the 4 little-endian bytes at `doorbell_offset`;
/// - receiving: `vector_fds[v]` is an eventfd, readable when a peer rang vector `v`
///   (reading it consumes the wakeup, so only one process should read each).
///
/// Under VFIO, `memory_fd` and `doorbell_fd` are the VFIO device fd: whoever holds it can
/// also reconfigure the device (config space, interrupts). Hand it only to trusted processes.
#[derive(Debug)]
pub struct Shared<'a> {
    /// fd to map the shared memory from.
    pub memory_fd: BorrowedFd<'a>,
    /// Offset of BAR2 in `memory_fd` (page-aligned).
    pub memory_offset: u64,
    /// Size of the shared memory.
    pub memory_len: usize,
    /// fd through which the Doorbell register is reached.
    pub doorbell_fd: BorrowedFd<'a>,
    /// Offset of the Doorbell register (BAR0 + 12) in `doorbell_fd`.
    pub doorbell_offset: u64,
    /// True: reach the register through `mmap`; false: through `pwrite`.
    pub doorbell_is_mmap: bool,
    /// Eventfds of the MSI-X vectors (empty under sysfs access).
    pub vector_fds: Vec<BorrowedFd<'a>>,
}

impl Device {
    /// Opens `info` with the given access. `Access::Vfio` binds the device to vfio-pci first
    /// if it is not bound to it (and wires all its MSI-X vectors to eventfds).
    pub fn open(info: &DeviceInfo, access: Access) -> io::Result<Device> {
        match access {
            Access::Sysfs => Device::open_sysfs(info),
            Access::Vfio => Device::open_vfio(info),
        }
    }

    /// VFIO if that works (a doorbell device that can receive interrupts), else sysfs.
    /// Plain devices always get sysfs: they have no interrupts to receive.
    pub fn open_best(info: &DeviceInfo) -> io::Result<Device> {
        if info.doorbell {
            match Device::open_vfio(info) {
                Ok(d) => return Ok(d),
                Err(e) => tracing::info!(bdf = %info.bdf, "VFIO unavailable, using sysfs: {e}"),
            }
        }
        Device::open_sysfs(info)
    }

    fn open_sysfs(info: &DeviceInfo) -> io::Result<Device> {
        let rw = |f: &str| {
            let p = info.sysfs.join(f);
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| vfio::annotate(e, &p.display().to_string()))
        };
        let memory_file = rw("resource2")?;
        let memory = Mapping::map(memory_file.as_fd(), 0, bar_len(info.bar2_size)?)?;
        let bar0 = rw("resource0")?;
        let doorbell_file = bar0.try_clone()?;
        let doorbell = Doorbell::over(bar0, 0, true)?;
        let peer_id = doorbell.read(regs::IV_POSITION)? as u16;
        Ok(Device {
            info: info.clone(),
            access: Access::Sysfs,
            peer_id,
            memory,
            memory_file,
            memory_offset: 0,
            doorbell,
            doorbell_file,
            doorbell_offset: regs::DOORBELL,
            doorbell_is_mmap: true,
            vectors: Vec::new(),
            _vfio: None,
        })
    }

    fn open_vfio(info: &DeviceInfo) -> io::Result<Device> {
        bind_vfio(info)?;
        let group = fs::read_link(info.sysfs.join("iommu_group"))
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{} has no IOMMU group (guest needs an IOMMU: q35 + intel-iommu, intel_iommu=on)",
                        info.bdf
                    ),
                )
            })?;
        let dev = vfio::VfioDevice::open(&info.bdf, group)?;

        // Bus Master on: MSI-X messages are memory writes by the device, and without it QEMU
        // never delivers them. Memory Space on so the BARs decode.
        let config = dev.region(vfio::CONFIG)?;
        let mut cmd = [0u8; 2];
        rustix::io::pread(&dev.device, &mut cmd, config.offset + PCI_COMMAND)?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY;
        rustix::io::pwrite(&dev.device, &cmd.to_le_bytes(), config.offset + PCI_COMMAND)?;

        let bar2 = dev.region(vfio::BAR2)?;
        if !bar2.mmap {
            return Err(io::Error::other("VFIO does not allow mapping BAR2"));
        }
        let memory = Mapping::map(dev.device.as_fd(), bar2.offset, bar_len(bar2.size)?)?;
        let bar0 = dev.region(vfio::BAR0)?;
        if bar0.size < regs::DOORBELL + 4 {
            return Err(io::Error::other(format!(
                "BAR0 is {} bytes, too small for the registers",
                bar0.size
            )));
        }
        // Mapping BAR0 avoids a syscall per doorbell; VFIO allows it when the BAR's page is
        // the device's alone. Fall back to pwrite on the region otherwise (or if mmap fails).
        let doorbell = match bar0.mmap {
            true => Doorbell::over(dev.device.try_clone()?, bar0.offset, true)
                .or_else(|_| Doorbell::over(dev.device.try_clone()?, bar0.offset, false))?,
            false => Doorbell::over(dev.device.try_clone()?, bar0.offset, false)?,
        };
        let doorbell_is_mmap = matches!(doorbell.inner, Regs::Mapped { .. });
        let peer_id = doorbell.read(regs::IV_POSITION)? as u16;

        let count = dev.msix_count()?;
        let vectors = (0..count)
            .map(|_| rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        if !vectors.is_empty() {
            let fds: Vec<BorrowedFd<'_>> = vectors.iter().map(|f| f.as_fd()).collect();
            dev.set_msix_eventfds(&fds)?;
        }
        Ok(Device {
            info: info.clone(),
            access: Access::Vfio,
            peer_id,
            memory,
            memory_file: dev.device.try_clone()?,
            memory_offset: bar2.offset,
            doorbell_file: dev.device.try_clone()?,
            doorbell,
            doorbell_offset: bar0.offset + regs::DOORBELL,
            doorbell_is_mmap,
            vectors,
            _vfio: Some(dev),
        })
    }

    /// What `find_devices` said about this device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// How the device was opened.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Our own peer id (IVPosition); 0 on a plain device.
    pub fn peer_id(&self) -> u16 {
        self.peer_id
    }

    /// The shared memory (BAR2): start and length, valid while `self` lives. Peers write it
    /// concurrently: access it only through raw pointers (volatile or atomic), never through
    /// references.
    pub fn memory(&self) -> (*mut u8, usize) {
        self.memory.as_ptr()
    }

    /// Interrupts `peer` on `vector`. Works under both accesses; on a plain device there is
    /// nobody to ring and this is an `Unsupported` error.
    pub fn ring(&self, peer: u16, vector: u16) -> io::Result<()> {
        if !self.info.doorbell {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "ivshmem-plain has no doorbells"));
        }
        self.doorbell.ring(peer, vector)
    }

    /// The eventfd that becomes readable when a peer rings `vector` (VFIO only). Reading it
    /// returns and clears the number of doorbells since the last read.
    pub fn vector_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.vectors.get(usize::from(vector)).map(|f| f.as_fd())
    }

    /// Number of vectors wired to eventfds (0 under sysfs access).
    pub fn vectors(&self) -> u16 {
        self.vectors.len() as u16
    }

    /// Waits up to `timeout` for a doorbell on `vector` and consumes it: `Ok(n)` with the
    /// number of doorbells that arrived since the last wait, `Ok(0)` on timeout.
    pub fn wait(&self, vector: u16, timeout: Option<Duration>) -> io::Result<u64> {
        let fd = self.vector_fd(vector).ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "no eventfd for this vector (VFIO access only)")
        })?;
        if let Some(n) = read_eventfd(fd)? {
            return Ok(n);
        }
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut pfd = [PollFd::new(&fd, PollFlags::IN)];
        loop {
            match rustix::event::poll(&mut pfd, ts.as_ref()) {
                Ok(0) => return Ok(0),
                Ok(_) => return Ok(read_eventfd(fd)?.unwrap_or(0)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The fds and offsets another local process needs to map the memory and ring doorbells
    /// itself; see [`Shared`].
    pub fn share(&self) -> Shared<'_> {
        Shared {
            memory_fd: self.memory_file.as_fd(),
            memory_offset: self.memory_offset,
            memory_len: self.memory.as_ptr().1,
            doorbell_fd: self.doorbell_file.as_fd(),
            doorbell_offset: self.doorbell_offset,
            doorbell_is_mmap: self.doorbell_is_mmap,
            vector_fds: self.vectors.iter().map(|f| f.as_fd()).collect(),
        }
    }
}

/// Reads an eventfd without blocking: `Some(count)`, or `None` if nothing arrived.
fn read_eventfd(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b) {
        Ok(8) => Ok(Some(u64::from_ne_bytes(b))),
        Ok(_) => Err(io::Error::other("short eventfd read")),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn bar_len(size: u64) -> io::Result<usize> {
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| io::Error::other(format!("bad BAR size {size}")))
}

/// Binds the device to vfio-pci unless it is already: unbinds any other driver, sets
/// `driver_override` (so only this device, not every 1af4:1110, goes to vfio-pci) and asks
/// the PCI core to probe it.
pub fn bind_vfio(info: &DeviceInfo) -> io::Result<()> {
    let current = || {
        fs::read_link(info.sysfs.join("driver"))
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
    };
    let driver = current();
    if driver.as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "vfio-pci driver not loaded (modprobe vfio-pci)",
        ));
    }
    let write =
        |p: PathBuf, v: &str| fs::write(&p, v).map_err(|e| vfio::annotate(e, &p.display().to_string()));
    if driver.is_some() {
        write(info.sysfs.join("driver/unbind"), &info.bdf)?;
    }
    write(info.sysfs.join("driver_override"), "vfio-pci")?;
    write(PathBuf::from("/sys/bus/pci/drivers_probe"), &info.bdf)?;
    match current().as_deref() {
        Some("vfio-pci") => Ok(()),
        other => {
            Err(io::Error::other(format!("{}: bound to {other:?} after probing, not vfio-pci", info.bdf)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_sizes() {
        let text = "0x00000000fea00000 0x00000000fea000ff 0x0000000000040200\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000800000000 0x00000008003fffff 0x000000000014220c\n";
        assert_eq!(parse_resource(text), vec![256, 0, 4 << 20]);
    }

    #[test]
    fn msix_capability() {
        let mut c = vec![0u8; 256];
        c[6] = 0x10; // capability list present
        c[0x34] = 0x40;
        c[0x40] = 0x05; // MSI, next 0x50
        c[0x41] = 0x50;
        c[0x50] = PCI_CAP_ID_MSIX;
        c[0x52] = 0x01; // table size 2
        assert_eq!(msix_table_size(&c), Some(2));
        c[0x50] = 0x09; // vendor cap, next 0x40: a loop, must end
        c[0x51] = 0x40;
        assert_eq!(msix_table_size(&c), None);
        c[6] = 0;
        assert_eq!(msix_table_size(&c), None);
    }

    #[test]
    fn finds_devices_in_a_fake_tree() {
        let dir = std::env::temp_dir().join(format!("ivshmem-guest-test-{}", std::process::id()));
        let dev = dir.join("0000:00:04.0");
        let other = dir.join("0000:00:01.0");
        fs::create_dir_all(&dev).unwrap();
        fs::create_dir_all(&other).unwrap();
        fs::write(dev.join("vendor"), "0x1af4\n").unwrap();
        fs::write(dev.join("device"), "0x1110\n").unwrap();
        fs::write(dev.join("resource"), "0x1000 0x10ff 0x0\n0x0 0x0 0x0\n0x100000 0x1fffff 0x0\n").unwrap();
        fs::write(other.join("vendor"), "0x8086\n").unwrap();
        fs::write(other.join("device"), "0x1110\n").unwrap();
        let found = find_devices_in(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].bdf, "0000:00:04.0");
        assert_eq!((found[0].bar0_size, found[0].bar2_size, found[0].doorbell), (256, 1 << 20, false));
    }

    #[test]
    fn doorbell_from_shared_writes_the_register() {
        for mmap in [false, true] {
            let fd = rustix::fs::memfd_create("doorbell-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            let page = rustix::param::page_size() as u64;
            rustix::fs::ftruncate(&fd, 2 * page).unwrap();
            let check = File::from(fd.try_clone().unwrap());
            // BAR0 at the second page of the fd, as a VFIO region offset would put it.
            let bell = Doorbell::from_shared(fd, page + regs::DOORBELL, mmap).unwrap();
            bell.ring(3, 1).unwrap();
            let mut b = [0u8; 4];
            rustix::io::pread(&check, &mut b, page + regs::DOORBELL).unwrap();
            assert_eq!(u32::from_le_bytes(b), (3 << 16) | 1, "mmap={mmap}");
            assert_eq!(bell.read(regs::IV_POSITION).unwrap(), 0);
        }
    }
}
