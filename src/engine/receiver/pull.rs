//! Post-copy's pull phase (pages the guest wants, requested from the source, until it holds
//! them all), and the digests of every page as received that the source checks its memory
//! against.

use std::sync::Arc;

use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_64;

use super::finish::{failed, prefer_peer_abort, Exit};
use super::run::{Flow, TargetRun};
use crate::link::{LinkEvents, PullAsk};
use crate::protocol::ControlMessage;
use crate::units::{PageIndex, PAGE_SIZE};
use crate::vmm::{FaultSink, Guest, GuestStats};

/// Digests per `Digests` message: 8 MiB of payload, well under the frame limit.
const DIGESTS_PER_MESSAGE: usize = 1 << 20;
/// Page requests batched into one `PageRequest`.
const PULL_BATCH: usize = 64;
/// Most mismatching pages listed in a report.
pub(crate) const MAX_LISTED_MISMATCHES: usize = 64;

/// Pages the guest touched before they arrived, and pages that arrived damaged: the pull
/// phase asks the source for them.
#[derive(Debug)]
pub(super) struct Wanted {
    /// Given to the guest (its faults) and to the data plane (its refetches).
    pub(super) sink: FaultSink,
    pub(super) pages: mpsc::UnboundedReceiver<u64>,
}

impl Wanted {
    pub(super) fn new() -> Self {
        let (sink, pages) = mpsc::unbounded_channel();
        Self { sink, pages }
    }
}

impl TargetRun {
    /// Asks the source for `first` and for whatever else is wanted already, in one request: on
    /// the link's pull lane if it has one (a connection of its own, served ahead of the push),
    /// else (a peer without pull connections, or a full lane) in a `PageRequest`.
    pub(super) async fn request_pages(&mut self, first: u64) -> Flow {
        let pages = batch_after(first, &mut self.wanted.pages, PULL_BATCH);
        if let Some(plane) = &self.plane {
            if plane.ask(&pages) == PullAsk::Sent {
                return Ok(());
            }
        }
        self.send(ControlMessage::PageRequest { pages }).await
    }

    /// The data thread applied a batch in the pull phase (`changed`), or it ended.
    pub(super) async fn on_applied(&mut self, changed: bool, inbox: &mut LinkEvents) -> Flow {
        if !changed {
            let err = self
                .plane
                .as_ref()
                .and_then(|p| p.error())
                .map(|e| e.to_string())
                .unwrap_or_else(|| "data plane stopped".into());
            return Err(prefer_peer_abort(Exit::LinkLost(err), inbox, self.params.keepalive.timeout).await);
        }
        self.check_pull_done().await
    }

    /// Once every page is here, the pull is over: `Complete`, then the digests.
    pub(super) async fn check_pull_done(&mut self) -> Flow {
        let guest = self.guest()?;
        if guest.missing_pages() == 0 {
            self.pulling = false;
            self.send(ControlMessage::Complete).await?;
            self.send_digests(true).await?;
        }
        Ok(())
    }

    /// The digest of every page as received. `local_check`: also hash current memory and list
    /// pages the guest has not written since activation that differ (post-copy, after the pull;
    /// the guest runs meanwhile).
    pub(super) async fn send_digests(&self, local_check: bool) -> Flow {
        let guest = self.guest()?;
        let plane = self.plane("no data plane")?;
        let pages = guest.memory().page_count();
        let received = plane.received_digests(0, pages as usize);
        let mismatches = if local_check {
            let g = Arc::clone(&guest);
            let received_copy = received.clone();
            tokio::task::spawn_blocking(move || local_mismatches(g.as_ref(), &received_copy))
                .await
                .map_err(failed)?
        } else {
            Vec::new()
        };
        for msg in digest_messages(&received, DIGESTS_PER_MESSAGE, mismatches, guest.stats()) {
            self.send(msg).await?;
        }
        Ok(())
    }
}

/// `first`, then pages already waiting in `rx`, up to `max` in all.
fn batch_after(first: u64, rx: &mut mpsc::UnboundedReceiver<u64>, max: usize) -> Vec<u64> {
    let mut pages = vec![first];
    while pages.len() < max {
        match rx.try_recv() {
            Ok(p) => pages.push(p),
            Err(_) => break,
        }
    }
    pages
}

/// The `Digests` messages that carry `received`, `per_message` digests each. Only the last
/// says so, and carries the mismatches and the guest's fault counters.
fn digest_messages(
    received: &[u64],
    per_message: usize,
    mismatches: Vec<u64>,
    stats: GuestStats,
) -> impl Iterator<Item = ControlMessage> + '_ {
    let parts = received.len().div_ceil(per_message);
    let mut mismatches = Some(mismatches);
    received.chunks(per_message).enumerate().map(move |(i, part)| {
        let last = i + 1 == parts;
        ControlMessage::Digests {
            first_page: (i * per_message) as u64,
            digests: part.to_vec(),
            last,
            memory_mismatches: if last {
                mismatches.take().unwrap_or_default()
            } else {
                Vec::new()
            },
            faults: if last { stats.faults } else { 0 },
            fault_wait_s: if last { stats.fault_wait_s } else { 0.0 },
        }
    })
}

/// Pages the guest has not written since activation whose memory differs from what arrived.
fn local_mismatches(guest: &dyn Guest, received: &[u64]) -> Vec<u64> {
    let memory = guest.memory();
    let zero = xxh3_64(&[0u8; PAGE_SIZE]);
    let current: Vec<u64> = (0..memory.page_count())
        .map(|p| memory.page_digest(PageIndex(p)).unwrap_or(zero ^ 1))
        .collect();
    // Snapshot after hashing: a page written during the scan is dirty by now. A log that
    // cannot be read leaves the bitmap as last synced; the mismatch list is advice anyway.
    if let Err(e) = guest.sync_dirty_log() {
        tracing::warn!(error = %e, "dirty log sync for the mismatch report");
    }
    let touched = guest.dirty_bitmap().snapshot();
    current
        .iter()
        .zip(received)
        .enumerate()
        .filter(|(p, (c, r))| !touched.contains(*p as u64) && c != r)
        .map(|(p, _)| p as u64)
        .take(MAX_LISTED_MISMATCHES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::reserved_guest;
    use super::*;

    #[test]
    fn test_a_page_request_takes_what_waits_up_to_its_batch() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for p in 10..20 {
            tx.send(p).expect("queued");
        }
        assert_eq!(batch_after(1, &mut rx, 4), vec![1, 10, 11, 12]);
        assert_eq!(batch_after(2, &mut rx, 64), vec![2, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(batch_after(3, &mut rx, 64), vec![3], "nothing else waits");
    }

    #[test]
    fn test_digests_go_in_parts_and_only_the_last_carries_the_rest() {
        let received: Vec<u64> = (100..107).collect();
        let stats = GuestStats {
            faults: 5,
            fault_wait_s: 0.25,
            ..GuestStats::default()
        };
        let sent: Vec<_> = digest_messages(&received, 3, vec![4], stats).collect();
        let parts: Vec<_> = sent
            .iter()
            .map(|m| match m {
                ControlMessage::Digests {
                    first_page,
                    digests,
                    last,
                    memory_mismatches,
                    faults,
                    ..
                } => (*first_page, digests.clone(), *last, memory_mismatches.clone(), *faults),
                other => panic!("not digests: {other:?}"),
            })
            .collect();
        assert_eq!(
            parts,
            vec![
                (0, vec![100, 101, 102], false, vec![], 0),
                (3, vec![103, 104, 105], false, vec![], 0),
                (6, vec![106], true, vec![4], 5),
            ]
        );
        let one: Vec<_> = digest_messages(&received, 7, Vec::new(), stats).collect();
        assert!(matches!(
            one.as_slice(),
            [ControlMessage::Digests {
                last: true,
                first_page: 0,
                ..
            }]
        ));
    }

    #[test]
    fn test_mismatches_skip_pages_the_guest_wrote_since() {
        let guest = reserved_guest("mm", 16);
        let memory = guest.memory();
        let mut received: Vec<u64> = (0..memory.page_count())
            .map(|p| memory.page_digest(PageIndex(p)).expect("in range"))
            .collect();
        assert!(local_mismatches(guest.as_ref(), &received).is_empty(), "as received");
        // Page 3 differs from what arrived; page 5 too, but the guest wrote it since.
        received[3] ^= 1;
        received[5] ^= 1;
        guest.start_dirty_log().expect("logging");
        guest.dirty_bitmap().set(5);
        assert_eq!(local_mismatches(guest.as_ref(), &received), vec![3]);
    }
}
