//! QEMU as a peer: the hypervisor VMs move to and from in QEMU's own migration stream, and the
//! one `migratory bench --peer qemu` measures against.
//!
//! * [`stream`]: QEMU's migration stream, read and written by this project's own code;
//! * [`interop`]: driving a QEMU that sends or receives a migration of ours over QMP;
//! * [`round_trip`]: a VM kvm → QEMU → kvm with the self-checking guest, checked;
//! * [`digest`]: the RAM digest both sides of a switchover with QEMU compute alike;
//! * [`guest`]: the Multiboot image that dirties a hot set at a set rate (its layout is
//!   documented there), for QEMU-to-QEMU comparisons;
//! * [`process`]: one QEMU process with its QMP socket and debugcon output, killed on drop;
//! * [`qmp`]: the QMP client;
//! * [`migrate`] (here): one QEMU-to-QEMU migration, and the figures of [`Move`].
//!
//! The engine's side of a migration to or from QEMU is `engine::qemu`.
//!
//! x86-64 Linux only, like the kvm backend.

pub mod digest;
pub mod guest;
pub mod interop;
pub mod process;
pub mod qmp;
pub mod round_trip;
pub mod stream;

use std::time::{Duration, Instant};

use serde_json::json;

pub use guest::{build_image, host_tsc_hz, GuestError, GuestSpec};
pub use interop::InteropError;
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

/// Migrates `source`'s guest to `target` (started with `incoming`) over loopback TCP and waits
/// until the target runs it. The source is left stopped (`postmigrate`).
pub fn migrate(source: &mut Qemu, target: &mut Qemu, opts: &MigrateOptions) -> Result<Move, InteropError> {
    let started = Instant::now();
    let to = interop::listen(target)?;
    source.qmp().execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": opts.max_bandwidth_bytes_per_sec })),
    )?;
    source
        .qmp()
        .execute("migrate", Some(json!({ "uri": format!("tcp:{to}") })))?;
    let info = interop::wait_for_end(source, opts.timeout)?;
    // The target resumes on its own (autostart) once it has loaded the last section.
    interop::wait_for_state(target, "running", opts.timeout.saturating_sub(started.elapsed()))?;
    let (Some(downtime_ms), Some(total_time_ms), Some(ram)) = (info.downtime, info.total_time, info.ram.as_ref())
    else {
        return Err(InteropError::Failed {
            status: "completed".into(),
            error: format!("without the figures of a completed migration: {info:?}"),
        });
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
