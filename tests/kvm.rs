//! Real guests on /dev/kvm moved between real daemon processes.
//!
//! The guest is the engine's self-checking program: it writes pages, keeps a ledger of what it
//! wrote and verifies all of it regularly, reporting any page that is not as it left it. So
//! "the migration worked" here means what it means to a tenant: the guest's own progress counter
//! keeps rising on the target, and the guest itself found nothing lost or stale.
//!
//! Every test prints a SKIPPED line and passes where /dev/kvm cannot be opened.

use std::time::Duration;

use serde_json::Value;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/serve.rs"]
mod serve;

use cli::{wait_until, CliHost, TIMEOUT};
use daemon::{unique, Daemon};

fn kvm_present(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED {test}: /dev/kvm not available ({e})");
            false
        }
    }
}

fn counter(vm: &Value, field: &str) -> u64 {
    vm[field]
        .as_u64()
        .unwrap_or_else(|| panic!("VM has no numeric {field}: {vm}"))
}

/// Creates a kvm VM on `host` and waits until its guest has verified its memory once.
fn create_kvm_vm(host: &Daemon, id: &str) {
    let run = host.cli(&[
        "vm",
        "create",
        id,
        "--memory",
        "64MiB",
        "--vcpus",
        "1",
        "--dirty-rate",
        "4MB",
        "--working-set",
        "8MiB",
    ]);
    run.assert_success();
    wait_for_checked_progress(host, id, 0);
}

/// Waits until the guest on `host` has written past `beyond` and finished a verify pass after
/// that; returns the VM's view then.
fn wait_for_checked_progress(host: &Daemon, id: &str, beyond: u64) -> Value {
    let start = host.vm(id).map(|v| counter(&v, "verify_passes")).unwrap_or(0);
    wait_until(
        &format!("the guest of {id} on {} to write past {beyond} and verify", host.name),
        TIMEOUT * 2,
        || match host.vm(id) {
            Some(vm) if counter(&vm, "writes") > beyond && counter(&vm, "verify_passes") > start => Ok(vm),
            other => Err(format!("{other:?}")),
        },
    )
}

fn migrate(from: &Daemon, to: &Daemon, id: &str, algorithm: &str) -> String {
    let addr = to.migration_addr.to_string();
    let mut args = vec!["migrate", id, "--to", addr.as_str(), "--algorithm", algorithm, "--wait"];
    if algorithm == "hybrid" {
        // A zero downtime limit keeps pre-copy from finishing alone, so the post-copy half runs.
        args.extend(["--downtime-limit-ms", "0"]);
    }
    let run = from.cli(&args);
    assert!(run.status.success(), "{algorithm}: {}", run.describe());
    run.stdout
}

#[test]
fn test_kvm_guest_moves_between_daemons_with_precopy_postcopy_and_hybrid() {
    if !kvm_present("test_kvm_guest_moves_between_daemons_with_precopy_postcopy_and_hybrid") {
        return;
    }
    let a = Daemon::start("kvm-a", "kvm", &["--backend", "kvm"]);
    let b = Daemon::start("kvm-b", "kvm", &["--backend", "kvm"]);
    let id = unique("kvm");
    create_kvm_vm(&a, &id);
    let (mut from, mut to) = (&a, &b);
    for algorithm in ["precopy", "postcopy", "hybrid"] {
        let before = counter(&from.vm(&id).expect("VM on the source"), "writes");
        let out = migrate(from, to, &id, algorithm);
        assert!(
            from.vm(&id).is_none(),
            "{algorithm}: the source still lists the VM: {out}"
        );
        to.assert_runs(&id, "kvm");
        let after = wait_for_checked_progress(to, &id, before);
        assert_eq!(
            counter(&after, "integrity_errors"),
            0,
            "{algorithm}: the guest found pages not as it wrote them: {after}"
        );
        println!(
            "{algorithm}: progress {before} -> {} on {}, {} verify passes there, output: {}",
            counter(&after, "writes"),
            to.name,
            counter(&after, "verify_passes"),
            out.trim()
        );
        std::mem::swap(&mut from, &mut to);
    }
}

#[test]
fn test_kvm_guest_parks_on_a_xen_hvm_sim_host_and_comes_back_intact() {
    if !kvm_present("test_kvm_guest_parks_on_a_xen_hvm_sim_host_and_comes_back_intact") {
        return;
    }
    let k = Daemon::start("kvm-home", "kvm", &["--backend", "kvm"]);
    let x = Daemon::start("xen-park", "xen-hvm", &[]);
    let id = unique("park");
    create_kvm_vm(&k, &id);
    let before = counter(&k.vm(&id).expect("VM"), "writes");

    migrate(&k, &x, &id, "precopy");
    x.assert_runs(&id, "xen-hvm");
    // Parked: the sim holds the memory and the state in Xen's layout but does not execute it.
    std::thread::sleep(Duration::from_millis(300));
    let parked = x.vm(&id).expect("parked VM");
    assert_eq!(counter(&parked, "writes"), 0, "a parked guest runs nowhere: {parked}");

    migrate(&x, &k, &id, "precopy");
    k.assert_runs(&id, "kvm");
    let back = wait_for_checked_progress(&k, &id, before);
    assert_eq!(
        counter(&back, "integrity_errors"),
        0,
        "the guest found pages not as it wrote them after kvm -> xen-hvm -> kvm: {back}"
    );
}

/// Post-copy recovery on a real guest: the link fails while the target still lacks pages; the
/// target pauses the vCPU (which may be asleep in the kernel on a missing page), the source
/// reconnects, the pull resumes, and the guest finds its memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_kvm_postcopy_recovers_from_a_link_loss_with_the_guest_intact() {
    use migratory::engine::{EngineHandle, HostConfig, MigrationEvent, MigrationRequest, Outcome, VmSpec};
    use migratory::format::NativeLayout;
    use migratory::protocol::Algorithm;
    use migratory::vmm::BackendSpec;
    use migratory::vmm::{Pattern, WorkloadSpec};

    if !kvm_present("test_kvm_postcopy_recovers_from_a_link_loss_with_the_guest_intact") {
        return;
    }
    let e = EngineHandle::start().expect("engine");
    for name in ["src", "dst"] {
        e.add_host(HostConfig {
            backend: BackendSpec::Kvm,
            ..HostConfig::new(name, NativeLayout::Kvm)
        })
        .await
        .expect("kvm host");
    }
    let spec = VmSpec {
        vcpus: 1,
        workload: WorkloadSpec {
            rate_bytes_per_sec: 8_000_000,
            working_set_bytes: 16 << 20,
            pattern: Pattern::HotSet,
            zero_fraction: 0.0,
            seed: 9,
        },
        ..VmSpec::new("rec", 64 << 20)
    };
    let created = e.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("rec", "src", "dst").algorithm(Algorithm::Postcopy);
    // Slow enough that the loss comes while most of the working set is still on the source.
    req.shaping.bandwidth_bytes_per_sec = Some(8_000_000);
    req.faults = "postcopy-link-loss:300ms@2MiB".parse().expect("plan");
    let mut started = e.start_migration(req).await.expect("start");
    let deadline = tokio::time::Instant::now() + TIMEOUT * 2;
    let report = loop {
        match tokio::time::timeout_at(deadline, started.events.recv()).await {
            Ok(Ok(MigrationEvent::Finished(r))) => break *r,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(err)) => panic!("event stream ended early: {err}"),
            Err(_) => panic!("the migration did not end in time"),
        }
    };
    assert_eq!(report.result, Outcome::Recovered, "{report:?}");
    assert!(report.verified, "{report:?}");
    let before = created.stats.writes;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let vm = e.vm_info("dst", "rec").await.expect("VM on the target");
        assert_eq!(
            vm.stats.integrity_errors, 0,
            "the guest found pages not as it wrote them"
        );
        if vm.stats.writes > before && vm.stats.verify_passes > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest makes no progress: {:?}",
            vm.stats
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A kvm host keeps vCPU state in the kvm layout: asking it for another is refused with the
/// reason before anything starts, not quietly overridden. Needs no /dev/kvm.
#[test]
fn test_kvm_with_another_layout_is_refused_on_the_command_line() {
    let refusals: [&[&str]; 2] = [
        &["demo", "--backend", "kvm", "--source-layout", "xen-hvm"],
        &["serve", "--backend", "kvm", "--layout", "xen-hvm", "--insecure-no-auth"],
    ];
    for args in refusals {
        let out = std::process::Command::new(daemon::BIN)
            .args(args)
            .output()
            .expect("run migratory");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran: {stderr}");
        assert!(
            stderr.contains("the kvm backend keeps vCPU state in the kvm layout, not xen-hvm"),
            "{args:?}: {stderr}"
        );
    }
}

/// QEMU on both sides of a daemon: `migrate --to-qemu` hands the running guest to a QEMU that
/// waits with `-incoming`, and QEMU's own `migrate` (to the daemon's `--qemu-incoming`
/// listener) brings it back; the guest checks itself all the way.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn test_a_daemon_moves_a_kvm_guest_to_qemu_and_takes_it_back() {
    use migratory::engine::qemu::DEFAULT_MACHINE;
    use migratory::qemu::{find_qemu, interop, Accel, QemuConfig};

    let test = "test_a_daemon_moves_a_kvm_guest_to_qemu_and_takes_it_back";
    if !kvm_present(test) {
        return;
    }
    let Some(binary) = find_qemu() else {
        println!("SKIPPED {test}: qemu-system-x86_64 is not installed");
        return;
    };
    let k = Daemon::start(
        "kvm-qemu",
        "kvm",
        &["--backend", "kvm", "--qemu-incoming", "127.0.0.1:0"],
    );
    let back_to: std::net::SocketAddr = k
        .qemu
        .as_deref()
        .expect("the ready line names the QEMU listener")
        .parse()
        .expect("IP:PORT");
    let id = unique("toqemu");
    create_kvm_vm(&k, &id);
    let before = counter(&k.vm(&id).expect("VM"), "writes");
    let config = QemuConfig {
        binary,
        accel: Accel::detect(),
        memory_mib: 64,
        incoming: true,
        machine: DEFAULT_MACHINE.to_string(),
        extra_args: Vec::new(),
    };
    let (mut qemu, addr) = interop::start_receiving(&config).expect("QEMU waits");
    let config_accel = config.accel;
    let accel = config_accel.name();
    let run = k.cli(&[
        "migrate",
        &id,
        "--to-qemu",
        &addr.to_string(),
        "--qemu-accel",
        accel,
        "--json",
    ]);
    run.assert_success();
    let leg: Value = serde_json::from_str(&run.stdout).expect("JSON leg");
    assert_eq!(leg["direction"], "to-qemu", "{leg}");
    assert!(k.vm(&id).is_none(), "the daemon's copy is gone once QEMU runs the VM");
    interop::wait_for_state(&mut qemu, "running", TIMEOUT).expect("QEMU runs the guest");
    let on_qemu = interop::wait_for_reports(&qemu, 0, 1, TIMEOUT).expect("the guest reports on QEMU");
    let last = on_qemu.last().expect("a report");
    assert!(last.progress > before, "the guest went on writing on QEMU: {last:?}");
    assert_eq!(last.mismatches, 0, "{last:?}");

    interop::send_to(&mut qemu, back_to, 10_000_000_000).expect("QEMU migrates back");
    interop::wait_for_end(&mut qemu, TIMEOUT).expect("QEMU's migration completes");
    let arrived = wait_until("the VM from QEMU on the daemon", TIMEOUT, || {
        k.vms()
            .into_iter()
            .find(|v| v["id"].as_str().is_some_and(|s| s.starts_with("qemu-")))
            .ok_or_else(|| "not yet".to_string())
    });
    let new_id = arrived["id"].as_str().expect("id").to_string();
    let back = wait_for_checked_progress(&k, &new_id, last.progress);
    assert_eq!(
        counter(&back, "integrity_errors"),
        0,
        "the guest found pages not as it wrote them after kvm -> QEMU -> kvm: {back}"
    );
}
