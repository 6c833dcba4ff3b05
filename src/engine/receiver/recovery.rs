//! Post-copy recovery, on the target: a pull phase that lost its link pauses a guest that
//! lacks pages and waits for a recovery link; a fresh receiver authenticates that link and
//! hands it over; the waiting receiver carries the pull on over it.

use actix::prelude::*;
use tokio::sync::mpsc;

use super::super::ask::{ask, GUEST_ASK};
use super::activate::resume;
use super::finish::{failed, violation, Exit};
use super::run::TargetRun;
use crate::engine::{MigrationEvent, Side};
use crate::link::{CloseLink, DataReceiver, FramePool, Link, LinkEvents};
use crate::protocol::{AbortReason, ControlMessage};
use crate::vm::{HeldCopy, HeldReason, PauseVm, Vm};

/// Pauses a guest that lacks pages nobody can bring now: it must not run with holes. A guest
/// that does not pause is logged; nothing else can be done for it here.
pub(super) async fn pause_lacking_pages(vm: &Addr<Vm>) {
    if let Err(e) = ask(vm, PauseVm, "vm pause", GUEST_ASK).await {
        tracing::error!(error = %e, "the guest lacking pages did not pause");
    }
}

/// A recovery link, authenticated by a fresh receiver and handed to the receiver whose pull
/// phase lost its link.
pub struct Handover {
    link: Addr<Link>,
    inbox: LinkEvents,
    data: (DataReceiver, FramePool),
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover").finish_non_exhaustive()
    }
}

/// Where this run's recovery links arrive, and how many it has taken.
#[derive(Debug)]
pub(super) struct Recovery {
    /// Given to the host at activation (post-copy): the host keeps the only sender.
    pub(super) to: Option<mpsc::Sender<Handover>>,
    pub(super) handovers: mpsc::Receiver<Handover>,
    count: u32,
}

impl Recovery {
    pub(super) fn new() -> Self {
        let (to, handovers) = mpsc::channel(1);
        Self {
            to: Some(to),
            handovers,
            count: 0,
        }
    }
}

impl TargetRun {
    /// In the pull phase a lost link is replaced, not the end: carries on over each recovery
    /// link until the run ends for another reason.
    pub(super) async fn survive(&mut self, mut exit: Exit, inbox: &mut LinkEvents) -> Exit {
        loop {
            let handover = match exit {
                Exit::Replaced(h) => h,
                Exit::LinkLost(cause) if self.recoverable() => match self.await_recovery(&cause).await {
                    Ok(h) => h,
                    Err(e) => return e,
                },
                other => return other,
            };
            exit = match self.take_over(handover).await {
                Ok(new_inbox) => {
                    *inbox = new_inbox;
                    self.drive(inbox).await
                }
                Err(e) => e,
            };
        }
    }

    /// The pull phase lost its link: pause the guest if it lacks pages (it must not run ahead
    /// of pages nobody can bring now) and wait for a recovery link.
    async fn await_recovery(&mut self, cause: &str) -> Result<Handover, Exit> {
        if let Some(link) = self.link.take() {
            link.do_send(CloseLink);
        }
        let missing = self.vm.as_ref().map_or(0, |(_, g)| g.missing_pages());
        if let (Some((vm, _)), true) = (&self.vm, missing > 0) {
            pause_lacking_pages(vm).await;
        }
        tracing::warn!(host = %self.host_name, cause, missing, "post-copy link lost; guest paused, awaiting recovery");
        self.publish(MigrationEvent::PullInterrupted {
            side: Side::Target,
            reason: cause.to_string(),
            missing_pages: missing,
        });
        // The guest lacks pages only the source holds: nothing here can decide for it. From
        // now on the copy is held for an operator (`vm list` says so), and it still takes a
        // recovery link, automatic or `migrate --recover`, until the operator discards it,
        // which closes the host's sender.
        let vm = self.vm.as_ref().map(|(_, g)| g.config().id.0.clone());
        let hold = |detail: String| {
            if let (Some(vm), true) = (&vm, missing > 0) {
                let copy = HeldCopy {
                    reason: HeldReason::AwaitingPages,
                    detail,
                    peer: None,
                };
                self.host.hold(vm.clone(), copy);
            }
        };
        hold(format!(
            "post-copy link lost ({cause}); paused with {missing} pages missing, waiting for the source to reconnect"
        ));
        let timeout = self.params.recovery_timeout;
        let received = match tokio::time::timeout(timeout, self.recovery.handovers.recv()).await {
            Ok(r) => r,
            Err(_) => {
                let gave_up = self.gave_up(cause, missing);
                if missing == 0 {
                    return Err(Exit::RecoveryTimeout(gave_up));
                }
                tracing::warn!(host = %self.host_name, vm = ?vm, reason = %gave_up, "incoming post-copy stopped; copy held");
                self.publish(MigrationEvent::TargetStopped {
                    reason: gave_up.clone(),
                });
                hold(gave_up);
                self.recovery.handovers.recv().await
            }
        };
        match received {
            Some(h) => {
                if let Some(vm) = vm {
                    self.host.unhold(vm);
                }
                Ok(h)
            }
            None => Err(Exit::Discarded),
        }
    }

    /// Why no recovery came in time, and where the VM is now.
    fn gave_up(&self, cause: &str, missing: u64) -> String {
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
        format!(
            "post-copy link lost ({cause}) and no recovery link came within {:.1} s; {whereabouts}",
            self.params.recovery_timeout.as_secs_f64(),
        )
    }

    /// Carries the pull phase on over a recovery link: the data plane reads from it, the
    /// source learns which pages are still missing, and the guest runs again.
    async fn take_over(&mut self, h: Handover) -> Result<LinkEvents, Exit> {
        if let Some(old) = self.link.replace(h.link) {
            old.do_send(CloseLink);
        }
        let guest = self.guest()?;
        let (data_rx, pool) = h.data;
        let plane = self.plane.as_mut().ok_or_else(|| violation("no data plane"))?;
        plane.reattach(data_rx, pool).map_err(failed)?;
        let missing = guest.missing_set();
        self.send(ControlMessage::Resumed {
            missing: missing.to_bytes(),
        })
        .await?;
        if !guest.is_running() {
            if let Some((vm, _)) = &self.vm {
                resume(vm).await?;
            }
        }
        self.recovery.count += 1;
        tracing::info!(host = %self.host_name, recoveries = self.recovery.count, missing = missing.len(), "post-copy pull resumed on a new link");
        // Every page may be here already: then `Complete` and the digests go out again.
        self.pulling = true;
        self.check_pull_done().await?;
        self.publish(MigrationEvent::PullResumed {
            side: Side::Target,
            recoveries: self.recovery.count,
            missing_pages: missing.len(),
        });
        Ok(h.inbox)
    }

    /// A recovery link, authenticated: find the receiver whose pull phase lost its link.
    pub(super) async fn hand_over(&mut self, vm: String) -> Exit {
        if let Some(to) = self.host.find_recoverable(vm.clone()).await {
            return Exit::HandOver { to };
        }
        let reason = AbortReason::TargetFailed {
            detail: format!(
                "no post-copy migration of VM {vm:?} awaits recovery on host {}",
                self.host_name
            ),
        };
        let _ = self.send(ControlMessage::Refuse { reason }).await;
        Exit::Clean
    }

    /// The link, its inbox and its data half go on in the receiver that awaits them.
    pub(super) async fn pass_on(&mut self, to: mpsc::Sender<Handover>, inbox: LinkEvents) {
        if let (Some(link), Some(data)) = (self.link.take(), self.data.take()) {
            if let Err(e) = to.send(Handover { link, inbox, data }).await {
                // That receiver ended meanwhile: closing the link tells the source.
                e.0.link.do_send(CloseLink);
            }
        }
    }
}
