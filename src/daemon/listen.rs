//! The daemon's listeners other than the API's TCP port: its Unix socket, and the separate
//! `/metrics` listener for Prometheus.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;

use super::Refusal;

/// Binds the API's Unix socket with mode 0600. A socket left by a daemon that died (nobody
/// answers on it) is replaced; anything else at the path is left alone and refused.
pub(super) fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            let stale = is_socket
                && UnixStream::connect(path).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(format!(
                    "cannot serve the API on unix:{shown}: the path exists and is not a dead socket"
                ));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {shown}: {e}"))?;
            UnixListener::bind(path).map_err(|e| format!("cannot serve the API on unix:{shown}: {e}"))?
        }
        Err(e) => return Err(format!("cannot serve the API on unix:{shown}: {e}")),
    };
    // The socket is created with the umask's mode; connecting needs write permission, so with a
    // usual umask (022) nobody else can connect in the instant before this.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {shown} private: {e}"))?;
    Ok(listener)
}

/// Serves `GET /metrics`, and nothing else, on `addr`; returns the bound address.
pub(super) fn serve_metrics(addr: SocketAddr, metrics: Option<PrometheusHandle>) -> Result<SocketAddr, String> {
    let metrics = web::Data::new(metrics);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(metrics.clone())
            .route("/metrics", web::get().to(metrics_text))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)
    .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    actix_web::rt::spawn(server.run());
    Ok(bound)
}

async fn metrics_text(metrics: web::Data<Option<PrometheusHandle>>) -> Result<HttpResponse, Refusal> {
    let handle = metrics
        .get_ref()
        .as_ref()
        .ok_or_else(|| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder"))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(handle.render()))
}
