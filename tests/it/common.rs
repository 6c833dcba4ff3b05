//! Shared set-up: engines with two hosts, VMs with writers, event collection.

use std::time::Duration;

use migratory::engine::{EngineHandle, HostConfig, MigrationEvent, MigrationReport, Stage, StartedMigration};
use migratory::format::NativeLayout;
use migratory::vmm::{Pattern, WorkloadSpec};

/// The one bound every wait in these tests uses.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub const MIB: u64 = 1 << 20;

/// An engine with hosts `src` and `dst` of the given layouts.
pub async fn engine(src: NativeLayout, dst: NativeLayout) -> EngineHandle {
    let e = EngineHandle::start().expect("engine starts");
    e.add_host(HostConfig::new("src", src)).await.expect("source host");
    e.add_host(HostConfig::new("dst", dst)).await.expect("target host");
    e
}

/// A hot-set writer of `rate` bytes/s over `ws` bytes.
pub fn writer(rate: u64, ws: u64) -> WorkloadSpec {
    WorkloadSpec {
        rate_bytes_per_sec: rate,
        working_set_bytes: ws,
        pattern: Pattern::HotSet,
        zero_fraction: 0.2,
        seed: 7,
    }
}

/// Collects a migration's events until it finishes; returns the stages started, in order,
/// every event, and the report.
pub async fn collect(mut started: StartedMigration) -> (Vec<Stage>, Vec<MigrationEvent>, MigrationReport) {
    let mut stages = Vec::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, started.events.recv())
            .await
            .expect("migration finishes in time")
            .expect("event stream open");
        if let MigrationEvent::StageStarted { stage } = &ev {
            stages.push(*stage);
        }
        if let MigrationEvent::Finished(report) = &ev {
            let report = (**report).clone();
            events.push(ev);
            return (stages, events, report);
        }
        events.push(ev);
    }
}

/// Waits until the target side reports it stopped (after an abort or cancel).
pub async fn target_stopped(rx: &mut tokio::sync::broadcast::Receiver<MigrationEvent>) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("target stops in time")
        {
            Ok(MigrationEvent::TargetStopped { reason }) => return reason,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("event stream ended before the target stopped: {e}"),
        }
    }
}

/// Guest writes so far of `vm` on `host`.
pub async fn writes(e: &EngineHandle, host: &str, vm: &str) -> u64 {
    e.vm_info(host, vm).await.expect("vm exists").stats.writes
}

/// Asserts the VM runs on `host` only, and that its guest makes progress there.
pub async fn assert_runs_only_on(e: &EngineHandle, host: &str, other: &str, vm: &str) {
    let info = e.vm_info(host, vm).await.expect("vm on host");
    assert!(info.state.is_running(), "{vm} on {host} is {}", info.state);
    let others = e.list_vms(other).await.expect("list");
    assert!(
        others.iter().all(|v| v.config.id.0 != vm),
        "{vm} must not exist on {other}: {:?}",
        others.iter().map(|v| (&v.config.id.0, v.state)).collect::<Vec<_>>()
    );
    // Progress: the writer keeps writing (bounded wait, no fixed sleep).
    let before = writes(e, host, vm).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while writes(e, host, vm).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{vm} makes no progress on {host}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Source and target in two separate engines (as two daemons would be); the target listens
/// on an ephemeral loopback port.
pub async fn two_engines() -> (EngineHandle, EngineHandle, std::net::SocketAddr) {
    let src = EngineHandle::start().expect("source engine");
    src.add_host(HostConfig::new("src", NativeLayout::XenHvm))
        .await
        .expect("src");
    let dst = EngineHandle::start().expect("target engine");
    let listen = HostConfig {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..HostConfig::new("dst", NativeLayout::Kvm)
    };
    dst.add_host(listen).await.expect("dst");
    let addr = dst.listen_address("dst").await.expect("ask").expect("listening");
    (src, dst, addr)
}
