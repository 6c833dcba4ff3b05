//! Auto: one pre-copy round to measure, then the cost model picks from the pool.

use std::time::Duration;

use super::rounds::Rounds;
use super::{Choice, Estimate, Forecast, Next, Plan, RoundObservation, Switchover, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, PolicyConfig, Prediction, Reason};
use crate::protocol::Algorithm;

/// The `auto` plan. Round 0 measures the dirty rate and the bandwidth; the cost model then
/// chooses the fastest algorithm of the pool whose downtime fits the limit. If it chooses
/// pre-copy, the rounds go on, and a stall may still turn into post-copy.
#[derive(Debug, Clone)]
pub struct AutoPlan {
    rounds: Rounds,
    /// The pool without `auto` itself.
    concrete: Vec<Algorithm>,
    chosen: Option<Algorithm>,
}

impl AutoPlan {
    /// An `auto` plan within `cfg`, choosing among `pool`.
    pub fn new(cfg: PolicyConfig, pool: &[Algorithm]) -> Self {
        let postcopy_in_pool = pool.contains(&Algorithm::Postcopy) || pool.contains(&Algorithm::Hybrid);
        Self {
            rounds: Rounds::new(cfg, postcopy_in_pool),
            concrete: pool.iter().copied().filter(|a| *a != Algorithm::Auto).collect(),
            chosen: None,
        }
    }

    fn inputs(obs: &RoundObservation) -> CostInputs {
        CostInputs {
            remaining_pages: obs.remaining_pages,
            dirty_pages_per_sec: obs.dirty_pages_per_sec,
            working_set_pages: obs.remaining_pages.max(1),
            bandwidth_bytes_per_sec: obs.bandwidth_bytes_per_sec,
            fixed_switchover: obs.fixed_switchover,
        }
    }

    /// The choice after round 0, with every option the cost model weighed.
    fn choose(&mut self, obs: &RoundObservation) -> (Algorithm, Choice, Forecast) {
        let (choice, options) = policy::choose_algorithm(&self.rounds.cfg, &self.concrete, &Self::inputs(obs));
        self.chosen = Some(choice.algorithm);
        let options = options
            .iter()
            .map(|p| {
                format!(
                    "{} {:.1} ms down / {:.2} s total{}",
                    p.algorithm,
                    p.downtime.as_secs_f64() * 1e3,
                    p.total.as_secs_f64(),
                    if p.converges { "" } else { " (does not converge)" }
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let forecast = Forecast {
            algorithm: choice.algorithm,
            downtime: choice.downtime,
            total: choice.total,
            basis: format!(
                "round 0: dirty rate {:.0} pages/s, bandwidth {:.1} MB/s, fixed switchover {:.2} ms; options: {options}",
                obs.dirty_pages_per_sec,
                obs.bandwidth_bytes_per_sec / 1e6,
                obs.fixed_switchover.as_secs_f64() * 1e3,
            ),
        };
        let why = Choice::new(
            format!("auto chose {}", choice.algorithm),
            "lowest predicted total time within the downtime limit",
        );
        (choice.algorithm, why, forecast)
    }
}

impl Plan for AutoPlan {
    fn algorithm(&self) -> Algorithm {
        self.chosen.unwrap_or(Algorithm::Auto)
    }

    fn iterates(&self) -> bool {
        true
    }

    fn start(&mut self, _pages: u64, _estimate: Option<Estimate>) -> Verdict {
        self.rounds.first()
    }

    fn after_round(&mut self, obs: &RoundObservation) -> Verdict {
        let mut decisions = Vec::new();
        let mut forecast = None;
        if self.chosen.is_none() {
            let (chosen, why, predicted) = self.choose(obs);
            decisions.push(why);
            forecast = Some(predicted);
            let now = match chosen {
                Algorithm::Postcopy => Some(Switchover::Postcopy),
                Algorithm::StopAndCopy => Some(Switchover::StopAndCopy),
                _ => None,
            };
            if let Some(how) = now {
                return Verdict {
                    next: Next::Switchover(how),
                    decisions,
                    forecast,
                };
            }
        }
        let decision = self.rounds.decide(Algorithm::Auto, obs);
        let verdict = self.rounds.verdict(decision, obs, self.algorithm());
        if verdict.next == Next::Switchover(Switchover::Postcopy) {
            self.chosen = Some(Algorithm::Postcopy);
        }
        decisions.extend(verdict.decisions);
        Verdict {
            next: verdict.next,
            decisions,
            forecast: verdict.forecast.or(forecast),
        }
    }

    fn on_stall(&self, _obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision {
        policy::stall_decision(&self.rounds.cfg, true, self.rounds.postcopy_in_pool, reason, predicted)
    }

    fn predict(&self, inputs: &CostInputs) -> Prediction {
        policy::choose_algorithm(&self.rounds.cfg, &self.concrete, inputs).0
    }
}
