//! `POST /vms/{id}/to-qemu`: move a VM to a QEMU waiting with `-incoming tcp:HOST:PORT`; the
//! answer comes when the migration has ended. Migrations from QEMU arrive on the daemon's
//! `--qemu-incoming` listener, not through the API.

use serde::{Deserialize, Serialize};

/// The body of `POST /vms/{id}/to-qemu`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToQemu {
    /// Where the QEMU listens: `HOST:PORT` (an IP address).
    pub addr: String,
    /// The machine type the QEMU runs [default: `pc-i440fx-7.2`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The QEMU's accelerator, `kvm` (the default) or `tcg`: TCG keeps the task register in a
    /// form of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// `precopy` (the default) or `stop-and-copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Downtime the switchover may take, ms [default: the engine's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<f64>,
}

/// One migration to or from QEMU, as the API and `migrate --to-qemu --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QemuLeg {
    /// `to-qemu` or `from-qemu`.
    pub direction: String,
    /// The VM's id here.
    pub vm: String,
    /// QEMU's machine type.
    pub machine: String,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// Stream bytes.
    pub stream_bytes: u64,
    /// Pages sent or received, repeats included.
    pub pages: u64,
    /// Pre-copy rounds (from QEMU: sections of pages before the last).
    pub rounds: u32,
    /// Downtime as this side sees it, ms.
    pub downtime_ms: f64,
    /// Total time, ms.
    pub total_ms: f64,
    /// Why the rounds stopped (to QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl From<&crate::engine::qemu::QemuLegReport> for QemuLeg {
    fn from(r: &crate::engine::qemu::QemuLegReport) -> Self {
        Self {
            direction: r.direction.name().to_string(),
            vm: r.vm.clone(),
            machine: r.machine.clone(),
            ram_bytes: r.ram_bytes,
            stream_bytes: r.stream_bytes,
            pages: r.pages,
            rounds: r.rounds,
            downtime_ms: r.downtime.as_secs_f64() * 1e3,
            total_ms: r.total.as_secs_f64() * 1e3,
            stop_reason: r.stop_reason.clone(),
        }
    }
}
