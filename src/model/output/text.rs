//! The summary a person reads on stdout: one screen whatever the scenario's size, because
//! every list in it is capped (six algorithms, six datacenters, five slowest migrations) and
//! every field cut to its column.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::model::plot::scene::fit;
use crate::model::{MigrationRecord, ModelOutcome, Scenario};
use crate::units::ByteSize;

/// Most lines the summary has: a 40-line screen, less two for the caller's own (wall time,
/// files written).
pub const SUMMARY_MAX_LINES: usize = 38;
/// Widest line of the summary, characters.
pub const SUMMARY_MAX_COLUMNS: usize = 100;

/// Rows of each capped list.
const ALGORITHM_ROWS: usize = 6;
const DATACENTER_ROWS: usize = 6;
const SLOWEST_ROWS: usize = 5;

/// The results with a column of their own; any other counts as `other`.
const RESULTS: [&str; 3] = ["completed", "aborted", "failed"];

/// The summary: scenario, seed, virtual end, events, migrations by result and algorithm,
/// times and downtimes of the completed ones, bytes moved, VMs per datacenter at the start
/// and the end, the slowest migrations.
pub fn text_summary(scenario: &Scenario, outcome: &ModelOutcome) -> String {
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "scenario    {} (seed {})",
        fit(&outcome.scenario, 70),
        outcome.seed
    ));
    lines.push(format!(
        "virtual     ended at {} after {} events",
        duration(outcome.end_s),
        outcome.events_processed
    ));
    lines.push(format!(
        "topology    {} datacenters, {} hosts, {} VMs",
        scenario.datacenters.len(),
        scenario.hosts.len(),
        scenario.vms.len()
    ));
    lines.push(String::new());
    migrations(&mut lines, &outcome.migrations);
    lines.push(String::new());
    placements(&mut lines, scenario, outcome);
    if !outcome.migrations.is_empty() {
        lines.push(String::new());
        slowest(&mut lines, &outcome.migrations);
    }
    let mut out = String::new();
    for line in lines.iter().take(SUMMARY_MAX_LINES) {
        let _ = writeln!(out, "{}", fit(line.trim_end(), SUMMARY_MAX_COLUMNS));
    }
    out
}

/// Counts by result and algorithm, time and downtime statistics, bytes moved.
fn migrations(lines: &mut Vec<String>, migrations: &[MigrationRecord]) {
    let count = |result: &str| migrations.iter().filter(|m| m.result == result).count();
    let other = migrations.len() - RESULTS.iter().map(|r| count(r)).sum::<usize>();
    let mut by_result: Vec<String> = RESULTS.iter().map(|r| format!("{} {r}", count(r))).collect();
    if other > 0 {
        by_result.push(format!("{other} other"));
    }
    lines.push(format!("migrations  {}: {}", migrations.len(), by_result.join(", ")));
    if migrations.is_empty() {
        return;
    }

    // algorithm -> [completed, aborted, failed, other]
    let mut table: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    for m in migrations {
        let col = RESULTS.iter().position(|r| *r == m.result).unwrap_or(3);
        table.entry(m.algorithm.as_str()).or_default()[col] += 1;
    }
    let mut rows: Vec<(&str, [usize; 4])> = table.into_iter().collect();
    rows.sort_by_key(|(name, c)| (std::cmp::Reverse(c.iter().sum::<usize>()), *name));
    lines.push(format!(
        "  {:<20} {:>8} {:>10} {:>8} {:>8} {:>8}",
        "algorithm", "all", "completed", "aborted", "failed", "other"
    ));
    for (name, c) in rows.iter().take(ALGORITHM_ROWS) {
        let all: usize = c.iter().sum();
        lines.push(format!(
            "  {:<20} {all:>8} {:>10} {:>8} {:>8} {:>8}",
            fit(name, 20),
            c[0],
            c[1],
            c[2],
            c[3]
        ));
    }
    if rows.len() > ALGORITHM_ROWS {
        let rest: usize = rows[ALGORITHM_ROWS..]
            .iter()
            .map(|(_, c)| c.iter().sum::<usize>())
            .sum();
        lines.push(format!(
            "  +{} more algorithms, {rest} migrations",
            rows.len() - ALGORITHM_ROWS
        ));
    }

    let completed: Vec<&MigrationRecord> = migrations.iter().filter(|m| m.result == RESULTS[0]).collect();
    lines.push(String::new());
    if completed.is_empty() {
        lines.push("completed   none, so no times".into());
    } else {
        lines.push(format!(
            "{:<12} {:>12} {:>12} {:>12} {:>12}",
            "completed", "sum", "mean", "p90", "max"
        ));
        for (label, values) in [
            ("total time", completed.iter().map(|m| m.total_s).collect::<Vec<_>>()),
            ("downtime", completed.iter().map(|m| m.downtime_s).collect()),
        ] {
            let s = Stats::of(values);
            lines.push(format!(
                "  {label:<10} {:>12} {:>12} {:>12} {:>12}",
                duration(s.sum),
                duration(s.mean),
                duration(s.p90),
                duration(s.max)
            ));
        }
    }
    let bytes: u64 = migrations.iter().map(|m| m.bytes).fold(0, u64::saturating_add);
    let rounds: u64 = migrations.iter().map(|m| u64::from(m.rounds)).sum();
    lines.push(format!(
        "moved       {} in {} pre-copy rounds (all migrations)",
        ByteSize(bytes),
        rounds
    ));
}

/// VMs per datacenter at the start and at the end.
fn placements(lines: &mut Vec<String>, scenario: &Scenario, outcome: &ModelOutcome) {
    let dcs = scenario.datacenters.len();
    // Index `dcs` counts VMs that run nowhere.
    let mut start = vec![0usize; dcs + 1];
    for vm in &scenario.vms {
        let dc = vm
            .host
            .and_then(|h| scenario.hosts.get(h))
            .map_or(dcs, |h| h.datacenter.min(dcs));
        start[dc] += 1;
    }
    let mut end = vec![0usize; dcs + 1];
    for p in &outcome.placements {
        let dc = p
            .datacenter
            .as_ref()
            .and_then(|name| scenario.datacenters.iter().position(|d| &d.name == name))
            .unwrap_or(dcs);
        end[dc] += 1;
    }
    lines.push(format!(
        "{:<26} {:>10} {:>10}",
        "VMs by datacenter", "at start", "at end"
    ));
    let mut order: Vec<usize> = (0..dcs).collect();
    order.sort_by_key(|&d| (std::cmp::Reverse(end[d]), std::cmp::Reverse(start[d]), d));
    for &d in order.iter().take(DATACENTER_ROWS) {
        lines.push(format!(
            "  {:<24} {:>10} {:>10}",
            fit(&scenario.datacenters[d].name, 24),
            start[d],
            end[d]
        ));
    }
    if dcs > DATACENTER_ROWS {
        let rest = &order[DATACENTER_ROWS..];
        lines.push(format!(
            "  +{:<23} {:>10} {:>10}",
            format!("{} more datacenters", rest.len()),
            rest.iter().map(|&d| start[d]).sum::<usize>(),
            rest.iter().map(|&d| end[d]).sum::<usize>()
        ));
    }
    if start[dcs] + end[dcs] > 0 {
        lines.push(format!(
            "  {:<24} {:>10} {:>10}",
            "(running nowhere)", start[dcs], end[dcs]
        ));
    }
}

/// The longest migrations.
fn slowest(lines: &mut Vec<String>, migrations: &[MigrationRecord]) {
    let mut order: Vec<usize> = (0..migrations.len()).collect();
    order.sort_by(|&a, &b| migrations[b].total_s.total_cmp(&migrations[a].total_s).then(a.cmp(&b)));
    lines.push("slowest migrations".into());
    lines.push(format!(
        "  {:<16} {:<30} {:<12} {:>10} {:>10}  {}",
        "vm", "route", "algorithm", "total", "downtime", "result"
    ));
    for &i in order.iter().take(SLOWEST_ROWS) {
        let m = &migrations[i];
        lines.push(format!(
            "  {:<16} {:<30} {:<12} {:>10} {:>10}  {}",
            fit(&m.vm, 16),
            fit(&format!("{} -> {}", m.source, m.target), 30),
            fit(&m.algorithm, 12),
            duration(m.total_s),
            duration(m.downtime_s),
            fit(&m.result, 10)
        ));
    }
}

/// Sum, mean, 90th percentile (nearest rank) and maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    sum: f64,
    mean: f64,
    p90: f64,
    max: f64,
}

impl Stats {
    fn of(mut values: Vec<f64>) -> Stats {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return Stats {
                sum: 0.0,
                mean: 0.0,
                p90: 0.0,
                max: 0.0,
            };
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let sum: f64 = values.iter().sum();
        let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
        Stats {
            sum,
            mean: sum / n as f64,
            p90: values[rank - 1],
            max: values[n - 1],
        }
    }
}

/// A duration in the unit that suits it: `850 us`, `12.5 ms`, `3.21 s`, `2m 03.4s`,
/// `1h 02m 03s`.
fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    if s == 0.0 {
        "0".into()
    } else if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 60.0 {
        format!("{s:.2} s")
    } else if s < 3600.0 {
        let m = (s / 60.0).floor();
        format!("{m:.0}m {:04.1}s", s - m * 60.0)
    } else {
        let whole = s.round() as u64;
        format!("{}h {:02}m {:02}s", whole / 3600, whole / 60 % 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{fixture, Spec};
    use super::*;

    fn check_bounds(text: &str) {
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() <= SUMMARY_MAX_LINES, "{} lines:\n{text}", lines.len());
        for l in &lines {
            assert!(
                l.chars().count() <= SUMMARY_MAX_COLUMNS,
                "{} columns: {l}",
                l.chars().count()
            );
        }
    }

    #[test]
    fn test_summary_of_a_small_run_says_what_happened() {
        let (scenario, outcome) = fixture(&Spec::small());
        let text = text_summary(&scenario, &outcome);
        check_bounds(&text);
        assert!(text.contains("scenario    fixture (seed 7)"), "{text}");
        assert!(text.contains(&format!("after {} events", outcome.events_processed)));
        assert!(text.contains("migrations  4: 4 completed, 0 aborted, 0 failed"));
        assert!(text.contains("  precopy "));
        assert!(text.contains("  total time"));
        assert!(text.contains("  downtime "));
        assert!(text.contains("slowest migrations"));
        // vm1 and vm4 (precopy, 20 s and 26 s ...): the slowest is migration 3 at 26 s.
        let slowest = text.lines().skip_while(|l| !l.starts_with("slowest")).nth(2).unwrap();
        assert!(slowest.starts_with("  vm4 "), "{slowest}");
        let dc2 = text.lines().find(|l| l.starts_with("  datacenter2")).unwrap();
        assert_eq!(dc2.split_whitespace().collect::<Vec<_>>(), ["datacenter2", "0", "4"]);
        assert!(text.contains("(running nowhere)"));
    }

    #[test]
    fn test_summary_of_ten_thousand_vms_fits_one_screen() {
        let spec = Spec {
            datacenters: 12,
            hosts_per_dc: 50,
            vms: 10_000,
            migrations: 10_000,
            instants: 2,
        };
        let (mut scenario, mut outcome) = fixture(&spec);
        // Long names and many algorithms must not widen or lengthen it either.
        scenario.datacenters[0].name = "a-datacenter-with-a-name-far-longer-than-any-column".repeat(3);
        outcome.scenario = "a-scenario-name-".repeat(20);
        for (i, m) in outcome.migrations.iter_mut().enumerate() {
            m.algorithm = format!("algorithm-{}", i % 17);
            m.vm = format!("{}-{i}", "long-vm-name".repeat(5));
            if i % 13 == 0 {
                m.result = "cancelled".into();
            }
        }
        let text = text_summary(&scenario, &outcome);
        check_bounds(&text);
        assert!(text.contains("migrations  10000:"), "{text}");
        assert!(text.contains("+11 more algorithms"));
        assert!(text.contains("+6 more datacenters"));
        assert!(text.contains(" other"));
    }

    #[test]
    fn test_summary_without_migrations_or_vms() {
        let spec = Spec {
            datacenters: 1,
            hosts_per_dc: 1,
            vms: 0,
            migrations: 0,
            instants: 2,
        };
        let (scenario, outcome) = fixture(&spec);
        let text = text_summary(&scenario, &outcome);
        check_bounds(&text);
        assert!(text.contains("migrations  0: 0 completed"));
        assert!(!text.contains("slowest"));
    }

    #[test]
    fn test_no_completed_migration_means_no_times() {
        let (scenario, mut outcome) = fixture(&Spec::small());
        outcome.migrations.iter_mut().for_each(|m| m.result = "failed".into());
        let text = text_summary(&scenario, &outcome);
        assert!(text.contains("completed   none"), "{text}");
    }

    #[test]
    fn test_stats_use_the_nearest_rank_percentile() {
        let s = Stats::of((1..=10).map(f64::from).collect());
        assert_eq!(
            s,
            Stats {
                sum: 55.0,
                mean: 5.5,
                p90: 9.0,
                max: 10.0
            }
        );
        assert_eq!(Stats::of(vec![4.0]).p90, 4.0);
        assert_eq!(Stats::of(vec![f64::NAN]).sum, 0.0);
    }

    #[test]
    fn test_durations_pick_their_unit() {
        assert_eq!(duration(0.0), "0");
        assert_eq!(duration(0.000_85), "850 us");
        assert_eq!(duration(0.0125), "12.5 ms");
        assert_eq!(duration(3.214), "3.21 s");
        assert_eq!(duration(123.4), "2m 03.4s");
        assert_eq!(duration(3723.0), "1h 02m 03s");
        assert_eq!(duration(f64::NAN), "-");
    }
}
