//! Just enough HTTP/1.1 to drive a loopback daemon started by this run: one request per
//! connection, bearer token, JSON in and out.
//!
//! The CLI's full client (`cli::client`) is private to the `cli` module; once it is
//! `pub(crate)`, this file should go and [`Api`] should wrap that client instead.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// How long connecting, and each read or write, may take: the daemons are on loopback, so
/// anything slower means one is wedged or gone.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read; a `GET /migrations/{id}` report is a few KiB.
const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// Why a request to a daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, sending or reading failed.
    #[error("{method} {path} on {addr}: {source}")]
    Io {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The daemon's API address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not an HTTP response with a JSON body.
    #[error("{method} {path} on {addr}: malformed answer: {reason}")]
    Malformed {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The daemon's API address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The daemon answered with a non-2xx status.
    #[error("{method} {path} on {addr}: {status}: {message}")]
    Refused {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The daemon's API address.
        addr: SocketAddr,
        /// The HTTP status.
        status: u16,
        /// The daemon's `error` text, or the body.
        message: String,
    },
}

/// One daemon's control API over TCP.
#[derive(Debug, Clone)]
pub struct Api {
    addr: SocketAddr,
    token: String,
}

impl Api {
    /// The API at `addr`, sending `token` with every request.
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Self { addr, token }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, HttpError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.request("POST", path, Some(body))
    }

    fn request(&self, method: &'static str, path: &str, body: Option<&Value>) -> Result<Value, HttpError> {
        let io = |source| HttpError::Io {
            method,
            path: path.to_string(),
            addr: self.addr,
            source,
        };
        let malformed = |reason: String| HttpError::Malformed {
            method,
            path: path.to_string(),
            addr: self.addr,
            reason,
        };
        let body = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token,
            body.len()
        );
        let mut stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).map_err(io)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body.as_bytes()).map_err(io)?;
        let mut answer = Vec::new();
        // `Connection: close` lets the end of the stream frame the body.
        stream
            .take(MAX_RESPONSE_BYTES + 1)
            .read_to_end(&mut answer)
            .map_err(io)?;
        if answer.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(malformed(format!("over {MAX_RESPONSE_BYTES} bytes")));
        }
        let (status, body) = split_response(&answer).map_err(malformed)?;
        let json: Option<Value> = serde_json::from_slice(body).ok();
        if !(200..300).contains(&status) {
            let message = json
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
            return Err(HttpError::Refused {
                method,
                path: path.to_string(),
                addr: self.addr,
                status,
                message,
            });
        }
        json.ok_or_else(|| malformed("the body is not JSON".to_string()))
    }
}

/// The status code and body of a whole response. Chunked bodies are refused: the daemon sizes
/// every JSON answer, so a chunked one means something else is listening.
fn split_response(answer: &[u8]) -> Result<(u16, &[u8]), String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&answer[..end]).map_err(|_| "headers are not UTF-8")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        return Err("chunked body".to_string());
    }
    Ok((status, &answer[end + 4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_split_response_finds_status_and_body() {
        let raw = b"HTTP/1.1 202 Accepted\r\ncontent-length: 8\r\n\r\n{\"id\":3}";
        assert_eq!(split_response(raw), Ok((202, &b"{\"id\":3}"[..])));
    }

    #[test]
    fn test_split_response_refuses_what_the_daemon_never_sends() {
        assert!(split_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(split_response(b"SSH-2.0 hello\r\n\r\n").is_err());
        assert!(split_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\r\n").is_err());
    }
}
