use std::time::Duration;

use super::*;
use SourceAction as A;
use SourceEvent as E;

/// Steps `m` with `event` and carries out the stage entries, as the run would.
fn step(m: &mut SourceMachine, event: SourceEvent) -> Vec<SourceAction> {
    let actions = m.step(event).expect("a valid step");
    for a in &actions {
        match a {
            A::Enter(stage) => m.enter(*stage).expect("stage order"),
            A::AssumePull => m.assume_pull(),
            _ => {}
        }
    }
    actions
}

fn negotiated(m: &mut SourceMachine) {
    step(m, E::Start);
    step(
        m,
        E::Negotiated {
            pool: Algorithm::ALL.to_vec(),
        },
    );
}

fn reserved() -> SourceEvent {
    E::Reserved {
        pages: 1024,
        estimate: None,
        elapsed: Duration::from_millis(5),
    }
}

fn round(round: u32, remaining: u64) -> SourceEvent {
    E::RoundObserved(RoundObservation {
        round,
        remaining_pages: remaining,
        dirty_pages_per_sec: 10.0,
        bandwidth_bytes_per_sec: 1e9,
        fixed_switchover: Duration::from_millis(1),
        precopy_elapsed: Duration::from_millis(10),
        sent_pages: 1024,
        vm_pages: 1024,
    })
}

#[test]
fn test_stop_and_copy_verifies_before_it_commits_and_frees_after_activation() {
    let mut m = SourceMachine::new(
        Algorithm::StopAndCopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    );
    negotiated(&mut m);
    let a = step(&mut m, reserved());
    assert_eq!(
        a,
        vec![
            A::StartPlane { resends: false },
            A::Enter(Stage::Stopcopy),
            A::Switchover {
                how: Switchover::StopAndCopy
            }
        ]
    );
    assert_eq!(step(&mut m, E::StateSent), vec![A::Enter(Stage::Commitment), A::Verify]);
    assert_eq!(m.location(false), VmLocation::Source);
    assert_eq!(step(&mut m, E::Verified), vec![A::AwaitPrepared]);
    assert_eq!(
        step(&mut m, E::Prepared),
        vec![A::Commit, A::Enter(Stage::Activation), A::AwaitActivated]
    );
    // Commit out, no answer: the target may run the VM.
    assert_eq!(m.location(true), VmLocation::Undetermined);
    assert_eq!(step(&mut m, E::Activated), vec![A::Release]);
    assert_eq!(m.location(true), VmLocation::Target);
    assert!(step(&mut m, E::Released).is_empty());
    assert_eq!(m.state(), SourceState::Done);
}

#[test]
fn test_stop_and_copy_verified_after_activation_commits_without_digests_and_audits_before_freeing() {
    let mut m = SourceMachine::new(
        Algorithm::StopAndCopy,
        PolicyConfig::default(),
        true,
        VerifyMode::AfterActivation,
    );
    negotiated(&mut m);
    step(&mut m, reserved());
    // No digests inside the downtime: straight to `Prepared`.
    assert_eq!(step(&mut m, E::StateSent), vec![A::AwaitPrepared]);
    assert_eq!(m.location(false), VmLocation::Source);
    assert_eq!(
        step(&mut m, E::Prepared),
        vec![A::Enter(Stage::Activation), A::Commit, A::AwaitActivated]
    );
    assert_eq!(m.location(true), VmLocation::Undetermined);
    assert_eq!(step(&mut m, E::Activated), vec![A::Enter(Stage::Commitment), A::Verify]);
    // The target runs the VM: a failed audit holds the source copy, never resumes it.
    assert_eq!(m.location(true), VmLocation::Target);
    assert!(!m.recovers_link_loss());
    assert_eq!(step(&mut m, E::Verified), vec![A::Release]);
    assert!(step(&mut m, E::Released).is_empty());
    assert_eq!(m.state(), SourceState::Done);
}

#[test]
fn test_precopy_rounds_follow_the_plan_then_switch_over() {
    let mut m = SourceMachine::new(
        Algorithm::Precopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    );
    negotiated(&mut m);
    let a = step(&mut m, reserved());
    assert_eq!(a[0], A::StartPlane { resends: true });
    assert_eq!(
        a[1..],
        [
            A::Enter(Stage::Precopy),
            A::StartDirtyLog,
            A::SendRound { round: 0, rate: None }
        ]
    );
    // Far from converged at 1 GB/s against a 300 ms limit: another round.
    let a = step(&mut m, round(0, 1_000_000));
    assert_eq!(a.last(), Some(&A::SendRound { round: 1, rate: None }));
    let a = step(&mut m, round(1, 10));
    assert!(matches!(&a[0], A::Decided { decisions, forecast: Some(_) } if decisions[0].action == "stop-and-copy"));
    assert_eq!(
        a[1..],
        [
            A::Enter(Stage::Stopcopy),
            A::Switchover {
                how: Switchover::StopAndCopy
            }
        ]
    );
}

#[test]
fn test_postcopy_commits_before_the_pull_and_recovers_a_lost_link() {
    let mut m = SourceMachine::new(
        Algorithm::Postcopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    );
    negotiated(&mut m);
    step(&mut m, reserved());
    assert_eq!(step(&mut m, E::StateSent), vec![A::AwaitPrepared]);
    assert_eq!(
        step(&mut m, E::Prepared),
        vec![A::Enter(Stage::Activation), A::Commit, A::AwaitActivated]
    );
    // Past Commit with pages still on the source: never resumed here, never freed.
    assert_eq!(m.location(true), VmLocation::TargetAwaitingPages);
    assert_eq!(step(&mut m, E::Activated), vec![A::Enter(Stage::Pull), A::Pull]);
    assert!(m.pulling() && m.recovers_link_loss());
    assert_eq!(step(&mut m, E::LinkLost), vec![A::Recover]);
    assert_eq!(m.location(true), VmLocation::TargetAwaitingPages);
    assert_eq!(step(&mut m, E::Reconnected), vec![A::Pull]);
    assert_eq!(
        step(&mut m, E::PullComplete),
        vec![A::Enter(Stage::Commitment), A::Verify]
    );
    // Every page is on the target; a link lost now still waits for its confirmation.
    assert_eq!(m.location(true), VmLocation::Target);
    assert_eq!(step(&mut m, E::LinkLost), vec![A::Recover]);
    assert_eq!(m.location(true), VmLocation::Target);
    step(&mut m, E::Reconnected);
    // The stage is commitment already: it is not entered twice.
    assert_eq!(step(&mut m, E::PullComplete), vec![A::Verify]);
    assert_eq!(step(&mut m, E::Verified), vec![A::Release]);
    step(&mut m, E::Released);
    assert_eq!(m.state(), SourceState::Done);
}

#[test]
fn test_a_link_lost_before_the_pull_is_not_recovered() {
    let mut m = SourceMachine::new(
        Algorithm::Precopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    );
    negotiated(&mut m);
    step(&mut m, reserved());
    assert!(!m.recovers_link_loss());
    assert!(matches!(m.step(E::LinkLost), Err(MachineError::Unexpected { .. })));
    // Without a recovery timeout, not even in the pull.
    let mut m = SourceMachine::new(
        Algorithm::Postcopy,
        PolicyConfig::default(),
        false,
        VerifyMode::BeforeCommit,
    );
    negotiated(&mut m);
    step(&mut m, reserved());
    step(&mut m, E::StateSent);
    step(&mut m, E::Prepared);
    step(&mut m, E::Activated);
    assert!(!m.recovers_link_loss());
}

#[test]
fn test_an_event_out_of_order_is_an_error_naming_it() {
    let mut m = SourceMachine::new(
        Algorithm::Precopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    );
    let err = m.step(E::Prepared).expect_err("Prepared before Start");
    assert_eq!(err.to_string(), "source machine: Prepared in state Idle");
    assert_eq!(m.state(), SourceState::Idle);
}

#[test]
fn test_a_retried_pull_starts_recovering_in_pull() {
    let mut m = SourceMachine::new(
        Algorithm::Postcopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    );
    assert_eq!(step(&mut m, E::RetryPull), vec![A::AssumePull, A::Recover]);
    assert_eq!(m.stage(), Some(Stage::Pull));
    assert_eq!(m.location(true), VmLocation::TargetAwaitingPages);
    assert_eq!(step(&mut m, E::Reconnected), vec![A::Pull]);
}

#[test]
fn test_a_plan_that_gives_up_aborts_before_commitment() {
    let cfg = PolicyConfig {
        on_stall: crate::engine::StallAction::Abort,
        max_rounds: 1,
        ..PolicyConfig::default()
    };
    let mut m = SourceMachine::new(Algorithm::Precopy, cfg, true, VerifyMode::BeforeCommit);
    negotiated(&mut m);
    step(&mut m, reserved());
    let a = step(&mut m, round(0, 5_000_000));
    assert!(matches!(a.last(), Some(A::Abort { detail }) if detail.contains("round cap")));
    assert_eq!(m.location(false), VmLocation::Source);
}

#[test]
fn test_random_reserves_its_pick_and_announces_it_first() {
    let mut m = SourceMachine::new(
        Algorithm::Random,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    )
    .with_qos(42, None);
    assert_eq!(m.reserving(), Algorithm::Random, "nothing picked before negotiation");
    negotiated(&mut m);
    let picked = m.reserving();
    assert!(picked.is_concrete(), "{picked}");
    assert_eq!(m.algorithm(), picked);
    let a = step(&mut m, reserved());
    let first = a.iter().find_map(|a| match a {
        A::Decided { decisions, .. } => decisions.first().cloned(),
        _ => None,
    });
    assert_eq!(first.map(|c| c.action), Some(format!("random chose {picked}")));
}

#[test]
fn test_a_deadline_wraps_the_plan_once_reserved() {
    // A deadline already spent by the setup: the plan says so, and runs as it would.
    let mut m = SourceMachine::new(
        Algorithm::StopAndCopy,
        PolicyConfig::default(),
        true,
        VerifyMode::BeforeCommit,
    )
    .with_qos(0, Some(Duration::from_millis(1)));
    negotiated(&mut m);
    let a = step(&mut m, reserved());
    assert!(
        matches!(&a[1], A::Decided { decisions, .. } if decisions[0].action == "deadline will be missed"),
        "{a:?}"
    );
    assert!(a.contains(&A::Switchover {
        how: Switchover::StopAndCopy
    }));
}
