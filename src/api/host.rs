//! `/drain` and `/shutdown`: emptying and stopping the daemon's host.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::engine::DrainReport;

/// `POST /drain`: move every VM of the host to these peers, one at a time, in the background.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartDrain {
    /// The peers' migration listeners, `HOST:PORT` (1 to 64); a VM that fails on one is tried
    /// on the next.
    pub to: Vec<String>,
    /// The algorithm of each move (default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// The answer to `POST /drain`: the evacuation runs; `GET /drain` follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStarted {
    /// Always true.
    pub draining: bool,
}

/// `GET /drain`: the last evacuation started through the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// Still moving VMs.
    pub running: bool,
    /// The VMs it moved, in order.
    #[serde(default)]
    pub moved: Vec<DrainedVm>,
    /// The VMs it left where they were.
    #[serde(default)]
    pub stayed: Vec<StayedVm>,
    /// Why the evacuation as a whole failed, if it did.
    pub error: Option<String>,
}

impl DrainStatus {
    /// An evacuation still `running`, or ended with `report` or `error` (or not started: all
    /// `None`).
    pub fn new(running: bool, report: Option<&DrainReport>, error: Option<String>) -> Self {
        let Some(report) = report else {
            return Self {
                running,
                error,
                ..Self::default()
            };
        };
        Self {
            running,
            moved: report
                .moved
                .iter()
                .map(|m| DrainedVm {
                    vm: m.vm.clone(),
                    to: m.to,
                    migration: m.migration,
                })
                .collect(),
            stayed: report
                .stayed
                .iter()
                .map(|s| StayedVm {
                    vm: s.vm.clone(),
                    why: s.why.clone(),
                })
                .collect(),
            error,
        }
    }
}

/// A VM an evacuation moved ([`crate::engine::DrainedVm`] on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainedVm {
    /// The VM.
    pub vm: String,
    /// The peer that took it, `IP:PORT`.
    pub to: SocketAddr,
    /// The migration that moved it.
    pub migration: u64,
}

/// A VM an evacuation left where it was ([`crate::engine::StayedVm`] on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StayedVm {
    /// The VM.
    pub vm: String,
    /// Why it stays: the last peer's error, or its held state.
    pub why: String,
}

/// `POST /shutdown`: what SIGTERM does (no new work, every migration finished, the VMs
/// evacuated to `--drain-to`, exit once empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// End now, destroying every VM still here, as a second SIGTERM does.
    #[serde(default)]
    pub force: bool,
}

/// The answer to `POST /shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownStarted {
    /// Always true: the host takes no new work from now on.
    pub shutting_down: bool,
    /// Whether the shutdown was forced.
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine;
    use serde_json::json;

    #[test]
    fn test_drain_status_shows_peers_as_addresses() {
        let report = DrainReport {
            moved: vec![engine::DrainedVm {
                vm: "vm1".into(),
                to: "127.0.0.1:7002".parse().unwrap(),
                migration: 3,
            }],
            stayed: vec![engine::StayedVm {
                vm: "vm2".into(),
                why: "held (stale)".into(),
            }],
        };
        let json = serde_json::to_value(DrainStatus::new(false, Some(&report), None)).unwrap();
        assert_eq!(
            json,
            json!({"running": false, "error": null,
                   "moved": [{"vm": "vm1", "to": "127.0.0.1:7002", "migration": 3}],
                   "stayed": [{"vm": "vm2", "why": "held (stale)"}]})
        );
        let back: DrainStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, DrainStatus::new(false, Some(&report), None));
    }
}
