//! The six stages of Clark et al., plus post-copy's `pull`, and the one transition function
//! that says which stage may follow which.

use std::fmt;

/// A stage of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// 0: negotiate versions, algorithms, formats.
    Premigration,
    /// 1: the target reserves resources.
    Reservation,
    /// 2: iterative rounds while the guest runs.
    Precopy,
    /// 3: the source pauses; the last pages and the vCPU/device state go.
    Stopcopy,
    /// 4: the target holds a consistent image; ownership moves (post-copy: the target holds
    /// every page and the source frees its copy).
    Commitment,
    /// 5: the target resumes the VM and announces it on the network.
    Activation,
    /// Post-copy's demand phase: the target runs and pulls what it lacks.
    Pull,
}

impl Stage {
    /// Every stage, in the order of a report.
    pub const ALL: [Stage; 7] = [
        Stage::Premigration,
        Stage::Reservation,
        Stage::Precopy,
        Stage::Stopcopy,
        Stage::Commitment,
        Stage::Activation,
        Stage::Pull,
    ];

    /// The name used in reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Premigration => "premigration",
            Stage::Reservation => "reservation",
            Stage::Precopy => "precopy",
            Stage::Stopcopy => "stopcopy",
            Stage::Commitment => "commitment",
            Stage::Activation => "activation",
            Stage::Pull => "pull",
        }
    }

    /// True for stages before the target owns the VM: a failure here leaves the VM on the
    /// source.
    pub fn before_commit(self) -> bool {
        matches!(
            self,
            Stage::Premigration | Stage::Reservation | Stage::Precopy | Stage::Stopcopy
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a migration is in its stage sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageMachine {
    /// Not started.
    Idle,
    /// In a stage.
    In(Stage),
    /// Every stage done.
    Done,
}

/// A stage that may not follow the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stage {next} cannot follow {from:?}")]
pub struct StageError {
    /// Where the machine was.
    pub from: StageMachine,
    /// What was asked.
    pub next: Stage,
}

impl StageMachine {
    /// Enters `next`, if it may follow the current stage. Pre-copy (`Precopy → Stopcopy →
    /// Commitment → Activation`) and post-copy (`Stopcopy → Activation → Pull → Commitment`)
    /// orders are both valid; a pre-copy that switches to post-copy takes the second path.
    pub fn enter(self, next: Stage) -> Result<StageMachine, StageError> {
        use Stage::*;
        let ok = match self {
            StageMachine::Idle => next == Premigration,
            StageMachine::In(cur) => matches!(
                (cur, next),
                (Premigration, Reservation)
                    | (Reservation, Precopy | Stopcopy)
                    | (Precopy, Stopcopy)
                    | (Stopcopy, Commitment | Activation)
                    | (Commitment, Activation)
                    | (Activation, Pull | Commitment)
                    | (Pull, Commitment)
            ),
            StageMachine::Done => false,
        };
        if ok {
            Ok(StageMachine::In(next))
        } else {
            Err(StageError { from: self, next })
        }
    }

    /// A held post-copy copy whose pull an operator retries: it starts in `pull`, where the
    /// migration it continues stopped.
    pub fn resuming_pull() -> StageMachine {
        StageMachine::In(Stage::Pull)
    }

    /// Ends the last stage. Valid after activation (pre-copy) or commitment (post-copy).
    pub fn finish(self) -> Result<StageMachine, StageError> {
        match self {
            StageMachine::In(Stage::Activation) | StageMachine::In(Stage::Commitment) => Ok(StageMachine::Done),
            other => Err(StageError {
                from: other,
                next: Stage::Commitment,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seq: &[Stage]) -> Result<StageMachine, StageError> {
        seq.iter().try_fold(StageMachine::Idle, |m, s| m.enter(*s))?.finish()
    }

    #[test]
    fn test_each_algorithm_path_is_valid() {
        use Stage::*;
        assert!(run(&[Premigration, Reservation, Precopy, Stopcopy, Commitment, Activation]).is_ok());
        assert!(run(&[Premigration, Reservation, Stopcopy, Commitment, Activation]).is_ok());
        assert!(run(&[Premigration, Reservation, Stopcopy, Activation, Pull, Commitment]).is_ok());
        // Verified after activation.
        assert!(run(&[Premigration, Reservation, Precopy, Stopcopy, Activation, Commitment]).is_ok());
        assert!(run(&[
            Premigration,
            Reservation,
            Precopy,
            Stopcopy,
            Activation,
            Pull,
            Commitment
        ])
        .is_ok());
    }

    #[test]
    fn test_out_of_order_stage_is_refused() {
        use Stage::*;
        let err = run(&[Premigration, Precopy]).expect_err("refused");
        assert_eq!(err.next, Precopy);
        assert!(run(&[Premigration, Reservation, Precopy]).is_err());
    }
}
