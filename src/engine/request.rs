//! What an embedder asks for: hosts, VMs and migrations, with sane defaults.

use std::time::Duration;

use super::policy::PolicyConfig;
use crate::format::NativeLayout;
use crate::link::{Keepalive, Shaping};
use crate::protocol::{Algorithm, Compression, CompressionChoice};
use crate::vmm::{BackendSpec, WorkloadSpec};

/// A host to add to the engine.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Unique name.
    pub name: String,
    /// The hypervisor the host runs, and its native layout where it has a choice.
    pub backend: BackendSpec,
    /// Memory budget for VMs, in bytes.
    pub memory_budget_bytes: u64,
    /// Algorithms the host offers (all by default).
    pub algorithms: Vec<Algorithm>,
    /// Common-format versions the host reads and writes.
    pub format_versions: Vec<u32>,
    /// Page compression methods the host offers, sending and receiving (all by default; `none`
    /// alone is a host that never compresses).
    pub compression: Vec<Compression>,
    /// Address to accept migrations on over TCP (port 0 picks one; see
    /// [`super::EngineHandle::listen_address`]). `None`: in-process links only.
    pub listen: Option<std::net::SocketAddr>,
    /// Outgoing migrations running at once; more are queued.
    pub max_outgoing: usize,
    /// Incoming migrations running at once; more wait for a slot (up to the step timeout).
    pub max_incoming: usize,
    /// One bandwidth budget shared by all the host's outgoing migrations (bytes/s), by the
    /// weights of their priorities and with their floors (see `engine::qos`).
    pub bandwidth_budget_bytes_per_sec: Option<u64>,
    /// The cluster key both ends of a migration must prove (HMAC challenge-response); `None`
    /// accepts and opens unauthenticated migrations.
    pub cluster_key: Option<crate::protocol::auth::ClusterKey>,
    /// TLS with mutual authentication for every stream, both ways; `None` is plain TCP.
    pub tls: Option<crate::link::tls::TlsSetup>,
    /// If given, only these peers may connect to `listen`.
    pub allowed_peers: Option<Vec<std::net::IpAddr>>,
    /// The interface (a tap, a bridge port, a veth) on which this host announces the NICs of
    /// a VM it activates, with RARP and gratuitous ARP frames (needs CAP_NET_RAW); `None`:
    /// activation is only a `NetworkAnnounced` event.
    pub announce_via: Option<String>,
}

impl HostConfig {
    /// A sim host keeping vCPU state in `layout`, offering every algorithm with a 64 GiB budget.
    pub fn new(name: impl Into<String>, layout: NativeLayout) -> Self {
        Self::with_backend(name, BackendSpec::sim(layout))
    }

    /// A kvm host (guests on /dev/kvm, vCPU state in the kvm layout), otherwise as [`Self::new`].
    pub fn kvm(name: impl Into<String>) -> Self {
        Self::with_backend(name, BackendSpec::Kvm)
    }

    /// A host running `backend`, otherwise as [`Self::new`]. It offers peers only the
    /// algorithms both its configuration and its backend allow.
    pub fn with_backend(name: impl Into<String>, backend: BackendSpec) -> Self {
        Self {
            name: name.into(),
            backend,
            memory_budget_bytes: 64 << 30,
            algorithms: Algorithm::ALL.to_vec(),
            format_versions: vec![crate::format::FORMAT_VERSION],
            compression: Compression::ALL.to_vec(),
            listen: None,
            max_outgoing: 4,
            max_incoming: 4,
            bandwidth_budget_bytes_per_sec: None,
            cluster_key: None,
            tls: None,
            allowed_peers: None,
            announce_via: None,
        }
    }
}

/// A VM to create.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Id, unique in the engine.
    pub id: String,
    /// RAM in bytes (a multiple of 4 KiB).
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// NICs (their MACs are derived from the id).
    pub nics: u32,
    /// The writer workload.
    pub workload: WorkloadSpec,
}

impl VmSpec {
    /// An idle VM of `memory_bytes` with 2 vCPUs and one NIC.
    pub fn new(id: impl Into<String>, memory_bytes: u64) -> Self {
        Self {
            id: id.into(),
            memory_bytes,
            vcpus: 2,
            nics: 1,
            workload: WorkloadSpec::idle(),
        }
    }
}

/// A migration to start.
#[derive(Debug, Clone)]
pub struct MigrationRequest {
    /// The VM.
    pub vm: String,
    /// Host it runs on.
    pub source: String,
    /// Host it goes to.
    pub target: String,
    /// Algorithm (or `auto`).
    pub algorithm: Algorithm,
    /// Policy limits.
    pub policy: PolicyConfig,
    /// When a stop-and-copy or pre-copy switchover compares page digests: after activation by
    /// default (no hashing in the downtime), or before commit (a difference rolls back).
    pub verify: super::verify::VerifyMode,
    /// Shaping of the link between the two (in-process) hosts.
    pub shaping: Shaping,
    /// Keepalive of the control link.
    pub keepalive: Keepalive,
    /// Bound on any single wait for the peer (a reply, a stage step).
    pub step_timeout: Duration,
    /// Algorithms the source side offers for this migration (all by default); narrowing it
    /// exercises negotiation.
    pub offer: Vec<Algorithm>,
    /// Reach the target over TCP at this address instead of in-process; `target` is then only
    /// a label.
    pub target_addr: Option<std::net::SocketAddr>,
    /// Parallel TCP data streams (1..=16).
    pub streams: u8,
    /// Faults to inject (testing failure handling); empty by default.
    pub faults: super::faults::FaultPlan,
    /// Post-copy: how long the source keeps trying to reconnect after the link fails in the
    /// pull phase (and, in-process, how long the target waits with the guest paused). Zero
    /// turns recovery off.
    pub recovery_timeout: Duration,
    /// Page compression to use where both hosts offer it (`auto` by default: what won on the
    /// benchmark for this link's cap, see [`crate::protocol::negotiation::auto_compression`]).
    pub compression: CompressionChoice,
    /// Most bytes of page content the source keeps as XBZRLE bases (capped at the VM's size).
    pub xbzrle_cache_bytes: u64,

    // Quality of service (see `engine::qos`).
    /// Priority class: the order the outgoing queue serves, and the weight in the host's
    /// bandwidth budget (`normal` by default).
    pub priority: super::qos::Priority,
    /// Bytes per second of the host's bandwidth budget assured to this migration while it sends;
    /// refused at the start if the budget cannot assure it (`None` by default).
    pub min_bandwidth_bytes_per_sec: Option<u64>,
    /// How the target announces the VM's NICs after activation, if its host has an interface
    /// for it (QEMU's defaults unless set; sent to the target in `Reserve`).
    pub announce: crate::announce::AnnounceParams,
    /// Seed of `random`'s pick, to replay one; `None` takes a seed from the OS. The report
    /// records the seed used.
    pub seed: Option<u64>,
    /// Deadline for the total time (as the report's `total_s` counts it). The plan switches to
    /// post-copy, or raises a round's pace, where that meets it; the report says whether it
    /// was met and by how much. `None`: no deadline, and the plan is not wrapped.
    pub deadline: Option<Duration>,
}

/// The XBZRLE cache of a migration, unless configured: QEMU's default too.
pub const DEFAULT_XBZRLE_CACHE_BYTES: u64 = 64 << 20;

/// How long a post-copy pull phase waits for a lost link to come back, unless configured.
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

impl MigrationRequest {
    /// A pre-copy migration with default policy and an unshaped link. Every migration is
    /// verified (page digests and vCPU state), stop-and-copy and pre-copy after activation
    /// unless [`Self::verify`] says before commit.
    pub fn new(vm: impl Into<String>, source: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            vm: vm.into(),
            source: source.into(),
            target: target.into(),
            algorithm: Algorithm::Precopy,
            policy: PolicyConfig::default(),
            verify: super::verify::VerifyMode::default(),
            shaping: Shaping::default(),
            keepalive: Keepalive::default(),
            step_timeout: Duration::from_secs(60),
            offer: Algorithm::ALL.to_vec(),
            target_addr: None,
            streams: 2,
            faults: super::faults::FaultPlan::default(),
            recovery_timeout: DEFAULT_RECOVERY_TIMEOUT,
            compression: CompressionChoice::default(),
            xbzrle_cache_bytes: DEFAULT_XBZRLE_CACHE_BYTES,
            priority: super::qos::Priority::default(),
            min_bandwidth_bytes_per_sec: None,

            announce: crate::announce::AnnounceParams::default(),
            seed: None,
            deadline: None,
        }
    }

    /// Sets the algorithm.
    pub fn algorithm(mut self, a: Algorithm) -> Self {
        self.algorithm = a;
        self
    }

    /// Sets the seed of `random`'s pick.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Sets a deadline for the total time.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}
