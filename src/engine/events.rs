//! Events of a migration, as its subscribers see them.

use std::time::Duration;

use super::report::MigrationReport;
use super::stage::Stage;

/// Something that happened in a migration. Subscribers get them in order.
#[derive(Debug, Clone)]
pub enum MigrationEvent {
    /// A stage began.
    StageStarted {
        /// The stage.
        stage: Stage,
    },
    /// A stage ended.
    StageCompleted {
        /// The stage.
        stage: Stage,
        /// How long it took.
        duration: Duration,
    },
    /// A pre-copy round ended.
    RoundCompleted {
        /// Round number.
        round: u32,
        /// Pages sent in the round.
        pages_sent: u64,
        /// Dirty pages left for the next round.
        remaining_pages: u64,
        /// Dirty rate measured during the round.
        dirty_pages_per_sec: f64,
        /// Link throughput of the round.
        bytes_per_sec: f64,
        /// Downtime if the migration stopped now.
        expected_downtime: Duration,
    },
    /// The policy decided something.
    Decision {
        /// What.
        action: String,
        /// Why.
        reason: String,
    },
    /// The target announced a NIC's MAC at its new place (after `Activated`).
    NetworkAnnounced {
        /// NIC id.
        nic: String,
        /// MAC address.
        mac: String,
        /// Host that announced.
        host: String,
        /// The interface the frames go out on, in the background from now; `None`: the host
        /// has no interface for them (`HostConfig::announce_via`), this event is all there is.
        via: Option<String>,
        /// Frames this NIC's announcement sends: a RARP and a gratuitous ARP per round; 0
        /// without an interface.
        frames: u64,
    },
    /// Post-copy: the link failed in the pull phase. The target paused the guest; the source
    /// tries to reconnect within its recovery timeout.
    PullInterrupted {
        /// Which side saw it.
        side: super::error::Side,
        /// What failed.
        reason: String,
        /// Target side: pages it still lacked (the guest is paused if any); source side: 0.
        missing_pages: u64,
    },
    /// Post-copy: a new link carries the pull phase on.
    PullResumed {
        /// Which side.
        side: super::error::Side,
        /// Recoveries so far in this migration.
        recoveries: u32,
        /// Pages still missing on the target when it resumed.
        missing_pages: u64,
    },
    /// The target side stopped early, and why (in-process migrations only).
    TargetStopped {
        /// What ended it.
        reason: String,
    },
    /// The migration ended; the report is final.
    Finished(Box<MigrationReport>),
}
