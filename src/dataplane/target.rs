//! The target's data-plane thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

use super::DataPlaneError;
use crate::link::{DataReceiver, DataRecv, FramePool};
use crate::protocol::frame::frame_body;
use crate::protocol::pages::FLAG_POSTCOPY;
use crate::protocol::PageBatch;
use crate::units::{PageIndex, PAGE_SIZE};
use crate::vmm::Guest;

/// Handle of the target's data-plane thread: applies batches, counts them, and records the
/// digest of every page as received (the target side of verification).
#[derive(Debug)]
pub struct TargetPlane {
    guest: Arc<dyn Guest>,
    applied: watch::Receiver<u64>,
    digests: Arc<Vec<AtomicU64>>,
    received_bytes: Arc<AtomicU64>,
    error: Arc<Mutex<Option<DataPlaneError>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the apply loop looks up from an idle link to check for a stop request.
const STOP_POLL: Duration = Duration::from_millis(20);

impl TargetPlane {
    /// Starts the thread writing batches from `link` into `guest`'s memory.
    pub fn spawn(guest: Arc<dyn Guest>, link: DataReceiver, pool: FramePool) -> Result<Self, DataPlaneError> {
        let pages = guest.memory().page_count();
        let mut plane = Self {
            guest,
            applied: watch::channel(0u64).1,
            digests: Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect()),
            received_bytes: Arc::new(AtomicU64::new(0)),
            error: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
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
        // Each thread owns its sender: when it ends, every watcher of its count learns so.
        let (tx, applied) = watch::channel(self.applied());
        let guest = Arc::clone(&self.guest);
        let (d, e, halt, bytes) = (
            Arc::clone(&self.digests),
            Arc::clone(&self.error),
            Arc::clone(&self.stop),
            Arc::clone(&self.received_bytes),
        );
        let thread = std::thread::Builder::new()
            .name("migratory-recv".into())
            .spawn(move || {
                if let Err(err) = apply_loop(guest.as_ref(), &link, &pool, &d, &tx, &halt, &bytes) {
                    *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                    // Wake anyone waiting on the count so they see the error.
                    tx.send_modify(|_| {});
                }
            })
            .map_err(|e| DataPlaneError::Spawn(e.to_string()))?;
        self.applied = applied;
        self.thread = Some(thread);
        Ok(())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

fn apply_loop(
    guest: &dyn Guest,
    link: &DataReceiver,
    pool: &FramePool,
    digests: &[AtomicU64],
    applied: &watch::Sender<u64>,
    stop: &AtomicBool,
    received_bytes: &AtomicU64,
) -> Result<(), DataPlaneError> {
    let memory = guest.memory();
    let pages = memory.page_count();
    let zero_digest = xxh3_64(&[0u8; PAGE_SIZE]);
    // Batches of different rounds may overtake each other on parallel streams: a page is
    // written only by a batch of its latest round seen so far.
    let mut page_round = vec![0u32; pages as usize];
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let frame = match link.recv_timeout(STOP_POLL) {
            DataRecv::Frame(f) => f,
            DataRecv::Idle => continue,
            DataRecv::Closed => return Ok(()),
        };
        received_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        let body = frame_body(&frame).map_err(|e| DataPlaneError::BadBatch(e.to_string()))?;
        let batch = PageBatch::decode(body).map_err(|e| DataPlaneError::BadBatch(e.to_string()))?;
        let postcopy = batch.flags & FLAG_POSTCOPY != 0;
        for (page, data, sent_digest) in batch.pages() {
            if page >= pages {
                return Err(DataPlaneError::PageOutOfRange { page, pages });
            }
            // After activation the guest owns present pages: only a missing page is written,
            // once, whichever of push and pull brings it first.
            if postcopy {
                if !guest.claim_page(page) {
                    continue;
                }
            } else {
                let seen = &mut page_round[page as usize];
                if batch.round < *seen {
                    continue;
                }
                *seen = batch.round;
            }
            let digest = match data {
                Some(bytes) => {
                    // Checked before the write: a corrupted page never reaches guest memory.
                    let digest = xxh3_64(bytes);
                    if digest != sent_digest {
                        return Err(DataPlaneError::Corrupt { page });
                    }
                    memory
                        .write_page(PageIndex(page), bytes)
                        .map_err(|_| DataPlaneError::PageOutOfRange { page, pages })?;
                    digest
                }
                None => {
                    memory
                        .zero_page(PageIndex(page))
                        .map_err(|_| DataPlaneError::PageOutOfRange { page, pages })?;
                    zero_digest
                }
            };
            digests[page as usize].store(digest, Ordering::Release);
            if postcopy {
                guest.page_installed(page);
            }
        }
        drop(batch);
        pool.give(frame);
        applied.send_modify(|n| *n += 1);
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
        let source = SimGuest::create(config(), NativeLayout::Kvm, crate::vmm::sim::WorkloadSpec::idle()).expect("src");
        let target: Arc<dyn Guest> = Arc::new(SimGuest::reserve(config(), NativeLayout::Kvm).expect("dst"));
        let (a, b) = pair(Shaping::default());
        let plane = TargetPlane::spawn(Arc::clone(&target), b.data_rx, b.pool).expect("plane");
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
}
