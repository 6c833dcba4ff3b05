//! What `migratory serve` does on SIGTERM: nothing is lost.
//!
//! 1. Stop taking new work: the API answers 503 to new VMs, the host refuses new incoming
//!    migrations and aborts the uncommitted ones (their VM stays on its source).
//! 2. Finish every migration that is running, in either direction: an outgoing one moves a VM
//!    away (it is never cancelled only to destroy the VM it kept), an incoming one past
//!    commitment (a post-copy pull included) brings a VM here.
//! 3. Evacuate: every VM still here goes to the `--drain-to` peers, one at a time.
//! 4. Exit only when no VM is left. Otherwise stay up, say which VMs hold the daemon and what
//!    each needs, and keep serving the API (an operator can move, resume or discard them),
//!    until they are gone or a second SIGTERM (or `POST /shutdown {"force": true}`) forces the
//!    exit, which names every VM it destroys.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use migratory::engine::{EngineHandle, Phase};
use migratory::protocol::Algorithm;

/// How often a waiting shutdown says what it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How often it looks again.
const POLL: Duration = Duration::from_millis(200);

/// How the shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// No VM is left here.
    Empty,
    /// Forced while VMs were still here; they were named and are destroyed with the process.
    Forced,
}

/// Runs steps 1 to 4. `force` turns true on a second SIGTERM or a forced shutdown request.
pub async fn graceful(
    engine: &EngineHandle,
    host: &str,
    drain_to: &[SocketAddr],
    mut force: watch::Receiver<bool>,
) -> Ended {
    if let Err(e) = engine.begin_shutdown().await {
        eprintln!("migratory: shutdown: {e}");
    }
    eprintln!("migratory: shutting down: no new work; finishing running migrations");
    if !wait_for_migrations(engine, host, &mut force).await {
        return forced(engine, host).await;
    }
    if !drain_to.is_empty() {
        let peers: Vec<String> = drain_to.iter().map(ToString::to_string).collect();
        eprintln!("migratory: evacuating to {}", peers.join(", "));
        let drained = tokio::select! {
            r = engine.drain(host, drain_to, Algorithm::Auto) => Some(r),
            _ = force.wait_for(|f| *f) => None,
        };
        match drained {
            Some(Ok(report)) => {
                for m in &report.moved {
                    eprintln!("migratory: moved VM {} to {} (migration {})", m.vm, m.to, m.migration);
                }
                for s in &report.stayed {
                    eprintln!("migratory: VM {} stays: {}", s.vm, s.why);
                }
            }
            Some(Err(e)) => eprintln!("migratory: evacuation failed: {e}"),
            None => return forced(engine, host).await,
        }
    }
    let mut last_report = tokio::time::Instant::now() - REPORT_EVERY;
    loop {
        let holding = holders(engine, host).await;
        if holding.is_empty() {
            return Ended::Empty;
        }
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = tokio::time::Instant::now();
            eprintln!(
                "migratory: staying up: {} VM(s) hold this host: {}. Move, resume or discard them, or send SIGTERM again to destroy them.",
                holding.len(),
                holding.join("; ")
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = force.wait_for(|f| *f) => return forced(engine, host).await,
        }
    }
}

/// Waits until no migration of this engine runs; false if forced first.
async fn wait_for_migrations(engine: &EngineHandle, host: &str, force: &mut watch::Receiver<bool>) -> bool {
    let mut last_report = tokio::time::Instant::now();
    loop {
        let outgoing = engine
            .list_migrations()
            .await
            .map(|m| {
                m.iter()
                    .filter(|s| matches!(s.status, Phase::Active | Phase::Queued))
                    .count()
            })
            .unwrap_or(1);
        // A question the engine cannot answer counts as something still running: exiting on
        // an error could take VMs with the process.
        let incoming = engine.host_usage(host).await.map(|u| u.active_incoming).unwrap_or(1);
        if outgoing == 0 && incoming == 0 {
            return true;
        }
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = tokio::time::Instant::now();
            eprintln!("migratory: waiting for {outgoing} outgoing and {incoming} incoming migration(s) to finish");
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = force.wait_for(|f| *f) => return false,
        }
    }
}

/// The VMs still here, each with what it needs.
async fn holders(engine: &EngineHandle, host: &str) -> Vec<String> {
    match engine.list_vms(host).await {
        Ok(vms) => vms
            .iter()
            .map(|v| match &v.held {
                Some(h) => format!("{} ({}: {})", v.config.id, h.reason.name(), h.reason.actions_text()),
                None => format!("{} ({})", v.config.id, v.state),
            })
            .collect(),
        Err(e) => vec![format!("(the VM list could not be read: {e})")],
    }
}

async fn forced(engine: &EngineHandle, host: &str) -> Ended {
    let holding = holders(engine, host).await;
    for vm in &holding {
        eprintln!("migratory: FORCED EXIT destroys VM {vm}");
    }
    if holding.is_empty() {
        Ended::Empty
    } else {
        Ended::Forced
    }
}
