//! Fault plans: failures injected on purpose, so that embedders can test their own handling
//! and the engine's invariants can be checked under every failure.
//!
//! A plan is a list of `KIND@STAGE` entries (`link-drop@precopy,refuse-reservation`); an entry
//! without a stage fires at the first stage where it applies. Source-side faults fire when the
//! source enters the stage; target-side faults fire in the receiver's matching action and work
//! on in-process links (a TCP target runs its own daemon, with its own plan).

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
}

impl FaultKind {
    /// Every kind, in a stable order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::LinkDrop,
        FaultKind::CorruptFrame,
        FaultKind::Cancel,
        FaultKind::SourcePauseError,
        FaultKind::RefuseReservation,
        FaultKind::FailStateLoad,
        FaultKind::TargetCrash,
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
        }
    }

    /// The stages where the fault can fire; the first is its default.
    pub fn stages(self) -> &'static [Stage] {
        use Stage::*;
        match self {
            FaultKind::LinkDrop | FaultKind::Cancel | FaultKind::TargetCrash => {
                &[Premigration, Reservation, Precopy, Stopcopy]
            }
            FaultKind::CorruptFrame => &[Precopy, Stopcopy],
            FaultKind::SourcePauseError => &[Stopcopy],
            FaultKind::RefuseReservation => &[Reservation],
            FaultKind::FailStateLoad => &[Stopcopy],
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

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// When.
    pub stage: Stage,
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
    pub fn take(&mut self, stage: Stage, on_target: bool) -> Vec<FaultKind> {
        let mut fired = Vec::new();
        self.0.retain(|f| {
            let fire = f.stage == stage && f.kind.on_target() == on_target;
            if fire {
                metrics::counter!(metric::FAULTS_INJECTED_TOTAL, "kind" => f.kind.name()).increment(1);
                fired.push(f.kind);
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

fn stage_named(s: &str) -> Option<Stage> {
    Stage::ALL.into_iter().find(|st| st.name() == s)
}

impl FromStr for FaultPlan {
    type Err = FaultPlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut faults = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (kind, stage) = match item.split_once('@') {
                Some((k, st)) => (k, Some(st)),
                None => (item, None),
            };
            let kind = FaultKind::ALL
                .into_iter()
                .find(|k| k.name() == kind)
                .ok_or_else(|| FaultPlanError::UnknownKind(kind.to_string()))?;
            let stage = match stage {
                None => kind.stages()[0],
                Some(name) => {
                    let st = stage_named(name).ok_or_else(|| FaultPlanError::UnknownStage(name.to_string()))?;
                    if !kind.stages().contains(&st) {
                        return Err(FaultPlanError::WrongStage {
                            kind,
                            stage: st,
                            allowed: kind.stages().iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
                        });
                    }
                    st
                }
            };
            faults.push(Fault { kind, stage });
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
                    stage: Stage::Precopy
                },
                Fault {
                    kind: FaultKind::RefuseReservation,
                    stage: Stage::Reservation
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
    }

    #[test]
    fn test_take_fires_once_on_its_side() {
        let mut p: FaultPlan = "cancel@precopy,target-crash@precopy".parse().expect("plan");
        assert_eq!(p.take(Stage::Reservation, false), vec![]);
        assert_eq!(p.take(Stage::Precopy, false), vec![FaultKind::Cancel]);
        assert_eq!(p.take(Stage::Precopy, false), vec![]);
        assert_eq!(p.for_target().0.len(), 1);
    }
}
