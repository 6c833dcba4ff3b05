//! The model's costs that are not bandwidth: what a real migration spends outside the page
//! transfer. `migratory simulate --calibrate` measures them on a machine; these defaults were
//! measured on the 2-core development VM (`--calibrate` output, in-process sim backend).

use serde::{Deserialize, Serialize};

/// Costs of a migration besides moving pages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    /// Premigration and reservation besides round trips and committing memory, seconds.
    pub setup_s: f64,
    /// How fast a target commits memory for an incoming VM, bytes per second.
    pub reserve_bytes_per_sec: f64,
    /// Switchover besides round trips and verification: state out, load, activation, seconds.
    pub switchover_s: f64,
    /// Post-copy's switchover: state out, load, activation (it verifies after the pull),
    /// seconds.
    pub postcopy_switchover_s: f64,
    /// How fast the paused source's memory is hashed and compared to verify the copy, bytes per
    /// second. In pre-copy order it runs in the downtime, alongside the last pages; in
    /// post-copy order after the pull, while the VM runs on the target.
    pub verify_bytes_per_sec: f64,
    /// Fastest one host's migration data plane moves pages, bytes per second (CPU-bound; the
    /// NIC and budgets may be lower).
    pub plane_bytes_per_sec: f64,
    /// Round trip between two hosts of one datacenter, seconds.
    pub local_rtt_s: f64,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self {
            setup_s: 0.005,
            reserve_bytes_per_sec: 4e9,
            switchover_s: 0.004,
            postcopy_switchover_s: 0.001,
            verify_bytes_per_sec: 8e9,
            plane_bytes_per_sec: 2e9,
            local_rtt_s: 0.0002,
        }
    }
}
