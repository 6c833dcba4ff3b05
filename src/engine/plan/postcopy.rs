//! Post-copy: activate on the target at once, pull missing pages on fault, push the rest.

use std::time::Duration;

use super::{up_front, Estimate, Next, Plan, RoundObservation, Switchover, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, Prediction, Reason};
use crate::protocol::Algorithm;

/// The post-copy plan: it switches over at once and never runs a round.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostcopyPlan;

impl Plan for PostcopyPlan {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Postcopy
    }

    fn iterates(&self) -> bool {
        false
    }

    fn start(&mut self, pages: u64, estimate: Option<Estimate>) -> Verdict {
        Verdict {
            forecast: up_front(self, pages, estimate),
            ..Verdict::next(Next::Switchover(Switchover::Postcopy))
        }
    }

    fn after_round(&mut self, _obs: &RoundObservation) -> Verdict {
        Verdict::next(Next::Switchover(Switchover::Postcopy))
    }

    fn on_stall(&self, _obs: &RoundObservation, reason: Reason, _predicted: Duration) -> Decision {
        Decision::SwitchToPostcopy { reason }
    }

    fn predict(&self, inputs: &CostInputs) -> Prediction {
        policy::predict_postcopy(inputs)
    }
}
