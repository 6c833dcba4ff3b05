//! `precopy`: the data plane, dirty logging, and one round at a time. The plan decides between
//! rounds; this file measures what it decides on.

use std::sync::Arc;

use actix::prelude::*;

use super::fail::{local, Fail};
use super::SourceRun;
use crate::clock;
use crate::dataplane::{PlaneEncoding, RoundStats, SourcePlane};
use crate::dirty::{CollectDirtyPages, DirtyTracker, PageSet, StartDirtyLog};
use crate::engine::ask::{ask, GUEST_ASK};
use crate::engine::events::MigrationEvent;
use crate::engine::plan::RoundObservation;
use crate::engine::policy;
use crate::engine::testpoint;
use crate::protocol::{ControlMessage, PageCodecs};
use crate::telemetry::metric;

/// Smallest round, in link bytes, whose rate is taken as the link's bandwidth.
const MIN_BANDWIDTH_SAMPLE: u64 = 4 << 20;

impl SourceRun {
    /// Starts the data plane on the link; every page is pending. `resends`: pages may go more
    /// than once, so a delta cache can pay for itself.
    pub(super) fn start_plane(&mut self, resends: bool) -> Result<(), Fail> {
        let encoding = PlaneEncoding {
            codecs: PageCodecs {
                xbzrle: self.codecs.xbzrle && resends,
                ..self.codecs
            },
            xbzrle_cache_bytes: self.s.req.xbzrle_cache_bytes,
        };
        let plane = SourcePlane::spawn(
            Arc::clone(&self.s.guest),
            self.s.end.data_tx.clone(),
            self.s.end.pool.clone(),
            Arc::clone(&self.s.progress.sent_bytes),
            encoding,
        )
        .map_err(local)?;
        self.compression.methods = plane.codecs().names().into_iter().map(String::from).collect();
        self.plane = Some(plane);
        self.pending = PageSet::full(self.s.guest.memory().page_count());
        Ok(())
    }

    pub(super) async fn start_dirty_log(&mut self) -> Result<(), Fail> {
        let tracker = DirtyTracker::new(Arc::clone(&self.s.guest) as Arc<dyn crate::dirty::DirtyLogSource>).start();
        ask(&tracker, StartDirtyLog, "dirty log start", GUEST_ASK)
            .await
            .map_err(local)?
            .map_err(local)?;
        self.tracker = Some(tracker);
        self.precopy_started = clock::now();
        Ok(())
    }

    /// Sends `pages` through the data plane while the control link is watched.
    pub(super) async fn send_round(
        &mut self,
        round: u32,
        pages: PageSet,
        rate: Option<u64>,
    ) -> Result<RoundStats, Fail> {
        let mut inbox = self.inbox.take().ok_or_else(|| Fail::Link("no link".into()))?;
        let result = match self.plane.as_ref() {
            Some(plane) => self.with_cancel(plane.send_round(round, pages, rate), &mut inbox).await,
            None => Err(Fail::Local("no data plane".into())),
        };
        self.inbox = Some(inbox);
        let stats = result?;
        self.account(&stats);
        Ok(stats)
    }

    /// Round `round`: sends the pending pages, collects what the guest dirtied meanwhile (the
    /// next pending set), and reports what was measured.
    pub(super) async fn round(&mut self, round: u32, rate: Option<u64>) -> Result<RoundObservation, Fail> {
        let tracker = self
            .tracker
            .clone()
            .ok_or_else(|| Fail::Local("a round without dirty logging".into()))?;
        let to_send = self.take_pending();
        let round_started = clock::now();
        self.set_remaining(to_send.len());
        let stats = self.send_round(round, to_send, rate).await?;
        self.rounds += 1;
        self.first_pass_done = true;
        let batches_total = self.plane.as_ref().map(|p| p.batches_sent()).unwrap_or(0);
        self.send(ControlMessage::RoundDone { round, batches_total }).await?;
        let dirty = ask(&tracker, CollectDirtyPages, "dirty log collect", GUEST_ASK)
            .await
            .map_err(local)?
            .map_err(local)?;
        let round_time = clock::now().duration_since(round_started).as_secs_f64().max(1e-6);
        testpoint::hold(testpoint::Point::PrecopyRound, self.s.id).await;
        let dirty_rate = dirty.len() as f64 / round_time;
        // A round of a few pages measures latency, not bandwidth: it keeps the last figure.
        if stats.bytes >= MIN_BANDWIDTH_SAMPLE || (stats.bytes > 0 && self.bandwidth == 0.0) {
            // In page bytes: the policy predicts from pages, and with compression a page
            // costs less than its size on the link.
            self.bandwidth = stats.page_bytes_per_sec().max(1.0);
        }
        let remaining = dirty.len();
        let fixed = self.fixed_switchover(4096);
        let expected = policy::predicted_downtime(remaining, self.bandwidth, fixed);
        self.set_remaining(remaining);
        metrics::gauge!(metric::DIRTY_RATE_PAGES_PER_SECOND).set(dirty_rate);
        metrics::gauge!(metric::LINK_THROUGHPUT_BYTES_PER_SECOND).set(stats.bytes_per_sec());
        metrics::gauge!(metric::EXPECTED_DOWNTIME_SECONDS).set(expected.as_secs_f64());
        self.s
            .progress
            .set_round(round, remaining, dirty_rate, self.bandwidth, expected.as_secs_f64());
        let _ = self.s.events.send(MigrationEvent::RoundCompleted {
            round,
            pages_sent: stats.pages(),
            remaining_pages: remaining,
            dirty_pages_per_sec: dirty_rate,
            bytes_per_sec: self.bandwidth,
            expected_downtime: expected,
        });
        self.pending = dirty;
        Ok(RoundObservation {
            round,
            remaining_pages: remaining,
            dirty_pages_per_sec: dirty_rate,
            bandwidth_bytes_per_sec: self.bandwidth,
            fixed_switchover: fixed,
            precopy_elapsed: clock::now().duration_since(self.precopy_started),
            sent_pages: self.pages.normal + self.pages.zero + self.pages.retransmitted,
            vm_pages: self.s.guest.memory().page_count(),
        })
    }
}
