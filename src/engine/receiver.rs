//! The Receiver actor: the target side of one incoming migration.
//!
//! It starts a Link over the incoming connection and runs the target's protocol: every control
//! message goes through [`ReceiverState::step`]; the action it returns is carried out here
//! (reserve through the Host, apply pages through the data plane, load state into the Vm,
//! activate). Any failure before commitment releases the reservation and tells the source why.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{broadcast, mpsc};
use xxhash_rust::xxh3::xxh3_64;

use super::events::MigrationEvent;
use super::faults::{FaultKind, FaultPlan};
use super::host::{Host, IncomingEnded, ReleaseVm, ReserveIncoming};
use super::receiver_state::{ReceiverAction, ReceiverState};
use super::stage::Stage;
use crate::clock;
use crate::dataplane::TargetPlane;
use crate::dirty::PageSet;
use crate::link::{CloseLink, DataReceiver, FramePool, Keepalive, Link, LinkEnd, LinkEvent, SendControl};
use crate::protocol::auth::{self, ClusterKey};
use crate::protocol::negotiation::{accept_hello, negotiate};
use crate::protocol::{AbortReason, Capabilities, ControlMessage};
use crate::units::{PageIndex, PAGE_SIZE};
use crate::vm::{LoadVmState, PauseVm, ResumeVm, Vm};
use crate::vmm::Guest;

/// Digests per `Digests` message: 8 MiB of payload, well under the frame limit.
const DIGESTS_PER_MESSAGE: usize = 1 << 20;
/// Page requests batched into one `PageRequest`.
const PULL_BATCH: usize = 64;
/// Most mismatching pages listed in a report.
pub(crate) const MAX_LISTED_MISMATCHES: usize = 64;

/// How a receiver behaves.
#[derive(Debug, Clone)]
pub struct ReceiverParams {
    /// Liveness of the control link.
    pub keepalive: Keepalive,
    /// Longest wait for the next sign of progress from the source.
    pub step_timeout: Duration,
    /// Where to publish network announcements (in-process migrations share the source's
    /// event stream).
    pub events: Option<broadcast::Sender<MigrationEvent>>,
    /// The host's cluster key: when set, the source must prove it before `Reserve`.
    pub key: Option<ClusterKey>,
    /// Target-side faults to inject (in-process migrations).
    pub faults: FaultPlan,
}

/// The target side of one migration.
#[derive(Debug)]
pub struct Receiver {
    setup: Option<TargetRun>,
    abort: tokio::sync::watch::Sender<bool>,
    host: Addr<Host>,
}

impl Receiver {
    /// A receiver on `host` for the link `end`.
    pub fn new(host_name: String, host: Addr<Host>, caps: Capabilities, end: LinkEnd, params: ReceiverParams) -> Self {
        let (abort, abort_rx) = tokio::sync::watch::channel(false);
        Self {
            abort,
            host: host.clone(),
            setup: Some(TargetRun {
                abort: abort_rx,
                slot: None,
                host_name,
                host,
                caps,
                end: Some(end),
                params,
                link: None,
                vm: None,
                plane: None,
                state: ReceiverState::AwaitHello,
                postcopy: false,
                pulling: false,
                committed: false,
                authenticated: false,
                nonce: Vec::new(),
                source_nonce: Vec::new(),
            }),
        }
    }
}

/// Abort this incoming migration unless it is past commitment (host shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AbortIncoming;

impl Handler<AbortIncoming> for Receiver {
    type Result = ();
    fn handle(&mut self, _: AbortIncoming, _: &mut Self::Context) {
        self.abort.send_replace(true);
    }
}

impl Receiver {
    /// Holds the protocol until `slot` fires: the host is at its cap of incoming migrations.
    pub fn queued(mut self, slot: tokio::sync::oneshot::Receiver<()>) -> Self {
        if let Some(run) = self.setup.as_mut() {
            run.slot = Some(slot);
        }
        self
    }
}

impl Actor for Receiver {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.host.do_send(IncomingEnded);
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(run) = self.setup.take() {
            ctx.spawn(run.run().into_actor(self).map(|_, _, ctx| ctx.stop()));
        }
    }
}

/// How the target's run ended.
enum Exit {
    /// Completed, or refused at negotiation with a `Refuse` already sent.
    Clean,
    /// We failed: tell the source.
    Fail(AbortReason),
    /// The source aborted.
    PeerAborted(AbortReason),
    /// The link died.
    LinkLost(String),
    /// Injected: the target host "crashed"; it vanishes without a word.
    Crash,
}

#[derive(Debug)]
struct TargetRun {
    host_name: String,
    host: Addr<Host>,
    caps: Capabilities,
    end: Option<LinkEnd>,
    params: ReceiverParams,
    link: Option<Addr<Link>>,
    vm: Option<(Addr<Vm>, Arc<dyn Guest>)>,
    plane: Option<TargetPlane>,
    state: ReceiverState,
    postcopy: bool,
    pulling: bool,
    committed: bool,
    abort: tokio::sync::watch::Receiver<bool>,
    slot: Option<tokio::sync::oneshot::Receiver<()>>,
    authenticated: bool,
    nonce: Vec<u8>,
    source_nonce: Vec<u8>,
}

fn violation(detail: impl Into<String>) -> Exit {
    Exit::Fail(AbortReason::ProtocolViolation { detail: detail.into() })
}

impl TargetRun {
    async fn run(mut self) {
        let Some(end) = self.end.take() else { return };
        let (owner_tx, mut inbox) = mpsc::unbounded_channel();
        let link = Link::new(end.control, owner_tx, self.params.keepalive).start();
        self.link = Some(link.clone());
        let data_rx = (end.data_rx, end.pool);
        // The data sender of this end is unused: pages only flow source to target.
        drop(end.data_tx);
        let (fault_tx, mut fault_rx) = mpsc::unbounded_channel::<u64>();
        let exit = match self.wait_for_slot().await {
            Ok(()) => self.drive(&mut inbox, Some(data_rx), fault_tx, &mut fault_rx).await,
            Err(exit) => exit,
        };
        self.finish(exit).await;
        link.do_send(CloseLink);
    }

    /// A planned target-side fault that fires on `action`: the exit it causes.
    fn injected(&mut self, action: &ReceiverAction) -> Option<Exit> {
        if self.params.faults.is_empty() {
            return None;
        }
        // The receiver's action that corresponds to each source stage.
        let stage = match action {
            ReceiverAction::Negotiate { .. } => Stage::Premigration,
            ReceiverAction::Reserve { .. } => Stage::Reservation,
            ReceiverAction::NoteRound { .. } => Stage::Precopy,
            ReceiverAction::Suspend { .. } | ReceiverAction::LoadState { .. } => Stage::Stopcopy,
            _ => return None,
        };
        let loading = matches!(action, ReceiverAction::LoadState { .. });
        let fired = self.params.faults.take(stage, true);
        for fault in fired {
            tracing::warn!(fault = fault.kind.name(), "injecting fault");
            let exit = match fault.kind {
                FaultKind::TargetCrash => Exit::Crash,
                FaultKind::RefuseReservation => Exit::Fail(AbortReason::ReservationFailed {
                    detail: "injected fault: reservation refused".into(),
                }),
                FaultKind::FailStateLoad if loading => Exit::Fail(AbortReason::StateLoadFailed {
                    detail: "injected fault: backend failed loading state".into(),
                }),
                FaultKind::FailStateLoad => {
                    // Suspend comes before the state: keep it for LoadState.
                    self.params.faults.0.push(fault);
                    continue;
                }
                _ => continue,
            };
            return Some(exit);
        }
        None
    }

    /// Queued behind the host's cap: the Link already answers the source's pings, and the
    /// source's Hello waits in the inbox until a slot frees, the step bound passes, or the host
    /// shuts down.
    async fn wait_for_slot(&mut self) -> Result<(), Exit> {
        let Some(slot) = self.slot.take() else { return Ok(()) };
        let mut abort = self.abort.clone();
        tokio::select! {
            granted = slot => match granted {
                Ok(()) => Ok(()),
                Err(_) => Err(Exit::Fail(AbortReason::TargetFailed { detail: "target host stopped".into() })),
            },
            _ = abort.wait_for(|a| *a) => Err(Exit::Fail(AbortReason::TargetFailed {
                detail: "target host is shutting down".into(),
            })),
            _ = tokio::time::sleep(self.params.step_timeout) => {
                let reason = AbortReason::TargetFailed {
                    detail: format!(
                        "host {} stayed at its cap of incoming migrations for {} s",
                        self.host_name,
                        self.params.step_timeout.as_secs()
                    ),
                };
                let _ = self.send(ControlMessage::Refuse { reason }).await;
                Err(Exit::Clean)
            }
        }
    }

    async fn send(&self, msg: ControlMessage) -> Result<(), Exit> {
        let link = self.link.as_ref().ok_or_else(|| Exit::LinkLost("no link".into()))?;
        match link.send(SendControl(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Exit::LinkLost(e.to_string())),
            Err(e) => Err(Exit::LinkLost(e.to_string())),
        }
    }

    async fn drive(
        &mut self,
        inbox: &mut mpsc::UnboundedReceiver<LinkEvent>,
        mut data_rx: Option<(DataReceiver, FramePool)>,
        fault_tx: mpsc::UnboundedSender<u64>,
        fault_rx: &mut mpsc::UnboundedReceiver<u64>,
    ) -> Exit {
        let mut applied = None;
        let mut progress: Option<tokio::sync::watch::Receiver<u64>> = None;
        let mut progress_done = false;
        let mut deadline = clock::now() + self.params.step_timeout;
        loop {
            if progress.is_none() && !progress_done {
                progress = self.plane.as_ref().map(|p| p.watch());
            }
            let mut abort = self.abort.clone();
            let committed = self.committed;
            let msg = tokio::select! {
                _ = abort.wait_for(|a| *a), if !committed => {
                    return Exit::Fail(AbortReason::TargetFailed { detail: "target host is shutting down".into() });
                }
                ev = inbox.recv() => match ev {
                    Some(LinkEvent::Received(m)) => m,
                    Some(LinkEvent::Lost(e)) => return Exit::LinkLost(e.to_string()),
                    None => return Exit::LinkLost("link actor stopped".into()),
                },
                Some(page) = fault_rx.recv(), if self.pulling => {
                    let mut pages = vec![page];
                    while pages.len() < PULL_BATCH {
                        match fault_rx.try_recv() {
                            Ok(p) => pages.push(p),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.send(ControlMessage::PageRequest { pages }).await {
                        return e;
                    }
                    continue;
                }
                changed = wait_changed(&mut applied), if self.pulling => {
                    if !changed {
                        let exit = self.plane_failure();
                        return prefer_peer_abort(exit, inbox, self.params.keepalive.timeout).await;
                    }
                    if let Err(e) = self.check_pull_done().await {
                        return e;
                    }
                    continue;
                }
                moved = wait_changed(&mut progress), if !self.pulling && progress.is_some() => {
                    if !moved {
                        if let Some(e) = self.plane.as_ref().and_then(|p| p.error()) {
                            return Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() });
                        }
                        // The source closed its data channel; the control link says why.
                        progress_done = true;
                        progress = None;
                        continue;
                    }
                    // Pages arriving are progress: a long round is not a silent peer.
                    deadline = clock::now() + self.params.step_timeout;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline), if !self.pulling => {
                    return Exit::Fail(AbortReason::Timeout {
                        stage: self.state.name().to_string(),
                        after_ms: self.params.step_timeout.as_millis() as u64,
                    });
                }
            };
            deadline = clock::now() + self.params.step_timeout;
            let state = std::mem::replace(&mut self.state, ReceiverState::Done);
            let (next, action) = match state.step(msg) {
                Ok(x) => x,
                Err(e) => return violation(e.to_string()),
            };
            self.state = next;
            if let Some(exit) = self.injected(&action) {
                return exit;
            }
            let result = match action {
                ReceiverAction::Negotiate {
                    capabilities,
                    requested,
                    nonce,
                } => self.negotiate(&capabilities, requested, nonce).await,
                ReceiverAction::Authenticate { proof } => self.authenticate(&proof),
                ReceiverAction::Reserve { .. } if self.params.key.is_some() && !self.authenticated => {
                    Err(Exit::Fail(AbortReason::Unauthenticated {
                        detail: "Reserve before a valid Authenticate".into(),
                    }))
                }
                ReceiverAction::Reserve { config } => match data_rx.take() {
                    Some(rx) => self.reserve(config, rx).await,
                    None => Err(violation("second reservation")),
                },
                ReceiverAction::NoteRound { .. } => Ok(()),
                ReceiverAction::Suspend { batches_total, missing } => {
                    self.suspend(batches_total, &missing, fault_tx.clone()).await
                }
                ReceiverAction::LoadState { vcpus, devices } => self.load_state(vcpus, devices).await,
                ReceiverAction::Activate => {
                    self.committed = true;
                    let r = self.activate().await;
                    applied = self.plane.as_ref().map(|p| p.watch());
                    r
                }
                ReceiverAction::Finish => return Exit::Clean,
                ReceiverAction::Aborted { reason } => return Exit::PeerAborted(reason),
            };
            if let Err(e) = result {
                return prefer_peer_abort(e, inbox, self.params.keepalive.timeout).await;
            }
        }
    }

    fn plane_failure(&self) -> Exit {
        let err = self
            .plane
            .as_ref()
            .and_then(|p| p.error())
            .map(|e| e.to_string())
            .unwrap_or_else(|| "data plane stopped".into());
        Exit::LinkLost(err)
    }

    fn guest(&self) -> Result<Arc<dyn Guest>, Exit> {
        self.vm
            .as_ref()
            .map(|(_, g)| Arc::clone(g))
            .ok_or_else(|| violation("no reservation yet"))
    }

    fn authenticate(&mut self, proof: &[u8]) -> Result<(), Exit> {
        let Some(key) = &self.params.key else {
            // No key here: nothing to check, the proof is ignored.
            return Ok(());
        };
        if key.verify(auth::SOURCE, &self.nonce, &self.source_nonce, proof) {
            self.authenticated = true;
            Ok(())
        } else {
            Err(Exit::Fail(AbortReason::Unauthenticated {
                detail: "the source's proof does not match this host's cluster key".into(),
            }))
        }
    }

    async fn negotiate(
        &mut self,
        source: &Capabilities,
        requested: crate::protocol::Algorithm,
        source_nonce: Vec<u8>,
    ) -> Result<(), Exit> {
        let checked =
            accept_hello(source, &self.caps).and_then(|v| negotiate(source, &self.caps, requested).map(|_| v));
        match checked {
            Ok(version) => {
                let proof = match &self.params.key {
                    Some(key) => {
                        if source_nonce.len() != auth::NONCE_LEN {
                            self.send(ControlMessage::Refuse {
                                reason: AbortReason::Unauthenticated {
                                    detail: "this host requires a cluster key; the source offered none".into(),
                                },
                            })
                            .await?;
                            return Err(Exit::Clean);
                        }
                        self.nonce = auth::nonce()
                            .map_err(|e| Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }))?;
                        key.prove(auth::TARGET, &source_nonce, &self.nonce)
                    }
                    None => Vec::new(),
                };
                self.source_nonce = source_nonce;
                self.send(ControlMessage::Welcome {
                    version,
                    capabilities: self.caps.clone(),
                    nonce: self.nonce.clone(),
                    proof,
                })
                .await
            }
            Err(e) => {
                self.send(ControlMessage::Refuse { reason: e.into() }).await?;
                Err(Exit::Clean)
            }
        }
    }

    async fn reserve(&mut self, config: crate::format::VmConfig, data: (DataReceiver, FramePool)) -> Result<(), Exit> {
        let (data_rx, pool) = data;
        let (vm, guest) = match self.host.send(ReserveIncoming(config)).await {
            Ok(Ok(x)) => x,
            Ok(Err(reason)) => return Err(Exit::Fail(reason)),
            Err(e) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
        };
        self.vm = Some((vm, Arc::clone(&guest)));
        let plane = TargetPlane::spawn(guest, data_rx, pool)
            .map_err(|e| Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }))?;
        self.plane = Some(plane);
        self.send(ControlMessage::Reserved).await
    }

    async fn suspend(&mut self, batches: u64, missing: &[u8], faults: mpsc::UnboundedSender<u64>) -> Result<(), Exit> {
        let plane = self
            .plane
            .as_ref()
            .ok_or_else(|| violation("pages before reservation"))?;
        match tokio::time::timeout(self.params.step_timeout, plane.wait_applied(batches)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
            Err(_) => {
                return Err(Exit::Fail(AbortReason::Timeout {
                    stage: "stopcopy".into(),
                    after_ms: self.params.step_timeout.as_millis() as u64,
                }))
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let guest = self.guest()?;
        let pages = guest.memory().page_count();
        let set = PageSet::from_bytes(missing, pages).ok_or_else(|| {
            violation(format!(
                "missing-page bitmap of {} bytes for {pages} pages",
                missing.len()
            ))
        })?;
        guest
            .begin_demand_paging(&set, faults)
            .map_err(|e| Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }))?;
        self.postcopy = true;
        Ok(())
    }

    async fn load_state(
        &mut self,
        vcpus: Vec<crate::format::VcpuState>,
        devices: Vec<crate::format::DeviceState>,
    ) -> Result<(), Exit> {
        let (vm, guest) = self.vm.clone().ok_or_else(|| violation("state before reservation"))?;
        let load = vm.send(LoadVmState {
            vcpus: vcpus.clone(),
            devices,
        });
        match load.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Exit::Fail(AbortReason::StateLoadFailed { detail: e.to_string() })),
            Err(e) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
        }
        // The state now lives in this backend's native layout; reading it back must give what
        // the source sent, or the conversion lost something.
        let back = guest
            .save_vcpus()
            .map_err(|e| Exit::Fail(AbortReason::StateLoadFailed { detail: e.to_string() }))?;
        if back != vcpus {
            return Err(Exit::Fail(AbortReason::StateLoadFailed {
                detail: format!("vCPU state changed through the {} layout", guest.layout()),
            }));
        }
        self.send(ControlMessage::Prepared).await
    }

    async fn activate(&mut self) -> Result<(), Exit> {
        let (vm, guest) = self.vm.clone().ok_or_else(|| violation("commit before reservation"))?;
        // Track what the guest writes from now on: those pages may differ from what arrived.
        guest.dirty_bitmap().clear_all();
        match vm.send(ResumeVm).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
            Err(e) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
        }
        self.announce(guest.as_ref());
        self.send(ControlMessage::Activated).await?;
        if self.postcopy {
            self.pulling = true;
            self.check_pull_done().await
        } else {
            self.send_digests().await
        }
    }

    /// Announces every NIC's MAC at its new place: the sim backend records it as an event (a
    /// host with a real interface would send a RARP burst here).
    fn announce(&self, guest: &dyn Guest) {
        if let Some(events) = &self.params.events {
            for nic in &guest.config().nics {
                let _ = events.send(MigrationEvent::NetworkAnnounced {
                    nic: nic.id.clone(),
                    mac: nic.mac.to_string(),
                    host: self.host_name.clone(),
                });
            }
        }
    }

    async fn check_pull_done(&mut self) -> Result<(), Exit> {
        let guest = self.guest()?;
        if guest.missing_pages() == 0 {
            self.pulling = false;
            self.send(ControlMessage::Complete).await?;
            self.send_digests().await?;
        }
        Ok(())
    }

    async fn send_digests(&self) -> Result<(), Exit> {
        let guest = self.guest()?;
        let plane = self.plane.as_ref().ok_or_else(|| violation("no data plane"))?;
        let pages = guest.memory().page_count();
        let received = plane.received_digests(0, pages as usize);
        // Hash current memory off the actor thread; the guest keeps running meanwhile.
        let g = Arc::clone(&guest);
        let received_copy = received.clone();
        let mismatches = tokio::task::spawn_blocking(move || local_mismatches(g.as_ref(), &received_copy))
            .await
            .map_err(|e| Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }))?;
        let stats = guest.stats();
        let parts: Vec<&[u64]> = received.chunks(DIGESTS_PER_MESSAGE).collect();
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let last = i + 1 == n;
            self.send(ControlMessage::Digests {
                first_page: (i * DIGESTS_PER_MESSAGE) as u64,
                digests: part.to_vec(),
                last,
                memory_mismatches: if last { mismatches.clone() } else { Vec::new() },
                faults: if last { stats.faults } else { 0 },
                fault_wait_s: if last { stats.fault_wait_s } else { 0.0 },
            })
            .await?;
        }
        Ok(())
    }

    async fn finish(&mut self, exit: Exit) {
        let why = match &exit {
            Exit::Clean => None,
            Exit::Fail(reason) => {
                // Best effort: the source learns why; if the link is gone it learns from that.
                let _ = self.send(ControlMessage::Abort { reason: reason.clone() }).await;
                Some(format!("target aborted: {reason}"))
            }
            Exit::PeerAborted(reason) => Some(format!("source aborted: {reason}")),
            Exit::LinkLost(e) => Some(format!("link lost: {e}")),
            Exit::Crash => Some("injected crash: the target vanished".to_string()),
        };
        // Stop the data plane before anything is released: it writes into guest memory.
        self.plane = None;
        if let Some((vm, guest)) = self.vm.take() {
            if self.committed {
                if guest.missing_pages() > 0 {
                    // Post-copy interrupted: pause here. The source never resumes its stale
                    // copy, and this one never runs with holes.
                    let _ = vm.send(PauseVm).await;
                }
            } else {
                self.host.do_send(ReleaseVm(guest.config().id.0.clone()));
            }
        }
        self.plane = None;
        // After the release above, so a listener that then asks the host sees it done.
        if let Some(why) = &why {
            if why.contains("authentication failed") || why.contains("requires a cluster key") {
                tracing::warn!(host = %self.host_name, reason = %why, "refused an unauthenticated migration");
            } else {
                tracing::info!(host = %self.host_name, reason = %why, committed = self.committed, "incoming migration ended early");
            }
        } else {
            tracing::info!(host = %self.host_name, "incoming migration completed");
        }
        if let (Some(why), Some(events)) = (why, &self.params.events) {
            let _ = events.send(MigrationEvent::TargetStopped { reason: why });
        }
    }
}

/// A failure that comes from the source closing the link may have overtaken the source's
/// `Abort` (the data channel and a failed send see the close at once; the Abort frame carries
/// the link's latency). The Link delivers every queued frame before it reports the loss, so
/// reading the inbox to its end finds the Abort if there is one.
async fn prefer_peer_abort(exit: Exit, inbox: &mut mpsc::UnboundedReceiver<LinkEvent>, bound: Duration) -> Exit {
    if !matches!(exit, Exit::LinkLost(_)) {
        return exit;
    }
    let deadline = clock::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, inbox.recv()).await {
            Ok(Some(LinkEvent::Received(ControlMessage::Abort { reason }))) => return Exit::PeerAborted(reason),
            Ok(Some(LinkEvent::Received(_))) => {}
            Ok(Some(LinkEvent::Lost(_))) | Ok(None) | Err(_) => return exit,
        }
    }
}

async fn wait_changed(rx: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Pages the guest has not written since activation whose memory differs from what arrived.
fn local_mismatches(guest: &dyn Guest, received: &[u64]) -> Vec<u64> {
    let memory = guest.memory();
    let zero = xxh3_64(&[0u8; PAGE_SIZE]);
    let current: Vec<u64> = (0..memory.page_count())
        .map(|p| memory.page_digest(PageIndex(p)).unwrap_or(zero ^ 1))
        .collect();
    // Snapshot after hashing: a page written during the scan is dirty by now.
    let touched = guest.dirty_bitmap().snapshot();
    current
        .iter()
        .zip(received)
        .enumerate()
        .filter(|(p, (c, r))| !touched.contains(*p as u64) && c != r)
        .map(|(p, _)| p as u64)
        .take(MAX_LISTED_MISMATCHES)
        .collect()
}
