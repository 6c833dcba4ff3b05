//! `migratory serve`: one host per process. It accepts migrations over TCP and serves the
//! HTTP/JSON control API (actix-web) with `/metrics` for Prometheus.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use migratory::engine::{EngineError, EngineHandle, HostConfig, MigrationRequest, VmSpec};
use migratory::format::NativeLayout;
use migratory::link::tls::TlsSetup;
use migratory::protocol::auth::ClusterKey;
use migratory::protocol::Algorithm;
use migratory::units::ByteSize;
use migratory::vm::VmInfo;
use migratory::vmm::sim::{Pattern, WorkloadSpec};

/// Slowest bandwidth cap accepted for a migration (bytes/s).
const MIN_BANDWIDTH: u64 = 64 * 1024;

/// How long a SIGTERM waits for migrations past commitment to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Flags of `migratory serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to accept migrations on (port 0 picks one; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Address of the HTTP control API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    api: SocketAddr,
    /// This host's name in reports.
    #[arg(long, default_value = "host")]
    name: String,
    /// Native vCPU layout of this host's sim backend.
    #[arg(long, default_value = "kvm")]
    layout: NativeLayout,
    /// Hypervisor: `sim` or `kvm` (real guests on /dev/kvm; layout `kvm`).
    #[arg(long, default_value = "sim")]
    backend: migratory::vmm::BackendKind,
    /// Memory budget for VMs and incoming reservations.
    #[arg(long, default_value = "16GiB")]
    memory_budget: ByteSize,
    /// Bandwidth shared by all outgoing migrations (bytes/s); unlimited by default.
    #[arg(long)]
    bandwidth_budget: Option<ByteSize>,
    /// Outgoing migrations at once; more are queued.
    #[arg(long, default_value_t = 4)]
    max_outgoing: usize,
    /// Incoming migrations at once; more wait for a slot (up to 60 s).
    #[arg(long, default_value_t = 4)]
    max_incoming: usize,
    /// File holding the cluster key (else the MIGRATORY_CLUSTER_KEY variable; with neither,
    /// migrations are unauthenticated).
    #[arg(long)]
    cluster_key_file: Option<std::path::PathBuf>,
    /// PEM certificate chain of this host: with --tls-key and --tls-ca, every stream of every
    /// migration runs over TLS with mutual authentication.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of this host.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<std::path::PathBuf>,
    /// PEM certificate of the cluster CA that signs every host.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<std::path::PathBuf>,
}

struct State {
    engine: EngineHandle,
    host: String,
    metrics: Option<PrometheusHandle>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(args: ServeArgs) -> ExitCode {
    let metrics = crate::exporter::install();
    // Logs go to stderr, filtered by RUST_LOG (default: info).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let system = actix_web::rt::System::new();
    match system.block_on(run(args, metrics)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migratory: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: ServeArgs, metrics: Option<PrometheusHandle>) -> Result<(), String> {
    let key = match &args.cluster_key_file {
        Some(path) => {
            let loaded = ClusterKey::from_file(path).map_err(|e| e.to_string())?;
            if let Some(loose) = loaded.loose_permissions {
                eprintln!("migratory: warning: {loose}");
            }
            Some(loaded.key)
        }
        None => ClusterKey::from_env().map_err(|e| e.to_string())?,
    };
    if key.is_none() {
        eprintln!("migratory: warning: no cluster key; migrations are not authenticated");
    }
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(c), Some(k), Some(ca)) => Some(TlsSetup::from_pem_files(c, k, ca).map_err(|e| e.to_string())?),
        _ => None,
    };
    let engine = EngineHandle::start().map_err(|e| e.to_string())?;
    let host = HostConfig {
        listen: Some(args.listen),
        memory_budget_bytes: args.memory_budget.0,
        max_outgoing: args.max_outgoing,
        max_incoming: args.max_incoming,
        bandwidth_budget_bytes_per_sec: args.bandwidth_budget.map(|b| b.0),
        cluster_key: key,
        tls,
        backend: args.backend,
        ..HostConfig::new(args.name.clone(), args.layout)
    };
    engine.add_host(host).await.map_err(|e| e.to_string())?;
    let migrations = engine
        .listen_address(&args.name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("migration listener did not start")?;
    let state = web::Data::new(State {
        engine: engine.clone(),
        host: args.name.clone(),
        metrics,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::JsonConfig::default().limit(64 * 1024))
            .route("/vms", web::get().to(list_vms))
            .route("/vms", web::post().to(create_vm))
            .route("/vms/{id}", web::delete().to(delete_vm))
            .route("/migrations", web::get().to(list_migrations))
            .route("/migrations", web::post().to(start_migration))
            .route("/migrations/{id}", web::get().to(migration_status))
            .route("/migrations/{id}/cancel", web::post().to(cancel_migration))
            .route("/metrics", web::get().to(metrics_text))
    })
    .workers(2)
    .disable_signals()
    .bind(args.api)
    .map_err(|e| format!("cannot serve the API on {}: {e}", args.api))?;
    let api = server.addrs().first().copied().unwrap_or(args.api);
    let server = server.run();
    let handle = server.handle();
    // One line a supervisor (or a test) can read to learn the bound addresses.
    eprintln!(
        "migratory: host {} serving migrations on {migrations}, API on http://{api}",
        args.name
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        r = server => return r.map_err(|e| e.to_string()),
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("migratory: shutting down: cancelling outgoing migrations, aborting incoming ones");
    let still = engine.shutdown(SHUTDOWN_GRACE).await.map_err(|e| e.to_string())?;
    if still > 0 {
        eprintln!("migratory: {still} migrations past commitment still running after {SHUTDOWN_GRACE:?}");
    }
    handle.stop(true).await;
    eprintln!("migratory: stopped");
    Ok(())
}

fn error(e: &EngineError) -> HttpResponse {
    let status = match e {
        EngineError::UnknownHost(_) | EngineError::UnknownVm { .. } | EngineError::UnknownMigration(_) => {
            StatusCode::NOT_FOUND
        }
        EngineError::DuplicateVm(_) | EngineError::TooLateToCancel(_) | EngineError::InsufficientMemory { .. } => {
            StatusCode::CONFLICT
        }
        EngineError::InvalidConfig(_) | EngineError::Vm(_) => StatusCode::BAD_REQUEST,
        EngineError::Link { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    bad(status, e.to_string())
}

fn bad(status: StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message }))
}

#[derive(Debug, Serialize)]
struct VmView {
    id: String,
    state: String,
    memory_bytes: u64,
    vcpus: u32,
    layout: String,
    /// Pages the guest wrote (for a kvm guest, its own progress counter, carried across moves).
    writes: u64,
    /// Verify passes of a self-checking guest.
    verify_passes: u64,
    /// Pages a self-checking guest found not as it wrote them; must stay 0.
    integrity_errors: u64,
}

impl From<&VmInfo> for VmView {
    fn from(v: &VmInfo) -> Self {
        Self {
            id: v.config.id.0.clone(),
            state: v.state.name().to_string(),
            memory_bytes: v.config.memory_bytes,
            vcpus: v.config.vcpus,
            layout: v.layout.to_string(),
            writes: v.stats.writes,
            verify_passes: v.stats.verify_passes,
            integrity_errors: v.stats.integrity_errors,
        }
    }
}

async fn list_vms(state: web::Data<State>) -> HttpResponse {
    match state.engine.list_vms(&state.host).await {
        Ok(vms) => HttpResponse::Ok().json(vms.iter().map(VmView::from).collect::<Vec<_>>()),
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
struct CreateVm {
    id: String,
    memory_bytes: u64,
    #[serde(default = "two")]
    vcpus: u32,
    #[serde(default)]
    dirty_rate_bytes_per_sec: u64,
    #[serde(default = "default_working_set")]
    working_set_bytes: u64,
    #[serde(default)]
    pattern: Option<String>,
}

fn two() -> u32 {
    2
}

fn default_working_set() -> u64 {
    64 << 20
}

async fn create_vm(state: web::Data<State>, body: web::Json<CreateVm>) -> HttpResponse {
    let b = body.into_inner();
    let pattern = match b.pattern.as_deref().map(str::parse::<Pattern>).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => return bad(StatusCode::BAD_REQUEST, e),
    };
    let spec = VmSpec {
        vcpus: b.vcpus,
        workload: WorkloadSpec {
            rate_bytes_per_sec: b.dirty_rate_bytes_per_sec,
            working_set_bytes: b.working_set_bytes,
            pattern,
            ..WorkloadSpec::default()
        },
        ..VmSpec::new(b.id, b.memory_bytes)
    };
    match state.engine.create_vm(&state.host, spec).await {
        Ok(v) => HttpResponse::Created().json(VmView::from(&v)),
        Err(e) => error(&e),
    }
}

async fn delete_vm(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    match state.engine.delete_vm(&state.host, &id).await {
        Ok(()) => HttpResponse::NoContent().finish(),
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
struct StartMigration {
    vm: String,
    to: String,
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(default)]
    streams: Option<u8>,
    #[serde(default)]
    bandwidth_bytes_per_sec: Option<u64>,
    #[serde(default)]
    downtime_limit_ms: Option<f64>,
    /// Faults to inject, `KIND[@STAGE],...` (source side; target-side kinds need an
    /// in-process target).
    #[serde(default)]
    faults: Option<String>,
    /// Post-copy: seconds to keep reconnecting after the link fails in the pull phase (0 turns
    /// recovery off; default 60).
    #[serde(default)]
    recovery_timeout_s: Option<f64>,
    /// Page encoding: `off`, `lz4`, `xbzrle`, `both` or `auto` (default).
    #[serde(default)]
    compression: Option<String>,
    /// Bytes of the source's XBZRLE cache (default 64 MiB, never more than the VM).
    #[serde(default)]
    xbzrle_cache_bytes: Option<u64>,
}

async fn start_migration(state: web::Data<State>, body: web::Json<StartMigration>) -> HttpResponse {
    let b = body.into_inner();
    let algorithm = match b.algorithm.as_deref().map(str::parse::<Algorithm>).transpose() {
        Ok(a) => a.unwrap_or(Algorithm::Precopy),
        Err(e) => return bad(StatusCode::BAD_REQUEST, e),
    };
    let not_found = || {
        bad(
            StatusCode::BAD_REQUEST,
            format!("cannot resolve peer {:?} (host:port)", b.to),
        )
    };
    // Resolved off the worker thread and bounded: a slow resolver must not stall the API.
    let resolved = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(b.to.clone())).await;
    let addr = match resolved {
        Ok(Ok(mut a)) => match a.next() {
            Some(a) => a,
            None => return not_found(),
        },
        _ => return not_found(),
    };
    if let Some(rate) = b.bandwidth_bytes_per_sec {
        if rate < MIN_BANDWIDTH {
            return bad(
                StatusCode::BAD_REQUEST,
                format!("bandwidth_bytes_per_sec {rate} is below the minimum of {MIN_BANDWIDTH}"),
            );
        }
    }
    let faults = match b
        .faults
        .as_deref()
        .map(str::parse::<migratory::engine::FaultPlan>)
        .transpose()
    {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return bad(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut req = MigrationRequest::new(b.vm, state.host.clone(), b.to).algorithm(algorithm);
    req.faults = faults;
    req.target_addr = Some(addr);
    if let Some(s) = b.streams {
        req.streams = s;
    }
    req.shaping.bandwidth_bytes_per_sec = b.bandwidth_bytes_per_sec;
    if let Some(s) = b.recovery_timeout_s {
        if !(0.0..=86_400.0).contains(&s) {
            return bad(StatusCode::BAD_REQUEST, format!("recovery_timeout_s {s} out of range"));
        }
        req.recovery_timeout = Duration::from_secs_f64(s);
    }
    if let Some(c) = b.compression.as_deref() {
        match c.parse::<migratory::protocol::CompressionChoice>() {
            Ok(c) => req.compression = c,
            Err(e) => return bad(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
    if let Some(n) = b.xbzrle_cache_bytes {
        req.xbzrle_cache_bytes = n;
    }
    if let Some(ms) = b.downtime_limit_ms {
        if !(0.0..=3_600_000.0).contains(&ms) {
            return bad(StatusCode::BAD_REQUEST, format!("downtime_limit_ms {ms} out of range"));
        }
        req.policy.downtime_limit = Duration::from_secs_f64(ms / 1e3);
    }
    match state.engine.start_migration(req).await {
        Ok(started) => HttpResponse::Accepted().json(serde_json::json!({ "id": started.id })),
        Err(e) => error(&e),
    }
}

async fn list_migrations(state: web::Data<State>) -> HttpResponse {
    match state.engine.list_migrations().await {
        Ok(m) => HttpResponse::Ok().json(m),
        Err(e) => error(&e),
    }
}

async fn migration_status(state: web::Data<State>, id: web::Path<u64>) -> HttpResponse {
    match state.engine.status(*id).await {
        Ok(s) => HttpResponse::Ok().json(s),
        Err(e) => error(&e),
    }
}

async fn cancel_migration(state: web::Data<State>, id: web::Path<u64>) -> HttpResponse {
    match state.engine.cancel(*id).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({})),
        Err(e) => error(&e),
    }
}

async fn metrics_text(state: web::Data<State>) -> HttpResponse {
    match &state.metrics {
        Some(h) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(h.render()),
        None => bad(StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder".into()),
    }
}
