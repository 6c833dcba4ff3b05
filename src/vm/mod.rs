//! The Vm actor: one VM's lifecycle on one host, and its guest.
//!
//! Lifecycle transitions are pure ([`Lifecycle::apply`]); the actor applies them and drives the
//! guest. A VM being migrated out is `Outgoing`: only the migration that owns it may pause,
//! resume or release it, which is how the engine keeps at most one copy running.

mod actor;
mod held;
mod lifecycle;

pub use actor::{
    BeginOutgoing, EndOutgoing, GetGuest, GetVmInfo, LoadVmState, PauseVm, ResumeVm, SaveVmState, StopVm, Vm, VmError,
    VmInfo,
};
pub use held::{HeldCopy, HeldReason, OperatorAction, Peer};
pub use lifecycle::{Lifecycle, LifecycleCommand, LifecycleError};
