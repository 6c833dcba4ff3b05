//! The operator's endpoints: actions on held copies, evacuation, and a forced shutdown.
//!
//! | method and path | what it does |
//! |---|---|
//! | `POST /vms/{id}/resume` `{peer_is_dead?}` | run a held `committed-unconfirmed` copy again, fenced by asking the peer |
//! | `POST /vms/{id}/discard` | destroy a held copy |
//! | `POST /vms/{id}/recover` `{to?}` | carry a held post-copy pull on (`stale`); answers `202 {id}` |
//! | `POST /drain` `{to: [HOST:PORT...], algorithm?}` | move every VM to the peers, in the background (`202`) |
//! | `GET /drain` | the last evacuation: running, moved, stayed |
//! | `POST /shutdown` `{force?}` | shut down as SIGTERM does; `force` as a second SIGTERM does |

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use migratory::engine::{DrainReport, EngineError};
use migratory::format::check_name;
use migratory::protocol::Algorithm;

use super::{bad, bad_name, error, resolve, State, VmView};

/// The last evacuation started through the API.
#[derive(Debug, Default)]
pub(super) struct DrainState {
    running: bool,
    report: Option<DrainReport>,
    error: Option<String>,
}

/// Shared between the handlers and the background evacuation.
pub(super) type SharedDrain = std::sync::Arc<Mutex<DrainState>>;

fn held_error(e: &EngineError) -> HttpResponse {
    match e {
        EngineError::ActionNotApplicable { .. } | EngineError::Fenced { .. } => {
            bad(StatusCode::CONFLICT, e.to_string())
        }
        other => error(other),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResumeBody {
    #[serde(default)]
    peer_is_dead: bool,
}

pub(super) async fn resume_vm(
    state: web::Data<State>,
    id: web::Path<String>,
    body: Option<web::Json<ResumeBody>>,
) -> HttpResponse {
    if let Err(e) = check_name("VM id", &id) {
        return bad_name("id", &e);
    }
    let peer_is_dead = body.map(|b| b.peer_is_dead).unwrap_or(false);
    match state.engine.resume_held(&state.host, &id, peer_is_dead).await {
        Ok(v) => HttpResponse::Ok().json(VmView::from(&v)),
        Err(e) => held_error(&e),
    }
}

pub(super) async fn discard_vm(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    if let Err(e) = check_name("VM id", &id) {
        return bad_name("id", &e);
    }
    match state.engine.discard_held(&state.host, &id).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "discarded": id.as_str() })),
        Err(e) => held_error(&e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecoverBody {
    #[serde(default)]
    to: Option<String>,
}

pub(super) async fn recover_vm(
    state: web::Data<State>,
    id: web::Path<String>,
    body: Option<web::Json<RecoverBody>>,
) -> HttpResponse {
    if let Err(e) = check_name("VM id", &id) {
        return bad_name("id", &e);
    }
    let to = match body.and_then(|b| b.into_inner().to) {
        Some(peer) => match resolve_one(&peer).await {
            Ok(a) => Some(a),
            Err(r) => return r,
        },
        None => None,
    };
    match state.engine.recover_held(&state.host, &id, to).await {
        Ok(started) => HttpResponse::Accepted().json(serde_json::json!({ "id": started.id })),
        Err(e) => held_error(&e),
    }
}

async fn resolve_one(peer: &str) -> Result<SocketAddr, HttpResponse> {
    if let Err(e) = super::check_peer(peer) {
        return Err(bad(StatusCode::BAD_REQUEST, e));
    }
    match resolve(peer).await.and_then(|a| a.into_iter().next()) {
        Some(a) => Ok(a),
        None => Err(bad(
            StatusCode::BAD_REQUEST,
            format!("cannot resolve peer {peer:?} (host:port)"),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainBody {
    to: Vec<String>,
    #[serde(default)]
    algorithm: Option<String>,
}

/// At most this many peers in one evacuation request.
const MAX_DRAIN_PEERS: usize = 64;

pub(super) async fn start_drain(state: web::Data<State>, body: web::Json<DrainBody>) -> HttpResponse {
    let b = body.into_inner();
    if b.to.is_empty() || b.to.len() > MAX_DRAIN_PEERS {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("`to` takes 1 to {MAX_DRAIN_PEERS} peers, got {}", b.to.len()),
        );
    }
    let algorithm = match b.algorithm.as_deref().map(str::parse::<Algorithm>).transpose() {
        Ok(a) => a.unwrap_or(Algorithm::Auto),
        Err(e) => return bad(StatusCode::BAD_REQUEST, e),
    };
    let mut peers = Vec::with_capacity(b.to.len());
    for p in &b.to {
        let addr = match resolve_one(p).await {
            Ok(a) => a,
            Err(r) => return r,
        };
        if state
            .allowed_peers
            .as_ref()
            .is_some_and(|allowed| !allowed.permits(p, addr))
        {
            return bad(StatusCode::FORBIDDEN, format!("peer {p:?} is not in --allow-peer"));
        }
        peers.push(addr);
    }
    {
        let mut d = state.drain.lock().unwrap_or_else(|p| p.into_inner());
        if d.running {
            return bad(StatusCode::CONFLICT, "an evacuation is already running".into());
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
    HttpResponse::Accepted().json(serde_json::json!({ "draining": true }))
}

#[derive(Debug, Serialize)]
struct DrainView {
    running: bool,
    moved: Vec<serde_json::Value>,
    stayed: Vec<serde_json::Value>,
    error: Option<String>,
}

pub(super) async fn drain_status(state: web::Data<State>) -> HttpResponse {
    let d = state.drain.lock().unwrap_or_else(|p| p.into_inner());
    let (moved, stayed) = match &d.report {
        Some(r) => (
            r.moved
                .iter()
                .map(|m| serde_json::json!({ "vm": m.vm, "to": m.to.to_string(), "migration": m.migration }))
                .collect(),
            r.stayed
                .iter()
                .map(|s| serde_json::json!({ "vm": s.vm, "why": s.why }))
                .collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    HttpResponse::Ok().json(DrainView {
        running: d.running,
        moved,
        stayed,
        error: d.error.clone(),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ShutdownBody {
    #[serde(default)]
    force: bool,
}

pub(super) async fn shutdown(state: web::Data<State>, body: Option<web::Json<ShutdownBody>>) -> HttpResponse {
    let force = body.map(|b| b.force).unwrap_or(false);
    let already = state.shutting_down.swap(true, Ordering::AcqRel);
    if force {
        state.force.send_replace(true);
    } else if !already {
        state.shutdown_requested.notify_one();
    }
    HttpResponse::Accepted().json(serde_json::json!({ "shutting_down": true, "force": force }))
}
