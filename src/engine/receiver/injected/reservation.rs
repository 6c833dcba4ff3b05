//! `refuse-reservation` and `fail-state-load`: an actor that stands in for the host's
//! reservation. It refuses the reservation, or has the host wrap the reserved guest so that
//! loading its state fails, then asks the host.

use std::sync::Arc;

use actix::prelude::*;

use super::super::super::ask::AskError;
use super::super::host_port::{Reservation, ReserveIncoming};
use super::guest::FailingStateLoad;
use crate::engine::faults::{FaultKind, FaultPlan};
use crate::engine::Stage;
use crate::protocol::AbortReason;
use crate::vmm::GuestRef;

/// Puts an actor carrying out `plan` between the run and the host's reservation `host`.
pub(super) fn decorate(host: Recipient<ReserveIncoming>, plan: FaultPlan) -> Recipient<ReserveIncoming> {
    FaultyReservation { host, plan }.start().recipient()
}

#[derive(Debug)]
struct FaultyReservation {
    host: Recipient<ReserveIncoming>,
    plan: FaultPlan,
}

impl Actor for FaultyReservation {
    type Context = Context<Self>;
}

impl Handler<ReserveIncoming> for FaultyReservation {
    type Result = ResponseFuture<Result<Reservation, AbortReason>>;

    fn handle(&mut self, mut msg: ReserveIncoming, _: &mut Self::Context) -> Self::Result {
        if let Some(fault) = self.plan.take(Stage::Reservation, true).first() {
            tracing::warn!(fault = fault.kind.name(), "injecting fault");
            let refused = AbortReason::ReservationFailed {
                detail: "injected fault: reservation refused".into(),
            };
            return Box::pin(async move { Err(refused) });
        }
        let (loads, rest) = std::mem::take(&mut self.plan.0)
            .into_iter()
            .partition(|f| f.kind == FaultKind::FailStateLoad);
        self.plan.0 = rest;
        let loads = FaultPlan(loads);
        if !loads.is_empty() {
            msg.decorate = Some(Box::new(move |inner| {
                Arc::new(FailingStateLoad::new(inner, loads)) as GuestRef
            }));
        }
        let host = self.host.clone();
        Box::pin(async move {
            host.send(msg).await.unwrap_or_else(|_| {
                Err(AbortReason::TargetFailed {
                    detail: AskError::Stopped { what: "reservation" }.to_string(),
                })
            })
        })
    }
}
