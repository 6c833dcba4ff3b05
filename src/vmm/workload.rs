//! What a guest does while it runs, asked for the same way of every backend.
//!
//! Each backend turns a [`WorkloadSpec`] into its own kind of guest: the sim into a writer
//! thread storing into guest memory, kvm into its self-checking guest program paced to the rate.
//! A backend takes what it can represent and says in its docs what it ignores (kvm, for
//! instance, fills no pages up front, so `zero_fraction` does not apply to it).

use std::fmt;
use std::str::FromStr;

use crate::units::PAGE_SIZE;

/// Where the guest's stores land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pattern {
    /// Uniformly random pages over all of memory; the working set is ignored.
    Uniform,
    /// Uniformly random pages inside the working set (the hot set, at the start of memory).
    #[default]
    HotSet,
    /// Page after page through the working set, wrapping around.
    Sequential,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Uniform => "uniform",
            Pattern::HotSet => "hot-set",
            Pattern::Sequential => "sequential",
        })
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uniform" => Ok(Pattern::Uniform),
            "hot-set" | "hotset" => Ok(Pattern::HotSet),
            "sequential" => Ok(Pattern::Sequential),
            other => Err(format!("unknown pattern {other:?} (uniform, hot-set, sequential)")),
        }
    }
}

/// The workload of a guest: how fast it dirties memory, where, and with what content.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadSpec {
    /// Dirtying rate in bytes of pages per second (each store dirties one page); 0 = idle.
    pub rate_bytes_per_sec: u64,
    /// Size of the working set in bytes (rounded down to pages, at least one page).
    pub working_set_bytes: u64,
    /// Where stores land.
    pub pattern: Pattern,
    /// Fraction of pages left zero when memory is filled (0.0..=1.0).
    pub zero_fraction: f64,
    /// Seed of content and choices.
    pub seed: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            rate_bytes_per_sec: 0,
            working_set_bytes: 64 << 20,
            pattern: Pattern::HotSet,
            zero_fraction: 0.1,
            seed: 0x5eed,
        }
    }
}

impl WorkloadSpec {
    /// An idle guest.
    pub fn idle() -> Self {
        Self::default()
    }

    /// Pages per second the guest dirties.
    pub fn pages_per_sec(&self) -> f64 {
        self.rate_bytes_per_sec as f64 / PAGE_SIZE as f64
    }
}
