//! Bandwidth shaping: a token bucket, and the shaping a link is configured with.

use std::time::{Duration, Instant};

/// How a link is shaped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shaping {
    /// Bandwidth cap in bytes per second; `None` = as fast as the machine goes.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// One-way latency added to every frame.
    pub latency: Duration,
}

/// A token bucket: `take` returns how long the caller must wait before its bytes may go.
/// Tokens may go negative, so a large frame is charged in full and the wait is exact.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket filling at `bytes_per_sec`, holding at most 10 ms worth (or 256 KiB) of burst.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 100.0).max(256.0 * 1024.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Changes the rate, keeping the tokens.
    pub fn set_rate(&mut self, bytes_per_sec: u64) {
        self.refill();
        self.rate = bytes_per_sec.max(1) as f64;
        self.burst = (self.rate / 100.0).max(256.0 * 1024.0);
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Charges `bytes`; the wait before they may be sent.
    pub fn take(&mut self, bytes: u64) -> Duration {
        self.refill();
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bucket_charges_beyond_burst() {
        let mut b = TokenBucket::new(1_000_000);
        assert_eq!(b.take(100_000), Duration::ZERO);
        let wait = b.take(1_000_000);
        // 1 MB beyond a ~256 KiB burst at 1 MB/s: most of a second.
        assert!(
            wait > Duration::from_millis(700) && wait < Duration::from_millis(1000),
            "{wait:?}"
        );
    }
}
