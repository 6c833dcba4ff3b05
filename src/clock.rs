//! The engine's one clock.
//!
//! All engine timing (stage durations, timeouts, rates) goes through tokio's time so that a
//! runtime started with paused time runs the same actors in virtual time (the planned model
//! mode). Data-plane threads measure their own throughput with the same `Instant` type: outside a
//! paused runtime it is the monotonic clock.

use std::time::Duration;

pub use tokio::time::Instant;

/// Now, on the engine clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Seconds as `f64`, for reports and metrics.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
