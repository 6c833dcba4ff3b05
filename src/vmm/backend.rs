//! The Backend actor: one hypervisor on a host.

use std::sync::Arc;

use actix::prelude::*;

use super::sim::{SimGuest, WorkloadSpec};
use super::{Guest, VmmError};
use crate::format::{NativeLayout, VmConfig};

/// A hypervisor on a host: creates, reserves and destroys guests in its native layout.
#[derive(Debug)]
pub struct Backend {
    layout: NativeLayout,
}

impl Backend {
    /// A sim backend keeping vCPU state in `layout`.
    pub fn sim(layout: NativeLayout) -> Self {
        Self { layout }
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
}

/// Stop a guest's threads; its memory goes with the last reference.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DestroyGuest(pub Arc<dyn Guest>);

impl Handler<CreateVm> for Backend {
    type Result = Result<Arc<dyn Guest>, VmmError>;

    fn handle(&mut self, msg: CreateVm, _: &mut Self::Context) -> Self::Result {
        // Filling memory is bulk work, but it happens once at creation, before the VM exists
        // for anyone else; a real backend would boot here.
        let guest = SimGuest::create(msg.config, self.layout, msg.workload)?;
        guest.resume()?;
        Ok(Arc::new(guest))
    }
}

impl Handler<ReserveVm> for Backend {
    type Result = Result<Arc<dyn Guest>, VmmError>;

    fn handle(&mut self, msg: ReserveVm, _: &mut Self::Context) -> Self::Result {
        Ok(Arc::new(SimGuest::reserve(msg.config, self.layout)?))
    }
}

impl Handler<DestroyGuest> for Backend {
    type Result = ();

    fn handle(&mut self, msg: DestroyGuest, _: &mut Self::Context) {
        msg.0.shutdown();
    }
}
