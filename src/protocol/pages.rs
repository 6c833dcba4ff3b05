//! Page batches: the data plane's frames.
//!
//! A batch body is `'P'`, a flags byte, the round (u32 BE), the entry count (u16 BE), the
//! number of full pages (u16 BE), then the raw bytes of the full pages, then one entry per page
//! (page index u64 BE, kind u8, xxh3 digest of the page u64 BE). The target checks each page
//! against its digest as it writes it (it hashes every page anyway, for verification), so a
//! corrupted frame is detected and refused, never applied. Pages are copied from guest memory straight into the frame
//! buffer while it is built, and written from the received buffer straight into guest memory,
//! so each page is copied once per side. Zero pages travel as an entry only.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{FrameError, MAX_FRAME_LEN, TAG_PAGES};
use crate::memory::{GuestMemory, MemoryError};
use xxhash_rust::xxh3::xxh3_64;

use crate::units::{PageIndex, PAGE_SIZE};

/// Pages per batch: 1 MiB of payload, large enough to amortise per-frame costs, small enough
/// that a post-copy pull never queues long behind a background batch.
pub const BATCH_PAGES: usize = 256;

const HEADER_LEN: usize = 1 + 1 + 4 + 2 + 2;
const ENTRY_LEN: usize = 17;
/// Bytes of the largest batch frame.
pub const FRAME_CAPACITY: usize = 4 + HEADER_LEN + BATCH_PAGES * (PAGE_SIZE + ENTRY_LEN);

/// Batch flag: pages sent after activation (post-copy push or pull); the target installs them
/// only where still missing.
pub const FLAG_POSTCOPY: u8 = 1;
/// Batch flag: pages pulled on demand.
pub const FLAG_PULLED: u8 = 2;

/// How a page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 4 KiB of bytes follow.
    Full,
    /// The page is all zeros; no bytes follow.
    Zero,
}

/// Builds one batch frame, reading pages from guest memory straight into the frame buffer.
#[derive(Debug)]
pub struct PageBatchBuilder {
    buf: BytesMut,
    entries: Vec<(u64, PageKind, u64)>,
    full: usize,
    flags: u8,
    round: u32,
}

impl PageBatchBuilder {
    /// An empty batch for `round` with `flags`.
    pub fn new(round: u32, flags: u8) -> Self {
        Self::with_buffer(BytesMut::new(), round, flags)
    }

    /// An empty batch built in `buf` (a recycled frame buffer; its contents are discarded).
    pub fn with_buffer(mut buf: BytesMut, round: u32, flags: u8) -> Self {
        buf.clear();
        buf.reserve(FRAME_CAPACITY);
        buf.put_bytes(0, 4 + HEADER_LEN);
        Self {
            buf,
            entries: Vec::with_capacity(BATCH_PAGES),
            full: 0,
            flags,
            round,
        }
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no page was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when the batch holds [`BATCH_PAGES`] pages.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= BATCH_PAGES
    }

    /// Copies page `index` from `memory` into the batch; returns its kind.
    pub fn add_from(&mut self, memory: &GuestMemory, index: u64) -> Result<PageKind, MemoryError> {
        let start = self.buf.len();
        memory.append_page(PageIndex(index), &mut self.buf)?;
        let (kind, digest) = if crate::memory::is_zero(&self.buf[start..]) {
            self.buf.truncate(start);
            (PageKind::Zero, zero_page_digest())
        } else {
            self.full += 1;
            (PageKind::Full, xxh3_64(&self.buf[start..]))
        };
        self.entries.push((index, kind, digest));
        Ok(kind)
    }

    /// Finishes the frame: length prefix, header, pages, entry table.
    pub fn finish(mut self) -> Bytes {
        for &(page, kind, digest) in &self.entries {
            self.buf.put_u64(page);
            self.buf.put_u8(match kind {
                PageKind::Full => 0,
                PageKind::Zero => 1,
            });
            self.buf.put_u64(digest);
        }
        let body_len = (self.buf.len() - 4) as u32;
        let mut head = &mut self.buf[..4 + HEADER_LEN];
        head.put_u32(body_len);
        head.put_u8(TAG_PAGES);
        head.put_u8(self.flags);
        head.put_u32(self.round);
        head.put_u16(self.entries.len() as u16);
        head.put_u16(self.full as u16);
        self.buf.freeze()
    }
}

/// A decoded batch; page bytes are slices of the received frame, not copies.
#[derive(Debug, Clone, PartialEq)]
pub struct PageBatch {
    /// Flags ([`FLAG_POSTCOPY`], [`FLAG_PULLED`]).
    pub flags: u8,
    /// Round the pages belong to.
    pub round: u32,
    entries: Vec<(u64, PageKind, u64)>,
    payload: Bytes,
}

impl PageBatch {
    /// Decodes a batch body (tag included), checking every count against the body length.
    pub fn decode(body: Bytes) -> Result<Self, FrameError> {
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: body.len(),
                limit: MAX_FRAME_LEN,
            });
        }
        if body.len() < HEADER_LEN {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                have: body.len(),
            });
        }
        if body[0] != TAG_PAGES {
            return Err(FrameError::UnknownTag { tag: body[0] });
        }
        let flags = body[1];
        let round = u32::from_be_bytes([body[2], body[3], body[4], body[5]]);
        let count = u16::from_be_bytes([body[6], body[7]]) as usize;
        let full = u16::from_be_bytes([body[8], body[9]]) as usize;
        if count > BATCH_PAGES || full > count {
            return Err(FrameError::Malformed(format!(
                "batch claims {count} pages ({full} full), limit {BATCH_PAGES}"
            )));
        }
        let needed = HEADER_LEN + full * PAGE_SIZE + count * ENTRY_LEN;
        if body.len() != needed {
            return Err(FrameError::Truncated {
                needed,
                have: body.len(),
            });
        }
        let table = &body[HEADER_LEN + full * PAGE_SIZE..];
        let mut entries = Vec::with_capacity(count);
        let mut seen_full = 0;
        for e in table.chunks_exact(ENTRY_LEN) {
            let mut idx = [0u8; 8];
            idx.copy_from_slice(&e[..8]);
            let mut digest = [0u8; 8];
            digest.copy_from_slice(&e[9..17]);
            let kind = match e[8] {
                0 => {
                    seen_full += 1;
                    PageKind::Full
                }
                1 => PageKind::Zero,
                k => return Err(FrameError::Malformed(format!("unknown page kind {k}"))),
            };
            entries.push((u64::from_be_bytes(idx), kind, u64::from_be_bytes(digest)));
        }
        if seen_full != full {
            return Err(FrameError::Malformed(format!(
                "batch header says {full} full pages, table has {seen_full}"
            )));
        }
        let payload = body.slice(HEADER_LEN..HEADER_LEN + full * PAGE_SIZE);
        Ok(Self {
            flags,
            round,
            entries,
            payload,
        })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the batch carries no page.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pages with their bytes (`None` for a zero page) and the digest the sender computed, in
    /// order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>, u64)> + '_ {
        let mut offset = 0;
        self.entries.iter().map(move |&(page, kind, digest)| match kind {
            PageKind::Zero => (page, None, digest),
            PageKind::Full => {
                let data = &self.payload[offset..offset + PAGE_SIZE];
                offset += PAGE_SIZE;
                (page, Some(data), digest)
            }
        })
    }
}

/// The digest of an all-zero page.
pub fn zero_page_digest() -> u64 {
    static DIGEST: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *DIGEST.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::frame_body;

    #[test]
    fn test_batch_round_trip_with_zero_pages() {
        let mem = GuestMemory::new(8 * PAGE_SIZE as u64).expect("map");
        mem.store_word(PageIndex(1), 0, 77).expect("store");
        mem.store_word(PageIndex(5), 10, 99).expect("store");
        let mut b = PageBatchBuilder::new(3, FLAG_POSTCOPY);
        for p in [0, 1, 5] {
            b.add_from(&mem, p).expect("add");
        }
        let frame = b.finish();
        assert_eq!(frame.len(), 4 + HEADER_LEN + 2 * PAGE_SIZE + 3 * ENTRY_LEN);
        let batch = PageBatch::decode(frame_body(&frame).expect("body")).expect("decode");
        assert_eq!((batch.round, batch.flags, batch.len()), (3, FLAG_POSTCOPY, 3));
        let pages: Vec<_> = batch.pages().collect();
        assert_eq!(pages[0], (0, None, zero_page_digest()));
        assert_eq!(pages[1].0, 1);
        assert_eq!(pages[1].2, xxh3_64(pages[1].1.expect("full")));
        assert_eq!(&pages[1].1.expect("full")[..8], &77u64.to_ne_bytes());
        assert_eq!(pages[2].0, 5);
    }

    #[test]
    fn test_lying_headers_are_rejected() {
        let mut body = vec![TAG_PAGES, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
        assert!(matches!(
            PageBatch::decode(Bytes::from(body.clone())),
            Err(FrameError::Malformed(_))
        ));
        body[6] = 0;
        body[7] = 2; // two entries promised, none present
        assert!(matches!(
            PageBatch::decode(Bytes::from(body)),
            Err(FrameError::Truncated { .. })
        ));
    }
}
