//! Reading a scenario file: TOML with units, every name resolved, every error on a line.
//!
//! `examples/scenarios/two-datacenters.toml` explains each key in place, with its default;
//! `examples/scenarios/evacuate-10k.toml` shows groups at the scale of a datacenter. This is
//! the compact reference.
//!
//! # Values
//! | kind | written as | examples |
//! | --- | --- | --- |
//! | size | a string, binary or decimal units | `"4GiB"`, `"512MiB"`, `"100MB"` |
//! | rate, bandwidth | a string, bits or bytes per second (`/s` optional) | `"10Gbit"`, `"1Gbit/s"`, `"1Gbps"`, `"100MB/s"`, `"50MiB/s"` |
//! | duration, time | a string: `ns`, `us`, `ms`, `s`, `m` (or `min`), `h` | `"20ms"`, `"1.5s"`, `"10m"` |
//! | count | a bare integer | `8` |
//!
//! A number without a unit is refused where a unit is due, and so is `"Mb"` (bits to some,
//! bytes to others). A bandwidth must be above zero; a dirty rate may be zero.
//!
//! # Keys
//! Defaults in parentheses; keys without one are required.
//!
//! * Top level: `name`, `seed` (0), `sample_every` (`"1s"`), `until` (none: the run ends when
//!   the last event and migration are done).
//! * `[[datacenter]]`: `name`.
//! * `[[host]]`: `name`, `datacenter`, `ram`, `cores`, `nic`, `vmm` (a free word: `"kvm"`,
//!   `"xen"`, ...), `layout` (`"xen-hvm"` for a vmm that starts with `xen`, else `"kvm"`),
//!   `memory_budget` (= `ram`), `bandwidth_budget` (= `nic`), `max_outgoing` (2),
//!   `max_incoming` (2), `algorithms` (all: `stop-and-copy`, `precopy`, `postcopy`, `hybrid`,
//!   `auto`).
//! * `[[host_group]]`: `count`, `prefix`, and the keys of a host but `name`; the hosts are
//!   named `<prefix>-0001`, `<prefix>-0002`, ...
//! * `[[link]]`: `a`, `b` (datacenter names), `bandwidth`, `latency` (`"0s"`). Hosts of one
//!   datacenter meet at their NICs' speed; two datacenters without a link cannot migrate
//!   between each other.
//! * `[[vm]]`: `id`, `ram`, `vcpus`, `vmm`, `dirty_rate`, `host` (none: the VM waits for a
//!   `deploy` event), `working_set` (= `ram`), `pattern` (`"hot-set"`; or `"uniform"`,
//!   `"sequential"`), `rate_changes` (none; a list of `{ at, dirty_rate }`), `image_size`
//!   (`"0B"`), `bandwidth` (none).
//! * `[[vm_group]]`: `count`, `prefix`, the keys of a VM but `id` and `host`, and `place`
//!   (none: not running) = `"round-robin"` with `datacenter` (its hosts) or `host_prefix` (the
//!   hosts whose names start so).
//! * `[[event]]`: `at` and exactly one of
//!   `create = { vm }`, `deploy = { vm, host }`,
//!   `migrate = { vm, to_host | to_datacenter, algorithm ("auto"), bandwidth, downtime_limit }`,
//!   `evacuate = { host, algorithm, bandwidth, downtime_limit }`,
//!   `consolidate = { datacenter, algorithm, bandwidth, downtime_limit }`,
//!   each of the three also with the QoS keys `priority` (`"low"`, `"normal"` (the default),
//!   `"high"`) and `min_bandwidth` (a rate; none),
//!   `fail_host = { host }`, `fail_link = { a, b }` (datacenter names).
//!
//! # How a file becomes a [`Scenario`]
//! * Hosts, then VMs, are numbered in the order the file lists them, a group standing for
//!   its members where it stands.
//! * VMs that run from time 0 are placed in that order against their hosts' memory budgets: a
//!   `host` that lacks room, or a group whose next VM fits on none of its hosts, is an error.
//!   Round-robin goes on from the host after the last one used and skips full hosts.
//! * A `dirty_rate` may be a range, `["10MB/s", "100MB/s"]`, from which each VM draws its own
//!   rate uniformly. The draws come from `seed` alone and each entry has its own stream, so a
//!   file gives the same scenario every time, and editing one group leaves the draws of the
//!   others as they were. `--seed` at run time does not redraw them.
//! * Events are sorted by time; events at the same time keep the file's order.
//! * A VM larger than every host, an unknown or doubly defined name, a migration with both or
//!   neither destination: each is refused with the line it is on.

mod raw;
mod resolve;
mod units;
mod vms;

use toml::Spanned;

use super::Scenario;

/// A scenario that does not parse or does not hold together; the message names the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {detail}")]
pub struct ScenarioError {
    /// 1-based line of the scenario file (0 when no line applies).
    pub line: usize,
    /// What is wrong.
    pub detail: String,
}

/// Parses a scenario file.
pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
    let lines = Lines::new(text);
    let raw = toml::from_str(text).map_err(|e: toml::de::Error| ScenarioError {
        line: e.span().map_or(0, |span| lines.line(span.start)),
        detail: e.message().trim_end().to_owned(),
    })?;
    resolve::resolve(raw, &lines)
}

/// Where each line of the file starts, to turn toml's byte spans into line numbers.
#[derive(Debug)]
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { starts }
    }

    /// The 1-based line holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }

    /// The line a value starts on.
    fn of<T>(&self, value: &Spanned<T>) -> usize {
        self.line(value.span().start)
    }

    /// An error on the line of `value`.
    fn error<T>(&self, value: &Spanned<T>, detail: impl Into<String>) -> ScenarioError {
        ScenarioError {
            line: self.of(value),
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests;
