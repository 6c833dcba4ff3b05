//! Errors an embedder sees.

use crate::format::FormatError;
use crate::protocol::{AbortReason, NegotiationError};

/// Which side a reason came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source host.
    Source,
    /// The target host.
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Errors of the engine's API and of migrations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// No host of that name.
    #[error("no host named {0:?}")]
    UnknownHost(String),
    /// A host of that name exists already.
    #[error("a host named {0:?} exists already")]
    DuplicateHost(String),
    /// No VM of that id on the host.
    #[error("no VM {vm:?} on host {host:?}")]
    UnknownVm {
        /// Host.
        host: String,
        /// VM id.
        vm: String,
    },
    /// A VM with that id exists already.
    #[error("VM {0:?} exists already")]
    DuplicateVm(String),
    /// No migration with that id.
    #[error("no migration {0}")]
    UnknownMigration(u64),
    /// The VM configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(#[from] FormatError),
    /// The host has not the memory for the VM.
    #[error("host {host:?} has {available_bytes} bytes free, VM needs {requested_bytes}")]
    InsufficientMemory {
        /// Host.
        host: String,
        /// Bytes needed.
        requested_bytes: u64,
        /// Bytes free.
        available_bytes: u64,
    },
    /// Negotiation with the target failed; nothing was reserved.
    #[error("negotiation refused: {0}")]
    Negotiation(#[from] NegotiationError),
    /// A side aborted with a typed reason.
    #[error("aborted by the {side}: {reason}")]
    Aborted {
        /// Who aborted.
        side: Side,
        /// Why.
        reason: AbortReason,
    },
    /// The VM or its backend failed.
    #[error("VM error: {0}")]
    Vm(String),
    /// The link to the peer failed.
    #[error("link failed in {stage}: {detail}")]
    Link {
        /// Stage.
        stage: String,
        /// What happened.
        detail: String,
    },
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Cancel came too late: the target owns the VM.
    #[error("migration {0} is past commitment and cannot be cancelled")]
    TooLateToCancel(u64),
    /// The engine's actor system is gone.
    #[error("engine stopped")]
    EngineStopped,
    /// An actor did not answer in time.
    #[error("{what} did not answer within {after_ms} ms")]
    Timeout {
        /// What was asked.
        what: String,
        /// Milliseconds waited.
        after_ms: u64,
    },
    /// Post-copy recovery did not happen in time.
    #[error(
        "post-copy recovery failed: the link was lost in the pull phase ({cause}) and no new link \
         carried it on within {after_ms} ms (last attempt: {last}); the VM stays paused on the \
         target and the source keeps the pages it lacks"
    )]
    PostcopyRecovery {
        /// What broke the link.
        cause: String,
        /// Why the last reconnection attempt failed.
        last: String,
        /// The recovery timeout.
        after_ms: u64,
    },
    /// An operator action that does not apply to the VM in its state.
    #[error("VM {vm:?} is {state}: {action} does not apply{hint}")]
    ActionNotApplicable {
        /// VM id.
        vm: String,
        /// Its state.
        state: String,
        /// The refused action.
        action: &'static str,
        /// What does apply, if anything (starts with "; ").
        hint: String,
    },
    /// A fenced resume was refused: the peer holds the VM, or could not be asked.
    #[error("resume of VM {vm:?} refused: {detail}")]
    Fenced {
        /// VM id.
        vm: String,
        /// What the peer said, or why it could not be asked.
        detail: String,
    },
    /// The host is shutting down and takes no new work.
    #[error("host {0:?} is shutting down")]
    ShuttingDown(String),
    /// The target's copy differs from the source's memory at the pause.
    #[error("verification failed: {pages} pages differ (first: {first:?})")]
    Verification {
        /// How many pages differ.
        pages: u64,
        /// The first of them (at most 64).
        first: Vec<u64>,
    },
    /// A migration's bandwidth floor cannot be assured on its source host: the floors of the
    /// host's queued and running migrations leave less of its budget, or the migration's own
    /// cap is lower. Nothing was started.
    #[error(
        "host {host:?} cannot assure {requested_bytes_per_sec} bytes/s to this migration: only \
         {available_bytes_per_sec} bytes/s of its bandwidth budget are free of other migrations' \
         floors (or within the migration's own cap)"
    )]
    FloorUnavailable {
        /// The source host.
        host: String,
        /// The floor asked for.
        requested_bytes_per_sec: u64,
        /// What could still be assured.
        available_bytes_per_sec: u64,
    },
    /// A data-plane or internal failure.
    #[error("{0}")]
    Internal(String),
}

impl From<actix::MailboxError> for EngineError {
    fn from(e: actix::MailboxError) -> Self {
        match e {
            actix::MailboxError::Closed => EngineError::EngineStopped,
            actix::MailboxError::Timeout => EngineError::Timeout {
                what: "actor".into(),
                after_ms: 0,
            },
        }
    }
}
