//! How a run ends, and what it leaves on the host: an uncommitted reservation is released, a
//! committed copy that cannot run is held for an operator, the source learns why if it can.

use std::time::Duration;

use super::recovery::{pause_lacking_pages, Handover};
use super::run::TargetRun;
use super::Halt;
use crate::clock;
use crate::engine::MigrationEvent;
use crate::link::{LinkEvent, LinkEvents};
use crate::protocol::{AbortReason, ControlMessage};
use crate::vm::{HeldCopy, HeldReason};

/// How the target's run ended.
#[derive(Debug)]
pub(super) enum Exit {
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
        to: tokio::sync::mpsc::Sender<Handover>,
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

pub(super) fn violation(detail: impl Into<String>) -> Exit {
    Exit::Fail(AbortReason::ProtocolViolation { detail: detail.into() })
}

/// A local failure of the target, told to the source as `TargetFailed`.
pub(super) fn failed(detail: impl ToString) -> Exit {
    Exit::Fail(AbortReason::TargetFailed {
        detail: detail.to_string(),
    })
}

impl Halt {
    /// How a run told to halt ends.
    pub(super) fn exit(self) -> Exit {
        match self {
            Halt::ShuttingDown => failed("target host is shutting down"),
            Halt::Crashed => Exit::Crash,
        }
    }
}

impl Exit {
    /// Why the migration ended early, for the log and the `TargetStopped` event; `None` for
    /// an end that is no failure.
    fn why(&self) -> Option<String> {
        match self {
            Exit::Clean | Exit::Answered => None,
            Exit::Fail(reason) => Some(format!("target aborted: {reason}")),
            Exit::PeerAborted(reason) => Some(format!("source aborted: {reason}")),
            Exit::LinkLost(e) => Some(format!("link lost: {e}")),
            Exit::Crash => Some("injected crash: the target vanished".to_string()),
            Exit::RecoveryTimeout(why) => Some(why.clone()),
            Exit::Discarded => Some("the operator discarded the copy awaiting pages".to_string()),
            // The link went on to another receiver, which reports for it.
            Exit::HandOver { .. } | Exit::Replaced(_) => None,
        }
    }
}

/// What becomes of a committed copy when its run ends with `exit`: held for an operator if it
/// does not run (its activation failed, or it lacks pages), else nothing.
fn held_reason(exit: &Exit, missing_pages: u64, running: bool) -> Option<HeldReason> {
    if matches!(exit, Exit::Clean | Exit::Answered) || (missing_pages == 0 && running) {
        return None;
    }
    Some(if missing_pages > 0 {
        HeldReason::AwaitingPages
    } else {
        HeldReason::CommittedUnconfirmed
    })
}

/// True if the end was a source that could not prove the cluster key (logged as a warning:
/// someone tried to migrate into this host without it).
fn unauthenticated(why: &str) -> bool {
    why.contains("authentication failed") || why.contains("requires a cluster key")
}

/// A failure that comes from the source closing the link may have overtaken the source's
/// `Abort` (the data channel and a failed send see the close at once; the Abort frame carries
/// the link's latency). The Link delivers every queued frame before it reports the loss, so
/// reading the inbox to its end finds the Abort if there is one.
pub(super) async fn prefer_peer_abort(exit: Exit, inbox: &mut LinkEvents, bound: Duration) -> Exit {
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

impl TargetRun {
    pub(super) async fn finish(&mut self, exit: Exit) {
        if let Exit::Fail(reason) = &exit {
            // Best effort: the source learns why; if the link is gone it learns from that.
            let _ = self.send(ControlMessage::Abort { reason: reason.clone() }).await;
        }
        let why = exit.why();
        if self.recoverable() {
            if let Some((_, guest)) = &self.vm {
                self.host.unregister_recoverable(guest.config().id.0.clone());
            }
        }
        // Stop the data plane before anything is released: it writes into guest memory.
        self.plane = None;
        if let Some((vm, guest)) = self.vm.take() {
            let id = guest.config().id.0.clone();
            if self.committed {
                let missing = guest.missing_pages();
                if missing > 0 {
                    // Post-copy interrupted: the source never resumes its stale copy, and
                    // this one never runs with holes.
                    pause_lacking_pages(&vm).await;
                }
                // A discarded copy is gone already and the host ignores this.
                if let Some(reason) = held_reason(&exit, missing, guest.is_running()) {
                    let detail = why.clone().unwrap_or_default();
                    self.host.hold(
                        id,
                        HeldCopy {
                            reason,
                            detail,
                            peer: None,
                        },
                    );
                }
            } else {
                self.host.release(id);
            }
        }
        // After the release above, so a listener that then asks the host sees it done.
        match &why {
            Some(why) if unauthenticated(why) => {
                tracing::warn!(host = %self.host_name, reason = %why, "refused an unauthenticated migration");
            }
            Some(why) => {
                tracing::info!(host = %self.host_name, reason = %why, committed = self.committed, "incoming migration ended early");
            }
            None => tracing::info!(host = %self.host_name, "incoming migration completed"),
        }
        if let Some(why) = why {
            self.publish(MigrationEvent::TargetStopped { reason: why });
        }
    }

    /// Publishes an event on the source's stream, if this side shares it (in-process).
    pub(super) fn publish(&self, event: MigrationEvent) {
        if let Some(events) = &self.params.events {
            let _ = events.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_a_failure_has_a_reason() {
        assert_eq!(Exit::Clean.why(), None);
        assert_eq!(Exit::Answered.why(), None);
        let why = Exit::Fail(AbortReason::Cancelled).why().expect("a failure says why");
        assert!(why.starts_with("target aborted: "), "{why}");
        let why = Exit::PeerAborted(AbortReason::Cancelled).why().expect("says why");
        assert!(why.starts_with("source aborted: "), "{why}");
        assert_eq!(Exit::LinkLost("gone".into()).why().as_deref(), Some("link lost: gone"));
        assert!(Exit::Crash.why().is_some_and(|w| w.contains("crash")));
        assert!(Exit::Discarded.why().is_some_and(|w| w.contains("discarded")));
        assert_eq!(Exit::RecoveryTimeout("late".into()).why().as_deref(), Some("late"));
    }

    #[test]
    fn test_halts_end_as_a_failure_or_a_crash() {
        assert!(matches!(
            Halt::ShuttingDown.exit(),
            Exit::Fail(AbortReason::TargetFailed { detail }) if detail.contains("shutting down")
        ));
        assert!(matches!(Halt::Crashed.exit(), Exit::Crash));
    }

    #[test]
    fn test_a_committed_copy_is_held_only_if_it_cannot_run() {
        let lost = Exit::LinkLost("gone".into());
        assert_eq!(held_reason(&lost, 0, true), None, "running with every page");
        assert_eq!(held_reason(&lost, 3, true), Some(HeldReason::AwaitingPages));
        assert_eq!(held_reason(&lost, 3, false), Some(HeldReason::AwaitingPages));
        assert_eq!(held_reason(&lost, 0, false), Some(HeldReason::CommittedUnconfirmed));
        assert_eq!(
            held_reason(&Exit::Crash, 0, false),
            Some(HeldReason::CommittedUnconfirmed)
        );
        // A clean end or an answered fence never holds anything.
        assert_eq!(held_reason(&Exit::Clean, 3, false), None);
        assert_eq!(held_reason(&Exit::Answered, 0, false), None);
    }

    #[test]
    fn test_unauthenticated_ends_are_told_apart() {
        let reason = AbortReason::Unauthenticated {
            detail: "bad proof".into(),
        };
        let why = Exit::Fail(reason).why().expect("says why");
        assert!(unauthenticated(&why), "{why}");
        assert!(unauthenticated("link lost: the peer requires a cluster key"));
        assert!(!unauthenticated("link lost: link closed by peer"));
    }

    #[tokio::test]
    async fn test_an_abort_queued_behind_a_lost_link_wins() {
        let (tx, mut inbox) = crate::link::event_channel();
        let abort = ControlMessage::Abort {
            reason: AbortReason::Cancelled,
        };
        tx.send(LinkEvent::Received(ControlMessage::Commit))
            .await
            .expect("queued");
        tx.send(LinkEvent::Received(abort)).await.expect("queued");
        let exit = prefer_peer_abort(Exit::LinkLost("closed".into()), &mut inbox, Duration::from_secs(5)).await;
        assert!(matches!(exit, Exit::PeerAborted(AbortReason::Cancelled)), "{exit:?}");
    }

    #[tokio::test]
    async fn test_other_exits_do_not_wait_for_an_abort() {
        let (tx, mut inbox) = crate::link::event_channel();
        // Nothing is ever sent: a wait here would hang until the bound.
        let exit = prefer_peer_abort(Exit::Clean, &mut inbox, Duration::from_secs(3600)).await;
        assert!(matches!(exit, Exit::Clean));
        drop(tx);
        let exit = prefer_peer_abort(Exit::LinkLost("closed".into()), &mut inbox, Duration::from_secs(3600)).await;
        assert!(matches!(exit, Exit::LinkLost(_)), "a closed inbox holds no abort");
    }
}
