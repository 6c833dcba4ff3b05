//! Refusals before anything is reserved.

use std::sync::Arc;

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmLocation, VmSpec};
use migratory::format::{NativeLayout, VmConfig};
use migratory::protocol::Algorithm;
use migratory::vmm::{BackendSpec, Guest, Hypervisor, HypervisorCapabilities, MemoryCommit, VmmError, WorkloadSpec};

use crate::common::{self, MIB};

async fn engine_with_target(target: HostConfig) -> EngineHandle {
    let e = EngineHandle::start().expect("engine");
    e.add_host(HostConfig::new("src", NativeLayout::XenHvm))
        .await
        .expect("src");
    e.add_host(target).await.expect("dst");
    let spec = VmSpec {
        workload: common::writer(10_000_000, MIB),
        ..VmSpec::new("vm", 4 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    e
}

async fn assert_refused_before_reservation(e: &EngineHandle, req: MigrationRequest) -> String {
    let report = e.migrate(req).await.expect("report");
    assert_eq!(report.result, Outcome::Aborted, "{:?}", report.error);
    assert_eq!(report.vm_location, VmLocation::Source);
    assert_eq!(report.stage_names(), vec!["premigration"], "nothing past negotiation");
    let usage = e.host_usage("dst").await.expect("usage");
    assert_eq!((usage.vms, usage.committed_bytes), (0, 0));
    common::assert_runs_only_on(e, "src", "dst", "vm").await;
    report.error.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_algorithm_outside_the_pool_is_refused_by_the_target() {
    let target = HostConfig {
        algorithms: vec![Algorithm::StopAndCopy, Algorithm::Precopy],
        ..HostConfig::new("dst", NativeLayout::Kvm)
    };
    let e = engine_with_target(target).await;
    let req = MigrationRequest::new("vm", "src", "dst").algorithm(Algorithm::Postcopy);
    let error = assert_refused_before_reservation(&e, req).await;
    assert!(error.contains("target offers [stop-and-copy, precopy]"), "{error}");
    assert!(
        error.contains("source offers [stop-and-copy, precopy, postcopy, hybrid, auto, random]"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_algorithm_outside_the_source_offer_is_refused() {
    let e = engine_with_target(HostConfig::new("dst", NativeLayout::Kvm)).await;
    let mut req = MigrationRequest::new("vm", "src", "dst").algorithm(Algorithm::Hybrid);
    req.offer = vec![Algorithm::Precopy];
    let error = assert_refused_before_reservation(&e, req).await;
    assert!(error.contains("hybrid is not in the common pool"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_format_version_mismatch_is_refused() {
    let target = HostConfig {
        format_versions: vec![migratory::format::FORMAT_VERSION + 1],
        ..HostConfig::new("dst", NativeLayout::Kvm)
    };
    let e = engine_with_target(target).await;
    let error = assert_refused_before_reservation(&e, MigrationRequest::new("vm", "src", "dst")).await;
    assert!(error.contains("common format version"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reservation_over_the_memory_budget_is_refused() {
    let target = HostConfig {
        memory_budget_bytes: 2 * MIB,
        ..HostConfig::new("dst", NativeLayout::Kvm)
    };
    let e = engine_with_target(target).await;
    let report = e
        .migrate(MigrationRequest::new("vm", "src", "dst"))
        .await
        .expect("report");
    assert_eq!(report.result, Outcome::Aborted);
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("aborted by the target") && error.contains("4194304 bytes requested"),
        "{error}"
    );
    assert_eq!(report.vm_location, VmLocation::Source);
    common::assert_runs_only_on(&e, "src", "dst", "vm").await;
}

/// A backend that cannot page a guest in on demand (as kvm where userfaultfd is forbidden): the
/// sim, without post-copy.
#[derive(Debug)]
struct NoDemandPaging(Arc<dyn Hypervisor>);

impl Hypervisor for NoDemandPaging {
    fn name(&self) -> &str {
        "sim-without-demand-paging"
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        self.0.capabilities().without_postcopy()
    }

    fn check_available(&self) -> Result<(), VmmError> {
        self.0.check_available()
    }

    fn create_guest(&self, config: VmConfig, workload: WorkloadSpec) -> Result<Arc<dyn Guest>, VmmError> {
        self.0.create_guest(config, workload)
    }

    fn reserve_guest(&self, config: VmConfig, commit: MemoryCommit) -> Result<Arc<dyn Guest>, VmmError> {
        assert_ne!(
            commit,
            MemoryCommit::OnDemand,
            "a post-copy reservation reached a backend that cannot post-copy"
        );
        self.0.reserve_guest(config, commit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_target_whose_backend_cannot_post_copy_refuses_it_at_negotiation() {
    let sim = BackendSpec::sim(NativeLayout::Kvm).hypervisor();
    let backend = BackendSpec::Custom(Arc::new(NoDemandPaging(sim)));
    let e = engine_with_target(HostConfig::with_backend("dst", backend)).await;
    for algorithm in [Algorithm::Postcopy, Algorithm::Hybrid] {
        let req = MigrationRequest::new("vm", "src", "dst").algorithm(algorithm);
        let error = assert_refused_before_reservation(&e, req).await;
        assert!(
            error.contains(&format!("algorithm {algorithm} is not in the common pool")),
            "{error}"
        );
        assert!(
            error.contains("target offers [stop-and-copy, precopy, auto, random]"),
            "{error}"
        );
    }
    // What the backend can do still goes through it.
    let report = e
        .migrate(MigrationRequest::new("vm", "src", "dst"))
        .await
        .expect("report");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
}
