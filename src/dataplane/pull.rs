//! The source's pull server: post-copy's page requests answered on a thread of their own, ahead
//! of the push, with a short prepaging window after each faulted page.
//!
//! Requests come from the link's pull lane ([`crate::link::DataSender::pull_requests`]) or, on
//! a link without one, from the control link through [`super::SourcePlane::pull`]. Each is
//! answered at once: the requested pages are read from guest memory into one urgent frame and
//! sent, then the next [`PREPAGE_WINDOW`] pages after the first one that are still owed go in a
//! second frame right behind it, and the push is told to carry on from there ([`Owed`]). The
//! push thread never waits for a pull, and a pull never waits for a push batch to be built or
//! to find room.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam::channel::{self, Receiver};

use super::source::RoundStats;
use super::DataPlaneError;
use crate::dirty::{AtomicBitmap, PageSet};
use crate::link::{decode_request, DataSender, FramePool, Timed};
use crate::protocol::pages::{PageBatchBuilder, FLAG_POSTCOPY, FLAG_PULLED};
use crate::protocol::PageKind;
use crate::vmm::Guest;

/// Pages sent after a faulted page, ahead of the push. A guest that faults on page p often
/// goes on to p + 1, p + 2, … (a scan, a large object): sending those right behind p saves
/// each its own fault round trip. 8 pages (32 KiB) keeps the frame that follows a pulled page
/// short (about 10 µs on loopback), so the next pulled page never waits long behind it, while
/// a scan faults at most once per 9 pages; wider windows mostly send pages a random-access
/// guest does not want next.
pub const PREPAGE_WINDOW: u64 = 8;
/// Pulled pages batched into one urgent frame (requests that wait are served together).
const PULL_FRAME_PAGES: usize = 32;
/// How often an idle server looks up for a stop request.
const STOP_POLL: Duration = Duration::from_millis(50);
/// No pull has moved the push since it last looked.
const NO_HINT: u64 = u64::MAX;

/// What post-copy's push and pull server share: which pages the target is still owed, and
/// where the push should carry on after the latest pull.
#[derive(Debug)]
pub(super) struct Owed {
    /// Set once a page is on its way (or was never missing): whoever sets it first sends it.
    sent: AtomicBitmap,
    unsent: AtomicU64,
    /// The page after the latest prepaging window, for the push to go on from.
    hint: AtomicU64,
}

impl Owed {
    /// The target lacks exactly `missing`.
    pub(super) fn new(missing: &PageSet) -> Self {
        let bits = missing.universe();
        let present: Vec<u64> = missing.words().iter().map(|w| !w).collect();
        let sent = AtomicBitmap::new(bits);
        sent.set_from(&PageSet::from_words(present, bits));
        Self {
            sent,
            unsent: AtomicU64::new(missing.len()),
            hint: AtomicU64::new(NO_HINT),
        }
    }

    /// Claims `page` for sending; false if it is sent already or was never owed.
    pub(super) fn claim(&self, page: u64) -> bool {
        if self.sent.test_and_set(page) {
            return false;
        }
        self.unsent.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// Pages still owed.
    pub(super) fn unsent(&self) -> u64 {
        self.unsent.load(Ordering::Acquire)
    }

    /// Where the push should go on, if a pull moved it since it last asked.
    pub(super) fn take_hint(&self) -> Option<u64> {
        Some(self.hint.swap(NO_HINT, Ordering::AcqRel)).filter(|h| *h != NO_HINT)
    }
}

/// Page requests a source plane served, by the way they came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullPaths {
    /// Requests on the link's pull lane (its own connection over TCP).
    pub lane: u64,
    /// Pages asked for over the control link (`PageRequest`): a peer without a pull lane.
    pub control: u64,
}

/// What the plane and its pull server share.
#[derive(Debug, Default)]
pub(super) struct PullShared {
    /// Set when post-copy starts: until then there is nothing to pull.
    pub(super) owed: OnceLock<Arc<Owed>>,
    /// What the server sent since the push last took it.
    pub(super) stats: Mutex<RoundStats>,
    /// Pages pulled on demand, ever.
    pub(super) pulled: AtomicU64,
    /// Requests that came on the link's pull lane, and over the control link.
    pub(super) paths: [AtomicU64; 2],
    /// Set if serving failed (a page outside memory, the link gone); the push fails with it.
    pub(super) error: Mutex<Option<DataPlaneError>>,
}

impl PullShared {
    /// What the server sent since the last call.
    pub(super) fn take_stats(&self) -> RoundStats {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The error serving stopped with, if any.
    pub(super) fn error(&self) -> Option<DataPlaneError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The server thread's state.
pub(super) struct PullServer {
    pub(super) guest: Arc<dyn Guest>,
    pub(super) link: DataSender,
    pub(super) pool: FramePool,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) corrupt: Arc<AtomicBool>,
    pub(super) sent_bytes: Arc<AtomicU64>,
    pub(super) batches: Arc<AtomicU64>,
    pub(super) shared: Arc<PullShared>,
    /// Pages asked for over the control link.
    pub(super) pulls: Receiver<u64>,
}

impl PullServer {
    /// Serves until the plane stops or a send fails.
    pub(super) fn run(self) {
        let mut lane = self.link.pull_requests();
        // Without a lane (or once its peer is gone) only control requests come.
        let never = channel::never();
        let mut pages = Vec::with_capacity(PULL_FRAME_PAGES);
        while !self.stop.load(Ordering::Acquire) {
            pages.clear();
            let requests = lane.as_ref().unwrap_or(&never);
            channel::select! {
                recv(self.pulls) -> p => match p {
                    Ok(p) => {
                        pages.push(p);
                        self.shared.paths[1].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return,
                },
                recv(requests) -> t => match t {
                    Ok(t) => {
                        self.take_request(&t, &mut pages);
                        self.shared.paths[0].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => lane = None,
                },
                default(STOP_POLL) => continue,
            }
            // Whatever else waits already goes in the same frame.
            while pages.len() < PULL_FRAME_PAGES {
                match self.pulls.try_recv() {
                    Ok(p) => {
                        pages.push(p);
                        self.shared.paths[1].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            if pages.is_empty() {
                continue;
            }
            if let Err(e) = self.serve(&pages) {
                *self.shared.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return;
            }
        }
    }

    fn take_request(&self, t: &Timed, pages: &mut Vec<u64>) {
        match decode_request(&t.frame) {
            Ok(asked) => pages.extend(asked),
            // Authenticated but malformed: the peer's bug; its guest asks again.
            Err(e) => tracing::warn!(error = %e, "malformed page request on the pull lane"),
        }
    }

    /// Sends `pages` (pulled) in one urgent frame, then the prepaging window after the first.
    fn serve(&self, pages: &[u64]) -> Result<(), DataPlaneError> {
        let owed = self.shared.owed.get();
        let mut stats = RoundStats::default();
        let mut batch = PageBatchBuilder::with_buffer(self.pool.take(), u32::MAX, FLAG_POSTCOPY | FLAG_PULLED);
        for &p in pages.iter().take(PULL_FRAME_PAGES) {
            // Sent even if the push sent it already: the target asks because it lacks it now.
            if let Some(o) = owed {
                o.claim(p);
            }
            self.add(&mut batch, p, &mut stats)?;
        }
        let pulled = batch.len() as u64;
        self.ship(batch, &mut stats)?;
        stats.pulled_pages = pulled;
        self.shared.pulled.fetch_add(pulled, Ordering::Relaxed);
        if let (Some(o), Some(&first)) = (owed, pages.first()) {
            self.prepage(o, first, &mut stats)?;
        }
        let mut total = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        total.add(&stats);
        Ok(())
    }

    /// The pages after `first` the target is still owed, up to [`PREPAGE_WINDOW`] of them, in
    /// an urgent frame of their own; the push goes on after them.
    fn prepage(&self, owed: &Owed, first: u64, stats: &mut RoundStats) -> Result<(), DataPlaneError> {
        let pages = self.guest.memory().page_count();
        let end = first.saturating_add(1 + PREPAGE_WINDOW).min(pages);
        let mut batch = PageBatchBuilder::with_buffer(self.pool.take(), u32::MAX, FLAG_POSTCOPY | FLAG_PULLED);
        for p in first.saturating_add(1)..end {
            if owed.claim(p) {
                self.add(&mut batch, p, stats)?;
            }
        }
        if end < pages {
            owed.hint.store(end, Ordering::Release);
        }
        if batch.is_empty() {
            self.pool.give(batch.finish());
            return Ok(());
        }
        self.ship(batch, stats)
    }

    fn add(&self, batch: &mut PageBatchBuilder, page: u64, stats: &mut RoundStats) -> Result<(), DataPlaneError> {
        let memory = self.guest.memory();
        let pages = memory.page_count();
        // Raw: a guest waits on each pulled page, and on a fast link compressing it costs
        // more time than the bytes it saves.
        match batch.add_from(memory, page) {
            Ok(PageKind::Zero) => stats.zero_pages += 1,
            Ok(_) => stats.full_pages += 1,
            Err(_) => return Err(DataPlaneError::PageOutOfRange { page, pages }),
        }
        Ok(())
    }

    fn ship(&self, mut batch: PageBatchBuilder, stats: &mut RoundStats) -> Result<(), DataPlaneError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(DataPlaneError::Stopped);
        }
        // Fault injection: a batch with page bytes carries one flipped byte.
        if self.corrupt.load(Ordering::Acquire) && batch.corrupt_payload() {
            self.corrupt.store(false, Ordering::Release);
        }
        let frame = batch.finish();
        let len = frame.len() as u64;
        self.link
            .send_urgent(frame, &self.stop)
            .map_err(|_| DataPlaneError::LinkClosed)?;
        stats.bytes += len;
        self.batches.fetch_add(1, Ordering::Release);
        self.sent_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{PlaneEncoding, SourcePlane};
    use crate::format::{MacAddr, NativeLayout, NicConfig, VmConfig, VmId};
    use crate::link::{pair, DataReceiver, DataRecv, Lane, LinkEnd, PullAsk, Shaping};
    use crate::protocol::frame::frame_body;
    use crate::protocol::PageBatch;
    use crate::units::PAGE_SIZE;
    use crate::vmm::sim::SimGuest;

    const PAGES: u64 = 4096;
    const WAIT: Duration = Duration::from_secs(10);

    fn source_plane(link: &LinkEnd) -> SourcePlane {
        let config = VmConfig {
            id: VmId("p".into()),
            name: "p".into(),
            vcpus: 1,
            memory_bytes: PAGES * PAGE_SIZE as u64,
            page_size: PAGE_SIZE as u32,
            nics: vec![NicConfig {
                id: "net0".into(),
                mac: MacAddr::local_from_seed(5),
            }],
        };
        let guest = SimGuest::create(config, NativeLayout::Kvm, crate::vmm::WorkloadSpec::idle()).expect("guest");
        SourcePlane::spawn(
            Arc::new(guest),
            link.data_tx.clone(),
            link.pool.clone(),
            Arc::new(AtomicU64::new(0)),
            PlaneEncoding::default(),
        )
        .expect("plane")
    }

    /// The pages of the next frame on `lane`, and the frame's flags.
    fn next_pages(rx: &DataReceiver, lane: Lane) -> (Vec<u64>, u8) {
        match rx.recv_lane_timeout(lane, WAIT) {
            DataRecv::Frame(f) => {
                let batch = PageBatch::decode(frame_body(&f).expect("body")).expect("batch");
                (batch.entries().map(|(p, _, _)| p).collect(), batch.flags)
            }
            other => panic!("no frame on {lane:?}: {other:?}"),
        }
    }

    #[test]
    fn test_a_pull_on_the_lane_is_served_while_the_push_waits_and_prepages_what_follows() {
        let (src, dst) = pair(Shaping::default());
        let plane = source_plane(&src);
        let _push = plane.start_postcopy(PageSet::full(PAGES)).expect("push");
        // Nobody reads the bulk lane yet: the push fills it and waits for room.
        let deadline = std::time::Instant::now() + WAIT;
        while plane.batches_sent() < crate::link::DATA_CHANNEL_FRAMES as u64 {
            assert!(std::time::Instant::now() < deadline, "the push fills the bulk lane");
            std::thread::yield_now();
        }
        assert_eq!(dst.data_rx.ask(&[2000]), PullAsk::Sent);
        let (pulled, flags) = next_pages(&dst.data_rx, Lane::Urgent);
        assert_eq!(pulled, vec![2000]);
        assert_ne!(flags & FLAG_PULLED, 0);
        let (prepaged, _) = next_pages(&dst.data_rx, Lane::Urgent);
        assert_eq!(prepaged, (2001..=2000 + PREPAGE_WINDOW).collect::<Vec<_>>());
        // The push takes none of those again, and goes on right after the window.
        let mut pushed = Vec::new();
        while (pushed.len() as u64) < PAGES - 1 - PREPAGE_WINDOW {
            pushed.extend(next_pages(&dst.data_rx, Lane::Bulk).0);
        }
        let jump = pushed.windows(2).find(|w| w[1] != w[0] + 1).map(|w| w[1]);
        assert_eq!(jump, Some(2001 + PREPAGE_WINDOW));
        pushed.extend(pulled.iter().chain(&prepaged));
        pushed.sort_unstable();
        assert_eq!(pushed, (0..PAGES).collect::<Vec<_>>(), "every page once");
        assert_eq!(plane.pulled(), 1);
        assert_eq!(plane.pull_paths(), PullPaths { lane: 1, control: 0 });
    }

    #[test]
    fn test_pages_asked_for_over_control_are_served_on_the_urgent_lane() {
        let (src, dst) = pair(Shaping::default());
        let plane = source_plane(&src);
        // Before post-copy's push there is nothing to prepage: the page alone goes.
        plane.pull(7);
        assert_eq!(next_pages(&dst.data_rx, Lane::Urgent).0, vec![7]);
        assert_eq!(plane.pull_paths(), PullPaths { lane: 0, control: 1 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_over_tcp_pulls_take_the_pull_connection_or_else_the_shared_ones() {
        use crate::link::tcp::{connect, serve, ServeOptions};
        for refuse_pull in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let options = ServeOptions {
                refuse_pull,
                ..ServeOptions::default()
            };
            tokio::spawn(serve(listener, tx, Arc::new(AtomicU64::new(0)), options));
            let src = connect(addr, 1, None, None, None, None).await.expect("connect");
            let dst = rx.recv().await.expect("link");
            let served = tokio::task::spawn_blocking(move || {
                let plane = source_plane(&src);
                // The target reads its bulk lane as the push fills it: without a pull
                // connection the pulled page comes behind what the data connection holds.
                let bulk = dst.data_rx.clone();
                let draining = std::thread::spawn(move || {
                    while !matches!(
                        bulk.recv_lane_timeout(Lane::Bulk, WAIT),
                        DataRecv::Closed | DataRecv::Idle
                    ) {}
                });
                let _push = plane.start_postcopy(PageSet::full(PAGES)).expect("push");
                // The engine's fallback: a request the lane does not take goes over control.
                if dst.data_rx.ask(&[3000]) != PullAsk::Sent {
                    plane.pull(3000);
                }
                assert_eq!(next_pages(&dst.data_rx, Lane::Urgent).0, vec![3000]);
                let seen = (plane.pull_paths(), dst.data_rx.has_pull_lane());
                drop((plane, src, dst));
                draining.join().expect("drained");
                seen
            });
            let (paths, lane) = tokio::time::timeout(WAIT * 2, served)
                .await
                .expect("in time")
                .expect("served");
            assert_eq!(lane, !refuse_pull);
            let expected = if refuse_pull {
                PullPaths { lane: 0, control: 1 }
            } else {
                PullPaths { lane: 1, control: 0 }
            };
            assert_eq!(paths, expected, "refuse_pull {refuse_pull}");
        }
    }
}
