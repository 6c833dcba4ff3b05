//! Page batches: the data plane's frames.
//!
//! A batch body is `'P'`, a flags byte, the round (u32 BE), the entry count (u16 BE), the
//! number of raw full pages (u16 BE), then the payload, then one entry per page (page index
//! u64 BE, kind u8, xxh3 digest of the page u64 BE). The payload holds one item per entry that
//! carries bytes, in table order: a raw page is its 4096 bytes; an encoded page (LZ4, or an
//! XBZRLE delta, see [`PageKind`]) is a u16 BE length and that many bytes, always less than a
//! page. The table's place is fixed by the count, so the payload is whatever lies between; the
//! decoder walks the table and requires it to account for every payload byte. A batch without
//! encoded pages is byte for byte what a peer that never negotiated compression sends and
//! expects, so encoded kinds appear only on links where both ends offered them.
//!
//! The digest is always that of the page as it is in guest memory, never of its encoding: the
//! target checks it after decoding (it hashes every page anyway, for verification), so a
//! corrupted frame or a delta applied to the wrong base is detected and refused, never
//! applied. Pages are copied from guest memory straight into the frame buffer while it is
//! built, and written from the received buffer straight into guest memory, so a raw page is
//! copied once per side. Zero pages travel as an entry only.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{FrameError, MAX_FRAME_LEN, TAG_PAGES};
use super::lz4_page::Lz4PageError;
use super::xbzrle::XbzrleError;
use crate::memory::{GuestMemory, MemoryError};
use xxhash_rust::xxh3::xxh3_64;

use crate::units::{PageIndex, PAGE_SIZE};

/// Pages per batch: 1 MiB of payload, large enough to amortise per-frame costs, small enough
/// that a post-copy pull never queues long behind a background batch.
pub const BATCH_PAGES: usize = 256;

const HEADER_LEN: usize = 1 + 1 + 4 + 2 + 2;
const ENTRY_LEN: usize = 17;
/// Bytes of the length prefix of an encoded page in the payload.
pub const ENCODED_LEN_PREFIX_BYTES: usize = 2;
/// Largest encoding of a page that may travel: with its prefix it is never larger than the raw
/// page, so a batch never outgrows [`FRAME_CAPACITY`].
pub const MAX_ENCODED_LEN: usize = PAGE_SIZE - ENCODED_LEN_PREFIX_BYTES;
/// Bytes of the largest batch frame.
pub const FRAME_CAPACITY: usize = 4 + HEADER_LEN + BATCH_PAGES * (PAGE_SIZE + ENTRY_LEN);

/// Alignment of the first page's bytes in a frame buffer built here. glibc's memcpy of a 4 KiB
/// page is about five times slower (measured on this project's AMD EPYC bench host: 47 ms
/// instead of 9 ms for 128 MiB) when the destination sits 1 to 31 bytes past the source modulo
/// 4 KiB, and a frame in a malloc'd buffer put every page exactly 30 bytes past its page-aligned
/// source: that copy was most of the source data plane's time. Starting the payload on a
/// 64-byte boundary keeps each page a multiple of 64 bytes from its source.
pub const PAYLOAD_ALIGN: usize = 64;
/// Capacity of a recycled frame buffer: a full frame plus room to align its payload.
pub const FRAME_BUFFER_CAPACITY: usize = FRAME_CAPACITY + PAYLOAD_ALIGN;

/// Empties a (recycled) frame buffer and makes room for a full frame whose page bytes will be
/// [`PAYLOAD_ALIGN`]ed: the frame is then written from the buffer's start, length prefix first.
/// Both the builder and a socket reader start frames here, so that each page's copy (into the
/// frame, and out of it into guest memory) takes memcpy's fast path.
pub fn start_frame_buffer(buf: &mut BytesMut) {
    buf.clear();
    buf.reserve(FRAME_BUFFER_CAPACITY);
    // The skipped bytes are not part of the frame: the Bytes it becomes starts after them.
    let pad = (buf.as_ptr() as usize + 4 + HEADER_LEN).wrapping_neg() % PAYLOAD_ALIGN;
    buf.put_bytes(0, pad);
    buf.advance(pad);
}

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
    /// The page compressed as one LZ4 block.
    Lz4,
    /// The runs of bytes that changed since the copy the target holds (XBZRLE-style).
    Delta,
}

impl PageKind {
    fn code(self) -> u8 {
        match self {
            PageKind::Full => 0,
            PageKind::Zero => 1,
            PageKind::Lz4 => 2,
            PageKind::Delta => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => PageKind::Full,
            1 => PageKind::Zero,
            2 => PageKind::Lz4,
            3 => PageKind::Delta,
            _ => return None,
        })
    }
}

/// The page encodings one side uses or accepts beyond raw and zero pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCodecs {
    /// LZ4-compressed pages.
    pub lz4: bool,
    /// XBZRLE deltas of re-sent pages.
    pub xbzrle: bool,
}

impl PageCodecs {
    /// Raw and zero pages only.
    pub const NONE: PageCodecs = PageCodecs {
        lz4: false,
        xbzrle: false,
    };

    /// True if pages of `kind` may travel.
    pub fn allows(self, kind: PageKind) -> bool {
        match kind {
            PageKind::Full | PageKind::Zero => true,
            PageKind::Lz4 => self.lz4,
            PageKind::Delta => self.xbzrle,
        }
    }

    /// Names of the encodings in use, for reports.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.lz4 {
            v.push("lz4");
        }
        if self.xbzrle {
            v.push("xbzrle");
        }
        v
    }
}

/// Why one page of a well-formed batch cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// A bad LZ4 payload.
    #[error("LZ4 page: {0}")]
    Lz4(#[from] Lz4PageError),
    /// A bad delta.
    #[error("delta page: {0}")]
    Delta(#[from] XbzrleError),
    /// An encoding this side did not offer.
    #[error("{kind:?} page, an encoding this side did not offer")]
    NotOffered {
        /// The page's kind.
        kind: PageKind,
    },
    /// A delta after activation: the target's guest owns its pages then, so there is no base
    /// the source can know.
    #[error("delta page in a post-copy batch")]
    DeltaAfterActivation,
}

/// The source's choice of how each full page travels; see [`PageBatchBuilder::add_encoded`].
pub trait PageEncoder {
    /// Called with every non-zero page as read from guest memory. Either writes a smaller
    /// encoding of it into `out` and returns [`PageKind::Lz4`] or [`PageKind::Delta`], or
    /// returns [`PageKind::Full`] to send it raw. An encoding longer than [`MAX_ENCODED_LEN`]
    /// is sent raw instead, so whatever the encoder remembers must hold for either form.
    fn encode(&mut self, page: u64, raw: &[u8], out: &mut Vec<u8>) -> PageKind;
    /// Called for a page that travels as a zero marker.
    fn zero(&mut self, page: u64);
}

/// One entry of a batch under construction: the page, how it travels, its digest, and where
/// its payload item starts in the frame.
#[derive(Debug, Clone, Copy)]
struct Built {
    page: u64,
    kind: PageKind,
    digest: u64,
    at: usize,
}

/// Builds one batch frame, reading pages from guest memory straight into the frame buffer.
#[derive(Debug)]
pub struct PageBatchBuilder {
    buf: BytesMut,
    entries: Vec<Built>,
    full: usize,
    flags: u8,
    round: u32,
    scratch: Vec<u8>,
}

impl PageBatchBuilder {
    /// An empty batch for `round` with `flags`.
    pub fn new(round: u32, flags: u8) -> Self {
        Self::with_buffer(BytesMut::new(), round, flags)
    }

    /// An empty batch built in `buf` (a recycled frame buffer; its contents are discarded).
    pub fn with_buffer(mut buf: BytesMut, round: u32, flags: u8) -> Self {
        start_frame_buffer(&mut buf);
        buf.put_bytes(0, 4 + HEADER_LEN);
        Self {
            buf,
            entries: Vec::with_capacity(BATCH_PAGES),
            full: 0,
            flags,
            round,
            scratch: Vec::new(),
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

    /// Copies page `index` from `memory` into the batch, raw or as a zero marker; returns its
    /// kind.
    pub fn add_from(&mut self, memory: &GuestMemory, index: u64) -> Result<PageKind, MemoryError> {
        self.add(memory, index, None)
    }

    /// Like [`Self::add_from`], letting `encoder` send a non-zero page compressed or as a delta.
    /// Only for links where the peer accepts what `encoder` produces.
    pub fn add_encoded(
        &mut self,
        memory: &GuestMemory,
        index: u64,
        encoder: &mut dyn PageEncoder,
    ) -> Result<PageKind, MemoryError> {
        self.add(memory, index, Some(encoder))
    }

    fn add(
        &mut self,
        memory: &GuestMemory,
        index: u64,
        encoder: Option<&mut dyn PageEncoder>,
    ) -> Result<PageKind, MemoryError> {
        let start = self.buf.len();
        memory.append_page(PageIndex(index), &mut self.buf)?;
        if crate::memory::is_zero(&self.buf[start..]) {
            self.buf.truncate(start);
            if let Some(e) = encoder {
                e.zero(index);
            }
            self.entries.push(Built {
                page: index,
                kind: PageKind::Zero,
                digest: zero_page_digest(),
                at: start,
            });
            return Ok(PageKind::Zero);
        }
        let digest = xxh3_64(&self.buf[start..]);
        let kind = match encoder {
            Some(e) => match e.encode(index, &self.buf[start..], &mut self.scratch) {
                k @ (PageKind::Lz4 | PageKind::Delta) if self.scratch.len() <= MAX_ENCODED_LEN => {
                    self.buf.truncate(start);
                    self.buf.put_u16(self.scratch.len() as u16);
                    self.buf.put_slice(&self.scratch);
                    k
                }
                _ => PageKind::Full,
            },
            None => PageKind::Full,
        };
        if kind == PageKind::Full {
            self.full += 1;
        }
        self.entries.push(Built {
            page: index,
            kind,
            digest,
            at: start,
        });
        Ok(kind)
    }

    /// Fault injection: flips one payload byte of the first page that carries bytes, so that
    /// the page no longer matches its digest. False if no page carries bytes (all zero pages,
    /// or only empty deltas).
    pub fn corrupt_payload(&mut self) -> bool {
        for e in &self.entries {
            let at = match e.kind {
                PageKind::Zero => continue,
                PageKind::Full => e.at + 100,
                PageKind::Lz4 | PageKind::Delta => {
                    let len = u16::from_be_bytes([self.buf[e.at], self.buf[e.at + 1]]) as usize;
                    if len == 0 {
                        continue;
                    }
                    // The last byte of both encodings is page content (an LZ4 block ends with
                    // literals, a delta with a run's bytes), so the digest check catches it.
                    e.at + ENCODED_LEN_PREFIX_BYTES + len - 1
                }
            };
            self.buf[at] ^= 0x5a;
            return true;
        }
        false
    }

    /// Finishes the frame: length prefix, header, pages, entry table.
    pub fn finish(mut self) -> Bytes {
        for e in &self.entries {
            self.buf.put_u64(e.page);
            self.buf.put_u8(e.kind.code());
            self.buf.put_u64(e.digest);
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

/// What a page of a decoded batch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePayload<'a> {
    /// An all-zero page.
    Zero,
    /// The page's bytes.
    Raw(&'a [u8]),
    /// An LZ4 block of the page ([`super::lz4_page::decompress`]).
    Lz4(&'a [u8]),
    /// A delta against the target's copy of the page ([`super::xbzrle::decode`]).
    Delta(&'a [u8]),
}

impl PagePayload<'_> {
    /// The page's kind.
    pub fn kind(&self) -> PageKind {
        match self {
            PagePayload::Zero => PageKind::Zero,
            PagePayload::Raw(_) => PageKind::Full,
            PagePayload::Lz4(_) => PageKind::Lz4,
            PagePayload::Delta(_) => PageKind::Delta,
        }
    }
}

/// One decoded entry: page, kind, digest, and its bytes' place in the payload.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    page: u64,
    kind: PageKind,
    digest: u64,
    start: usize,
    end: usize,
}

/// A decoded batch; page bytes are slices of the received frame, not copies.
#[derive(Debug, Clone, PartialEq)]
pub struct PageBatch {
    /// Flags ([`FLAG_POSTCOPY`], [`FLAG_PULLED`]).
    pub flags: u8,
    /// Round the pages belong to.
    pub round: u32,
    entries: Vec<Entry>,
    payload: Bytes,
}

impl PageBatch {
    /// Decodes a batch body (tag included), checking every count and length against the body
    /// before anything is sliced.
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
        if body.len() < needed {
            return Err(FrameError::Truncated {
                needed,
                have: body.len(),
            });
        }
        let table_at = body.len() - count * ENTRY_LEN;
        let payload = &body[HEADER_LEN..table_at];
        let mut entries = Vec::with_capacity(count);
        let (mut cursor, mut seen_full, mut encoded) = (0usize, 0usize, false);
        for e in body[table_at..].chunks_exact(ENTRY_LEN) {
            let mut idx = [0u8; 8];
            idx.copy_from_slice(&e[..8]);
            let mut digest = [0u8; 8];
            digest.copy_from_slice(&e[9..17]);
            let kind = PageKind::from_code(e[8])
                .ok_or_else(|| FrameError::Malformed(format!("unknown page kind {}", e[8])))?;
            let (start, len) = match kind {
                PageKind::Zero => (cursor, 0),
                PageKind::Full => {
                    seen_full += 1;
                    (cursor, PAGE_SIZE)
                }
                PageKind::Lz4 | PageKind::Delta => {
                    encoded = true;
                    let prefix = payload
                        .get(cursor..cursor + ENCODED_LEN_PREFIX_BYTES)
                        .ok_or_else(|| FrameError::Malformed("payload ends inside a length prefix".into()))?;
                    let len = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
                    if len > MAX_ENCODED_LEN {
                        return Err(FrameError::Malformed(format!(
                            "encoded page of {len} bytes, limit {MAX_ENCODED_LEN}"
                        )));
                    }
                    (cursor + ENCODED_LEN_PREFIX_BYTES, len)
                }
            };
            let end = start + len;
            if end > payload.len() {
                return Err(FrameError::Malformed(format!(
                    "page entries need {end} payload bytes, the batch has {}",
                    payload.len()
                )));
            }
            entries.push(Entry {
                page: u64::from_be_bytes(idx),
                kind,
                digest: u64::from_be_bytes(digest),
                start,
                end,
            });
            cursor = end;
        }
        if seen_full != full {
            return Err(FrameError::Malformed(format!(
                "batch header says {full} full pages, table has {seen_full}"
            )));
        }
        if cursor != payload.len() {
            // Without encoded pages the layout is fixed; say so as peers without compression
            // always have.
            return Err(if encoded {
                FrameError::Malformed(format!(
                    "payload of {} bytes, its entries account for {cursor}",
                    payload.len()
                ))
            } else {
                FrameError::Truncated {
                    needed,
                    have: body.len(),
                }
            });
        }
        let payload = body.slice(HEADER_LEN..table_at);
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

    /// Pages with their payload and the digest the sender computed (of the page itself, not of
    /// its encoding), in order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, PagePayload<'_>, u64)> + '_ {
        self.entries.iter().map(move |e| {
            let bytes = &self.payload[e.start..e.end];
            let payload = match e.kind {
                PageKind::Zero => PagePayload::Zero,
                PageKind::Full => PagePayload::Raw(bytes),
                PageKind::Lz4 => PagePayload::Lz4(bytes),
                PageKind::Delta => PagePayload::Delta(bytes),
            };
            (e.page, payload, e.digest)
        })
    }

    /// Pages with their bytes (`None` for a zero page) and the digest the sender computed, in
    /// order: the view of a batch without encoded pages. An encoded page comes with its
    /// encoded bytes, which do not match its digest; consumers that accept encodings use
    /// [`Self::entries`].
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>, u64)> + '_ {
        self.entries().map(|(page, payload, digest)| match payload {
            PagePayload::Zero => (page, None, digest),
            PagePayload::Raw(b) | PagePayload::Lz4(b) | PagePayload::Delta(b) => (page, Some(b), digest),
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
    fn test_recycled_buffer_keeps_payload_aligned_without_reallocating() {
        let mem = GuestMemory::new(2 * PAGE_SIZE as u64).expect("map");
        mem.write_page(PageIndex(1), &[7u8; PAGE_SIZE]).expect("write");
        let mut buf = BytesMut::with_capacity(FRAME_BUFFER_CAPACITY);
        let mut base = None;
        for _ in 0..4 {
            let mut b = PageBatchBuilder::with_buffer(buf, 0, 0);
            b.add_from(&mem, 1).expect("add");
            let frame = b.finish();
            let payload = frame.as_ptr() as usize + 4 + HEADER_LEN;
            assert_eq!(payload % PAYLOAD_ALIGN, 0);
            // The same allocation each time: recycling never grows or moves the buffer.
            let start = payload & !(4096 - 1);
            assert_eq!(*base.get_or_insert(start), start);
            let body = frame_body(&frame).expect("body");
            let batch = PageBatch::decode(body).expect("decode");
            assert_eq!(batch.pages().next().expect("page").1, Some(&[7u8; PAGE_SIZE][..]));
            drop(batch);
            buf = frame.try_into_mut().expect("unique");
            assert!(buf.capacity() >= FRAME_CAPACITY);
        }
    }

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

    /// Sends every page as LZ4 when that is smaller, and remembers what it was told.
    #[derive(Default)]
    struct Lz4Only {
        zeros: Vec<u64>,
        seen: Vec<u64>,
    }

    impl PageEncoder for Lz4Only {
        fn encode(&mut self, page: u64, raw: &[u8], out: &mut Vec<u8>) -> PageKind {
            self.seen.push(page);
            match crate::protocol::lz4_page::compress(raw, out) {
                Some(n) if n < PAGE_SIZE / 2 => PageKind::Lz4,
                _ => PageKind::Full,
            }
        }
        fn zero(&mut self, page: u64) {
            self.zeros.push(page);
        }
    }

    /// Returns a fixed encoding for every page.
    struct Fixed(PageKind, Vec<u8>);

    impl PageEncoder for Fixed {
        fn encode(&mut self, _: u64, _: &[u8], out: &mut Vec<u8>) -> PageKind {
            out.clear();
            out.extend_from_slice(&self.1);
            self.0
        }
        fn zero(&mut self, _: u64) {}
    }

    fn memory_with_kinds() -> GuestMemory {
        let mem = GuestMemory::new(4 * PAGE_SIZE as u64).expect("map");
        mem.fill_pseudo_random(5, 0.0).expect("fill");
        mem.write_page(PageIndex(2), &[0x22; PAGE_SIZE]).expect("write");
        mem.zero_page(PageIndex(3)).expect("zero");
        mem
    }

    #[test]
    fn test_lz4_pages_round_trip_and_incompressible_go_raw() {
        let mem = memory_with_kinds();
        let mut enc = Lz4Only::default();
        let mut b = PageBatchBuilder::new(2, 0);
        let kinds: Vec<PageKind> = (0..4).map(|p| b.add_encoded(&mem, p, &mut enc).expect("add")).collect();
        assert_eq!(kinds, [PageKind::Full, PageKind::Full, PageKind::Lz4, PageKind::Zero]);
        // Pages 0 and 1 are random: incompressible, so raw.
        assert_eq!((enc.seen, enc.zeros), (vec![0, 1, 2], vec![3]));
        let frame = b.finish();
        assert!(
            frame.len() < 4 + HEADER_LEN + 3 * PAGE_SIZE,
            "page 2 travelled compressed"
        );
        let batch = PageBatch::decode(frame_body(&frame).expect("body")).expect("decode");
        for (page, payload, digest) in batch.entries() {
            let mut out = [0u8; PAGE_SIZE];
            match payload {
                PagePayload::Raw(b) => out.copy_from_slice(b),
                PagePayload::Lz4(b) => crate::protocol::lz4_page::decompress(b, &mut out).expect("lz4"),
                PagePayload::Zero => {}
                PagePayload::Delta(_) => panic!("no delta was made"),
            }
            assert_eq!(xxh3_64(&out), digest, "page {page}");
            assert_eq!(mem.page_digest(PageIndex(page)).expect("page"), digest);
        }
    }

    #[test]
    fn test_oversized_encoding_is_sent_raw() {
        let mem = memory_with_kinds();
        let mut enc = Fixed(PageKind::Delta, vec![1; MAX_ENCODED_LEN + 1]);
        let mut b = PageBatchBuilder::new(0, 0);
        assert_eq!(b.add_encoded(&mem, 0, &mut enc).expect("add"), PageKind::Full);
        let mut enc = Fixed(PageKind::Delta, vec![1; MAX_ENCODED_LEN]);
        assert_eq!(b.add_encoded(&mem, 1, &mut enc).expect("add"), PageKind::Delta);
        let frame = b.finish();
        assert!(frame.len() <= FRAME_CAPACITY);
        let batch = PageBatch::decode(frame_body(&frame).expect("body")).expect("decode");
        let kinds: Vec<PageKind> = batch.entries().map(|(_, p, _)| p.kind()).collect();
        assert_eq!(kinds, [PageKind::Full, PageKind::Delta]);
    }

    #[test]
    fn test_lying_encoded_lengths_are_rejected() {
        let mem = memory_with_kinds();
        let mut b = PageBatchBuilder::new(0, 0);
        b.add_encoded(&mem, 0, &mut Fixed(PageKind::Lz4, vec![9; 40]))
            .expect("add");
        b.add_encoded(&mem, 1, &mut Fixed(PageKind::Delta, Vec::new()))
            .expect("add");
        let frame = b.finish();
        let good = frame_body(&frame).expect("body").to_vec();
        assert!(PageBatch::decode(Bytes::from(good.clone())).is_ok());
        let malformed = |body: Vec<u8>| matches!(PageBatch::decode(Bytes::from(body)), Err(FrameError::Malformed(_)));
        // The first length claims more bytes than the payload holds.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&2000u16.to_be_bytes());
        assert!(malformed(bad));
        // Longer than a page may be.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(malformed(bad));
        // Shorter: bytes left over that no entry accounts for.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&39u16.to_be_bytes());
        assert!(malformed(bad));
        // An unknown kind.
        let mut bad = good;
        let kind_at = bad.len() - ENTRY_LEN + 8;
        bad[kind_at] = 7;
        assert!(malformed(bad));
    }

    #[test]
    fn test_corrupt_payload_hits_page_bytes() {
        let mem = memory_with_kinds();
        let mut b = PageBatchBuilder::new(0, 0);
        b.add_from(&mem, 3).expect("zero");
        assert!(!b.corrupt_payload(), "nothing but a zero page");
        b.add_encoded(&mem, 2, &mut Lz4Only::default()).expect("lz4");
        assert!(b.corrupt_payload());
        let frame = b.finish();
        let batch = PageBatch::decode(frame_body(&frame).expect("body")).expect("still well-formed");
        let (_, payload, digest) = batch.entries().nth(1).expect("page 2");
        let PagePayload::Lz4(bytes) = payload else {
            panic!("lz4 expected")
        };
        let mut out = [0u8; PAGE_SIZE];
        let ok = crate::protocol::lz4_page::decompress(bytes, &mut out).is_ok();
        assert!(!ok || xxh3_64(&out) != digest, "the corruption is detectable");
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// A valid batch of every kind, mutated anywhere: decoding the batch and then each
        /// page's payload never panics, and a decoded page is never longer than a page.
        #[test]
        fn test_mutated_encoded_batches_never_panic(flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8)) {
            let mem = memory_with_kinds();
            let mut b = PageBatchBuilder::new(1, 0);
            b.add_encoded(&mem, 0, &mut Fixed(PageKind::Delta, vec![5, 2, 1, 1])).expect("delta");
            b.add_encoded(&mem, 1, &mut Lz4Only::default()).expect("raw");
            b.add_encoded(&mem, 2, &mut Lz4Only::default()).expect("lz4");
            b.add_from(&mem, 3).expect("zero");
            let mut body = frame_body(&b.finish()).expect("body").to_vec();
            for (at, x) in flips {
                let len = body.len();
                body[at % len] ^= x;
            }
            if let Ok(batch) = PageBatch::decode(Bytes::from(body)) {
                for (_, payload, _) in batch.entries() {
                    let mut page = [0u8; PAGE_SIZE];
                    match payload {
                        PagePayload::Raw(bytes) => proptest::prop_assert_eq!(bytes.len(), PAGE_SIZE),
                        PagePayload::Lz4(bytes) => {
                            let _ = crate::protocol::lz4_page::decompress(bytes, &mut page);
                        }
                        PagePayload::Delta(bytes) => {
                            let _ = crate::protocol::xbzrle::decode(bytes, &mut page);
                        }
                        PagePayload::Zero => {}
                    }
                }
            }
        }
    }
}
