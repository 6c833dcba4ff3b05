//! Pre-copy (Clark et al.): rounds while the guest runs, then a short stop-and-copy.

use std::time::Duration;

use super::rounds::Rounds;
use super::{Estimate, Next, Plan, RoundObservation, Switchover, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, PolicyConfig, Prediction, Reason};
use crate::protocol::Algorithm;

/// The pre-copy plan. A stall turns into post-copy only when the policy is told to
/// (`on_stall = postcopy`) and the pool has it.
#[derive(Debug, Clone)]
pub struct PrecopyPlan {
    rounds: Rounds,
    algorithm: Algorithm,
}

impl PrecopyPlan {
    /// A pre-copy plan within `cfg`.
    pub fn new(cfg: PolicyConfig, postcopy_in_pool: bool) -> Self {
        Self {
            rounds: Rounds::new(cfg, postcopy_in_pool),
            algorithm: Algorithm::Precopy,
        }
    }
}

impl Plan for PrecopyPlan {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn iterates(&self) -> bool {
        true
    }

    fn start(&mut self, _pages: u64, _estimate: Option<Estimate>) -> Verdict {
        self.rounds.first()
    }

    fn after_round(&mut self, obs: &RoundObservation) -> Verdict {
        let decision = self.rounds.decide(Algorithm::Precopy, obs);
        let verdict = self.rounds.verdict(decision, obs, self.algorithm);
        if verdict.next == Next::Switchover(Switchover::Postcopy) {
            // What runs from here is post-copy, and the report says so.
            self.algorithm = Algorithm::Postcopy;
        }
        verdict
    }

    fn on_stall(&self, _obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision {
        policy::stall_decision(&self.rounds.cfg, false, self.rounds.postcopy_in_pool, reason, predicted)
    }

    fn predict(&self, inputs: &CostInputs) -> Prediction {
        policy::predict_precopy(&self.rounds.cfg, inputs)
    }
}
