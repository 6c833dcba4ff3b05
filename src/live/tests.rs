//! A live run of the paper's two-datacenter example against real daemons.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

/// The `migratory` executable. A unit test runs from `target/<profile>/deps/`, and cargo builds
/// the binary beside that directory whenever it builds the package's integration tests (plain
/// `cargo test`); `cargo build` first when running this test alone.
fn migratory_exe() -> PathBuf {
    if let Some(exe) = option_env!("CARGO_BIN_EXE_migratory") {
        return PathBuf::from(exe);
    }
    let test_exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let exe = profile_dir.join("migratory");
    assert!(exe.exists(), "{} is not built: run `cargo build` first", exe.display());
    exe
}

fn example() -> Scenario {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/scenarios/two-datacenters.toml");
    let text = std::fs::read_to_string(path).expect("the example scenario is in the repository");
    migratory::model::parse(&text).expect("the example scenario parses")
}

#[test]
fn test_two_datacenters_runs_live_and_lands_where_the_model_says() {
    let scenario = example();
    let opts = LiveOptions {
        exe: Some(migratory_exe()),
        // The migration is asked for at 30 s: 3 s of wall time.
        time_scale: 0.1,
        sample_every_s: Some(0.25),
        max_wait: Duration::from_secs(40),
    };
    let began = Instant::now();
    let live = run_live(&scenario, &opts).expect("the live run completes");
    let took = began.elapsed();

    let [m] = live.migrations.as_slice() else {
        panic!("one migration expected: {:#?}", live.migrations)
    };
    assert_eq!(m.result, "completed", "{m:#?}\nnotes: {:?}", live.notes);
    assert_eq!((m.source.as_str(), m.target.as_str()), ("dc1-xen", "dc2-kvm"));
    assert_eq!(m.target_datacenter, "datacenter2");
    assert!(m.bytes >= 512 << 20, "a whole 512 MiB guest crossed: {m:#?}");
    assert!(m.total_s > 0.0 && m.end_s > m.start_s && m.start_s >= 2.9, "{m:#?}");
    let vm1 = live.placements.iter().find(|p| p.vm == "vm1").expect("vm1 is placed");
    assert_eq!(vm1.host.as_deref(), Some("dc2-kvm"));
    assert_eq!(vm1.datacenter.as_deref(), Some("datacenter2"));

    // Host 0 is dc1-xen, host 1 dc2-kvm (the scenario's order).
    let ram = |host: usize| -> Vec<u64> {
        live.samples
            .iter()
            .filter(|s| s.host == host)
            .map(|s| s.ram_used_bytes)
            .collect()
    };
    let (source, target) = (ram(0), ram(1));
    assert_eq!(source.first(), Some(&(512 << 20)), "{source:?}");
    assert_eq!(source.last(), Some(&0), "{source:?}");
    assert_eq!(target.first(), Some(&0), "{target:?}");
    assert_eq!(target.last(), Some(&(512 << 20)), "{target:?}");
    let moving = live.samples.iter().filter(|s| s.net_out_bytes_per_sec > 0.0).count();
    assert!(moving > 0, "no sample saw the migration move bytes");
    // Loopback cannot play the link's 20 ms: the outcome must say so, not hide it.
    assert!(live.notes.iter().any(|n| n.contains("latency")), "{:?}", live.notes);

    let model = migratory::model::run(&scenario, None).expect("the model runs the example");
    let table = compare(&model, &live);
    eprintln!("live run in {:.1} s\n{table}", took.as_secs_f64());
    assert!(table.lines().any(|l| l.starts_with("vm1 ")), "{table}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn test_run_live_refuses_before_starting_anything() {
    let mut scenario = example();
    scenario.hosts[1].algorithms.pop();
    let opts = LiveOptions {
        exe: Some(PathBuf::from("/nonexistent/migratory")),
        ..LiveOptions::default()
    };
    let err = run_live(&scenario, &opts).expect_err("a host with four algorithms is refused");
    assert!(err.to_string().contains("algorithms of host dc2-kvm"), "{err}");
    let bad_scale = LiveOptions {
        time_scale: 0.0,
        ..opts
    };
    assert!(matches!(run_live(&example(), &bad_scale), Err(LiveError::Options(_))));
}
