//! Cancel in every stage before commitment: the VM keeps running on the source, the target
//! holds nothing.

use std::time::Duration;

use migratory::engine::{MigrationEvent, MigrationRequest, Outcome, Stage, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::link::Shaping;

use crate::common::{self, MIB, TIMEOUT};

async fn check(at: Stage) {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    let vm = format!("cancel-{at}");
    let spec = VmSpec {
        workload: common::writer(20_000_000, 2 * MIB),
        ..VmSpec::new(vm.clone(), 16 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new(vm.clone(), "src", "dst");
    // Latency and a cap make every stage last long enough to be cancelled inside it.
    req.shaping = Shaping {
        bandwidth_bytes_per_sec: Some(40_000_000),
        latency: Duration::from_millis(40),
    };
    let mut started = e.start_migration(req).await.expect("start");
    let id = started.id;
    let mut watch = e.subscribe(id).await.expect("subscribe");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, started.events.recv())
            .await
            .expect("stage reached")
            .expect("events");
        if let MigrationEvent::StageStarted { stage } = ev {
            if stage == at {
                e.cancel(id).await.expect("cancel accepted before commitment");
                break;
            }
        }
    }
    let report = e.report(id).await.expect("report");
    assert_eq!(report.result, Outcome::Cancelled, "{at}: {:?}", report.error);
    assert_eq!(report.vm_location, VmLocation::Source);
    let last = report.stages.last().map(|s| s.name).unwrap_or("none");
    assert!(
        last == at.name() || (at == Stage::Stopcopy && last == "commitment"),
        "cancelled in {last}, asked in {at}"
    );
    assert!(report.stage(Stage::Activation).is_none(), "{at}: never activated");
    // Premigration may be cancelled before the target even heard of the VM.
    if at != Stage::Premigration {
        let why = common::target_stopped(&mut watch).await;
        assert!(why.contains("cancel"), "target was told why: {why}");
    }
    let usage = e.host_usage("dst").await.expect("usage");
    assert_eq!((usage.vms, usage.committed_bytes), (0, 0), "{at}: target holds nothing");
    common::assert_runs_only_on(&e, "src", "dst", &vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cancel_in_premigration() {
    check(Stage::Premigration).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cancel_in_reservation() {
    check(Stage::Reservation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cancel_in_precopy() {
    check(Stage::Precopy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cancel_in_stopcopy() {
    check(Stage::Stopcopy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cancel_after_completion_is_refused() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::Kvm).await;
    e.create_vm("src", VmSpec::new("done", 4 * MIB)).await.expect("create");
    let started = e
        .start_migration(MigrationRequest::new("done", "src", "dst"))
        .await
        .expect("start");
    let report = e.report(started.id).await.expect("report");
    assert_eq!(report.result, Outcome::Completed);
    assert!(matches!(
        e.cancel(started.id).await,
        Err(migratory::engine::EngineError::TooLateToCancel(_))
    ));
}
