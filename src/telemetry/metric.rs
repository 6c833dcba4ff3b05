//! Metric names (prefix `migratory_`, base units in the name).

/// Counter: finished migrations, by `algorithm`, `result` and `priority`.
pub const MIGRATIONS_TOTAL: &str = "migratory_migrations_total";
/// Counter: pages sent, by `kind` (normal, zero, retransmitted, pulled).
pub const PAGES_SENT_TOTAL: &str = "migratory_pages_sent_total";
/// Counter: bytes put on links by migrations (page payloads and headers).
pub const BYTES_SENT_TOTAL: &str = "migratory_bytes_sent_total";
/// Counter: pages sent encoded, by `encoding` (lz4, xbzrle); they are counted by kind in
/// [`PAGES_SENT_TOTAL`] too.
pub const PAGES_ENCODED_TOTAL: &str = "migratory_pages_encoded_total";
/// Counter: page bytes page compression kept off links (page size minus encoding, summed).
pub const COMPRESSION_SAVED_BYTES_TOTAL: &str = "migratory_compression_saved_bytes_total";
/// Counter: post-copy faults taken by target guests.
pub const POSTCOPY_FAULTS_TOTAL: &str = "migratory_postcopy_faults_total";
/// Counter: injected faults, by `kind`.
pub const FAULTS_INJECTED_TOTAL: &str = "migratory_faults_injected_total";
/// Counter: migrations that had a deadline for their total time, by `result` (met, missed);
/// a migration that did not complete missed its deadline.
pub const DEADLINES_TOTAL: &str = "migratory_deadlines_total";
/// Counter: frames refused on TCP links because their MAC did not verify (changed, replayed,
/// reordered, or not from the peer that proved the cluster key); each one closes its link.
pub const LINK_FRAMES_REJECTED_TOTAL: &str = "migratory_link_frames_rejected_total";
/// Counter: network announce frames sent by targets after activation, by `kind` (rarp, garp).
pub const ANNOUNCE_FRAMES_TOTAL: &str = "migratory_announce_frames_total";
/// Counter: migrations to and from QEMU, by `direction` (to-qemu, from-qemu) and `result`
/// (completed, failed).
pub const QEMU_MIGRATIONS_TOTAL: &str = "migratory_qemu_migrations_total";
/// Histogram: duration of each stage, by `stage` and `algorithm`.
pub const STAGE_DURATION_SECONDS: &str = "migratory_stage_duration_seconds";
/// Histogram: downtime (pause on the source to resume on the target), by `algorithm` and
/// `priority`.
pub const DOWNTIME_SECONDS: &str = "migratory_downtime_seconds";
/// Histogram: total migration time, by `algorithm` and `priority`.
pub const TOTAL_TIME_SECONDS: &str = "migratory_total_time_seconds";
/// Histogram: pre-copy rounds per migration.
pub const PRECOPY_ROUNDS: &str = "migratory_precopy_rounds";
/// Histogram: how long a post-copy fault waited for its page.
pub const POSTCOPY_FAULT_LATENCY_SECONDS: &str = "migratory_postcopy_fault_latency_seconds";
/// Gauge: migrations running now.
pub const MIGRATIONS_IN_PROGRESS: &str = "migratory_migrations_in_progress";
/// Gauge: pages still to send, summed over running migrations.
pub const REMAINING_PAGES: &str = "migratory_remaining_pages";
/// Gauge: measured dirty rate of the last round.
pub const DIRTY_RATE_PAGES_PER_SECOND: &str = "migratory_dirty_rate_pages_per_second";
/// Gauge: measured link throughput of the last round.
pub const LINK_THROUGHPUT_BYTES_PER_SECOND: &str = "migratory_link_throughput_bytes_per_second";
/// Gauge: downtime the policy expects if it stopped now.
pub const EXPECTED_DOWNTIME_SECONDS: &str = "migratory_expected_downtime_seconds";

/// Values of the `direction` label of [`QEMU_MIGRATIONS_TOTAL`].
pub const QEMU_DIRECTIONS: [&str; 2] = ["to-qemu", "from-qemu"];

/// Values of the `algorithm` label: the algorithms' names (`protocol::Algorithm::name`, whose
/// tests check that the two agree).
pub const ALGORITHMS: [&str; 6] = ["stop-and-copy", "precopy", "postcopy", "hybrid", "auto", "random"];

/// Values of the `kind` label of [`PAGES_SENT_TOTAL`].
pub const PAGE_KINDS: [&str; 4] = ["normal", "zero", "retransmitted", "pulled"];

/// Values of the `encoding` label of [`PAGES_ENCODED_TOTAL`].
pub const ENCODINGS: [&str; 2] = ["lz4", "xbzrle"];

/// Values of the `kind` label of [`FAULTS_INJECTED_TOTAL`]: the fault kinds' names
/// (`engine::FaultKind::name`, whose agreement with this list a test below checks).
pub const FAULT_KINDS: [&str; 11] = [
    "link-drop",
    "corrupt-frame",
    "cancel",
    "source-pause-error",
    "refuse-reservation",
    "fail-state-load",
    "target-crash",
    "link-stall",
    "bandwidth-collapse",
    "postcopy-link-loss",
    "lose-dirty-page",
];

/// Values of the `result` label of [`DEADLINES_TOTAL`].
pub mod deadline {
    /// The migration completed within its deadline.
    pub const MET: &str = "met";
    /// It took longer, or did not complete.
    pub const MISSED: &str = "missed";
    /// Every value, to register the series at zero.
    pub const ALL: [&str; 2] = [MET, MISSED];
}

/// Values of the `result` label of [`MIGRATIONS_TOTAL`], one per way a migration ends. They
/// live here, below the engine, so that registering the series needs nothing from above; the
/// engine's `Outcome::label` returns them.
pub mod result {
    /// The VM runs on the target.
    pub const COMPLETED: &str = "completed";
    /// The user cancelled before commitment.
    pub const CANCELLED: &str = "cancelled";
    /// The policy or the peer aborted before commitment.
    pub const ABORTED: &str = "aborted";
    /// Something failed.
    pub const FAILED: &str = "failed";
    /// Completed after a post-copy recovery.
    pub const RECOVERED: &str = "recovered";
    /// Every value, to register the series at zero.
    pub const ALL: [&str; 5] = [COMPLETED, CANCELLED, ABORTED, FAILED, RECOVERED];
}

/// Values of the `priority` label of [`MIGRATIONS_TOTAL`], [`DOWNTIME_SECONDS`] and
/// [`TOTAL_TIME_SECONDS`]: the migration's class (`engine::Priority::name` returns them; three
/// values keep the series few).
pub mod priority {
    /// Weight 1.
    pub const LOW: &str = "low";
    /// Weight 2, the default.
    pub const NORMAL: &str = "normal";
    /// Weight 4.
    pub const HIGH: &str = "high";
    /// Every value, lowest first, to register the series at zero.
    pub const ALL: [&str; 3] = [LOW, NORMAL, HIGH];
}

/// Values of the `kind` label of [`ANNOUNCE_FRAMES_TOTAL`] (`announce::FrameKind::label`).
pub mod announce_kind {
    /// A RARP request reverse.
    pub const RARP: &str = "rarp";
    /// A gratuitous ARP.
    pub const GARP: &str = "garp";
    /// Every value, to register the series at zero.
    pub const ALL: [&str; 2] = [RARP, GARP];
}

/// Histogram buckets for durations, in seconds: migration timescales, from 100 µs (a post-copy
/// fault, a fast stage) to 5 minutes (a large VM over a slow link).
pub const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Histogram buckets for pre-copy rounds.
pub const ROUND_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 30.0, 50.0];

/// Records every counter series the engine can produce at zero, every label value a dashboard
/// may query included, so a scrape shows them from the start (a panel shows 0, not "no data")
/// and `increase()` counts a series' first event.
pub fn register_zeroes() {
    for algorithm in ALGORITHMS {
        for outcome in result::ALL {
            for class in priority::ALL {
                metrics::counter!(MIGRATIONS_TOTAL, "algorithm" => algorithm, "result" => outcome, "priority" => class)
                    .increment(0);
            }
        }
    }
    for kind in PAGE_KINDS {
        metrics::counter!(PAGES_SENT_TOTAL, "kind" => kind).increment(0);
    }
    metrics::counter!(BYTES_SENT_TOTAL).increment(0);
    for encoding in ENCODINGS {
        metrics::counter!(PAGES_ENCODED_TOTAL, "encoding" => encoding).increment(0);
    }
    metrics::counter!(COMPRESSION_SAVED_BYTES_TOTAL).increment(0);
    metrics::counter!(POSTCOPY_FAULTS_TOTAL).increment(0);
    for kind in FAULT_KINDS {
        metrics::counter!(FAULTS_INJECTED_TOTAL, "kind" => kind).increment(0);
    }
    for outcome in deadline::ALL {
        metrics::counter!(DEADLINES_TOTAL, "result" => outcome).increment(0);
    }
    metrics::counter!(LINK_FRAMES_REJECTED_TOTAL).increment(0);
    for kind in announce_kind::ALL {
        metrics::counter!(ANNOUNCE_FRAMES_TOTAL, "kind" => kind).increment(0);
    }
    for direction in QEMU_DIRECTIONS {
        for outcome in [result::COMPLETED, result::FAILED] {
            metrics::counter!(QEMU_MIGRATIONS_TOTAL, "direction" => direction, "result" => outcome).increment(0);
        }
    }
    metrics::gauge!(MIGRATIONS_IN_PROGRESS).increment(0.0);
    metrics::gauge!(REMAINING_PAGES).increment(0.0);
}

/// Registers units and help texts with whatever recorder is installed.
pub fn describe_all() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        MIGRATIONS_TOTAL,
        "Finished migrations by algorithm, result and priority"
    );
    describe_counter!(PAGES_SENT_TOTAL, "Pages sent by kind");
    describe_counter!(
        QEMU_MIGRATIONS_TOTAL,
        "Migrations to and from QEMU by direction and result"
    );
    describe_counter!(BYTES_SENT_TOTAL, Unit::Bytes, "Bytes sent by migrations");
    describe_counter!(
        PAGES_ENCODED_TOTAL,
        "Pages sent LZ4-compressed or as XBZRLE deltas, by encoding"
    );
    describe_counter!(
        COMPRESSION_SAVED_BYTES_TOTAL,
        Unit::Bytes,
        "Page bytes compression kept off links"
    );
    describe_counter!(POSTCOPY_FAULTS_TOTAL, "Post-copy faults taken on targets");
    describe_counter!(FAULTS_INJECTED_TOTAL, "Injected faults by kind");
    describe_counter!(
        DEADLINES_TOTAL,
        "Migrations with a deadline for total time, by whether they met it"
    );
    describe_counter!(
        LINK_FRAMES_REJECTED_TOTAL,
        "Frames refused on TCP links for a MAC that did not verify"
    );
    describe_counter!(
        ANNOUNCE_FRAMES_TOTAL,
        "Announce frames (RARP, gratuitous ARP) sent after activation, by kind"
    );
    describe_histogram!(
        STAGE_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of each migration stage"
    );
    describe_histogram!(
        DOWNTIME_SECONDS,
        Unit::Seconds,
        "Pause on the source to resume on the target"
    );
    describe_histogram!(TOTAL_TIME_SECONDS, Unit::Seconds, "Total migration time");
    describe_histogram!(PRECOPY_ROUNDS, "Pre-copy rounds per migration");
    describe_histogram!(
        POSTCOPY_FAULT_LATENCY_SECONDS,
        Unit::Seconds,
        "Wait of a post-copy fault"
    );
    describe_gauge!(MIGRATIONS_IN_PROGRESS, "Migrations running now");
    describe_gauge!(REMAINING_PAGES, "Pages still to send");
    describe_gauge!(DIRTY_RATE_PAGES_PER_SECOND, "Dirty rate measured in the last round");
    describe_gauge!(LINK_THROUGHPUT_BYTES_PER_SECOND, "Link throughput of the last round");
    describe_gauge!(
        EXPECTED_DOWNTIME_SECONDS,
        Unit::Seconds,
        "Downtime expected if the migration stopped now"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    /// What a recorder installed a moment ago shows, before any migration.
    fn fresh_exposition() -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_all();
            register_zeroes();
        });
        handle.render()
    }

    /// The counters (`migratory_*_total`) that `dashboards/*.json` query.
    fn dashboard_counters() -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("dashboards/") {
            let path = entry.expect("a dashboard entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a dashboard");
            for (at, _) in text.match_indices("migratory_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.ends_with("_total") && !out.contains(&name) {
                    out.push(name);
                }
            }
        }
        out
    }

    #[test]
    fn test_a_fresh_recorder_shows_every_counter_label_value_at_zero() {
        let text = fresh_exposition();
        let mut expected = Vec::new();
        for a in ALGORITHMS {
            for r in result::ALL {
                for p in priority::ALL {
                    expected.push(format!(
                        "{MIGRATIONS_TOTAL}{{algorithm=\"{a}\",result=\"{r}\",priority=\"{p}\"}} 0"
                    ));
                }
            }
        }
        for k in announce_kind::ALL {
            expected.push(format!("{ANNOUNCE_FRAMES_TOTAL}{{kind=\"{k}\"}} 0"));
        }
        for k in PAGE_KINDS {
            expected.push(format!("{PAGES_SENT_TOTAL}{{kind=\"{k}\"}} 0"));
        }
        for e in ENCODINGS {
            expected.push(format!("{PAGES_ENCODED_TOTAL}{{encoding=\"{e}\"}} 0"));
        }
        for k in FAULT_KINDS {
            expected.push(format!("{FAULTS_INJECTED_TOTAL}{{kind=\"{k}\"}} 0"));
        }
        for r in deadline::ALL {
            expected.push(format!("{DEADLINES_TOTAL}{{result=\"{r}\"}} 0"));
        }
        for c in [
            BYTES_SENT_TOTAL,
            COMPRESSION_SAVED_BYTES_TOTAL,
            POSTCOPY_FAULTS_TOTAL,
            LINK_FRAMES_REJECTED_TOTAL,
        ] {
            expected.push(format!("{c} 0"));
        }
        let lines: Vec<&str> = text.lines().collect();
        for e in &expected {
            assert!(lines.contains(&e.as_str()), "missing `{e}` in:\n{text}");
        }
    }

    #[test]
    fn test_every_counter_a_dashboard_queries_exists_before_its_first_event() {
        let text = fresh_exposition();
        let counters = dashboard_counters();
        assert!(counters.len() >= 5, "found only {counters:?} in dashboards/");
        for c in counters {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{c}{{")) || l.starts_with(&format!("{c} "))),
                "{c} is queried by a dashboard but not registered at zero"
            );
        }
    }

    #[test]
    fn test_fault_kind_names_are_the_metric_labels() {
        assert_eq!(
            crate::engine::FaultKind::ALL.map(crate::engine::FaultKind::name),
            FAULT_KINDS
        );
    }
}
