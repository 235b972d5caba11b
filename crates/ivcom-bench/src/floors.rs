//! Shared-memory floors: what two processes can do with a `MAP_SHARED` memfd mapping
//! and nothing else (no notification, no validation).
//!
//! - spin floor: ping-pong a counter between two cache lines (the polling limit);
//! - copy floor: an SPSC two-copy byte ring of 1 MiB (the copying limit).
//!
//! The orchestrator creates the memfd (without `CLOEXEC`) for each slice and both
//! peers inherit it; nothing is ever created in `/dev/shm`.

use std::hint::spin_loop;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustix::fs::{fstat, ftruncate, memfd_create, FileType, MemfdFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use crate::hist;
use crate::plan::Kind;

/// Distance between independently written words (two cache lines, so adjacent-line
/// prefetching does not couple them).
const LINE: usize = 128;
/// Spin floor: client writes the ping counter here, server answers on PONG.
const PING: usize = 0;
const PONG: usize = LINE;
/// Copy floor: consumer position, producer position, producer-finished flag, data.
const HEAD: usize = 0;
const TAIL: usize = LINE;
const CLOSED: usize = 2 * LINE;
const DATA: usize = 4096;
/// Copy floor ring capacity.
pub const RING_CAPACITY: usize = 1 << 20;
/// The copy floor writer publishes at most this much at once, so that the reader can
/// copy out while the writer is still copying in (without it a 1 MiB write into a
/// 1 MiB ring serializes the two copies).
const PUBLISH_CHUNK: u64 = 64 * 1024;
/// The spin floor's stop value of the ping counter.
const STOP: u64 = u64::MAX;

/// Copies at or above this size use a plain vector loop instead of `memcpy`.
const VECTOR_COPY_MIN: usize = 2048;

/// Copies `len` bytes from `src` to `dst`.
///
/// Small copies use `memcpy` (`ptr::copy_nonoverlapping`). From 2 KiB up, glibc's memcpy
/// switches to `rep movsb`, which on the AMD EPYC VMs we measure on is erratic (and often
/// 2x slower) for data another core is reading or writing concurrently; a floor must be
/// the best a copy can do, so large copies use a loop of 16-byte loads and stores.
///
/// # Safety
/// `src` must be valid for `len` bytes of reads, `dst` for `len` bytes of writes, and the
/// ranges must not overlap.
#[inline]
unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= VECTOR_COPY_MIN {
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_vector(dst, src, len) };
        return;
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { ptr::copy_nonoverlapping(src, dst, len) };
}

/// The 16-byte load/store loop of [`copy`] (SSE2 is part of the x86_64 baseline).
///
/// # Safety
/// Same contract as [`copy`].
#[cfg(target_arch = "x86_64")]
#[inline(never)]
unsafe fn copy_vector(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let blocks = len / 64;
    for i in 0..blocks {
        // SAFETY: `i * 64 + 64 <= len`, so the four 16-byte loads and stores stay inside
        // the ranges the caller vouched for; unaligned loads/stores need no alignment.
        unsafe {
            let s = src.add(i * 64).cast::<__m128i>();
            let d = dst.add(i * 64).cast::<__m128i>();
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_storeu_si128(d, a);
            _mm_storeu_si128(d.add(1), b);
            _mm_storeu_si128(d.add(2), c);
            _mm_storeu_si128(d.add(3), e);
        }
    }
    let done = blocks * 64;
    // SAFETY: the remaining `done..len` is inside both ranges.
    unsafe { ptr::copy_nonoverlapping(src.add(done), dst.add(done), len - done) };
}

/// Size of the mapping a floor needs.
pub fn map_len(kind: Kind) -> usize {
    match kind {
        Kind::CopyFloor => DATA + RING_CAPACITY,
        _ => 4096,
    }
}

/// Orchestrator side: a zero-filled memfd of `len` bytes that child processes inherit.
pub fn create_memfd(len: usize) -> io::Result<OwnedFd> {
    // No CLOEXEC: the two peers of the slice inherit it across exec.
    let fd = memfd_create("ivcom-bench-floor", MemfdFlags::empty())?;
    ftruncate(&fd, len as u64)?;
    Ok(fd)
}

/// A `MAP_SHARED` read/write mapping of the floor's memfd.
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMap {
    /// Maps the memfd inherited under number `fd`, after checking that it is a
    /// regular file (memfd) of at least `len` bytes.
    pub fn from_inherited_fd(fd: i32, len: usize) -> io::Result<SharedMap> {
        if fd < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative fd"));
        }
        // Check the number is open before borrowing it (fcntl fails with EBADF otherwise).
        // SAFETY: `fd` is the number the orchestrator gave us for the memfd it created
        // without CLOEXEC for this slice; we only borrow it for the calls below, while
        // nothing in this process closes it, and we verify it is open and a regular file
        // of the right size before mapping.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::io::fcntl_getfd(borrowed)?;
        let st = fstat(borrowed)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || (st.st_size as u64) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} is not a memfd of at least {len} bytes"),
            ));
        }
        // SAFETY: a fresh mapping at an address chosen by the kernel (null hint), so it
        // cannot overlap any existing Rust object; `len` is within the file's size.
        let raw = unsafe {
            mmap(ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, borrowed, 0)?
        };
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMap { ptr, len })
    }

    /// The 8-byte aligned word at `offset` as an atomic.
    fn atomic(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len, "word out of mapping");
        // SAFETY: the mapping is page-aligned and `offset` is a multiple of 8, so the
        // pointer is aligned for AtomicU64; it is in bounds (checked above) and valid for
        // as long as `self` (unmapped only in Drop). The only other accessor is our own
        // peer process, which also uses only atomic operations on these header words.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast::<u64>()) }
    }

    /// Copies `src` into the ring data area at ring position `pos` (wrapping).
    fn ring_write(&self, pos: u64, src: &[u8]) {
        let off = (pos % RING_CAPACITY as u64) as usize;
        let first = src.len().min(RING_CAPACITY - off);
        assert!(src.len() <= RING_CAPACITY && DATA + RING_CAPACITY <= self.len);
        // SAFETY: both ranges [DATA+off, DATA+off+first) and [DATA, DATA+rest) are inside
        // the mapping (asserted above: off < CAPACITY, first <= CAPACITY - off, rest <
        // CAPACITY); `src` is our own buffer, so they cannot overlap. By the SPSC protocol
        // this free space belongs to the writer until it publishes the new tail with
        // Release, and the reader touches it only after an Acquire load of that tail.
        unsafe {
            let data = self.ptr.as_ptr().add(DATA);
            copy(data.add(off), src.as_ptr(), first);
            copy(data, src.as_ptr().add(first), src.len() - first);
        }
    }

    /// Copies `dst.len()` bytes out of the ring data area from ring position `pos`.
    fn ring_read(&self, pos: u64, dst: &mut [u8]) {
        let off = (pos % RING_CAPACITY as u64) as usize;
        let first = dst.len().min(RING_CAPACITY - off);
        assert!(dst.len() <= RING_CAPACITY && DATA + RING_CAPACITY <= self.len);
        // SAFETY: the source ranges are inside the mapping (same bounds as in
        // `ring_write`), `dst` is our own buffer. These bytes were published by the
        // writer with a Release store of tail that we observed with Acquire, and the
        // writer does not reuse them until we publish a head past them.
        unsafe {
            let data = self.ptr.as_ptr().add(DATA);
            copy(dst.as_mut_ptr(), data.add(off), first);
            copy(dst.as_mut_ptr().add(first), data, dst.len() - first);
        }
    }
}

// SAFETY: SharedMap only hands out `&AtomicU64` (Sync) and does raw copies through
// `&self` methods whose callers follow the SPSC protocol; the mapping itself is not tied
// to the thread that created it.
unsafe impl Send for SharedMap {}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `from_inherited_fd`,
        // and every reference derived from it borrows `self`, so none outlives this.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The number under which the peers inherit `fd` (passed to them as `--memfd`).
pub fn fd_number(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}

/// Result of one floor peer.
#[derive(Debug, Default)]
pub struct FloorOutcome {
    /// Round trips (spin) or writes (copy) done.
    pub ops: u64,
    /// Bytes read (copy floor reader).
    pub bytes: u64,
    /// Reader: nanoseconds from the first byte to the end.
    pub elapsed_ns: u64,
    /// Spin client: recorded round trips.
    pub hist: Option<Histogram<u64>>,
}

/// Spin floor server: answer every new ping value until the stop value.
pub fn spin_server(map: &SharedMap) -> FloorOutcome {
    let ping = map.atomic(PING);
    let pong = map.atomic(PONG);
    let mut last = 0;
    let mut ops = 0;
    loop {
        let v = ping.load(Ordering::Acquire);
        if v == last {
            spin_loop();
            continue;
        }
        if v == STOP {
            break;
        }
        pong.store(v, Ordering::Release);
        last = v;
        ops += 1;
    }
    FloorOutcome { ops, ..FloorOutcome::default() }
}

/// Spin floor client: ping-pong for `duration`, recording after `warmup`.
pub fn spin_client(map: &SharedMap, duration: Duration, warmup: Duration) -> FloorOutcome {
    let ping = map.atomic(PING);
    let pong = map.atomic(PONG);
    let mut h = hist::new_hist();
    let start = Instant::now();
    let (warm_end, end) = (start + warmup, start + duration);
    let mut i = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        i += 1;
        ping.store(i, Ordering::Release);
        while pong.load(Ordering::Acquire) != i {
            spin_loop();
        }
        let dt = t0.elapsed();
        if t0 >= warm_end {
            hist::record(&mut h, dt.as_nanos() as u64);
        }
    }
    ping.store(STOP, Ordering::Release);
    FloorOutcome { ops: i, hist: Some(h), ..FloorOutcome::default() }
}

/// Copy floor writer: write `size`-byte buffers into the ring for `duration`
/// (each write published in pieces of at most 64 KiB, as space allows).
pub fn copy_writer(map: &SharedMap, size: usize, duration: Duration) -> FloorOutcome {
    let head = map.atomic(HEAD);
    let tail_word = map.atomic(TAIL);
    let closed = map.atomic(CLOSED);
    let cap = RING_CAPACITY as u64;
    let src = vec![0xA5u8; size];
    let check_every = (4096 / size.max(1)).max(1) as u64;
    let end = Instant::now() + duration;
    let (mut tail, mut head_seen, mut writes) = (0u64, 0u64, 0u64);
    loop {
        if writes.is_multiple_of(check_every) && Instant::now() >= end {
            break;
        }
        let mut off = 0;
        while off < size {
            let want = (size - off) as u64;
            if cap - (tail - head_seen) < want {
                head_seen = head.load(Ordering::Acquire);
            }
            let free = cap - (tail - head_seen);
            if free == 0 {
                spin_loop();
                continue;
            }
            let n = free.min(want).min(PUBLISH_CHUNK) as usize;
            map.ring_write(tail, &src[off..off + n]);
            tail += n as u64;
            tail_word.store(tail, Ordering::Release);
            off += n;
        }
        writes += 1;
    }
    closed.store(1, Ordering::Release);
    FloorOutcome { ops: writes, ..FloorOutcome::default() }
}

/// Copy floor reader: drain the ring into a buffer of `max(size, 64 KiB)` until the
/// writer has closed and everything is read.
pub fn copy_reader(map: &SharedMap, size: usize) -> FloorOutcome {
    let head_word = map.atomic(HEAD);
    let tail_word = map.atomic(TAIL);
    let closed = map.atomic(CLOSED);
    let mut buf = vec![0u8; size.max(64 * 1024)];
    let (mut head, mut bytes, mut reads) = (0u64, 0u64, 0u64);
    let mut first: Option<Instant> = None;
    loop {
        let tail = tail_word.load(Ordering::Acquire);
        let avail = tail - head;
        if avail == 0 {
            if closed.load(Ordering::Acquire) == 1 && tail_word.load(Ordering::Acquire) == head {
                break;
            }
            spin_loop();
            continue;
        }
        first.get_or_insert_with(Instant::now);
        let n = avail.min(buf.len() as u64) as usize;
        map.ring_read(head, &mut buf[..n]);
        std::hint::black_box(&mut buf);
        head += n as u64;
        head_word.store(head, Ordering::Release);
        bytes += n as u64;
        reads += 1;
    }
    FloorOutcome {
        ops: reads,
        bytes,
        elapsed_ns: first.map_or(0, |t| t.elapsed().as_nanos() as u64),
        hist: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(kind: Kind) -> (OwnedFd, SharedMap, SharedMap) {
        let len = map_len(kind);
        let fd = create_memfd(len).unwrap();
        let a = SharedMap::from_inherited_fd(fd_number(&fd), len).unwrap();
        let b = SharedMap::from_inherited_fd(fd_number(&fd), len).unwrap();
        (fd, a, b)
    }

    #[test]
    fn rejects_small_or_bad_fd() {
        let fd = create_memfd(4096).unwrap();
        assert!(SharedMap::from_inherited_fd(fd_number(&fd), 8192).is_err());
        assert!(SharedMap::from_inherited_fd(-1, 4096).is_err());
    }

    #[test]
    fn copy_ring_moves_all_bytes_between_two_mappings() {
        let (_fd, w, r) = pair(Kind::CopyFloor);
        let size = 700_001; // odd size to exercise wrapping
        let reader = std::thread::spawn(move || copy_reader(&r, size));
        let out = copy_writer(&w, size, Duration::from_millis(30));
        let got = reader.join().unwrap();
        assert!(out.ops > 0);
        assert_eq!(got.bytes, out.ops * size as u64);
    }

    #[test]
    fn spin_ping_pong_between_two_mappings() {
        let (_fd, c, s) = pair(Kind::SpinFloor);
        let server = std::thread::spawn(move || spin_server(&s));
        let out = spin_client(&c, Duration::from_millis(20), Duration::ZERO);
        let srv = server.join().unwrap();
        assert_eq!(srv.ops, out.ops);
        assert!(!out.hist.unwrap().is_empty());
    }
}
