//! One bench scenario: a VM size, a guest load, an algorithm and a link; run through the
//! public engine API exactly as an embedder would, and reduced to the figures the table shows.

use std::time::Duration;

use migratory::engine::{EngineHandle, HostConfig, MigrationReport, MigrationRequest, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::{Algorithm, CompressionChoice};
use migratory::vmm::{BackendSpec, GuestStats, Pattern, WorkloadSpec};
use serde::Serialize;

/// What the guest does while it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// No writes.
    Idle,
    /// 100 MB/s over a 64 MiB hot set (DESIGN.md's pre-copy downtime scenario).
    HotSet,
    /// 1 GB/s spread over all memory: pre-copy cannot converge.
    Uniform,
    /// 100 MB/s spread over all memory: few re-sent pages are written twice in a row.
    Scattered,
    /// A writer of any rate, working set and pattern, over memory with no zero page (so that
    /// every page costs its size on the link: `simulate --validate`).
    Writer {
        /// Bytes per second.
        rate: u64,
        /// Working set, bytes.
        working_set: u64,
        /// Where the writes fall.
        pattern: Pattern,
    },
}

impl Load {
    fn workload(self, memory: u64) -> WorkloadSpec {
        let (rate, ws, pattern) = match self {
            Load::Writer {
                rate,
                working_set,
                pattern,
            } => {
                return WorkloadSpec {
                    rate_bytes_per_sec: rate,
                    working_set_bytes: working_set,
                    pattern,
                    zero_fraction: 0.0,
                    seed: 11,
                }
            }
            Load::Idle => (0, 64 << 20, Pattern::HotSet),
            Load::HotSet => (100_000_000, 64 << 20, Pattern::HotSet),
            Load::Uniform => (1_000_000_000, memory, Pattern::Uniform),
            Load::Scattered => (100_000_000, memory, Pattern::Uniform),
        };
        WorkloadSpec {
            rate_bytes_per_sec: rate,
            working_set_bytes: ws,
            pattern,
            zero_fraction: 0.1,
            seed: 11,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::HotSet => "hot-set",
            Load::Uniform => "uniform",
            Load::Scattered => "scattered",
            Load::Writer { .. } => "writer",
        }
    }
}

/// A load appears in the JSON by its name.
impl Serialize for Load {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// How source and target are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Two hosts of one engine, an in-process link.
    InProcess,
    /// Two engines (as two daemons would be) over loopback TCP with this many data streams.
    Tcp(u8),
}

impl Via {
    pub fn name(self) -> String {
        match self {
            Via::InProcess => "in-process".into(),
            Via::Tcp(n) => format!("tcp x{n}"),
        }
    }
}

/// One migration to measure.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub memory: u64,
    pub load: Load,
    pub algorithm: Algorithm,
    pub via: Via,
    pub compression: CompressionChoice,
    /// The link's bandwidth cap; `None` is as fast as the machine goes. A capped scenario keeps
    /// the engine's default downtime limit (DESIGN's 10 ms is a loopback target).
    pub link_bytes_per_sec: Option<u64>,
    /// The source host's hypervisor: by default the sim in the xen-hvm layout, so that every
    /// migration converts vCPU state.
    pub source: BackendSpec,
    /// The target host's hypervisor: by default the sim in the kvm layout.
    pub target: BackendSpec,
}

impl Scenario {
    /// A scenario on an uncapped link with the engine's default compression.
    pub fn new(memory: u64, load: Load, algorithm: Algorithm, via: Via) -> Self {
        Self {
            memory,
            load,
            algorithm,
            via,
            compression: CompressionChoice::default(),
            link_bytes_per_sec: None,
            source: BackendSpec::sim(NativeLayout::XenHvm),
            target: BackendSpec::sim(NativeLayout::Kvm),
        }
    }
}

/// Runs the scenario on fresh engines (nothing shared with the scenario before) and returns
/// the report, and for a kvm guest what the guest reported about itself on the target.
pub async fn run(s: &Scenario) -> Result<(MigrationReport, Option<GuestStats>), String> {
    let err = |e: migratory::engine::EngineError| e.to_string();
    // Keyed as a daemon must be: over TCP every frame then carries its MAC, and that cost is
    // part of what is measured.
    let key = migratory::protocol::auth::nonce()
        .and_then(|bytes| migratory::protocol::auth::ClusterKey::new(&bytes))
        .map_err(|e| e.to_string())?;
    let host = |name: &str, backend: &BackendSpec| HostConfig {
        cluster_key: Some(key.clone()),
        ..HostConfig::with_backend(name, backend.clone())
    };
    let src = EngineHandle::start().map_err(err)?;
    src.add_host(host("a", &s.source)).await.map_err(err)?;
    let (dst, target, addr) = match s.via {
        Via::InProcess => {
            src.add_host(host("b", &s.target)).await.map_err(err)?;
            (None, "b".to_string(), None)
        }
        Via::Tcp(_) => {
            let dst = EngineHandle::start().map_err(err)?;
            let listen = HostConfig {
                listen: Some(([127, 0, 0, 1], 0).into()),
                ..host("b", &s.target)
            };
            dst.add_host(listen).await.map_err(err)?;
            let addr = dst
                .listen_address("b")
                .await
                .map_err(err)?
                .ok_or("the target host is not listening")?;
            (Some(dst), addr.to_string(), Some(addr))
        }
    };
    let kvm = matches!(s.source, BackendSpec::Kvm);
    let spec = VmSpec {
        workload: s.load.workload(s.memory),
        // The kvm guest has one vCPU.
        vcpus: if kvm { 1 } else { 2 },
        ..VmSpec::new("bench", s.memory)
    };
    src.create_vm("a", spec).await.map_err(err)?;
    let mut req = MigrationRequest::new("bench", "a", target).algorithm(s.algorithm);
    req.target_addr = addr;
    if let Via::Tcp(n) = s.via {
        req.streams = n;
    }
    req.compression = s.compression;
    req.shaping.bandwidth_bytes_per_sec = s.link_bytes_per_sec;
    if s.algorithm == Algorithm::Precopy && s.link_bytes_per_sec.is_none() {
        // DESIGN.md's pre-copy target: downtime within 10 ms.
        req.policy.downtime_limit = Duration::from_millis(10);
    }
    let report = src.migrate(req).await.map_err(err)?;
    let guest = if kvm && report.result.succeeded() {
        // Let the guest finish a verify pass where it now runs (it verifies about twice a
        // second), then ask what it found.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let on = dst.as_ref().unwrap_or(&src);
        on.vm_info("b", "bench").await.ok().map(|v| v.stats)
    } else {
        None
    };
    // Dropping the last handles stops both engines and frees both copies before the next
    // scenario maps its memory.
    drop((src, dst));
    Ok((report, guest))
}
