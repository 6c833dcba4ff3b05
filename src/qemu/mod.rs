//! QEMU as a peer to measure against: `qemu-system-x86_64` processes running a small guest the
//! project builds, driven over QMP. `migratory bench --peer qemu` migrates that guest
//! QEMU-to-QEMU on loopback, in the same run as migratory's own busy case, and sets the
//! figures QEMU reports beside migratory's.
//!
//! * [`guest`]: the Multiboot image that dirties a hot set at a set rate (its layout is
//!   documented there);
//! * [`process`]: one QEMU process with its QMP socket and debugcon output, killed on drop;
//! * [`qmp`]: the QMP client;
//! * [`migrate`] (here): one QEMU-to-QEMU migration, and the figures of [`Move`].
//!
//! x86-64 Linux only, like the kvm backend.

pub mod guest;
pub mod process;
pub mod qmp;
pub mod stream;

use std::time::{Duration, Instant};

use serde_json::json;
use thiserror::Error;

pub use guest::{build_image, host_tsc_hz, GuestError, GuestSpec};
pub use process::{find_qemu, Accel, ProcessError, Qemu, QemuConfig};
pub use qmp::{MigrationInfo, QmpClient, QmpError};

/// How a QEMU-to-QEMU migration is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrateOptions {
    /// QEMU's `max-bandwidth`, bytes per second. Its default (128 MiB/s) is a WAN figure; a
    /// loopback comparison sets it out of the way.
    pub max_bandwidth_bytes_per_sec: u64,
    /// How long the migration and the target's resume may take together.
    pub timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_bandwidth_bytes_per_sec: 10_000_000_000,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The figures of one completed QEMU migration, as its source's `query-migrate` gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    /// `downtime`: the VM stopped, ms.
    pub downtime_ms: u64,
    /// `total-time`: from `migrate` to the end, ms.
    pub total_time_ms: u64,
    /// `setup-time`, ms.
    pub setup_time_ms: u64,
    /// `ram.transferred`, bytes.
    pub transferred_bytes: u64,
    /// `ram.dirty-sync-count`: the dirty-bitmap syncs, about the rounds.
    pub dirty_syncs: u64,
    /// `ram.mbps`: QEMU's own figure, megabits per second.
    pub mbps: f64,
}

impl Move {
    /// Bytes transferred over the total time.
    pub fn throughput_bytes_per_sec(&self) -> f64 {
        if self.total_time_ms == 0 {
            0.0
        } else {
            self.transferred_bytes as f64 * 1e3 / self.total_time_ms as f64
        }
    }
}

/// Why a QEMU-to-QEMU migration did not complete.
#[derive(Debug, Error)]
pub enum QemuError {
    /// A QMP exchange.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The target did not say where it listens.
    #[error("the incoming QEMU names no TCP port: {info:?}")]
    NoIncomingPort {
        /// Its `query-migrate`.
        info: Box<MigrationInfo>,
    },
    /// The migration ended otherwise than completed.
    #[error("QEMU migration {status}: {error}")]
    Failed {
        /// `failed`, `cancelled`, ...
        status: String,
        /// QEMU's `error-desc`.
        error: String,
    },
    /// It did not end in time.
    #[error("QEMU migration still {status} after {waited:?}")]
    Timeout {
        /// The last status seen.
        status: String,
        /// How long.
        waited: Duration,
    },
    /// A completed migration without the figures of one.
    #[error("completed QEMU migration without its figures: {info:?}")]
    NoFigures {
        /// Its `query-migrate`.
        info: Box<MigrationInfo>,
    },
}

/// How often `query-migrate` is asked while a migration runs; the figures come from QEMU, so
/// this sets only how soon the end is seen.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Migrates `source`'s guest to `target` (started with `incoming`) over loopback TCP and waits
/// until the target runs it. The source is left stopped (`postmigrate`).
pub fn migrate(source: &mut Qemu, target: &mut Qemu, opts: &MigrateOptions) -> Result<Move, QemuError> {
    let deadline = Instant::now() + opts.timeout;
    target
        .qmp()
        .execute("migrate-incoming", Some(json!({ "uri": "tcp:127.0.0.1:0" })))?;
    let listening = target.qmp().query_migrate()?;
    let port = listening
        .socket_address
        .as_ref()
        .and_then(|list| list.iter().find(|a| a.kind == "inet"))
        .and_then(|a| a.port.as_deref())
        .and_then(|p| p.parse::<u16>().ok());
    let Some(port) = port else {
        return Err(QemuError::NoIncomingPort {
            info: Box::new(listening),
        });
    };
    source.qmp().execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": opts.max_bandwidth_bytes_per_sec })),
    )?;
    source
        .qmp()
        .execute("migrate", Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })))?;
    let info = loop {
        let info = source.qmp().query_migrate()?;
        let status = info.status.clone().unwrap_or_default();
        match status.as_str() {
            "completed" => break info,
            "failed" | "cancelled" => {
                return Err(QemuError::Failed {
                    status,
                    error: info.error_desc.unwrap_or_default(),
                })
            }
            _ if Instant::now() >= deadline => {
                return Err(QemuError::Timeout {
                    status,
                    waited: opts.timeout,
                })
            }
            _ => std::thread::sleep(POLL_EVERY),
        }
    };
    // The target resumes on its own (autostart) once it has loaded the last section.
    loop {
        let state = target.qmp().run_state()?;
        if state == "running" {
            break;
        }
        if Instant::now() >= deadline {
            return Err(QemuError::Timeout {
                status: format!("completed, target {state}"),
                waited: opts.timeout,
            });
        }
        std::thread::sleep(POLL_EVERY);
    }
    let (Some(downtime_ms), Some(total_time_ms), Some(ram)) = (info.downtime, info.total_time, info.ram.as_ref())
    else {
        return Err(QemuError::NoFigures { info: Box::new(info) });
    };
    Ok(Move {
        downtime_ms,
        total_time_ms,
        setup_time_ms: info.setup_time.unwrap_or(0),
        transferred_bytes: ram.transferred,
        dirty_syncs: ram.dirty_sync_count,
        mbps: ram.mbps,
    })
}
