//! The soak: many small migrations back and forth between two hosts of one engine, in this
//! process, with resident memory read before the first and after the last. A leak of anything
//! a migration allocates (actors, links, frame buffers, guest memory, reports) shows as growth
//! that scales with the count.

use std::time::Instant;

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;
use migratory::vmm::{Pattern, WorkloadSpec};
use serde::Serialize;

const MIB: u64 = 1 << 20;
/// Guest RAM of the soak VM: small, so the count, not the copying, dominates.
const VM_BYTES: u64 = 4 * MIB;
/// Resident-memory samples taken over the run (besides before and after).
const SAMPLES: u64 = 10;
/// Failures kept in the result with their error text; the rest are only counted.
const FAILURES_KEPT: usize = 8;

/// Resident memory after a number of migrations.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RssSample {
    /// Migrations finished when the sample was taken.
    pub after: u64,
    /// Resident bytes.
    pub bytes: u64,
}

/// One migration that did not complete verified.
#[derive(Debug, Serialize)]
pub struct SoakFailure {
    /// Its position in the soak (0-based).
    pub index: u64,
    /// Algorithm asked for.
    pub algorithm: &'static str,
    /// Outcome, or `error` if the engine refused it.
    pub result: String,
    /// Why.
    pub error: String,
}

/// What the soak measured.
#[derive(Debug, Serialize)]
pub struct Soak {
    /// Migrations asked for.
    pub requested: u64,
    /// Migrations run (fewer than asked only if a failure left the VM where none could follow).
    pub migrations: u64,
    /// Migrations that completed with every page verified.
    pub verified: u64,
    /// Migrations that did not; must be 0.
    pub failed: u64,
    /// The first few failures.
    pub failures: Vec<SoakFailure>,
    /// Guest RAM of the VM moved.
    pub memory_mib: u64,
    /// Guest writes while it moves.
    pub dirty_rate_bytes_per_s: u64,
    /// Algorithms asked for in turn.
    pub algorithms: Vec<&'static str>,
    /// Wall time of all migrations.
    pub total_s: f64,
    /// Migrations over wall time.
    pub migrations_per_s: f64,
    /// Resident bytes with the engine, both hosts and the VM set up, before the first migration.
    pub rss_before_bytes: u64,
    /// Resident bytes after the last migration.
    pub rss_after_bytes: u64,
    /// After minus before (negative if memory was given back).
    pub rss_growth_bytes: i64,
    /// After minus the first sample past the start (a tenth of the way in): growth once the
    /// allocator, the frame pools and the engine's bounded report history have warmed up, which
    /// a leak keeps adding to and a flat run does not.
    pub rss_growth_after_warmup_bytes: i64,
    /// The largest of the samples (before, every tenth of the run, after).
    pub rss_peak_sampled_bytes: u64,
    /// The process's high-water mark (VmHWM) after the last migration: the soak's true peak, as
    /// `migratory bench` runs the soak before any scenario maps a large VM.
    pub rss_high_water_bytes: u64,
    /// The samples in order.
    pub rss_samples: Vec<RssSample>,
}

/// Resident bytes of this process now (`VmRSS`), and at most so far (`VmHWM`), from
/// /proc/self/status; 0 where there is no procfs. The status file counts in kB, so no page size
/// is assumed.
fn resident_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs `count` migrations of one small VM, alternating between hosts `a` (xen-hvm) and `b`
/// (kvm), cycling through every algorithm; `on_sample` sees each resident-memory sample as it
/// is taken, so that a long run shows progress. An error means the soak could not be set up.
pub async fn run(count: u64, mut on_sample: impl FnMut(&RssSample)) -> Result<Soak, String> {
    let err = |e: migratory::engine::EngineError| e.to_string();
    let engine = EngineHandle::start().map_err(err)?;
    engine
        .add_host(HostConfig::new("a", NativeLayout::XenHvm))
        .await
        .map_err(err)?;
    engine
        .add_host(HostConfig::new("b", NativeLayout::Kvm))
        .await
        .map_err(err)?;
    // A light writer keeps pre-copy honest (pages are resent) without making rounds long.
    let workload = WorkloadSpec {
        rate_bytes_per_sec: 10_000_000,
        working_set_bytes: MIB,
        pattern: Pattern::HotSet,
        zero_fraction: 0.2,
        seed: 7,
    };
    let dirty_rate = workload.rate_bytes_per_sec;
    let spec = VmSpec {
        workload,
        ..VmSpec::new("soak", VM_BYTES)
    };
    engine.create_vm("a", spec).await.map_err(err)?;

    let every = (count / SAMPLES).max(1);
    let before = RssSample {
        after: 0,
        bytes: resident_bytes().0,
    };
    on_sample(&before);
    let mut samples = vec![before];
    let mut failures = Vec::new();
    let (mut failed, mut verified, mut ran) = (0u64, 0u64, 0u64);
    let (mut here, mut there) = ("a", "b");
    let started = Instant::now();
    for i in 0..count {
        let algorithm = Algorithm::ALL[i as usize % Algorithm::ALL.len()];
        let request = MigrationRequest::new("soak", here, there).algorithm(algorithm);
        ran += 1;
        // Where the VM is afterwards decides whether the soak can go on.
        let location = match engine.migrate(request).await {
            Ok(r) if r.result.succeeded() && r.verified => {
                verified += 1;
                VmLocation::Target
            }
            Ok(r) => {
                failed += 1;
                if failures.len() < FAILURES_KEPT {
                    failures.push(SoakFailure {
                        index: i,
                        algorithm: algorithm.name(),
                        result: r.result.label().to_string(),
                        error: r.error.unwrap_or_else(|| "not verified".to_string()),
                    });
                }
                r.vm_location
            }
            Err(e) => {
                failed += 1;
                if failures.len() < FAILURES_KEPT {
                    failures.push(SoakFailure {
                        index: i,
                        algorithm: algorithm.name(),
                        result: "error".to_string(),
                        error: e.to_string(),
                    });
                }
                // The engine refused or lost the request: nothing says where the VM is.
                VmLocation::Undetermined
            }
        };
        match location {
            VmLocation::Target => std::mem::swap(&mut here, &mut there),
            VmLocation::Source => {}
            VmLocation::TargetAwaitingPages | VmLocation::Undetermined => break,
        }
        let done = i + 1;
        if done % every == 0 && done < count {
            let s = RssSample {
                after: done,
                bytes: resident_bytes().0,
            };
            on_sample(&s);
            samples.push(s);
        }
    }
    let total_s = started.elapsed().as_secs_f64();
    let (now, high_water) = resident_bytes();
    let after = RssSample { after: ran, bytes: now };
    on_sample(&after);
    // Without a sample between the ends (a run of one), the warm-up point is the start.
    let warm = if samples.len() > 1 { samples[1] } else { before };
    samples.push(after);
    // Dropping the handle stops the engine and frees the VM before the scenarios map theirs.
    drop(engine);
    Ok(Soak {
        requested: count,
        migrations: ran,
        verified,
        failed,
        failures,
        memory_mib: VM_BYTES / MIB,
        dirty_rate_bytes_per_s: dirty_rate,
        algorithms: Algorithm::ALL.iter().map(|a| a.name()).collect(),
        total_s,
        migrations_per_s: if total_s > 0.0 { ran as f64 / total_s } else { 0.0 },
        rss_before_bytes: before.bytes,
        rss_after_bytes: after.bytes,
        rss_growth_bytes: after.bytes as i64 - before.bytes as i64,
        rss_growth_after_warmup_bytes: after.bytes as i64 - warm.bytes as i64,
        rss_peak_sampled_bytes: samples.iter().map(|s| s.bytes).max().unwrap_or(0),
        rss_high_water_bytes: high_water,
        rss_samples: samples,
    })
}
