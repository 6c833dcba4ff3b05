//! The simulation: virtual time, fluid memory and links, the engine's own plans.
//!
//! An event loop over virtual time. Between two events every active transfer moves at its
//! max-min fair rate ([`super::network::share`]); an event is a timed scenario event, a
//! sampling instant, or a migration's phase ending (its bytes sent, or a fixed cost spent).
//! At each phase end the migration asks its [`Plan`](crate::engine::plan::Plan) what next,
//! exactly as the engine's source run does, with figures from the fluid model instead of a
//! data plane ([`super::migration`]).

use super::migration::{Measured, Mig, Phase, Step};
use super::network::{self, Flow};
use super::outcome::{HostSample, MigrationRecord, ModelOutcome, Placement};
use super::params::ModelParams;
use super::scenario::{Destination, EventKind, MigrationLimits, Scenario};

/// A run that cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The scenario asks for something the model cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// An invariant broke (a bug in the model; `check` runs only find these).
    #[error("model invariant broken at t={t_s:.6}s: {detail}")]
    Invariant {
        /// Virtual time.
        t_s: f64,
        /// What broke.
        detail: String,
    },
}

/// How to run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunOptions {
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// The costs besides bandwidth.
    pub params: ModelParams,
    /// Check the invariants (one copy of each VM, budgets, capacities) at every event.
    pub check: bool,
}

/// Runs `scenario` in virtual time with the default costs; `seed` overrides the scenario's.
pub fn run(scenario: &Scenario, seed: Option<u64>) -> Result<ModelOutcome, ModelError> {
    run_with(
        scenario,
        RunOptions {
            seed,
            ..RunOptions::default()
        },
    )
}

/// Runs `scenario` in virtual time with `options`.
pub fn run_with(scenario: &Scenario, options: RunOptions) -> Result<ModelOutcome, ModelError> {
    let mut sim = Sim::new(scenario, options);
    sim.run()?;
    Ok(sim.outcome())
}

/// One host's state.
#[derive(Debug, Clone, Default)]
pub(super) struct HostState {
    /// Memory committed: resident VMs and reservations for incoming ones.
    pub used: u64,
    /// Memory promised to migrations chosen but not started.
    pub promised: u64,
    pub out_active: u32,
    pub in_active: u32,
    pub failed: bool,
    /// Being evacuated: no longer a target.
    pub draining: bool,
}

/// One VM's state.
#[derive(Debug, Clone, Default)]
pub(super) struct VmState {
    /// Where it runs (`None`: nowhere: not deployed, lost, or paused in a switchover).
    pub running_on: Option<usize>,
    /// Where its memory is held (source until released).
    pub home: Option<usize>,
    /// In a migration (queued or running).
    pub busy: bool,
}

pub(super) struct Sim<'a> {
    pub sc: &'a Scenario,
    pub opts: RunOptions,
    pub seed: u64,
    pub t: f64,
    pub hosts: Vec<HostState>,
    pub vms: Vec<VmState>,
    pub migs: Vec<Mig>,
    pub records: Vec<MigrationRecord>,
    /// Migrations waiting for a slot, in arrival order (indices into `migs`).
    queue: Vec<usize>,
    /// Migrations in flight (indices into `migs`).
    active: Vec<usize>,
    samples: Vec<HostSample>,
    next_event: usize,
    next_sample: f64,
    rates_stale: bool,
    pub notes: Vec<String>,
    /// Links that failed (indices into the scenario's links).
    pub failed_links: Vec<usize>,
    /// Hosts whose memory or traffic changed since their last sample.
    changed: Vec<bool>,
    /// What each host's engine measured of its earlier migrations as a source.
    pub measured: Vec<Measured>,
    events_processed: u64,
}

/// Bytes a transfer may have left and still count as done (floating point).
const DONE_BYTES: f64 = 0.5;

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario, opts: RunOptions) -> Self {
        let mut hosts = vec![HostState::default(); sc.hosts.len()];
        let mut vms = vec![VmState::default(); sc.vms.len()];
        for (i, v) in sc.vms.iter().enumerate() {
            if let Some(h) = v.host {
                hosts[h].used += v.ram_bytes;
                vms[i].running_on = Some(h);
                vms[i].home = Some(h);
            }
        }
        Self {
            sc,
            opts,
            seed: opts.seed.unwrap_or(sc.seed),
            t: 0.0,
            hosts,
            vms,
            migs: Vec::new(),
            records: Vec::new(),
            queue: Vec::new(),
            active: Vec::new(),
            samples: Vec::new(),
            next_event: 0,
            next_sample: 0.0,
            rates_stale: true,
            notes: Vec::new(),
            failed_links: Vec::new(),
            changed: vec![true; sc.hosts.len()],
            measured: vec![Measured::default(); sc.hosts.len()],
            events_processed: 0,
        }
    }

    fn run(&mut self) -> Result<(), ModelError> {
        loop {
            if self.rates_stale {
                self.assign_rates();
            }
            if self.opts.check {
                self.check()?;
            }
            let next = self.next_time();
            let until = self.sc.until_s.unwrap_or(f64::INFINITY);
            if !next.is_finite() || next > until {
                if until.is_finite() && until > self.t {
                    self.advance(until - self.t);
                    self.t = until;
                    self.sample();
                }
                break;
            }
            self.advance(next - self.t);
            self.t = next;
            self.events_processed += 1;
            // Hosts evacuated at one instant are all out of the running as targets first.
            for e in self.sc.events[self.next_event..]
                .iter()
                .take_while(|e| e.at_s <= self.t)
            {
                if let EventKind::Evacuate { host, .. } = e.kind {
                    self.hosts[host].draining = true;
                }
            }
            while self.next_event < self.sc.events.len() && self.sc.events[self.next_event].at_s <= self.t {
                let e = self.sc.events[self.next_event].clone();
                self.next_event += 1;
                self.timed_event(&e.kind, e.line);
                self.events_processed += 1;
            }
            self.phase_ends();
            self.start_queued();
            if self.rates_stale {
                self.assign_rates();
            }
            if self.t >= self.next_sample {
                self.sample();
                self.next_sample = self.t + self.sc.sample_every_s;
            } else if self.changed.iter().any(|c| *c) {
                // Between sampling instants, the hosts whose memory or traffic changed: the
                // series then step where the model steps, not at the next instant.
                self.sample_changed();
            }
        }
        if self.samples.last().is_none_or(|s| s.t_s < self.t) {
            self.sample();
        }
        // Whatever is still in flight when time runs out stays unfinished in the report.
        for &m in &self.active.clone() {
            let detail = format!("still running at the end of the run ({:.3} s)", self.t);
            self.finish(m, "unfinished", Some(detail));
        }
        for m in std::mem::take(&mut self.queue) {
            self.finish(m, "unfinished", Some("still queued at the end of the run".into()));
        }
        Ok(())
    }

    /// The next instant anything happens.
    fn next_time(&self) -> f64 {
        let mut next = f64::INFINITY;
        if let Some(e) = self.sc.events.get(self.next_event) {
            next = next.min(e.at_s.max(self.t));
        }
        let busy = !self.active.is_empty() || !self.queue.is_empty() || self.next_event < self.sc.events.len();
        if busy || self.samples.is_empty() {
            next = next.min(self.next_sample.max(self.t));
        }
        for &m in &self.active {
            next = next.min(self.migs[m].phase_end(self.t));
        }
        next
    }

    /// Moves every transfer on by `dt` seconds at its rate.
    fn advance(&mut self, dt: f64) {
        if dt <= 0.0 {
            return;
        }
        for &m in &self.active {
            self.migs[m].advance(dt);
        }
    }

    /// Ends every phase due now and follows each migration's plan.
    fn phase_ends(&mut self) {
        loop {
            let due: Vec<usize> = self
                .active
                .iter()
                .copied()
                .filter(|&m| self.migs[m].phase_end(self.t) <= self.t || self.migs[m].left_bytes() <= DONE_BYTES)
                .collect();
            if due.is_empty() {
                return;
            }
            for m in due {
                self.events_processed += 1;
                let step = super::migration::next_phase(self, m);
                self.apply(m, step);
            }
        }
    }

    fn apply(&mut self, m: usize, step: Step) {
        self.rates_stale = true;
        self.changed[self.migs[m].src] = true;
        self.changed[self.migs[m].dst] = true;
        match step {
            Step::Continue => {}
            Step::Pause => {
                let vm = self.migs[m].vm;
                self.vms[vm].running_on = None;
            }
            Step::Activate => {
                let (vm, dst) = (self.migs[m].vm, self.migs[m].dst);
                self.vms[vm].running_on = Some(dst);
            }
            Step::Complete => {
                let mig = &self.migs[m];
                let (vm, src, dst) = (mig.vm, mig.src, mig.dst);
                self.measured[src] = mig.measured(self.measured[src]);
                let ram = self.sc.vms[vm].ram_bytes;
                self.hosts[src].used = self.hosts[src].used.saturating_sub(ram);
                self.vms[vm].running_on = Some(dst);
                self.vms[vm].home = Some(dst);
                self.finish(m, "completed", None);
            }
            Step::Abort(detail) => self.roll_back(m, "aborted", detail),
        }
    }

    /// Ends a migration before commitment: the VM runs on its source again, the target's
    /// reservation is released.
    pub(super) fn roll_back(&mut self, m: usize, result: &str, detail: String) {
        let mig = &self.migs[m];
        let (vm, src, dst, reserved) = (mig.vm, mig.src, mig.dst, mig.reserved);
        if reserved {
            self.hosts[dst].used = self.hosts[dst].used.saturating_sub(self.sc.vms[vm].ram_bytes);
        }
        if !self.hosts[src].failed {
            self.vms[vm].running_on = Some(src);
        }
        self.finish(m, result, Some(detail));
    }

    /// Records the end of migration `m` and frees its slots.
    pub(super) fn finish(&mut self, m: usize, result: &str, error: Option<String>) {
        let t = self.t;
        self.changed[self.migs[m].src] = true;
        self.changed[self.migs[m].dst] = true;
        let was_active = self.active.contains(&m);
        self.active.retain(|&x| x != m);
        self.queue.retain(|&x| x != m);
        let mig = &mut self.migs[m];
        if mig.phase == Phase::Queued {
            self.hosts[mig.dst].promised = self.hosts[mig.dst]
                .promised
                .saturating_sub(self.sc.vms[mig.vm].ram_bytes);
        }
        if was_active {
            self.hosts[mig.src].out_active = self.hosts[mig.src].out_active.saturating_sub(1);
            self.hosts[mig.dst].in_active = self.hosts[mig.dst].in_active.saturating_sub(1);
        }
        mig.phase = Phase::Done;
        mig.rate = 0.0;
        self.vms[mig.vm].busy = false;
        let rec = mig.record(self.sc, t, result, error);
        self.records[mig.record] = rec;
        self.rates_stale = true;
    }

    /// Starts queued migrations whose hosts have slots and whose target has room: the highest
    /// priority first, in arrival order within a class, as the engine's queue serves them.
    fn start_queued(&mut self) {
        let mut order = self.queue.clone();
        order.sort_by_key(|&m| std::cmp::Reverse(self.migs[m].qos.priority));
        for m in order {
            let (src, dst, vm) = (self.migs[m].src, self.migs[m].dst, self.migs[m].vm);
            let ram = self.sc.vms[vm].ram_bytes;
            let (s, d) = (&self.sc.hosts[src], &self.sc.hosts[dst]);
            let fits = self.hosts[dst].used + ram <= d.memory_budget_bytes;
            if self.hosts[src].out_active < s.max_outgoing && self.hosts[dst].in_active < d.max_incoming && fits {
                self.queue.retain(|&x| x != m);
                self.hosts[src].out_active += 1;
                self.hosts[dst].in_active += 1;
                self.hosts[dst].promised = self.hosts[dst].promised.saturating_sub(ram);
                self.hosts[dst].used += ram;
                self.active.push(m);
                self.rates_stale = true;
                self.changed[src] = true;
                self.changed[dst] = true;
                super::migration::start(self, m);
            }
        }
    }

    /// The resources: each host's outgoing side, each host's incoming side, each link.
    fn assign_rates(&mut self) {
        self.rates_stale = false;
        let n = self.sc.hosts.len();
        let mut ids: Vec<usize> = Vec::new();
        let mut capacity: Vec<f64> = Vec::new();
        let mut slot = std::collections::BTreeMap::new();
        let mut flows = Vec::new();
        let mut movers = Vec::new();
        for &m in &self.active {
            let mig = &self.migs[m];
            if !mig.moves_bytes() {
                continue;
            }
            let mut uses = Vec::new();
            let mut add = |id: usize, cap: f64| {
                let k = *slot.entry(id).or_insert_with(|| {
                    ids.push(id);
                    capacity.push(cap);
                    capacity.len() - 1
                });
                uses.push(k);
            };
            let (s, d) = (&self.sc.hosts[mig.src], &self.sc.hosts[mig.dst]);
            let out_cap = s
                .nic_bytes_per_sec
                .min(s.bandwidth_budget_bytes_per_sec)
                .min(self.opts.params.plane_bytes_per_sec);
            add(mig.src, out_cap);
            add(
                n + mig.dst,
                d.nic_bytes_per_sec.min(self.opts.params.plane_bytes_per_sec),
            );
            if let Some(l) = mig.link {
                add(2 * n + l, self.sc.links[l].bytes_per_sec);
            }
            flows.push(Flow {
                uses,
                cap: mig.cap,
                weight: f64::from(mig.qos.priority.weight()),
                floor: mig.qos.min_bandwidth_bytes_per_sec.unwrap_or(0.0),
            });
            movers.push(m);
        }
        let rates = network::share(&capacity, &flows);
        for &m in &self.active {
            self.migs[m].rate = 0.0;
        }
        for (m, r) in movers.into_iter().zip(rates) {
            self.migs[m].rate = r;
        }
    }

    /// Every host, at a sampling instant.
    fn sample(&mut self) {
        self.changed.iter_mut().for_each(|c| *c = true);
        self.sample_changed();
    }

    /// The hosts marked changed since the last sample.
    fn sample_changed(&mut self) {
        let n = self.sc.hosts.len();
        let mut out = vec![0.0; n];
        let mut inn = vec![0.0; n];
        for &m in &self.active {
            let mig = &self.migs[m];
            out[mig.src] += mig.rate;
            inn[mig.dst] += mig.rate;
        }
        for h in 0..n {
            if !std::mem::take(&mut self.changed[h]) {
                continue;
            }
            self.samples.push(HostSample {
                t_s: self.t,
                host: h,
                ram_used_bytes: self.hosts[h].used,
                net_out_bytes_per_sec: out[h],
                net_in_bytes_per_sec: inn[h],
            });
        }
        self.events_processed += 1;
    }

    fn timed_event(&mut self, kind: &EventKind, line: usize) {
        if let EventKind::Deploy { host, .. } | EventKind::FailHost { host } = kind {
            self.changed[*host] = true;
        }
        match kind {
            EventKind::Create { .. } => {}
            EventKind::Deploy { vm, host } => self.deploy(*vm, *host, line),
            EventKind::Migrate { vm, to, limits } => self.request(*vm, to, limits, line),
            EventKind::Evacuate { host, limits } => {
                self.hosts[*host].draining = true;
                let dc = self.sc.hosts[*host].datacenter;
                let resident: Vec<usize> = (0..self.vms.len())
                    .filter(|&v| self.vms[v].running_on == Some(*host) && !self.vms[v].busy)
                    .collect();
                for vm in resident {
                    self.request(vm, &Destination::Datacenter(dc), limits, line);
                }
            }
            EventKind::Consolidate { datacenter, limits } => {
                super::placement::consolidate(self, *datacenter, limits, line)
            }
            EventKind::FailHost { host } => self.fail_host(*host),
            EventKind::FailLink { link } => self.fail_link(*link),
        }
    }

    fn deploy(&mut self, vm: usize, host: usize, line: usize) {
        let ram = self.sc.vms[vm].ram_bytes;
        let h = &self.sc.hosts[host];
        if self.vms[vm].home.is_some() {
            self.notes
                .push(format!("line {line}: {} is already deployed", self.sc.vms[vm].id));
        } else if self.hosts[host].failed || self.hosts[host].used + ram > h.memory_budget_bytes {
            self.notes.push(format!(
                "line {line}: {} does not fit on {} (or it failed)",
                self.sc.vms[vm].id, h.name
            ));
        } else {
            self.hosts[host].used += ram;
            self.vms[vm].running_on = Some(host);
            self.vms[vm].home = Some(host);
        }
    }

    /// A migration asked for: its target chosen, then queued until its hosts have slots.
    pub(super) fn request(&mut self, vm: usize, to: &Destination, limits: &MigrationLimits, line: usize) {
        let id = self.sc.vms[vm].id.clone();
        let Some(src) = self.vms[vm].running_on.filter(|_| !self.vms[vm].busy) else {
            self.notes.push(format!(
                "line {line}: {id} is not running idle anywhere; its migration is skipped"
            ));
            return;
        };
        let dst = match to {
            Destination::Host(h) => Some(*h),
            Destination::Datacenter(dc) => super::placement::choose_target(self, vm, src, *dc),
        };
        let Some(dst) = dst.filter(|&d| d != src && !self.hosts[d].failed) else {
            self.notes
                .push(format!("line {line}: no host can take {id}; its migration is skipped"));
            return;
        };
        let m = self.migs.len();
        let mig = Mig::new(self, m, vm, src, dst, limits);
        self.records.push(mig.record(self.sc, self.t, "queued", None));
        self.migs.push(mig);
        self.vms[vm].busy = true;
        self.hosts[dst].promised += self.sc.vms[vm].ram_bytes;
        let refusal = self.migs[m].refusal.clone().or_else(|| self.floor_refusal(m));
        if let Some(err) = refusal {
            // Refused at negotiation, or its floor cannot be assured: nothing was reserved.
            self.finish(m, "aborted", Some(err));
            return;
        }
        self.queue.push(m);
    }

    /// Why `m`'s floor cannot be assured, if it cannot: as the engine's admission, the floors
    /// of its source's queued and running migrations leave less of the source's budget.
    fn floor_refusal(&self, m: usize) -> Option<String> {
        let mig = &self.migs[m];
        let floor = mig.qos.min_bandwidth_bytes_per_sec?;
        let s = &self.sc.hosts[mig.src];
        let reserved: f64 = self
            .queue
            .iter()
            .chain(&self.active)
            .filter(|&&o| self.migs[o].src == mig.src)
            .filter_map(|&o| self.migs[o].qos.min_bandwidth_bytes_per_sec)
            .sum();
        let room = (s.nic_bytes_per_sec.min(s.bandwidth_budget_bytes_per_sec) - reserved)
            .max(0.0)
            .min(mig.limit_cap());
        (floor > room).then(|| {
            format!(
                "host {} cannot assure {floor:.0} bytes/s to this migration: only {room:.0} bytes/s of its \
                 bandwidth budget are free of other migrations' floors (or within the migration's own cap)",
                s.name
            )
        })
    }

    fn fail_host(&mut self, host: usize) {
        self.hosts[host].failed = true;
        for m in self.active.clone().into_iter().chain(self.queue.clone()) {
            let mig = &self.migs[m];
            if mig.src != host && mig.dst != host {
                continue;
            }
            let (vm, dst) = (mig.vm, mig.dst);
            if mig.activated() {
                // The target runs the VM: if it failed, the VM is gone; if the source failed
                // during a pull, the pages only it held are gone too.
                self.vms[vm].running_on = None;
                self.vms[vm].home = None;
                self.finish(
                    m,
                    "failed",
                    Some(format!(
                        "host {} failed after activation; the VM is lost",
                        self.sc.hosts[host].name
                    )),
                );
                let _ = dst;
            } else {
                let detail = format!("host {} failed", self.sc.hosts[host].name);
                self.roll_back(m, "failed", detail);
            }
        }
        for v in 0..self.vms.len() {
            if self.vms[v].home == Some(host) && !self.vms[v].busy {
                self.vms[v].running_on = None;
                self.vms[v].home = None;
                self.notes.push(format!(
                    "{} was lost with host {}",
                    self.sc.vms[v].id, self.sc.hosts[host].name
                ));
            }
        }
        self.hosts[host].used = 0;
        self.rates_stale = true;
    }

    fn fail_link(&mut self, link: usize) {
        self.sc_link_failed(link);
        for m in self.active.clone() {
            if self.migs[m].link != Some(link) {
                continue;
            }
            if self.migs[m].activated() {
                // Post-copy past activation: the target holds the VM, paused, awaiting pages
                // only the source has: as the engine would, it stays held there.
                let vm = self.migs[m].vm;
                self.vms[vm].running_on = Some(self.migs[m].dst);
                self.finish(
                    m,
                    "failed",
                    Some("the link failed during the post-copy pull; the VM is held awaiting pages".into()),
                );
            } else {
                self.roll_back(m, "failed", "the link between the datacenters failed".into());
            }
        }
    }

    fn sc_link_failed(&mut self, link: usize) {
        let l = &self.sc.links[link];
        self.notes.push(format!(
            "link {} - {} failed",
            self.sc.datacenters[l.a].name, self.sc.datacenters[l.b].name
        ));
        self.failed_links.push(link);
    }
}

impl Sim<'_> {
    fn outcome(self) -> ModelOutcome {
        let sc = self.sc;
        let placements = sc
            .vms
            .iter()
            .zip(&self.vms)
            .map(|(v, s)| Placement {
                vm: v.id.clone(),
                host: s.running_on.map(|h| sc.hosts[h].name.clone()),
                datacenter: s
                    .running_on
                    .map(|h| sc.datacenters[sc.hosts[h].datacenter].name.clone()),
            })
            .collect();
        ModelOutcome {
            scenario: sc.name.clone(),
            seed: self.seed,
            end_s: self.t,
            migrations: self.records,
            samples: self.samples,
            placements,
            events_processed: self.events_processed,
            notes: self.notes,
        }
    }

    /// The invariants, at the current instant.
    fn check(&self) -> Result<(), ModelError> {
        let broken = |detail: String| ModelError::Invariant { t_s: self.t, detail };
        // Each VM runs on at most one host; a migrating VM runs on its source until the pause,
        // nowhere while paused, on its target from activation.
        for &m in &self.active {
            let mig = &self.migs[m];
            let on = self.vms[mig.vm].running_on;
            let want = match mig.phase {
                Phase::Final { .. } | Phase::Switch { .. } => None,
                Phase::Push { .. } | Phase::Verify { .. } => Some(mig.dst),
                _ => Some(mig.src),
            };
            if on != want {
                return Err(broken(format!(
                    "{} runs on {on:?} in phase {:?}",
                    self.sc.vms[mig.vm].id, mig.phase
                )));
            }
        }
        // Memory: what each host holds is its resident VMs plus its reservations, within budget.
        let mut held = vec![0u64; self.hosts.len()];
        for (v, s) in self.vms.iter().enumerate() {
            if let Some(h) = s.home {
                held[h] += self.sc.vms[v].ram_bytes;
            }
        }
        for &m in &self.active {
            let mig = &self.migs[m];
            if mig.reserved && self.vms[mig.vm].home != Some(mig.dst) {
                held[mig.dst] += self.sc.vms[mig.vm].ram_bytes;
            }
        }
        for (h, s) in self.hosts.iter().enumerate() {
            if s.failed {
                continue;
            }
            if s.used != held[h] {
                return Err(broken(format!(
                    "{} counts {} bytes, holds {}",
                    self.sc.hosts[h].name, s.used, held[h]
                )));
            }
            if s.used > self.sc.hosts[h].memory_budget_bytes {
                return Err(broken(format!("{} is over its memory budget", self.sc.hosts[h].name)));
            }
            let def = &self.sc.hosts[h];
            if s.out_active > def.max_outgoing || s.in_active > def.max_incoming {
                return Err(broken(format!("{} runs more migrations than its caps", def.name)));
            }
        }
        // Bandwidth: no host side, link or cap carries more than it can.
        let n = self.hosts.len();
        let mut out = vec![0.0; n];
        let mut inn = vec![0.0; n];
        let mut link = vec![0.0; self.sc.links.len()];
        for &m in &self.active {
            let mig = &self.migs[m];
            out[mig.src] += mig.rate;
            inn[mig.dst] += mig.rate;
            if let Some(l) = mig.link {
                link[l] += mig.rate;
            }
            if mig.rate > mig.cap * (1.0 + 1e-9) + 1e-6 {
                return Err(broken(format!(
                    "a migration of {} exceeds its cap",
                    self.sc.vms[mig.vm].id
                )));
            }
        }
        let over = |used: f64, cap: f64| used > cap * (1.0 + 1e-9) + 1e-6;
        for (h, def) in self.sc.hosts.iter().enumerate() {
            if over(out[h], def.nic_bytes_per_sec.min(def.bandwidth_budget_bytes_per_sec))
                || over(inn[h], def.nic_bytes_per_sec)
            {
                return Err(broken(format!("{} carries more than its NIC or budget", def.name)));
            }
        }
        for (l, def) in self.sc.links.iter().enumerate() {
            if over(link[l], def.bytes_per_sec) {
                return Err(broken(format!("link {l} carries more than its capacity")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
