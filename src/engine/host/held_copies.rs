//! The Host's side of held copies: keeping them, answering a peer's fence, and the operator's
//! discard, resume and recovery hand-over (see [`crate::vm::HeldCopy`]).

use actix::prelude::*;

use super::super::ask::{ask, GUEST_ASK};
use super::super::error::EngineError;
use super::{Host, COMMITTED_MEMORY};
use crate::vm::{EndOutgoing, GetVmInfo, HeldCopy, OperatorAction, ResumeVm, StopVm, Vm, VmInfo};

/// Keep a copy left behind by a migration that failed past commitment; only an operator action
/// ends it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HoldVm {
    /// The VM.
    pub vm: String,
    /// Why, and where the other copy may be.
    pub copy: HeldCopy,
}

impl Handler<HoldVm> for Host {
    type Result = ();
    fn handle(&mut self, msg: HoldVm, _: &mut Self::Context) {
        if self.vms.contains_key(&msg.vm) {
            tracing::warn!(
                host = %self.config.name,
                vm = %msg.vm,
                state = msg.copy.reason.name(),
                detail = %msg.copy.detail,
                "copy held until an operator acts"
            );
            self.held.insert(msg.vm, msg.copy);
        }
    }
}

/// A held copy is no longer held: a recovery link came for it after all.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct UnholdVm(pub String);

impl Handler<UnholdVm> for Host {
    type Result = ();
    fn handle(&mut self, msg: UnholdVm, _: &mut Self::Context) {
        self.held.remove(&msg.0);
    }
}

/// The held record of a VM, if it is held.
#[derive(Debug, Message)]
#[rtype(result = "Option<HeldCopy>")]
pub struct GetHeld(pub String);

impl Handler<GetHeld> for Host {
    type Result = Option<HeldCopy>;
    fn handle(&mut self, msg: GetHeld, _: &mut Self::Context) -> Self::Result {
        self.held.get(&msg.0).cloned()
    }
}

impl Host {
    /// The held copy of `vm`, if `action` applies to it.
    fn held_for(&self, vm: &str, action: OperatorAction) -> Result<HeldCopy, EngineError> {
        match self.held.get(vm) {
            Some(h) if h.reason.actions().contains(&action) => Ok(h.clone()),
            Some(h) => Err(EngineError::ActionNotApplicable {
                vm: vm.to_string(),
                state: h.reason.name().to_string(),
                action: action.name(),
                hint: format!("; it takes {}", h.reason.actions_text()),
            }),
            None if self.vms.contains_key(vm) => Err(EngineError::ActionNotApplicable {
                vm: vm.to_string(),
                state: "not held".to_string(),
                action: action.name(),
                hint: "; only a copy left behind by a failed migration takes it".to_string(),
            }),
            None => Err(EngineError::UnknownVm {
                host: self.config.name.clone(),
                vm: vm.to_string(),
            }),
        }
    }
}

/// Destroy a held copy (operator action `discard`).
#[derive(Debug, Message)]
#[rtype(result = "Result<HeldCopy, EngineError>")]
pub struct DiscardVm(pub String);

impl Handler<DiscardVm> for Host {
    type Result = Result<HeldCopy, EngineError>;
    fn handle(&mut self, msg: DiscardVm, _: &mut Self::Context) -> Self::Result {
        let held = self.held_for(&msg.0, OperatorAction::Discard)?;
        self.held.remove(&msg.0);
        // A target copy awaiting pages has a receiver waiting for a recovery link: dropping the
        // only sender ends that wait.
        self.recoverable.remove(&msg.0);
        if let Some((vm, bytes)) = self.vms.remove(&msg.0) {
            self.committed_bytes -= bytes;
            vm.do_send(StopVm);
        }
        tracing::warn!(host = %self.config.name, vm = %msg.0, state = held.reason.name(), "held copy discarded by the operator");
        Ok(held)
    }
}

/// Check that `resume` applies to a held copy (the fence runs next, in the engine).
#[derive(Debug, Message)]
#[rtype(result = "Result<HeldCopy, EngineError>")]
pub struct CheckResumable(pub String);

impl Handler<CheckResumable> for Host {
    type Result = Result<HeldCopy, EngineError>;
    fn handle(&mut self, msg: CheckResumable, _: &mut Self::Context) -> Self::Result {
        self.held_for(&msg.0, OperatorAction::Resume)
    }
}

/// Check that `recover` applies to a held copy, and release it from being held: a recovery
/// run takes it over (and holds it again if it fails).
#[derive(Debug, Message)]
#[rtype(result = "Result<(HeldCopy, Addr<Vm>), EngineError>")]
pub struct TakeForRecovery(pub String);

impl Handler<TakeForRecovery> for Host {
    type Result = Result<(HeldCopy, Addr<Vm>), EngineError>;
    fn handle(&mut self, msg: TakeForRecovery, _: &mut Self::Context) -> Self::Result {
        let held = self.held_for(&msg.0, OperatorAction::Recover)?;
        if held.reason != crate::vm::HeldReason::Stale {
            return Err(EngineError::ActionNotApplicable {
                vm: msg.0,
                state: held.reason.name().to_string(),
                action: OperatorAction::Recover.name(),
                hint: "; recover runs on the source's host, which holds the missing pages".into(),
            });
        }
        let vm = self
            .vms
            .get(&msg.0)
            .map(|(a, _)| a.clone())
            .ok_or_else(|| EngineError::Internal("held VM without actor".into()))?;
        self.held.remove(&msg.0);
        Ok((held, vm))
    }
}

/// Run a held copy again, once the fence said the peer does not hold the VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, EngineError>")]
pub struct ResumeHeldVm(pub String);

impl Handler<ResumeHeldVm> for Host {
    type Result = ResponseActFuture<Self, Result<VmInfo, EngineError>>;
    fn handle(&mut self, msg: ResumeHeldVm, _: &mut Self::Context) -> Self::Result {
        let checked = self.held_for(&msg.0, OperatorAction::Resume).and_then(|_| {
            self.vms
                .get(&msg.0)
                .map(|(a, _)| a.clone())
                .ok_or(EngineError::Internal("held VM without actor".into()))
        });
        let vm = match checked {
            Ok(vm) => vm,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let id = msg.0;
        let run = async move {
            ask(&vm, EndOutgoing { moved: false }, "vm end outgoing", GUEST_ASK)
                .await?
                .map_err(|e| EngineError::Vm(e.to_string()))?;
            ask(&vm, ResumeVm, "vm resume", GUEST_ASK)
                .await?
                .map_err(|e| EngineError::Vm(e.to_string()))?;
            Ok::<_, EngineError>(ask(&vm, GetVmInfo, "vm info", GUEST_ASK).await?)
        };
        Box::pin(run.into_actor(self).map(move |r, act, _| {
            if r.is_ok() {
                act.held.remove(&id);
                tracing::warn!(host = %act.config.name, vm = %id, "held copy resumed by the operator");
            }
            r
        }))
    }
}

/// What this host holds of `vm`, for a peer's fence: `absent`, or a state name.
#[derive(Debug, Message)]
#[rtype(result = "String")]
pub struct QueryVmState(pub String);

impl Handler<QueryVmState> for Host {
    type Result = ResponseFuture<String>;
    fn handle(&mut self, msg: QueryVmState, _: &mut Self::Context) -> Self::Result {
        if let Some(h) = self.held.get(&msg.0) {
            let state = h.reason.name().to_string();
            return Box::pin(async move { state });
        }
        let Some((vm, _)) = self.vms.get(&msg.0).cloned() else {
            // Taken past commitment, then gone (moved on, deleted, discarded): it may run
            // somewhere else now.
            let state = if self.committed_here.contains(&msg.0) {
                "left-after-commit"
            } else {
                "absent"
            };
            return Box::pin(async move { state.to_string() });
        };
        Box::pin(async move {
            match vm.send(GetVmInfo).await {
                Ok(info) => info.state.name().to_string(),
                // The actor stopped meanwhile: the VM is on its way out of this host.
                Err(_) => "stopping".to_string(),
            }
        })
    }
}

/// This host took `0` past `Commit`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RecordCommitted(pub String);

impl Handler<RecordCommitted> for Host {
    type Result = ();
    fn handle(&mut self, msg: RecordCommitted, _: &mut Self::Context) {
        self.committed_here.retain(|v| *v != msg.0);
        self.committed_here.push_back(msg.0);
        while self.committed_here.len() > COMMITTED_MEMORY {
            self.committed_here.pop_front();
        }
    }
}
