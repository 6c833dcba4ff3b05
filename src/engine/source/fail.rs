//! Why a source run stops early, and the rollback: before commitment the VM runs on the source
//! again; after it, the VM stays where the protocol says it is (see
//! [`super::machine::SourceMachine::location`]).

use std::time::Duration;

use super::SourceRun;
use crate::dirty::StopDirtyLog;
use crate::engine::ask::{ask, GUEST_ASK};
use crate::engine::error::{EngineError, Side};
use crate::engine::report::{Outcome, VmLocation};
use crate::engine::stage::Stage;
use crate::protocol::{AbortReason, ControlMessage};
use crate::vm::{EndOutgoing, ResumeVm};

/// Why a run stopped early.
#[derive(Debug)]
pub(super) enum Fail {
    Cancelled,
    Aborted {
        side: Side,
        reason: AbortReason,
    },
    Negotiation(crate::protocol::NegotiationError),
    Link(String),
    Protocol(String),
    Local(String),
    Timeout(&'static str),
    RecoveryTimeout {
        cause: String,
        last: String,
        after: Duration,
    },
    /// The target's digests differ from the source's memory at the pause.
    Verification {
        mismatched: Vec<u64>,
        count: u64,
    },
}

impl Fail {
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            Fail::Cancelled => Outcome::Cancelled,
            Fail::Aborted { .. } | Fail::Negotiation(_) => Outcome::Aborted,
            _ => Outcome::Failed,
        }
    }

    /// What the target is told.
    pub(super) fn reason_for_peer(&self) -> Option<AbortReason> {
        Some(match self {
            Fail::Cancelled => AbortReason::Cancelled,
            Fail::Aborted {
                side: Side::Source,
                reason,
            } => reason.clone(),
            Fail::Aborted { side: Side::Target, .. } => return None,
            Fail::Negotiation(e) => e.clone().into(),
            Fail::Link(_) | Fail::RecoveryTimeout { .. } => return None,
            Fail::Protocol(d) => AbortReason::ProtocolViolation { detail: d.clone() },
            Fail::Local(d) => AbortReason::SourceFailed { detail: d.clone() },
            Fail::Timeout(stage) => AbortReason::Timeout {
                stage: stage.to_string(),
                after_ms: 0,
            },
            Fail::Verification { mismatched, count } => AbortReason::VerificationFailed {
                pages: *count,
                first: mismatched.clone(),
            },
        })
    }

    pub(super) fn into_error(self, stage: Option<Stage>, id: u64) -> EngineError {
        let stage_name = stage.map(|s| s.name()).unwrap_or("start").to_string();
        match self {
            Fail::Cancelled => EngineError::Aborted {
                side: Side::Source,
                reason: AbortReason::Cancelled,
            },
            Fail::Aborted { side, reason } => EngineError::Aborted { side, reason },
            Fail::Negotiation(e) => EngineError::Negotiation(e),
            Fail::Link(detail) => EngineError::Link {
                stage: stage_name,
                detail,
            },
            Fail::Protocol(d) => EngineError::Protocol(d),
            Fail::Local(d) => EngineError::Internal(format!("migration {id}: {d}")),
            Fail::Timeout(s) => EngineError::Timeout {
                what: format!("target in {s}"),
                after_ms: 0,
            },
            Fail::RecoveryTimeout { cause, last, after } => EngineError::PostcopyRecovery {
                cause,
                last,
                after_ms: after.as_millis() as u64,
            },
            Fail::Verification { mismatched, count } => EngineError::Verification {
                pages: count,
                first: mismatched,
            },
        }
    }
}

pub(super) fn local<E: std::fmt::Display>(e: E) -> Fail {
    Fail::Local(e.to_string())
}

impl SourceRun {
    /// Rolls back before commitment; after it, leaves the VM where the protocol says it is.
    pub(super) async fn fail(&mut self, fail: Fail) -> (Outcome, Option<String>, VmLocation) {
        let committed = !self.cancellable();
        if let Some(plane) = &self.plane {
            plane.abort();
        }
        if let Some(reason) = fail.reason_for_peer() {
            // After commitment the target owns the VM: an Abort could only make it drop it.
            if !matches!(fail, Fail::Link(_)) && !committed {
                let _ = self.send(ControlMessage::Abort { reason }).await;
            }
        }
        if let Some(tracker) = self.tracker.take() {
            let _ = ask(&tracker, StopDirtyLog, "dirty log stop", GUEST_ASK).await;
        }
        let outcome = fail.outcome();
        let error = fail.into_error(self.machine.stage(), self.s.id).to_string();
        let location = self.machine.location(committed);
        if location == VmLocation::Source {
            // Before commitment the source copy is the only one: run it again.
            if self.paused_by_us {
                if let Err(e) = ask(&self.s.vm, ResumeVm, "vm resume", GUEST_ASK).await {
                    tracing::error!(error = %e, "rollback: the source VM did not resume");
                }
            }
            if let Err(e) = ask(&self.s.vm, EndOutgoing { moved: false }, "vm end outgoing", GUEST_ASK).await {
                tracing::error!(error = %e, "rollback: the source VM was not handed back");
            }
        }
        (if committed { Outcome::Failed } else { outcome }, Some(error), location)
    }
}
