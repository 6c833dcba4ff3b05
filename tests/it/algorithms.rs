//! Every algorithm between every pair of native layouts, with a running writer.

use migratory::engine::{MigrationRequest, Outcome, PolicyConfig, Stage, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;

use crate::common::{self, MIB};

fn expected(alg: Algorithm) -> Vec<Vec<Stage>> {
    use Stage::*;
    // Verified after activation (the default): commitment's digest comparison follows it.
    let pre = vec![Premigration, Reservation, Precopy, Stopcopy, Activation, Commitment];
    let hyb = vec![
        Premigration,
        Reservation,
        Precopy,
        Stopcopy,
        Activation,
        Pull,
        Commitment,
    ];
    let stop = vec![Premigration, Reservation, Stopcopy, Activation, Commitment];
    let post = vec![Premigration, Reservation, Stopcopy, Activation, Pull, Commitment];
    match alg {
        Algorithm::StopAndCopy => vec![stop],
        Algorithm::Precopy => vec![pre],
        Algorithm::Postcopy => vec![post],
        Algorithm::Hybrid => vec![hyb],
        Algorithm::Auto => vec![pre, hyb],
        Algorithm::Random => vec![stop, pre, post, hyb],
    }
}

async fn check(alg: Algorithm, src: NativeLayout, dst: NativeLayout) {
    let e = common::engine(src, dst).await;
    let vm = format!("vm-{alg}-{src}-{dst}");
    let spec = VmSpec {
        workload: common::writer(40_000_000, 2 * MIB),
        ..VmSpec::new(vm.clone(), 16 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new(vm.clone(), "src", "dst").algorithm(alg);
    if alg == Algorithm::Hybrid {
        // A limit no round can meet, so hybrid runs its bounded rounds and then post-copy.
        req.policy = PolicyConfig {
            downtime_limit: std::time::Duration::ZERO,
            ..PolicyConfig::default()
        };
    }
    let started = e.start_migration(req).await.expect("start");
    let (stages, _, report) = common::collect(started).await;
    let case = format!("{alg} {src}->{dst}");
    assert_eq!(report.result, Outcome::Completed, "{case}: {:?}", report.error);
    assert!(
        report.verified,
        "{case}: mismatched pages {:?}",
        report.mismatched_pages
    );
    assert_eq!(report.vm_location, VmLocation::Target, "{case}");
    assert!(expected(alg).contains(&stages), "{case}: stages {stages:?}");
    let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
    assert_eq!(report.stage_names(), names, "{case}: report and events agree");
    assert_eq!(report.source_layout, src.to_string());
    assert_eq!(report.target_layout, dst.to_string());
    assert!(report.pages.normal > 0 && report.bytes_sent > 0, "{case}");
    if matches!(alg, Algorithm::Postcopy | Algorithm::Hybrid) {
        assert!(report.stage(Stage::Pull).is_some(), "{case}");
    }
    common::assert_runs_only_on(&e, "dst", "src", &vm).await;
    let src_usage = e.host_usage("src").await.expect("usage");
    assert_eq!(src_usage.committed_bytes, 0, "{case}: source freed its copy");
}

macro_rules! matrix {
    ($($name:ident: $alg:expr, $src:expr, $dst:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                check($alg, $src, $dst).await;
            }
        )*
    };
}

use NativeLayout::{Kvm, XenHvm};
matrix! {
    test_stop_and_copy_xen_to_kvm: Algorithm::StopAndCopy, XenHvm, Kvm;
    test_stop_and_copy_kvm_to_xen: Algorithm::StopAndCopy, Kvm, XenHvm;
    test_stop_and_copy_kvm_to_kvm: Algorithm::StopAndCopy, Kvm, Kvm;
    test_precopy_xen_to_kvm: Algorithm::Precopy, XenHvm, Kvm;
    test_precopy_kvm_to_xen: Algorithm::Precopy, Kvm, XenHvm;
    test_precopy_kvm_to_kvm: Algorithm::Precopy, Kvm, Kvm;
    test_postcopy_xen_to_kvm: Algorithm::Postcopy, XenHvm, Kvm;
    test_postcopy_kvm_to_xen: Algorithm::Postcopy, Kvm, XenHvm;
    test_postcopy_kvm_to_kvm: Algorithm::Postcopy, Kvm, Kvm;
    test_hybrid_xen_to_kvm: Algorithm::Hybrid, XenHvm, Kvm;
    test_hybrid_kvm_to_xen: Algorithm::Hybrid, Kvm, XenHvm;
    test_hybrid_kvm_to_kvm: Algorithm::Hybrid, Kvm, Kvm;
    test_auto_xen_to_kvm: Algorithm::Auto, XenHvm, Kvm;
    test_auto_kvm_to_xen: Algorithm::Auto, Kvm, XenHvm;
    test_auto_kvm_to_kvm: Algorithm::Auto, Kvm, Kvm;
    test_random_xen_to_kvm: Algorithm::Random, XenHvm, Kvm;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postcopy_guest_faults_are_pulled_and_counted() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::XenHvm).await;
    let spec = VmSpec {
        workload: common::writer(200_000_000, 8 * MIB),
        ..VmSpec::new("pc", 32 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("pc", "src", "dst").algorithm(Algorithm::Postcopy);
    // A slow push leaves the guest time to touch pages that are not there yet.
    req.shaping.bandwidth_bytes_per_sec = Some(100_000_000);
    let report = e.migrate(req).await.expect("migrate");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified, "{:?}", report.mismatched_pages);
    assert!(report.postcopy_faults > 0, "the guest faulted on missing pages");
    assert!(report.pages.pulled > 0, "faulted pages were pulled: {:?}", report.pages);
    assert!(report.mean_fault_latency_s > 0.0);
}
