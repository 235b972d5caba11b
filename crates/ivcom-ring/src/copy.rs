//! Byte copies between local buffers and the shared region.
//!
//! Small copies use the platform `memcpy`. Large ones use a plain loop of 16-byte vector
//! loads and stores: glibc switches to `rep movsb` from about 2 KiB up, and on the AMD EPYC
//! hosts we measure on that path is erratic for data another core is reading or writing at
//! the same time (a 64 KiB ring streamed at 7.5 GB/s with it and 17.9 GB/s without; see
//! `docs/performance.md`). The loop is written with explicit intrinsics so the compiler does
//! not turn it back into a `memcpy` call.

/// Copies at or above this many bytes use the vector loop.
const LOOP_THRESHOLD: usize = 2048;

/// Copies `len` bytes from `src` to `dst`.
///
/// # Safety
/// `src` must be valid for `len` bytes of reads and `dst` for `len` bytes of writes, and the
/// two ranges must not overlap. Either range may be shared memory that another process
/// changes concurrently; the copied values are then unspecified bytes, which is acceptable
/// because callers treat them as untrusted `u8`s.
#[inline]
pub unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= LOOP_THRESHOLD {
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_sse2(dst, src, len) };
        return;
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(target_arch = "x86_64")]
#[inline(never)]
unsafe fn copy_sse2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let blocks = len / 64;
    let mut i = 0;
    while i < blocks {
        let off = i * 64;
        // SAFETY: `off + 64 <= len`, so all four 16-byte loads and stores are inside the
        // ranges the caller vouched for; unaligned loads and stores have no alignment
        // requirement. SSE2 is part of the x86_64 baseline.
        unsafe {
            let s = src.add(off) as *const __m128i;
            let d = dst.add(off) as *mut __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_storeu_si128(d, a);
            _mm_storeu_si128(d.add(1), b);
            _mm_storeu_si128(d.add(2), c);
            _mm_storeu_si128(d.add(3), e);
        }
        i += 1;
    }
    let done = blocks * 64;
    // SAFETY: the tail `done..len` is inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), len - done) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_exactly() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0, 1, 63, 64, 65, 2047, 2048, 2049, 4096 + 17, 9000] {
            for shift in [0, 1, 13] {
                let mut dst = vec![0u8; 9000 + 16];
                // SAFETY: both buffers are local, distinct and long enough.
                unsafe { copy_bytes(dst.as_mut_ptr().add(shift), src.as_ptr(), len) };
                assert_eq!(&dst[shift..shift + len], &src[..len], "len {len} shift {shift}");
                assert!(dst[..shift].iter().all(|&b| b == 0));
                assert!(dst[shift + len..].iter().all(|&b| b == 0));
            }
        }
    }
}
