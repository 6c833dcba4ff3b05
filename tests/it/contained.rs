//! Containment: a panicking or stuck guest fails or stalls only its own work, never the engine.
//!
//! Guests are wrapped at creation by `vmm::decorate_next_guest` in [`Faulty`], a decorator that
//! blocks or panics in one operation and passes every other call through.

use std::sync::{mpsc, Arc, Mutex};

use migratory::dirty::{AtomicBitmap, DirtyError, DirtyLogSource, PageSet};
use migratory::engine::{EngineHandle, MigrationRequest, Outcome, Phase, VmSpec};
use migratory::format::{DeviceState, NativeLayout, VcpuState, VmConfig};
use migratory::memory::GuestMemory;
use migratory::protocol::Algorithm;
use migratory::vmm::{decorate_next_guest, FaultSink, Guest, GuestRef, GuestStats, VmmError};

use crate::common::{self, MIB};

/// What a [`Faulty`] guest does wrong.
enum Fault {
    /// `pause` reports that it was entered, then blocks until released (or the sender drops).
    BlockPause {
        entered: tokio::sync::mpsc::UnboundedSender<()>,
        release: Mutex<mpsc::Receiver<()>>,
    },
    /// The named operation panics.
    PanicIn(&'static str),
}

/// A guest that passes every call to `inner`, except its fault.
struct Faulty {
    inner: GuestRef,
    fault: Fault,
}

impl std::fmt::Debug for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty").field("inner", &self.inner).finish()
    }
}

impl Faulty {
    fn wrap(vm: &str, fault: Fault) {
        decorate_next_guest(vm, Box::new(move |inner| Arc::new(Faulty { inner, fault }) as GuestRef))
            .expect("decorator registered");
    }

    fn maybe_panic(&self, op: &'static str) {
        if matches!(self.fault, Fault::PanicIn(o) if o == op) {
            panic!("injected panic in {op}");
        }
    }
}

impl DirtyLogSource for Faulty {
    fn dirty_bitmap(&self) -> &AtomicBitmap {
        self.inner.dirty_bitmap()
    }
    fn start_dirty_log(&self) -> Result<(), DirtyError> {
        self.inner.start_dirty_log()
    }
    fn sync_dirty_log(&self) -> Result<(), DirtyError> {
        self.maybe_panic("sync_dirty_log");
        self.inner.sync_dirty_log()
    }
    fn stop_dirty_log(&self) -> Result<(), DirtyError> {
        self.inner.stop_dirty_log()
    }
}

impl Guest for Faulty {
    fn config(&self) -> &VmConfig {
        self.inner.config()
    }
    fn layout(&self) -> NativeLayout {
        self.inner.layout()
    }
    fn memory(&self) -> &GuestMemory {
        self.inner.memory()
    }
    fn resume(&self) -> Result<(), VmmError> {
        self.inner.resume()
    }
    fn pause(&self) -> Result<(), VmmError> {
        self.maybe_panic("pause");
        if let Fault::BlockPause { entered, release } = &self.fault {
            let _ = entered.send(());
            let _ = release.lock().unwrap_or_else(|p| p.into_inner()).recv();
        }
        self.inner.pause()
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        self.maybe_panic("save_vcpus");
        self.inner.save_vcpus()
    }
    fn load_vcpus(&self, vcpus: &[VcpuState]) -> Result<(), VmmError> {
        self.maybe_panic("load_vcpus");
        self.inner.load_vcpus(vcpus)
    }
    fn save_devices(&self) -> Result<Vec<DeviceState>, VmmError> {
        self.inner.save_devices()
    }
    fn load_devices(&self, devices: &[DeviceState]) -> Result<(), VmmError> {
        self.inner.load_devices(devices)
    }
    fn begin_demand_paging(&self, missing: &PageSet, faults: FaultSink) -> Result<(), VmmError> {
        self.inner.begin_demand_paging(missing, faults)
    }
    fn claim_page(&self, page: u64) -> bool {
        self.inner.claim_page(page)
    }
    fn page_installed(&self, page: u64) {
        self.inner.page_installed(page)
    }
    fn install_page(&self, page: u64, data: Option<&[u8]>) -> Result<(), VmmError> {
        self.inner.install_page(page, data)
    }
    fn missing_pages(&self) -> u64 {
        self.inner.missing_pages()
    }
    fn missing_set(&self) -> PageSet {
        self.inner.missing_set()
    }
    fn stats(&self) -> GuestStats {
        self.inner.stats()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

fn vm(id: &str) -> VmSpec {
    VmSpec {
        workload: common::writer(4 * MIB, MIB),
        ..VmSpec::new(id, 4 * MIB)
    }
}

/// The engine still creates VMs and migrates them.
async fn assert_engine_serves(e: &EngineHandle, id: &str) {
    e.create_vm("src", vm(id)).await.expect("a later VM is created");
    let report = e
        .migrate(MigrationRequest::new(id, "src", "dst"))
        .await
        .expect("a later migration runs");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
}

#[tokio::test]
async fn test_nul_in_vm_id_does_not_stop_the_engine() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::XenHvm).await;
    // Refused by validation or created: either way nothing panics and the host carries on.
    let _ = e.create_vm("src", VmSpec::new("a\u{0}b", 16 * MIB)).await;
    assert_engine_serves(&e, "after-nul").await;
    assert_eq!(e.list_vms("dst").await.expect("list").len(), 1);
}

#[tokio::test]
async fn test_backend_panic_fails_only_that_creation() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::Kvm).await;
    decorate_next_guest("doomed", Box::new(|_| panic!("backend exploded"))).expect("registered");
    let err = e.create_vm("src", vm("doomed")).await.expect_err("creation fails");
    assert!(err.to_string().contains("backend exploded"), "{err}");
    // The failed creation gave its memory back and the id is free again.
    assert_eq!(e.host_usage("src").await.expect("usage").vms, 0);
    e.create_vm("src", vm("doomed"))
        .await
        .expect("the same id is created now");
    assert_engine_serves(&e, "after-backend-panic").await;
}

#[tokio::test]
async fn test_stuck_pause_stalls_only_its_own_migration() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::XenHvm).await;
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = mpsc::channel();
    Faulty::wrap(
        "stuck",
        Fault::BlockPause {
            entered: entered_tx,
            release: Mutex::new(release_rx),
        },
    );
    e.create_vm("src", vm("stuck")).await.expect("stuck VM");
    e.create_vm("src", vm("free")).await.expect("free VM");

    let stuck = e
        .start_migration(MigrationRequest::new("stuck", "src", "dst").algorithm(Algorithm::StopAndCopy))
        .await
        .expect("stuck migration starts");
    let stuck_id = stuck.id;
    tokio::time::timeout(common::TIMEOUT, entered.recv())
        .await
        .expect("the stuck migration reaches its pause")
        .expect("pause entered");

    // The guest's pause blocks a thread of its own: the engine and this host carry on.
    let report = e
        .migrate(MigrationRequest::new("free", "src", "dst"))
        .await
        .expect("migration of another VM");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    let names: Vec<String> = e
        .list_vms("src")
        .await
        .expect("the host lists VMs meanwhile")
        .into_iter()
        .map(|v| v.config.id.0)
        .collect();
    assert_eq!(names, ["stuck"]);
    assert_eq!(e.status(stuck_id).await.expect("status").status, Phase::Active);

    release.send(()).expect("pause still waiting");
    let (_, _, report) = common::collect(stuck).await;
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
}

/// A guest whose `op` panics: its migration fails with the panic's message and the VM runs on
/// at the source; the engine serves on.
async fn check_panic(op: &'static str, on_target: bool) -> Result<(), String> {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::XenHvm).await;
    let id = format!("panics-in-{op}");
    if !on_target {
        Faulty::wrap(&id, Fault::PanicIn(op));
    }
    e.create_vm("src", vm(&id)).await.map_err(|e| format!("create: {e}"))?;
    if on_target {
        // The next guest of that id is the target's reservation.
        Faulty::wrap(&id, Fault::PanicIn(op));
    }
    let report = e
        .migrate(MigrationRequest::new(id.clone(), "src", "dst"))
        .await
        .map_err(|e| format!("migrate: {e}"))?;
    if report.result == Outcome::Completed {
        return Err("the migration completed".into());
    }
    let error = report.error.unwrap_or_default();
    let wanted = format!("injected panic in {op}");
    if !on_target && !error.contains(&wanted) {
        return Err(format!("error does not name the panic: {error}"));
    }
    let info = e
        .vm_info("src", &id)
        .await
        .map_err(|e| format!("VM gone from the source: {e}"))?;
    if !info.state.is_running() {
        return Err(format!("the VM is {} on the source", info.state));
    }
    assert_engine_serves(&e, "after-panic").await;
    Ok(())
}

#[tokio::test]
async fn test_guest_panic_fails_only_its_migration() {
    let cases = [
        ("sync_dirty_log", false),
        ("pause", false),
        ("save_vcpus", false),
        ("load_vcpus", true),
    ];
    let mut failures = Vec::new();
    for (op, on_target) in cases {
        let side = if on_target { "target" } else { "source" };
        let result = check_panic(op, on_target).await;
        println!(
            "{op:16} {side:7} {}",
            result.as_ref().err().map_or("ok", String::as_str)
        );
        if let Err(why) = result {
            failures.push(format!("{op} ({side}): {why}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
