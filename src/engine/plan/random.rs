//! Random: a uniform pick among the concrete algorithms both hosts offer, then that
//! algorithm's plan (the paper: "the algorithm is chosen randomly or by the user").
//!
//! The candidates are the pool's concrete algorithms (stop-and-copy, pre-copy, post-copy,
//! hybrid), never `auto` or `random` itself: a pick of a chooser would only defer the choice.
//! The pick is a pure function of the seed and the pool, so a seed replays it; the source picks
//! after negotiation, and the target only ever sees the pick (in `Reserve`).

use std::time::Duration;

use super::{for_algorithm, Choice, Estimate, Next, Plan, RoundObservation, Verdict};
use crate::engine::policy::{self, CostInputs, Decision, PolicyConfig, Prediction, Reason};
use crate::memory::SplitMix64;
use crate::protocol::Algorithm;

/// The `random` plan: the plan of the algorithm it picked, announced by a first decision that
/// names the pick, the candidates and the seed.
#[derive(Debug)]
pub struct RandomPlan {
    seed: u64,
    among: Vec<Algorithm>,
    /// The picked algorithm's plan; `None` if the pool has no concrete algorithm (negotiation
    /// refuses such a pool, so only a driver that skips it sees this).
    inner: Option<Box<dyn Plan>>,
}

/// The pool's concrete algorithms, in [`Algorithm::ALL`]'s order, each once.
pub fn candidates(pool: &[Algorithm]) -> Vec<Algorithm> {
    let mut among: Vec<Algorithm> = pool.iter().copied().filter(|a| a.is_concrete()).collect();
    among.sort();
    among.dedup();
    among
}

/// The pick of `seed` among `among`: uniform, from the first output of SplitMix64 (the
/// generator the rest of the crate uses). Multiply-shift maps 64 bits onto `among`; its bias is
/// below `len / 2^64`.
pub fn pick(among: &[Algorithm], seed: u64) -> Option<Algorithm> {
    let n = among.len() as u128;
    if n == 0 {
        return None;
    }
    let x = SplitMix64::new(seed).next();
    let i = ((u128::from(x) * n) >> 64) as usize;
    among.get(i).copied()
}

impl RandomPlan {
    /// A pick by `seed` among `pool`'s concrete algorithms, and the plan of the pick within
    /// `cfg`.
    pub fn new(cfg: PolicyConfig, pool: &[Algorithm], seed: u64) -> Self {
        let among = candidates(pool);
        let inner = pick(&among, seed).map(|a| for_algorithm(a, cfg, pool, seed));
        Self { seed, among, inner }
    }

    /// The algorithm picked, if the pool had one to pick.
    pub fn picked(&self) -> Option<Algorithm> {
        self.inner.as_ref().map(|p| p.algorithm())
    }

    /// The candidates, as the report names them.
    fn among_names(&self) -> String {
        self.among.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
    }

    fn nothing_to_pick(&self) -> String {
        "random: the pool has no concrete algorithm to pick".to_string()
    }
}

impl Plan for RandomPlan {
    fn algorithm(&self) -> Algorithm {
        self.inner.as_ref().map_or(Algorithm::Random, |p| p.algorithm())
    }

    fn iterates(&self) -> bool {
        self.inner.as_ref().is_some_and(|p| p.iterates())
    }

    fn start(&mut self, pages: u64, estimate: Option<Estimate>) -> Verdict {
        let why = format!("uniform pick among [{}], seed {}", self.among_names(), self.seed);
        let Some(inner) = self.inner.as_mut() else {
            let detail = self.nothing_to_pick();
            return Verdict {
                decisions: vec![Choice::new("abort", detail.clone())],
                next: Next::Abort { detail },
                forecast: None,
            };
        };
        let picked = inner.algorithm();
        let mut v = inner.start(pages, estimate);
        v.decisions
            .insert(0, Choice::new(format!("random chose {picked}"), why));
        v
    }

    fn after_round(&mut self, obs: &RoundObservation) -> Verdict {
        match self.inner.as_mut() {
            Some(inner) => inner.after_round(obs),
            None => Verdict::next(Next::Abort {
                detail: self.nothing_to_pick(),
            }),
        }
    }

    fn on_stall(&self, obs: &RoundObservation, reason: Reason, predicted: Duration) -> Decision {
        match &self.inner {
            Some(inner) => inner.on_stall(obs, reason, predicted),
            None => Decision::Abort {
                reason,
                predicted_downtime: predicted,
            },
        }
    }

    fn predict(&self, inputs: &CostInputs) -> Prediction {
        match &self.inner {
            Some(inner) => inner.predict(inputs),
            None => Prediction {
                algorithm: Algorithm::Random,
                converges: false,
                ..policy::predict_stop_and_copy(inputs)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONCRETE: [Algorithm; 4] = [
        Algorithm::StopAndCopy,
        Algorithm::Precopy,
        Algorithm::Postcopy,
        Algorithm::Hybrid,
    ];

    #[test]
    fn test_the_candidates_are_the_concrete_algorithms_of_the_pool() {
        assert_eq!(candidates(&Algorithm::ALL), CONCRETE.to_vec());
        assert_eq!(
            candidates(&[
                Algorithm::Auto,
                Algorithm::Postcopy,
                Algorithm::Random,
                Algorithm::Precopy
            ]),
            vec![Algorithm::Precopy, Algorithm::Postcopy]
        );
    }

    /// 1,000 seeded picks from the full pool: each of the 4 candidates 250 times expected.
    /// Pearson's chi-square over 3 degrees of freedom stays below 16.27 with probability
    /// 99.9%; the seeds are fixed, so the figure is too.
    #[test]
    fn test_a_thousand_seeded_picks_cover_the_pool_in_roughly_equal_counts() {
        let among = candidates(&Algorithm::ALL);
        let mut counts = [0u32; 4];
        for seed in 0..1000u64 {
            let a = pick(&among, seed).expect("a pick");
            let i = CONCRETE.iter().position(|c| *c == a).expect("a concrete pick");
            counts[i] += 1;
        }
        let expected = 250.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        println!("picks per algorithm {counts:?}, chi-square {chi2:.2}");
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        assert!(chi2 < 16.27, "counts {counts:?}: chi-square {chi2:.2}");
    }

    #[test]
    fn test_the_same_seed_gives_the_same_pick() {
        for seed in [0, 1, 42, u64::MAX] {
            let a = RandomPlan::new(PolicyConfig::default(), &Algorithm::ALL, seed).picked();
            let b = RandomPlan::new(PolicyConfig::default(), &Algorithm::ALL, seed).picked();
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn test_a_pool_of_one_always_picks_it() {
        for a in CONCRETE {
            let pool = [a, Algorithm::Auto, Algorithm::Random];
            for seed in 0..100 {
                assert_eq!(RandomPlan::new(PolicyConfig::default(), &pool, seed).picked(), Some(a));
            }
        }
    }

    #[test]
    fn test_the_first_decision_names_the_pick_the_candidates_and_the_seed() {
        let pool = [Algorithm::Precopy, Algorithm::Postcopy, Algorithm::Auto];
        let mut plan = RandomPlan::new(PolicyConfig::default(), &pool, 7);
        let picked = plan.picked().expect("a pick");
        assert_eq!(plan.algorithm(), picked);
        let v = plan.start(1024, None);
        assert_eq!(v.decisions[0].action, format!("random chose {picked}"));
        assert_eq!(v.decisions[0].reason, "uniform pick among [precopy, postcopy], seed 7");
        // The picked plan's own first step follows.
        let expected = for_algorithm(picked, PolicyConfig::default(), &pool, 7).start(1024, None);
        assert_eq!(v.next, expected.next);
    }

    #[test]
    fn test_a_pool_without_a_concrete_algorithm_aborts() {
        let mut plan = RandomPlan::new(PolicyConfig::default(), &[Algorithm::Auto], 1);
        assert_eq!(plan.picked(), None);
        assert!(matches!(plan.start(1024, None).next, Next::Abort { .. }));
    }
}
