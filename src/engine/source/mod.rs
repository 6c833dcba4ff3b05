//! The source side's run of one migration: the stages in order, the chosen algorithm, and
//! the rollback that keeps the VM on the source when anything fails before commitment.
//!
//! It runs as a future inside the [`super::migration::Migration`] actor's context. The pure
//! [`machine::SourceMachine`] decides what comes next (through the algorithm's
//! [`super::plan::Plan`] between rounds); this run carries each action out and reports what
//! came of it. Control goes through the Link actor, dirty logging through the DirtyTracker
//! actor, pause and state through the Vm actor; pages go through the [`SourcePlane`] thread.
//!
//! By phase: [`handshake`] (premigration, reservation), [`rounds`] (pre-copy),
//! [`switchover`] (stopcopy, commitment, activation), [`pull`], [`recovery`]; [`control`]
//! (messages, cancel, timeouts), [`books`] (stages, figures, report), [`fail`] (rollback),
//! [`faults`] (injection, only when planned).

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{broadcast, watch};

use super::error::Side;
use super::events::MigrationEvent;
use super::report::{
    CompressionReport, DecisionReport, DowntimeParts, MigrationReport, Outcome, PageCounts, PredictionReport,
    StageReport, VmLocation,
};
use super::request::MigrationRequest;
use super::route::Route;
use super::stage::Stage;
use crate::clock::{self, Instant};
use crate::dataplane::SourcePlane;
use crate::dirty::{DirtyTracker, PageSet};
use crate::link::{CloseLink, Link, LinkEnd};
use crate::protocol::{AbortReason, Capabilities, ControlMessage, PageCodecs};
use crate::telemetry::metric;
use crate::vm::Vm;
use crate::vmm::Guest;

mod books;
mod control;
mod fail;
mod faults;
mod handshake;
mod machine;
mod pull;
mod recovery;
mod rounds;
mod switchover;

pub use books::Measured;
use fail::Fail;
use machine::{SourceAction, SourceEvent, SourceMachine, SourceState};

/// Everything a source run needs, handed over by the engine.
#[derive(Debug)]
pub(crate) struct SourceSetup {
    pub id: u64,
    pub req: MigrationRequest,
    pub vm: Addr<Vm>,
    pub guest: Arc<dyn Guest>,
    pub end: LinkEnd,
    /// How to open another link to the target (post-copy recovery).
    pub route: Route,
    pub caps: Capabilities,
    pub events: broadcast::Sender<MigrationEvent>,
    pub cancel: watch::Receiver<bool>,
    pub committed: Arc<AtomicBool>,
    /// What earlier migrations on this engine measured.
    pub measured: Arc<Mutex<Measured>>,
    /// Live progress for status queries.
    pub progress: Arc<super::progress::Progress>,
    /// The source host's cluster key.
    pub key: Option<crate::protocol::auth::ClusterKey>,
    /// An operator's retry of a held post-copy copy (`migrate --recover`): the run reconnects
    /// and carries the pull on, instead of starting from `premigration`.
    pub retry_pull: bool,
}

pub(crate) struct SourceRun {
    s: SourceSetup,
    machine: SourceMachine,
    link: Option<Addr<Link>>,
    inbox: Option<crate::link::LinkEvents>,
    plane: Option<SourcePlane>,
    tracker: Option<Addr<DirtyTracker>>,
    /// Pages the next step starts from: the next round's, the switchover's, the pull's.
    pending: PageSet,
    /// The digests of the paused memory, computed while the last pages travel.
    hashing: Option<tokio::task::JoinHandle<Vec<u64>>>,
    /// Why the link was lost, for the recovery that follows.
    lost: Option<String>,
    /// The stage open in the report (the machine keeps the protocol's).
    open_stage: Option<Stage>,
    started: Instant,
    precopy_started: Instant,
    stage_started: Instant,
    stage_pages: u64,
    stage_bytes: u64,
    stages: Vec<StageReport>,
    pages: PageCounts,
    bytes: u64,
    rounds: u32,
    decisions: Vec<DecisionReport>,
    predicted: Option<PredictionReport>,
    paused_at: Option<Instant>,
    final_pages_time: Duration,
    downtime: Option<Duration>,
    /// Where the downtime went, filled in as the switchover runs.
    parts: DowntimeParts,
    /// When `Commit` went out, for the activation round trip.
    commit_sent: Option<Instant>,
    /// Digests an older target sent before `Prepared` although asked to wait: kept for the
    /// verification after activation.
    early_digests: Vec<ControlMessage>,
    paused_by_us: bool,
    first_pass_done: bool,
    remaining_gauge: f64,
    bandwidth: f64,
    rtt: Duration,
    target_layout: String,
    verified: bool,
    mismatched: Vec<u64>,
    faults_seen: (u64, f64),
    verification: Duration,
    stage_span: Option<tracing::Span>,
    /// Planned source faults; `None` when the plan has none.
    faults: Option<faults::Injector>,
    recoveries: u32,
    /// Page encodings negotiated for this migration.
    codecs: PageCodecs,
    compression: CompressionReport,
    /// `random`'s seed, for the report.
    seed: Option<u64>,
}

impl std::fmt::Debug for SourceRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRun")
            .field("id", &self.s.id)
            .field("state", &self.machine.state())
            .finish()
    }
}

impl SourceRun {
    /// A run of `s`; call inside the runtime (planned faults start their timers).
    pub fn new(mut s: SourceSetup) -> Self {
        let now = clock::now();
        // `random` needs a seed; the report records it, so a pick can be replayed.
        let seed = (s.req.algorithm == crate::protocol::Algorithm::Random).then(|| s.req.seed.unwrap_or_else(os_seed));
        let machine = SourceMachine::new(
            s.req.algorithm,
            s.req.policy,
            !s.req.recovery_timeout.is_zero(),
            s.req.verify,
        )
        .with_qos(seed.unwrap_or(0), s.req.deadline);
        let faults = faults::Injector::new(&s.req.faults, now);
        if let Some(f) = &faults {
            f.decorate(&mut s.end.data_tx);
        }
        Self {
            s,
            machine,
            link: None,
            inbox: None,
            plane: None,
            tracker: None,
            pending: PageSet::empty(0),
            hashing: None,
            lost: None,
            open_stage: None,
            started: now,
            precopy_started: now,
            stage_started: now,
            stage_pages: 0,
            stage_bytes: 0,
            stages: Vec::new(),
            pages: PageCounts::default(),
            bytes: 0,
            rounds: 0,
            decisions: Vec::new(),
            predicted: None,
            paused_at: None,
            final_pages_time: Duration::ZERO,
            downtime: None,
            parts: DowntimeParts::default(),
            commit_sent: None,
            early_digests: Vec::new(),
            paused_by_us: false,
            first_pass_done: false,
            remaining_gauge: 0.0,
            bandwidth: 0.0,
            rtt: Duration::ZERO,
            target_layout: String::new(),
            verified: false,
            mismatched: Vec::new(),
            faults_seen: (0, 0.0),
            verification: Duration::ZERO,
            stage_span: None,
            faults,
            recoveries: 0,
            codecs: PageCodecs::NONE,
            compression: CompressionReport::default(),
            seed,
        }
    }

    /// The tracing span of this migration.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "migration",
            id = self.s.id,
            vm = %self.s.guest.config().id,
            algorithm = self.s.req.algorithm.name(),
            to = %self.s.req.target
        )
    }

    /// Runs the migration to its end and returns the report.
    pub async fn run(mut self) -> MigrationReport {
        metrics::gauge!(metric::MIGRATIONS_IN_PROGRESS).increment(1.0);
        let start = if self.s.retry_pull {
            SourceEvent::RetryPull
        } else {
            SourceEvent::Start
        };
        let result = self.drive(start).await;
        let (outcome, error, location) = match result {
            Ok(()) if self.recoveries > 0 => (Outcome::Recovered, None, VmLocation::Target),
            Ok(()) => (Outcome::Completed, None, VmLocation::Target),
            Err(fail) => self.fail(fail).await,
        };
        self.close_stage();
        if let Some(link) = self.link.take() {
            link.do_send(CloseLink);
        }
        self.plane = None;
        metrics::gauge!(metric::MIGRATIONS_IN_PROGRESS).decrement(1.0);
        self.set_remaining(0);
        for g in [
            metric::DIRTY_RATE_PAGES_PER_SECOND,
            metric::LINK_THROUGHPUT_BYTES_PER_SECOND,
            metric::EXPECTED_DOWNTIME_SECONDS,
        ] {
            metrics::gauge!(g).set(0.0);
        }
        self.report(outcome, error, location)
    }

    /// The machine's actions, carried out in order until it has none left. A link lost where
    /// the machine recovers it becomes an event instead of a failure.
    async fn drive(&mut self, start: SourceEvent) -> Result<(), Fail> {
        let mut queue: VecDeque<SourceAction> = self.step(start)?.into();
        while let Some(action) = queue.pop_front() {
            let event = match self.perform(action).await {
                Ok(event) => event,
                Err(Fail::Link(cause)) if self.machine.recovers_link_loss() => {
                    queue.clear();
                    self.lost = Some(cause);
                    Some(SourceEvent::LinkLost)
                }
                Err(fail) => return Err(fail),
            };
            if let Some(event) = event {
                queue.extend(self.step(event)?);
            }
        }
        Ok(())
    }

    /// The pending pages, leaving none.
    fn take_pending(&mut self) -> PageSet {
        std::mem::replace(&mut self.pending, PageSet::empty(0))
    }

    fn step(&mut self, event: SourceEvent) -> Result<Vec<SourceAction>, Fail> {
        self.machine.step(event).map_err(fail::local)
    }

    /// Carries one action out; returns the event it produced, if any.
    async fn perform(&mut self, action: SourceAction) -> Result<Option<SourceEvent>, Fail> {
        use SourceAction as A;
        Ok(match action {
            A::Enter(stage) => {
                self.enter(stage)?;
                None
            }
            A::AssumePull => {
                self.assume_pull();
                None
            }
            A::Handshake => Some(SourceEvent::Negotiated {
                pool: self.premigration().await?.algorithms,
            }),
            A::Reserve => {
                self.reservation().await?;
                Some(SourceEvent::Reserved {
                    pages: self.s.guest.memory().page_count(),
                    estimate: self.estimate(),
                    elapsed: clock::now().duration_since(self.started),
                })
            }
            A::StartPlane { resends } => {
                self.start_plane(resends)?;
                None
            }
            A::StartDirtyLog => {
                self.start_dirty_log().await?;
                None
            }
            A::SendRound { round, rate } => Some(SourceEvent::RoundObserved(self.round(round, rate).await?)),
            A::Decided { decisions, forecast } => {
                self.record(decisions, forecast);
                None
            }
            A::Abort { detail } => {
                return Err(Fail::Aborted {
                    side: Side::Source,
                    reason: AbortReason::NotConverging { detail },
                })
            }
            A::Switchover { how } => {
                self.switchover(how).await?;
                Some(SourceEvent::StateSent)
            }
            A::Verify => {
                let ask = self.machine.state() == SourceState::Auditing;
                self.verify(ask).await?;
                Some(SourceEvent::Verified)
            }
            A::AwaitPrepared => {
                self.prepared().await?;
                Some(SourceEvent::Prepared)
            }
            A::Commit => {
                // The point of no return: from here the target owns the VM.
                self.commit()?;
                self.send(ControlMessage::Commit).await?;
                None
            }
            A::AwaitActivated => {
                self.activated().await?;
                Some(SourceEvent::Activated)
            }
            A::Pull => {
                self.pull().await?;
                Some(SourceEvent::PullComplete)
            }
            A::Recover => {
                self.recover().await?;
                Some(SourceEvent::Reconnected)
            }
            A::Release => {
                self.release().await?;
                Some(SourceEvent::Released)
            }
        })
    }
}

/// A seed from the OS's generator. Should it fail, the clock and the process id stand in: the
/// pick needs to be unpredictable only in the ordinary sense, and the report records the seed.
fn os_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            crate::memory::SplitMix64::new(nanos ^ (u64::from(std::process::id()) << 32)).next()
        }
    }
}
