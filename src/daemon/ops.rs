//! The operator's endpoints: actions on held copies (`/vms/{id}/resume|discard|recover`),
//! evacuation (`/drain`), and a shutdown as SIGTERM does it (`/shutdown`). Their bodies, and
//! the table of every endpoint, are in [`migratory::api`].

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use migratory::api;
use migratory::engine::DrainReport;
use migratory::format::check_name;
use migratory::protocol::Algorithm;

use super::{permit_peer, resolve_peer, Refusal, State};

/// The last evacuation started through the API.
#[derive(Debug, Default)]
pub(super) struct DrainState {
    running: bool,
    report: Option<DrainReport>,
    error: Option<String>,
}

/// Shared between the handlers and the background evacuation.
pub(super) type SharedDrain = std::sync::Arc<Mutex<DrainState>>;

pub(super) async fn resume_vm(
    state: web::Data<State>,
    id: web::Path<String>,
    body: Option<web::Json<api::ResumeVm>>,
) -> Result<HttpResponse, Refusal> {
    check_name("VM id", &id).map_err(|e| Refusal::field("id", e))?;
    let peer_is_dead = body.is_some_and(|b| b.peer_is_dead);
    let vm = state.engine.resume_held(&state.host, &id, peer_is_dead).await?;
    Ok(HttpResponse::Ok().json(api::Vm::from(&vm)))
}

pub(super) async fn discard_vm(state: web::Data<State>, id: web::Path<String>) -> Result<HttpResponse, Refusal> {
    check_name("VM id", &id).map_err(|e| Refusal::field("id", e))?;
    state.engine.discard_held(&state.host, &id).await?;
    Ok(HttpResponse::Ok().json(api::Discarded {
        discarded: id.into_inner(),
    }))
}

pub(super) async fn recover_vm(
    state: web::Data<State>,
    id: web::Path<String>,
    body: Option<web::Json<api::RecoverVm>>,
) -> Result<HttpResponse, Refusal> {
    check_name("VM id", &id).map_err(|e| Refusal::field("id", e))?;
    let to = match body.and_then(|b| b.into_inner().to) {
        // A recovery to a new peer sends the VM's pages there: the same allow-list as a
        // migration.
        Some(peer) => {
            let addr = resolve_peer("to", &peer).await?;
            permit_peer(&state, &peer, addr)?;
            Some(addr)
        }
        None => None,
    };
    let started = state.engine.recover_held(&state.host, &id, to).await?;
    Ok(HttpResponse::Accepted().json(api::MigrationStarted { id: started.id }))
}

/// At most this many peers in one evacuation request.
const MAX_DRAIN_PEERS: usize = 64;

pub(super) async fn start_drain(
    state: web::Data<State>,
    body: web::Json<api::StartDrain>,
) -> Result<HttpResponse, Refusal> {
    let b = body.into_inner();
    if b.to.is_empty() || b.to.len() > MAX_DRAIN_PEERS {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("`to` takes 1 to {MAX_DRAIN_PEERS} peers, got {}", b.to.len()),
        ));
    }
    let algorithm = match b.algorithm.as_deref() {
        Some(a) => a
            .parse::<Algorithm>()
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e))?,
        None => Algorithm::Auto,
    };
    let mut peers = Vec::with_capacity(b.to.len());
    for p in &b.to {
        let addr = resolve_peer("to", p).await?;
        permit_peer(&state, p, addr)?;
        peers.push(addr);
    }
    {
        let mut d = state.drain.lock().unwrap_or_else(|p| p.into_inner());
        if d.running {
            return Err(Refusal::new(StatusCode::CONFLICT, "an evacuation is already running"));
        }
        *d = DrainState {
            running: true,
            ..DrainState::default()
        };
    }
    let (engine, host, drain) = (state.engine.clone(), state.host.clone(), state.drain.clone());
    actix_web::rt::spawn(async move {
        let result = engine.drain(&host, &peers, algorithm).await;
        let mut d = drain.lock().unwrap_or_else(|p| p.into_inner());
        d.running = false;
        match result {
            Ok(r) => d.report = Some(r),
            Err(e) => d.error = Some(e.to_string()),
        }
    });
    Ok(HttpResponse::Accepted().json(api::DrainStarted { draining: true }))
}

pub(super) async fn drain_status(state: web::Data<State>) -> HttpResponse {
    let d = state.drain.lock().unwrap_or_else(|p| p.into_inner());
    HttpResponse::Ok().json(api::DrainStatus::new(d.running, d.report.as_ref(), d.error.clone()))
}

pub(super) async fn shutdown(state: web::Data<State>, body: Option<web::Json<api::Shutdown>>) -> HttpResponse {
    let force = body.is_some_and(|b| b.force);
    let already = state.shutting_down.swap(true, Ordering::AcqRel);
    if force {
        state.force.send_replace(true);
    } else if !already {
        state.shutdown_requested.notify_one();
    }
    HttpResponse::Accepted().json(api::ShutdownStarted {
        shutting_down: true,
        force,
    })
}
