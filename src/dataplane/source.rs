//! The source's data-plane thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use tokio::sync::oneshot;

use super::encoder::{EncodeStats, SourceEncoder};
use super::pull::{Owed, PullPaths, PullServer, PullShared};
use super::DataPlaneError;
use crate::dirty::PageSet;
use crate::link::{DataSender, FramePool, TokenBucket};
use crate::protocol::pages::{PageBatchBuilder, FLAG_POSTCOPY};
use crate::protocol::{PageCodecs, PageKind, BATCH_PAGES};
use crate::vmm::Guest;

/// Background push batches in post-copy are small: on a link without a pull lane of its own, a
/// pulled page that shares the data connections waits behind what they hold.
const POSTCOPY_PUSH_BATCH: usize = 32;
/// Pending pull requests the source accepts before the target must re-request.
const PULL_QUEUE: usize = 65_536;

/// How the source plane may encode pages: what negotiation allows, and the XBZRLE cache bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlaneEncoding {
    /// Encodings both ends offered and the migration asked for.
    pub codecs: PageCodecs,
    /// Most bytes of page content the XBZRLE cache may hold.
    pub xbzrle_cache_bytes: u64,
}

/// What one job (a round, or a post-copy push) sent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundStats {
    /// Pages sent with their bytes (raw, compressed or as a delta).
    pub full_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages sent on demand (post-copy pulls, included in the two above).
    pub pulled_pages: u64,
    /// Frame bytes put on the link.
    pub bytes: u64,
    /// Pages that travelled encoded, and the bytes that saved.
    pub encoding: EncodeStats,
    /// Wall time of the job.
    pub elapsed: Duration,
}

impl RoundStats {
    /// Pages sent, full and zero.
    pub fn pages(&self) -> u64 {
        self.full_pages + self.zero_pages
    }

    /// Bytes per second achieved.
    pub fn bytes_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }

    /// Page bytes moved per second: the link's throughput plus what encoding saved, which is
    /// what a page costs to send; equal to [`Self::bytes_per_sec`] without compression.
    pub fn page_bytes_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            (self.bytes + self.encoding.bytes_saved) as f64 / s
        } else {
            0.0
        }
    }

    pub(super) fn add(&mut self, o: &RoundStats) {
        self.full_pages += o.full_pages;
        self.zero_pages += o.zero_pages;
        self.pulled_pages += o.pulled_pages;
        self.bytes += o.bytes;
        self.encoding = self.encoding.plus(o.encoding);
    }
}

type Reply = oneshot::Sender<Result<RoundStats, DataPlaneError>>;

enum Job {
    Round {
        round: u32,
        pages: PageSet,
        rate: Option<u64>,
        reply: Reply,
    },
    Postcopy {
        owed: Arc<Owed>,
        reply: Reply,
    },
}

/// Handle of the source's data-plane thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct SourcePlane {
    jobs: Option<Sender<Job>>,
    pulls: Sender<u64>,
    batches: Arc<AtomicU64>,
    pull: Arc<PullShared>,
    stop: Arc<AtomicBool>,
    corrupt: Arc<AtomicBool>,
    codecs: PageCodecs,
    thread: Option<JoinHandle<()>>,
    /// The pull server: post-copy's requests, answered apart from the push.
    server: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Round { round, pages, .. } => write!(f, "Round({round}, {} pages)", pages.len()),
            Job::Postcopy { owed, .. } => write!(f, "Postcopy({} pages)", owed.unsent()),
        }
    }
}

impl SourcePlane {
    /// Starts the thread reading `guest`'s memory and sending on `link`, encoding pages as
    /// `encoding` allows. XBZRLE is left out on a link whose streams may reorder batches: a
    /// delta must reach the target after the page it is based on. `sent_bytes` is raised by
    /// every frame put on the link (live progress).
    pub fn spawn(
        guest: Arc<dyn Guest>,
        link: DataSender,
        pool: FramePool,
        sent_bytes: Arc<AtomicU64>,
        encoding: PlaneEncoding,
    ) -> Result<Self, DataPlaneError> {
        let codecs = PageCodecs {
            lz4: encoding.codecs.lz4,
            xbzrle: encoding.codecs.xbzrle && link.is_ordered(),
        };
        let encoder = (codecs != PageCodecs::NONE)
            .then(|| SourceEncoder::new(codecs, encoding.xbzrle_cache_bytes, guest.memory().page_count()));
        let (jobs, job_rx) = channel::bounded::<Job>(4);
        let (pulls, pull_rx) = channel::bounded::<u64>(PULL_QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        let pull = Arc::new(PullShared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicBool::new(false));
        let server = PullServer {
            guest: Arc::clone(&guest),
            link: link.clone(),
            pool: pool.clone(),
            stop: Arc::clone(&stop),
            corrupt: Arc::clone(&corrupt),
            sent_bytes: Arc::clone(&sent_bytes),
            batches: Arc::clone(&batches),
            shared: Arc::clone(&pull),
            pulls: pull_rx,
        };
        let worker = Worker {
            corrupt: Arc::clone(&corrupt),
            sent_bytes,
            pool,
            stop: Arc::clone(&stop),
            guest,
            link,
            batches: Arc::clone(&batches),
            pull: Arc::clone(&pull),
            encoder,
        };
        let thread = std::thread::Builder::new()
            .name("migratory-send".into())
            .spawn(move || worker.run(job_rx))
            .map_err(|e| DataPlaneError::Spawn(e.to_string()))?;
        let mut plane = Self {
            jobs: Some(jobs),
            pulls,
            batches,
            pull,
            stop,
            corrupt,
            codecs,
            thread: Some(thread),
            server: None,
        };
        // Dropping `plane` on failure stops the push thread.
        let server = std::thread::Builder::new()
            .name("migratory-pull".into())
            .spawn(move || server.run())
            .map_err(|e| DataPlaneError::Spawn(e.to_string()))?;
        plane.server = Some(server);
        Ok(plane)
    }

    /// The encodings this plane uses: the negotiated ones, less XBZRLE on a link that may
    /// reorder.
    pub fn codecs(&self) -> PageCodecs {
        self.codecs
    }

    /// Fault injection: corrupts one page of the next batch that carries page bytes (raw or
    /// encoded).
    pub fn corrupt_next_batch(&self) {
        self.corrupt.store(true, Ordering::Release);
    }

    /// Stops the current job at the next batch boundary (cancel, abort).
    pub fn abort(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Batches sent so far.
    pub fn batches_sent(&self) -> u64 {
        self.batches.load(Ordering::Acquire)
    }

    /// Pages pulled on demand so far.
    pub fn pulled(&self) -> u64 {
        self.pull.pulled.load(Ordering::Relaxed)
    }

    /// The requests served so far, by the way they came.
    pub fn pull_paths(&self) -> PullPaths {
        let [lane, control] = &self.pull.paths;
        PullPaths {
            lane: lane.load(Ordering::Relaxed),
            control: control.load(Ordering::Relaxed),
        }
    }

    fn submit(&self, job: Job) -> Result<(), DataPlaneError> {
        self.jobs
            .as_ref()
            .ok_or(DataPlaneError::Stopped)?
            .send(job)
            .map_err(|_| DataPlaneError::Stopped)
    }

    /// Sends every page of `pages` as round `round`, at most at `rate` bytes per second.
    pub async fn send_round(
        &self,
        round: u32,
        pages: PageSet,
        rate: Option<u64>,
    ) -> Result<RoundStats, DataPlaneError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Round {
            round,
            pages,
            rate,
            reply,
        })?;
        rx.await.map_err(|_| DataPlaneError::Stopped)?
    }

    /// Starts pushing `missing` in the background while serving pulls first; the returned
    /// receiver yields when every page has been sent once.
    pub fn start_postcopy(
        &self,
        missing: PageSet,
    ) -> Result<oneshot::Receiver<Result<RoundStats, DataPlaneError>>, DataPlaneError> {
        let (reply, rx) = oneshot::channel();
        // Shared before the push starts: from now on a pull takes its page off the push.
        let owed = Arc::new(Owed::new(&missing));
        let owed = Arc::clone(self.pull.owed.get_or_init(|| owed));
        self.submit(Job::Postcopy { owed, reply })?;
        Ok(rx)
    }

    /// Queues a page the target's guest is waiting for. A full queue drops the request; the
    /// target asks again.
    pub fn pull(&self, page: u64) {
        let _ = self.pulls.try_send(page);
    }
}

impl Drop for SourcePlane {
    fn drop(&mut self) {
        self.abort();
        self.jobs = None;
        for t in [self.thread.take(), self.server.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

struct Worker {
    corrupt: Arc<AtomicBool>,
    sent_bytes: Arc<AtomicU64>,
    pool: FramePool,
    stop: Arc<AtomicBool>,
    guest: Arc<dyn Guest>,
    link: DataSender,
    batches: Arc<AtomicU64>,
    pull: Arc<PullShared>,
    /// `None` without compression: pages go through the plain raw-or-zero path.
    encoder: Option<SourceEncoder>,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        // Pulls are the pull server's: this thread only runs jobs.
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Round {
                    round,
                    pages,
                    rate,
                    reply,
                } => {
                    if let Some(e) = self.encoder.as_mut() {
                        e.begin_round(round);
                    }
                    let before = self.encoded();
                    let mut result = self.send_round(round, &pages, rate);
                    self.account_encoding(&mut result, before);
                    let _ = reply.send(result);
                }
                Job::Postcopy { owed, reply } => {
                    if let Some(e) = self.encoder.as_mut() {
                        e.end_deltas();
                    }
                    let before = self.encoded();
                    let mut result = self.push(&owed);
                    self.account_encoding(&mut result, before);
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn encoded(&self) -> EncodeStats {
        self.encoder.as_ref().map(|e| e.stats()).unwrap_or_default()
    }

    /// Adds what the encoder did during a job to its stats; after a failed job, no cached page
    /// content is trusted any more (a batch may not have gone out).
    fn account_encoding(&mut self, result: &mut Result<RoundStats, DataPlaneError>, before: EncodeStats) {
        let during = self.encoded().since(before);
        match result {
            Ok(stats) => stats.encoding = stats.encoding.plus(during),
            Err(_) => {
                if let Some(e) = self.encoder.as_mut() {
                    e.forget();
                }
            }
        }
    }

    fn batch(&self, round: u32, flags: u8) -> PageBatchBuilder {
        PageBatchBuilder::with_buffer(self.pool.take(), round, flags)
    }

    fn check(&self, page: u64) -> Result<(), DataPlaneError> {
        let pages = self.guest.memory().page_count();
        if page >= pages {
            return Err(DataPlaneError::PageOutOfRange { page, pages });
        }
        Ok(())
    }

    fn ship(
        &self,
        batch: PageBatchBuilder,
        stats: &mut RoundStats,
        pace: Option<&mut TokenBucket>,
    ) -> Result<(), DataPlaneError> {
        let frame = self.finish(batch)?;
        if let Some(bucket) = pace {
            let wait = bucket.take(frame.len() as u64);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let stats_len = frame.len() as u64;
        stats.bytes += stats_len;
        self.link
            .send(frame, &self.stop)
            .map_err(|_| DataPlaneError::LinkClosed)?;
        self.batches.fetch_add(1, Ordering::Release);
        self.sent_bytes.fetch_add(stats_len, Ordering::Relaxed);
        Ok(())
    }

    /// Closes a batch into its frame, unless the job was stopped.
    fn finish(&self, mut batch: PageBatchBuilder) -> Result<bytes::Bytes, DataPlaneError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(DataPlaneError::Stopped);
        }
        // Fault injection: a batch with page bytes, raw or encoded, carries one flipped byte.
        if self.corrupt.load(Ordering::Acquire) && batch.corrupt_payload() {
            self.corrupt.store(false, Ordering::Release);
        }
        Ok(batch.finish())
    }

    /// Adds `page` to `batch`, through the encoder if compression is on.
    fn add(&mut self, batch: &mut PageBatchBuilder, page: u64, stats: &mut RoundStats) -> Result<(), DataPlaneError> {
        self.check(page)?;
        let memory = self.guest.memory();
        let added = match self.encoder.as_mut() {
            Some(e) => batch.add_encoded(memory, page, e),
            None => batch.add_from(memory, page),
        };
        match added.map_err(|_| DataPlaneError::PageOutOfRange {
            page,
            pages: memory.page_count(),
        })? {
            PageKind::Full | PageKind::Lz4 | PageKind::Delta => stats.full_pages += 1,
            PageKind::Zero => stats.zero_pages += 1,
        }
        Ok(())
    }

    fn send_round(&mut self, round: u32, pages: &PageSet, rate: Option<u64>) -> Result<RoundStats, DataPlaneError> {
        let started = Instant::now();
        let mut pace = rate.map(TokenBucket::new);
        let mut stats = RoundStats::default();
        let mut batch = self.batch(round, 0);
        for page in pages.iter() {
            self.add(&mut batch, page, &mut stats)?;
            if batch.len() >= BATCH_PAGES {
                let full = std::mem::replace(&mut batch, self.batch(round, 0));
                self.ship(full, &mut stats, pace.as_mut())?;
            }
        }
        if !batch.is_empty() {
            self.ship(batch, &mut stats, pace.as_mut())?;
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    /// Pushes every page the target is still owed once, from just after the latest pull's
    /// prepaging window (guests fault near where they faulted last), while the pull server
    /// answers requests on its own thread; what it sent is added to the figures.
    fn push(&mut self, owed: &Owed) -> Result<RoundStats, DataPlaneError> {
        let started = Instant::now();
        let total = self.guest.memory().page_count();
        let mut stats = RoundStats::default();
        let mut cursor = 0u64;
        while owed.unsent() > 0 {
            if let Some(e) = self.pull.error() {
                return Err(e);
            }
            if let Some(hint) = owed.take_hint() {
                cursor = hint;
            }
            let mut batch = self.batch(u32::MAX, FLAG_POSTCOPY);
            let mut scanned = 0u64;
            while batch.len() < POSTCOPY_PUSH_BATCH && scanned < total && owed.unsent() > 0 {
                let p = cursor;
                cursor = (cursor + 1) % total.max(1);
                scanned += 1;
                if owed.claim(p) {
                    self.add(&mut batch, p, &mut stats)?;
                }
            }
            if !batch.is_empty() {
                self.ship(batch, &mut stats, None)?;
            }
        }
        stats.add(&self.pull.take_stats());
        stats.elapsed = started.elapsed();
        Ok(stats)
    }
}
