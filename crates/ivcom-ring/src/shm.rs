//! The one unsafe door into shared memory.
//!
//! [`ShmRegion`] wraps a raw `(pointer, length)` pair that describes memory a peer may write at
//! any time. Everything above it works in byte offsets: each access is bounds- and
//! alignment-checked and either copies bytes in or out or performs one atomic operation. No
//! Rust reference (`&[u8]`, `&T`) into the region is ever created, so a peer changing the
//! bytes underneath us cannot break the aliasing rules references carry; values read from
//! the region are plain integers that callers validate before use.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::copy;

/// An access that falls outside the region or is misaligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access of {len} bytes at offset {offset} is outside a {region_len}-byte region or misaligned")]
pub struct OutOfBounds {
    /// Offset of the refused access.
    pub offset: usize,
    /// Length of the refused access.
    pub len: usize,
    /// Length of the region.
    pub region_len: usize,
}

/// A view of shared memory as a range of bytes addressed by offset.
///
/// Cheap to copy around by reference; it neither owns nor unmaps the memory. The owner (a
/// mapping, or a [`HeapRegion`]) must outlive every use, which the constructor's contract
/// states.
#[derive(Debug)]
pub struct ShmRegion {
    base: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory shared with other processes; every access goes through
// atomics or raw copies, never through references, so using it from several threads is no
// different from a peer process using it at the same time.
unsafe impl Send for ShmRegion {}
// SAFETY: as for `Send`: shared access is by atomics and raw copies only.
unsafe impl Sync for ShmRegion {}

impl ShmRegion {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Safety
    /// - `base..base + len` must be valid for reads and writes (mapped, not freed) for as long
    ///   as the returned value or anything derived from it is used;
    /// - `base` must be aligned to at least 8 bytes;
    /// - no Rust reference to any byte of that range may exist while this value is used (the
    ///   memory is treated as changing at any time).
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        debug_assert!((base as usize).is_multiple_of(8));
        Self { base, len }
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw base pointer, for the owner to unmap; not for access.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8, OutOfBounds> {
        let oob = OutOfBounds { offset, len, region_len: self.len };
        let end = offset.checked_add(len).ok_or(oob)?;
        if end > self.len || !offset.is_multiple_of(align) {
            return Err(oob);
        }
        // `offset <= len` and the region is one allocation, so this stays in bounds.
        Ok(self.base.wrapping_add(offset))
    }

    fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, OutOfBounds> {
        let p = self.check(offset, 8, 8)?;
        // SAFETY: `p` is in bounds and 8-aligned (checked above; the base is 8-aligned by the
        // constructor's contract). An `AtomicU64` has the size and alignment of a `u64`, and
        // every bit pattern is valid. The reference is to an atomic, the one kind of reference
        // that may alias memory another party modifies concurrently (all of whose accesses are
        // atomic too, as the layout requires for this field); it does not outlive `&self`.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, OutOfBounds> {
        let p = self.check(offset, 4, 4)?;
        // SAFETY: as in `atomic_u64`, for a 4-byte, 4-aligned field.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// The `N`-byte block at `offset` (8-aligned), checked once so that its fields can then be
    /// reached by constant offsets without further checks.
    #[inline]
    pub fn block<const N: usize>(&self, offset: usize) -> Result<Block<'_, N>, OutOfBounds> {
        let base = self.check(offset, N, 8)?;
        Ok(Block { base, _region: std::marker::PhantomData })
    }

    /// Atomically loads the u64 at `offset` (8-aligned).
    #[inline]
    pub fn load_u64(&self, offset: usize, order: Ordering) -> Result<u64, OutOfBounds> {
        Ok(self.atomic_u64(offset)?.load(order))
    }

    /// Atomically stores `value` at `offset` (8-aligned).
    #[inline]
    pub fn store_u64(&self, offset: usize, value: u64, order: Ordering) -> Result<(), OutOfBounds> {
        self.atomic_u64(offset)?.store(value, order);
        Ok(())
    }

    /// Atomically loads the u32 at `offset` (4-aligned).
    #[inline]
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(order))
    }

    /// Atomically stores `value` at `offset` (4-aligned).
    #[inline]
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(value, order);
        Ok(())
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    #[inline]
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let p = self.check(offset, dst.len(), 1)?;
        // SAFETY: the source range is inside the region (checked), the destination is a
        // distinct, exclusively borrowed local buffer, so the two do not overlap. The source
        // bytes may be changed by the peer during the copy; they are treated as arbitrary
        // `u8`s, for which every bit pattern is valid, and no reference to them is formed.
        unsafe { copy::copy_bytes(dst.as_mut_ptr(), p, dst.len()) };
        Ok(())
    }

    /// Copies `src` into the region starting at `offset`.
    #[inline]
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        let p = self.check(offset, src.len(), 1)?;
        // SAFETY: the destination range is inside the region (checked) and the source is a
        // local shared borrow that cannot overlap the region (callers never hold references
        // into it). Writing any byte values is allowed by the layout.
        unsafe { copy::copy_bytes(p, src.as_ptr(), src.len()) };
        Ok(())
    }

    /// The `len` bytes at `offset` (8-aligned) as a region of their own, borrowed from this one.
    pub fn sub(&self, offset: usize, len: usize) -> Result<SubRegion<'_>, OutOfBounds> {
        let p = self.check(offset, len, 8)?;
        // SAFETY: `p..p + len` lies inside this region (checked), so it is valid for as long as
        // this region is, which the returned borrow enforces; `p` is 8-aligned (base 8-aligned,
        // offset checked); no reference into the memory is created, as for any region.
        let region = unsafe { ShmRegion::new(p, len) };
        Ok(SubRegion { region, _parent: std::marker::PhantomData })
    }

    /// Sets `len` bytes at `offset` to zero.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        let p = self.check(offset, len, 1)?;
        // SAFETY: the range is inside the region (checked); any byte value is allowed.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(())
    }
}

/// Part of a region, usable as a region, for no longer than the region it came from
/// (see [`ShmRegion::sub`]).
#[derive(Debug)]
pub struct SubRegion<'a> {
    region: ShmRegion,
    _parent: std::marker::PhantomData<&'a ShmRegion>,
}

impl std::ops::Deref for SubRegion<'_> {
    type Target = ShmRegion;
    fn deref(&self) -> &ShmRegion {
        &self.region
    }
}

/// `N` bytes of a region, 8-aligned and known to be in bounds (see [`ShmRegion::block`]).
/// Fields are atomics at offsets inside the block; an offset outside it is a programming
/// error caught by an assertion that constant offsets let the compiler remove.
#[derive(Debug, Clone, Copy)]
pub struct Block<'a, const N: usize> {
    base: *mut u8,
    _region: std::marker::PhantomData<&'a ShmRegion>,
}

impl<'a, const N: usize> Block<'a, N> {
    /// The u64 field at `off` (8-aligned, inside the block).
    #[inline(always)]
    pub fn u64(&self, off: usize) -> &'a AtomicU64 {
        assert!(off + 8 <= N && off.is_multiple_of(8), "field outside block");
        // SAFETY: the block lies inside the region and is 8-aligned (checked when it was made),
        // so `base + off` is an in-bounds, 8-aligned u64 for the region's lifetime `'a`. As in
        // `ShmRegion::atomic_u64`, an atomic is the one kind of reference that may alias memory
        // others change concurrently, and every bit pattern is a valid u64.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    /// The u32 field at `off` (4-aligned, inside the block).
    #[inline(always)]
    pub fn u32(&self, off: usize) -> &'a AtomicU32 {
        assert!(off + 4 <= N && off.is_multiple_of(4), "field outside block");
        // SAFETY: as in `u64`, for a 4-byte, 4-aligned field.
        unsafe { AtomicU32::from_ptr(self.base.add(off).cast()) }
    }
}

use rustix::fs::{MemfdFlags, SealFlags};

/// Seals a region must carry so its creator can neither shrink it under our mapping (which
/// would turn our accesses into SIGBUS) nor grow it.
const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

/// Creates a sealed, zero-filled memfd of `size` bytes.
pub fn create_memfd(size: usize) -> std::io::Result<std::os::fd::OwnedFd> {
    create_memfd_named("ivcom", size)
}

/// [`create_memfd`] with the name `/proc/PID/fd` shows (`memfd:NAME`).
pub fn create_memfd_named(name: &str, size: usize) -> std::io::Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size as u64)?;
    rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::SEAL)?;
    Ok(fd)
}

/// Checks that `fd` is a sealed shared-memory file (so it cannot shrink under a mapping) no
/// larger than `max` bytes, and returns its size.
pub fn check_memfd(fd: std::os::fd::BorrowedFd<'_>, max: u64) -> std::io::Result<usize> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer's region is not a sealable memfd ({e})"),
        )
    })?;
    if !seals.contains(REQUIRED_SEALS) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "peer's region is not sealed against resizing",
        ));
    }
    let size = rustix::fs::fstat(fd)?.st_size as u64;
    if size > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer's region is {size} bytes, more than the {max} allowed"),
        ));
    }
    Ok(size as usize)
}

/// A shared, read-write mapping of (part of) a file: a memfd, a `/dev/shm` file, a PCI BAR
/// through sysfs or VFIO. Unmapped on drop. The one place that maps shared memory.
#[derive(Debug)]
pub struct MappedRegion {
    region: ShmRegion,
}

impl MappedRegion {
    /// Maps `len` bytes of `fd` from `offset` (a multiple of the page size) shared,
    /// read-write. The caller makes sure the file cannot shrink under the mapping while it
    /// lives (a sealed memfd, a device BAR, a file it owns), or accepts `SIGBUS` if it does.
    pub fn map(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Self> {
        use rustix::mm::{MapFlags, ProtFlags};
        if len == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty mapping"));
        }
        if !offset.is_multiple_of(4096) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "mapping offset is not page-aligned",
            ));
        }
        // SAFETY: a fresh mapping at an address the kernel picks (null hint) overlaps nothing
        // Rust owns; the kernel checks that `fd` can be mapped at `offset` for `len` bytes.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        // SAFETY: `base..base + len` is the mapping just made, page-aligned, valid until `drop`
        // unmaps it; everything that uses it borrows `self`, and no reference into it is made.
        let region = unsafe { ShmRegion::new(base.cast(), len) };
        Ok(Self { region })
    }

    /// The mapped bytes.
    pub fn region(&self) -> &ShmRegion {
        &self.region
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`; nothing derived from it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.region.as_ptr().cast(), self.region.len()) };
    }
}

/// Page-aligned, zeroed heap memory used as a region by tests, fuzzing and in-process channels.
#[derive(Debug)]
pub struct HeapRegion {
    region: ShmRegion,
    layout: std::alloc::Layout,
}

impl HeapRegion {
    /// Allocates `len` zeroed bytes (`len > 0`), aligned to 4096.
    pub fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("region size too large");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `base` points to `len` bytes we own until `drop`, aligned to 4096, and no
        // reference into them is ever handed out.
        let region = unsafe { ShmRegion::new(base, len) };
        Self { region, layout }
    }

    /// The region view.
    pub fn region(&self) -> &ShmRegion {
        &self.region
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { std::alloc::dealloc(self.region.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_alignment_are_checked() {
        let heap = HeapRegion::new(64);
        let r = heap.region();
        assert!(r.load_u64(56, Ordering::Relaxed).is_ok());
        assert!(r.load_u64(60, Ordering::Relaxed).is_err(), "misaligned");
        assert!(r.load_u64(64, Ordering::Relaxed).is_err(), "past the end");
        assert!(r.load_u64(usize::MAX - 3, Ordering::Relaxed).is_err(), "overflowing offset");
        let mut buf = [0u8; 8];
        assert!(r.read_bytes(57, &mut buf).is_err());
        assert!(r.write_bytes(56, &[1; 8]).is_ok());
        r.read_bytes(56, &mut buf).unwrap();
        assert_eq!(buf, [1; 8]);
    }
}
