//! `migratory bench`: runs migration scenarios and prints each figure beside a physical
//! baseline measured in the same run (memcpy for in-process links, a plain TCP copy between two
//! processes for loopback TCP), as a ratio, plus the DESIGN.md targets met or missed. A soak of
//! many small migrations in this process ([`soak`]) runs first and reports resident memory
//! before and after. The busy case between two real daemons ([`busy`]) runs last, and with
//! `--peer qemu` the same case QEMU-to-QEMU beside it.

mod baseline;
mod busy;
mod compression;
mod scenario;
mod soak;
pub mod validate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use migratory::engine::MigrationReport;
use migratory::protocol::Algorithm;
use migratory::vmm::{BackendSpec, GuestStats};
use serde::Serialize;

use scenario::{Load, Scenario, Via};

pub use baseline::sink;

/// Arguments of `migratory bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A subset that runs in under a minute: 256 MiB VMs, idle and hot-set guests, three
    /// algorithms, in-process and one TCP stream.
    #[arg(long)]
    quick: bool,
    /// Also write every row, baseline and ratio as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run only these VM sizes (repeatable, e.g. `--memory 1GiB`) instead of the set's own.
    #[arg(long, value_name = "SIZE")]
    memory: Vec<migratory::units::ByteSize>,
    /// Small migrations in the soak (default 10000, 500 with --quick; 0 skips it).
    #[arg(long, value_name = "N")]
    soak: Option<u64>,
    /// Instead of the standard set: each page-compression choice against off, pre-copy on a
    /// link capped at 1 Gbit/s (hot-set and scattered guests, 256 MiB unless --memory; with
    /// --quick one run of the hot set).
    #[arg(long)]
    compression: bool,
    /// Also run the busy case with this peer (`qemu`: QEMU-to-QEMU, where it and /dev/kvm
    /// exist) and print migratory/peer ratios.
    #[arg(long, value_name = "PEER")]
    peer: Option<busy::Peer>,
    /// Instead of the standard set: only the busy case between two daemons (10 moves, 3 with
    /// --quick), and the peer's with --peer.
    #[arg(long)]
    busy: bool,
}

/// Soak length without `--soak`: the 10,000, or few enough for `--quick` to stay
/// under a minute.
const SOAK_MIGRATIONS: u64 = 10_000;
const SOAK_MIGRATIONS_QUICK: u64 = 500;

/// One row of the table.
#[derive(Debug, Serialize)]
struct Row {
    memory_mib: u64,
    load: Load,
    algorithm: String,
    algorithm_run: String,
    via: String,
    result: String,
    verified: bool,
    total_s: f64,
    downtime_ms: f64,
    throughput_bytes_per_s: f64,
    pages_sent: u64,
    pages_retransmitted: u64,
    rounds: u32,
    postcopy_faults: u64,
    mean_fault_latency_us: f64,
    /// memcpy (in-process) or plain TCP copy (loopback) of the same bytes.
    baseline: &'static str,
    baseline_bytes_per_s: f64,
    /// Throughput over the baseline.
    ratio: f64,
    /// Bytes sent over the time of the transfer stages alone (precopy, stopcopy, pull), over
    /// the baseline: the engine's copy without reservation and verification around it.
    transfer_ratio: f64,
    /// `sim` or `kvm`.
    vmm: String,
    /// kvm: pages the guest found not as it wrote them, after the move (must be 0).
    guest_integrity_errors: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Output {
    quick: bool,
    rows: Vec<Row>,
    /// Baselines by VM size in MiB.
    memcpy_bytes_per_s: HashMap<u64, f64>,
    plain_tcp_bytes_per_s: HashMap<u64, f64>,
    targets: Vec<Target>,
    /// Null when skipped (`--soak 0`) or when it could not be set up.
    soak: Option<soak::Soak>,
    /// The busy case between two daemons, and the peer's.
    busy: Option<busy::Busy>,
}

/// A DESIGN.md target, checked against the rows.
#[derive(Debug, Serialize)]
struct Target {
    what: &'static str,
    goal: String,
    measured: String,
    met: bool,
}

/// The kvm rows: a real guest writing the hot set, each algorithm that keeps it running, both
/// links. Only where /dev/kvm opens.
fn kvm_scenarios(sizes: &[u64]) -> Vec<Scenario> {
    if BackendSpec::Kvm.check_available().is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &memory in sizes {
        for algorithm in [
            Algorithm::StopAndCopy,
            Algorithm::Precopy,
            Algorithm::Postcopy,
            Algorithm::Hybrid,
        ] {
            for via in [Via::InProcess, Via::Tcp(1)] {
                out.push(Scenario {
                    source: BackendSpec::Kvm,
                    target: BackendSpec::Kvm,
                    ..Scenario::new(memory, Load::HotSet, algorithm, via)
                });
            }
        }
    }
    out
}

fn scenarios(quick: bool, only_sizes: &[u64]) -> Vec<Scenario> {
    let (sizes, loads, algorithms, vias): (Vec<u64>, Vec<Load>, Vec<Algorithm>, Vec<Via>) = if quick {
        (
            vec![256 << 20],
            vec![Load::Idle, Load::HotSet],
            vec![Algorithm::StopAndCopy, Algorithm::Precopy, Algorithm::Postcopy],
            vec![Via::InProcess, Via::Tcp(1)],
        )
    } else {
        (
            vec![1 << 30, 4 << 30],
            vec![Load::Idle, Load::HotSet, Load::Uniform],
            Algorithm::ALL.to_vec(),
            vec![Via::InProcess, Via::Tcp(1), Via::Tcp(2)],
        )
    };
    let sizes = if only_sizes.is_empty() {
        sizes
    } else {
        only_sizes.to_vec()
    };
    let mut out = Vec::new();
    for &memory in &sizes {
        for &load in &loads {
            for &algorithm in &algorithms {
                for &via in &vias {
                    out.push(Scenario::new(memory, load, algorithm, via));
                }
            }
        }
    }
    // kvm: the quick run's size, or 1 GiB (the figure) unless sizes were chosen.
    let kvm_sizes = match (quick, only_sizes.is_empty()) {
        (_, false) => only_sizes.to_vec(),
        (true, true) => vec![256 << 20],
        (false, true) => vec![1 << 30],
    };
    out.extend(kvm_scenarios(&kvm_sizes));
    out
}

fn row(s: &Scenario, r: &MigrationReport, guest: Option<GuestStats>, memcpy: f64, tcp: f64) -> Row {
    let (baseline, base) = match s.via {
        Via::InProcess => ("memcpy", memcpy),
        Via::Tcp(_) => ("plain tcp", tcp),
    };
    Row {
        memory_mib: s.memory >> 20,
        load: s.load,
        algorithm: s.algorithm.name().to_string(),
        algorithm_run: r.algorithm.clone(),
        via: s.via.name(),
        result: r.result.label().to_string(),
        verified: r.verified,
        total_s: r.total_s,
        downtime_ms: r.downtime_s * 1e3,
        throughput_bytes_per_s: r.throughput_bytes_per_s,
        pages_sent: r.pages.normal + r.pages.zero + r.pages.retransmitted + r.pages.pulled,
        pages_retransmitted: r.pages.retransmitted,
        rounds: r.rounds,
        postcopy_faults: r.postcopy_faults,
        mean_fault_latency_us: r.mean_fault_latency_s * 1e6,
        baseline,
        baseline_bytes_per_s: base,
        ratio: if base > 0.0 {
            r.throughput_bytes_per_s / base
        } else {
            0.0
        },
        transfer_ratio: transfer_ratio(r, base),
        vmm: s.source.to_string(),
        guest_integrity_errors: guest.map(|g| g.integrity_errors),
    }
}

/// See [`Row::transfer_ratio`].
fn transfer_ratio(r: &MigrationReport, base: f64) -> f64 {
    let (bytes, secs) = r
        .stages
        .iter()
        .filter(|s| matches!(s.name, "precopy" | "stopcopy" | "pull"))
        .fold((0u64, 0f64), |(b, t), s| (b + s.bytes, t + s.duration_s));
    if secs > 0.0 && base > 0.0 {
        bytes as f64 / secs / base
    } else {
        0.0
    }
}

fn targets(rows: &[Row]) -> Vec<Target> {
    // DESIGN's targets are the engine's: measured on the sim, whose guest costs nothing.
    let best = |f: &dyn Fn(&Row) -> bool, key: &dyn Fn(&Row) -> f64, min: bool| {
        rows.iter()
            .filter(|r| r.vmm == "sim" && f(r))
            .map(key)
            .fold(None, |acc: Option<f64>, v| {
                Some(match acc {
                    None => v,
                    Some(a) if min => a.min(v),
                    Some(a) => a.max(v),
                })
            })
    };
    let mut out = Vec::new();
    let idle_stop = |via: &'static str| {
        move |r: &Row| r.load == Load::Idle && r.algorithm == "stop-and-copy" && r.via.starts_with(via)
    };
    if let Some(v) = best(&idle_stop("in-process"), &|r| r.ratio, false) {
        out.push(Target {
            what: "in-process throughput / memcpy (idle, stop-and-copy, whole migration)",
            goal: ">= 0.50".into(),
            measured: format!("{v:.2}"),
            met: v >= 0.5,
        });
    }
    // The same two over the transfer stages alone: what the data path achieves, apart from
    // committing the target's memory and verifying (reported beside, never instead).
    if let Some(v) = best(&idle_stop("in-process"), &|r| r.transfer_ratio, false) {
        out.push(Target {
            what: "in-process throughput / memcpy (idle, stop-and-copy, transfer stages only)",
            goal: ">= 0.50".into(),
            measured: format!("{v:.2}"),
            met: v >= 0.5,
        });
    }
    if let Some(v) = best(&idle_stop("tcp"), &|r| r.transfer_ratio, false) {
        out.push(Target {
            what: "loopback TCP throughput / plain TCP copy (idle, stop-and-copy, transfer stages only)",
            goal: ">= 0.80".into(),
            measured: format!("{v:.2}"),
            met: v >= 0.8,
        });
    }
    if let Some(v) = best(&idle_stop("tcp"), &|r| r.ratio, false) {
        out.push(Target {
            what: "loopback TCP throughput / plain TCP copy (idle, stop-and-copy, best stream count)",
            goal: ">= 0.80".into(),
            measured: format!("{v:.2}"),
            met: v >= 0.8,
        });
    }
    let hot_pre = |r: &Row| r.load == Load::HotSet && r.algorithm == "precopy" && r.via.starts_with("tcp");
    if let Some(v) = best(&hot_pre, &|r| r.downtime_ms, true) {
        out.push(Target {
            what: "pre-copy downtime, hot set 64 MiB at 100 MB/s, loopback",
            goal: "<= 10 ms".into(),
            measured: format!("{v:.1} ms"),
            met: v <= 10.0,
        });
    }
    let post = |r: &Row| r.algorithm == "postcopy" && r.load == Load::HotSet;
    if let Some(v) = best(&post, &|r| r.downtime_ms, true) {
        out.push(Target {
            what: "post-copy downtime (hot set)",
            goal: "<= 2 ms".into(),
            measured: format!("{v:.2} ms"),
            met: v <= 2.0,
        });
    }
    let faulted = |r: &Row| r.algorithm == "postcopy" && r.postcopy_faults > 0;
    if let Some(v) = best(&faulted, &|r| r.mean_fault_latency_us, true) {
        out.push(Target {
            what: "post-copy mean fault latency",
            goal: "<= 100 us".into(),
            measured: format!("{v:.0} us"),
            met: v <= 100.0,
        });
    }
    out
}

/// Runs the soak of `count` migrations and prints its progress and figures; `None` if it could
/// not be set up.
fn run_soak(rt: &tokio::runtime::Runtime, count: u64) -> Option<soak::Soak> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let signed_mib = |b: i64| b as f64 / (1u64 << 20) as f64;
    println!("soak: {count} migrations of one small VM between two in-process hosts");
    let result = rt.block_on(soak::run(count, |s| {
        println!("soak: {:>6} migrations, resident {:>8.1} MiB", s.after, mib(s.bytes));
    }));
    let soak = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("migratory: soak could not start: {e}");
            return None;
        }
    };
    println!(
        "soak: {} of {} migrations verified, {} failed, {:.1} s, {:.0} migrations/s",
        soak.verified, soak.requested, soak.failed, soak.total_s, soak.migrations_per_s,
    );
    println!(
        "soak: resident {:.1} -> {:.1} MiB ({:+.1} MiB; {:+.1} MiB after warm-up), peak sampled {:.1} MiB, high-water {:.1} MiB",
        mib(soak.rss_before_bytes),
        mib(soak.rss_after_bytes),
        signed_mib(soak.rss_growth_bytes),
        signed_mib(soak.rss_growth_after_warmup_bytes),
        mib(soak.rss_peak_sampled_bytes),
        mib(soak.rss_high_water_bytes),
    );
    for f in &soak.failures {
        eprintln!(
            "migratory: soak migration {} ({}) {}: {}",
            f.index, f.algorithm, f.result, f.error
        );
    }
    println!();
    Some(soak)
}

/// Runs the bench; the exit status is non-zero only if a scenario could not run or a
/// migration did not verify (a missed target is a finding, not a failure).
pub fn run(args: BenchArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migratory: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sizes: Vec<u64> = args.memory.iter().map(|b| b.0).collect();
    if args.compression {
        return compression::run(&rt, args.quick, &sizes, args.json.as_deref());
    }
    if args.busy {
        return busy_alone(&args);
    }
    let list = scenarios(args.quick, &sizes);
    let mut memcpy: HashMap<u64, f64> = HashMap::new();
    let mut tcp: HashMap<u64, f64> = HashMap::new();
    let mut rows = Vec::new();
    let mut failed = false;
    let soak_count = args.soak.unwrap_or(if args.quick {
        SOAK_MIGRATIONS_QUICK
    } else {
        SOAK_MIGRATIONS
    });
    // First, so that its resident-memory figures start from a process no scenario has grown.
    let soak = if soak_count > 0 {
        let soak = run_soak(&rt, soak_count);
        failed |= soak.as_ref().is_none_or(|s| s.failed > 0 || s.migrations < s.requested);
        soak
    } else {
        None
    };
    println!(
        "{:<4} {:>6} {:<8} {:<13} {:<13} {:<10} {:<9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>6} {:>10} {:>6} {:>6} {:>6}",
        "vmm",
        "MiB",
        "load",
        "algorithm",
        "ran",
        "via",
        "result",
        "total s",
        "down ms",
        "MB/s",
        "pages",
        "resent",
        "rounds",
        "baseline",
        "ratio",
        "xfer",
        "guest"
    );
    for s in &list {
        let mib = s.memory >> 20;
        // Baselines once per size, in this run, on this machine.
        let m = *memcpy
            .entry(mib)
            .or_insert_with(|| baseline::memcpy_bytes_per_sec(s.memory as usize));
        let t = match tcp.get(&mib) {
            Some(t) => *t,
            None => match baseline::tcp_bytes_per_sec(s.memory) {
                Ok(t) => *tcp.entry(mib).or_insert(t),
                Err(e) => {
                    eprintln!("migratory: plain TCP baseline failed: {e}");
                    failed = true;
                    0.0
                }
            },
        };
        let (report, guest) = match rt.block_on(scenario::run(s)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "migratory: scenario {mib} MiB {} {} {} failed: {e}",
                    s.load.name(),
                    s.algorithm,
                    s.via.name()
                );
                failed = true;
                continue;
            }
        };
        let r = row(s, &report, guest, m, t);
        failed |= !r.verified || r.guest_integrity_errors.is_some_and(|e| e > 0);
        println!(
            "{:<4} {:>6} {:<8} {:<13} {:<13} {:<10} {:<9} {:>8.3} {:>9.2} {:>9.0} {:>9} {:>6} {:>6} {:>10.0} {:>6.2} {:>6.2} {:>6}",
            r.vmm,
            r.memory_mib,
            r.load.name(),
            r.algorithm,
            r.algorithm_run,
            r.via,
            r.result,
            r.total_s,
            r.downtime_ms,
            r.throughput_bytes_per_s / 1e6,
            r.pages_sent,
            r.pages_retransmitted,
            r.rounds,
            r.baseline_bytes_per_s / 1e6,
            r.ratio,
            r.transfer_ratio,
            // The kvm guest's own verdict on its memory after the move.
            match r.guest_integrity_errors {
                Some(0) => "intact".to_string(),
                Some(n) => format!("{n} BAD"),
                None => "-".to_string(),
            }
        );
        rows.push(r);
    }
    println!();
    // After the scenarios: its daemons are processes of their own, so the soak's figures and
    // the scenarios' are untouched.
    let busy = busy::run(args.quick, args.peer);
    failed |= busy.failed();
    let mut targets = targets(&rows);
    targets.extend(busy::targets(&busy));
    print_targets(&targets);
    if let Some(path) = &args.json {
        let out = Output {
            quick: args.quick,
            rows,
            memcpy_bytes_per_s: memcpy,
            plain_tcp_bytes_per_s: tcp,
            targets,
            soak,
            busy: Some(busy),
        };
        failed |= !write_json(path, &out);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `bench --busy`: the busy case alone, its targets, and its JSON.
fn busy_alone(args: &BenchArgs) -> ExitCode {
    let busy = busy::run(args.quick, args.peer);
    let targets = busy::targets(&busy);
    print_targets(&targets);
    let mut failed = busy.failed();
    if let Some(path) = &args.json {
        let out = Output {
            quick: args.quick,
            rows: Vec::new(),
            memcpy_bytes_per_s: HashMap::new(),
            plain_tcp_bytes_per_s: HashMap::new(),
            targets,
            soak: None,
            busy: Some(busy),
        };
        failed |= !write_json(path, &out);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_targets(targets: &[Target]) {
    for t in targets {
        println!(
            "{} {}: {} (goal {})",
            if t.met { "met   " } else { "MISSED" },
            t.what,
            t.measured,
            t.goal
        );
    }
}

/// Writes `value` as pretty JSON to `path`; false (after saying why) if it could not.
pub(crate) fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> bool {
    let written = serde_json::to_vec_pretty(value)
        .map_err(|e| e.to_string())
        .and_then(|b| std::fs::write(path, b).map_err(|e| e.to_string()));
    match written {
        Ok(()) => true,
        Err(e) => {
            eprintln!("migratory: cannot write {}: {e}", path.display());
            false
        }
    }
}
