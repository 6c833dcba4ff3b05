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
//! * [`telemetry`]: metric names; the library records through the `metrics` facade and never
//!   installs a recorder.
//! * [`api`]: the request and response bodies of the daemon's HTTP control API, for the daemon,
//!   the CLI and any other client.
//!
//! See ARCHITECTURE.md for the flow of one migration through these modules.
#![warn(missing_docs, missing_debug_implementations)]

pub mod api;
pub mod clock;
pub mod dataplane;
pub mod dirty;
pub mod engine;
pub mod format;
pub mod link;
pub mod memory;
pub mod offload;
pub mod protocol;
pub mod telemetry;
pub mod units;
pub mod vm;
pub mod vmm;
