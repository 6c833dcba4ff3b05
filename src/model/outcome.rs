//! What a model run produced: every migration, the utilization series, where each VM ends.

use serde::Serialize;

/// One migration as the model ran it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationRecord {
    /// The VM.
    pub vm: String,
    /// Source host and datacenter.
    pub source: String,
    /// Source datacenter.
    pub source_datacenter: String,
    /// Target host.
    pub target: String,
    /// Target datacenter.
    pub target_datacenter: String,
    /// The algorithm asked for.
    pub requested: String,
    /// The algorithm that ran.
    pub algorithm: String,
    /// Why (the plan's decisions, in words).
    pub why: Vec<String>,
    /// `completed`, `aborted` or `failed`.
    pub result: String,
    /// Why it did not complete.
    pub error: Option<String>,
    /// When it was asked for, seconds of virtual time.
    pub requested_at_s: f64,
    /// When it started moving pages (after any queue).
    pub start_s: f64,
    /// When it ended.
    pub end_s: f64,
    /// Total time from start to end, seconds.
    pub total_s: f64,
    /// When the VM paused.
    pub downtime_start_s: Option<f64>,
    /// Downtime, seconds.
    pub downtime_s: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// The plan's prediction, if it made one: `(algorithm, downtime_s, total_s)`.
    pub predicted: Option<Prediction>,
}

/// A plan's prediction, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The algorithm predicted.
    pub algorithm: String,
    /// Downtime, seconds.
    pub downtime_s: f64,
    /// Total time from the migration's start, seconds.
    pub total_s: f64,
    /// The figures it rests on.
    pub basis: String,
}

/// Utilization of one host at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostSample {
    /// Virtual time, seconds.
    pub t_s: f64,
    /// Index into the scenario's hosts.
    pub host: usize,
    /// RAM committed to VMs (running, paused, or reserved for an incoming one), bytes.
    pub ram_used_bytes: u64,
    /// Bytes per second leaving the host's NIC for migrations.
    pub net_out_bytes_per_sec: f64,
    /// Bytes per second arriving for migrations.
    pub net_in_bytes_per_sec: f64,
}

/// Where a VM is at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// The VM.
    pub vm: String,
    /// Its host, or `None` if it runs nowhere (never deployed, or lost with a failed host).
    pub host: Option<String>,
    /// Its datacenter.
    pub datacenter: Option<String>,
}

/// Everything a model run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelOutcome {
    /// The scenario's name.
    pub scenario: String,
    /// The seed used.
    pub seed: u64,
    /// Virtual time at the end, seconds.
    pub end_s: f64,
    /// Every migration, in the order they were asked for.
    pub migrations: Vec<MigrationRecord>,
    /// Samples in time order: every host at each sampling instant, and between instants the
    /// hosts whose memory or traffic changed (a host missing from an instant kept its value).
    pub samples: Vec<HostSample>,
    /// Where each VM ends.
    pub placements: Vec<Placement>,
    /// Events the simulation processed (timed events, migration steps, samples).
    pub events_processed: u64,
    /// What the run skipped or lost on the way (a deploy that did not fit, a VM lost with its
    /// host), in words.
    pub notes: Vec<String>,
}
