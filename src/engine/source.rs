//! The source side's run of one migration: the stages in order, the chosen algorithm, and
//! the rollback that keeps the VM on the source when anything fails before commitment.
//!
//! It runs as a future inside the [`super::migration::Migration`] actor's context. Control goes
//! through the Link actor, dirty logging through the DirtyTracker actor, pause and state
//! through the Vm actor; pages go through the [`SourcePlane`] thread.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{broadcast, mpsc, watch};

use super::ask::{ask, GUEST_ASK};
use super::error::{EngineError, Side};
use super::events::MigrationEvent;
use super::faults::{Fault, FaultKind, FaultPlan};
use super::policy::{self, CostInputs, Decision, RoundContext};
use super::report::{
    CompressionReport, DecisionReport, MigrationReport, Outcome, PageCounts, PredictionReport, StageReport, VmLocation,
};
use super::request::MigrationRequest;
use super::route::Route;
use super::stage::{Stage, StageMachine};
use super::verify;
use crate::clock::{self, Instant};
use crate::dataplane::{PlaneEncoding, RoundStats, SourcePlane};
use crate::dirty::{CollectDirtyPages, DirtyTracker, PageSet, StartDirtyLog, StopDirtyLog};
use crate::link::{CloseLink, Link, LinkEnd, LinkEvent, SendControl};
use crate::protocol::auth;
use crate::protocol::negotiation::{choose_compression, negotiate, Pool};
use crate::protocol::{AbortReason, Algorithm, Capabilities, ControlMessage, PageCodecs};
use crate::telemetry::metric;
use crate::units::PAGE_SIZE;
use crate::vm::{EndOutgoing, PauseVm, ResumeVm, SaveVmState, Vm};
use crate::vmm::Guest;

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

/// Figures measured by earlier migrations (moving averages), used for predictions before this
/// migration has measured its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct Measured {
    /// Fixed switchover cost: downtime minus the final pages' transfer.
    pub switchover: Option<Duration>,
    /// Link bandwidth, bytes per second.
    pub bandwidth: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o * 0.7 + new * 0.3)
}

/// Why a run stopped early.
#[derive(Debug)]
enum Fail {
    Cancelled,
    Aborted {
        side: Side,
        reason: AbortReason,
    },
    Negotiation(crate::protocol::NegotiationError),
    Link(String),
    Protocol(String),
    Local(String),
    Timeout(&'static str),
    RecoveryTimeout {
        cause: String,
        last: String,
        after: Duration,
    },
    /// The target's digests differ from the source's memory at the pause.
    Verification {
        mismatched: Vec<u64>,
        count: u64,
    },
}

impl Fail {
    fn outcome(&self) -> Outcome {
        match self {
            Fail::Cancelled => Outcome::Cancelled,
            Fail::Aborted { .. } | Fail::Negotiation(_) => Outcome::Aborted,
            _ => Outcome::Failed,
        }
    }

    /// What the target is told.
    fn reason_for_peer(&self) -> Option<AbortReason> {
        Some(match self {
            Fail::Cancelled => AbortReason::Cancelled,
            Fail::Aborted {
                side: Side::Source,
                reason,
            } => reason.clone(),
            Fail::Aborted { side: Side::Target, .. } => return None,
            Fail::Negotiation(e) => e.clone().into(),
            Fail::Link(_) | Fail::RecoveryTimeout { .. } => return None,
            Fail::Protocol(d) => AbortReason::ProtocolViolation { detail: d.clone() },
            Fail::Local(d) => AbortReason::SourceFailed { detail: d.clone() },
            Fail::Timeout(stage) => AbortReason::Timeout {
                stage: stage.to_string(),
                after_ms: 0,
            },
            Fail::Verification { mismatched, count } => AbortReason::VerificationFailed {
                pages: *count,
                first: mismatched.clone(),
            },
        })
    }

    fn into_error(self, stage: Option<Stage>, id: u64) -> EngineError {
        let stage_name = stage.map(|s| s.name()).unwrap_or("start").to_string();
        match self {
            Fail::Cancelled => EngineError::Aborted {
                side: Side::Source,
                reason: AbortReason::Cancelled,
            },
            Fail::Aborted { side, reason } => EngineError::Aborted { side, reason },
            Fail::Negotiation(e) => EngineError::Negotiation(e),
            Fail::Link(detail) => EngineError::Link {
                stage: stage_name,
                detail,
            },
            Fail::Protocol(d) => EngineError::Protocol(d),
            Fail::Local(d) => EngineError::Internal(format!("migration {id}: {d}")),
            Fail::Timeout(s) => EngineError::Timeout {
                what: format!("target in {s}"),
                after_ms: 0,
            },
            Fail::RecoveryTimeout { cause, last, after } => EngineError::PostcopyRecovery {
                cause,
                last,
                after_ms: after.as_millis() as u64,
            },
            Fail::Verification { mismatched, count } => EngineError::Verification {
                pages: count,
                first: mismatched,
            },
        }
    }
}

fn local<E: std::fmt::Display>(e: E) -> Fail {
    Fail::Local(e.to_string())
}

/// How often byte and time triggers are checked while the run waits.
const FAULT_POLL: Duration = Duration::from_millis(2);

/// Resolves with the planned faults whose byte or time trigger has passed and that may fire in
/// `stage`; never resolves when no fault waits on a trigger.
async fn due_faults(plan: &RefCell<FaultPlan>, stage: Option<Stage>, sent: &AtomicU64, started: Instant) -> Vec<Fault> {
    let Some(stage) = stage else {
        return std::future::pending().await;
    };
    if !plan.borrow().has_thresholds(false) {
        return std::future::pending().await;
    }
    loop {
        let elapsed = clock::now().duration_since(started);
        let fired = plan
            .borrow_mut()
            .take_due(stage, false, sent.load(Ordering::Relaxed), elapsed);
        if !fired.is_empty() {
            return fired;
        }
        tokio::time::sleep(FAULT_POLL).await;
    }
}

/// How the pre-copy phase ended.
enum AfterPrecopy {
    StopAndCopy,
    Postcopy,
}

pub(crate) struct SourceRun {
    s: SourceSetup,
    link: Option<Addr<Link>>,
    inbox: Option<crate::link::LinkEvents>,
    plane: Option<SourcePlane>,
    tracker: Option<Addr<DirtyTracker>>,
    machine: StageMachine,
    current: Option<Stage>,
    started: Instant,
    stage_started: Instant,
    stage_pages: u64,
    stage_bytes: u64,
    stages: Vec<StageReport>,
    pages: PageCounts,
    bytes: u64,
    rounds: u32,
    decisions: Vec<DecisionReport>,
    predicted: Option<PredictionReport>,
    algorithm: Algorithm,
    paused_at: Option<Instant>,
    downtime: Option<Duration>,
    paused_by_us: bool,
    activated: bool,
    first_pass_done: bool,
    remaining_gauge: f64,
    bandwidth: f64,
    rtt: Duration,
    target_layout: String,
    verified: bool,
    mismatched: Vec<u64>,
    faults: (u64, f64),
    verification: Duration,
    pulling: bool,
    stage_span: Option<tracing::Span>,
    /// Faults still to fire (a cell: byte and time triggers fire while a round runs).
    plan: RefCell<FaultPlan>,
    fail_pause: Cell<bool>,
    /// Injected: the switchover's dirty set loses one page.
    lose_page: Cell<bool>,
    /// The switchover handed pages over to demand paging (post-copy): past `Commit` the target
    /// may run with holes only this copy can fill.
    demand_paged: bool,
    /// An injected post-copy link loss: the link stays down until then.
    link_down_until: Cell<Option<Instant>>,
    recoveries: u32,
    /// Page encodings negotiated for this migration.
    codecs: PageCodecs,
    compression: CompressionReport,
}

impl std::fmt::Debug for SourceRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRun")
            .field("id", &self.s.id)
            .field("stage", &self.current)
            .finish()
    }
}

impl SourceRun {
    pub fn new(s: SourceSetup) -> Self {
        let now = clock::now();
        let algorithm = s.req.algorithm;
        let plan = s.req.faults.clone();
        Self {
            s,
            link: None,
            inbox: None,
            plane: None,
            tracker: None,
            machine: StageMachine::Idle,
            current: None,
            started: now,
            stage_started: now,
            stage_pages: 0,
            stage_bytes: 0,
            stages: Vec::new(),
            pages: PageCounts::default(),
            bytes: 0,
            rounds: 0,
            decisions: Vec::new(),
            predicted: None,
            algorithm,
            paused_at: None,
            downtime: None,
            paused_by_us: false,
            activated: false,
            first_pass_done: false,
            remaining_gauge: 0.0,
            bandwidth: 0.0,
            rtt: Duration::ZERO,
            target_layout: String::new(),
            verified: false,
            mismatched: Vec::new(),
            faults: (0, 0.0),
            verification: Duration::ZERO,
            pulling: false,
            stage_span: None,
            plan: RefCell::new(plan),
            fail_pause: Cell::new(false),
            lose_page: Cell::new(false),
            demand_paged: false,
            link_down_until: Cell::new(None),
            recoveries: 0,
            codecs: PageCodecs::NONE,
            compression: CompressionReport::default(),
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
        let result = if self.s.retry_pull {
            self.retry_pull().await
        } else {
            self.drive().await
        };
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

    // ---- stages and bookkeeping ----

    fn enter(&mut self, stage: Stage) -> Result<(), Fail> {
        self.close_stage();
        self.machine = self.machine.enter(stage).map_err(|e| Fail::Local(e.to_string()))?;
        self.current = Some(stage);
        self.s.progress.set_stage(stage);
        let fired = self.plan.borrow_mut().take(stage, false);
        for fault in fired {
            self.inject(fault)?;
        }
        self.stage_started = clock::now();
        self.stage_pages = 0;
        self.stage_bytes = 0;
        // A span per stage, open from its start to its end, inside the migration's span.
        self.stage_span = Some(tracing::info_span!("stage", name = stage.name()));
        tracing::info!(stage = stage.name(), "stage started");
        let _ = self.s.events.send(MigrationEvent::StageStarted { stage });
        Ok(())
    }

    /// Carries out a planned source-side fault.
    fn inject(&self, fault: Fault) -> Result<(), Fail> {
        tracing::warn!(fault = fault.kind.name(), arg = fault.arg, after = ?fault.after, "injecting fault");
        match fault.kind {
            FaultKind::LinkStall => {
                self.s.end.data_tx.stall(Duration::from_millis(fault.arg));
                Ok(())
            }
            FaultKind::BandwidthCollapse => {
                self.s.end.data_tx.collapse(fault.arg);
                Ok(())
            }
            FaultKind::LinkDrop => {
                self.drop_link();
                Err(Fail::Link("injected fault: link dropped".into()))
            }
            FaultKind::PostcopyLinkLoss => {
                self.drop_link();
                self.link_down_until
                    .set(Some(clock::now() + Duration::from_millis(fault.arg)));
                Err(Fail::Link(format!(
                    "injected fault: post-copy link lost for {} ms",
                    fault.arg
                )))
            }
            FaultKind::Cancel => Err(Fail::Cancelled),
            FaultKind::CorruptFrame => {
                if let Some(plane) = &self.plane {
                    plane.corrupt_next_batch();
                }
                Ok(())
            }
            FaultKind::SourcePauseError => {
                self.fail_pause.set(true);
                Ok(())
            }
            FaultKind::LoseDirtyPage => {
                self.lose_page.set(true);
                Ok(())
            }
            // Target-side faults travel with the receiver's parameters.
            FaultKind::RefuseReservation | FaultKind::FailStateLoad | FaultKind::TargetCrash => Ok(()),
        }
    }

    /// Closes the link and stops the data plane, as a cut cable would.
    fn drop_link(&self) {
        if let Some(link) = &self.link {
            link.do_send(CloseLink);
        }
        if let Some(plane) = &self.plane {
            plane.abort();
        }
    }

    fn close_stage(&mut self) {
        if let Some(stage) = self.current.take() {
            let duration = clock::now().duration_since(self.stage_started);
            self.stages.push(StageReport {
                name: stage.name(),
                start_s: self.stage_started.duration_since(self.started).as_secs_f64(),
                duration_s: duration.as_secs_f64(),
                pages: self.stage_pages,
                bytes: self.stage_bytes,
            });
            metrics::histogram!(
                metric::STAGE_DURATION_SECONDS,
                "stage" => stage.name(),
                "algorithm" => self.s.req.algorithm.name()
            )
            .record(duration.as_secs_f64());
            if let Some(span) = self.stage_span.take() {
                tracing::info!(
                    parent: &span,
                    stage = stage.name(),
                    duration_ms = duration.as_secs_f64() * 1e3,
                    "stage completed"
                );
            }
            let _ = self.s.events.send(MigrationEvent::StageCompleted { stage, duration });
        }
    }

    fn set_remaining(&mut self, pages: u64) {
        let v = pages as f64;
        metrics::gauge!(metric::REMAINING_PAGES).increment(v - self.remaining_gauge);
        self.s.progress.set_remaining(pages);
        self.remaining_gauge = v;
    }

    fn account(&mut self, stats: &RoundStats) {
        let pushed_full = stats.full_pages;
        let pushed_zero = stats.zero_pages;
        let pulled = stats.pulled_pages;
        let pushed = (pushed_full + pushed_zero).saturating_sub(pulled);
        if self.first_pass_done {
            self.pages.retransmitted += pushed;
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "retransmitted").increment(pushed);
        } else {
            // A pass over pages never sent before; pulls are counted apart.
            let zero = pushed_zero.min(pushed);
            let normal = pushed - zero;
            self.pages.normal += normal;
            self.pages.zero += zero;
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "normal").increment(normal);
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "zero").increment(zero);
        }
        self.pages.pulled += pulled;
        metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "pulled").increment(pulled);
        self.bytes += stats.bytes;
        metrics::counter!(metric::BYTES_SENT_TOTAL).increment(stats.bytes);
        let enc = stats.encoding;
        let c = &mut self.compression;
        c.lz4_pages += enc.lz4_pages;
        c.xbzrle_pages += enc.delta_pages;
        c.xbzrle_cache_misses += enc.delta_misses;
        c.xbzrle_overflows += enc.delta_overflows;
        c.bytes_saved += enc.bytes_saved;
        if self.codecs != PageCodecs::NONE {
            metrics::counter!(metric::PAGES_ENCODED_TOTAL, "encoding" => "lz4").increment(enc.lz4_pages);
            metrics::counter!(metric::PAGES_ENCODED_TOTAL, "encoding" => "xbzrle").increment(enc.delta_pages);
            metrics::counter!(metric::COMPRESSION_SAVED_BYTES_TOTAL).increment(enc.bytes_saved);
        }
        self.stage_pages += stats.pages();
        self.stage_bytes += stats.bytes;
    }

    fn decide(&mut self, action: &str, reason: &str) {
        self.decisions.push(DecisionReport {
            after_round: self.rounds.saturating_sub(1),
            action: action.to_string(),
            reason: reason.to_string(),
        });
        let _ = self.s.events.send(MigrationEvent::Decision {
            action: action.to_string(),
            reason: reason.to_string(),
        });
    }

    fn fixed_switchover(&self, state_bytes: u64) -> Duration {
        let measured = self.measured().switchover;
        // Before any switchover was measured: two round trips (state/prepared, commit/activated)
        // plus the state over the bandwidth.
        let bw = if self.bandwidth > 0.0 {
            self.bandwidth
        } else {
            self.measured().bandwidth.unwrap_or(1e9)
        };
        let estimate = self.rtt * 2 + policy::transfer_time(state_bytes.div_ceil(PAGE_SIZE as u64), bw);
        measured.unwrap_or(estimate)
    }

    // ---- control plane ----

    async fn send(&self, msg: ControlMessage) -> Result<(), Fail> {
        let link = self.link.as_ref().ok_or_else(|| Fail::Link("no link".into()))?;
        match link.send(SendControl(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Fail::Link(e.to_string())),
            Err(e) => Err(Fail::Link(e.to_string())),
        }
    }

    fn cancellable(&self) -> bool {
        !self.s.committed.load(Ordering::Acquire)
    }

    /// The next control message from the target, with the step timeout and, before
    /// commitment, the user's cancel. Page requests are served on the way.
    async fn recv(&mut self) -> Result<ControlMessage, Fail> {
        // In pull the wait spans the whole background push; the keepalive bounds a dead peer.
        let deadline = if self.pulling {
            clock::now() + Duration::from_secs(365 * 24 * 3600)
        } else {
            clock::now() + self.s.req.step_timeout
        };
        loop {
            let cancellable = self.cancellable();
            let mut cancel = self.s.cancel.clone();
            let inbox = self.inbox.as_mut().ok_or_else(|| Fail::Link("no link".into()))?;
            let due = due_faults(&self.plan, self.current, &self.s.progress.sent_bytes, self.started);
            let ev = tokio::select! {
                biased;
                _ = cancel.wait_for(|c| *c), if cancellable => return Err(Fail::Cancelled),
                ev = inbox.recv() => ev,
                fired = due => {
                    for fault in fired {
                        self.inject(fault)?;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Fail::Timeout(self.current.map(|s| s.name()).unwrap_or("start")))
                }
            };
            match ev {
                Some(LinkEvent::Received(ControlMessage::PageRequest { pages })) => {
                    if let Some(plane) = &self.plane {
                        for p in pages {
                            plane.pull(p);
                        }
                    }
                }
                Some(LinkEvent::Received(ControlMessage::Abort { reason })) => {
                    return Err(Fail::Aborted {
                        side: Side::Target,
                        reason,
                    })
                }
                Some(LinkEvent::Received(ControlMessage::Refuse { reason })) => {
                    return Err(Fail::Aborted {
                        side: Side::Target,
                        reason,
                    })
                }
                Some(LinkEvent::Received(m)) => return Ok(m),
                Some(LinkEvent::Lost(e)) => return Err(Fail::Link(e.to_string())),
                None => return Err(Fail::Link("link actor stopped".into())),
            }
        }
    }

    async fn expect(&mut self, want: &'static str) -> Result<ControlMessage, Fail> {
        super::testpoint::hold_before_reply(want, self.s.id).await;
        let m = self.recv().await?;
        if m.name() == want {
            Ok(m)
        } else {
            Err(Fail::Protocol(format!("expected {want}, got {}", m.name())))
        }
    }

    /// Runs a data-plane job, abandoning it on cancel (the plane stops at the next batch).
    /// While a round runs, the control link still speaks: a cancel, the target's `Abort`, or
    /// the keepalive declaring the target silent all stop the round at its next batch.
    async fn with_cancel<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, crate::dataplane::DataPlaneError>>,
        inbox: &mut crate::link::LinkEvents,
    ) -> Result<T, Fail> {
        let mut cancel = self.s.cancel.clone();
        let cancellable = self.cancellable();
        let stop = |fail: Fail| {
            if let Some(p) = &self.plane {
                p.abort();
            }
            Err(fail)
        };
        tokio::pin!(fut);
        let data_failed = loop {
            let due = due_faults(&self.plan, self.current, &self.s.progress.sent_bytes, self.started);
            tokio::select! {
            r = &mut fut => match r {
                Ok(v) => return Ok(v),
                Err(e) => break e,
            },
            _ = cancel.wait_for(|c| *c), if cancellable => return stop(Fail::Cancelled),
            fired = due => {
                for fault in fired {
                    if let Err(fail) = self.inject(fault) {
                        return stop(fail);
                    }
                }
            }
            ev = inbox.recv() => return stop(match ev {
                Some(LinkEvent::Received(ControlMessage::Abort { reason })) => Fail::Aborted {
                    side: Side::Target,
                    reason,
                },
                Some(LinkEvent::Received(other)) => {
                    Fail::Protocol(format!("unexpected {} while pages were being sent", other.name()))
                }
                Some(LinkEvent::Lost(e)) => Fail::Link(e.to_string()),
                None => Fail::Link("link actor stopped".into()),
            }),
            }
        };
        // The data channel can close before the target's Abort (which explains why) arrives on
        // the control link; give the control link a moment to deliver it.
        let wait = self.s.req.keepalive.timeout.min(Duration::from_secs(2));
        match tokio::time::timeout(wait, inbox.recv()).await {
            Ok(Some(LinkEvent::Received(ControlMessage::Abort { reason }))) => Err(Fail::Aborted {
                side: Side::Target,
                reason,
            }),
            _ => Err(Fail::Link(data_failed.to_string())),
        }
    }

    async fn vm_call<M>(&self, msg: M) -> Result<M::Result, Fail>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Vm: Handler<M>,
    {
        ask(&self.s.vm, msg, std::any::type_name::<M>(), GUEST_ASK)
            .await
            .map_err(local)
    }

    // ---- the stages ----

    async fn drive(&mut self) -> Result<(), Fail> {
        let pool = self.premigration().await?;
        self.reservation().await?;
        // Only pre-copy rounds re-send pages; for the others a delta cache is pure cost.
        let resends = !matches!(self.algorithm, Algorithm::StopAndCopy | Algorithm::Postcopy);
        let encoding = PlaneEncoding {
            codecs: PageCodecs {
                xbzrle: self.codecs.xbzrle && resends,
                ..self.codecs
            },
            xbzrle_cache_bytes: self.s.req.xbzrle_cache_bytes,
        };
        let plane = SourcePlane::spawn(
            Arc::clone(&self.s.guest),
            self.s.end.data_tx.clone(),
            self.s.end.pool.clone(),
            Arc::clone(&self.s.progress.sent_bytes),
            encoding,
        )
        .map_err(local)?;
        self.compression.methods = plane.codecs().names().into_iter().map(String::from).collect();
        self.plane = Some(plane);
        match self.algorithm {
            Algorithm::StopAndCopy => {
                let all = PageSet::full(self.s.guest.memory().page_count());
                self.predict_up_front(all.len());
                self.stop_and_copy(all).await
            }
            Algorithm::Postcopy => {
                let all = PageSet::full(self.s.guest.memory().page_count());
                self.predict_up_front(all.len());
                self.postcopy(all).await
            }
            Algorithm::Precopy | Algorithm::Hybrid | Algorithm::Auto => {
                let (after, dirty) = self.precopy(&pool).await?;
                match after {
                    AfterPrecopy::StopAndCopy => self.stop_and_copy(dirty).await,
                    AfterPrecopy::Postcopy => self.postcopy(dirty).await,
                }
            }
        }
    }

    /// Starts a Link actor on `control`; its events arrive in `self.inbox`.
    fn open_link(&mut self, control: crate::link::ControlChannel) {
        let (owner_tx, inbox) = crate::link::event_channel();
        self.link = Some(Link::new(control, owner_tx, self.s.req.keepalive).start());
        self.inbox = Some(inbox);
    }

    /// `Hello`, `Welcome`, and both proofs of the cluster key. Returns the version the target
    /// chose and its capabilities. A recovery link always sends `Authenticate` (empty without
    /// a key), so the target knows when to hand it over.
    async fn handshake(&mut self, resume: bool) -> Result<(u32, Capabilities), Fail> {
        let my_nonce = match &self.s.key {
            Some(_) => auth::nonce().map_err(local)?,
            None => Vec::new(),
        };
        self.send(ControlMessage::Hello {
            capabilities: self.s.caps.clone(),
            requested: self.s.req.algorithm.into(),
            vm: self.s.guest.config().id.0.clone(),
            nonce: my_nonce.clone(),
            resume,
        })
        .await?;
        let (version, target_caps, their_nonce, proof) = match self.expect("Welcome").await? {
            ControlMessage::Welcome {
                version,
                capabilities,
                nonce,
                proof,
            } => (version, capabilities, nonce, proof),
            other => return Err(Fail::Protocol(format!("expected Welcome, got {}", other.name()))),
        };
        let proof = match &self.s.key {
            Some(key) => {
                // The target proves the key first; only then does this side reveal its own.
                if !key.verify(auth::TARGET, &my_nonce, &their_nonce, &proof) {
                    return Err(Fail::Aborted {
                        side: Side::Source,
                        reason: AbortReason::Unauthenticated {
                            detail: "the target's proof does not match this host's cluster key".into(),
                        },
                    });
                }
                Some(key.prove(auth::SOURCE, &their_nonce, &my_nonce))
            }
            None => None,
        };
        if proof.is_some() || resume {
            self.send(ControlMessage::Authenticate {
                proof: proof.unwrap_or_default(),
            })
            .await?;
        }
        Ok((version, target_caps))
    }

    async fn premigration(&mut self) -> Result<Pool, Fail> {
        self.enter(Stage::Premigration)?;
        let control = std::mem::replace(
            &mut self.s.end.control,
            crate::link::ControlChannel {
                tx: mpsc::channel(1).0,
                rx: mpsc::channel(1).1,
                latency: Duration::ZERO,
                fault: Default::default(),
            },
        );
        self.open_link(control);
        let sent = clock::now();
        let (version, target_caps) = self.handshake(false).await?;
        self.rtt = clock::now().duration_since(sent);
        self.target_layout = target_caps
            .layouts
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let pool = negotiate(&self.s.caps, &target_caps, self.s.req.algorithm).map_err(Fail::Negotiation)?;
        self.codecs = choose_compression(
            self.s.req.compression,
            self.s.req.shaping.bandwidth_bytes_per_sec,
            &self.s.caps,
            &target_caps,
        )
        .map_err(Fail::Negotiation)?;
        if pool.version != version {
            return Err(Fail::Protocol(format!(
                "target chose protocol version {version}, expected {}",
                pool.version
            )));
        }
        Ok(pool)
    }

    async fn reservation(&mut self) -> Result<(), Fail> {
        self.enter(Stage::Reservation)?;
        self.send(ControlMessage::Reserve {
            config: self.s.guest.config().clone(),
            algorithm: self.s.req.algorithm.into(),
        })
        .await?;
        self.expect("Reserved").await?;
        Ok(())
    }

    async fn send_round(&mut self, round: u32, pages: PageSet, rate: Option<u64>) -> Result<RoundStats, Fail> {
        let mut inbox = self.inbox.take().ok_or_else(|| Fail::Link("no link".into()))?;
        let result = match self.plane.as_ref() {
            Some(plane) => self.with_cancel(plane.send_round(round, pages, rate), &mut inbox).await,
            None => Err(Fail::Local("no data plane".into())),
        };
        self.inbox = Some(inbox);
        let stats = result?;
        self.account(&stats);
        Ok(stats)
    }

    async fn precopy(&mut self, pool: &Pool) -> Result<(AfterPrecopy, PageSet), Fail> {
        self.enter(Stage::Precopy)?;
        let tracker = DirtyTracker::new(Arc::clone(&self.s.guest) as Arc<dyn crate::dirty::DirtyLogSource>).start();
        ask(&tracker, StartDirtyLog, "dirty log start", GUEST_ASK)
            .await
            .map_err(local)?
            .map_err(local)?;
        self.tracker = Some(tracker.clone());
        let pages_total = self.s.guest.memory().page_count();
        let cfg = self.s.req.policy;
        let mut to_send = PageSet::full(pages_total);
        let mut history: Vec<u64> = Vec::new();
        let mut last_dirty_rate_bytes = 0.0;
        let precopy_started = clock::now();
        loop {
            let round = self.rounds;
            let rate = policy::round_rate(&cfg, round, last_dirty_rate_bytes);
            let round_started = clock::now();
            self.set_remaining(to_send.len());
            let stats = self.send_round(round, to_send, rate).await?;
            self.rounds += 1;
            self.first_pass_done = true;
            let batches_total = self.plane.as_ref().map(|p| p.batches_sent()).unwrap_or(0);
            self.send(ControlMessage::RoundDone { round, batches_total }).await?;
            let dirty = ask(&tracker, CollectDirtyPages, "dirty log collect", GUEST_ASK)
                .await
                .map_err(local)?
                .map_err(local)?;
            let round_time = clock::now().duration_since(round_started).as_secs_f64().max(1e-6);
            super::testpoint::hold(super::testpoint::Point::PrecopyRound, self.s.id).await;
            let dirty_rate = dirty.len() as f64 / round_time;
            last_dirty_rate_bytes = dirty_rate * PAGE_SIZE as f64;
            if stats.bytes > 0 {
                // In page bytes: the policy predicts from pages, and with compression a page
                // costs less than its size on the link.
                self.bandwidth = stats.page_bytes_per_sec().max(1.0);
            }
            let remaining = dirty.len();
            let fixed = self.fixed_switchover(4096);
            let expected = policy::predicted_downtime(remaining, self.bandwidth, fixed);
            self.set_remaining(remaining);
            metrics::gauge!(metric::DIRTY_RATE_PAGES_PER_SECOND).set(dirty_rate);
            metrics::gauge!(metric::LINK_THROUGHPUT_BYTES_PER_SECOND).set(stats.bytes_per_sec());
            metrics::gauge!(metric::EXPECTED_DOWNTIME_SECONDS).set(expected.as_secs_f64());
            self.s
                .progress
                .set_round(round, remaining, dirty_rate, self.bandwidth, expected.as_secs_f64());
            let _ = self.s.events.send(MigrationEvent::RoundCompleted {
                round,
                pages_sent: stats.pages(),
                remaining_pages: remaining,
                dirty_pages_per_sec: dirty_rate,
                bytes_per_sec: self.bandwidth,
                expected_downtime: expected,
            });
            if round == 0 && self.s.req.algorithm == Algorithm::Auto {
                let inputs = CostInputs {
                    remaining_pages: remaining,
                    dirty_pages_per_sec: dirty_rate,
                    working_set_pages: remaining.max(1),
                    bandwidth_bytes_per_sec: self.bandwidth,
                    fixed_switchover: fixed,
                };
                let concrete: Vec<Algorithm> = pool
                    .algorithms
                    .iter()
                    .copied()
                    .filter(|a| *a != Algorithm::Auto)
                    .collect();
                let (choice, options) = policy::choose_algorithm(&cfg, &concrete, &inputs);
                let elapsed = clock::now().duration_since(self.started);
                self.predicted = Some(PredictionReport {
                    algorithm: choice.algorithm.name().to_string(),
                    downtime_s: choice.downtime.as_secs_f64(),
                    total_s: (elapsed + choice.total).as_secs_f64(),
                    basis: format!(
                        "round 0: dirty rate {:.0} pages/s, bandwidth {:.1} MB/s, fixed switchover {:.2} ms; options: {}",
                        dirty_rate,
                        self.bandwidth / 1e6,
                        fixed.as_secs_f64() * 1e3,
                        options
                            .iter()
                            .map(|p| format!(
                                "{} {:.1} ms down / {:.2} s total{}",
                                p.algorithm,
                                p.downtime.as_secs_f64() * 1e3,
                                p.total.as_secs_f64(),
                                if p.converges { "" } else { " (does not converge)" }
                            ))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                });
                self.algorithm = choice.algorithm;
                self.decide(
                    &format!("auto chose {}", choice.algorithm),
                    "lowest predicted total time within the downtime limit",
                );
                match choice.algorithm {
                    Algorithm::Postcopy => return Ok((AfterPrecopy::Postcopy, dirty)),
                    Algorithm::StopAndCopy => return Ok((AfterPrecopy::StopAndCopy, dirty)),
                    _ => {}
                }
            }
            let ctx = RoundContext {
                algorithm: if self.s.req.algorithm == Algorithm::Auto {
                    Algorithm::Auto
                } else {
                    self.algorithm
                },
                rounds_done: self.rounds,
                remaining_pages: remaining,
                history: &history,
                bandwidth_bytes_per_sec: self.bandwidth,
                fixed_switchover: fixed,
                elapsed: clock::now().duration_since(precopy_started),
                postcopy_in_pool: pool.offers(Algorithm::Postcopy) || pool.offers(Algorithm::Hybrid),
            };
            let decision = policy::decide_round(&cfg, &ctx);
            history.push(remaining);
            match decision {
                Decision::Continue => to_send = dirty,
                Decision::StopAndCopy {
                    reason,
                    predicted_downtime,
                    forced,
                } => {
                    let action = if forced {
                        "forced stop-and-copy"
                    } else {
                        "stop-and-copy"
                    };
                    self.decide(
                        action,
                        &format!(
                            "{} (predicted downtime {:.1} ms)",
                            reason.describe(),
                            predicted_downtime.as_secs_f64() * 1e3
                        ),
                    );
                    if self.predicted.is_none() || self.algorithm == Algorithm::Precopy {
                        let elapsed = clock::now().duration_since(self.started);
                        self.predicted = Some(PredictionReport {
                            algorithm: self.algorithm.name().to_string(),
                            downtime_s: predicted_downtime.as_secs_f64(),
                            total_s: (elapsed + predicted_downtime).as_secs_f64(),
                            basis: format!(
                                "after round {round}: {remaining} pages at {:.1} MB/s plus {:.2} ms fixed switchover",
                                self.bandwidth / 1e6,
                                fixed.as_secs_f64() * 1e3
                            ),
                        });
                    }
                    return Ok((AfterPrecopy::StopAndCopy, dirty));
                }
                Decision::SwitchToPostcopy { reason } => {
                    self.decide("switch to post-copy", reason.describe());
                    if self.s.req.algorithm != Algorithm::Hybrid {
                        self.algorithm = Algorithm::Postcopy;
                    }
                    return Ok((AfterPrecopy::Postcopy, dirty));
                }
                Decision::Abort {
                    reason,
                    predicted_downtime,
                } => {
                    let detail = format!(
                        "{}; stop-and-copy would take {:.1} ms, over the {:.0} ms ceiling",
                        reason.describe(),
                        predicted_downtime.as_secs_f64() * 1e3,
                        cfg.downtime_ceiling.as_secs_f64() * 1e3
                    );
                    self.decide("abort", &detail);
                    return Err(Fail::Aborted {
                        side: Side::Source,
                        reason: AbortReason::NotConverging { detail },
                    });
                }
            }
        }
    }

    /// Pauses the VM (the start of downtime) and takes the final dirty set.
    async fn pause_and_collect(&mut self, mut pages: PageSet) -> Result<PageSet, Fail> {
        let was_running = self.s.guest.is_running();
        if self.fail_pause.get() {
            return Err(Fail::Local("injected fault: backend error on pause".into()));
        }
        // Marked before the ask: if it times out, the pause still lands later in the VM's turn,
        // and a rollback must resume after it.
        self.paused_by_us = was_running;
        self.vm_call(PauseVm).await?.map_err(local)?;
        self.paused_at = Some(clock::now());
        super::testpoint::hold(super::testpoint::Point::Stopcopy, self.s.id).await;
        if let Some(tracker) = self.tracker.take() {
            let last = ask(&tracker, CollectDirtyPages, "dirty log collect", GUEST_ASK)
                .await
                .map_err(local)?
                .map_err(local)?;
            pages.union_with(&last);
            let _ = ask(&tracker, StopDirtyLog, "dirty log stop", GUEST_ASK).await;
        }
        self.set_remaining(pages.len());
        Ok(pages)
    }

    /// The injected `lose-dirty-page`: a guest write the dirty log missed. One byte of a page
    /// of the paused source changes behind the log, and the page leaves the switchover's set, so
    /// the target keeps an older copy of it. The page is the first of the set, or page 0 when
    /// the set is empty (the write alone then makes the copies differ).
    fn maybe_lose_page(&self, pages: &mut PageSet) {
        if !self.lose_page.take() {
            return;
        }
        let page = pages.iter().next().unwrap_or(0);
        pages.remove(page);
        let memory = self.s.guest.memory();
        let mut bytes = vec![0u8; PAGE_SIZE];
        let written = memory
            .read_page(crate::units::PageIndex(page), &mut bytes)
            .and_then(|()| {
                bytes[0] = bytes[0].wrapping_add(1);
                memory.write_page(crate::units::PageIndex(page), &bytes)
            });
        match written {
            Ok(()) => tracing::warn!(page, "injected fault: a guest write the dirty log missed"),
            Err(e) => tracing::warn!(page, error = %e, "injected fault: the lost write could not be made"),
        }
    }

    async fn send_state(&mut self, missing: Vec<u8>) -> Result<(), Fail> {
        let batches_total = self.plane.as_ref().map(|p| p.batches_sent()).unwrap_or(0);
        self.send(ControlMessage::Suspend { batches_total, missing }).await?;
        let (vcpus, devices) = self.vm_call(SaveVmState).await?.map_err(local)?;
        self.send(ControlMessage::VcpuState { vcpus }).await?;
        self.send(ControlMessage::DeviceState { devices }).await?;
        Ok(())
    }

    /// The point of no return. A cancel acknowledged before this instant wins (the Migration
    /// actor and this run share a thread, so nothing slips between the check and the store).
    fn commit(&mut self) -> Result<(), Fail> {
        if *self.s.cancel.borrow() {
            return Err(Fail::Cancelled);
        }
        self.s.committed.store(true, Ordering::Release);
        Ok(())
    }

    fn measured(&self) -> Measured {
        *self.s.measured.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_switchover(&self, final_pages_time: Duration) {
        let mut m = self.s.measured.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = self.downtime {
            let fixed = d.saturating_sub(final_pages_time).as_secs_f64();
            m.switchover = Some(Duration::from_secs_f64(ewma(
                m.switchover.map(|s| s.as_secs_f64()),
                fixed,
            )));
        }
        if self.bandwidth > 0.0 {
            m.bandwidth = Some(ewma(m.bandwidth, self.bandwidth));
        }
    }

    /// The prediction of an algorithm that decides at once (stop-and-copy, post-copy), from
    /// what earlier migrations measured; none on an engine's first migration.
    fn predict_up_front(&mut self, pages: u64) {
        // Earlier migrations' measured bandwidth, else the link's configured cap.
        let configured = self.s.req.shaping.bandwidth_bytes_per_sec.map(|b| b as f64);
        let (bw, source) = match (self.measured().bandwidth, configured) {
            (Some(b), _) => (b, "earlier migrations"),
            (None, Some(b)) => (b, "the link's configured cap"),
            (None, None) => return,
        };
        let fixed = self.fixed_switchover(4096);
        let transfer = policy::transfer_time(pages, bw);
        let (down, total) = match self.algorithm {
            Algorithm::Postcopy => (fixed, fixed + transfer),
            _ => (transfer + fixed, transfer + fixed),
        };
        let elapsed = clock::now().duration_since(self.started);
        self.predicted = Some(PredictionReport {
            algorithm: self.algorithm.name().to_string(),
            downtime_s: down.as_secs_f64(),
            total_s: (elapsed + total).as_secs_f64(),
            basis: format!(
                "{pages} pages at {:.1} MB/s ({source}) plus {:.2} ms fixed switchover",
                bw / 1e6,
                fixed.as_secs_f64() * 1e3
            ),
        });
    }

    async fn stop_and_copy(&mut self, pages: PageSet) -> Result<(), Fail> {
        self.enter(Stage::Stopcopy)?;
        let mut pages = self.pause_and_collect(pages).await?;
        self.maybe_lose_page(&mut pages);
        // Memory is still from here on: hash it while the last pages travel.
        let hashing = self.hash_memory();
        let final_started = clock::now();
        let rate = self.s.req.policy.rate_cap;
        let round = self.rounds;
        let stats = self.send_round(round, pages, rate).await?;
        let final_time = clock::now().duration_since(final_started);
        if stats.bytes > 0 && self.bandwidth == 0.0 {
            self.bandwidth = stats.page_bytes_per_sec();
        }
        self.first_pass_done = true;
        self.set_remaining(0);
        self.send_state(Vec::new()).await?;
        self.enter(Stage::Commitment)?;
        // Verify before commit: a copy that differs is rolled back while the source still
        // owns the VM, never committed and never freed.
        self.verify(hashing).await?;
        self.expect("Prepared").await?;
        // The point of no return: from here the target owns the VM.
        self.commit()?;
        self.send(ControlMessage::Commit).await?;
        self.enter(Stage::Activation)?;
        self.expect("Activated").await?;
        self.activated = true;
        self.downtime = self.paused_at.map(|t| clock::now().duration_since(t));
        self.record_switchover(final_time);
        self.close_stage();
        self.release().await
    }

    async fn postcopy(&mut self, missing: PageSet) -> Result<(), Fail> {
        self.enter(Stage::Stopcopy)?;
        let mut missing = self.pause_and_collect(missing).await?;
        self.maybe_lose_page(&mut missing);
        self.demand_paged = true;
        self.send_state(missing.to_bytes()).await?;
        self.expect("Prepared").await?;
        self.enter(Stage::Activation)?;
        self.commit()?;
        self.send(ControlMessage::Commit).await?;
        self.expect("Activated").await?;
        self.activated = true;
        self.downtime = self.paused_at.map(|t| clock::now().duration_since(t));
        self.record_switchover(Duration::ZERO);
        self.pulling = true;
        // A fault at the pull's start is handled like any later link loss.
        let lost = self.enter(Stage::Pull).err();
        self.pull_until_done(missing, lost).await
    }

    /// The pull phase to its end, reconnecting (until the recovery timeout) each time the
    /// link is lost: until this side frees its copy, the target may lack pages only it holds.
    async fn pull_until_done(&mut self, mut missing: PageSet, mut lost: Option<Fail>) -> Result<(), Fail> {
        loop {
            let attempt = match lost.take() {
                Some(fail) => Err(fail),
                None => self.pull_and_verify(missing).await,
            };
            match attempt {
                Ok(()) => return Ok(()),
                // Until this side frees its copy, a lost link is recovered: the target may
                // lack pages, and it must still confirm every page before the copy goes.
                Err(Fail::Link(cause)) if !self.s.req.recovery_timeout.is_zero() => {
                    missing = self.recover(cause).await?;
                }
                Err(fail) => return Err(fail),
            }
        }
    }

    /// `migrate --recover`: the held copy of a post-copy migration whose recovery timed out.
    /// The target (its copy awaiting pages) still takes a recovery link; the pull carries on
    /// from the pages it lacks.
    async fn retry_pull(&mut self) -> Result<(), Fail> {
        self.algorithm = Algorithm::Postcopy;
        self.s.committed.store(true, Ordering::Release);
        self.activated = true;
        self.pulling = true;
        self.machine = StageMachine::resuming_pull();
        self.current = Some(Stage::Pull);
        self.stage_started = clock::now();
        let lost = Fail::Link("recovery asked for by the operator".into());
        self.pull_until_done(PageSet::empty(0), Some(lost)).await
    }

    async fn pull_and_verify(&mut self, missing: PageSet) -> Result<(), Fail> {
        self.pull(missing).await?;
        if self.current == Some(Stage::Pull) {
            self.enter(Stage::Commitment)?;
        }
        // The source copy has been paused since the switchover: its memory is still.
        let hashing = self.hash_memory();
        self.verify(hashing).await?;
        self.release().await
    }

    /// One attempt at the pull phase over the current link: serve the target's page requests
    /// and push `missing` in the background until the target holds every page.
    async fn pull(&mut self, missing: PageSet) -> Result<(), Fail> {
        let plane = self.plane.as_ref().ok_or_else(|| Fail::Local("no data plane".into()))?;
        let mut pushed = plane.start_postcopy(missing).map_err(local)?;
        super::testpoint::hold(super::testpoint::Point::Pull, self.s.id).await;
        let mut push_stats = None;
        loop {
            tokio::select! {
                r = &mut pushed, if push_stats.is_none() => {
                    let stats = r.map_err(local)?.map_err(|e| Fail::Link(e.to_string()))?;
                    push_stats = Some(stats);
                }
                m = self.recv() => {
                    match m? {
                        ControlMessage::Complete => break,
                        other => return Err(Fail::Protocol(format!("expected Complete, got {}", other.name()))),
                    }
                }
            }
        }
        self.pulling = false;
        // The target can hold every page before the push job has reported: wait for its figures.
        let stats = match push_stats {
            Some(s) => s,
            None => tokio::time::timeout(self.s.req.step_timeout, pushed)
                .await
                .map_err(|_| Fail::Timeout("pull"))?
                .map_err(local)?
                .map_err(|e| Fail::Link(e.to_string()))?,
        };
        self.account(&stats);
        // Pulls answered after the push ended are counted by the plane alone.
        let late = self
            .plane
            .as_ref()
            .map_or(0, |p| p.pulled())
            .saturating_sub(stats.pulled_pages);
        self.pages.pulled += late;
        metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "pulled").increment(late);
        Ok(())
    }

    /// Post-copy recovery, in the manner of QEMU's migrate-recover: the link failed in the pull
    /// phase. The target paused the guest; this side keeps its paused copy and reconnects until
    /// the recovery timeout, then carries the pull on from the pages the target still lacks.
    async fn recover(&mut self, cause: String) -> Result<PageSet, Fail> {
        let started = clock::now();
        tracing::warn!(cause = %cause, "post-copy link lost; reconnecting");
        if let Some(plane) = self.plane.take() {
            plane.abort();
            // Pages this plane's push sent are in the byte count; its pulls are counted here.
            let pulled = plane.pulled();
            self.pages.pulled += pulled;
            metrics::counter!(metric::PAGES_SENT_TOTAL, "kind" => "pulled").increment(pulled);
        }
        if let Some(link) = self.link.take() {
            link.do_send(CloseLink);
        }
        self.inbox = None;
        let _ = self.s.events.send(MigrationEvent::PullInterrupted {
            side: Side::Source,
            reason: cause.clone(),
            missing_pages: 0,
        });
        let timeout = self.s.req.recovery_timeout;
        let deadline = started + timeout;
        let mut last = String::from("no attempt yet");
        let mut backoff = Duration::from_millis(50);
        loop {
            let now = clock::now();
            if now >= deadline {
                return Err(Fail::RecoveryTimeout {
                    cause,
                    last,
                    after: timeout,
                });
            }
            // An injected outage: nothing gets through until it ends.
            if let Some(until) = self.link_down_until.get().filter(|u| *u > now) {
                last = "the link is down (injected fault)".into();
                tokio::time::sleep_until(until.min(deadline)).await;
                continue;
            }
            let bound = deadline.duration_since(now).min(self.s.req.step_timeout);
            let route = self.s.route.clone();
            match tokio::time::timeout(bound, route.connect()).await {
                Ok(Ok(end)) => match tokio::time::timeout(bound, self.resume_on(end)).await {
                    Ok(Ok(missing)) => {
                        self.recoveries += 1;
                        tracing::info!(
                            recoveries = self.recoveries,
                            missing = missing.len(),
                            after_ms = clock::now().duration_since(started).as_millis() as u64,
                            "post-copy pull resumed on a new link"
                        );
                        let _ = self.s.events.send(MigrationEvent::PullResumed {
                            side: Side::Source,
                            recoveries: self.recoveries,
                            missing_pages: missing.len(),
                        });
                        return Ok(missing);
                    }
                    // The target answered and refused: nothing there awaits this pull.
                    Ok(Err(fail @ Fail::Aborted { .. })) | Ok(Err(fail @ Fail::Protocol(_))) => {
                        self.drop_link();
                        return Err(fail);
                    }
                    Ok(Err(fail)) => {
                        self.drop_link();
                        last = fail.into_error(Some(Stage::Pull), self.s.id).to_string();
                    }
                    Err(_) => {
                        self.drop_link();
                        last = "the target did not answer the recovery handshake".into();
                    }
                },
                Ok(Err(e)) => last = e,
                Err(_) => last = "connecting timed out".into(),
            }
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(clock::now()))).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// The recovery handshake on a new link; returns the pages the target still lacks and
    /// leaves a data plane running on the new link.
    async fn resume_on(&mut self, end: LinkEnd) -> Result<PageSet, Fail> {
        let LinkEnd {
            control,
            data_tx,
            data_rx: _,
            pool,
        } = end;
        self.open_link(control);
        self.handshake(true).await?;
        let pages = self.s.guest.memory().page_count();
        let missing = match self.expect("Resumed").await? {
            ControlMessage::Resumed { missing } => PageSet::from_bytes(&missing, pages).ok_or_else(|| {
                Fail::Protocol(format!(
                    "missing-page bitmap of {} bytes for {pages} pages",
                    missing.len()
                ))
            })?,
            other => return Err(Fail::Protocol(format!("expected Resumed, got {}", other.name()))),
        };
        // Post-copy sends no delta: the target's guest writes its own pages by now.
        let encoding = PlaneEncoding {
            codecs: PageCodecs {
                xbzrle: false,
                ..self.codecs
            },
            xbzrle_cache_bytes: 0,
        };
        let plane = SourcePlane::spawn(
            Arc::clone(&self.s.guest),
            data_tx.clone(),
            pool,
            Arc::clone(&self.s.progress.sent_bytes),
            encoding,
        )
        .map_err(local)?;
        // Link faults (stall, collapse) act on the link in use.
        self.s.end.data_tx = data_tx;
        self.plane = Some(plane);
        Ok(missing)
    }

    /// Digests of the source's memory, computed off the actor thread; call once the guest is
    /// paused for good.
    fn hash_memory(&self) -> tokio::task::JoinHandle<Vec<u64>> {
        let guest = Arc::clone(&self.s.guest);
        tokio::task::spawn_blocking(move || verify::digests(guest.as_ref()))
    }

    /// Receives the target's digests of every page as it received it and compares them with
    /// the source's memory. A difference is a [`Fail::Verification`].
    async fn verify(&mut self, hashing: tokio::task::JoinHandle<Vec<u64>>) -> Result<(), Fail> {
        let verify_started = clock::now();
        let pages = self.s.guest.memory().page_count() as usize;
        let mut target = Vec::with_capacity(pages);
        let memory_mismatches;
        loop {
            match self.expect("Digests").await? {
                ControlMessage::Digests {
                    first_page,
                    digests,
                    last,
                    memory_mismatches: mm,
                    faults,
                    fault_wait_s,
                } => {
                    if first_page != target.len() as u64 || target.len() + digests.len() > pages {
                        return Err(Fail::Protocol(format!(
                            "digests from page {first_page} ({} of them) do not follow the {} received",
                            digests.len(),
                            target.len()
                        )));
                    }
                    target.extend_from_slice(&digests);
                    if last {
                        memory_mismatches = mm;
                        let mean = if faults > 0 { fault_wait_s / faults as f64 } else { 0.0 };
                        self.faults = (faults, mean);
                        break;
                    }
                }
                other => return Err(Fail::Protocol(format!("expected Digests, got {}", other.name()))),
            }
        }
        let source = hashing.await.map_err(local)?;
        let count = verify::count_differences(&source, &target) as u64;
        let mut mismatched = verify::compare(&source, &target);
        mismatched.extend(
            memory_mismatches
                .into_iter()
                .take(super::receiver::MAX_LISTED_MISMATCHES),
        );
        mismatched.sort_unstable();
        mismatched.dedup();
        mismatched.truncate(super::receiver::MAX_LISTED_MISMATCHES);
        self.verification = clock::now().duration_since(verify_started);
        self.verified = mismatched.is_empty() && target.len() == source.len();
        self.mismatched = mismatched.clone();
        if !self.verified {
            return Err(Fail::Verification {
                count: count.max(mismatched.len() as u64),
                mismatched,
            });
        }
        Ok(())
    }

    /// The target verified every page and runs the VM: free the source copy and complete.
    async fn release(&mut self) -> Result<(), Fail> {
        self.vm_call(EndOutgoing { moved: true }).await?.map_err(local)?;
        self.paused_by_us = false;
        // The copy here is gone and the target holds every page: a link that fails now changes
        // nothing; the target owns the VM whether or not it hears this.
        if let Err(e) = self.send(ControlMessage::Complete).await {
            tracing::warn!(error = ?e, "the final Complete did not reach the target; it runs the VM regardless");
        }
        self.machine = self.machine.finish().map_err(|e| Fail::Local(e.to_string()))?;
        Ok(())
    }

    /// Rolls back before commitment; after it, leaves the VM where the protocol says it is.
    async fn fail(&mut self, fail: Fail) -> (Outcome, Option<String>, VmLocation) {
        let committed = !self.cancellable();
        if let Some(plane) = &self.plane {
            plane.abort();
        }
        if let Some(reason) = fail.reason_for_peer() {
            // After commitment the target owns the VM: an Abort could only make it drop it.
            if !matches!(fail, Fail::Link(_)) && !committed {
                let _ = self.send(ControlMessage::Abort { reason }).await;
            }
        }
        if let Some(tracker) = self.tracker.take() {
            let _ = ask(&tracker, StopDirtyLog, "dirty log stop", GUEST_ASK).await;
        }
        let outcome = fail.outcome();
        let stage = self.current;
        let error = fail.into_error(stage, self.s.id).to_string();
        let location = if !committed {
            // Before commitment the source copy is the only one: run it again.
            if self.paused_by_us {
                if let Err(e) = ask(&self.s.vm, ResumeVm, "vm resume", GUEST_ASK).await {
                    tracing::error!(error = %e, "rollback: the source VM did not resume");
                }
            }
            if let Err(e) = ask(&self.s.vm, EndOutgoing { moved: false }, "vm end outgoing", GUEST_ASK).await {
                tracing::error!(error = %e, "rollback: the source VM was not handed back");
            }
            VmLocation::Source
        } else if self.activated && !self.pulling {
            VmLocation::Target
        } else if self.activated || self.demand_paged {
            // Post-copy cut short: the target runs the VM but lacks pages only this paused
            // copy holds. Keep it; never resume it.
            VmLocation::TargetAwaitingPages
        } else {
            // Commit went out and no answer came: the target may run the VM. Keep this copy
            // paused; resuming it could make two.
            VmLocation::Undetermined
        };
        (if committed { Outcome::Failed } else { outcome }, Some(error), location)
    }

    fn report(&mut self, result: Outcome, error: Option<String>, vm_location: VmLocation) -> MigrationReport {
        let total = clock::now().duration_since(self.started);
        let downtime = self.downtime.unwrap_or(Duration::ZERO);
        let alg_label = self.s.req.algorithm.name();
        metrics::counter!(metric::MIGRATIONS_TOTAL, "algorithm" => alg_label, "result" => result.label()).increment(1);
        if result.succeeded() {
            metrics::histogram!(metric::DOWNTIME_SECONDS, "algorithm" => alg_label).record(downtime.as_secs_f64());
            metrics::histogram!(metric::TOTAL_TIME_SECONDS, "algorithm" => alg_label).record(total.as_secs_f64());
            metrics::histogram!(metric::PRECOPY_ROUNDS).record(f64::from(self.rounds));
        }
        let faults = self.faults;
        MigrationReport {
            id: self.s.id,
            vm: self.s.guest.config().id.0.clone(),
            source: self.s.req.source.clone(),
            target: self.s.req.target.clone(),
            source_layout: self.s.guest.layout().to_string(),
            target_layout: self.target_layout.clone(),
            requested: self.s.req.algorithm.name().to_string(),
            algorithm: self.algorithm.name().to_string(),
            result,
            error,
            vm_location,
            stages: std::mem::take(&mut self.stages),
            pages: self.pages,
            // Bytes of an unfinished round count too: the plane's live counter is the truth.
            bytes_sent: self.bytes.max(self.s.progress.sent_bytes.load(Ordering::Relaxed)),
            compression: CompressionReport {
                requested: self.s.req.compression.name().to_string(),
                ..std::mem::take(&mut self.compression)
            },
            rounds: self.rounds,
            downtime_s: downtime.as_secs_f64(),
            total_s: total.as_secs_f64(),
            throughput_bytes_per_s: if total.as_secs_f64() > 0.0 {
                self.bytes as f64 / total.as_secs_f64()
            } else {
                0.0
            },
            predicted: self.predicted.clone(),
            decisions: std::mem::take(&mut self.decisions),
            verified: self.verified,
            mismatched_pages: std::mem::take(&mut self.mismatched),
            postcopy_faults: faults.0,
            mean_fault_latency_s: faults.1,
            verification_s: self.verification.as_secs_f64(),
            recoveries: self.recoveries,
        }
    }
}
