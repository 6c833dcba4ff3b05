//! [`EngineHandle`]: what an embedding service holds.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::broadcast;

use super::ask::{ask, AskError};
use super::error::EngineError;
use super::events::MigrationEvent;
use super::host::HostUsage;
use super::operator::{DiscardHeld, RecoverHeld, ResumeHeld};
use super::progress::MigrationStatus;
use super::registry::{
    AddHost, BeginShutdown, Cancel, CreateVmIn, DeleteVmIn, Engine, GetStatus, ListStatus, ListVmsIn, ListenAddress,
    StartMigration, Subscribe, UsageOf, WaitReport,
};
use super::report::MigrationReport;
use super::request::{HostConfig, MigrationRequest, VmSpec};
use crate::vm::VmInfo;

/// Longest any single request to the engine may take before it fails with a timeout (creating
/// a large VM fills its memory, hence the generous bound).
const ASK_TIMEOUT: Duration = Duration::from_secs(120);

/// A started migration: its id and a subscription that sees every event from the first.
#[derive(Debug)]
pub struct StartedMigration {
    /// Migration id.
    pub id: u64,
    /// Events in order, ending with [`MigrationEvent::Finished`].
    pub events: broadcast::Receiver<MigrationEvent>,
}

#[derive(Debug)]
struct EngineThread {
    system: System,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A handle on a running engine. Clone + Send + Sync; its async methods work from any tokio
/// runtime (or any executor with a tokio context). The engine's actor system runs on its own
/// thread and stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    addr: Addr<Engine>,
    _thread: Arc<EngineThread>,
}

impl EngineHandle {
    /// Starts an engine on its own thread.
    ///
    /// The thread runs one actix System; its actors are tokio tasks, so a panicking handler
    /// ends only its own actor and the System runs on (see the `ask` module). Guest and backend
    /// calls never run on this thread ([`crate::offload`]).
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// let engine = EngineHandle::start()?;
    /// // A clone is the same engine: its thread stops when the last clone is dropped.
    /// let same = engine.clone();
    /// same.add_host(HostConfig::new("a", NativeLayout::Kvm)).await?;
    /// assert!(engine.list_vms("a").await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn start() -> Result<Self, EngineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("migratory-engine".into())
            .spawn(move || {
                let system = System::new();
                let addr = system.block_on(async { Engine::default().start() });
                // The receiver waits for this; if it is gone there is nobody to serve.
                if tx.send((addr, System::current())).is_err() {
                    return;
                }
                let _ = system.run();
            })
            .map_err(|e| EngineError::Internal(format!("cannot start engine thread: {e}")))?;
        let (addr, system) = rx.recv().map_err(|_| EngineError::EngineStopped)?;
        Ok(Self {
            addr,
            _thread: Arc::new(EngineThread {
                system,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    async fn ask<M>(&self, msg: M) -> Result<M::Result, EngineError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Engine: Handler<M>,
    {
        match ask(&self.addr, msg, "engine", ASK_TIMEOUT).await {
            Ok(answer) => Ok(answer),
            // The registry actor is the engine: with it gone, nothing answers.
            Err(AskError::Stopped { .. }) => Err(EngineError::EngineStopped),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds a host (with its sim backend).
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// engine.add_host(HostConfig::new("c", NativeLayout::Kvm)).await?;
    /// // Host names are unique in an engine.
    /// let again = engine.add_host(HostConfig::new("c", NativeLayout::XenHvm)).await;
    /// assert!(matches!(again, Err(EngineError::DuplicateHost(_))));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn add_host(&self, config: HostConfig) -> Result<(), EngineError> {
        self.ask(AddHost(config)).await?
    }

    /// Creates and starts a VM on `host`.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// // A guest that dirties 10 MB/s of a 4 MiB working set.
    /// let spec = VmSpec {
    ///     workload: WorkloadSpec {
    ///         rate_bytes_per_sec: 10_000_000,
    ///         working_set_bytes: 4 << 20,
    ///         ..WorkloadSpec::default()
    ///     },
    ///     ..VmSpec::new("vm1", 16 << 20)
    /// };
    /// let vm = engine.create_vm("a", spec).await?;
    /// assert!(vm.state.is_running());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_vm(&self, host: &str, spec: VmSpec) -> Result<VmInfo, EngineError> {
        self.ask(CreateVmIn {
            host: host.to_string(),
            spec,
        })
        .await?
    }

    /// The VMs on `host`.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// engine.create_vm("a", VmSpec::new("vm2", 16 << 20)).await?;
    /// let mut ids: Vec<String> = engine.list_vms("a").await?.into_iter().map(|v| v.config.id.0).collect();
    /// ids.sort();
    /// assert_eq!(ids, ["vm1", "vm2"]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_vms(&self, host: &str) -> Result<Vec<VmInfo>, EngineError> {
        self.ask(ListVmsIn(host.to_string())).await?
    }

    /// One VM on `host`.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let vm = engine.vm_info("a", "vm1").await?;
    /// assert_eq!((vm.layout, vm.held), (NativeLayout::XenHvm, None));
    /// let absent = engine.vm_info("b", "vm1").await;
    /// assert!(matches!(absent, Err(EngineError::UnknownVm { .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn vm_info(&self, host: &str, vm: &str) -> Result<VmInfo, EngineError> {
        self.list_vms(host)
            .await?
            .into_iter()
            .find(|v| v.config.id.0 == vm)
            .ok_or_else(|| EngineError::UnknownVm {
                host: host.to_string(),
                vm: vm.to_string(),
            })
    }

    /// Moves VM `vm` of `host` to a QEMU started with `-incoming tcp:HOST:PORT` (the same
    /// machine type and RAM size; see README, "Moving VMs to and from QEMU"), in QEMU's own
    /// migration stream. The VM runs on exactly one side afterwards: on QEMU when this returns
    /// `Ok`, here after most errors, and paused here after
    /// [`Unconfirmed`](crate::engine::qemu::QemuLegError::Unconfirmed).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    pub async fn migrate_to_qemu(
        &self,
        host: &str,
        vm: &str,
        options: crate::engine::qemu::ToQemuOptions,
    ) -> Result<crate::engine::qemu::QemuLegReport, crate::engine::qemu::QemuLegError> {
        let (addr, _) = self.ask(crate::engine::qemu::QemuHostOf(host.to_string())).await??;
        crate::engine::qemu::outgoing::send(addr, vm.to_string(), options).await
    }

    /// Takes the migration QEMU sends on `stream` (QMP `migrate` to this side, with the
    /// `return-path` capability) into a new VM on `host`, whose backend must be kvm. QEMU hears
    /// success only once the VM runs here; on any error it hears failure and resumes its VM.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    pub async fn receive_from_qemu(
        &self,
        host: &str,
        stream: std::net::TcpStream,
        options: crate::engine::qemu::FromQemuOptions,
    ) -> Result<crate::engine::qemu::QemuLegReport, crate::engine::qemu::QemuLegError> {
        let (addr, backend) = self.ask(crate::engine::qemu::QemuHostOf(host.to_string())).await??;
        crate::engine::qemu::incoming::receive(addr, backend, stream, options).await
    }

    /// The address `host` accepts TCP migrations on, if it listens.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// // Port 0: the system picks one, and this says which.
    /// let listen = Some("127.0.0.1:0".parse().expect("an address"));
    /// engine.add_host(HostConfig { listen, ..HostConfig::new("tcp", NativeLayout::Kvm) }).await?;
    /// let addr = engine.listen_address("tcp").await?.expect("it listens");
    /// assert_ne!(addr.port(), 0);
    /// // An in-process host has no listener.
    /// assert_eq!(engine.listen_address("a").await?, None);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn listen_address(&self, host: &str) -> Result<Option<std::net::SocketAddr>, EngineError> {
        self.ask(ListenAddress(host.to_string())).await
    }

    /// Memory and VM count of `host`.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let usage = engine.host_usage("a").await?;
    /// assert_eq!((usage.vms, usage.committed_bytes), (1, 16 << 20));
    /// assert_eq!((usage.active_incoming, usage.held), (0, 0));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn host_usage(&self, host: &str) -> Result<HostUsage, EngineError> {
        self.ask(UsageOf(host.to_string())).await?
    }

    /// Starts a migration.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let request = MigrationRequest::new("vm1", "a", "b").algorithm(Algorithm::Auto);
    /// let mut started = engine.start_migration(request).await?;
    /// // The subscription sees every event from the first, up to the report.
    /// while let Ok(event) = started.events.recv().await {
    ///     match event {
    ///         MigrationEvent::StageCompleted { stage, duration } => println!("{stage}: {duration:?}"),
    ///         MigrationEvent::Finished(report) => {
    ///             assert_eq!(report.result, Outcome::Completed);
    ///             break;
    ///         }
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_migration(&self, request: MigrationRequest) -> Result<StartedMigration, EngineError> {
        let (id, events) = self.ask(StartMigration(request)).await??;
        Ok(StartedMigration { id, events })
    }

    /// Subscribes to a running migration's events (from now on).
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// // A bandwidth cap keeps it running long enough to subscribe.
    /// let mut request = MigrationRequest::new("vm1", "a", "b");
    /// request.shaping.bandwidth_bytes_per_sec = Some(32 << 20);
    /// let id = engine.start_migration(request).await?.id;
    /// let mut events = engine.subscribe(id).await?;
    /// let report = loop {
    ///     if let Ok(MigrationEvent::Finished(report)) = events.recv().await {
    ///         break report;
    ///     }
    /// };
    /// assert!(report.verified);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(&self, id: u64) -> Result<broadcast::Receiver<MigrationEvent>, EngineError> {
        self.ask(Subscribe(id)).await?
    }

    /// Cancels a migration before commitment; the VM keeps running on the source.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// // With one outgoing slot on `q`, vm2 waits behind a slow vm1; cancelled, it never starts.
    /// engine.add_host(HostConfig { max_outgoing: 1, ..HostConfig::new("q", NativeLayout::Kvm) }).await?;
    /// for vm in ["vm1", "vm2"] {
    ///     engine.create_vm("q", VmSpec::new(vm, 16 << 20)).await?;
    /// }
    /// let mut slow = MigrationRequest::new("vm1", "q", "b");
    /// slow.shaping.bandwidth_bytes_per_sec = Some(64 << 10);
    /// engine.start_migration(slow).await?;
    /// let queued = engine.start_migration(MigrationRequest::new("vm2", "q", "b")).await?;
    /// engine.cancel(queued.id).await?;
    /// let report = engine.report(queued.id).await?;
    /// assert_eq!((report.result, report.vm_location), (Outcome::Cancelled, VmLocation::Source));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn cancel(&self, id: u64) -> Result<(), EngineError> {
        self.ask(Cancel(id)).await?
    }

    /// Waits for a migration's report.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let started = engine.start_migration(MigrationRequest::new("vm1", "a", "b")).await?;
    /// let report = engine.report(started.id).await?;
    /// assert_eq!((report.result, report.vm_location), (Outcome::Completed, VmLocation::Target));
    /// println!("downtime {:.1} ms over {} rounds", report.downtime_s * 1e3, report.rounds);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn report(&self, id: u64) -> Result<MigrationReport, EngineError> {
        let rx = self.ask(WaitReport(id)).await??;
        rx.await.map_err(|_| EngineError::EngineStopped)
    }

    /// Status of a queued, running or recently finished migration.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let report = engine.migrate(MigrationRequest::new("vm1", "a", "b")).await?;
    /// let status = engine.status(report.id).await?;
    /// assert_eq!(status.status, Phase::Completed);
    /// assert_eq!(status.report, Some(report));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn status(&self, id: u64) -> Result<MigrationStatus, EngineError> {
        self.ask(GetStatus(id)).await?
    }

    /// Status of every queued, running and remembered migration.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let report = engine.migrate(MigrationRequest::new("vm1", "a", "b")).await?;
    /// let all = engine.list_migrations().await?;
    /// assert!(all.iter().any(|m| m.id == report.id && m.status == Phase::Completed));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_migrations(&self) -> Result<Vec<MigrationStatus>, EngineError> {
        self.ask(ListStatus).await
    }

    /// Deletes a VM that is not being migrated.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// engine.delete_vm("a", "vm1").await?;
    /// assert!(engine.list_vms("a").await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_vm(&self, host: &str, vm: &str) -> Result<(), EngineError> {
        self.ask(DeleteVmIn {
            host: host.to_string(),
            vm: vm.to_string(),
        })
        .await?
    }

    /// Graceful shutdown: every host refuses new incoming migrations and aborts those not yet
    /// committed (their VM stays on its source). Outgoing migrations are never cancelled: each
    /// runs to its end and moves a VM off this engine, or fails and leaves it here. Returns once
    /// nothing runs, or after `grace`, with the number still running.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let still_running = engine.shutdown(std::time::Duration::from_secs(10)).await?;
    /// assert_eq!(still_running, 0);
    /// // The hosts now refuse incoming migrations: this one is aborted and the VM stays.
    /// let report = engine.migrate(MigrationRequest::new("vm1", "a", "b")).await?;
    /// assert_eq!((report.result, report.vm_location), (Outcome::Aborted, VmLocation::Source));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self, grace: Duration) -> Result<usize, EngineError> {
        let ids = self.ask(BeginShutdown).await?;
        let deadline = tokio::time::Instant::now() + grace;
        for id in ids {
            if let Ok(Ok(rx)) = self.ask(WaitReport(id)).await {
                let _ = tokio::time::timeout_at(deadline, rx).await;
            }
        }
        Ok(self
            .list_migrations()
            .await?
            .iter()
            .filter(|m| matches!(m.status, super::Phase::Active | super::Phase::Queued))
            .count())
    }

    /// The first step of a graceful shutdown, without waiting: every host refuses new incoming
    /// migrations and aborts those not yet committed. Outgoing migrations go on. Watch
    /// [`Self::list_migrations`] and [`Self::host_usage`]'s `active_incoming` for the rest.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// engine.begin_shutdown().await?;
    /// let report = engine.migrate(MigrationRequest::new("vm1", "a", "b")).await?;
    /// assert_eq!((report.result, report.vm_location), (Outcome::Aborted, VmLocation::Source));
    /// assert_eq!(engine.host_usage("b").await?.active_incoming, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn begin_shutdown(&self) -> Result<(), EngineError> {
        self.ask(BeginShutdown).await.map(|_| ())
    }

    /// Operator action on a copy held after a migration failed past commitment: run it again.
    /// Fenced: the peer is asked first and must answer that it does not hold the VM; a peer that
    /// cannot be asked refuses the resume unless `peer_is_dead`.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// // A target that vanishes after `Commit` leaves the source's copy held.
    /// let mut request = MigrationRequest::new("vm1", "a", "b");
    /// request.faults = "target-crash@activation".parse().expect("a fault plan");
    /// engine.migrate(request).await?;
    /// let held = engine.vm_info("a", "vm1").await?.held.map(|h| h.reason);
    /// assert_eq!(held, Some(HeldReason::CommittedUnconfirmed));
    /// // The peer answers that it does not hold the VM: it runs here again.
    /// let vm = engine.resume_held("a", "vm1", false).await?;
    /// assert!(vm.state.is_running());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resume_held(&self, host: &str, vm: &str, peer_is_dead: bool) -> Result<VmInfo, EngineError> {
        self.ask(ResumeHeld {
            host: host.to_string(),
            vm: vm.to_string(),
            peer_is_dead,
        })
        .await?
    }

    /// Operator action on a source copy held after a post-copy pull that could not be
    /// recovered in time (`stale`): reconnect to the target, or to `to` where it listens now, and
    /// carry the pull on. The target's copy must still be waiting (held `awaiting-pages`).
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # let workload = WorkloadSpec { rate_bytes_per_sec: 20_000_000, ..WorkloadSpec::default() };
    /// # engine.create_vm("a", VmSpec { workload, ..VmSpec::new("vm1", 16 << 20) }).await?;
    /// // A post-copy pull whose link stays down longer than the recovery timeout.
    /// let mut request = MigrationRequest::new("vm1", "a", "b").algorithm(Algorithm::Postcopy);
    /// request.shaping.bandwidth_bytes_per_sec = Some(8_000_000);
    /// request.faults = "postcopy-link-loss:60s@pull".parse().expect("a fault plan");
    /// request.recovery_timeout = std::time::Duration::from_millis(300);
    /// let report = engine.migrate(request).await?;
    /// assert_eq!(report.vm_location, VmLocation::TargetAwaitingPages);
    /// let started = engine.recover_held("a", "vm1", None).await?;
    /// let report = engine.report(started.id).await?;
    /// assert_eq!((report.result, report.verified), (Outcome::Recovered, true));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn recover_held(
        &self,
        host: &str,
        vm: &str,
        to: Option<std::net::SocketAddr>,
    ) -> Result<StartedMigration, EngineError> {
        let (id, events) = self
            .ask(RecoverHeld {
                host: host.to_string(),
                vm: vm.to_string(),
                to,
                recovery_timeout: super::request::DEFAULT_RECOVERY_TIMEOUT,
            })
            .await??;
        Ok(StartedMigration { id, events })
    }

    /// Operator action on a held copy: destroy it.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// // A target that vanishes after `Commit` leaves the source's copy held.
    /// let mut request = MigrationRequest::new("vm1", "a", "b");
    /// request.faults = "target-crash@activation".parse().expect("a fault plan");
    /// engine.migrate(request).await?;
    /// let held = engine.vm_info("a", "vm1").await?.held.map(|h| h.reason);
    /// assert_eq!(held, Some(HeldReason::CommittedUnconfirmed));
    /// engine.discard_held("a", "vm1").await?;
    /// assert!(engine.vm_info("a", "vm1").await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn discard_held(&self, host: &str, vm: &str) -> Result<(), EngineError> {
        self.ask(DiscardHeld {
            host: host.to_string(),
            vm: vm.to_string(),
        })
        .await?
    }

    /// Starts a migration and waits for its report.
    ///
    /// ```
    /// # use migratory::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), EngineError> {
    /// # let engine = EngineHandle::start()?;
    /// # engine.add_host(HostConfig::new("a", NativeLayout::XenHvm)).await?;
    /// # engine.add_host(HostConfig::new("b", NativeLayout::Kvm)).await?;
    /// # engine.create_vm("a", VmSpec::new("vm1", 16 << 20)).await?;
    /// let report = engine.migrate(MigrationRequest::new("vm1", "a", "b").algorithm(Algorithm::Precopy)).await?;
    /// assert!(report.verified);
    /// // Verified after activation (the default): the digest comparison comes last.
    /// assert_eq!(report.stage_names().last(), Some(&"commitment"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn migrate(&self, request: MigrationRequest) -> Result<MigrationReport, EngineError> {
        let started = self.start_migration(request).await?;
        self.report(started.id).await
    }
}
