//! Migratory moves a running virtual machine between hosts, and between hypervisors, while it
//! keeps running.
//!
//! The crate is layered bottom-up; a layer only uses the ones below it:
//!
//! * [`format`]: the common, versioned VM state and the native layouts (`kvm`, `xen-hvm`).
//! * [`protocol`]: frames, control messages, page batches, negotiation.
//! * [`memory`] and [`dirty`]: guest memory pages and dirty bitmaps.
//! * [`vmm`]: the backend trait and the `sim` backend (synthetic guest with real memory).
//! * [`link`] and [`dataplane`]: how control frames and page batches travel between hosts.
//! * [`vm`]: the VM actor and its lifecycle.
//! * [`engine`]: hosts, the migration (source) and receiver (target) actors, the stage machine,
//!   the pure policy functions, reports and the [`engine::EngineHandle`] embedders hold.
//! * [`announce`]: the RARP and gratuitous ARP frames a target sends so the network follows
//!   an activated VM, their QEMU-style schedule, and the packet socket they leave by.
//! * [`telemetry`]: metric names; the library records through the `metrics` facade and never
//!   installs a recorder.
//! * `qemu` (x86-64 Linux): QEMU as a peer: its migration stream (`qemu::stream`), the round
//!   trip of a VM through it, and QEMU-to-QEMU migrations to measure against, driven over QMP.
//! * [`api`]: the request and response bodies of the daemon's HTTP control API, for the daemon,
//!   the CLI and any other client.
//!
//! An embedder needs little more than the crate root: `use migratory::*;` brings in the
//! [`EngineHandle`] (each of its methods has an example), what configures hosts, VMs and
//! migrations, the report and events a migration yields, and the errors met on the way.
//!
//! See ARCHITECTURE.md for the flow of one migration through these modules.
#![warn(missing_docs, missing_debug_implementations)]

pub mod announce;
pub mod api;
pub mod clock;
pub mod dataplane;
pub mod dirty;
pub mod engine;
pub mod format;
pub mod link;
pub mod memory;
pub mod model;
pub mod offload;
pub mod protocol;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod qemu;
pub mod telemetry;
pub mod units;
pub mod vm;
pub mod vmm;

// The embedder's vocabulary. The engine: its handle, and what goes in and comes out of it.
pub use engine::{
    CompressionReport, DecisionReport, DrainReport, DrainedVm, EngineError, EngineHandle, FaultKind, FaultPlan,
    HostConfig, HostUsage, MigrationEvent, MigrationReport, MigrationRequest, MigrationStatus, Outcome, PageCounts,
    Phase, PolicyConfig, PredictionReport, Side, Stage, StageReport, StallAction, StartedMigration, StayedVm,
    VmLocation, VmSpec,
};
// The settings those types hold, and the VMs a host lists.
pub use format::{NativeLayout, VmConfig};
pub use link::tls::TlsSetup;
pub use link::{Keepalive, Shaping};
pub use protocol::auth::ClusterKey;
pub use protocol::{AbortReason, Algorithm, Compression, CompressionChoice};
pub use units::ByteSize;
pub use vm::{HeldCopy, HeldReason, Lifecycle, OperatorAction, VmInfo};
pub use vmm::{BackendSpec, GuestStats, Hypervisor, Pattern, WorkloadSpec};
// The errors met on the way: inside an `EngineError`, or from parsing and loading settings.
pub use engine::faults::FaultPlanError;
pub use format::{FormatError, NameError, NativeError};
pub use link::tls::TlsError;
pub use protocol::auth::AuthError;
pub use protocol::NegotiationError;
pub use units::ByteSizeError;

/// README.md's Rust examples, compiled and run as doc tests so the README cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
