//! The source side's protocol machine, pure: given what just happened, what the run does next.
//!
//! The run ([`super::SourceRun`]) carries each [`SourceAction`] out (I/O: the link, the data
//! plane, the VM) and reports what came of it as a [`SourceEvent`]. The machine owns the
//! algorithm's [`Plan`], so that every decision between rounds goes through it, and the stage
//! order, so that a stage out of order is an error instead of a report that lies. It also
//! knows, at every point, where the VM is if the run fails there.

use super::super::plan::{self, Choice, Estimate, Forecast, Next, Plan, RoundObservation, Switchover};
use super::super::policy::PolicyConfig;
use super::super::report::VmLocation;
use super::super::stage::{Stage, StageError, StageMachine};
use super::super::verify::VerifyMode;
use crate::protocol::Algorithm;

/// Where the source is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceState {
    /// Not started.
    Idle,
    /// `Hello` sent; waiting for `Welcome`.
    Negotiating,
    /// `Reserve` sent; waiting for `Reserved`.
    Reserving,
    /// Pre-copy round `round` under way.
    Rounds { round: u32 },
    /// The VM is paused; the final pages (stop-and-copy) and the state go out.
    Switching { how: Switchover },
    /// Comparing the target's digests with this side's memory: before `Prepared` in
    /// stop-and-copy order (verify before commit), after the pull in post-copy order.
    Verifying { how: Switchover },
    /// Stop-and-copy verified after activation: the target runs the VM; comparing its digests
    /// with this side's paused memory before the copy is freed.
    Auditing,
    /// Waiting for `Prepared`.
    Preparing { how: Switchover },
    /// `Commit` sent (or about to be); waiting for `Activated`.
    Committed { how: Switchover },
    /// Post-copy: the target runs the VM and pulls what it lacks.
    Pulling,
    /// Post-copy: the link was lost; reconnecting. `pull_done`: the target held every page.
    Recovering { pull_done: bool },
    /// Freeing the source copy.
    Releasing,
    /// Finished.
    Done,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SourceEvent {
    /// A new migration starts.
    Start,
    /// An operator retries the pull of a held post-copy copy.
    RetryPull,
    /// `Welcome` arrived and the pool is computed.
    Negotiated {
        /// Algorithms both sides offer.
        pool: Vec<Algorithm>,
    },
    /// `Reserved` arrived.
    Reserved {
        /// The VM's size in pages.
        pages: u64,
        /// What earlier migrations or the link's cap say of the bandwidth.
        estimate: Option<Estimate>,
        /// Time since the migration started (what a deadline has spent already).
        elapsed: std::time::Duration,
    },
    /// A pre-copy round went out and its dirty set was collected.
    RoundObserved(RoundObservation),
    /// The VM is paused and its final pages and state went out.
    StateSent,
    /// The target's digests match this side's memory.
    Verified,
    /// `Prepared` arrived.
    Prepared,
    /// `Activated` arrived.
    Activated,
    /// The target holds every page (`Complete` in the pull).
    PullComplete,
    /// The link failed where a new one can carry on.
    LinkLost,
    /// A new link carries the pull on.
    Reconnected,
    /// The source copy is freed.
    Released,
}

/// What the run must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SourceAction {
    /// Begin a stage (its bookkeeping, events and stage-start faults).
    Enter(Stage),
    /// A retry starts in `pull`, where the migration it continues stopped.
    AssumePull,
    /// Open the link, `Hello`/`Welcome`/`Authenticate`, and negotiate.
    Handshake,
    /// Send `Reserve` and wait for `Reserved`.
    Reserve,
    /// Start the data plane; `resends` if pages may go more than once (a delta cache pays).
    StartPlane { resends: bool },
    /// Start dirty logging.
    StartDirtyLog,
    /// Send a pre-copy round of the pending pages, then `RoundDone`, and collect the next set.
    SendRound { round: u32, rate: Option<u64> },
    /// Record the plan's decisions and forecast.
    Decided {
        decisions: Vec<Choice>,
        forecast: Option<Forecast>,
    },
    /// Abort: the plan gave up before commitment.
    Abort { detail: String },
    /// Pause, collect the last dirty set, send it (stop-and-copy) or hand it to demand paging
    /// (post-copy), then `Suspend`, `VcpuState` and `DeviceState`.
    Switchover { how: Switchover },
    /// Receive the target's digests and compare them with this side's paused memory.
    Verify,
    /// Wait for `Prepared`.
    AwaitPrepared,
    /// The point of no return, then `Commit`.
    Commit,
    /// Wait for `Activated`.
    AwaitActivated,
    /// Serve the target's pulls and push the rest until it holds every page.
    Pull,
    /// Reconnect and resume the pull.
    Recover,
    /// Free the source copy and send `Complete`.
    Release,
}

/// An event the machine cannot take where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum MachineError {
    /// The event does not fit the state.
    #[error("source machine: {event} in state {state:?}")]
    Unexpected { state: SourceState, event: &'static str },
    /// A stage out of order.
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// The machine. See the module docs.
#[derive(Debug)]
pub(crate) struct SourceMachine {
    state: SourceState,
    stages: StageMachine,
    requested: Algorithm,
    cfg: PolicyConfig,
    plan: Option<Box<dyn Plan>>,
    /// A lost link in the pull is recovered (the request's recovery timeout is not zero).
    recovers: bool,
    /// Where a stop-and-copy switchover verifies.
    verify: VerifyMode,
    /// `random`'s seed.
    seed: u64,
    /// The request's deadline for total time.
    deadline: Option<std::time::Duration>,
    /// What both sides offer, once negotiated.
    pool: Vec<Algorithm>,
}

impl SourceMachine {
    /// A machine for a migration that asked for `requested`.
    pub fn new(requested: Algorithm, cfg: PolicyConfig, recovers: bool, verify: VerifyMode) -> Self {
        Self {
            state: SourceState::Idle,
            stages: StageMachine::Idle,
            requested,
            cfg,
            plan: None,
            recovers,
            verify,
            seed: 0,
            deadline: None,
            pool: Vec::new(),
        }
    }

    /// The same machine, with `random`'s `seed` and a `deadline` for total time.
    pub fn with_qos(mut self, seed: u64, deadline: Option<std::time::Duration>) -> Self {
        self.seed = seed;
        self.deadline = deadline;
        self
    }

    /// The algorithm `Reserve` names: `random`'s pick once negotiated, else the one requested.
    pub fn reserving(&self) -> Algorithm {
        match self.requested {
            Algorithm::Random => self.algorithm(),
            other => other,
        }
    }

    /// True if a stop-and-copy switchover leaves verification until after activation.
    pub fn verifies_after_activation(&self) -> bool {
        self.verify == VerifyMode::AfterActivation
    }

    /// Where the protocol is.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// The stage under way, if any.
    pub fn stage(&self) -> Option<Stage> {
        match self.stages {
            StageMachine::In(s) => Some(s),
            _ => None,
        }
    }

    /// The algorithm in force: the plan's once negotiated, else the one requested.
    pub fn algorithm(&self) -> Algorithm {
        self.plan.as_ref().map_or(self.requested, |p| p.algorithm())
    }

    /// Records that the run began `stage`: the one place the stage order is checked.
    pub fn enter(&mut self, stage: Stage) -> Result<(), StageError> {
        self.stages = self.stages.enter(stage)?;
        Ok(())
    }

    /// A retried pull starts in `pull`, where the migration it continues stopped.
    pub fn assume_pull(&mut self) {
        self.stages = StageMachine::resuming_pull();
    }

    /// Records that the last stage ended with the migration complete.
    pub fn finish(&mut self) -> Result<(), StageError> {
        self.stages = self.stages.finish()?;
        Ok(())
    }

    /// True while the run waits on a pull that may span the whole background push.
    pub fn pulling(&self) -> bool {
        matches!(self.state, SourceState::Pulling | SourceState::Recovering { .. })
    }

    /// True if a link lost now is recovered rather than failing the run: the target may lack
    /// pages only this side holds, or has yet to confirm them.
    pub fn recovers_link_loss(&self) -> bool {
        self.recovers
            && matches!(
                self.state,
                SourceState::Pulling
                    | SourceState::Recovering { .. }
                    | SourceState::Verifying {
                        how: Switchover::Postcopy
                    }
            )
    }

    /// Where the VM is if the run fails now. `committed`: the point of no return was passed.
    pub fn location(&self, committed: bool) -> VmLocation {
        use SourceState as S;
        if !committed {
            // Before commitment the source copy is the only one.
            return VmLocation::Source;
        }
        match self.state {
            // Commit went out and no answer came: the target may run the VM.
            S::Committed {
                how: Switchover::StopAndCopy,
            } => VmLocation::Undetermined,
            // The target runs (or may run) the VM with holes only this copy can fill.
            S::Committed {
                how: Switchover::Postcopy,
            }
            | S::Pulling
            | S::Recovering { pull_done: false } => VmLocation::TargetAwaitingPages,
            // The target holds every page; only its confirmation may be missing.
            S::Verifying {
                how: Switchover::Postcopy,
            }
            | S::Recovering { pull_done: true }
            | S::Auditing
            | S::Releasing
            | S::Done => VmLocation::Target,
            S::Idle
            | S::Negotiating
            | S::Reserving
            | S::Rounds { .. }
            | S::Switching { .. }
            | S::Verifying {
                how: Switchover::StopAndCopy,
            }
            | S::Preparing { .. } => VmLocation::Undetermined,
        }
    }

    /// Takes `event`; returns what to do next, in order.
    pub fn step(&mut self, event: SourceEvent) -> Result<Vec<SourceAction>, MachineError> {
        use SourceAction as A;
        use SourceEvent as E;
        use SourceState as S;
        let unexpected = |state, event: &SourceEvent| MachineError::Unexpected {
            state,
            event: event_name(event),
        };
        let (next, actions) = match (self.state, event) {
            (S::Idle, E::Start) => (S::Negotiating, vec![A::Enter(Stage::Premigration), A::Handshake]),
            (S::Idle, E::RetryPull) => {
                self.plan = Some(Box::new(plan::PostcopyPlan));
                (S::Recovering { pull_done: false }, vec![A::AssumePull, A::Recover])
            }
            (S::Negotiating, E::Negotiated { pool }) => {
                self.plan = Some(plan::for_algorithm(self.requested, self.cfg, &pool, self.seed));
                self.pool = pool;
                (S::Reserving, vec![A::Enter(Stage::Reservation), A::Reserve])
            }
            (
                S::Reserving,
                E::Reserved {
                    pages,
                    estimate,
                    elapsed,
                },
            ) => {
                let plan = self.plan.take().ok_or(MachineError::Unexpected {
                    state: S::Reserving,
                    event: "Reserved before negotiation",
                })?;
                // Wrapped here, where the time the deadline has spent is known.
                let deadline = self.deadline.map(|total| plan::Deadline { total, spent: elapsed });
                let plan = self
                    .plan
                    .insert(plan::with_deadline(plan, deadline, &self.cfg, &self.pool));
                let resends = plan.iterates();
                let verdict = plan.start(pages, estimate);
                let mut actions = vec![A::StartPlane { resends }];
                if verdict.forecast.is_some() || !verdict.decisions.is_empty() {
                    actions.push(A::Decided {
                        decisions: verdict.decisions,
                        forecast: verdict.forecast,
                    });
                }
                let (next, more) = self.follow(verdict.next, None);
                actions.extend(more);
                (next, actions)
            }
            (S::Rounds { round }, E::RoundObserved(obs)) => {
                let plan = self.plan.as_mut().ok_or(MachineError::Unexpected {
                    state: S::Rounds { round },
                    event: "RoundObserved without a plan",
                })?;
                let verdict = plan.after_round(&obs);
                let mut actions = vec![A::Decided {
                    decisions: verdict.decisions,
                    forecast: verdict.forecast,
                }];
                let (next, more) = self.follow(verdict.next, Some(round));
                actions.extend(more);
                (next, actions)
            }
            (S::Switching { how }, E::StateSent) => match (how, self.verify) {
                // Verified before commit: a copy that differs is rolled back while the
                // source still owns the VM.
                (Switchover::StopAndCopy, VerifyMode::BeforeCommit) => {
                    (S::Verifying { how }, vec![A::Enter(Stage::Commitment), A::Verify])
                }
                // Verified after activation, as post-copy is: no hashing in the downtime.
                (Switchover::StopAndCopy, VerifyMode::AfterActivation) | (Switchover::Postcopy, _) => {
                    (S::Preparing { how }, vec![A::AwaitPrepared])
                }
            },
            (
                S::Verifying {
                    how: Switchover::StopAndCopy,
                },
                E::Verified,
            ) => (
                S::Preparing {
                    how: Switchover::StopAndCopy,
                },
                vec![A::AwaitPrepared],
            ),
            (S::Preparing { how }, E::Prepared) => {
                let actions = match (how, self.verify) {
                    (Switchover::StopAndCopy, VerifyMode::BeforeCommit) => {
                        vec![A::Commit, A::Enter(Stage::Activation), A::AwaitActivated]
                    }
                    (Switchover::StopAndCopy, VerifyMode::AfterActivation) | (Switchover::Postcopy, _) => {
                        vec![A::Enter(Stage::Activation), A::Commit, A::AwaitActivated]
                    }
                };
                (S::Committed { how }, actions)
            }
            (S::Committed { how }, E::Activated) => match (how, self.verify) {
                (Switchover::StopAndCopy, VerifyMode::BeforeCommit) => (S::Releasing, vec![A::Release]),
                (Switchover::StopAndCopy, VerifyMode::AfterActivation) => {
                    (S::Auditing, vec![A::Enter(Stage::Commitment), A::Verify])
                }
                (Switchover::Postcopy, _) => (S::Pulling, vec![A::Enter(Stage::Pull), A::Pull]),
            },
            (S::Auditing, E::Verified) => (S::Releasing, vec![A::Release]),
            (S::Pulling, E::PullComplete) => {
                // After a recovery during verification the stage is already commitment.
                let mut actions = Vec::new();
                if self.stage() != Some(Stage::Commitment) {
                    actions.push(A::Enter(Stage::Commitment));
                }
                actions.push(A::Verify);
                (
                    S::Verifying {
                        how: Switchover::Postcopy,
                    },
                    actions,
                )
            }
            (
                S::Verifying {
                    how: Switchover::Postcopy,
                },
                E::Verified,
            ) => (S::Releasing, vec![A::Release]),
            (state, E::LinkLost) if self.recovers_link_loss() => {
                let pull_done = match state {
                    S::Verifying { .. } => true,
                    S::Recovering { pull_done } => pull_done,
                    _ => false,
                };
                (S::Recovering { pull_done }, vec![A::Recover])
            }
            (S::Recovering { .. }, E::Reconnected) => (S::Pulling, vec![A::Pull]),
            (S::Releasing, E::Released) => {
                self.finish()?;
                (S::Done, Vec::new())
            }
            (state, event) => return Err(unexpected(state, &event)),
        };
        self.state = next;
        Ok(actions)
    }

    /// The state and actions that carry out a plan's `next`; `after` is the round just done.
    fn follow(&self, next: Next, after: Option<u32>) -> (SourceState, Vec<SourceAction>) {
        use SourceAction as A;
        match (next, after) {
            (Next::Round { rate }, None) => (
                SourceState::Rounds { round: 0 },
                vec![
                    A::Enter(Stage::Precopy),
                    A::StartDirtyLog,
                    A::SendRound { round: 0, rate },
                ],
            ),
            (Next::Round { rate }, Some(done)) => (
                SourceState::Rounds { round: done + 1 },
                vec![A::SendRound { round: done + 1, rate }],
            ),
            (Next::Switchover(how), _) => (
                SourceState::Switching { how },
                vec![A::Enter(Stage::Stopcopy), A::Switchover { how }],
            ),
            (Next::Abort { detail }, _) => (SourceState::Done, vec![A::Abort { detail }]),
        }
    }
}

fn event_name(e: &SourceEvent) -> &'static str {
    match e {
        SourceEvent::Start => "Start",
        SourceEvent::RetryPull => "RetryPull",
        SourceEvent::Negotiated { .. } => "Negotiated",
        SourceEvent::Reserved { .. } => "Reserved",
        SourceEvent::RoundObserved(_) => "RoundObserved",
        SourceEvent::StateSent => "StateSent",
        SourceEvent::Verified => "Verified",
        SourceEvent::Prepared => "Prepared",
        SourceEvent::Activated => "Activated",
        SourceEvent::PullComplete => "PullComplete",
        SourceEvent::LinkLost => "LinkLost",
        SourceEvent::Reconnected => "Reconnected",
        SourceEvent::Released => "Released",
    }
}

#[cfg(test)]
mod tests;
