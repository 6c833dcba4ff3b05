//! The `migratory` command line: a live-migration demo on the embedded `sim` backend.

mod bench;
mod cli;
mod daemon;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod demo_qemu;
mod exporter;
mod live;
mod progress;
mod shutdown;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use migratory::engine::{
    EngineHandle, HostConfig, MigrationEvent, MigrationReport, MigrationRequest, PolicyConfig, StallAction, VmSpec,
};
use migratory::format::NativeLayout;
use migratory::link::Shaping;
use migratory::protocol::Algorithm;
use migratory::units::ByteSize;
use migratory::vmm::{BackendSpec, BackendSpecError, Pattern, WorkloadSpec};

#[derive(Debug, Parser)]
#[command(name = "migratory", version, about = "Live VM migration engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a running sim VM between two in-process hosts and print what happened.
    Demo(DemoArgs),
    /// Run a host: accept migrations over TCP and serve the HTTP control API.
    Serve(Box<daemon::ServeArgs>),
    /// Measure migrations against memcpy and plain-TCP baselines taken in the same run.
    Bench(bench::BenchArgs),
    /// Run a datacenter scenario through the model in virtual time; print a summary, and write
    /// series and plots with --out.
    Simulate(cli::simulate::SimulateArgs),
    /// The reading end of the bench's plain-TCP baseline (a second process).
    #[command(hide = true)]
    BenchSink,
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1GiB")]
    memory: ByteSize,
    /// stop-and-copy, precopy, postcopy, hybrid, auto or random (seeded from the OS).
    #[arg(long, default_value = "precopy")]
    algorithm: Algorithm,
    /// Guest dirtying rate (bytes of pages per second; 0 = idle).
    #[arg(long, default_value = "100MB")]
    dirty_rate: ByteSize,
    /// Working set the writer dirties (the hot set for `hot-set`).
    #[arg(long, default_value = "64MiB")]
    working_set: ByteSize,
    /// uniform, hot-set or sequential.
    #[arg(long, default_value = "hot-set")]
    pattern: Pattern,
    /// Fraction of pages that start out zero.
    #[arg(long, default_value_t = 0.1)]
    zero_fraction: f64,
    /// Hypervisor of both hosts: `sim` (synthetic guest, runs everywhere) or `kvm` (a real
    /// self-checking guest on /dev/kvm, whose layout is always `kvm`).
    #[arg(long, default_value = "sim", value_parser = clap::builder::PossibleValuesParser::new(BackendSpec::NAMES))]
    backend: String,
    /// Native layout of the source host's backend [sim default: xen-hvm].
    #[arg(long)]
    source_layout: Option<NativeLayout>,
    /// Native layout of the target host's backend [sim default: kvm].
    #[arg(long)]
    target_layout: Option<NativeLayout>,
    /// Link bandwidth cap (e.g. 1GB for 1 GB/s); unlimited by default.
    #[arg(long)]
    bandwidth: Option<ByteSize>,
    /// One-way link latency in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    latency_ms: f64,
    /// Downtime the switchover may take, in milliseconds.
    #[arg(long, default_value_t = 300.0)]
    downtime_limit_ms: f64,
    /// What a pre-copy stall turns into: auto, postcopy, force-stop-and-copy, abort.
    #[arg(long, default_value = "auto")]
    on_stall: StallAction,
    /// When stop-and-copy and pre-copy compare page digests: after-activation (no hashing in
    /// the downtime) or before-commit (a difference rolls back).
    #[arg(long, default_value = "after-activation")]
    verify: migratory::engine::verify::VerifyMode,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Print the Prometheus exposition of the engine's metrics after the report.
    #[arg(long)]
    print_metrics: bool,
    /// Serve the metrics on ADDR (`GET /metrics`) while the demo runs.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Faults to inject: `KIND[:ARG][@WHEN],...` (see README, "Fault injection").
    #[arg(long, value_name = "SPEC")]
    fault: Option<migratory::engine::FaultPlan>,
    /// Post-copy: seconds to keep reconnecting after the link fails in the pull phase (0: no
    /// recovery).
    #[arg(long, default_value_t = 60.0)]
    recovery_timeout: f64,
    /// With --metrics: keep serving after the demo ends, until interrupted.
    #[arg(long, requires = "metrics")]
    hold: bool,
    /// With --backend kvm: move the guest kvm → QEMU → kvm through QEMU's own migration
    /// stream, with QEMU running TCG (`qemu-tcg`) or KVM (`qemu-kvm`), and check it arrives
    /// intact (see README, "Moving VMs to and from QEMU").
    #[arg(long, value_name = "qemu-tcg|qemu-kvm", value_parser = ["qemu-tcg", "qemu-kvm"])]
    through: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo(args),
        Command::Serve(args) => daemon::serve(*args),
        Command::Bench(args) => bench::run(args),
        Command::Simulate(args) => cli::simulate::run(args),
        Command::BenchSink => match bench::sink() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("migratory: bench sink: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Client(cmd) => cli::run_client(cmd),
    }
}

fn demo(args: DemoArgs) -> ExitCode {
    if let Some(through) = args.through.clone() {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        return demo_qemu::run(&args, &through);
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            eprintln!("migratory: --through {through} needs x86-64 Linux");
            return ExitCode::FAILURE;
        }
    }
    let backends = match demo_backends(&args) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("migratory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prometheus = exporter::install();
    if let (Some(addr), Some(handle)) = (args.metrics, prometheus.clone()) {
        match exporter::serve_metrics(addr, handle) {
            Ok(bound) => eprintln!("migratory: metrics on http://{bound}/metrics"),
            Err(e) => {
                eprintln!("migratory: cannot serve metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some(runtime) = demo_runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(run_demo(&args, backends));
    match result {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("migratory: cannot encode report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_report(&report);
            }
            if args.print_metrics {
                if let Some(p) = prometheus {
                    println!("{}", p.render());
                }
            }
            if args.hold {
                eprintln!("migratory: holding the metrics endpoint open; interrupt to stop");
                loop {
                    std::thread::park();
                }
            }
            if report.result.succeeded() && report.verified {
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

/// Logs on stderr when asked for with RUST_LOG (the demos print their own progress), and the
/// runtime a demo runs on; `None` after saying why there is none.
fn demo_runtime() -> Option<tokio::runtime::Runtime> {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("migratory: cannot start runtime: {e}");
            None
        }
    }
}

/// The demo's two backends, from `--backend` and the layouts given for each host.
fn demo_backends(args: &DemoArgs) -> Result<(BackendSpec, BackendSpec), BackendSpecError> {
    Ok((
        BackendSpec::from_flags(&args.backend, args.source_layout, NativeLayout::XenHvm)?,
        BackendSpec::from_flags(&args.backend, args.target_layout, NativeLayout::Kvm)?,
    ))
}

async fn run_demo(
    args: &DemoArgs,
    (source, target): (BackendSpec, BackendSpec),
) -> Result<MigrationReport, migratory::engine::EngineError> {
    let engine = EngineHandle::start()?;
    let (what, layout) = match &source {
        BackendSpec::Sim { layout } => ("sim VM", *layout),
        _ => ("kvm VM running the self-checking guest", NativeLayout::Kvm),
    };
    let kvm = matches!(source, BackendSpec::Kvm);
    for (name, backend) in [("source", source), ("target", target)] {
        engine.add_host(HostConfig::with_backend(name, backend)).await?;
    }
    let workload = WorkloadSpec {
        rate_bytes_per_sec: args.dirty_rate.0,
        working_set_bytes: args.working_set.0,
        pattern: args.pattern,
        zero_fraction: args.zero_fraction,
        seed: 42,
    };
    let spec = VmSpec {
        workload,
        // The kvm backend runs one vCPU (see README, "The kvm backend").
        vcpus: if kvm { 1 } else { 2 },
        ..VmSpec::new("demo-vm", args.memory.0)
    };
    if !args.json {
        eprintln!(
            "creating a {} {what} on `source` ({layout}), writer {} at {}/s over {}...",
            args.memory, args.pattern, args.dirty_rate, args.working_set
        );
    }
    let created = engine.create_vm("source", spec).await?;
    let mut req = MigrationRequest::new("demo-vm", "source", "target").algorithm(args.algorithm);
    req.shaping = Shaping {
        bandwidth_bytes_per_sec: args.bandwidth.map(|b| b.0),
        latency: Duration::from_secs_f64(args.latency_ms.max(0.0) / 1e3),
    };
    req.policy = PolicyConfig {
        downtime_limit: Duration::from_secs_f64(args.downtime_limit_ms.max(0.0) / 1e3),
        on_stall: args.on_stall,
        ..PolicyConfig::default()
    };
    if let Some(plan) = &args.fault {
        req.faults = plan.clone();
    }
    req.recovery_timeout = Duration::from_secs_f64(args.recovery_timeout.clamp(0.0, 86_400.0));
    req.verify = args.verify;
    let mut started = engine.start_migration(req).await?;
    let progress = if args.json {
        None
    } else {
        Some(progress::Progress::new())
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let result = loop {
        tokio::select! {
            ev = started.events.recv() => match ev {
                Ok(MigrationEvent::Finished(report)) => break Ok(*report),
                Ok(ev) => {
                    if let Some(p) = &progress {
                        if let Some(line) = describe_event(&ev) {
                            p.note(&line);
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break engine.report(started.id).await,
            },
            _ = tick.tick(), if progress.is_some() => {
                if let (Some(p), Ok(s)) = (&progress, engine.status(started.id).await) {
                    p.show(&progress::Snapshot {
                        stage: s.stage.map(str::to_string),
                        round: u64::from(s.round),
                        transferred_bytes: s.transferred_bytes,
                        remaining_pages: s.remaining_pages,
                        throughput_bytes_per_sec: s.throughput_bytes_per_sec,
                        expected_downtime_s: s.expected_downtime_s,
                    });
                }
            }
        }
    };
    if let Some(p) = &progress {
        p.finish();
    }
    if kvm && !args.json {
        // The guest's own view: its progress counter must keep rising where it now runs, and it
        // must have found every page it wrote as it wrote it.
        let host = match &result {
            Ok(r) if r.result.succeeded() => "target",
            _ => "source",
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Ok(info) = engine.vm_info(host, "demo-vm").await {
            eprintln!(
                "guest on `{host}`: progress {} pages (it had {} when created), {} verify passes, {} integrity errors",
                info.stats.writes, created.stats.writes, info.stats.verify_passes, info.stats.integrity_errors
            );
        }
    }
    result
}

/// One line for an event worth telling a person about.
fn describe_event(ev: &MigrationEvent) -> Option<String> {
    Some(match ev {
        MigrationEvent::StageStarted { stage } => format!("  -> {stage}"),
        MigrationEvent::RoundCompleted {
            round,
            pages_sent,
            remaining_pages,
            bytes_per_sec,
            expected_downtime,
            ..
        } => format!(
            "     round {round}: sent {pages_sent} pages at {:.0} MB/s, {remaining_pages} dirty, expected downtime {:.1} ms",
            bytes_per_sec / 1e6,
            expected_downtime.as_secs_f64() * 1e3
        ),
        MigrationEvent::Decision { action, reason } => format!("     decision: {action} ({reason})"),
        MigrationEvent::NetworkAnnounced {
            nic,
            mac,
            host,
            via,
            frames,
        } => match via {
            Some(iface) => format!("     {host} announced {nic} {mac}: {frames} frames (RARP, gratuitous ARP) on {iface}"),
            None => format!("     {host} announced {nic} {mac}: no announce interface, event only"),
        },
        MigrationEvent::TargetStopped { reason } => format!("     target: {reason}"),
        _ => return None,
    })
}

fn print_report(r: &MigrationReport) {
    println!();
    println!(
        "migration {} of {}: {} -> {} ({} -> {}), algorithm {} (requested {})",
        r.id, r.vm, r.source, r.target, r.source_layout, r.target_layout, r.algorithm, r.requested
    );
    println!(
        "{:<14} {:>10} {:>12} {:>10} {:>12}",
        "stage", "start ms", "duration ms", "pages", "MiB"
    );
    for s in &r.stages {
        println!(
            "{:<14} {:>10.2} {:>12.2} {:>10} {:>12.1}",
            s.name,
            s.start_s * 1e3,
            s.duration_s * 1e3,
            s.pages,
            s.bytes as f64 / (1 << 20) as f64
        );
    }
    println!();
    println!(
        "result          {:?}{}",
        r.result,
        r.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
    );
    println!("vm runs on      {:?}", r.vm_location);
    println!("total time      {:.3} s", r.total_s);
    println!("downtime        {:.2} ms", r.downtime_s * 1e3);
    let d = &r.downtime_parts;
    if r.downtime_s > 0.0 {
        println!(
            "  of which      pause {:.2}, final pages {:.2}, state {:.2}, verify {:.2}, prepare {:.2}, activation {:.2} ms",
            d.pause_s * 1e3,
            d.final_pages_s * 1e3,
            d.state_s * 1e3,
            d.verify_s * 1e3,
            d.prepare_s * 1e3,
            d.activation_s * 1e3
        );
    }
    println!("throughput      {:.1} MB/s", r.throughput_bytes_per_s / 1e6);
    println!("rounds          {}", r.rounds);
    println!(
        "pages           normal {}, zero {}, retransmitted {}, pulled {}",
        r.pages.normal, r.pages.zero, r.pages.retransmitted, r.pages.pulled
    );
    if let Some(p) = &r.predicted {
        println!(
            "predicted       {}: downtime {:.2} ms, total {:.3} s ({})",
            p.algorithm,
            p.downtime_s * 1e3,
            p.total_s,
            p.basis
        );
    }
    for d in &r.decisions {
        println!(
            "decision        after round {}: {} ({})",
            d.after_round, d.action, d.reason
        );
    }
    if r.postcopy_faults > 0 {
        println!(
            "post-copy       {} faults, mean latency {:.1} us",
            r.postcopy_faults,
            r.mean_fault_latency_s * 1e6
        );
    }
    if r.verified {
        println!(
            "verified        true ({}, {:.1} ms): target memory equals source memory at pause; vCPU state identical",
            r.verify,
            r.verification_s * 1e3
        );
    } else if !r.result.succeeded() {
        println!("verified        false: the migration did not complete");
    } else {
        println!("verified        false: pages differ: {:?}", r.mismatched_pages);
    }
}
