//! The run's books: stages as the report and the metrics show them, pages and bytes, the
//! plan's decisions, what earlier migrations measured, and the final report.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::fail::{local, Fail};
use super::SourceRun;
use crate::clock;
use crate::dataplane::RoundStats;
use crate::engine::events::MigrationEvent;
use crate::engine::plan::{Choice, Estimate, Forecast};
use crate::engine::policy;
use crate::engine::qos::QosReport;
use crate::engine::report::{CompressionReport, DecisionReport, MigrationReport, Outcome, StageReport, VmLocation};
use crate::engine::stage::Stage;
use crate::protocol::PageCodecs;
use crate::telemetry::metric;
use crate::units::PAGE_SIZE;

/// Figures measured by earlier migrations (moving averages), used for predictions before this
/// migration has measured its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct Measured {
    /// Fixed switchover cost: downtime minus the final pages' transfer.
    pub switchover: Option<Duration>,
    /// Link bandwidth, bytes per second.
    pub bandwidth: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o * 0.7 + new * 0.3)
}

impl SourceRun {
    /// Begins `stage`: the machine checks the order; the report, the progress, the events and
    /// the trace follow. The stage's planned faults fire first, as its start.
    pub(super) fn enter(&mut self, stage: Stage) -> Result<(), Fail> {
        self.close_stage();
        self.machine.enter(stage).map_err(local)?;
        self.open_stage = Some(stage);
        self.s.progress.set_stage(stage);
        let fired = self.faults.as_mut().map(|f| f.at_stage(stage)).unwrap_or_default();
        for fault in fired {
            self.inject(fault)?;
        }
        self.stage_started = clock::now();
        self.stage_pages = 0;
        self.stage_bytes = 0;
        // A span per stage, open from its start to its end, inside the migration's span.
        self.stage_span = Some(tracing::info_span!("stage", name = stage.name()));
        tracing::info!(stage = stage.name(), "stage started");
        let _ = self.s.events.send(MigrationEvent::StageStarted { stage });
        Ok(())
    }

    pub(super) fn close_stage(&mut self) {
        if let Some(stage) = self.open_stage.take() {
            let duration = clock::now().duration_since(self.stage_started);
            self.stages.push(StageReport {
                name: stage.name(),
                start_s: self.stage_started.duration_since(self.started).as_secs_f64(),
                duration_s: duration.as_secs_f64(),
                pages: self.stage_pages,
                bytes: self.stage_bytes,
            });
            metrics::histogram!(
                metric::STAGE_DURATION_SECONDS,
                "stage" => stage.name(),
                "algorithm" => self.s.req.algorithm.name()
            )
            .record(duration.as_secs_f64());
            if let Some(span) = self.stage_span.take() {
                tracing::info!(
                    parent: &span,
                    stage = stage.name(),
                    duration_ms = duration.as_secs_f64() * 1e3,
                    "stage completed"
                );
            }
            let _ = self.s.events.send(MigrationEvent::StageCompleted { stage, duration });
        }
    }

    pub(super) fn set_remaining(&mut self, pages: u64) {
        let v = pages as f64;
        metrics::gauge!(metric::REMAINING_PAGES).increment(v - self.remaining_gauge);
        self.s.progress.set_remaining(pages);
        self.remaining_gauge = v;
    }

    pub(super) fn account(&mut self, stats: &RoundStats) {
        let pushed_full = stats.full_pages;
        let pushed_zero = stats.zero_pages;
        let pulled = stats.pulled_pages;
        let pushed = (pushed_full + pushed_zero).saturating_sub(pulled);
        if self.first_pass_done {
            self.pages.retransmitted += pushed;
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "retransmitted").increment(pushed);
        } else {
            // A pass over pages never sent before; pulls are counted apart.
            let zero = pushed_zero.min(pushed);
            let normal = pushed - zero;
            self.pages.normal += normal;
            self.pages.zero += zero;
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "normal").increment(normal);
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "zero").increment(zero);
        }
        self.pages.pulled += pulled;
        metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "pulled").increment(pulled);
        self.bytes += stats.bytes;
        metrics::counter!(metric::BYTES_SENT_TOTAL).increment(stats.bytes);
        let enc = stats.encoding;
        let c = &mut self.compression;
        c.lz4_pages += enc.lz4_pages;
        c.xbzrle_pages += enc.delta_pages;
        c.xbzrle_cache_misses += enc.delta_misses;
        c.xbzrle_overflows += enc.delta_overflows;
        c.bytes_saved += enc.bytes_saved;
        if self.codecs != PageCodecs::NONE {
            metrics::counter!(metric::PAGES_ENCODED_TOTAL, "encoding" => "lz4").increment(enc.lz4_pages);
            metrics::counter!(metric::PAGES_ENCODED_TOTAL, "encoding" => "xbzrle").increment(enc.delta_pages);
            metrics::counter!(metric::COMPRESSION_SAVED_BYTES_TOTAL).increment(enc.bytes_saved);
        }
        self.stage_pages += stats.pages();
        self.stage_bytes += stats.bytes;
    }

    /// Records a plan's decisions (report and events) and its forecast, which replaces any
    /// earlier one.
    pub(super) fn record(&mut self, decisions: Vec<Choice>, forecast: Option<Forecast>) {
        for Choice { action, reason } in decisions {
            self.decisions.push(DecisionReport {
                after_round: self.rounds.saturating_sub(1),
                action: action.clone(),
                reason: reason.clone(),
            });
            let _ = self.s.events.send(MigrationEvent::Decision { action, reason });
        }
        if let Some(f) = forecast {
            self.predicted = Some(f.report(clock::now().duration_since(self.started)));
        }
    }

    /// What is known of the bandwidth before the first page moves: earlier migrations'
    /// measurement, else the link's configured cap.
    pub(super) fn estimate(&self) -> Option<Estimate> {
        let configured = self.s.req.shaping.bandwidth_bytes_per_sec.map(|b| b as f64);
        let (bandwidth_bytes_per_sec, source) = match (self.measured().bandwidth, configured) {
            (Some(b), _) => (b, "earlier migrations"),
            (None, Some(b)) => (b, "the link's configured cap"),
            (None, None) => return None,
        };
        Some(Estimate {
            bandwidth_bytes_per_sec,
            source,
            fixed_switchover: self.fixed_switchover(4096),
        })
    }

    pub(super) fn fixed_switchover(&self, state_bytes: u64) -> Duration {
        let measured = self.measured().switchover;
        // Before any switchover was measured: two round trips (state/prepared, commit/activated)
        // plus the state over the bandwidth.
        let bw = if self.bandwidth > 0.0 {
            self.bandwidth
        } else {
            self.measured().bandwidth.unwrap_or(1e9)
        };
        let estimate = self.rtt * 2 + policy::transfer_time(state_bytes.div_ceil(PAGE_SIZE as u64), bw);
        measured.unwrap_or(estimate)
    }

    pub(super) fn measured(&self) -> Measured {
        *self.s.measured.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn record_switchover(&self, final_pages_time: Duration) {
        let mut m = self.s.measured.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = self.downtime {
            let fixed = d.saturating_sub(final_pages_time).as_secs_f64();
            m.switchover = Some(Duration::from_secs_f64(ewma(
                m.switchover.map(|s| s.as_secs_f64()),
                fixed,
            )));
        }
        if self.bandwidth > 0.0 {
            m.bandwidth = Some(ewma(m.bandwidth, self.bandwidth));
        }
    }

    pub(super) fn report(
        &mut self,
        result: Outcome,
        error: Option<String>,
        vm_location: VmLocation,
    ) -> MigrationReport {
        let total = clock::now().duration_since(self.started);
        let downtime = self.downtime.unwrap_or(Duration::ZERO);
        let alg_label = self.s.req.algorithm.name();
        let class = self.s.req.priority.name();
        metrics::counter!(metric::MIGRATIONS_TOTAL, "algorithm" => alg_label, "result" => result.label(), "priority" => class)
            .increment(1);
        if result.succeeded() {
            metrics::histogram!(metric::DOWNTIME_SECONDS, "algorithm" => alg_label, "priority" => class)
                .record(downtime.as_secs_f64());
            metrics::histogram!(metric::TOTAL_TIME_SECONDS, "algorithm" => alg_label, "priority" => class)
                .record(total.as_secs_f64());
            metrics::histogram!(metric::PRECOPY_ROUNDS).record(f64::from(self.rounds));
        }
        let deadline = self.s.req.deadline.map(|d| self.deadline_verdict(d, total, result));
        let faults = self.faults_seen;
        let qos = QosReport::new(
            self.s.req.priority,
            self.s.req.min_bandwidth_bytes_per_sec,
            &self.stages,
        );
        MigrationReport {
            id: self.s.id,
            vm: self.s.guest.config().id.0.clone(),
            source: self.s.req.source.clone(),
            target: self.s.req.target.clone(),
            source_layout: self.s.guest.layout().to_string(),
            target_layout: self.target_layout.clone(),
            requested: self.s.req.algorithm.name().to_string(),
            algorithm: self.machine.algorithm().name().to_string(),
            result,
            error,
            vm_location,
            stages: std::mem::take(&mut self.stages),
            pages: self.pages,
            // Bytes of an unfinished round count too: the plane's live counter is the truth.
            bytes_sent: self.bytes.max(self.s.progress.sent_bytes.load(Ordering::Relaxed)),
            compression: CompressionReport {
                requested: self.s.req.compression.name().to_string(),
                ..std::mem::take(&mut self.compression)
            },
            rounds: self.rounds,
            downtime_s: downtime.as_secs_f64(),
            total_s: total.as_secs_f64(),
            throughput_bytes_per_s: if total.as_secs_f64() > 0.0 {
                self.bytes as f64 / total.as_secs_f64()
            } else {
                0.0
            },
            predicted: self.predicted.clone(),
            decisions: std::mem::take(&mut self.decisions),
            verified: self.verified,
            mismatched_pages: std::mem::take(&mut self.mismatched),
            postcopy_faults: faults.0,
            mean_fault_latency_s: faults.1,
            verification_s: self.verification.as_secs_f64(),
            verify: if self.machine.algorithm() == crate::protocol::Algorithm::Postcopy
                || self.s.req.algorithm == crate::protocol::Algorithm::Postcopy
            {
                "after-pull".to_string()
            } else {
                self.s.req.verify.name().to_string()
            },
            downtime_parts: self.parts,
            recoveries: self.recoveries,
            qos,
            seed: self.seed,
            deadline_s: deadline.map(|(d, _, _)| d),
            deadline_met: deadline.map(|(_, met, _)| met),
            deadline_margin_s: deadline.map(|(_, _, margin)| margin),
        }
    }

    /// The deadline `d` against `total`: (deadline, met, margin), all in seconds. A miss is
    /// counted and said in the decisions too, so that no reader of the report overlooks it.
    fn deadline_verdict(&mut self, d: Duration, total: Duration, result: Outcome) -> (f64, bool, f64) {
        let met = result.succeeded() && total <= d;
        let margin = d.as_secs_f64() - total.as_secs_f64();
        let label = if met {
            metric::deadline::MET
        } else {
            metric::deadline::MISSED
        };
        metrics::counter!(metric::DEADLINES_TOTAL, "result" => label).increment(1);
        if !met {
            let reason = if result.succeeded() {
                format!(
                    "total {:.3} s, {:.3} s over the {:.3} s deadline",
                    total.as_secs_f64(),
                    -margin,
                    d.as_secs_f64()
                )
            } else {
                format!(
                    "the migration ended {} after {:.3} s",
                    result.label(),
                    total.as_secs_f64()
                )
            };
            self.decisions.push(DecisionReport {
                after_round: self.rounds.saturating_sub(1),
                action: "deadline missed".to_string(),
                reason,
            });
        }
        (d.as_secs_f64(), met, margin)
    }
}
