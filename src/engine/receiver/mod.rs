//! The Receiver actor: the target side of one incoming migration.
//!
//! It starts a Link over the incoming connection and runs the target's protocol: every control
//! message goes through [`ReceiverState::step`]; the action it returns is carried out by the
//! run. Any failure before commitment releases the reservation and tells the source why.
//!
//! Where to look:
//!
//! * [`state`]: the protocol machine, pure; start here to learn what may come when.
//! * `run.rs`: the run's loop (what it waits on) and the dispatch of each action.
//! * One file per phase: `admission.rs` (slot, negotiation, authentication, reservation),
//!   `switchover.rs` (pages applied, demand paging armed, state loaded), `activate.rs`,
//!   `pull.rs` (page requests and digests), `recovery.rs` (post-copy's lost link replaced),
//!   `finish.rs` (how a run ends and what it leaves on the host).
//! * [`HostPort`]: everything a receiver asks of its host, as messages this module defines;
//!   the host implements them, so this module never names the Host.
//! * `injected/`: target-side fault injection, as decorators around the host port, the guest
//!   and the link, built only when a migration plans target faults. The run itself has no
//!   fault code.

mod activate;
mod admission;
mod finish;
mod host_port;
mod injected;
mod pull;
mod recovery;
mod run;
pub mod state;
mod switchover;

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{broadcast, watch};

pub use host_port::{
    FindRecoverable, GetVmStatus, HoldIncoming, HostPort, IncomingCommitted, IncomingEnded, RegisterRecoverable,
    ReleaseIncoming, Reservation, ReserveIncoming, UnholdIncoming, UnregisterRecoverable,
};
pub(crate) use pull::MAX_LISTED_MISMATCHES;
pub use recovery::Handover;
pub use state::{ReceiverAction, ReceiverState};

use super::events::MigrationEvent;
use super::faults::FaultPlan;
use crate::link::{Keepalive, LinkEnd};
use crate::protocol::auth::ClusterKey;
use crate::protocol::Capabilities;
use run::TargetRun;

/// How a receiver behaves.
#[derive(Debug, Clone)]
pub struct ReceiverParams {
    /// Liveness of the control link.
    pub keepalive: Keepalive,
    /// Longest wait for the next sign of progress from the source.
    pub step_timeout: Duration,
    /// Where to publish network announcements (in-process migrations share the source's
    /// event stream).
    pub events: Option<broadcast::Sender<MigrationEvent>>,
    /// The host's cluster key: when set, the source must prove it before `Reserve`.
    pub key: Option<ClusterKey>,
    /// Target-side faults to inject (in-process migrations).
    pub faults: FaultPlan,
    /// Post-copy: how long a guest paused by a lost link waits for the source to reconnect
    /// before its copy is held (`awaiting-pages`) for an operator; it still takes a recovery
    /// link after that.
    pub recovery_timeout: Duration,
    /// The host is shutting down: a new migration is refused (recovery links and fence
    /// queries are still answered).
    pub refuse_new: bool,
}

/// Why a receiver was told to stop from outside its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// The host shuts down: a migration not yet committed is aborted.
    ShuttingDown,
    /// The host "crashed" (an injected fault): the receiver vanishes without a word, committed
    /// or not.
    Crashed,
}

impl Halt {
    /// True if the halt ends a run that is (or is not) past commitment: a shutdown never
    /// interrupts a committed migration, which moves a VM onto this host.
    fn applies(self, committed: bool) -> bool {
        match self {
            Halt::ShuttingDown => !committed,
            Halt::Crashed => true,
        }
    }
}

/// Where halts are announced; the receiver's run watches the other end.
type HaltSender = watch::Sender<Option<Halt>>;

/// The target side of one migration.
#[derive(Debug)]
pub struct Receiver {
    start: Option<(TargetRun, LinkEnd)>,
    halt: HaltSender,
    host: HostPort,
}

impl Receiver {
    /// A receiver on the host behind `host` for the link `end`; `announce_via`: the host's
    /// interface for announce frames (`HostConfig::announce_via`).
    pub fn new(
        host_name: String,
        host: HostPort,
        caps: Capabilities,
        end: LinkEnd,
        mut params: ReceiverParams,
        announce_via: Option<String>,
    ) -> Self {
        let (halt, halted) = watch::channel(None);
        let faults = injected::TargetFaults::arm(std::mem::take(&mut params.faults), &halt);
        let run = TargetRun::new(host_name, host.clone(), caps, params, halted, faults, announce_via);
        Self {
            start: Some((run, end)),
            halt,
            host,
        }
    }

    /// Holds the protocol until `slot` fires: the host is at its cap of incoming migrations.
    pub fn queued(mut self, slot: tokio::sync::oneshot::Receiver<()>) -> Self {
        if let Some((run, _)) = self.start.as_mut() {
            run.slot = Some(slot);
        }
        self
    }
}

/// Abort this incoming migration unless it is past commitment (host shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AbortIncoming;

impl Handler<AbortIncoming> for Receiver {
    type Result = ();
    fn handle(&mut self, _: AbortIncoming, _: &mut Self::Context) {
        // A crash already announced stays the reason.
        self.halt.send_if_modified(|h| {
            if h.is_some() {
                return false;
            }
            *h = Some(Halt::ShuttingDown);
            true
        });
    }
}

impl Actor for Receiver {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.host.ended();
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some((run, end)) = self.start.take() {
            ctx.spawn(run.run(end).into_actor(self).map(|_, _, ctx| ctx.stop()));
        }
    }
}

/// A small VM for unit tests of the run's pieces.
#[cfg(test)]
fn test_config(id: &str, pages: u64) -> crate::format::VmConfig {
    crate::format::VmConfig {
        id: crate::format::VmId(id.into()),
        name: id.into(),
        vcpus: 1,
        memory_bytes: pages * crate::units::PAGE_SIZE as u64,
        page_size: crate::units::PAGE_SIZE as u32,
        nics: Vec::new(),
    }
}

/// A reserved (empty, paused) sim guest of `pages` pages.
#[cfg(test)]
fn reserved_guest(id: &str, pages: u64) -> crate::vmm::GuestRef {
    let config = test_config(id, pages);
    let guest = crate::vmm::sim::SimGuest::reserve(
        config,
        crate::format::NativeLayout::Kvm,
        crate::vmm::MemoryCommit::Background,
    );
    std::sync::Arc::new(guest.expect("a small reservation"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_shutdown_spares_a_committed_migration_and_a_crash_does_not() {
        assert!(Halt::ShuttingDown.applies(false));
        assert!(!Halt::ShuttingDown.applies(true));
        assert!(Halt::Crashed.applies(false));
        assert!(Halt::Crashed.applies(true));
    }
}
