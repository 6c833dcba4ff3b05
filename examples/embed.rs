//! A tokio service embedding the engine: two hosts, a VM with a writer, a migration watched
//! through its event stream, and a cancel that comes too late.
//!
//! `cargo run --example embed`

use migratory::{
    Algorithm, EngineError, EngineHandle, HostConfig, MigrationEvent, MigrationRequest, NativeLayout, VmSpec,
    WorkloadSpec,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The engine runs its actors on its own thread; the handle is Clone + Send + Sync.
    let engine = EngineHandle::start()?;
    engine
        .add_host(HostConfig::new("rack1-host7", NativeLayout::XenHvm))
        .await?;
    engine
        .add_host(HostConfig::new("rack2-host3", NativeLayout::Kvm))
        .await?;
    let spec = VmSpec {
        workload: WorkloadSpec {
            rate_bytes_per_sec: 50_000_000,
            working_set_bytes: 16 << 20,
            ..WorkloadSpec::default()
        },
        ..VmSpec::new("tenant-42", 128 << 20)
    };
    engine.create_vm("rack1-host7", spec).await?;

    let request = MigrationRequest::new("tenant-42", "rack1-host7", "rack2-host3").algorithm(Algorithm::Auto);
    let mut started = engine.start_migration(request).await?;
    // Watch from another task, as a control plane's progress reporter would.
    let watcher = tokio::spawn(async move {
        while let Ok(ev) = started.events.recv().await {
            match ev {
                MigrationEvent::StageCompleted { stage, duration } => {
                    println!("{stage:<13} {:>8.2} ms", duration.as_secs_f64() * 1e3)
                }
                MigrationEvent::Decision { action, reason } => println!("decision: {action} ({reason})"),
                MigrationEvent::Finished(report) => return Some(report),
                _ => {}
            }
        }
        None
    });
    if let Some(report) = watcher.await? {
        println!(
            "{} via {}: downtime {:.2} ms, total {:.3} s, verified {}",
            report.vm,
            report.algorithm,
            report.downtime_s * 1e3,
            report.total_s,
            report.verified
        );
        // After commitment a cancel is refused with a typed error.
        match engine.cancel(report.id).await {
            Err(e @ EngineError::TooLateToCancel(_)) => println!("cancel after completion: {e}"),
            other => println!("cancel after completion: unexpectedly {other:?}"),
        }
    }
    Ok(())
}
