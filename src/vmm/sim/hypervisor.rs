//! The sim backend as a [`Hypervisor`].

use std::sync::Arc;

use super::SimGuest;
use crate::format::{NativeLayout, VmConfig};
use crate::vmm::{Guest, Hypervisor, HypervisorCapabilities, MemoryCommit, VmmError, WorkloadSpec};

/// Sim guests keeping vCPU state in one native layout. It can run every algorithm: its demand
/// paging works on guest memory it holds itself, and it runs everywhere.
#[derive(Debug, Clone, Copy)]
pub struct SimHypervisor {
    layout: NativeLayout,
}

impl SimHypervisor {
    /// Sim guests in `layout`.
    pub fn new(layout: NativeLayout) -> Self {
        Self { layout }
    }
}

impl Hypervisor for SimHypervisor {
    fn name(&self) -> &str {
        "sim"
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        HypervisorCapabilities::all(vec![self.layout])
    }

    fn check_available(&self) -> Result<(), VmmError> {
        Ok(())
    }

    fn create_guest(&self, config: VmConfig, workload: WorkloadSpec) -> Result<Arc<dyn Guest>, VmmError> {
        let guest = SimGuest::create(config, self.layout, workload)?;
        guest.resume()?;
        Ok(Arc::new(guest))
    }

    /// On-demand memory is committed up front: the sim marks missing pages in a bitmap and
    /// blocks its writer on them, so it has no use for absent pages.
    fn reserve_guest(&self, config: VmConfig, commit: MemoryCommit) -> Result<Arc<dyn Guest>, VmmError> {
        Ok(Arc::new(SimGuest::reserve(config, self.layout, commit)?))
    }
}
