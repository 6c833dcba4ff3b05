//! Fault injection on the source side, built only when a migration's plan has source faults:
//! a run without one carries no fault state, no timer and no check.
//!
//! Link faults are a decorator on the data sender ([`Throttle`]): it stalls or slows what
//! leaves, and counts the bytes, so that a byte trigger fires when the bytes pass instead of
//! on a poll. A time trigger is a timer that wakes the run. Protocol-step faults (a failed
//! pause, a dirty page the log misses, a cut link, a cancel) fire as their stage starts and
//! act through the run, where a real failure of the same kind would show.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::fail::Fail;
use super::SourceRun;
use crate::clock::{self, Instant};
use crate::engine::faults::{Fault, FaultKind, FaultPlan, Threshold};
use crate::engine::stage::Stage;
use crate::link::{CloseLink, DataSender, Throttle, TokenBucket};

/// The source's share of a fault plan and the state its faults leave behind.
#[derive(Debug)]
pub(super) struct Injector {
    plan: Mutex<FaultPlan>,
    started: Instant,
    link: Arc<LinkFaults>,
    timers: Vec<tokio::task::JoinHandle<()>>,
    /// Injected: the next pause fails in the backend.
    pub(super) pause_fails: Cell<bool>,
    /// Injected: the switchover's dirty set loses one page.
    pub(super) lose_page: Cell<bool>,
    /// An injected post-copy link loss: the link stays down until then.
    pub(super) link_down_until: Cell<Option<Instant>>,
}

impl Injector {
    /// The injector of `plan`'s source faults; `None` if it has none. Time triggers count
    /// from `started`. Call inside the runtime (it starts the triggers' timers).
    pub fn new(plan: &FaultPlan, started: Instant) -> Option<Self> {
        let mine: Vec<Fault> = plan.0.iter().copied().filter(|f| !f.kind.on_target()).collect();
        if mine.is_empty() {
            return None;
        }
        let link = Arc::new(LinkFaults::default());
        let timers = mine
            .iter()
            .filter_map(|f| match f.after {
                Some(Threshold::Elapsed(d)) => Some(d),
                _ => None,
            })
            .map(|d| {
                let link = Arc::downgrade(&link);
                tokio::spawn(async move {
                    tokio::time::sleep_until(started + d).await;
                    if let Some(link) = link.upgrade() {
                        link.nudge.notify_one();
                    }
                })
            })
            .collect();
        Some(Self {
            plan: Mutex::new(FaultPlan(mine)),
            started,
            link,
            timers,
            pause_fails: Cell::new(false),
            lose_page: Cell::new(false),
            link_down_until: Cell::new(None),
        })
    }

    /// Puts the link decorator on `tx` (and the clones made from it after).
    pub fn decorate(&self, tx: &mut DataSender) {
        tx.throttle(Arc::clone(&self.link) as Arc<dyn Throttle>);
    }

    /// The faults that fire as `stage` starts: those planned for it, and those whose trigger
    /// passed in a stage where they could not fire.
    pub fn at_stage(&self, stage: Stage) -> Vec<Fault> {
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        let mut fired = plan.take(stage, false);
        fired.extend(plan.take_due(
            stage,
            false,
            self.link.sent(),
            clock::now().duration_since(self.started),
        ));
        fired
    }

    fn take_due(&self, stage: Stage) -> Vec<Fault> {
        let elapsed = clock::now().duration_since(self.started);
        self.plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_due(stage, false, self.link.sent(), elapsed)
    }

    fn has_thresholds(&self) -> bool {
        self.plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_thresholds(false)
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        for t in &self.timers {
            t.abort();
        }
    }
}

/// Resolves with the faults whose byte or time trigger has passed and that may fire in
/// `stage`; never resolves without an injector, outside a stage, or with no trigger waiting.
pub(super) async fn due(injector: Option<&Injector>, stage: Option<Stage>) -> Vec<Fault> {
    let (Some(injector), Some(stage)) = (injector, stage) else {
        return std::future::pending().await;
    };
    if !injector.has_thresholds() {
        return std::future::pending().await;
    }
    loop {
        let fired = injector.take_due(stage);
        if !fired.is_empty() {
            return fired;
        }
        // A permit stored by a nudge that came since the check is not lost.
        injector.link.nudge.notified().await;
    }
}

/// The decorator on the data sender: stalls, a collapsed bandwidth, and the byte count that
/// byte triggers watch.
#[derive(Debug, Default)]
struct LinkFaults {
    stall_until: Mutex<Option<std::time::Instant>>,
    collapse: Mutex<Option<TokenBucket>>,
    sent: AtomicU64,
    /// Wakes the run to check its triggers: a frame left, or a timer ran out.
    nudge: Notify,
}

impl LinkFaults {
    /// No bytes leave until `duration` has passed.
    fn stall(&self, duration: Duration) {
        *self.stall_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now() + duration);
    }

    /// From now on the link carries at most `bytes_per_sec`.
    fn collapse(&self, bytes_per_sec: u64) {
        *self.collapse.lock().unwrap_or_else(|p| p.into_inner()) = Some(TokenBucket::new(bytes_per_sec));
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Throttle for LinkFaults {
    fn delay(&self, bytes: usize) -> Duration {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.nudge.notify_one();
        let collapsed = self
            .collapse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(|b| b.take(bytes as u64))
            .unwrap_or_default();
        let stalled = self
            .stall_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_default();
        collapsed.max(stalled)
    }
}

impl SourceRun {
    fn injector(&self) -> Result<&Injector, Fail> {
        // A fault fires only through an injector, so this cannot miss; an error, not a panic.
        self.faults
            .as_ref()
            .ok_or_else(|| Fail::Local("a fault fired without an injector".into()))
    }

    /// Carries out a planned source-side fault.
    pub(super) fn inject(&self, fault: Fault) -> Result<(), Fail> {
        tracing::warn!(fault = fault.kind.name(), arg = fault.arg, after = ?fault.after, "injecting fault");
        match fault.kind {
            FaultKind::LinkStall => {
                self.injector()?.link.stall(Duration::from_millis(fault.arg));
                Ok(())
            }
            FaultKind::BandwidthCollapse => {
                self.injector()?.link.collapse(fault.arg);
                Ok(())
            }
            FaultKind::LinkDrop => {
                self.drop_link();
                Err(Fail::Link("injected fault: link dropped".into()))
            }
            FaultKind::PostcopyLinkLoss => {
                self.drop_link();
                self.injector()?
                    .link_down_until
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
                self.injector()?.pause_fails.set(true);
                Ok(())
            }
            FaultKind::LoseDirtyPage => {
                self.injector()?.lose_page.set(true);
                Ok(())
            }
            // Target-side faults travel with the receiver's parameters.
            FaultKind::RefuseReservation | FaultKind::FailStateLoad | FaultKind::TargetCrash => Ok(()),
        }
    }

    /// Closes the link and stops the data plane, as a cut cable would.
    pub(super) fn drop_link(&self) {
        if let Some(link) = &self.link {
            link.do_send(CloseLink);
        }
        if let Some(plane) = &self.plane {
            plane.abort();
        }
    }
}
