//! The sim's writer as it runs: the state that lets a migrated writer carry on where it
//! stopped, and the device blob that carries it. What it writes is the backend-neutral
//! [`WorkloadSpec`].

use crate::memory::SplitMix64;
use crate::units::PAGE_SIZE;
use crate::vmm::{Pattern, VmmError, WorkloadSpec};

/// The writer's live state: what a device blob carries to the target.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkloadState {
    pub spec: WorkloadSpec,
    pub counter: u64,
    pub rng: SplitMixState,
    pub cursor: u64,
}

/// SplitMix64's state, kept separately so it can be serialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SplitMixState(pub u64);

/// Device name of the workload blob.
pub(crate) const WORKLOAD_DEVICE: &str = "sim-workload";
/// Version of the workload blob layout.
pub(crate) const WORKLOAD_DEVICE_VERSION: u32 = 1;
const WORKLOAD_BLOB_LEN: usize = 8 * 6 + 1;

impl WorkloadState {
    pub fn new(spec: WorkloadSpec) -> Self {
        Self {
            spec,
            counter: 0,
            rng: SplitMixState(spec.seed ^ 0xa5a5_a5a5),
            cursor: 0,
        }
    }

    /// Picks the next page to write and the word within it.
    pub fn next_target(&mut self, pages: u64) -> (u64, usize) {
        let mut rng = SplitMix64::new(self.rng.0);
        let r = rng.next();
        self.rng = SplitMixState(r);
        let ws = (self.spec.working_set_bytes / PAGE_SIZE as u64).clamp(1, pages);
        let page = match self.spec.pattern {
            Pattern::Uniform => r % pages,
            Pattern::HotSet => r % ws,
            Pattern::Sequential => {
                let p = self.cursor % ws;
                self.cursor = (self.cursor + 1) % ws;
                p
            }
        };
        (page, (r >> 40) as usize % (PAGE_SIZE / 8))
    }

    /// The device blob: little-endian fields, fixed length.
    pub fn to_blob(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(WORKLOAD_BLOB_LEN);
        for x in [
            self.spec.rate_bytes_per_sec,
            self.spec.working_set_bytes,
            self.spec.seed,
            self.counter,
            self.rng.0,
            self.cursor,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.push(pattern_code(self.spec.pattern));
        v
    }

    /// Parses [`WorkloadState::to_blob`]; the zero fraction only matters at creation.
    pub fn from_blob(data: &[u8]) -> Result<Self, VmmError> {
        let bad = || VmmError::MalformedDevice {
            name: WORKLOAD_DEVICE.to_string(),
            len: data.len(),
        };
        if data.len() != WORKLOAD_BLOB_LEN {
            return Err(bad());
        }
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&data[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        let pattern = pattern_from_code(data[48]).ok_or_else(bad)?;
        Ok(Self {
            spec: WorkloadSpec {
                rate_bytes_per_sec: word(0),
                working_set_bytes: word(1),
                pattern,
                zero_fraction: 0.0,
                seed: word(2),
            },
            counter: word(3),
            rng: SplitMixState(word(4)),
            cursor: word(5),
        })
    }
}

/// The pattern's byte in the blob; part of the blob's layout, so never renumbered.
fn pattern_code(p: Pattern) -> u8 {
    match p {
        Pattern::Uniform => 0,
        Pattern::HotSet => 1,
        Pattern::Sequential => 2,
    }
}

fn pattern_from_code(c: u8) -> Option<Pattern> {
    match c {
        0 => Some(Pattern::Uniform),
        1 => Some(Pattern::HotSet),
        2 => Some(Pattern::Sequential),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_blob_round_trip_and_rejects_malformed() {
        let mut s = WorkloadState::new(WorkloadSpec {
            pattern: Pattern::Sequential,
            ..WorkloadSpec::default()
        });
        s.next_target(100);
        s.counter = 42;
        let back = WorkloadState::from_blob(&s.to_blob()).expect("parse");
        assert_eq!(back.counter, 42);
        assert_eq!(back.cursor, s.cursor);
        assert_eq!(back.rng, s.rng);
        assert!(WorkloadState::from_blob(&[0; 3]).is_err());
        let mut bad = s.to_blob();
        bad[48] = 9;
        assert!(WorkloadState::from_blob(&bad).is_err());
    }

    #[test]
    fn test_patterns_stay_in_their_region() {
        let mut s = WorkloadState::new(WorkloadSpec {
            working_set_bytes: 10 * PAGE_SIZE as u64,
            ..WorkloadSpec::default()
        });
        assert!((0..1000).all(|_| s.next_target(1000).0 < 10));
        s.spec.pattern = Pattern::Sequential;
        let seq: Vec<u64> = (0..12).map(|_| s.next_target(1000).0).collect();
        assert_eq!(&seq[..3], &[0, 1, 2]);
        assert_eq!(seq[10], 0);
    }
}
