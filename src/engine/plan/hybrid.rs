//! Hybrid: a bounded number of pre-copy rounds, then post-copy for the rest.

use std::time::Duration;

use super::rounds::Rounds;
use super::{Estimate, Plan, RoundObservation, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, PolicyConfig, Prediction, Reason};
use crate::protocol::Algorithm;

/// The hybrid plan: `hybrid_rounds` rounds (stopping early if the rest fits the downtime
/// limit), then post-copy. Its report keeps the name `hybrid` after the switch.
#[derive(Debug, Clone)]
pub struct HybridPlan {
    rounds: Rounds,
}

impl HybridPlan {
    /// A hybrid plan within `cfg`.
    pub fn new(cfg: PolicyConfig, postcopy_in_pool: bool) -> Self {
        Self {
            rounds: Rounds::new(cfg, postcopy_in_pool),
        }
    }
}

impl Plan for HybridPlan {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Hybrid
    }

    fn iterates(&self) -> bool {
        true
    }

    fn start(&mut self, _pages: u64, _estimate: Option<Estimate>) -> Verdict {
        self.rounds.first()
    }

    fn after_round(&mut self, obs: &RoundObservation) -> Verdict {
        let decision = self.rounds.decide(Algorithm::Hybrid, obs);
        self.rounds.verdict(decision, obs, Algorithm::Hybrid)
    }

    fn on_stall(&self, _obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision {
        policy::stall_decision(&self.rounds.cfg, true, self.rounds.postcopy_in_pool, reason, predicted)
    }

    /// Its rounds as pre-copy's would go; if they do not converge within them, the switch to
    /// post-copy, which then moves at most what pre-copy had left at the start.
    fn predict(&self, inputs: &CostInputs) -> Prediction {
        let cfg = PolicyConfig {
            max_rounds: self.rounds.cfg.hybrid_rounds,
            ..self.rounds.cfg
        };
        let pre = policy::predict_precopy(&cfg, inputs);
        if pre.converges {
            return Prediction {
                algorithm: Algorithm::Hybrid,
                ..pre
            };
        }
        let post = policy::predict_postcopy(inputs);
        Prediction {
            algorithm: Algorithm::Hybrid,
            downtime: post.downtime,
            total: pre.total.saturating_sub(pre.downtime).saturating_add(post.total),
            converges: true,
        }
    }
}
