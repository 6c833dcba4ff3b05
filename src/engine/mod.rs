//! The engine: hosts, migrations and the handle embedders hold.
//!
//! * [`EngineHandle`]: start an engine, add hosts, create VMs, migrate, watch, cancel.
//! * [`stage`]: the six stages (plus `pull`) and the one function that orders them.
//! * [`plan`]: one plan per algorithm, the interface the source run (and a model) drives.
//! * [`policy`]: pure decisions (convergence, stall handling, rate, `auto`'s choice).
//! * [`receiver_state`]: the target's protocol state machine, pure.
//! * Actors: `Engine` (registry), `Host`, `Migration` (source side, runs [`source`]'s stages),
//!   `Receiver` (target side).

mod ask;
mod drain;
mod error;
mod events;
pub mod faults;
mod fence;
mod handle;
pub mod host;
pub mod migration;
mod operator;
pub mod plan;
pub mod policy;
mod progress;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod qemu;
mod qos;
pub mod receiver;
pub use receiver::state as receiver_state;
pub mod registry;
mod report;
mod request;
mod route;
mod source;
pub mod stage;
pub(crate) mod testpoint;
pub mod verify;

pub use drain::{DrainReport, DrainedVm, StayedVm};
pub use error::{EngineError, Side};
pub use events::MigrationEvent;
pub use faults::{FaultKind, FaultPlan};
pub use handle::{EngineHandle, StartedMigration};
pub use host::HostUsage;
pub use policy::{PolicyConfig, StallAction};
pub use progress::Progress;
pub use progress::{MigrationStatus, Phase};
pub use qos::{Priority, QosReport};
pub use report::{
    CompressionReport, DecisionReport, MigrationReport, Outcome, PageCounts, PredictionReport, StageReport, VmLocation,
};
pub use request::{HostConfig, MigrationRequest, VmSpec};
pub use stage::Stage;
