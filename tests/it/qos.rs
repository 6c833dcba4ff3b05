//! QoS per migration: priority orders the outgoing queue and weights the host's bandwidth
//! budget; a floor is assured, and one that cannot be is refused at the start.
//!
//! Shares are ratios of bytes that concurrent migrations sent over one common window while all
//! of them were sending their first round, never whole-migration averages (the first to finish
//! frees its share) and never wall-clock thresholds.

use std::time::Duration;

use migratory::engine::{
    EngineError, EngineHandle, HostConfig, MigrationRequest, Outcome, Phase, Priority, StartedMigration, VmSpec,
};
use migratory::format::NativeLayout;
use migratory::protocol::CompressionChoice;

use crate::common::{MIB, TIMEOUT};

/// The host budget the share tests split: capped, so that they are not CPU-bound.
const BUDGET_BYTES_PER_SEC: u64 = 200_000_000;
/// Each VM of the share tests: its first round lasts long enough for a window.
const VM_BYTES: u64 = 192 * MIB;
/// The window opens once every migration has sent this much...
const WINDOW_OPENS_AT: u64 = 8 * MIB;
/// ...and closes once the fastest has sent this much, well inside its first round.
const WINDOW_CLOSES_AT: u64 = 120 * MIB;
/// Measured shares must be within this fraction of the expected ones.
const TOLERANCE: f64 = 0.10;
/// How often the window's edges are looked for.
const POLL: Duration = Duration::from_millis(10);

/// The share tests measure bandwidth: one at a time, so that they do not compete for CPU.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn engine_with(source: HostConfig) -> EngineHandle {
    let e = EngineHandle::start().expect("engine starts");
    e.add_host(source).await.expect("source host");
    e.add_host(HostConfig::new("dst", NativeLayout::Kvm))
        .await
        .expect("target host");
    e
}

fn budgeted_source(max_outgoing: usize) -> HostConfig {
    HostConfig {
        max_outgoing,
        bandwidth_budget_bytes_per_sec: Some(BUDGET_BYTES_PER_SEC),
        ..HostConfig::new("src", NativeLayout::Kvm)
    }
}

fn request(vm: &str, priority: Priority, floor: Option<u64>) -> MigrationRequest {
    let mut req = MigrationRequest::new(vm, "src", "dst");
    req.priority = priority;
    req.min_bandwidth_bytes_per_sec = floor;
    // Raw pages: the bytes on the link are the bytes measured, and no CPU goes to LZ4.
    req.compression = CompressionChoice::Off;
    req
}

async fn sent(e: &EngineHandle, id: u64) -> u64 {
    e.status(id).await.expect("status").transferred_bytes
}

/// Bytes each migration sent between the window's edges.
async fn bytes_in_common_window(e: &EngineHandle, ids: &[u64]) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let snapshot = || async {
        let mut v = Vec::new();
        for &id in ids {
            v.push(sent(e, id).await);
        }
        v
    };
    let opened = loop {
        let s = snapshot().await;
        if s.iter().all(|&b| b >= WINDOW_OPENS_AT) {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "never all sending: {s:?}");
        tokio::time::sleep(POLL).await;
    };
    let closed = loop {
        let s = snapshot().await;
        if s.iter().any(|&b| b >= WINDOW_CLOSES_AT) {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "the window never closed: {s:?}");
        tokio::time::sleep(POLL).await;
    };
    // Every migration was still in its first round at the close, so all sent all along.
    for &id in ids {
        let s = e.status(id).await.expect("status");
        assert_eq!(s.status, Phase::Active, "{s:?}");
        assert!(s.transferred_bytes < VM_BYTES * 8 / 10, "{s:?}");
    }
    opened.iter().zip(&closed).map(|(a, b)| b - a).collect()
}

/// Checks each share of `bytes` against `expected` (fractions summing to 1), and prints both.
fn check_shares(what: &str, bytes: &[u64], expected: &[f64]) {
    let total: u64 = bytes.iter().sum();
    let shares: Vec<f64> = bytes.iter().map(|&b| b as f64 / total as f64).collect();
    println!("{what}: bytes in the window {bytes:?}, shares {shares:.3?}, expected {expected:.3?}");
    for (got, want) in shares.iter().zip(expected) {
        assert!(
            (got / want - 1.0).abs() <= TOLERANCE,
            "{what}: share {got:.3} vs {want:.3} (all: {shares:.3?})"
        );
    }
}

async fn start(e: &EngineHandle, req: MigrationRequest) -> StartedMigration {
    e.start_migration(req).await.expect("migration starts")
}

async fn completed(e: &EngineHandle, id: u64) -> migratory::engine::MigrationReport {
    let r = tokio::time::timeout(TIMEOUT, e.report(id))
        .await
        .expect("migration ends in time")
        .expect("report");
    assert_eq!(r.result, Outcome::Completed, "{:?}", r.error);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_priority_reorders_the_outgoing_queue() {
    let e = engine_with(HostConfig {
        max_outgoing: 1,
        ..HostConfig::new("src", NativeLayout::Kvm)
    })
    .await;
    for vm in ["blocker", "low", "normal", "high"] {
        e.create_vm("src", VmSpec::new(vm, 8 * MIB)).await.expect("create");
    }
    // Capped links keep each migration running long after the one before it ended, so the
    // order seen below is the order the queue chose.
    let capped = |vm: &str, priority| {
        let mut req = request(vm, priority, None);
        req.shaping.bandwidth_bytes_per_sec = Some(16_000_000);
        req
    };
    let blocker = start(&e, capped("blocker", Priority::Normal)).await.id;
    let mut queued = Vec::new();
    for (vm, priority) in [
        ("low", Priority::Low),
        ("normal", Priority::Normal),
        ("high", Priority::High),
    ] {
        let id = start(&e, capped(vm, priority)).await.id;
        assert_eq!(e.status(id).await.expect("status").status, Phase::Queued, "{vm}");
        queued.push(id);
    }
    let (low, normal, high) = (queued[0], queued[1], queued[2]);
    let phase = |id| {
        let e = e.clone();
        async move { e.status(id).await.expect("status").status }
    };
    completed(&e, blocker).await;
    // The slot went to the highest class, although it asked last.
    assert_ne!(phase(high).await, Phase::Queued);
    assert_eq!((phase(normal).await, phase(low).await), (Phase::Queued, Phase::Queued));
    completed(&e, high).await;
    assert_ne!(phase(normal).await, Phase::Queued);
    assert_eq!(phase(low).await, Phase::Queued);
    completed(&e, normal).await;
    let report = completed(&e, low).await;
    assert_eq!((report.qos.priority, report.qos.weight), (Priority::Low, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_priority_weights_the_host_budget() {
    let _one_at_a_time = SERIAL.lock().await;
    let e = engine_with(budgeted_source(4)).await;
    let classes = [Priority::Low, Priority::Normal, Priority::High];
    let mut ids = Vec::new();
    for p in classes {
        e.create_vm("src", VmSpec::new(p.name(), VM_BYTES))
            .await
            .expect("create");
    }
    for p in classes {
        ids.push(start(&e, request(p.name(), p, None)).await.id);
    }
    let bytes = bytes_in_common_window(&e, &ids).await;
    let weights: Vec<f64> = classes.iter().map(|p| f64::from(p.weight())).collect();
    let sum: f64 = weights.iter().sum();
    check_shares(
        "low, normal, high",
        &bytes,
        &weights.iter().map(|w| w / sum).collect::<Vec<_>>(),
    );
    for (id, p) in ids.into_iter().zip(classes) {
        let r = completed(&e, id).await;
        assert_eq!((r.qos.priority, r.qos.weight), (p, p.weight()));
        assert!(r.qos.mean_bytes_per_sec > 0.0, "{:?}", r.qos);
        println!(
            "{p}: mean {:.1} MB/s over {:.2} s",
            r.qos.mean_bytes_per_sec / 1e6,
            r.qos.transfer_s
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_floor_is_honoured_and_one_that_cannot_be_assured_is_refused() {
    let _one_at_a_time = SERIAL.lock().await;
    let e = engine_with(budgeted_source(4)).await;
    const FLOOR: u64 = 100_000_000;
    let asks = [
        ("floored", Priority::Low, Some(FLOOR)),
        ("normal", Priority::Normal, None),
        ("high", Priority::High, None),
    ];
    for (vm, _, _) in asks {
        e.create_vm("src", VmSpec::new(vm, VM_BYTES)).await.expect("create");
    }
    e.create_vm("src", VmSpec::new("greedy", 8 * MIB))
        .await
        .expect("create");
    let mut ids = Vec::new();
    for (vm, p, floor) in asks {
        ids.push(start(&e, request(vm, p, floor)).await.id);
    }
    // 150 MB/s beside the 100 MB/s already assured: more than the 200 MB/s budget holds.
    match e
        .start_migration(request("greedy", Priority::High, Some(150_000_000)))
        .await
    {
        Err(EngineError::FloorUnavailable {
            host,
            requested_bytes_per_sec,
            available_bytes_per_sec,
        }) => {
            assert_eq!(host, "src");
            assert_eq!(
                (requested_bytes_per_sec, available_bytes_per_sec),
                (150_000_000, 100_000_000)
            );
        }
        other => panic!("expected FloorUnavailable, got {:?}", other.map(|s| s.id)),
    }
    // The floor first (half the budget), then the rest by weight 2:4.
    let bytes = bytes_in_common_window(&e, &ids).await;
    check_shares("floored low, normal, high", &bytes, &[0.5, 0.5 / 3.0, 1.0 / 3.0]);
    let floored = completed(&e, ids[0]).await;
    assert_eq!(floored.qos.min_bandwidth_bytes_per_sec, Some(FLOOR));
    for &id in &ids[1..] {
        completed(&e, id).await;
    }
    // The floors are released with their migrations: the same ask now fits.
    let greedy = start(&e, request("greedy", Priority::High, Some(150_000_000))).await.id;
    let r = completed(&e, greedy).await;
    assert_eq!(r.qos.min_bandwidth_bytes_per_sec, Some(150_000_000));
}
