//! XBZRLE-style page deltas: a re-sent page as the runs of bytes that changed since the copy
//! the target already holds.
//!
//! A guest that re-dirties a page often changes a few words of it (a counter, a list link, a
//! timestamp), yet pre-copy sends the whole 4 KiB again. When the source still has the content
//! it sent last time (its cache, in `dataplane`), it can send only what differs, as QEMU's
//! XBZRLE does. The encoding is a sequence of runs, each
//!
//! ```text
//! skip: varint   bytes left unchanged since the previous run's end
//! len:  varint   changed bytes that follow (at least 1)
//! bytes[len]     the new content of those bytes
//! ```
//!
//! and the bytes after the last run are unchanged. Varints are LEB128, at most two bytes (a
//! page offset fits in 14 bits). The new bytes travel rather than their XOR with the old: the
//! size is the same and applying a run is a plain copy.
//!
//! A delta is only meaningful against exactly the base it was computed from. The decoder
//! cannot tell a wrong base from a right one; the page digest, checked after applying, does.

use crate::units::PAGE_SIZE;

/// Largest value a two-byte varint holds.
const VARINT_MAX: usize = (1 << 14) - 1;

/// Why a delta does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleError {
    /// The delta ends inside a run header or its bytes.
    #[error("delta truncated at byte {at}")]
    Truncated {
        /// Offset in the delta where more bytes were needed.
        at: usize,
    },
    /// A varint longer than two bytes.
    #[error("varint at byte {at} is longer than two bytes")]
    VarintTooLong {
        /// Offset of the varint in the delta.
        at: usize,
    },
    /// A run that changes no byte.
    #[error("empty run at byte {at}")]
    EmptyRun {
        /// Offset of the run header in the delta.
        at: usize,
    },
    /// A run that reaches past the end of the page.
    #[error("run ends at page offset {end}, past the page of {page_len} bytes")]
    PastPage {
        /// Page offset where the run would end.
        end: usize,
        /// Size of the page.
        page_len: usize,
    },
    /// The page to apply the delta to is not one page long.
    #[error("page of {len} bytes, expected {PAGE_SIZE}")]
    PageSize {
        /// Its length.
        len: usize,
    },
}

/// Encodes `new` as a delta against `old` into `out` (cleared first). Returns `None` as soon as
/// the delta would exceed `limit` bytes, or if the pages are not both one page long: the
/// caller then sends the page whole.
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    out.clear();
    if old.len() != PAGE_SIZE || new.len() != PAGE_SIZE {
        return None;
    }
    let n = new.len();
    let mut last_end = 0;
    let mut at = 0;
    while let Some(start) = next_difference(old, new, at) {
        let mut end = start + 1;
        while end < n {
            if old[end] != new[end] {
                end += 1;
            } else if end + 1 < n && old[end + 1] != new[end + 1] {
                // One unchanged byte costs one byte inside the run and two (a new header) to
                // skip; it stays in the run.
                end += 2;
            } else {
                break;
            }
        }
        put_varint(out, start - last_end);
        put_varint(out, end - start);
        if out.len() + (end - start) > limit {
            return None;
        }
        out.extend_from_slice(&new[start..end]);
        last_end = end;
        at = end;
    }
    Some(out.len())
}

/// Applies `delta` to `page` in place. On error `page` may be partly changed; callers apply to
/// a scratch copy and write guest memory only after the digest matched.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    if page.len() != PAGE_SIZE {
        return Err(XbzrleError::PageSize { len: page.len() });
    }
    let mut at = 0;
    let mut pos = 0usize;
    while at < delta.len() {
        let header = at;
        let skip = get_varint(delta, &mut at)?;
        let len = get_varint(delta, &mut at)?;
        if len == 0 {
            return Err(XbzrleError::EmptyRun { at: header });
        }
        // Both are below 2^14, so neither sum can overflow.
        let start = pos + skip;
        let end = start + len;
        if end > page.len() {
            return Err(XbzrleError::PastPage {
                end,
                page_len: page.len(),
            });
        }
        let bytes = delta
            .get(at..at + len)
            .ok_or(XbzrleError::Truncated { at: delta.len() })?;
        page[start..end].copy_from_slice(bytes);
        at += len;
        pos = end;
    }
    Ok(())
}

/// The offset of the first byte at or after `from` where the pages differ, comparing a word at
/// a time where it can.
fn next_difference(old: &[u8], new: &[u8], from: usize) -> Option<usize> {
    let n = old.len().min(new.len());
    let mut i = from;
    while i < n && i % 8 != 0 {
        if old[i] != new[i] {
            return Some(i);
        }
        i += 1;
    }
    while i + 8 <= n {
        let a = u64::from_le_bytes(old[i..i + 8].try_into().ok()?);
        let b = u64::from_le_bytes(new[i..i + 8].try_into().ok()?);
        let x = a ^ b;
        if x != 0 {
            // Little-endian: the lowest set byte is the first in memory.
            return Some(i + (x.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    (i..n).find(|&j| old[j] != new[j])
}

fn put_varint(out: &mut Vec<u8>, v: usize) {
    debug_assert!(v <= VARINT_MAX);
    if v < 0x80 {
        out.push(v as u8);
    } else {
        out.push((v & 0x7f) as u8 | 0x80);
        out.push((v >> 7) as u8);
    }
}

fn get_varint(delta: &[u8], at: &mut usize) -> Result<usize, XbzrleError> {
    let start = *at;
    let first = *delta.get(start).ok_or(XbzrleError::Truncated { at: start })?;
    if first & 0x80 == 0 {
        *at = start + 1;
        return Ok(first as usize);
    }
    let second = *delta.get(start + 1).ok_or(XbzrleError::Truncated { at: start + 1 })?;
    if second & 0x80 != 0 {
        return Err(XbzrleError::VarintTooLong { at: start });
    }
    *at = start + 2;
    Ok((first & 0x7f) as usize | (second as usize) << 7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(seed: u64) -> Vec<u8> {
        let mut rng = crate::memory::SplitMix64::new(seed);
        (0..PAGE_SIZE / 8).flat_map(|_| rng.next().to_le_bytes()).collect()
    }

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut delta = Vec::new();
        let len = encode(old, new, &mut delta, PAGE_SIZE).expect("fits in a page");
        assert_eq!(len, delta.len());
        let mut applied = old.to_vec();
        decode(&delta, &mut applied).expect("applies");
        assert_eq!(applied, new);
        len
    }

    #[test]
    fn test_one_changed_word_is_a_few_bytes() {
        let old = page(1);
        let mut new = old.clone();
        new[808..816].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        // skip 808 (two bytes), len 8 (one byte), 8 bytes.
        assert!(round_trip(&old, &new) <= 11);
    }

    #[test]
    fn test_identical_pages_give_an_empty_delta() {
        let old = page(2);
        assert_eq!(round_trip(&old, &old), 0);
    }

    #[test]
    fn test_changes_at_both_ends_and_single_byte_gaps() {
        let old = page(3);
        let mut new = old.clone();
        new[0] ^= 1;
        new[2] ^= 1; // one unchanged byte between: kept inside one run
        new[PAGE_SIZE - 1] ^= 0xff;
        let len = round_trip(&old, &new);
        assert_eq!(len, 2 + 3 + 3 + 1, "two runs: [0..3) and the last byte");
    }

    #[test]
    fn test_limit_gives_up_early() {
        let old = page(4);
        let new = page(5);
        let mut delta = Vec::new();
        assert_eq!(encode(&old, &new, &mut delta, PAGE_SIZE / 2), None);
        assert!(delta.len() <= PAGE_SIZE / 2 + 4, "stops near the limit");
        assert_eq!(encode(&old, &new[..100], &mut delta, PAGE_SIZE), None);
    }

    #[test]
    fn test_malformed_deltas_are_rejected() {
        let mut p = page(6);
        let cases: [(&[u8], XbzrleError); 5] = [
            (&[0x80], XbzrleError::Truncated { at: 1 }),
            (&[0x80, 0x80, 0x01], XbzrleError::VarintTooLong { at: 0 }),
            (&[3, 0], XbzrleError::EmptyRun { at: 0 }),
            (&[5, 4, 1, 2], XbzrleError::Truncated { at: 4 }),
            (
                &[0xff, 0x1f, 0x02, 1, 2],
                XbzrleError::PastPage {
                    end: 4097,
                    page_len: PAGE_SIZE,
                },
            ),
        ];
        for (delta, want) in cases {
            assert_eq!(decode(delta, &mut p), Err(want), "{delta:?}");
        }
        assert_eq!(decode(&[], &mut p[..10]), Err(XbzrleError::PageSize { len: 10 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn test_random_edits_round_trip(seed in any::<u64>(), edits in prop::collection::vec((0..PAGE_SIZE, any::<u8>(), 1usize..64), 0..40)) {
            let old = page(seed);
            let mut new = old.clone();
            for (at, v, len) in edits {
                let end = (at + len).min(PAGE_SIZE);
                for b in &mut new[at..end] {
                    *b = b.wrapping_add(v);
                }
            }
            let mut delta = Vec::new();
            let got = encode(&old, &new, &mut delta, PAGE_SIZE * 2);
            prop_assert!(got.is_some());
            let mut applied = old.clone();
            prop_assert_eq!(decode(&delta, &mut applied), Ok(()));
            prop_assert_eq!(applied, new);
        }

        #[test]
        fn test_arbitrary_bytes_never_panic_nor_write_outside(seed in any::<u64>(), delta in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut p = page(seed);
            let _ = decode(&delta, &mut p);
            prop_assert_eq!(p.len(), PAGE_SIZE);
        }
    }
}
