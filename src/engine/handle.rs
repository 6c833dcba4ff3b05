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
    pub async fn add_host(&self, config: HostConfig) -> Result<(), EngineError> {
        self.ask(AddHost(config)).await?
    }

    /// Creates and starts a VM on `host`.
    pub async fn create_vm(&self, host: &str, spec: VmSpec) -> Result<VmInfo, EngineError> {
        self.ask(CreateVmIn {
            host: host.to_string(),
            spec,
        })
        .await?
    }

    /// The VMs on `host`.
    pub async fn list_vms(&self, host: &str) -> Result<Vec<VmInfo>, EngineError> {
        self.ask(ListVmsIn(host.to_string())).await?
    }

    /// One VM on `host`.
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

    /// The address `host` accepts TCP migrations on, if it listens.
    pub async fn listen_address(&self, host: &str) -> Result<Option<std::net::SocketAddr>, EngineError> {
        self.ask(ListenAddress(host.to_string())).await
    }

    /// Memory and VM count of `host`.
    pub async fn host_usage(&self, host: &str) -> Result<HostUsage, EngineError> {
        self.ask(UsageOf(host.to_string())).await?
    }

    /// Starts a migration.
    pub async fn start_migration(&self, request: MigrationRequest) -> Result<StartedMigration, EngineError> {
        let (id, events) = self.ask(StartMigration(request)).await??;
        Ok(StartedMigration { id, events })
    }

    /// Subscribes to a running migration's events (from now on).
    pub async fn subscribe(&self, id: u64) -> Result<broadcast::Receiver<MigrationEvent>, EngineError> {
        self.ask(Subscribe(id)).await?
    }

    /// Cancels a migration before commitment; the VM keeps running on the source.
    pub async fn cancel(&self, id: u64) -> Result<(), EngineError> {
        self.ask(Cancel(id)).await?
    }

    /// Waits for a migration's report.
    pub async fn report(&self, id: u64) -> Result<MigrationReport, EngineError> {
        let rx = self.ask(WaitReport(id)).await??;
        rx.await.map_err(|_| EngineError::EngineStopped)
    }

    /// Status of a queued, running or recently finished migration.
    pub async fn status(&self, id: u64) -> Result<MigrationStatus, EngineError> {
        self.ask(GetStatus(id)).await?
    }

    /// Status of every queued, running and remembered migration.
    pub async fn list_migrations(&self) -> Result<Vec<MigrationStatus>, EngineError> {
        self.ask(ListStatus).await
    }

    /// Deletes a VM that is not being migrated.
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
    pub async fn begin_shutdown(&self) -> Result<(), EngineError> {
        self.ask(BeginShutdown).await.map(|_| ())
    }

    /// Operator action on a copy held after a migration failed past commitment: run it again.
    /// Fenced: the peer is asked first and must answer that it does not hold the VM; a peer that
    /// cannot be asked refuses the resume unless `peer_is_dead`.
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
    pub async fn discard_held(&self, host: &str, vm: &str) -> Result<(), EngineError> {
        self.ask(DiscardHeld {
            host: host.to_string(),
            vm: vm.to_string(),
        })
        .await?
    }

    /// Starts a migration and waits for its report.
    pub async fn migrate(&self, request: MigrationRequest) -> Result<MigrationReport, EngineError> {
        let started = self.start_migration(request).await?;
        self.report(started.id).await
    }
}
