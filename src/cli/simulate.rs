//! `migratory simulate SCENARIO.toml`: runs a datacenter scenario through the model in
//! virtual time and reports it: the text summary (with wall time and events per second) on
//! stdout, the files of `--out DIR`, the summary JSON of `--json FILE`.
//!
//! `--live` also runs the scenario against real daemons (one per host, on loopback) and prints
//! them side by side; `--out` then holds the live run's files too, under `live/`.
//! `--calibrate FILE` and `--validate [--quick]` measure the model against real migrations on
//! this machine (`crate::bench::validate`).
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
    #[arg(value_name = "SCENARIO", required_unless_present_any = ["validate", "calibrate"])]
    pub scenario: Option<PathBuf>,
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
    /// The model's costs from a `--calibrate` file (its `tcp x1` entry: daemons migrate over
    /// TCP) instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    pub params: Option<PathBuf>,
    /// Also run the scenario against real daemons (one per host, on loopback; small scenarios
    /// only) and print it beside the model's prediction.
    #[arg(long)]
    pub live: bool,
    /// With `--live`: wall seconds per scenario second between events (migrations run at
    /// their own speed).
    #[arg(long, value_name = "X", default_value_t = 1.0, requires = "live")]
    pub time_scale: f64,
    /// Run real migrations on this machine, predict each with the model calibrated in the same
    /// run, and print the errors beside CloudSim's formula.
    #[arg(long, conflicts_with_all = ["scenario", "calibrate", "live"])]
    pub validate: bool,
    /// With `--validate`: the representative subset (CI runs it).
    #[arg(long, requires = "validate")]
    pub quick: bool,
    /// Fit the model's costs on this machine and write them to FILE (for `--params`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["scenario", "live"])]
    pub calibrate: Option<PathBuf>,
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
    /// The `--params` file could not be read.
    #[error("cannot use the costs in {}: {detail}", path.display())]
    Params {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The live run could not be made.
    #[error("live run of {}", path.display())]
    Live {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::live::LiveError,
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
    if let Some(file) = &args.calibrate {
        return crate::bench::validate::calibrate(file);
    }
    if args.validate {
        return crate::bench::validate::validate(args.quick, args.json.as_deref());
    }
    match simulate(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", super::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The model's costs: the `tcp x1` entry of a `--calibrate` file, or a bare `ModelParams`.
fn params(path: &Path) -> Result<model::ModelParams, SimulateError> {
    let bad = |detail: String| SimulateError::Params {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    if let Ok(all) = serde_json::from_str::<Vec<crate::bench::validate::Calibration>>(&text) {
        return all
            .into_iter()
            .find(|c| c.via.starts_with("tcp"))
            .map(|c| c.params)
            .ok_or_else(|| bad("no `tcp x1` calibration in it".into()));
    }
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

fn simulate(args: &SimulateArgs) -> Result<(), SimulateError> {
    let Some(path) = &args.scenario else {
        return Err(SimulateError::Params {
            path: PathBuf::new(),
            detail: "no scenario given".into(),
        });
    };
    let text = std::fs::read_to_string(path).map_err(|source| SimulateError::Read {
        path: path.clone(),
        source,
    })?;
    let scenario = model::parse(&text).map_err(|error| SimulateError::Scenario {
        path: path.clone(),
        error,
    })?;
    let options = model::RunOptions {
        seed: args.seed,
        params: match &args.params {
            Some(p) => params(p)?,
            None => model::ModelParams::default(),
        },
        check: false,
    };
    let started = Instant::now();
    let outcome = model::run_with(&scenario, options).map_err(|source| SimulateError::Model {
        path: path.clone(),
        source,
    })?;
    report(args, &scenario, &outcome, started.elapsed())?;
    if args.live {
        let live_opts = crate::live::LiveOptions {
            time_scale: args.time_scale,
            ..crate::live::LiveOptions::default()
        };
        let live = crate::live::run_live(&scenario, &live_opts).map_err(|source| SimulateError::Live {
            path: path.clone(),
            source,
        })?;
        let json_on_stdout = args.json.as_deref() == Some(Path::new("-"));
        say(
            json_on_stdout,
            &format!("\nmodel vs live\n{}", crate::live::compare(&outcome, &live)),
        )?;
        if let Some(dir) = &args.out {
            let dir = dir.join("live");
            let written = output::write_all(&dir, &scenario, &live)?;
            say(json_on_stdout, &files_line(&dir, &written))?;
        }
    }
    Ok(())
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
            notes: Vec::new(),
            events_processed: 0,
        };
        (scenario, outcome)
    }

    #[test]
    fn test_arguments_parse() {
        let a = parse(&["s.toml", "--out", "dir", "--json", "-", "--seed", "9"]).unwrap();
        assert_eq!(a.scenario, Some(PathBuf::from("s.toml")));
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
