//! The Engine actor: the registry of hosts and migrations behind [`super::EngineHandle`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::sync::{broadcast, oneshot, watch};

use super::ask::{ask, GUEST_ASK};
use super::error::EngineError;
use super::events::MigrationEvent;
use super::host::{
    AbortAllIncoming, AcceptLink, CloseIncoming, CreateVmOnHost, DeleteVm, GetCapabilities, GetHostUsage, GetVm,
    HoldVm, Host, HostUsage, ListVms, ReleaseVm,
};
use super::migration::{CancelMigration, Migration, MigrationFinished};
use super::progress::{MigrationStatus, Phase, Progress};
use super::qos::{self, Priority};
use super::receiver::ReceiverParams;
use super::report::{MigrationReport, Outcome, VmLocation};
use super::request::{HostConfig, MigrationRequest, VmSpec};
use super::route::Route;
use super::source::{Measured, SourceSetup};
use crate::link::{self, SharedBudget, TokenBucket};
use crate::vm::{BeginOutgoing, EndOutgoing, GetGuest, HeldCopy, HeldReason, Peer, VmInfo};

/// Finished reports kept for queries; older ones are dropped so a long-running service stays
/// flat in memory.
const REPORT_HISTORY: usize = 1024;
/// Events buffered per subscriber before it lags.
pub(super) const EVENT_BUFFER: usize = 1024;

#[derive(Debug)]
pub(super) struct Running {
    pub(super) addr: Option<Addr<Migration>>,
    /// True once it holds a slot (launching or running), false while queued.
    pub(super) started: bool,
    pub(super) source: String,
    pub(super) vm: String,
    pub(super) to: String,
    /// Where the other copy goes, should this one be held.
    pub(super) peer: Peer,
    pub(super) algorithm: String,
    pub(super) progress: Arc<Progress>,
    pub(super) events: broadcast::Sender<MigrationEvent>,
    pub(super) waiters: Vec<oneshot::Sender<MigrationReport>>,
}

/// A migration waiting for a slot under its source host's cap.
#[derive(Debug)]
struct Queued {
    id: u64,
    req: MigrationRequest,
}

/// What a migration was admitted with: its class and the floor it reserves of its host's
/// budget until it ends (queued or running).
#[derive(Debug, Clone)]
struct Admitted {
    host: String,
    priority: Priority,
    floor: Option<u64>,
}

/// Registry of hosts and migrations.
#[derive(Debug, Default)]
pub struct Engine {
    pub(super) hosts: HashMap<String, Addr<Host>>,
    pub(super) host_configs: HashMap<String, HostConfig>,
    addresses: HashMap<String, std::net::SocketAddr>,
    pub(super) running: HashMap<u64, Running>,
    queue: VecDeque<Queued>,
    finished: VecDeque<MigrationReport>,
    pub(super) next_id: u64,
    pub(super) measured: Arc<Mutex<Measured>>,
    /// Each host's bandwidth budget, shared by its outgoing migrations by priority.
    pub(super) budgets: HashMap<String, SharedBudget>,
    /// QoS of every queued and running migration, by id.
    admitted: HashMap<u64, Admitted>,
}

impl Actor for Engine {
    type Context = Context<Self>;
}

impl Engine {
    pub(super) fn host(&self, name: &str) -> Result<Addr<Host>, EngineError> {
        self.hosts
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownHost(name.to_string()))
    }

    /// `req`'s share of its source host's bandwidth budget, if the host has one: the bucket its
    /// link charges, weighted by its priority, with its floor.
    pub(super) fn budget_member(&self, req: &MigrationRequest) -> Option<Arc<Mutex<TokenBucket>>> {
        self.budgets.get(&req.source).map(|b| {
            b.member(qos::claim(
                req.priority,
                req.min_bandwidth_bytes_per_sec,
                req.shaping.bandwidth_bytes_per_sec,
            ))
        })
    }

    /// Refuses `req` if its floor cannot be assured beside the floors of its host's queued and
    /// running migrations (see `engine::qos`).
    fn admit_floor(&self, req: &MigrationRequest) -> Result<(), EngineError> {
        let Some(floor) = req.min_bandwidth_bytes_per_sec else {
            return Ok(());
        };
        let budget = self.budgets.get(&req.source).map(SharedBudget::bytes_per_sec);
        let reserved = self
            .admitted
            .values()
            .filter(|a| a.host == req.source)
            .filter_map(|a| a.floor)
            .sum();
        match qos::floor_room(budget, reserved, req.shaping.bandwidth_bytes_per_sec) {
            Some(room) if floor > room => Err(EngineError::FloorUnavailable {
                host: req.source.clone(),
                requested_bytes_per_sec: floor,
                available_bytes_per_sec: room,
            }),
            _ => Ok(()),
        }
    }
}

/// Add a host; binds its TCP listener if it has one.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct AddHost(pub HostConfig);

impl Handler<AddHost> for Engine {
    type Result = Result<(), EngineError>;
    fn handle(&mut self, msg: AddHost, _: &mut Self::Context) -> Self::Result {
        if self.hosts.contains_key(&msg.0.name) {
            return Err(EngineError::DuplicateHost(msg.0.name));
        }
        crate::format::check_name("host name", &msg.0.name).map_err(|e| {
            EngineError::InvalidConfig(crate::format::FormatError::InvalidConfig {
                field: "host name",
                value: e.to_string(),
            })
        })?;
        msg.0
            .backend
            .check_available()
            .map_err(|e| EngineError::Vm(format!("host {:?}: {} backend: {e}", msg.0.name, msg.0.backend)))?;
        let name = msg.0.name.clone();
        let listener = match msg.0.listen {
            Some(addr) => {
                let bind = || -> std::io::Result<tokio::net::TcpListener> {
                    let l = std::net::TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                };
                let l = bind().map_err(|e| EngineError::Internal(format!("cannot listen on {addr}: {e}")))?;
                if let Ok(a) = l.local_addr() {
                    self.addresses.insert(name.clone(), a);
                }
                Some(l)
            }
            None => None,
        };
        if let Some(rate) = msg.0.bandwidth_budget_bytes_per_sec {
            self.budgets.insert(name.clone(), SharedBudget::new(rate));
        }
        self.host_configs.insert(name.clone(), msg.0.clone());
        self.hosts.insert(name, Host::new(msg.0, listener).start());
        Ok(())
    }
}

/// The address a host accepts TCP migrations on.
#[derive(Debug, Message)]
#[rtype(result = "Option<std::net::SocketAddr>")]
pub struct ListenAddress(pub String);

impl Handler<ListenAddress> for Engine {
    type Result = Option<std::net::SocketAddr>;
    fn handle(&mut self, msg: ListenAddress, _: &mut Self::Context) -> Self::Result {
        self.addresses.get(&msg.0).copied()
    }
}

/// Create a VM on a host.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, EngineError>")]
pub struct CreateVmIn {
    /// Host name.
    pub host: String,
    /// The VM.
    pub spec: VmSpec,
}

impl Handler<CreateVmIn> for Engine {
    type Result = ResponseFuture<Result<VmInfo, EngineError>>;
    fn handle(&mut self, msg: CreateVmIn, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.host);
        Box::pin(async move {
            let spec = msg.spec;
            host?
                .send(CreateVmOnHost {
                    id: spec.id,
                    memory_bytes: spec.memory_bytes,
                    vcpus: spec.vcpus,
                    nics: spec.nics,
                    workload: spec.workload,
                })
                .await?
        })
    }
}

/// List a host's VMs.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<VmInfo>, EngineError>")]
pub struct ListVmsIn(pub String);

impl Handler<ListVmsIn> for Engine {
    type Result = ResponseFuture<Result<Vec<VmInfo>, EngineError>>;
    fn handle(&mut self, msg: ListVmsIn, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.0);
        Box::pin(async move { Ok(host?.send(ListVms).await?) })
    }
}

/// A host's memory and VM count.
#[derive(Debug, Message)]
#[rtype(result = "Result<HostUsage, EngineError>")]
pub struct UsageOf(pub String);

impl Handler<UsageOf> for Engine {
    type Result = ResponseFuture<Result<HostUsage, EngineError>>;
    fn handle(&mut self, msg: UsageOf, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.0);
        Box::pin(async move { Ok(host?.send(GetHostUsage).await?) })
    }
}

/// Start a migration; returns its id and a subscription that sees every event from the first.
/// Beyond the source host's cap on concurrent outgoing migrations it is queued.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, broadcast::Receiver<MigrationEvent>), EngineError>")]
pub struct StartMigration(pub MigrationRequest);

impl Handler<StartMigration> for Engine {
    type Result = ResponseActFuture<Self, Result<(u64, broadcast::Receiver<MigrationEvent>), EngineError>>;

    fn handle(&mut self, msg: StartMigration, ctx: &mut Self::Context) -> Self::Result {
        let req = msg.0;
        if let Err(e) = self.host(&req.source).and_then(|_| self.admit_floor(&req)) {
            return Box::pin(fut::ready(Err(e)));
        }
        self.next_id += 1;
        let id = self.next_id;
        self.admitted.insert(
            id,
            Admitted {
                host: req.source.clone(),
                priority: req.priority,
                floor: req.min_bandwidth_bytes_per_sec,
            },
        );
        let (events, rx) = broadcast::channel(EVENT_BUFFER);
        self.running.insert(
            id,
            Running {
                addr: None,
                started: false,
                source: req.source.clone(),
                vm: req.vm.clone(),
                to: req
                    .target_addr
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| req.target.clone()),
                peer: match req.target_addr {
                    Some(a) => Peer::Remote(a),
                    None => Peer::Local(req.target.clone()),
                },
                algorithm: req.algorithm.name().to_string(),
                progress: Arc::new(Progress::default()),
                events,
                waiters: Vec::new(),
            },
        );
        if self.active_from(&req.source) >= self.cap_of(&req.source) {
            self.queue.push_back(Queued { id, req });
            return Box::pin(fut::ready(Ok((id, rx))));
        }
        if let Some(r) = self.running.get_mut(&id) {
            r.started = true;
        }
        let source = req.source.clone();
        Box::pin(self.launch(id, req, ctx).map(move |r, act, ctx| match r {
            Ok(()) => Ok((id, rx)),
            Err(e) => {
                act.running.remove(&id);
                act.admitted.remove(&id);
                // Its slot is free again: a queued migration of the same host may start.
                act.launch_queued(&source, ctx);
                Err(e)
            }
        }))
    }
}

impl Engine {
    fn active_from(&self, host: &str) -> usize {
        self.running.values().filter(|r| r.source == host && r.started).count()
    }

    fn cap_of(&self, host: &str) -> usize {
        self.host_configs
            .get(host)
            .map_or(usize::MAX, |c| c.max_outgoing.max(1))
    }

    /// Starts the next queued migrations of `host` while it has free slots.
    fn launch_queued(&mut self, host: &str, ctx: &mut Context<Self>) {
        while self.active_from(host) < self.cap_of(host) {
            // The highest priority first, in arrival order within a class.
            let mine: Vec<usize> = (0..self.queue.len())
                .filter(|&i| self.queue[i].req.source == host)
                .collect();
            let Some(pick) = qos::next_in_queue(mine.iter().map(|&i| self.queue[i].req.priority)) else {
                return;
            };
            let pos = mine[pick];
            let Some(q) = self.queue.remove(pos) else { return };
            let id = q.id;
            // Mark the slot taken before the launch completes, so the loop counts it.
            if let Some(r) = self.running.get_mut(&id) {
                r.started = true;
            }
            let launch = self.launch(id, q.req, ctx);
            ctx.spawn(launch.map(move |r, act, ctx| {
                if let Err(e) = r {
                    act.fail_start(id, Outcome::Failed, e.to_string(), ctx);
                }
            }));
        }
    }

    /// Ends a migration that never ran (its launch failed, or it was cancelled in the queue):
    /// subscribers and waiters get a report all the same.
    fn fail_start(&mut self, id: u64, outcome: Outcome, error: String, ctx: &mut Context<Self>) {
        if let Some(r) = self.running.get(&id) {
            let mut report = MigrationReport::not_started(id, &r.vm, &r.source, &r.to, &r.algorithm, outcome, error);
            if let Some(a) = self.admitted.get(&id) {
                report.qos = qos::QosReport::new(a.priority, a.floor, &[]);
            }
            self.finish(report, ctx);
        }
    }

    fn finish(&mut self, report: MigrationReport, ctx: &mut Context<Self>) {
        // Its floor is free for others from here.
        self.admitted.remove(&report.id);
        if let Some(r) = self.running.remove(&report.id) {
            if let Some(host) = self.hosts.get(&r.source) {
                if report.result.succeeded() && report.vm_location == VmLocation::Target {
                    // The target verified every page and runs the VM: the source copy is gone;
                    // its host forgets the VM and its memory.
                    host.do_send(ReleaseVm(report.vm.clone()));
                } else if let Some(reason) = held_reason(report.vm_location) {
                    // Past commitment and not confirmed: never freed, never resumed by itself.
                    host.do_send(HoldVm {
                        vm: report.vm.clone(),
                        copy: HeldCopy {
                            reason,
                            detail: report.error.clone().unwrap_or_default(),
                            peer: Some(r.peer.clone()),
                        },
                    });
                }
            }
            let _ = r.events.send(MigrationEvent::Finished(Box::new(report.clone())));
            for w in r.waiters {
                let _ = w.send(report.clone());
            }
            self.launch_queued(&r.source, ctx);
        }
        self.finished.push_back(report);
        while self.finished.len() > REPORT_HISTORY {
            self.finished.pop_front();
        }
    }

    /// Takes the VM, opens the link and starts the Migration actor for `id`.
    fn launch(
        &mut self,
        id: u64,
        req: MigrationRequest,
        ctx: &mut Context<Self>,
    ) -> impl ActorFuture<Self, Output = Result<(), EngineError>> + use<> {
        let hosts = self.host(&req.source).and_then(|s| {
            let target = match req.target_addr {
                Some(_) => None,
                None => Some(self.host(&req.target)?),
            };
            Ok((s, target))
        });
        let me = ctx.address().recipient();
        let measured = Arc::clone(&self.measured);
        let budget = self.budget_member(&req);
        let (vm_id, source_name, offer) = (req.vm.clone(), req.source.clone(), req.offer.clone());
        let (target_addr, streams, bandwidth) = (req.target_addr, req.streams, req.shaping.bandwidth_bytes_per_sec);
        let shared_budget = budget.clone();
        let tls = self.host_configs.get(&req.source).and_then(|c| c.tls.clone());
        let link_key = self.host_configs.get(&req.source).and_then(|c| c.cluster_key.clone());
        let route_key = link_key.clone();
        let route_tls = tls.clone();
        let end_addr = req.target_addr;
        let prepare = async move {
            let (source, target) = hosts?;
            let vm = source.send(GetVm(vm_id.clone())).await?.ok_or(EngineError::UnknownVm {
                host: source_name,
                vm: vm_id,
            })?;
            // Taking the VM first makes a second migration of it fail here, before any link.
            ask(&vm, BeginOutgoing, "vm begin outgoing", GUEST_ASK)
                .await?
                .map_err(|e| EngineError::Vm(e.to_string()))?;
            // From here every failure hands the VM back before returning.
            let taken = async {
                let guest = ask(&vm, GetGuest, "vm guest", GUEST_ASK).await?;
                let caps = source.send(GetCapabilities).await?;
                let tcp_end = match target_addr {
                    Some(addr) => Some(
                        crate::link::tcp::connect(
                            addr,
                            streams,
                            bandwidth,
                            shared_budget,
                            tls.as_ref(),
                            link_key.as_ref(),
                        )
                        .await
                        .map_err(|e| EngineError::Link {
                            stage: "premigration".into(),
                            detail: format!("cannot connect to {addr}: {e}"),
                        })?,
                    ),
                    None => None,
                };
                Ok::<_, EngineError>((guest, caps, tcp_end))
            };
            let (guest, mut caps, tcp_end) = match taken.await {
                Ok(x) => x,
                Err(e) => {
                    vm.do_send(EndOutgoing { moved: false });
                    return Err(e);
                }
            };
            caps.algorithms.retain(|a| offer.contains(a));
            Ok::<_, EngineError>((vm, guest, caps, target, tcp_end))
        };
        prepare.into_actor(self).map(move |prepared, act, _| {
            let (vm, guest, caps, target, tcp_end) = prepared?;
            let Some(entry) = act.running.get_mut(&id) else {
                vm.do_send(EndOutgoing { moved: false });
                return Err(EngineError::UnknownMigration(id));
            };
            let events = entry.events.clone();
            let target_key = act.host_configs.get(&req.target).and_then(|c| c.cluster_key.clone());
            let source_key = act.host_configs.get(&req.source).and_then(|c| c.cluster_key.clone());
            let (source_end, route) = match (tcp_end, target, end_addr) {
                (Some(end), _, Some(addr)) => {
                    let route = Route::Tcp {
                        addr,
                        streams,
                        bandwidth,
                        budget,
                        tls: route_tls,
                        key: route_key,
                    };
                    (end, route)
                }
                (None, Some(target), _) => {
                    let params = ReceiverParams {
                        keepalive: req.keepalive,
                        step_timeout: req.step_timeout,
                        events: Some(events.clone()),
                        key: target_key,
                        faults: req.faults.for_target(),
                        recovery_timeout: req.recovery_timeout,
                        refuse_new: false,
                    };
                    let (source_end, target_end) = link::pair_with_budget(req.shaping, budget.clone());
                    target.do_send(AcceptLink {
                        end: target_end,
                        params: params.clone(),
                    });
                    if !target.connected() {
                        vm.do_send(EndOutgoing { moved: false });
                        return Err(EngineError::UnknownHost(req.target.clone()));
                    }
                    // A recovery link carries no faults: the plan fired on the first one.
                    let params = ReceiverParams {
                        faults: Default::default(),
                        ..params
                    };
                    let route = Route::InProcess {
                        target,
                        shaping: req.shaping,
                        budget,
                        params,
                    };
                    (source_end, route)
                }
                _ => {
                    vm.do_send(EndOutgoing { moved: false });
                    return Err(EngineError::UnknownHost(req.target.clone()));
                }
            };
            let setup = SourceSetup {
                id,
                req,
                vm,
                guest,
                end: source_end,
                route,
                caps,
                events,
                cancel: watch::channel(false).1,
                committed: Arc::new(AtomicBool::new(false)),
                measured,
                progress: Arc::clone(&entry.progress),
                key: source_key,
                retry_pull: false,
            };
            entry.addr = Some(Migration::new(setup, me).start());
            Ok(())
        })
    }
}

impl Handler<MigrationFinished> for Engine {
    type Result = ();
    fn handle(&mut self, msg: MigrationFinished, ctx: &mut Self::Context) {
        self.finish(*msg.0, ctx);
    }
}

/// Subscribe to a running migration's events.
#[derive(Debug, Message)]
#[rtype(result = "Result<broadcast::Receiver<MigrationEvent>, EngineError>")]
pub struct Subscribe(pub u64);

impl Handler<Subscribe> for Engine {
    type Result = Result<broadcast::Receiver<MigrationEvent>, EngineError>;
    fn handle(&mut self, msg: Subscribe, _: &mut Self::Context) -> Self::Result {
        self.running
            .get(&msg.0)
            .map(|r| r.events.subscribe())
            .ok_or(EngineError::UnknownMigration(msg.0))
    }
}

/// Cancel a migration.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Cancel(pub u64);

impl Handler<Cancel> for Engine {
    type Result = ResponseFuture<Result<(), EngineError>>;
    fn handle(&mut self, msg: Cancel, ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0;
        if let Some(pos) = self.queue.iter().position(|q| q.id == id) {
            self.queue.remove(pos);
            self.fail_start(id, Outcome::Cancelled, "cancelled while queued".into(), ctx);
            return Box::pin(async { Ok(()) });
        }
        let addr = self.running.get(&id).map(|r| r.addr.clone());
        let finished = self.finished.iter().any(|r| r.id == id);
        Box::pin(async move {
            match addr {
                Some(Some(a)) => a.send(CancelMigration).await?,
                // Launching: the link is being opened; the caller may retry in a moment.
                Some(None) => Err(EngineError::Internal(format!(
                    "migration {id} is starting; retry the cancel"
                ))),
                None if finished => Err(EngineError::TooLateToCancel(id)),
                None => Err(EngineError::UnknownMigration(id)),
            }
        })
    }
}

/// Status of one migration (queued, running, or among the last finished).
#[derive(Debug, Message)]
#[rtype(result = "Result<MigrationStatus, EngineError>")]
pub struct GetStatus(pub u64);

impl Handler<GetStatus> for Engine {
    type Result = Result<MigrationStatus, EngineError>;
    fn handle(&mut self, msg: GetStatus, _: &mut Self::Context) -> Self::Result {
        self.status_of(msg.0).ok_or(EngineError::UnknownMigration(msg.0))
    }
}

/// Status of every queued, running and remembered migration, by id.
#[derive(Debug, Message)]
#[rtype(result = "Vec<MigrationStatus>")]
pub struct ListStatus;

impl Handler<ListStatus> for Engine {
    type Result = MessageResult<ListStatus>;
    fn handle(&mut self, _: ListStatus, _: &mut Self::Context) -> Self::Result {
        let mut ids: Vec<u64> = self.running.keys().copied().collect();
        ids.extend(self.finished.iter().map(|r| r.id));
        ids.sort_unstable();
        ids.dedup();
        MessageResult(ids.into_iter().filter_map(|id| self.status_of(id)).collect())
    }
}

impl Engine {
    fn status_of(&self, id: u64) -> Option<MigrationStatus> {
        if let Some(r) = self.running.get(&id) {
            let phase = if r.started { Phase::Active } else { Phase::Queued };
            return Some(MigrationStatus::live(
                id,
                &r.vm,
                &r.to,
                &r.algorithm,
                phase,
                &r.progress,
            ));
        }
        self.finished
            .iter()
            .rev()
            .find(|r| r.id == id)
            .map(MigrationStatus::ended)
    }
}

/// The report of a migration: at once if it finished, when it finishes otherwise.
#[derive(Debug, Message)]
#[rtype(result = "Result<oneshot::Receiver<MigrationReport>, EngineError>")]
pub struct WaitReport(pub u64);

impl Handler<WaitReport> for Engine {
    type Result = Result<oneshot::Receiver<MigrationReport>, EngineError>;
    fn handle(&mut self, msg: WaitReport, _: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if let Some(r) = self.finished.iter().rev().find(|r| r.id == msg.0) {
            let _ = tx.send(r.clone());
        } else if let Some(run) = self.running.get_mut(&msg.0) {
            run.waiters.push(tx);
        } else {
            return Err(EngineError::UnknownMigration(msg.0));
        }
        Ok(rx)
    }
}

/// Delete a VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct DeleteVmIn {
    /// Host name.
    pub host: String,
    /// VM id.
    pub vm: String,
}

impl Handler<DeleteVmIn> for Engine {
    type Result = ResponseFuture<Result<(), EngineError>>;
    fn handle(&mut self, msg: DeleteVmIn, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.host);
        Box::pin(async move { host?.send(DeleteVm(msg.vm)).await? })
    }
}

/// Start a shutdown: every host refuses new incoming migrations and aborts those not yet
/// committed (their VM stays on its source). Outgoing migrations, queued or running, go on:
/// each one moves a VM off this engine. Returns the ids of migrations still queued or running.
#[derive(Debug, Message)]
#[rtype(result = "Vec<u64>")]
pub struct BeginShutdown;

impl Handler<BeginShutdown> for Engine {
    type Result = MessageResult<BeginShutdown>;
    fn handle(&mut self, _: BeginShutdown, _: &mut Self::Context) -> Self::Result {
        for host in self.hosts.values() {
            host.do_send(CloseIncoming);
            host.do_send(AbortAllIncoming);
        }
        MessageResult(self.running.keys().copied().collect())
    }
}

/// What a failed outgoing migration leaves on its source, from where the VM ended up. `None`:
/// the source copy runs again (before commitment) and nothing is held.
fn held_reason(location: VmLocation) -> Option<HeldReason> {
    match location {
        VmLocation::Source => None,
        VmLocation::Target => Some(HeldReason::Unverified),
        VmLocation::TargetAwaitingPages => Some(HeldReason::Stale),
        VmLocation::Undetermined => Some(HeldReason::CommittedUnconfirmed),
    }
}
