//! Verification: per-page digests of the source at pause against the target's as received.

use xxhash_rust::xxh3::xxh3_64;

use crate::units::{PageIndex, PAGE_SIZE};
use crate::vmm::Guest;

/// Digest of every page of `guest`'s memory (bulk work: call off the actor thread).
pub fn digests(guest: &dyn Guest) -> Vec<u64> {
    let memory = guest.memory();
    // A page that cannot be read gets a digest no real page has, so it shows as a mismatch.
    let unreadable = !xxh3_64(&[0u8; PAGE_SIZE]);
    (0..memory.page_count())
        .map(|p| memory.page_digest(PageIndex(p)).unwrap_or(unreadable))
        .collect()
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
    }
}
