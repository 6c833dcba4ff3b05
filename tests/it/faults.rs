//! The invariant matrix: every fault × every stage where it applies × every algorithm that
//! reaches that stage. Before commitment no fault may lose the VM: it runs on the source only,
//! its guest keeps writing there, and the target holds no reservation.

use migratory::engine::{FaultKind, FaultPlan, MigrationEvent, MigrationRequest, Outcome, Stage, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;

use crate::common::{self, MIB, TIMEOUT};

fn reaches(alg: Algorithm, stage: Stage) -> bool {
    stage != Stage::Precopy || matches!(alg, Algorithm::Precopy | Algorithm::Hybrid | Algorithm::Auto)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_invariant_matrix_before_commitment() {
    let algorithms = [
        Algorithm::StopAndCopy,
        Algorithm::Precopy,
        Algorithm::Postcopy,
        Algorithm::Hybrid,
        Algorithm::Auto,
    ];
    let mut table = vec![format!(
        "{:<20} {:<13} {:<14} {:<10} {:<8} {}",
        "fault", "stage", "algorithm", "outcome", "vm on", "target holds"
    )];
    let mut cases = 0;
    for kind in FaultKind::ALL {
        for &stage in kind.stages() {
            for alg in algorithms {
                // Post-copy and hybrid send no page in stopcopy: a corruption planned there
                // would land after commitment, outside this matrix.
                if !reaches(alg, stage)
                    || (kind == FaultKind::CorruptFrame && stage == Stage::Stopcopy && alg.is_postcopy_family())
                {
                    continue;
                }
                cases += 1;
                let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
                let vm = format!("f{cases}");
                let spec = VmSpec {
                    workload: common::writer(20_000_000, 2 * MIB),
                    ..VmSpec::new(vm.clone(), 8 * MIB)
                };
                e.create_vm("src", spec).await.expect("create");
                let mut req = MigrationRequest::new(vm.clone(), "src", "dst").algorithm(alg);
                req.faults = format!("{}@{}", kind.name(), stage.name())
                    .parse::<FaultPlan>()
                    .expect("plan");
                let mut started = e.start_migration(req).await.expect("start");
                let mut report = None;
                let mut target_stopped = false;
                while report.is_none() || !target_stopped {
                    let ev = tokio::time::timeout(TIMEOUT, started.events.recv())
                        .await
                        .unwrap_or_else(|_| panic!("{kind}@{stage} {alg}: no end"))
                        .expect("events");
                    match ev {
                        MigrationEvent::Finished(r) => report = Some(*r),
                        MigrationEvent::TargetStopped { .. } => target_stopped = true,
                        _ => {}
                    }
                }
                let report = report.expect("report");
                let case = format!("{kind}@{stage} {alg}");
                assert_ne!(
                    report.result,
                    Outcome::Completed,
                    "{case}: the fault must stop the migration"
                );
                assert_eq!(report.vm_location, VmLocation::Source, "{case}: {:?}", report.error);
                if kind == FaultKind::Cancel {
                    assert_eq!(report.result, Outcome::Cancelled, "{case}");
                }
                let usage = e.host_usage("dst").await.expect("usage");
                assert_eq!(
                    (usage.vms, usage.committed_bytes),
                    (0, 0),
                    "{case}: target holds nothing"
                );
                common::assert_runs_only_on(&e, "src", "dst", &vm).await;
                table.push(format!(
                    "{:<20} {:<13} {:<14} {:<10} {:<8} {}",
                    kind.name(),
                    stage.name(),
                    alg.name(),
                    report.result.label(),
                    "source",
                    "nothing"
                ));
            }
        }
    }
    println!("{}", table.join("\n"));
    println!("{cases} cases, every invariant held");
    assert!(cases >= 60, "the matrix covers {cases} cases");
}
