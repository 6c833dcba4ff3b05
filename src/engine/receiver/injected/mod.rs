//! Target-side fault injection: the target's share of a [`FaultPlan`]
//! ([`FaultPlan::for_target`]), carried out by decorators around what a run already uses, so
//! that the run itself holds no fault code, no timer and no check. They are built only when a
//! migration plans target faults; a plan without them costs nothing.
//!
//! | fault | decorator | where it acts |
//! |---|---|---|
//! | `refuse-reservation` | the host port's reservation (`reservation.rs`) | the host refuses `Reserve` |
//! | `fail-state-load` | the reserved guest (`guest.rs`), wrapped by the host at reservation | loading vCPU state fails in the backend |
//! | `target-crash` | the link's events (`crash.rs`), plus a byte counter on its data half for a byte trigger | the run halts as crashed at the message of its stage, or once its trigger passes |
//!
//! They work on in-process links: a TCP target runs its own daemon, with its own plan.

mod crash;
mod guest;
mod reservation;

use super::host_port::HostPort;
use super::HaltSender;
use crate::clock;
use crate::engine::faults::{FaultKind, FaultPlan};
use crate::link::{DataReceiver, FramePool, LinkEvents};

/// The target faults of one run, waiting to be installed as it starts.
#[derive(Debug)]
pub(super) struct TargetFaults {
    /// `refuse-reservation` and `fail-state-load`: both act at the reservation.
    reservation: FaultPlan,
    /// `target-crash`: acts on the link.
    crashes: FaultPlan,
    /// Where a crash halts the run.
    halt: HaltSender,
    /// When the run was created: time triggers count from here.
    armed: clock::Instant,
}

impl TargetFaults {
    /// The target's faults of `plan`, or `None` if it plans none (nothing is then installed).
    pub(super) fn arm(plan: FaultPlan, halt: &HaltSender) -> Option<Self> {
        let (crashes, reservation): (Vec<_>, Vec<_>) = plan
            .0
            .into_iter()
            .filter(|f| f.kind.on_target())
            .partition(|f| f.kind == FaultKind::TargetCrash);
        if crashes.is_empty() && reservation.is_empty() {
            return None;
        }
        Some(Self {
            reservation: FaultPlan(reservation),
            crashes: FaultPlan(crashes),
            halt: halt.clone(),
            armed: clock::now(),
        })
    }

    /// Wraps the host port's reservation, the link's events and its data half as the plan
    /// needs; returns the events and data half the run reads from.
    pub(super) fn install(
        self,
        host: &mut HostPort,
        inbox: LinkEvents,
        data: (DataReceiver, FramePool),
    ) -> (LinkEvents, (DataReceiver, FramePool)) {
        if !self.reservation.is_empty() {
            host.reserve = reservation::decorate(host.reserve.clone(), self.reservation);
        }
        if self.crashes.is_empty() {
            return (inbox, data);
        }
        crash::install(self.crashes, self.halt, self.armed, inbox, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_target_faults_arm_anything() {
        let (halt, _) = tokio::sync::watch::channel(None);
        assert!(TargetFaults::arm(FaultPlan::default(), &halt).is_none());
        let source_only: FaultPlan = "link-drop@precopy,cancel".parse().expect("plan");
        assert!(TargetFaults::arm(source_only, &halt).is_none());
        let plan: FaultPlan = "link-drop,target-crash@precopy,refuse-reservation,fail-state-load"
            .parse()
            .expect("plan");
        let armed = TargetFaults::arm(plan, &halt).expect("target faults");
        let kinds = |p: &FaultPlan| p.0.iter().map(|f| f.kind).collect::<Vec<_>>();
        assert_eq!(kinds(&armed.crashes), vec![FaultKind::TargetCrash]);
        assert_eq!(
            kinds(&armed.reservation),
            vec![FaultKind::RefuseReservation, FaultKind::FailStateLoad]
        );
    }
}
