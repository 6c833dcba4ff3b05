//! The fluid model of guest memory: how many distinct pages a guest dirties in a window, from
//! its write rate, its working set and where its writes fall. The set grows with the writes and
//! saturates at the working set, which is what makes pre-copy rounds shrink, stall or not.

use super::scenario::{WorkloadDef, WritePattern};
use crate::units::PAGE_SIZE;

/// Distinct pages touched by `writes` page writes spread uniformly over `pages` pages: the
/// expected coverage, `pages * (1 - e^(-writes/pages))`.
fn uniform(writes: f64, pages: f64) -> f64 {
    if pages <= 0.0 {
        return 0.0;
    }
    pages * (1.0 - (-writes / pages).exp())
}

/// Distinct pages dirtied by `writes` page writes, for a guest of `vm_pages` pages writing a
/// working set of `ws_pages` pages with `pattern` (the meanings of [`crate::vmm::Pattern`]).
pub fn dirtied(pattern: WritePattern, writes: f64, ws_pages: f64, vm_pages: f64) -> f64 {
    let writes = writes.max(0.0);
    let ws = ws_pages.clamp(1.0, vm_pages.max(1.0));
    match pattern {
        WritePattern::Sequential => writes.min(ws),
        WritePattern::HotSet => uniform(writes, ws),
        WritePattern::Uniform => uniform(writes, vm_pages),
    }
}

/// The guest's write rate at `t_s` (seconds since it started), bytes per second.
pub fn rate_at(w: &WorkloadDef, t_s: f64) -> f64 {
    w.rate_changes
        .iter()
        .take_while(|(at, _)| *at <= t_s)
        .last()
        .map_or(w.dirty_bytes_per_sec, |(_, r)| *r)
}

/// Page writes between `from_s` and `to_s`, integrating the rate over its changes.
pub fn writes_between(w: &WorkloadDef, from_s: f64, to_s: f64) -> f64 {
    if to_s <= from_s {
        return 0.0;
    }
    let mut bytes = 0.0;
    let mut t = from_s;
    for (at, _) in w.rate_changes.iter().filter(|(at, _)| *at > from_s && *at < to_s) {
        bytes += rate_at(w, t) * (at - t);
        t = *at;
    }
    bytes += rate_at(w, t) * (to_s - t);
    bytes / PAGE_SIZE as f64
}

/// Distinct pages dirtied between `from_s` and `to_s`, at most the VM's pages.
pub fn dirtied_between(w: &WorkloadDef, from_s: f64, to_s: f64, vm_pages: u64) -> u64 {
    let ws = (w.working_set_bytes / PAGE_SIZE as u64).min(vm_pages) as f64;
    dirtied(w.pattern, writes_between(w, from_s, to_s), ws, vm_pages as f64).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(rate: f64, ws: u64, pattern: WritePattern) -> WorkloadDef {
        WorkloadDef {
            dirty_bytes_per_sec: rate,
            working_set_bytes: ws,
            pattern,
            rate_changes: Vec::new(),
        }
    }

    #[test]
    fn test_the_dirty_set_grows_with_writes_and_saturates_at_the_working_set() {
        let (ws, all) = (16_384.0, 65_536.0);
        for p in [WritePattern::Uniform, WritePattern::HotSet, WritePattern::Sequential] {
            let limit = if p == WritePattern::Uniform { all } else { ws };
            let mut last = 0.0;
            for writes in [0.0, 100.0, 1e3, 1e4, 1e5, 1e7] {
                let d = dirtied(p, writes, ws, all);
                assert!(d >= last && d <= limit && d <= writes + 1e-9, "{p:?} {writes}: {d}");
                last = d;
            }
            assert!(last > limit * 0.99, "{p:?} saturates: {last}");
        }
        // A hot set saturates at its size; writes over all memory keep finding new pages.
        assert!(dirtied(WritePattern::HotSet, 1e5, ws, all) < dirtied(WritePattern::Uniform, 1e5, ws, all));
        assert_eq!(dirtied(WritePattern::Sequential, 1e3, ws, all), 1e3);
    }

    #[test]
    fn test_rate_changes_are_integrated() {
        let mut w = workload(4096.0, 1 << 30, WritePattern::Sequential);
        w.rate_changes = vec![(10.0, 8192.0)];
        // 10 s at one page/s, 5 s at two.
        assert!((writes_between(&w, 0.0, 15.0) - 20.0).abs() < 1e-9);
        assert!((writes_between(&w, 12.0, 15.0) - 6.0).abs() < 1e-9);
        assert_eq!(dirtied_between(&w, 0.0, 15.0, 1 << 20), 20);
    }
}
