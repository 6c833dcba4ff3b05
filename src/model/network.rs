//! The fluid model of the network: migrations share capacities max-min fairly (water-filling),
//! as TCP flows on a shared bottleneck roughly do. A flow crosses resources (its source's NIC
//! and bandwidth budget, its target's NIC, the link between datacenters) and may have a cap of
//! its own; no resource is ever given more than its capacity.

/// One flow's demand: the resources it crosses (indices into the capacities) and its own cap.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    /// Resources crossed.
    pub uses: Vec<usize>,
    /// The flow's own cap, bytes per second.
    pub cap: f64,
}

/// Max-min fair rates of `flows` over resources of `capacity` (bytes per second each).
pub fn share(capacity: &[f64], flows: &[Flow]) -> Vec<f64> {
    let mut rate = vec![0.0; flows.len()];
    let mut frozen = vec![false; flows.len()];
    let mut left: Vec<f64> = capacity.to_vec();
    let mut users = vec![0usize; capacity.len()];
    for f in flows {
        for &r in &f.uses {
            users[r] += 1;
        }
    }
    let mut active = flows.len();
    while active > 0 {
        // The next level at which a resource fills or a flow reaches its cap.
        let mut level = f64::INFINITY;
        for (r, &n) in users.iter().enumerate() {
            if n > 0 {
                level = level.min(left[r].max(0.0) / n as f64);
            }
        }
        for (i, f) in flows.iter().enumerate() {
            if !frozen[i] {
                level = level.min(f.cap - rate[i]);
            }
        }
        if !level.is_finite() {
            // Nothing limits the remaining flows; the model gives them no rate rather than
            // an infinite one (every scenario flow crosses at least one finite resource).
            break;
        }
        let level = level.max(0.0);
        for (i, f) in flows.iter().enumerate() {
            if frozen[i] {
                continue;
            }
            rate[i] += level;
            for &r in &f.uses {
                left[r] -= level;
            }
        }
        // Freeze the flows at a full resource or at their cap.
        let eps = 1e-9;
        for (i, f) in flows.iter().enumerate() {
            if frozen[i] {
                continue;
            }
            let full = f.uses.iter().any(|&r| left[r] <= eps * capacity[r].max(1.0));
            if full || rate[i] >= f.cap - eps * f.cap.max(1.0) {
                frozen[i] = true;
                active -= 1;
                for &r in &f.uses {
                    users[r] -= 1;
                }
            }
        }
    }
    rate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(uses: &[usize], cap: f64) -> Flow {
        Flow {
            uses: uses.to_vec(),
            cap,
        }
    }

    #[test]
    fn test_a_bottleneck_is_shared_equally_and_the_rest_goes_to_whoever_can_use_it() {
        // Two flows on a 100 link; one of them also crosses a 30 NIC.
        let rates = share(
            &[100.0, 30.0],
            &[flow(&[0], f64::INFINITY), flow(&[0, 1], f64::INFINITY)],
        );
        assert!(
            (rates[1] - 30.0).abs() < 1e-6 && (rates[0] - 70.0).abs() < 1e-6,
            "{rates:?}"
        );
    }

    #[test]
    fn test_caps_are_respected_and_capacity_never_exceeded() {
        let caps = [100.0, 50.0, 80.0];
        let flows = [
            flow(&[0, 1], 10.0),
            flow(&[0, 1], f64::INFINITY),
            flow(&[0, 2], f64::INFINITY),
            flow(&[2], 5.0),
        ];
        let rates = share(&caps, &flows);
        assert!((rates[0] - 10.0).abs() < 1e-6, "{rates:?}");
        assert!((rates[3] - 5.0).abs() < 1e-6, "{rates:?}");
        for (r, &c) in caps.iter().enumerate() {
            let used: f64 = flows
                .iter()
                .zip(&rates)
                .filter(|(f, _)| f.uses.contains(&r))
                .map(|(_, x)| x)
                .sum();
            assert!(used <= c + 1e-6, "resource {r}: {used} > {c}");
        }
        // Max-min: flow 1 gets what flow 0 left of resource 1.
        assert!((rates[1] - 40.0).abs() < 1e-6, "{rates:?}");
        // Flow 2 takes what is left of resource 0.
        assert!((rates[2] - 50.0).abs() < 1e-6, "{rates:?}");
    }
}
