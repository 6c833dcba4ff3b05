//! A live progress line for people: stage, round, transferred and remaining, throughput and
//! expected downtime. Drawn on stderr, and only when stdout is a terminal, so pipes and
//! `--json` output stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// What the line shows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Current stage name.
    pub stage: Option<String>,
    /// Pre-copy round.
    pub round: u64,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// Pages still to send.
    pub remaining_pages: u64,
    /// Last measured throughput.
    pub throughput_bytes_per_sec: f64,
    /// Downtime expected if it stopped now.
    pub expected_downtime_s: f64,
}

/// The progress line, or nothing when stdout is not a terminal.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A progress line if stdout is a terminal.
    pub fn new() -> Self {
        if !std::io::stdout().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar: Some(bar) }
    }

    /// Redraws the line.
    pub fn show(&self, s: &Snapshot) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{:<12} round {:<3} sent {:>9.1} MiB  remaining {:>8} pages  {:>8.1} MB/s  expected downtime {:>7.1} ms",
                s.stage.as_deref().unwrap_or("starting"),
                s.round,
                s.transferred_bytes as f64 / (1 << 20) as f64,
                s.remaining_pages,
                s.throughput_bytes_per_sec / 1e6,
                s.expected_downtime_s * 1e3
            ));
        }
    }

    /// Prints a line above the progress line (or plainly on stderr without one).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
