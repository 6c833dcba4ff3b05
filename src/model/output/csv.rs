//! The CSV files: migrations, and the RAM and network series (layouts in the module doc of
//! `output`).

use std::fmt::Display;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::model::ModelOutcome;

use super::topology::{fraction, Topology};
use super::{OutputError, WrittenFile};

/// The header of `migrations.csv`.
pub(crate) const MIGRATIONS_HEADER: &str = "index,vm,source,source_datacenter,target,target_datacenter,requested,\
algorithm,result,requested_at_s,start_s,end_s,total_s,downtime_start_s,downtime_s,bytes,rounds,\
predicted_algorithm,predicted_total_s,predicted_downtime_s,error,why";
/// The header of `ram_utilization.csv`.
pub(crate) const RAM_HEADER: &str = "t_s,scope,name,datacenter,ram_used_bytes,ram_capacity_bytes,ram_used_fraction";
/// The header of `network_utilization.csv`.
pub(crate) const NETWORK_HEADER: &str = "t_s,scope,name,datacenter,out_bytes_per_sec,in_bytes_per_sec";

/// A CSV file being written, counting its bytes.
struct CsvFile<'p> {
    path: &'p Path,
    out: BufWriter<File>,
    bytes: u64,
}

impl<'p> CsvFile<'p> {
    fn create(path: &'p Path, header: &str) -> Result<CsvFile<'p>, OutputError> {
        let file = File::create(path).map_err(|source| OutputError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        let mut csv = CsvFile {
            path,
            out: BufWriter::new(file),
            bytes: 0,
        };
        csv.line(header)?;
        Ok(csv)
    }

    fn line(&mut self, row: &str) -> Result<(), OutputError> {
        self.bytes += row.len() as u64 + 1;
        self.out
            .write_all(row.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| self.error(e))
    }

    fn finish(mut self) -> Result<WrittenFile, OutputError> {
        self.out.flush().map_err(|e| self.error(e))?;
        Ok(WrittenFile {
            path: self.path.to_path_buf(),
            bytes: self.bytes,
        })
    }

    fn error(&self, source: io::Error) -> OutputError {
        OutputError::Write {
            path: self.path.to_path_buf(),
            source,
        }
    }
}

/// A field, quoted when it holds a separator, a quote or a line break (RFC 4180).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// An optional value: empty when absent.
fn opt<T: Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// `migrations.csv`.
pub(crate) fn write_migrations(path: &Path, outcome: &ModelOutcome) -> Result<WrittenFile, OutputError> {
    let mut csv = CsvFile::create(path, MIGRATIONS_HEADER)?;
    for (i, m) in outcome.migrations.iter().enumerate() {
        let p = m.predicted.as_ref();
        let row = [
            i.to_string(),
            field(&m.vm),
            field(&m.source),
            field(&m.source_datacenter),
            field(&m.target),
            field(&m.target_datacenter),
            field(&m.requested),
            field(&m.algorithm),
            field(&m.result),
            m.requested_at_s.to_string(),
            m.start_s.to_string(),
            m.end_s.to_string(),
            m.total_s.to_string(),
            opt(m.downtime_start_s),
            m.downtime_s.to_string(),
            m.bytes.to_string(),
            m.rounds.to_string(),
            field(&opt(p.map(|p| &p.algorithm))),
            opt(p.map(|p| p.total_s)),
            opt(p.map(|p| p.downtime_s)),
            field(&opt(m.error.as_ref())),
            field(&m.why.join("; ")),
        ];
        csv.line(&row.join(","))?;
    }
    csv.finish()
}

/// `ram_utilization.csv` and `network_utilization.csv`, in one walk over the samples.
pub(crate) fn write_utilization(
    ram_path: &Path,
    net_path: &Path,
    topology: &Topology<'_>,
    outcome: &ModelOutcome,
) -> Result<[WrittenFile; 2], OutputError> {
    let scenario = topology.scenario;
    let mut ram = CsvFile::create(ram_path, RAM_HEADER)?;
    let mut net = CsvFile::create(net_path, NETWORK_HEADER)?;
    let dc_names: Vec<String> = scenario.datacenters.iter().map(|d| field(&d.name)).collect();
    let host_names: Vec<String> = scenario.hosts.iter().map(|h| field(&h.name)).collect();
    topology.sweep(&outcome.samples, |t, state| {
        for (d, totals) in topology.dc_totals(state).iter().enumerate() {
            let (name, cap) = (&dc_names[d], topology.dc_ram_bytes[d]);
            let used = totals.ram_used_bytes;
            ram.line(&format!(
                "{t},datacenter,{name},{name},{used},{cap},{:.6}",
                fraction(used, cap)
            ))?;
            let (o, i) = (totals.net_out_bytes_per_sec, totals.net_in_bytes_per_sec);
            net.line(&format!("{t},datacenter,{name},{name},{o},{i}"))?;
        }
        for (h, host) in scenario.hosts.iter().enumerate() {
            let (name, dc) = (&host_names[h], &dc_names[host.datacenter]);
            let (used, cap) = (state.ram_used_bytes[h], host.ram_bytes);
            ram.line(&format!("{t},host,{name},{dc},{used},{cap},{:.6}", fraction(used, cap)))?;
            let (o, i) = (state.net_out_bytes_per_sec[h], state.net_in_bytes_per_sec[h]);
            net.line(&format!("{t},host,{name},{dc},{o},{i}"))?;
        }
        Ok(())
    })?;
    Ok([ram.finish()?, net.finish()?])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::fixture::{fixture, tempdir, Spec, HOST_RAM, VM_RAM};
    use super::*;

    /// A CSV this module wrote, as its header and rows of fields (no field here is quoted).
    fn read(path: &Path) -> (String, Vec<Vec<String>>) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        let header = lines.next().unwrap().to_string();
        let rows = lines.map(|l| l.split(',').map(str::to_string).collect()).collect();
        (header, rows)
    }

    fn written(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (scenario, outcome) = fixture(&Spec::small());
        let topo = Topology::new(&scenario, &outcome).unwrap();
        let (r, n) = (dir.join("ram.csv"), dir.join("net.csv"));
        let files = write_utilization(&r, &n, &topo, &outcome).unwrap();
        assert_eq!(files[0].bytes, std::fs::metadata(&r).unwrap().len());
        assert_eq!(files[1].bytes, std::fs::metadata(&n).unwrap().len());
        (r, n)
    }

    #[test]
    fn test_field_quotes_only_what_needs_it() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn test_migrations_csv_has_the_header_and_a_row_per_migration() {
        let dir = tempdir("migrations");
        let (_, outcome) = fixture(&Spec::small());
        let path = dir.join("m.csv");
        write_migrations(&path, &outcome).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], MIGRATIONS_HEADER);
        assert_eq!(lines.len(), 1 + outcome.migrations.len());
        let columns = MIGRATIONS_HEADER.split(',').count();
        let first: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(first.len(), columns, "{}", lines[1]);
        assert_eq!(
            &first[..9],
            [
                "0",
                "vm1",
                "dc1-host1",
                "datacenter1",
                "dc2-host1",
                "datacenter2",
                "auto",
                "precopy",
                "completed"
            ]
        );
        assert_eq!(first[15], (VM_RAM + VM_RAM / 5).to_string());
        assert_eq!(first[21], "auto: precopy predicted fastest; dirty rate under bandwidth");
        // Migration 1 has no prediction; those fields are empty, not "None".
        let second: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(&second[17..20], ["", "", ""]);
    }

    #[test]
    fn test_utilization_csvs_have_the_headers_and_a_row_per_instant_and_place() {
        let dir = tempdir("util-rows");
        let (r, n) = written(&dir);
        let (scenario, outcome) = fixture(&Spec::small());
        let places = scenario.datacenters.len() + scenario.hosts.len();
        let instants = outcome.samples.len() / scenario.hosts.len();
        for (path, header) in [(&r, RAM_HEADER), (&n, NETWORK_HEADER)] {
            let (h, rows) = read(path);
            assert_eq!(h, header);
            assert_eq!(rows.len(), instants * places);
            assert!(rows.iter().all(|row| row.len() == header.split(',').count()));
        }
        let (_, rows) = read(&r);
        assert_eq!(
            &rows[0][..6],
            [
                "0",
                "datacenter",
                "datacenter1",
                "datacenter1",
                (5 * VM_RAM).to_string().as_str(),
                (2 * HOST_RAM).to_string().as_str()
            ]
        );
        assert_eq!(&rows[2][1..4], ["host", "dc1-host1", "datacenter1"]);
    }

    #[test]
    fn test_datacenter_rows_are_the_sums_of_their_hosts() {
        let dir = tempdir("util-sums");
        let (r, n) = written(&dir);
        for (path, columns) in [(&r, vec![4usize, 5]), (&n, vec![4, 5])] {
            let (_, rows) = read(path);
            // (time, datacenter) -> (the datacenter's row, the sum of its hosts' rows)
            let mut sums: BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            for row in &rows {
                let values: Vec<f64> = columns.iter().map(|&c| row[c].parse().unwrap()).collect();
                let entry = sums
                    .entry((row[0].clone(), row[3].clone()))
                    .or_insert((vec![], vec![0.0; columns.len()]));
                if row[1] == "datacenter" {
                    entry.0 = values;
                } else {
                    entry.1.iter_mut().zip(values).for_each(|(s, v)| *s += v);
                }
            }
            let moving = sums.values().filter(|(dc, _)| dc.iter().any(|&v| v > 0.0)).count();
            assert!(moving > 0);
            for ((t, dc), (own, hosts)) in sums {
                for (a, b) in own.iter().zip(&hosts) {
                    assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{t} {dc}: {a} != {b}");
                }
            }
        }
    }

    #[test]
    fn test_fractions_are_used_over_capacity() {
        let dir = tempdir("util-fraction");
        let (r, _) = written(&dir);
        let (_, rows) = read(&r);
        for row in rows {
            let (used, cap, f): (f64, f64, f64) = (
                row[4].parse().unwrap(),
                row[5].parse().unwrap(),
                row[6].parse().unwrap(),
            );
            assert!((used / cap - f).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn test_unwritable_path_is_a_write_error_naming_it() {
        let (_, outcome) = fixture(&Spec::small());
        let path = Path::new("/nonexistent-dir-of-migratory/m.csv");
        match write_migrations(path, &outcome) {
            Err(OutputError::Write { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
    }
}
