//! VMs and VM groups: their workloads, the rates they draw, and where they run at time 0.

use toml::Spanned;

use super::raw::{Pattern, Place, RawVm};
use super::resolve::{absent, at_least_one, error_at, in_file_order, member_name, present, Names};
use super::units::{RateSpec, Size};
use super::{Lines, ScenarioError};
use crate::model::{HostDef, VmDef, WorkloadDef, WritePattern};
use crate::units::ByteSize;

/// What VMs may refer to, resolved before them.
#[derive(Debug)]
pub(super) struct Known<'a> {
    pub lines: &'a Lines,
    pub datacenters: &'a Names,
    pub host_names: &'a Names,
    pub hosts: &'a [HostDef],
}

/// Every VM, groups expanded where they stand in the file, placed in that order.
pub(super) fn resolve(
    known: &Known<'_>,
    singles: Vec<Spanned<RawVm>>,
    groups: Vec<Spanned<RawVm>>,
    seed: u64,
) -> Result<(Vec<VmDef>, Names), ScenarioError> {
    let mut vms = Vms {
        known,
        names: Names::new("VM", "VMs"),
        memory: Memory {
            hosts: known.hosts,
            committed: vec![0; known.hosts.len()],
        },
        defs: Vec::new(),
    };
    for (position, (entry, is_group)) in in_file_order(singles, groups).iter().enumerate() {
        let mut rng = SplitMix64::for_entry(seed, position);
        if *is_group {
            vms.group(entry, &mut rng)?;
        } else {
            vms.single(entry, &mut rng)?;
        }
    }
    Ok((vms.defs, vms.names))
}

/// The VMs so far, and the memory they hold at time 0.
#[derive(Debug)]
struct Vms<'a> {
    known: &'a Known<'a>,
    names: Names,
    memory: Memory<'a>,
    defs: Vec<VmDef>,
}

impl Vms<'_> {
    fn single(&mut self, entry: &Spanned<RawVm>, rng: &mut SplitMix64) -> Result<(), ScenarioError> {
        let (known, lines, raw) = (self.known, self.known.lines, entry.get_ref());
        let group_only = |key: &str| format!("`{key}` belongs in a [[vm_group]]; a [[vm]] has an `id` and a `host`");
        absent(lines, &raw.count, &group_only("count"))?;
        absent(lines, &raw.prefix, &group_only("prefix"))?;
        absent(lines, &raw.place, &group_only("place"))?;
        absent(lines, &raw.datacenter, &group_only("datacenter"))?;
        absent(lines, &raw.host_prefix, &group_only("host_prefix"))?;
        let id = present(lines, &raw.id, entry, "a [[vm]] needs `id`")?;
        let shape = Shape::of(known, raw, &format!("VM {:?}", id.get_ref()))?;
        self.names.define(id, lines)?;
        let host = match &raw.host {
            Some(name) => {
                let host = known.host_names.find(name, lines)?;
                if !self.memory.take(host, shape.vm.ram_bytes) {
                    let budget = known.hosts[host].memory_budget_bytes;
                    return Err(lines.error(
                        name,
                        format!(
                            "VM {:?} ({}) does not fit on host {:?} at time 0: {} of its {} memory budget are taken",
                            id.get_ref(),
                            ByteSize(shape.vm.ram_bytes),
                            name.get_ref(),
                            ByteSize(budget - self.memory.free(host)),
                            ByteSize(budget),
                        ),
                    ));
                }
                Some(host)
            }
            None => None,
        };
        self.defs.push(shape.instance(id.get_ref().clone(), host, rng));
        Ok(())
    }

    fn group(&mut self, entry: &Spanned<RawVm>, rng: &mut SplitMix64) -> Result<(), ScenarioError> {
        let (known, lines, raw) = (self.known, self.known.lines, entry.get_ref());
        let single_only =
            |key: &str| format!("`{key}` belongs in a [[vm]]; a [[vm_group]] has a `prefix` and a `place`");
        absent(lines, &raw.id, &single_only("id"))?;
        absent(lines, &raw.host, &single_only("host"))?;
        let count = present(lines, &raw.count, entry, "a [[vm_group]] needs `count`")?;
        let count = at_least_one(lines, count, "count")?;
        let prefix = present(lines, &raw.prefix, entry, "a [[vm_group]] needs `prefix`")?.get_ref();
        let shape = Shape::of(known, raw, &format!("each VM of vm_group {prefix:?}"))?;
        let mut spread = match &raw.place {
            Some(place) => Some(RoundRobin::new(known, raw, place)?),
            None => {
                let why = "without `place`, a group's VMs do not run at time 0: `datacenter` and `host_prefix` \
                           choose where `place` puts them";
                absent(lines, &raw.datacenter, why)?;
                absent(lines, &raw.host_prefix, why)?;
                None
            }
        };
        for i in 1..=count {
            let id = member_name(prefix, i);
            self.names.define_at(&id, lines.of(entry))?;
            let host = match &mut spread {
                Some(spread) => {
                    let host = spread.next(&mut self.memory, shape.vm.ram_bytes);
                    Some(host.ok_or_else(|| spread.full(&id, shape.vm.ram_bytes, &self.memory, i - 1, count))?)
                }
                None => None,
            };
            self.defs.push(shape.instance(id, host, rng));
        }
        Ok(())
    }
}

/// A VM as its entry describes it, before its id, host and drawn rates.
struct Shape {
    vm: VmDef,
    dirty_rate: RateSpec,
    /// In time order.
    rate_changes: Vec<(f64, RateSpec)>,
}

impl Shape {
    /// `label` names the VM, or the group's VMs, in messages.
    fn of(known: &Known<'_>, raw: &RawVm, label: &str) -> Result<Shape, ScenarioError> {
        let lines = known.lines;
        let ram_bytes = raw.ram.get_ref().0;
        if ram_bytes == 0 {
            return Err(lines.error(&raw.ram, "a VM's ram must be above zero"));
        }
        let largest = known.hosts.iter().max_by_key(|h| h.ram_bytes);
        match largest {
            Some(host) if host.ram_bytes >= ram_bytes => {}
            Some(host) => {
                return Err(lines.error(
                    &raw.ram,
                    format!(
                        "{label} needs {} of RAM, more than any host has (the largest, {:?}, has {})",
                        ByteSize(ram_bytes),
                        host.name,
                        ByteSize(host.ram_bytes)
                    ),
                ))
            }
            None => return Err(lines.error(&raw.ram, format!("{label} needs a host, but no host is defined"))),
        }
        let working_set_bytes = match &raw.working_set {
            Some(ws) => match ws.get_ref().0 {
                0 => return Err(lines.error(ws, "working_set must be above zero")),
                bytes if bytes > ram_bytes => {
                    return Err(lines.error(
                        ws,
                        format!(
                            "working_set ({}) is larger than the VM's ram ({})",
                            ByteSize(bytes),
                            ByteSize(ram_bytes)
                        ),
                    ))
                }
                bytes => bytes,
            },
            None => ram_bytes,
        };
        let vmm = raw.vmm.get_ref().trim().to_owned();
        if vmm.is_empty() {
            return Err(lines.error(
                &raw.vmm,
                "vmm names the VMM type the VM was built for and cannot be empty",
            ));
        }
        let mut rate_changes = raw
            .rate_changes
            .iter()
            .map(|c| (c.at.0, c.dirty_rate))
            .collect::<Vec<_>>();
        // Stable: two changes at one time apply in the file's order, the last one winning.
        rate_changes.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Shape {
            vm: VmDef {
                id: String::new(),
                ram_bytes,
                vcpus: at_least_one(lines, &raw.vcpus, "vcpus")?,
                vmm,
                image_bytes: raw.image_size.map_or(0, |Size(bytes)| bytes),
                bandwidth_bytes_per_sec: raw.bandwidth.map(|b| b.0),
                workload: WorkloadDef {
                    dirty_bytes_per_sec: 0.0,
                    working_set_bytes,
                    pattern: match raw.pattern.unwrap_or(Pattern::HotSet) {
                        Pattern::Uniform => WritePattern::Uniform,
                        Pattern::HotSet => WritePattern::HotSet,
                        Pattern::Sequential => WritePattern::Sequential,
                    },
                    rate_changes: Vec::new(),
                },
                host: None,
            },
            dirty_rate: raw.dirty_rate,
            rate_changes,
        })
    }

    fn instance(&self, id: String, host: Option<usize>, rng: &mut SplitMix64) -> VmDef {
        let mut vm = self.vm.clone();
        vm.id = id;
        vm.host = host;
        vm.workload.dirty_bytes_per_sec = rng.rate(self.dirty_rate);
        vm.workload.rate_changes = self
            .rate_changes
            .iter()
            .map(|&(at_s, spec)| (at_s, rng.rate(spec)))
            .collect();
        vm
    }
}

/// Memory committed on each host at time 0, against its budget.
#[derive(Debug)]
struct Memory<'a> {
    hosts: &'a [HostDef],
    committed: Vec<u64>,
}

impl Memory<'_> {
    fn free(&self, host: usize) -> u64 {
        self.hosts[host]
            .memory_budget_bytes
            .saturating_sub(self.committed[host])
    }

    /// Commits `bytes` on `host` if they fit.
    fn take(&mut self, host: usize, bytes: u64) -> bool {
        let fits = self.free(host) >= bytes;
        if fits {
            self.committed[host] += bytes;
        }
        fits
    }
}

/// Spreads a group's VMs over its hosts one after another, skipping hosts without room.
#[derive(Debug)]
struct RoundRobin {
    candidates: Vec<usize>,
    /// Where the next VM starts looking: after the host the last one went to.
    cursor: usize,
    /// The candidates, for messages: `datacenter "dc1"`.
    what: String,
    /// The line of `place`.
    line: usize,
}

impl RoundRobin {
    fn new(known: &Known<'_>, raw: &RawVm, place: &Spanned<Place>) -> Result<RoundRobin, ScenarioError> {
        let lines = known.lines;
        // The one way of placing so far: another would have to be handled here.
        let Place::RoundRobin = place.get_ref();
        let (candidates, what, at): (Vec<usize>, String, usize) = match (&raw.datacenter, &raw.host_prefix) {
            (Some(dc), None) => {
                let index = known.datacenters.find(dc, lines)?;
                let hosts = (0..known.hosts.len())
                    .filter(|&h| known.hosts[h].datacenter == index)
                    .collect();
                (hosts, format!("datacenter {:?}", dc.get_ref()), lines.of(dc))
            }
            (None, Some(prefix)) => {
                let p = prefix.get_ref();
                let hosts = (0..known.hosts.len())
                    .filter(|&h| known.hosts[h].name.starts_with(p.as_str()))
                    .collect();
                (hosts, format!("hosts named {p:?}..."), lines.of(prefix))
            }
            (Some(_), Some(prefix)) => {
                return Err(lines.error(prefix, "`place` takes `datacenter` or `host_prefix`, not both"));
            }
            (None, None) => {
                return Err(lines.error(
                    place,
                    "`place` needs `datacenter` or `host_prefix`: the hosts it spreads the VMs over",
                ))
            }
        };
        if candidates.is_empty() {
            return Err(error_at(
                at,
                format!("{what} holds no host to place VMs on ({})", known.host_names.listing()),
            ));
        }
        Ok(RoundRobin {
            candidates,
            cursor: 0,
            what,
            line: lines.of(place),
        })
    }

    /// The host the next VM of `bytes` goes to, committed; `None` if none has room.
    fn next(&mut self, memory: &mut Memory<'_>, bytes: u64) -> Option<usize> {
        let n = self.candidates.len();
        let k = (0..n).find(|k| memory.take(self.candidates[(self.cursor + k) % n], bytes))?;
        let host = self.candidates[(self.cursor + k) % n];
        self.cursor = (self.cursor + k + 1) % n;
        Some(host)
    }

    /// Why VM `id` of `bytes`, after `placed` of the group's `count`, found no host.
    fn full(&self, id: &str, bytes: u64, memory: &Memory<'_>, placed: u32, count: u32) -> ScenarioError {
        let most_free = self.candidates.iter().map(|&h| memory.free(h)).max().unwrap_or(0);
        error_at(
            self.line,
            format!(
                "VM {id:?} ({}) fits on no host of {} at time 0 (the most memory budget left on one is {}); \
                 {placed} of the group's {count} VMs were placed",
                ByteSize(bytes),
                self.what,
                ByteSize(most_free),
            ),
        )
    }
}

/// SplitMix64: a few lines, and fixed forever, so a file's draws never change with a
/// dependency's version.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream of the `position`th VM entry of the file: entries do not share one, so
    /// editing one leaves the draws of the others as they were.
    fn for_entry(seed: u64, position: usize) -> SplitMix64 {
        SplitMix64(seed ^ (position as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A rate from `spec`: itself, or a uniform draw from its range.
    fn rate(&mut self, spec: RateSpec) -> f64 {
        match spec {
            RateSpec::Fixed(rate) => rate,
            RateSpec::Range(low, high) => {
                // The top 53 bits fill an f64's mantissa exactly: a uniform value in [0, 1).
                let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                low + (high - low) * unit
            }
        }
    }
}
