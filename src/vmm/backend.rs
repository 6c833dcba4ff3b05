//! The Backend actor: one hypervisor on a host.

use std::sync::Arc;

use actix::prelude::*;

use super::sim::{SimGuest, WorkloadSpec};
use super::{Guest, VmmError};
use crate::format::{NativeLayout, VmConfig};

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

    fn create(&self, msg: CreateVm) -> Result<Arc<dyn Guest>, VmmError> {
        match self.kind {
            BackendKind::Sim => {
                // Filling memory is bulk work, but it happens once at creation, before the VM
                // exists for anyone else.
                let guest = SimGuest::create(msg.config, self.layout, msg.workload)?;
                guest.resume()?;
                Ok(Arc::new(guest))
            }
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            BackendKind::Kvm => Ok(Arc::new(super::kvm::KvmGuest::create(msg.config, msg.workload)?)),
            #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
            BackendKind::Kvm => Err(VmmError::Failed("the kvm backend needs x86-64 Linux".into())),
        }
    }

    fn reserve(&self, config: VmConfig, demand_paged: bool) -> Result<Arc<dyn Guest>, VmmError> {
        match self.kind {
            BackendKind::Sim => {
                let _ = demand_paged; // the sim's demand paging works on present pages
                Ok(Arc::new(SimGuest::reserve(config, self.layout)?))
            }
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            BackendKind::Kvm => Ok(Arc::new(super::kvm::KvmGuest::reserve(config, demand_paged)?)),
            #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
            BackendKind::Kvm => Err(VmmError::Failed("the kvm backend needs x86-64 Linux".into())),
        }
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

/// Stop a guest's threads; its memory goes with the last reference.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DestroyGuest(pub Arc<dyn Guest>);

impl Handler<CreateVm> for Backend {
    type Result = Result<Arc<dyn Guest>, VmmError>;

    fn handle(&mut self, msg: CreateVm, _: &mut Self::Context) -> Self::Result {
        self.create(msg)
    }
}

impl Handler<ReserveVm> for Backend {
    type Result = Result<Arc<dyn Guest>, VmmError>;

    fn handle(&mut self, msg: ReserveVm, _: &mut Self::Context) -> Self::Result {
        self.reserve(msg.config, msg.demand_paged)
    }
}

impl Handler<DestroyGuest> for Backend {
    type Result = ();

    fn handle(&mut self, msg: DestroyGuest, _: &mut Self::Context) {
        msg.0.shutdown();
    }
}
