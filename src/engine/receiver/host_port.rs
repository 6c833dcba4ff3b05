//! What a receiver asks of its host, and the port it asks through.
//!
//! The messages are defined here, on the receiver's side, and the Host implements them: the
//! host depends on this module, never the other way round. A receiver holds a [`HostPort`],
//! one [`Recipient`] per message, so it can be tested, or decorated (a host that refuses a
//! reservation), without a Host.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::super::ask::AskError;
use super::Handover;
use crate::format::VmConfig;
use crate::protocol::AbortReason;
use crate::vm::{HeldCopy, Vm};
use crate::vmm::{Guest, GuestDecorator};

/// A reserved incoming VM: its actor (state `Incoming`) and its guest.
pub type Reservation = (Addr<Vm>, Arc<dyn Guest>);

/// Admit and reserve an incoming VM: the receiver's reservation stage.
#[derive(Message)]
#[rtype(result = "Result<Reservation, AbortReason>")]
pub struct ReserveIncoming {
    /// The incoming VM.
    pub config: VmConfig,
    /// How its memory is committed; see [`crate::vmm::MemoryCommit`].
    pub commit: crate::vmm::MemoryCommit,
    /// Wraps the reserved guest before its VM actor starts (fault injection; `None` in
    /// production).
    pub decorate: Option<GuestDecorator>,
}

impl std::fmt::Debug for ReserveIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReserveIncoming")
            .field("config", &self.config)
            .field("commit", &self.commit)
            .field("decorated", &self.decorate.is_some())
            .finish()
    }
}

/// Give back an incoming reservation that never became the VM's home (the migration failed
/// before commitment). Stops its VM actor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReleaseIncoming(pub String);

/// Keep an incoming copy past commitment that neither runs nor can be finished; only an
/// operator action (or a recovery link) ends it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HoldIncoming {
    /// The VM.
    pub vm: String,
    /// Why, and where the other copy may be.
    pub copy: HeldCopy,
}

/// A held incoming copy is no longer held: a recovery link came for it after all.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct UnholdIncoming(pub String);

/// This host took `0` past `Commit`: a fence asking later must not hear `absent`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct IncomingCommitted(pub String);

/// A post-copy migration of `vm` entered its pull phase: a recovery link for it goes to `to`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RegisterRecoverable {
    /// The VM.
    pub vm: String,
    /// Where its receiver takes a new link.
    pub to: mpsc::Sender<Handover>,
}

/// The pull phase of `0` ended (completed or given up).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct UnregisterRecoverable(pub String);

/// Where a recovery link for `0` goes, if its migration is in its pull phase here.
#[derive(Debug, Message)]
#[rtype(result = "Option<mpsc::Sender<Handover>>")]
pub struct FindRecoverable(pub String);

/// What this host holds of `0`, for a peer's fence: `absent`, or a state name.
#[derive(Debug, Message)]
#[rtype(result = "String")]
pub struct GetVmStatus(pub String);

/// An incoming migration ended: a queued one may start.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct IncomingEnded;

/// A receiver's way to its host: one recipient per message above.
#[derive(Clone)]
pub struct HostPort {
    pub(super) reserve: Recipient<ReserveIncoming>,
    release: Recipient<ReleaseIncoming>,
    hold: Recipient<HoldIncoming>,
    unhold: Recipient<UnholdIncoming>,
    committed: Recipient<IncomingCommitted>,
    register: Recipient<RegisterRecoverable>,
    unregister: Recipient<UnregisterRecoverable>,
    find: Recipient<FindRecoverable>,
    status: Recipient<GetVmStatus>,
    ended: Recipient<IncomingEnded>,
}

impl std::fmt::Debug for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPort").finish_non_exhaustive()
    }
}

impl HostPort {
    /// The port of an actor that handles every message a receiver sends.
    pub fn of<H>(host: Addr<H>) -> Self
    where
        H: Actor<Context = Context<H>>
            + Handler<ReserveIncoming>
            + Handler<ReleaseIncoming>
            + Handler<HoldIncoming>
            + Handler<UnholdIncoming>
            + Handler<IncomingCommitted>
            + Handler<RegisterRecoverable>
            + Handler<UnregisterRecoverable>
            + Handler<FindRecoverable>
            + Handler<GetVmStatus>
            + Handler<IncomingEnded>,
    {
        Self {
            reserve: host.clone().recipient(),
            release: host.clone().recipient(),
            hold: host.clone().recipient(),
            unhold: host.clone().recipient(),
            committed: host.clone().recipient(),
            register: host.clone().recipient(),
            unregister: host.clone().recipient(),
            find: host.clone().recipient(),
            status: host.clone().recipient(),
            ended: host.recipient(),
        }
    }

    /// Reserves an incoming VM, waiting at most `bound` for the host's answer.
    pub(super) async fn reserve(&self, msg: ReserveIncoming, bound: Duration) -> Result<Reservation, AbortReason> {
        let what = "reservation";
        let unanswered = match tokio::time::timeout(bound, self.reserve.send(msg)).await {
            Ok(Ok(answer)) => return answer,
            Ok(Err(MailboxError::Closed)) => AskError::Stopped { what },
            Ok(Err(MailboxError::Timeout)) | Err(_) => AskError::Timeout { what, timeout: bound },
        };
        Err(AbortReason::TargetFailed {
            detail: unanswered.to_string(),
        })
    }

    pub(super) fn release(&self, vm: String) {
        self.release.do_send(ReleaseIncoming(vm));
    }

    pub(super) fn hold(&self, vm: String, copy: HeldCopy) {
        self.hold.do_send(HoldIncoming { vm, copy });
    }

    pub(super) fn unhold(&self, vm: String) {
        self.unhold.do_send(UnholdIncoming(vm));
    }

    pub(super) fn committed(&self, vm: String) {
        self.committed.do_send(IncomingCommitted(vm));
    }

    pub(super) fn register_recoverable(&self, vm: String, to: mpsc::Sender<Handover>) {
        self.register.do_send(RegisterRecoverable { vm, to });
    }

    pub(super) fn unregister_recoverable(&self, vm: String) {
        self.unregister.do_send(UnregisterRecoverable(vm));
    }

    /// The receiver awaiting a recovery link for `vm`, if any (or if the host is gone, none).
    pub(super) async fn find_recoverable(&self, vm: String) -> Option<mpsc::Sender<Handover>> {
        self.find.send(FindRecoverable(vm)).await.ok().flatten()
    }

    pub(super) async fn vm_status(&self, vm: String) -> Result<String, MailboxError> {
        self.status.send(GetVmStatus(vm)).await
    }

    pub(super) fn ended(&self) {
        self.ended.do_send(IncomingEnded);
    }
}
