//! Decisions, as pure functions over a context: when pre-copy stops, what a stall turns into,
//! and which algorithm `auto` picks.
//!
//! Use [`decide_round`] after each pre-copy round, [`round_rate`] to pace the next round, and
//! [`choose_algorithm`] once `auto` has measured the dirty rate and bandwidth in round 0.

use std::time::Duration;

use crate::protocol::Algorithm;
use crate::units::PAGE_SIZE;

/// What to do when pre-copy does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StallAction {
    /// Post-copy if the request allows it (`auto`, `hybrid`) and the pool has it; else a forced
    /// stop-and-copy if its predicted downtime is under the ceiling; else abort.
    #[default]
    Auto,
    /// Post-copy if the pool has it, else as `Auto`.
    Postcopy,
    /// Stop-and-copy now if the predicted downtime is under the ceiling, else abort.
    ForceStopAndCopy,
    /// Abort the migration; the VM keeps running on the source.
    Abort,
}

impl std::str::FromStr for StallAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(StallAction::Auto),
            "postcopy" => Ok(StallAction::Postcopy),
            "force-stop-and-copy" | "stop-and-copy" => Ok(StallAction::ForceStopAndCopy),
            "abort" => Ok(StallAction::Abort),
            other => Err(format!(
                "unknown stall action {other:?} (auto, postcopy, force-stop-and-copy, abort)"
            )),
        }
    }
}

/// Limits the policy works within.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// Downtime the user accepts for a normal switchover.
    pub downtime_limit: Duration,
    /// Longest downtime a forced stop-and-copy may take.
    pub downtime_ceiling: Duration,
    /// Round cap of pre-copy.
    pub max_rounds: u32,
    /// Rounds in a row that must fail to shrink the dirty set before it counts as a stall.
    pub stall_rounds: u32,
    /// Longest pre-copy may run.
    pub progress_timeout: Duration,
    /// What a stall turns into.
    pub on_stall: StallAction,
    /// Pre-copy rounds of `hybrid` before it switches to post-copy.
    pub hybrid_rounds: u32,
    /// Slowest a pre-copy round may go (bytes/s); rounds start here (Clark et al.).
    pub rate_floor: Option<u64>,
    /// Most page bytes pre-copy may send in all, as a multiple of the VM's RAM: once the rest
    /// fits the downtime limit, rounds go on shrinking the downtime only within this bound.
    pub traffic_bound: f64,
    /// Fastest any round may go (bytes/s).
    pub rate_cap: Option<u64>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            downtime_ceiling: Duration::from_secs(5),
            max_rounds: 30,
            stall_rounds: 3,
            progress_timeout: Duration::from_secs(120),
            on_stall: StallAction::Auto,
            hybrid_rounds: 2,
            rate_floor: None,
            rate_cap: None,
            traffic_bound: DEFAULT_TRAFFIC_BOUND,
        }
    }
}

/// Default [`PolicyConfig::traffic_bound`]: 3x RAM, as the issue that introduced it asked.
pub const DEFAULT_TRAFFIC_BOUND: f64 = 3.0;

/// Remaining pages whose transfer takes less than this are not worth another round: a round
/// costs at least a dirty-log collection and a control message, and the guest dirties pages
/// meanwhile, so below this the downtime cannot shrink measurably.
pub const NEGLIGIBLE_TRANSFER: Duration = Duration::from_micros(200);

/// Share of the fixed switchover cost under which the remaining pages are negligible.
const NEGLIGIBLE_SHARE_OF_FIXED: f64 = 0.1;

/// A round pays for itself if it at least halves the dirty set.
const SHRINK_FACTOR: f64 = 0.5;

/// What the policy knows after a pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundContext<'a> {
    /// The algorithm running (`precopy`, `hybrid`, or `auto` once it chose pre-copy).
    pub algorithm: Algorithm,
    /// Rounds completed (round 0 is the full pass).
    pub rounds_done: u32,
    /// Dirty pages to send next.
    pub remaining_pages: u64,
    /// Dirty pages after each earlier round, oldest first.
    pub history: &'a [u64],
    /// Measured link bandwidth.
    pub bandwidth_bytes_per_sec: f64,
    /// Fixed switchover costs (state transfer, activation), as measured.
    pub fixed_switchover: Duration,
    /// Time spent in pre-copy so far.
    pub elapsed: Duration,
    /// True if post-copy is in the negotiated pool.
    pub postcopy_in_pool: bool,
    /// Pages pre-copy has sent so far, resends included.
    pub sent_pages: u64,
    /// The VM's size in pages.
    pub vm_pages: u64,
}

/// Why pre-copy stops or changes course.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// `hybrid` ran its pre-copy rounds.
    HybridRoundsDone,
    /// The round cap was reached.
    RoundCap,
    /// Rounds stopped shrinking the dirty set.
    NotShrinking,
    /// Pre-copy ran past the progress timeout.
    ProgressTimeout,
    /// The rest fits the limit and costs little next to the fixed switchover: another round
    /// would not shorten the downtime measurably.
    Negligible,
    /// The rest fits the limit, and the last round did not halve the dirty set: the guest's
    /// writes keep it at about this size, so more rounds only add traffic.
    Settled,
    /// The rest fits the limit, and another round would pass the traffic bound.
    TrafficBound,
}

impl Reason {
    /// Short text for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::HybridRoundsDone => "hybrid pre-copy rounds done",
            Reason::RoundCap => "round cap reached",
            Reason::NotShrinking => "rounds stopped shrinking the dirty set",
            Reason::ProgressTimeout => "progress timeout passed",
            Reason::Negligible => "remaining pages fit the downtime limit and cost little next to the fixed switchover",
            Reason::Settled => "remaining pages fit the downtime limit and the last round did not halve them",
            Reason::TrafficBound => {
                "remaining pages fit the downtime limit and another round would pass the traffic bound"
            }
        }
    }

    /// True for the causes that count as a stall.
    pub fn is_stall(self) -> bool {
        matches!(self, Reason::NotShrinking | Reason::ProgressTimeout | Reason::RoundCap)
    }
}

/// The policy's verdict after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another round.
    Continue,
    /// Pause and send the rest (`forced` when a stall pushed it past the normal limit).
    StopAndCopy {
        /// Why.
        reason: Reason,
        /// Predicted downtime.
        predicted_downtime: Duration,
        /// True if over the limit but under the ceiling.
        forced: bool,
    },
    /// Pause, activate on the target, and pull the rest.
    SwitchToPostcopy {
        /// Why.
        reason: Reason,
    },
    /// Give up; the VM stays on the source.
    Abort {
        /// Why.
        reason: Reason,
        /// Downtime a stop-and-copy would have taken.
        predicted_downtime: Duration,
    },
}

/// Time to send `pages` at `bytes_per_sec`.
pub fn transfer_time(pages: u64, bytes_per_sec: f64) -> Duration {
    if bytes_per_sec <= 0.0 {
        return Duration::MAX;
    }
    Duration::from_secs_f64((pages as f64 * PAGE_SIZE as f64 / bytes_per_sec).min(1e9))
}

/// Downtime if the migration stopped now: remaining pages over bandwidth plus fixed costs.
pub fn predicted_downtime(remaining_pages: u64, bytes_per_sec: f64, fixed: Duration) -> Duration {
    transfer_time(remaining_pages, bytes_per_sec).saturating_add(fixed)
}

fn stalled(history: &[u64], remaining: u64, stall_rounds: u32) -> bool {
    let n = stall_rounds as usize;
    if n == 0 || history.len() < n {
        return false;
    }
    // The best set before the last `n` rounds; none of those rounds (nor now) beat it by 5%.
    let before = &history[..history.len() + 1 - n];
    let best = before.iter().copied().min().unwrap_or(u64::MAX);
    let recent = history[history.len() + 1 - n..].iter().copied().chain([remaining]);
    recent.into_iter().all(|r| r as f64 >= best as f64 * 0.95)
}

/// The verdict after a pre-copy round.
///
/// Once the rest fits the downtime limit, pre-copy does not stop at once: it goes on while a
/// round still pays (see [`settle_reason`]), so the downtime is the smallest the guest's writes
/// allow, and the limit stays a ceiling.
pub fn decide_round(cfg: &PolicyConfig, ctx: &RoundContext<'_>) -> Decision {
    let predicted = predicted_downtime(ctx.remaining_pages, ctx.bandwidth_bytes_per_sec, ctx.fixed_switchover);
    if predicted <= cfg.downtime_limit {
        return match settle_reason(cfg, ctx) {
            Some(reason) => Decision::StopAndCopy {
                reason,
                predicted_downtime: predicted,
                forced: false,
            },
            None => Decision::Continue,
        };
    }
    if ctx.algorithm == Algorithm::Hybrid && ctx.rounds_done >= cfg.hybrid_rounds {
        return Decision::SwitchToPostcopy {
            reason: Reason::HybridRoundsDone,
        };
    }
    let cause = if ctx.rounds_done >= cfg.max_rounds {
        Some(Reason::RoundCap)
    } else if stalled(ctx.history, ctx.remaining_pages, cfg.stall_rounds) {
        Some(Reason::NotShrinking)
    } else if ctx.elapsed >= cfg.progress_timeout {
        Some(Reason::ProgressTimeout)
    } else {
        None
    };
    match cause {
        None => Decision::Continue,
        Some(reason) => stall_decision(
            cfg,
            matches!(ctx.algorithm, Algorithm::Auto | Algorithm::Hybrid),
            ctx.postcopy_in_pool,
            reason,
            predicted,
        ),
    }
}

/// Why pre-copy stops although the rest already fits the limit, or `None` while another round
/// still pays: it must at least halve the dirty set, the rest must still cost a noticeable part
/// of the downtime, and the round must fit the traffic bound, the round cap and the progress
/// timeout.
pub fn settle_reason(cfg: &PolicyConfig, ctx: &RoundContext<'_>) -> Option<Reason> {
    let rest = transfer_time(ctx.remaining_pages, ctx.bandwidth_bytes_per_sec);
    let negligible = NEGLIGIBLE_TRANSFER.max(ctx.fixed_switchover.mul_f64(NEGLIGIBLE_SHARE_OF_FIXED));
    // Round 0 sent every page: it is the set the first round shrank.
    let before = ctx.history.last().copied().unwrap_or(ctx.vm_pages);
    let traffic = (ctx.sent_pages + ctx.remaining_pages) as f64;
    if rest <= negligible {
        Some(Reason::Negligible)
    } else if ctx.remaining_pages as f64 > before as f64 * SHRINK_FACTOR {
        Some(Reason::Settled)
    } else if traffic > cfg.traffic_bound * ctx.vm_pages as f64 {
        Some(Reason::TrafficBound)
    } else if ctx.rounds_done >= cfg.max_rounds {
        Some(Reason::RoundCap)
    } else if ctx.elapsed.saturating_add(rest) >= cfg.progress_timeout {
        Some(Reason::ProgressTimeout)
    } else {
        None
    }
}

/// What a stall (`reason`) turns into under `cfg.on_stall`. `request_allows_postcopy`: the
/// request is one that may end in post-copy on its own (`auto`, `hybrid`); `predicted`: the
/// downtime of stopping now.
pub fn stall_decision(
    cfg: &PolicyConfig,
    request_allows_postcopy: bool,
    postcopy_in_pool: bool,
    reason: Reason,
    predicted: Duration,
) -> Decision {
    let postcopy = match cfg.on_stall {
        StallAction::Auto => request_allows_postcopy && postcopy_in_pool,
        StallAction::Postcopy => postcopy_in_pool,
        StallAction::ForceStopAndCopy | StallAction::Abort => false,
    };
    if postcopy {
        return Decision::SwitchToPostcopy { reason };
    }
    if cfg.on_stall != StallAction::Abort && predicted <= cfg.downtime_ceiling {
        return Decision::StopAndCopy {
            reason,
            predicted_downtime: predicted,
            forced: true,
        };
    }
    Decision::Abort {
        reason,
        predicted_downtime: predicted,
    }
}

/// Pace of the next pre-copy round (Clark et al.'s rate adaptation): round 0 at the floor;
/// later rounds at the last round's dirty rate plus a margin, between the floor and the cap.
/// `None` means unpaced. The final stop-and-copy always runs at the cap.
pub fn round_rate(cfg: &PolicyConfig, round: u32, last_dirty_bytes_per_sec: f64) -> Option<u64> {
    let floor = cfg.rate_floor?;
    let cap = cfg.rate_cap.unwrap_or(u64::MAX);
    if round == 0 {
        return Some(floor.min(cap));
    }
    // 50 Mbit/s of headroom over the dirty rate, as Clark et al. used.
    let want = last_dirty_bytes_per_sec * 1.25 + 50e6 / 8.0;
    Some((want as u64).clamp(floor.min(cap), cap))
}

/// What the cost model expects of one algorithm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Expected downtime.
    pub downtime: Duration,
    /// Expected total time from now.
    pub total: Duration,
    /// False if pre-copy would not converge under the limit.
    pub converges: bool,
}

/// Inputs of the cost model, measured in round 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostInputs {
    /// Pages dirtied during round 0 (what pre-copy must resend next).
    pub remaining_pages: u64,
    /// Dirty rate measured during round 0.
    pub dirty_pages_per_sec: f64,
    /// Working-set estimate: pages the guest dirties repeatedly (bounds the dirty set).
    pub working_set_pages: u64,
    /// Bandwidth measured during round 0.
    pub bandwidth_bytes_per_sec: f64,
    /// Fixed switchover costs.
    pub fixed_switchover: Duration,
}

/// Predicts continuing with pre-copy: rounds shrink by dirty rate over bandwidth until the rest
/// fits the limit, then on while a round pays, as [`decide_round`] decides.
pub fn predict_precopy(cfg: &PolicyConfig, c: &CostInputs) -> Prediction {
    let mut remaining = c.remaining_pages as f64;
    let mut total = Duration::ZERO;
    let mut converges = false;
    // What round 0 sent, in the only unit the inputs have: the VM is at least the dirty set.
    let vm_pages = c.working_set_pages.max(c.remaining_pages) as f64;
    let mut sent = vm_pages;
    let negligible = NEGLIGIBLE_TRANSFER.max(c.fixed_switchover.mul_f64(NEGLIGIBLE_SHARE_OF_FIXED));
    for _ in 0..cfg.max_rounds {
        let down = predicted_downtime(remaining as u64, c.bandwidth_bytes_per_sec, c.fixed_switchover);
        let t = transfer_time(remaining as u64, c.bandwidth_bytes_per_sec);
        let next = (c.dirty_pages_per_sec * t.as_secs_f64()).min(c.working_set_pages.max(1) as f64);
        if down <= cfg.downtime_limit {
            converges = true;
            if t <= negligible || next > remaining * SHRINK_FACTOR || sent + remaining > cfg.traffic_bound * vm_pages {
                break;
            }
        } else if next >= remaining * 0.95 {
            break;
        }
        total = total.saturating_add(t);
        sent += remaining;
        remaining = next;
    }
    let downtime = predicted_downtime(remaining as u64, c.bandwidth_bytes_per_sec, c.fixed_switchover);
    Prediction {
        algorithm: Algorithm::Precopy,
        downtime,
        total: total.saturating_add(downtime),
        converges,
    }
}

/// Predicts switching to post-copy now: downtime is the fixed cost; the rest is pushed after.
pub fn predict_postcopy(c: &CostInputs) -> Prediction {
    Prediction {
        algorithm: Algorithm::Postcopy,
        downtime: c.fixed_switchover,
        total: c
            .fixed_switchover
            .saturating_add(transfer_time(c.remaining_pages, c.bandwidth_bytes_per_sec)),
        converges: true,
    }
}

/// Predicts pausing now and sending the rest.
pub fn predict_stop_and_copy(c: &CostInputs) -> Prediction {
    let d = predicted_downtime(c.remaining_pages, c.bandwidth_bytes_per_sec, c.fixed_switchover);
    Prediction {
        algorithm: Algorithm::StopAndCopy,
        downtime: d,
        total: d,
        converges: true,
    }
}

/// How much longer than the fastest fitting option pre-copy's predicted total may be and still
/// be `auto`'s choice.
pub const PRECOPY_PREFERENCE: f64 = 1.25;

/// `auto`'s choice among the pool, after round 0: the fastest total time among algorithms whose
/// downtime fits the limit, pre-copy if it is within [`PRECOPY_PREFERENCE`] of that; if none
/// fits, the shortest downtime. Returns the choice and every
/// prediction considered.
pub fn choose_algorithm(cfg: &PolicyConfig, pool: &[Algorithm], c: &CostInputs) -> (Prediction, Vec<Prediction>) {
    let mut options = Vec::new();
    if pool.contains(&Algorithm::Precopy) || pool.contains(&Algorithm::Hybrid) {
        options.push(predict_precopy(cfg, c));
    }
    if pool.contains(&Algorithm::Postcopy) || pool.contains(&Algorithm::Hybrid) {
        options.push(predict_postcopy(c));
    }
    if pool.contains(&Algorithm::StopAndCopy) {
        options.push(predict_stop_and_copy(c));
    }
    let fits = |p: &&Prediction| p.downtime <= cfg.downtime_limit && p.converges;
    let fastest = options.iter().filter(fits).min_by_key(|p| p.total);
    // Pre-copy keeps a whole copy on the source until commit and does not slow the guest with
    // faults afterwards: it wins unless it is clearly slower. Its last rounds, which shrink the
    // downtime, make it a little slower than post-copy by construction.
    let precopy = options
        .iter()
        .filter(fits)
        .find(|p| p.algorithm == Algorithm::Precopy)
        .filter(|p| fastest.is_some_and(|f| p.total.as_secs_f64() <= f.total.as_secs_f64() * PRECOPY_PREFERENCE));
    let best = precopy
        .or(fastest)
        .or_else(|| options.iter().min_by_key(|p| p.downtime))
        .copied()
        .unwrap_or_else(|| predict_stop_and_copy(c));
    (best, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(history: &[u64], remaining: u64) -> RoundContext<'_> {
        RoundContext {
            algorithm: Algorithm::Precopy,
            rounds_done: history.len() as u32,
            remaining_pages: remaining,
            history,
            bandwidth_bytes_per_sec: 100e6,
            fixed_switchover: Duration::from_millis(5),
            elapsed: Duration::from_secs(1),
            postcopy_in_pool: true,
            sent_pages: 100_000,
            vm_pages: 100_000,
        }
    }

    #[test]
    fn test_a_rest_that_fits_the_limit_stops_once_a_round_no_longer_pays() {
        let cfg = PolicyConfig::default();
        // 1000 pages = 4 MB at 100 MB/s = 41 ms + 5 ms fixed < 300 ms, and far below the
        // 100,000 before: another round shrinks the downtime.
        assert_eq!(decide_round(&cfg, &ctx(&[100_000], 1000)), Decision::Continue);
        // Over the limit: rounds go on as before.
        assert_eq!(decide_round(&cfg, &ctx(&[100_000], 50_000)), Decision::Continue);
        let stops = |history: &[u64], remaining| match decide_round(&cfg, &ctx(history, remaining)) {
            Decision::StopAndCopy {
                reason, forced: false, ..
            } => Some(reason),
            _ => None,
        };
        // 4 pages take 164 us, under a tenth of the 5 ms fixed cost.
        assert_eq!(stops(&[100_000, 1000], 4), Some(Reason::Negligible));
        // 900 after 1000: the guest keeps the set at this size.
        assert_eq!(stops(&[100_000, 1000], 900), Some(Reason::Settled));
        // 3x RAM already sent.
        let mut c = ctx(&[100_000], 1000);
        c.sent_pages = 3 * c.vm_pages;
        assert!(matches!(
            decide_round(&cfg, &c),
            Decision::StopAndCopy {
                reason: Reason::TrafficBound,
                ..
            }
        ));
        c.sent_pages = 0;
        c.rounds_done = cfg.max_rounds;
        assert!(matches!(
            decide_round(&cfg, &c),
            Decision::StopAndCopy {
                reason: Reason::RoundCap,
                forced: false,
                ..
            }
        ));
    }

    #[test]
    fn test_prediction_follows_rounds_past_the_limit_while_they_pay() {
        let cfg = PolicyConfig::default();
        // A 64 MiB hot set written at 100 MB/s over 2 GB/s: each round shrinks the set 20-fold.
        let calm = CostInputs {
            remaining_pages: 16_384,
            dirty_pages_per_sec: 25_000.0,
            working_set_pages: 16_384,
            bandwidth_bytes_per_sec: 2e9,
            fixed_switchover: Duration::from_millis(2),
        };
        let p = predict_precopy(&cfg, &calm);
        assert!(p.converges);
        // Stopping at the first fit would carry 16,384 pages (34 ms); the rounds leave a rest
        // that costs at most a tenth of the fixed cost.
        assert!(p.downtime <= Duration::from_micros(2200), "{:?}", p.downtime);
    }

    #[test]
    fn test_stall_turns_into_the_configured_action() {
        let history = [200_000, 60_000, 61_000, 60_500];
        let mut cfg = PolicyConfig::default();
        // Precopy request, auto action: forced stop-and-copy under the 5 s ceiling (2.4 s).
        assert!(matches!(
            decide_round(&cfg, &ctx(&history, 60_200)),
            Decision::StopAndCopy {
                reason: Reason::NotShrinking,
                forced: true,
                ..
            }
        ));
        cfg.on_stall = StallAction::Postcopy;
        assert!(matches!(
            decide_round(&cfg, &ctx(&history, 60_200)),
            Decision::SwitchToPostcopy { .. }
        ));
        cfg.on_stall = StallAction::Abort;
        assert!(matches!(
            decide_round(&cfg, &ctx(&history, 60_200)),
            Decision::Abort { .. }
        ));
        cfg.on_stall = StallAction::ForceStopAndCopy;
        cfg.downtime_ceiling = Duration::from_secs(1);
        assert!(matches!(
            decide_round(&cfg, &ctx(&history, 60_200)),
            Decision::Abort { .. }
        ));
    }

    #[test]
    fn test_hybrid_switches_after_its_rounds() {
        let cfg = PolicyConfig::default();
        let mut c = ctx(&[100_000, 50_000], 40_000);
        c.algorithm = Algorithm::Hybrid;
        assert!(matches!(decide_round(&cfg, &c), Decision::SwitchToPostcopy { .. }));
    }

    #[test]
    fn test_auto_prefers_precopy_when_it_converges_and_postcopy_when_not() {
        let cfg = PolicyConfig::default();
        let pool = [Algorithm::Precopy, Algorithm::Postcopy, Algorithm::StopAndCopy];
        let calm = CostInputs {
            remaining_pages: 16_384,
            dirty_pages_per_sec: 25_000.0, // 100 MB/s
            working_set_pages: 16_384,
            bandwidth_bytes_per_sec: 2e9,
            fixed_switchover: Duration::from_millis(2),
        };
        assert_eq!(choose_algorithm(&cfg, &pool, &calm).0.algorithm, Algorithm::Precopy);
        let storm = CostInputs {
            remaining_pages: 200_000,
            dirty_pages_per_sec: 250_000.0, // 1 GB/s over a 100 MB/s link
            working_set_pages: 260_000,
            bandwidth_bytes_per_sec: 100e6,
            ..calm
        };
        assert_eq!(choose_algorithm(&cfg, &pool, &storm).0.algorithm, Algorithm::Postcopy);
    }

    #[test]
    fn test_rate_adaptation_stays_between_floor_and_cap() {
        let cfg = PolicyConfig {
            rate_floor: Some(10_000_000),
            rate_cap: Some(100_000_000),
            ..PolicyConfig::default()
        };
        assert_eq!(round_rate(&cfg, 0, 0.0), Some(10_000_000));
        assert_eq!(round_rate(&cfg, 3, 1e9), Some(100_000_000));
        let mid = round_rate(&cfg, 1, 20e6).expect("paced");
        assert!(mid > 20_000_000 && mid < 100_000_000);
        assert_eq!(round_rate(&PolicyConfig::default(), 1, 1e6), None);
    }
}
