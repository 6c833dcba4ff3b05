//! The kvm backend as a [`Hypervisor`].

use std::sync::Arc;

use super::demand::check_demand_paging;
use super::{open_kvm, KvmGuest};
use crate::format::{NativeLayout, VmConfig};
use crate::vmm::{Guest, Hypervisor, HypervisorCapabilities, MemoryCommit, VmmError, WorkloadSpec};

/// Guests on /dev/kvm, vCPU state in the kvm layout. Post-copy needs userfaultfd, which a host
/// may forbid (`vm.unprivileged_userfaultfd`, the mode of /dev/userfaultfd, seccomp): where it
/// cannot be used, post-copy and hybrid are not offered.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvmHypervisor;

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &str {
        "kvm"
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        let all = HypervisorCapabilities::all(vec![NativeLayout::Kvm]);
        match check_demand_paging() {
            Ok(()) => all,
            Err(e) => {
                tracing::warn!(error = %e, "kvm backend: no post-copy on this host");
                all.without_postcopy()
            }
        }
    }

    fn check_available(&self) -> Result<(), VmmError> {
        open_kvm().map(drop)
    }

    fn create_guest(&self, config: VmConfig, workload: WorkloadSpec) -> Result<Arc<dyn Guest>, VmmError> {
        Ok(Arc::new(KvmGuest::create(config, workload)?))
    }

    fn reserve_guest(&self, config: VmConfig, commit: MemoryCommit) -> Result<Arc<dyn Guest>, VmmError> {
        Ok(Arc::new(KvmGuest::reserve(config, commit)?))
    }
}
