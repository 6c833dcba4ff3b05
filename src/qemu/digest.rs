//! One digest of a guest's RAM as it stood at a switchover with QEMU, computed the same way on
//! both sides: by the engine from the pages it landed ([`crate::engine::qemu::incoming`]) and
//! by a checker from the paused QEMU source's memory (QMP `pmemsave`). Equal digests mean every
//! page arrived as the source had it: a byte flipped on the way is caught and its page named.
//!
//! The legacy hole 0xa0000..0x100000 is left out: on a `pc` machine QEMU maps VGA and ROM over
//! that part of `pc.ram`, so `pmemsave` reads those instead of the RAM the stream carried.

use std::ops::Range;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Guest-physical bytes that are not compared.
pub const LEGACY_HOLE: Range<u64> = 0xa_0000..0x10_0000;

/// Bytes per page.
pub const PAGE_BYTES: usize = 4096;

/// The digest of one page's content.
pub fn page_digest(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// The digest of an all-zero page (a page QEMU sent as a zero record, or never sent).
pub fn zero_page_digest() -> u64 {
    page_digest(&[0u8; PAGE_BYTES])
}

/// True when page `index` is compared.
pub fn compared(index: u64) -> bool {
    let at = index * PAGE_BYTES as u64;
    !(LEGACY_HOLE.start..LEGACY_HOLE.end).contains(&at)
}

/// Per-page digests of a RAM, in page order, and their combination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamDigest {
    pages: Vec<u64>,
}

impl RamDigest {
    /// A RAM of `pages` zero pages.
    pub fn zeroed(pages: u64) -> Self {
        Self {
            pages: vec![zero_page_digest(); pages as usize],
        }
    }

    /// Records page `index`'s content; an index outside the RAM is ignored (the caller has
    /// checked it against the RAM's size already).
    pub fn set(&mut self, index: u64, page: &[u8]) {
        if let Some(d) = self.pages.get_mut(index as usize) {
            *d = page_digest(page);
        }
    }

    /// Records page `index` as an all-`byte` page.
    pub fn set_fill(&mut self, index: u64, byte: u8) {
        self.set(index, &[byte; PAGE_BYTES]);
    }

    /// The pages whose digests differ from `other`'s (compared pages only), at most `limit`.
    pub fn differing(&self, other: &RamDigest, limit: usize) -> Vec<u64> {
        (0..self.pages.len().min(other.pages.len()) as u64)
            .filter(|&i| compared(i) && self.pages[i as usize] != other.pages[i as usize])
            .take(limit)
            .collect()
    }

    /// Pages recorded.
    pub fn len(&self) -> u64 {
        self.pages.len() as u64
    }

    /// True for a RAM of no pages.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// One number for the whole RAM (compared pages only).
    pub fn combined(&self) -> u64 {
        let mut h = Xxh3::new();
        for (i, d) in self.pages.iter().enumerate() {
            if compared(i as u64) {
                h.update(&d.to_le_bytes());
            }
        }
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_flipped_byte_changes_the_digest_and_names_its_page() {
        let mut a = RamDigest::zeroed(512);
        let mut page = [7u8; PAGE_BYTES];
        a.set(300, &page);
        let mut b = a.clone();
        assert_eq!(a.combined(), b.combined());
        page[17] ^= 0x20;
        b.set(300, &page);
        assert_ne!(a.combined(), b.combined());
        assert_eq!(a.differing(&b, 10), vec![300]);
    }

    #[test]
    fn test_pages_in_the_legacy_hole_are_not_compared() {
        let a = RamDigest::zeroed(512);
        let mut b = a.clone();
        b.set_fill(0xa0, 0xff);
        assert_eq!(a.combined(), b.combined());
        assert!(a.differing(&b, 10).is_empty());
        b.set_fill(0x9f, 1);
        assert_eq!(a.differing(&b, 10), vec![0x9f]);
    }
}
