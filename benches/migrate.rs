//! In-process sim -> sim migration throughput as a ratio to single-thread memcpy of the same
//! bytes, measured in the same run (DESIGN.md target: >= 0.5).
//!
//! `cargo bench --bench migrate` (set MIGRATORY_BENCH_MIB to change the VM size).

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;
use migratory::vmm::WorkloadSpec;

fn main() {
    let mib: u64 = std::env::var("MIGRATORY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let bytes = mib << 20;
    let memcpy = migratory::telemetry::baseline::memcpy_bytes_per_sec(bytes as usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(async {
        let e = EngineHandle::start().expect("engine");
        e.add_host(HostConfig::new("a", NativeLayout::XenHvm))
            .await
            .expect("host");
        e.add_host(HostConfig::new("b", NativeLayout::Kvm)).await.expect("host");
        let spec = VmSpec {
            workload: WorkloadSpec {
                zero_fraction: 0.0,
                ..WorkloadSpec::idle()
            },
            ..VmSpec::new("bench", bytes)
        };
        e.create_vm("a", spec).await.expect("create");
        let req = MigrationRequest::new("bench", "a", "b").algorithm(Algorithm::StopAndCopy);
        e.migrate(req).await.expect("migrate")
    });
    assert_eq!(report.result, Outcome::Completed);
    let stop = report
        .stages
        .iter()
        .find(|s| s.name == "stopcopy")
        .map(|s| s.duration_s)
        .unwrap_or(report.total_s);
    let engine = report.bytes_sent as f64 / stop;
    println!("memcpy (1 thread)        {:>10.1} MB/s", memcpy / 1e6);
    println!(
        "in-process migration     {:>10.1} MB/s (stop-and-copy stage, {mib} MiB idle VM)",
        engine / 1e6
    );
    println!("ratio                    {:>10.2} (target >= 0.50)", engine / memcpy);
    let whole = report.bytes_sent as f64 / report.total_s;
    println!(
        "whole migration          {:>10.1} MB/s, ratio {:.2} (with reservation, which commits target memory, and verification)",
        whole / 1e6,
        whole / memcpy
    );
}
