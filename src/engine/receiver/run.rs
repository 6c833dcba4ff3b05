//! The target's run: what it holds, what its loop waits on, and which phase each action goes to.
//!
//! The loop waits for the next control message (or the host's halt, a recovery link, a page
//! the guest wants, pages arriving), steps [`ReceiverState`] with it, and hands the action to
//! the method of its phase, in the files next to this one.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

use super::admission::Handshake;
use super::finish::{prefer_peer_abort, violation, Exit};
use super::host_port::HostPort;
use super::injected::TargetFaults;
use super::pull::Wanted;
use super::recovery::Recovery;
use super::state::{ReceiverAction, ReceiverState};
use super::{Halt, ReceiverParams};
use crate::clock;
use crate::dataplane::TargetPlane;
use crate::link::{CloseLink, DataReceiver, FramePool, Link, LinkEnd, LinkEvent, LinkEvents, SendControl};
use crate::protocol::{AbortReason, Capabilities, ControlMessage};
use crate::vm::Vm;
use crate::vmm::Guest;

/// `Ok`: the run carries on; `Err`: it ends with that exit, which is not necessarily a failure
/// (a completed migration ends with [`Exit::Clean`]).
pub(super) type Flow = Result<(), Exit>;

/// One incoming migration, from the first message to its end.
#[derive(Debug)]
pub(super) struct TargetRun {
    pub(super) host_name: String,
    pub(super) host: HostPort,
    pub(super) caps: Capabilities,
    pub(super) params: ReceiverParams,
    /// Target-side fault decorators, installed as the run starts; `None` unless planned.
    faults: Option<TargetFaults>,
    /// Fires when the host has a free incoming slot; `None`: not queued.
    pub(super) slot: Option<oneshot::Receiver<()>>,
    /// Set when the host shuts down (or, injected, crashes).
    pub(super) halt: watch::Receiver<Option<Halt>>,
    pub(super) link: Option<Addr<Link>>,
    /// The data half of the link, until the reservation starts the plane on it.
    pub(super) data: Option<(DataReceiver, FramePool)>,
    /// A message read while waiting for a slot.
    pub(super) pending: Option<ControlMessage>,
    state: ReceiverState,
    pub(super) handshake: Handshake,
    pub(super) vm: Option<(Addr<Vm>, Arc<dyn Guest>)>,
    pub(super) plane: Option<TargetPlane>,
    /// Pages are missing at the switchover: they come on demand, after activation.
    pub(super) postcopy: bool,
    /// Activated with pages missing: the guest's faults become page requests.
    pub(super) pulling: bool,
    /// `Commit` arrived: the VM belongs to this host from now on.
    pub(super) committed: bool,
    /// Stop-and-copy verified after activation: the digests follow `Activated`.
    pub(super) digests_after_activation: bool,
    pub(super) wanted: Wanted,
    pub(super) recovery: Recovery,
    /// The host's interface for announce frames; `None`: an activation is only an event.
    pub(super) announce_via: Option<String>,
    /// How to announce, as the source's `Reserve` asked.
    pub(super) announce: crate::announce::AnnounceParams,
}

/// What the loop waits on besides messages; set up again on each entry, since a recovery
/// brings a new data thread.
#[derive(Debug)]
pub(super) struct Waits {
    /// Pull phase: batches applied by the data thread.
    pub(super) applied: Option<watch::Receiver<u64>>,
    /// Before the pull: batches applied, which are progress (a long round is not a silent
    /// source).
    progress: Option<watch::Receiver<u64>>,
    /// The source closed its data channel: there is no more progress to watch.
    progress_done: bool,
    /// When the source has been silent too long.
    deadline: clock::Instant,
}

impl TargetRun {
    pub(super) fn new(
        host_name: String,
        host: HostPort,
        caps: Capabilities,
        params: ReceiverParams,
        halt: watch::Receiver<Option<Halt>>,
        faults: Option<TargetFaults>,
        announce_via: Option<String>,
    ) -> Self {
        Self {
            host_name,
            host,
            caps,
            params,
            faults,
            slot: None,
            halt,
            link: None,
            data: None,
            pending: None,
            state: ReceiverState::AwaitHello,
            handshake: Handshake::default(),
            vm: None,
            plane: None,
            postcopy: false,
            pulling: false,
            committed: false,
            digests_after_activation: false,
            wanted: Wanted::new(),
            recovery: Recovery::new(),
            announce_via,
            announce: Default::default(),
        }
    }

    pub(super) async fn run(mut self, end: LinkEnd) {
        let (owner_tx, inbox) = crate::link::event_channel();
        self.link = Some(Link::new(end.control, owner_tx, self.params.keepalive).start());
        // The data sender of this end is unused: pages only flow source to target.
        drop(end.data_tx);
        let data = (end.data_rx, end.pool);
        let (mut inbox, data) = match self.faults.take() {
            Some(faults) => faults.install(&mut self.host, inbox, data),
            None => (inbox, data),
        };
        self.data = Some(data);
        let exit = match self.wait_for_slot(&mut inbox).await {
            Ok(()) => self.drive(&mut inbox).await,
            Err(exit) => exit,
        };
        match self.survive(exit, &mut inbox).await {
            Exit::HandOver { to } => self.pass_on(to, inbox).await,
            exit => {
                self.finish(exit).await;
                if let Some(link) = &self.link {
                    link.do_send(CloseLink);
                }
            }
        }
    }

    /// A post-copy migration past commitment: until the source's final `Complete`, a lost
    /// link is replaced by a recovery link (the source may still hold pages this side lacks,
    /// and it must learn that this side runs the VM before it frees its copy).
    pub(super) fn recoverable(&self) -> bool {
        self.postcopy && self.committed
    }

    /// Runs the protocol over one link until the run ends or the link is replaced.
    pub(super) async fn drive(&mut self, inbox: &mut LinkEvents) -> Exit {
        // Entered again after a recovery, the pull phase watches the new data thread.
        let mut waits = Waits {
            applied: self.plane.as_ref().filter(|_| self.pulling).map(TargetPlane::watch),
            progress: None,
            progress_done: false,
            deadline: clock::now() + self.params.step_timeout,
        };
        loop {
            let msg = match self.pending.take() {
                Some(m) => m,
                None => match self.next_message(inbox, &mut waits).await {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(exit) => return exit,
                },
            };
            waits.deadline = clock::now() + self.params.step_timeout;
            if let Err(exit) = self.on_message(msg, &mut waits).await {
                return prefer_peer_abort(exit, inbox, self.params.keepalive.timeout).await;
            }
        }
    }

    /// Waits for the next control message; what else wakes the loop is handled here (`None`)
    /// or ends the run.
    async fn next_message(
        &mut self,
        inbox: &mut LinkEvents,
        waits: &mut Waits,
    ) -> Result<Option<ControlMessage>, Exit> {
        if waits.progress.is_none() && !waits.progress_done {
            waits.progress = self.plane.as_ref().map(TargetPlane::watch);
        }
        let committed = self.committed;
        let mut halt = self.halt.clone();
        tokio::select! {
            Some(h) = self.recovery.handovers.recv(), if self.recoverable() => Err(Exit::Replaced(h)),
            halt = halted(&mut halt, committed) => Err(halt.exit()),
            ev = inbox.recv() => match ev {
                Some(LinkEvent::Received(m)) => Ok(Some(m)),
                Some(LinkEvent::Lost(e)) => Err(Exit::LinkLost(e.to_string())),
                None => Err(Exit::LinkLost("link actor stopped".into())),
            },
            Some(page) = self.wanted.pages.recv(), if self.pulling => self.request_pages(page).await.map(|()| None),
            changed = wait_changed(&mut waits.applied), if self.pulling => {
                self.on_applied(changed, inbox).await.map(|()| None)
            }
            moved = wait_changed(&mut waits.progress), if !self.pulling && waits.progress.is_some() => {
                self.on_progress(moved, waits).map(|()| None)
            }
            _ = tokio::time::sleep_until(waits.deadline), if !self.pulling => Err(Exit::Fail(AbortReason::Timeout {
                stage: self.state.name().to_string(),
                after_ms: self.params.step_timeout.as_millis() as u64,
            })),
        }
    }

    /// Batches applied before the pull (`moved`), or the data thread ended.
    fn on_progress(&mut self, moved: bool, waits: &mut Waits) -> Flow {
        if moved {
            waits.deadline = clock::now() + self.params.step_timeout;
            return Ok(());
        }
        if let Some(e) = self.plane.as_ref().and_then(|p| p.error()) {
            return Err(Exit::Fail(AbortReason::TargetFailed { detail: e.to_string() }));
        }
        // The source closed its data channel; the control link says why.
        waits.progress_done = true;
        waits.progress = None;
        Ok(())
    }

    async fn on_message(&mut self, msg: ControlMessage, waits: &mut Waits) -> Flow {
        let state = std::mem::replace(&mut self.state, ReceiverState::Done);
        let (next, action) = state.step(msg).map_err(|e| violation(e.to_string()))?;
        self.state = next;
        self.act(action, waits).await
    }

    /// Carries out one action of the protocol machine.
    async fn act(&mut self, action: ReceiverAction, waits: &mut Waits) -> Flow {
        use ReceiverAction as A;
        match action {
            A::Negotiate {
                capabilities,
                requested,
                nonce,
            } => self.negotiate(&capabilities, Some(requested), nonce).await,
            A::NegotiateRecovery { capabilities, nonce } => self.negotiate(&capabilities, None, nonce).await,
            A::Authenticate { proof } => self.authenticate(&proof),
            A::HandOver { vm, proof } => {
                self.authenticate(&proof)?;
                Err(self.hand_over(vm).await)
            }
            A::Reserve {
                config,
                commit,
                announce,
            } => {
                self.announce = announce;
                self.reserve(config, commit).await
            }
            A::NoteRound { .. } => Ok(()),
            A::Suspend {
                batches_total,
                missing,
                digests_after_activation,
            } => {
                self.digests_after_activation = digests_after_activation;
                self.suspend(batches_total, &missing).await
            }
            A::LoadState { vcpus, devices } => self.load_state(vcpus, devices).await,
            A::Activate => {
                let activated = self.activate().await;
                waits.applied = self.plane.as_ref().map(TargetPlane::watch);
                activated
            }
            A::Finish => Err(Exit::Clean),
            A::SendDigests => self.send_digests(false).await,
            A::AnswerQuery { vm } => Err(self.answer_query(vm).await),
            A::Abort { reason } => Err(Exit::Fail(reason)),
            A::Aborted { reason } => Err(Exit::PeerAborted(reason)),
        }
    }

    pub(super) async fn send(&self, msg: ControlMessage) -> Flow {
        let link = self.link.as_ref().ok_or_else(|| Exit::LinkLost("no link".into()))?;
        match link.send(SendControl(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Exit::LinkLost(e.to_string())),
            Err(e) => Err(Exit::LinkLost(e.to_string())),
        }
    }

    pub(super) fn guest(&self) -> Result<Arc<dyn Guest>, Exit> {
        self.vm
            .as_ref()
            .map(|(_, g)| Arc::clone(g))
            .ok_or_else(|| violation("no reservation yet"))
    }

    /// The reservation's data plane, or the violation of a message that needs one.
    pub(super) fn plane(&self, needed_by: &str) -> Result<&TargetPlane, Exit> {
        self.plane.as_ref().ok_or_else(|| violation(needed_by))
    }
}

/// The halt that applies to a run (committed or not); pending while there is none.
pub(super) async fn halted(rx: &mut watch::Receiver<Option<Halt>>, committed: bool) -> Halt {
    if let Ok(halt) = rx.wait_for(|h| h.is_some_and(|h| h.applies(committed))).await {
        if let Some(halt) = *halt {
            return halt;
        }
    }
    // The receiver actor, which holds the sender, is gone: nobody can halt the run any more.
    std::future::pending().await
}

async fn wait_changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
