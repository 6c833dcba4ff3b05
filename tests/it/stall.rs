//! A guest that dirties faster than the link: the stall is detected and the policy's choice is
//! carried out and reported.

use std::time::Duration;

use migratory::engine::{MigrationRequest, Outcome, PolicyConfig, StallAction, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::CompressionChoice;
use migratory::vmm::{Pattern, WorkloadSpec};

use crate::common::{self, MIB};

async fn run(action: StallAction) -> (migratory::engine::MigrationReport, migratory::engine::EngineHandle) {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    let spec = VmSpec {
        workload: WorkloadSpec {
            rate_bytes_per_sec: 200_000_000,
            working_set_bytes: 8 * MIB,
            pattern: Pattern::Uniform,
            zero_fraction: 0.0,
            seed: 3,
        },
        ..VmSpec::new("busy", 8 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("busy", "src", "dst");
    // 20 MB/s against 200 MB/s of dirtying: every round resends all of memory. Whole pages:
    // the writer changes one word per page, so XBZRLE deltas would let it converge.
    req.shaping.bandwidth_bytes_per_sec = Some(20_000_000);
    req.compression = CompressionChoice::Off;
    req.policy = PolicyConfig {
        downtime_limit: Duration::from_millis(50),
        stall_rounds: 2,
        on_stall: action,
        ..PolicyConfig::default()
    };
    (e.migrate(req).await.expect("report"), e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stall_aborts_and_keeps_vm_on_source() {
    let (report, e) = run(StallAction::Abort).await;
    assert_eq!(report.result, Outcome::Aborted, "{:?}", report.error);
    assert_eq!(report.vm_location, VmLocation::Source);
    let d = report.decisions.last().expect("a decision");
    assert_eq!(d.action, "abort");
    assert!(d.reason.contains("stopped shrinking"), "{}", d.reason);
    common::assert_runs_only_on(&e, "src", "dst", "busy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stall_forces_stop_and_copy_under_the_ceiling() {
    let (report, _e) = run(StallAction::ForceStopAndCopy).await;
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    let d = report.decisions.last().expect("a decision");
    assert_eq!(d.action, "forced stop-and-copy");
    assert!(report.rounds >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stall_switches_to_postcopy() {
    let (report, _e) = run(StallAction::Postcopy).await;
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    assert_eq!(report.algorithm, "postcopy");
    assert!(report.decisions.iter().any(|d| d.action == "switch to post-copy"));
    assert!(report.stage_names().contains(&"pull"));
}
