//! The scenario's hosts and datacenters, checked against an outcome once so the writers can
//! index without checking, and the one walk over the samples they all share.

use crate::model::{HostSample, ModelOutcome, Scenario};

use super::OutputError;

/// Hosts and datacenters by index, with their capacities.
#[derive(Debug)]
pub(crate) struct Topology<'a> {
    pub scenario: &'a Scenario,
    /// Sum of its hosts' RAM, per datacenter, bytes.
    pub dc_ram_bytes: Vec<u64>,
}

/// Every host's figures at one sampling instant. A host missing from an instant keeps its
/// figures from the one before (zero before its first sample), so a sparse outcome still gives
/// every host a value at every instant and a datacenter's sum is always of all its hosts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostState {
    pub ram_used_bytes: Vec<u64>,
    pub net_out_bytes_per_sec: Vec<f64>,
    pub net_in_bytes_per_sec: Vec<f64>,
}

/// A datacenter's figures at one instant: the sums of its hosts'.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct DcTotals {
    pub ram_used_bytes: u64,
    pub net_out_bytes_per_sec: f64,
    pub net_in_bytes_per_sec: f64,
}

impl<'a> Topology<'a> {
    /// Checks that every host's datacenter and every sample's host exist.
    pub fn new(scenario: &'a Scenario, outcome: &ModelOutcome) -> Result<Topology<'a>, OutputError> {
        let datacenters = scenario.datacenters.len();
        let mut dc_ram_bytes = vec![0u64; datacenters];
        for h in &scenario.hosts {
            let sum = dc_ram_bytes
                .get_mut(h.datacenter)
                .ok_or_else(|| OutputError::UnknownDatacenter {
                    host: h.name.clone(),
                    datacenter: h.datacenter,
                    datacenters,
                })?;
            *sum = sum.saturating_add(h.ram_bytes);
        }
        let hosts = scenario.hosts.len();
        if let Some(s) = outcome.samples.iter().find(|s| s.host >= hosts) {
            return Err(OutputError::UnknownHost { host: s.host, hosts });
        }
        Ok(Topology { scenario, dc_ram_bytes })
    }

    /// The datacenter of host `h`.
    pub fn dc_of(&self, h: usize) -> usize {
        self.scenario.hosts[h].datacenter
    }

    /// Calls `f` once per sampling instant, in time order, with every host's figures then.
    /// An instant is a run of consecutive samples with the same time.
    pub fn sweep<E>(
        &self,
        samples: &[HostSample],
        mut f: impl FnMut(f64, &HostState) -> Result<(), E>,
    ) -> Result<(), E> {
        let n = self.scenario.hosts.len();
        let mut state = HostState {
            ram_used_bytes: vec![0; n],
            net_out_bytes_per_sec: vec![0.0; n],
            net_in_bytes_per_sec: vec![0.0; n],
        };
        for instant in samples.chunk_by(|a, b| a.t_s == b.t_s) {
            for s in instant {
                state.ram_used_bytes[s.host] = s.ram_used_bytes;
                state.net_out_bytes_per_sec[s.host] = s.net_out_bytes_per_sec;
                state.net_in_bytes_per_sec[s.host] = s.net_in_bytes_per_sec;
            }
            f(instant[0].t_s, &state)?;
        }
        Ok(())
    }

    /// Each datacenter's sums of `state`.
    pub fn dc_totals(&self, state: &HostState) -> Vec<DcTotals> {
        let mut totals = vec![DcTotals::default(); self.scenario.datacenters.len()];
        for h in 0..self.scenario.hosts.len() {
            let t = &mut totals[self.dc_of(h)];
            t.ram_used_bytes = t.ram_used_bytes.saturating_add(state.ram_used_bytes[h]);
            t.net_out_bytes_per_sec += state.net_out_bytes_per_sec[h];
            t.net_in_bytes_per_sec += state.net_in_bytes_per_sec[h];
        }
        totals
    }
}

/// `used` over `capacity`; zero for no capacity, where a fraction means nothing.
pub(crate) fn fraction(used: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        used as f64 / capacity as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{fixture, Spec};
    use super::*;

    #[test]
    fn test_sweep_visits_each_instant_once_in_order() {
        let (scenario, outcome) = fixture(&Spec::small());
        let topo = Topology::new(&scenario, &outcome).unwrap();
        let mut times = Vec::new();
        topo.sweep(&outcome.samples, |t, _| {
            times.push(t);
            Ok::<(), ()>(())
        })
        .unwrap();
        let mut expected: Vec<f64> = outcome.samples.iter().map(|s| s.t_s).collect();
        expected.dedup();
        assert_eq!(times, expected);
    }

    #[test]
    fn test_a_host_missing_from_an_instant_keeps_its_last_figures() {
        let (scenario, mut outcome) = fixture(&Spec::small());
        let first_t = outcome.samples[0].t_s;
        let second_t = outcome.samples.iter().map(|s| s.t_s).find(|&t| t != first_t).unwrap();
        let before = outcome
            .samples
            .iter()
            .find(|s| s.t_s == first_t && s.host == 0)
            .unwrap()
            .ram_used_bytes;
        outcome.samples.retain(|s| !(s.t_s == second_t && s.host == 0));
        let topo = Topology::new(&scenario, &outcome).unwrap();
        let mut seen = Vec::new();
        topo.sweep(&outcome.samples, |_, st| {
            seen.push(st.ram_used_bytes[0]);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(seen[1], before);
    }

    #[test]
    fn test_unknown_hosts_and_datacenters_are_errors() {
        let (mut scenario, mut outcome) = fixture(&Spec::small());
        outcome.samples[0].host = 99;
        assert!(matches!(
            Topology::new(&scenario, &outcome),
            Err(OutputError::UnknownHost { host: 99, .. })
        ));
        scenario.hosts[0].datacenter = 7;
        assert!(matches!(
            Topology::new(&scenario, &outcome),
            Err(OutputError::UnknownDatacenter { datacenter: 7, .. })
        ));
    }
}
