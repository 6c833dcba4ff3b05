//! The target's data-plane thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

use super::DataPlaneError;
use crate::link::{DataReceiver, DataRecv, FramePool, Lane, PullAsk};
use crate::protocol::frame::frame_body;
use crate::protocol::pages::{PageError, FLAG_POSTCOPY};
use crate::protocol::{lz4_page, xbzrle, PageBatch, PageCodecs, PagePayload};
use crate::units::{PageIndex, PAGE_SIZE};
use crate::vmm::Guest;

/// Handle of the target's data-plane threads: applies batches, counts them, and records the
/// digest of every page as received (the target side of verification). Two threads: one for
/// the bulk lane, and one that applies pulled pages the moment they arrive, so that a faulting
/// guest never waits for a bulk batch to be written first.
#[derive(Debug)]
pub struct TargetPlane {
    guest: Arc<dyn Guest>,
    accept: PageCodecs,
    applied: watch::Receiver<u64>,
    digests: Arc<Vec<AtomicU64>>,
    received_bytes: Arc<AtomicU64>,
    error: Arc<Mutex<Option<DataPlaneError>>>,
    stop: Arc<AtomicBool>,
    /// Post-copy: where a page that arrived damaged is asked for again.
    refetch: Arc<Mutex<Option<RefetchSender>>>,
    /// The link's data half, for page requests on its pull lane.
    link: DataReceiver,
    threads: Vec<JoinHandle<()>>,
}

/// Where post-copy pages that arrived damaged go to be requested again.
pub type RefetchSender = tokio::sync::mpsc::UnboundedSender<u64>;

/// How often the apply loop looks up from an idle link to check for a stop request.
const STOP_POLL: Duration = Duration::from_millis(20);

impl TargetPlane {
    /// Starts the thread writing batches from `link` into `guest`'s memory. Pages in an
    /// encoding outside `accept` (what this side offered) are refused.
    pub fn spawn(
        guest: Arc<dyn Guest>,
        link: DataReceiver,
        pool: FramePool,
        accept: PageCodecs,
    ) -> Result<Self, DataPlaneError> {
        let pages = guest.memory().page_count();
        let mut plane = Self {
            guest,
            accept,
            applied: watch::channel(0u64).1,
            digests: Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect()),
            received_bytes: Arc::new(AtomicU64::new(0)),
            error: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            refetch: Arc::new(Mutex::new(None)),
            link: link.clone(),
            threads: Vec::new(),
        };
        plane.start(link, pool)?;
        Ok(plane)
    }

    /// Post-copy recovery: stops the thread of the lost link and applies batches from the new
    /// one, keeping the digests recorded so far and the batch count. Earlier [`Self::watch`]
    /// receivers see the old thread end; take new ones.
    pub fn reattach(&mut self, link: DataReceiver, pool: FramePool) -> Result<(), DataPlaneError> {
        self.halt();
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.stop.store(false, Ordering::Release);
        self.start(link, pool)
    }

    fn start(&mut self, link: DataReceiver, pool: FramePool) -> Result<(), DataPlaneError> {
        // The threads of one link share its sender: when both end, every watcher of the count
        // learns so.
        let (tx, applied) = watch::channel(self.applied());
        let tx = Arc::new(tx);
        self.link = link.clone();
        self.applied = applied;
        for (lane, name) in [(Lane::Bulk, "migratory-recv"), (Lane::Urgent, "migratory-recv-pull")] {
            let guest = Arc::clone(&self.guest);
            let accept = self.accept;
            let (d, e, halt, bytes, refetch, tx) = (
                Arc::clone(&self.digests),
                Arc::clone(&self.error),
                Arc::clone(&self.stop),
                Arc::clone(&self.received_bytes),
                Arc::clone(&self.refetch),
                Arc::clone(&tx),
            );
            let (link, pool) = (link.clone(), pool.clone());
            let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
                let sinks = Sinks {
                    digests: &d,
                    applied: &tx,
                    received_bytes: &bytes,
                    refetch: &refetch,
                };
                let from = From { link: &link, lane };
                if let Err(err) = apply_loop(guest.as_ref(), accept, from, &pool, &halt, &sinks) {
                    *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                    // Wake anyone waiting on the count so they see the error.
                    tx.send_modify(|_| {});
                }
            });
            match thread {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    self.halt();
                    return Err(DataPlaneError::Spawn(e.to_string()));
                }
            }
        }
        Ok(())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Post-copy: asks the source for `pages` on the link's pull lane. Anything but
    /// [`PullAsk::Sent`] means the caller asks over the control link instead.
    pub fn ask(&self, pages: &[u64]) -> PullAsk {
        self.link.ask(pages)
    }

    /// Post-copy: a page that arrives damaged (bad digest, undecodable) is not installed; it
    /// stays missing and its index goes to `to`, to be requested again.
    pub fn refetch_to(&self, to: RefetchSender) {
        *self.refetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }

    /// Page-batch bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// The error that stopped the thread, if any.
    pub fn error(&self) -> Option<DataPlaneError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A receiver that changes whenever a batch is applied (or the plane fails).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Batches applied so far.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until at least `batches` batches are applied, or the plane fails.
    pub async fn wait_applied(&self, batches: u64) -> Result<(), DataPlaneError> {
        let mut rx = self.applied.clone();
        loop {
            if let Some(e) = self.error() {
                return Err(e);
            }
            if *rx.borrow_and_update() >= batches {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(self.error().unwrap_or(DataPlaneError::Stopped));
            }
        }
    }

    /// Digests of the pages as received, from `first` on, at most `max` of them.
    pub fn received_digests(&self, first: u64, max: usize) -> Vec<u64> {
        self.digests
            .iter()
            .skip(first as usize)
            .take(max)
            .map(|d| d.load(Ordering::Acquire))
            .collect()
    }

    /// The digest recorded for `page` (0 if none arrived).
    pub fn received_digest(&self, page: u64) -> u64 {
        self.digests
            .get(page as usize)
            .map(|d| d.load(Ordering::Acquire))
            .unwrap_or(0)
    }
}

impl Drop for TargetPlane {
    fn drop(&mut self) {
        // Joined here, so that once the plane is gone nothing writes into guest memory that a
        // host may be about to release.
        self.halt();
    }
}

/// Which lane of which link an apply loop reads.
struct From<'a> {
    link: &'a DataReceiver,
    lane: Lane,
}

/// Where the apply loop reports what it did.
struct Sinks<'a> {
    digests: &'a [AtomicU64],
    applied: &'a watch::Sender<u64>,
    received_bytes: &'a AtomicU64,
    refetch: &'a Mutex<Option<RefetchSender>>,
}

fn apply_loop(
    guest: &dyn Guest,
    accept: PageCodecs,
    from: From<'_>,
    pool: &FramePool,
    stop: &AtomicBool,
    sinks: &Sinks<'_>,
) -> Result<(), DataPlaneError> {
    let Sinks {
        digests,
        applied,
        received_bytes,
        refetch,
    } = *sinks;
    let memory = guest.memory();
    let pages = memory.page_count();
    let zero_digest = xxh3_64(&[0u8; PAGE_SIZE]);
    // Batches of different rounds may overtake each other on parallel streams: a page is
    // written only by a batch of its latest round seen so far.
    let mut page_round = vec![0u32; pages as usize];
    // Encoded pages are decoded here, then checked and written like raw ones.
    let mut scratch = [0u8; PAGE_SIZE];
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let frame = match from.link.recv_lane_timeout(from.lane, STOP_POLL) {
            DataRecv::Frame(f) => f,
            DataRecv::Idle => continue,
            DataRecv::Closed => return Ok(()),
        };
        received_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        let body = frame_body(&frame).map_err(|e| DataPlaneError::BadBatch(e.to_string()))?;
        let batch = PageBatch::decode(body).map_err(|e| DataPlaneError::BadBatch(e.to_string()))?;
        let postcopy = batch.flags & FLAG_POSTCOPY != 0;
        for (page, payload, sent_digest) in batch.entries() {
            if page >= pages {
                return Err(DataPlaneError::PageOutOfRange { page, pages });
            }
            let bad = |error: PageError| DataPlaneError::BadPage { page, error };
            if !accept.allows(payload.kind()) {
                return Err(bad(PageError::NotOffered { kind: payload.kind() }));
            }
            if postcopy && matches!(payload, PagePayload::Delta(_)) {
                return Err(bad(PageError::DeltaAfterActivation));
            }
            if postcopy {
                // After activation the guest owns present pages: a page already here is left
                // alone (checked again at the claim below, which is the one that counts).
                if guest.missing_pages() == 0 {
                    continue;
                }
            } else {
                let seen = &mut page_round[page as usize];
                if batch.round < *seen {
                    continue;
                }
                *seen = batch.round;
            }
            let data: Option<&[u8]> = match payload {
                PagePayload::Zero => None,
                PagePayload::Raw(bytes) => Some(bytes),
                PagePayload::Lz4(bytes) => {
                    if let Err(e) = lz4_page::decompress(bytes, &mut scratch) {
                        if postcopy {
                            refetch_page(refetch, page, &PageError::from(e).to_string());
                            continue;
                        }
                        return Err(bad(e.into()));
                    }
                    Some(&scratch)
                }
                PagePayload::Delta(delta) => {
                    // The base is the page as this plane last wrote it: before activation
                    // nothing else writes target memory.
                    memory
                        .read_page(PageIndex(page), &mut scratch)
                        .map_err(|_| DataPlaneError::PageOutOfRange { page, pages })?;
                    xbzrle::decode(delta, &mut scratch).map_err(|e| bad(e.into()))?;
                    Some(&scratch)
                }
            };
            // Checked before the write: a corrupted page, or a delta applied to a base other
            // than the sender's, never reaches guest memory.
            let digest = match data {
                Some(bytes) => xxh3_64(bytes),
                None => zero_digest,
            };
            if data.is_some() && digest != sent_digest {
                if postcopy {
                    // Never claimed: the page stays missing and is asked for again.
                    refetch_page(refetch, page, "digest mismatch");
                    continue;
                }
                return Err(DataPlaneError::Corrupt { page });
            }
            // Only a missing page is written, once, whichever of push and pull brings it
            // first; claimed only once it is known good.
            if postcopy && !guest.claim_page(page) {
                continue;
            }
            if postcopy {
                // Recorded first: once installed, the guest may overwrite the page at once.
                digests[page as usize].store(digest, Ordering::Release);
                guest.install_page(page, data).map_err(|e| DataPlaneError::Install {
                    page,
                    detail: e.to_string(),
                })?;
                continue;
            }
            match data {
                Some(bytes) => memory.write_page(PageIndex(page), bytes),
                None => memory.zero_page(PageIndex(page)),
            }
            .map_err(|_| DataPlaneError::PageOutOfRange { page, pages })?;
            digests[page as usize].store(digest, Ordering::Release);
        }
        drop(batch);
        pool.give(frame);
        applied.send_modify(|n| *n += 1);
    }
}

/// A post-copy page arrived damaged: it stays missing, and the receiver requests it again.
fn refetch_page(refetch: &Mutex<Option<RefetchSender>>, page: u64, why: &str) {
    tracing::warn!(page, why, "post-copy page arrived damaged; requesting it again");
    if let Some(tx) = refetch.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = tx.send(page);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use bytes::BytesMut;

    use super::*;
    use crate::format::{MacAddr, NativeLayout, NicConfig, VmConfig, VmId};
    use crate::link::{pair, Shaping};
    use crate::protocol::pages::PageBatchBuilder;
    use crate::vmm::sim::SimGuest;

    fn config() -> VmConfig {
        VmConfig {
            id: VmId("c".into()),
            name: "c".into(),
            vcpus: 1,
            memory_bytes: 16 * PAGE_SIZE as u64,
            page_size: PAGE_SIZE as u32,
            nics: vec![NicConfig {
                id: "net0".into(),
                mac: MacAddr::local_from_seed(3),
            }],
        }
    }

    #[test]
    fn test_corrupted_page_is_refused_not_applied() {
        let source = SimGuest::create(config(), NativeLayout::Kvm, crate::vmm::WorkloadSpec::idle()).expect("src");
        let target: Arc<dyn Guest> = Arc::new(
            SimGuest::reserve(config(), NativeLayout::Kvm, crate::vmm::MemoryCommit::Background).expect("dst"),
        );
        let (a, b) = pair(Shaping::default());
        let plane = TargetPlane::spawn(Arc::clone(&target), b.data_rx, b.pool, PageCodecs::NONE).expect("plane");
        let mut batch = PageBatchBuilder::new(0, 0);
        batch.add_from(source.memory(), 3).expect("page");
        let frame = batch.finish();
        // Flip one payload byte on the way (past the length prefix and the 10-byte header).
        let mut bad = BytesMut::from(&frame[..]);
        bad[4 + 10 + 100] ^= 0x40;
        let stop = AtomicBool::new(false);
        a.data_tx.send(bad.freeze(), &stop).expect("send");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while plane.error().is_none() {
            assert!(std::time::Instant::now() < deadline, "corruption not detected");
            std::thread::yield_now();
        }
        assert_eq!(plane.error(), Some(DataPlaneError::Corrupt { page: 3 }));
        assert!(
            target.memory().page_is_zero(PageIndex(3)).expect("page"),
            "never applied"
        );
        drop(a);
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    const BOTH: PageCodecs = PageCodecs {
        lz4: true,
        xbzrle: true,
    };

    #[test]
    fn test_compressed_and_delta_pages_are_applied() {
        use crate::dataplane::encoder::SourceEncoder;
        let source = SimGuest::create(config(), NativeLayout::Kvm, crate::vmm::WorkloadSpec::idle()).expect("src");
        let target: Arc<dyn Guest> = Arc::new(
            SimGuest::reserve(config(), NativeLayout::Kvm, crate::vmm::MemoryCommit::Background).expect("dst"),
        );
        let (a, b) = pair(Shaping::default());
        let plane = TargetPlane::spawn(Arc::clone(&target), b.data_rx, b.pool, BOTH).expect("plane");
        let mem = source.memory();
        mem.write_page(PageIndex(5), &[9u8; PAGE_SIZE])
            .expect("a compressible page");
        let mut enc = SourceEncoder::new(BOTH, 1 << 20, mem.page_count());
        let stop = AtomicBool::new(false);
        let send = |round: u32, pages: &[u64], enc: &mut SourceEncoder| {
            enc.begin_round(round);
            let mut batch = PageBatchBuilder::new(round, 0);
            let kinds: Vec<_> = pages
                .iter()
                .map(|&p| batch.add_encoded(mem, p, enc).expect("page"))
                .collect();
            a.data_tx.send(batch.finish(), &stop).expect("send");
            kinds
        };
        let all: Vec<u64> = (0..mem.page_count()).collect();
        assert!(send(0, &all, &mut enc).contains(&crate::protocol::PageKind::Lz4));
        for p in [1, 5, 7] {
            mem.store_word(PageIndex(p), p as usize, 0xdead_0000 + p)
                .expect("store");
        }
        let kinds = send(1, &[1, 5, 7], &mut enc);
        assert!(
            kinds.iter().all(|k| *k == crate::protocol::PageKind::Delta),
            "{kinds:?}"
        );
        wait_until("both batches applied", || {
            plane.applied() == 2 || plane.error().is_some()
        });
        assert_eq!(plane.error(), None);
        for p in all {
            let digest = mem.page_digest(PageIndex(p)).expect("page");
            assert_eq!(
                target.memory().page_digest(PageIndex(p)).expect("page"),
                digest,
                "page {p}"
            );
            assert_eq!(plane.received_digest(p), digest);
        }
    }

    /// Sends one frame to a fresh plane accepting `accept`; returns the error it stops with.
    fn refusal(accept: PageCodecs, frame: bytes::Bytes) -> DataPlaneError {
        let target: Arc<dyn Guest> = Arc::new(
            SimGuest::reserve(config(), NativeLayout::Kvm, crate::vmm::MemoryCommit::Background).expect("dst"),
        );
        let (a, b) = pair(Shaping::default());
        let plane = TargetPlane::spawn(Arc::clone(&target), b.data_rx, b.pool, accept).expect("plane");
        a.data_tx.send(frame, &AtomicBool::new(false)).expect("send");
        wait_until("refused", || plane.error().is_some());
        assert!(
            target.memory().page_is_zero(PageIndex(2)).expect("page"),
            "never applied"
        );
        plane.error().expect("an error")
    }

    /// One page 2 of kind `kind` with `payload` (any digest: the kind or payload is refused
    /// before it is checked).
    fn frame_with(kind: crate::protocol::PageKind, payload: Vec<u8>, flags: u8) -> bytes::Bytes {
        struct Fixed(crate::protocol::PageKind, Vec<u8>);
        impl crate::protocol::pages::PageEncoder for Fixed {
            fn encode(&mut self, _: u64, _: &[u8], out: &mut Vec<u8>) -> crate::protocol::PageKind {
                out.clone_from(&self.1);
                self.0
            }
            fn zero(&mut self, _: u64) {}
        }
        let source = crate::memory::GuestMemory::new(16 * PAGE_SIZE as u64).expect("map");
        source.store_word(PageIndex(2), 0, 1).expect("store");
        let mut batch = PageBatchBuilder::new(1, flags);
        batch.add_encoded(&source, 2, &mut Fixed(kind, payload)).expect("page");
        batch.finish()
    }

    #[test]
    fn test_unoffered_malformed_and_postcopy_deltas_are_refused() {
        use crate::protocol::PageKind;
        let bad = |error| DataPlaneError::BadPage { page: 2, error };
        let lz4 = frame_with(PageKind::Lz4, vec![0xf0, 1, 2], 0);
        assert_eq!(
            refusal(PageCodecs::NONE, lz4.clone()),
            bad(PageError::NotOffered { kind: PageKind::Lz4 })
        );
        assert!(matches!(
            refusal(BOTH, lz4),
            DataPlaneError::BadPage {
                page: 2,
                error: PageError::Lz4(_)
            }
        ));
        let delta = frame_with(PageKind::Delta, vec![1, 0], 0);
        assert_eq!(
            refusal(BOTH, delta),
            bad(PageError::Delta(xbzrle::XbzrleError::EmptyRun { at: 0 }))
        );
        let late = frame_with(PageKind::Delta, vec![0, 1, 7], FLAG_POSTCOPY);
        assert_eq!(refusal(BOTH, late), bad(PageError::DeltaAfterActivation));
        // A well-formed delta against the wrong base: caught by the digest.
        let wrong = frame_with(PageKind::Delta, vec![8, 1, 7], 0);
        assert_eq!(refusal(BOTH, wrong), DataPlaneError::Corrupt { page: 2 });
    }
}
