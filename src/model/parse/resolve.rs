//! From the file as written to a [`Scenario`]: names become indices, defaults are applied,
//! and every reference and limit is checked where its line is still known.

use std::collections::HashMap;

use toml::Spanned;

use super::raw::{
    RawConsolidate, RawCreate, RawDeploy, RawEvacuate, RawEvent, RawFailHost, RawFailLink, RawHost, RawLink,
    RawMigrate, RawScenario,
};
use super::units::{Bandwidth, Seconds, Text};
use super::{vms, Lines, ScenarioError};
use crate::format::NativeLayout;
use crate::model::{
    Datacenter, Destination, EventKind, HostDef, LinkDef, MigrationLimits, MigrationQos, Scenario, TimedEvent,
};
use crate::protocol::Algorithm;

/// How many names an "is not defined" message lists before it only counts the rest.
const LISTED_NAMES: usize = 6;

/// `sample_every` when the file does not say, seconds.
const DEFAULT_SAMPLE_EVERY_S: f64 = 1.0;

/// `max_outgoing` and `max_incoming` when the file does not say.
const DEFAULT_MIGRATIONS_AT_ONCE: u32 = 2;

/// Resolves the whole file; each error carries the line of the value or entry at fault.
pub(super) fn resolve(raw: RawScenario, lines: &Lines) -> Result<Scenario, ScenarioError> {
    let sample_every_s = match &raw.sample_every {
        Some(s) => positive(lines, s, "sample_every")?,
        None => DEFAULT_SAMPLE_EVERY_S,
    };
    let until_s = raw.until.as_ref().map(|u| positive(lines, u, "until")).transpose()?;
    let mut datacenters = Names::new("datacenter", "datacenters");
    for dc in &raw.datacenter {
        datacenters.define(&dc.get_ref().name, lines)?;
    }
    let (hosts, host_names) = hosts(lines, &datacenters, raw.host, raw.host_group)?;
    let links = Links::resolve(lines, &datacenters, &raw.link)?;
    let (vms, vm_names) = vms::resolve(
        &vms::Known {
            lines,
            datacenters: &datacenters,
            host_names: &host_names,
            hosts: &hosts,
        },
        raw.vm,
        raw.vm_group,
        raw.seed,
    )?;
    let refs = Refs {
        lines,
        datacenters: &datacenters,
        hosts: &host_names,
        vms: &vm_names,
        links: &links,
    };
    let mut events = raw.event.iter().map(|e| refs.event(e)).collect::<Result<Vec<_>, _>>()?;
    // Stable: events at one time keep the file's order.
    events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Ok(Scenario {
        name: raw.name,
        seed: raw.seed,
        sample_every_s,
        until_s,
        datacenters: datacenters.order.into_iter().map(|name| Datacenter { name }).collect(),
        hosts,
        links: links.defs,
        vms,
        events,
    })
}

/// The names of one kind of thing, each with its index and the line that defined it.
#[derive(Debug)]
pub(super) struct Names {
    kind: &'static str,
    plural: &'static str,
    index: HashMap<String, (usize, usize)>,
    order: Vec<String>,
}

impl Names {
    pub(super) fn new(kind: &'static str, plural: &'static str) -> Names {
        Names {
            kind,
            plural,
            index: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// Defines the next name from the file.
    pub(super) fn define(&mut self, name: &Spanned<String>, lines: &Lines) -> Result<usize, ScenarioError> {
        self.define_at(name.get_ref(), lines.of(name))
    }

    /// Defines the next name, refusing an empty or taken one; `line` is where it comes from.
    pub(super) fn define_at(&mut self, name: &str, line: usize) -> Result<usize, ScenarioError> {
        let kind = self.kind;
        if name.trim().is_empty() {
            return Err(ScenarioError {
                line,
                detail: format!("a {kind} needs a name that is not empty"),
            });
        }
        if let Some(&(_, first)) = self.index.get(name) {
            return Err(ScenarioError {
                line,
                detail: format!("{kind} {name:?} is defined twice (first on line {first})"),
            });
        }
        let index = self.order.len();
        self.index.insert(name.to_owned(), (index, line));
        self.order.push(name.to_owned());
        Ok(index)
    }

    /// The index of a name the file refers to.
    pub(super) fn find(&self, name: &Spanned<String>, lines: &Lines) -> Result<usize, ScenarioError> {
        match self.index.get(name.get_ref()) {
            Some(&(index, _)) => Ok(index),
            None => Err(lines.error(
                name,
                format!("{} {:?} is not defined ({})", self.kind, name.get_ref(), self.listing()),
            )),
        }
    }

    pub(super) fn name(&self, index: usize) -> &str {
        &self.order[index]
    }

    /// The names in the file's order, for "is not defined" messages.
    pub(super) fn listing(&self) -> String {
        let shown = self
            .order
            .iter()
            .take(LISTED_NAMES)
            .map(String::as_str)
            .collect::<Vec<_>>();
        match self.order.len() {
            0 => format!("no {} is defined", self.kind),
            n if n <= LISTED_NAMES => format!("{}: {}", self.plural, shown.join(", ")),
            n => format!(
                "{}: {}, ... and {} more",
                self.plural,
                shown.join(", "),
                n - LISTED_NAMES
            ),
        }
    }
}

/// An error on `line`.
pub(super) fn error_at(line: usize, detail: impl Into<String>) -> ScenarioError {
    ScenarioError {
        line,
        detail: detail.into(),
    }
}

/// A duration that must be above zero.
fn positive(lines: &Lines, value: &Spanned<Seconds>, key: &str) -> Result<f64, ScenarioError> {
    match value.get_ref().0 {
        s if s > 0.0 => Ok(s),
        _ => Err(lines.error(value, format!("{key} must be above zero"))),
    }
}

/// A count that must be at least one.
pub(super) fn at_least_one(lines: &Lines, value: &Spanned<u32>, key: &str) -> Result<u32, ScenarioError> {
    match *value.get_ref() {
        0 => Err(lines.error(value, format!("{key} must be at least 1"))),
        n => Ok(n),
    }
}

/// Refuses a key that this kind of entry does not take.
pub(super) fn absent<T>(lines: &Lines, value: &Option<Spanned<T>>, why: &str) -> Result<(), ScenarioError> {
    match value {
        Some(v) => Err(lines.error(v, why)),
        None => Ok(()),
    }
}

/// A key that this kind of entry needs; `entry` is the entry, for the line.
pub(super) fn present<'a, T, E>(
    lines: &Lines,
    value: &'a Option<Spanned<T>>,
    entry: &Spanned<E>,
    why: &str,
) -> Result<&'a Spanned<T>, ScenarioError> {
    value.as_ref().ok_or_else(|| lines.error(entry, why))
}

/// Every host, groups expanded where they stand in the file.
fn hosts(
    lines: &Lines,
    datacenters: &Names,
    singles: Vec<Spanned<RawHost>>,
    groups: Vec<Spanned<RawHost>>,
) -> Result<(Vec<HostDef>, Names), ScenarioError> {
    let entries = in_file_order(singles, groups);
    let mut names = Names::new("host", "hosts");
    let mut defs = Vec::new();
    for (entry, is_group) in &entries {
        let raw = entry.get_ref();
        let template = host_def(lines, datacenters, raw)?;
        if *is_group {
            let single_only = "`name` belongs in a [[host]]; a [[host_group]] has a `prefix`";
            absent(lines, &raw.name, single_only)?;
            let count = present(lines, &raw.count, entry, "a [[host_group]] needs `count`")?;
            let count = at_least_one(lines, count, "count")?;
            let prefix = present(lines, &raw.prefix, entry, "a [[host_group]] needs `prefix`")?;
            for i in 1..=count {
                let name = member_name(prefix.get_ref(), i);
                names.define_at(&name, lines.of(entry))?;
                defs.push(HostDef {
                    name,
                    ..template.clone()
                });
            }
        } else {
            let group_only = |key: &str| format!("`{key}` belongs in a [[host_group]]; a [[host]] has a `name`");
            absent(lines, &raw.count, &group_only("count"))?;
            absent(lines, &raw.prefix, &group_only("prefix"))?;
            let name = present(lines, &raw.name, entry, "a [[host]] needs `name`")?;
            names.define(name, lines)?;
            defs.push(HostDef {
                name: name.get_ref().clone(),
                ..template
            });
        }
    }
    Ok((defs, names))
}

/// Single entries and groups of one kind, merged back into the file's order, each marked
/// `true` if it is a group.
pub(super) fn in_file_order<T>(singles: Vec<Spanned<T>>, groups: Vec<Spanned<T>>) -> Vec<(Spanned<T>, bool)> {
    let mut entries = singles
        .into_iter()
        .map(|e| (e, false))
        .chain(groups.into_iter().map(|e| (e, true)))
        .collect::<Vec<_>>();
    entries.sort_by_key(|(e, _)| e.span().start);
    entries
}

/// The name of a group's `i`th member, counted from 1.
pub(super) fn member_name(prefix: &str, i: u32) -> String {
    format!("{prefix}-{i:04}")
}

/// A host as an entry describes it, without its name.
fn host_def(lines: &Lines, datacenters: &Names, raw: &RawHost) -> Result<HostDef, ScenarioError> {
    let ram_bytes = raw.ram.get_ref().0;
    if ram_bytes == 0 {
        return Err(lines.error(&raw.ram, "a host's ram must be above zero"));
    }
    let vmm = raw.vmm.get_ref().trim().to_owned();
    if vmm.is_empty() {
        return Err(lines.error(
            &raw.vmm,
            "vmm names the host's hypervisor (\"kvm\", \"xen\", ...) and cannot be empty",
        ));
    }
    let layout = match raw.layout {
        Some(Text(layout)) => layout,
        None if vmm.to_ascii_lowercase().starts_with("xen") => NativeLayout::XenHvm,
        None => NativeLayout::Kvm,
    };
    let algorithms = match &raw.algorithms {
        Some(list) if list.get_ref().is_empty() => {
            return Err(lines.error(list, "a host must offer at least one algorithm"));
        }
        Some(list) => list.get_ref().iter().map(|Text(a)| *a).collect(),
        None => Algorithm::ALL.to_vec(),
    };
    let Bandwidth(nic_bytes_per_sec) = raw.nic;
    Ok(HostDef {
        name: String::new(),
        datacenter: datacenters.find(&raw.datacenter, lines)?,
        ram_bytes,
        cores: at_least_one(lines, &raw.cores, "cores")?,
        nic_bytes_per_sec,
        vmm,
        layout,
        memory_budget_bytes: raw.memory_budget.map_or(ram_bytes, |b| b.0),
        bandwidth_budget_bytes_per_sec: raw.bandwidth_budget.map_or(nic_bytes_per_sec, |b| b.0),
        max_outgoing: raw.max_outgoing.as_ref().map_or(Ok(DEFAULT_MIGRATIONS_AT_ONCE), |m| {
            at_least_one(lines, m, "max_outgoing")
        })?,
        max_incoming: raw.max_incoming.as_ref().map_or(Ok(DEFAULT_MIGRATIONS_AT_ONCE), |m| {
            at_least_one(lines, m, "max_incoming")
        })?,
        algorithms,
    })
}

/// The links, and which one joins a pair of datacenters.
#[derive(Debug)]
struct Links {
    defs: Vec<LinkDef>,
    /// `(lower, higher)` datacenter index to link index and line.
    by_pair: HashMap<(usize, usize), (usize, usize)>,
}

impl Links {
    fn resolve(lines: &Lines, datacenters: &Names, raw: &[Spanned<RawLink>]) -> Result<Links, ScenarioError> {
        let mut links = Links {
            defs: Vec::new(),
            by_pair: HashMap::new(),
        };
        for entry in raw {
            let link = entry.get_ref();
            let (a, b) = (datacenters.find(&link.a, lines)?, datacenters.find(&link.b, lines)?);
            if a == b {
                return Err(lines.error(
                    &link.b,
                    format!(
                        "a link joins two datacenters; this one joins {:?} to itself",
                        datacenters.name(a)
                    ),
                ));
            }
            let line = lines.of(entry);
            if let Some(&(_, first)) = links.by_pair.get(&(a.min(b), a.max(b))) {
                return Err(error_at(
                    line,
                    format!(
                        "datacenters {:?} and {:?} are linked twice (first on line {first})",
                        datacenters.name(a),
                        datacenters.name(b)
                    ),
                ));
            }
            links.by_pair.insert((a.min(b), a.max(b)), (links.defs.len(), line));
            links.defs.push(LinkDef {
                a,
                b,
                bytes_per_sec: link.bandwidth.0,
                latency_s: link.latency.map_or(0.0, |l| l.0),
            });
        }
        Ok(links)
    }
}

/// The one action of an event, as written.
enum Action<'a> {
    Create(&'a Spanned<RawCreate>),
    Deploy(&'a Spanned<RawDeploy>),
    Migrate(&'a Spanned<RawMigrate>),
    Evacuate(&'a Spanned<RawEvacuate>),
    Consolidate(&'a Spanned<RawConsolidate>),
    FailHost(&'a Spanned<RawFailHost>),
    FailLink(&'a Spanned<RawFailLink>),
}

/// An action of an event, if the event holds it: its key, span and value.
fn found<'a, T>(
    key: &'static str,
    value: &'a Option<Spanned<T>>,
    action: fn(&'a Spanned<T>) -> Action<'a>,
) -> Option<(&'static str, std::ops::Range<usize>, Action<'a>)> {
    value.as_ref().map(|v| (key, v.span(), action(v)))
}

/// What an event may refer to.
struct Refs<'a> {
    lines: &'a Lines,
    datacenters: &'a Names,
    hosts: &'a Names,
    vms: &'a Names,
    links: &'a Links,
}

impl Refs<'_> {
    fn event(&self, entry: &Spanned<RawEvent>) -> Result<TimedEvent, ScenarioError> {
        let raw = entry.get_ref();
        let lines = self.lines;
        let actions = [
            found("create", &raw.create, Action::Create),
            found("deploy", &raw.deploy, Action::Deploy),
            found("migrate", &raw.migrate, Action::Migrate),
            found("evacuate", &raw.evacuate, Action::Evacuate),
            found("consolidate", &raw.consolidate, Action::Consolidate),
            found("fail_host", &raw.fail_host, Action::FailHost),
            found("fail_link", &raw.fail_link, Action::FailLink),
        ];
        let mut given = actions.into_iter().flatten().collect::<Vec<_>>();
        given.sort_by_key(|(_, span, _)| span.start);
        let (span, action) =
            match given.as_slice() {
                [(_, span, action)] => (span, action),
                [] => return Err(lines.error(
                    entry,
                    "an event needs one action: create, deploy, migrate, evacuate, consolidate, fail_host or fail_link",
                )),
                [_, (_, second, _), ..] => {
                    let names = given.iter().map(|(name, _, _)| *name).collect::<Vec<_>>();
                    return Err(error_at(
                        lines.line(second.start),
                        format!("an event holds one action, this one has {}", names.join(" and ")),
                    ));
                }
            };
        Ok(TimedEvent {
            at_s: raw.at.0,
            kind: self.action(action)?,
            line: lines.line(span.start),
        })
    }

    fn action(&self, action: &Action<'_>) -> Result<EventKind, ScenarioError> {
        let lines = self.lines;
        Ok(match *action {
            Action::Create(c) => EventKind::Create {
                vm: self.vms.find(&c.get_ref().vm, lines)?,
            },
            Action::Deploy(d) => EventKind::Deploy {
                vm: self.vms.find(&d.get_ref().vm, lines)?,
                host: self.hosts.find(&d.get_ref().host, lines)?,
            },
            Action::Migrate(entry) => {
                let m = entry.get_ref();
                let to = match (&m.to_host, &m.to_datacenter) {
                    (Some(host), None) => Destination::Host(self.hosts.find(host, lines)?),
                    (None, Some(dc)) => Destination::Datacenter(self.datacenters.find(dc, lines)?),
                    (Some(_), Some(_)) => {
                        return Err(lines.error(entry, "a migration goes to_host or to_datacenter, not both"))
                    }
                    (None, None) => return Err(lines.error(entry, "a migration needs to_host or to_datacenter")),
                };
                EventKind::Migrate {
                    vm: self.vms.find(&m.vm, lines)?,
                    to,
                    limits: with_qos(
                        self.limits(m.algorithm, m.bandwidth, &m.downtime_limit, &m.deadline)?,
                        m.priority,
                        m.min_bandwidth,
                    ),
                }
            }
            Action::Evacuate(e) => {
                let e = e.get_ref();
                EventKind::Evacuate {
                    host: self.hosts.find(&e.host, lines)?,
                    limits: with_qos(
                        self.limits(e.algorithm, e.bandwidth, &e.downtime_limit, &e.deadline)?,
                        e.priority,
                        e.min_bandwidth,
                    ),
                }
            }
            Action::Consolidate(c) => {
                let c = c.get_ref();
                EventKind::Consolidate {
                    datacenter: self.datacenters.find(&c.datacenter, lines)?,
                    limits: with_qos(
                        self.limits(c.algorithm, c.bandwidth, &c.downtime_limit, &c.deadline)?,
                        c.priority,
                        c.min_bandwidth,
                    ),
                }
            }
            Action::FailHost(f) => EventKind::FailHost {
                host: self.hosts.find(&f.get_ref().host, lines)?,
            },
            Action::FailLink(f) => EventKind::FailLink {
                link: self.link(&f.get_ref().a, &f.get_ref().b)?,
            },
        })
    }

    fn limits(
        &self,
        algorithm: Option<Text<Algorithm>>,
        bandwidth: Option<Bandwidth>,
        downtime_limit: &Option<Spanned<Seconds>>,
        deadline: &Option<Spanned<Seconds>>,
    ) -> Result<MigrationLimits, ScenarioError> {
        Ok(MigrationLimits {
            algorithm: algorithm.map_or(Algorithm::Auto, |Text(a)| a),
            bandwidth_bytes_per_sec: bandwidth.map(|b| b.0),
            downtime_limit_s: downtime_limit
                .as_ref()
                .map(|d| positive(self.lines, d, "downtime_limit"))
                .transpose()?,
            qos: MigrationQos::default(),
            deadline_s: deadline
                .as_ref()
                .map(|d| positive(self.lines, d, "deadline"))
                .transpose()?,
        })
    }

    fn link(&self, a: &Spanned<String>, b: &Spanned<String>) -> Result<usize, ScenarioError> {
        let (ia, ib) = (
            self.datacenters.find(a, self.lines)?,
            self.datacenters.find(b, self.lines)?,
        );
        match self.links.by_pair.get(&(ia.min(ib), ia.max(ib))) {
            Some(&(link, _)) => Ok(link),
            None => Err(self.lines.error(
                a,
                format!("no link joins datacenters {:?} and {:?}", a.get_ref(), b.get_ref()),
            )),
        }
    }
}

/// `limits` with the entry's priority and floor (QoS keys, the same in every kind of entry).
fn with_qos(
    mut limits: MigrationLimits,
    priority: Option<Text<crate::engine::Priority>>,
    min_bandwidth: Option<Bandwidth>,
) -> MigrationLimits {
    limits.qos = MigrationQos {
        priority: priority.map(|Text(p)| p).unwrap_or_default(),
        min_bandwidth_bytes_per_sec: min_bandwidth.map(|b| b.0),
    };
    limits
}
