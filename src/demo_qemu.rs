//! `migratory demo --backend kvm --through qemu-tcg|qemu-kvm`: the self-checking guest goes
//! kvm → QEMU → kvm ([`migratory::qemu::round_trip`]); the output names each leg and what the
//! guest and the RAM digests found.

use std::process::ExitCode;

use migratory::engine::{EngineHandle, HostConfig, VmSpec};
use migratory::qemu::round_trip::{round_trip, RoundTrip, RoundTripOptions};
use migratory::qemu::{find_qemu, Accel};
use migratory::vmm::{BackendSpec, WorkloadSpec};

use super::DemoArgs;

pub(super) fn run(args: &DemoArgs, through: &str) -> ExitCode {
    if args.backend != "kvm" {
        eprintln!("migratory: --through {through} moves a real guest: it needs --backend kvm");
        return ExitCode::FAILURE;
    }
    let Some(binary) = find_qemu() else {
        eprintln!(
            "migratory: --through {through} needs qemu-system-x86_64 on PATH (Debian: apt install qemu-system-x86)"
        );
        return ExitCode::FAILURE;
    };
    let accel = if through == "qemu-kvm" { Accel::Kvm } else { Accel::Tcg };
    let Some(runtime) = super::demo_runtime() else {
        return ExitCode::FAILURE;
    };
    let options = RoundTripOptions::new(binary, accel);
    match runtime.block_on(trip(args, &options)) {
        Ok(trip) => {
            if args.json {
                match serde_json::to_string_pretty(&trip) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("migratory: cannot encode the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print(&trip);
            }
            if trip.intact {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("migratory: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn trip(args: &DemoArgs, options: &RoundTripOptions) -> Result<RoundTrip, String> {
    let engine = EngineHandle::start().map_err(|e| e.to_string())?;
    engine
        .add_host(HostConfig::with_backend("kvm", BackendSpec::Kvm))
        .await
        .map_err(|e| e.to_string())?;
    let spec = VmSpec {
        workload: WorkloadSpec {
            rate_bytes_per_sec: args.dirty_rate.0,
            working_set_bytes: args.working_set.0,
            pattern: args.pattern,
            zero_fraction: args.zero_fraction,
            seed: 42,
        },
        vcpus: 1,
        ..VmSpec::new("demo-vm", args.memory.0)
    };
    if !args.json {
        eprintln!(
            "creating a {} kvm VM running the self-checking guest, writing {}/s over {}; then kvm -> {} -> kvm...",
            args.memory,
            args.dirty_rate,
            args.working_set,
            options.through()
        );
    }
    engine.create_vm("kvm", spec).await.map_err(|e| e.to_string())?;
    round_trip(&engine, "kvm", "demo-vm", options)
        .await
        .map_err(|e| e.to_string())
}

fn print(t: &RoundTrip) {
    for leg in &t.legs {
        let qemu = leg
            .qemu_downtime_ms
            .map(|d| format!(" (QEMU's own figure: {d} ms)"))
            .unwrap_or_default();
        match &leg.error {
            None => println!(
                "{} -> {}: completed, {} rounds, {:.1} MB, downtime {:.1} ms{qemu}, total {:.0} ms",
                leg.from,
                leg.to,
                leg.rounds,
                leg.bytes as f64 / 1e6,
                leg.downtime_ms,
                leg.total_ms
            ),
            Some(e) => println!("{} -> {}: FAILED: {e}", leg.from, leg.to),
        }
    }
    for p in &t.progress {
        let rate = p
            .write_rate_mb_per_s
            .zip(p.seconds)
            .map(|(r, s)| format!(" in {s:.2} s ({r:.0} MB/s)"))
            .unwrap_or_default();
        println!(
            "on {}: the guest wrote {} pages{rate} and completed {} verify passes",
            p.host, p.pages_written, p.verify_passes
        );
    }
    println!(
        "integrity errors found by the guest: {}; pages that came back unlike QEMU's copy: {}",
        t.integrity_errors,
        t.ram_mismatched_pages.len()
    );
    println!(
        "{}; the VM runs on {}",
        if t.intact { "arrived intact" } else { "NOT INTACT" },
        t.vm_on
    );
}
