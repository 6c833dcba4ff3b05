//! The daemon's QEMU peer: `POST /vms/{id}/to-qemu`, and the `--qemu-incoming` listener that
//! takes migrations QEMU sends.
//!
//! QEMU's stream carries no authentication: whoever reaches the listener can hand this host a
//! VM. So the listener is off unless asked for, and takes connections only from `--allow-peer`
//! addresses when that list is given; bind it to a loopback or management address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use migratory::api;
use migratory::engine::qemu::{FromQemuOptions, QemuLegError, ToQemuOptions};
use migratory::engine::EngineHandle;
use migratory::format::check_name;
use migratory::protocol::Algorithm;
use migratory::qemu::Accel;

use super::{Refusal, State};

/// How long the listener waits between two failed accepts (out of descriptors, ...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn refusal(e: QemuLegError) -> Refusal {
    let status = match &e {
        QemuLegError::Refused(_) => StatusCode::CONFLICT,
        QemuLegError::Engine(inner) => return Refusal::from(inner.clone()),
        QemuLegError::Unconfirmed { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    Refusal::new(status, e.to_string())
}

pub(super) async fn to_qemu(
    state: web::Data<State>,
    id: web::Path<String>,
    body: web::Json<api::ToQemu>,
) -> Result<HttpResponse, Refusal> {
    check_name("VM id", &id).map_err(|e| Refusal::field("id", e))?;
    let b = body.into_inner();
    let addr: SocketAddr = b
        .addr
        .parse()
        .map_err(|_| Refusal::field("addr", format!("{:?} is not IP:PORT", b.addr)))?;
    let mut options = ToQemuOptions::new(addr);
    if let Some(m) = b.machine {
        check_name("machine", &m).map_err(|e| Refusal::field("machine", e))?;
        options.machine = m;
    }
    match b.accel.as_deref() {
        None | Some("kvm") => {}
        Some("tcg") => options.accel = Accel::Tcg,
        Some(other) => return Err(Refusal::field("accel", format!("{other:?} is neither kvm nor tcg"))),
    }
    if let Some(a) = b.algorithm {
        options.algorithm = a
            .parse::<Algorithm>()
            .map_err(|e| Refusal::field("algorithm", e.to_string()))?;
    }
    if let Some(ms) = b.downtime_limit_ms {
        if !(ms.is_finite() && ms > 0.0) {
            return Err(Refusal::field(
                "downtime_limit_ms",
                format!("{ms} is not a positive number"),
            ));
        }
        options.policy.downtime_limit = Duration::from_secs_f64(ms / 1e3);
    }
    let report = state
        .engine
        .migrate_to_qemu(&state.host, &id, options)
        .await
        .map_err(refusal)?;
    Ok(HttpResponse::Ok().json(api::QemuLeg::from(&report)))
}

/// Binds `addr` and takes QEMU's migrations into `host`, one at a time (a second QEMU waits in
/// the backlog), from `allowed` addresses only when given. Returns the bound address.
pub(super) fn listen(
    engine: EngineHandle,
    host: String,
    addr: SocketAddr,
    allowed: Option<Vec<IpAddr>>,
) -> Result<SocketAddr, String> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("--qemu-incoming: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("--qemu-incoming: {e}"))?;
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("migratory-qemu-in".into())
        .spawn(move || loop {
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a QEMU migration");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            if let Some(allowed) = &allowed {
                if !allowed.contains(&peer.ip()) {
                    tracing::warn!(%peer, "QEMU migration from an address not in --allow-peer: closed");
                    continue;
                }
            }
            tracing::info!(%peer, "QEMU migration arriving");
            let done = runtime.block_on(engine.receive_from_qemu(&host, stream, FromQemuOptions::default()));
            match done {
                Ok(r) => {
                    tracing::info!(vm = %r.vm, downtime_ms = r.downtime.as_secs_f64() * 1e3, "VM arrived from QEMU and runs here")
                }
                Err(e) => tracing::error!(%peer, error = %e, "migration from QEMU failed; the VM stays on QEMU"),
            }
        })
        .map_err(|e| format!("--qemu-incoming: cannot start its thread: {e}"))?;
    Ok(bound)
}
