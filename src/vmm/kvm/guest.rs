//! A kvm guest: one KVM VM with its RAM, vCPU threads, dirty log and demand paging, running
//! the self-checking program of [`super::program`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::boot::{setup_long_mode, write_boot_tables};
use super::demand::DemandPaging;
use super::program::{
    assemble, data_base, read_header_params, HeaderError, ProgramPattern, ProgramSpec, CODE_ADDR, LEDGER_ADDR,
    MAX_TSC_TICKS_PER_BATCH, PATTERN_RANDOM, STACK_TOP, VMM_PACES_CPUID_LEAF, VMM_PACES_SIGNATURE,
};
use super::state::supported_msrs;
use super::vcpu::{GuestReport, VcpuThread};
use crate::dirty::{AtomicBitmap, DirtyError, DirtyLogSource, PageSet};
use crate::format::native::kvm::KvmVcpu;
use crate::format::native::qemu as qemu_layout;
use crate::format::{DeviceState, NativeLayout, NativeVcpu, VcpuState, VmConfig, LAPIC_REGISTER_BYTES};
use crate::memory::GuestMemory;
use crate::units::PAGE_SIZE;
use crate::vmm::{FaultSink, Guest, GuestStats, MemoryCommit, Pattern, VmmError, WorkloadSpec};

/// Device blob carrying what the VMM (not the guest) knows: the pacing and the program's shape.
pub const KVM_GUEST_DEVICE: &str = "kvm-guest";
/// Version of [`KVM_GUEST_DEVICE`]'s layout: five little-endian u64s (see `Pacing::to_blob`).
pub const KVM_GUEST_DEVICE_VERSION: u32 = 1;
const KVM_GUEST_BLOB_LEN: usize = 5 * 8;
/// The TSS KVM needs on Intel hosts: three pages just below the 4 GiB boundary's BIOS area.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// How long creation waits for the guest's init pass (it writes its whole working set once).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Offset of the APIC timer's current-count register: it counts down even while the vCPU is
/// stopped, so a read-back never matches the loaded page there.
const APIC_TIMER_CURRENT_COUNT: usize = 0x390;
/// A verify pass roughly every this many seconds of writing.
const VERIFY_PERIOD_S: f64 = 0.5;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hv(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Hypervisor {
        op,
        detail: e.to_string(),
    }
}

/// What the VMM carries with the VM: the write rate it paces the guest to and the shape of the
/// program (for reports; the program itself travels in guest memory). A kvm guest carries it as
/// the [`KVM_GUEST_DEVICE`] blob; the guest's header holds the same ([`Pacing::from_guest_memory`])
/// for a guest that arrives without one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// Bytes of pages per second the guest may write.
    pub rate_bytes_per_sec: u64,
    /// The program's working set.
    pub working_set_pages: u64,
    /// Pages per batch (one port exit each).
    pub batch_pages: u32,
    /// Batches between verify passes.
    pub verify_every_batches: u32,
    /// 0 sequential, 1 random.
    pub pattern: u32,
}

impl Pacing {
    /// The pacing the program recorded in its state header when it booted, checked (see
    /// [`read_header_params`]): what a guest that arrives without a [`KVM_GUEST_DEVICE`] blob
    /// (from QEMU) resumes with. Reads guest memory, so on a post-copy target call it only once
    /// the header page is there.
    pub fn from_guest_memory(mem: &GuestMemoryMmap<()>) -> Result<Pacing, HeaderError> {
        let params = read_header_params(mem)?;
        Ok(Pacing {
            rate_bytes_per_sec: params.rate_bytes_per_sec,
            working_set_pages: params.working_set_pages,
            batch_pages: params.batch_pages,
            verify_every_batches: params.verify_every_batches,
            pattern: u32::from(params.pattern == PATTERN_RANDOM),
        })
    }

    fn pages_per_sec(&self) -> f64 {
        self.rate_bytes_per_sec as f64 / PAGE_SIZE as f64
    }

    fn to_blob(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(KVM_GUEST_BLOB_LEN);
        for v in [
            self.rate_bytes_per_sec,
            self.working_set_pages,
            u64::from(self.batch_pages),
            u64::from(self.verify_every_batches),
            u64::from(self.pattern),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn from_blob(b: &[u8]) -> Option<Self> {
        if b.len() != KVM_GUEST_BLOB_LEN {
            return None;
        }
        let f = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some(Self {
            rate_bytes_per_sec: f(0),
            working_set_pages: f(1),
            batch_pages: u32::try_from(f(2)).ok()?,
            verify_every_batches: u32::try_from(f(3)).ok()?,
            pattern: u32::try_from(f(4)).ok()?,
        })
    }
}

/// The program a workload asks for, fitted to `memory_bytes`.
pub fn program_for(workload: &WorkloadSpec, memory_bytes: u64) -> Result<(ProgramSpec, Pacing), VmmError> {
    let fits = |w: u64| {
        let spec = ProgramSpec {
            working_set_pages: w,
            batch_pages: 1,
            verify_every_batches: 1,
            pattern: ProgramPattern::Sequential,
            rate_bytes_per_sec: 0,
            tsc_ticks_per_batch: 0,
        };
        data_base(&spec) + w * PAGE_SIZE as u64 <= memory_bytes
    };
    // Largest working set the RAM holds with its ledger: start from the estimate and step down
    // over the 2 MiB alignment of the data area.
    let mut max = memory_bytes.saturating_sub(LEDGER_ADDR) / (PAGE_SIZE as u64 + 8);
    while max > 0 && !fits(max) {
        max -= max.div_ceil(64).max(1);
    }
    if max == 0 {
        return Err(VmmError::StateMismatch {
            detail: format!("{memory_bytes} bytes of RAM leave no room for the kvm guest program (8 MiB at least)"),
        });
    }
    let wanted = match workload.pattern {
        Pattern::Uniform => max,
        Pattern::HotSet | Pattern::Sequential => (workload.working_set_bytes / PAGE_SIZE as u64).max(1),
    };
    let w = wanted.min(max);
    let pps = workload.pages_per_sec();
    // About one port exit per millisecond at the rate: often enough to pace smoothly, rarely
    // enough that exits cost little.
    let batch_pages = (pps / 1000.0).clamp(1.0, 64.0) as u32;
    let verify_every_batches = ((pps * VERIFY_PERIOD_S) / f64::from(batch_pages)).clamp(1.0, 1e6) as u32;
    let pattern = match workload.pattern {
        Pattern::Sequential => ProgramPattern::Sequential,
        Pattern::Uniform | Pattern::HotSet => ProgramPattern::Random {
            seed: workload.seed | 1,
        },
    };
    let spec = ProgramSpec {
        working_set_pages: w,
        batch_pages,
        verify_every_batches,
        pattern,
        rate_bytes_per_sec: workload.rate_bytes_per_sec,
        tsc_ticks_per_batch: tsc_ticks_per_batch(workload.rate_bytes_per_sec, batch_pages, tsc_hz()),
    };
    let pacing = Pacing {
        rate_bytes_per_sec: workload.rate_bytes_per_sec,
        working_set_pages: w,
        batch_pages,
        verify_every_batches,
        pattern: u32::from(matches!(pattern, ProgramPattern::Random { .. })),
    };
    Ok((spec, pacing))
}

/// TSC ticks in which a batch of `batch_pages` keeps to `rate_bytes_per_sec`; 0 (no
/// self-pacing) for a rate or TSC rate of 0, capped at [`MAX_TSC_TICKS_PER_BATCH`].
fn tsc_ticks_per_batch(rate_bytes_per_sec: u64, batch_pages: u32, tsc_hz: u64) -> u64 {
    if rate_bytes_per_sec == 0 {
        return 0;
    }
    let bytes = u128::from(batch_pages) * PAGE_SIZE as u128;
    let ticks = bytes * u128::from(tsc_hz) / u128::from(rate_bytes_per_sec);
    u64::try_from(ticks).unwrap_or(u64::MAX).min(MAX_TSC_TICKS_PER_BATCH)
}

/// The host's TSC rate, measured once per process (50 ms): the guest's TSC runs at it under
/// KVM, and QEMU TCG's at the host's too.
fn tsc_hz() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(crate::qemu::host_tsc_hz)
}

/// The CPUID table for the guest: what KVM supports, plus the leaf that tells the program its
/// VMM paces it (see [`super::program`], "Pacing"), so it never spins under this backend.
pub(super) fn guest_cpuid(kvm: &Kvm) -> Result<CpuId, VmmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(hv("KVM_GET_SUPPORTED_CPUID"))?;
    let mut entries = supported.as_slice().to_vec();
    entries.retain(|e| e.function != VMM_PACES_CPUID_LEAF);
    let [ebx, ecx, edx] = VMM_PACES_SIGNATURE;
    entries.push(kvm_cpuid_entry2 {
        function: VMM_PACES_CPUID_LEAF,
        // The leaf is the top of its range of 256 (KVM answers leaves above a range's top with
        // another leaf's values).
        eax: VMM_PACES_CPUID_LEAF,
        ebx,
        ecx,
        edx,
        ..Default::default()
    });
    CpuId::from_entries(&entries).map_err(|e| VmmError::Hypervisor {
        op: "building the guest's CPUID",
        detail: format!("{e:?}"),
    })
}

/// Opens /dev/kvm; the error says why a host cannot run kvm guests.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(hv("open /dev/kvm"))
}

/// True when this host can run kvm guests.
pub fn kvm_available() -> bool {
    open_kvm().is_ok()
}

/// A guest on /dev/kvm; see the module doc.
pub struct KvmGuest {
    config: VmConfig,
    report: Arc<GuestReport>,
    /// `None` on a reserved guest until a [`KVM_GUEST_DEVICE`] blob arrives; if none does, the
    /// first resume reads it from the guest's header.
    pacing: Mutex<Option<Pacing>>,
    running: AtomicBool,
    /// vCPU state as of the last pause or load: a stopped vCPU's state, read once, so that the
    /// TSC and APIC timer do not drift between the pause and the save.
    paused_state: Mutex<Option<Vec<VcpuState>>>,
    dirty: AtomicBitmap,
    logging: Mutex<bool>,
    demand: DemandPaging,
    /// The MSRs this VM carries (the vCPU threads read and write these).
    msrs: Arc<Vec<u32>>,
    vcpus: Vec<VcpuThread>,
    vm: VmFd,
    _kvm: Kvm,
    view: Arc<GuestMemoryMmap<()>>,
    // Last: the VM, the vCPU threads and the view above all point into this mapping.
    memory: GuestMemory,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("id", &self.config.id)
            .field("running", &self.running.load(Ordering::Relaxed))
            .finish()
    }
}

impl KvmGuest {
    /// Boots a new guest running the program for `workload`, and waits for its init pass.
    pub fn create(config: VmConfig, workload: WorkloadSpec) -> Result<Self, VmmError> {
        let (spec, pacing) = program_for(&workload, config.memory_bytes)?;
        let code = assemble(&spec).map_err(|e| VmmError::Failed(format!("guest program: {e}")))?;
        let memory = GuestMemory::new(config.memory_bytes)?;
        let guest = Self::build(config, Some(pacing), memory, true)?;
        write_boot_tables(&guest.view, guest.memory.len() as u64)
            .map_err(|e| VmmError::Failed(format!("boot tables: {e}")))?;
        guest
            .view
            .write_slice(&code, GuestAddress(CODE_ADDR))
            .map_err(|e| VmmError::Failed(format!("loading the guest program: {e}")))?;
        guest.resume()?;
        guest.wait_ready()?;
        Ok(guest)
    }

    /// An empty, paused guest waiting for an incoming migration: vCPUs created, nothing
    /// loaded, RAM committed as `commit` says; on demand means not at all (post-copy brings
    /// every page through userfaultfd, which needs them absent; committing them now would
    /// mean dropping them again at the switchover, inside the downtime: about 90 ms per GiB
    /// here). Demand paging waits for a background commit first.
    pub fn reserve(config: VmConfig, commit: MemoryCommit) -> Result<Self, VmmError> {
        let memory = match commit {
            MemoryCommit::OnDemand => GuestMemory::new(config.memory_bytes)?,
            MemoryCommit::Background => GuestMemory::new_committing(config.memory_bytes)?,
            MemoryCommit::UpFront => GuestMemory::new_populated(config.memory_bytes)?,
        };
        Self::build(config, None, memory, false)
    }

    /// The VM, its RAM and paused vCPU threads; `boot` points the vCPUs at the program.
    fn build(config: VmConfig, pacing: Option<Pacing>, memory: GuestMemory, boot: bool) -> Result<Self, VmmError> {
        if config.vcpus != 1 {
            return Err(VmmError::StateMismatch {
                detail: format!("the kvm backend runs 1-vCPU guests; this VM has {}", config.vcpus),
            });
        }
        let kvm = open_kvm()?;
        let vm = kvm.create_vm().map_err(hv("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS).map_err(hv("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(hv("KVM_CREATE_IRQCHIP"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.len() as u64,
            userspace_addr: memory.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr..+memory_size` is exactly `memory`'s live mapping, which
        // outlives the VM: in `Self` the VM and the vCPU threads are fields before `memory`, and
        // on an early return below, `memory` is a parameter, dropped after every local. Slot 0
        // is this VM's only slot, so it overlaps no other.
        unsafe { vm.set_user_memory_region(region) }.map_err(hv("KVM_SET_USER_MEMORY_REGION"))?;
        // SAFETY: the raw region is exactly `memory`'s mapping, present in the process and
        // alive for longer than the view (as for the VM above); a raw region never unmaps it.
        let raw = unsafe {
            MmapRegion::build_raw(
                memory.as_ptr(),
                memory.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|e| VmmError::Failed(format!("guest memory view: {e}")))?;
        let view = GuestRegionMmap::new(raw, GuestAddress(0))
            .and_then(|r| GuestMemoryMmap::from_regions(vec![r]).ok())
            .ok_or_else(|| VmmError::Failed("guest memory view".into()))?;
        let view = Arc::new(view);
        let msrs = Arc::new(supported_msrs(&kvm).map_err(|e| VmmError::Failed(e.to_string()))?);
        let cpuid = guest_cpuid(&kvm)?;
        let report = Arc::new(GuestReport::new());
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(id)).map_err(hv("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(hv("KVM_SET_CPUID2"))?;
            if boot {
                setup_long_mode(&fd, CODE_ADDR, STACK_TOP).map_err(|e| VmmError::Failed(format!("boot: {e}")))?;
            }
            let name = crate::vmm::guest_thread_name(&format!("kvm-vcpu{id}"), &config.id);
            let thread = VcpuThread::spawn(id, fd, Arc::clone(&msrs), Arc::clone(&view), Arc::clone(&report), name)
                .map_err(|e| VmmError::Failed(e.to_string()))?;
            vcpus.push(thread);
        }
        let pages = memory.page_count();
        Ok(Self {
            demand: DemandPaging::new(&memory),
            config,
            report,
            pacing: Mutex::new(pacing),
            running: AtomicBool::new(false),
            paused_state: Mutex::new(None),
            dirty: AtomicBitmap::new(pages),
            logging: Mutex::new(false),
            msrs,
            vcpus,
            vm,
            _kvm: kvm,
            view,
            memory,
        })
    }

    fn wait_ready(&self) -> Result<(), VmmError> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !self.report.ready.load(Ordering::Acquire) {
            if let Some(why) = self.report.crash_reason() {
                return Err(VmmError::Failed(format!("guest failed to boot: {why}")));
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Failed(format!(
                    "guest did not finish booting in {BOOT_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// What the guest has reported about itself.
    pub fn report(&self) -> &GuestReport {
        &self.report
    }

    /// The guest's pacing: the one it was created or loaded with, else the one its header
    /// records (a guest that arrived without a [`KVM_GUEST_DEVICE`] blob).
    pub fn pacing(&self) -> Result<Pacing, VmmError> {
        let mut pacing = lock(&self.pacing);
        if let Some(p) = *pacing {
            return Ok(p);
        }
        let p = Pacing::from_guest_memory(&self.view).map_err(|e| VmmError::StateMismatch {
            detail: format!("no {KVM_GUEST_DEVICE} device, and the guest's header gives no pacing: {e}"),
        })?;
        tracing::debug!(vm = %self.config.id, ?p, "pacing read from the guest's header");
        *pacing = Some(p);
        Ok(p)
    }

    /// Guest RAM as rust-vmm's `GuestMemory`, for tools that address it by guest address.
    pub fn guest_ram(&self) -> &GuestMemoryMmap<()> {
        &self.view
    }

    fn to_common(&self, native: Vec<KvmVcpu>) -> Result<Vec<VcpuState>, VmmError> {
        native
            .into_iter()
            .map(|v| {
                v.to_common().map_err(|source| VmmError::Conversion {
                    layout: NativeLayout::Kvm,
                    source,
                })
            })
            .collect()
    }

    fn capture_all(&self) -> Result<Vec<VcpuState>, VmmError> {
        let native = self
            .vcpus
            .iter()
            .map(|v| v.save().map_err(|e| VmmError::Failed(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        self.to_common(native)
    }

    fn set_logging(&self, on: bool) -> Result<(), DirtyError> {
        let mut logging = lock(&self.logging);
        if *logging == on {
            return Ok(());
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: self.memory.len() as u64,
            userspace_addr: self.memory.as_ptr() as u64,
        };
        // SAFETY: the same slot over the same live mapping as at creation (`self.memory`, which
        // outlives `self.vm`); only the flags change.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| DirtyError::Log(e.to_string()))?;
        *logging = on;
        Ok(())
    }

    fn fetch_log(&self) -> Result<PageSet, DirtyError> {
        let words = self
            .vm
            .get_dirty_log(0, self.memory.len())
            .map_err(|e| DirtyError::Log(e.to_string()))?;
        Ok(PageSet::from_words(words, self.memory.page_count()))
    }
}

impl DirtyLogSource for KvmGuest {
    fn dirty_bitmap(&self) -> &AtomicBitmap {
        &self.dirty
    }

    fn start_dirty_log(&self) -> Result<(), DirtyError> {
        self.set_logging(true)?;
        // Fetching clears KVM's log and re-protects every page: the round starts now.
        self.fetch_log()?;
        self.dirty.clear_all();
        Ok(())
    }

    fn sync_dirty_log(&self) -> Result<(), DirtyError> {
        if *lock(&self.logging) {
            let set = self.fetch_log()?;
            self.dirty.set_from(&set);
        }
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<(), DirtyError> {
        self.set_logging(false)
    }
}

impl Guest for KvmGuest {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    fn layout(&self) -> NativeLayout {
        NativeLayout::Kvm
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn resume(&self) -> Result<(), VmmError> {
        if let Some(why) = self.report.crash_reason() {
            return Err(VmmError::Failed(format!("guest has stopped: {why}")));
        }
        let pps = self.pacing()?.pages_per_sec();
        for v in &self.vcpus {
            v.run(pps).map_err(|e| VmmError::Failed(e.to_string()))?;
        }
        *lock(&self.paused_state) = None;
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    fn pause(&self) -> Result<(), VmmError> {
        for v in &self.vcpus {
            v.pause().map_err(|e| VmmError::Failed(e.to_string()))?;
        }
        self.running.store(false, Ordering::Release);
        let states = self.capture_all()?;
        *lock(&self.paused_state) = Some(states);
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        if self.is_running() {
            return Err(VmmError::WrongState {
                actual: "running",
                needed: "paused",
            });
        }
        if let Some(s) = lock(&self.paused_state).clone() {
            return Ok(s);
        }
        self.capture_all()
    }

    fn load_vcpus(&self, vcpus: &[VcpuState]) -> Result<(), VmmError> {
        if vcpus.len() != self.vcpus.len() {
            return Err(VmmError::StateMismatch {
                detail: format!("{} vCPUs for a VM of {}", vcpus.len(), self.vcpus.len()),
            });
        }
        let mut fitted = Vec::with_capacity(vcpus.len());
        for (thread, state) in self.vcpus.iter().zip(vcpus) {
            fitted.push(fit_msrs(state, &self.msrs)?);
            let state = fitted.last().unwrap_or(state);
            let native = match NativeVcpu::from_common(NativeLayout::Kvm, state) {
                Ok(NativeVcpu::Kvm(k)) => k,
                Ok(_) => unreachable!("from_common(Kvm) builds a Kvm vCPU"),
                Err(source) => {
                    return Err(VmmError::Conversion {
                        layout: NativeLayout::Kvm,
                        source,
                    })
                }
            };
            thread
                .load(native.clone())
                .map_err(|e| VmmError::StateMismatch { detail: e.to_string() })?;
            // Read it back: KVM silently adjusts what it cannot take, and a state that did not
            // land as sent must fail here, not as a guest that misbehaves later.
            let back = thread.save().map_err(|e| VmmError::Failed(e.to_string()))?;
            if let Some(field) = first_difference(&native, &back) {
                let field = if field == "the MSRs" {
                    msr_difference(&native, &back)
                } else {
                    field.to_string()
                };
                return Err(VmmError::StateMismatch {
                    detail: format!("vCPU {}: KVM did not take {field} as sent", state.id),
                });
            }
        }
        *lock(&self.paused_state) = Some(fitted);
        Ok(())
    }

    fn save_devices(&self) -> Result<Vec<DeviceState>, VmmError> {
        Ok(vec![DeviceState {
            name: KVM_GUEST_DEVICE.to_string(),
            version: KVM_GUEST_DEVICE_VERSION,
            data: self.pacing()?.to_blob(),
        }])
    }

    fn load_devices(&self, devices: &[DeviceState]) -> Result<(), VmmError> {
        for d in devices {
            if d.name != KVM_GUEST_DEVICE || d.version != KVM_GUEST_DEVICE_VERSION {
                return Err(VmmError::UnsupportedDevice {
                    name: d.name.clone(),
                    version: d.version,
                });
            }
            let pacing = Pacing::from_blob(&d.data).ok_or_else(|| VmmError::MalformedDevice {
                name: d.name.clone(),
                len: d.data.len(),
            })?;
            *lock(&self.pacing) = Some(pacing);
        }
        Ok(())
    }

    fn begin_demand_paging(&self, missing: &PageSet, faults: FaultSink) -> Result<(), VmmError> {
        // Demand paging drops the missing pages for userfaultfd to fill: a background commit
        // still running would fault them back in as zeros, and no fault would ever come.
        self.memory.wait_committed()?;
        self.demand.begin(&self.memory, missing, faults)
    }

    fn claim_page(&self, page: u64) -> bool {
        self.demand.claim(page)
    }

    fn page_installed(&self, page: u64) {
        self.demand.installed(page);
    }

    fn install_page(&self, page: u64, data: Option<&[u8]>) -> Result<(), VmmError> {
        self.demand.install(&self.memory, page, data)
    }

    fn missing_pages(&self) -> u64 {
        self.demand.missing_pages()
    }

    fn missing_set(&self) -> PageSet {
        self.demand.missing_set()
    }

    fn stats(&self) -> GuestStats {
        let (faults, fault_wait_s) = self.demand.fault_stats();
        GuestStats {
            writes: self.report.progress.load(Ordering::Relaxed),
            faults,
            fault_wait_s,
            verify_passes: self.report.verify_passes.load(Ordering::Relaxed),
            integrity_errors: self.report.mismatches.load(Ordering::Relaxed),
        }
    }

    fn shutdown(&self) {
        self.running.store(false, Ordering::Release);
        for v in &self.vcpus {
            v.stop();
        }
        self.demand.finish();
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The first part of two vCPU states that differs, ignoring what moves on its own while the
/// vCPU is stopped (the TSC, the APIC timer's count).
/// `MSR_KVM_POLL_CONTROL`, whose reset value is 1 (host-side halt polling on).
const MSR_KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
/// `IA32_MCG_CAP`: what the CPU model offers, not state the guest set.
const MSR_MCG_CAP: u32 = 0x179;
/// `IA32_MTRR_DEF_TYPE` and its enable bit.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;

/// The MTRRs: variable ranges, fixed ranges, default type.
fn is_mtrr(index: u32) -> bool {
    matches!(index, 0x200..=0x20f | 0x250 | 0x258 | 0x259 | 0x268..=0x26f | MSR_MTRR_DEF_TYPE)
}

/// `state` with the MSRs this VM does not carry left out, when leaving them out loses
/// nothing: another hypervisor (QEMU) sends its paravirtual, machine-check, MTRR and PMU MSRs,
/// which a guest that never touched them holds at their reset values. One that holds anything
/// else is refused by name, so that no state is silently dropped.
fn fit_msrs(state: &VcpuState, carried: &[u32]) -> Result<VcpuState, VmmError> {
    // With MTRRs disabled (MTRRdefType.E clear) the ranges have no effect, whatever they hold;
    // KVM reports the masks of unused ranges with their address bits set.
    let mtrrs_off = state
        .msrs
        .iter()
        .find(|m| m.index == MSR_MTRR_DEF_TYPE)
        .is_none_or(|m| m.value & MTRR_ENABLE == 0);
    let at_reset = |index: u32, value: u64| {
        value == 0
            || index == MSR_MCG_CAP
            || (index == MSR_KVM_POLL_CONTROL && value == 1)
            || (mtrrs_off && is_mtrr(index))
    };
    if let Some(m) = state
        .msrs
        .iter()
        .find(|m| !carried.contains(&m.index) && !at_reset(m.index, m.value))
    {
        return Err(VmmError::StateMismatch {
            detail: format!(
                "vCPU {}: MSR {:#x} = {:#x} is state the kvm backend does not carry",
                state.id, m.index, m.value
            ),
        });
    }
    let mut fitted = state.clone();
    fitted.msrs.retain(|m| carried.contains(&m.index));
    Ok(fitted)
}

/// Which MSRs KVM did not take as sent, for the error.
fn msr_difference(sent: &KvmVcpu, back: &KvmVcpu) -> String {
    let differ: Vec<String> = sent
        .msrs
        .iter()
        .filter(|m| m.index != crate::format::msr_index::TSC)
        .filter(|m| back.msrs.iter().find(|b| b.index == m.index).map(|b| b.data) != Some(m.data))
        .map(|m| {
            let got = back.msrs.iter().find(|b| b.index == m.index).map(|b| b.data);
            format!("MSR {:#x} ({:#x}, read back {got:x?})", m.index, m.data)
        })
        .collect();
    if differ.is_empty() {
        format!("the MSR list ({} sent, {} read back)", sent.msrs.len(), back.msrs.len())
    } else {
        differ.join(", ")
    }
}

fn first_difference(a: &KvmVcpu, b: &KvmVcpu) -> Option<&'static str> {
    let steady = |v: &KvmVcpu| {
        let mut v = v.clone();
        for m in &mut v.msrs {
            if m.index == crate::format::msr_index::TSC {
                m.data = 0;
            }
        }
        if v.lapic.len() == LAPIC_REGISTER_BYTES {
            v.lapic[APIC_TIMER_CURRENT_COUNT..APIC_TIMER_CURRENT_COUNT + 4].fill(0);
            // Registers KVM computes (version, PPR, ...) are not state a load can set.
            qemu_layout::lapic::normalise_page(&mut v.lapic);
        }
        if v.xsave.len() == qemu_layout::xsave::QEMU_XSAVE_BYTES {
            // Nor are MXCSR_MASK and the reserved bytes of the image, which KVM fills itself.
            qemu_layout::xsave::normalise_image(&mut v.xsave);
        }
        v
    };
    let (a, b) = (steady(a), steady(b));
    if a.regs != b.regs {
        Some("the general registers")
    } else if a.sregs != b.sregs {
        Some("the special registers")
    } else if a.msrs != b.msrs {
        Some("the MSRs")
    } else if a.xsave != b.xsave {
        Some("the xsave area")
    } else if a.events != b.events {
        Some("the pending events")
    } else if a.lapic != b.lapic {
        Some("the local APIC page")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::program::parse_debugcon_line;
    use super::*;
    use crate::format::{MacAddr, NicConfig, VmId};
    use crate::units::PageIndex;

    const MIB: u64 = 1 << 20;

    fn config(name: &str, bytes: u64) -> VmConfig {
        VmConfig {
            id: VmId(name.into()),
            name: name.into(),
            vcpus: 1,
            memory_bytes: bytes,
            page_size: PAGE_SIZE as u32,
            nics: vec![NicConfig {
                id: "net0".into(),
                mac: MacAddr::local_from_seed(1),
            }],
        }
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn test_a_guest_moved_by_hand_keeps_counting_and_checking() {
        if !kvm_available() {
            println!("SKIPPED: /dev/kvm not available");
            return;
        }
        let workload = WorkloadSpec {
            rate_bytes_per_sec: 40 * MIB,
            working_set_bytes: 4 * MIB,
            pattern: Pattern::HotSet,
            ..WorkloadSpec::default()
        };
        let src = KvmGuest::create(config("by-hand", 16 * MIB), workload).expect("create");
        wait_until("verify passes on the source", || src.stats().verify_passes >= 2);
        src.pause().expect("pause");
        let stopped = src.stats().writes;
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(src.stats().writes, stopped, "a paused guest writes nothing");

        let dst = KvmGuest::reserve(config("by-hand", 16 * MIB), MemoryCommit::Background).expect("reserve");
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..src.memory().page_count() {
            src.memory().read_page(PageIndex(p), &mut page).expect("read");
            dst.memory().write_page(PageIndex(p), &page).expect("write");
        }
        let vcpus = src.save_vcpus().expect("save");
        dst.load_vcpus(&vcpus).expect("load");
        dst.load_devices(&src.save_devices().expect("devices"))
            .expect("load devices");
        assert_eq!(dst.save_vcpus().expect("save back"), vcpus);
        src.shutdown();
        dst.resume().expect("resume");
        wait_until("progress on the target", || dst.stats().writes > stopped + 1000);
        let passes = dst.stats().verify_passes;
        wait_until("a verify pass on the target", || dst.stats().verify_passes > passes);
        assert_eq!(dst.stats().integrity_errors, 0, "the guest found its memory intact");
        assert!(dst.report().crash_reason().is_none());
    }

    #[test]
    fn test_ticks_per_batch_follow_rate_and_tsc() {
        // 16 pages (64 KiB) at 64 MiB/s: a batch per 1/1024 s, 2.048 M ticks at 2.097152 GHz.
        assert_eq!(tsc_ticks_per_batch(64 * MIB, 16, 2_097_152_000), 2_048_000);
        assert_eq!(tsc_ticks_per_batch(0, 16, 2_000_000_000), 0, "rate 0: no self-pacing");
        assert_eq!(tsc_ticks_per_batch(64 * MIB, 16, 0), 0, "no TSC rate: no self-pacing");
        assert_eq!(tsc_ticks_per_batch(1, u32::MAX, u64::MAX), MAX_TSC_TICKS_PER_BATCH);
    }

    #[test]
    fn test_debugcon_lines_reach_the_guest_report() {
        if !kvm_available() {
            println!("SKIPPED: /dev/kvm not available");
            return;
        }
        let workload = WorkloadSpec {
            rate_bytes_per_sec: 20 * MIB,
            working_set_bytes: 2 * MIB,
            pattern: Pattern::HotSet,
            ..WorkloadSpec::default()
        };
        let g = KvmGuest::create(config("debugcon", 16 * MIB), workload).expect("create");
        // Ready, then a pass line per verify pass.
        wait_until("two pass lines", || {
            g.report().debugcon_lines.load(Ordering::Acquire) >= 3
        });
        g.pause().expect("pause");
        let line = g.report().last_debugcon_line().expect("a line");
        let report = parse_debugcon_line(&line).unwrap_or_else(|| panic!("{line:?} does not parse"));
        let stats = g.stats();
        assert!(report.pass >= 2, "{line}");
        assert!(u64::from(report.pass) <= stats.verify_passes, "{line} vs {stats:?}");
        assert!(
            report.progress > 0 && report.progress <= stats.writes,
            "{line} vs {stats:?}"
        );
        assert_eq!(report.mismatches, 0, "{line}");
    }

    #[test]
    fn test_a_guest_without_a_pacing_blob_resumes_with_its_header_pacing() {
        if !kvm_available() {
            println!("SKIPPED: /dev/kvm not available");
            return;
        }
        let workload = WorkloadSpec {
            rate_bytes_per_sec: 24 * MIB,
            working_set_bytes: 3 * MIB,
            pattern: Pattern::Sequential,
            ..WorkloadSpec::default()
        };
        let src = KvmGuest::create(config("no-blob", 16 * MIB), workload).expect("create");
        wait_until("a verify pass on the source", || src.stats().verify_passes >= 1);
        src.pause().expect("pause");
        let sent = src.pacing().expect("pacing");
        assert_eq!(Pacing::from_guest_memory(src.guest_ram()).expect("header"), sent);

        // As from QEMU: memory and registers, no device blob.
        let dst = KvmGuest::reserve(config("no-blob", 16 * MIB), MemoryCommit::Background).expect("reserve");
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..src.memory().page_count() {
            src.memory().read_page(PageIndex(p), &mut page).expect("read");
            dst.memory().write_page(PageIndex(p), &page).expect("write");
        }
        dst.load_vcpus(&src.save_vcpus().expect("save")).expect("load");
        dst.load_devices(&[]).expect("no devices");
        src.shutdown();
        let stopped = src.stats().writes;
        dst.resume().expect("resume");
        assert_eq!(dst.pacing().expect("pacing"), sent);
        assert_eq!(
            dst.save_devices().expect("devices"),
            src.save_devices().expect("devices"),
            "the blob it would carry on"
        );
        wait_until("progress on the target", || dst.stats().writes > stopped + 1000);
        let passes = dst.stats().verify_passes;
        wait_until("a verify pass on the target", || dst.stats().verify_passes > passes);
        assert_eq!(dst.stats().integrity_errors, 0);

        // Memory that holds no program's header gives no pacing, and no resume.
        let empty = KvmGuest::reserve(config("empty", 16 * MIB), MemoryCommit::Background).expect("reserve");
        let error = empty.resume().unwrap_err();
        assert!(format!("{error}").contains("magic"), "{error}");
    }

    #[test]
    fn test_dirty_log_sees_guest_writes() {
        if !kvm_available() {
            println!("SKIPPED: /dev/kvm not available");
            return;
        }
        let workload = WorkloadSpec {
            rate_bytes_per_sec: 20 * MIB,
            working_set_bytes: 2 * MIB,
            pattern: Pattern::Sequential,
            ..WorkloadSpec::default()
        };
        let g = KvmGuest::create(config("dirty", 16 * MIB), workload).expect("create");
        g.start_dirty_log().expect("start");
        std::thread::sleep(Duration::from_millis(100));
        g.sync_dirty_log().expect("sync");
        let dirty = g.dirty_bitmap().drain();
        let (spec, _) = program_for(&workload, 16 * MIB).expect("program");
        let first_data = data_base(&spec) / PAGE_SIZE as u64;
        let in_ws = dirty
            .iter()
            .filter(|&p| p >= first_data && p < first_data + 512)
            .count();
        assert!(
            in_ws > 0,
            "writes to the working set are logged ({} dirty in all)",
            dirty.len()
        );
        assert!(
            dirty.iter().all(|p| p < first_data + 512),
            "nothing outside the program's pages is dirtied"
        );
    }
}
