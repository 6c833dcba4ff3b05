//! Quality of service per migration: its priority class and its bandwidth floor, the pure
//! decisions they drive (who leaves the outgoing queue first, whether a floor can be assured),
//! and what the report says of them.
//!
//! * **Priority** is one of three classes, `low`, `normal` (the default) and `high`. Under a
//!   host's `max_outgoing` the queue serves the highest class first, first come first served
//!   within a class. Running migrations share the host's bandwidth budget by weight: 1, 2 and 4
//!   (each class twice the one below), work-conserving (a migration that uses less than its
//!   share leaves the rest to the others); see [`crate::link::SharedBudget`].
//! * **A floor** (`min_bandwidth_bytes_per_sec`) is the budget's bytes per second the migration
//!   is assured while it sends, whatever the weights say. Floors are reserved at admission: a
//!   migration whose floor does not fit in the host's budget beside the floors of its queued
//!   and running migrations (or above its own bandwidth cap) is refused at once with
//!   [`EngineError::FloorUnavailable`](super::EngineError::FloorUnavailable), never queued, so
//!   a caller learns at the start, not after a wait, that the guarantee cannot be given. A
//!   host without a budget shares nothing: a floor there is recorded, not enforced.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::report::StageReport;
use crate::link::Claim;
use crate::telemetry::metric;

/// A migration's priority class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    /// Weight 1; leaves the queue last.
    Low,
    /// Weight 2: the default.
    #[default]
    Normal,
    /// Weight 4; leaves the queue first.
    High,
}

impl Priority {
    /// Every class, lowest first.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// Its weight in the host's bandwidth budget: each class twice the one below.
    pub fn weight(self) -> u32 {
        match self {
            Priority::Low => 1,
            Priority::Normal => 2,
            Priority::High => 4,
        }
    }

    /// Its name, as the API, the CLI and scenarios write it; also the `priority` label value.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => metric::priority::LOW,
            Priority::Normal => metric::priority::NORMAL,
            Priority::High => metric::priority::HIGH,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown priority {s:?} (low, normal, high)"))
    }
}

/// What a migration claims of its host's budget: its class's weight, its floor, its own cap.
pub fn claim(priority: Priority, floor_bytes_per_sec: Option<u64>, cap_bytes_per_sec: Option<u64>) -> Claim {
    Claim {
        weight: f64::from(priority.weight()),
        floor_bytes_per_sec: floor_bytes_per_sec.unwrap_or(0) as f64,
        cap_bytes_per_sec: cap_bytes_per_sec.map_or(f64::INFINITY, |c| c as f64),
    }
}

/// The bytes per second a new floor may still take: the host's budget less the floors already
/// reserved, or the migration's own cap if lower. `None`: no limit (no budget, no cap).
pub fn floor_room(budget: Option<u64>, reserved: u64, own_cap: Option<u64>) -> Option<u64> {
    let room = budget.map(|b| b.saturating_sub(reserved));
    match (room, own_cap) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}

/// Which queued migration leaves the queue next: the highest class, the earliest within it.
/// `queued` is in arrival order; the answer is an index into it.
pub fn next_in_queue(queued: impl IntoIterator<Item = Priority>) -> Option<usize> {
    let mut best: Option<(usize, Priority)> = None;
    for (i, p) in queued.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| p > b) {
            best = Some((i, p));
        }
    }
    best.map(|(i, _)| i)
}

/// What a migration asked of QoS, and the share of bandwidth it got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QosReport {
    /// Its priority class.
    pub priority: Priority,
    /// The class's weight in the host's budget.
    pub weight: u32,
    /// The floor it asked for, bytes per second.
    pub min_bandwidth_bytes_per_sec: Option<u64>,
    /// Bytes it sent over the time of the stages that sent them: its mean share.
    pub mean_bytes_per_sec: f64,
    /// Seconds of those stages.
    pub transfer_s: f64,
}

impl QosReport {
    /// The report of a migration of `priority` and floor `floor` whose stages were `stages`.
    pub fn new(priority: Priority, floor: Option<u64>, stages: &[StageReport]) -> Self {
        let (bytes, secs) = stages
            .iter()
            .filter(|s| s.bytes > 0)
            .fold((0u64, 0.0f64), |(b, t), s| (b + s.bytes, t + s.duration_s));
        Self {
            priority,
            weight: priority.weight(),
            min_bandwidth_bytes_per_sec: floor,
            mean_bytes_per_sec: if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
            transfer_s: secs,
        }
    }
}

impl Default for QosReport {
    fn default() -> Self {
        Self::new(Priority::Normal, None, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_priority_names_parse_back_and_are_the_label_values() {
        for p in Priority::ALL {
            assert_eq!(p.name().parse::<Priority>(), Ok(p));
        }
        assert_eq!(Priority::ALL.map(Priority::name), metric::priority::ALL);
        assert!("urgent".parse::<Priority>().is_err());
        assert_eq!(Priority::default(), Priority::Normal);
    }

    #[test]
    fn test_each_class_weighs_twice_the_one_below() {
        assert_eq!(Priority::ALL.map(Priority::weight), [1, 2, 4]);
    }

    #[test]
    fn test_the_queue_serves_the_highest_class_first_then_arrival_order() {
        use Priority::*;
        assert_eq!(next_in_queue([Low, Normal, High, High]), Some(2));
        assert_eq!(next_in_queue([Normal, Low, Normal]), Some(0));
        assert_eq!(next_in_queue([]), None);
    }

    #[test]
    fn test_floor_room_is_the_unreserved_budget_or_the_own_cap() {
        assert_eq!(floor_room(Some(100), 30, None), Some(70));
        assert_eq!(floor_room(Some(100), 130, None), Some(0));
        assert_eq!(floor_room(Some(100), 30, Some(50)), Some(50));
        assert_eq!(floor_room(None, 0, Some(50)), Some(50));
        assert_eq!(floor_room(None, 0, None), None);
    }

    #[test]
    fn test_the_mean_share_counts_only_stages_that_sent() {
        let stage = |name, duration_s, bytes| StageReport {
            name,
            start_s: 0.0,
            duration_s,
            pages: 0,
            bytes,
        };
        let r = QosReport::new(
            Priority::High,
            Some(10),
            &[
                stage("reservation", 5.0, 0),
                stage("precopy", 2.0, 300),
                stage("stopcopy", 1.0, 100),
            ],
        );
        assert_eq!((r.weight, r.mean_bytes_per_sec, r.transfer_s), (4, 400.0 / 3.0, 3.0));
    }
}
