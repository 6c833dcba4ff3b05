//! Hand-made scenarios and outcomes for the writers' tests, consistent with each other: RAM
//! samples follow from where each VM is, NIC rates from the migrations in flight.

use crate::format::NativeLayout;
use crate::model::{
    Datacenter, HostDef, HostSample, MigrationRecord, ModelOutcome, Placement, Prediction, Scenario, VmDef,
    WorkloadDef, WritePattern,
};
use crate::protocol::Algorithm;

/// The shape of a fixture.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub datacenters: usize,
    pub hosts_per_dc: usize,
    /// VMs, all starting in the first datacenter; when there are more VMs than migrations,
    /// the last one is never deployed.
    pub vms: usize,
    /// The first `migrations` VMs move to the second datacenter, one after another.
    pub migrations: usize,
    pub instants: usize,
}

impl Spec {
    pub fn small() -> Spec {
        Spec {
            datacenters: 2,
            hosts_per_dc: 2,
            vms: 6,
            migrations: 4,
            instants: 40,
        }
    }
}

pub(crate) const HOST_RAM: u64 = 256 << 30;
pub(crate) const VM_RAM: u64 = 2 << 30;

/// What migration `m` of a fixture looks like.
fn migration(m: usize, spec: &Spec, scenario: &Scenario) -> MigrationRecord {
    let source = m % spec.hosts_per_dc;
    let target = if spec.datacenters > 1 {
        spec.hosts_per_dc + m % spec.hosts_per_dc
    } else {
        (source + 1) % spec.hosts_per_dc
    };
    let requested_at_s = 5.0 + m as f64 * 3.0;
    let start_s = requested_at_s + (m % 3) as f64;
    let total_s = 20.0 + (m % 5) as f64 * 2.0;
    let end_s = start_s + total_s;
    let result = match m % 10 {
        9 => "failed",
        6 => "aborted",
        _ => "completed",
    };
    let completed = result == "completed";
    let downtime_s = if completed { 0.05 + (m % 4) as f64 * 0.01 } else { 0.0 };
    let algorithm = ["precopy", "postcopy", "hybrid"][m % 3];
    let host = |h: usize| scenario.hosts[h].name.clone();
    let dc = |h: usize| scenario.datacenters[scenario.hosts[h].datacenter].name.clone();
    MigrationRecord {
        vm: scenario.vms[m].id.clone(),
        source: host(source),
        source_datacenter: dc(source),
        target: host(target),
        target_datacenter: dc(target),
        requested: "auto".into(),
        algorithm: algorithm.into(),
        why: vec![
            format!("auto: {algorithm} predicted fastest"),
            "dirty rate under bandwidth".into(),
        ],
        result: result.into(),
        error: (!completed).then(|| format!("{result}, as the fixture says")),
        requested_at_s,
        start_s,
        end_s,
        total_s,
        downtime_start_s: completed.then_some(end_s - downtime_s - 0.01),
        downtime_s,
        bytes: VM_RAM + VM_RAM / 5,
        rounds: 3 + (m % 4) as u32,
        predicted: (m % 2 == 0).then(|| Prediction {
            algorithm: algorithm.into(),
            downtime_s: 0.06,
            total_s: total_s * 0.9,
            basis: "bandwidth 1.25 GB/s, dirty rate 10 MB/s".into(),
        }),
    }
}

/// A scenario and an outcome of the given shape.
pub(crate) fn fixture(spec: &Spec) -> (Scenario, ModelOutcome) {
    let datacenters = (0..spec.datacenters)
        .map(|d| Datacenter {
            name: format!("datacenter{}", d + 1),
        })
        .collect();
    let hosts = (0..spec.datacenters * spec.hosts_per_dc)
        .map(|h| HostDef {
            name: format!("dc{}-host{}", h / spec.hosts_per_dc + 1, h % spec.hosts_per_dc + 1),
            datacenter: h / spec.hosts_per_dc,
            ram_bytes: HOST_RAM,
            cores: 32,
            nic_bytes_per_sec: 1.25e9,
            vmm: "kvm".into(),
            layout: NativeLayout::Kvm,
            memory_budget_bytes: HOST_RAM,
            bandwidth_budget_bytes_per_sec: 1.25e9,
            max_outgoing: 2,
            max_incoming: 2,
            algorithms: vec![Algorithm::Precopy, Algorithm::Postcopy, Algorithm::Hybrid],
        })
        .collect();
    let never_deployed = (spec.vms > spec.migrations).then(|| spec.vms - 1);
    let vms = (0..spec.vms)
        .map(|v| VmDef {
            id: format!("vm{}", v + 1),
            ram_bytes: VM_RAM,
            vcpus: 2,
            vmm: "kvm".into(),
            workload: WorkloadDef {
                dirty_bytes_per_sec: 10e6,
                working_set_bytes: 256 << 20,
                pattern: WritePattern::HotSet,
                rate_changes: Vec::new(),
            },
            host: (Some(v) != never_deployed).then_some(v % spec.hosts_per_dc),
            image_bytes: 0,
            bandwidth_bytes_per_sec: None,
        })
        .collect();
    let mut scenario = Scenario {
        name: "fixture".into(),
        seed: 7,
        sample_every_s: 1.0,
        until_s: None,
        datacenters,
        hosts,
        links: Vec::new(),
        vms,
        events: Vec::new(),
    };
    let migrations: Vec<MigrationRecord> = (0..spec.migrations).map(|m| migration(m, spec, &scenario)).collect();
    let host_index = |name: &str| {
        scenario
            .hosts
            .iter()
            .position(|h| h.name == name)
            .expect("fixture host")
    };
    let moves: Vec<(usize, usize, &MigrationRecord)> = migrations
        .iter()
        .map(|r| (host_index(&r.source), host_index(&r.target), r))
        .collect();
    let end_s = migrations.iter().map(|r| r.end_s).fold(60.0, f64::max) + 10.0;
    let steps = spec.instants.max(2) - 1;
    scenario.sample_every_s = end_s / steps as f64;

    let n_hosts = scenario.hosts.len();
    let mut samples = Vec::with_capacity(spec.instants * n_hosts);
    for k in 0..=steps {
        let t = end_s * k as f64 / steps as f64;
        let mut ram = vec![0u64; n_hosts];
        let mut out = vec![0.0; n_hosts];
        let mut inn = vec![0.0; n_hosts];
        for (v, vm) in scenario.vms.iter().enumerate() {
            let Some(mut host) = vm.host else { continue };
            if let Some(&(src, dst, r)) = moves.get(v) {
                host = src;
                if r.start_s <= t && t < r.end_s {
                    ram[dst] += vm.ram_bytes;
                    let rate = r.bytes as f64 / r.total_s;
                    out[src] += rate;
                    inn[dst] += rate;
                } else if t >= r.end_s && r.result == "completed" {
                    host = dst;
                }
            }
            ram[host] += vm.ram_bytes;
        }
        for h in 0..n_hosts {
            samples.push(HostSample {
                t_s: t,
                host: h,
                ram_used_bytes: ram[h],
                net_out_bytes_per_sec: out[h],
                net_in_bytes_per_sec: inn[h],
            });
        }
    }
    let placements = scenario
        .vms
        .iter()
        .enumerate()
        .map(|(v, vm)| {
            let host = match (vm.host, moves.get(v)) {
                (None, _) => None,
                (Some(_), Some(&(_, dst, r))) if r.result == "completed" => Some(dst),
                (Some(_), Some(&(src, _, _))) => Some(src),
                (Some(h), None) => Some(h),
            };
            Placement {
                vm: vm.id.clone(),
                host: host.map(|h| scenario.hosts[h].name.clone()),
                datacenter: host.map(|h| scenario.datacenters[scenario.hosts[h].datacenter].name.clone()),
            }
        })
        .collect();
    let outcome = ModelOutcome {
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        end_s,
        events_processed: (samples.len() + 10 * migrations.len()) as u64,
        migrations,
        samples,
        placements,
        notes: Vec::new(),
    };
    (scenario, outcome)
}

/// A fresh, empty directory of the system's temporary folder, named for the test and removed
/// when dropped.
#[derive(Debug)]
pub(crate) struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("migratory-output-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    TempDir(dir)
}
