//! `summary.json`: the run's migrations and placements for a program to read (layout in the
//! module doc of `output`).
//!
//! Built as a `serde_json::Value` rather than derived: the file's layout is its own contract,
//! kept apart from the outcome types, and serde_json's maps keep keys sorted, which is the
//! stable order the file promises.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::model::{MigrationRecord, ModelOutcome, Scenario};

/// What `format` says, so a reader can tell the file from other JSON.
pub const FORMAT: &str = "migratory-simulate-summary";
/// The layout's version; a new key is not a new version, a changed or removed one is.
pub const VERSION: u32 = 1;

/// The summary as pretty-printed JSON, ending in a newline.
pub fn summary_json(scenario: &Scenario, outcome: &ModelOutcome) -> String {
    let mut results: BTreeMap<&str, u64> = BTreeMap::new();
    for m in &outcome.migrations {
        *results.entry(m.result.as_str()).or_default() += 1;
    }
    let value = json!({
        "format": FORMAT,
        "version": VERSION,
        "scenario": outcome.scenario,
        "seed": outcome.seed,
        "end_s": outcome.end_s,
        "events_processed": outcome.events_processed,
        "topology": {
            "datacenters": scenario.datacenters.len(),
            "hosts": scenario.hosts.len(),
            "vms": scenario.vms.len(),
        },
        "results": results,
        "migrations": outcome.migrations.iter().enumerate().map(|(i, m)| migration(i, m)).collect::<Vec<_>>(),
        "placements": outcome.placements.iter().map(|p| json!({
            "vm": p.vm,
            "host": p.host,
            "datacenter": p.datacenter,
        })).collect::<Vec<_>>(),
    });
    // `{:#}` is serde_json's pretty printer; writing a Value cannot fail.
    format!("{value:#}\n")
}

fn migration(index: usize, m: &MigrationRecord) -> Value {
    json!({
        "index": index,
        "vm": m.vm,
        "source": { "host": m.source, "datacenter": m.source_datacenter },
        "target": { "host": m.target, "datacenter": m.target_datacenter },
        "requested": m.requested,
        "algorithm": m.algorithm,
        "why": m.why,
        "predicted": m.predicted.as_ref().map(|p| json!({
            "algorithm": p.algorithm,
            "total_s": p.total_s,
            "downtime_s": p.downtime_s,
            "basis": p.basis,
        })),
        "requested_at_s": m.requested_at_s,
        "start_s": m.start_s,
        "end_s": m.end_s,
        "total_s": m.total_s,
        "downtime_start_s": m.downtime_start_s,
        "downtime_s": m.downtime_s,
        "bytes": m.bytes,
        "rounds": m.rounds,
        "result": m.result,
        "error": m.error,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{fixture, Spec};
    use super::*;

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn test_summary_is_json_with_the_expected_keys() {
        let (scenario, outcome) = fixture(&Spec::small());
        let text = summary_json(&scenario, &outcome);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            keys(&v),
            [
                "end_s",
                "events_processed",
                "format",
                "migrations",
                "placements",
                "results",
                "scenario",
                "seed",
                "topology",
                "version"
            ]
        );
        assert_eq!(v["format"], FORMAT);
        assert_eq!(v["scenario"], "fixture");
        assert_eq!(v["seed"], 7);
        assert_eq!(v["end_s"], outcome.end_s);
        assert_eq!(v["topology"]["hosts"], 4);
        assert_eq!(v["results"]["completed"], 4);
        let m = &v["migrations"][0];
        assert_eq!(
            keys(m),
            [
                "algorithm",
                "bytes",
                "downtime_s",
                "downtime_start_s",
                "end_s",
                "error",
                "index",
                "predicted",
                "requested",
                "requested_at_s",
                "result",
                "rounds",
                "source",
                "start_s",
                "target",
                "total_s",
                "vm",
                "why"
            ]
        );
        assert_eq!(m["source"]["datacenter"], "datacenter1");
        assert_eq!(m["target"]["host"], "dc2-host1");
        assert_eq!(keys(&m["predicted"]), ["algorithm", "basis", "downtime_s", "total_s"]);
        assert_eq!(v["migrations"][1]["predicted"], Value::Null);
        assert_eq!(v["migrations"].as_array().unwrap().len(), outcome.migrations.len());
        let placements = v["placements"].as_array().unwrap();
        assert_eq!(placements.len(), scenario.vms.len());
        assert_eq!(placements[0]["datacenter"], "datacenter2");
        assert_eq!(placements[5]["host"], Value::Null, "the last VM is never deployed");
    }

    #[test]
    fn test_summary_is_the_same_bytes_each_time() {
        let (scenario, outcome) = fixture(&Spec::small());
        assert_eq!(summary_json(&scenario, &outcome), summary_json(&scenario, &outcome));
        // Built afresh, too: nothing depends on addresses or hash order.
        let (scenario2, outcome2) = fixture(&Spec::small());
        assert_eq!(summary_json(&scenario, &outcome), summary_json(&scenario2, &outcome2));
    }

    #[test]
    fn test_floats_read_back_exactly() {
        let (scenario, mut outcome) = fixture(&Spec::small());
        outcome.migrations[0].total_s = 0.1 + 0.2;
        let v: Value = serde_json::from_str(&summary_json(&scenario, &outcome)).unwrap();
        assert_eq!(v["migrations"][0]["total_s"].as_f64(), Some(0.1 + 0.2));
    }
}
