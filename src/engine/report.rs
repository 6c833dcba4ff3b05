//! What a migration did: the report an embedder, the CLI's `--json` and later the HTTP API
//! show. It is a boundary type, so it derives `Serialize` (the only engine type that does).

use serde::Serialize;

use super::stage::Stage;
use crate::telemetry::metric;

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The VM runs on the target; the source copy is freed.
    Completed,
    /// The user cancelled before commitment; the VM runs on the source.
    Cancelled,
    /// The policy or the peer aborted before commitment; the VM runs on the source.
    Aborted,
    /// Something failed; see `error` and `vm_location`.
    Failed,
    /// Completed after the link failed in post-copy's pull phase and a new link carried the
    /// pull on (one or more times): the VM runs on the target, every page verified.
    Recovered,
}

impl Outcome {
    /// Label value of `migratory_migrations_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => metric::result::COMPLETED,
            Outcome::Cancelled => metric::result::CANCELLED,
            Outcome::Aborted => metric::result::ABORTED,
            Outcome::Failed => metric::result::FAILED,
            Outcome::Recovered => metric::result::RECOVERED,
        }
    }

    /// True if the VM arrived: completed, with or without a recovery on the way.
    pub fn succeeded(self) -> bool {
        matches!(self, Outcome::Completed | Outcome::Recovered)
    }
}

/// Where the VM is when the migration ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmLocation {
    /// Running (or paused, as before) on the source.
    Source,
    /// Running on the target.
    Target,
    /// Post-copy cut short: the target owns and runs the VM but still lacks pages that only the
    /// source's paused copy holds; the source keeps that copy and never resumes it.
    TargetAwaitingPages,
    /// Paused on the source after `Commit` went out with no answer: the target may own it.
    /// Nothing is resumed automatically, so no split brain can happen.
    Undetermined,
}

/// One stage's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub name: &'static str,
    /// Seconds from the migration start to the stage start.
    pub start_s: f64,
    /// Duration in seconds.
    pub duration_s: f64,
    /// Pages sent during the stage.
    pub pages: u64,
    /// Bytes sent during the stage.
    pub bytes: u64,
}

/// Pages by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageCounts {
    /// Full pages sent for the first time.
    pub normal: u64,
    /// Zero pages sent as markers.
    pub zero: u64,
    /// Pages sent again because they were dirtied.
    pub retransmitted: u64,
    /// Pages pulled on demand (post-copy).
    pub pulled: u64,
}

/// What page compression did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompressionReport {
    /// What the migration asked for (`off`, `lz4`, `xbzrle`, `both`, `auto`).
    pub requested: String,
    /// Methods in use: those asked for that both hosts offer; `xbzrle` only on a data path
    /// that keeps batches in order (one stream).
    pub methods: Vec<String>,
    /// Pages sent as LZ4 blocks.
    pub lz4_pages: u64,
    /// Re-sent pages sent as XBZRLE deltas.
    pub xbzrle_pages: u64,
    /// Re-sent pages whose previous content was not in the XBZRLE cache.
    pub xbzrle_cache_misses: u64,
    /// Re-sent pages in the cache whose delta was too large, sent whole instead.
    pub xbzrle_overflows: u64,
    /// Page bytes kept off the link by compression (counted in none of `bytes_sent`).
    pub bytes_saved: u64,
}

/// The cost model's expectation, beside the outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictionReport {
    /// Algorithm the prediction is for.
    pub algorithm: String,
    /// Expected downtime.
    pub downtime_s: f64,
    /// Expected total time.
    pub total_s: f64,
    /// What the prediction was based on.
    pub basis: String,
}

/// A decision the policy took during the migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionReport {
    /// Round after which it was taken.
    pub after_round: u32,
    /// What was decided.
    pub action: String,
    /// Why.
    pub reason: String,
}

/// Where a switchover's downtime went, as the source measured it: each part is the time
/// between two of its steps, so they add up to about the downtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DowntimeParts {
    /// Pausing the VM and collecting its last dirty set.
    pub pause_s: f64,
    /// Sending the last dirty pages (stop-and-copy; zero for post-copy).
    pub final_pages_s: f64,
    /// Saving the vCPU and device state and sending it.
    pub state_s: f64,
    /// Comparing the digests, when verified before commit (zero otherwise: it runs after the
    /// downtime).
    pub verify_s: f64,
    /// From the state sent to `Prepared`: the target applies the last pages and loads the
    /// state; verifying before commit, the digest comparison too.
    pub prepare_s: f64,
    /// From `Commit` sent to `Activated`: the target resumes the VM.
    pub activation_s: f64,
}

/// The full account of one migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationReport {
    /// Migration id.
    pub id: u64,
    /// VM id.
    pub vm: String,
    /// Source host.
    pub source: String,
    /// Target host.
    pub target: String,
    /// Source backend's native layout.
    pub source_layout: String,
    /// Target backend's native layout.
    pub target_layout: String,
    /// Algorithm asked for.
    pub requested: String,
    /// Algorithm that ran (e.g. what `auto` chose, or `postcopy` after a stall switch).
    pub algorithm: String,
    /// Outcome.
    pub result: Outcome,
    /// Error text when not completed.
    pub error: Option<String>,
    /// Where the VM is.
    pub vm_location: VmLocation,
    /// Stages in the order they ran.
    pub stages: Vec<StageReport>,
    /// Pages by kind.
    pub pages: PageCounts,
    /// Bytes put on the link.
    pub bytes_sent: u64,
    /// Page compression: what was used and what it saved.
    pub compression: CompressionReport,
    /// Pre-copy rounds (round 0 included).
    pub rounds: u32,
    /// Pause on the source to resume on the target.
    pub downtime_s: f64,
    /// Start to end.
    pub total_s: f64,
    /// Bytes sent over total time.
    pub throughput_bytes_per_s: f64,
    /// The prediction the decision was based on.
    pub predicted: Option<PredictionReport>,
    /// Policy decisions (stop, switch, abort) with reasons.
    pub decisions: Vec<DecisionReport>,
    /// True if the target's memory equals the source's at pause and vCPU state matches.
    pub verified: bool,
    /// Pages whose content differs (at most 64 listed).
    pub mismatched_pages: Vec<u64>,
    /// Post-copy faults the target guest took.
    pub postcopy_faults: u64,
    /// Mean post-copy fault latency.
    pub mean_fault_latency_s: f64,
    /// Time spent comparing digests (inside the downtime when verified before commit).
    pub verification_s: f64,
    /// When the digests were compared: `after-activation` or `before-commit` (post-copy:
    /// after its pull, whatever the request said).
    pub verify: String,
    /// Where the downtime went.
    pub downtime_parts: DowntimeParts,
    /// Post-copy recoveries: links that replaced one lost in the pull phase.
    pub recoveries: u32,
    /// Its priority, its floor, and the share of bandwidth it got.
    pub qos: super::qos::QosReport,
    /// `random`'s seed (the request's, or one from the OS); `None` for other algorithms.
    pub seed: Option<u64>,
    /// The deadline for total time, if the request set one.
    pub deadline_s: Option<f64>,
    /// Whether the migration completed within its deadline (`None` without one). A
    /// migration that did not complete missed it.
    pub deadline_met: Option<bool>,
    /// Deadline minus total time: negative when missed.
    pub deadline_margin_s: Option<f64>,
}

impl MigrationReport {
    /// The report of a migration that never ran: cancelled in its queue, or whose start failed
    /// before the VM was taken. The VM stays where it was.
    pub fn not_started(
        id: u64,
        vm: &str,
        source: &str,
        target: &str,
        algorithm: &str,
        result: Outcome,
        error: String,
    ) -> Self {
        Self {
            id,
            vm: vm.to_string(),
            source: source.to_string(),
            target: target.to_string(),
            source_layout: String::new(),
            target_layout: String::new(),
            requested: algorithm.to_string(),
            algorithm: algorithm.to_string(),
            result,
            error: Some(error),
            vm_location: VmLocation::Source,
            stages: Vec::new(),
            pages: PageCounts::default(),
            bytes_sent: 0,
            compression: CompressionReport::default(),
            rounds: 0,
            downtime_s: 0.0,
            total_s: 0.0,
            throughput_bytes_per_s: 0.0,
            predicted: None,
            decisions: Vec::new(),
            verified: false,
            mismatched_pages: Vec::new(),
            postcopy_faults: 0,
            mean_fault_latency_s: 0.0,
            verification_s: 0.0,
            verify: String::new(),
            downtime_parts: DowntimeParts::default(),
            recoveries: 0,
            qos: super::qos::QosReport::default(),
            seed: None,
            deadline_s: None,
            deadline_met: None,
            deadline_margin_s: None,
        }
    }

    /// The figures of one stage, if it ran.
    pub fn stage(&self, stage: Stage) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == stage.name())
    }

    /// Stage names in order.
    pub fn stage_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_outcome_labels_are_the_ones_registered_at_zero() {
        let every = [
            Outcome::Completed,
            Outcome::Cancelled,
            Outcome::Aborted,
            Outcome::Failed,
            Outcome::Recovered,
        ];
        assert_eq!(every.map(Outcome::label), metric::result::ALL);
    }
}
