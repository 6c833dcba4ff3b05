//! The busy case between two real daemons: a 1 GiB sim VM dirtying a 64 MiB hot set at
//! 100 MB/s (the `demo` defaults), moved back and forth between two `migratory serve` children
//! on loopback with the default pre-copy request, and with `--peer qemu` the same case
//! QEMU-to-QEMU in the same run ([`migratory::qemu`]), with the ratios and the DESIGN.md targets.
//!
//! The daemons are the live mode's ([`crate::live::daemons::Cluster`]): the same spawning, key,
//! token and API client. Each move starts after the guest has run [`GAP`] on its host, for
//! migratory and QEMU alike; QEMU's guest first fills its RAM as the sim guest's is filled (one
//! page in ten left zero) before the first move.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use migratory::api::{CreateVm, MigrationStarted, MigrationStatusView, Phase, StartMigration};
use migratory::format::NativeLayout;
use migratory::model::HostDef;
use migratory::protocol::Algorithm;

use super::Target;
use crate::live::daemons::Cluster;

/// Guest RAM of the busy case.
pub const MEMORY_BYTES: u64 = 1 << 30;
/// Its hot set.
pub const HOT_SET_BYTES: u64 = 64 << 20;
/// Its dirtying rate (the demo's `100MB`).
pub const RATE_BYTES_PER_SEC: u64 = 100_000_000;
/// Moves in a full run and with `--quick`.
pub const MOVES: u32 = 10;
/// Moves with `--quick`.
pub const MOVES_QUICK: u32 = 3;
/// How long the guest runs on a host before it is moved again.
const GAP: Duration = Duration::from_secs(1);
/// How often a running migration's status is read.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// The most one move may take.
const MOVE_TIMEOUT: Duration = Duration::from_secs(120);
const VM_ID: &str = "busy-vm";

/// The peer to compare with (`--peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// QEMU 7.2+ with KVM: the same busy case QEMU-to-QEMU, figures from QMP.
    Qemu,
}

/// One move between the daemons.
#[derive(Debug, Serialize)]
pub struct MoveRow {
    /// 1-based.
    pub index: u32,
    /// `a->b` or `b->a`.
    pub direction: &'static str,
    /// The report's result.
    pub result: String,
    /// Whether the target's memory was verified.
    pub verified: bool,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Total time, s.
    pub total_s: f64,
    /// The report's throughput (bytes sent over the total time).
    pub throughput_bytes_per_s: f64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Each stage's duration, ms, in order.
    pub stages_ms: Vec<(String, f64)>,
    /// Where the downtime went (the report's `downtime_parts`), ms.
    pub downtime_parts_ms: Vec<(String, f64)>,
    /// Why the rounds stopped: the report's last decision.
    pub stop_reason: String,
}

/// QEMU's figures for one move, from its source's `query-migrate`.
#[derive(Debug, Serialize)]
pub struct QemuMoveRow {
    /// 1-based.
    pub index: u32,
    /// `downtime`, ms.
    pub downtime_ms: u64,
    /// `total-time`, ms.
    pub total_ms: u64,
    /// `setup-time`, ms.
    pub setup_ms: u64,
    /// `ram.transferred`.
    pub transferred_bytes: u64,
    /// Transferred over total time.
    pub throughput_bytes_per_s: f64,
    /// `ram.dirty-sync-count`.
    pub dirty_syncs: u64,
    /// `ram.mbps`, QEMU's own figure.
    pub mbps: f64,
}

/// The QEMU side of the comparison.
#[derive(Debug, Serialize)]
pub struct QemuPeer {
    /// `kvm` (the bench skips the peer without it).
    pub accel: &'static str,
    /// From the QMP greeting.
    pub version: String,
    /// The `max-bandwidth` set (QEMU's default is 128 MiB/s).
    pub max_bandwidth_bytes_per_sec: u64,
    /// Left at QEMU's default.
    pub downtime_limit_ms: u64,
    /// Each move.
    pub moves: Vec<QemuMoveRow>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// What the busy case measured.
#[derive(Debug, Serialize)]
pub struct Busy {
    /// migratory's moves.
    pub moves: Vec<MoveRow>,
    /// Why migratory's moves stopped early, if they did.
    pub error: Option<String>,
    /// QEMU's, with `--peer qemu`.
    pub qemu: Option<QemuPeer>,
    /// Why the peer was skipped.
    pub peer_skipped: Option<String>,
    /// migratory over QEMU: median downtime, median total time, median throughput.
    pub ratios: Option<Ratios>,
}

/// migratory's figure over QEMU's, medians of each.
#[derive(Debug, Serialize)]
pub struct Ratios {
    /// Downtime (lower is better).
    pub downtime: f64,
    /// Total time (lower is better).
    pub total_time: f64,
    /// Throughput (higher is better).
    pub throughput: f64,
}

impl Busy {
    /// Whether a move failed (a missed target is no failure).
    pub fn failed(&self) -> bool {
        self.error.is_some() || self.moves.iter().any(|m| m.result != "completed" || !m.verified)
    }
}

/// The median of `values` (the mean of the two middle ones for an even count); 0 if empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn max(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, f64::max)
}

/// Runs the busy case (and the peer's), printing as it goes.
pub fn run(quick: bool, peer: Option<Peer>) -> Busy {
    let moves = if quick { MOVES_QUICK } else { MOVES };
    println!(
        "busy: {} MiB sim VM, hot set {} MiB at {} MB/s, pre-copy with default settings, two daemons on loopback, {moves} moves",
        MEMORY_BYTES >> 20,
        HOT_SET_BYTES >> 20,
        RATE_BYTES_PER_SEC / 1_000_000
    );
    let mut rows = Vec::new();
    let error = run_daemons(moves, &mut rows).err();
    if let Some(e) = &error {
        eprintln!("migratory: busy case: {e}");
    }
    if !rows.is_empty() {
        println!(
            "busy: downtime median {:.2} ms, max {:.2} ms; total time median {:.3} s; throughput median {:.0} MB/s",
            median(rows.iter().map(|r| r.downtime_ms).collect()),
            max(rows.iter().map(|r| r.downtime_ms)),
            median(rows.iter().map(|r| r.total_s).collect()),
            median(rows.iter().map(|r| r.throughput_bytes_per_s).collect()) / 1e6,
        );
    }
    let (qemu, peer_skipped) = match peer {
        None => (None, None),
        Some(Peer::Qemu) => match qemu_peer::run(moves) {
            Ok(q) => (Some(q), None),
            Err(why) => {
                println!("qemu: SKIPPED: {why}");
                (None, Some(why))
            }
        },
    };
    let ratios = qemu.as_ref().and_then(|q| ratios(&rows, q));
    if let Some(r) = &ratios {
        println!(
            "busy vs QEMU (migratory / QEMU, medians): downtime {:.2}, total time {:.2}, throughput {:.2}",
            r.downtime, r.total_time, r.throughput
        );
    }
    println!();
    Busy {
        moves: rows,
        error,
        qemu,
        peer_skipped,
        ratios,
    }
}

fn ratios(rows: &[MoveRow], q: &QemuPeer) -> Option<Ratios> {
    if rows.is_empty() || q.moves.is_empty() {
        return None;
    }
    let ours = |f: &dyn Fn(&MoveRow) -> f64| median(rows.iter().map(f).collect());
    let theirs = |f: &dyn Fn(&QemuMoveRow) -> f64| median(q.moves.iter().map(f).collect());
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    Some(Ratios {
        downtime: ratio(ours(&|r| r.downtime_ms), theirs(&|m| m.downtime_ms as f64)),
        total_time: ratio(ours(&|r| r.total_s * 1e3), theirs(&|m| m.total_ms as f64)),
        throughput: ratio(
            ours(&|r| r.throughput_bytes_per_s),
            theirs(&|m| m.throughput_bytes_per_s),
        ),
    })
}

/// DESIGN.md's busy-case targets, from what was measured.
pub fn targets(busy: &Busy) -> Vec<Target> {
    let mut out = Vec::new();
    if busy.moves.is_empty() {
        return out;
    }
    let down: Vec<f64> = busy.moves.iter().map(|r| r.downtime_ms).collect();
    let (med, top) = (median(down.clone()), max(down.into_iter()));
    out.push(Target {
        what: "busy case between daemons: pre-copy downtime median",
        goal: "<= 5 ms".into(),
        measured: format!("{med:.2} ms over {} moves", busy.moves.len()),
        met: med <= 5.0,
    });
    out.push(Target {
        what: "busy case between daemons: pre-copy downtime max",
        goal: "<= 10 ms".into(),
        measured: format!("{top:.2} ms"),
        met: top <= 10.0,
    });
    if let (Some(r), Some(q)) = (&busy.ratios, &busy.qemu) {
        let ours = median(busy.moves.iter().map(|m| m.total_s).collect());
        let theirs = median(q.moves.iter().map(|m| m.total_ms as f64 / 1e3).collect());
        out.push(Target {
            what: "busy case: total time / QEMU's (same run)",
            goal: "<= 1/3".into(),
            measured: format!("{:.3} ({ours:.3} s vs QEMU {theirs:.3} s)", r.total_time),
            met: r.total_time <= 1.0 / 3.0,
        });
    }
    out
}

/// The two hosts: the datacenter model's host type, as the live mode starts daemons from it.
fn hosts() -> Vec<HostDef> {
    ["a", "b"]
        .into_iter()
        .map(|name| HostDef {
            name: name.to_string(),
            datacenter: 0,
            ram_bytes: 4 * MEMORY_BYTES,
            cores: 2,
            nic_bytes_per_sec: f64::INFINITY,
            vmm: "sim".into(),
            layout: NativeLayout::Kvm,
            // The VM and an incoming reservation of it.
            memory_budget_bytes: 4 * MEMORY_BYTES,
            // Not a finite figure: the daemon gets no --bandwidth-budget.
            bandwidth_budget_bytes_per_sec: f64::INFINITY,
            max_outgoing: 1,
            max_incoming: 1,
            algorithms: Algorithm::ALL.to_vec(),
        })
        .collect()
}

/// The report fields a row takes.
#[derive(Debug, Deserialize)]
struct ReportView {
    result: String,
    verified: bool,
    downtime_s: f64,
    total_s: f64,
    throughput_bytes_per_s: f64,
    bytes_sent: u64,
    rounds: u32,
    stages: Vec<StageView>,
    #[serde(default)]
    downtime_parts: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    decisions: Vec<DecisionView>,
}

#[derive(Debug, Deserialize)]
struct DecisionView {
    action: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct StageView {
    name: String,
    duration_s: f64,
}

fn run_daemons(moves: u32, rows: &mut Vec<MoveRow>) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let cluster = Cluster::start(&exe, &hosts()).map_err(|e| e.to_string())?;
    let create = CreateVm {
        id: VM_ID.into(),
        memory_bytes: MEMORY_BYTES,
        vcpus: 1,
        dirty_rate_bytes_per_sec: RATE_BYTES_PER_SEC,
        working_set_bytes: HOT_SET_BYTES,
        pattern: Some("hot-set".into()),
    };
    let body = serde_json::to_value(&create).map_err(|e| e.to_string())?;
    cluster.daemons[0].api.post("/vms", &body).map_err(|e| e.to_string())?;
    println!(
        "{:>4} {:<6} {:<10} {:>9} {:>8} {:>7} {:>6}  stages (ms)",
        "move", "dir", "result", "down ms", "total s", "MB/s", "rounds"
    );
    for index in 1..=moves {
        std::thread::sleep(GAP);
        let (src, dst) = if index % 2 == 1 { (0, 1) } else { (1, 0) };
        let row = one_move(&cluster, src, dst, index)?;
        let stages: Vec<String> = row.stages_ms.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
        println!(
            "{:>4} {:<6} {:<10} {:>9.2} {:>8.3} {:>7.0} {:>6}  {}",
            row.index,
            row.direction,
            row.result,
            row.downtime_ms,
            row.total_s,
            row.throughput_bytes_per_s / 1e6,
            row.rounds,
            stages.join(", ")
        );
        let parts: Vec<String> = row
            .downtime_parts_ms
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.2}"))
            .collect();
        println!("{:>29} downtime: {}; {}", "", parts.join(", "), row.stop_reason);
        let completed = row.result == "completed";
        rows.push(row);
        if !completed {
            return Err(format!("move {index} did not complete; the VM's place is unknown"));
        }
    }
    Ok(())
}

fn one_move(cluster: &Cluster, src: usize, dst: usize, index: u32) -> Result<MoveRow, String> {
    let (source, target) = (&cluster.daemons[src], &cluster.daemons[dst]);
    let request = StartMigration::new(VM_ID, target.migration_addr.to_string());
    let body = serde_json::to_value(&request).map_err(|e| e.to_string())?;
    let started: MigrationStarted = source
        .api
        .post("/migrations", &body)
        .map_err(|e| e.to_string())
        .and_then(|v| serde_json::from_value(v).map_err(|e| format!("POST /migrations: {e}")))?;
    let deadline = Instant::now() + MOVE_TIMEOUT;
    let report: Value = loop {
        let status: MigrationStatusView = source
            .api
            .get(&format!("/migrations/{}", started.id))
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::from_value(v).map_err(|e| format!("GET /migrations: {e}")))?;
        if !matches!(status.status, Phase::Queued | Phase::Active) {
            break status
                .report
                .ok_or_else(|| format!("move {index} ended {} without a report", status.status))?;
        }
        if Instant::now() >= deadline {
            return Err(format!("move {index} still running after {MOVE_TIMEOUT:?}"));
        }
        std::thread::sleep(POLL_EVERY);
    };
    let r: ReportView = serde_json::from_value(report).map_err(|e| format!("move {index}'s report: {e}"))?;
    Ok(MoveRow {
        index,
        direction: if src == 0 { "a->b" } else { "b->a" },
        result: r.result,
        verified: r.verified,
        downtime_ms: r.downtime_s * 1e3,
        total_s: r.total_s,
        throughput_bytes_per_s: r.throughput_bytes_per_s,
        bytes_sent: r.bytes_sent,
        rounds: r.rounds,
        stages_ms: r.stages.into_iter().map(|s| (s.name, s.duration_s * 1e3)).collect(),
        downtime_parts_ms: ["pause", "final_pages", "state", "verify", "prepare", "activation"]
            .into_iter()
            .map(|part| {
                let ms = r.downtime_parts.get(&format!("{part}_s")).copied().unwrap_or(0.0) * 1e3;
                (part.to_string(), ms)
            })
            .collect(),
        stop_reason: r
            .decisions
            .last()
            .map(|d| format!("{}: {}", d.action, d.reason))
            .unwrap_or_default(),
    })
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod qemu_peer {
    use super::{QemuMoveRow, QemuPeer, GAP, HOT_SET_BYTES, MEMORY_BYTES, RATE_BYTES_PER_SEC};
    use migratory::qemu::guest::READY_LINE;
    use migratory::qemu::{
        build_image, find_qemu, host_tsc_hz, migrate, Accel, GuestSpec, MigrateOptions, Qemu, QemuConfig,
    };

    /// How long the guest may take to fill its RAM and print its ready line.
    const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

    /// QEMU's own default downtime limit, left as it is.
    const QEMU_DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;

    /// The busy case QEMU-to-QEMU, `moves` times; `Err` says why it was skipped.
    pub fn run(moves: u32) -> Result<QemuPeer, String> {
        let binary = find_qemu().ok_or("qemu-system-x86_64 is not installed")?;
        if Accel::detect() != Accel::Kvm {
            return Err("/dev/kvm is not usable: a TCG guest is no peer for a timing comparison".into());
        }
        let spec = GuestSpec::busy(MEMORY_BYTES, HOT_SET_BYTES, RATE_BYTES_PER_SEC, host_tsc_hz());
        let image = build_image(&spec).map_err(|e| e.to_string())?;
        let opts = MigrateOptions::default();
        let config = |incoming| QemuConfig {
            binary: binary.clone(),
            accel: Accel::Kvm,
            memory_mib: spec.memory_mib(),
            incoming,
            machine: "pc".into(),
            extra_args: Vec::new(),
        };
        let mut source = Qemu::start(&config(false), Some(&image)).map_err(|e| e.to_string())?;
        let version = source.qmp().version().to_string();
        println!(
            "qemu: QEMU {version} with kvm, -cpu qemu64, the project's Multiboot guest: {} MiB, hot set {} MiB at {} MB/s, one page in {} zero; max-bandwidth {} GB/s (QEMU's default is 128 MiB/s), downtime-limit {} ms (QEMU's default), {moves} moves",
            MEMORY_BYTES >> 20,
            HOT_SET_BYTES >> 20,
            RATE_BYTES_PER_SEC / 1_000_000,
            spec.zero_one_in,
            opts.max_bandwidth_bytes_per_sec / 1_000_000_000,
            QEMU_DEFAULT_DOWNTIME_LIMIT_MS,
        );
        let mut peer = QemuPeer {
            accel: Accel::Kvm.name(),
            version,
            max_bandwidth_bytes_per_sec: opts.max_bandwidth_bytes_per_sec,
            downtime_limit_ms: QEMU_DEFAULT_DOWNTIME_LIMIT_MS,
            moves: Vec::new(),
            error: None,
        };
        source
            .wait_for_output(READY_LINE, BOOT_TIMEOUT)
            .map_err(|e| e.to_string())?;
        println!(
            "{:>4} {:>9} {:>9} {:>9} {:>12} {:>7} {:>6}",
            "move", "down ms", "total ms", "setup ms", "transferred", "MB/s", "syncs"
        );
        for index in 1..=moves {
            std::thread::sleep(GAP);
            let moved = Qemu::start(&config(true), Some(&image))
                .map_err(|e| e.to_string())
                .and_then(|mut target| {
                    let m = migrate(&mut source, &mut target, &opts).map_err(|e| e.to_string())?;
                    // The old source is killed here; the target runs the guest from now on.
                    source = target;
                    Ok(m)
                });
            let m = match moved {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("migratory: qemu move {index}: {e}");
                    peer.error = Some(format!("move {index}: {e}"));
                    break;
                }
            };
            let row = QemuMoveRow {
                index,
                downtime_ms: m.downtime_ms,
                total_ms: m.total_time_ms,
                setup_ms: m.setup_time_ms,
                transferred_bytes: m.transferred_bytes,
                throughput_bytes_per_s: m.throughput_bytes_per_sec(),
                dirty_syncs: m.dirty_syncs,
                mbps: m.mbps,
            };
            println!(
                "{:>4} {:>9} {:>9} {:>9} {:>12} {:>7.0} {:>6}",
                row.index,
                row.downtime_ms,
                row.total_ms,
                row.setup_ms,
                row.transferred_bytes,
                row.throughput_bytes_per_s / 1e6,
                row.dirty_syncs
            );
            peer.moves.push(row);
        }
        let rows = &peer.moves;
        if !rows.is_empty() {
            println!(
                "qemu: downtime median {:.1} ms, max {} ms; total time median {:.3} s; throughput median {:.0} MB/s",
                super::median(rows.iter().map(|r| r.downtime_ms as f64).collect()),
                rows.iter().map(|r| r.downtime_ms).max().unwrap_or(0),
                super::median(rows.iter().map(|r| r.total_ms as f64 / 1e3).collect()),
                super::median(rows.iter().map(|r| r.throughput_bytes_per_s).collect()) / 1e6,
            );
        }
        Ok(peer)
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod qemu_peer {
    /// QEMU's guest is x86 code and its loader Linux-only here.
    pub fn run(_moves: u32) -> Result<super::QemuPeer, String> {
        Err("the QEMU peer runs on x86-64 Linux only".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
