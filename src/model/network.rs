//! The fluid model of the network: migrations share capacities by weighted max-min fairness
//! (water-filling), as TCP flows on a shared bottleneck roughly do, and as the engine shares a
//! host's bandwidth budget by priority. A flow crosses resources (its source's NIC and
//! bandwidth budget, its target's NIC, the link between datacenters), may have a cap of its
//! own, a weight (its priority's) and a floor; no resource is ever given more than its capacity.
//!
//! The rule is the engine's ([`crate::link::weighted_shares`]) over many resources: each flow
//! gets `max(floor, weight × level)`, the level rising until a resource fills or the flow
//! reaches its cap. Floors come first; where floors alone overfill a resource they are scaled
//! down to fit it.

/// One flow's demand: the resources it crosses (indices into the capacities), its own cap,
/// its weight and its floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    /// Resources crossed.
    pub uses: Vec<usize>,
    /// The flow's own cap, bytes per second.
    pub cap: f64,
    /// Its weight: above their floors, flows on a full resource share it in this proportion.
    pub weight: f64,
    /// Bytes per second it is assured (scaled down only where floors overfill a resource).
    pub floor: f64,
}

/// Weighted max-min fair rates of `flows` over resources of `capacity` (bytes per second
/// each), with floors.
pub fn share(capacity: &[f64], flows: &[Flow]) -> Vec<f64> {
    let eps = 1e-9;
    // Floors first, each scaled by the tightest resource it crosses.
    let mut floor: Vec<f64> = flows.iter().map(|f| f.floor.max(0.0).min(f.cap)).collect();
    let mut on = vec![0.0; capacity.len()];
    for (f, &x) in flows.iter().zip(&floor) {
        for &r in &f.uses {
            on[r] += x;
        }
    }
    for (f, x) in flows.iter().zip(floor.iter_mut()) {
        let scale = f
            .uses
            .iter()
            .map(|&r| {
                if on[r] > capacity[r] {
                    capacity[r].max(0.0) / on[r]
                } else {
                    1.0
                }
            })
            .fold(1.0, f64::min);
        *x *= scale;
    }
    let mut rate = floor.clone();
    let mut left: Vec<f64> = capacity.to_vec();
    for (f, &x) in flows.iter().zip(&rate) {
        for &r in &f.uses {
            left[r] -= x;
        }
    }
    let full = |left: &[f64], r: usize| left[r] <= eps * capacity[r].max(1.0);
    let weight = |f: &Flow| f.weight.max(f64::MIN_POSITIVE);
    let mut frozen: Vec<bool> = flows
        .iter()
        .zip(&rate)
        .map(|(f, &x)| x >= f.cap - eps * f.cap.max(1.0) || f.uses.iter().any(|&r| full(&left, r)))
        .collect();
    let mut level = 0.0f64;
    loop {
        // A flow rises with the level once the level passes its floor; until then it is held.
        let rising: Vec<bool> = flows
            .iter()
            .enumerate()
            .map(|(i, f)| !frozen[i] && weight(f) * level >= rate[i] - eps * rate[i].max(1.0))
            .collect();
        let mut rising_weight = vec![0.0; capacity.len()];
        let mut step = f64::INFINITY;
        for (i, f) in flows.iter().enumerate() {
            if frozen[i] {
                continue;
            }
            if rising[i] {
                step = step.min((f.cap - rate[i]) / weight(f));
                for &r in &f.uses {
                    rising_weight[r] += weight(f);
                }
            } else {
                step = step.min(rate[i] / weight(f) - level);
            }
        }
        for (r, &w) in rising_weight.iter().enumerate() {
            if w > 0.0 {
                step = step.min(left[r].max(0.0) / w);
            }
        }
        if !step.is_finite() {
            // Nothing limits the remaining flows; the model gives them no more rather than an
            // infinite rate (every scenario flow crosses at least one finite resource).
            break;
        }
        let step = step.max(0.0);
        level += step;
        for (i, f) in flows.iter().enumerate() {
            if rising[i] {
                let grow = weight(f) * step;
                rate[i] += grow;
                for &r in &f.uses {
                    left[r] -= grow;
                }
            }
        }
        // Freeze the flows at a full resource or at their cap, held or rising.
        for (i, f) in flows.iter().enumerate() {
            if !frozen[i] && (rate[i] >= f.cap - eps * f.cap.max(1.0) || f.uses.iter().any(|&r| full(&left, r))) {
                frozen[i] = true;
            }
        }
        if frozen.iter().all(|&z| z) {
            break;
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
            weight: 1.0,
            floor: 0.0,
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

    fn weighted(uses: &[usize], weight: f64, floor: f64) -> Flow {
        Flow {
            weight,
            floor,
            ..flow(uses, f64::INFINITY)
        }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6 * y.abs().max(1.0))
    }

    #[test]
    fn test_one_budget_is_shared_by_weight_as_the_engine_shares_it() {
        use crate::engine::Priority;
        use crate::link::{weighted_shares, Claim};
        // A source budget of 200 MB/s (resource 0) and three targets' NICs; weights low,
        // normal, high. The engine's shaper gives the same shares for the same claims.
        let caps = [200e6, 1.25e9, 1.25e9, 1.25e9];
        let classes = [Priority::Low, Priority::Normal, Priority::High];
        let flows: Vec<Flow> = classes
            .iter()
            .enumerate()
            .map(|(i, p)| weighted(&[0, i + 1], f64::from(p.weight()), 0.0))
            .collect();
        let rates = share(&caps, &flows);
        let claims: Vec<Claim> = classes.iter().map(|p| Claim::weighted(f64::from(p.weight()))).collect();
        assert!(close(&rates, &weighted_shares(200e6, &claims)), "{rates:?}");
        assert!(close(&rates, &[200e6 / 7.0, 400e6 / 7.0, 800e6 / 7.0]), "{rates:?}");
    }

    #[test]
    fn test_a_floor_is_honoured_and_the_rest_shared_by_weight() {
        use crate::link::{weighted_shares, Claim};
        let flows = [
            weighted(&[0, 1], 1.0, 100e6),
            weighted(&[0, 2], 2.0, 0.0),
            weighted(&[0, 3], 4.0, 0.0),
        ];
        let rates = share(&[200e6, 1e9, 1e9, 1e9], &flows);
        assert!(close(&rates, &[100e6, 100e6 / 3.0, 200e6 / 3.0]), "{rates:?}");
        let claims: Vec<Claim> = flows
            .iter()
            .map(|f| Claim {
                floor_bytes_per_sec: f.floor,
                ..Claim::weighted(f.weight)
            })
            .collect();
        assert!(close(&rates, &weighted_shares(200e6, &claims)), "{rates:?}");
    }

    #[test]
    fn test_a_flow_held_elsewhere_leaves_its_weighted_share_to_the_others() {
        // The high flow's target NIC takes only 20: the budget's rest goes to the other two, by
        // their weights (work conservation).
        let flows = [
            weighted(&[0, 1], 1.0, 0.0),
            weighted(&[0, 2], 2.0, 0.0),
            weighted(&[0, 3], 4.0, 0.0),
        ];
        let rates = share(&[200.0, 1e3, 1e3, 20.0], &flows);
        assert!(close(&rates, &[60.0, 120.0, 20.0]), "{rates:?}");
    }

    #[test]
    fn test_floors_that_overfill_a_resource_are_scaled_to_fit() {
        let flows = [weighted(&[0], 1.0, 150.0), weighted(&[0], 1.0, 150.0)];
        let rates = share(&[200.0], &flows);
        assert!(close(&rates, &[100.0, 100.0]), "{rates:?}");
    }
}
