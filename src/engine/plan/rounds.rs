//! Pre-copy rounds, shared by the plans that iterate: the history of dirty sets, the policy's
//! verdict after each round, and the words the report shows for it.

use super::{Choice, Forecast, Next, RoundObservation, Switchover, Verdict};
use crate::engine::policy::{self, Decision, PolicyConfig, RoundContext};
use crate::protocol::Algorithm;
use crate::units::PAGE_SIZE;

#[derive(Debug, Clone)]
pub(super) struct Rounds {
    pub cfg: PolicyConfig,
    /// Dirty pages after each round, oldest first.
    history: Vec<u64>,
    pub postcopy_in_pool: bool,
}

impl Rounds {
    pub fn new(cfg: PolicyConfig, postcopy_in_pool: bool) -> Self {
        Self {
            cfg,
            history: Vec::new(),
            postcopy_in_pool,
        }
    }

    /// Round 0: every page, at the floor rate if one is set.
    pub fn first(&self) -> Verdict {
        Verdict::next(Next::Round {
            rate: policy::round_rate(&self.cfg, 0, 0.0),
        })
    }

    /// The policy's decision after `obs`, taken as `as_algorithm` would (the policy lets
    /// `auto` and `hybrid` turn a stall into post-copy, but not `precopy`).
    pub fn decide(&mut self, as_algorithm: Algorithm, obs: &RoundObservation) -> Decision {
        let ctx = RoundContext {
            algorithm: as_algorithm,
            rounds_done: obs.round + 1,
            remaining_pages: obs.remaining_pages,
            history: &self.history,
            bandwidth_bytes_per_sec: obs.bandwidth_bytes_per_sec,
            fixed_switchover: obs.fixed_switchover,
            elapsed: obs.precopy_elapsed,
            postcopy_in_pool: self.postcopy_in_pool,
            sent_pages: obs.sent_pages,
            vm_pages: obs.vm_pages,
        };
        let decision = policy::decide_round(&self.cfg, &ctx);
        self.history.push(obs.remaining_pages);
        decision
    }

    /// What `decision` amounts to; `algorithm` is the one in force, named in the forecast.
    pub fn verdict(&self, decision: Decision, obs: &RoundObservation, algorithm: Algorithm) -> Verdict {
        match decision {
            Decision::Continue => Verdict::next(Next::Round {
                rate: policy::round_rate(&self.cfg, obs.round + 1, obs.dirty_pages_per_sec * PAGE_SIZE as f64),
            }),
            Decision::StopAndCopy {
                reason,
                predicted_downtime,
                forced,
            } => Verdict {
                next: Next::Switchover(Switchover::StopAndCopy),
                decisions: vec![Choice::new(
                    if forced {
                        "forced stop-and-copy"
                    } else {
                        "stop-and-copy"
                    },
                    format!(
                        "{} (predicted downtime {:.1} ms)",
                        reason.describe(),
                        predicted_downtime.as_secs_f64() * 1e3
                    ),
                )],
                forecast: Some(Forecast {
                    algorithm,
                    downtime: predicted_downtime,
                    total: predicted_downtime,
                    basis: format!(
                        "after round {}: {} pages at {:.1} MB/s plus {:.2} ms fixed switchover",
                        obs.round,
                        obs.remaining_pages,
                        obs.bandwidth_bytes_per_sec / 1e6,
                        obs.fixed_switchover.as_secs_f64() * 1e3
                    ),
                }),
            },
            Decision::SwitchToPostcopy { reason } => Verdict {
                next: Next::Switchover(Switchover::Postcopy),
                decisions: vec![Choice::new("switch to post-copy", reason.describe())],
                forecast: None,
            },
            Decision::Abort {
                reason,
                predicted_downtime,
            } => {
                let detail = format!(
                    "{}; stop-and-copy would take {:.1} ms, over the {:.0} ms ceiling",
                    reason.describe(),
                    predicted_downtime.as_secs_f64() * 1e3,
                    self.cfg.downtime_ceiling.as_secs_f64() * 1e3
                );
                Verdict {
                    decisions: vec![Choice::new("abort", detail.clone())],
                    next: Next::Abort { detail },
                    forecast: None,
                }
            }
        }
    }
}
