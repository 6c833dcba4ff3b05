//! Post-copy demand paging of a kvm guest's RAM with userfaultfd.
//!
//! The target's RAM is a populated anonymous mapping (reservations commit memory up front).
//! [`DemandPaging::begin`] drops the missing pages from it and registers the whole mapping with
//! a userfaultfd in MISSING mode, so a vCPU (inside `KVM_RUN`) or any VMM thread touching a
//! missing page sleeps in the kernel. A fault thread reads those faults and asks the engine for
//! the page; installs go through `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`, which write the page and wake
//! the sleepers in one step. A plain store would not do: it would fault like the vCPU did.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::uffd::{discard, Userfault};
use crate::dirty::{AtomicBitmap, PageSet};
use crate::memory::GuestMemory;
use crate::units::{PageIndex, PAGE_SIZE};
use crate::vmm::{FaultSink, VmmError};

/// A waiting fault is asked for again after this long: the first request may have been lost
/// with a link that post-copy recovery later replaced.
const FAULT_RESEND: Duration = Duration::from_millis(200);
/// How long the fault thread waits for a fault before checking whether it should stop.
const FAULT_POLL: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared by the installers and the fault thread.
#[derive(Debug)]
struct Shared {
    base: usize,
    pages: u64,
    missing: AtomicBitmap,
    claimed: AtomicBitmap,
    missing_count: AtomicU64,
    /// Pages a thread is waiting for: when first asked and when last asked.
    waiting: Mutex<HashMap<u64, (Instant, Instant)>>,
    sink: Mutex<Option<FaultSink>>,
    faults: AtomicU64,
    fault_wait_ns: AtomicU64,
}

#[derive(Debug)]
struct Active {
    uffd: Arc<Userfault>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Demand paging of one guest's RAM; idle until [`DemandPaging::begin`].
#[derive(Debug)]
pub struct DemandPaging {
    shared: Arc<Shared>,
    active: Mutex<Option<Active>>,
}

impl DemandPaging {
    /// Idle demand paging over `memory`.
    pub fn new(memory: &GuestMemory) -> Self {
        let pages = memory.page_count();
        Self {
            shared: Arc::new(Shared {
                base: memory.as_ptr() as usize,
                pages,
                missing: AtomicBitmap::new(pages),
                claimed: AtomicBitmap::new(pages),
                missing_count: AtomicU64::new(0),
                waiting: Mutex::new(HashMap::new()),
                sink: Mutex::new(None),
                faults: AtomicU64::new(0),
                fault_wait_ns: AtomicU64::new(0),
            }),
            active: Mutex::new(None),
        }
    }

    /// Makes `missing` absent from `memory` and starts serving faults on them to `sink`.
    /// The guest must be paused (its vCPUs not yet run on this host).
    pub fn begin(&self, memory: &GuestMemory, missing: &PageSet, sink: FaultSink) -> Result<(), VmmError> {
        let s = &self.shared;
        if missing.universe() != s.pages {
            return Err(VmmError::StateMismatch {
                detail: format!(
                    "missing-page set over {} pages for a VM of {}",
                    missing.universe(),
                    s.pages
                ),
            });
        }
        let mut active = lock(&self.active);
        if active.is_some() {
            return Err(VmmError::WrongState {
                actual: "demand paging",
                needed: "all pages present",
            });
        }
        *lock(&s.sink) = Some(sink);
        s.claimed.clear_all();
        s.missing.clear_all();
        s.missing.set_from(missing);
        s.missing_count.store(missing.len(), Ordering::SeqCst);
        if missing.is_empty() {
            return Ok(());
        }
        let uffd = Arc::new(Userfault::new().map_err(|e| VmmError::Failed(format!("userfaultfd: {e}")))?);
        // SAFETY: the whole mapping is private, anonymous and owned by the guest, which keeps it
        // alive past `finish` (the registration ends there or with the descriptor). A thread
        // that touches a missing page (the vCPU, a digest) waits for its install: post-copy.
        unsafe { uffd.register(memory.as_ptr(), memory.len()) }
            .map_err(|e| VmmError::Failed(format!("userfaultfd register: {e}")))?;
        // Registered first, dropped second: a touch in between would otherwise map a zero page
        // that never faults.
        for (first, count) in runs(missing) {
            let at = memory.page_ptr(PageIndex(first))?;
            // SAFETY: the run lies inside `memory`, a private anonymous mapping this guest owns;
            // no Rust reference into guest RAM outlives a `GuestMemory` call, and the guest has
            // not run here, so dropping these pages loses nothing.
            unsafe { discard(at, count as usize * PAGE_SIZE) }.map_err(|e| VmmError::Failed(e.to_string()))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (uffd, stop, shared) = (Arc::clone(&uffd), Arc::clone(&stop), Arc::clone(s));
            std::thread::Builder::new()
                .name("kvm-uffd".into())
                .spawn(move || fault_loop(&uffd, &stop, &shared))
                .map_err(VmmError::Thread)?
        };
        *active = Some(Active {
            uffd,
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Claims a missing page for installation; see [`crate::vmm::Guest::claim_page`].
    pub fn claim(&self, page: u64) -> bool {
        page < self.shared.pages && self.shared.missing.get(page) && !self.shared.claimed.test_and_set(page)
    }

    /// Writes a claimed page (`None`: zeros) and wakes whoever waits for it.
    pub fn install(&self, memory: &GuestMemory, page: u64, data: Option<&[u8]>) -> Result<(), VmmError> {
        let dst = memory.page_ptr(PageIndex(page))?;
        let uffd = lock(&self.active).as_ref().map(|a| Arc::clone(&a.uffd));
        match uffd {
            Some(uffd) => {
                let res = match data {
                    // SAFETY: `dst` is a page of the registered mapping with no Rust reference
                    // into it; `bytes` is a network buffer, never registered guest RAM.
                    Some(bytes) => unsafe { uffd.copy(dst, bytes) },
                    // SAFETY: `dst` is a page of the registered mapping with no Rust reference
                    // into it; a zero-page install reads no source.
                    None => unsafe { uffd.zero(dst, PAGE_SIZE) },
                };
                res.map_err(|e| VmmError::Failed(format!("install page {page}: {e}")))?;
            }
            None => match data {
                Some(bytes) => memory.write_page(PageIndex(page), bytes)?,
                None => memory.zero_page(PageIndex(page))?,
            },
        }
        self.installed(page);
        Ok(())
    }

    /// Bookkeeping of an installed page; ends demand paging after the last one.
    pub fn installed(&self, page: u64) {
        let s = &self.shared;
        s.missing.clear(page);
        if let Some((first, _)) = lock(&s.waiting).remove(&page) {
            s.faults.fetch_add(1, Ordering::Relaxed);
            s.fault_wait_ns
                .fetch_add(first.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if s.missing_count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.finish();
        }
    }

    /// Pages still missing.
    pub fn missing_pages(&self) -> u64 {
        self.shared.missing_count.load(Ordering::SeqCst)
    }

    /// The set of pages still missing.
    pub fn missing_set(&self) -> PageSet {
        self.shared.missing.snapshot()
    }

    /// Faults served, and the seconds they waited in all.
    pub fn fault_stats(&self) -> (u64, f64) {
        (
            self.shared.faults.load(Ordering::Relaxed),
            self.shared.fault_wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }

    /// Stops the fault thread and unregisters the mapping.
    pub fn finish(&self) {
        let (base, len) = (self.shared.base, self.shared.pages as usize * PAGE_SIZE);
        let taken = lock(&self.active).take();
        if let Some(mut a) = taken {
            a.stop.store(true, Ordering::Release);
            if let Some(t) = a.thread.take() {
                // The fault thread may be the caller (it never installs), so never join self.
                if t.thread().id() != std::thread::current().id() {
                    let _ = t.join();
                }
            }
            if let Err(e) = a.uffd.unregister(base as *mut u8, len) {
                tracing::warn!(error = %e, "userfaultfd unregister");
            }
        }
        *lock(&self.shared.sink) = None;
    }
}

impl Drop for DemandPaging {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Checks that this host can demand-page a kvm guest: a userfaultfd opens (one that takes
/// KVM's kernel-mode faults, see [`Userfault::new`]) and registers anonymous memory with the
/// ioctls an install needs. What [`DemandPaging::begin`] does, on one page of memory that no
/// thread touches.
pub fn check_demand_paging() -> Result<(), VmmError> {
    let probe = GuestMemory::new(PAGE_SIZE as u64)?;
    let uffd = Userfault::new().map_err(|e| VmmError::Failed(format!("userfaultfd: {e}")))?;
    // SAFETY: `probe` is a private anonymous mapping owned here, declared before `uffd` so that
    // it outlives the registration; no thread touches it, so none can block on a fault.
    unsafe { uffd.register(probe.as_ptr(), probe.len()) }
        .map_err(|e| VmmError::Failed(format!("userfaultfd register: {e}")))?;
    uffd.unregister(probe.as_ptr(), probe.len())
        .map_err(|e| VmmError::Failed(format!("userfaultfd unregister: {e}")))
}

/// Runs of consecutive pages in `set`, as (first page, count).
fn runs(set: &PageSet) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in set.iter() {
        match out.last_mut() {
            Some((first, count)) if *first + *count == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

fn fault_loop(uffd: &Userfault, stop: &AtomicBool, s: &Shared) {
    let mut last_resend = Instant::now();
    while !stop.load(Ordering::Acquire) {
        match uffd.wait_fault(FAULT_POLL) {
            Ok(Some(addr)) => {
                let page = (addr as usize).wrapping_sub(s.base) as u64 / PAGE_SIZE as u64;
                if page < s.pages && s.missing.get(page) {
                    let now = Instant::now();
                    let fresh = lock(&s.waiting).insert(page, (now, now)).is_none();
                    if fresh {
                        ask(s, page);
                    }
                } else {
                    // Installed between the fault and this read: the install woke it already,
                    // but a wake costs nothing and rules out a sleeper left behind.
                    let _ = uffd.wake(addr as *mut u8, PAGE_SIZE);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "userfaultfd read");
                std::thread::sleep(FAULT_POLL);
            }
        }
        if last_resend.elapsed() >= FAULT_RESEND {
            last_resend = Instant::now();
            let again: Vec<u64> = lock(&s.waiting)
                .iter_mut()
                .filter(|(p, (_, last))| s.missing.get(**p) && last.elapsed() >= FAULT_RESEND)
                .map(|(p, (_, last))| {
                    *last = Instant::now();
                    *p
                })
                .collect();
            for p in again {
                ask(s, p);
            }
        }
    }
}

fn ask(s: &Shared, page: u64) {
    if let Some(sink) = lock(&s.sink).as_ref() {
        // A closed sink means the migration is over or recovering; the resend covers it.
        let _ = sink.send(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_runs_coalesce_neighbours() {
        let mut set = PageSet::empty(64);
        for p in [1, 2, 3, 7, 9, 10] {
            set.insert(p);
        }
        assert_eq!(runs(&set), vec![(1, 3), (7, 1), (9, 2)]);
    }

    #[test]
    fn test_the_check_agrees_with_beginning_demand_paging() {
        let memory = GuestMemory::new_populated(4 * PAGE_SIZE as u64).expect("memory");
        let mut missing = PageSet::empty(4);
        missing.insert(1);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let began = DemandPaging::new(&memory).begin(&memory, &missing, tx);
        let checked = check_demand_paging();
        assert_eq!(checked.is_ok(), began.is_ok(), "check {checked:?}, begin {began:?}");
    }

    #[test]
    fn test_a_reader_waits_for_the_install() {
        let memory = GuestMemory::new_populated(16 * PAGE_SIZE as u64).expect("memory");
        memory.write_page(PageIndex(5), &[7u8; PAGE_SIZE]).expect("write");
        let demand = DemandPaging::new(&memory);
        let mut missing = PageSet::empty(16);
        missing.insert(5);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) = demand.begin(&memory, &missing, tx) {
            println!("SKIPPED: userfaultfd not available: {e}");
            return;
        }
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| memory.page_digest(PageIndex(5)).expect("digest"));
            let asked = rx.blocking_recv().expect("fault reported");
            assert_eq!(asked, 5);
            assert!(demand.claim(5));
            assert!(!demand.claim(5), "a page is claimed once");
            demand.install(&memory, 5, Some(&[9u8; PAGE_SIZE])).expect("install");
            let digest = reader.join().expect("reader");
            assert_eq!(
                digest,
                xxhash_rust::xxh3::xxh3_64(&[9u8; PAGE_SIZE]),
                "the old content was dropped"
            );
        });
        assert_eq!(demand.missing_pages(), 0);
        assert_eq!(demand.fault_stats().0, 1);
    }
}
