//! The Backend actor: one hypervisor on a host.

use std::sync::{Arc, Mutex};

use actix::prelude::*;

use super::sim::{SimGuest, WorkloadSpec};
use super::{Guest, VmmError};
use crate::format::{NativeLayout, VmConfig};
use crate::offload::{self, OffloadError};

/// Which hypervisor a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The synthetic guest; runs everywhere.
    #[default]
    Sim,
    /// Real guests on /dev/kvm (x86-64 Linux); their native layout is always `kvm`.
    Kvm,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Sim => "sim",
            BackendKind::Kvm => "kvm",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sim" => Ok(BackendKind::Sim),
            "kvm" => Ok(BackendKind::Kvm),
            other => Err(format!("unknown backend {other:?} (sim, kvm)")),
        }
    }
}

impl BackendKind {
    /// Checks that this host can run the backend: for kvm, that /dev/kvm opens.
    pub fn check_available(self) -> Result<(), VmmError> {
        match self {
            BackendKind::Sim => Ok(()),
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            BackendKind::Kvm => super::kvm::open_kvm().map(|_| ()),
            #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
            BackendKind::Kvm => Err(VmmError::Failed("the kvm backend needs x86-64 Linux".into())),
        }
    }
}

/// A hypervisor on a host: creates, reserves and destroys guests in its native layout.
///
/// Every one of these calls blocks (mapping and filling memory, opening /dev/kvm, joining a
/// guest's threads), so each runs on a thread of its own ([`crate::offload`]) and the actor
/// answers when it ends; a panic there is a [`VmmError::Offload`] for the one caller. The actor
/// holds no state that the calls change, so several may be in flight at once.
#[derive(Debug)]
pub struct Backend {
    kind: BackendKind,
    layout: NativeLayout,
}

impl Backend {
    /// A sim backend keeping vCPU state in `layout`.
    pub fn sim(layout: NativeLayout) -> Self {
        Self {
            kind: BackendKind::Sim,
            layout,
        }
    }

    /// A backend of `kind`; `layout` applies to sim (kvm's layout is kvm).
    pub fn new(kind: BackendKind, layout: NativeLayout) -> Self {
        Self { kind, layout }
    }
}

fn create(kind: BackendKind, layout: NativeLayout, msg: CreateVm) -> Result<Arc<dyn Guest>, VmmError> {
    let guest: Arc<dyn Guest> = match kind {
        BackendKind::Sim => {
            let guest = SimGuest::create(msg.config, layout, msg.workload)?;
            guest.resume()?;
            Arc::new(guest)
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        BackendKind::Kvm => Arc::new(super::kvm::KvmGuest::create(msg.config, msg.workload)?),
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        BackendKind::Kvm => return Err(VmmError::Failed("the kvm backend needs x86-64 Linux".into())),
    };
    Ok(decorate(guest))
}

fn reserve(
    kind: BackendKind,
    layout: NativeLayout,
    config: VmConfig,
    demand_paged: bool,
) -> Result<Arc<dyn Guest>, VmmError> {
    let guest: Arc<dyn Guest> = match kind {
        BackendKind::Sim => {
            let _ = demand_paged; // the sim's demand paging works on present pages
            Arc::new(SimGuest::reserve(config, layout)?)
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        BackendKind::Kvm => Arc::new(super::kvm::KvmGuest::reserve(config, demand_paged)?),
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        BackendKind::Kvm => return Err(VmmError::Failed("the kvm backend needs x86-64 Linux".into())),
    };
    Ok(decorate(guest))
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
    /// What its writer does.
    pub workload: WorkloadSpec,
}

/// Reserve an empty, paused guest for an incoming migration.
#[derive(Debug, Message)]
#[rtype(result = "Result<Arc<dyn Guest>, VmmError>")]
pub struct ReserveVm {
    /// The incoming VM's configuration.
    pub config: VmConfig,
    /// Every page will arrive on demand (post-copy). A backend whose demand paging needs
    /// absent pages (userfaultfd) then maps RAM without committing it, instead of committing
    /// it now only to drop it at the switchover, inside the downtime.
    pub demand_paged: bool,
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
        let (kind, layout) = (self.kind, self.layout);
        let work = offload::run("create-vm", move || create(kind, layout, msg));
        Box::pin(async move { flatten(work.await) })
    }
}

impl Handler<ReserveVm> for Backend {
    type Result = ResponseFuture<Result<Arc<dyn Guest>, VmmError>>;

    fn handle(&mut self, msg: ReserveVm, _: &mut Self::Context) -> Self::Result {
        let (kind, layout) = (self.kind, self.layout);
        let work = offload::run("reserve-vm", move || {
            reserve(kind, layout, msg.config, msg.demand_paged)
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
