//! Where migrations go when a scenario names a datacenter instead of a host: the target with
//! the most free memory, and consolidation onto as few hosts as will hold a datacenter's VMs.

use super::run::Sim;
use super::scenario::{Destination, MigrationLimits};

/// Memory host `h` can still take: its budget less what is committed and promised.
fn free(sim: &Sim<'_>, h: usize) -> u64 {
    let s = &sim.hosts[h];
    sim.sc.hosts[h].memory_budget_bytes.saturating_sub(s.used + s.promised)
}

/// The host of datacenter `dc` with the most free memory that can take `vm` (not its source,
/// not failed, not being evacuated); ties go to the first in the scenario.
pub(super) fn choose_target(sim: &Sim<'_>, vm: usize, src: usize, dc: usize) -> Option<usize> {
    let ram = sim.sc.vms[vm].ram_bytes;
    (0..sim.sc.hosts.len())
        .filter(|&h| h != src && sim.sc.hosts[h].datacenter == dc)
        .filter(|&h| !sim.hosts[h].failed && !sim.hosts[h].draining)
        .filter(|&h| free(sim, h) >= ram)
        .fold(None, |best: Option<usize>, h| match best {
            Some(b) if free(sim, b) >= free(sim, h) => Some(b),
            _ => Some(h),
        })
}

/// Packs the VMs of datacenter `dc` onto as few hosts as will hold them: the fullest hosts
/// stay, the VMs of the others move to them (largest VM first, each to the kept host with the
/// most room).
pub(super) fn consolidate(sim: &mut Sim<'_>, dc: usize, limits: &MigrationLimits, line: usize) {
    let mut hosts: Vec<usize> = (0..sim.sc.hosts.len())
        .filter(|&h| sim.sc.hosts[h].datacenter == dc && !sim.hosts[h].failed)
        .collect();
    hosts.sort_by(|&a, &b| sim.hosts[b].used.cmp(&sim.hosts[a].used).then(a.cmp(&b)));
    let total: u64 = hosts.iter().map(|&h| sim.hosts[h].used).sum();
    let mut kept = Vec::new();
    let mut room = 0u64;
    for &h in &hosts {
        if room >= total {
            break;
        }
        kept.push(h);
        room += sim.sc.hosts[h].memory_budget_bytes;
    }
    let mut movers: Vec<usize> = (0..sim.vms.len())
        .filter(|&v| {
            let on = sim.vms[v].running_on;
            !sim.vms[v].busy && on.is_some_and(|h| hosts.contains(&h) && !kept.contains(&h))
        })
        .collect();
    movers.sort_by(|&a, &b| sim.sc.vms[b].ram_bytes.cmp(&sim.sc.vms[a].ram_bytes).then(a.cmp(&b)));
    for vm in movers {
        let ram = sim.sc.vms[vm].ram_bytes;
        let target = kept
            .iter()
            .copied()
            .filter(|&h| free(sim, h) >= ram)
            .fold(None, |best: Option<usize>, h| match best {
                Some(b) if free(sim, b) >= free(sim, h) => Some(b),
                _ => Some(h),
            });
        match target {
            Some(h) => sim.request(vm, &Destination::Host(h), limits, line),
            None => sim.notes.push(format!(
                "line {line}: consolidation found no room for {}",
                sim.sc.vms[vm].id
            )),
        }
    }
}
