//! Fault plans: failures injected on purpose, so that embedders can test their own handling
//! and the engine's invariants can be checked under every failure.
//!
//! A plan is a list of `KIND[:ARG][@WHEN]` entries (`link-drop@precopy,refuse-reservation`,
//! `link-stall:500ms@precopy`, `bandwidth-collapse:2MB`, `link-drop@64MiB`,
//! `postcopy-link-loss:2s@128MiB`, `cancel@1.5s`). WHEN is a stage, a byte count (fires once that
//! many page bytes have left the source) or a time (since the migration started); without it
//! the fault fires at the first stage where it applies. A byte or time trigger that passes in a
//! stage where its fault cannot fire waits for the next stage where it can. Source-side faults
//! fire when the source enters the stage; target-side faults fire in the receiver's matching
//! action and work on in-process links (a TCP target runs its own daemon, with its own plan).

use std::fmt;
use std::str::FromStr;

use super::stage::Stage;
use crate::telemetry::metric;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The link between the hosts closes.
    LinkDrop,
    /// One page of the next batch is corrupted on the way (the target must refuse it).
    CorruptFrame,
    /// The user cancels.
    Cancel,
    /// The source backend fails to pause the VM.
    SourcePauseError,
    /// The target refuses the reservation.
    RefuseReservation,
    /// The target backend fails while loading vCPU and device state.
    FailStateLoad,
    /// The target host crashes: its receiver vanishes without a word.
    TargetCrash,
    /// No page bytes leave for a while (argument: duration, default 300 ms).
    LinkStall,
    /// The link's bandwidth collapses (argument: bytes per second, default 2 MB/s).
    BandwidthCollapse,
    /// In post-copy's pull phase the link goes down and comes back after a while (argument:
    /// duration, default 1 s): the target pauses the guest, the source reconnects and the pull
    /// resumes where it stopped.
    PostcopyLinkLoss,
    /// The source's dirty log loses one page at the switchover, so the target ends up with a
    /// stale copy of it: verification must catch it (before `Commit` it rolls back; in
    /// post-copy, after commitment, the source copy is held, never freed).
    LoseDirtyPage,
}

impl FaultKind {
    /// Every kind, in a stable order.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::LinkDrop,
        FaultKind::CorruptFrame,
        FaultKind::Cancel,
        FaultKind::SourcePauseError,
        FaultKind::RefuseReservation,
        FaultKind::FailStateLoad,
        FaultKind::TargetCrash,
        FaultKind::LinkStall,
        FaultKind::BandwidthCollapse,
        FaultKind::PostcopyLinkLoss,
        FaultKind::LoseDirtyPage,
    ];

    /// The name in a plan and in `migratory_faults_injected_total{kind}`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LinkDrop => "link-drop",
            FaultKind::CorruptFrame => "corrupt-frame",
            FaultKind::Cancel => "cancel",
            FaultKind::SourcePauseError => "source-pause-error",
            FaultKind::RefuseReservation => "refuse-reservation",
            FaultKind::FailStateLoad => "fail-state-load",
            FaultKind::TargetCrash => "target-crash",
            FaultKind::LinkStall => "link-stall",
            FaultKind::BandwidthCollapse => "bandwidth-collapse",
            FaultKind::PostcopyLinkLoss => "postcopy-link-loss",
            FaultKind::LoseDirtyPage => "lose-dirty-page",
        }
    }

    /// The stages where the fault can fire; the first is its default.
    pub fn stages(self) -> &'static [Stage] {
        use Stage::*;
        match self {
            FaultKind::LinkDrop | FaultKind::Cancel => &[Premigration, Reservation, Precopy, Stopcopy],
            // At activation: `Commit` arrived and the target dies before it runs the VM.
            FaultKind::TargetCrash => &[Premigration, Reservation, Precopy, Stopcopy, Activation],
            FaultKind::CorruptFrame | FaultKind::LinkStall | FaultKind::BandwidthCollapse => &[Precopy, Stopcopy],
            FaultKind::SourcePauseError => &[Stopcopy],
            FaultKind::RefuseReservation => &[Reservation],
            FaultKind::FailStateLoad | FaultKind::LoseDirtyPage => &[Stopcopy],
            FaultKind::PostcopyLinkLoss => &[Pull],
        }
    }

    /// True if the fault may also fire on a byte count or a time: it does not belong to one
    /// protocol step.
    pub fn takes_threshold(self) -> bool {
        !matches!(
            self,
            FaultKind::SourcePauseError
                | FaultKind::RefuseReservation
                | FaultKind::FailStateLoad
                | FaultKind::LoseDirtyPage
        )
    }

    /// True if the migration is expected to survive it (slower, but complete and verified).
    pub fn survivable(self) -> bool {
        matches!(
            self,
            FaultKind::LinkStall | FaultKind::BandwidthCollapse | FaultKind::PostcopyLinkLoss
        )
    }

    fn default_arg(self) -> u64 {
        match self {
            FaultKind::LinkStall => 300,
            FaultKind::PostcopyLinkLoss => 1000,
            FaultKind::BandwidthCollapse => 2_000_000,
            _ => 0,
        }
    }

    /// True if the target side carries it out.
    pub fn on_target(self) -> bool {
        matches!(
            self,
            FaultKind::RefuseReservation | FaultKind::FailStateLoad | FaultKind::TargetCrash
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A trigger other than a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// Once this many page bytes have left the source (received, on the target).
    Bytes(u64),
    /// This long after the migration started.
    Elapsed(std::time::Duration),
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Bytes(b) => write!(f, "{}", crate::units::ByteSize(*b)),
            Threshold::Elapsed(d) => write!(f, "{}ms", d.as_millis()),
        }
    }
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// When: the stage it fires at, or with `after`, the first stage where it may.
    pub stage: Stage,
    /// Its argument: milliseconds for a stall or a post-copy link loss, bytes per second for a
    /// collapse, else 0.
    pub arg: u64,
    /// A byte or time trigger instead of the stage's start.
    pub after: Option<Threshold>,
}

impl Fault {
    /// True if the fault fires when `stage` starts.
    fn at_start_of(&self, stage: Stage) -> bool {
        self.after.is_none() && self.stage == stage
    }

    /// True if a passed threshold lets the fault fire now, in `stage`.
    pub fn due(&self, stage: Stage, bytes: u64, elapsed: std::time::Duration) -> bool {
        let passed = match self.after {
            Some(Threshold::Bytes(b)) => bytes >= b,
            Some(Threshold::Elapsed(d)) => elapsed >= d,
            None => return false,
        };
        passed && self.kind.stages().contains(&stage)
    }
}

/// A plan that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultPlanError {
    /// An unknown fault kind.
    #[error("unknown fault {0:?} (kinds: {kinds})", kinds = FaultKind::ALL.map(|k| k.name()).join(", "))]
    UnknownKind(String),
    /// An unknown stage name.
    #[error("unknown stage {0:?}")]
    UnknownStage(String),
    /// An argument that does not parse.
    #[error("bad argument {arg:?} for {kind}: {detail}")]
    BadArgument {
        /// The fault.
        kind: FaultKind,
        /// What was given.
        arg: String,
        /// What is expected.
        detail: &'static str,
    },
    /// A fault tied to one protocol step, given a byte or time trigger.
    #[error("{kind} fires at a stage only (it belongs to one protocol step), not after {after}")]
    NoThreshold {
        /// The fault.
        kind: FaultKind,
        /// The trigger given.
        after: Threshold,
    },
    /// A stage where the fault cannot fire.
    #[error("{kind} cannot fire in {stage} (it can in: {allowed})")]
    WrongStage {
        /// The fault.
        kind: FaultKind,
        /// The stage asked for.
        stage: Stage,
        /// Where it can.
        allowed: String,
    },
}

/// A list of faults to inject into one migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan(pub Vec<Fault>);

impl FaultPlan {
    /// True if nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The faults of `side` (target if `on_target`) planned for `stage`, each counted in
    /// `migratory_faults_injected_total` as it is handed out.
    pub fn take(&mut self, stage: Stage, on_target: bool) -> Vec<Fault> {
        self.take_where(|f| f.at_start_of(stage) && f.kind.on_target() == on_target)
    }

    /// The faults of `side` whose byte or time trigger has passed and that may fire in `stage`.
    pub fn take_due(&mut self, stage: Stage, on_target: bool, bytes: u64, elapsed: std::time::Duration) -> Vec<Fault> {
        self.take_where(|f| f.kind.on_target() == on_target && f.due(stage, bytes, elapsed))
    }

    /// True if a fault of `side` waits on a byte or time trigger.
    pub fn has_thresholds(&self, on_target: bool) -> bool {
        self.0
            .iter()
            .any(|f| f.after.is_some() && f.kind.on_target() == on_target)
    }

    fn take_where(&mut self, fire: impl Fn(&Fault) -> bool) -> Vec<Fault> {
        let mut fired = Vec::new();
        self.0.retain(|f| {
            let fire = fire(f);
            if fire {
                metrics::counter!(metric::FAULTS_INJECTED_TOTAL, "kind" => f.kind.name()).increment(1);
                fired.push(*f);
            }
            !fire
        });
        fired
    }

    /// The target's share of the plan.
    pub fn for_target(&self) -> FaultPlan {
        FaultPlan(self.0.iter().copied().filter(|f| f.kind.on_target()).collect())
    }
}

fn parse_arg(kind: FaultKind, a: &str) -> Result<u64, FaultPlanError> {
    let bad = |detail| FaultPlanError::BadArgument {
        kind,
        arg: a.to_string(),
        detail,
    };
    match kind {
        FaultKind::LinkStall | FaultKind::PostcopyLinkLoss => millis(a)
            .filter(|&ms| ms <= 600_000)
            .ok_or_else(|| bad("a duration such as 500ms or 2s, at most 10 min")),
        FaultKind::BandwidthCollapse => a
            .parse::<crate::units::ByteSize>()
            .ok()
            .map(|b| b.0)
            .filter(|&b| b >= 1024)
            .ok_or_else(|| bad("bytes per second such as 2MB, at least 1 KiB")),
        _ => Err(bad("this fault takes no argument")),
    }
}

/// `500ms`, `2s`, `1.5s` or a bare number of milliseconds.
fn millis(a: &str) -> Option<u64> {
    if let Some(v) = a.strip_suffix("ms") {
        v.parse::<u64>().ok()
    } else if let Some(v) = a.strip_suffix('s') {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| (s * 1e3) as u64)
    } else {
        a.parse::<u64>().ok()
    }
}

fn stage_named(s: &str) -> Option<Stage> {
    Stage::ALL.into_iter().find(|st| st.name() == s)
}

/// The WHEN of an entry: a stage, a byte count with a unit (`64MiB`, `1GB`, `4096B`), or a
/// time with a unit (`500ms`, `2s`).
enum When {
    Stage(Stage),
    After(Threshold),
}

fn when(s: &str) -> Result<When, FaultPlanError> {
    if let Some(st) = stage_named(s) {
        return Ok(When::Stage(st));
    }
    let starts_numeric = s.starts_with(|c: char| c.is_ascii_digit());
    if starts_numeric && (s.ends_with("ms") || (s.ends_with('s') && !s.ends_with("Bs"))) {
        if let Some(ms) = millis(s).filter(|&ms| ms <= 3_600_000) {
            return Ok(When::After(Threshold::Elapsed(std::time::Duration::from_millis(ms))));
        }
    }
    if starts_numeric && s.ends_with(['B', 'b']) {
        if let Ok(b) = s.parse::<crate::units::ByteSize>() {
            return Ok(When::After(Threshold::Bytes(b.0)));
        }
    }
    Err(FaultPlanError::UnknownStage(s.to_string()))
}

impl FromStr for FaultPlan {
    type Err = FaultPlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut faults = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (head, stage) = match item.split_once('@') {
                Some((k, st)) => (k, Some(st)),
                None => (item, None),
            };
            let (kind, arg) = match head.split_once(':') {
                Some((k, a)) => (k, Some(a)),
                None => (head, None),
            };
            let kind = FaultKind::ALL
                .into_iter()
                .find(|k| k.name() == kind)
                .ok_or_else(|| FaultPlanError::UnknownKind(kind.to_string()))?;
            let arg = match arg {
                None => kind.default_arg(),
                Some(a) => parse_arg(kind, a)?,
            };
            let (stage, after) = match stage.map(when).transpose()? {
                None => (kind.stages()[0], None),
                Some(When::After(t)) => {
                    if !kind.takes_threshold() {
                        return Err(FaultPlanError::NoThreshold { kind, after: t });
                    }
                    (kind.stages()[0], Some(t))
                }
                Some(When::Stage(st)) => {
                    if !kind.stages().contains(&st) {
                        return Err(FaultPlanError::WrongStage {
                            kind,
                            stage: st,
                            allowed: kind.stages().iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
                        });
                    }
                    (st, None)
                }
            };
            faults.push(Fault {
                kind,
                stage,
                arg,
                after,
            });
        }
        Ok(FaultPlan(faults))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_plan_grammar() {
        let p: FaultPlan = "link-drop@precopy, refuse-reservation".parse().expect("plan");
        assert_eq!(
            p.0,
            vec![
                Fault {
                    kind: FaultKind::LinkDrop,
                    stage: Stage::Precopy,
                    arg: 0,
                    after: None
                },
                Fault {
                    kind: FaultKind::RefuseReservation,
                    stage: Stage::Reservation,
                    arg: 0,
                    after: None
                },
            ]
        );
        assert!(matches!(
            "melt@precopy".parse::<FaultPlan>(),
            Err(FaultPlanError::UnknownKind(_))
        ));
        assert!(matches!(
            "cancel@lunch".parse::<FaultPlan>(),
            Err(FaultPlanError::UnknownStage(_))
        ));
        let err = "fail-state-load@precopy".parse::<FaultPlan>().expect_err("wrong stage");
        assert!(err.to_string().contains("can in: stopcopy"), "{err}");
        let p: FaultPlan = "link-stall:2s@stopcopy,bandwidth-collapse:1MB".parse().expect("plan");
        assert_eq!(
            (p.0[0].arg, p.0[1].arg, p.0[1].stage),
            (2000, 1_000_000, Stage::Precopy)
        );
        assert!(matches!(
            "link-stall:soon".parse::<FaultPlan>(),
            Err(FaultPlanError::BadArgument { .. })
        ));
        assert!(matches!(
            "cancel:3".parse::<FaultPlan>(),
            Err(FaultPlanError::BadArgument { .. })
        ));
    }

    #[test]
    fn test_byte_and_time_triggers() {
        let p: FaultPlan = "link-drop@64MiB, cancel@1.5s, postcopy-link-loss:2s@1GB, target-crash@250ms"
            .parse()
            .expect("plan");
        let after: Vec<_> = p.0.iter().map(|f| f.after).collect();
        assert_eq!(
            after,
            vec![
                Some(Threshold::Bytes(64 << 20)),
                Some(Threshold::Elapsed(std::time::Duration::from_millis(1500))),
                Some(Threshold::Bytes(1_000_000_000)),
                Some(Threshold::Elapsed(std::time::Duration::from_millis(250))),
            ]
        );
        assert_eq!(p.0[2].arg, 2000);
        let err = "refuse-reservation@1MiB".parse::<FaultPlan>().expect_err("step-bound");
        assert!(matches!(err, FaultPlanError::NoThreshold { .. }), "{err}");
        assert!(matches!(
            "link-drop@soon".parse::<FaultPlan>(),
            Err(FaultPlanError::UnknownStage(_))
        ));

        // A passed trigger waits for a stage where its fault can fire.
        let mut p: FaultPlan = "link-stall:1s@1MiB,postcopy-link-loss@2MiB".parse().expect("plan");
        let zero = std::time::Duration::ZERO;
        assert!(p.take(Stage::Precopy, false).is_empty(), "not at the stage's start");
        assert!(p.take_due(Stage::Precopy, false, 1 << 19, zero).is_empty());
        assert!(p.take_due(Stage::Reservation, false, 4 << 20, zero).is_empty());
        let fired = p.take_due(Stage::Precopy, false, 4 << 20, zero);
        assert_eq!(
            fired.iter().map(|f| f.kind).collect::<Vec<_>>(),
            vec![FaultKind::LinkStall]
        );
        assert!(p.has_thresholds(false));
        let fired = p.take_due(Stage::Pull, false, 4 << 20, zero);
        assert_eq!(
            fired.iter().map(|f| f.kind).collect::<Vec<_>>(),
            vec![FaultKind::PostcopyLinkLoss]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn test_take_fires_once_on_its_side() {
        let mut p: FaultPlan = "cancel@precopy,target-crash@precopy".parse().expect("plan");
        assert_eq!(p.take(Stage::Reservation, false), vec![]);
        assert_eq!(
            p.take(Stage::Precopy, false).iter().map(|f| f.kind).collect::<Vec<_>>(),
            vec![FaultKind::Cancel]
        );
        assert_eq!(p.take(Stage::Precopy, false), vec![]);
        assert_eq!(p.for_target().0.len(), 1);
    }
}
