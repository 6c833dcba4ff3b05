//! `migratory simulate` as a user runs it: the paper's scenario through the real binary, its
//! outputs on disk, and a bad scenario refused with its line.

use std::path::PathBuf;
use std::process::Command;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("migratory-simulate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn simulate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_migratory"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn test_the_paper_scenario_writes_its_outputs_and_the_vm_leaves_datacenter1() {
    let dir = out_dir("paper");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/scenarios/two-datacenters.toml");
    let run = simulate(&[scenario, "--out", dir.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.lines().count() <= 42, "the summary fits one screen:\n{stdout}");
    for f in [
        "summary.json",
        "migrations.csv",
        "ram_utilization.csv",
        "network_utilization.csv",
        "ram_datacenters.svg",
        "ram_datacenters.png",
        "migrations_timeline.svg",
        "migrations_timeline.png",
    ] {
        let len = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} is missing or empty");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary")).expect("json");
    let m = &summary["migrations"][0];
    assert_eq!(m["result"], "completed", "{m}");
    assert_eq!(m["source"]["datacenter"], "datacenter1");
    assert_eq!(m["target"]["datacenter"], "datacenter2");
    assert_eq!(summary["placements"][0]["datacenter"], "datacenter2");
    // The RAM series per datacenter: datacenter1 starts with the VM's 512 MiB and ends with
    // none; datacenter2 the other way round.
    let csv = std::fs::read_to_string(dir.join("ram_utilization.csv")).expect("csv");
    let series = |name: &str| -> Vec<u64> {
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|c| c.get(1) == Some(&"datacenter") && c.get(2) == Some(&name))
            .filter_map(|c| c.get(4).and_then(|v| v.parse().ok()))
            .collect()
    };
    let (dc1, dc2) = (series("datacenter1"), series("datacenter2"));
    assert_eq!((dc1.first(), dc1.last()), (Some(&(512 << 20)), Some(&0)), "{dc1:?}");
    assert_eq!((dc2.first(), dc2.last()), (Some(&0), Some(&(512 << 20))), "{dc2:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_a_bad_scenario_is_refused_with_its_line() {
    let dir = out_dir("bad");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        concat!(
            "name = \"bad\"\n[[datacenter]]\nname = \"dc\"\n",
            "[[host]]\nname = \"h1\"\ndatacenter = \"dc\"\nram = \"4GiB\"\ncores = 2\nnic = \"1Gbit\"\nvmm = \"kvm\"\n",
            "[[vm]]\nid = \"vm1\"\nram = \"1GiB\"\nvcpus = 1\nvmm = \"kvm\"\ndirty_rate = \"1MB/s\"\n",
            "host = \"nowhere\"\n",
        ),
    )
    .expect("write");
    let run = simulate(&[file.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    // Line 17 is `host = "nowhere"`.
    assert!(
        stderr.contains(r#"bad.toml:17: host "nowhere" is not defined"#),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
