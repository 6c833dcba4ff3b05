//! The datacenter model: the engine's own plans and policy run in virtual time over fluid
//! models of guest memory and links, as the paper's CloudSim evaluation did, but with the
//! rounds, dirtying and downtime CloudSim's one formula leaves out. No guest memory is
//! allocated; a scenario of thousands of hosts runs in seconds.
//!
//! * [`scenario`]: what a scenario holds, in base units.
//! * [`parse()`]: the scenario file.
//! * [`outcome`]: what a run produced.
//! * [`output`]: what a run leaves behind: summary JSON, CSV series, plots, the text summary.
//! * [`plot`]: charts as SVG and PNG, written here with no plotting dependency.

mod memory;
mod migration;
mod network;
pub mod outcome;
pub mod output;
pub mod params;
pub mod parse;
mod placement;
pub mod plot;
mod run;
pub mod scenario;

pub use outcome::{HostSample, MigrationRecord, ModelOutcome, Placement, Prediction};
pub use params::ModelParams;
pub use parse::{parse, ScenarioError};
pub use run::{run, run_with, ModelError, RunOptions};
pub use scenario::{
    Datacenter, Destination, EventKind, HostDef, LinkDef, MigrationLimits, MigrationQos, Scenario, TimedEvent, VmDef,
    WorkloadDef, WritePattern,
};
