//! An owned set of page indices, stored as a bitmap.

use super::bitmap::mask_for_word;

/// A set of pages: the result of draining a dirty bitmap, or the pages still missing on a
/// post-copy target. Iterates in ascending page order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    bits: u64,
}

impl PageSet {
    /// An empty set over `bits` pages.
    pub fn empty(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    /// The set of all `bits` pages.
    pub fn full(bits: u64) -> Self {
        let words = (0..bits.div_ceil(64)).map(|wi| mask_for_word(wi, bits)).collect();
        Self { words, bits }
    }

    /// Builds a set from raw words, masking bits beyond `bits`.
    pub fn from_words(mut words: Vec<u64>, bits: u64) -> Self {
        words.resize(bits.div_ceil(64) as usize, 0);
        for (wi, w) in words.iter_mut().enumerate() {
            *w &= mask_for_word(wi as u64, bits);
        }
        Self { words, bits }
    }

    /// Raw words, 64 pages each.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of pages the set ranges over.
    pub fn universe(&self) -> u64 {
        self.bits
    }

    /// Adds page `i`.
    pub fn insert(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Removes page `i`.
    pub fn remove(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// True if page `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True if no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + bit)
            })
        })
    }

    /// Little-endian bytes of the bitmap, for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Rebuilds a set of `bits` pages from [`PageSet::to_bytes`]; `None` if the length is wrong.
    pub fn from_bytes(bytes: &[u8], bits: u64) -> Option<Self> {
        if bytes.len() as u64 != bits.div_ceil(64) * 8 {
            return None;
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
        Some(Self::from_words(words, bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bytes_round_trip_and_masking() {
        let mut s = PageSet::empty(100);
        s.insert(3);
        s.insert(99);
        let b = s.to_bytes();
        assert_eq!(PageSet::from_bytes(&b, 100), Some(s.clone()));
        assert_eq!(PageSet::from_bytes(&b[1..], 100), None);
        assert_eq!(PageSet::full(100).len(), 100);
        assert_eq!(PageSet::from_words(vec![u64::MAX; 2], 100).len(), 100);
    }
}
