//! A daemon's final migration report (the JSON of `GET /migrations/{id}`) read into the
//! model's [`MigrationRecord`], so the model's writers and plots take a live run unchanged.

use serde_json::Value;

use migratory::model::{MigrationRecord, Prediction};

/// The record of a migration just asked for: what is known before it ends, on the run's clock.
pub fn requested(
    vm: &str,
    (source, source_datacenter): (&str, &str),
    (target, target_datacenter): (&str, &str),
    algorithm: &str,
    at_s: f64,
) -> MigrationRecord {
    MigrationRecord {
        vm: vm.to_string(),
        source: source.to_string(),
        source_datacenter: source_datacenter.to_string(),
        target: target.to_string(),
        target_datacenter: target_datacenter.to_string(),
        requested: algorithm.to_string(),
        algorithm: algorithm.to_string(),
        why: Vec::new(),
        result: "queued".to_string(),
        error: None,
        requested_at_s: at_s,
        start_s: at_s,
        end_s: at_s,
        total_s: 0.0,
        downtime_start_s: None,
        downtime_s: 0.0,
        bytes: 0,
        rounds: 0,
        predicted: None,
    }
}

/// Fills `record` from the daemon's final `report`; `start_s` is when the run first saw the
/// migration out of the queue.
pub fn finish(record: &mut MigrationRecord, start_s: f64, report: &Value) {
    let num = |key: &str| report.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    if let Some(algorithm) = text(report, "algorithm") {
        record.algorithm = algorithm;
    }
    if let Some(requested) = text(report, "requested") {
        record.requested = requested;
    }
    record.result = result_word(report.get("result").and_then(Value::as_str).unwrap_or("failed")).to_string();
    record.error = text(report, "error");
    record.start_s = start_s;
    record.total_s = num("total_s");
    // The engine measures the total itself; the poll that saw the end is up to one poll late.
    record.end_s = start_s + record.total_s;
    record.downtime_s = num("downtime_s");
    record.bytes = report.get("bytes_sent").and_then(Value::as_u64).unwrap_or(0);
    record.rounds = report
        .get("rounds")
        .and_then(Value::as_u64)
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(0);
    record.downtime_start_s = pause_offset(report).map(|at| start_s + at);
    record.why = report
        .get("decisions")
        .and_then(Value::as_array)
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    format!(
                        "after round {}: {} ({})",
                        d.get("after_round").and_then(Value::as_u64).unwrap_or(0),
                        text(d, "action").unwrap_or_default(),
                        text(d, "reason").unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    record.predicted = report.get("predicted").filter(|p| !p.is_null()).map(|p| Prediction {
        algorithm: text(p, "algorithm").unwrap_or_default(),
        downtime_s: p.get("downtime_s").and_then(Value::as_f64).unwrap_or(0.0),
        total_s: p.get("total_s").and_then(Value::as_f64).unwrap_or(0.0),
        basis: text(p, "basis").unwrap_or_default(),
    });
}

/// Ends `record` as failed without a report (its source daemon is gone, or the run gave up).
pub fn fail(record: &mut MigrationRecord, start_s: f64, end_s: f64, error: String) {
    record.result = "failed".to_string();
    record.error = Some(error);
    record.start_s = start_s;
    record.end_s = end_s;
    record.total_s = (end_s - start_s).max(0.0);
}

/// The model's three words: the VM arrived (`completed`), stayed (`aborted`), or something
/// failed. A post-copy that recovered still arrived; a cancel left the VM where it was.
fn result_word(engine: &str) -> &'static str {
    match engine {
        "completed" | "recovered" => "completed",
        "aborted" | "cancelled" => "aborted",
        _ => "failed",
    }
}

/// Seconds from the migration's start to the pause: the first stage that runs with the guest
/// stopped.
fn pause_offset(report: &Value) -> Option<f64> {
    if report.get("downtime_s").and_then(Value::as_f64).unwrap_or(0.0) <= 0.0 {
        return None;
    }
    report.get("stages")?.as_array()?.iter().find_map(|s| {
        let name = s.get("name")?.as_str()?;
        matches!(name, "stopcopy" | "commitment")
            .then(|| s.get("start_s")?.as_f64())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_finish_reads_the_engines_report() {
        let mut r = requested("vm1", ("a", "dc1"), ("b", "dc2"), "auto", 3.0);
        let report = json!({
            "requested": "auto", "algorithm": "precopy", "result": "completed", "error": null,
            "total_s": 4.5, "downtime_s": 0.02, "bytes_sent": 600_000_000u64, "rounds": 3,
            "stages": [{"name": "precopy", "start_s": 0.1}, {"name": "stopcopy", "start_s": 4.4}],
            "predicted": {"algorithm": "precopy", "downtime_s": 0.01, "total_s": 4.0, "basis": "b"},
            "decisions": [{"after_round": 3, "action": "stop", "reason": "converged"}],
        });
        finish(&mut r, 3.2, &report);
        assert_eq!(
            (r.algorithm.as_str(), r.result.as_str(), r.rounds, r.bytes),
            ("precopy", "completed", 3, 600_000_000)
        );
        assert!((r.end_s - 7.7).abs() < 1e-9);
        assert_eq!(r.downtime_start_s.map(|t| (t * 10.0).round()), Some(76.0));
        assert_eq!(r.why, vec!["after round 3: stop (converged)".to_string()]);
        assert_eq!(r.predicted.map(|p| p.total_s), Some(4.0));
    }

    #[test]
    fn test_results_take_the_models_words() {
        for (engine, model) in [
            ("completed", "completed"),
            ("recovered", "completed"),
            ("cancelled", "aborted"),
            ("aborted", "aborted"),
            ("failed", "failed"),
            ("something-new", "failed"),
        ] {
            assert_eq!(result_word(engine), model, "{engine}");
        }
    }
}
