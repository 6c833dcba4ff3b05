//! Hostile load against real daemons while a migration runs: 10,000 idle connections to the
//! migration port, then 10,000 to the control API. The migration completes each time, the
//! daemon keeps answering, and its resident memory growth is printed.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "support/cli.rs"]
mod cli;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/serve.rs"]
mod serve;

use cli::{CliHost, TIMEOUT};
use daemon::Daemon;

const MIB: u64 = 1 << 20;
/// Idle connections per phase.
const IDLE: usize = 10_000;
/// A connect that takes longer than this is counted as refused (the listener's backlog is full
/// because the daemon sheds connections; that is the point).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Bound on opening all of them.
const OPEN_BUDGET: Duration = Duration::from_secs(60);

/// Raises this process's open-file limit to its hard limit: the test itself holds the sockets.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

/// Opens up to `n` idle connections to `addr` (nothing is ever sent on them); returns them and
/// how many the daemon shed (refused or reset at once, or never accepted in time).
fn open_idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let started = Instant::now();
    let mut open = Vec::with_capacity(n);
    let mut shed = 0;
    for _ in 0..n {
        if started.elapsed() > OPEN_BUDGET {
            shed += 1;
            continue;
        }
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => open.push(s),
            Err(_) => shed += 1,
        }
    }
    (open, shed)
}

fn api_addr(d: &Daemon) -> SocketAddr {
    d.api
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("daemon {} has no TCP API: {}", d.name, d.api))
}

/// One phase: a migration a -> b under a cap, `IDLE` connections to `target` meanwhile.
fn phase(a: &Daemon, b: &Daemon, vm: &str, what: &str, target: SocketAddr) {
    a.create_vm(vm, "64MiB");
    let id = a.start_migration(vm, b.migration_addr, &["--algorithm", "precopy", "--bandwidth", "16MB"]);
    let before = b.resident_bytes();
    let (held, shed) = open_idle(target, IDLE);
    let during = b.resident_bytes();
    let end = a.wait_finished(id, TIMEOUT * 2);
    assert_eq!(
        end["status"], "completed",
        "the migration under {IDLE} idle connections to the {what}: {end}"
    );
    b.assert_runs(vm, "kvm");
    // Still answering: the API lists, and a second look at the VM works.
    assert!(!b.vms().is_empty());
    drop(held);
    eprintln!(
        "{IDLE} idle connections to b's {what} during migration {id}: {} held open by the daemon's backlog or accepted, {shed} shed; b's resident memory {} -> {} MiB (+{} MiB)",
        IDLE - shed,
        before / MIB,
        during / MIB,
        during.saturating_sub(before) / MIB
    );
}

#[test]
fn test_ten_thousand_idle_connections_do_not_stop_a_migration() {
    let limit = raise_nofile();
    if limit < (IDLE as u64) + 1024 {
        eprintln!("SKIPPED: the open-file limit here is {limit}, below {IDLE} connections");
        return;
    }
    let a = Daemon::start("a", "xen-hvm", &[]);
    let b = Daemon::start("b", "kvm", &[]);
    phase(&a, &b, "vm1", "migration port", b.migration_addr);
    phase(&a, &b, "vm2", "control API", api_addr(&b));
}
