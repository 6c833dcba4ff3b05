//! The sim guest: memory, dirty bitmap, native vCPU state and the writer thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::writer::{WorkloadState, WORKLOAD_DEVICE, WORKLOAD_DEVICE_VERSION};
use crate::dirty::{AtomicBitmap, DirtyLogSource, PageSet};
use crate::format::{DeviceState, NativeLayout, NativeVcpu, VcpuState, VmConfig};
use crate::memory::GuestMemory;
use crate::telemetry::metric;
use crate::units::PageIndex;
use crate::vmm::{FaultSink, Guest, GuestStats, MemoryCommit, VmmError, WorkloadSpec};

/// Longest a writer burst holds the run lock; bounds how long `pause` can wait.
const MAX_BURST_PAGES: u64 = 2048;
/// [`Inner::awaited`] when the writer waits for no page.
const NOT_WAITING: u64 = u64::MAX;
/// Tick of the writer's rate control.
const TICK: Duration = Duration::from_millis(1);
/// A waiting access re-sends its fault after this long (the first request may have been lost
/// with a link).
const FAULT_RESEND: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct RunState {
    running: bool,
    stop: bool,
    /// Instant and write count at the last resume: the writer's rate is measured from there.
    epoch: Option<(Instant, u64)>,
}

#[derive(Debug)]
struct Inner {
    config: VmConfig,
    layout: NativeLayout,
    memory: GuestMemory,
    dirty: AtomicBitmap,
    missing: AtomicBitmap,
    claimed: AtomicBitmap,
    missing_count: AtomicU64,
    /// The page the writer is waiting for (`NOT_WAITING` when none): an install wakes it only
    /// for that page, not for every page of every push batch.
    awaited: AtomicU64,
    run: Mutex<RunState>,
    wake: Condvar,
    workload: Mutex<WorkloadState>,
    vcpus: Mutex<Vec<NativeVcpu>>,
    /// Device blobs of a foreign backend's VM this sim holds without running them.
    parked: Mutex<Option<Vec<DeviceState>>>,
    /// Writes already folded into the vCPU state by `advance`.
    advanced: AtomicU64,
    faults: Mutex<Option<FaultSink>>,
    writes: AtomicU64,
    fault_count: AtomicU64,
    fault_wait_ns: AtomicU64,
}

/// A synthetic guest with real memory; see the module doc.
#[derive(Debug)]
pub struct SimGuest {
    inner: Arc<Inner>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic on a guest thread is a bug we still want to surface as state, not as a second panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimGuest {
    /// Creates a guest with memory filled per `workload` (paused; call [`Guest::resume`]).
    pub fn create(config: VmConfig, layout: NativeLayout, workload: WorkloadSpec) -> Result<Self, VmmError> {
        let memory = GuestMemory::new(config.memory_bytes)?;
        let guest = Self::build(config, layout, workload, memory)?;
        guest
            .inner
            .memory
            .fill_pseudo_random(workload.seed, workload.zero_fraction)?;
        Ok(guest)
    }

    /// Creates an empty (all-zero) guest that waits for incoming state: a reservation.
    /// Its memory is committed in the background while pages arrive (see
    /// [`GuestMemory::new_committing`]) or up front, as `commit` says.
    pub fn reserve(config: VmConfig, layout: NativeLayout, commit: MemoryCommit) -> Result<Self, VmmError> {
        let memory = match commit {
            MemoryCommit::Background => GuestMemory::new_committing(config.memory_bytes)?,
            MemoryCommit::UpFront | MemoryCommit::OnDemand => GuestMemory::new_populated(config.memory_bytes)?,
        };
        Self::build(config, layout, WorkloadSpec::idle(), memory)
    }

    fn build(
        config: VmConfig,
        layout: NativeLayout,
        workload: WorkloadSpec,
        memory: GuestMemory,
    ) -> Result<Self, VmmError> {
        let pages = memory.page_count();
        let vcpus = (0..config.vcpus)
            .map(|i| NativeVcpu::from_common(layout, &VcpuState::initial_long_mode(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VmmError::Conversion { layout, source })?;
        let inner = Arc::new(Inner {
            config,
            layout,
            memory,
            dirty: AtomicBitmap::new(pages),
            missing: AtomicBitmap::new(pages),
            claimed: AtomicBitmap::new(pages),
            missing_count: AtomicU64::new(0),
            awaited: AtomicU64::new(NOT_WAITING),
            run: Mutex::new(RunState {
                running: false,
                stop: false,
                epoch: None,
            }),
            wake: Condvar::new(),
            workload: Mutex::new(WorkloadState::new(workload)),
            vcpus: Mutex::new(vcpus),
            parked: Mutex::new(None),
            advanced: AtomicU64::new(0),
            faults: Mutex::new(None),
            writes: AtomicU64::new(0),
            fault_count: AtomicU64::new(0),
            fault_wait_ns: AtomicU64::new(0),
        });
        let thread_inner = Arc::clone(&inner);
        let writer = std::thread::Builder::new()
            .name(crate::vmm::guest_thread_name("sim-writer", &inner.config.id))
            .spawn(move || writer_loop(&thread_inner))
            .map_err(VmmError::Thread)?;
        Ok(Self {
            inner,
            writer: Mutex::new(Some(writer)),
        })
    }
}

impl DirtyLogSource for SimGuest {
    fn dirty_bitmap(&self) -> &AtomicBitmap {
        &self.inner.dirty
    }
}

impl Guest for SimGuest {
    fn config(&self) -> &VmConfig {
        &self.inner.config
    }

    fn layout(&self) -> NativeLayout {
        self.inner.layout
    }

    fn memory(&self) -> &GuestMemory {
        &self.inner.memory
    }

    fn resume(&self) -> Result<(), VmmError> {
        let mut run = lock(&self.inner.run);
        if run.stop {
            return Err(VmmError::WrongState {
                actual: "shut down",
                needed: "paused",
            });
        }
        run.running = true;
        run.epoch = Some((Instant::now(), self.inner.writes.load(Ordering::Relaxed)));
        self.inner.wake.notify_all();
        Ok(())
    }

    fn pause(&self) -> Result<(), VmmError> {
        // Taking the run lock waits for the writer's current burst: once we hold it, no store
        // is in flight, and the writer re-checks `running` before its next one.
        let mut run = lock(&self.inner.run);
        run.running = false;
        self.inner.wake.notify_all();
        drop(run);
        self.fold_progress_into_vcpus();
        Ok(())
    }

    fn is_running(&self) -> bool {
        lock(&self.inner.run).running
    }

    fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        self.fold_progress_into_vcpus();
        let layout = self.inner.layout;
        lock(&self.inner.vcpus)
            .iter()
            .map(|v| v.to_common().map_err(|source| VmmError::Conversion { layout, source }))
            .collect()
    }

    fn load_vcpus(&self, vcpus: &[VcpuState]) -> Result<(), VmmError> {
        if vcpus.len() != self.inner.config.vcpus as usize {
            return Err(VmmError::StateMismatch {
                detail: format!("{} vCPUs for a VM of {}", vcpus.len(), self.inner.config.vcpus),
            });
        }
        let layout = self.inner.layout;
        let native = vcpus
            .iter()
            .map(|v| NativeVcpu::from_common(layout, v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VmmError::Conversion { layout, source })?;
        *lock(&self.inner.vcpus) = native;
        self.inner
            .advanced
            .store(self.inner.writes.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(())
    }

    fn save_devices(&self) -> Result<Vec<DeviceState>, VmmError> {
        if let Some(parked) = lock(&self.inner.parked).clone() {
            return Ok(parked);
        }
        Ok(vec![DeviceState {
            name: WORKLOAD_DEVICE.to_string(),
            version: WORKLOAD_DEVICE_VERSION,
            data: lock(&self.inner.workload).to_blob(),
        }])
    }

    fn load_devices(&self, devices: &[DeviceState]) -> Result<(), VmmError> {
        let ours = devices.iter().any(|d| d.name == WORKLOAD_DEVICE);
        if !ours && !devices.is_empty() {
            // A VM from another backend (a kvm guest, say): the sim cannot run its devices,
            // but it can hold the VM — memory, vCPU state and these blobs, verbatim — and hand
            // it on. Its own writer stays idle, so the guest's memory is left as it came.
            *lock(&self.inner.parked) = Some(devices.to_vec());
            return Ok(());
        }
        for d in devices {
            if d.name != WORKLOAD_DEVICE || d.version != WORKLOAD_DEVICE_VERSION {
                return Err(VmmError::UnsupportedDevice {
                    name: d.name.clone(),
                    version: d.version,
                });
            }
            *lock(&self.inner.workload) = WorkloadState::from_blob(&d.data)?;
        }
        Ok(())
    }

    fn begin_demand_paging(&self, missing: &PageSet, faults: FaultSink) -> Result<(), VmmError> {
        if missing.universe() != self.inner.memory.page_count() {
            return Err(VmmError::StateMismatch {
                detail: format!(
                    "missing-page set over {} pages for a VM of {}",
                    missing.universe(),
                    self.inner.memory.page_count()
                ),
            });
        }
        *lock(&self.inner.faults) = Some(faults);
        self.inner.claimed.clear_all();
        self.inner.missing.clear_all();
        self.inner.missing.set_from(missing);
        self.inner.missing_count.store(missing.len(), Ordering::SeqCst);
        Ok(())
    }

    fn claim_page(&self, page: u64) -> bool {
        self.inner.missing.get(page) && !self.inner.claimed.test_and_set(page)
    }

    fn page_installed(&self, page: u64) {
        self.inner.missing.clear(page);
        self.inner.missing_count.fetch_sub(1, Ordering::SeqCst);
        if self.inner.awaited.load(Ordering::SeqCst) == page {
            let _run = lock(&self.inner.run);
            self.inner.wake.notify_all();
        }
    }

    fn missing_pages(&self) -> u64 {
        self.inner.missing_count.load(Ordering::SeqCst)
    }

    fn missing_set(&self) -> PageSet {
        self.inner.missing.snapshot()
    }

    fn stats(&self) -> GuestStats {
        GuestStats {
            writes: self.inner.writes.load(Ordering::Relaxed),
            faults: self.inner.fault_count.load(Ordering::Relaxed),
            fault_wait_s: self.inner.fault_wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
            ..GuestStats::default()
        }
    }

    fn shutdown(&self) {
        {
            let mut run = lock(&self.inner.run);
            run.stop = true;
            run.running = false;
            self.inner.wake.notify_all();
        }
        if let Some(h) = lock(&self.writer).take() {
            // A writer that panicked has nothing left to clean up.
            let _ = h.join();
        }
        *lock(&self.inner.faults) = None;
    }
}

impl SimGuest {
    /// Folds the writes made since the last fold into the native vCPU state, as if the vCPUs
    /// had executed them.
    fn fold_progress_into_vcpus(&self) {
        let writes = self.inner.writes.load(Ordering::Relaxed);
        let before = self.inner.advanced.swap(writes, Ordering::Relaxed);
        let delta = writes.saturating_sub(before);
        if delta > 0 {
            for v in lock(&self.inner.vcpus).iter_mut() {
                v.advance(delta);
            }
        }
    }
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The writer: bursts of stores at the configured rate while running.
fn writer_loop(inner: &Inner) {
    let pages = inner.memory.page_count();
    loop {
        let mut run = lock(&inner.run);
        while !run.running && !run.stop {
            run = inner.wake.wait(run).unwrap_or_else(|p| p.into_inner());
        }
        if run.stop {
            return;
        }
        let mut workload = lock(&inner.workload);
        let pps = workload.spec.pages_per_sec();
        let due = match run.epoch {
            Some((t0, w0)) => {
                let target = (t0.elapsed().as_secs_f64() * pps) as u64;
                target.saturating_sub(inner.writes.load(Ordering::Relaxed).saturating_sub(w0))
            }
            None => 0,
        };
        let mut n = due.min(MAX_BURST_PAGES);
        while n > 0 {
            let (page, word) = workload.next_target(pages);
            if inner.missing.get(page) {
                let (r, ok) = wait_for_page(inner, run, page);
                run = r;
                if !ok {
                    break;
                }
            }
            workload.counter += 1;
            // Marked before and after the store, as a hypervisor's write fault marks a page before
            // the write lands: a reader that sees the new bytes always sees the mark too (the
            // target's check of pages its guest did not write, which once reported a page
            // whose writer was preempted between store and mark), and the mark after the store
            // means a source drain between the two cannot lose the write.
            let value = workload.counter | (1 << 63);
            inner.dirty.set(page);
            if inner.memory.store_word(PageIndex(page), word, value).is_err() {
                break;
            }
            inner.dirty.set(page);
            inner.writes.fetch_add(1, Ordering::Relaxed);
            n -= 1;
        }
        drop(workload);
        drop(run);
        std::thread::sleep(TICK);
    }
}

/// Post-copy: blocks the writer until `page` is installed, the guest is paused, or it stops.
/// Returns the run lock and whether the page is now present.
fn wait_for_page<'a>(
    inner: &'a Inner,
    mut run: MutexGuard<'a, RunState>,
    page: u64,
) -> (MutexGuard<'a, RunState>, bool) {
    let started = Instant::now();
    inner.fault_count.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(metric::POSTCOPY_FAULTS_TOTAL).increment(1);
    inner.awaited.store(page, Ordering::SeqCst);
    let mut last_request: Option<Instant> = None;
    while inner.missing.get(page) && run.running && !run.stop {
        if last_request.is_none_or(|t| t.elapsed() >= FAULT_RESEND) {
            if let Some(sink) = lock(&inner.faults).as_ref() {
                // A closed sink means the receiver is gone; the wait ends on pause or stop.
                let _ = sink.send(page);
            }
            last_request = Some(Instant::now());
        }
        run = inner
            .wake
            .wait_timeout(run, Duration::from_millis(5))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    inner.awaited.store(NOT_WAITING, Ordering::SeqCst);
    let present = !inner.missing.get(page);
    if present {
        let waited = started.elapsed();
        inner
            .fault_wait_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        metrics::histogram!(metric::POSTCOPY_FAULT_LATENCY_SECONDS).record(waited.as_secs_f64());
    }
    let ok = present && run.running && !run.stop;
    (run, ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{MacAddr, NicConfig, VmId};
    use crate::vmm::Pattern;

    const WAIT: Duration = Duration::from_secs(10);

    fn config(pages: u64) -> VmConfig {
        VmConfig {
            id: VmId("t".into()),
            name: "t".into(),
            vcpus: 1,
            memory_bytes: pages * crate::units::PAGE_SIZE as u64,
            page_size: crate::units::PAGE_SIZE as u32,
            nics: vec![NicConfig {
                id: "net0".into(),
                mac: MacAddr::local_from_seed(1),
            }],
        }
    }

    fn busy() -> WorkloadSpec {
        WorkloadSpec {
            rate_bytes_per_sec: 400_000_000,
            working_set_bytes: 64 * 4096,
            pattern: Pattern::HotSet,
            zero_fraction: 0.0,
            seed: 5,
        }
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < WAIT, "condition not reached");
            std::thread::yield_now();
        }
    }

    #[test]
    fn test_pause_really_stops_the_writer() {
        let g = SimGuest::create(config(256), NativeLayout::Kvm, busy()).expect("guest");
        g.resume().expect("resume");
        wait_until(|| g.stats().writes > 1000);
        g.pause().expect("pause");
        let writes = g.stats().writes;
        let digest: Vec<u64> = (0..256)
            .map(|p| g.memory().page_digest(PageIndex(p)).expect("page"))
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.stats().writes, writes, "no write after pause returned");
        let again: Vec<u64> = (0..256)
            .map(|p| g.memory().page_digest(PageIndex(p)).expect("page"))
            .collect();
        assert_eq!(digest, again, "memory unchanged while paused");
        // The vCPU state moved with the writes, in the native layout.
        assert_ne!(g.save_vcpus().expect("save")[0], VcpuState::initial_long_mode(0));
    }

    #[test]
    fn test_missing_page_blocks_the_writer_until_installed() {
        let g = SimGuest::create(config(64), NativeLayout::XenHvm, busy()).expect("guest");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        g.begin_demand_paging(&PageSet::full(64), tx).expect("arm");
        g.resume().expect("resume");
        let first = rx.blocking_recv().expect("a fault is reported");
        assert!(first < 64);
        assert_eq!(g.stats().writes, 0, "nothing written while every page is missing");
        assert!(g.claim_page(first), "first claim wins");
        assert!(!g.claim_page(first), "a duplicate is refused");
        g.page_installed(first);
        // Install the rest; the writer then runs freely.
        for p in 0..64 {
            if g.claim_page(p) {
                g.page_installed(p);
            }
        }
        assert_eq!(g.missing_pages(), 0);
        wait_until(|| g.stats().writes > 100);
        assert!(g.stats().faults >= 1);
    }
}
