//! One plan per algorithm: the decisions of a migration's source side behind one interface.
//!
//! A plan never touches memory, a link or a clock. Whoever drives it (the engine's source run,
//! or a model running in virtual time) measures and reports each round; the plan answers what
//! to send next, whether to stop, what a stall turns into, and what it predicts. The decisions
//! themselves are the pure functions of [`super::policy`], so every driver gets the same ones.
//!
//! Adding an algorithm: one file here implementing [`Plan`], one arm in [`for_algorithm`]
//! (the compiler points at it, and at the other exhaustive matches on
//! [`Algorithm`](crate::protocol::Algorithm)), and its entry in negotiation.

use std::fmt;
use std::time::Duration;

use super::policy::{CostInputs, Decision, PolicyConfig, Prediction, Reason};
use super::report::PredictionReport;
use crate::protocol::Algorithm;

mod auto;
mod deadline;
mod hybrid;
mod postcopy;
mod precopy;
mod random;
mod rounds;
mod stop_and_copy;

pub use auto::AutoPlan;
pub use deadline::{with_deadline, Deadline, DeadlinePlan};
pub use hybrid::HybridPlan;
pub use postcopy::PostcopyPlan;
pub use precopy::PrecopyPlan;
pub use random::RandomPlan;
pub use stop_and_copy::StopAndCopyPlan;

/// How the VM leaves: everything before activation, or the rest pulled after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switchover {
    /// Pause, send what is left, then activate on the target.
    StopAndCopy,
    /// Pause, activate on the target at once, and pull and push what is left.
    Postcopy,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send another pre-copy round: the pages dirtied since the last one, at `rate` bytes per
    /// second (`None`: unpaced).
    Round {
        /// Pace of the round.
        rate: Option<u64>,
    },
    /// Pause the VM and switch over.
    Switchover(Switchover),
    /// Give up before commitment; the VM stays on the source.
    Abort {
        /// Why, for the peer and the report.
        detail: String,
    },
}

/// One decision, as the report and the event stream show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// What was decided.
    pub action: String,
    /// Why.
    pub reason: String,
}

impl Choice {
    fn new(action: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            reason: reason.into(),
        }
    }
}

/// A plan's prediction, with the figures it rests on.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// The algorithm predicted.
    pub algorithm: Algorithm,
    /// Expected downtime.
    pub downtime: Duration,
    /// Expected time from now to the end.
    pub total: Duration,
    /// The figures behind it, in words.
    pub basis: String,
}

impl Forecast {
    /// The report's form: `elapsed` is the time the migration has run so far.
    pub fn report(&self, elapsed: Duration) -> PredictionReport {
        PredictionReport {
            algorithm: self.algorithm.name().to_string(),
            downtime_s: self.downtime.as_secs_f64(),
            total_s: (elapsed + self.total).as_secs_f64(),
            basis: self.basis.clone(),
        }
    }
}

/// A plan's answer at a decision point.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// What to do next.
    pub next: Next,
    /// Decisions taken on the way, oldest first.
    pub decisions: Vec<Choice>,
    /// A new prediction, replacing any earlier one.
    pub forecast: Option<Forecast>,
}

impl Verdict {
    fn next(next: Next) -> Self {
        Self {
            next,
            decisions: Vec::new(),
            forecast: None,
        }
    }
}

/// Figures known before the first page moves (from earlier migrations or the link's cap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Link bandwidth, page bytes per second.
    pub bandwidth_bytes_per_sec: f64,
    /// Where the bandwidth comes from, in words.
    pub source: &'static str,
    /// Fixed switchover cost.
    pub fixed_switchover: Duration,
}

/// What the driver measured over one pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundObservation {
    /// The round just sent (round 0 is the full pass).
    pub round: u32,
    /// Pages dirtied meanwhile: what the next round would send.
    pub remaining_pages: u64,
    /// The guest's dirty rate over the round.
    pub dirty_pages_per_sec: f64,
    /// Link bandwidth, page bytes per second.
    pub bandwidth_bytes_per_sec: f64,
    /// Fixed switchover cost (state transfer, activation round trips).
    pub fixed_switchover: Duration,
    /// Time spent in pre-copy so far.
    pub precopy_elapsed: Duration,
    /// Pages sent so far, resends included (for the traffic bound).
    pub sent_pages: u64,
    /// The VM's size in pages.
    pub vm_pages: u64,
}

/// The decisions of one algorithm. See the module docs.
pub trait Plan: Send + fmt::Debug {
    /// The algorithm in force (for `auto`, the one it chose, once it has).
    fn algorithm(&self) -> Algorithm;

    /// True if the plan runs pre-copy rounds, which send pages more than once.
    fn iterates(&self) -> bool;

    /// The first step, before any page moves; `pages` is the VM's size.
    fn start(&mut self, pages: u64, estimate: Option<Estimate>) -> Verdict;

    /// After a pre-copy round: another round, a switchover, or an abort.
    fn after_round(&mut self, obs: &RoundObservation) -> Verdict;

    /// What a stall (`reason`) turns into, with `predicted` the downtime of stopping now.
    fn on_stall(&self, obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision;

    /// What running this plan from `inputs` on is expected to cost.
    fn predict(&self, inputs: &CostInputs) -> Prediction;
}

/// The plan of `requested`, within `cfg`; `pool` is what both hosts offer. `seed` drives
/// `random`'s pick (the others ignore it). A deadline wraps the result ([`with_deadline`]).
pub fn for_algorithm(requested: Algorithm, cfg: PolicyConfig, pool: &[Algorithm], seed: u64) -> Box<dyn Plan> {
    let postcopy_in_pool = pool.contains(&Algorithm::Postcopy) || pool.contains(&Algorithm::Hybrid);
    match requested {
        Algorithm::StopAndCopy => Box::new(StopAndCopyPlan),
        Algorithm::Postcopy => Box::new(PostcopyPlan),
        Algorithm::Precopy => Box::new(PrecopyPlan::new(cfg, postcopy_in_pool)),
        Algorithm::Hybrid => Box::new(HybridPlan::new(cfg, postcopy_in_pool)),
        Algorithm::Auto => Box::new(AutoPlan::new(cfg, pool)),
        Algorithm::Random => Box::new(RandomPlan::new(cfg, pool, seed)),
    }
}

/// The forecast of an algorithm that switches over at once, from `estimate`.
fn up_front(plan: &dyn Plan, pages: u64, estimate: Option<Estimate>) -> Option<Forecast> {
    let e = estimate?;
    let p = plan.predict(&CostInputs {
        remaining_pages: pages,
        dirty_pages_per_sec: 0.0,
        working_set_pages: pages.max(1),
        bandwidth_bytes_per_sec: e.bandwidth_bytes_per_sec,
        fixed_switchover: e.fixed_switchover,
    });
    Some(Forecast {
        algorithm: p.algorithm,
        downtime: p.downtime,
        total: p.total,
        basis: format!(
            "{pages} pages at {:.1} MB/s ({}) plus {:.2} ms fixed switchover",
            e.bandwidth_bytes_per_sec / 1e6,
            e.source,
            e.fixed_switchover.as_secs_f64() * 1e3
        ),
    })
}

#[cfg(test)]
mod tests;
