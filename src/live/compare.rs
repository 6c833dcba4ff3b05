//! The model's prediction beside a live run of the same scenario: one row per migration, paired
//! by VM and by its order among that VM's migrations, with the live figure's relative error.

use std::fmt::Write;

use migratory::model::{MigrationRecord, ModelOutcome};

/// A side-by-side table of `model` and `live`, then the migrations only one of them ran and the
/// VMs they leave in different places.
pub fn compare(model: &ModelOutcome, live: &ModelOutcome) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<24} {:>9} {:>9} {:>7}  {:>10} {:>10} {:>7}  {:>9} {:>9} {:>7}  result model/live",
        "vm",
        "algorithm model/live",
        "total m",
        "total l",
        "err",
        "down m ms",
        "down l ms",
        "err",
        "MB m",
        "MB l",
        "err",
    );
    let pairs = pair(&model.migrations, &live.migrations);
    for (m, l) in &pairs {
        match (m, l) {
            (Some(m), Some(l)) => {
                let _ = writeln!(
                    out,
                    "{:<12} {:<24} {:>9.3} {:>9.3} {:>7}  {:>10.2} {:>10.2} {:>7}  {:>9.1} {:>9.1} {:>7}  {}/{}",
                    m.vm,
                    format!("{}/{}", m.algorithm, l.algorithm),
                    m.total_s,
                    l.total_s,
                    relative_error(m.total_s, l.total_s),
                    m.downtime_s * 1e3,
                    l.downtime_s * 1e3,
                    relative_error(m.downtime_s, l.downtime_s),
                    m.bytes as f64 / 1e6,
                    l.bytes as f64 / 1e6,
                    relative_error(m.bytes as f64, l.bytes as f64),
                    m.result,
                    l.result
                );
            }
            (Some(only), None) | (None, Some(only)) => {
                let side = if m.is_some() { "model" } else { "live" };
                let _ = writeln!(
                    out,
                    "{:<12} only in the {side} run: {} -> {}, {} {}",
                    only.vm, only.source, only.target, only.algorithm, only.result
                );
            }
            (None, None) => {}
        }
    }
    for p in &model.placements {
        let live_host = live
            .placements
            .iter()
            .find(|q| q.vm == p.vm)
            .and_then(|q| q.host.clone());
        if live_host != p.host {
            let _ = writeln!(
                out,
                "{} ends on {} in the model, on {} live",
                p.vm,
                p.host.as_deref().unwrap_or("no host"),
                live_host.as_deref().unwrap_or("no host")
            );
        }
    }
    out
}

/// The n-th migration of each VM in one run beside the n-th of the same VM in the other.
fn pair<'a>(
    model: &'a [MigrationRecord],
    live: &'a [MigrationRecord],
) -> Vec<(Option<&'a MigrationRecord>, Option<&'a MigrationRecord>)> {
    let mut used = vec![false; live.len()];
    let mut pairs = Vec::new();
    for m in model {
        let found = live
            .iter()
            .enumerate()
            .find(|(i, l)| !used[*i] && l.vm == m.vm)
            .map(|(i, l)| {
                used[i] = true;
                l
            });
        pairs.push((Some(m), found));
    }
    pairs.extend(
        live.iter()
            .zip(&used)
            .filter(|(_, u)| !**u)
            .map(|(l, _)| (None, Some(l))),
    );
    pairs
}

/// `(live - model) / model` as a signed percentage; `-` where the model says zero.
fn relative_error(model: f64, live: f64) -> String {
    if model.abs() < f64::EPSILON {
        return "-".to_string();
    }
    format!("{:+.0}%", (live - model) / model * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migratory::model::Placement;

    fn rec(vm: &str, total_s: f64, bytes: u64) -> MigrationRecord {
        let mut r = super::super::record::requested(vm, ("a", "dc1"), ("b", "dc2"), "auto", 0.0);
        r.algorithm = "precopy".into();
        r.result = "completed".into();
        r.total_s = total_s;
        r.bytes = bytes;
        r
    }

    fn outcome(migrations: Vec<MigrationRecord>, host: &str) -> ModelOutcome {
        ModelOutcome {
            scenario: "s".into(),
            seed: 0,
            end_s: 10.0,
            migrations,
            samples: Vec::new(),
            placements: vec![Placement {
                vm: "vm1".into(),
                host: Some(host.into()),
                datacenter: None,
            }],
            events_processed: 0,
            notes: Vec::new(),
        }
    }

    #[test]
    fn test_compare_pairs_by_vm_and_shows_relative_errors() {
        let model = outcome(vec![rec("vm1", 4.0, 500_000_000), rec("vm2", 1.0, 1)], "b");
        let live = outcome(vec![rec("vm1", 5.0, 550_000_000), rec("vm3", 1.0, 1)], "a");
        let table = compare(&model, &live);
        let vm1 = table.lines().find(|l| l.starts_with("vm1 ")).unwrap_or_default();
        assert!(vm1.contains("+25%") && vm1.contains("+10%"), "{table}");
        assert!(table.contains("vm2          only in the model run"), "{table}");
        assert!(table.contains("vm3          only in the live run"), "{table}");
        assert!(table.contains("vm1 ends on b in the model, on a live"), "{table}");
    }

    #[test]
    fn test_relative_error_of_a_zero_prediction_is_not_a_number() {
        assert_eq!(relative_error(0.0, 1.0), "-");
        assert_eq!(relative_error(2.0, 1.0), "-50%");
    }
}
