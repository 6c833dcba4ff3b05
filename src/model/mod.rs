//! The datacenter model: the engine's own plans and policy run in virtual time over fluid
//! models of guest memory and links, as the paper's CloudSim evaluation did, but with the
//! rounds, dirtying and downtime CloudSim's one formula leaves out. No guest memory is
//! allocated; a scenario of thousands of hosts runs in seconds.
//!
//! * [`scenario`]: what a scenario holds, in base units.
//! * [`parse`]: the scenario file.
//! * [`outcome`]: what a run produced.

mod memory;
mod migration;
mod network;
pub mod outcome;
pub mod params;
pub mod parse;
mod placement;
mod run;
pub mod scenario;

pub use outcome::{HostSample, MigrationRecord, ModelOutcome, Placement, Prediction};
pub use params::ModelParams;
pub use parse::{parse, ScenarioError};
pub use run::{run, run_with, ModelError, RunOptions};
pub use scenario::{
    Datacenter, Destination, EventKind, HostDef, LinkDef, MigrationLimits, Scenario, TimedEvent, VmDef, WorkloadDef,
    WritePattern,
};
