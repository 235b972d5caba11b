//! The few VFIO ioctls a guest needs to own an ivshmem device: container, group, device fd,
//! region info, and MSI-X vectors wired to eventfds. Structs and constants come from
//! `vfio-bindings` (generated from the kernel's `linux/vfio.h`); the ioctl numbers are
//! `_IO(VFIO_TYPE, VFIO_BASE + n)`, as in that header.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::raw::{c_int, c_void};
use std::path::Path;

use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode};
use vfio_bindings::bindings::vfio as sys;

const fn op(n: u32) -> Opcode {
    ioctl::opcode::none(sys::VFIO_TYPE, (sys::VFIO_BASE + n) as u8)
}
const GET_API_VERSION: Opcode = op(0);
const CHECK_EXTENSION: Opcode = op(1);
const SET_IOMMU: Opcode = op(2);
const GROUP_GET_STATUS: Opcode = op(3);
const GROUP_SET_CONTAINER: Opcode = op(4);
const GROUP_GET_DEVICE_FD: Opcode = op(6);
const DEVICE_GET_REGION_INFO: Opcode = op(8);
const DEVICE_GET_IRQ_INFO: Opcode = op(9);
const DEVICE_SET_IRQS: Opcode = op(10);

/// PCI region indices of a vfio-pci device.
pub(crate) const BAR0: u32 = 0;
pub(crate) const BAR2: u32 = 2;
pub(crate) const CONFIG: u32 = sys::VFIO_PCI_CONFIG_REGION_INDEX;
const MSIX: u32 = sys::VFIO_PCI_MSIX_IRQ_INDEX;

/// One VFIO ioctl: every VFIO request is `_IO` (no size in the number) and takes either an
/// integer or a pointer to a struct whose first field is `argsz`; it returns an int.
struct Raw {
    opcode: Opcode,
    arg: *mut c_void,
}

// SAFETY: `opcode` and `arg` come in pairs from the functions below, each of which passes the
// argument type that `linux/vfio.h` documents for that request (an integer smuggled in the
// pointer, or a pointer to a live, correctly sized `#[repr(C)]` struct). IS_MUTATING is true:
// the kernel may write the struct.
unsafe impl Ioctl for Raw {
    type Output = c_int;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        self.opcode
    }
    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<c_int> {
        Ok(out)
    }
}

/// Runs one VFIO request.
///
/// # Safety
/// `arg` must be what request `opcode` expects: an integer value, or a pointer to a live
/// struct of the documented type (with `argsz` set) that stays valid for the call.
unsafe fn vfio_ioctl(fd: BorrowedFd<'_>, opcode: Opcode, arg: *mut c_void) -> io::Result<c_int> {
    // SAFETY: forwarded from this function's contract.
    unsafe { ioctl::ioctl(fd, Raw { opcode, arg }) }.map_err(io::Error::from)
}

fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// A VFIO region's place in the device fd.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    pub offset: u64,
    pub size: u64,
    pub mmap: bool,
}

/// An open VFIO container, group and device. Dropping it closes them in reverse order,
/// which releases the group for the next process.
#[derive(Debug)]
pub(crate) struct VfioDevice {
    // Field order is drop order: device, then group, then container.
    pub device: File,
    _group: File,
    _container: File,
}

impl VfioDevice {
    /// Opens the device `bdf` in IOMMU group `group` (already bound to vfio-pci).
    pub(crate) fn open(bdf: &str, group: u32) -> io::Result<VfioDevice> {
        let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let container = rw(Path::new("/dev/vfio/vfio"))
            .map_err(|e| annotate(e, "opening /dev/vfio/vfio (is the vfio module loaded?)"))?;
        // SAFETY: GET_API_VERSION takes no argument.
        let api = unsafe { vfio_ioctl(container.as_fd(), GET_API_VERSION, std::ptr::null_mut()) }?;
        if api != sys::VFIO_API_VERSION as c_int {
            return Err(io::Error::other(format!(
                "VFIO API version {api}, expected {}",
                sys::VFIO_API_VERSION
            )));
        }
        let iommu = [sys::VFIO_TYPE1v2_IOMMU, sys::VFIO_TYPE1_IOMMU]
            .into_iter()
            .find(|&t| {
                // SAFETY: CHECK_EXTENSION takes the extension number as an integer argument.
                unsafe { vfio_ioctl(container.as_fd(), CHECK_EXTENSION, t as usize as *mut c_void) }
                    .is_ok_and(|r| r > 0)
            })
            .ok_or_else(|| io::Error::other("VFIO has no type1 IOMMU (is vfio_iommu_type1 loaded?)"))?;

        let group_path = format!("/dev/vfio/{group}");
        let group_file =
            rw(Path::new(&group_path)).map_err(|e| annotate(e, &format!("opening {group_path}")))?;
        let mut status = sys::vfio_group_status { argsz: argsz::<sys::vfio_group_status>(), flags: 0 };
        // SAFETY: GROUP_GET_STATUS takes a pointer to vfio_group_status with argsz set; `status` lives.
        unsafe { vfio_ioctl(group_file.as_fd(), GROUP_GET_STATUS, (&raw mut status).cast()) }?;
        if status.flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(format!(
                "IOMMU group {group} is not viable: bind every device of the group to vfio-pci"
            )));
        }
        let mut cfd: c_int = container.as_raw_fd();
        // SAFETY: GROUP_SET_CONTAINER takes a pointer to the container's fd as an int.
        unsafe { vfio_ioctl(group_file.as_fd(), GROUP_SET_CONTAINER, (&raw mut cfd).cast()) }
            .map_err(|e| annotate(e, "VFIO_GROUP_SET_CONTAINER"))?;
        // SAFETY: SET_IOMMU takes the IOMMU type as an integer argument.
        unsafe { vfio_ioctl(container.as_fd(), SET_IOMMU, iommu as usize as *mut c_void) }
            .map_err(|e| annotate(e, "VFIO_SET_IOMMU"))?;
        let name = CString::new(bdf).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: GROUP_GET_DEVICE_FD takes a NUL-terminated device name, which `name` holds
        // for the call; it does not write through the pointer.
        let fd = unsafe { vfio_ioctl(group_file.as_fd(), GROUP_GET_DEVICE_FD, name.as_ptr() as *mut c_void) }
            .map_err(|e| annotate(e, "VFIO_GROUP_GET_DEVICE_FD"))?;
        // SAFETY: a successful GET_DEVICE_FD returns a new fd that nothing else owns.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(VfioDevice { device, _group: group_file, _container: container })
    }

    pub(crate) fn region(&self, index: u32) -> io::Result<Region> {
        let mut info = sys::vfio_region_info {
            argsz: argsz::<sys::vfio_region_info>(),
            flags: 0,
            index,
            cap_offset: 0,
            size: 0,
            offset: 0,
        };
        // SAFETY: GET_REGION_INFO takes a pointer to vfio_region_info with argsz and index set;
        // `info` lives for the call. A larger argsz reply (capabilities) is not asked for: the
        // kernel only writes within argsz.
        unsafe { vfio_ioctl(self.device.as_fd(), DEVICE_GET_REGION_INFO, (&raw mut info).cast()) }
            .map_err(|e| annotate(e, &format!("VFIO_DEVICE_GET_REGION_INFO({index})")))?;
        Ok(Region {
            offset: info.offset,
            size: info.size,
            mmap: info.flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0,
        })
    }

    /// How many MSI-X vectors the device has.
    pub(crate) fn msix_count(&self) -> io::Result<u32> {
        let mut info =
            sys::vfio_irq_info { argsz: argsz::<sys::vfio_irq_info>(), flags: 0, index: MSIX, count: 0 };
        // SAFETY: GET_IRQ_INFO takes a pointer to vfio_irq_info with argsz and index set.
        unsafe { vfio_ioctl(self.device.as_fd(), DEVICE_GET_IRQ_INFO, (&raw mut info).cast()) }
            .map_err(|e| annotate(e, "VFIO_DEVICE_GET_IRQ_INFO(MSI-X)"))?;
        Ok(info.count)
    }

    /// Wires MSI-X vectors 0..fds.len() to the eventfds (enables MSI-X on the device).
    pub(crate) fn set_msix_eventfds(&self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        // vfio_irq_set is five u32 words followed by `count` 32-bit fds: build it in u32s so the
        // buffer is aligned for the header.
        const HEADER_WORDS: usize = std::mem::size_of::<sys::vfio_irq_set>() / 4;
        const _: () = assert!(std::mem::size_of::<sys::vfio_irq_set>() == 20);
        let mut buf = vec![0u32; HEADER_WORDS + fds.len()];
        buf[0] = (buf.len() * 4) as u32; // argsz
        buf[1] = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER; // flags
        buf[2] = MSIX; // index
        buf[3] = 0; // start
        buf[4] = fds.len() as u32; // count
        for (slot, fd) in buf[HEADER_WORDS..].iter_mut().zip(fds) {
            *slot = fd.as_raw_fd() as u32;
        }
        // SAFETY: SET_IRQS takes a pointer to vfio_irq_set followed by `count` s32 eventfds,
        // `argsz` bytes in all; `buf` is exactly that, 4-byte aligned, and lives for the call.
        unsafe { vfio_ioctl(self.device.as_fd(), DEVICE_SET_IRQS, buf.as_mut_ptr().cast()) }
            .map_err(|e| annotate(e, "VFIO_DEVICE_SET_IRQS(MSI-X)"))?;
        Ok(())
    }
}

pub(crate) fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
