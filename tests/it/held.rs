//! Verification before commitment, and copies held after a failure past it: a page the source
//! lost is caught before `Commit` when asked (the VM stays on the source), or after activation
//! by default and in post-copy (the source copy is held, never freed); a target lost after `Commit` leaves a held copy that only
//! a fenced resume or a discard ends.

use migratory::engine::verify::VerifyMode;
use migratory::engine::{EngineError, EngineHandle, MigrationRequest, Outcome, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;
use migratory::vm::HeldReason;

use crate::common::{self, MIB};

async fn busy_vm(e: &EngineHandle, vm: &str, alg: Algorithm, faults: &str) -> MigrationRequest {
    let spec = VmSpec {
        workload: common::writer(20_000_000, 2 * MIB),
        ..VmSpec::new(vm, 8 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new(vm, "src", "dst").algorithm(alg);
    req.faults = faults.parse().expect("plan");
    req
}

async fn held(e: &EngineHandle, host: &str, vm: &str) -> Option<HeldReason> {
    e.vm_info(host, vm).await.expect("vm on host").held.map(|h| h.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_page_lost_before_commit_is_caught_and_rolled_back() {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    for (i, alg) in [Algorithm::Precopy, Algorithm::StopAndCopy].into_iter().enumerate() {
        let vm = format!("lost{i}");
        let mut req = busy_vm(&e, &vm, alg, "lose-dirty-page@stopcopy").await;
        req.verify = VerifyMode::BeforeCommit;
        let r = e.migrate(req).await.expect("report");
        assert_eq!(r.result, Outcome::Failed, "{alg}: {:?}", r.error);
        assert_eq!(r.vm_location, VmLocation::Source, "{alg}");
        assert!(r.downtime_parts.verify_s > 0.0, "{alg}: verified inside the downtime");
        assert!(!r.verified, "{alg}");
        assert!(!r.mismatched_pages.is_empty(), "{alg}: the lost page is named");
        let error = r.error.unwrap_or_default();
        assert!(error.contains("verification failed"), "{alg}: {error}");
        common::assert_runs_only_on(&e, "src", "dst", &vm).await;
        assert_eq!(held(&e, "src", &vm).await, None, "{alg}: nothing held after a rollback");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_page_lost_and_verified_after_activation_holds_the_source_copy() {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    for (i, alg) in [Algorithm::Precopy, Algorithm::StopAndCopy].into_iter().enumerate() {
        let vm = format!("lostaa{i}");
        let req = busy_vm(&e, &vm, alg, "lose-dirty-page@stopcopy").await;
        assert_eq!(req.verify, VerifyMode::AfterActivation, "the default");
        let r = e.migrate(req).await.expect("report");
        assert_eq!(r.result, Outcome::Failed, "{alg}: {:?}", r.error);
        // Past commit the target owns the VM and runs it; the difference is reported, and the
        // source copy it differs from is held, never freed.
        assert_eq!(r.vm_location, VmLocation::Target, "{alg}");
        assert!(!r.verified, "{alg}");
        assert!(!r.mismatched_pages.is_empty(), "{alg}: the lost page is named");
        assert_eq!(r.verify, "after-activation");
        assert_eq!(r.downtime_parts.verify_s, 0.0, "{alg}: no hashing in the downtime");
        let error = r.error.unwrap_or_default();
        assert!(error.contains("verification failed"), "{alg}: {error}");
        assert_eq!(held(&e, "src", &vm).await, Some(HeldReason::Unverified), "{alg}");
        assert!(e.vm_info("dst", &vm).await.expect("on the target").state.is_running());
        e.discard_held("src", &vm).await.expect("discard");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_page_lost_in_postcopy_holds_the_source_copy_until_discarded() {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    let req = busy_vm(&e, "lostpc", Algorithm::Postcopy, "lose-dirty-page@stopcopy").await;
    let r = e.migrate(req).await.expect("report");
    assert_eq!(r.result, Outcome::Failed, "{:?}", r.error);
    assert_eq!(r.vm_location, VmLocation::Target);
    assert!(!r.verified);
    // The copy that failed verification is never freed: it stays, paused, for an operator.
    let source = e.vm_info("src", "lostpc").await.expect("the source keeps its copy");
    assert!(!source.state.is_running(), "{}", source.state);
    assert_eq!(source.held.map(|h| h.reason), Some(HeldReason::Unverified));
    let target = e.vm_info("dst", "lostpc").await.expect("the target runs the VM");
    assert!(target.state.is_running(), "{}", target.state);
    // Resume does not apply to it; discard does.
    match e.resume_held("src", "lostpc", true).await {
        Err(EngineError::ActionNotApplicable { state, .. }) => assert_eq!(state, "unverified"),
        other => panic!("resume of an unverified copy: {other:?}"),
    }
    e.discard_held("src", "lostpc").await.expect("discard");
    assert!(e.vm_info("src", "lostpc").await.is_err(), "discarded");
    assert!(e
        .vm_info("dst", "lostpc")
        .await
        .expect("still there")
        .state
        .is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_target_lost_after_commit_leaves_a_copy_that_a_fenced_resume_runs() {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    let req = busy_vm(&e, "cu", Algorithm::Precopy, "target-crash@activation").await;
    let r = e.migrate(req).await.expect("report");
    assert_eq!(r.result, Outcome::Failed, "{:?}", r.error);
    assert_eq!(r.vm_location, VmLocation::Undetermined);
    let source = e.vm_info("src", "cu").await.expect("the source keeps its copy");
    assert!(!source.state.is_running(), "never resumed by itself: {}", source.state);
    assert_eq!(source.held.map(|h| h.reason), Some(HeldReason::CommittedUnconfirmed));
    // A copy of the same VM on the peer fences the resume off.
    e.create_vm("dst", VmSpec::new("cu", 8 * MIB)).await.expect("impostor");
    match e.resume_held("src", "cu", false).await {
        Err(EngineError::Fenced { detail, .. }) => assert!(detail.contains("holds it"), "{detail}"),
        other => panic!("resume while the peer holds the VM: {other:?}"),
    }
    // Even an operator who says the peer is dead is refused when the peer answers that it
    // holds the VM: the fence believes what it hears.
    assert!(e.resume_held("src", "cu", true).await.is_err());
    e.delete_vm("dst", "cu").await.expect("delete impostor");
    let info = e.resume_held("src", "cu", false).await.expect("fenced resume");
    assert!(info.state.is_running(), "{}", info.state);
    common::assert_runs_only_on(&e, "src", "dst", "cu").await;
    assert_eq!(held(&e, "src", "cu").await, None);
    // Nothing is held any more: a second resume does not apply.
    assert!(matches!(
        e.resume_held("src", "cu", false).await,
        Err(EngineError::ActionNotApplicable { .. })
    ));
}

/// A post-copy migration whose link stays down longer than both sides wait: the source copy
/// is held `stale`, the target's `awaiting-pages`.
async fn stranded_postcopy(e: &EngineHandle, vm: &str) {
    let spec = VmSpec {
        workload: common::writer(20_000_000, 2 * MIB),
        ..VmSpec::new(vm, 16 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new(vm, "src", "dst").algorithm(Algorithm::Postcopy);
    req.shaping.bandwidth_bytes_per_sec = Some(8_000_000);
    req.faults = "postcopy-link-loss:60s@pull".parse().expect("plan");
    req.recovery_timeout = std::time::Duration::from_millis(300);
    let mut started = e.start_migration(req).await.expect("start");
    let target_gave_up = common::target_stopped(&mut started.events).await;
    assert!(target_gave_up.contains("stays paused"), "{target_gave_up}");
    let r = e.report(started.id).await.expect("report");
    assert_eq!(r.result, Outcome::Failed, "{:?}", r.error);
    assert_eq!(r.vm_location, VmLocation::TargetAwaitingPages);
    assert_eq!(held(e, "src", vm).await, Some(HeldReason::Stale));
    assert_eq!(held(e, "dst", vm).await, Some(HeldReason::AwaitingPages));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_operator_recovers_a_postcopy_that_outlived_its_recovery_timeout() {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    stranded_postcopy(&e, "rcv").await;
    // Neither half runs while held.
    assert!(!e.vm_info("src", "rcv").await.expect("src").state.is_running());
    assert!(!e.vm_info("dst", "rcv").await.expect("dst").state.is_running());
    let started = e.recover_held("src", "rcv", None).await.expect("recover");
    let r = e.report(started.id).await.expect("report");
    assert!(r.result.succeeded(), "{:?}: {:?}", r.result, r.error);
    assert!(r.verified, "every page verified: {:?}", r.mismatched_pages);
    common::assert_runs_only_on(&e, "dst", "src", "rcv").await;
    assert_eq!(held(&e, "dst", "rcv").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_discarding_the_target_half_ends_its_wait_and_the_source_half_stays_held() {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    stranded_postcopy(&e, "dsc").await;
    e.discard_held("dst", "dsc").await.expect("discard target half");
    assert!(e.vm_info("dst", "dsc").await.is_err(), "gone from the target");
    // Recovery now finds nothing waiting: refused, and the source copy is held again.
    let started = e.recover_held("src", "dsc", None).await.expect("recover starts");
    let r = e.report(started.id).await.expect("report");
    assert_eq!(r.result, Outcome::Failed);
    assert_eq!(held(&e, "src", "dsc").await, Some(HeldReason::Stale));
    e.discard_held("src", "dsc").await.expect("discard source half");
    assert!(e.list_vms("src").await.expect("list").is_empty());
    assert!(e.list_vms("dst").await.expect("list").is_empty());
}
