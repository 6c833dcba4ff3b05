//! One migration in virtual time: the phases a real run goes through, with the plan deciding
//! between rounds exactly as the engine's source machine asks it, and the figures it decides on
//! taken from the fluid models instead of a data plane.

use super::memory;
use super::outcome::{MigrationRecord, Prediction};
use super::run::Sim;
use super::scenario::{MigrationLimits, Scenario};
use crate::engine::plan::{self, Estimate, Forecast, Next, Plan, RoundObservation, Switchover, Verdict};
use crate::engine::PolicyConfig;
use crate::memory::SplitMix64;
use crate::protocol::negotiation::negotiate;
use crate::protocol::Capabilities;
use crate::units::PAGE_SIZE;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Phase {
    /// Waiting for a slot.
    Queued,
    /// Premigration and reservation.
    Setup { until: f64 },
    /// A pre-copy round with `left` bytes to send.
    Round { round: u32, left: f64, started: f64 },
    /// Paused; the last pages go (stop-and-copy order).
    Final { left: f64 },
    /// Paused; state, load and activation.
    Switch { until: f64, how: Switchover },
    /// Post-copy: the target runs the VM; the rest is pulled and pushed.
    Push { left: f64 },
    /// Post-copy: every page is on the target; the source verifies before it frees its copy.
    Verify { until: f64 },
    /// Ended.
    Done,
}

/// What a phase end means for where the VM runs.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    Continue,
    /// The VM pauses on its source: it runs nowhere until activation.
    Pause,
    /// The VM runs on its target.
    Activate,
    /// Done: the source copy is freed.
    Complete,
    /// Given up before commitment.
    Abort(String),
}

pub(super) struct Mig {
    pub record: usize,
    pub vm: usize,
    pub src: usize,
    pub dst: usize,
    /// The link between the datacenters, if they differ.
    pub link: Option<usize>,
    pub phase: Phase,
    /// Current rate, bytes per second.
    pub rate: f64,
    /// Current cap (the request's bandwidth, or the plan's pace), bytes per second.
    pub cap: f64,
    pub reserved: bool,
    /// Why negotiation refused it, if it did.
    pub refusal: Option<String>,
    /// Its priority and floor: its place in the queue, its weight and floor in the source's budget.
    pub qos: super::scenario::MigrationQos,
    requested: crate::protocol::Algorithm,
    limit_cap: f64,
    plan: Option<Box<dyn Plan>>,
    /// The policy and pool the plan was made with, and the request's deadline (seconds): the
    /// plan is wrapped once setup has ended, as the engine wraps it after reservation.
    cfg: PolicyConfig,
    pool: Vec<crate::protocol::Algorithm>,
    deadline: Option<f64>,
    rtt: f64,
    pages: u64,
    /// Pages the next step starts from.
    pending: u64,
    requested_at: f64,
    start: f64,
    precopy_start: f64,
    paused_at: Option<f64>,
    downtime: f64,
    bytes: f64,
    round_bytes: f64,
    rounds: u32,
    why: Vec<String>,
    forecast: Option<Prediction>,
    /// What the source's engine measured of earlier switchovers and links, as it started.
    known: Measured,
    /// When the last pages were all sent (stop-and-copy order), for the switchover it measures.
    final_done: Option<f64>,
    /// Bandwidth the last round measured, page bytes per second.
    bandwidth: f64,
    fixed_postcopy: f64,
    /// Switchover of pre-copy order besides verification.
    switchover: f64,
    /// Hashing and comparing the VM's memory.
    verify: f64,
}

impl Mig {
    /// The request's cap and the VM's own bandwidth, whichever is lower.
    pub fn limit_cap(&self) -> f64 {
        self.limit_cap
    }

    pub fn new(sim: &Sim<'_>, record: usize, vm: usize, src: usize, dst: usize, limits: &MigrationLimits) -> Self {
        let sc = sim.sc;
        let (s, d) = (&sc.hosts[src], &sc.hosts[dst]);
        let link = (s.datacenter != d.datacenter).then(|| {
            sc.links
                .iter()
                .position(|l| (l.a, l.b) == (s.datacenter, d.datacenter) || (l.b, l.a) == (s.datacenter, d.datacenter))
        });
        let mut refusal = None;
        let link = match link {
            None => None,
            Some(Some(l)) if sim.failed_links.contains(&l) => {
                refusal = Some("the link between the datacenters has failed".to_string());
                Some(l)
            }
            Some(Some(l)) => Some(l),
            Some(None) => {
                refusal = Some(format!(
                    "no link between {} and {}",
                    sc.datacenters[s.datacenter].name, sc.datacenters[d.datacenter].name
                ));
                None
            }
        };
        let rtt = link.map_or(sim.opts.params.local_rtt_s, |l| 2.0 * sc.links[l].latency_s);
        // The same negotiation the engine runs, over the two hosts' offers.
        let caps = |h: &super::scenario::HostDef| Capabilities {
            algorithms: h.algorithms.clone(),
            ..Capabilities::full(vec![h.layout])
        };
        let mut plan = None;
        let mut cfg = PolicyConfig::default();
        let mut pool = Vec::new();
        match negotiate(&caps(s), &caps(d), limits.algorithm) {
            Ok(p) => {
                if let Some(l) = limits.downtime_limit_s {
                    cfg.downtime_limit = std::time::Duration::from_secs_f64(l.max(0.0));
                }
                // `random`'s pick: one seed per migration, from the run's seed.
                let seed = SplitMix64::new(sim.seed ^ (record as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).next();
                plan = Some(plan::for_algorithm(limits.algorithm, cfg, &p.algorithms, seed));
                pool = p.algorithms;
            }
            Err(e) => refusal = refusal.or(Some(e.to_string())),
        }
        let ram = sc.vms[vm].ram_bytes as f64;
        let p = &sim.opts.params;
        Self {
            record,
            vm,
            src,
            dst,
            link,
            phase: Phase::Queued,
            rate: 0.0,
            cap: f64::INFINITY,
            reserved: false,
            refusal,
            qos: limits.qos,
            requested: limits.algorithm,
            // The request's cap and the VM's own bandwidth, whichever is lower.
            limit_cap: limits
                .bandwidth_bytes_per_sec
                .unwrap_or(f64::INFINITY)
                .min(sc.vms[vm].bandwidth_bytes_per_sec.unwrap_or(f64::INFINITY)),
            plan,
            cfg,
            pool,
            deadline: limits.deadline_s,
            rtt,
            pages: sc.vms[vm].ram_bytes / PAGE_SIZE as u64,
            pending: 0,
            requested_at: sim.t,
            start: sim.t,
            precopy_start: sim.t,
            paused_at: None,
            downtime: 0.0,
            bytes: 0.0,
            round_bytes: 0.0,
            rounds: 0,
            why: Vec::new(),
            forecast: None,
            known: sim.measured[src],
            final_done: None,
            bandwidth: 0.0,
            fixed_postcopy: p.postcopy_switchover_s + 2.0 * rtt,
            switchover: p.switchover_s + 2.0 * rtt,
            verify: ram / p.verify_bytes_per_sec + rtt,
        }
    }

    /// When the current phase ends at the current rate.
    pub fn phase_end(&self, now: f64) -> f64 {
        match self.phase {
            Phase::Setup { until } | Phase::Switch { until, .. } | Phase::Verify { until } => until,
            Phase::Round { left, .. } | Phase::Final { left } | Phase::Push { left } => {
                if left <= 0.0 {
                    now
                } else if self.rate > 0.0 {
                    now + left / self.rate
                } else {
                    f64::INFINITY
                }
            }
            Phase::Queued | Phase::Done => f64::INFINITY,
        }
    }

    pub fn left_bytes(&self) -> f64 {
        match self.phase {
            Phase::Round { left, .. } | Phase::Final { left } | Phase::Push { left } => left,
            _ => f64::INFINITY,
        }
    }

    /// True while pages move.
    pub fn moves_bytes(&self) -> bool {
        matches!(
            self.phase,
            Phase::Round { .. } | Phase::Final { .. } | Phase::Push { .. }
        )
    }

    /// True once the target runs the VM.
    pub fn activated(&self) -> bool {
        matches!(self.phase, Phase::Push { .. } | Phase::Verify { .. })
    }

    pub fn advance(&mut self, dt: f64) {
        let sent = self.rate * dt;
        match &mut self.phase {
            Phase::Round { left, .. } | Phase::Final { left } | Phase::Push { left } => {
                let s = sent.min(*left);
                *left -= s;
                self.bytes += s;
                self.round_bytes += s;
            }
            _ => {}
        }
    }

    fn note(&mut self, v: Verdict, elapsed: f64) {
        for c in v.decisions {
            self.why.push(format!("{}: {}", c.action, c.reason));
        }
        if let Some(f) = v.forecast {
            self.forecast = Some(prediction(&f, elapsed));
        }
    }

    pub fn record(&self, sc: &Scenario, now: f64, result: &str, error: Option<String>) -> MigrationRecord {
        let (s, d) = (&sc.hosts[self.src], &sc.hosts[self.dst]);
        let algorithm = self.plan.as_ref().map_or(self.requested, |p| p.algorithm());
        MigrationRecord {
            vm: sc.vms[self.vm].id.clone(),
            source: s.name.clone(),
            source_datacenter: sc.datacenters[s.datacenter].name.clone(),
            target: d.name.clone(),
            target_datacenter: sc.datacenters[d.datacenter].name.clone(),
            requested: self.requested.name().to_string(),
            algorithm: algorithm.name().to_string(),
            why: self.why_with_deadline(now, result),
            result: result.to_string(),
            error,
            requested_at_s: self.requested_at,
            start_s: self.start,
            end_s: now,
            total_s: now - self.start,
            downtime_start_s: self.paused_at,
            downtime_s: self.downtime,
            bytes: self.bytes.round() as u64,
            rounds: self.rounds,
            predicted: self.forecast.clone(),
        }
    }
}

impl Mig {
    /// The decisions, and how the deadline went if there was one (the engine's report has
    /// fields of its own for it; the model's record says it in words).
    fn why_with_deadline(&self, now: f64, result: &str) -> Vec<String> {
        let mut why = self.why.clone();
        if let Some(d) = self.deadline {
            let total = now - self.start;
            why.push(if result == "completed" && total <= d {
                format!("deadline met: {:.3} s to spare of {d:.3} s", d - total)
            } else {
                format!(
                    "deadline missed: {result} after {total:.3} s, {:.3} s over {d:.3} s",
                    total - d
                )
            });
        }
        why
    }
}

fn prediction(f: &Forecast, elapsed: f64) -> Prediction {
    let r = f.report(std::time::Duration::from_secs_f64(elapsed.max(0.0)));
    Prediction {
        algorithm: r.algorithm,
        downtime_s: r.downtime_s,
        total_s: r.total_s,
        basis: r.basis,
    }
}

/// Starts migration `m` (its slots and reservation taken): premigration and reservation.
pub(super) fn start(sim: &mut Sim<'_>, m: usize) {
    let t = sim.t;
    let p = sim.opts.params;
    let ram = sim.sc.vms[sim.migs[m].vm].ram_bytes as f64;
    let mig = &mut sim.migs[m];
    mig.reserved = true;
    mig.start = t;
    // Hello/Welcome, Authenticate, Reserve/Reserved: two round trips, and the commit of
    // memory where the engine commits before answering (`vmm::MemoryCommit`): a pre-copy
    // reservation commits in the background while round 0 runs.
    let commit = match crate::vmm::MemoryCommit::for_algorithm(mig.requested) {
        crate::vmm::MemoryCommit::Background => 0.0,
        crate::vmm::MemoryCommit::UpFront | crate::vmm::MemoryCommit::OnDemand => ram / p.reserve_bytes_per_sec,
    };
    mig.phase = Phase::Setup {
        until: t + p.setup_s + 2.0 * mig.rtt + commit,
    };
}

/// What follows the phase of migration `m` that just ended.
pub(super) fn next_phase(sim: &mut Sim<'_>, m: usize) -> Step {
    let t = sim.t;
    let sc = sim.sc;
    let estimate = estimate(sim, m);
    let mig = &mut sim.migs[m];
    let elapsed = t - mig.start;
    match mig.phase {
        Phase::Setup { .. } => {
            let Some(plan) = mig.plan.take() else {
                return Step::Abort("no plan".into());
            };
            let deadline = mig.deadline.map(|d| plan::Deadline {
                total: std::time::Duration::from_secs_f64(d),
                spent: std::time::Duration::from_secs_f64(elapsed.max(0.0)),
            });
            let plan = mig
                .plan
                .insert(plan::with_deadline(plan, deadline, &mig.cfg, &mig.pool));
            let v = plan.start(mig.pages, estimate);
            let next = v.next.clone();
            mig.note(v, elapsed);
            mig.pending = mig.pages;
            follow(mig, next, t)
        }
        Phase::Round { round, started, .. } => {
            mig.rounds += 1;
            let dt = (t - started).max(1e-9);
            let w = &sc.vms[mig.vm].workload;
            let remaining = memory::dirtied_between(w, started, t, mig.pages);
            let obs = RoundObservation {
                round,
                remaining_pages: remaining,
                dirty_pages_per_sec: remaining as f64 / dt,
                bandwidth_bytes_per_sec: (mig.round_bytes / dt).max(1.0),
                fixed_switchover: std::time::Duration::from_secs_f64(mig.fixed_switchover()),
                precopy_elapsed: std::time::Duration::from_secs_f64(t - mig.precopy_start),
                sent_pages: (mig.bytes / crate::units::PAGE_SIZE as f64) as u64,
                vm_pages: mig.pages,
            };
            mig.bandwidth = obs.bandwidth_bytes_per_sec;
            let Some(plan) = mig.plan.as_mut() else {
                return Step::Abort("no plan".into());
            };
            let v = plan.after_round(&obs);
            let next = v.next.clone();
            mig.note(v, elapsed);
            mig.pending = remaining;
            follow(mig, next, t)
        }
        Phase::Final { .. } => {
            mig.final_done = Some(t);
            if mig.bandwidth == 0.0 {
                let p = mig.paused_at.unwrap_or(t);
                if t > p {
                    mig.bandwidth = mig.round_bytes / (t - p);
                }
            }
            // Verified after activation (the engine's default): the switchover waits for no
            // hash.
            mig.phase = Phase::Switch {
                until: t + mig.switchover,
                how: Switchover::StopAndCopy,
            };
            Step::Continue
        }
        Phase::Switch { how, .. } => {
            mig.downtime = mig.paused_at.map_or(0.0, |p| t - p);
            match how {
                Switchover::StopAndCopy => {
                    // The digests are compared while the target runs the VM. A stop-and-copy
                    // (no rounds: the last pages are all of them) hashed from the pause,
                    // alongside its pages; after pre-copy rounds the hash starts now.
                    let from = if mig.rounds == 0 { mig.paused_at.unwrap_or(t) } else { t };
                    mig.phase = Phase::Verify {
                        until: (from + mig.verify).max(t),
                    };
                    Step::Activate
                }
                Switchover::Postcopy => {
                    mig.phase = Phase::Push {
                        left: mig.pending as f64 * PAGE_SIZE as f64,
                    };
                    mig.cap = mig.limit_cap;
                    Step::Activate
                }
            }
        }
        Phase::Push { .. } => {
            mig.phase = Phase::Verify { until: t + mig.verify };
            Step::Continue
        }
        Phase::Verify { .. } => Step::Complete,
        Phase::Queued | Phase::Done => Step::Continue,
    }
}

/// The phase a plan's `next` leads to.
fn follow(mig: &mut Mig, next: Next, t: f64) -> Step {
    match next {
        Next::Round { rate } => {
            if !matches!(mig.phase, Phase::Round { .. }) {
                mig.precopy_start = t;
            }
            let round = match mig.phase {
                Phase::Round { round, .. } => round + 1,
                _ => 0,
            };
            mig.round_bytes = 0.0;
            mig.cap = mig.limit_cap.min(rate.map_or(f64::INFINITY, |r| r as f64));
            mig.phase = Phase::Round {
                round,
                left: mig.pending as f64 * PAGE_SIZE as f64,
                started: t,
            };
            Step::Continue
        }
        Next::Switchover(how) => {
            mig.paused_at = Some(t);
            mig.cap = mig.limit_cap;
            mig.round_bytes = 0.0;
            mig.phase = match how {
                Switchover::StopAndCopy => Phase::Final {
                    left: mig.pending as f64 * PAGE_SIZE as f64,
                },
                Switchover::Postcopy => Phase::Switch {
                    until: t + mig.fixed_postcopy,
                    how,
                },
            };
            Step::Pause
        }
        Next::Abort { detail } => Step::Abort(detail),
    }
}

/// What the source's engine knows before the first page moves, as the real one does: the
/// bandwidth earlier migrations measured, else the request's cap; nothing on a first migration
/// without a cap.
fn estimate(sim: &Sim<'_>, m: usize) -> Option<Estimate> {
    let mig = &sim.migs[m];
    let (bandwidth_bytes_per_sec, source) = match (mig.known.bandwidth, mig.limit_cap.is_finite()) {
        (Some(b), _) => (b, "earlier migrations"),
        (None, true) => (mig.limit_cap, "the link's configured cap"),
        (None, false) => return None,
    };
    Some(Estimate {
        bandwidth_bytes_per_sec,
        source,
        fixed_switchover: std::time::Duration::from_secs_f64(mig.fixed_switchover()),
    })
}

/// Figures an engine keeps from its earlier migrations (moving averages, as the engine's own
/// `Measured`), per source host in the model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Measured {
    /// Downtime beyond the last pages' transfer, seconds.
    pub switchover: Option<f64>,
    /// Link bandwidth, page bytes per second.
    pub bandwidth: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o * 0.7 + new * 0.3)
}

impl Mig {
    /// The fixed switchover cost the source's policy assumes: what earlier switchovers
    /// measured, else two round trips and a page at the bandwidth seen (the engine's own rule).
    fn fixed_switchover(&self) -> f64 {
        let bw = if self.bandwidth > 0.0 {
            self.bandwidth
        } else {
            self.known.bandwidth.unwrap_or(1e9)
        };
        self.known.switchover.unwrap_or(2.0 * self.rtt + PAGE_SIZE as f64 / bw)
    }

    /// What this migration teaches its source's engine, once it completed.
    pub fn measured(&self, before: Measured) -> Measured {
        let last_pages = self.final_done.zip(self.paused_at).map_or(0.0, |(f, p)| f - p);
        Measured {
            switchover: Some(ewma(before.switchover, (self.downtime - last_pages).max(0.0))),
            bandwidth: if self.bandwidth > 0.0 {
                Some(ewma(before.bandwidth, self.bandwidth))
            } else {
                before.bandwidth
            },
        }
    }
}
