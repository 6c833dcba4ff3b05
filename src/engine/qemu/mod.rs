//! QEMU as a peer host: live migration to and from a `qemu-system-x86_64`, in QEMU's own
//! migration stream ([`crate::qemu::stream`]), so that a VM moves between QEMU (TCG or KVM) and
//! this engine's kvm backend.
//!
//! * [`incoming`]: a stream QEMU sends (`migrate tcp:ADDR` with the `return-path` capability)
//!   lands in a VM reserved on a kvm host; the VM resumes there, and only then does QEMU hear
//!   success on the return path. Any failure before: QEMU hears failure and resumes its own
//!   copy.
//! * [`outgoing`]: a VM of a host goes to a QEMU started with `-incoming tcp:HOST:PORT`, in
//!   pre-copy rounds the engine's own [`PrecopyPlan`](super::plan::PrecopyPlan) decides (or
//!   one stop-and-copy); QEMU answers on the return path once it runs the VM, and only then is
//!   this copy destroyed.
//!
//! Carried: guest RAM (QEMU's `pc.ram` block, which on `pc` machines below 3.5 GiB is guest
//! physical memory from address 0), the vCPU (`cpu_common`, `cpu`, `apic`). Not carried: the
//! platform devices (PIC, PIT, RTC, HPET, IDE, ...), which the receiving side keeps at their
//! reset state, and firmware blocks (the receiving QEMU loads its own). So a guest moves
//! intact when it runs with interrupts off and uses no device but I/O ports, as this project's
//! self-checking guest does; a general OS guest does not (see README, "Moving VMs to and from
//! QEMU").

pub mod incoming;
pub mod outgoing;

use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use thiserror::Error;

use super::host::{GetBackendName, Host};
use super::registry::Engine;
use super::EngineError;
use crate::format::native::NativeError;
use crate::qemu::stream::StreamError;
use crate::telemetry::metric;

pub use incoming::FromQemuOptions;
pub use outgoing::ToQemuOptions;

/// The machine type this engine writes and expects: QEMU 7.2's `pc` alias. The receiving QEMU
/// must run the same one (`-machine pc-i440fx-7.2` or `-machine pc` on 7.2).
pub const DEFAULT_MACHINE: &str = crate::qemu::stream::writer::PC_I440FX_7_2;

/// The RAM block that holds guest memory on `pc` machines.
pub const GUEST_RAM_BLOCK: &str = "pc.ram";

/// Largest guest RAM moved to or from QEMU: below 3.5 GiB `pc.ram` maps guest-physical memory
/// from 0 without a hole; above, QEMU splits it around the PCI hole.
pub const MAX_QEMU_RAM_BYTES: u64 = 0xe000_0000;

/// Which way a QEMU leg went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From this engine to a QEMU.
    ToQemu,
    /// From a QEMU to this engine.
    FromQemu,
}

impl Direction {
    /// The metric label value.
    pub fn name(self) -> &'static str {
        match self {
            Direction::ToQemu => "to-qemu",
            Direction::FromQemu => "from-qemu",
        }
    }
}

/// What one migration to or from QEMU did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuLegReport {
    /// Which way.
    pub direction: Direction,
    /// The VM's id on this engine's host.
    pub vm: String,
    /// QEMU's machine type, as the stream named it.
    pub machine: String,
    /// Guest RAM moved, bytes.
    pub ram_bytes: u64,
    /// Stream bytes sent or received.
    pub stream_bytes: u64,
    /// Guest pages sent or received, repeats included.
    pub pages: u64,
    /// Pre-copy rounds (sections of pages before the last one; QEMU may cut one round into
    /// several sections, so from QEMU this counts sections).
    pub rounds: u32,
    /// Time the VM did not run, as far as this side sees it: to QEMU, from our pause until
    /// QEMU said it runs the VM; from QEMU, from the end of the last pages until our vCPU runs
    /// (QEMU's own `downtime` covers the part before).
    pub downtime: Duration,
    /// From the first byte to the end.
    pub total: Duration,
    /// Why the rounds stopped (to QEMU).
    pub stop_reason: Option<String>,
    /// From QEMU: the digest of the RAM as it landed ([`crate::qemu::digest`]), to compare
    /// with the paused QEMU source's.
    pub ram_digest: Option<u64>,
    /// From QEMU: the per-page digests behind `ram_digest`, to name the pages that differ.
    #[serde(skip)]
    pub landed: Option<crate::qemu::digest::RamDigest>,
}

/// Why a migration to or from QEMU failed. Each says where the VM runs now.
#[derive(Debug, Error)]
pub enum QemuLegError {
    /// The stream could not be read or written, or QEMU broke it.
    #[error("QEMU migration stream: {0}")]
    Stream(#[from] StreamError),
    /// The vCPU state does not convert between QEMU's layout and the common format.
    #[error("vCPU state: {0}")]
    State(#[from] NativeError),
    /// The host cannot take or give this VM.
    #[error("{0}")]
    Refused(String),
    /// The VM, its host or the guest failed.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// QEMU reported that it could not load the stream (return path `SHUT` with failure).
    #[error("QEMU could not load the migration; the VM runs on here")]
    QemuFailed,
    /// Nothing came back from QEMU after the stream was complete: QEMU may run the VM.
    #[error(
        "QEMU did not confirm within {waited:?} after the complete stream; the VM is held paused here as committed-unconfirmed, since it may run on QEMU: resume it with --peer-is-dead once QEMU does not, or discard it"
    )]
    Unconfirmed {
        /// How long we waited.
        waited: Duration,
    },
    /// A network or timeout failure outside the stream codec.
    #[error("{what}: {detail}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The OS's words.
        detail: String,
    },
}

/// Counts one QEMU leg by direction and result (its figures are in its report).
fn record(direction: Direction, result: &Result<QemuLegReport, QemuLegError>) {
    let outcome = match result {
        Ok(_) => metric::result::COMPLETED,
        Err(_) => metric::result::FAILED,
    };
    metrics::counter!(metric::QEMU_MIGRATIONS_TOTAL, "direction" => direction.name(), "result" => outcome).increment(1);
}

/// A host's actor and its backend's name.
#[derive(Debug, Message)]
#[rtype(result = "Result<(Addr<Host>, String), EngineError>")]
pub(crate) struct QemuHostOf(pub String);

impl Handler<QemuHostOf> for Engine {
    type Result = ResponseFuture<Result<(Addr<Host>, String), EngineError>>;
    fn handle(&mut self, msg: QemuHostOf, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.0);
        Box::pin(async move {
            let host = host?;
            let backend = host.send(GetBackendName).await?;
            Ok((host, backend))
        })
    }
}
