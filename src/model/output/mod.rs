//! What a model run leaves behind: the files of `migratory simulate --out DIR`, the summary
//! JSON of `--json`, and the text summary on stdout.
//!
//! Use [`write_all`] for the directory, [`summary_json`] for the JSON alone, and
//! [`text_summary`] for a person. Every writer is a pure function of the scenario and the
//! outcome: the same run gives the same bytes.
//!
//! # Files
//!
//! * `summary.json`: one object, keys sorted at every level, floats as the shortest text that
//!   reads back to the same value. `format` (`"migratory-simulate-summary"`) and `version`
//!   (1); `scenario`, `seed`, `end_s`, `events_processed`; `topology` (`datacenters`,
//!   `hosts`, `vms`); `results` (count per result); `migrations`, one object each, in request
//!   order: `index`, `vm`, `source` and `target` (`host`, `datacenter`), `requested`,
//!   `algorithm`, `why` (list), `predicted` (`algorithm`, `total_s`, `downtime_s`, `basis`, or
//!   null), `requested_at_s`, `start_s`, `end_s`, `total_s`, `downtime_start_s` (or null),
//!   `downtime_s`, `bytes`, `rounds`, `result`, `error` (or null); `placements`, one per VM:
//!   `vm`, `host` and `datacenter` (null where it runs nowhere).
//! * `migrations.csv`: a header row, then one row per migration in request order:
//!   `index,vm,source,source_datacenter,target,target_datacenter,requested,algorithm,result,`
//!   `requested_at_s,start_s,end_s,total_s,downtime_start_s,downtime_s,bytes,rounds,`
//!   `predicted_algorithm,predicted_total_s,predicted_downtime_s,error,why` (`why`'s reasons
//!   joined by `"; "`; empty fields where there is no value).
//! * `ram_utilization.csv`: **long format**, one row per instant and per datacenter or host,
//!   `t_s,scope,name,datacenter,ram_used_bytes,ram_capacity_bytes,ram_used_fraction`, where
//!   `scope` is `datacenter` or `host`. Long rather than wide because a thousand hosts would
//!   make a three-thousand-column header, and because every plotting tool can pivot long data
//!   by `scope` and `name`. At each instant the datacenters come first (scenario order), then
//!   the hosts (scenario order). A datacenter's row is the sum of its hosts' rows at that
//!   instant; its capacity is the sum of its hosts' RAM. RAM used counts running, paused and
//!   reserved (incoming) VMs, so a VM in flight counts on both ends.
//! * `network_utilization.csv`: the same layout,
//!   `t_s,scope,name,datacenter,out_bytes_per_sec,in_bytes_per_sec`, migration traffic at the
//!   host's NIC. A datacenter's figures are its hosts' sums, so a migration between two hosts
//!   of one datacenter counts in both its `out` and its `in`.
//! * Plots, each as `.svg` and `.png`, 1000 by 560 pixels (see `figures`):
//!   `ram_datacenters` (RAM used per datacenter over time, migrations in flight shaded,
//!   downtime marked), `ram_hosts` (the hosts whose RAM use changed most, at most eight, with
//!   a note of how many are left out), `migrations_timeline` (a bar per migration, or for more
//!   than forty the migrations in flight, queued and paused over time).
//!
//! Samples are grouped into instants by equal `t_s`; a host missing from an instant keeps its
//! previous figures (see `topology`).

mod csv;
mod figures;
mod summary;
mod text;
mod topology;

#[cfg(test)]
pub(crate) mod fixture;

use std::io;
use std::path::{Path, PathBuf};

use crate::model::{ModelOutcome, Scenario};

pub use summary::summary_json;
pub use text::{text_summary, SUMMARY_MAX_COLUMNS, SUMMARY_MAX_LINES};

/// The summary file's name.
pub const SUMMARY_FILE: &str = "summary.json";
/// The migrations table's file name.
pub const MIGRATIONS_FILE: &str = "migrations.csv";
/// The RAM series' file name.
pub const RAM_FILE: &str = "ram_utilization.csv";
/// The network series' file name.
pub const NETWORK_FILE: &str = "network_utilization.csv";

/// Why the outputs could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output directory could not be created.
    #[error("cannot create the output directory {}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A sample names a host the scenario does not have.
    #[error("a sample names host {host}, but the scenario has {hosts} hosts")]
    UnknownHost {
        /// The sample's host index.
        host: usize,
        /// Hosts in the scenario.
        hosts: usize,
    },
    /// A host names a datacenter the scenario does not have.
    #[error("host {host} is in datacenter {datacenter}, but the scenario has {datacenters} datacenters")]
    UnknownDatacenter {
        /// The host.
        host: String,
        /// Its datacenter index.
        datacenter: usize,
        /// Datacenters in the scenario.
        datacenters: usize,
    },
}

/// One file written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Where.
    pub path: PathBuf,
    /// Its size, bytes.
    pub bytes: u64,
}

/// What [`write_all`] wrote, in the order it wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Written {
    /// The files.
    pub files: Vec<WrittenFile>,
}

impl Written {
    /// Bytes of all the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Writes every output file into `dir`, creating it if missing; files already there are
/// replaced.
pub fn write_all(dir: &Path, scenario: &Scenario, outcome: &ModelOutcome) -> Result<Written, OutputError> {
    let topology = topology::Topology::new(scenario, outcome)?;
    std::fs::create_dir_all(dir).map_err(|source| OutputError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut written = Written::default();
    written.files.push(write_file(
        &dir.join(SUMMARY_FILE),
        summary_json(scenario, outcome).as_bytes(),
    )?);
    written
        .files
        .push(csv::write_migrations(&dir.join(MIGRATIONS_FILE), outcome)?);
    written.files.extend(csv::write_utilization(
        &dir.join(RAM_FILE),
        &dir.join(NETWORK_FILE),
        &topology,
        outcome,
    )?);
    for (name, scene) in figures::all(&topology, outcome) {
        let svg = crate::model::plot::to_svg(&scene);
        written
            .files
            .push(write_file(&dir.join(format!("{name}.svg")), svg.as_bytes())?);
        written.files.push(write_file(
            &dir.join(format!("{name}.png")),
            &crate::model::plot::to_png(&scene),
        )?);
    }
    Ok(written)
}

/// Writes `bytes` to `path`.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<WrittenFile, OutputError> {
    std::fs::write(path, bytes).map_err(|source| OutputError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(WrittenFile {
        path: path.to_path_buf(),
        bytes: bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::fixture::{fixture, tempdir, Spec};
    use super::*;

    const FILES: [&str; 10] = [
        SUMMARY_FILE,
        MIGRATIONS_FILE,
        RAM_FILE,
        NETWORK_FILE,
        "ram_datacenters.svg",
        "ram_datacenters.png",
        "ram_hosts.svg",
        "ram_hosts.png",
        "migrations_timeline.svg",
        "migrations_timeline.png",
    ];

    #[test]
    fn test_write_all_creates_the_directory_and_every_file() {
        let (scenario, outcome) = fixture(&Spec::small());
        let tmp = tempdir("write-all");
        let dir = tmp.join("nested").join("out");
        let written = write_all(&dir, &scenario, &outcome).unwrap();
        let names: Vec<String> = written
            .files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, FILES);
        for f in &written.files {
            assert_eq!(
                std::fs::metadata(&f.path).unwrap().len(),
                f.bytes,
                "{}",
                f.path.display()
            );
        }
        assert_eq!(
            written.total_bytes(),
            written.files.iter().map(|f| f.bytes).sum::<u64>()
        );
    }

    #[test]
    fn test_two_writes_give_the_same_bytes() {
        let (scenario, outcome) = fixture(&Spec::small());
        let (a, b) = (tempdir("same-a"), tempdir("same-b"));
        write_all(&a, &scenario, &outcome).unwrap();
        write_all(&b, &scenario, &outcome).unwrap();
        for name in FILES {
            assert_eq!(
                std::fs::read(a.join(name)).unwrap(),
                std::fs::read(b.join(name)).unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn test_a_directory_that_cannot_be_made_is_an_error_naming_it() {
        let (scenario, outcome) = fixture(&Spec::small());
        let tmp = tempdir("not-a-dir");
        let file = tmp.join("file");
        std::fs::write(&file, b"x").unwrap();
        let dir = file.join("out");
        match write_all(&dir, &scenario, &outcome) {
            Err(e @ OutputError::CreateDir { .. }) => assert!(e.to_string().contains(&*dir.to_string_lossy())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_an_outcome_that_does_not_fit_the_scenario_writes_nothing() {
        let (scenario, mut outcome) = fixture(&Spec::small());
        outcome.samples[3].host = 40;
        let tmp = tempdir("mismatch");
        let dir = tmp.join("out");
        assert!(matches!(
            write_all(&dir, &scenario, &outcome),
            Err(OutputError::UnknownHost { host: 40, hosts: 4 })
        ));
        assert!(!dir.exists());
    }
}
