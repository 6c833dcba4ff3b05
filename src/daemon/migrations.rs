//! `/migrations`: start, list, watch and cancel this host's outgoing migrations.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use migratory::api;
use migratory::engine::{FaultPlan, MigrationRequest, Priority};
use migratory::format::check_name;
use migratory::protocol::{Algorithm, CompressionChoice};

use super::{permit_peer, resolve_peer, Refusal, State};

/// Slowest bandwidth cap accepted for a migration (bytes/s).
const MIN_BANDWIDTH: u64 = 64 * 1024;

/// Longest deadline accepted for a migration's total time: a week, in seconds.
const MAX_DEADLINE_S: f64 = 7.0 * 86_400.0;

pub(super) async fn start_migration(
    state: web::Data<State>,
    body: web::Json<api::StartMigration>,
) -> Result<HttpResponse, Refusal> {
    let b = body.into_inner();
    check_name("VM id", &b.vm).map_err(|e| Refusal::field("vm", e))?;
    if b.faults.is_some() && !state.fault_injection {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "fault injection is off on this daemon: start it with --enable-fault-injection to accept `faults`",
        ));
    }
    let addr = resolve_peer("to", &b.to).await?;
    permit_peer(&state, &b.to, addr)?;
    let mut req = request_of(b, &state.host).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e))?;
    req.target_addr = Some(addr);
    let started = state.engine.start_migration(req).await?;
    Ok(HttpResponse::Accepted().json(api::MigrationStarted { id: started.id }))
}

/// The engine's request for `b` from `host`, or why `b` is refused (a 400).
fn request_of(b: api::StartMigration, host: &str) -> Result<MigrationRequest, String> {
    let algorithm = match b.algorithm.as_deref() {
        Some(a) => a.parse::<Algorithm>()?,
        None => Algorithm::Precopy,
    };
    let announce = b.announce_params().map_err(|e| e.to_string())?;
    let mut req = MigrationRequest::new(b.vm, host, b.to).algorithm(algorithm);
    req.announce = announce;
    if let Some(rate) = b.bandwidth_bytes_per_sec {
        if rate < MIN_BANDWIDTH {
            return Err(format!(
                "bandwidth_bytes_per_sec {rate} is below the minimum of {MIN_BANDWIDTH}"
            ));
        }
    }
    req.shaping.bandwidth_bytes_per_sec = b.bandwidth_bytes_per_sec;
    if let Some(plan) = b.faults.as_deref() {
        req.faults = plan.parse::<FaultPlan>().map_err(|e| e.to_string())?;
    }
    if let Some(s) = b.streams {
        req.streams = s;
    }
    if let Some(s) = b.recovery_timeout_s {
        if !(0.0..=86_400.0).contains(&s) {
            return Err(format!("recovery_timeout_s {s} out of range"));
        }
        req.recovery_timeout = Duration::from_secs_f64(s);
    }
    if let Some(c) = b.compression.as_deref() {
        req.compression = c.parse::<CompressionChoice>()?;
    }
    if let Some(n) = b.xbzrle_cache_bytes {
        req.xbzrle_cache_bytes = n;
    }
    req.seed = b.seed;
    if let Some(s) = b.deadline_s {
        if !(s > 0.0 && s <= MAX_DEADLINE_S) {
            return Err(format!(
                "deadline_s {s} out of range (above 0, at most {MAX_DEADLINE_S})"
            ));
        }
        req.deadline = Some(Duration::from_secs_f64(s));
    }
    if let Some(ms) = b.downtime_limit_ms {
        if !(0.0..=3_600_000.0).contains(&ms) {
            return Err(format!("downtime_limit_ms {ms} out of range"));
        }
        req.policy.downtime_limit = Duration::from_secs_f64(ms / 1e3);
    }
    if let Some(v) = b.verify.as_deref() {
        req.verify = v.parse()?;
    }
    if let Some(p) = b.priority.as_deref() {
        req.priority = p.parse::<Priority>()?;
    }
    req.min_bandwidth_bytes_per_sec = b.min_bandwidth_bytes_per_sec;
    Ok(req)
}

pub(super) async fn list_migrations(state: web::Data<State>) -> Result<HttpResponse, Refusal> {
    Ok(HttpResponse::Ok().json(state.engine.list_migrations().await?))
}

pub(super) async fn migration_status(state: web::Data<State>, id: web::Path<u64>) -> Result<HttpResponse, Refusal> {
    Ok(HttpResponse::Ok().json(state.engine.status(*id).await?))
}

pub(super) async fn cancel_migration(state: web::Data<State>, id: web::Path<u64>) -> Result<HttpResponse, Refusal> {
    state.engine.cancel(*id).await?;
    Ok(HttpResponse::Ok().json(api::CancelRequested {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_request_of_applies_the_body_and_refuses_what_is_out_of_range() {
        let mut b = api::StartMigration::new("vm1", "h:7000");
        b.algorithm = Some("postcopy".into());
        b.downtime_limit_ms = Some(50.0);
        let req = request_of(b.clone(), "a").unwrap();
        assert_eq!((req.algorithm, req.source.as_str()), (Algorithm::Postcopy, "a"));
        assert_eq!(req.policy.downtime_limit, Duration::from_millis(50));
        let qos = api::StartMigration {
            priority: Some("high".into()),
            min_bandwidth_bytes_per_sec: Some(1 << 20),
            ..b.clone()
        };
        let req = request_of(qos, "a").unwrap();
        assert_eq!(
            (req.priority, req.min_bandwidth_bytes_per_sec),
            (Priority::High, Some(1 << 20))
        );
        assert_eq!(req.announce, migratory::announce::AnnounceParams::default());
        let req = request_of(
            api::StartMigration {
                announce_rounds: Some(2),
                announce_max_ms: Some(90),
                ..b.clone()
            },
            "a",
        )
        .unwrap();
        assert_eq!((req.announce.rounds, req.announce.max_ms), (2, 90));
        assert_eq!((req.seed, req.deadline), (None, None));
        b.algorithm = Some("random".into());
        b.seed = Some(42);
        b.deadline_s = Some(5.0);
        let req = request_of(b.clone(), "a").unwrap();
        assert_eq!(req.algorithm, Algorithm::Random);
        assert_eq!((req.seed, req.deadline), (Some(42), Some(Duration::from_secs(5))));
        for bad in [
            api::StartMigration {
                algorithm: Some("teleport".into()),
                ..b.clone()
            },
            api::StartMigration {
                bandwidth_bytes_per_sec: Some(MIN_BANDWIDTH - 1),
                ..b.clone()
            },
            api::StartMigration {
                recovery_timeout_s: Some(-1.0),
                ..b.clone()
            },
            api::StartMigration {
                compression: Some("gzip".into()),
                ..b.clone()
            },
            api::StartMigration {
                priority: Some("urgent".into()),
                ..b.clone()
            },
            api::StartMigration {
                announce_rounds: Some(1001),
                ..b.clone()
            },
            api::StartMigration {
                deadline_s: Some(0.0),
                ..b.clone()
            },
            api::StartMigration {
                deadline_s: Some(f64::NAN),
                ..b.clone()
            },
        ] {
            assert!(request_of(bad.clone(), "a").is_err(), "{bad:?}");
        }
    }
}
