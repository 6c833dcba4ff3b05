//! The scenario file as written: names unresolved, defaults unapplied, every value that a
//! later check may refuse kept with its span so that the message can name its line.
//!
//! One struct serves `[[host]]` and `[[host_group]]` (and one `[[vm]]` and `[[vm_group]]`):
//! they share all but three keys, and serde cannot both flatten the shared part and refuse
//! unknown keys. Which keys each kind of entry may hold is checked in `resolve`.

use serde::Deserialize;
use toml::Spanned;

use super::units::{Bandwidth, RateSpec, Seconds, Size, Text};
use crate::engine::Priority;
use crate::format::NativeLayout;
use crate::protocol::Algorithm;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScenario {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub sample_every: Option<Spanned<Seconds>>,
    pub until: Option<Spanned<Seconds>>,
    #[serde(default)]
    pub datacenter: Vec<Spanned<RawDatacenter>>,
    #[serde(default)]
    pub host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    pub host_group: Vec<Spanned<RawHost>>,
    #[serde(default)]
    pub link: Vec<Spanned<RawLink>>,
    #[serde(default)]
    pub vm: Vec<Spanned<RawVm>>,
    #[serde(default)]
    pub vm_group: Vec<Spanned<RawVm>>,
    #[serde(default)]
    pub event: Vec<Spanned<RawEvent>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatacenter {
    pub name: Spanned<String>,
}

/// A `[[host]]` (with `name`) or a `[[host_group]]` (with `count` and `prefix`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    pub name: Option<Spanned<String>>,
    pub count: Option<Spanned<u32>>,
    pub prefix: Option<Spanned<String>>,
    pub datacenter: Spanned<String>,
    pub ram: Spanned<Size>,
    pub cores: Spanned<u32>,
    pub nic: Bandwidth,
    pub vmm: Spanned<String>,
    pub layout: Option<Text<NativeLayout>>,
    pub memory_budget: Option<Size>,
    pub bandwidth_budget: Option<Bandwidth>,
    pub max_outgoing: Option<Spanned<u32>>,
    pub max_incoming: Option<Spanned<u32>>,
    pub algorithms: Option<Spanned<Vec<Text<Algorithm>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLink {
    pub a: Spanned<String>,
    pub b: Spanned<String>,
    pub bandwidth: Bandwidth,
    pub latency: Option<Seconds>,
}

/// A `[[vm]]` (with `id`, and `host` if it runs from time 0) or a `[[vm_group]]` (with
/// `count`, `prefix`, and `place` with `datacenter` or `host_prefix` if its VMs run from
/// time 0).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVm {
    pub id: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub count: Option<Spanned<u32>>,
    pub prefix: Option<Spanned<String>>,
    pub place: Option<Spanned<Place>>,
    pub datacenter: Option<Spanned<String>>,
    pub host_prefix: Option<Spanned<String>>,
    pub ram: Spanned<Size>,
    pub vcpus: Spanned<u32>,
    pub vmm: Spanned<String>,
    pub image_size: Option<Size>,
    pub bandwidth: Option<Bandwidth>,
    pub dirty_rate: RateSpec,
    pub working_set: Option<Spanned<Size>>,
    pub pattern: Option<Pattern>,
    #[serde(default)]
    pub rate_changes: Vec<RawRateChange>,
}

/// How a group's VMs are spread over hosts at time 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Place {
    /// Host after host, skipping those without room.
    RoundRobin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Pattern {
    Uniform,
    HotSet,
    Sequential,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateChange {
    pub at: Seconds,
    pub dirty_rate: RateSpec,
}

/// An `[[event]]`: `at` and exactly one action.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvent {
    pub at: Seconds,
    pub create: Option<Spanned<RawCreate>>,
    pub deploy: Option<Spanned<RawDeploy>>,
    pub migrate: Option<Spanned<RawMigrate>>,
    pub evacuate: Option<Spanned<RawEvacuate>>,
    pub consolidate: Option<Spanned<RawConsolidate>>,
    pub fail_host: Option<Spanned<RawFailHost>>,
    pub fail_link: Option<Spanned<RawFailLink>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCreate {
    pub vm: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeploy {
    pub vm: Spanned<String>,
    pub host: Spanned<String>,
}

/// The limits keys repeat in the three structs below rather than being flattened: serde
/// cannot flatten and refuse unknown keys at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMigrate {
    pub vm: Spanned<String>,
    pub to_host: Option<Spanned<String>>,
    pub to_datacenter: Option<Spanned<String>>,
    pub algorithm: Option<Text<Algorithm>>,
    pub bandwidth: Option<Bandwidth>,
    pub downtime_limit: Option<Spanned<Seconds>>,
    // Quality of service.
    pub priority: Option<Text<Priority>>,
    pub min_bandwidth: Option<Bandwidth>,
    pub deadline: Option<Spanned<Seconds>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvacuate {
    pub host: Spanned<String>,
    pub algorithm: Option<Text<Algorithm>>,
    pub bandwidth: Option<Bandwidth>,
    pub downtime_limit: Option<Spanned<Seconds>>,
    // Quality of service.
    pub priority: Option<Text<Priority>>,
    pub min_bandwidth: Option<Bandwidth>,
    pub deadline: Option<Spanned<Seconds>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConsolidate {
    pub datacenter: Spanned<String>,
    pub algorithm: Option<Text<Algorithm>>,
    pub bandwidth: Option<Bandwidth>,
    pub downtime_limit: Option<Spanned<Seconds>>,
    // Quality of service.
    pub priority: Option<Text<Priority>>,
    pub min_bandwidth: Option<Bandwidth>,
    pub deadline: Option<Spanned<Seconds>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFailHost {
    pub host: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFailLink {
    pub a: Spanned<String>,
    pub b: Spanned<String>,
}
