//! Post-copy recovery: a link lost in the pull is replaced, and the pull carries on from the
//! pages the target still lacks; an operator's retry of a held copy starts here too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::fail::{local, Fail};
use super::SourceRun;
use crate::clock;
use crate::dataplane::{PlaneEncoding, SourcePlane};
use crate::dirty::PageSet;
use crate::engine::error::Side;
use crate::engine::events::MigrationEvent;
use crate::engine::stage::Stage;
use crate::link::{CloseLink, LinkEnd};
use crate::protocol::{ControlMessage, PageCodecs};
use crate::telemetry::metric;

impl SourceRun {
    /// `migrate --recover`: the held copy of a post-copy migration whose recovery timed out.
    /// The target (its copy awaiting pages) still takes a recovery link; the run starts in the
    /// pull, committed, and reconnects first.
    pub(super) fn assume_pull(&mut self) {
        self.s.committed.store(true, Ordering::Release);
        self.machine.assume_pull();
        self.open_stage = Some(Stage::Pull);
        self.stage_started = clock::now();
        self.lost = Some("recovery asked for by the operator".into());
    }

    /// Post-copy recovery, in the manner of QEMU's migrate-recover: the link failed in the pull
    /// phase. The target paused the guest; this side keeps its paused copy and reconnects until
    /// the recovery timeout, then carries the pull on from the pages the target still lacks.
    pub(super) async fn recover(&mut self) -> Result<(), Fail> {
        let cause = self.lost.take().unwrap_or_else(|| "the link was lost".into());
        let started = clock::now();
        tracing::warn!(cause = %cause, "post-copy link lost; reconnecting");
        if let Some(plane) = self.plane.take() {
            plane.abort();
            // Pages this plane's push sent are in the byte count; its pulls are counted here.
            let pulled = plane.pulled();
            self.pages.pulled += pulled;
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "pulled").increment(pulled);
        }
        if let Some(link) = self.link.take() {
            link.do_send(CloseLink);
        }
        self.inbox = None;
        let _ = self.s.events.send(MigrationEvent::PullInterrupted {
            side: Side::Source,
            reason: cause.clone(),
            missing_pages: 0,
        });
        let timeout = self.s.req.recovery_timeout;
        let deadline = started + timeout;
        let mut last = String::from("no attempt yet");
        let mut backoff = Duration::from_millis(50);
        loop {
            let now = clock::now();
            if now >= deadline {
                return Err(Fail::RecoveryTimeout {
                    cause,
                    last,
                    after: timeout,
                });
            }
            // An injected outage: nothing gets through until it ends.
            let down_until = self.faults.as_ref().and_then(|f| f.link_down_until.get());
            if let Some(until) = down_until.filter(|u| *u > now) {
                last = "the link is down (injected fault)".into();
                tokio::time::sleep_until(until.min(deadline)).await;
                continue;
            }
            let bound = deadline.duration_since(now).min(self.s.req.step_timeout);
            let route = self.s.route.clone();
            match tokio::time::timeout(bound, route.connect()).await {
                Ok(Ok(end)) => match tokio::time::timeout(bound, self.resume_on(end)).await {
                    Ok(Ok(missing)) => {
                        self.recoveries += 1;
                        tracing::info!(
                            recoveries = self.recoveries,
                            missing = missing.len(),
                            after_ms = clock::now().duration_since(started).as_millis() as u64,
                            "post-copy pull resumed on a new link"
                        );
                        let _ = self.s.events.send(MigrationEvent::PullResumed {
                            side: Side::Source,
                            recoveries: self.recoveries,
                            missing_pages: missing.len(),
                        });
                        self.pending = missing;
                        return Ok(());
                    }
                    // The target answered and refused: nothing there awaits this pull.
                    Ok(Err(fail @ Fail::Aborted { .. })) | Ok(Err(fail @ Fail::Protocol(_))) => {
                        self.drop_link();
                        return Err(fail);
                    }
                    Ok(Err(fail)) => {
                        self.drop_link();
                        last = fail.into_error(Some(Stage::Pull), self.s.id).to_string();
                    }
                    Err(_) => {
                        self.drop_link();
                        last = "the target did not answer the recovery handshake".into();
                    }
                },
                Ok(Err(e)) => last = e,
                Err(_) => last = "connecting timed out".into(),
            }
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(clock::now()))).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// The recovery handshake on a new link; returns the pages the target still lacks and
    /// leaves a data plane running on the new link.
    async fn resume_on(&mut self, end: LinkEnd) -> Result<PageSet, Fail> {
        let LinkEnd {
            control,
            mut data_tx,
            data_rx: _,
            pool,
        } = end;
        if let Some(faults) = &self.faults {
            faults.decorate(&mut data_tx);
        }
        self.open_link(control);
        self.handshake(true).await?;
        let pages = self.s.guest.memory().page_count();
        let missing = match self.expect("Resumed").await? {
            ControlMessage::Resumed { missing } => PageSet::from_bytes(&missing, pages).ok_or_else(|| {
                Fail::Protocol(format!(
                    "missing-page bitmap of {} bytes for {pages} pages",
                    missing.len()
                ))
            })?,
            other => return Err(Fail::Protocol(format!("expected Resumed, got {}", other.name()))),
        };
        // Post-copy sends no delta: the target's guest writes its own pages by now.
        let encoding = PlaneEncoding {
            codecs: PageCodecs {
                xbzrle: false,
                ..self.codecs
            },
            xbzrle_cache_bytes: 0,
        };
        let plane = SourcePlane::spawn(
            Arc::clone(&self.s.guest),
            data_tx.clone(),
            pool,
            Arc::clone(&self.s.progress.sent_bytes),
            encoding,
        )
        .map_err(local)?;
        // Link faults (stall, collapse) act on the link in use.
        self.s.end.data_tx = data_tx;
        self.plane = Some(plane);
        Ok(missing)
    }
}
