//! The source's choice, page by page, of how a page travels when compression is negotiated.
//!
//! Order of preference for a non-zero page: an XBZRLE delta if the page's previous content is
//! cached and the delta is small, else an LZ4 block if it is small, else the raw page. Either
//! encoding must save at least [`MIN_SAVING`] bytes: below that the target's decoding work and
//! the cache churn buy too little.
//!
//! **Cache consistency.** A delta is applied by the target to the copy of the page it holds,
//! so every cache entry must equal that copy exactly. It does because:
//! - an entry is written only from the bytes that go into the frame (never re-read from guest
//!   memory, which the guest may have changed since), and every page the plane sends while the
//!   cache lives goes through [`SourceEncoder`], zero pages included, so no send bypasses it;
//! - the target applies every pre-copy page it receives, in the order sent: deltas are used
//!   only on a data path that keeps order (one stream; the plane checks), so a later round's
//!   delta never overtakes the page it is based on;
//! - a batch that may not have gone out (any error in a job) clears the whole cache, and a new
//!   plane (post-copy recovery) starts with none;
//! - post-copy drops the cache before its first page: from activation the target's guest
//!   writes its own pages, so no base is known any more (the target refuses deltas there too).
//!
//! If the reasoning ever failed, the target would see a digest mismatch after applying and
//! refuse the page: a failed migration, never a wrong page.

use super::xbzrle_cache::XbzrleCache;
use crate::protocol::pages::{PageEncoder, ENCODED_LEN_PREFIX_BYTES};
use crate::protocol::{lz4_page, xbzrle, PageCodecs, PageKind};
use crate::units::PAGE_SIZE;

/// Least saving, in bytes, for which a page travels encoded rather than raw.
pub const MIN_SAVING: usize = PAGE_SIZE / 8;
/// Longest encoding sent.
const LIMIT: usize = PAGE_SIZE - ENCODED_LEN_PREFIX_BYTES - MIN_SAVING;

/// What the encoder did, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages sent as LZ4 blocks.
    pub lz4_pages: u64,
    /// Pages sent as XBZRLE deltas.
    pub delta_pages: u64,
    /// Re-sent pages whose previous content was not cached.
    pub delta_misses: u64,
    /// Cached re-sent pages whose delta was too large to pay.
    pub delta_overflows: u64,
    /// Page bytes not put on the link: page size minus the encoding, summed.
    pub bytes_saved: u64,
}

impl EncodeStats {
    /// The sum of two tallies.
    pub fn plus(self, o: EncodeStats) -> EncodeStats {
        EncodeStats {
            lz4_pages: self.lz4_pages + o.lz4_pages,
            delta_pages: self.delta_pages + o.delta_pages,
            delta_misses: self.delta_misses + o.delta_misses,
            delta_overflows: self.delta_overflows + o.delta_overflows,
            bytes_saved: self.bytes_saved + o.bytes_saved,
        }
    }

    /// What was added since `earlier`, a snapshot of the same tally.
    pub fn since(self, earlier: EncodeStats) -> EncodeStats {
        EncodeStats {
            lz4_pages: self.lz4_pages - earlier.lz4_pages,
            delta_pages: self.delta_pages - earlier.delta_pages,
            delta_misses: self.delta_misses - earlier.delta_misses,
            delta_overflows: self.delta_overflows - earlier.delta_overflows,
            bytes_saved: self.bytes_saved - earlier.bytes_saved,
        }
    }
}

/// The source plane's [`PageEncoder`]: the policy above, the XBZRLE cache, and the tally.
#[derive(Debug)]
pub(crate) struct SourceEncoder {
    lz4: bool,
    cache: Option<XbzrleCache>,
    resending: bool,
    stats: EncodeStats,
}

impl SourceEncoder {
    /// An encoder using `codecs`, with an XBZRLE cache of at most `cache_bytes` for a guest of
    /// `guest_pages` pages when deltas are on.
    pub fn new(codecs: PageCodecs, cache_bytes: u64, guest_pages: u64) -> Self {
        Self {
            lz4: codecs.lz4,
            cache: codecs.xbzrle.then(|| XbzrleCache::new(cache_bytes, guest_pages)),
            resending: false,
            stats: EncodeStats::default(),
        }
    }

    /// The tally so far.
    pub fn stats(&self) -> EncodeStats {
        self.stats
    }

    /// A pre-copy round (or the stop-and-copy pass) begins: from round 1 on pages are re-sent.
    pub fn begin_round(&mut self, round: u32) {
        self.resending = round > 0;
    }

    /// Post-copy begins: the target's guest now writes its own pages, so no cached base can be
    /// vouched for; the cache and its memory go.
    pub fn end_deltas(&mut self) {
        self.cache = None;
    }

    /// A job failed and some of its batches may not have reached the target.
    pub fn forget(&mut self) {
        if let Some(c) = self.cache.as_mut() {
            c.clear();
        }
    }
}

impl PageEncoder for SourceEncoder {
    fn encode(&mut self, page: u64, raw: &[u8], out: &mut Vec<u8>) -> PageKind {
        if let Some(cache) = self.cache.as_mut() {
            match cache.get(page) {
                Some(old) => {
                    let delta = xbzrle::encode(old, raw, out, LIMIT);
                    // The target holds `raw` after this page, whichever way it travels.
                    cache.record(page, Some(raw), true);
                    if let Some(len) = delta {
                        self.stats.delta_pages += 1;
                        self.stats.bytes_saved += (PAGE_SIZE - ENCODED_LEN_PREFIX_BYTES - len) as u64;
                        return PageKind::Delta;
                    }
                    self.stats.delta_overflows += 1;
                }
                None => {
                    if self.resending {
                        self.stats.delta_misses += 1;
                    }
                    cache.record(page, Some(raw), self.resending);
                }
            }
        }
        if self.lz4 {
            if let Some(len) = lz4_page::compress(raw, out).filter(|&n| n <= LIMIT) {
                self.stats.lz4_pages += 1;
                self.stats.bytes_saved += (PAGE_SIZE - ENCODED_LEN_PREFIX_BYTES - len) as u64;
                return PageKind::Lz4;
            }
        }
        PageKind::Full
    }

    fn zero(&mut self, page: u64) {
        if let Some(cache) = self.cache.as_mut() {
            cache.record(page, None, self.resending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;
    use crate::protocol::frame::frame_body;
    use crate::protocol::pages::PageBatchBuilder;
    use crate::protocol::{PageBatch, PagePayload};
    use crate::units::PageIndex;

    const BOTH: PageCodecs = PageCodecs {
        lz4: true,
        xbzrle: true,
    };

    /// Builds a batch of `pages` with `enc`, then applies it to `target` as the target plane
    /// would; returns the kinds that travelled.
    fn send(
        enc: &mut SourceEncoder,
        source: &GuestMemory,
        target: &GuestMemory,
        round: u32,
        pages: &[u64],
    ) -> Vec<PageKind> {
        enc.begin_round(round);
        let mut b = PageBatchBuilder::new(round, 0);
        for &p in pages {
            b.add_encoded(source, p, enc).expect("add");
        }
        let frame = b.finish();
        let batch = PageBatch::decode(frame_body(&frame).expect("body")).expect("decode");
        let mut kinds = Vec::new();
        for (page, payload, digest) in batch.entries() {
            let mut buf = [0u8; PAGE_SIZE];
            kinds.push(payload.kind());
            match payload {
                PagePayload::Zero => {}
                PagePayload::Raw(b) => buf.copy_from_slice(b),
                PagePayload::Lz4(b) => lz4_page::decompress(b, &mut buf).expect("lz4"),
                PagePayload::Delta(d) => {
                    target.read_page(PageIndex(page), &mut buf).expect("base");
                    xbzrle::decode(d, &mut buf).expect("delta");
                }
            }
            assert_eq!(xxhash_rust::xxh3::xxh3_64(&buf), digest, "page {page}");
            target.write_page(PageIndex(page), &buf).expect("write");
        }
        kinds
    }

    #[test]
    fn test_resent_pages_travel_as_deltas_and_stay_consistent() {
        let source = GuestMemory::new(8 * PAGE_SIZE as u64).expect("map");
        source.fill_pseudo_random(3, 0.0).expect("fill");
        source.zero_page(PageIndex(7)).expect("zero");
        let target = GuestMemory::new(8 * PAGE_SIZE as u64).expect("map");
        let mut enc = SourceEncoder::new(BOTH, 64 << 20, 8);
        let all: Vec<u64> = (0..8).collect();
        let kinds = send(&mut enc, &source, &target, 0, &all);
        assert!(
            kinds[..7].iter().all(|k| *k == PageKind::Full),
            "random pages go raw: {kinds:?}"
        );
        // Round 1: one word changed in page 2, page 7 gains a word, page 4 is rewritten whole.
        source.store_word(PageIndex(2), 17, 0xfeed).expect("store");
        source.store_word(PageIndex(7), 3, 0xbeef).expect("store");
        source.write_page(PageIndex(4), &[0x44; PAGE_SIZE]).expect("write");
        let kinds = send(&mut enc, &source, &target, 1, &[2, 4, 7]);
        assert_eq!(kinds, [PageKind::Delta, PageKind::Lz4, PageKind::Delta]);
        // Round 2 against what round 1 sent, not against round 0.
        source.store_word(PageIndex(2), 18, 0xf00d).expect("store");
        source.store_word(PageIndex(4), 0, 1).expect("store");
        assert_eq!(
            send(&mut enc, &source, &target, 2, &[2, 4]),
            [PageKind::Delta, PageKind::Delta]
        );
        let s = enc.stats();
        assert_eq!((s.delta_pages, s.lz4_pages, s.delta_misses), (4, 1, 0));
        assert!(s.bytes_saved > 4 * (PAGE_SIZE as u64 - 64));
        for p in 0..8 {
            assert_eq!(
                source.page_digest(PageIndex(p)).ok(),
                target.page_digest(PageIndex(p)).ok()
            );
        }
        // After a failed job nothing is trusted: the next re-send goes whole.
        enc.forget();
        source.store_word(PageIndex(2), 19, 5).expect("store");
        assert_eq!(send(&mut enc, &source, &target, 3, &[2]), [PageKind::Full]);
        assert_eq!(enc.stats().delta_misses, 1);
        enc.end_deltas();
        source.store_word(PageIndex(2), 20, 6).expect("store");
        assert_eq!(send(&mut enc, &source, &target, 4, &[2]), [PageKind::Full]);
    }

    #[test]
    fn test_large_changes_fall_back_and_misses_are_counted() {
        let source = GuestMemory::new(4 * PAGE_SIZE as u64).expect("map");
        source.fill_pseudo_random(4, 0.0).expect("fill");
        let target = GuestMemory::new(4 * PAGE_SIZE as u64).expect("map");
        // Two slots for four pages: pages 2 and 3 share slots with 0 and 1.
        let deltas_only = PageCodecs {
            lz4: false,
            xbzrle: true,
        };
        let mut enc = SourceEncoder::new(deltas_only, 2 * PAGE_SIZE as u64, 4);
        send(&mut enc, &source, &target, 0, &[0, 1, 2, 3]);
        let other = GuestMemory::new(4 * PAGE_SIZE as u64).expect("map");
        other.fill_pseudo_random(5, 0.0).expect("fill");
        let mut fresh = [0u8; PAGE_SIZE];
        other.read_page(PageIndex(0), &mut fresh).expect("read");
        source.write_page(PageIndex(0), &fresh).expect("rewrite page 0 whole");
        source.store_word(PageIndex(3), 1, 9).expect("store");
        assert_eq!(
            send(&mut enc, &source, &target, 1, &[0, 3]),
            [PageKind::Full, PageKind::Full]
        );
        let s = enc.stats();
        assert_eq!((s.delta_overflows, s.delta_misses, s.delta_pages), (1, 1, 0));
        // Page 3 took its slot on the re-send, so its next change is a delta.
        source.store_word(PageIndex(3), 2, 10).expect("store");
        assert_eq!(send(&mut enc, &source, &target, 2, &[3]), [PageKind::Delta]);
    }

    /// A page whose first `random` bytes are random and the rest one repeated byte.
    fn partly_random(random: usize) -> [u8; PAGE_SIZE] {
        let mut page = [3u8; PAGE_SIZE];
        let mut rng = crate::memory::SplitMix64::new(1);
        for c in page[..random].chunks_mut(8) {
            let n = c.len();
            c.copy_from_slice(&rng.next().to_le_bytes()[..n]);
        }
        page
    }

    #[test]
    fn test_lz4_alone_needs_a_useful_saving() {
        let source = GuestMemory::new(2 * PAGE_SIZE as u64).expect("map");
        let target = GuestMemory::new(2 * PAGE_SIZE as u64).expect("map");
        let lz4 = PageCodecs {
            lz4: true,
            xbzrle: false,
        };
        let mut enc = SourceEncoder::new(lz4, 64 << 20, 2);
        // Half a run saves about half a page, well over the margin; a run of a few hundred
        // bytes saves less than it.
        source
            .write_page(PageIndex(0), &partly_random(PAGE_SIZE / 2))
            .expect("write");
        source
            .write_page(PageIndex(1), &partly_random(PAGE_SIZE - MIN_SAVING + 100))
            .expect("write");
        assert_eq!(
            send(&mut enc, &source, &target, 0, &[0, 1]),
            [PageKind::Lz4, PageKind::Full]
        );
        assert_eq!(enc.stats().lz4_pages, 1);
    }
}
