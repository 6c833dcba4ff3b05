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

use super::ask::{ask, BACKEND_ASK, GUEST_ASK};
use super::error::Side;
use super::events::MigrationEvent;
use super::faults::{FaultKind, FaultPlan};
use super::host::{
    FindRecoverable, HoldVm, Host, IncomingEnded, QueryVmState, RecordCommitted, RegisterRecoverable, ReleaseVm,
    ReserveIncoming, UnholdVm, UnregisterRecoverable,
};
use super::receiver_state::{ReceiverAction, ReceiverState};
use super::stage::Stage;
use crate::clock;
use crate::dataplane::TargetPlane;
use crate::dirty::PageSet;
use crate::link::{CloseLink, DataReceiver, FramePool, Keepalive, Link, LinkEnd, LinkEvent, SendControl};
use crate::protocol::auth::{self, ClusterKey};
use crate::protocol::negotiation::{accept_hello, negotiate};
use crate::protocol::{AbortReason, Capabilities, Compression, ControlMessage, PageCodecs};
use crate::units::{PageIndex, PAGE_SIZE};
use crate::vm::{HeldCopy, HeldReason, LoadVmState, PauseVm, ResumeVm, Vm};
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
    /// Post-copy: how long a guest paused by a lost link waits for the source to reconnect
    /// before its copy is held (`awaiting-pages`) for an operator; it still takes a recovery
    /// link after that.
    pub recovery_timeout: Duration,
    /// The host is shutting down: a new migration is refused (recovery links and fence
    /// queries are still answered).
    pub refuse_new: bool,
}

/// A recovery link, authenticated by a fresh receiver and handed to the receiver whose pull
/// phase lost its link.
pub struct Handover {
    link: Addr<Link>,
    inbox: crate::link::LinkEvents,
    data: (DataReceiver, FramePool),
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover").finish_non_exhaustive()
    }
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
                data: None,
                pending: None,
                handover_to: None,
                recoveries: 0,
                started: clock::now(),
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
    /// This recovery link belongs to the receiver of `vm` now.
    HandOver {
        /// Where it goes.
        to: mpsc::Sender<Handover>,
    },
    /// A recovery link came while the old one still looked alive: switch to it.
    Replaced(Handover),
    /// The pull phase lost its link and no recovery link came in time.
    RecoveryTimeout(String),
    /// A fence query was answered; no migration took place.
    Answered,
    /// The operator discarded the copy this receiver held.
    Discarded,
}

#[derive(Debug)]
struct TargetRun {
    host_name: String,
    host: Addr<Host>,
    caps: Capabilities,
    end: Option<LinkEnd>,
    params: ReceiverParams,
    /// The data half of the link, until the reservation starts the plane on it.
    data: Option<(DataReceiver, FramePool)>,
    /// A message read while waiting for a slot.
    pending: Option<ControlMessage>,
    /// Where recovery links for this migration's pull phase are sent.
    handover_to: Option<mpsc::Sender<Handover>>,
    recoveries: u32,
    started: clock::Instant,
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
        let (owner_tx, mut inbox) = crate::link::event_channel();
        let link = Link::new(end.control, owner_tx, self.params.keepalive).start();
        self.link = Some(link);
        self.data = Some((end.data_rx, end.pool));
        // The data sender of this end is unused: pages only flow source to target.
        drop(end.data_tx);
        let (fault_tx, mut fault_rx) = mpsc::unbounded_channel::<u64>();
        let (handover_tx, mut handover_rx) = mpsc::channel::<Handover>(1);
        self.handover_to = Some(handover_tx);
        let mut exit = match self.wait_for_slot(&mut inbox).await {
            Ok(()) => self.drive(&mut inbox, &fault_tx, &mut fault_rx, &mut handover_rx).await,
            Err(exit) => exit,
        };
        // Post-copy recovery: in the pull phase a lost link is replaced, not the end.
        loop {
            let handover = match exit {
                Exit::Replaced(h) => h,
                Exit::LinkLost(cause) if self.recoverable() => {
                    match self.await_recovery(&cause, &mut handover_rx).await {
                        Ok(h) => h,
                        Err(e) => {
                            exit = e;
                            break;
                        }
                    }
                }
                other => {
                    exit = other;
                    break;
                }
            };
            exit = match self.take_over(handover).await {
                Ok(new_inbox) => {
                    inbox = new_inbox;
                    self.drive(&mut inbox, &fault_tx, &mut fault_rx, &mut handover_rx).await
                }
                Err(e) => e,
            };
        }
        if let Exit::HandOver { to } = exit {
            // The link, its inbox and its data half go on in the receiver that awaits them.
            if let (Some(link), Some(data)) = (self.link.take(), self.data.take()) {
                let handover = Handover { link, inbox, data };
                if let Err(e) = to.send(handover).await {
                    // That receiver ended meanwhile: closing the link tells the source.
                    e.0.link.do_send(CloseLink);
                }
            }
            return;
        }
        self.finish(exit).await;
        if let Some(link) = &self.link {
            link.do_send(CloseLink);
        }
    }

    /// A post-copy migration past commitment: until the source's final `Complete`, a lost
    /// link is replaced by a recovery link (the source may still hold pages this side lacks,
    /// and it must learn that this side runs the VM before it frees its copy).
    fn recoverable(&self) -> bool {
        self.postcopy && self.committed
    }

    /// The pull phase lost its link: pause the guest if it lacks pages (it must not run ahead
    /// of pages nobody can bring now) and wait for a recovery link.
    async fn await_recovery(
        &mut self,
        cause: &str,
        handovers: &mut mpsc::Receiver<Handover>,
    ) -> Result<Handover, Exit> {
        if let Some(link) = self.link.take() {
            link.do_send(CloseLink);
        }
        let missing = self.vm.as_ref().map_or(0, |(_, g)| g.missing_pages());
        if let (Some((vm, _)), true) = (&self.vm, missing > 0) {
            if let Err(e) = ask(vm, PauseVm, "vm pause", GUEST_ASK).await {
                tracing::error!(error = %e, "the guest lacking pages did not pause");
            }
        }
        tracing::warn!(host = %self.host_name, cause, missing, "post-copy link lost; guest paused, awaiting recovery");
        if let Some(events) = &self.params.events {
            let _ = events.send(MigrationEvent::PullInterrupted {
                side: Side::Target,
                reason: cause.to_string(),
                missing_pages: missing,
            });
        }
        let timeout = self.params.recovery_timeout;
        let gave_up = || {
            let whereabouts = if missing > 0 {
                format!(
                    "the VM stays paused on host {} with {missing} pages missing, which the source still holds",
                    self.host_name
                )
            } else {
                format!(
                    "the VM runs on host {} with every page; the source never heard so",
                    self.host_name
                )
            };
            Exit::RecoveryTimeout(format!(
                "post-copy link lost ({cause}) and no recovery link came within {:.1} s; {whereabouts}",
                timeout.as_secs_f64(),
            ))
        };
        // The guest lacks pages only the source holds: nothing here can decide for it. From
        // now on the copy is held for an operator (`vm list` says so), and it still takes a
        // recovery link, automatic or `migrate --recover`, until the operator discards it,
        // which closes the host's sender.
        let vm = self.vm.as_ref().map(|(_, g)| g.config().id.0.clone());
        let hold = |detail: String| {
            if let (Some(vm), true) = (&vm, missing > 0) {
                self.host.do_send(HoldVm {
                    vm: vm.clone(),
                    copy: HeldCopy {
                        reason: HeldReason::AwaitingPages,
                        detail,
                        peer: None,
                    },
                });
            }
        };
        hold(format!(
            "post-copy link lost ({cause}); paused with {missing} pages missing, waiting for the source to reconnect"
        ));
        let received = match tokio::time::timeout(timeout, handovers.recv()).await {
            Ok(r) => r,
            Err(_) if missing == 0 => return Err(gave_up()),
            Err(_) => {
                let detail = match gave_up() {
                    Exit::RecoveryTimeout(d) => d,
                    _ => String::new(),
                };
                tracing::warn!(host = %self.host_name, vm = ?vm, reason = %detail, "incoming post-copy stopped; copy held");
                if let Some(events) = &self.params.events {
                    let _ = events.send(MigrationEvent::TargetStopped { reason: detail.clone() });
                }
                hold(detail);
                handovers.recv().await
            }
        };
        match received {
            Some(h) => {
                if let Some(vm) = vm {
                    self.host.do_send(UnholdVm(vm));
                }
                Ok(h)
            }
            None => Err(Exit::Discarded),
        }
    }

    /// Carries the pull phase on over a recovery link: the data plane reads from it, the
    /// source learns which pages are still missing, and the guest runs again.
    async fn take_over(&mut self, h: Handover) -> Result<crate::link::LinkEvents, Exit> {
        if let Some(old) = self.link.replace(h.link) {
            old.do_send(CloseLink);
        }
        let guest = self.guest()?;
        let plane = self.plane.as_mut().ok_or_else(|| violation("no data plane"))?;
        let (data_rx, pool) = h.data;
        plane
            .reattach(data_rx, pool)
            .map_err(|e| Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }))?;
        let missing = guest.missing_set();
        self.send(ControlMessage::Resumed {
            missing: missing.to_bytes(),
        })
        .await?;
        if !guest.is_running() {
            if let Some((vm, _)) = &self.vm {
                match ask(vm, ResumeVm, "vm resume", GUEST_ASK).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
                    Err(e) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
                }
            }
        }
        self.recoveries += 1;
        tracing::info!(host = %self.host_name, recoveries = self.recoveries, missing = missing.len(), "post-copy pull resumed on a new link");
        // Every page may be here already: then `Complete` and the digests go out again.
        self.pulling = true;
        self.check_pull_done().await?;
        if let Some(events) = &self.params.events {
            let _ = events.send(MigrationEvent::PullResumed {
                side: Side::Target,
                recoveries: self.recoveries,
                missing_pages: missing.len(),
            });
        }
        Ok(h.inbox)
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
            ReceiverAction::Activate => Stage::Activation,
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
    async fn wait_for_slot(&mut self, inbox: &mut crate::link::LinkEvents) -> Result<(), Exit> {
        let Some(mut slot) = self.slot.take() else {
            return Ok(());
        };
        let mut abort = self.abort.clone();
        let deadline = clock::now() + self.params.step_timeout;
        loop {
            let reading = self.pending.is_none();
            tokio::select! {
                granted = &mut slot => return match granted {
                    Ok(()) => Ok(()),
                    Err(_) => Err(Exit::Fail(AbortReason::TargetFailed { detail: "target host stopped".into() })),
                },
                _ = abort.wait_for(|a| *a) => return Err(Exit::Fail(AbortReason::TargetFailed {
                    detail: "target host is shutting down".into(),
                })),
                // A recovery link takes no slot: its migration holds one already, and waiting
                // would keep that migration's guest paused.
                ev = inbox.recv(), if reading => match ev {
                    Some(LinkEvent::Received(m)) => {
                        let resume = matches!(m, ControlMessage::Hello { resume: true, .. });
                        self.pending = Some(m);
                        if resume {
                            return Ok(());
                        }
                    }
                    Some(LinkEvent::Lost(e)) => return Err(Exit::LinkLost(e.to_string())),
                    None => return Err(Exit::LinkLost("link actor stopped".into())),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let reason = AbortReason::TargetFailed {
                        detail: format!(
                            "host {} stayed at its cap of incoming migrations for {} s",
                            self.host_name,
                            self.params.step_timeout.as_secs()
                        ),
                    };
                    let _ = self.send(ControlMessage::Refuse { reason }).await;
                    return Err(Exit::Clean);
                }
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
        inbox: &mut crate::link::LinkEvents,
        fault_tx: &mpsc::UnboundedSender<u64>,
        fault_rx: &mut mpsc::UnboundedReceiver<u64>,
        handovers: &mut mpsc::Receiver<Handover>,
    ) -> Exit {
        // Entered again after a recovery, the pull phase watches the new data thread.
        let mut applied = if self.pulling {
            self.plane.as_ref().map(|p| p.watch())
        } else {
            None
        };
        let mut progress: Option<tokio::sync::watch::Receiver<u64>> = None;
        let mut progress_done = false;
        let mut deadline = clock::now() + self.params.step_timeout;
        let mut fault_tick = tokio::time::interval(Duration::from_millis(5));
        loop {
            if progress.is_none() && !progress_done {
                progress = self.plane.as_ref().map(|p| p.watch());
            }
            let mut abort = self.abort.clone();
            let committed = self.committed;
            let timed_faults = self.params.faults.has_thresholds(true);
            let msg = match self.pending.take() {
                Some(m) => m,
                None => tokio::select! {
                Some(h) = handovers.recv(), if self.recoverable() => return Exit::Replaced(h),
                _ = fault_tick.tick(), if timed_faults => {
                    if let Some(exit) = self.due_fault() {
                        return exit;
                    }
                    continue;
                }
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
                },
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
                } => self.negotiate(&capabilities, Some(requested), nonce).await,
                ReceiverAction::NegotiateRecovery { capabilities, nonce } => {
                    self.negotiate(&capabilities, None, nonce).await
                }
                ReceiverAction::HandOver { vm, proof } => {
                    if let Err(e) = self.authenticate(&proof) {
                        return e;
                    }
                    return self.hand_over(vm).await;
                }
                ReceiverAction::Authenticate { proof } => self.authenticate(&proof),
                ReceiverAction::Reserve { .. } if self.params.key.is_some() && !self.authenticated => {
                    Err(Exit::Fail(AbortReason::Unauthenticated {
                        detail: "Reserve before a valid Authenticate".into(),
                    }))
                }
                ReceiverAction::Reserve { config, demand_paged } => match self.data.take() {
                    Some(rx) => self.reserve(config, demand_paged, rx).await,
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
                ReceiverAction::AnswerQuery { vm } => {
                    let state = match self.host.send(QueryVmState(vm.clone())).await {
                        Ok(s) => s,
                        Err(e) => return Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }),
                    };
                    if let Err(e) = self.send(ControlMessage::VmStatus { vm, state }).await {
                        return e;
                    }
                    return Exit::Answered;
                }
                ReceiverAction::Abort { reason } => Err(Exit::Fail(reason)),
                ReceiverAction::Aborted { reason } => return Exit::PeerAborted(reason),
            };
            if let Err(e) = result {
                return prefer_peer_abort(e, inbox, self.params.keepalive.timeout).await;
            }
        }
    }

    /// A target-side fault whose byte or time trigger has passed: the exit it causes.
    fn due_fault(&mut self) -> Option<Exit> {
        let stage = match &self.state {
            ReceiverState::AwaitHello | ReceiverState::AwaitRecoveryProof { .. } => Stage::Premigration,
            ReceiverState::AwaitReserve => Stage::Reservation,
            ReceiverState::Receiving => Stage::Precopy,
            ReceiverState::AwaitVcpus | ReceiverState::AwaitDevices { .. } | ReceiverState::AwaitCommit => {
                Stage::Stopcopy
            }
            ReceiverState::AwaitComplete if self.pulling => Stage::Pull,
            ReceiverState::AwaitComplete | ReceiverState::Done => Stage::Activation,
        };
        let bytes = self.plane.as_ref().map_or(0, |p| p.received_bytes());
        let elapsed = clock::now().duration_since(self.started);
        let fired = self.params.faults.take_due(stage, true, bytes, elapsed);
        fired.into_iter().find(|f| f.kind == FaultKind::TargetCrash).map(|f| {
            tracing::warn!(fault = f.kind.name(), bytes, "injecting fault");
            Exit::Crash
        })
    }

    /// A recovery link, authenticated: find the receiver whose pull phase lost its link.
    async fn hand_over(&mut self, vm: String) -> Exit {
        match self.host.send(FindRecoverable(vm.clone())).await {
            Ok(Some(to)) => Exit::HandOver { to },
            _ => {
                let reason = AbortReason::TargetFailed {
                    detail: format!(
                        "no post-copy migration of VM {vm:?} awaits recovery on host {}",
                        self.host_name
                    ),
                };
                let _ = self.send(ControlMessage::Refuse { reason }).await;
                Exit::Clean
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
        requested: Option<crate::format::Wire<crate::protocol::Algorithm>>,
        source_nonce: Vec<u8>,
    ) -> Result<(), Exit> {
        if self.params.refuse_new && requested.is_some() {
            self.send(ControlMessage::Refuse {
                reason: AbortReason::ShuttingDown,
            })
            .await?;
            return Err(Exit::Clean);
        }
        // A recovery link carries on an algorithm agreed already: only versions are checked.
        let checked = accept_hello(source, &self.caps).and_then(|v| match requested {
            Some(a) => negotiate(source, &self.caps, a).map(|_| v),
            None => Ok(v),
        });
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

    async fn reserve(
        &mut self,
        config: crate::format::VmConfig,
        demand_paged: bool,
        data: (DataReceiver, FramePool),
    ) -> Result<(), Exit> {
        let (data_rx, pool) = data;
        let reserve = ReserveIncoming { config, demand_paged };
        // Longer than the host's own bound on the backend: the host answers first, and a
        // reservation is never made for an asker that has gone.
        let bound = BACKEND_ASK + Duration::from_secs(30);
        let (vm, guest) = match ask(&self.host, reserve, "reservation", bound).await {
            Ok(Ok(x)) => x,
            Ok(Err(reason)) => return Err(Exit::Fail(reason)),
            Err(e) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
        };
        self.vm = Some((vm, Arc::clone(&guest)));
        let accept = PageCodecs {
            lz4: self.caps.compression.contains(&Compression::Lz4),
            xbzrle: self.caps.compression.contains(&Compression::Xbzrle),
        };
        let plane = TargetPlane::spawn(guest, data_rx, pool, accept)
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
        // A pushed or pulled page that arrives damaged is asked for again, like a fault.
        plane.refetch_to(faults.clone());
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
        let load = ask(
            &vm,
            LoadVmState {
                vcpus: vcpus.clone(),
                devices,
            },
            "vm state load",
            GUEST_ASK,
        );
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
        if !self.postcopy {
            // Verification before commitment: the source compares these with its memory and
            // rolls back on a difference, while it still owns the VM.
            self.send_digests(false).await?;
        }
        self.send(ControlMessage::Prepared).await
    }

    async fn activate(&mut self) -> Result<(), Exit> {
        let (vm, guest) = self.vm.clone().ok_or_else(|| violation("commit before reservation"))?;
        let id = guest.config().id.0.clone();
        // A post-copy link lost from here on is recoverable: the recovery path is registered
        // before anything else can fail.
        if self.postcopy {
            // The host keeps the only sender: discarding the copy there ends a wait for recovery.
            if let Some(to) = self.handover_to.take() {
                self.host.do_send(RegisterRecoverable { vm: id.clone(), to });
            }
        }
        // Track what the guest writes from now on: those pages may differ from what arrived.
        if let Err(e) = guest.start_dirty_log() {
            return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }));
        }
        match ask(&vm, ResumeVm, "vm resume", GUEST_ASK).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
            Err(e) => return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() })),
        }
        // The VM has run here: a fence asking later must not hear `absent`, even once the VM
        // has moved on, or the source's older copy could resume beside it.
        self.host.do_send(RecordCommitted(id));
        self.announce(guest.as_ref());
        self.send(ControlMessage::Activated).await?;
        if self.postcopy {
            self.pulling = true;
            self.check_pull_done().await
        } else {
            Ok(())
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
            self.send_digests(true).await?;
        }
        Ok(())
    }

    /// The digest of every page as received. `local_check`: also hash current memory and list
    /// pages the guest has not written since activation that differ (post-copy, after the pull;
    /// the guest runs meanwhile).
    async fn send_digests(&self, local_check: bool) -> Result<(), Exit> {
        let guest = self.guest()?;
        let plane = self.plane.as_ref().ok_or_else(|| violation("no data plane"))?;
        let pages = guest.memory().page_count();
        let received = plane.received_digests(0, pages as usize);
        let mismatches = if local_check {
            let g = Arc::clone(&guest);
            let received_copy = received.clone();
            tokio::task::spawn_blocking(move || local_mismatches(g.as_ref(), &received_copy))
                .await
                .map_err(|e| Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }))?
        } else {
            Vec::new()
        };
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
            Exit::RecoveryTimeout(why) => Some(why.clone()),
            Exit::Answered => None,
            Exit::Discarded => Some("the operator discarded the copy awaiting pages".to_string()),
            // Handled by the caller; never reach here.
            Exit::HandOver { .. } | Exit::Replaced(_) => None,
        };
        if self.postcopy && self.committed {
            if let Some((_, guest)) = &self.vm {
                self.host.do_send(UnregisterRecoverable(guest.config().id.0.clone()));
            }
        }
        // Stop the data plane before anything is released: it writes into guest memory.
        self.plane = None;
        if let Some((vm, guest)) = self.vm.take() {
            if self.committed {
                let missing = guest.missing_pages();
                if missing > 0 {
                    // Post-copy interrupted: pause here. The source never resumes its stale
                    // copy, and this one never runs with holes.
                    if let Err(e) = ask(&vm, PauseVm, "vm pause", GUEST_ASK).await {
                        tracing::error!(error = %e, "the guest lacking pages did not pause");
                    }
                }
                // A copy this host owns that does not run (its activation failed, or it lacks
                // pages) is held for an operator; a discarded one is gone already and the
                // host ignores this.
                if !matches!(exit, Exit::Clean | Exit::Answered) && (missing > 0 || !guest.is_running()) {
                    let reason = if missing > 0 {
                        HeldReason::AwaitingPages
                    } else {
                        HeldReason::CommittedUnconfirmed
                    };
                    self.host.do_send(HoldVm {
                        vm: guest.config().id.0.clone(),
                        copy: HeldCopy {
                            reason,
                            detail: why.clone().unwrap_or_default(),
                            peer: None,
                        },
                    });
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
async fn prefer_peer_abort(exit: Exit, inbox: &mut crate::link::LinkEvents, bound: Duration) -> Exit {
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
    // Snapshot after hashing: a page written during the scan is dirty by now. A log that
    // cannot be read leaves the bitmap as last synced; the mismatch list is advice anyway.
    if let Err(e) = guest.sync_dirty_log() {
        tracing::warn!(error = %e, "dirty log sync for the mismatch report");
    }
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
