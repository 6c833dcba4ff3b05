//! Live progress of a migration, in the manner of QEMU's `query-migrate`: what a status
//! request or a progress bar reads while the migration runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::report::MigrationReport;
use super::stage::Stage;

/// Shared between a running migration (writer) and the engine (reader).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the data plane has put on the link so far; updated per batch.
    pub sent_bytes: Arc<AtomicU64>,
    data: Mutex<ProgressData>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ProgressData {
    stage: Option<Stage>,
    round: u32,
    remaining_pages: u64,
    dirty_pages_per_sec: f64,
    throughput_bytes_per_sec: f64,
    expected_downtime_s: f64,
}

impl Progress {
    fn with<R>(&self, f: impl FnOnce(&mut ProgressData) -> R) -> R {
        f(&mut self.data.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The migration entered `stage`.
    pub fn set_stage(&self, stage: Stage) {
        self.with(|d| d.stage = Some(stage));
    }

    /// A pre-copy round ended.
    pub fn set_round(&self, round: u32, remaining: u64, dirty: f64, throughput: f64, expected_downtime_s: f64) {
        self.with(|d| {
            d.round = round;
            d.remaining_pages = remaining;
            d.dirty_pages_per_sec = dirty;
            d.throughput_bytes_per_sec = throughput;
            d.expected_downtime_s = expected_downtime_s;
        });
    }

    /// Pages still to send.
    pub fn set_remaining(&self, remaining: u64) {
        self.with(|d| d.remaining_pages = remaining);
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for a slot under the host's cap on concurrent outgoing migrations.
    Queued,
    /// Running.
    Active,
    /// Ended as completed.
    Completed,
    /// Ended as cancelled.
    Cancelled,
    /// Ended as aborted.
    Aborted,
    /// Ended as failed.
    Failed,
}

/// A migration's status.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    /// Migration id.
    pub id: u64,
    /// VM id.
    pub vm: String,
    /// Target (host name or address).
    pub to: String,
    /// Algorithm requested.
    pub algorithm: String,
    /// Phase.
    pub status: Phase,
    /// Current stage name.
    pub stage: Option<&'static str>,
    /// Pre-copy round.
    pub round: u32,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// Pages still to send.
    pub remaining_pages: u64,
    /// Last measured dirty rate.
    pub dirty_pages_per_sec: f64,
    /// Last measured throughput.
    pub throughput_bytes_per_sec: f64,
    /// Downtime expected if it stopped now.
    pub expected_downtime_s: f64,
    /// Error of an ended migration.
    pub error: Option<String>,
    /// Final report of an ended migration.
    pub report: Option<MigrationReport>,
}

impl MigrationStatus {
    /// The status of a queued or running migration.
    pub fn live(id: u64, vm: &str, to: &str, algorithm: &str, phase: Phase, p: &Progress) -> Self {
        let d = p.with(|d| *d);
        Self {
            id,
            vm: vm.to_string(),
            to: to.to_string(),
            algorithm: algorithm.to_string(),
            status: phase,
            stage: d.stage.map(|s| s.name()),
            round: d.round,
            transferred_bytes: p.sent_bytes.load(Ordering::Relaxed),
            remaining_pages: d.remaining_pages,
            dirty_pages_per_sec: d.dirty_pages_per_sec,
            throughput_bytes_per_sec: d.throughput_bytes_per_sec,
            expected_downtime_s: d.expected_downtime_s,
            error: None,
            report: None,
        }
    }

    /// The status of an ended migration.
    pub fn ended(r: &MigrationReport) -> Self {
        use super::report::Outcome;
        Self {
            id: r.id,
            vm: r.vm.clone(),
            to: r.target.clone(),
            algorithm: r.requested.clone(),
            status: match r.result {
                Outcome::Completed | Outcome::Recovered => Phase::Completed,
                Outcome::Cancelled => Phase::Cancelled,
                Outcome::Aborted => Phase::Aborted,
                Outcome::Failed => Phase::Failed,
            },
            stage: r.stages.last().map(|s| s.name),
            round: r.rounds,
            transferred_bytes: r.bytes_sent,
            remaining_pages: 0,
            dirty_pages_per_sec: 0.0,
            throughput_bytes_per_sec: r.throughput_bytes_per_s,
            expected_downtime_s: 0.0,
            error: r.error.clone(),
            report: Some(r.clone()),
        }
    }
}
