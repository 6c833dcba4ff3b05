//! When the rounds of an announcement go out: QEMU's announce timer, as a pure function.
//!
//! The first round goes out at once. After round `k` (counting from 1) the next waits
//! `initial + (k - 1) * step`, never more than `max`: with QEMU's defaults (initial 50 ms,
//! max 550 ms, 5 rounds, step 100 ms) the rounds leave at 0, 50, 200, 450 and 800 ms. Each gap
//! is measured from the round before (as QEMU re-arms its timer after sending), so a late
//! round delays the ones after it rather than crowding them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::AnnounceError;

/// How an activated VM's NICs are announced: QEMU's `announce-*` migration parameters, with
/// its defaults and its bounds. Carried to the target in `Reserve` (the target sends the
/// frames), which is why it is serializable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnnounceParams {
    /// Wait after the first round, in milliseconds (QEMU: `announce-initial`, 0..=100000).
    pub initial_ms: u32,
    /// Longest wait between two rounds, in milliseconds (QEMU: `announce-max`, 0..=100000).
    pub max_ms: u32,
    /// Rounds to send; 0 sends none (QEMU: `announce-rounds`, 0..=1000).
    pub rounds: u32,
    /// How much longer each wait is than the one before, in milliseconds (QEMU:
    /// `announce-step`, 1..=10000).
    pub step_ms: u32,
}

impl Default for AnnounceParams {
    /// QEMU's defaults (`DEFAULT_MIGRATE_ANNOUNCE_*` in its migration options).
    fn default() -> Self {
        Self {
            initial_ms: 50,
            max_ms: 550,
            rounds: 5,
            step_ms: 100,
        }
    }
}

/// The bounds QEMU puts on each parameter (`migrate_params_check`), inclusive.
const INITIAL_MS: (u32, u32) = (0, 100_000);
const MAX_MS: (u32, u32) = (0, 100_000);
const ROUNDS: (u32, u32) = (0, 1000);
const STEP_MS: (u32, u32) = (1, 10_000);

impl AnnounceParams {
    /// The parameters if each is within QEMU's bounds, else the first that is not.
    pub fn validate(&self) -> Result<(), AnnounceError> {
        for (name, value, (min, max)) in [
            ("initial_ms", self.initial_ms, INITIAL_MS),
            ("max_ms", self.max_ms, MAX_MS),
            ("rounds", self.rounds, ROUNDS),
            ("step_ms", self.step_ms, STEP_MS),
        ] {
            if !(min..=max).contains(&value) {
                return Err(AnnounceError::ParamOutOfRange { name, value, min, max });
            }
        }
        Ok(())
    }

    /// How long to wait before each round, the first being zero: `rounds` values.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + '_ {
        let (initial, step, max) = (
            u64::from(self.initial_ms),
            u64::from(self.step_ms),
            u64::from(self.max_ms),
        );
        (0..u64::from(self.rounds)).map(move |round| match round {
            0 => Duration::ZERO,
            k => Duration::from_millis((initial + (k - 1) * step).min(max)),
        })
    }

    /// When each round goes out, from the first: the running sum of [`Self::delays`].
    pub fn send_offsets(&self) -> Vec<Duration> {
        self.delays()
            .scan(Duration::ZERO, |at, delay| {
                *at += delay;
                Some(*at)
            })
            .collect()
    }

    /// Frames an announcement of `nics` NICs sends: a RARP and a gratuitous ARP per NIC per
    /// round.
    pub fn frame_count(&self, nics: usize) -> u64 {
        u64::from(self.rounds) * nics as u64 * super::FrameKind::ALL.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn test_qemu_defaults_send_at_0_50_200_450_800_ms() {
        let p = AnnounceParams::default();
        assert_eq!(p.delays().collect::<Vec<_>>(), ms(&[0, 50, 150, 250, 350]));
        assert_eq!(p.send_offsets(), ms(&[0, 50, 200, 450, 800]));
        assert_eq!(p.frame_count(2), 20);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn test_a_gap_never_exceeds_max() {
        let p = AnnounceParams {
            initial_ms: 100,
            max_ms: 300,
            rounds: 5,
            step_ms: 150,
        };
        assert_eq!(p.delays().collect::<Vec<_>>(), ms(&[0, 100, 250, 300, 300]));
        // QEMU clamps an initial wait above max to max too.
        let p = AnnounceParams {
            initial_ms: 900,
            max_ms: 200,
            rounds: 3,
            step_ms: 1,
        };
        assert_eq!(p.send_offsets(), ms(&[0, 200, 400]));
    }

    #[test]
    fn test_zero_rounds_send_nothing_and_one_round_sends_at_once() {
        let none = AnnounceParams {
            rounds: 0,
            ..AnnounceParams::default()
        };
        assert_eq!(none.send_offsets(), Vec::<Duration>::new());
        assert_eq!(none.frame_count(4), 0);
        let once = AnnounceParams {
            rounds: 1,
            ..AnnounceParams::default()
        };
        assert_eq!(once.send_offsets(), ms(&[0]));
    }

    #[test]
    fn test_the_largest_allowed_parameters_do_not_overflow() {
        let p = AnnounceParams {
            initial_ms: INITIAL_MS.1,
            max_ms: MAX_MS.1,
            rounds: ROUNDS.1,
            step_ms: STEP_MS.1,
        };
        assert!(p.validate().is_ok());
        let offsets = p.send_offsets();
        assert_eq!(offsets.len(), 1000);
        assert_eq!(offsets[999], Duration::from_millis(999 * 100_000));
    }

    #[test]
    fn test_out_of_range_parameters_are_refused_by_name() {
        let d = AnnounceParams::default();
        for (bad, name, value) in [
            (
                AnnounceParams {
                    initial_ms: 100_001,
                    ..d
                },
                "initial_ms",
                100_001,
            ),
            (AnnounceParams { max_ms: 100_001, ..d }, "max_ms", 100_001),
            (AnnounceParams { rounds: 1001, ..d }, "rounds", 1001),
            (AnnounceParams { step_ms: 0, ..d }, "step_ms", 0),
            (AnnounceParams { step_ms: 10_001, ..d }, "step_ms", 10_001),
        ] {
            match bad.validate() {
                Err(AnnounceError::ParamOutOfRange { name: n, value: v, .. }) => assert_eq!((n, v), (name, value)),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn test_params_missing_from_a_message_take_the_defaults() {
        let p: AnnounceParams = serde_json::from_str(r#"{"rounds": 2}"#).expect("decodes");
        assert_eq!(
            p,
            AnnounceParams {
                rounds: 2,
                ..AnnounceParams::default()
            }
        );
    }
}
