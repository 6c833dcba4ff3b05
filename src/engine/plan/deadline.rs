//! A deadline for total time: a decorator around any algorithm's plan.
//!
//! After each round it asks the wrapped plan what it would do and, when that is another round,
//! what finishing that way is predicted to take. If that misses what is left of the deadline,
//! it acts, but only where acting can meet it:
//!
//! - the round's pace is what holds the migration back (rate adaptation, `rate_floor`): it
//!   raises the pace to the policy's `rate_cap` (unpaced without one), the fastest the request
//!   allows; the host's shared bandwidth budget still applies below the plan;
//! - else, post-copy is in the pool and would finish in time: it switches to post-copy, whose
//!   total time is bounded by the pages left over the bandwidth (its switchover is immediate);
//! - else the deadline cannot be met by anything it could do: it says so once and lets the
//!   wrapped plan decide, and the report counts the miss.
//!
//! A switchover, an abort or a stall the wrapped plan decides on are its own. Without a
//! deadline nothing is wrapped, so nothing changes.

use std::time::Duration;

use super::{Choice, Estimate, Forecast, Next, Plan, RoundObservation, Switchover, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, PolicyConfig, Prediction, Reason};
use crate::protocol::Algorithm;

/// A deadline for a migration's total time, as its plan sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// Time allowed from the migration's start to its end (as the report's `total_s` counts).
    pub total: Duration,
    /// Time already spent when the plan takes its first step (premigration, reservation).
    pub spent: Duration,
}

/// The decorator. See the module docs.
#[derive(Debug)]
pub struct DeadlinePlan {
    inner: Box<dyn Plan>,
    deadline: Deadline,
    /// Post-copy may run: both hosts offer post-copy or hybrid.
    postcopy_allowed: bool,
    /// The fastest a round may go (`None`: unpaced).
    max_rate: Option<u64>,
    /// The pace of the round under way.
    pace: Option<u64>,
    /// Rounds go at `max_rate` from here.
    raised: bool,
    /// Switched to post-copy for the deadline.
    switched: bool,
    /// The risk of a miss has been reported.
    warned: bool,
}

/// `plan` under `deadline` (unchanged without one), within `cfg`; `pool` is what both hosts
/// offer.
pub fn with_deadline(
    plan: Box<dyn Plan>,
    deadline: Option<Deadline>,
    cfg: &PolicyConfig,
    pool: &[Algorithm],
) -> Box<dyn Plan> {
    match deadline {
        None => plan,
        Some(deadline) => Box::new(DeadlinePlan {
            inner: plan,
            deadline,
            postcopy_allowed: pool.contains(&Algorithm::Postcopy) || pool.contains(&Algorithm::Hybrid),
            max_rate: cfg.rate_cap,
            pace: None,
            raised: false,
            switched: false,
            warned: false,
        }),
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

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn rate_text(rate: Option<u64>) -> String {
    rate.map_or("unpaced".to_string(), |r| format!("{:.1} MB/s", r as f64 / 1e6))
}

impl DeadlinePlan {
    /// What is left of the deadline after `elapsed` of pre-copy; `None` once it has passed.
    fn left(&self, precopy_elapsed: Duration) -> Option<Duration> {
        self.deadline
            .total
            .checked_sub(self.deadline.spent.saturating_add(precopy_elapsed))
    }

    /// True if `p` does not finish within `left`.
    fn misses(p: &Prediction, left: Option<Duration>) -> bool {
        !p.converges || left.is_none_or(|l| p.total > l)
    }

    /// The words for "the wrapped plan would miss the deadline".
    fn late(&self, p: &Prediction, left: Option<Duration>) -> String {
        let finish = if p.converges {
            format!("{} predicts {:.2} s more", self.inner.algorithm(), secs(p.total))
        } else {
            format!("{} does not converge", self.inner.algorithm())
        };
        match left {
            Some(l) => format!(
                "deadline {:.2} s: {finish}, {:.2} s left",
                secs(self.deadline.total),
                secs(l)
            ),
            None => format!("deadline {:.2} s already passed: {finish}", secs(self.deadline.total)),
        }
    }

    /// `v` with one more decision, at most once: the deadline will be missed whatever this
    /// plan does.
    fn warn(&mut self, mut v: Verdict, why: String) -> Verdict {
        if !self.warned {
            self.warned = true;
            v.decisions.push(Choice::new("deadline will be missed", why));
        }
        v
    }

    /// The wrapped plan wants another round at `rate`: keep it, raise its pace, or switch.
    fn steer(&mut self, obs: &RoundObservation, v: Verdict, rate: Option<u64>) -> Verdict {
        let rate = if self.raised { self.max_rate } else { rate };
        let v = Verdict {
            next: Next::Round { rate },
            ..v
        };
        let left = self.left(obs.precopy_elapsed);
        let c = inputs(obs);
        let p = self.inner.predict(&c);
        if !Self::misses(&p, left) {
            self.pace = rate;
            return v;
        }
        let late = self.late(&p, left);
        // The pace bound the last round: nothing but the plan kept it slower.
        let was = self.pace;
        let paced = !self.raised && was.is_some_and(|r| self.max_rate.is_none_or(|m| r < m));
        if paced {
            let faster = self.max_rate.map(|m| {
                self.inner.predict(&CostInputs {
                    bandwidth_bytes_per_sec: m as f64,
                    ..c
                })
            });
            // Without a cap the unpaced bandwidth is unknown until a round measures it.
            if faster.is_none_or(|f| !Self::misses(&f, left)) {
                self.raised = true;
                self.pace = self.max_rate;
                let mut v = Verdict {
                    next: Next::Round { rate: self.max_rate },
                    ..v
                };
                v.decisions.push(Choice::new(
                    format!("raise the rate to {}", rate_text(self.max_rate)),
                    format!("{late}; the round's pace of {} held it back", rate_text(was)),
                ));
                return v;
            }
        }
        let post = policy::predict_postcopy(&c);
        if self.postcopy_allowed && !Self::misses(&post, left) {
            self.switched = true;
            let mut decisions = v.decisions;
            decisions.push(Choice::new(
                "switch to post-copy",
                format!("{late}; post-copy needs {:.2} s", secs(post.total)),
            ));
            return Verdict {
                next: Next::Switchover(Switchover::Postcopy),
                decisions,
                forecast: Some(Forecast {
                    algorithm: Algorithm::Postcopy,
                    downtime: post.downtime,
                    total: post.total,
                    basis: format!(
                        "after round {}: {} pages at {:.1} MB/s plus {:.2} ms fixed switchover",
                        obs.round,
                        obs.remaining_pages,
                        obs.bandwidth_bytes_per_sec / 1e6,
                        secs(obs.fixed_switchover) * 1e3
                    ),
                }),
            };
        }
        self.pace = rate;
        let why = if self.postcopy_allowed {
            format!("{late}; post-copy would need {:.2} s", secs(post.total))
        } else {
            format!("{late}; post-copy is not in the pool")
        };
        self.warn(v, why)
    }
}

impl Plan for DeadlinePlan {
    fn algorithm(&self) -> Algorithm {
        let a = self.inner.algorithm();
        if self.switched && !a.is_postcopy_family() {
            // What runs from here is post-copy, and the report says so.
            Algorithm::Postcopy
        } else {
            a
        }
    }

    fn iterates(&self) -> bool {
        self.inner.iterates()
    }

    fn start(&mut self, pages: u64, estimate: Option<Estimate>) -> Verdict {
        let v = self.inner.start(pages, estimate);
        if let Next::Round { rate } = v.next {
            self.pace = rate;
        }
        let left = self.left(Duration::ZERO);
        let Some(e) = estimate else {
            return match left {
                Some(_) => v,
                None => {
                    let why = format!(
                        "deadline {:.2} s already passed before the first page moved ({:.2} s of setup)",
                        secs(self.deadline.total),
                        secs(self.deadline.spent)
                    );
                    self.warn(v, why)
                }
            };
        };
        // Every page moves at least once, whatever the algorithm: a floor on what is left.
        let once = policy::predict_postcopy(&CostInputs {
            remaining_pages: pages,
            dirty_pages_per_sec: 0.0,
            working_set_pages: pages.max(1),
            bandwidth_bytes_per_sec: e.bandwidth_bytes_per_sec,
            fixed_switchover: e.fixed_switchover,
        });
        if Self::misses(&once, left) {
            let why = format!(
                "deadline {:.2} s: moving {pages} pages once at {:.1} MB/s ({}) takes {:.2} s, {:.2} s left",
                secs(self.deadline.total),
                e.bandwidth_bytes_per_sec / 1e6,
                e.source,
                secs(once.total),
                secs(left.unwrap_or(Duration::ZERO))
            );
            return self.warn(v, why);
        }
        v
    }

    fn after_round(&mut self, obs: &RoundObservation) -> Verdict {
        let v = self.inner.after_round(obs);
        match v.next {
            Next::Round { rate } => self.steer(obs, v, rate),
            // A switchover or an abort is the wrapped plan's call.
            Next::Switchover(_) | Next::Abort { .. } => v,
        }
    }

    fn on_stall(&self, obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision {
        self.inner.on_stall(obs, reason, predicted)
    }

    fn predict(&self, inputs: &CostInputs) -> Prediction {
        self.inner.predict(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{for_algorithm, PostcopyPlan, PrecopyPlan, StopAndCopyPlan};
    use super::*;

    const PAGE: f64 = 4096.0;

    /// A busy guest under a 40 MB/s cap: it dirties 50,000 pages a second, about five times
    /// what the link moves, so pre-copy never converges.
    fn busy(round: u32, precopy_elapsed_s: f64) -> RoundObservation {
        RoundObservation {
            round,
            remaining_pages: 40_000,
            dirty_pages_per_sec: 50_000.0,
            bandwidth_bytes_per_sec: 40e6,
            fixed_switchover: Duration::from_millis(5),
            precopy_elapsed: Duration::from_secs_f64(precopy_elapsed_s),
            sent_pages: 262_144 + 40_000 * u64::from(round),
            vm_pages: 262_144,
        }
    }

    fn deadline(total_s: f64) -> Option<Deadline> {
        Some(Deadline {
            total: Duration::from_secs_f64(total_s),
            spent: Duration::from_millis(200),
        })
    }

    fn wrapped(a: Algorithm, cfg: PolicyConfig, pool: &[Algorithm], total_s: f64) -> Box<dyn Plan> {
        with_deadline(for_algorithm(a, cfg, pool, 0), deadline(total_s), &cfg, pool)
    }

    #[test]
    fn test_a_deadline_only_post_copy_can_meet_switches_to_post_copy() {
        let pool = [Algorithm::Precopy, Algorithm::Postcopy];
        let mut plan = wrapped(Algorithm::Precopy, PolicyConfig::default(), &pool, 20.0);
        assert!(matches!(plan.start(65_536, None).next, Next::Round { .. }));
        // 40,000 pages at 40 MB/s: post-copy needs about 4.1 s; 20 - 0.2 - 6.5 s are left.
        let v = plan.after_round(&busy(0, 6.5));
        assert_eq!(v.next, Next::Switchover(Switchover::Postcopy));
        let last = v.decisions.last().expect("a decision");
        assert_eq!(last.action, "switch to post-copy");
        assert!(last.reason.contains("precopy does not converge"), "{}", last.reason);
        assert_eq!(plan.algorithm(), Algorithm::Postcopy);
        let f = v.forecast.expect("post-copy's forecast");
        assert!((f.total.as_secs_f64() - (40_000.0 * PAGE / 40e6 + 0.005)).abs() < 1e-3);
    }

    #[test]
    fn test_without_post_copy_in_the_pool_the_wrapped_plan_decides_and_the_risk_is_said_once() {
        let pool = [Algorithm::Precopy];
        let cfg = PolicyConfig::default();
        let mut plan = wrapped(Algorithm::Precopy, cfg, &pool, 20.0);
        let mut bare = PrecopyPlan::new(cfg, false);
        plan.start(65_536, None);
        bare.start(65_536, None);
        let v = plan.after_round(&busy(0, 6.5));
        assert_eq!(v.next, bare.after_round(&busy(0, 6.5)).next);
        assert_eq!(
            v.decisions.last().map(|c| c.action.as_str()),
            Some("deadline will be missed")
        );
        let again = plan.after_round(&busy(1, 8.0));
        assert!(again.decisions.iter().all(|c| c.action != "deadline will be missed"));
    }

    #[test]
    fn test_a_pace_that_makes_it_late_is_raised_to_the_cap() {
        let cfg = PolicyConfig {
            rate_floor: Some(10_000_000),
            rate_cap: Some(400_000_000),
            ..PolicyConfig::default()
        };
        let pool = [Algorithm::Precopy, Algorithm::Postcopy];
        let mut plan = wrapped(Algorithm::Precopy, cfg, &pool, 10.0);
        assert_eq!(plan.start(65_536, None).next, Next::Round { rate: Some(10_000_000) });
        // The floor paced round 0 at 10 MB/s: 300,000 pages left take 123 s at that pace, and
        // about 3 s at the cap, with few pages dirtied.
        let obs = RoundObservation {
            round: 0,
            remaining_pages: 300_000,
            dirty_pages_per_sec: 100.0,
            bandwidth_bytes_per_sec: 10e6,
            fixed_switchover: Duration::from_millis(5),
            precopy_elapsed: Duration::from_secs(1),
            sent_pages: 262_144,
            vm_pages: 262_144,
        };
        let v = plan.after_round(&obs);
        assert_eq!(
            v.next,
            Next::Round {
                rate: Some(400_000_000)
            }
        );
        assert_eq!(
            v.decisions.last().map(|c| c.action.as_str()),
            Some("raise the rate to 400.0 MB/s")
        );
        assert_eq!(plan.algorithm(), Algorithm::Precopy);
        // Later rounds keep the raised pace.
        let v = plan.after_round(&RoundObservation {
            round: 1,
            remaining_pages: 200_000,
            bandwidth_bytes_per_sec: 400e6,
            precopy_elapsed: Duration::from_secs(4),
            ..obs
        });
        assert_eq!(
            v.next,
            Next::Round {
                rate: Some(400_000_000)
            }
        );
    }

    #[test]
    fn test_an_impossible_deadline_changes_nothing_and_says_it_will_be_missed() {
        let pool = Algorithm::ALL;
        let estimate = Estimate {
            bandwidth_bytes_per_sec: 1e9,
            source: "the link's configured cap",
            fixed_switchover: Duration::from_millis(5),
        };
        let mut plan = wrapped(Algorithm::Precopy, PolicyConfig::default(), &pool, 0.001);
        let v = plan.start(65_536, Some(estimate));
        assert!(matches!(v.next, Next::Round { .. }));
        assert_eq!(
            v.decisions.last().map(|c| c.action.as_str()),
            Some("deadline will be missed")
        );
        let obs = busy(0, 1.0);
        let bare = for_algorithm(Algorithm::Precopy, PolicyConfig::default(), &pool, 0).after_round(&obs);
        assert_eq!(plan.after_round(&obs).next, bare.next);
        assert_eq!(plan.algorithm(), Algorithm::Precopy);
    }

    #[test]
    fn test_a_deadline_on_track_changes_nothing() {
        let cfg = PolicyConfig::default();
        let pool = Algorithm::ALL;
        for a in [Algorithm::Precopy, Algorithm::Hybrid, Algorithm::Auto] {
            let mut plan = wrapped(a, cfg, &pool, 3600.0);
            let mut bare = for_algorithm(a, cfg, &pool, 0);
            assert_eq!(plan.start(65_536, None), bare.start(65_536, None), "{a}");
            // A calm guest: converges in a few rounds.
            for round in 0..4 {
                let obs = RoundObservation {
                    round,
                    remaining_pages: 200_000 >> (2 * round),
                    dirty_pages_per_sec: 1_000.0,
                    bandwidth_bytes_per_sec: 1e9,
                    fixed_switchover: Duration::from_millis(2),
                    precopy_elapsed: Duration::from_millis(300 * u64::from(round + 1)),
                    sent_pages: 262_144,
                    vm_pages: 262_144,
                };
                let (v, b) = (plan.after_round(&obs), bare.after_round(&obs));
                assert_eq!(v, b, "{a} round {round}");
                if !matches!(b.next, Next::Round { .. }) {
                    break;
                }
            }
            assert_eq!(plan.algorithm(), bare.algorithm());
        }
    }

    #[test]
    fn test_plans_that_switch_over_at_once_pass_through() {
        for inner in [
            Box::new(StopAndCopyPlan) as Box<dyn Plan>,
            Box::new(PostcopyPlan) as Box<dyn Plan>,
        ] {
            let a = inner.algorithm();
            let mut plan = with_deadline(inner, deadline(60.0), &PolicyConfig::default(), &Algorithm::ALL);
            assert!(matches!(plan.start(1024, None).next, Next::Switchover(_)));
            assert_eq!(plan.algorithm(), a);
        }
    }
}
