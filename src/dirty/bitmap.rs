//! A fixed-size bitmap of atomics: one bit per guest page.

use std::sync::atomic::{AtomicU64, Ordering};

use super::PageSet;

/// One bit per page, set by any thread without locks, drained by the tracker.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` clear bits.
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True if the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Sets bit `i`; out-of-range bits are ignored (a writer never addresses outside memory).
    pub fn set(&self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Sets bit `i` and returns whether it was already set: the claim of a page that several
    /// threads may race to install.
    pub fn test_and_set(&self, i: u64) -> bool {
        if i >= self.bits {
            return true;
        }
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit != 0
    }

    /// Clears bit `i`.
    pub fn clear(&self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::Release);
        }
    }

    /// Reads bit `i`.
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        for (wi, w) in self.words.iter().enumerate() {
            w.store(mask_for_word(wi as u64, self.bits), Ordering::Release);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Atomically takes and clears every set bit: the fetch-and-clear of one dirty-log round.
    pub fn drain(&self) -> PageSet {
        let words = self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect();
        PageSet::from_words(words, self.bits)
    }

    /// A copy of the current bits without clearing them.
    pub fn snapshot(&self) -> PageSet {
        let words = self.words.iter().map(|w| w.load(Ordering::Acquire)).collect();
        PageSet::from_words(words, self.bits)
    }

    /// Sets every bit that is set in `set`.
    pub fn set_from(&self, set: &PageSet) {
        for (w, &v) in self.words.iter().zip(set.words()) {
            if v != 0 {
                w.fetch_or(v, Ordering::Release);
            }
        }
    }
}

/// The valid bits of word `wi` of a bitmap of `bits` bits.
pub(crate) fn mask_for_word(wi: u64, bits: u64) -> u64 {
    let start = wi * 64;
    if start + 64 <= bits {
        u64::MAX
    } else if start >= bits {
        0
    } else {
        (1u64 << (bits - start)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_drain_takes_and_clears() {
        let b = AtomicBitmap::new(130);
        b.set(0);
        b.set(129);
        b.set(500); // ignored
        assert_eq!(b.count(), 2);
        let d = b.drain();
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![0, 129]);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn test_set_all_respects_length() {
        let b = AtomicBitmap::new(70);
        b.set_all();
        assert_eq!(b.count(), 70);
        b.clear(3);
        assert!(!b.get(3));
        assert!(b.get(69));
    }
}
