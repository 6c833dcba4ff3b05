//! What a live run can take: a pure check of the scenario before any daemon starts. A scenario
//! is refused when it is too big for one machine's loopback or uses a feature the daemons
//! cannot play; what they can play only approximately is returned as notes for the outcome.

use migratory::format::check_name;
use migratory::model::{EventKind, Scenario};
use migratory::protocol::Algorithm;

use super::LiveError;

/// At most this many hosts: each is a process with its own runtime.
pub const MAX_HOSTS: usize = 8;

/// At most this many VMs.
pub const MAX_VMS: usize = 16;

/// At most this much guest RAM in all: sim guests hold their memory for real, twice while a
/// migration runs.
pub const MAX_TOTAL_VM_RAM_BYTES: u64 = 8 << 30;

/// Guest RAM must be whole pages.
const PAGE_BYTES: u64 = 4096;

/// Refuses what a live run cannot play; returns what it plays only approximately, in words.
pub fn check(scenario: &Scenario) -> Result<Vec<String>, LiveError> {
    check_size(scenario)?;
    check_names_and_ram(scenario)?;
    check_hosts(scenario)?;
    let last_event_s = scenario.events.iter().map(|e| e.at_s).fold(0.0, f64::max);
    let mut notes = check_rate_changes(scenario, last_event_s)?;
    for event in &scenario.events {
        let feature = match event.kind {
            EventKind::Consolidate { .. } => "consolidate",
            EventKind::FailLink { .. } => "fail_link",
            _ => continue,
        };
        return Err(LiveError::Unsupported {
            line: Some(event.line),
            feature: feature.to_string(),
            why: match feature {
                "consolidate" => "the packing decision lives in the model; migrate the VMs by name instead",
                _ => "loopback has no link to cut between two daemons",
            }
            .to_string(),
        });
    }
    if scenario.links.iter().any(|l| l.latency_s > 0.0) {
        notes
            .push("link latency is not played: loopback adds none, so every round trip is faster than modelled".into());
    }
    if !scenario.links.is_empty() {
        notes.push(
            "an inter-datacenter link is played as a bandwidth cap on each migration crossing it; \
             concurrent migrations do not share it as they do in the model"
                .into(),
        );
    }
    Ok(notes)
}

fn check_size(scenario: &Scenario) -> Result<(), LiveError> {
    let total_ram: u64 = scenario.vms.iter().map(|v| v.ram_bytes).fold(0, u64::saturating_add);
    for (what, value, limit) in [
        ("hosts", scenario.hosts.len() as u64, MAX_HOSTS as u64),
        ("VMs", scenario.vms.len() as u64, MAX_VMS as u64),
        ("bytes of VM RAM", total_ram, MAX_TOTAL_VM_RAM_BYTES),
    ] {
        if value > limit {
            return Err(LiveError::TooBig { what, value, limit });
        }
    }
    Ok(())
}

fn check_names_and_ram(scenario: &Scenario) -> Result<(), LiveError> {
    let unsupported = |feature: String, why: String| LiveError::Unsupported {
        line: None,
        feature,
        why,
    };
    for host in &scenario.hosts {
        check_name("host name", &host.name)
            .map_err(|e| unsupported(format!("host name {:?}", host.name), e.to_string()))?;
    }
    for vm in &scenario.vms {
        check_name("VM id", &vm.id).map_err(|e| unsupported(format!("VM id {:?}", vm.id), e.to_string()))?;
        if vm.ram_bytes % PAGE_BYTES != 0 {
            return Err(unsupported(
                format!("ram of {}", vm.id),
                format!("{} bytes is not a whole number of 4 KiB pages", vm.ram_bytes),
            ));
        }
    }
    Ok(())
}

fn check_hosts(scenario: &Scenario) -> Result<(), LiveError> {
    for host in &scenario.hosts {
        if Algorithm::ALL.iter().any(|a| !host.algorithms.contains(a)) {
            let offered: Vec<&str> = host.algorithms.iter().map(|a| a.name()).collect();
            return Err(LiveError::Unsupported {
                line: None,
                feature: format!("algorithms of host {}", host.name),
                why: format!(
                    "it offers only [{}], and a daemon always offers all {}",
                    offered.join(", "),
                    Algorithm::ALL.len()
                ),
            });
        }
    }
    Ok(())
}

/// A daemon cannot change a running guest's dirty rate, so a change is refused if it comes
/// while events are still being played; one after the last event is noted and left out.
fn check_rate_changes(scenario: &Scenario, last_event_s: f64) -> Result<Vec<String>, LiveError> {
    let mut notes = Vec::new();
    for vm in &scenario.vms {
        for &(at_s, _) in &vm.workload.rate_changes {
            if at_s <= last_event_s {
                return Err(LiveError::Unsupported {
                    line: None,
                    feature: format!("rate_changes of {} at {at_s} s", vm.id),
                    why: format!(
                        "a daemon cannot change a running guest's dirty rate, and this change comes \
                         before the last event ({last_event_s} s)"
                    ),
                });
            }
            notes.push(format!(
                "{}: the rate change at {at_s} s is not played (after the last event; a daemon cannot change a running guest's rate)",
                vm.id
            ));
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migratory::format::NativeLayout;
    use migratory::model::{Datacenter, HostDef, MigrationLimits, TimedEvent, VmDef, WorkloadDef, WritePattern};

    fn host(name: &str) -> HostDef {
        HostDef {
            name: name.into(),
            datacenter: 0,
            ram_bytes: 16 << 30,
            cores: 8,
            nic_bytes_per_sec: 1.25e9,
            vmm: "kvm".into(),
            layout: NativeLayout::Kvm,
            memory_budget_bytes: 16 << 30,
            bandwidth_budget_bytes_per_sec: 1.25e9,
            max_outgoing: 2,
            max_incoming: 2,
            algorithms: Algorithm::ALL.to_vec(),
        }
    }

    fn vm(id: &str, ram_bytes: u64) -> VmDef {
        VmDef {
            id: id.into(),
            ram_bytes,
            vcpus: 1,
            vmm: "kvm".into(),
            image_bytes: 0,
            bandwidth_bytes_per_sec: None,
            workload: WorkloadDef {
                dirty_bytes_per_sec: 0.0,
                working_set_bytes: ram_bytes,
                pattern: WritePattern::HotSet,
                rate_changes: Vec::new(),
            },
            host: Some(0),
        }
    }

    fn scenario() -> Scenario {
        Scenario {
            name: "t".into(),
            seed: 0,
            sample_every_s: 1.0,
            until_s: None,
            datacenters: vec![Datacenter { name: "dc".into() }],
            hosts: vec![host("a"), host("b")],
            links: Vec::new(),
            vms: vec![vm("vm1", 64 << 20)],
            events: Vec::new(),
        }
    }

    fn event(at_s: f64, kind: EventKind) -> TimedEvent {
        TimedEvent { at_s, kind, line: 7 }
    }

    /// Runs `check` on the scenario `edit` makes, and says which feature, if any, was refused.
    fn refused(edit: impl FnOnce(&mut Scenario)) -> Option<String> {
        let mut sc = scenario();
        edit(&mut sc);
        match check(&sc) {
            Ok(_) => None,
            Err(LiveError::TooBig { what, .. }) => Some(what.to_string()),
            Err(LiveError::Unsupported { feature, .. }) => Some(feature),
            Err(other) => Some(other.to_string()),
        }
    }

    #[test]
    fn test_check_refuses_what_a_live_run_cannot_play() {
        let limits = MigrationLimits {
            algorithm: Algorithm::Auto,
            bandwidth_bytes_per_sec: None,
            downtime_limit_s: None,
            qos: Default::default(),
            deadline_s: None,
        };
        type Edit = Box<dyn FnOnce(&mut Scenario)>;
        let cases: Vec<(&str, Edit, Option<&str>)> = vec![
            ("small", Box::new(|_| {}), None),
            (
                "9 hosts",
                Box::new(|s| s.hosts = (0..9).map(|i| host(&format!("h{i}"))).collect()),
                Some("hosts"),
            ),
            (
                "17 VMs",
                Box::new(|s| s.vms = (0..17).map(|i| vm(&format!("v{i}"), 1 << 20)).collect()),
                Some("VMs"),
            ),
            (
                "9 GiB",
                Box::new(|s| s.vms = vec![vm("a", 5 << 30), vm("b", 4 << 30)]),
                Some("bytes of VM RAM"),
            ),
            ("odd ram", Box::new(|s| s.vms[0].ram_bytes = 5000), Some("ram of vm1")),
            (
                "consolidate",
                Box::new(move |s| {
                    s.events
                        .push(event(1.0, EventKind::Consolidate { datacenter: 0, limits }))
                }),
                Some("consolidate"),
            ),
            (
                "fail_link",
                Box::new(|s| s.events.push(event(1.0, EventKind::FailLink { link: 0 }))),
                Some("fail_link"),
            ),
            (
                "fewer algorithms",
                Box::new(|s| s.hosts[1].algorithms = vec![Algorithm::Precopy]),
                Some("algorithms of host b"),
            ),
            (
                "early rate change",
                Box::new(|s| {
                    s.vms[0].workload.rate_changes = vec![(1.0, 5e6)];
                    s.events.push(event(2.0, EventKind::FailHost { host: 1 }));
                }),
                Some("rate_changes of vm1 at 1 s"),
            ),
            (
                "late rate change",
                Box::new(|s| {
                    s.vms[0].workload.rate_changes = vec![(3.0, 5e6)];
                    s.events.push(event(2.0, EventKind::FailHost { host: 1 }));
                }),
                None,
            ),
        ];
        for (name, edit, expected) in cases {
            assert_eq!(refused(edit).as_deref(), expected, "{name}");
        }
    }
}
