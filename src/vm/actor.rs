//! The Vm actor: lifecycle commands in turn, guest calls off the actor thread.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::OwnedMutexGuard;

use super::lifecycle::{Lifecycle, LifecycleCommand, LifecycleError};
use crate::format::{DeviceState, NativeLayout, VcpuState, VmConfig};
use crate::offload::{self, OffloadError};
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
///
/// Commands that touch the guest (pause, resume, stop, save and load state) run the guest call
/// on a thread of its own ([`crate::offload`]); the actor thread never blocks on a guest. They
/// take turns: each waits for the `turn` lock (FIFO), computes its transition from the state
/// left by the one before, runs the guest call, and commits the new state only if the call
/// succeeded. A second command sent while a pause is in flight therefore waits its turn and
/// sees the paused state; queries ([`GetVmInfo`], [`GetGuest`]) answer at once with the last
/// committed state, so one stuck guest does not stall a host's listing.
#[derive(Debug)]
pub struct Vm {
    guest: Arc<dyn Guest>,
    state: Lifecycle,
    turn: Arc<tokio::sync::Mutex<()>>,
}

/// What a guest call must do for a lifecycle transition.
#[derive(Debug, Clone, Copy)]
struct GuestStep {
    run: Option<bool>,
    shutdown: bool,
}

impl GuestStep {
    fn between(from: Lifecycle, to: Lifecycle) -> Self {
        let run = match (from.is_running(), to.is_running()) {
            (false, true) => Some(true),
            (true, false) => Some(false),
            _ => None,
        };
        Self {
            run,
            shutdown: to == Lifecycle::Stopped,
        }
    }

    fn name(self) -> &'static str {
        match (self.run, self.shutdown) {
            (_, true) => "vm-stop",
            (Some(true), false) => "vm-resume",
            (Some(false), false) => "vm-pause",
            (None, false) => "vm-noop",
        }
    }

    fn apply(self, guest: &dyn Guest) -> Result<(), VmmError> {
        let ran = match self.run {
            Some(true) => guest.resume(),
            Some(false) => guest.pause(),
            None => Ok(()),
        };
        if self.shutdown {
            // A VM being stopped is gone whatever its pause said: its threads stop here.
            guest.shutdown();
            return Ok(());
        }
        ran
    }
}

type Reply<T> = ResponseActFuture<Vm, Result<T, VmError>>;

fn ready<T: 'static>(r: Result<T, VmError>) -> Reply<T> {
    Box::pin(fut::ready(r))
}

fn flatten<T>(r: Result<Result<T, VmmError>, OffloadError>) -> Result<T, VmError> {
    Ok(r.map_err(VmmError::from).and_then(|r| r)?)
}

impl Vm {
    /// A VM around `guest`, in `state`.
    pub fn new(guest: Arc<dyn Guest>, state: Lifecycle) -> Self {
        Self {
            guest,
            state,
            turn: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Runs `step` in this VM's turn: `step` sees the state every earlier command left and
    /// returns the reply, usually a guest call off the actor thread.
    fn in_turn<T: 'static>(
        &mut self,
        step: impl FnOnce(&mut Vm, OwnedMutexGuard<()>) -> Reply<T> + 'static,
    ) -> Reply<T> {
        let turn = Arc::clone(&self.turn).lock_owned();
        Box::pin(turn.into_actor(self).then(move |guard, act, _| step(act, guard)))
    }

    /// The transition to `command`'s state, with its guest call off the actor thread.
    fn transition(&mut self, command: LifecycleCommand, turn: OwnedMutexGuard<()>) -> Reply<Lifecycle> {
        let next = match self.state.apply(command) {
            Ok(next) => next,
            Err(e) => return ready(Err(e.into())),
        };
        let step = GuestStep::between(self.state, next);
        if step.run.is_none() && !step.shutdown {
            self.state = next;
            return ready(Ok(next));
        }
        let guest = Arc::clone(&self.guest);
        let work = offload::run(step.name(), move || step.apply(&*guest));
        Box::pin(work.into_actor(self).map(move |r, act, _| {
            drop(turn);
            if step.shutdown && r.is_err() {
                // The call panicked before the guest's threads stopped. The host has forgotten
                // the VM already: stop them anyway, and report the panic.
                let guest = Arc::clone(&act.guest);
                drop(offload::run("vm-shutdown", move || guest.shutdown()));
                act.state = next;
            }
            flatten(r)?;
            act.state = next;
            Ok(next)
        }))
    }
}

impl Actor for Vm {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        if self.state != Lifecycle::Stopped {
            // Stopping a guest joins its threads; nobody waits for the result.
            let guest = Arc::clone(&self.guest);
            drop(offload::run("vm-shutdown", move || guest.shutdown()));
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
            type Result = Reply<Lifecycle>;
            fn handle(&mut self, _: $name, _: &mut Self::Context) -> Self::Result {
                self.in_turn(|act, turn| act.transition($cmd, turn))
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
    type Result = Reply<Lifecycle>;
    fn handle(&mut self, msg: EndOutgoing, _: &mut Self::Context) -> Self::Result {
        let command = LifecycleCommand::EndOutgoing { moved: msg.moved };
        Box::pin(
            self.in_turn(move |act, turn| act.transition(command, turn))
                .map(|r, _, ctx: &mut Context<Vm>| {
                    if matches!(r, Ok(Lifecycle::Stopped)) {
                        ctx.stop();
                    }
                    r
                }),
        )
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
    type Result = Reply<(Vec<VcpuState>, Vec<DeviceState>)>;
    fn handle(&mut self, _: SaveVmState, _: &mut Self::Context) -> Self::Result {
        self.in_turn(|act, turn| {
            if act.state.is_running() {
                return ready(Err(VmmError::WrongState {
                    actual: "running",
                    needed: "paused",
                }
                .into()));
            }
            let guest = Arc::clone(&act.guest);
            let work = offload::run("vm-save-state", move || {
                Ok::<_, VmmError>((guest.save_vcpus()?, guest.save_devices()?))
            });
            Box::pin(work.into_actor(act).map(move |r, _, _| {
                drop(turn);
                flatten(r)
            }))
        })
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
    type Result = Reply<()>;
    fn handle(&mut self, msg: LoadVmState, _: &mut Self::Context) -> Self::Result {
        self.in_turn(move |act, turn| {
            if act.state != Lifecycle::Incoming {
                return ready(Err(VmmError::WrongState {
                    actual: act.state.name(),
                    needed: "incoming",
                }
                .into()));
            }
            let guest = Arc::clone(&act.guest);
            let work = offload::run("vm-load-state", move || {
                guest.load_vcpus(&msg.vcpus)?;
                guest.load_devices(&msg.devices)
            });
            Box::pin(work.into_actor(act).map(move |r, _, _| {
                drop(turn);
                flatten(r)
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{VmId, PAGE_SIZE};
    use crate::vmm::{sim::SimGuest, WorkloadSpec};

    fn vm() -> Addr<Vm> {
        let config = VmConfig {
            id: VmId("t".into()),
            name: "t".into(),
            vcpus: 1,
            memory_bytes: 16 * u64::from(PAGE_SIZE),
            page_size: PAGE_SIZE,
            nics: Vec::new(),
        };
        let guest = SimGuest::create(config, NativeLayout::Kvm, WorkloadSpec::idle()).expect("guest");
        guest.resume().expect("runs");
        Vm::new(Arc::new(guest), Lifecycle::Running).start()
    }

    #[actix::test]
    async fn test_commands_sent_together_take_turns_in_order() {
        let vm = vm();
        // Sent before the pause has answered: the save must still see the paused VM.
        let (paused, saved, resumed) = tokio::join!(vm.send(PauseVm), vm.send(SaveVmState), vm.send(ResumeVm));
        assert_eq!(paused.expect("answers").expect("pauses"), Lifecycle::Paused);
        let (vcpus, _) = saved.expect("answers").expect("saves while paused");
        assert_eq!(vcpus.len(), 1);
        assert_eq!(resumed.expect("answers").expect("resumes"), Lifecycle::Running);
        let info = vm.send(GetVmInfo).await.expect("answers");
        assert_eq!(info.state, Lifecycle::Running);
    }

    #[actix::test]
    async fn test_refused_transition_leaves_the_state() {
        let vm = vm();
        let err = vm.send(LoadVmState {
            vcpus: Vec::new(),
            devices: Vec::new(),
        });
        assert!(err.await.expect("answers").is_err());
        assert!(vm.send(EndOutgoing { moved: true }).await.expect("answers").is_err());
        assert_eq!(vm.send(GetVmInfo).await.expect("answers").state, Lifecycle::Running);
    }
}
