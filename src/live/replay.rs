//! The scenario's events played against the daemons in real time, with the run's own ledger of
//! where each VM is (to choose targets as the model does) and the migrations it started.
//!
//! One thread does everything in turn: fire the events that are due, poll the running
//! migrations, sample the hosts. Every request is to loopback, so a turn takes milliseconds.

use std::time::{Duration, Instant};

use serde_json::Value;

use migratory::api::{CreateVm, MigrationStarted, MigrationStatusView, Phase, StartMigration, Vm};
use migratory::model::{
    Destination, EventKind, HostSample, MigrationLimits, MigrationRecord, Placement, Scenario, TimedEvent,
};

use super::daemons::Cluster;
use super::http::HttpError;
use super::record;
use super::{LiveError, LiveOptions};

/// How often running migrations are polled: their start is known to this precision.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// The bounds of the sampling interval: finer would load the daemons being measured, coarser
/// would miss a whole migration.
const SAMPLE_BOUNDS_S: (f64, f64) = (0.1, 10.0);

/// A migration this run asked for.
#[derive(Debug)]
struct Tracked {
    /// The source daemon's id for it; `None` if the request was refused.
    id: Option<u64>,
    vm: usize,
    source: usize,
    target: usize,
    record: MigrationRecord,
    /// When the run first saw it out of the queue.
    started_s: Option<f64>,
    /// Whether a poll found it waiting in its source's queue.
    seen_queued: bool,
    bytes_now: u64,
    bytes_at_sample: u64,
    done: bool,
}

/// A live run in progress.
#[derive(Debug)]
pub struct Replay<'a> {
    sc: &'a Scenario,
    opts: &'a LiveOptions,
    cluster: Cluster,
    clock: Instant,
    /// The host each VM runs on, as far as this run knows.
    vm_host: Vec<Option<usize>>,
    /// VMs with a migration running.
    busy: Vec<bool>,
    /// Bytes promised to each host by migrations still running towards it.
    incoming: Vec<u64>,
    /// Hosts being evacuated: no target for anything.
    draining: Vec<bool>,
    migrations: Vec<Tracked>,
    samples: Vec<HostSample>,
    last_sample_s: Option<f64>,
    events_processed: u64,
    notes: Vec<String>,
}

impl<'a> Replay<'a> {
    /// Creates the VMs placed at time 0, then starts the run's clock.
    pub fn start(
        sc: &'a Scenario,
        opts: &'a LiveOptions,
        cluster: Cluster,
        notes: Vec<String>,
    ) -> Result<Self, LiveError> {
        let mut replay = Replay {
            sc,
            opts,
            cluster,
            clock: Instant::now(),
            vm_host: vec![None; sc.vms.len()],
            busy: vec![false; sc.vms.len()],
            incoming: vec![0; sc.hosts.len()],
            draining: vec![false; sc.hosts.len()],
            migrations: Vec::new(),
            samples: Vec::new(),
            last_sample_s: None,
            events_processed: 0,
            notes,
        };
        for (v, vm) in sc.vms.iter().enumerate() {
            if let Some(h) = vm.host {
                replay.create_vm(v, h).map_err(|source| LiveError::Api {
                    host: sc.hosts[h].name.clone(),
                    source: Box::new(source),
                })?;
            }
        }
        replay.clock = Instant::now();
        Ok(replay)
    }

    /// Plays every event, waits for the migrations, and returns what happened.
    pub fn run(mut self) -> migratory::model::ModelOutcome {
        let sample_every_s = self
            .opts
            .sample_every_s
            .unwrap_or(self.sc.sample_every_s)
            .clamp(SAMPLE_BOUNDS_S.0, SAMPLE_BOUNDS_S.1);
        let events: Vec<&TimedEvent> = self.playable_events();
        let mut next_event = 0;
        let mut next_sample_s = 0.0;
        let mut give_up_s = None;
        loop {
            let now = self.now();
            while let Some(ev) = events.get(next_event).filter(|e| self.wall_s(e.at_s) <= now) {
                self.fire(ev);
                next_event += 1;
            }
            self.poll();
            if now >= next_sample_s {
                self.sample();
                next_sample_s = now + sample_every_s;
            }
            let running = self.migrations.iter().any(|m| !m.done);
            if next_event >= events.len() {
                if !running {
                    break;
                }
                let limit = *give_up_s.get_or_insert(now + self.opts.max_wait.as_secs_f64());
                if now >= limit {
                    self.give_up(now);
                    break;
                }
            }
            let mut wake_s = (now + POLL_EVERY.as_secs_f64()).min(next_sample_s);
            if let Some(ev) = events.get(next_event) {
                wake_s = wake_s.min(self.wall_s(ev.at_s));
            }
            std::thread::sleep(Duration::from_secs_f64((wake_s - self.now()).max(0.0)));
        }
        self.sample();
        self.outcome()
    }

    /// The events in time order, without those after `until` (noted: the model never plays them).
    fn playable_events(&mut self) -> Vec<&'a TimedEvent> {
        let until = self.sc.until_s.unwrap_or(f64::INFINITY);
        let (kept, dropped): (Vec<_>, Vec<_>) = self.sc.events.iter().partition(|e| e.at_s <= until);
        for e in dropped {
            self.notes
                .push(format!("line {}: after `until` ({until} s); not played", e.line));
        }
        kept
    }

    /// Seconds on the run's clock.
    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    /// When a scenario time falls on the run's clock.
    fn wall_s(&self, at_s: f64) -> f64 {
        at_s * self.opts.time_scale
    }

    fn create_vm(&mut self, v: usize, h: usize) -> Result<(), HttpError> {
        let vm = &self.sc.vms[v];
        let w = &vm.workload;
        let body = CreateVm {
            id: vm.id.clone(),
            memory_bytes: vm.ram_bytes,
            vcpus: vm.vcpus,
            dirty_rate_bytes_per_sec: w.dirty_bytes_per_sec.max(0.0) as u64,
            working_set_bytes: w.working_set_bytes.min(vm.ram_bytes),
            pattern: Some(w.pattern.to_string()),
        };
        self.cluster.daemons[h].api.post("/vms", &to_json(&body))?;
        self.vm_host[v] = Some(h);
        Ok(())
    }

    fn fire(&mut self, ev: &TimedEvent) {
        self.events_processed += 1;
        let line = ev.line;
        match &ev.kind {
            EventKind::Create { .. } => {}
            EventKind::Deploy { vm, host } => {
                if !self.cluster.daemons[*host].is_up() {
                    self.notes.push(format!(
                        "line {line}: {} has failed; deploy skipped",
                        self.sc.hosts[*host].name
                    ));
                } else if let Err(e) = self.create_vm(*vm, *host) {
                    self.notes
                        .push(format!("line {line}: deploy of {} failed: {e}", self.sc.vms[*vm].id));
                }
            }
            EventKind::Migrate { vm, to, limits } => self.request(*vm, to, limits, line),
            EventKind::Evacuate { host, limits } => {
                self.draining[*host] = true;
                let dc = self.sc.hosts[*host].datacenter;
                let resident: Vec<usize> = (0..self.sc.vms.len())
                    .filter(|&v| self.vm_host[v] == Some(*host) && !self.busy[v])
                    .collect();
                for vm in resident {
                    self.request(vm, &Destination::Datacenter(dc), limits, line);
                }
            }
            EventKind::FailHost { host } => {
                self.cluster.kill(*host);
                for v in 0..self.sc.vms.len() {
                    if self.vm_host[v] == Some(*host) {
                        self.vm_host[v] = None;
                        self.notes.push(format!(
                            "line {line}: {} lost with {}",
                            self.sc.vms[v].id, self.sc.hosts[*host].name
                        ));
                    }
                }
            }
            // `check` refuses these before any daemon starts.
            EventKind::Consolidate { .. } | EventKind::FailLink { .. } => {
                self.notes.push(format!("line {line}: not played live"));
            }
        }
    }

    /// Starts a migration of `vm`, or notes why none can start, as the model does.
    fn request(&mut self, vm: usize, to: &Destination, limits: &MigrationLimits, line: usize) {
        let id = &self.sc.vms[vm].id;
        let Some(src) = self.vm_host[vm].filter(|_| !self.busy[vm]) else {
            self.notes.push(format!(
                "line {line}: {id} is not running anywhere idle; its migration is skipped"
            ));
            return;
        };
        let dst = match to {
            Destination::Host(h) => Some(*h),
            Destination::Datacenter(dc) => self.choose_target(vm, src, *dc),
        };
        let Some(dst) = dst.filter(|&d| d != src && self.cluster.daemons[d].is_up()) else {
            self.notes
                .push(format!("line {line}: no host can take {id}; its migration is skipped"));
            return;
        };
        let Some(cap) = self.bandwidth_cap(vm, src, dst, limits) else {
            self.notes.push(format!(
                "line {line}: no link between the datacenters of {id}'s hosts; its migration is skipped"
            ));
            return;
        };
        let now = self.now();
        let (s, d) = (&self.sc.hosts[src], &self.sc.hosts[dst]);
        let mut rec = record::requested(
            id,
            (&s.name, &self.sc.datacenters[s.datacenter].name),
            (&d.name, &self.sc.datacenters[d.datacenter].name),
            limits.algorithm.name(),
            now,
        );
        let body = StartMigration {
            algorithm: Some(limits.algorithm.name().to_string()),
            bandwidth_bytes_per_sec: cap.map(|c| c as u64),
            downtime_limit_ms: limits.downtime_limit_s.map(|s| s * 1e3),
            priority: Some(limits.qos.priority.name().to_string()),
            min_bandwidth_bytes_per_sec: limits.qos.min_bandwidth_bytes_per_sec.map(|b| b as u64),
            deadline_s: limits.deadline_s,
            ..StartMigration::new(id.clone(), self.cluster.daemons[dst].migration_addr.to_string())
        };
        let started = self.cluster.daemons[src]
            .api
            .post("/migrations", &to_json(&body))
            .and_then(|v| {
                serde_json::from_value::<MigrationStarted>(v).map_err(|e| HttpError::Malformed {
                    method: "POST",
                    path: "/migrations".into(),
                    addr: self.cluster.daemons[src].api.addr(),
                    reason: e.to_string(),
                })
            });
        let mut tracked = Tracked {
            id: None,
            vm,
            source: src,
            target: dst,
            record: rec.clone(),
            started_s: None,
            seen_queued: false,
            bytes_now: 0,
            bytes_at_sample: 0,
            done: true,
        };
        match started {
            Ok(MigrationStarted { id }) => {
                tracked.id = Some(id);
                tracked.done = false;
                self.busy[vm] = true;
                self.incoming[dst] += self.sc.vms[vm].ram_bytes;
            }
            Err(e) => {
                record::fail(&mut rec, now, now, e.to_string());
                tracked.record = rec;
            }
        }
        self.migrations.push(tracked);
    }

    /// The model's rule: a host of the datacenter, up and not draining, with room, the most
    /// free memory first.
    fn choose_target(&self, vm: usize, src: usize, dc: usize) -> Option<usize> {
        let ram = self.sc.vms[vm].ram_bytes;
        (0..self.sc.hosts.len())
            .filter(|&h| h != src && self.sc.hosts[h].datacenter == dc)
            .filter(|&h| self.cluster.daemons[h].is_up() && !self.draining[h])
            .map(|h| (h, self.free(h)))
            .filter(|&(_, free)| free >= ram)
            .fold(None, |best: Option<(usize, u64)>, (h, free)| match best {
                Some((_, b)) if b >= free => best,
                _ => Some((h, free)),
            })
            .map(|(h, _)| h)
    }

    fn free(&self, h: usize) -> u64 {
        let used: u64 = (0..self.sc.vms.len())
            .filter(|&v| self.vm_host[v] == Some(h))
            .map(|v| self.sc.vms[v].ram_bytes)
            .sum();
        self.sc.hosts[h]
            .memory_budget_bytes
            .saturating_sub(used + self.incoming[h])
    }

    /// The tightest of the migration's own cap, the VM's bandwidth and, across datacenters,
    /// their link's capacity: `Some(None)` for no cap, `None` when no link joins them.
    fn bandwidth_cap(&self, vm: usize, src: usize, dst: usize, limits: &MigrationLimits) -> Option<Option<f64>> {
        let (a, b) = (self.sc.hosts[src].datacenter, self.sc.hosts[dst].datacenter);
        let link = if a == b {
            None
        } else {
            let l = self
                .sc
                .links
                .iter()
                .find(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a))?;
            Some(l.bytes_per_sec)
        };
        Some(
            [
                limits.bandwidth_bytes_per_sec,
                self.sc.vms[vm].bandwidth_bytes_per_sec,
                link,
            ]
            .into_iter()
            .flatten()
            .reduce(f64::min),
        )
    }

    /// Reads the state of every running migration from its source, and ends those that ended.
    fn poll(&mut self) {
        let now = self.now();
        for i in 0..self.migrations.len() {
            let m = &self.migrations[i];
            let (Some(id), false) = (m.id, m.done) else { continue };
            let daemon = &self.cluster.daemons[m.source];
            if !daemon.is_up() {
                let error = format!("source host {} failed", daemon.name);
                self.end(i, now, Err(error));
                continue;
            }
            let status = daemon
                .api
                .get(&format!("/migrations/{id}"))
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::from_value::<MigrationStatusView>(v).map_err(|e| e.to_string()));
            match status {
                Err(e) => self.end(i, now, Err(format!("cannot read its status: {e}"))),
                Ok(s) => {
                    let m = &mut self.migrations[i];
                    m.bytes_now = s.transferred_bytes.unwrap_or(m.bytes_now);
                    if s.status == Phase::Queued {
                        m.seen_queued = true;
                    } else if m.started_s.is_none() {
                        // Never seen queued: it started when it was asked for.
                        m.started_s = Some(if m.seen_queued { now } else { m.record.requested_at_s });
                    }
                    if !matches!(s.status, Phase::Queued | Phase::Active) {
                        let ended = s.report.ok_or_else(|| format!("ended {} without a report", s.status));
                        self.end(i, now, ended);
                    }
                }
            }
        }
    }

    /// Ends migration `i` with its report, or as failed with the error.
    fn end(&mut self, i: usize, now: f64, ended: Result<Value, String>) {
        let m = &mut self.migrations[i];
        let start = m.started_s.unwrap_or(m.record.requested_at_s);
        m.done = true;
        match ended {
            Ok(report) => {
                record::finish(&mut m.record, start, &report);
                m.bytes_now = m.record.bytes.max(m.bytes_now);
            }
            Err(e) => record::fail(&mut m.record, start, now, e),
        }
        let (vm, source, target) = (m.vm, m.source, m.target);
        let arrived = m.record.result == "completed";
        self.busy[vm] = false;
        self.incoming[target] = self.incoming[target].saturating_sub(self.sc.vms[vm].ram_bytes);
        if arrived && self.cluster.daemons[target].is_up() {
            self.vm_host[vm] = Some(target);
        } else if !self.cluster.daemons[source].is_up() {
            self.vm_host[vm] = None;
        }
    }

    /// Fails every migration still running: the run waited `max_wait` after the last event.
    fn give_up(&mut self, now: f64) {
        let waited = self.opts.max_wait.as_secs_f64();
        for i in 0..self.migrations.len() {
            if !self.migrations[i].done {
                let error = format!("still running {waited} s after the last event; the live run gave up on it");
                self.end(i, now, Err(error));
            }
        }
        self.notes
            .push(format!("gave up on running migrations {waited} s after the last event"));
    }

    /// One sample of every host: the RAM of the VMs its daemon lists, and the migration bytes
    /// that left and arrived since the previous sample.
    fn sample(&mut self) {
        let now = self.now();
        let dt = self.last_sample_s.map(|t| now - t).filter(|dt| *dt > 0.0);
        let n = self.sc.hosts.len();
        let (mut out, mut inn) = (vec![0.0; n], vec![0.0; n]);
        for m in &mut self.migrations {
            if let Some(dt) = dt {
                let rate = m.bytes_now.saturating_sub(m.bytes_at_sample) as f64 / dt;
                out[m.source] += rate;
                inn[m.target] += rate;
            }
            m.bytes_at_sample = m.bytes_now;
        }
        for h in 0..n {
            let ram_used_bytes = match self.vms_on(h) {
                Ok(vms) => vms.iter().map(|v| v.memory_bytes).sum(),
                Err(e) => {
                    self.notes
                        .push(format!("t={now:.1} s: cannot sample {}: {e}", self.sc.hosts[h].name));
                    0
                }
            };
            self.samples.push(HostSample {
                t_s: now,
                host: h,
                ram_used_bytes,
                net_out_bytes_per_sec: out[h],
                net_in_bytes_per_sec: inn[h],
            });
        }
        self.last_sample_s = Some(now);
        self.events_processed += 1;
    }

    /// The VMs host `h`'s daemon lists (none once it failed).
    fn vms_on(&self, h: usize) -> Result<Vec<Vm>, String> {
        let daemon = &self.cluster.daemons[h];
        if !daemon.is_up() {
            return Ok(Vec::new());
        }
        let v = daemon.api.get("/vms").map_err(|e| e.to_string())?;
        serde_json::from_value(v).map_err(|e| format!("unexpected VM list: {e}"))
    }

    /// Where each VM runs, as the daemons list them.
    fn placements(&mut self) -> Vec<Placement> {
        let listed: Vec<Vec<Vm>> = (0..self.sc.hosts.len())
            .map(|h| self.vms_on(h).unwrap_or_default())
            .collect();
        self.sc
            .vms
            .iter()
            .map(|vm| {
                let found = listed
                    .iter()
                    .enumerate()
                    .find(|(_, vms)| vms.iter().any(|v| v.id == vm.id && v.reason.is_none()))
                    .map(|(h, _)| h);
                for (h, vms) in listed.iter().enumerate() {
                    if let Some(held) = vms.iter().find(|v| v.id == vm.id && v.reason.is_some()) {
                        self.notes.push(format!(
                            "{} holds a copy of {} ({})",
                            self.sc.hosts[h].name, vm.id, held.state
                        ));
                    }
                }
                Placement {
                    vm: vm.id.clone(),
                    host: found.map(|h| self.sc.hosts[h].name.clone()),
                    datacenter: found.map(|h| self.sc.datacenters[self.sc.hosts[h].datacenter].name.clone()),
                }
            })
            .collect()
    }

    fn outcome(mut self) -> migratory::model::ModelOutcome {
        let placements = self.placements();
        migratory::model::ModelOutcome {
            scenario: self.sc.name.clone(),
            seed: self.sc.seed,
            end_s: self.now(),
            migrations: self.migrations.into_iter().map(|m| m.record).collect(),
            samples: self.samples,
            placements,
            events_processed: self.events_processed,
            notes: self.notes,
        }
    }
}

/// An API body as JSON. The bodies are plain structs of strings and numbers, which always
/// encode.
fn to_json(body: &impl serde::Serialize) -> Value {
    serde_json::to_value(body).expect("an API request body encodes as JSON")
}
