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
//!
//! Between the control handshake and the data connections the client opens the **pull
//! connection** (post-copy's page requests and the pages they ask for, see [`super::pull`]) and
//! waits for the listener's one-byte answer. A listener that does not know the role (built
//! before it, or serving over TLS, where the pull connection is not offered yet) closes it;
//! the link then works as before, with pulls on the shared connections. Since the answer comes
//! before any data connection is opened, a link is complete, with or without its pull
//! connection, once its control and data connections are all there.

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
use super::pull::{PULL_ACCEPTED, PULL_ROLE};
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
        if streams == 0 || streams > MAX_STREAMS || (role > streams && role != PULL_ROLE) {
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
/// refuses a listener that does not prove the same key). Over plain TCP it also opens a pull
/// connection if the listener takes one.
pub async fn connect(
    addr: SocketAddr,
    streams: u8,
    bandwidth: Option<u64>,
    budget: Option<Arc<Mutex<TokenBucket>>>,
    tls: Option<&TlsSetup>,
    key: Option<&ClusterKey>,
) -> Result<LinkEnd, TcpLinkError> {
    connect_with(addr, streams, bandwidth, budget, tls, key, true).await
}

/// Like [`connect`], without a pull connection, as a client built before pull connections
/// connects: post-copy pulls then share the data and control connections.
pub async fn connect_without_pull(
    addr: SocketAddr,
    streams: u8,
    tls: Option<&TlsSetup>,
    key: Option<&ClusterKey>,
) -> Result<LinkEnd, TcpLinkError> {
    connect_with(addr, streams, None, None, tls, key, false).await
}

/// Opens the pull connection of link `preamble` names and waits for the listener's answer;
/// `None` if the listener does not take it (the link goes on without one).
async fn open_pull(addr: SocketAddr, preamble: [u8; PREAMBLE_LEN], session: &Session) -> Option<Conn> {
    let mut conn = open(addr, None).await.ok()?;
    let mut hello = preamble.to_vec();
    hello.extend_from_slice(&session.prove_data(PULL_ROLE, &conn.binding()));
    let answered = on_conn!(&mut conn, s => {
        async {
            s.write_all(&hello).await?;
            s.flush().await?;
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await?;
            Ok::<_, io::Error>(answer[0])
        }
        .await
    });
    match answered {
        Ok(PULL_ACCEPTED) => {
            super::pull::opened();
            Some(conn)
        }
        // Closed, reset or anything else: a listener that does not know the role.
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn connect_with(
    addr: SocketAddr,
    streams: u8,
    bandwidth: Option<u64>,
    budget: Option<Arc<Mutex<TokenBucket>>>,
    tls: Option<&TlsSetup>,
    key: Option<&ClusterKey>,
    pull: bool,
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
        // Over TLS the pull connection is not offered yet: pulls share the TLS connections.
        let pull = match pull && tls.is_none() {
            true => open_pull(addr, preamble(PULL_ROLE), &session).await,
            false => None,
        };
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
        Ok::<_, TcpLinkError>((control, data, pull, session))
    };
    let (control, data, pull, session) = tokio::time::timeout(CONNECT_TIMEOUT, opened)
        .await
        .map_err(|_| TcpLinkError::Timeout("connect"))??;
    let mut budgets: Vec<_> = bandwidth
        .map(|r| Arc::new(Mutex::new(TokenBucket::new(r))))
        .into_iter()
        .collect();
    budgets.extend(budget);
    Ok(build_end(control, data, pull, budgets, &session, Side::Client)?)
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
    /// Refuse pull connections, as a listener built before them does: links then carry
    /// post-copy pulls on their shared connections.
    pub refuse_pull: bool,
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
        refuse_pull: options.refuse_pull,
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
                let CompleteLink {
                    control,
                    data,
                    pull,
                    session,
                } = link;
                match build_end(control, data, pull, Vec::new(), &session, Side::Server) {
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
    refuse_pull: bool,
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
    /// The pull connection, if the client opened one (always before its data connections).
    pull: Option<Conn>,
}

/// A link with every connection in place.
struct CompleteLink {
    control: Conn,
    data: Vec<Conn>,
    pull: Option<Conn>,
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
        } else if p.role == PULL_ROLE {
            self.join_pull(p, conn, &binding).await.map(|()| None)
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

    /// A pull connection: proved like a data connection, answered, then held with its link.
    async fn join_pull(&self, p: Preamble, mut conn: Conn, binding: &[u8]) -> Result<(), TcpLinkError> {
        let orphan = TcpLinkError::Orphan {
            link_id: p.link_id,
            role: p.role,
        };
        let mut proof = [0u8; PROOF_LEN];
        on_conn!(&mut conn, s => s.read_exact(&mut proof).await)?;
        // Refused by closing it, as a listener that does not know the role does.
        if self.refuse_pull || conn.is_tls() {
            return Err(orphan);
        }
        {
            let assembly = self.assembly.lock().unwrap_or_else(|e| e.into_inner());
            let link = assembly.get(&p.link_id).ok_or(orphan)?;
            link.session.verify_data(p.role, binding, &proof)?;
            if link.pull.is_some() || link.data.iter().any(Option::is_some) {
                return Err(TcpLinkError::Orphan {
                    link_id: p.link_id,
                    role: p.role,
                });
            }
        }
        on_conn!(&mut conn, s => {
            s.write_all(&[PULL_ACCEPTED]).await?;
            s.flush().await?;
        });
        let mut assembly = self.assembly.lock().unwrap_or_else(|e| e.into_inner());
        match assembly.get_mut(&p.link_id) {
            Some(link) if link.pull.is_none() => {
                link.pull = Some(conn);
                Ok(())
            }
            _ => Err(TcpLinkError::Orphan {
                link_id: p.link_id,
                role: p.role,
            }),
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
                pull: None,
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
        pull: link.pull,
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
        let pull = Preamble { role: PULL_ROLE, ..p };
        assert_eq!(Preamble::decode(&pull.encode()).expect("the pull connection"), pull);
    }

    use std::sync::atomic::AtomicBool;

    use crate::link::{decode_request, DataRecv, Lane, LinkError, PullAsk};
    use crate::protocol::pages::{PageBatchBuilder, FLAG_POSTCOPY, FLAG_PULLED};

    const WAIT: Duration = Duration::from_secs(10);

    /// A listener with `options` and a link to it (`pull`: the client offers a pull
    /// connection); returns (client end, server end).
    async fn linked(options: ServeOptions, pull: bool) -> (LinkEnd, LinkEnd) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let key = options.key.clone();
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(serve(listener, tx, Arc::new(AtomicU64::new(0)), options));
        let client = if pull {
            connect(addr, 2, None, None, None, key.as_ref()).await
        } else {
            connect_without_pull(addr, 2, None, key.as_ref()).await
        }
        .expect("connect");
        let server = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("assembled in time")
            .expect("a link");
        (client, server)
    }

    fn page_frame(page: u64, flags: u8) -> bytes::Bytes {
        let memory = crate::memory::GuestMemory::new(16 * crate::units::PAGE_SIZE as u64).expect("map");
        let mut batch = PageBatchBuilder::new(u32::MAX, flags);
        batch.add_from(&memory, page).expect("page");
        batch.finish()
    }

    /// The server end asks for pages; the client end answers with one urgent frame, which must
    /// arrive on the server's urgent lane.
    async fn pull_round_trip(client: &LinkEnd, server: &LinkEnd, lane: bool) {
        let (client_tx, server_rx) = (client.data_tx.clone(), server.data_rx.clone());
        let asked = tokio::task::spawn_blocking(move || {
            if lane {
                assert_eq!(server_rx.ask(&[3, 4]), PullAsk::Sent);
                let requests = client_tx.pull_requests().expect("the client serves a pull lane");
                let got = requests.recv_timeout(WAIT).expect("the request arrives");
                assert_eq!(decode_request(&got.frame), Ok(vec![3, 4]));
            } else {
                assert_eq!(server_rx.ask(&[3]), PullAsk::NoLane);
                assert!(client_tx.pull_requests().is_none());
            }
            let stop = AtomicBool::new(false);
            let pulled = page_frame(3, FLAG_POSTCOPY | FLAG_PULLED);
            client_tx.send(page_frame(1, FLAG_POSTCOPY), &stop).expect("bulk");
            client_tx.send_urgent(pulled.clone(), &stop).expect("urgent");
            match server_rx.recv_lane_timeout(Lane::Urgent, WAIT) {
                DataRecv::Frame(f) => assert_eq!(f, pulled),
                other => panic!("no pulled page: {other:?}"),
            }
        });
        tokio::time::timeout(WAIT * 2, asked)
            .await
            .expect("in time")
            .expect("the exchange");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_a_keyed_link_carries_requests_and_pulled_pages_on_its_pull_connection() {
        let key = ClusterKey::new(&[7u8; 32]).expect("key");
        let before = crate::link::pull_connections_opened();
        let options = ServeOptions {
            key: Some(key),
            ..ServeOptions::default()
        };
        let (client, server) = linked(options, true).await;
        assert!(client.data_rx.has_pull_lane() && server.data_rx.has_pull_lane());
        assert!(crate::link::pull_connections_opened() > before);
        pull_round_trip(&client, &server, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_without_a_pull_connection_pulls_share_the_data_connections() {
        // A listener that refuses the pull connection, as one built before it does.
        let refusing = ServeOptions {
            refuse_pull: true,
            ..ServeOptions::default()
        };
        let (client, server) = linked(refusing, true).await;
        assert!(!client.data_rx.has_pull_lane() && !server.data_rx.has_pull_lane());
        pull_round_trip(&client, &server, false).await;
        // A client that offers none, as one built before it.
        let (client, server) = linked(ServeOptions::default(), false).await;
        assert!(!client.data_rx.has_pull_lane() && !server.data_rx.has_pull_lane());
        pull_round_trip(&client, &server, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_a_lost_pull_connection_loses_the_link() {
        let (client, server) = linked(ServeOptions::default(), true).await;
        let fault = client.control.fault.clone();
        // The server end goes away (its pull connection with it) while the client still uses
        // its link.
        drop(server);
        tokio::time::timeout(WAIT, fault.raised())
            .await
            .expect("the loss is seen");
        assert_eq!(fault.get(), Some(LinkError::PullClosed));
        drop(client);
    }
}
