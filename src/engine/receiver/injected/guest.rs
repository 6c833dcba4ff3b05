//! `fail-state-load`: a guest whose backend fails to load the vCPU state it is given; every
//! other call goes to the guest it wraps.

use std::sync::Mutex;

use crate::dirty::{AtomicBitmap, DirtyError, DirtyLogSource, PageSet};
use crate::engine::faults::FaultPlan;
use crate::engine::Stage;
use crate::format::{DeviceState, NativeLayout, VcpuState, VmConfig};
use crate::memory::GuestMemory;
use crate::vmm::{FaultSink, Guest, GuestRef, GuestStats, VmmError};

/// Fails the first state load while its plan holds a `fail-state-load`.
#[derive(Debug)]
pub(super) struct FailingStateLoad {
    inner: GuestRef,
    /// Guest calls take `&self` and may come from any thread.
    plan: Mutex<FaultPlan>,
}

impl FailingStateLoad {
    pub(super) fn new(inner: GuestRef, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan: Mutex::new(plan),
        }
    }
}

impl DirtyLogSource for FailingStateLoad {
    fn dirty_bitmap(&self) -> &AtomicBitmap {
        self.inner.dirty_bitmap()
    }
    fn start_dirty_log(&self) -> Result<(), DirtyError> {
        self.inner.start_dirty_log()
    }
    fn sync_dirty_log(&self) -> Result<(), DirtyError> {
        self.inner.sync_dirty_log()
    }
    fn stop_dirty_log(&self) -> Result<(), DirtyError> {
        self.inner.stop_dirty_log()
    }
}

impl Guest for FailingStateLoad {
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
        self.inner.pause()
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        self.inner.save_vcpus()
    }
    fn load_vcpus(&self, vcpus: &[VcpuState]) -> Result<(), VmmError> {
        let fired = self
            .plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Stage::Stopcopy, true);
        if let Some(fault) = fired.first() {
            tracing::warn!(fault = fault.kind.name(), "injecting fault");
            return Err(VmmError::Failed("injected fault: backend failed loading state".into()));
        }
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

#[cfg(test)]
mod tests {
    use super::super::super::reserved_guest;
    use super::*;
    use std::sync::Arc;

    #[test]
    fn test_the_planned_load_fails_once_then_loads_pass_through() {
        let inner = reserved_guest("fl", 16);
        let vcpus = inner.save_vcpus().expect("the reserved guest has vCPUs");
        let plan: FaultPlan = "fail-state-load".parse().expect("plan");
        let guest = FailingStateLoad::new(Arc::clone(&inner), plan);
        let err = guest.load_vcpus(&vcpus).expect_err("the injected failure");
        assert!(err.to_string().contains("injected fault"), "{err}");
        guest.load_vcpus(&vcpus).expect("fired once");
        assert_eq!(guest.config().id, inner.config().id);
    }
}
