//! Post-copy fault latency with the push running: each fault the target's guest takes, from the
//! write that found its page missing to the install that let it go on, for a guest writing its
//! hot set at 100 MB/s (the busy case) and for one writing pages in order (what
//! prepaging helps), in-process and over keyed loopback TCP. DESIGN.md's target, over TCP:
//! mean <= 100 us, p99 <= 1 ms.
//!
//! `cargo bench --bench pull` (MIGRATORY_BENCH_MIB sets the VM size, default 1024; run on a
//! quiet machine: every figure here is scheduling-bound).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use migratory::engine::{EngineHandle, HostConfig, MigrationReport, MigrationRequest, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::auth::ClusterKey;
use migratory::protocol::Algorithm;
use migratory::telemetry::metric::POSTCOPY_FAULT_LATENCY_SECONDS;
use migratory::vmm::{Pattern, WorkloadSpec};

/// Most latencies kept per run.
const MAX_SAMPLES: usize = 1 << 20;

/// Fault latencies as the guest records them.
#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < MAX_SAMPLES {
            v.push(value);
        }
    }
}

/// A recorder that keeps only the fault latency histogram.
#[derive(Debug)]
struct Capture(Arc<Samples>);

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == POSTCOPY_FAULT_LATENCY_SECONDS {
            Histogram::from_arc(Arc::clone(&self.0))
        } else {
            Histogram::noop()
        }
    }
}

async fn run(bytes: u64, pattern: Pattern, tcp: bool) -> MigrationReport {
    let key = ClusterKey::new(&migratory::protocol::auth::nonce().expect("random")).expect("key");
    let host = |name: &str, layout| HostConfig {
        cluster_key: Some(key.clone()),
        ..HostConfig::new(name, layout)
    };
    let src = EngineHandle::start().expect("engine");
    src.add_host(host("a", NativeLayout::XenHvm)).await.expect("host");
    let (dst, addr) = if tcp {
        let dst = EngineHandle::start().expect("engine");
        let listen = HostConfig {
            listen: Some(([127, 0, 0, 1], 0).into()),
            ..host("b", NativeLayout::Kvm)
        };
        dst.add_host(listen).await.expect("host");
        let addr = dst.listen_address("b").await.expect("ask").expect("listening");
        (Some(dst), Some(addr))
    } else {
        src.add_host(host("b", NativeLayout::Kvm)).await.expect("host");
        (None, None)
    };
    let spec = VmSpec {
        workload: WorkloadSpec {
            rate_bytes_per_sec: 100_000_000,
            working_set_bytes: 64 << 20,
            pattern,
            zero_fraction: 0.0,
            seed: 11,
        },
        ..VmSpec::new("pull", bytes)
    };
    src.create_vm("a", spec).await.expect("create");
    let target = addr.map_or("b".to_string(), |a| a.to_string());
    let mut req = MigrationRequest::new("pull", "a", target).algorithm(Algorithm::Postcopy);
    req.target_addr = addr;
    let report = src.migrate(req).await.expect("migrate");
    // Let the target settle before the engines go.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop((src, dst));
    report
}

fn main() {
    let mib: u64 = std::env::var("MIGRATORY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let samples = Arc::new(Samples::default());
    metrics::set_global_recorder(Capture(Arc::clone(&samples))).expect("the only recorder");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{:<10} {:<10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}  result",
        "via", "pattern", "faults", "mean us", "p50 us", "p99 us", "max us", "down ms"
    );
    for tcp in [false, true] {
        for pattern in [Pattern::HotSet, Pattern::Sequential] {
            samples.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let report = rt.block_on(run(mib << 20, pattern, tcp));
            let mut v = std::mem::take(&mut *samples.0.lock().unwrap_or_else(|p| p.into_inner()));
            v.sort_by(f64::total_cmp);
            let at = |q: f64| {
                v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                    .copied()
            };
            let us = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.0}", x * 1e6));
            let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            println!(
                "{:<10} {:<10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9.2}  {}",
                if tcp { "tcp" } else { "in-process" },
                pattern.to_string(),
                v.len(),
                us(mean),
                us(at(0.5)),
                us(at(0.99)),
                us(v.last().copied()),
                report.downtime_s * 1e3,
                report.result.label(),
            );
        }
    }
}
