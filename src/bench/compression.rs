//! `migratory bench --compression`: each page-compression choice against `off`, pre-copy on an
//! in-process link capped at 1 Gbit/s while the guest keeps writing, so that a method is on by
//! default only if it wins there (issue 7). A last group moves an idle guest by stop-and-copy
//! over an uncapped link: there the link is not the bottleneck, and the table shows what each
//! method costs in CPU.
//!
//! The sim guest's memory is pseudo-random (about a tenth of it zero pages), which LZ4 cannot
//! shrink, and its writer stores one 8-byte word per page it dirties, which is XBZRLE's best
//! case. Real guests sit between: text, page tables and zeroed heap compress; pages rewritten
//! whole (I/O buffers, compaction) defeat deltas. The table says what this guest shows, no more.

use std::path::Path;
use std::process::ExitCode;

use migratory::engine::MigrationReport;
use migratory::protocol::{Algorithm, CompressionChoice};
use serde::Serialize;

use super::scenario::{self, Load, Scenario, Via};
use super::write_json;

/// 1 Gbit/s.
pub const LINK_BYTES_PER_SEC: u64 = 125_000_000;
/// The guest size unless `--memory` says otherwise.
const MEMORY: u64 = 256 << 20;
/// Runs per configuration; the median is shown (one with `--quick`).
const REPEATS: usize = 3;

const CHOICES: [CompressionChoice; 4] = [
    CompressionChoice::Off,
    CompressionChoice::Lz4,
    CompressionChoice::Xbzrle,
    CompressionChoice::Both,
];

/// One group of the comparison: every choice runs it.
#[derive(Debug, Clone, Copy)]
struct Group {
    load: Load,
    algorithm: Algorithm,
    link_bytes_per_sec: Option<u64>,
}

/// One configuration's medians, and each as a ratio over `off` in the same group.
#[derive(Debug, Serialize)]
struct Row {
    memory_mib: u64,
    load: Load,
    algorithm: &'static str,
    /// Null: uncapped.
    link_bytes_per_sec: Option<u64>,
    compression: &'static str,
    /// Methods the migration used (after negotiation and the ordered-link check).
    methods: Vec<String>,
    runs: usize,
    verified: usize,
    total_s: f64,
    downtime_ms: f64,
    bytes_sent: u64,
    rounds: u32,
    lz4_pages: u64,
    xbzrle_pages: u64,
    xbzrle_cache_misses: u64,
    xbzrle_overflows: u64,
    bytes_saved: u64,
    /// Medians over the same load's `off` medians: below 1 is a win.
    total_ratio: f64,
    downtime_ratio: f64,
    bytes_ratio: f64,
}

#[derive(Debug, Serialize)]
struct Output {
    quick: bool,
    link_bytes_per_sec: u64,
    repeats: usize,
    rows: Vec<Row>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median run by total time stands for the configuration's counters.
fn summarize(memory: u64, g: Group, choice: CompressionChoice, reports: &[MigrationReport]) -> Row {
    let mut by_total: Vec<&MigrationReport> = reports.iter().collect();
    by_total.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
    let mid = by_total[by_total.len() / 2];
    Row {
        memory_mib: memory >> 20,
        load: g.load,
        algorithm: g.algorithm.name(),
        link_bytes_per_sec: g.link_bytes_per_sec,
        compression: choice.name(),
        methods: mid.compression.methods.clone(),
        runs: reports.len(),
        verified: reports.iter().filter(|r| r.verified).count(),
        total_s: median(reports.iter().map(|r| r.total_s).collect()),
        downtime_ms: median(reports.iter().map(|r| r.downtime_s * 1e3).collect()),
        bytes_sent: median(reports.iter().map(|r| r.bytes_sent as f64).collect()) as u64,
        rounds: mid.rounds,
        lz4_pages: mid.compression.lz4_pages,
        xbzrle_pages: mid.compression.xbzrle_pages,
        xbzrle_cache_misses: mid.compression.xbzrle_cache_misses,
        xbzrle_overflows: mid.compression.xbzrle_overflows,
        bytes_saved: mid.compression.bytes_saved,
        total_ratio: 0.0,
        downtime_ratio: 0.0,
        bytes_ratio: 0.0,
    }
}

fn ratio(v: f64, base: f64) -> f64 {
    if base > 0.0 {
        v / base
    } else {
        0.0
    }
}

/// Runs the comparison and prints its table; non-zero exit if a migration failed or did not
/// verify.
pub fn run(rt: &tokio::runtime::Runtime, quick: bool, sizes: &[u64], json: Option<&Path>) -> ExitCode {
    let sizes = if sizes.is_empty() { vec![MEMORY] } else { sizes.to_vec() };
    let capped = |load| Group {
        load,
        algorithm: Algorithm::Precopy,
        link_bytes_per_sec: Some(LINK_BYTES_PER_SEC),
    };
    let groups: Vec<Group> = if quick {
        vec![capped(Load::HotSet)]
    } else {
        vec![
            capped(Load::HotSet),
            capped(Load::Scattered),
            Group {
                load: Load::Idle,
                algorithm: Algorithm::StopAndCopy,
                link_bytes_per_sec: None,
            },
        ]
    };
    let repeats = if quick { 1 } else { REPEATS };
    println!(
        "compression: in-process links, {:.0} Mbit/s unless `uncapped`, median of {repeats} run(s); hot-set: 100 MB/s over 64 MiB, scattered: 100 MB/s over all memory",
        LINK_BYTES_PER_SEC as f64 * 8.0 / 1e6
    );
    println!(
        "{:>5} {:<9} {:<14} {:<8} {:<7} {:<11} {:>3} {:>7} {:>8} {:>8} {:>6} {:>8} {:>8} {:>7} {:>7} {:>8} {:>6} {:>6} {:>6}",
        "MiB",
        "load",
        "algorithm",
        "link",
        "choice",
        "methods",
        "ok",
        "total s",
        "down ms",
        "wire MB",
        "rounds",
        "lz4",
        "xbzrle",
        "misses",
        "overfl",
        "saved MB",
        "total",
        "down",
        "bytes"
    );
    let mut failed = false;
    let mut rows = Vec::new();
    for &memory in &sizes {
        for &g in &groups {
            let mut group: Vec<Row> = Vec::new();
            for choice in CHOICES {
                let s = Scenario {
                    compression: choice,
                    link_bytes_per_sec: g.link_bytes_per_sec,
                    ..Scenario::new(memory, g.load, g.algorithm, Via::InProcess)
                };
                let mut reports = Vec::new();
                for _ in 0..repeats {
                    match rt.block_on(scenario::run(&s)) {
                        Ok((r, _)) => {
                            failed |= !r.verified;
                            reports.push(r);
                        }
                        Err(e) => {
                            eprintln!(
                                "migratory: compression scenario {} MiB {} {} {choice} failed: {e}",
                                memory >> 20,
                                g.load.name(),
                                g.algorithm
                            );
                            failed = true;
                        }
                    }
                }
                if !reports.is_empty() {
                    group.push(summarize(memory, g, choice, &reports));
                }
            }
            let off = group
                .iter()
                .find(|r| r.compression == "off")
                .map(|r| (r.total_s, r.downtime_ms, r.bytes_sent as f64));
            for mut r in group {
                if let Some((t, d, b)) = off {
                    r.total_ratio = ratio(r.total_s, t);
                    r.downtime_ratio = ratio(r.downtime_ms, d);
                    r.bytes_ratio = ratio(r.bytes_sent as f64, b);
                }
                let mb = |b: u64| b as f64 / 1e6;
                println!(
                    "{:>5} {:<9} {:<14} {:<8} {:<7} {:<11} {:>3} {:>7.3} {:>8.1} {:>8.1} {:>6} {:>8} {:>8} {:>7} {:>7} {:>8.1} {:>6.3} {:>6.3} {:>6.3}",
                    r.memory_mib,
                    r.load.name(),
                    r.algorithm,
                    r.link_bytes_per_sec
                        .map_or("uncapped".to_string(), |b| format!("{:.0}M", b as f64 * 8.0 / 1e6)),
                    r.compression,
                    if r.methods.is_empty() { "-".to_string() } else { r.methods.join("+") },
                    format!("{}/{}", r.verified, r.runs),
                    r.total_s,
                    r.downtime_ms,
                    mb(r.bytes_sent),
                    r.rounds,
                    r.lz4_pages,
                    r.xbzrle_pages,
                    r.xbzrle_cache_misses,
                    r.xbzrle_overflows,
                    mb(r.bytes_saved),
                    r.total_ratio,
                    r.downtime_ratio,
                    r.bytes_ratio
                );
                rows.push(r);
            }
        }
    }
    println!("ratios are over `off` in the same group: below 1 is a win");
    if let Some(path) = json {
        let out = Output {
            quick,
            link_bytes_per_sec: LINK_BYTES_PER_SEC,
            repeats,
            rows,
        };
        failed |= !write_json(path, &out);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
