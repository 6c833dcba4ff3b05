//! The Engine actor: the registry of hosts and migrations behind [`super::EngineHandle`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::sync::{broadcast, oneshot, watch};

use super::error::EngineError;
use super::events::MigrationEvent;
use super::host::{
    AcceptLink, CreateVmOnHost, GetCapabilities, GetHostUsage, GetVm, Host, HostUsage, ListVms, ReleaseVm,
};
use super::migration::{CancelMigration, Migration, MigrationFinished};
use super::receiver::ReceiverParams;
use super::report::{MigrationReport, VmLocation};
use super::request::{HostConfig, MigrationRequest, VmSpec};
use super::source::{Measured, SourceSetup};
use crate::link;
use crate::vm::{BeginOutgoing, EndOutgoing, GetGuest, VmInfo};

/// Finished reports kept for queries; older ones are dropped so a long-running service stays
/// flat in memory.
const REPORT_HISTORY: usize = 1024;
/// Events buffered per subscriber before it lags.
const EVENT_BUFFER: usize = 1024;

#[derive(Debug)]
struct Running {
    addr: Addr<Migration>,
    source: Addr<Host>,
    events: broadcast::Sender<MigrationEvent>,
    waiters: Vec<oneshot::Sender<MigrationReport>>,
}

/// Registry of hosts and migrations.
#[derive(Debug, Default)]
pub struct Engine {
    hosts: HashMap<String, Addr<Host>>,
    addresses: HashMap<String, std::net::SocketAddr>,
    running: HashMap<u64, Running>,
    finished: VecDeque<MigrationReport>,
    next_id: u64,
    measured: Arc<Mutex<Measured>>,
}

impl Actor for Engine {
    type Context = Context<Self>;
}

impl Engine {
    fn host(&self, name: &str) -> Result<Addr<Host>, EngineError> {
        self.hosts
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownHost(name.to_string()))
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
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, broadcast::Receiver<MigrationEvent>), EngineError>")]
pub struct StartMigration(pub MigrationRequest);

impl Handler<StartMigration> for Engine {
    type Result = ResponseActFuture<Self, Result<(u64, broadcast::Receiver<MigrationEvent>), EngineError>>;

    fn handle(&mut self, msg: StartMigration, ctx: &mut Self::Context) -> Self::Result {
        let req = msg.0;
        let hosts = self.host(&req.source).and_then(|s| {
            let target = match req.target_addr {
                Some(_) => None,
                None => Some(self.host(&req.target)?),
            };
            Ok((s, target))
        });
        self.next_id += 1;
        let id = self.next_id;
        let me = ctx.address().recipient();
        let measured = Arc::clone(&self.measured);
        let (vm_id, source_name, offer) = (req.vm.clone(), req.source.clone(), req.offer.clone());
        let (target_addr, streams, bandwidth) = (req.target_addr, req.streams, req.shaping.bandwidth_bytes_per_sec);
        let prepare = async move {
            let (source, target) = hosts?;
            let vm = source.send(GetVm(vm_id.clone())).await?.ok_or(EngineError::UnknownVm {
                host: source_name,
                vm: vm_id,
            })?;
            // Taking the VM first makes a second migration of it fail here, before any link.
            vm.send(BeginOutgoing)
                .await?
                .map_err(|e| EngineError::Vm(e.to_string()))?;
            // From here every failure hands the VM back before returning.
            let taken = async {
                let guest = vm.send(GetGuest).await?;
                let caps = source.send(GetCapabilities).await?;
                let tcp_end = match target_addr {
                    Some(addr) => Some(crate::link::tcp::connect(addr, streams, bandwidth).await.map_err(|e| {
                        EngineError::Link {
                            stage: "premigration".into(),
                            detail: format!("cannot connect to {addr}: {e}"),
                        }
                    })?),
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
            Ok::<_, EngineError>((vm, guest, caps, source, target, tcp_end))
        };
        Box::pin(prepare.into_actor(self).map(move |prepared, act, _| {
            let (vm, guest, caps, source, target, tcp_end) = prepared?;
            let (events, rx) = broadcast::channel(EVENT_BUFFER);
            let source_end = match (tcp_end, target) {
                (Some(end), _) => end,
                (None, Some(target)) => {
                    let (source_end, target_end) = link::pair(req.shaping);
                    target.do_send(AcceptLink {
                        end: target_end,
                        params: ReceiverParams {
                            keepalive: req.keepalive,
                            step_timeout: req.step_timeout,
                            events: Some(events.clone()),
                        },
                    });
                    if !target.connected() {
                        vm.do_send(EndOutgoing { moved: false });
                        return Err(EngineError::UnknownHost(req.target.clone()));
                    }
                    source_end
                }
                (None, None) => {
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
                caps,
                events: events.clone(),
                cancel: watch::channel(false).1,
                committed: Arc::new(AtomicBool::new(false)),
                measured,
            };
            let addr = Migration::new(setup, me).start();
            act.running.insert(
                id,
                Running {
                    addr,
                    source,
                    events,
                    waiters: Vec::new(),
                },
            );
            Ok((id, rx))
        }))
    }
}

impl Handler<MigrationFinished> for Engine {
    type Result = ();
    fn handle(&mut self, msg: MigrationFinished, _: &mut Self::Context) {
        let report = *msg.0;
        if let Some(r) = self.running.remove(&report.id) {
            if report.vm_location == VmLocation::Target {
                // The source copy is gone; its host forgets the VM and its memory.
                r.source.do_send(ReleaseVm(report.vm.clone()));
            }
            let _ = r.events.send(MigrationEvent::Finished(Box::new(report.clone())));
            for w in r.waiters {
                let _ = w.send(report.clone());
            }
        }
        self.finished.push_back(report);
        while self.finished.len() > REPORT_HISTORY {
            self.finished.pop_front();
        }
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
    fn handle(&mut self, msg: Cancel, _: &mut Self::Context) -> Self::Result {
        let addr = self.running.get(&msg.0).map(|r| r.addr.clone());
        let finished = self.finished.iter().any(|r| r.id == msg.0);
        Box::pin(async move {
            match addr {
                Some(a) => a.send(CancelMigration).await?,
                None if finished => Err(EngineError::TooLateToCancel(msg.0)),
                None => Err(EngineError::UnknownMigration(msg.0)),
            }
        })
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
