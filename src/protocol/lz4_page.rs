//! LZ4 block compression of one page.
//!
//! Pages are compressed one by one (no stream state across pages or batches), so each page
//! decodes on its own, batches may arrive in any order, and a bad page costs only itself.
//! Decompression writes into a buffer of exactly one page and must fill it exactly: a payload
//! that claims more cannot make the target allocate or write more.

use crate::units::PAGE_SIZE;

/// Bytes [`compress`] may need in its output buffer for one page (LZ4's worst case for
/// incompressible input is a little larger than the input).
pub const MAX_COMPRESSED_LEN: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// Why an LZ4 page does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lz4PageError {
    /// The payload is not a valid LZ4 block, or it would write past one page.
    #[error("not a valid LZ4 page: {detail}")]
    Malformed {
        /// The decompressor's words.
        detail: String,
    },
    /// The payload decompresses to less than one page.
    #[error("decompresses to {len} bytes, not {PAGE_SIZE}")]
    ShortPage {
        /// Bytes produced.
        len: usize,
    },
}

/// Compresses `page` into `out` (resized to fit); returns the compressed length, or `None` if
/// `page` is not one page long.
pub fn compress(page: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    if page.len() != PAGE_SIZE {
        return None;
    }
    out.resize(MAX_COMPRESSED_LEN, 0);
    // The output holds LZ4's worst case for this input, so this cannot fail; if a future
    // version disagreed, sending the page raw is always correct.
    let len = lz4_flex::block::compress_into(page, out).ok()?;
    out.truncate(len);
    Some(len)
}

/// Decompresses `input` into `page`, which it must fill exactly.
pub fn decompress(input: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), Lz4PageError> {
    match lz4_flex::block::decompress_into(input, page) {
        Ok(PAGE_SIZE) => Ok(()),
        Ok(len) => Err(Lz4PageError::ShortPage { len }),
        Err(e) => Err(Lz4PageError::Malformed { detail: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_compressible_page_round_trips_smaller() {
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i / 64) as u8; // runs of 64 equal bytes
        }
        let mut out = Vec::new();
        let len = compress(&page, &mut out).expect("a page");
        assert!(len < PAGE_SIZE / 4, "compressed to {len}");
        let mut back = [0u8; PAGE_SIZE];
        decompress(&out, &mut back).expect("decodes");
        assert_eq!(back, page);
    }

    #[test]
    fn test_random_page_does_not_shrink() {
        let mut rng = crate::memory::SplitMix64::new(9);
        let page: Vec<u8> = (0..PAGE_SIZE / 8).flat_map(|_| rng.next().to_le_bytes()).collect();
        let mut out = Vec::new();
        let len = compress(&page, &mut out).expect("a page");
        assert!(len >= PAGE_SIZE, "random data stays {len} bytes");
        assert_eq!(compress(&page[..10], &mut out), None);
    }

    #[test]
    fn test_short_and_oversized_outputs_are_rejected() {
        let mut out = Vec::new();
        compress(&[7u8; PAGE_SIZE], &mut out).expect("a page");
        let mut back = [0u8; PAGE_SIZE];
        // A valid block of a shorter input.
        let mut short = vec![0u8; MAX_COMPRESSED_LEN];
        let n = lz4_flex::block::compress_into(&[7u8; 100], &mut short).expect("compress");
        assert_eq!(
            decompress(&short[..n], &mut back),
            Err(Lz4PageError::ShortPage { len: 100 })
        );
        // A valid block of a longer input does not fit in one page.
        let mut long = vec![0u8; lz4_flex::block::get_maximum_output_size(2 * PAGE_SIZE)];
        let n = lz4_flex::block::compress_into(&[7u8; 2 * PAGE_SIZE], &mut long).expect("compress");
        assert!(matches!(
            decompress(&long[..n], &mut back),
            Err(Lz4PageError::Malformed { .. })
        ));
        assert!(matches!(
            decompress(&[], &mut back),
            Err(Lz4PageError::Malformed { .. }) | Err(Lz4PageError::ShortPage { len: 0 })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn test_arbitrary_input_never_panics(input in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut page = [0u8; PAGE_SIZE];
            let _ = decompress(&input, &mut page);
        }

        #[test]
        fn test_mutated_compressed_pages_never_panic(fill in any::<u8>(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let mut src = [fill; PAGE_SIZE];
            src[100] = fill.wrapping_add(1);
            let mut out = Vec::new();
            compress(&src, &mut out).expect("a page");
            for (at, x) in flips {
                let len = out.len();
                out[at % len] ^= x;
            }
            let mut page = [0u8; PAGE_SIZE];
            if decompress(&out, &mut page).is_ok() {
                prop_assert_eq!(page.len(), PAGE_SIZE);
            }
        }
    }
}
