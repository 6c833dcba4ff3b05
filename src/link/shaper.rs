//! Bandwidth shaping: a token bucket, the shaping a link is configured with, and a budget
//! shared by several senders by weight, with a floor each.
//!
//! When to use what: a link's own cap is a plain [`TokenBucket`]. A host's budget shared by its
//! outgoing migrations is a [`SharedBudget`]; each migration gets its own member bucket from
//! [`SharedBudget::member`], and a link charges it exactly as it charges a plain bucket.

use std::sync::{Arc, Mutex};
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
///
/// A bucket is either a rate of its own ([`TokenBucket::new`]) or a member of a
/// [`SharedBudget`] ([`SharedBudget::member`]), whose rate follows the budget's other members.
#[derive(Debug)]
pub struct TokenBucket {
    meter: Meter,
}

#[derive(Debug)]
enum Meter {
    Own(Bucket),
    Member(Membership),
}

impl TokenBucket {
    /// A bucket filling at `bytes_per_sec`, holding at most 10 ms worth (or 256 KiB) of burst.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            meter: Meter::Own(Bucket::new(bytes_per_sec.max(1) as f64, Instant::now())),
        }
    }

    /// Changes the rate, keeping the tokens. On a budget's member it changes the member's own
    /// cap, which bounds what the budget assures it.
    pub fn set_rate(&mut self, bytes_per_sec: u64) {
        let now = Instant::now();
        match &mut self.meter {
            Meter::Own(b) => b.set_rate(bytes_per_sec.max(1) as f64, now),
            Meter::Member(m) => m.lock().set_cap(m.id, bytes_per_sec.max(1) as f64),
        }
    }

    /// Charges `bytes`; the wait before they may be sent.
    pub fn take(&mut self, bytes: u64) -> Duration {
        let now = Instant::now();
        match &mut self.meter {
            Meter::Own(b) => b.take(bytes as f64, now),
            Meter::Member(m) => m.lock().take(m.id, bytes as f64, now),
        }
    }
}

/// The tokens of one rate.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        let burst = burst_of(rate);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst_of(rate);
    }

    fn take(&mut self, bytes: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= bytes;
        self.wait()
    }

    /// The wait until the tokens are back to zero.
    fn wait(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate.max(1.0))
        }
    }
}

/// 10 ms worth of `rate`, at least 256 KiB: a frame or two, so pacing stays smooth.
fn burst_of(rate: f64) -> f64 {
    (rate / 100.0).max(256.0 * 1024.0)
}

/// What one sender claims of a shared budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    /// Its weight (at least 1): above its floor, senders share in proportion to weights.
    pub weight: f64,
    /// Bytes per second it is assured while it sends, whatever the weights say.
    pub floor_bytes_per_sec: f64,
    /// The most it can use, bytes per second (its own cap; infinite if none).
    pub cap_bytes_per_sec: f64,
}

impl Claim {
    /// A claim of `weight` with no floor and no cap.
    pub fn weighted(weight: f64) -> Self {
        Self {
            weight,
            floor_bytes_per_sec: 0.0,
            cap_bytes_per_sec: f64::INFINITY,
        }
    }
}

/// Weighted max-min shares of one budget of `budget_bytes_per_sec` among `claims`, with
/// floors: each claim gets `min(cap, max(floor, weight × level))` at the one level that spends
/// the budget (or its cap, when the caps together are below the budget). Floors come first:
/// if they alone exceed the budget (admission keeps that from happening) they are scaled down
/// to fit. The datacenter model's `network::share` is the same rule over many resources.
pub fn weighted_shares(budget_bytes_per_sec: f64, claims: &[Claim]) -> Vec<f64> {
    let budget = budget_bytes_per_sec.max(0.0);
    let floors: Vec<f64> = claims
        .iter()
        .map(|c| c.floor_bytes_per_sec.max(0.0).min(c.cap_bytes_per_sec))
        .collect();
    let floor_sum: f64 = floors.iter().sum();
    if floor_sum >= budget {
        let scale = if floor_sum > 0.0 { budget / floor_sum } else { 0.0 };
        return floors.iter().map(|f| f * scale).collect();
    }
    let weight = |c: &Claim| c.weight.max(f64::MIN_POSITIVE);
    let at = |level: f64| -> Vec<f64> {
        claims
            .iter()
            .zip(&floors)
            .map(|(c, &f)| (weight(c) * level).max(f).min(c.cap_bytes_per_sec))
            .collect()
    };
    let total = |level: f64| at(level).iter().sum::<f64>();
    // The total is piecewise linear in the level, with kinks where a claim leaves its floor
    // or reaches its cap: find the segment where it crosses the budget, then solve on it.
    let mut kinks: Vec<f64> = claims
        .iter()
        .zip(&floors)
        .flat_map(|(c, &f)| [f / weight(c), c.cap_bytes_per_sec / weight(c)])
        .filter(|k| k.is_finite())
        .collect();
    kinks.sort_by(f64::total_cmp);
    let (mut lo, mut lo_total) = (0.0, total(0.0));
    for k in kinks {
        let k_total = total(k);
        if k_total >= budget {
            let level = if k_total > lo_total {
                lo + (budget - lo_total) * (k - lo) / (k_total - lo_total)
            } else {
                lo
            };
            return at(level);
        }
        (lo, lo_total) = (k, k_total);
    }
    // Past the last kink only the uncapped claims still grow, each at its weight.
    let slope: f64 = claims
        .iter()
        .filter(|c| c.cap_bytes_per_sec.is_infinite())
        .map(weight)
        .sum();
    if slope > 0.0 {
        at(lo + (budget - lo_total) / slope)
    } else {
        at(lo)
    }
}

/// A sender counts among those sharing the budget while it sent within this window; one that
/// has been quiet longer leaves its share to the others (work conservation), and takes it back
/// with its next frame.
const ACTIVE_WINDOW: Duration = Duration::from_millis(50);

/// A bandwidth budget shared by several senders (a host's outgoing migrations).
///
/// Each member has a [`Claim`]. The members that sent within the last 50 ms share the budget
/// by [`weighted_shares`]: each is assured its share through a bucket of its own, and every
/// byte is also charged to the budget's bucket. A member whose own tokens are spent may still
/// send at once if the budget's bucket holds the bytes: what a member assured of more than it
/// uses leaves there, so the budget is work-conserving, and never spent faster than its rate
/// beyond one burst.
#[derive(Debug, Clone)]
pub struct SharedBudget {
    pool: Arc<Mutex<Pool>>,
}

impl SharedBudget {
    /// A budget of `bytes_per_sec`.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        Self {
            pool: Arc::new(Mutex::new(Pool {
                rate,
                budget: Bucket::new(rate, Instant::now()),
                members: Vec::new(),
                next_id: 0,
            })),
        }
    }

    /// The budget's rate, bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        lock(&self.pool).rate as u64
    }

    /// A new member with `claim`: the bucket its link charges. It leaves the budget when the
    /// bucket is dropped (with the last link that holds it).
    pub fn member(&self, claim: Claim) -> Arc<Mutex<TokenBucket>> {
        let id = {
            let mut pool = lock(&self.pool);
            pool.next_id += 1;
            let id = pool.next_id;
            pool.members.push(Member {
                id,
                claim,
                bucket: Bucket::new(1.0, Instant::now()),
                last_sent: None,
            });
            id
        };
        Arc::new(Mutex::new(TokenBucket {
            meter: Meter::Member(Membership {
                pool: Arc::clone(&self.pool),
                id,
            }),
        }))
    }

    /// The rate each member is assured now (by member order of creation), bytes per second;
    /// zero for a member quiet for longer than the active window.
    pub fn assured_bytes_per_sec(&self) -> Vec<f64> {
        let mut pool = lock(&self.pool);
        pool.reshare(Instant::now());
        pool.members.iter().map(|m| m.bucket.rate).collect()
    }
}

fn lock(pool: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    // The pool's state stays consistent at every unlock; a panicking holder leaves it usable.
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// A member's handle: its id in the pool, removed when dropped.
#[derive(Debug)]
struct Membership {
    pool: Arc<Mutex<Pool>>,
    id: u64,
}

impl Membership {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        lock(&self.pool)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut pool = self.lock();
        pool.members.retain(|m| m.id != self.id);
        pool.reshare(Instant::now());
    }
}

#[derive(Debug)]
struct Member {
    id: u64,
    claim: Claim,
    /// Filled at the rate the member is assured.
    bucket: Bucket,
    last_sent: Option<Instant>,
}

impl Member {
    fn active(&self, now: Instant) -> bool {
        self.last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW)
    }
}

#[derive(Debug)]
struct Pool {
    rate: f64,
    /// Every byte of every member; what is left in it is unused budget, free to borrow.
    budget: Bucket,
    members: Vec<Member>,
    next_id: u64,
}

impl Pool {
    /// Refills every member at the rate it had, then gives each the rate it is assured now.
    fn reshare(&mut self, now: Instant) {
        let active: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].active(now))
            .collect();
        let claims: Vec<Claim> = active.iter().map(|&i| self.members[i].claim).collect();
        let shares = weighted_shares(self.rate, &claims);
        for m in &mut self.members {
            m.bucket.refill(now);
        }
        for m in &mut self.members {
            if !m.active(now) {
                // A quiet member keeps no rate; it starts again from a full burst.
                m.bucket.rate = 0.0;
            }
        }
        for (&i, share) in active.iter().zip(shares) {
            let b = &mut self.members[i].bucket;
            b.rate = share;
            b.burst = burst_of(share);
        }
    }

    fn take(&mut self, id: u64, bytes: f64, now: Instant) -> Duration {
        let Some(i) = self.members.iter().position(|m| m.id == id) else {
            return Duration::ZERO;
        };
        let was_active = self.members[i].active(now);
        self.members[i].last_sent = Some(now);
        self.reshare(now);
        self.budget.refill(now);
        let member = &mut self.members[i].bucket;
        if !was_active {
            // Back from quiet: a fresh burst at its new rate, but only what the budget holds:
            // a member that comes and goes between short rounds must not draw a burst the
            // others' sending has already spent (measured: 30% over a 20 MB/s budget).
            member.tokens = member.burst.min(self.budget.tokens.max(0.0));
        }
        if member.tokens >= bytes {
            member.tokens -= bytes;
            self.budget.tokens -= bytes;
            Duration::ZERO
        } else if self.budget.tokens >= bytes {
            // Borrowed: left unused by the others, so no member's assured rate pays for it.
            self.budget.tokens -= bytes;
            Duration::ZERO
        } else if member.rate <= 0.0 {
            // Floors hold the whole budget and assure this member nothing: it waits for the
            // budget itself, in debt, so it only ever gets what the floors leave.
            self.budget.tokens -= bytes;
            self.budget.wait()
        } else {
            member.tokens -= bytes;
            self.budget.tokens -= bytes;
            member.wait()
        }
    }

    fn set_cap(&mut self, id: u64, cap: f64) {
        if let Some(m) = self.members.iter_mut().find(|m| m.id == id) {
            m.claim.cap_bytes_per_sec = cap;
        }
        self.reshare(Instant::now());
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

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6 * y.abs().max(1.0))
    }

    #[test]
    fn test_shares_follow_weights() {
        let claims = [Claim::weighted(1.0), Claim::weighted(2.0), Claim::weighted(4.0)];
        let shares = weighted_shares(700.0, &claims);
        assert!(close(&shares, &[100.0, 200.0, 400.0]), "{shares:?}");
    }

    #[test]
    fn test_a_floor_is_met_and_the_rest_goes_by_weight() {
        let mut low = Claim::weighted(1.0);
        low.floor_bytes_per_sec = 300.0;
        let shares = weighted_shares(700.0, &[low, Claim::weighted(2.0), Claim::weighted(4.0)]);
        // The floor holds; the other two split the remaining 400 two to one... by 2:4.
        assert!(close(&shares, &[300.0, 400.0 / 3.0, 800.0 / 3.0]), "{shares:?}");
    }

    #[test]
    fn test_a_capped_claim_leaves_the_rest_to_the_others() {
        let mut high = Claim::weighted(4.0);
        high.cap_bytes_per_sec = 100.0;
        let shares = weighted_shares(700.0, &[Claim::weighted(1.0), Claim::weighted(2.0), high]);
        assert!(close(&shares, &[200.0, 400.0, 100.0]), "{shares:?}");
        let all_capped = [Claim {
            cap_bytes_per_sec: 50.0,
            ..Claim::weighted(1.0)
        }];
        assert!(close(&weighted_shares(700.0, &all_capped), &[50.0]));
    }

    #[test]
    fn test_floors_beyond_the_budget_are_scaled_to_fit() {
        let c = |floor| Claim {
            floor_bytes_per_sec: floor,
            ..Claim::weighted(1.0)
        };
        let shares = weighted_shares(100.0, &[c(100.0), c(100.0)]);
        assert!(close(&shares, &[50.0, 50.0]), "{shares:?}");
    }

    #[test]
    fn test_members_are_assured_their_weighted_share_while_they_send() {
        let budget = SharedBudget::new(700_000_000);
        let a = budget.member(Claim::weighted(1.0));
        let b = budget.member(Claim::weighted(2.0));
        let c = budget.member(Claim::weighted(4.0));
        // Only a and c send: b's share goes to them, by their weights.
        a.lock().unwrap().take(1);
        c.lock().unwrap().take(1);
        let assured = budget.assured_bytes_per_sec();
        assert!(close(&assured, &[140e6, 0.0, 560e6]), "{assured:?}");
        b.lock().unwrap().take(1);
        let assured = budget.assured_bytes_per_sec();
        assert!(close(&assured, &[100e6, 200e6, 400e6]), "{assured:?}");
        drop(a);
        let assured = budget.assured_bytes_per_sec();
        assert!(close(&assured, &[700e6 / 3.0, 1400e6 / 3.0]), "{assured:?}");
    }

    #[test]
    fn test_a_member_borrows_what_the_budget_has_unused() {
        // 100 MB/s: the budget's burst is 1 MB, each member's 500 kB.
        let budget = SharedBudget::new(100_000_000);
        let a = budget.member(Claim::weighted(1.0));
        let b = budget.member(Claim::weighted(1.0));
        b.lock().unwrap().take(1);
        let mut a = a.lock().unwrap();
        assert_eq!(a.take(500_000), Duration::ZERO);
        // a's own tokens are spent, but b sent nothing more: a borrows what the budget holds.
        assert_eq!(a.take(400_000), Duration::ZERO);
        // Then both are spent: a waits for its own tokens.
        assert!(a.take(400_000) > Duration::ZERO);
    }
}
