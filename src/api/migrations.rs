//! `/migrations`: start, watch and cancel migrations.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::engine::Phase;

/// `POST /migrations`: migrate a VM of the daemon's host to a peer. What is left out takes the
/// defaults of [`crate::engine::MigrationRequest::new`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartMigration {
    /// The VM to move.
    pub vm: String,
    /// The peer daemon's migration listener, `HOST:PORT`.
    pub to: String,
    /// `stop-and-copy`, `precopy` (the default), `postcopy`, `hybrid`, `auto` or `random`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Parallel data connections (1 to 255).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u8>,
    /// Bandwidth cap of this migration (at least 64 KiB/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// The switchover downtime pre-copy aims for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<f64>,
    /// When stop-and-copy and pre-copy compare page digests: `after-activation` (the default:
    /// no hashing in the downtime) or `before-commit` (a difference rolls back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// Faults to inject, `KIND[:ARG][@WHEN],...` (source side; target-side kinds need an
    /// in-process target). Refused with 403 unless the daemon runs with
    /// `--enable-fault-injection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<String>,
    /// Post-copy: seconds to keep reconnecting after the link fails in the pull phase (0 turns
    /// recovery off; default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_timeout_s: Option<f64>,
    /// Page encoding: `off`, `lz4`, `xbzrle`, `both` or `auto` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Bytes of the source's XBZRLE cache (default 64 MiB, never more than the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_bytes: Option<u64>,

    // Quality of service (see `engine::Priority`).
    /// `low`, `normal` (the default) or `high`: the order the host's outgoing queue serves,
    /// and the weight (1, 2, 4) in its bandwidth budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// Bytes per second of the host's bandwidth budget assured while the migration sends;
    /// refused with 409 if the budget cannot assure it beside other migrations' floors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bandwidth_bytes_per_sec: Option<u64>,
    // How the target announces the VM's NICs after activation (QEMU's `announce-*`
    // parameters; each left out takes QEMU's default, see `announce::AnnounceParams`).
    /// Rounds of announce frames (0 to 1000; default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u32>,
    /// Wait after the first round, in ms (0 to 100000; default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_initial_ms: Option<u32>,
    /// Longest wait between rounds, in ms (0 to 100000; default 550).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_max_ms: Option<u32>,
    /// How much each wait grows, in ms (1 to 10000; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_step_ms: Option<u32>,
    /// Seed of `random`'s pick, to replay one (default: a seed from the OS; the report
    /// records it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Deadline for the total time, in seconds; the report says whether it was met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<f64>,
}

impl StartMigration {
    /// A migration of `vm` to `to` with every option at the daemon's default.
    pub fn new(vm: impl Into<String>, to: impl Into<String>) -> Self {
        Self {
            vm: vm.into(),
            to: to.into(),
            algorithm: None,
            streams: None,
            bandwidth_bytes_per_sec: None,
            downtime_limit_ms: None,
            verify: None,
            faults: None,
            recovery_timeout_s: None,
            compression: None,
            xbzrle_cache_bytes: None,
            priority: None,
            min_bandwidth_bytes_per_sec: None,

            announce_rounds: None,
            announce_initial_ms: None,
            announce_max_ms: None,
            announce_step_ms: None,
            seed: None,
            deadline_s: None,
        }
    }

    /// The announce parameters this body asks for: QEMU's defaults where it says nothing,
    /// or the first one out of range.
    pub fn announce_params(&self) -> Result<crate::announce::AnnounceParams, crate::announce::AnnounceError> {
        let d = crate::announce::AnnounceParams::default();
        let params = crate::announce::AnnounceParams {
            initial_ms: self.announce_initial_ms.unwrap_or(d.initial_ms),
            max_ms: self.announce_max_ms.unwrap_or(d.max_ms),
            rounds: self.announce_rounds.unwrap_or(d.rounds),
            step_ms: self.announce_step_ms.unwrap_or(d.step_ms),
        };
        params.validate()?;
        Ok(params)
    }
}

/// The answer to `POST /migrations` and `POST /vms/{id}/recover`: the migration's id, for
/// `GET /migrations/{id}` and `POST /migrations/{id}/cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStarted {
    /// The migration's id.
    pub id: u64,
}

/// The answer to `POST /migrations/{id}/cancel`, `{}`: the cancel is asked for, and
/// `GET /migrations/{id}` says when the migration has ended `cancelled`. A migration past
/// commitment is not cancelled (409 instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequested {}

/// How a client reads a [`MigrationStatus`](crate::engine::MigrationStatus): the answer to `GET /migrations/{id}` and each
/// entry of `GET /migrations`.
///
/// The engine's `MigrationStatus` is what the daemon sends; it cannot be decoded as it is,
/// because its stage name is a `&'static str` and its report's type derives `Serialize` only.
/// This type reads the same JSON. Every figure is optional, so an answer that leaves one out or
/// sends `null` still reads, and the report stays JSON, to be shown or passed on untouched.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MigrationStatusView {
    /// The migration's id.
    pub id: u64,
    /// The VM.
    pub vm: Option<String>,
    /// The target (host name or address).
    pub to: Option<String>,
    /// The algorithm asked for.
    pub algorithm: Option<String>,
    /// Queued, active, or how it ended.
    pub status: Phase,
    /// The stage it is in, or the last it ran.
    pub stage: Option<String>,
    /// The pre-copy round.
    pub round: Option<u32>,
    /// Bytes sent so far.
    pub transferred_bytes: Option<u64>,
    /// Pages still to send.
    pub remaining_pages: Option<u64>,
    /// The dirty rate last measured.
    pub dirty_pages_per_sec: Option<f64>,
    /// The throughput last measured.
    pub throughput_bytes_per_sec: Option<f64>,
    /// The downtime expected if it stopped now.
    pub expected_downtime_s: Option<f64>,
    /// Why an ended migration did not complete.
    pub error: Option<String>,
    /// The final [`crate::engine::MigrationReport`] of an ended migration, as JSON.
    pub report: Option<serde_json::Value>,
}

/// The phase's name in the API (`queued`, `active`, `completed`, ...): its JSON text, so the
/// two cannot differ.
impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.serialize(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MigrationReport, MigrationStatus, Outcome, Progress};
    use serde_json::json;

    #[test]
    fn test_a_request_leaves_out_what_has_no_value() {
        let mut body = StartMigration::new("vm1", "h:7000");
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"vm": "vm1", "to": "h:7000"})
        );
        body.streams = Some(4);
        body.priority = Some("high".into());
        body.min_bandwidth_bytes_per_sec = Some(1 << 20);
        let back: StartMigration = serde_json::from_value(serde_json::to_value(&body).unwrap()).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn test_an_old_client_body_without_qos_still_reads() {
        let body: StartMigration = serde_json::from_value(json!({"vm": "vm1", "to": "h:7000"})).unwrap();
        assert_eq!((body.priority, body.min_bandwidth_bytes_per_sec), (None, None));
    }

    #[test]
    fn test_announce_fields_are_optional_and_default_to_qemus() {
        let old: StartMigration = serde_json::from_value(json!({"vm": "vm1", "to": "h:7000"})).unwrap();
        assert_eq!(
            old.announce_params().unwrap(),
            crate::announce::AnnounceParams::default()
        );
        let some: StartMigration =
            serde_json::from_value(json!({"vm": "vm1", "to": "h:7000", "announce_rounds": 2, "announce_step_ms": 20}))
                .unwrap();
        let p = some.announce_params().unwrap();
        assert_eq!((p.rounds, p.step_ms, p.initial_ms), (2, 20, 50));
        let bad = StartMigration {
            announce_step_ms: Some(0),
            ..some
        };
        assert!(bad.announce_params().is_err());
    }

    #[test]
    fn test_the_view_reads_every_status_the_engine_writes() {
        let live = MigrationStatus::live(7, "vm1", "b", "precopy", Phase::Active, &Progress::default());
        let report = MigrationReport::not_started(8, "vm2", "a", "b", "auto", Outcome::Cancelled, "queued".into());
        let ended = MigrationStatus::ended(&report);
        for written in [live, ended] {
            let json = serde_json::to_value(&written).unwrap();
            let read: MigrationStatusView = serde_json::from_value(json.clone()).unwrap();
            assert_eq!(read.id, written.id);
            assert_eq!(read.status, written.status);
            assert_eq!(read.vm.as_deref(), Some(written.vm.as_str()));
            assert_eq!(read.stage.as_deref(), written.stage);
            assert_eq!(read.round, Some(written.round));
            assert_eq!(read.transferred_bytes, Some(written.transferred_bytes));
            assert_eq!(read.expected_downtime_s, Some(written.expected_downtime_s));
            assert_eq!(read.error, written.error);
            assert_eq!(read.report.as_ref(), json.get("report").filter(|r| !r.is_null()));
        }
    }

    #[test]
    fn test_phase_displays_as_its_json_text() {
        for phase in [Phase::Queued, Phase::Active, Phase::Completed, Phase::Failed] {
            assert_eq!(json!(phase.to_string()), serde_json::to_value(phase).unwrap());
        }
    }
}
