//! The operator's actions on copies held after a migration failed past commitment: a fenced
//! resume, a recovery run, a discard. Messages to the Engine actor (`registry.rs`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{broadcast, watch};

use super::error::EngineError;
use super::events::MigrationEvent;
use super::host::{CheckResumable, DiscardVm, GetCapabilities, HoldVm, ResumeHeldVm, TakeForRecovery};
use super::migration::Migration;
use super::progress::Progress;
use super::receiver::ReceiverParams;
use super::registry::{Engine, Running, EVENT_BUFFER};
use super::request::MigrationRequest;
use super::route::Route;
use super::source::SourceSetup;
use crate::link;
use crate::vm::{GetGuest, Peer, VmInfo};

/// Operator action `resume` on a held copy, fenced: the peer is asked first.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, EngineError>")]
pub struct ResumeHeld {
    /// Host holding the copy.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// Resume even when the peer cannot be asked: the operator knows it is dead.
    pub peer_is_dead: bool,
}

impl Handler<ResumeHeld> for Engine {
    type Result = ResponseFuture<Result<VmInfo, EngineError>>;
    fn handle(&mut self, msg: ResumeHeld, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.host);
        let hosts = self.hosts.clone();
        let tls = self.host_configs.get(&msg.host).and_then(|c| c.tls.clone());
        let key = self.host_configs.get(&msg.host).and_then(|c| c.cluster_key.clone());
        Box::pin(async move {
            let host = host?;
            let held = host.send(CheckResumable(msg.vm.clone())).await??;
            let Some(peer) = held.peer else {
                if msg.peer_is_dead {
                    tracing::warn!(vm = %msg.vm, "resuming a held copy with no peer recorded: the operator says the peer is dead");
                    return host.send(ResumeHeldVm(msg.vm)).await?;
                }
                return Err(EngineError::Fenced {
                    vm: msg.vm,
                    detail: "no peer is recorded for this copy; if the other side is dead, resume with --peer-is-dead"
                        .into(),
                });
            };
            let local = match &peer {
                Peer::Local(name) => hosts.get(name).cloned(),
                Peer::Remote(_) => None,
            };
            match super::fence::ask_peer(&peer, &msg.vm, local, tls.as_ref(), key.as_ref()).await {
                Ok(state) if state == super::fence::ABSENT => {}
                Ok(state) => {
                    return Err(EngineError::Fenced {
                        vm: msg.vm,
                        detail: format!("{peer} holds it ({state}); discard this copy instead"),
                    })
                }
                Err(why) if msg.peer_is_dead => {
                    tracing::warn!(vm = %msg.vm, %peer, why, "resuming a held copy: the operator says the peer is dead");
                }
                Err(why) => {
                    return Err(EngineError::Fenced {
                        vm: msg.vm,
                        detail: format!("{why}; if {peer} is dead, resume with --peer-is-dead"),
                    })
                }
            }
            host.send(ResumeHeldVm(msg.vm)).await?
        })
    }
}

/// Operator action `recover` on a held post-copy source copy (`stale`): reconnect to the
/// target (or `to`, a restarted one) and carry the pull on. Returns the new migration's id.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, broadcast::Receiver<MigrationEvent>), EngineError>")]
pub struct RecoverHeld {
    /// Host holding the copy.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// Where the target now listens, if not where it did.
    pub to: Option<std::net::SocketAddr>,
    /// How long to keep reconnecting.
    pub recovery_timeout: std::time::Duration,
}

impl Handler<RecoverHeld> for Engine {
    type Result = ResponseActFuture<Self, Result<(u64, broadcast::Receiver<MigrationEvent>), EngineError>>;
    fn handle(&mut self, msg: RecoverHeld, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.host);
        Box::pin(
            async move {
                let host = host?;
                let (held, vm) = host.send(TakeForRecovery(msg.vm.clone())).await??;
                let guest = vm.send(GetGuest).await;
                let caps = host.send(GetCapabilities).await;
                Ok::<_, EngineError>((msg, held, vm, guest, caps))
            }
            .into_actor(self)
            .map(|r, act, ctx| {
                let (msg, held, vm, guest, caps) = r?;
                let hold_again = |act: &Engine, e: EngineError| {
                    if let Some(h) = act.hosts.get(&msg.host) {
                        h.do_send(HoldVm {
                            vm: msg.vm.clone(),
                            copy: held.clone(),
                        });
                    }
                    Err(e)
                };
                let (guest, caps) = match (guest, caps) {
                    (Ok(g), Ok(c)) => (g, c),
                    (Err(e), _) | (_, Err(e)) => return hold_again(act, e.into()),
                };
                let peer = match (msg.to, &held.peer) {
                    (Some(addr), _) => Peer::Remote(addr),
                    (None, Some(p)) => p.clone(),
                    (None, None) => {
                        return hold_again(
                            act,
                            EngineError::Fenced {
                                vm: msg.vm.clone(),
                                detail: "no peer is recorded for this copy: give --to".into(),
                            },
                        )
                    }
                };
                let mut req = MigrationRequest::new(msg.vm.clone(), msg.host.clone(), peer.to_string())
                    .algorithm(crate::protocol::Algorithm::Postcopy);
                req.recovery_timeout = msg.recovery_timeout;
                let route = match &peer {
                    Peer::Remote(addr) => {
                        req.target_addr = Some(*addr);
                        Route::Tcp {
                            addr: *addr,
                            streams: 1,
                            bandwidth: None,
                            budget: act.budget_member(&req),
                            tls: act.host_configs.get(&msg.host).and_then(|c| c.tls.clone()),
                            key: act.host_configs.get(&msg.host).and_then(|c| c.cluster_key.clone()),
                        }
                    }
                    Peer::Local(name) => match act.hosts.get(name) {
                        Some(target) => {
                            req.target = name.clone();
                            Route::InProcess {
                                target: target.clone(),
                                shaping: req.shaping,
                                budget: None,
                                params: ReceiverParams {
                                    keepalive: req.keepalive,
                                    step_timeout: req.step_timeout,
                                    events: None,
                                    key: act.host_configs.get(name).and_then(|c| c.cluster_key.clone()),
                                    faults: Default::default(),
                                    recovery_timeout: req.recovery_timeout,
                                    refuse_new: false,
                                },
                            }
                        }
                        None => return hold_again(act, EngineError::UnknownHost(name.clone())),
                    },
                };
                act.next_id += 1;
                let id = act.next_id;
                let (events, rx) = broadcast::channel(EVENT_BUFFER);
                let progress = Arc::new(Progress::default());
                // No link yet: the first thing the run does is open the recovery link, which
                // replaces this unused in-process end.
                let (placeholder, _) = link::pair(link::Shaping::default());
                let setup = SourceSetup {
                    id,
                    vm,
                    guest,
                    end: placeholder,
                    route,
                    caps,
                    events: events.clone(),
                    cancel: watch::channel(false).1,
                    committed: Arc::new(AtomicBool::new(true)),
                    measured: Arc::clone(&act.measured),
                    progress: Arc::clone(&progress),
                    key: act.host_configs.get(&msg.host).and_then(|c| c.cluster_key.clone()),
                    retry_pull: true,
                    req: req.clone(),
                };
                act.running.insert(
                    id,
                    Running {
                        addr: Some(Migration::new(setup, ctx.address().recipient()).start()),
                        started: true,
                        source: msg.host.clone(),
                        vm: msg.vm.clone(),
                        to: peer.to_string(),
                        peer,
                        algorithm: "postcopy".into(),
                        progress,
                        events,
                        waiters: Vec::new(),
                    },
                );
                Ok((id, rx))
            }),
        )
    }
}

/// Operator action `discard` on a held copy.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct DiscardHeld {
    /// Host holding the copy.
    pub host: String,
    /// The VM.
    pub vm: String,
}

impl Handler<DiscardHeld> for Engine {
    type Result = ResponseFuture<Result<(), EngineError>>;
    fn handle(&mut self, msg: DiscardHeld, _: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.host);
        Box::pin(async move { host?.send(DiscardVm(msg.vm)).await?.map(|_| ()) })
    }
}
