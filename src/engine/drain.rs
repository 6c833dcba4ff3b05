//! Evacuation: move every VM off a host to its peers, as a graceful shutdown (`serve
//! --drain-to`) and `migratory drain` do. VMs go one at a time; a VM whose move fails is tried
//! on the next peer, and one that no peer takes stays where it runs. A held copy is never moved:
//! it waits for its operator action.

use std::net::SocketAddr;

use super::error::EngineError;
use super::handle::EngineHandle;
use super::report::Outcome;
use super::request::MigrationRequest;
use crate::protocol::Algorithm;
use crate::vm::Lifecycle;

/// What an evacuation did, VM by VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrainReport {
    /// VMs moved, with the peer that took each and the migration id.
    pub moved: Vec<DrainedVm>,
    /// VMs that stay: every peer refused or failed them, or they are held or migrating.
    pub stayed: Vec<StayedVm>,
}

/// A VM an evacuation moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainedVm {
    /// The VM.
    pub vm: String,
    /// The peer that took it.
    pub to: SocketAddr,
    /// The migration that moved it.
    pub migration: u64,
}

/// A VM an evacuation left where it was, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StayedVm {
    /// The VM.
    pub vm: String,
    /// Why it stays (the last peer's error, or its held state).
    pub why: String,
}

impl EngineHandle {
    /// Moves every running or paused VM of `host` to `peers` (daemons' migration listeners), one
    /// at a time, each with `algorithm`; a VM that fails on one peer is tried on the next.
    /// VMs that are held or already migrating stay, and the report says why.
    ///
    /// ```no_run
    /// # async fn f(engine: migratory::engine::EngineHandle) -> Result<(), migratory::engine::EngineError> {
    /// let peers = ["10.0.0.2:7000".parse().expect("addr")];
    /// let report = engine.drain("a", &peers, migratory::protocol::Algorithm::Auto).await?;
    /// for s in &report.stayed {
    ///     eprintln!("{} stays: {}", s.vm, s.why);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn drain(
        &self,
        host: &str,
        peers: &[SocketAddr],
        algorithm: Algorithm,
    ) -> Result<DrainReport, EngineError> {
        let mut report = DrainReport::default();
        for info in self.list_vms(host).await? {
            let vm = info.config.id.0.clone();
            if let Some(h) = &info.held {
                report.stayed.push(StayedVm {
                    why: format!("held ({}): {}", h.reason.name(), h.detail),
                    vm,
                });
                continue;
            }
            if !matches!(info.state, Lifecycle::Running | Lifecycle::Paused) {
                report.stayed.push(StayedVm {
                    why: format!("it is {}", info.state),
                    vm,
                });
                continue;
            }
            let mut last = String::from("no peer to drain to");
            let mut moved = None;
            for &peer in peers {
                let mut req = MigrationRequest::new(vm.clone(), host, peer.to_string()).algorithm(algorithm);
                req.target_addr = Some(peer);
                let outcome = match self.start_migration(req).await {
                    Ok(started) => self.report(started.id).await.map(|r| (started.id, r)),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok((id, r)) if r.result.succeeded() => {
                        moved = Some((peer, id));
                        break;
                    }
                    Ok((_, r)) => {
                        last = format!("{peer}: {}", r.error.unwrap_or_else(|| r.result.label().to_string()));
                        // Past commitment the VM is no longer this host's to move again.
                        if r.result == Outcome::Failed && r.vm_location != super::report::VmLocation::Source {
                            break;
                        }
                    }
                    Err(e) => last = format!("{peer}: {e}"),
                }
            }
            match moved {
                Some((to, migration)) => report.moved.push(DrainedVm { vm, to, migration }),
                None => report.stayed.push(StayedVm { vm, why: last }),
            }
        }
        Ok(report)
    }
}
