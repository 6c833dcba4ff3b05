//! Verification: per-page digests of the source at pause against the target's as received.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// When a stop-and-copy or pre-copy migration compares the digests. Hashing every page of the
/// paused source takes about a tenth of a second per GiB on this project's 2-core machines,
/// far more than the rest of a switchover, so where it runs decides the downtime.
///
/// Post-copy always verifies after its pull, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyMode {
    /// After the target runs the VM, before the source frees its copy: the downtime carries
    /// no hashing. A difference (a write the dirty log missed, a page damaged on the way)
    /// cannot be rolled back any more: the migration fails, the target keeps running the VM,
    /// and the source holds its paused copy as `unverified` for an operator, never freeing it.
    #[default]
    AfterActivation,
    /// Before `Commit`, inside the downtime: a difference rolls the migration back and the VM
    /// runs on the source again, intact.
    BeforeCommit,
}

impl VerifyMode {
    /// Every mode.
    pub const ALL: [VerifyMode; 2] = [VerifyMode::AfterActivation, VerifyMode::BeforeCommit];

    /// The name used by the CLI, the API and reports.
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::AfterActivation => "after-activation",
            VerifyMode::BeforeCommit => "before-commit",
        }
    }
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VerifyMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown verify mode {s:?} (after-activation, before-commit)"))
    }
}

use crate::units::{PageIndex, PAGE_SIZE};
use crate::vmm::Guest;

/// Threads that hash memory at once: the pause waits for them, and this machine kind has 2 cores.
const HASH_THREADS: usize = 2;

/// Digest of every page of `guest`'s memory (bulk work: call off the actor thread). The pages
/// are split among a few threads: verification sits inside the downtime.
pub fn digests(guest: &dyn Guest) -> Vec<u64> {
    let memory = guest.memory();
    // A page that cannot be read gets a digest no real page has, so it shows as a mismatch.
    let unreadable = !xxh3_64(&[0u8; PAGE_SIZE]);
    let pages = memory.page_count();
    let mut out = vec![0u64; pages as usize];
    let per = out.len().div_ceil(HASH_THREADS).max(1);
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per).enumerate() {
            let first = (i * per) as u64;
            scope.spawn(move || {
                for (j, d) in part.iter_mut().enumerate() {
                    *d = memory.page_digest(PageIndex(first + j as u64)).unwrap_or(unreadable);
                }
            });
        }
    });
    out
}

/// How many pages differ (a missing target digest counts as a difference).
pub fn count_differences(source: &[u64], target: &[u64]) -> usize {
    source
        .iter()
        .enumerate()
        .filter(|(i, d)| target.get(*i) != Some(d))
        .count()
}

/// Pages whose digests differ (a missing target digest counts as a difference).
pub fn compare(source: &[u64], target: &[u64]) -> Vec<u64> {
    source
        .iter()
        .enumerate()
        .filter(|(i, d)| target.get(*i) != Some(d))
        .map(|(i, _)| i as u64)
        .take(super::receiver::MAX_LISTED_MISMATCHES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_compare_lists_differences_and_gaps() {
        assert_eq!(compare(&[1, 2, 3], &[1, 9, 3]), vec![1]);
        assert_eq!(compare(&[1, 2, 3], &[1]), vec![1, 2]);
        assert!(compare(&[4, 5], &[4, 5]).is_empty());
        assert_eq!(count_differences(&[1, 2, 3], &[1]), 2);
        assert_eq!(count_differences(&[1, 2], &[1, 2]), 0);
    }
}
