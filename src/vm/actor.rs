//! The Vm actor.

use std::sync::Arc;

use actix::prelude::*;

use super::lifecycle::{Lifecycle, LifecycleCommand, LifecycleError};
use crate::format::{DeviceState, NativeLayout, VcpuState, VmConfig};
use crate::vmm::{Guest, GuestStats, VmmError};

/// Errors of a VM command: a refused transition or a backend failure.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The lifecycle forbids it.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// The backend failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// One VM on one host.
#[derive(Debug)]
pub struct Vm {
    guest: Arc<dyn Guest>,
    state: Lifecycle,
}

impl Vm {
    /// A VM around `guest`, in `state`.
    pub fn new(guest: Arc<dyn Guest>, state: Lifecycle) -> Self {
        Self { guest, state }
    }

    fn transition(&mut self, command: LifecycleCommand) -> Result<Lifecycle, VmError> {
        let next = self.state.apply(command)?;
        match (self.state.is_running(), next.is_running()) {
            (false, true) => self.guest.resume()?,
            (true, false) => self.guest.pause()?,
            _ => {}
        }
        if next == Lifecycle::Stopped {
            self.guest.shutdown();
        }
        self.state = next;
        Ok(next)
    }
}

impl Actor for Vm {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        if self.state != Lifecycle::Stopped {
            self.guest.shutdown();
        }
    }
}

/// What a VM is and does now.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// Configuration.
    pub config: VmConfig,
    /// Lifecycle state.
    pub state: Lifecycle,
    /// Backend's native layout.
    pub layout: NativeLayout,
    /// Guest counters.
    pub stats: GuestStats,
    /// Set when the copy is held after a migration failed past commitment (filled in by the
    /// host, which keeps the record).
    pub held: Option<super::HeldCopy>,
}

macro_rules! lifecycle_message {
    ($(#[$doc:meta])* $name:ident => $cmd:expr) => {
        $(#[$doc])*
        #[derive(Debug, Message)]
        #[rtype(result = "Result<Lifecycle, VmError>")]
        pub struct $name;

        impl Handler<$name> for Vm {
            type Result = Result<Lifecycle, VmError>;
            fn handle(&mut self, _: $name, _: &mut Self::Context) -> Self::Result {
                self.transition($cmd)
            }
        }
    };
}

lifecycle_message!(
    /// Pause the guest; no guest write is in flight when it returns.
    PauseVm => LifecycleCommand::Pause
);
lifecycle_message!(
    /// Resume the guest.
    ResumeVm => LifecycleCommand::Resume
);
lifecycle_message!(
    /// A migration takes the VM; a second one is refused.
    BeginOutgoing => LifecycleCommand::BeginOutgoing
);
lifecycle_message!(
    /// Destroy the VM.
    StopVm => LifecycleCommand::Stop
);

/// The migration that owned the VM ends.
#[derive(Debug, Message)]
#[rtype(result = "Result<Lifecycle, VmError>")]
pub struct EndOutgoing {
    /// True if the target now owns the VM (this copy is destroyed).
    pub moved: bool,
}

impl Handler<EndOutgoing> for Vm {
    type Result = Result<Lifecycle, VmError>;
    fn handle(&mut self, msg: EndOutgoing, ctx: &mut Self::Context) -> Self::Result {
        let s = self.transition(LifecycleCommand::EndOutgoing { moved: msg.moved })?;
        if s == Lifecycle::Stopped {
            ctx.stop();
        }
        Ok(s)
    }
}

/// Describe the VM.
#[derive(Debug, Message)]
#[rtype(result = "VmInfo")]
pub struct GetVmInfo;

impl Handler<GetVmInfo> for Vm {
    type Result = MessageResult<GetVmInfo>;
    fn handle(&mut self, _: GetVmInfo, _: &mut Self::Context) -> Self::Result {
        MessageResult(VmInfo {
            config: self.guest.config().clone(),
            state: self.state,
            layout: self.guest.layout(),
            stats: self.guest.stats(),
            held: None,
        })
    }
}

/// The guest, for the data plane and the dirty tracker.
#[derive(Debug, Message)]
#[rtype(result = "Arc<dyn Guest>")]
pub struct GetGuest;

impl Handler<GetGuest> for Vm {
    type Result = MessageResult<GetGuest>;
    fn handle(&mut self, _: GetGuest, _: &mut Self::Context) -> Self::Result {
        MessageResult(Arc::clone(&self.guest))
    }
}

/// vCPU and device state in the common format; the guest must be paused.
#[derive(Debug, Message)]
#[rtype(result = "Result<(Vec<VcpuState>, Vec<DeviceState>), VmError>")]
pub struct SaveVmState;

impl Handler<SaveVmState> for Vm {
    type Result = Result<(Vec<VcpuState>, Vec<DeviceState>), VmError>;
    fn handle(&mut self, _: SaveVmState, _: &mut Self::Context) -> Self::Result {
        if self.state.is_running() {
            return Err(VmmError::WrongState {
                actual: "running",
                needed: "paused",
            }
            .into());
        }
        Ok((self.guest.save_vcpus()?, self.guest.save_devices()?))
    }
}

/// Load state into an incoming VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VmError>")]
pub struct LoadVmState {
    /// vCPUs in the common format.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: Vec<DeviceState>,
}

impl Handler<LoadVmState> for Vm {
    type Result = Result<(), VmError>;
    fn handle(&mut self, msg: LoadVmState, _: &mut Self::Context) -> Self::Result {
        if self.state != Lifecycle::Incoming {
            return Err(VmmError::WrongState {
                actual: self.state.name(),
                needed: "incoming",
            }
            .into());
        }
        self.guest.load_vcpus(&msg.vcpus)?;
        self.guest.load_devices(&msg.devices)?;
        Ok(())
    }
}
