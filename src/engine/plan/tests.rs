use std::time::Duration;

use super::*;

fn obs(round: u32, remaining: u64, dirty_per_sec: f64) -> RoundObservation {
    RoundObservation {
        round,
        remaining_pages: remaining,
        dirty_pages_per_sec: dirty_per_sec,
        // 1 GB/s: 10,000 pages take about 41 ms.
        bandwidth_bytes_per_sec: 1e9,
        fixed_switchover: Duration::from_millis(2),
        precopy_elapsed: Duration::from_millis(100 * u64::from(round + 1)),
        sent_pages: 65_536 + remaining * u64::from(round),
        vm_pages: 65_536,
    }
}

const POOL: [Algorithm; 6] = Algorithm::ALL;

#[test]
fn test_every_algorithm_has_a_plan_that_runs_it() {
    for a in Algorithm::ALL.into_iter().filter(|a| *a != Algorithm::Random) {
        let plan = for_algorithm(a, PolicyConfig::default(), &POOL, 0);
        assert_eq!(plan.algorithm(), a, "{a}");
    }
    // `random` runs what it picked, a concrete algorithm of the pool.
    let picked = for_algorithm(Algorithm::Random, PolicyConfig::default(), &POOL, 0).algorithm();
    assert!(picked.is_concrete(), "{picked}");
}

#[test]
fn test_plans_that_do_not_iterate_switch_over_at_once_with_a_forecast() {
    let estimate = Estimate {
        bandwidth_bytes_per_sec: 1e9,
        source: "the link's configured cap",
        fixed_switchover: Duration::from_millis(5),
    };
    for (a, how) in [
        (Algorithm::StopAndCopy, Switchover::StopAndCopy),
        (Algorithm::Postcopy, Switchover::Postcopy),
    ] {
        let mut plan = for_algorithm(a, PolicyConfig::default(), &POOL, 0);
        assert!(!plan.iterates());
        let v = plan.start(65_536, Some(estimate));
        assert_eq!(v.next, Next::Switchover(how));
        let f = v.forecast.expect("a forecast from the estimate");
        assert_eq!(f.algorithm, a);
        assert!(f.basis.contains("configured cap"), "{}", f.basis);
        // Nothing known up front: no forecast, the same step.
        assert_eq!(plan.start(65_536, None).forecast, None);
    }
    // Post-copy's downtime is the fixed cost; stop-and-copy's carries every page.
    let e = Some(estimate);
    let post = PostcopyPlan.start(65_536, e).forecast.map(|f| f.downtime);
    let stop = StopAndCopyPlan.start(65_536, e).forecast.map(|f| f.downtime);
    assert_eq!(post, Some(Duration::from_millis(5)));
    assert!(stop > post);
}

#[test]
fn test_precopy_rounds_until_the_rest_fits_the_limit() {
    let mut plan = PrecopyPlan::new(PolicyConfig::default(), true);
    assert!(matches!(plan.start(65_536, None).next, Next::Round { .. }));
    // 200,000 pages take ~820 ms: over the 300 ms limit, so another round.
    assert!(matches!(
        plan.after_round(&obs(0, 200_000, 1e3)).next,
        Next::Round { .. }
    ));
    // 10,000 pages fit the limit (41 ms), but the round shrank the set 20-fold: one more.
    assert!(matches!(
        plan.after_round(&obs(1, 10_000, 1e3)).next,
        Next::Round { .. }
    ));
    // 10 pages take 41 us: nothing left to gain.
    let v = plan.after_round(&obs(2, 10, 1e3));
    assert_eq!(v.next, Next::Switchover(Switchover::StopAndCopy));
    assert_eq!(v.decisions[0].action, "stop-and-copy");
    assert!(
        v.decisions[0].reason.contains("cost little"),
        "{}",
        v.decisions[0].reason
    );
    assert!(v.forecast.is_some_and(|f| f.basis.starts_with("after round 2")));
}

#[test]
fn test_a_stall_is_the_plans_to_handle() {
    let cfg = PolicyConfig {
        stall_rounds: 2,
        ..PolicyConfig::default()
    };
    // The same stalled history: pre-copy forces a stop-and-copy, auto and hybrid post-copy.
    let stalled = [obs(0, 500_000, 1e6), obs(1, 500_000, 1e6), obs(2, 500_000, 1e6)];
    let mut pre = PrecopyPlan::new(cfg, true);
    let mut auto = AutoPlan::new(cfg, &[Algorithm::Precopy, Algorithm::Postcopy]);
    let last = |plan: &mut dyn Plan| stalled.iter().map(|o| plan.after_round(o)).last();
    let pre_v = last(&mut pre).expect("a verdict");
    assert_eq!(pre_v.next, Next::Switchover(Switchover::StopAndCopy));
    assert_eq!(pre_v.decisions[0].action, "forced stop-and-copy");
    // Auto's cost model sees that pre-copy does not converge and picks post-copy at round 0.
    assert_eq!(
        auto.after_round(&stalled[0]).next,
        Next::Switchover(Switchover::Postcopy)
    );
    assert_eq!(auto.algorithm(), Algorithm::Postcopy);
    let r = Reason::NotShrinking;
    let d = Duration::from_secs(2);
    assert!(matches!(
        pre.on_stall(&stalled[0], r, d),
        Decision::StopAndCopy { forced: true, .. }
    ));
    assert_eq!(
        HybridPlan::new(cfg, true).on_stall(&stalled[0], r, d),
        Decision::SwitchToPostcopy { reason: r }
    );
}

#[test]
fn test_hybrid_switches_to_postcopy_after_its_rounds_and_keeps_its_name() {
    let cfg = PolicyConfig::default();
    let mut plan = HybridPlan::new(cfg, true);
    let mut v = plan.start(65_536, None);
    let mut round = 0;
    while let Next::Round { .. } = v.next {
        v = plan.after_round(&obs(round, 400_000, 1e6));
        round += 1;
        assert!(round <= cfg.hybrid_rounds, "hybrid ran past its rounds");
    }
    assert_eq!(v.next, Next::Switchover(Switchover::Postcopy));
    assert_eq!(plan.algorithm(), Algorithm::Hybrid);
}

#[test]
fn test_auto_that_chooses_precopy_goes_on_with_rounds() {
    let mut plan = AutoPlan::new(PolicyConfig::default(), &POOL);
    // Few dirty pages: pre-copy converges in the next round and is the fastest.
    let v = plan.after_round(&obs(0, 20_000, 100.0));
    assert_eq!(v.decisions[0].action, "auto chose precopy");
    assert_eq!(plan.algorithm(), Algorithm::Precopy);
    // 20,000 pages fit the limit, but a round still shrinks them.
    assert!(matches!(v.next, Next::Round { .. }));
    assert!(v.forecast.is_some_and(|f| f.algorithm == Algorithm::Precopy));
    let v = plan.after_round(&obs(1, 5, 100.0));
    assert_eq!(v.next, Next::Switchover(Switchover::StopAndCopy));
}

#[test]
fn test_an_abort_carries_its_detail() {
    let cfg = PolicyConfig {
        on_stall: crate::engine::StallAction::Abort,
        max_rounds: 1,
        ..PolicyConfig::default()
    };
    let mut plan = PrecopyPlan::new(cfg, false);
    let v = plan.after_round(&obs(0, 900_000, 1e6));
    match v.next {
        Next::Abort { detail } => assert!(detail.contains("round cap"), "{detail}"),
        other => panic!("expected an abort, got {other:?}"),
    }
}
