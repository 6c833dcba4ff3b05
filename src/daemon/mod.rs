//! `migratory serve`: one host per process. It accepts migrations over TCP and serves the
//! HTTP/JSON control API (actix-web), and `/metrics` for Prometheus on a listener of its own.
//!
//! Who may do what:
//! * the control API over TCP needs `Authorization: Bearer <token>`, the token being the one in
//!   the token file (made at first start, mode 0600); over a Unix socket (`--api unix:PATH`,
//!   mode 0600) the file permissions are the guard, as for QMP and libvirt;
//! * `/metrics` (`--metrics ADDR`) needs nothing and serves nothing else;
//! * peers must prove the cluster key, without which the daemon does not start unless told
//!   `--insecure-no-auth`;
//! * fault injection needs `--enable-fault-injection`, and `--allow-peer` limits where VMs go;
//! * every VM id and host name is checked by [`check_name`] before it reaches the engine.

mod listen;
mod migrations;
mod ops;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod qemu;
mod refusal;
mod vms;

use listen::{bind_unix, serve_metrics};
use refusal::Refusal;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::JsonPayloadError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::ResponseError;
use actix_web::{web, App, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cli::token;
use migratory::api::ApiError;
use migratory::engine::{EngineHandle, HostConfig};
use migratory::format::{check_name, NativeLayout};
use migratory::link::tls::TlsSetup;
use migratory::protocol::auth::ClusterKey;
use migratory::units::ByteSize;
use migratory::vmm::BackendSpec;

/// Open API connections per worker (two workers).
const API_MAX_CONNECTIONS_PER_WORKER: usize = 512;

/// How long resolving a peer address may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest peer address (`HOST:PORT`) accepted: a DNS name plus a port.
const MAX_PEER_BYTES: usize = 261;

/// What the daemon says when it has no cluster key.
const NO_CLUSTER_KEY: &str = "no cluster key: peers could not prove who they are. Pass \
--cluster-key-file FILE or set MIGRATORY_CLUSTER_KEY; a key is at least 32 random bytes as hex, \
made for example with `(umask 077; head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \\n' > cluster.key)` \
and copied to every host. To send and accept unauthenticated migrations instead, pass --insecure-no-auth.";

/// Where the control API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    /// TCP; every request needs the bearer token.
    Tcp(SocketAddr),
    /// A Unix socket of mode 0600; no token.
    Unix(PathBuf),
}

impl std::str::FromStr for ApiListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs the socket's path, as in unix:/run/migratory/api.sock".into()),
            Some(path) => Ok(ApiListen::Unix(PathBuf::from(path))),
            None => s
                .parse()
                .map(ApiListen::Tcp)
                .map_err(|_| format!("{s:?} is neither HOST:PORT (an IP address) nor unix:PATH")),
        }
    }
}

/// Flags of `migratory serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to accept migrations on (port 0 picks one; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Where the HTTP control API listens: IP:PORT (every request needs the bearer token) or
    /// unix:PATH (a socket of mode 0600; no token).
    #[arg(long, default_value = "127.0.0.1:8000", value_name = "IP:PORT|unix:PATH")]
    api: ApiListen,
    /// File holding the API's bearer token; made (32 random bytes as hex, mode 0600) if absent
    /// [default: $MIGRATORY_API_TOKEN_FILE, else ~/.migratory/api-token].
    #[arg(long, value_name = "PATH")]
    api_token_file: Option<PathBuf>,
    /// Serve the API over mutual TLS with this host's --tls-cert and --tls-key: only clients
    /// whose certificate the cluster CA (--tls-ca) signed get an answer, and no bearer token is
    /// needed (the certificate is the credential).
    #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_ca"])]
    api_tls: bool,
    /// Serve `GET /metrics` for Prometheus on this address (no authentication, nothing else
    /// served there); no metrics endpoint without it.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<SocketAddr>,
    /// Accept `faults` in `POST /migrations` (for testing; refused with 403 otherwise).
    #[arg(long)]
    enable_fault_injection: bool,
    /// Peers VMs may be migrated to (HOST:PORT; comma-separated or repeated), and the only
    /// addresses whose connections the migration listener takes; any when absent.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    allow_peer: Vec<String>,
    /// Run without a cluster key: migrations are neither authenticated nor required to be.
    #[arg(long)]
    insecure_no_auth: bool,
    /// This host's name in reports.
    #[arg(long, default_value = "host")]
    name: String,
    /// Native vCPU layout of this host's backend (a kvm backend's is always `kvm`).
    #[arg(long, default_value = "kvm")]
    layout: NativeLayout,
    /// Hypervisor: `sim` or `kvm` (real guests on /dev/kvm; layout `kvm`).
    #[arg(long, default_value = "sim", value_parser = clap::builder::PossibleValuesParser::new(BackendSpec::NAMES))]
    backend: String,
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
    /// the daemon refuses to start unless given --insecure-no-auth).
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
    /// On SIGTERM, move every VM still here to these peers' migration listeners (HOST:PORT;
    /// comma-separated or repeated) before exiting. Without it a daemon that hosts VMs stays up
    /// after SIGTERM until they are gone or a second SIGTERM destroys them.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    drain_to: Vec<String>,
    /// Announce each NIC of a VM activated here on this interface (a tap, a bridge port or a
    /// veth) with rounds of RARP and gratuitous ARP frames, as QEMU does (needs CAP_NET_RAW);
    /// without it an activation is only an event.
    #[arg(long, value_name = "IFACE")]
    announce_via: Option<String>,
    /// Take live migrations from QEMU on this address (QMP `migrate tcp:ADDR`, with the
    /// `return-path` capability on): the VM resumes here on the kvm backend. QEMU's stream is
    /// not authenticated, so only --allow-peer addresses may connect when that list is given;
    /// bind a loopback or management address.
    #[arg(long, value_name = "IP:PORT")]
    qemu_incoming: Option<SocketAddr>,
}

struct State {
    engine: EngineHandle,
    host: String,
    /// The bearer token every request needs; `None` on a Unix socket.
    token: Option<String>,
    fault_injection: bool,
    allowed_peers: Option<AllowedPeers>,
    /// Set once a shutdown began: no new VM is created here.
    shutting_down: AtomicBool,
    /// Turns true when a shutdown must end now (a second SIGTERM, `POST /shutdown {force}`).
    force: tokio::sync::watch::Sender<bool>,
    /// `POST /shutdown` asks for what SIGTERM does.
    shutdown_requested: tokio::sync::Notify,
    /// The last evacuation started through `POST /drain`.
    drain: ops::SharedDrain,
}

/// The `--allow-peer` list: as given, and resolved at start.
#[derive(Debug)]
struct AllowedPeers {
    names: Vec<String>,
    addrs: Vec<SocketAddr>,
}

impl AllowedPeers {
    /// Resolves every entry (each must resolve, or the daemon does not start).
    async fn resolve(names: &[String]) -> Result<Option<Self>, String> {
        if names.is_empty() {
            return Ok(None);
        }
        let mut addrs = Vec::new();
        for name in names {
            check_peer(name).map_err(|e| format!("--allow-peer: {e}"))?;
            let found = resolve(name)
                .await
                .ok_or_else(|| format!("--allow-peer: cannot resolve {name:?} (HOST:PORT)"))?;
            addrs.extend(found);
        }
        Ok(Some(AllowedPeers {
            names: names.to_vec(),
            addrs,
        }))
    }

    fn permits(&self, to: &str, addr: SocketAddr) -> bool {
        self.names.iter().any(|n| n == to) || self.addrs.contains(&addr)
    }
}

/// Every address `peer` (`HOST:PORT`) resolves to, resolved off the worker thread and bounded in
/// time: a slow resolver must not stall the API. `None` when it resolves to nothing in time.
async fn resolve(peer: &str) -> Option<Vec<SocketAddr>> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(peer.to_string())).await {
        Ok(Ok(addrs)) => Some(addrs.collect::<Vec<_>>()).filter(|a| !a.is_empty()),
        _ => None,
    }
}

/// A peer address fit to resolve: printable ASCII without spaces, of bounded length. (It is an
/// address, not a name: `[::1]:7000` is fine here.)
fn check_peer(peer: &str) -> Result<(), String> {
    if peer.is_empty() || peer.len() > MAX_PEER_BYTES || !peer.bytes().all(|b| b.is_ascii_graphic()) {
        let shown: String = peer.chars().take(64).flat_map(char::escape_debug).collect();
        return Err(format!(
            "peer \"{shown}\" is not HOST:PORT (printable ASCII, at most {MAX_PEER_BYTES} bytes)"
        ));
    }
    Ok(())
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

/// `POST /vms/{id}/to-qemu` where QEMU migrations are built (x86-64 Linux).
fn qemu_routes(cfg: &mut web::ServiceConfig) {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    cfg.route("/vms/{id}/to-qemu", web::post().to(qemu::to_qemu));
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    let _ = cfg;
}

async fn run(args: ServeArgs, metrics: Option<PrometheusHandle>) -> Result<(), String> {
    check_name("host name", &args.name).map_err(|e| format!("--name: {e}"))?;
    let backend =
        BackendSpec::from_flags(&args.backend, Some(args.layout), NativeLayout::Kvm).map_err(|e| e.to_string())?;
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
    match (&key, args.insecure_no_auth) {
        (None, false) => return Err(NO_CLUSTER_KEY.to_string()),
        (None, true) => {
            eprintln!("migratory: warning: --insecure-no-auth: migrations are not authenticated")
        }
        (Some(_), _) => {}
    }
    let token = match &args.api {
        ApiListen::Tcp(_) if args.api_tls => None,
        ApiListen::Tcp(_) => Some(api_token(args.api_token_file.as_deref())?),
        ApiListen::Unix(_) if args.api_tls => return Err("--api-tls needs an IP:PORT API, not a Unix socket".into()),
        ApiListen::Unix(_) => None,
    };
    let allowed_peers = AllowedPeers::resolve(&args.allow_peer).await?;
    let mut drain_to = Vec::with_capacity(args.drain_to.len());
    for peer in &args.drain_to {
        check_peer(peer).map_err(|e| format!("--drain-to: {e}"))?;
        let found = resolve(peer)
            .await
            .ok_or_else(|| format!("--drain-to: cannot resolve {peer:?} (HOST:PORT)"))?;
        drain_to.extend(found.into_iter().next());
    }
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(c), Some(k), Some(ca)) => Some(TlsSetup::from_pem_files(c, k, ca).map_err(|e| e.to_string())?),
        _ => None,
    };
    // Every connection, idle or hostile, costs a descriptor: take what the hard limit allows.
    match migratory::link::tcp::raise_nofile_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit"),
        Err(e) => eprintln!("migratory: warning: cannot raise the open-file limit: {e}"),
    }
    if let Some(iface) = &args.announce_via {
        // Opened once now so a missing interface or privilege stops the start, not a migration.
        migratory::announce::PacketSocket::open(iface)
            .map_err(|e| format!("--announce-via: {}", crate::cli::error_text(&e)))?;
    }
    let engine = EngineHandle::start().map_err(|e| e.to_string())?;
    let host = HostConfig {
        listen: Some(args.listen),
        memory_budget_bytes: args.memory_budget.0,
        max_outgoing: args.max_outgoing,
        max_incoming: args.max_incoming,
        bandwidth_budget_bytes_per_sec: args.bandwidth_budget.map(|b| b.0),
        cluster_key: key,
        tls: tls.clone(),
        // The same list bounds who may connect: a connection from any other address is closed
        // before it can say anything.
        allowed_peers: allowed_peers
            .as_ref()
            .map(|a| a.addrs.iter().map(|addr| addr.ip()).collect()),
        announce_via: args.announce_via.clone(),
        ..HostConfig::with_backend(args.name.clone(), backend)
    };
    engine.add_host(host).await.map_err(|e| e.to_string())?;
    let migrations = engine
        .listen_address(&args.name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("migration listener did not start")?;
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    let qemu_note = match args.qemu_incoming {
        Some(addr) if args.backend == "kvm" => {
            let allowed = allowed_peers.as_ref().map(|a| a.addrs.iter().map(|p| p.ip()).collect());
            let bound = qemu::listen(engine.clone(), args.name.clone(), addr, allowed)?;
            format!(", QEMU migrations on {bound}")
        }
        Some(_) => return Err("--qemu-incoming needs --backend kvm: a VM from QEMU runs on the kvm backend".into()),
        None => String::new(),
    };
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    let qemu_note = match args.qemu_incoming {
        Some(_) => return Err("--qemu-incoming needs x86-64 Linux".into()),
        None => String::new(),
    };
    let metrics_addr = match args.metrics {
        Some(addr) => Some(serve_metrics(addr, metrics)?),
        None => None,
    };
    let state = web::Data::new(State {
        engine: engine.clone(),
        host: args.name.clone(),
        token,
        fault_injection: args.enable_fault_injection,
        allowed_peers,
        shutting_down: AtomicBool::new(false),
        force: tokio::sync::watch::channel(false).0,
        shutdown_requested: tokio::sync::Notify::new(),
        drain: ops::SharedDrain::default(),
    });
    let shared = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::JsonConfig::default().limit(64 * 1024).error_handler(refuse_body))
            .wrap(from_fn(require_token))
            .route("/vms", web::get().to(vms::list_vms))
            .route("/vms", web::post().to(vms::create_vm))
            .route("/vms/{id}", web::delete().to(vms::delete_vm))
            .route("/vms/{id}/resume", web::post().to(ops::resume_vm))
            .route("/vms/{id}/discard", web::post().to(ops::discard_vm))
            .route("/vms/{id}/recover", web::post().to(ops::recover_vm))
            .configure(qemu_routes)
            .route("/drain", web::post().to(ops::start_drain))
            .route("/drain", web::get().to(ops::drain_status))
            .route("/shutdown", web::post().to(ops::shutdown))
            .route("/migrations", web::get().to(migrations::list_migrations))
            .route("/migrations", web::post().to(migrations::start_migration))
            .route("/migrations/{id}", web::get().to(migrations::migration_status))
            .route("/migrations/{id}/cancel", web::post().to(migrations::cancel_migration))
    })
    .workers(2)
    // Bounded: each open API connection costs buffers, and a crowd of idle ones must not grow
    // the daemon without limit; beyond this, connections wait in the kernel's backlog.
    .max_connections(API_MAX_CONNECTIONS_PER_WORKER)
    .backlog(1024)
    .disable_signals();
    let (server, api) = match &args.api {
        ApiListen::Tcp(addr) => match tls.as_ref().filter(|_| args.api_tls) {
            Some(tls) => {
                let server = server
                    .bind_rustls_0_23(addr, (*tls.server).clone())
                    .map_err(|e| format!("cannot serve the API on {addr}: {e}"))?;
                let bound = server.addrs().first().copied().unwrap_or(*addr);
                (server, format!("https://{bound}"))
            }
            None => {
                let server = server
                    .bind(addr)
                    .map_err(|e| format!("cannot serve the API on {addr}: {e}"))?;
                let bound = server.addrs().first().copied().unwrap_or(*addr);
                (server, format!("http://{bound}"))
            }
        },
        ApiListen::Unix(path) => {
            let server = server
                .listen_uds(bind_unix(path)?)
                .map_err(|e| format!("cannot serve the API on unix:{}: {e}", path.display()))?;
            (server, format!("unix:{}", path.display()))
        }
    };
    let server = server.run();
    let handle = server.handle();
    // Polled on its own task: the server takes its stop command there, and it must keep
    // serving the API while a shutdown waits for VMs to leave.
    let mut server = actix_web::rt::spawn(server);
    let metrics_note = metrics_addr
        .map(|a| format!(", metrics on http://{a}/metrics"))
        .unwrap_or_default();
    // One line a supervisor (or a test) can read to learn the bound addresses.
    eprintln!(
        "migratory: host {} serving migrations on {migrations}, API on {api}{metrics_note}{qemu_note}",
        args.name
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        r = &mut server => {
            return match r {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the API server stopped: {e}")),
            }
        }
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = shared.shutdown_requested.notified() => {}
    }
    shared.shutting_down.store(true, Ordering::Release);
    // A second SIGTERM (or Ctrl-C) ends a shutdown that waits for VMs to leave.
    let forcer = shared.clone();
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("migratory: second SIGTERM: forcing the exit");
        forcer.force.send_replace(true);
    });
    let ended = crate::shutdown::graceful(&engine, &args.name, &drain_to, shared.force.subscribe()).await;
    handle.stop(true).await;
    if let ApiListen::Unix(path) = &args.api {
        let _ = std::fs::remove_file(path);
    }
    match ended {
        crate::shutdown::Ended::Empty => {
            eprintln!("migratory: stopped");
            Ok(())
        }
        crate::shutdown::Ended::Forced => Err("forced exit: the VMs named above were destroyed".into()),
    }
}

/// The API token from `flag`, else the default file; the file is made if absent, and a warning
/// is printed when others may read it.
fn api_token(flag: Option<&Path>) -> Result<String, String> {
    let path = match flag {
        Some(p) => p.to_path_buf(),
        None => token::default_path().ok_or_else(|| token::TokenError::NoDefaultPath.to_string())?,
    };
    let fail = |e: token::TokenError| crate::cli::error_text(&e);
    let (token, created) = token::create_or_read(&path).map_err(fail)?;
    if created {
        eprintln!("migratory: made the API token file {}", path.display());
    }
    if let Some(mode) = token::exposed_mode(&path) {
        eprintln!(
            "migratory: warning: the API token file {} has mode {mode:03o}: others on this machine may read it; chmod 600 it",
            path.display()
        );
    }
    Ok(token)
}

/// Lets a request through only with the right bearer token (when the listener needs one);
/// otherwise answers 401 saying whether the token was missing or wrong, never what it is.
async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let state = req.app_data::<web::Data<State>>().cloned();
    let Some(expected) = state.as_ref().and_then(|s| s.token.as_deref()) else {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    };
    let sent = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let Err(refusal) = token::check_bearer(sent, expected) else {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    };
    if refusal.wrong {
        tracing::warn!(peer = ?req.peer_addr(), "API request with a wrong bearer token refused");
    }
    let response = HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, refusal.challenge))
        .json(ApiError::new(refusal.message));
    Ok(req.into_response(response).map_into_right_body())
}

/// A body that is not the JSON its endpoint takes gets the API's error body too, with the
/// status actix chose (400, or 413 past the size limit).
fn refuse_body(err: JsonPayloadError, _: &actix_web::HttpRequest) -> actix_web::Error {
    Refusal::new(err.status_code(), err.to_string()).into()
}

/// The first address of the peer named in the request's `field`; refused (400) if it is not
/// `HOST:PORT` or resolves to nothing in time.
async fn resolve_peer(field: &str, peer: &str) -> Result<SocketAddr, Refusal> {
    check_peer(peer).map_err(|e| Refusal::field(field, e))?;
    resolve(peer).await.and_then(|a| a.first().copied()).ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("cannot resolve peer {peer:?} (host:port)"),
        )
    })
}

/// Refused (403) unless `--allow-peer` lets VMs go to `peer` (at `addr`).
fn permit_peer(state: &State, peer: &str, addr: SocketAddr) -> Result<(), Refusal> {
    match &state.allowed_peers {
        Some(allowed) if !allowed.permits(peer, addr) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("peer {peer:?} is not in this daemon's --allow-peer list"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_api_listen_parses_tcp_and_unix() {
        assert_eq!(
            "127.0.0.1:8000".parse::<ApiListen>(),
            Ok(ApiListen::Tcp("127.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<ApiListen>(),
            Ok(ApiListen::Unix(PathBuf::from("/run/m.sock")))
        );
        for bad in ["unix:", "localhost:8000", "8000", ""] {
            assert!(bad.parse::<ApiListen>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_peer_addresses_are_printable_and_bounded() {
        for ok in ["127.0.0.1:7000", "[::1]:7000", "host.example:1"] {
            assert_eq!(check_peer(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b:1", "a\0:1", "h\n:1", &"h".repeat(300)] {
            assert!(check_peer(bad).is_err(), "{bad:?}");
        }
    }
}
