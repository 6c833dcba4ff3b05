//! The Host actor: one per host; owns its backend, its VMs, admission and incoming links.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;

mod held_copies;

pub use held_copies::{
    CheckResumable, DiscardVm, GetHeld, HoldVm, QueryVmState, RecordCommitted, ResumeHeldVm, TakeForRecovery, UnholdVm,
};

use super::ask::{ask, BACKEND_ASK};
use super::error::EngineError;
use super::receiver::{
    AbortIncoming, FindRecoverable, GetVmStatus, Handover, HoldIncoming, HostPort, IncomingCommitted, IncomingEnded,
    Receiver, ReceiverParams, RegisterRecoverable, ReleaseIncoming, ReserveIncoming, UnholdIncoming,
    UnregisterRecoverable,
};
use super::request::HostConfig;
use crate::format::{MacAddr, NicConfig, VmConfig, VmId};
use crate::link::{tcp, Keepalive, LinkEnd};
use crate::protocol::{AbortReason, Capabilities};
use crate::units::PAGE_SIZE;
use crate::vm::{GetVmInfo, HeldCopy, Lifecycle, StopVm, Vm, VmInfo};
use crate::vmm::{Backend, CreateVm, Guest, HypervisorCapabilities, ReserveVm, WorkloadSpec};

/// Incoming links allowed to wait for a slot; more are closed at once.
const MAX_QUEUED_INCOMING: usize = 16;

/// A host: its backend, VMs, memory budget and capabilities.
#[derive(Debug)]
pub struct Host {
    config: HostConfig,
    backend: Addr<Backend>,
    /// What the backend can do, asked once (kvm probes userfaultfd to answer).
    backend_caps: HypervisorCapabilities,
    backend_arbiter: Arbiter,
    vms: HashMap<String, (Addr<Vm>, u64)>,
    committed_bytes: u64,
    listener: Option<tokio::net::TcpListener>,
    rejected: Arc<AtomicU64>,
    receivers: Vec<Addr<Receiver>>,
    incoming_queue: std::collections::VecDeque<(Addr<Receiver>, tokio::sync::oneshot::Sender<()>)>,
    /// Post-copy migrations in their pull phase, by VM: where a recovery link is handed.
    recoverable: HashMap<String, tokio::sync::mpsc::Sender<Handover>>,
    /// Copies left behind by a migration that failed past commitment (see [`crate::vm::HeldCopy`]).
    held: HashMap<String, HeldCopy>,
    /// Set at shutdown: incoming links are refused.
    closing: bool,
    /// VMs this host took past `Commit`, newest last (bounded): a fence that asks about one
    /// that has since left must not hear `absent`, or a stale copy elsewhere could resume.
    committed_here: std::collections::VecDeque<String>,
}

/// How many VMs a host remembers having taken past `Commit`.
const COMMITTED_MEMORY: usize = 4096;

impl Host {
    /// A host; its backend runs on its own arbiter thread so that filling or mapping guest
    /// memory never blocks the engine's actors.
    pub fn new(config: HostConfig, listener: Option<tokio::net::TcpListener>) -> Self {
        let backend_arbiter = Arbiter::new();
        let hypervisor = config.backend.hypervisor();
        let backend_caps = hypervisor.capabilities();
        let backend = Backend::start_in_arbiter(&backend_arbiter.handle(), move |_| Backend::new(hypervisor));
        Self {
            config,
            backend,
            backend_caps,
            backend_arbiter,
            vms: HashMap::new(),
            committed_bytes: 0,
            listener,
            rejected: Arc::new(AtomicU64::new(0)),
            receivers: Vec::new(),
            incoming_queue: std::collections::VecDeque::new(),
            recoverable: HashMap::new(),
            held: HashMap::new(),
            closing: false,
            committed_here: std::collections::VecDeque::new(),
        }
    }

    /// What this host offers a peer: the algorithms both its configuration and its backend
    /// allow (a backend that cannot post-copy takes post-copy off, so negotiation refuses it),
    /// in the backend's layouts.
    fn capabilities(&self) -> Capabilities {
        let algorithms = self.config.algorithms.iter().copied();
        Capabilities {
            algorithms: algorithms.filter(|a| self.backend_caps.offers(*a)).collect(),
            format_versions: self.config.format_versions.clone(),
            compression: self.config.compression.clone(),
            ..Capabilities::full(self.backend_caps.layouts.clone())
        }
    }

    /// Receivers still at work: each held `awaiting-pages` copy has one that only waits.
    fn active_incoming(&self) -> usize {
        let running = self.receivers.iter().filter(|r| r.connected()).count()
            + self.incoming_queue.iter().filter(|(r, _)| r.connected()).count();
        let waiting = self
            .held
            .values()
            .filter(|h| h.reason == crate::vm::HeldReason::AwaitingPages)
            .count();
        running.saturating_sub(waiting)
    }

    fn free_bytes(&self) -> u64 {
        self.config.memory_budget_bytes.saturating_sub(self.committed_bytes)
    }
}

impl Actor for Host {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(listener) = self.listener.take() {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let key = self.config.cluster_key.clone();
            let tls = self.config.tls.clone();
            let options = tcp::ServeOptions {
                tls,
                key: key.clone(),
                allowed_peers: self.config.allowed_peers.clone(),
                ..Default::default()
            };
            ctx.spawn(tcp::serve(listener, tx, Arc::clone(&self.rejected), options).into_actor(self));
            let me = ctx.address();
            ctx.spawn(
                async move {
                    while let Some(end) = rx.recv().await {
                        me.do_send(AcceptLink {
                            end,
                            params: ReceiverParams {
                                keepalive: Keepalive::default(),
                                step_timeout: std::time::Duration::from_secs(60),
                                events: None,
                                key: key.clone(),
                                faults: Default::default(),
                                recovery_timeout: super::request::DEFAULT_RECOVERY_TIMEOUT,
                                refuse_new: false,
                            },
                        });
                    }
                }
                .into_actor(self),
            );
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for (vm, _) in self.vms.values() {
            vm.do_send(StopVm);
        }
        self.backend_arbiter.stop();
    }
}

/// Create and start a VM on this host.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, EngineError>")]
pub struct CreateVmOnHost {
    /// VM id.
    pub id: String,
    /// RAM in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// NICs.
    pub nics: u32,
    /// Writer workload.
    pub workload: WorkloadSpec,
}

impl Handler<CreateVmOnHost> for Host {
    type Result = ResponseActFuture<Self, Result<VmInfo, EngineError>>;

    fn handle(&mut self, msg: CreateVmOnHost, _: &mut Self::Context) -> Self::Result {
        let config = VmConfig {
            id: VmId(msg.id.clone()),
            name: msg.id.clone(),
            vcpus: msg.vcpus,
            memory_bytes: msg.memory_bytes,
            page_size: PAGE_SIZE as u32,
            nics: (0..msg.nics)
                .map(|i| NicConfig {
                    id: format!("net{i}"),
                    mac: MacAddr::local_from_seed(seed_of(&msg.id) ^ u64::from(i)),
                })
                .collect(),
        };
        let checked = config
            .validate()
            .map_err(EngineError::from)
            .and_then(|_| self.admit(&config.id.0, config.memory_bytes));
        if let Err(e) = checked {
            return Box::pin(fut::ready(Err(e)));
        }
        let bytes = config.memory_bytes;
        let id = msg.id;
        self.committed_bytes += bytes;
        let backend = self.backend.clone();
        let create_vm = CreateVm {
            config,
            workload: msg.workload,
        };
        let create = async move { ask(&backend, create_vm, "vm create", BACKEND_ASK).await };
        Box::pin(create.into_actor(self).map(move |res, act, _| {
            let guest = match res {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => {
                    act.committed_bytes -= bytes;
                    return Err(EngineError::Vm(e.to_string()));
                }
                Err(e) => {
                    act.committed_bytes -= bytes;
                    return Err(e.into());
                }
            };
            let info = VmInfo {
                config: guest.config().clone(),
                state: Lifecycle::Running,
                layout: guest.layout(),
                stats: guest.stats(),
                held: None,
            };
            let vm = Vm::new(guest, Lifecycle::Running).start();
            act.vms.insert(id, (vm, bytes));
            Ok(info)
        }))
    }
}

impl Host {
    fn admit(&self, id: &str, bytes: u64) -> Result<(), EngineError> {
        if self.vms.contains_key(id) {
            return Err(EngineError::DuplicateVm(id.to_string()));
        }
        if bytes > self.free_bytes() {
            return Err(EngineError::InsufficientMemory {
                host: self.config.name.clone(),
                requested_bytes: bytes,
                available_bytes: self.free_bytes(),
            });
        }
        Ok(())
    }
}

fn seed_of(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(s.as_bytes())
}

/// The VM actor of a VM on this host.
#[derive(Debug, Message)]
#[rtype(result = "Option<Addr<Vm>>")]
pub struct GetVm(pub String);

impl Handler<GetVm> for Host {
    type Result = Option<Addr<Vm>>;
    fn handle(&mut self, msg: GetVm, _: &mut Self::Context) -> Self::Result {
        self.vms.get(&msg.0).map(|(a, _)| a.clone())
    }
}

/// Describe every VM on this host.
#[derive(Debug, Message)]
#[rtype(result = "Vec<VmInfo>")]
pub struct ListVms;

impl Handler<ListVms> for Host {
    type Result = ResponseFuture<Vec<VmInfo>>;
    fn handle(&mut self, _: ListVms, _: &mut Self::Context) -> Self::Result {
        let vms: Vec<(Addr<Vm>, Option<HeldCopy>)> = self
            .vms
            .iter()
            .map(|(id, (a, _))| (a.clone(), self.held.get(id).cloned()))
            .collect();
        Box::pin(async move {
            let mut out = Vec::with_capacity(vms.len());
            for (vm, held) in vms {
                if let Ok(mut info) = vm.send(GetVmInfo).await {
                    info.held = held;
                    out.push(info);
                }
            }
            out.sort_by(|a, b| a.config.id.0.cmp(&b.config.id.0));
            out
        })
    }
}

/// Memory and VM counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    /// Bytes held by VMs and reservations.
    pub committed_bytes: u64,
    /// VMs and reservations.
    pub vms: usize,
    /// TCP connections refused before they became a link (bad preamble, too slow).
    pub rejected_connections: u64,
    /// Incoming migrations waiting for a slot under the cap.
    pub queued_incoming: usize,
    /// Incoming migrations running (queued ones included), not counting targets whose copy is
    /// held waiting for a recovery link: a shutdown waits for these.
    pub active_incoming: usize,
    /// Copies held for an operator action.
    pub held: usize,
}

/// How much of the host is in use.
#[derive(Debug, Message)]
#[rtype(result = "HostUsage")]
pub struct GetHostUsage;

impl Handler<GetHostUsage> for Host {
    type Result = MessageResult<GetHostUsage>;
    fn handle(&mut self, _: GetHostUsage, _: &mut Self::Context) -> Self::Result {
        MessageResult(HostUsage {
            committed_bytes: self.committed_bytes,
            vms: self.vms.len(),
            rejected_connections: self.rejected.load(Ordering::Relaxed),
            queued_incoming: self.incoming_queue.iter().filter(|(r, _)| r.connected()).count(),
            active_incoming: self.active_incoming(),
            held: self.held.len(),
        })
    }
}

impl Handler<ReserveIncoming> for Host {
    type Result = ResponseActFuture<Self, Result<(Addr<Vm>, Arc<dyn Guest>), AbortReason>>;

    fn handle(&mut self, msg: ReserveIncoming, _: &mut Self::Context) -> Self::Result {
        let ReserveIncoming {
            config,
            commit,
            decorate,
        } = msg;
        let bytes = config.memory_bytes;
        let id = config.id.0.clone();
        let admitted = config
            .validate()
            .map_err(|e| AbortReason::ReservationFailed { detail: e.to_string() })
            .and_then(|_| {
                self.admit(&id, bytes).map_err(|e| match e {
                    EngineError::InsufficientMemory {
                        requested_bytes,
                        available_bytes,
                        ..
                    } => AbortReason::InsufficientMemory {
                        requested_bytes,
                        available_bytes,
                    },
                    other => AbortReason::ReservationFailed {
                        detail: other.to_string(),
                    },
                })
            });
        if let Err(e) = admitted {
            return Box::pin(fut::ready(Err(e)));
        }
        self.committed_bytes += bytes;
        let backend = self.backend.clone();
        let reserve = async move { ask(&backend, ReserveVm { config, commit }, "vm reserve", BACKEND_ASK).await };
        Box::pin(reserve.into_actor(self).map(move |res, act, _| {
            let guest = match res {
                Ok(Ok(g)) => g,
                other => {
                    act.committed_bytes -= bytes;
                    let detail = match other {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    return Err(AbortReason::ReservationFailed { detail });
                }
            };
            let guest = match decorate {
                Some(wrap) => wrap(guest),
                None => guest,
            };
            let vm = Vm::new(Arc::clone(&guest), Lifecycle::Incoming).start();
            act.vms.insert(id, (vm.clone(), bytes));
            Ok((vm, guest))
        }))
    }
}

/// Forget a VM: an incoming reservation released, or a VM that moved away. Stops its actor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReleaseVm(pub String);

impl Handler<ReleaseVm> for Host {
    type Result = ();
    fn handle(&mut self, msg: ReleaseVm, _: &mut Self::Context) {
        if let Some((vm, bytes)) = self.vms.remove(&msg.0) {
            self.committed_bytes -= bytes;
            vm.do_send(StopVm);
        }
        self.held.remove(&msg.0);
        self.recoverable.remove(&msg.0);
    }
}

/// A link from a peer arrives: start a Receiver for it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AcceptLink {
    /// This host's end of the link.
    pub end: LinkEnd,
    /// How the receiver behaves.
    pub params: ReceiverParams,
}

impl Handler<AcceptLink> for Host {
    type Result = ();
    fn handle(&mut self, mut msg: AcceptLink, ctx: &mut Self::Context) {
        msg.params.refuse_new = self.closing;
        self.receivers.retain(|r| r.connected());
        let receiver = Receiver::new(
            self.config.name.clone(),
            HostPort::of(ctx.address()),
            self.capabilities(),
            msg.end,
            msg.params,
            self.config.announce_via.clone(),
        );
        if self.receivers.len() >= self.config.max_incoming.max(1) {
            self.incoming_queue.retain(|(r, _)| r.connected());
            if self.incoming_queue.len() >= MAX_QUEUED_INCOMING {
                // Dropping the end closes its connections: the source sees the link close.
                return;
            }
            // Over the cap: the receiver answers pings but holds the source's Hello until a
            // slot frees (or its wait bound passes).
            let (slot, wait) = tokio::sync::oneshot::channel();
            let r = receiver.queued(wait).start();
            self.incoming_queue.push_back((r, slot));
            return;
        }
        self.receivers.push(receiver.start());
    }
}

impl Handler<IncomingEnded> for Host {
    type Result = ();
    fn handle(&mut self, _: IncomingEnded, _: &mut Self::Context) {
        self.receivers.retain(|r| r.connected());
        self.incoming_queue.retain(|(r, _)| r.connected());
        while self.receivers.len() < self.config.max_incoming.max(1) {
            let Some((r, slot)) = self.incoming_queue.pop_front() else {
                break;
            };
            if r.connected() && slot.send(()).is_ok() {
                self.receivers.push(r);
            }
        }
    }
}

/// Abort every incoming migration that is not past commitment (shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AbortAllIncoming;

impl Handler<AbortAllIncoming> for Host {
    type Result = ();
    fn handle(&mut self, _: AbortAllIncoming, _: &mut Self::Context) {
        for r in self.receivers.iter().chain(self.incoming_queue.iter().map(|(r, _)| r)) {
            r.do_send(AbortIncoming);
        }
    }
}

/// Delete a VM that is not being migrated.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct DeleteVm(pub String);

impl Handler<DeleteVm> for Host {
    type Result = ResponseActFuture<Self, Result<(), EngineError>>;
    fn handle(&mut self, msg: DeleteVm, _: &mut Self::Context) -> Self::Result {
        if let Some(h) = self.held.get(&msg.0) {
            let err = EngineError::ActionNotApplicable {
                vm: msg.0,
                state: h.reason.name().to_string(),
                action: "delete",
                hint: "; a held copy ends by discard (or the other actions it lists)".into(),
            };
            return Box::pin(fut::ready(Err(err)));
        }
        let Some((vm, _)) = self.vms.get(&msg.0).cloned() else {
            let err = EngineError::UnknownVm {
                host: self.config.name.clone(),
                vm: msg.0,
            };
            return Box::pin(fut::ready(Err(err)));
        };
        let id = msg.0;
        Box::pin(vm.send(GetVmInfo).into_actor(self).map(move |info, act, _| {
            let info = info?;
            if matches!(info.state, Lifecycle::Outgoing { .. } | Lifecycle::Incoming) {
                return Err(EngineError::Vm(format!(
                    "VM {id:?} is {}: cancel its migration first",
                    info.state
                )));
            }
            if let Some((vm, bytes)) = act.vms.remove(&id) {
                act.committed_bytes -= bytes;
                vm.do_send(StopVm);
            }
            Ok(())
        }))
    }
}

/// The name of this host's backend (`sim`, `kvm`, or an embedder's).
#[derive(Debug, Message)]
#[rtype(result = "String")]
pub struct GetBackendName;

impl Handler<GetBackendName> for Host {
    type Result = MessageResult<GetBackendName>;
    fn handle(&mut self, _: GetBackendName, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.config.backend.name().to_string())
    }
}

/// This host's capabilities.
#[derive(Debug, Message)]
#[rtype(result = "Capabilities")]
pub struct GetCapabilities;

impl Handler<GetCapabilities> for Host {
    type Result = MessageResult<GetCapabilities>;
    fn handle(&mut self, _: GetCapabilities, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.capabilities())
    }
}

impl Handler<RegisterRecoverable> for Host {
    type Result = ();
    fn handle(&mut self, msg: RegisterRecoverable, _: &mut Self::Context) {
        self.recoverable.insert(msg.vm, msg.to);
    }
}

impl Handler<FindRecoverable> for Host {
    type Result = Option<tokio::sync::mpsc::Sender<Handover>>;
    fn handle(&mut self, msg: FindRecoverable, _: &mut Self::Context) -> Self::Result {
        self.recoverable.get(&msg.0).filter(|tx| !tx.is_closed()).cloned()
    }
}

impl Handler<UnregisterRecoverable> for Host {
    type Result = ();
    fn handle(&mut self, msg: UnregisterRecoverable, _: &mut Self::Context) {
        self.recoverable.remove(&msg.0);
    }
}

// A receiver's requests about the copy it builds: the same as the host's own messages, which
// the receiver cannot name (it never imports this module).

impl Handler<ReleaseIncoming> for Host {
    type Result = ();
    fn handle(&mut self, msg: ReleaseIncoming, ctx: &mut Self::Context) {
        Handler::<ReleaseVm>::handle(self, ReleaseVm(msg.0), ctx);
    }
}

impl Handler<HoldIncoming> for Host {
    type Result = ();
    fn handle(&mut self, msg: HoldIncoming, ctx: &mut Self::Context) {
        let HoldIncoming { vm, copy } = msg;
        Handler::<HoldVm>::handle(self, HoldVm { vm, copy }, ctx);
    }
}

impl Handler<UnholdIncoming> for Host {
    type Result = ();
    fn handle(&mut self, msg: UnholdIncoming, ctx: &mut Self::Context) {
        Handler::<UnholdVm>::handle(self, UnholdVm(msg.0), ctx);
    }
}

impl Handler<IncomingCommitted> for Host {
    type Result = ();
    fn handle(&mut self, msg: IncomingCommitted, ctx: &mut Self::Context) {
        Handler::<RecordCommitted>::handle(self, RecordCommitted(msg.0), ctx);
    }
}

impl Handler<GetVmStatus> for Host {
    type Result = ResponseFuture<String>;
    fn handle(&mut self, msg: GetVmStatus, ctx: &mut Self::Context) -> Self::Result {
        Handler::<QueryVmState>::handle(self, QueryVmState(msg.0), ctx)
    }
}

/// Stop taking incoming migrations (shutdown); links that arrive from now on are refused.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CloseIncoming;

impl Handler<CloseIncoming> for Host {
    type Result = ();
    fn handle(&mut self, _: CloseIncoming, _: &mut Self::Context) {
        self.closing = true;
    }
}
