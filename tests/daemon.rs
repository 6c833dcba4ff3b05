//! The `migratory` binary end to end: real `migratory serve` daemons in separate processes,
//! driven only through the CLI client (`vm create|list|delete`, `migrate`, `status`), with
//! faults injected from outside (SIGSTOP, SIGTERM, hostile TCP peers, wrong cluster keys).
//!
//! Every daemon lives in a [`Daemon`] whose `Drop` kills and reaps it, so no process outlives
//! its test. Tests wait on conditions with [`wait_until`] (one [`TIMEOUT`], short polling),
//! never on fixed sleeps.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/serve.rs"]
mod serve;

use cli::{is_finished, parse_started, wait_until, CliHost, PendingRun, Run, TIMEOUT};
use daemon::{unique, Daemon};

const MIB: u64 = 1 << 20;

/// The id from the final line of `migrate --wait`: `migration N <status>: ...`.
fn parse_final_id(run: &Run) -> u64 {
    run.stdout
        .strip_prefix("migration ")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_else(|| panic!("no migration id in the output: {}", run.describe()))
}

// ---------------------------------------------------------------------------------------------
// Small fixtures

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("migratory-daemon-test"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Writes a fresh cluster key file: 32 random bytes as hex, mode 0600.
    fn key_file(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let mut random = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .expect("read /dev/urandom");
        let key: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.0.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{key}\n").as_bytes()))
            .expect("write key file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// SplitMix64, enough to vary the garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A link preamble: `MIGRLINK`, version, link id, role, stream count.
fn preamble(version: u8, link_id: u64, role: u8, streams: u8) -> Vec<u8> {
    let mut p = b"MIGRLINK".to_vec();
    p.push(version);
    p.extend_from_slice(&link_id.to_be_bytes());
    p.push(role);
    p.push(streams);
    p
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn test_two_daemons_migrate_every_algorithm_over_1_and_4_streams() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let b = Daemon::start("b", "kvm", &[]);
    let to = b.migration_addr.to_string();
    for algorithm in ["stop-and-copy", "precopy", "postcopy", "hybrid", "auto"] {
        for streams in ["1", "4"] {
            let case = format!("{algorithm} over {streams} streams");
            let vm = format!("vm-{algorithm}-{streams}");
            a.create_vm(&vm, "16MiB");
            let mut args = vec![
                "migrate",
                &vm,
                "--to",
                &to,
                "--algorithm",
                algorithm,
                "--streams",
                streams,
                "--wait",
            ];
            if algorithm == "hybrid" {
                // A zero downtime limit keeps pre-copy from finishing alone, so the post-copy
                // half of hybrid runs too.
                args.extend(["--downtime-limit-ms", "0"]);
            }
            let run = a.cli(&args);
            assert!(run.status.success(), "{case}: {}", run.describe());
            let line = run.stdout.trim_end();
            let expected = format!(" completed: {vm} -> {to} ({algorithm})");
            assert!(
                line.starts_with("migration ") && line.contains(&expected) && line.ends_with(", verified"),
                "{case}: expected a completed and verified summary: {}",
                run.describe()
            );
            b.assert_runs(&vm, "kvm");
            assert!(
                a.vm(&vm).is_none(),
                "{case}: the source still holds {vm}: {:?}",
                a.vms()
            );
            // Keep the target's memory small across the matrix.
            b.cli(&["vm", "delete", &vm]).assert_success();
            assert!(b.vm(&vm).is_none(), "{case}: {vm} survived delete on b");
        }
    }
}

/// `--algorithm random --seed` and `--deadline` through the CLI, the API and the daemon: the
/// report names the seed and the pick, and says whether the deadline was met; the counters a
/// dashboard queries exist at zero before the first migration.
#[test]
fn test_random_with_a_seed_and_deadlines_through_the_cli() {
    let a = Daemon::start("qa", "xen-hvm", &[]);
    let b = Daemon::start("qb", "kvm", &[]);
    let to = b.migration_addr.to_string();
    let fresh = http_get(a.metrics_url(), "/metrics");
    for series in [
        "migratory_faults_injected_total{kind=\"link-drop\"} 0",
        "migratory_deadlines_total{result=\"met\"} 0",
        "migratory_deadlines_total{result=\"missed\"} 0",
        "migratory_migrations_total{algorithm=\"random\",result=\"completed\",priority=\"normal\"} 0",
    ] {
        assert!(
            fresh.lines().any(|l| l == series),
            "{series} missing before any migration:\n{fresh}"
        );
    }

    a.create_vm("r1", "16MiB");
    let args = [
        "migrate",
        "r1",
        "--to",
        &to,
        "--algorithm",
        "random",
        "--seed",
        "42",
        "--deadline",
        "60s",
        "--wait",
        "--json",
    ];
    let run = a.cli(&args);
    assert!(run.status.success(), "{}", run.describe());
    let report: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.describe()));
    assert_eq!(
        (report["requested"].as_str(), report["seed"].as_u64()),
        (Some("random"), Some(42))
    );
    let picked = report["algorithm"].as_str().expect("the algorithm that ran");
    assert_ne!(picked, "random");
    assert_eq!(
        report["decisions"][0]["action"].as_str(),
        Some(format!("random chose {picked}").as_str()),
        "{report}"
    );
    assert_eq!(
        (report["deadline_s"].as_f64(), report["deadline_met"].as_bool()),
        (Some(60.0), Some(true))
    );
    b.assert_runs("r1", "kvm");

    // An impossible deadline: the migration completes, and the summary says it was missed.
    a.create_vm("r2", "16MiB");
    let run = a.cli(&["migrate", "r2", "--to", &to, "--deadline", "1ms", "--wait"]);
    assert!(run.status.success(), "{}", run.describe());
    assert!(run.stdout.contains(", deadline MISSED by "), "{}", run.describe());
    b.assert_runs("r2", "kvm");
    let after = http_get(a.metrics_url(), "/metrics");
    for series in [
        "migratory_deadlines_total{result=\"met\"} 1",
        "migratory_deadlines_total{result=\"missed\"} 1",
    ] {
        assert!(after.lines().any(|l| l == series), "{series} missing:\n{after}");
    }
}

#[test]
fn test_status_shows_progress_during_a_capped_migration() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let b = Daemon::start("b", "kvm", &[]);
    a.create_vm("vm1", "48MiB");
    let id = a.start_migration(
        "vm1",
        b.migration_addr,
        &["--algorithm", "precopy", "--bandwidth", "16MB"],
    );
    let mut seen: Vec<u64> = Vec::new();
    let last = wait_until(&format!("migration {id} to end"), TIMEOUT, || {
        let s = a.status(id);
        if s["status"] == "active" {
            let bytes = s["transferred_bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("no transferred_bytes in {s}"));
            if let Some(&prev) = seen.last() {
                assert!(bytes >= prev, "transferred_bytes went back from {prev} to {bytes}: {s}");
            }
            if seen.last() != Some(&bytes) {
                seen.push(bytes);
            }
        }
        if is_finished(&s) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    let increasing = seen.iter().filter(|&&b| b > 0).count();
    assert!(
        increasing >= 3,
        "expected transferred_bytes to rise across at least 3 observations while active, saw {seen:?}"
    );
    assert_eq!(last["status"], "completed", "final status: {last}");
    assert_eq!(last["report"]["verified"], true, "final status: {last}");
    // The cap is what made progress observable: ~45 MB of non-zero pages at 16 MB/s.
    let total_s = last["report"]["total_s"].as_f64().unwrap_or(0.0);
    assert!(
        total_s >= 1.5,
        "a 48 MiB migration capped at 16 MB/s took only {total_s} s: {last}"
    );
    b.assert_runs("vm1", "kvm");
}

#[test]
fn test_silent_target_is_detected_and_vm_stays_on_source() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let b = Daemon::start("b", "kvm", &[]);
    // ~12 s at 4 MB/s: the target is stopped well inside the first pre-copy round. The round
    // (one stream, 48 MiB) is larger than what the send queue and both sockets' buffers absorb
    // (~30 MB observed), so the stopped target's closed receive window stalls the source's data
    // plane, as it would for a real hung host; the keepalive must notice all the same.
    a.create_vm("vm1", "48MiB");
    let id = a.start_migration(
        "vm1",
        b.migration_addr,
        &["--algorithm", "precopy", "--streams", "1", "--bandwidth", "4MB"],
    );
    a.wait_moving(id);
    b.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let end = wait_until(
        &format!("migration {id} to a SIGSTOPped target to end (keepalive bound 5 s)"),
        Duration::from_secs(20),
        || {
            let s = a.status(id);
            if is_finished(&s) {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    let detected_after = stopped.elapsed();
    // Resume B before asserting, so a failure does not leave it stopped longer than needed.
    b.signal(libc::SIGCONT);
    assert!(
        matches!(end["status"].as_str(), Some("failed" | "aborted")),
        "a migration to a silent target must fail or abort; got {end}"
    );
    let error = end["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("silent") || error.contains("link"),
        "the error should name the silent link: {end}"
    );
    a.assert_runs("vm1", "xen-hvm");
    eprintln!("silent target detected {detected_after:?} after SIGSTOP: {error}");
    let left = wait_until(
        "the resumed target to release its reservation",
        Duration::from_secs(20),
        || {
            let vms = b.vms();
            if vms.is_empty() {
                Ok(vms)
            } else {
                Err(format!("{vms:?}"))
            }
        },
    );
    assert!(left.is_empty());
    // B is healthy again: a new migration to it succeeds.
    let run = a.cli(&["migrate", "vm1", "--to", &b.migration_addr.to_string(), "--wait"]);
    assert!(run.status.success(), "migration after SIGCONT: {}", run.describe());
    b.assert_runs("vm1", "kvm");
}

#[test]
fn test_wrong_cluster_key_is_refused_before_reservation() {
    let dir = TempDir::new();
    let key1 = dir.key_file("one.key");
    let key2 = dir.key_file("two.key");
    // A daemon without a key must be told so: it refuses to start otherwise.
    let with = |key: &Option<&PathBuf>| -> Vec<String> {
        key.map(|k| vec!["--cluster-key-file".to_string(), path_arg(k).to_string()])
            .unwrap_or_else(|| vec!["--insecure-no-auth".to_string()])
    };
    // (case, source key, target key, should complete)
    let cases = [
        ("same key on both (control)", Some(&key1), Some(&key1), true),
        ("different keys", Some(&key1), Some(&key2), false),
        ("only the target has a key", None, Some(&key2), false),
        ("only the source has a key", Some(&key1), None, false),
    ];
    for (case, source_key, target_key, completes) in cases {
        let (sa, sb) = (with(&source_key), with(&target_key));
        let a = Daemon::start("a", "xen-hvm", &sa.iter().map(String::as_str).collect::<Vec<_>>());
        let b = Daemon::start("b", "kvm", &sb.iter().map(String::as_str).collect::<Vec<_>>());
        a.create_vm("vm1", "16MiB");
        let to = b.migration_addr.to_string();
        let run = a.cli(&["migrate", "vm1", "--to", &to, "--wait"]);
        if completes {
            assert!(run.status.success(), "{case}: {}", run.describe());
            b.assert_runs("vm1", "kvm");
            continue;
        }
        assert!(
            !run.status.success(),
            "{case}: the migration must be refused: {}",
            run.describe()
        );
        assert!(
            run.stderr.to_lowercase().contains("authentication"),
            "{case}: the error should mention authentication: {}",
            run.describe()
        );
        // With a key on either side the transport refuses the link before any migration
        // exists (no id at all); otherwise the migration must end before reservation.
        if run.stdout.starts_with("migration ") {
            let status = a.status(parse_final_id(&run));
            let stages: Vec<&str> = status["report"]["stages"]
                .as_array()
                .map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect())
                .unwrap_or_default();
            assert!(
                !stages.contains(&"reservation"),
                "{case}: refused only after reaching reservation; stages {stages:?}: {status}"
            );
        }
        let held = b.vms();
        assert!(held.is_empty(), "{case}: the target holds VMs after refusing: {held:?}");
        a.assert_runs("vm1", "xen-hvm");
        eprintln!("{case}: {}", run.stderr.trim_end());
    }
}

#[test]
fn test_over_budget_reservation_is_refused() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let b = Daemon::start("b", "kvm", &["--memory-budget", "8MiB"]);
    a.create_vm("vm1", "16MiB");
    let run = a.cli(&["migrate", "vm1", "--to", &b.migration_addr.to_string(), "--wait"]);
    assert!(
        !run.status.success(),
        "an over-budget migration must fail: {}",
        run.describe()
    );
    let stderr = run.stderr.to_lowercase();
    assert!(
        stderr.contains("reservation refused") && stderr.contains(&format!("{} bytes requested", 16 * MIB)),
        "the error should say the target lacks the memory: {}",
        run.describe()
    );
    let held = b.vms();
    assert!(held.is_empty(), "the target holds VMs after refusing: {held:?}");
    a.assert_runs("vm1", "xen-hvm");
}

#[test]
fn test_sigterm_on_target_mid_migration_keeps_vm_on_source() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let mut b = Daemon::start("b", "kvm", &[]);
    a.create_vm("vm1", "32MiB");
    let id = a.start_migration(
        "vm1",
        b.migration_addr,
        &["--algorithm", "precopy", "--bandwidth", "4MB"],
    );
    a.wait_moving(id);
    b.signal(libc::SIGTERM);
    let exit = b.wait_exit(Duration::from_secs(30));
    assert!(
        exit.success(),
        "the target exited {exit} after SIGTERM; stderr:\n{}",
        b.stderr_text()
    );
    let end = a.wait_finished(id, TIMEOUT);
    assert_ne!(
        end["status"], "completed",
        "the migration completed despite the target shutting down: {end}"
    );
    a.assert_runs("vm1", "xen-hvm");
    eprintln!(
        "SIGTERM on the target ended the migration {}: {}",
        end["status"], end["error"]
    );
    let log = b.stderr_text();
    assert!(
        log.contains("shutting down") && log.contains("migratory: stopped"),
        "the target should log a graceful shutdown; stderr:\n{log}"
    );
}

#[test]
fn test_daemon_survives_1000_hostile_connections() {
    let a = Daemon::start("a", "xen-hvm", &[]);
    let mut b = Daemon::start("b", "kvm", &[]);
    let mut rng = Rng(0x5EED);
    let flood = |rng: &mut Rng, count: usize| {
        for i in 0..count {
            hostile_connection(b.migration_addr, rng, i);
        }
    };
    flood(&mut rng, 100);
    let before = b.resident_bytes();
    flood(&mut rng, 1000);
    assert!(
        b.is_alive(),
        "the daemon died under hostile connections:\n{}",
        b.stderr_text()
    );
    // The API still answers, and so does the listener.
    assert!(b.vms().is_empty(), "hostile peers left VMs behind: {:?}", b.vms());
    let after = b.resident_bytes();
    let growth = after.saturating_sub(before);
    assert!(
        growth < 32 * MIB,
        "resident memory grew by {} MiB over 1000 hostile connections ({before} -> {after} bytes)",
        growth / MIB
    );
    eprintln!("resident memory over 1000 hostile connections: {before} -> {after} bytes");
    a.create_vm("vm1", "16MiB");
    let run = a.cli(&["migrate", "vm1", "--to", &b.migration_addr.to_string(), "--wait"]);
    assert!(
        run.status.success(),
        "a real migration after the flood: {}",
        run.describe()
    );
    assert!(run.stdout.trim_end().ends_with(", verified"), "{}", run.describe());
    b.assert_runs("vm1", "kvm");
}

/// One connection of garbage, of a kind chosen by `i`. Errors are the point, so ignored.
fn hostile_connection(addr: SocketAddr, rng: &mut Rng, i: usize) {
    let connect = || {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        s
    };
    let huge_length = 0xFFFF_FFFFu32.to_be_bytes();
    match i % 7 {
        // Random bytes of random length.
        0 => {
            let n = 1 + (rng.next() % 512) as usize;
            let _ = connect().write_all(&rng.bytes(n));
        }
        // A valid control preamble, then a frame length far beyond any limit.
        1 => {
            let mut msg = preamble(1, rng.next(), 0, 1);
            msg.extend_from_slice(&huge_length);
            let _ = connect().write_all(&msg);
        }
        // Both connections of a one-stream link, so it assembles, each then sending a hostile
        // length: the control reader and the data reader must both refuse it.
        2 => {
            let id = rng.next();
            let (mut control, mut data) = (connect(), connect());
            let _ = control.write_all(&[preamble(1, id, 0, 1), huge_length.to_vec()].concat());
            let _ = data.write_all(&[preamble(1, id, 1, 1), huge_length.to_vec()].concat());
        }
        // A truncated preamble.
        3 => {
            let p = preamble(1, rng.next(), 0, 1);
            let cut = 1 + (rng.next() as usize % (p.len() - 1));
            let _ = connect().write_all(&p[..cut]);
        }
        // Immediate disconnect.
        4 => drop(connect()),
        // Preambles out of range: wrong version, zero or too many streams, role beyond streams.
        5 => {
            let bad = match rng.next() % 4 {
                0 => preamble(2, rng.next(), 0, 1),
                1 => preamble(1, rng.next(), 0, 0),
                2 => preamble(1, rng.next(), 0, 255),
                _ => preamble(1, rng.next(), 9, 2),
            };
            let _ = connect().write_all(&bad);
        }
        // A valid data preamble, then random frame bytes.
        _ => {
            let mut msg = preamble(1, rng.next(), 1, 1);
            msg.extend(rng.bytes(64));
            let _ = connect().write_all(&msg);
        }
    }
}

#[test]
fn test_concurrent_migrations_share_the_bandwidth_budget() {
    const BUDGET_BYTES_PER_SEC: f64 = 20e6;
    let a = Daemon::start("a", "xen-hvm", &["--bandwidth-budget", "20MB"]);
    let b = Daemon::start("b", "kvm", &[]);
    a.create_vm("vm1", "24MiB");
    a.create_vm("vm2", "24MiB");
    let to = b.migration_addr.to_string();
    let started = Instant::now();
    let pending: Vec<PendingRun> = ["vm1", "vm2"]
        .iter()
        .map(|vm| a.spawn_cli(&["migrate", vm, "--to", &to, "--algorithm", "precopy"]))
        .collect();
    let ids: Vec<u64> = pending
        .into_iter()
        .map(|p| {
            let run = p.finish();
            run.assert_success();
            parse_started(&run)
        })
        .collect();
    let mut ended: Vec<Option<(Value, Duration)>> = vec![None, None];
    wait_until("both migrations to end", TIMEOUT, || {
        for (slot, &id) in ended.iter_mut().zip(&ids) {
            if slot.is_none() {
                let s = a.status(id);
                if is_finished(&s) {
                    *slot = Some((s, started.elapsed()));
                }
            }
        }
        if ended.iter().all(Option::is_some) {
            Ok(())
        } else {
            Err(format!("{ended:?}"))
        }
    });
    let ended: Vec<(Value, Duration)> = ended.into_iter().flatten().collect();
    let wall = ended.iter().map(|(_, t)| *t).max().expect("two migrations");
    let mut total_bytes = 0u64;
    let mut each = Vec::new();
    for (s, t) in &ended {
        assert_eq!(s["status"], "completed", "{s}");
        assert_eq!(s["report"]["verified"], true, "{s}");
        let bytes = s["transferred_bytes"].as_u64().expect("transferred_bytes");
        total_bytes += bytes;
        each.push(format!(
            "migration {} of {}: {bytes} bytes, ended at {:.2} s, own throughput {:.1} MB/s over {:.2} s",
            s["id"],
            s["vm"],
            t.as_secs_f64(),
            s["report"]["throughput_bytes_per_s"].as_f64().unwrap_or(f64::NAN) / 1e6,
            s["report"]["total_s"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    let aggregate = total_bytes as f64 / wall.as_secs_f64();
    assert!(
        aggregate <= BUDGET_BYTES_PER_SEC * 1.25,
        "the two migrations together moved {total_bytes} bytes in {:.2} s = {:.1} MB/s, above the \
         shared 20 MB/s budget (+25%): {}",
        wall.as_secs_f64(),
        aggregate / 1e6,
        each.join("; ")
    );
    eprintln!(
        "aggregate {:.1} MB/s over {:.2} s: {}",
        aggregate / 1e6,
        wall.as_secs_f64(),
        each.join("; ")
    );
    b.assert_runs("vm1", "kvm");
    b.assert_runs("vm2", "kvm");
}

/// One `GET`; the body of a 200 answer.
fn try_http_get(base: &str, path: &str) -> Result<String, String> {
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
    // HTTP/1.0, so that no server answers with a chunked body.
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")) {
        return Err(format!("GET {path}: {head}"));
    }
    Ok(body.to_string())
}

fn http_get(base: &str, path: &str) -> String {
    try_http_get(base, path).unwrap_or_else(|e| panic!("{e}"))
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Migrates one VM A -> B with each algorithm, to completion.
fn migrate_every_algorithm(a: &Daemon, b: &Daemon) {
    for alg in ["stop-and-copy", "precopy", "postcopy", "hybrid", "auto"] {
        let vm = unique(&format!("m-{alg}"));
        a.create_vm(&vm, "16MiB");
        let to = b.migration_addr.to_string();
        let mut args = vec![
            "migrate",
            vm.as_str(),
            "--to",
            to.as_str(),
            "--algorithm",
            alg,
            "--wait",
        ];
        if alg == "hybrid" {
            args.extend(["--downtime-limit-ms", "0"]);
        }
        a.cli(&args).assert_success();
    }
}

#[test]
fn test_promtool_accepts_a_real_scrape() {
    let Some(promtool) = tool("promtool") else {
        println!("SKIPPED: promtool not installed (apt-get install prometheus)");
        return;
    };
    let a = Daemon::start("pa", "xen-hvm", &[]);
    let b = Daemon::start("pb", "kvm", &[]);
    migrate_every_algorithm(&a, &b);
    let scrape = http_get(a.metrics_url(), "/metrics");
    assert!(scrape.contains("migratory_stage_duration_seconds_bucket"), "{scrape}");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    {
        let mut stdin = check.stdin.take().expect("stdin");
        stdin.write_all(scrape.as_bytes()).expect("feed promtool");
    }
    let out = check.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Prometheus scraping a real daemon sees the duration of every stage of every algorithm.
#[test]
fn test_prometheus_scrapes_stage_durations_of_every_algorithm() {
    let Some(prometheus) = tool("prometheus") else {
        println!("SKIPPED: prometheus not installed (apt-get install prometheus)");
        return;
    };
    let a = Daemon::start("sa", "xen-hvm", &[]);
    let b = Daemon::start("sb", "kvm", &[]);
    let dir = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: migratory\n    static_configs:\n      - targets: ['{}']\n",
            a.metrics_url().trim_start_matches("http://")
        ),
    )
    .expect("config");
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut server);
    migrate_every_algorithm(&a, &b);
    let api = format!("http://127.0.0.1:{port}");
    let expected: Vec<(&str, Vec<&str>)> = vec![
        (
            "stop-and-copy",
            vec!["premigration", "reservation", "stopcopy", "commitment", "activation"],
        ),
        (
            "precopy",
            vec![
                "premigration",
                "reservation",
                "precopy",
                "stopcopy",
                "commitment",
                "activation",
            ],
        ),
        (
            "postcopy",
            vec![
                "premigration",
                "reservation",
                "stopcopy",
                "activation",
                "pull",
                "commitment",
            ],
        ),
        (
            "hybrid",
            vec![
                "premigration",
                "reservation",
                "precopy",
                "stopcopy",
                "activation",
                "pull",
                "commitment",
            ],
        ),
        (
            "auto",
            vec!["premigration", "reservation", "precopy", "stopcopy", "activation"],
        ),
    ];
    let seen = wait_until(
        "Prometheus to hold every stage of every algorithm",
        Duration::from_secs(90),
        || {
            let body = try_http_get(&api, "/api/v1/query?query=migratory_stage_duration_seconds_count")?;
            let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let series = v["data"]["result"].as_array().cloned().unwrap_or_default();
            let have: Vec<(String, String)> = series
                .iter()
                .map(|s| {
                    (
                        s["metric"]["algorithm"].as_str().unwrap_or("").to_string(),
                        s["metric"]["stage"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            let missing: Vec<String> = expected
                .iter()
                .flat_map(|(alg, stages)| stages.iter().map(move |st| (alg.to_string(), st.to_string())))
                .filter(|pair| !have.contains(pair))
                .map(|(a, s)| format!("{a}/{s}"))
                .collect();
            if missing.is_empty() {
                Ok(have)
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
    );
    println!("Prometheus holds {} stage-duration series", seen.len());
}
