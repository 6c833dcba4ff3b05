//! `pull`: post-copy's last phase. The target runs the VM and asks for the pages it faults on;
//! the data plane serves those first and pushes the rest behind them.

use super::fail::{local, Fail};
use super::SourceRun;
use crate::engine::testpoint;
use crate::protocol::ControlMessage;
use crate::telemetry::metric;

impl SourceRun {
    /// One attempt at the pull phase over the current link: serve the target's page requests
    /// and push `missing` in the background until the target holds every page.
    pub(super) async fn pull(&mut self) -> Result<(), Fail> {
        let missing = self.take_pending();
        let plane = self.plane.as_ref().ok_or_else(|| Fail::Local("no data plane".into()))?;
        let mut pushed = plane.start_postcopy(missing).map_err(local)?;
        testpoint::hold(testpoint::Point::Pull, self.s.id).await;
        let mut push_stats = None;
        loop {
            tokio::select! {
                r = &mut pushed, if push_stats.is_none() => {
                    let stats = r.map_err(local)?.map_err(|e| Fail::Link(e.to_string()))?;
                    push_stats = Some(stats);
                }
                m = self.recv() => {
                    match m? {
                        ControlMessage::Complete => break,
                        other => return Err(Fail::Protocol(format!("expected Complete, got {}", other.name()))),
                    }
                }
            }
        }
        // The target can hold every page before the push job has reported: wait for its figures.
        let stats = match push_stats {
            Some(s) => s,
            None => tokio::time::timeout(self.s.req.step_timeout, pushed)
                .await
                .map_err(|_| Fail::Timeout("pull"))?
                .map_err(local)?
                .map_err(|e| Fail::Link(e.to_string()))?,
        };
        self.account(&stats);
        // Pulls answered after the push ended are counted by the plane alone.
        let late = self
            .plane
            .as_ref()
            .map_or(0, |p| p.pulled())
            .saturating_sub(stats.pulled_pages);
        self.pages.pulled += late;
        metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "pulled").increment(late);
        Ok(())
    }
}
