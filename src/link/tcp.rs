//! TCP links: one ordered control connection and N data connections per migration.
//!
//! Every connection opens with a preamble (`MIGRLINK`, version, link id, role, stream count)
//! so the listener can group a link's connections. The control connection then runs the
//! cluster-key handshake of [`super::secure`] (diagram there); data connections are opened
//! only once it has succeeded, and each proves the session before it joins its link. Control
//! frames are bridged by two tokio tasks into the same channels an in-process link uses; page
//! frames are written and read by one blocking thread per direction per stream, straight from
//! and into pooled buffers ([`super::pump`]). Every length is checked against
//! [`crate::protocol::frame::MAX_FRAME_LEN`] before a buffer is sized.
//!
//! Before a connection has authenticated it is bounded: it must finish within
//! [`AUTH_TIMEOUT`] of accept, it is only ever read in small fixed-size pieces (no frame, and
//! so nothing near the 64 KiB cap on pre-authentication frames), and it holds one of a capped
//! number of slots ([`AcceptLimits`], in total and per remote address; an optional allow-list
//! refuses everyone else). Connections beyond the caps are closed at once and counted.
//!
//! Page batches of one migration may arrive out of order across streams; the target's data
//! plane applies a page only if its round is not older than the one already applied.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::gate::{AcceptLimits, Gate};
use super::pump::{build_end, on_conn, Conn};
use super::secure::{self, SecureError, Session, Side, PROOF_LEN};
use super::tls::TlsSetup;
use super::{LinkEnd, TokenBucket};
use crate::protocol::auth::ClusterKey;

pub use super::gate::raise_nofile_limit;

const PREAMBLE_MAGIC: &[u8; 8] = b"MIGRLINK";
/// 2: the control preamble is followed by the handshake, a data preamble by its proof.
const PREAMBLE_VERSION: u8 = 2;
const PREAMBLE_LEN: usize = 8 + 1 + 8 + 1 + 1;
/// Most data streams one link may open.
pub const MAX_STREAMS: u8 = 16;
/// A connection must be authenticated (TLS, preamble, key proof) within this of its accept.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A link's connections must all arrive within this of its control connection.
const ASSEMBLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Authenticated links being assembled at once; beyond this the oldest is dropped.
const MAX_PENDING_LINKS: usize = 64;
/// Longest a connect (with its TLS handshake, preamble and proofs) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of TCP links.
#[derive(Debug, thiserror::Error)]
pub enum TcpLinkError {
    /// A socket operation failed.
    #[error("tcp: {0}")]
    Io(#[from] io::Error),
    /// A connection opened with something that is not a valid preamble.
    #[error("bad link preamble: {detail}")]
    BadPreamble {
        /// What was wrong.
        detail: String,
    },
    /// The stream count is out of range.
    #[error("{streams} data streams requested, 1..={limit} allowed")]
    Streams {
        /// Asked for.
        streams: u8,
        /// The limit.
        limit: u8,
    },
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peers could not authenticate each other.
    #[error(transparent)]
    Handshake(#[from] SecureError),
    /// A data connection for a link that has no authenticated control connection here, or for
    /// a role already taken.
    #[error("data connection {role} of link {link_id:#x} does not fit an authenticated link")]
    Orphan {
        /// The link id it named.
        link_id: u64,
        /// Its role.
        role: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Preamble {
    link_id: u64,
    role: u8,
    streams: u8,
}

impl Preamble {
    fn encode(self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..8].copy_from_slice(PREAMBLE_MAGIC);
        out[8] = PREAMBLE_VERSION;
        out[9..17].copy_from_slice(&self.link_id.to_be_bytes());
        out[17] = self.role;
        out[18] = self.streams;
        out
    }

    fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, TcpLinkError> {
        let bad = |detail: String| TcpLinkError::BadPreamble { detail };
        if &b[..8] != PREAMBLE_MAGIC {
            return Err(bad(format!("magic {:02x?}", &b[..8])));
        }
        if b[8] != PREAMBLE_VERSION {
            return Err(bad(format!("version {} (speak {PREAMBLE_VERSION})", b[8])));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[9..17]);
        let (role, streams) = (b[17], b[18]);
        if streams == 0 || streams > MAX_STREAMS || role > streams {
            return Err(bad(format!("role {role} of {streams} streams")));
        }
        Ok(Self {
            link_id: u64::from_be_bytes(id),
            role,
            streams,
        })
    }
}

fn link_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    crate::memory::SplitMix64::new(seed).next()
}

async fn open(addr: SocketAddr, tls: Option<&TlsSetup>) -> Result<Conn, TcpLinkError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Conn::Plain(tcp)),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
            let s = tokio::time::timeout(AUTH_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| TcpLinkError::Timeout("TLS handshake"))??;
            Ok(Conn::TlsClient(Box::new(s)))
        }
    }
}

/// Opens a link to `addr` with `streams` data connections, shaped to `bandwidth` bytes per
/// second if given, charged to a host's shared `budget` if given, over TLS if `tls` is given,
/// proving `key` if given (a keyed listener refuses a link without it, and a keyed client
/// refuses a listener that does not prove the same key).
pub async fn connect(
    addr: SocketAddr,
    streams: u8,
    bandwidth: Option<u64>,
    budget: Option<Arc<Mutex<TokenBucket>>>,
    tls: Option<&TlsSetup>,
    key: Option<&ClusterKey>,
) -> Result<LinkEnd, TcpLinkError> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(TcpLinkError::Streams {
            streams,
            limit: MAX_STREAMS,
        });
    }
    let id = link_id();
    let preamble = |role| {
        Preamble {
            link_id: id,
            role,
            streams,
        }
        .encode()
    };
    let opened = async {
        let mut control = open(addr, tls).await?;
        let binding = control.binding();
        let is_tls = control.is_tls();
        let session = on_conn!(&mut control, s => {
            secure::client_handshake(s, &preamble(0), id, key, &binding, is_tls).await
        })?;
        let mut data = Vec::with_capacity(streams as usize);
        for role in 1..=streams {
            let mut conn = open(addr, tls).await?;
            let mut hello = preamble(role).to_vec();
            hello.extend_from_slice(&session.prove_data(role, &conn.binding()));
            on_conn!(&mut conn, s => {
                s.write_all(&hello).await?;
                s.flush().await?;
            });
            data.push(conn);
        }
        Ok::<_, TcpLinkError>((control, data, session))
    };
    let (control, data, session) = tokio::time::timeout(CONNECT_TIMEOUT, opened)
        .await
        .map_err(|_| TcpLinkError::Timeout("connect"))??;
    let mut budgets: Vec<_> = bandwidth
        .map(|r| Arc::new(Mutex::new(TokenBucket::new(r))))
        .into_iter()
        .collect();
    budgets.extend(budget);
    Ok(build_end(control, data, budgets, &session, Side::Client)?)
}

/// How a listener accepts links.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Mutual TLS on every connection.
    pub tls: Option<TlsSetup>,
    /// The cluster key every peer must prove; `None` accepts unauthenticated links (the
    /// pre-authentication bounds still hold).
    pub key: Option<ClusterKey>,
    /// If given, only these peers may connect; others are closed at accept.
    pub allowed_peers: Option<Vec<IpAddr>>,
    /// Caps on connections not yet authenticated.
    pub limits: AcceptLimits,
}

/// Accepts links on `listener` and hands each assembled [`LinkEnd`] to `links`. Runs until
/// `links` is closed. Connections refused at accept (caps, allow-list), that do not
/// authenticate in time, or that do not fit a link are dropped and counted in `rejected`.
pub async fn serve(
    listener: TcpListener,
    links: mpsc::Sender<LinkEnd>,
    rejected: Arc<AtomicU64>,
    options: ServeOptions,
) {
    let gate = Gate::new(options.limits, options.allowed_peers.clone());
    let acceptor = options
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.server)));
    let shared = Arc::new(Shared {
        key: options.key,
        acceptor,
        assembly: Mutex::new(HashMap::new()),
        links,
        rejected,
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(_) => {
                    // Out of descriptors or similar: back off instead of spinning the thread.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shared.links.closed() => return,
        };
        let ticket = match gate.admit(peer.ip()) {
            Ok(t) => t,
            Err(_) => {
                // Closed at once: a refused peer costs a descriptor for no longer than this.
                drop(stream);
                shared.rejected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let admitted = tokio::time::timeout(AUTH_TIMEOUT, shared.authenticate(stream)).await;
            // Authenticated, failed or timed out: the connection no longer counts as waiting.
            drop(ticket);
            let complete = match admitted {
                Ok(Ok(complete)) => complete,
                Ok(Err(_)) | Err(_) => {
                    shared.rejected.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            if let Some(link) = complete {
                let CompleteLink { control, data, session } = link;
                match build_end(control, data, Vec::new(), &session, Side::Server) {
                    Ok(end) => {
                        let _ = shared.links.send(end).await;
                    }
                    Err(_) => {
                        shared.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
}

/// What every connection task of one listener shares.
struct Shared {
    key: Option<ClusterKey>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Authenticated links waiting for their data connections, by link id.
    assembly: Mutex<HashMap<u64, PendingLink>>,
    links: mpsc::Sender<LinkEnd>,
    rejected: Arc<AtomicU64>,
}

/// An authenticated link being assembled.
struct PendingLink {
    since: tokio::time::Instant,
    session: Session,
    /// Set once the client has been told it is accepted.
    control: Option<Conn>,
    data: Vec<Option<Conn>>,
}

/// A link with every connection in place.
struct CompleteLink {
    control: Conn,
    data: Vec<Conn>,
    session: Session,
}

impl Shared {
    /// TLS, preamble and proof of one accepted connection; returns the link it completed.
    async fn authenticate(&self, stream: TcpStream) -> Result<Option<CompleteLink>, TcpLinkError> {
        let _ = stream.set_nodelay(true);
        let mut conn = match &self.acceptor {
            None => Conn::Plain(stream),
            Some(a) => Conn::TlsServer(Box::new(a.accept(stream).await?)),
        };
        let mut buf = [0u8; PREAMBLE_LEN];
        on_conn!(&mut conn, s => s.read_exact(&mut buf).await)?;
        let p = Preamble::decode(&buf)?;
        let binding = conn.binding();
        if p.role == 0 {
            let is_tls = conn.is_tls();
            let hs = on_conn!(&mut conn, s => {
                secure::server_handshake(s, p.link_id, self.key.as_ref(), &binding, is_tls).await
            })?;
            self.register(p, hs.session.clone())?;
            // Registered before the client hears it is accepted: its data connections, opened
            // only after that, always find the link.
            let confirmed = on_conn!(&mut conn, s => hs.confirm(s).await);
            let mut assembly = self.assembly.lock().unwrap_or_else(|e| e.into_inner());
            if confirmed.is_err() {
                assembly.remove(&p.link_id);
                return Err(confirmed.err().map_or(TcpLinkError::Timeout("confirm"), Into::into));
            }
            let Some(link) = assembly.get_mut(&p.link_id) else {
                return Err(TcpLinkError::Timeout("assembly"));
            };
            link.control = Some(conn);
            Ok(take_if_complete(&mut assembly, p.link_id))
        } else {
            let mut proof = [0u8; PROOF_LEN];
            on_conn!(&mut conn, s => s.read_exact(&mut proof).await)?;
            let mut assembly = self.assembly.lock().unwrap_or_else(|e| e.into_inner());
            let orphan = TcpLinkError::Orphan {
                link_id: p.link_id,
                role: p.role,
            };
            let Some(link) = assembly.get_mut(&p.link_id) else {
                return Err(orphan);
            };
            link.session.verify_data(p.role, &binding, &proof)?;
            if link.data.len() != p.streams as usize {
                return Err(orphan);
            }
            match link.data.get_mut(p.role as usize - 1) {
                Some(slot @ None) => *slot = Some(conn),
                _ => return Err(orphan),
            }
            Ok(take_if_complete(&mut assembly, p.link_id))
        }
    }

    /// Makes room for a freshly authenticated link.
    fn register(&self, p: Preamble, session: Session) -> Result<(), TcpLinkError> {
        let mut assembly = self.assembly.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        assembly.retain(|_, l| now.duration_since(l.since) < ASSEMBLY_TIMEOUT);
        if assembly.contains_key(&p.link_id) {
            return Err(TcpLinkError::Orphan {
                link_id: p.link_id,
                role: 0,
            });
        }
        if assembly.len() >= MAX_PENDING_LINKS {
            if let Some(oldest) = assembly.iter().min_by_key(|(_, l)| l.since).map(|(k, _)| *k) {
                assembly.remove(&oldest);
            }
        }
        assembly.insert(
            p.link_id,
            PendingLink {
                since: now,
                session,
                control: None,
                data: (0..p.streams).map(|_| None).collect(),
            },
        );
        Ok(())
    }
}

fn take_if_complete(assembly: &mut HashMap<u64, PendingLink>, id: u64) -> Option<CompleteLink> {
    let link = assembly.get(&id)?;
    if link.control.is_none() || link.data.iter().any(Option::is_none) {
        return None;
    }
    let link = assembly.remove(&id)?;
    Some(CompleteLink {
        control: link.control?,
        data: link.data.into_iter().flatten().collect(),
        session: link.session,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_preamble_round_trip_and_rejects() {
        let p = Preamble {
            link_id: 42,
            role: 2,
            streams: 4,
        };
        assert_eq!(Preamble::decode(&p.encode()).expect("valid"), p);
        let mut bad = p.encode();
        bad[0] = b'X';
        assert!(Preamble::decode(&bad).is_err());
        let mut bad = p.encode();
        bad[17] = 9; // role beyond the stream count
        assert!(Preamble::decode(&bad).is_err());
        let mut bad = p.encode();
        bad[18] = 0;
        assert!(Preamble::decode(&bad).is_err());
    }
}
