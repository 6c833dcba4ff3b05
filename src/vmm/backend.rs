//! The Backend actor: one hypervisor on a host, its blocking calls run off the actor thread.

use std::sync::{Arc, Mutex};

use actix::prelude::*;

use super::{Guest, Hypervisor, VmmError, WorkloadSpec};
use crate::format::VmConfig;
use crate::offload::{self, OffloadError};

/// A hypervisor on a host: creates, reserves and destroys guests in its native layout.
///
/// Every one of these calls blocks (mapping and filling memory, opening /dev/kvm, joining a
/// guest's threads), so each runs on a thread of its own ([`crate::offload`]) and the actor
/// answers when it ends; a panic there is a [`VmmError::Offload`] for the one caller. The actor
/// holds no state that the calls change, so several may be in flight at once.
#[derive(Debug)]
pub struct Backend {
    hypervisor: Arc<dyn Hypervisor>,
}

impl Backend {
    /// The actor over `hypervisor`.
    pub fn new(hypervisor: Arc<dyn Hypervisor>) -> Self {
        Self { hypervisor }
    }
}

impl Actor for Backend {
    type Context = Context<Self>;
}

/// Create a running guest with fresh content and the given workload.
#[derive(Debug, Message)]
#[rtype(result = "Result<Arc<dyn Guest>, VmmError>")]
pub struct CreateVm {
    /// The VM's configuration.
    pub config: VmConfig,
    /// What the guest does.
    pub workload: WorkloadSpec,
}

/// Reserve an empty, paused guest for an incoming migration.
#[derive(Debug, Message)]
#[rtype(result = "Result<Arc<dyn Guest>, VmmError>")]
pub struct ReserveVm {
    /// The incoming VM's configuration.
    pub config: VmConfig,
    /// How to commit its memory.
    pub commit: super::MemoryCommit,
}

/// Stop a guest's threads; its memory goes with the last reference. The reply comes once the
/// threads are stopped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DestroyGuest(pub Arc<dyn Guest>);

fn flatten<T>(r: Result<Result<T, VmmError>, OffloadError>) -> Result<T, VmmError> {
    r.map_err(VmmError::from).and_then(|r| r)
}

impl Handler<CreateVm> for Backend {
    type Result = ResponseFuture<Result<Arc<dyn Guest>, VmmError>>;

    fn handle(&mut self, msg: CreateVm, _: &mut Self::Context) -> Self::Result {
        let hypervisor = Arc::clone(&self.hypervisor);
        let work = offload::run("create-vm", move || {
            hypervisor.create_guest(msg.config, msg.workload).map(decorate)
        });
        Box::pin(async move { flatten(work.await) })
    }
}

impl Handler<ReserveVm> for Backend {
    type Result = ResponseFuture<Result<Arc<dyn Guest>, VmmError>>;

    fn handle(&mut self, msg: ReserveVm, _: &mut Self::Context) -> Self::Result {
        let hypervisor = Arc::clone(&self.hypervisor);
        let work = offload::run("reserve-vm", move || {
            hypervisor.reserve_guest(msg.config, msg.commit).map(decorate)
        });
        Box::pin(async move { flatten(work.await) })
    }
}

impl Handler<DestroyGuest> for Backend {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: DestroyGuest, _: &mut Self::Context) -> Self::Result {
        let guest = msg.0;
        let work = offload::run("destroy-vm", move || guest.shutdown());
        // A panic while stopping leaves nothing for the caller to do: the guest is gone either way.
        Box::pin(async move {
            let _ = work.await;
        })
    }
}

/// Wraps a guest as its backend creates or reserves it. A seam for tests and fault injection
/// (a guest whose pause blocks or panics, a backend that fails) that leaves the production path
/// as it is: the guest is wrapped once, nothing is polled.
pub type GuestDecorator = Box<dyn FnOnce(Arc<dyn Guest>) -> Arc<dyn Guest> + Send>;

/// Decorators waiting for their guest, by VM id.
static DECORATORS: Mutex<Vec<(String, GuestDecorator)>> = Mutex::new(Vec::new());

/// Most decorators waiting at once: a bound, not a limit any test should meet.
const MAX_DECORATORS: usize = 64;

/// The next guest that any backend of this process creates or reserves with id `vm` is
/// wrapped by `decorator` (which runs on the backend's work thread; a panic in it fails that
/// creation). For tests and fault injection; see [`GuestDecorator`].
pub fn decorate_next_guest(vm: &str, decorator: GuestDecorator) -> Result<(), VmmError> {
    let mut waiting = DECORATORS.lock().unwrap_or_else(|p| p.into_inner());
    if waiting.len() >= MAX_DECORATORS {
        return Err(VmmError::Failed(format!(
            "{MAX_DECORATORS} guest decorators wait already"
        )));
    }
    waiting.push((vm.to_string(), decorator));
    Ok(())
}

fn decorate(guest: Arc<dyn Guest>) -> Arc<dyn Guest> {
    let decorator = {
        let mut waiting = DECORATORS.lock().unwrap_or_else(|p| p.into_inner());
        let at = waiting.iter().position(|(id, _)| *id == guest.config().id.0);
        at.map(|i| waiting.swap_remove(i).1)
    };
    match decorator {
        Some(d) => d(guest),
        None => guest,
    }
}
