//! A datacenter scenario, as the model runs it: datacenters, hosts, the links between
//! datacenters, VMs and timed events. Every figure is in base units (bytes, bytes per second,
//! seconds); `parse` reads the TOML form with its units and checks every reference.

use crate::engine::Priority;
use crate::format::NativeLayout;
use crate::protocol::Algorithm;

/// A whole scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// A name for the outputs.
    pub name: String,
    /// Seed of every random choice (`random` algorithm picks, `auto` ties); `--seed` overrides.
    pub seed: u64,
    /// How often utilization is sampled, seconds.
    pub sample_every_s: f64,
    /// The run ends at this virtual time at the latest, seconds (`None`: when the last event
    /// and migration are done).
    pub until_s: Option<f64>,
    /// Datacenters, by name.
    pub datacenters: Vec<Datacenter>,
    /// Hosts.
    pub hosts: Vec<HostDef>,
    /// Links between datacenters (inside one datacenter, hosts meet at their NICs' speed).
    pub links: Vec<LinkDef>,
    /// VMs.
    pub vms: Vec<VmDef>,
    /// Timed events, in time order.
    pub events: Vec<TimedEvent>,
}

/// A datacenter.
#[derive(Debug, Clone, PartialEq)]
pub struct Datacenter {
    /// Its name.
    pub name: String,
}

/// A host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostDef {
    /// Its name.
    pub name: String,
    /// Index into [`Scenario::datacenters`].
    pub datacenter: usize,
    /// RAM, bytes.
    pub ram_bytes: u64,
    /// Cores.
    pub cores: u32,
    /// NIC bandwidth, bytes per second (each direction).
    pub nic_bytes_per_sec: f64,
    /// The hypervisor: its VMM type (`kvm`, `xen`, ...) and the native layout it keeps state in.
    pub vmm: String,
    /// The native layout.
    pub layout: NativeLayout,
    /// Memory the host may commit to VMs, bytes (defaults to its RAM).
    pub memory_budget_bytes: u64,
    /// Bandwidth all of the host's outgoing migrations share, bytes per second (defaults to the NIC).
    pub bandwidth_budget_bytes_per_sec: f64,
    /// Migrations out of the host at once; more wait in a queue.
    pub max_outgoing: u32,
    /// Migrations into the host at once; more wait.
    pub max_incoming: u32,
    /// Algorithms the host offers.
    pub algorithms: Vec<Algorithm>,
}

/// A link between two datacenters.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkDef {
    /// Index into [`Scenario::datacenters`].
    pub a: usize,
    /// Index into [`Scenario::datacenters`].
    pub b: usize,
    /// Capacity, bytes per second, shared by every migration crossing it (each direction).
    pub bytes_per_sec: f64,
    /// One-way latency, seconds.
    pub latency_s: f64,
}

/// How a VM writes its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadDef {
    /// Bytes per second the guest writes, from time 0 (or from its start).
    pub dirty_bytes_per_sec: f64,
    /// Pages the writes fall on, bytes (ignored by `uniform`, which writes all memory); a dirty
    /// set saturates here.
    pub working_set_bytes: u64,
    /// Where the writes fall.
    pub pattern: WritePattern,
    /// Later changes of the rate: `(at_s, dirty_bytes_per_sec)`, in time order.
    pub rate_changes: Vec<(f64, f64)>,
}

/// Where a guest's writes fall, which decides how fast its dirty set saturates: the same
/// vocabulary as the backends' [`crate::vmm::WorkloadSpec`] (uniform over all memory; uniform
/// inside the working set, the hot set; sequential through the working set).
pub use crate::vmm::Pattern as WritePattern;

/// A VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmDef {
    /// Its id.
    pub id: String,
    /// RAM, bytes.
    pub ram_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The VMM type it was built for (the paper's "VMM type").
    pub vmm: String,
    /// Its disk image, bytes (the paper's "size"). Hosts share storage, so a migration copies
    /// none of it; 0 when the scenario does not say.
    pub image_bytes: u64,
    /// Its own network bandwidth, bytes per second (the paper's "bandwidth"): the most its
    /// migrations may use, below what its hosts and links allow. `None`: no cap of its own.
    pub bandwidth_bytes_per_sec: Option<f64>,
    /// How it writes.
    pub workload: WorkloadDef,
    /// Index into [`Scenario::hosts`] where it runs from time 0; `None` until a deploy event.
    pub host: Option<usize>,
}

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    /// A host (index into [`Scenario::hosts`]).
    Host(usize),
    /// Any host of a datacenter (index into [`Scenario::datacenters`]) with room; the model
    /// picks the one with the most free memory.
    Datacenter(usize),
}

/// Limits of one migration.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationLimits {
    /// The algorithm asked for (`auto` included).
    pub algorithm: Algorithm,
    /// Cap of this migration's rate, bytes per second.
    pub bandwidth_bytes_per_sec: Option<f64>,
    /// Longest acceptable downtime, seconds (the policy's limit).
    pub downtime_limit_s: Option<f64>,
    /// Its priority and bandwidth floor.
    pub qos: MigrationQos,
    /// Deadline for the total time, seconds: the plan is wrapped as the engine wraps it.
    pub deadline_s: Option<f64>,
}

/// A migration's quality of service, as the engine's request has it (`engine::qos`): its class
/// orders the queue and weighs its share of the source's bandwidth budget; its floor is assured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationQos {
    /// Priority class (`normal` unless said).
    pub priority: Priority,
    /// Bytes per second of the source's budget assured while it sends.
    pub min_bandwidth_bytes_per_sec: Option<f64>,
}

/// What happens at an event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A VM is created (not running anywhere yet).
    Create {
        /// Index into [`Scenario::vms`].
        vm: usize,
    },
    /// A VM starts on a host.
    Deploy {
        /// Index into [`Scenario::vms`].
        vm: usize,
        /// Index into [`Scenario::hosts`].
        host: usize,
    },
    /// A VM migrates.
    Migrate {
        /// Index into [`Scenario::vms`].
        vm: usize,
        /// Where.
        to: Destination,
        /// Its limits.
        limits: MigrationLimits,
    },
    /// Every VM of a host migrates away, to the other hosts of its datacenter.
    Evacuate {
        /// Index into [`Scenario::hosts`].
        host: usize,
        /// The limits of each migration.
        limits: MigrationLimits,
    },
    /// The VMs of a datacenter are packed onto as few hosts as will hold them.
    Consolidate {
        /// Index into [`Scenario::datacenters`].
        datacenter: usize,
        /// The limits of each migration.
        limits: MigrationLimits,
    },
    /// A host fails: its VMs are lost, and migrations to or from it fail.
    FailHost {
        /// Index into [`Scenario::hosts`].
        host: usize,
    },
    /// A link fails: migrations across it fail.
    FailLink {
        /// Index into [`Scenario::links`].
        link: usize,
    },
}

/// An event at a virtual time.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedEvent {
    /// When, seconds.
    pub at_s: f64,
    /// What.
    pub kind: EventKind,
    /// The line of the scenario file it comes from, for messages.
    pub line: usize,
}
