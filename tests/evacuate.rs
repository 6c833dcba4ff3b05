//! Evacuation and graceful shutdown with real daemons: `migratory drain`, SIGTERM with
//! `--drain-to` (the VMs move, the daemon exits), and SIGTERM without peers (the daemon stays up
//! for its VMs, refuses new ones, and only a second SIGTERM ends it, naming what it destroys).

use std::time::Duration;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/serve.rs"]
mod serve;

use cli::{wait_until, CliHost, TIMEOUT};
use daemon::Daemon;

fn ids(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = d
        .vms()
        .iter()
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect();
    v.sort();
    v
}

#[test]
fn test_drain_moves_every_vm_to_the_peer() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let b = Daemon::start("b", "kvm", &[]);
    a.create_vm("vm1", "16MiB");
    a.create_vm("vm2", "16MiB");
    let to = b.migration_addr.to_string();
    let run = a.cli(&["drain", "--to", &to, "--algorithm", "precopy", "--wait"]);
    run.assert_success();
    assert!(
        run.stdout.contains("moved vm1") && run.stdout.contains("moved vm2"),
        "{}",
        run.describe()
    );
    assert!(ids(&a).is_empty(), "a still holds {:?}", ids(&a));
    assert_eq!(ids(&b), ["vm1", "vm2"]);
    b.assert_runs("vm1", "kvm");
    b.assert_runs("vm2", "kvm");
}

#[test]
fn test_sigterm_with_drain_to_moves_the_vms_then_exits() {
    let b = Daemon::start("b", "kvm", &[]);
    let to = b.migration_addr.to_string();
    let mut a = Daemon::start("a", "xen-hvm", &["--drain-to", &to]);
    a.create_vm("vm1", "32MiB");
    a.signal(libc::SIGTERM);
    let exit = a.wait_exit(TIMEOUT);
    let log = a.stderr_text();
    assert!(exit.success(), "a exited {exit}; stderr:\n{log}");
    assert!(log.contains("moved VM vm1"), "{log}");
    b.assert_runs("vm1", "kvm");
}

#[test]
fn test_sigterm_without_peers_keeps_the_vm_until_a_second_sigterm() {
    let mut a = Daemon::start("a", "xen-hvm", &[]);
    a.create_vm("vm1", "16MiB");
    a.signal(libc::SIGTERM);
    wait_until("a to say what holds it", TIMEOUT, || {
        let log = a.stderr_text();
        if log.contains("staying up") && log.contains("vm1 (running)") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert!(a.is_alive(), "a daemon hosting a VM must not exit on one SIGTERM");
    // It still serves the API, runs the VM, and takes no new one.
    a.assert_runs("vm1", "xen-hvm");
    let refused = a.cli(&["vm", "create", "vm2", "--memory", "16MiB"]);
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(refused.stderr.contains("shutting down"), "{}", refused.describe());
    a.signal(libc::SIGTERM);
    let exit = a.wait_exit(Duration::from_secs(10));
    let log = a.stderr_text();
    assert!(!exit.success(), "a forced exit that destroys VMs is loud: {exit}");
    assert!(log.contains("FORCED EXIT destroys VM vm1"), "{log}");
}
