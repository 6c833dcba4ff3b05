//! The source's data-plane thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use tokio::sync::oneshot;

use super::encoder::{EncodeStats, SourceEncoder};
use super::DataPlaneError;
use crate::dirty::PageSet;
use crate::link::{DataSender, FramePool, TokenBucket};
use crate::protocol::pages::{PageBatchBuilder, FLAG_POSTCOPY, FLAG_PULLED};
use crate::protocol::{PageCodecs, PageKind, BATCH_PAGES};
use crate::vmm::Guest;

/// Background push batches in post-copy are small so a pull waits behind at most one of them.
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

    fn add(&mut self, o: &RoundStats) {
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
        missing: PageSet,
        reply: Reply,
    },
}

/// Handle of the source's data-plane thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct SourcePlane {
    jobs: Option<Sender<Job>>,
    pulls: Sender<u64>,
    batches: Arc<AtomicU64>,
    pulled: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    corrupt: Arc<AtomicBool>,
    codecs: PageCodecs,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Round { round, pages, .. } => write!(f, "Round({round}, {} pages)", pages.len()),
            Job::Postcopy { missing, .. } => write!(f, "Postcopy({} pages)", missing.len()),
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
        let pulled = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            corrupt: Arc::clone(&corrupt),
            sent_bytes,
            pool,
            stop: Arc::clone(&stop),
            guest,
            link,
            batches: Arc::clone(&batches),
            pulled_total: Arc::clone(&pulled),
            pulls: pull_rx,
            encoder,
        };
        let thread = std::thread::Builder::new()
            .name("migratory-send".into())
            .spawn(move || worker.run(job_rx))
            .map_err(|e| DataPlaneError::Spawn(e.to_string()))?;
        Ok(Self {
            jobs: Some(jobs),
            pulls,
            batches,
            pulled,
            stop,
            corrupt,
            codecs,
            thread: Some(thread),
        })
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
        self.pulled.load(Ordering::Relaxed)
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
        self.submit(Job::Postcopy { missing, reply })?;
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
        if let Some(t) = self.thread.take() {
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
    pulled_total: Arc<AtomicU64>,
    pulls: Receiver<u64>,
    /// `None` without compression: pages go through the plain raw-or-zero path.
    encoder: Option<SourceEncoder>,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        let mut pulling = false;
        loop {
            let job = if pulling {
                // After the push ends, keep answering pulls (re-requests of pages in flight)
                // until the migration drops us.
                channel::select! {
                    recv(jobs) -> j => match j { Ok(j) => j, Err(_) => return },
                    recv(self.pulls) -> p => {
                        if let Ok(p) = p {
                            if self.send_pulled(p).is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                }
            } else {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            };
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
                Job::Postcopy { missing, reply } => {
                    pulling = true;
                    if let Some(e) = self.encoder.as_mut() {
                        e.end_deltas();
                    }
                    let before = self.encoded();
                    let mut result = self.push(&missing);
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
        self.ship_on(batch, stats, pace, false)
    }

    /// Sends a finished batch; `urgent` batches (pulls) take the lane that never queues behind
    /// bulk frames.
    fn ship_on(
        &self,
        batch: PageBatchBuilder,
        stats: &mut RoundStats,
        pace: Option<&mut TokenBucket>,
        urgent: bool,
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
        let sent = if urgent {
            self.link.send_urgent(frame, &self.stop)
        } else {
            self.link.send(frame, &self.stop)
        };
        sent.map_err(|_| DataPlaneError::LinkClosed)?;
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

    /// Ships a post-copy push batch. While it waits for room on the link, pulls that arrive are
    /// served first, and their pages are appended to `served` (the push need not send them).
    fn ship_push(
        &mut self,
        batch: PageBatchBuilder,
        stats: &mut RoundStats,
        served: &mut Vec<u64>,
    ) -> Result<(), DataPlaneError> {
        let frame = self.finish(batch)?;
        let len = frame.len() as u64;
        stats.bytes += len;
        let mut sent = self.link.send_unless(frame, &self.stop, &self.pulls);
        while let Some((held, page)) = sent.map_err(|_| DataPlaneError::LinkClosed)? {
            let s = self.send_pulled(page)?;
            stats.add(&s);
            served.push(page);
            sent = self.link.resend(held, &self.stop, &self.pulls);
        }
        self.batches.fetch_add(1, Ordering::Release);
        self.sent_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn add(&mut self, batch: &mut PageBatchBuilder, page: u64, stats: &mut RoundStats) -> Result<(), DataPlaneError> {
        self.add_as(batch, page, stats, true)
    }

    /// Adds `page` to `batch`, through the encoder if `encode` and compression is on.
    fn add_as(
        &mut self,
        batch: &mut PageBatchBuilder,
        page: u64,
        stats: &mut RoundStats,
        encode: bool,
    ) -> Result<(), DataPlaneError> {
        self.check(page)?;
        let memory = self.guest.memory();
        let added = match self.encoder.as_mut().filter(|_| encode) {
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

    fn send_pulled(&mut self, page: u64) -> Result<RoundStats, DataPlaneError> {
        let mut stats = RoundStats::default();
        let mut batch = self.batch(u32::MAX, FLAG_POSTCOPY | FLAG_PULLED);
        // Raw: a guest waits on each pulled page, and on a fast link compressing it costs
        // more time than the bytes it saves.
        self.add_as(&mut batch, page, &mut stats, false)?;
        // Drain whatever else is already waiting into the same urgent batch.
        while batch.len() < POSTCOPY_PUSH_BATCH {
            match self.pulls.try_recv() {
                Ok(p) => self.add_as(&mut batch, p, &mut stats, false)?,
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        self.ship_on(batch, &mut stats, None, true)?;
        stats.pulled_pages = n;
        self.pulled_total.fetch_add(n, Ordering::Relaxed);
        Ok(stats)
    }

    /// Pushes every missing page once, serving pulls first and continuing from just after the
    /// most recent pull (guests fault near where they faulted last).
    fn push(&mut self, missing: &PageSet) -> Result<RoundStats, DataPlaneError> {
        let started = Instant::now();
        let total = missing.universe();
        let mut pending = missing.clone();
        let mut left = pending.len();
        let mut stats = RoundStats::default();
        let mut cursor = 0u64;
        let mut served = Vec::new();
        while left > 0 {
            while let Ok(p) = self.pulls.try_recv() {
                let s = self.send_pulled(p)?;
                stats.add(&s);
                served.push(p);
            }
            for p in served.drain(..) {
                cursor = (p + 1) % total.max(1);
                // A pulled page no longer needs pushing.
                if pending.contains(p) {
                    pending.remove(p);
                    left -= 1;
                }
            }
            let mut batch = self.batch(u32::MAX, FLAG_POSTCOPY);
            let mut scanned = 0u64;
            // A pull that arrives while the batch fills cuts it short: it goes out first.
            while batch.len() < POSTCOPY_PUSH_BATCH && scanned < total && left > 0 && self.pulls.is_empty() {
                let p = cursor;
                cursor = (cursor + 1) % total;
                scanned += 1;
                if pending.contains(p) {
                    pending.remove(p);
                    left -= 1;
                    self.add(&mut batch, p, &mut stats)?;
                }
            }
            if !batch.is_empty() {
                self.ship_push(batch, &mut stats, &mut served)?;
            }
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }
}
