//! 300 migrations back and forth in one process: resident memory stays flat.
//!
//! A binary of its own so that no other test's allocations move the resident-set figure.

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;
use migratory::vmm::{Pattern, WorkloadSpec};

const MIB: u64 = 1 << 20;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("procfs");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("resident field");
    pages * 4096
}

#[test]
fn test_300_migrations_back_and_forth_keep_memory_flat() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let e = EngineHandle::start().expect("engine");
        e.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await.expect("a");
        e.add_host(HostConfig::new("b", NativeLayout::Kvm)).await.expect("b");
        let spec = VmSpec {
            workload: WorkloadSpec {
                rate_bytes_per_sec: 20_000_000,
                working_set_bytes: MIB,
                pattern: Pattern::HotSet,
                zero_fraction: 0.2,
                seed: 1,
            },
            ..VmSpec::new("soak", 4 * MIB)
        };
        e.create_vm("a", spec).await.expect("create");
        let algorithms = [
            Algorithm::Precopy,
            Algorithm::Postcopy,
            Algorithm::StopAndCopy,
            Algorithm::Hybrid,
        ];
        let mut baseline = 0;
        for i in 0..300u32 {
            if i == 50 {
                baseline = resident_bytes();
            }
            let (from, to) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
            let alg = algorithms[i as usize % algorithms.len()];
            let r = e
                .migrate(MigrationRequest::new("soak", from, to).algorithm(alg))
                .await
                .expect("migrate");
            assert_eq!(r.result, Outcome::Completed, "migration {i} ({alg}): {:?}", r.error);
            assert!(r.verified, "migration {i} ({alg}) verified");
        }
        let after = resident_bytes();
        let growth = after.saturating_sub(baseline);
        println!(
            "resident after 50 migrations: {} KiB, after 300: {} KiB, growth {} KiB",
            baseline / 1024,
            after / 1024,
            growth / 1024
        );
        // Each leaked VM would cost 4 MiB; 250 leaks would be 1 GiB.
        assert!(growth < 16 * MIB, "resident memory grew by {} KiB", growth / 1024);
    });
}
