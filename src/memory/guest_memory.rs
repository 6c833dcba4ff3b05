//! An anonymous, private mapping that holds a guest's RAM.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::commit::{commit_range, Committer, PART_BYTES};
use crate::units::{PageIndex, PAGE_SIZE};

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not a whole number of pages.
    #[error("guest memory size {bytes} is not a non-zero multiple of {PAGE_SIZE}")]
    BadSize {
        /// The size asked for.
        bytes: u64,
    },
    /// mmap refused the mapping.
    #[error("mmap of {bytes} bytes failed: {source}")]
    Map {
        /// The size asked for.
        bytes: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// A page index outside the mapping.
    #[error("page {index} is outside guest memory of {pages} pages")]
    OutOfRange {
        /// The page asked for.
        index: u64,
        /// Pages in the mapping.
        pages: u64,
    },
}

/// A guest's RAM: an anonymous mapping shared by the guest's own threads (the workload or
/// vCPUs) and the VMM's threads (data plane, digests).
///
/// Like the memory of a real VM, it is written by the guest while the VMM reads it; torn reads of
/// a page being written are expected and harmless, because the write marks the page dirty and
/// the page is sent again in a later round or after the pause.
///
/// Those racing reads are plain copies, as in every VMM, not the volatile accesses that
/// vm-memory uses: Rust's memory model gives a read that races with a guest store no defined
/// result, and the code relies on the compiler treating each copy of a page as opaque (it does:
/// the pointer comes from mmap, and no copy is read twice). Every result taken with the guest
/// running is re-checked with the guest paused (the last dirty round, verification).
#[derive(Debug)]
pub struct GuestMemory {
    base: NonNull<u8>,
    len: usize,
    /// Commits the pages in the background (see [`GuestMemory::new_committing`]).
    committer: Option<Committer>,
}

// SAFETY: the mapping belongs to this value alone (only `Drop` unmaps it), and nothing about it
// is tied to the thread that made it; the raw pointer is what keeps the auto trait away.
unsafe impl Send for GuestMemory {}
// SAFETY: every method takes `&self` and reaches the memory through bounds-checked raw pointers
// or views that do not outlive the call, so sharing the value shares nothing more than the
// bytes, whose concurrent use by guest and VMM is the point (see the type's doc).
unsafe impl Sync for GuestMemory {}

/// Mappings at least this large are committed by several threads.
const POPULATE_PARALLEL_BYTES: usize = 64 << 20;
/// Most threads committing one mapping: page faults on one mm stop scaling beyond a few.
const POPULATE_THREADS: usize = 4;

impl GuestMemory {
    /// Maps `bytes` of zeroed, private, anonymous memory. Pages are committed on first touch.
    pub fn new(bytes: u64) -> Result<Self, MemoryError> {
        Self::map(bytes, false, false)
    }

    /// Maps `bytes` and commits every page now: what a reservation wants, so that a host that
    /// cannot back the VM fails at reservation, and pages arriving later do not each pay a page
    /// fault on the receive path. Large mappings are committed by several threads (see
    /// `populate`).
    pub fn new_populated(bytes: u64) -> Result<Self, MemoryError> {
        Self::map(bytes, true, true)
    }

    /// Maps `bytes` for an incoming VM and commits its pages in the background, from the first
    /// to the last, while they arrive: the reservation answers at once instead of after the
    /// kernel has zeroed every page. The memory is charged to the host as committed (no
    /// MAP_NORESERVE), so a host under strict overcommit refuses here; a commit that fails later
    /// shows in [`GuestMemory::wait_committed`], which the receiver calls before it accepts
    /// the switchover.
    pub fn new_committing(bytes: u64) -> Result<Self, MemoryError> {
        let mut memory = Self::map(bytes, true, false)?;
        let (base, len) = (memory.base.as_ptr() as usize, memory.len);
        // SAFETY: base/len are this fresh mapping; `Drop` stops the committer before unmapping.
        let committer = unsafe { Committer::start(base, len) }.map_err(|source| MemoryError::Map { bytes, source })?;
        memory.committer = Some(committer);
        Ok(memory)
    }

    /// Waits until every page is committed (at once for memory not committed in the background).
    /// Blocking: call off the actor thread.
    pub fn wait_committed(&self) -> Result<(), MemoryError> {
        match &self.committer {
            None => Ok(()),
            Some(c) => c.wait().map_err(|detail| MemoryError::Map {
                bytes: self.len as u64,
                source: std::io::Error::other(detail),
            }),
        }
    }

    /// True unless a background commit is still running.
    pub fn committed(&self) -> bool {
        self.committer.as_ref().is_none_or(Committer::finished)
    }

    /// `charge`: account the mapping as committed (no MAP_NORESERVE); `populate`: commit it now.
    fn map(bytes: u64, charge: bool, populate: bool) -> Result<Self, MemoryError> {
        if bytes == 0 || bytes % PAGE_SIZE as u64 != 0 || bytes > isize::MAX as u64 {
            return Err(MemoryError::BadSize { bytes });
        }
        let len = bytes as usize;
        // SAFETY: with a null hint and no MAP_FIXED, mmap only creates a new mapping and never
        // replaces an existing one; the result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if charge { 0 } else { libc::MAP_NORESERVE },
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Map {
            bytes,
            source: std::io::Error::other("mmap returned null"),
        })?;
        let memory = Self {
            base,
            len,
            committer: None,
        };
        if populate {
            // On failure, dropping `memory` unmaps it.
            memory.populate().map_err(|source| MemoryError::Map { bytes, source })?;
        }
        Ok(memory)
    }

    /// Commits every page with MADV_POPULATE_WRITE, split over up to [`POPULATE_THREADS`]
    /// threads for a large mapping. Committing is the kernel zeroing each page, one 4 KiB fault
    /// at a time: for 256 MiB that took 105-125 ms on one thread on the bench host (more than
    /// the whole transfer), about 60-80 ms on two. Unlike MAP_POPULATE, which ignores failures,
    /// this reports a host that cannot commit the memory. A kernel older than 5.14 (no
    /// MADV_POPULATE_WRITE) gets the pages committed by writing a zero to each.
    fn populate(&self) -> std::io::Result<()> {
        let threads = if self.len >= POPULATE_PARALLEL_BYTES {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(POPULATE_THREADS)
        } else {
            1
        };
        let per = (self.len / PAGE_SIZE).div_ceil(threads) * PAGE_SIZE;
        let (base, len) = (self.base.as_ptr() as usize, self.len);
        // SAFETY: [base + start, base + start + n) lies inside this mapping, which outlives every
        // thread of the scope below, and the mapping is fresh: nothing has been written to it.
        let commit_part = move |start: usize, n: usize| unsafe { commit_range(base, start, n, true) }.map(|_| ());
        // In parts: with one madvise per share, the second thread was seen (perf, strace) to
        // start committing only once the first thread's call had returned. A thread starting up
        // takes the mmap lock for writing (to map its stacks), which waits behind a reader
        // holding it for the whole call; short calls let it in.
        let commit = move |start: usize| -> std::io::Result<()> {
            let end = (start + per).min(len);
            (start..end)
                .step_by(PART_BYTES)
                .try_for_each(|at| commit_part(at, PART_BYTES.min(end - at)))
        };
        std::thread::scope(|s| {
            let others: Vec<_> = (1..threads)
                .map(|i| i * per)
                .filter(|&start| start < len)
                .map(|start| {
                    std::thread::Builder::new()
                        .name("migratory-populate".into())
                        .spawn_scoped(s, move || commit(start))
                        // No thread to be had: this one commits that part too.
                        .map_err(|_| start)
                })
                .collect();
            let mut result = commit(0);
            for other in others {
                let r = match other {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("populate thread panicked"))),
                    Err(start) => commit(start),
                };
                result = result.and(r);
            }
            result
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// The first byte of the mapping, for a hypervisor to map into a guest or register for
    /// demand paging. The pointer is valid for [`Self::len`] bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The first byte of page `index`; see [`Self::as_ptr`].
    pub fn page_ptr(&self, index: PageIndex) -> Result<*mut u8, MemoryError> {
        if index.0 >= self.page_count() {
            return Err(MemoryError::OutOfRange {
                index: index.0,
                pages: self.page_count(),
            });
        }
        // SAFETY: index < page_count, so the offset (at most `len - PAGE_SIZE`, and `map`
        // keeps `len` within isize::MAX) stays inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(index.0 as usize * PAGE_SIZE) })
    }

    /// Copies page `index` into `dst` (exactly one page long).
    pub fn read_page(&self, index: PageIndex, dst: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.page_ptr(index)?;
        assert_eq!(dst.len(), PAGE_SIZE, "read_page needs a page-sized buffer");
        // SAFETY: `src` is a whole page inside the live mapping. `dst` is a `&mut` of one page,
        // so it cannot lie in the mapping (this type never hands out a `&mut` into it). A guest
        // store during the copy tears it; see the type's doc.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    }

    /// Overwrites page `index` with `src` (exactly one page long).
    pub fn write_page(&self, index: PageIndex, src: &[u8]) -> Result<(), MemoryError> {
        let dst = self.page_ptr(index)?;
        assert_eq!(src.len(), PAGE_SIZE, "write_page needs a page-sized buffer");
        // SAFETY: `dst` is a whole page inside the live mapping, and no Rust reference into it
        // is live: the only views are `with_page`'s, which never reach this call, so `src`
        // (one page, checked above) does not overlap it either.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE) };
        Ok(())
    }

    /// Fills page `index` with zeros.
    pub fn zero_page(&self, index: PageIndex) -> Result<(), MemoryError> {
        let dst = self.page_ptr(index)?;
        // SAFETY: `dst` is a whole page inside the live mapping, and no Rust reference into it
        // is live (as in `write_page`).
        unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE) };
        Ok(())
    }

    /// Runs `f` over a momentary view of page `index`. The view may change under `f` if the
    /// guest writes concurrently; callers use it for scans and digests whose staleness is
    /// covered by dirty tracking.
    fn with_page<R>(&self, index: PageIndex, f: impl FnOnce(&[u8]) -> R) -> Result<R, MemoryError> {
        let p = self.page_ptr(index)?;
        // SAFETY: `p` is a whole page inside the mapping, which outlives the slice (it does not
        // escape `f`), and anonymous memory is always initialised (zero until written). A
        // guest store while `f` reads shows up as a torn page; see the type's doc.
        let page = unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) };
        Ok(f(page))
    }

    /// Appends page `index` to `buf`: the one copy from guest memory into a frame.
    pub fn append_page(&self, index: PageIndex, buf: &mut bytes::BytesMut) -> Result<(), MemoryError> {
        self.with_page(index, |page| buf.extend_from_slice(page))
    }

    /// True if the page holds only zeros.
    pub fn page_is_zero(&self, index: PageIndex) -> Result<bool, MemoryError> {
        self.with_page(index, is_zero)
    }

    /// A 64-bit digest of the page's bytes.
    pub fn page_digest(&self, index: PageIndex) -> Result<u64, MemoryError> {
        self.with_page(index, xxh3_64)
    }

    /// Atomically stores one 64-bit word at `word` (0..512) of page `index`: the unit of a
    /// simulated guest write.
    pub fn store_word(&self, index: PageIndex, word: usize, value: u64) -> Result<(), MemoryError> {
        let p = self.page_ptr(index)?;
        let word = word % (PAGE_SIZE / 8);
        // SAFETY: the page start is page-aligned (mmap is), so p + 8*word is 8-byte aligned and
        // inside the page; AtomicU64 has the layout of u64, and the reference lives for this
        // call only. A reader copying the page meanwhile races with the store (see the type's
        // doc); two stores to one word do not, being atomic.
        let cell = unsafe { &*(p.add(word * 8) as *const AtomicU64) };
        cell.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Fills memory with non-zero pseudo-random content, leaving about `zero_fraction` of the
    /// pages zero, deterministically from `seed`.
    pub fn fill_pseudo_random(&self, seed: u64, zero_fraction: f64) -> Result<(), MemoryError> {
        let zero_per_million = (zero_fraction.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        let mut rng = SplitMix64::new(seed);
        let mut buf = vec![0u8; PAGE_SIZE];
        for i in 0..self.page_count() {
            if rng.next() % 1_000_000 < zero_per_million {
                continue; // fresh anonymous memory is already zero
            }
            for chunk in buf.chunks_exact_mut(8) {
                // `| 1` keeps every word non-zero so a data page is never mistaken for zero.
                chunk.copy_from_slice(&(rng.next() | 1).to_le_bytes());
            }
            self.write_page(PageIndex(i), &buf)?;
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        if let Some(c) = &self.committer {
            c.stop();
        }
        // SAFETY: base/len are exactly the mapping made in `map`, unmapped once, here; `&mut
        // self` proves no view into it is live. Users outside Rust (a KVM memory slot, vCPU
        // threads, a userfaultfd registration) are torn down first by the guest that owns both.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// True if every byte of `page` is zero; word-wise for speed.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0)
}

/// A tiny deterministic generator (SplitMix64) for guest content and workload choices; no
/// cryptographic quality needed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 pseudo-random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fill_leaves_requested_zero_fraction() {
        let m = GuestMemory::new(1024 * PAGE_SIZE as u64).expect("map");
        m.fill_pseudo_random(7, 0.25).expect("fill");
        let zeros = (0..m.page_count())
            .filter(|&i| m.page_is_zero(PageIndex(i)).expect("in range"))
            .count();
        assert!((180..330).contains(&zeros), "zero pages: {zeros}");
    }

    #[test]
    fn test_page_round_trip_and_digest() {
        let m = GuestMemory::new(4 * PAGE_SIZE as u64).expect("map");
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        m.write_page(PageIndex(2), &page).expect("write");
        let mut out = vec![0; PAGE_SIZE];
        m.read_page(PageIndex(2), &mut out).expect("read");
        assert_eq!(out, page);
        assert_eq!(m.page_digest(PageIndex(2)).expect("digest"), xxh3_64(&page));
        assert!(m.page_is_zero(PageIndex(1)).expect("zero"));
        m.store_word(PageIndex(1), 3, 9).expect("store");
        assert!(!m.page_is_zero(PageIndex(1)).expect("zero"));
    }

    #[test]
    fn test_rejects_out_of_range_and_bad_sizes() {
        assert!(matches!(GuestMemory::new(0), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestMemory::new(100), Err(MemoryError::BadSize { .. })));
        let m = GuestMemory::new(PAGE_SIZE as u64).expect("map");
        assert!(matches!(
            m.page_digest(PageIndex(1)),
            Err(MemoryError::OutOfRange { index: 1, pages: 1 })
        ));
    }
}
