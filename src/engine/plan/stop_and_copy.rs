//! Stop-and-copy: pause, send everything, activate.

use std::time::Duration;

use super::{up_front, Estimate, Next, Plan, RoundObservation, Switchover, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, Prediction, Reason};
use crate::protocol::Algorithm;

/// The stop-and-copy plan: it switches over at once and never runs a round.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopAndCopyPlan;

impl Plan for StopAndCopyPlan {
    fn algorithm(&self) -> Algorithm {
        Algorithm::StopAndCopy
    }

    fn iterates(&self) -> bool {
        false
    }

    fn start(&mut self, pages: u64, estimate: Option<Estimate>) -> Verdict {
        Verdict {
            forecast: up_front(self, pages, estimate),
            ..Verdict::next(Next::Switchover(Switchover::StopAndCopy))
        }
    }

    fn after_round(&mut self, _obs: &RoundObservation) -> Verdict {
        Verdict::next(Next::Switchover(Switchover::StopAndCopy))
    }

    /// Nothing iterates, so nothing can stall: stop now.
    fn on_stall(&self, _obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision {
        Decision::StopAndCopy {
            reason,
            predicted_downtime: predicted,
            forced: false,
        }
    }

    fn predict(&self, inputs: &CostInputs) -> Prediction {
        policy::predict_stop_and_copy(inputs)
    }
}
