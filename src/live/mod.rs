//! `simulate --live`: a scenario run against real daemons, one `migratory serve` child per
//! host on loopback, so that its outcome can be set beside the model's prediction. This is for
//! small scenarios (see [`check`] for the bounds); the model is for large ones.
//!
//! When to use what:
//! * [`run_live`] plays a scenario and returns a [`ModelOutcome`], the type the model returns,
//!   so the model's writers and plots draw it unchanged;
//! * [`compare`] prints the two outcomes side by side with relative errors.
//!
//! What a live run plays differently from the model, on purpose or by necessity:
//! * **Time.** Events fire at `at * time_scale` seconds of wall time; migrations themselves run
//!   at their real speed and are never scaled. Every time in the outcome (`requested_at_s`,
//!   `start_s`, samples' `t_s`, `end_s`) is on the run's wall clock from the first event.
//! * **Links.** Loopback has no latency (noted, not refused). An inter-datacenter link becomes
//!   a bandwidth cap on each migration crossing it, beside the migration's own cap and the
//!   VM's bandwidth; concurrent migrations on one link do not share its capacity. A host's
//!   bandwidth budget is its daemon's `--bandwidth-budget`, which they do share.
//! * **Refused:** more than 8 hosts, 16 VMs or 8 GiB of guest RAM; `consolidate` and
//!   `fail_link` events; hosts offering fewer than every algorithm; a dirty-rate change
//!   before the last event (one after it is noted and not played).
//! * **Host failure** is a SIGKILL of that host's daemon.
//! * **RAM samples** are the memory of the VMs a daemon lists (held copies included); an
//!   incoming migration's reservation counts only once the daemon lists the VM.
//! * `until` only drops the events after it: the run waits for the migrations it started (at
//!   most [`LiveOptions::max_wait`] after the last event).

// Until `migratory simulate --live` calls it, only this module's tests do.

mod check;
mod compare;
pub(crate) mod daemons;
pub(crate) mod http;
mod record;
mod replay;

use std::path::PathBuf;
use std::time::Duration;

use migratory::model::{ModelOutcome, Scenario};

pub use compare::compare;

/// How to run a scenario live.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The `migratory` executable that serves each host; `None`: this process's own.
    pub exe: Option<PathBuf>,
    /// Wall seconds per scenario second between events (0.1 plays a 30 s gap in 3 s). It never
    /// speeds up a migration.
    pub time_scale: f64,
    /// Sampling interval, wall seconds; `None`: the scenario's `sample_every`. Bounded to
    /// 0.1 to 10 s either way.
    pub sample_every_s: Option<f64>,
    /// How long to wait for running migrations after the last event before failing them.
    pub max_wait: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            exe: None,
            time_scale: 1.0,
            sample_every_s: None,
            max_wait: Duration::from_secs(600),
        }
    }
}

/// Why a live run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The scenario is too big to run live on one machine.
    #[error("too big to run live: {value} {what}, at most {limit}")]
    TooBig {
        /// What was counted.
        what: &'static str,
        /// How many the scenario has.
        value: u64,
        /// The bound.
        limit: u64,
    },
    /// The scenario uses something a live run cannot play.
    #[error("{}{feature} cannot run live: {why}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Unsupported {
        /// The scenario line, when one event is at fault.
        line: Option<usize>,
        /// The feature.
        feature: String,
        /// Why.
        why: String,
    },
    /// The options make no sense.
    #[error("invalid live option: {0}")]
    Options(String),
    /// The scratch files (cluster key, API token) could not be made.
    #[error("cannot prepare the daemons: {0}")]
    Setup(String),
    /// A daemon could not be started.
    #[error("cannot start the daemon of host {host} ({})", exe.display())]
    Spawn {
        /// The host.
        host: String,
        /// The executable.
        exe: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A daemon did not become ready.
    #[error("the daemon of host {host} did not start: {detail}")]
    NotReady {
        /// The host.
        host: String,
        /// What it said or did.
        detail: String,
    },
    /// A daemon refused the scenario's initial placement.
    #[error("host {host}")]
    Api {
        /// The host.
        host: String,
        /// The failed request.
        #[source]
        source: Box<http::HttpError>,
    },
}

/// Plays `scenario` against one real daemon per host and returns what happened, in the model's
/// terms. Every daemon is killed before this returns, whatever it returns.
pub fn run_live(scenario: &Scenario, opts: &LiveOptions) -> Result<ModelOutcome, LiveError> {
    if !(opts.time_scale.is_finite() && opts.time_scale > 0.0) {
        return Err(LiveError::Options(format!(
            "time scale {} is not a positive number",
            opts.time_scale
        )));
    }
    let notes = check::check(scenario)?;
    let exe = match &opts.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(|e| LiveError::Setup(format!("cannot find this executable: {e}")))?,
    };
    let cluster = daemons::Cluster::start(&exe, &scenario.hosts)?;
    let replay = replay::Replay::start(scenario, opts, cluster, notes)?;
    Ok(replay.run())
}

#[cfg(test)]
mod tests;
