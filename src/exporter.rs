//! The binary's Prometheus exporter: installed once per process by `demo` and `serve`, with
//! buckets that fit migration timescales. The library only records through `metrics`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use migratory::telemetry::metric;

/// Installs the recorder; `None` (with a warning) if another one is already installed.
pub fn install() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), metric::DURATION_BUCKETS_SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(metric::PRECOPY_ROUNDS.into()), metric::ROUND_BUCKETS));
    let handle = builder.and_then(|b| b.install_recorder());
    match handle {
        Ok(h) => {
            migratory::telemetry::describe_all();
            migratory::telemetry::register_zeroes();
            Some(h)
        }
        Err(e) => {
            eprintln!("migratory: metrics disabled: {e}");
            None
        }
    }
}

/// Serves `GET /metrics` on `addr` from a thread of its own (for `demo --metrics`); returns the
/// bound address.
pub fn serve_metrics(addr: SocketAddr, handle: PrometheusHandle) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One client at a time, each bounded in time and size, so none can hold the
                // endpoint for the others.
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(5)));
                let mut reader = BufReader::new(Read::take(&stream, 16 * 1024));
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                // Drain the headers; the request has no body.
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let (status, body) = if request.starts_with("GET /metrics ") {
                    ("200 OK", handle.render())
                } else {
                    ("404 Not Found", "only GET /metrics is served here\n".to_string())
                };
                let mut out = &stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(bound)
}
