//! The source's cache of page contents as the target holds them, the base of XBZRLE deltas.
//!
//! Direct-mapped, as QEMU's: page `p` may live only in slot `p % slots`, so a lookup is one
//! compare and the memory is one flat allocation fixed at creation. The cache never holds more
//! slots than the guest has pages, so a small guest costs no more than its own size.
//!
//! Which page keeps a contested slot: round 0 sends every page once and most are never sent
//! again, so a round-0 page only fills an empty slot (it also spares copying all of memory into
//! the cache). A page sent again has shown it gets dirtied, the only kind a delta can help, so
//! it always takes its slot, displacing whatever was there.
//!
//! Consistency is the caller's duty: an entry must always equal what the target holds for that
//! page (see `SourceEncoder`).

use crate::units::PAGE_SIZE;

const EMPTY: u64 = u64::MAX;

/// A bounded, direct-mapped cache of page contents.
pub struct XbzrleCache {
    /// Page held by each slot, or [`EMPTY`].
    tags: Vec<u64>,
    /// Whether the slot's page was inserted by a re-send (it wins contested slots).
    resent: Vec<bool>,
    /// `tags.len()` pages of content.
    data: Vec<u8>,
}

impl std::fmt::Debug for XbzrleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XbzrleCache").field("slots", &self.tags.len()).finish()
    }
}

impl XbzrleCache {
    /// A cache of at most `bytes` of content for a guest of `guest_pages` pages.
    pub fn new(bytes: u64, guest_pages: u64) -> Self {
        let slots = (bytes / PAGE_SIZE as u64).min(guest_pages) as usize;
        Self {
            tags: vec![EMPTY; slots],
            resent: vec![false; slots],
            // Zeroed allocations of this size come straight from the kernel: slots never used
            // cost no memory.
            data: vec![0u8; slots * PAGE_SIZE],
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.tags.len()
    }

    /// Bytes of content the cache may hold.
    pub fn capacity_bytes(&self) -> usize {
        self.data.len()
    }

    fn slot(&self, page: u64) -> Option<usize> {
        match self.tags.len() {
            0 => None,
            n => Some((page % n as u64) as usize),
        }
    }

    /// The cached content of `page`, if the cache holds it.
    pub fn get(&self, page: u64) -> Option<&[u8]> {
        let s = self.slot(page)?;
        (self.tags[s] == page).then(|| &self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE])
    }

    /// Records that the target now holds `content` for `page` (`None`: all zeros). `resent`
    /// says the page was sent before: it then takes its slot; a first send only fills an empty
    /// one. Either way a stale entry of `page` never survives.
    pub fn record(&mut self, page: u64, content: Option<&[u8]>, resent: bool) {
        let Some(s) = self.slot(page) else { return };
        let mine = self.tags[s] == page;
        if !(mine || resent || self.tags[s] == EMPTY) {
            return;
        }
        let dst = &mut self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE];
        match content {
            Some(c) if c.len() == PAGE_SIZE => dst.copy_from_slice(c),
            None => dst.fill(0),
            Some(_) => {
                // Not a page: forget rather than keep something the target does not hold.
                self.tags[s] = EMPTY;
                self.resent[s] = false;
                return;
            }
        }
        self.tags[s] = page;
        self.resent[s] = (self.resent[s] && mine) || resent;
    }

    /// Drops every entry (the target's copy can no longer be vouched for).
    pub fn clear(&mut self) {
        self.tags.fill(EMPTY);
        self.resent.fill(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn test_bound_and_slots() {
        let c = XbzrleCache::new(10 * PAGE_SIZE as u64 + 100, 1000);
        assert_eq!((c.slots(), c.capacity_bytes()), (10, 10 * PAGE_SIZE));
        // Never more slots than the guest has pages.
        let c = XbzrleCache::new(64 << 20, 3);
        assert_eq!(c.slots(), 3);
        let mut none = XbzrleCache::new(100, 1000);
        none.record(1, Some(&page(1)), true);
        assert_eq!(none.get(1), None, "a cache of no slots holds nothing");
    }

    #[test]
    fn test_first_sends_fill_only_empty_slots_and_resends_win() {
        let mut c = XbzrleCache::new(4 * PAGE_SIZE as u64, 100);
        c.record(1, Some(&page(1)), false);
        c.record(5, Some(&page(5)), false); // same slot as 1: kept out
        assert_eq!(c.get(1), Some(&page(1)[..]));
        assert_eq!(c.get(5), None);
        c.record(5, Some(&page(55)), true); // a re-send takes the slot
        assert_eq!(c.get(5), Some(&page(55)[..]));
        assert_eq!(c.get(1), None);
        c.record(9, Some(&page(9)), false); // a first send does not displace a re-sent page
        assert_eq!(c.get(5), Some(&page(55)[..]));
        // The owner always updates its own entry, zero pages included.
        c.record(5, None, false);
        assert_eq!(c.get(5), Some(&page(0)[..]));
        c.record(5, Some(&page(7)[..10]), true);
        assert_eq!(c.get(5), None, "a bad length forgets the page");
        c.record(2, Some(&page(2)), true);
        c.clear();
        assert_eq!(c.get(2), None);
    }
}
