//! Metric names and the one place that describes them.
//!
//! The library records through the `metrics` facade and never installs a recorder: an
//! embedding application (or the `migratory` binary) installs one, typically
//! `metrics-exporter-prometheus`. Labels are bounded: stage, algorithm, kind, result.

pub mod baseline;
pub mod metric;

pub use metric::{describe_all, register_zeroes};
