//! `migratory simulate SCENARIO.toml`: runs a datacenter scenario through the model in
//! virtual time and reports it: the text summary (with wall time and events per second) on
//! stdout, the files of `--out DIR`, the summary JSON of `--json FILE`.
//!
//! With `--json -` the JSON is the only thing on stdout, and the text summary moves to stderr,
//! so that a script can pipe it. Failures are one `migratory: ...` line on stderr and a
//! failure status; a scenario error names the file and line (`FILE:LINE: what`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use migratory::model::output::{self, OutputError, Written};
use migratory::model::{self, ModelError, ModelOutcome, Scenario, ScenarioError};
use migratory::units::ByteSize;

/// Arguments of `migratory simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The scenario file (TOML).
    #[arg(value_name = "SCENARIO")]
    pub scenario: PathBuf,
    /// Write summary.json, the CSV series and the plots (SVG and PNG) into DIR, creating it
    /// if missing.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also write the summary JSON to FILE; `-` for stdout (the text summary then goes to
    /// stderr).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seed of every random choice, instead of the scenario's.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// Why a simulation did not get through.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The scenario file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The scenario does not parse or does not hold together.
    #[error("{}", scenario_place(path, error))]
    Scenario {
        /// The file.
        path: PathBuf,
        /// What and where.
        error: ScenarioError,
    },
    /// The model could not run it.
    #[error("cannot simulate {}", path.display())]
    Model {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ModelError,
    },
    /// The output files could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The JSON file could not be written.
    #[error("cannot write {}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Standard output or error went away (a closed pipe, say).
    #[error("cannot write the report")]
    Report(#[source] io::Error),
}

/// `FILE:LINE: what`, as compilers write it; without `LINE:` when no line applies.
fn scenario_place(path: &Path, error: &ScenarioError) -> String {
    match error.line {
        0 => format!("{}: {}", path.display(), error.detail),
        line => format!("{}:{line}: {}", path.display(), error.detail),
    }
}

/// Runs the command.
pub fn run(args: SimulateArgs) -> ExitCode {
    match simulate(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", super::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn simulate(args: &SimulateArgs) -> Result<(), SimulateError> {
    let path = &args.scenario;
    let text = std::fs::read_to_string(path).map_err(|source| SimulateError::Read {
        path: path.clone(),
        source,
    })?;
    let scenario = model::parse(&text).map_err(|error| SimulateError::Scenario {
        path: path.clone(),
        error,
    })?;
    let started = Instant::now();
    let outcome = model::run(&scenario, args.seed).map_err(|source| SimulateError::Model {
        path: path.clone(),
        source,
    })?;
    report(args, &scenario, &outcome, started.elapsed())
}

/// Everything after the run: the summary, the files, the JSON.
fn report(
    args: &SimulateArgs,
    scenario: &Scenario,
    outcome: &ModelOutcome,
    wall: Duration,
) -> Result<(), SimulateError> {
    let json_on_stdout = args.json.as_deref() == Some(Path::new("-"));
    let mut text = output::text_summary(scenario, outcome);
    text.push_str(&wall_line(wall, outcome.events_processed));
    // Printed before the files are written, so a run whose files fail is still reported.
    say(json_on_stdout, &text)?;
    if let Some(dir) = &args.out {
        let written = output::write_all(dir, scenario, outcome)?;
        say(json_on_stdout, &files_line(dir, &written))?;
    }
    if let Some(file) = &args.json {
        let json = output::summary_json(scenario, outcome);
        if json_on_stdout {
            let mut out = io::stdout().lock();
            out.write_all(json.as_bytes())
                .and_then(|()| out.flush())
                .map_err(SimulateError::Report)?;
        } else {
            std::fs::write(file, json).map_err(|source| SimulateError::Json {
                path: file.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Writes `text` to stdout, or to stderr when stdout carries the JSON.
fn say(to_stderr: bool, text: &str) -> Result<(), SimulateError> {
    let written = if to_stderr {
        io::stderr().lock().write_all(text.as_bytes())
    } else {
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush())
    };
    written.map_err(SimulateError::Report)
}

fn wall_line(wall: Duration, events: u64) -> String {
    let secs = wall.as_secs_f64();
    let rate = if secs > 0.0 {
        format!("{:.0} events/s", events as f64 / secs)
    } else {
        "too fast to time".into()
    };
    format!("wall time   {secs:.3} s for the run, {rate}\n")
}

fn files_line(dir: &Path, written: &Written) -> String {
    format!(
        "outputs     {} files, {} in {}\n",
        written.files.len(),
        ByteSize(written.total_bytes()),
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(args: &[&str]) -> Result<SimulateArgs, clap::Error> {
        TestCli::try_parse_from(std::iter::once("simulate").chain(args.iter().copied())).map(|c| c.args)
    }

    /// A scenario with one datacenter and nothing in it, and the outcome of running it.
    fn empty_run() -> (Scenario, ModelOutcome) {
        let scenario = Scenario {
            name: "empty".into(),
            seed: 3,
            sample_every_s: 1.0,
            until_s: None,
            datacenters: vec![model::Datacenter { name: "dc".into() }],
            hosts: Vec::new(),
            links: Vec::new(),
            vms: Vec::new(),
            events: Vec::new(),
        };
        let outcome = ModelOutcome {
            scenario: "empty".into(),
            seed: 3,
            end_s: 0.0,
            migrations: Vec::new(),
            samples: Vec::new(),
            placements: Vec::new(),
            events_processed: 0,
        };
        (scenario, outcome)
    }

    #[test]
    fn test_arguments_parse() {
        let a = parse(&["s.toml", "--out", "dir", "--json", "-", "--seed", "9"]).unwrap();
        assert_eq!(a.scenario, PathBuf::from("s.toml"));
        assert_eq!(a.out, Some(PathBuf::from("dir")));
        assert_eq!(a.json, Some(PathBuf::from("-")));
        assert_eq!(a.seed, Some(9));
        assert!(parse(&[]).is_err(), "the scenario is required");
        assert!(parse(&["s.toml", "--seed", "-1"]).is_err());
    }

    #[test]
    fn test_scenario_errors_name_the_file_and_line() {
        let e = SimulateError::Scenario {
            path: "dc.toml".into(),
            error: ScenarioError {
                line: 12,
                detail: "unknown host `h9`".into(),
            },
        };
        assert_eq!(super::super::error_line(&e), "migratory: dc.toml:12: unknown host `h9`");
        let e = SimulateError::Scenario {
            path: "dc.toml".into(),
            error: ScenarioError {
                line: 0,
                detail: "no datacenters".into(),
            },
        };
        assert_eq!(e.to_string(), "dc.toml: no datacenters");
    }

    #[test]
    fn test_a_missing_file_is_one_line_naming_it() {
        let args = parse(&["/nonexistent/migratory/scenario.toml"]).unwrap();
        let e = simulate(&args).unwrap_err();
        let line = super::super::error_line(&e);
        assert!(
            line.starts_with("migratory: cannot read /nonexistent/migratory/scenario.toml: "),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn test_report_writes_the_files_and_the_json() {
        let dir = std::env::temp_dir().join(format!("migratory-simulate-{}-report", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("s.json");
        let out = dir.join("out");
        let args = parse(&[
            "s.toml",
            "--out",
            out.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .unwrap();
        let (scenario, outcome) = empty_run();
        report(&args, &scenario, &outcome, Duration::from_millis(5)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["scenario"], "empty");
        assert_eq!(
            std::fs::read_to_string(out.join("summary.json")).unwrap(),
            std::fs::read_to_string(&json).unwrap()
        );
        for f in [
            "migrations.csv",
            "ram_utilization.csv",
            "ram_datacenters.png",
            "migrations_timeline.svg",
        ] {
            assert!(out.join(f).exists(), "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_an_unwritable_json_file_is_an_error_naming_it() {
        let args = parse(&["s.toml", "--json", "/nonexistent/migratory/s.json"]).unwrap();
        let (scenario, outcome) = empty_run();
        let e = report(&args, &scenario, &outcome, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/migratory/s.json"), "{e}");
    }

    #[test]
    fn test_wall_line_gives_the_event_rate() {
        assert_eq!(
            wall_line(Duration::from_secs(2), 1000),
            "wall time   2.000 s for the run, 500 events/s\n"
        );
        assert!(wall_line(Duration::ZERO, 10).contains("too fast to time"));
    }
}
