//! Issue 17's per-migration choices through the library: `random`'s pick and a deadline for
//! total time.

use std::time::Duration;

use migratory::engine::plan::RandomPlan;
use migratory::engine::{HostConfig, MigrationRequest, Outcome, PolicyConfig, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::{Algorithm, CompressionChoice};

use crate::common::{self, MIB};

async fn idle_vm(e: &migratory::engine::EngineHandle, id: &str) {
    e.create_vm("src", VmSpec::new(id, 8 * MIB)).await.expect("create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_random_with_a_seed_runs_the_seeds_pick_and_reports_the_seed() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::XenHvm).await;
    let expected = RandomPlan::new(PolicyConfig::default(), &Algorithm::ALL, 42)
        .picked()
        .expect("a pick");
    idle_vm(&e, "r1").await;
    let req = MigrationRequest::new("r1", "src", "dst")
        .algorithm(Algorithm::Random)
        .seed(42);
    let report = e.migrate(req).await.expect("migrate");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    assert_eq!((report.requested.as_str(), report.seed), ("random", Some(42)));
    assert_eq!(report.algorithm, expected.name());
    let first = &report.decisions[0];
    assert_eq!(first.action, format!("random chose {expected}"));
    assert_eq!(
        first.reason,
        "uniform pick among [stop-and-copy, precopy, postcopy, hybrid], seed 42"
    );
    // No deadline: nothing of it in the report.
    assert_eq!(
        (report.deadline_s, report.deadline_met, report.deadline_margin_s),
        (None, None, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_random_without_a_seed_takes_one_and_a_target_without_random_still_takes_part() {
    let e = migratory::engine::EngineHandle::start().expect("engine");
    e.add_host(HostConfig::new("src", NativeLayout::Kvm))
        .await
        .expect("source");
    // An older target: it offers neither `random` nor post-copy.
    e.add_host(HostConfig {
        algorithms: vec![Algorithm::StopAndCopy, Algorithm::Precopy, Algorithm::Auto],
        ..HostConfig::new("dst", NativeLayout::Kvm)
    })
    .await
    .expect("target");
    idle_vm(&e, "r2").await;
    let report = e
        .migrate(MigrationRequest::new("r2", "src", "dst").algorithm(Algorithm::Random))
        .await
        .expect("migrate");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    let seed = report.seed.expect("the seed taken from the OS is reported");
    let among = [Algorithm::StopAndCopy, Algorithm::Precopy, Algorithm::Auto];
    let expected = RandomPlan::new(PolicyConfig::default(), &among, seed).picked();
    assert_eq!(Some(report.algorithm.as_str()), expected.map(Algorithm::name));
    assert_eq!(
        report.decisions[0].reason,
        format!("uniform pick among [stop-and-copy, precopy], seed {seed}")
    );
}

/// A busy guest under a bandwidth cap, pages sent raw: it rewrites its 8 MiB hot set faster
/// than the 8 MB/s link moves it, and the policy lets pre-copy go on for 20 rounds before it calls that a
/// stall, so pre-copy alone would take over 20 s. Post-copy after the first pass needs about
/// 3 s in all. The deadline of 12 s can only be met by switching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_deadline_only_post_copy_can_meet_is_met_by_switching_to_it() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::Kvm).await;
    let spec = VmSpec {
        workload: common::writer(100_000_000, 8 * MIB),
        ..VmSpec::new("busy", 16 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("busy", "src", "dst")
        .algorithm(Algorithm::Precopy)
        .deadline(Duration::from_secs(12));
    req.shaping.bandwidth_bytes_per_sec = Some(8_000_000);
    // Raw pages: XBZRLE would send each rewritten page as a few bytes of delta.
    req.compression = CompressionChoice::Off;
    req.policy = PolicyConfig {
        stall_rounds: 20,
        ..PolicyConfig::default()
    };
    let report = e.migrate(req).await.expect("migrate");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified, "{:?}", report.mismatched_pages);
    println!("total {:.2} s of a 12 s deadline; decisions:", report.total_s);
    for d in &report.decisions {
        println!("  after round {}: {}: {}", d.after_round, d.action, d.reason);
    }
    let actions: Vec<&str> = report.decisions.iter().map(|d| d.action.as_str()).collect();
    assert!(actions.contains(&"switch to post-copy"), "{:?}", report.decisions);
    assert_eq!(report.algorithm, "postcopy");
    assert_eq!(report.deadline_s, Some(12.0));
    assert_eq!(report.deadline_met, Some(true), "total {} s", report.total_s);
    let margin = report.deadline_margin_s.expect("a margin");
    assert!((margin - (12.0 - report.total_s)).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_impossible_deadline_is_reported_as_missed_and_the_migration_completes() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::Kvm).await;
    idle_vm(&e, "late").await;
    let req = MigrationRequest::new("late", "src", "dst").deadline(Duration::from_micros(1));
    let report = e.migrate(req).await.expect("migrate");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    assert_eq!(report.deadline_met, Some(false));
    let margin = report.deadline_margin_s.expect("a margin");
    assert!(margin < 0.0, "{margin}");
    let missed = report
        .decisions
        .iter()
        .find(|d| d.action == "deadline missed")
        .expect("the report says the deadline was missed");
    assert!(missed.reason.contains("over the 0.000 s deadline"), "{}", missed.reason);
}
