//! A minimal blocking HTTP/1.1 client for the daemon's JSON control API.
//!
//! One request per connection (`Connection: close`), bodies framed by `Content-Length` or by the
//! end of the stream, over TCP (`http://HOST:PORT[/prefix]`) or a Unix socket (`unix:PATH`).
//! That is all the daemon speaks, and it keeps the binary free of an HTTP crate. Use
//! [`ApiClient`] for requests (with [`ApiClient::with_token`] for the daemon's bearer token) and
//! [`require_success`] to turn a non-2xx answer into [`ClientError::Refused`] carrying the
//! daemon's `error` text.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use migratory::api::ApiError;

/// The largest response body accepted; a status list of thousands of migrations is far below it,
/// so anything bigger is a misbehaving peer, not data to buffer.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// The largest status line plus headers accepted.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// How long connecting, and each read or write, may take before the request fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest piece of a non-JSON error body quoted in [`ClientError::Refused`].
const MAX_QUOTED_CHARS: usize = 200;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not of the form `http://HOST:PORT[/prefix]` nor `unix:PATH`.
    #[error("invalid API URL {url:?}: {reason}")]
    InvalidUrl {
        /// What the user gave.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The base URL asks for TLS, and no client certificate was given.
    #[error("API URL {url:?} is https: give --tls-cert, --tls-key and --tls-ca (the cluster's mutual TLS)")]
    TlsUnsupported {
        /// What the user gave.
        url: String,
    },
    /// The TLS session could not be set up.
    #[error("TLS with {url}: {detail}")]
    Tls {
        /// Where.
        url: String,
        /// What failed.
        detail: String,
    },
    /// No address of the host accepted a connection.
    #[error("cannot connect to {url}")]
    Connect {
        /// The full URL of the request.
        url: String,
        /// The last connection error (or the resolution error).
        #[source]
        source: io::Error,
    },
    /// The daemon did not answer within the timeout.
    #[error("no answer from {url} within {} s", timeout.as_secs_f64())]
    Timeout {
        /// The full URL of the request.
        url: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Sending the request or reading the response failed after connecting.
    #[error("request to {url} failed")]
    Io {
        /// The full URL of the request.
        url: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The response is not HTTP/1.x as this client reads it.
    #[error("malformed response from {url}: {reason}")]
    MalformedResponse {
        /// The full URL of the request.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The response (body or head) is larger than this client accepts.
    #[error("response from {url} exceeds the {limit}-byte limit")]
    ResponseTooLarge {
        /// The full URL of the request.
        url: String,
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A 2xx response whose body is not JSON.
    #[error("response from {url} is not JSON")]
    InvalidJson {
        /// The full URL of the request.
        url: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon answered with a non-2xx status.
    #[error("daemon refused: {message}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// The daemon's `error` text, or a description of the response when it sent none.
        message: String,
    },
}

/// Where the daemon listens: `http://HOST:PORT[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseUrl {
    /// Host name or address, without brackets for IPv6.
    host: String,
    port: u16,
    /// Path prefix without a trailing slash: empty or `/something`.
    prefix: String,
    /// `https`: mutual TLS with the cluster's certificates.
    tls: bool,
}

impl BaseUrl {
    fn parse(url: &str) -> Result<Self, ClientError> {
        let invalid = |reason| ClientError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let trimmed = url.trim();
        let Some((scheme, rest)) = trimmed.split_once("://") else {
            return Err(invalid("expected http://HOST:PORT[/prefix] or unix:PATH"));
        };
        let tls = scheme.eq_ignore_ascii_case("https");
        if !tls && !scheme.eq_ignore_ascii_case("http") {
            return Err(invalid("only http:// and https:// URLs are supported"));
        }
        // Anything that could not go verbatim into the request line would let a URL inject headers.
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace or control characters"));
        }
        if rest.contains(['?', '#']) {
            return Err(invalid("a query or fragment is not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(invalid("unclosed '[' in IPv6 host"));
            };
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(invalid("expected :PORT after the IPv6 host")),
                },
            }
        } else {
            match authority.split_once(':') {
                Some((_, port)) if port.contains(':') => {
                    return Err(invalid("an IPv6 host must be in brackets"));
                }
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let port = match port {
            // The URL convention: no port means the scheme's default.
            None if tls => 443,
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(invalid("port must be a number from 1 to 65535")),
            },
        };
        Ok(BaseUrl {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            tls,
        })
    }

    /// `host:port` as it goes in the `Host` header and in URLs.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.prefix)
    }
}

/// Where the daemon's API is: a TCP base URL or a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Http(BaseUrl),
    Unix(PathBuf),
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, ClientError> {
        let Some(path) = url.trim().strip_prefix("unix:") else {
            return BaseUrl::parse(url).map(Endpoint::Http);
        };
        let invalid = |reason| ClientError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        if path.is_empty() {
            return Err(invalid("expected unix:PATH with the socket's path"));
        }
        if path.contains('\0') {
            return Err(invalid("a socket path cannot hold a NUL"));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

/// One connection to the daemon.
#[derive(Debug)]
enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Connection {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Connection::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Connection::Tls(s) => {
                s.sock.set_read_timeout(Some(timeout))?;
                s.sock.set_write_timeout(Some(timeout))
            }
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
            Connection::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
            Connection::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
            Connection::Tls(s) => s.flush(),
        }
    }
}

/// A client of the daemon's control API at one base URL.
#[derive(Debug, Clone)]
pub struct ApiClient {
    endpoint: Endpoint,
    timeout: Duration,
    /// Sent as `Authorization: Bearer`; checked for header safety by `token::parse`.
    token: Option<String>,
    /// For `https://`: the cluster's client identity and CA.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl ApiClient {
    /// A client of the daemon at `url`: `http://HOST:PORT[/prefix]` (the port defaults to 80) or
    /// `unix:PATH` (a Unix socket).
    pub fn new(url: &str) -> Result<Self, ClientError> {
        Ok(ApiClient {
            endpoint: Endpoint::parse(url)?,
            timeout: IO_TIMEOUT,
            token: None,
            tls: None,
        })
    }

    /// The same client, waiting up to `timeout` for each read and write (for a request whose
    /// answer comes only when long work ends).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client, speaking mutual TLS with `config` to an `https://` URL.
    pub fn with_tls(mut self, config: Option<std::sync::Arc<rustls::ClientConfig>>) -> Self {
        self.tls = config;
        self
    }

    /// True if the URL is `https://`.
    pub fn is_tls(&self) -> bool {
        matches!(&self.endpoint, Endpoint::Http(b) if b.tls)
    }

    /// The same client, sending `token` (as [`super::token::parse`] returns it) with every
    /// request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Whether the daemon is reached over a Unix socket (where no token is needed).
    pub fn is_unix(&self) -> bool {
        matches!(self.endpoint, Endpoint::Unix(_))
    }

    /// `GET base+path`; returns the status and the JSON body (`Null` when empty).
    pub fn get(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        self.request("GET", path, body)
    }

    /// `POST base+path` with `body` as JSON; returns the status and the JSON body.
    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        self.request("POST", path, body)
    }

    /// `DELETE base+path`; returns the status and the JSON body (`Null` when empty).
    pub fn delete(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        self.request("DELETE", path, body)
    }

    fn url_of(&self, path: &str) -> String {
        match &self.endpoint {
            Endpoint::Http(base) => format!("{base}{path}"),
            Endpoint::Unix(socket) => format!("{path} at unix:{}", socket.display()),
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        let url = self.url_of(path);
        let mut stream = self.connect(&url)?;
        let io_err = |source: io::Error| self.io_error(&url, source);
        stream.set_timeouts(self.timeout).map_err(io_err)?;
        let request = self.encode_request(method, path, body);
        stream.write_all(&request).map_err(io_err)?;
        stream.flush().map_err(io_err)?;
        let mut reader = BufReader::new(stream);
        let (status, bytes) = read_response(&mut reader).map_err(|e| e.into_client_error(self, &url))?;
        let value = decode_body(status, &bytes).map_err(|source| ClientError::InvalidJson { url, source })?;
        Ok((status, value))
    }

    fn connect(&self, url: &str) -> Result<Connection, ClientError> {
        let connect_err = |source| ClientError::Connect {
            url: url.to_string(),
            source,
        };
        let base = match &self.endpoint {
            Endpoint::Http(base) => base,
            // A local connect either succeeds or fails at once: no timeout needed.
            Endpoint::Unix(socket) => return UnixStream::connect(socket).map(Connection::Unix).map_err(connect_err),
        };
        let addrs: Vec<SocketAddr> = (base.host.as_str(), base.port)
            .to_socket_addrs()
            .map_err(connect_err)?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolved to no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) if base.tls => return self.start_tls(base, stream, url),
                Ok(stream) => return Ok(Connection::Tcp(stream)),
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }

    /// Wraps `stream` in a TLS session that proves this client's certificate and checks the
    /// daemon's against the cluster CA.
    fn start_tls(&self, base: &BaseUrl, stream: TcpStream, url: &str) -> Result<Connection, ClientError> {
        let config = self
            .tls
            .clone()
            .ok_or_else(|| ClientError::TlsUnsupported { url: url.to_string() })?;
        let tls_err = |detail: String| ClientError::Tls {
            url: url.to_string(),
            detail,
        };
        let name = rustls::pki_types::ServerName::try_from(base.host.clone()).map_err(|e| tls_err(e.to_string()))?;
        let session = rustls::ClientConnection::new(config, name).map_err(|e| tls_err(e.to_string()))?;
        Ok(Connection::Tls(Box::new(rustls::StreamOwned::new(session, stream))))
    }

    fn encode_request(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
        let payload = body.map(Value::to_string);
        let (prefix, authority) = match &self.endpoint {
            Endpoint::Http(base) => (base.prefix.as_str(), base.authority()),
            Endpoint::Unix(_) => ("", "localhost".to_string()),
        };
        let mut head = format!(
            "{method} {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: migratory/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        match &payload {
            Some(p) => {
                head.push_str("Content-Type: application/json\r\n");
                head.push_str(&format!("Content-Length: {}\r\n", p.len()));
            }
            // A bodiless POST still needs a length, or a server may wait for a body that never comes.
            None if method != "GET" => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(p) = payload {
            bytes.extend_from_slice(p.as_bytes());
        }
        bytes
    }

    fn io_error(&self, url: &str, source: io::Error) -> ClientError {
        // A read timeout surfaces as WouldBlock on Unix and TimedOut elsewhere.
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            ClientError::Timeout {
                url: url.to_string(),
                timeout: self.timeout,
            }
        } else {
            ClientError::Io {
                url: url.to_string(),
                source,
            }
        }
    }
}

/// `Ok(body)` for a 2xx status; otherwise [`ClientError::Refused`] with the text of the daemon's
/// [`ApiError`], or the start of whatever else it sent.
pub fn require_success((status, body): (u16, Value)) -> Result<Value, ClientError> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = match &body {
        Value::Object(map) => match (ApiError::deserialize(&body), map.get("error")) {
            (Ok(refusal), _) => refusal.error,
            (Err(_), Some(other)) => other.to_string(),
            (Err(_), None) => format!("HTTP {status}: {body}"),
        },
        Value::String(text) if !text.trim().is_empty() => {
            let first = text.trim().lines().next().unwrap_or_default();
            format!(
                "HTTP {status}: {}",
                first.chars().take(MAX_QUOTED_CHARS).collect::<String>()
            )
        }
        Value::Null => format!("HTTP {status} with no body"),
        other => format!("HTTP {status}: {other}"),
    };
    Err(ClientError::Refused { status, message })
}

/// Percent-encodes one path segment (a VM id, say) so `/`, spaces and the like stay inside it.
pub fn path_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What went wrong reading a response, before the URL is attached.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Malformed(String),
    TooLarge(usize),
}

impl ReadError {
    fn into_client_error(self, client: &ApiClient, url: &str) -> ClientError {
        match self {
            ReadError::Io(source) => client.io_error(url, source),
            ReadError::Malformed(reason) => ClientError::MalformedResponse {
                url: url.to_string(),
                reason,
            },
            ReadError::TooLarge(limit) => ClientError::ResponseTooLarge {
                url: url.to_string(),
                limit,
            },
        }
    }
}

/// Reads one line ending in `\n` (without the line end), charging it to `budget`.
fn read_head_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = reader
        .take(*budget as u64)
        .read_until(b'\n', &mut line)
        .map_err(ReadError::Io)?;
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(if *budget == 0 {
            ReadError::TooLarge(MAX_HEAD_BYTES)
        } else {
            ReadError::Malformed("connection closed before the end of the headers".to_string())
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| ReadError::Malformed("header line is not UTF-8".to_string()))
}

/// Reads a status line, headers and body; returns the status and the raw body.
fn read_response(reader: &mut impl BufRead) -> Result<(u16, Vec<u8>), ReadError> {
    let mut budget = MAX_HEAD_BYTES;
    let status_line = read_head_line(reader, &mut budget)?;
    let status = parse_status_line(&status_line)?;
    let mut content_length: Option<usize> = None;
    loop {
        let line = read_head_line(reader, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Malformed(format!("header without a colon: {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .map_err(|_| ReadError::Malformed(format!("bad Content-Length {value:?}")))?;
            if content_length.is_some_and(|prev| prev != len) {
                return Err(ReadError::Malformed("conflicting Content-Length headers".to_string()));
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && !value.eq_ignore_ascii_case("identity") {
            return Err(ReadError::Malformed(format!(
                "Transfer-Encoding {value:?} is not supported; expected Content-Length"
            )));
        }
    }
    // These carry no body whatever the headers say (RFC 9110 6.4.1).
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok((status, Vec::new()));
    }
    let mut body = Vec::new();
    match content_length {
        Some(len) if len > MAX_RESPONSE_BYTES => return Err(ReadError::TooLarge(MAX_RESPONSE_BYTES)),
        Some(len) => {
            body.resize(len, 0);
            reader.read_exact(&mut body).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    ReadError::Malformed(format!("connection closed before the {len}-byte body was complete"))
                } else {
                    ReadError::Io(e)
                }
            })?;
        }
        None => {
            // One byte over the cap is enough to know the body is too large.
            reader
                .take(MAX_RESPONSE_BYTES as u64 + 1)
                .read_to_end(&mut body)
                .map_err(ReadError::Io)?;
            if body.len() > MAX_RESPONSE_BYTES {
                return Err(ReadError::TooLarge(MAX_RESPONSE_BYTES));
            }
        }
    }
    Ok((status, body))
}

fn parse_status_line(line: &str) -> Result<u16, ReadError> {
    let malformed = || ReadError::Malformed(format!("bad status line {line:?}"));
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(malformed());
    }
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 {
        return Err(malformed());
    }
    match code.parse::<u16>() {
        Ok(status) if (100..600).contains(&status) => Ok(status),
        _ => Err(malformed()),
    }
}

/// An empty body is `Null`; a non-2xx body that is not JSON is kept as text so
/// [`require_success`] can quote it (a proxy's HTML error page, say).
fn decode_body(status: u16, bytes: &[u8]) -> Result<Value, serde_json::Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok(value),
        Err(_) if !(200..300).contains(&status) => Ok(Value::String(String::from_utf8_lossy(bytes).into_owned())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
pub(super) mod test_server {
    //! A one-thread fake daemon: it answers each connection with the next canned response and
    //! hands the raw request it read to the test.

    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    /// How long a test waits for the fake server to report a request.
    pub const TIMEOUT: Duration = Duration::from_secs(10);

    /// A request as the fake server read it.
    #[derive(Debug)]
    pub struct Seen {
        /// Request line and headers, with CRLF line ends.
        pub head: String,
        /// The body (by Content-Length).
        pub body: Vec<u8>,
    }

    /// A fake daemon on 127.0.0.1 that answers one connection per canned response, in order.
    #[derive(Debug)]
    pub struct FakeServer {
        /// Where it listens.
        pub addr: SocketAddr,
        /// Each request it read.
        pub requests: mpsc::Receiver<Seen>,
        /// Keeps the port open after the last canned response: a client that connects then
        /// (the test of a server with none, say) must find it listening, not refusing.
        _listening: TcpListener,
    }

    impl FakeServer {
        /// Serves `responses` (raw bytes: status line, headers, body), one connection each.
        pub fn start(responses: Vec<Vec<u8>>) -> FakeServer {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            let addr = listener.local_addr().expect("local addr of a bound listener");
            let listening = listener.try_clone().expect("clone the listener");
            let (tx, requests) = mpsc::channel();
            thread::spawn(move || {
                for response in responses {
                    let Ok((stream, _)) = listener.accept() else { return };
                    let mut reader = BufReader::new(stream);
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    let _ = reader.read_exact(&mut body);
                    let _ = tx.send(Seen { head, body });
                    // The client may hang up early (a response over the cap); that is the test's point.
                    let _ = reader.get_mut().write_all(&response);
                }
            });
            FakeServer {
                addr,
                requests,
                _listening: listening,
            }
        }

        /// `http://127.0.0.1:PORT`.
        pub fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        /// The next request the server read.
        pub fn next_request(&self) -> Seen {
            self.requests
                .recv_timeout(TIMEOUT)
                .expect("the fake server saw a request")
        }
    }

    /// A complete response with a JSON body.
    pub fn json_response(status: u16, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{json_response, FakeServer};
    use super::*;
    use serde_json::json;
    use std::net::TcpListener;

    #[test]
    fn test_url_parsing_accepts_http_host_port_and_prefix() {
        let b = BaseUrl::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.prefix.as_str()), ("127.0.0.1", 8000, ""));
        let b = BaseUrl::parse("HTTP://daemon.local:9/api/v1/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.prefix.as_str()),
            ("daemon.local", 9, "/api/v1")
        );
        let b = BaseUrl::parse("http://[::1]:8000").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 8000));
        assert_eq!(b.to_string(), "http://[::1]:8000");
        assert_eq!(BaseUrl::parse("http://localhost").unwrap().port, 80);
    }

    #[test]
    fn test_url_parsing_rejects_garbage() {
        for bad in [
            "",
            "garbage",
            "127.0.0.1:8000",
            "ftp://host:1",
            "http://",
            "http://:8000",
            "http://host:",
            "http://host:0",
            "http://host:99999",
            "http://host:port",
            "http://user@host:1",
            "http://host:1/a b",
            "http://host:1/?q",
            "http://::1:8000",
            "http://[::1",
            "http://[::1]x",
        ] {
            assert!(
                matches!(BaseUrl::parse(bad), Err(ClientError::InvalidUrl { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn test_https_needs_the_cluster_certificates() {
        let base = BaseUrl::parse("https://127.0.0.1:8443").unwrap();
        assert!(base.tls);
        assert_eq!(base.to_string(), "https://127.0.0.1:8443");
        assert_eq!(BaseUrl::parse("https://127.0.0.1").unwrap().port, 443);
        // Without --tls-* the client refuses before it sends anything.
        let server = FakeServer::start(vec![]);
        let url = server.url().replacen("http://", "https://", 1);
        let err = ApiClient::new(&url).unwrap().get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::TlsUnsupported { .. }), "{err}");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }

    #[test]
    fn test_post_sends_request_line_headers_and_json_body() {
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 3}"#)]);
        let client = ApiClient::new(&format!("{}/api/", server.url())).unwrap();
        let body = json!({"vm": "vm1", "streams": 2});
        let (status, value) = client.post("/migrations", Some(&body)).unwrap();
        assert_eq!((status, value), (202, json!({"id": 3})));
        let seen = server.next_request();
        let mut lines = seen.head.split("\r\n");
        assert_eq!(lines.next(), Some("POST /api/migrations HTTP/1.1"));
        let headers: Vec<String> = lines.map(str::to_ascii_lowercase).collect();
        let payload = body.to_string();
        for expected in [
            format!("host: {}", server.addr),
            "connection: close".to_string(),
            "content-type: application/json".to_string(),
            format!("content-length: {}", payload.len()),
        ] {
            assert!(headers.contains(&expected), "{expected:?} missing from {headers:?}");
        }
        assert_eq!(seen.body, payload.as_bytes());
    }

    #[test]
    fn test_get_without_body_sends_no_content_headers_and_parses_json() {
        let server = FakeServer::start(vec![json_response(200, r#"[{"id": "vm1"}]"#)]);
        let client = ApiClient::new(&server.url()).unwrap();
        let (status, value) = client.get("/vms", None).unwrap();
        assert_eq!((status, value), (200, json!([{"id": "vm1"}])));
        let seen = server.next_request();
        assert!(seen.head.starts_with("GET /vms HTTP/1.1\r\n"), "{}", seen.head);
        assert!(
            !seen.head.to_ascii_lowercase().contains("content-length"),
            "{}",
            seen.head
        );
        assert!(seen.body.is_empty());
    }

    #[test]
    fn test_empty_body_is_null_and_bodiless_post_sends_zero_length() {
        let server = FakeServer::start(vec![b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_vec()]);
        let client = ApiClient::new(&server.url()).unwrap();
        assert_eq!(client.delete("/vms/vm1", None).unwrap(), (204, Value::Null));
        let seen = server.next_request();
        assert!(seen.head.starts_with("DELETE /vms/vm1 HTTP/1.1\r\n"), "{}", seen.head);
        assert!(
            seen.head.to_ascii_lowercase().contains("content-length: 0\r\n"),
            "{}",
            seen.head
        );
    }

    #[test]
    fn test_body_without_content_length_is_read_until_eof() {
        let server = FakeServer::start(vec![b"HTTP/1.0 200 OK\r\n\r\n{\"ok\": true}".to_vec()]);
        let client = ApiClient::new(&server.url()).unwrap();
        assert_eq!(client.get("/x", None).unwrap(), (200, json!({"ok": true})));
    }

    #[test]
    fn test_error_status_with_error_body_becomes_refused_with_its_message() {
        let server = FakeServer::start(vec![json_response(404, r#"{"error": "no VM \"x\" on host \"h\""}"#)]);
        let client = ApiClient::new(&server.url()).unwrap();
        let response = client.delete("/vms/x", None).unwrap();
        assert_eq!(response.0, 404);
        let err = require_success(response).unwrap_err();
        match &err {
            ClientError::Refused { status, message } => {
                assert_eq!((*status, message.as_str()), (404, r#"no VM "x" on host "h""#));
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        assert_eq!(err.to_string(), r#"daemon refused: no VM "x" on host "h""#);
    }

    #[test]
    fn test_error_status_with_non_json_body_quotes_its_first_line() {
        let server = FakeServer::start(vec![
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 16\r\n\r\nupstream down\nxx".to_vec(),
        ]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = require_success(client.get("/vms", None).unwrap()).unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 502, message } if message == "HTTP 502: upstream down"),
            "{err:?}"
        );
    }

    #[test]
    fn test_success_body_that_is_not_json_is_an_error() {
        let server = FakeServer::start(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = client.get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::InvalidJson { .. }), "{err:?}");
    }

    #[test]
    fn test_declared_length_over_the_cap_is_an_error() {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_RESPONSE_BYTES + 1);
        let server = FakeServer::start(vec![head.into_bytes()]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = client.get("/vms", None).unwrap_err();
        assert!(
            matches!(err, ClientError::ResponseTooLarge { limit, .. } if limit == MAX_RESPONSE_BYTES),
            "{err:?}"
        );
    }

    #[test]
    fn test_streamed_body_over_the_cap_is_an_error() {
        let mut response = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        response.resize(response.len() + MAX_RESPONSE_BYTES + 1, b' ');
        let server = FakeServer::start(vec![response]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = client.get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::ResponseTooLarge { .. }), "{err:?}");
    }

    #[test]
    fn test_endless_headers_are_an_error() {
        let mut response = b"HTTP/1.1 200 OK\r\nX-Junk: ".to_vec();
        response.resize(MAX_HEAD_BYTES + 10, b'a');
        let server = FakeServer::start(vec![response]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = client.get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::ResponseTooLarge { .. }), "{err:?}");
    }

    #[test]
    fn test_garbage_status_line_and_truncated_body_are_malformed() {
        let server = FakeServer::start(vec![
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
        ]);
        let client = ApiClient::new(&server.url()).unwrap();
        for _ in 0..3 {
            let err = client.get("/vms", None).unwrap_err();
            assert!(matches!(err, ClientError::MalformedResponse { .. }), "{err:?}");
        }
    }

    #[test]
    fn test_connection_refused_names_the_url() {
        // A port that was just free: binding and dropping leaves nothing listening there.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = ApiClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = client.get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot connect to http://127.0.0.1:{port}/vms")
        );
    }

    #[test]
    fn test_silent_daemon_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = ApiClient::new(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        client.timeout = Duration::from_millis(100);
        // The kernel completes the handshake from the backlog; nobody ever answers.
        let err = client.get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        drop(listener);
    }

    #[test]
    fn test_token_goes_in_an_authorization_header() {
        let token = "t".repeat(64);
        let server = FakeServer::start(vec![json_response(200, "[]"), json_response(200, "[]")]);
        let client = ApiClient::new(&server.url()).unwrap();
        client.get("/vms", None).unwrap();
        let seen = server.next_request();
        assert!(
            !seen.head.to_ascii_lowercase().contains("authorization"),
            "{}",
            seen.head
        );
        client.with_token(Some(token.clone())).get("/vms", None).unwrap();
        let seen = server.next_request();
        assert!(
            seen.head.contains(&format!("\r\nAuthorization: Bearer {token}\r\n")),
            "{}",
            seen.head
        );
    }

    #[test]
    fn test_unix_socket_carries_the_request() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("migratory-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            while reader.read_line(&mut head).unwrap() > 2 && !head.ends_with("\r\n\r\n") {}
            reader.get_mut().write_all(&json_response(200, "[]")).unwrap();
            head
        });
        let client = ApiClient::new(&format!("unix:{}", path.display())).unwrap();
        assert!(client.is_unix());
        assert_eq!(client.get("/vms", None).unwrap(), (200, json!([])));
        let head = server.join().unwrap();
        assert!(head.starts_with("GET /vms HTTP/1.1\r\nHost: localhost\r\n"), "{head}");
        let _ = std::fs::remove_dir_all(&dir);
        let err = client.get("/vms", None).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert!(
            err.to_string().ends_with(&format!("/vms at unix:{}", path.display())),
            "{err}"
        );
    }

    #[test]
    fn test_unix_url_needs_a_path() {
        assert!(matches!(ApiClient::new("unix:"), Err(ClientError::InvalidUrl { .. })));
        assert!(ApiClient::new("unix:relative.sock").unwrap().is_unix());
        assert!(!ApiClient::new("http://h:1").unwrap().is_unix());
    }

    #[test]
    fn test_path_segment_escapes_reserved_characters() {
        assert_eq!(path_segment("vm-1_a.b~"), "vm-1_a.b~");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
