//! TCP links: one ordered control connection and N data connections per migration.
//!
//! Every connection opens with a preamble (`MIGRLINK`, version, link id, role, stream count)
//! so the listener can group a link's connections. Control frames are bridged by two tokio
//! tasks into the same channels an in-process link uses; page frames are written and read by
//! one blocking thread per direction per stream, straight from and into pooled buffers. Every
//! length is checked against [`MAX_FRAME_LEN`] before a buffer is sized.
//!
//! Page batches of one migration may arrive out of order across streams; the target's data
//! plane applies a page only if its round is not older than the one already applied.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::BufMut;
use crossbeam::channel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::tls::TlsSetup;
use super::{
    ControlChannel, DataReceiver, DataSender, FramePool, LinkEnd, Timed, TokenBucket, CONTROL_CHANNEL_FRAMES,
    DATA_CHANNEL_FRAMES, URGENT_CHANNEL_FRAMES,
};
use crate::protocol::frame::{MAX_FRAME_LEN, TAG_PAGES};
use crate::protocol::pages::FLAG_PULLED;
use crate::protocol::pages::{start_frame_buffer, FRAME_CAPACITY};

const PREAMBLE_MAGIC: &[u8; 8] = b"MIGRLINK";
const PREAMBLE_VERSION: u8 = 1;
const PREAMBLE_LEN: usize = 8 + 1 + 8 + 1 + 1;
/// Most data streams one link may open.
pub const MAX_STREAMS: u8 = 16;
/// A connection must send its preamble within this.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A link's connections must all arrive within this of the first.
const ASSEMBLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Links being assembled at once; beyond this the oldest is dropped.
const MAX_PENDING_LINKS: usize = 64;
/// How often a blocked data-stream reader looks up to see whether its consumer is gone.
const READ_POLL: Duration = Duration::from_millis(200);
/// Longest a connect (with its TLS handshake and preamble) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one control frame may take to write: a peer that stops reading is gone.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A connection on its way to a link: its handshake (TLS) is done and its preamble exchanged.
enum Conn {
    Plain(TcpStream),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

async fn open(addr: SocketAddr, preamble: Preamble, tls: Option<&TlsSetup>) -> Result<Conn, TcpLinkError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => {
            let mut tcp = tcp;
            tcp.write_all(&preamble.encode()).await?;
            Ok(Conn::Plain(tcp))
        }
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
            let mut s = tokio::time::timeout(PREAMBLE_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| TcpLinkError::Timeout("TLS handshake"))??;
            s.write_all(&preamble.encode()).await?;
            s.flush().await?;
            Ok(Conn::TlsClient(Box::new(s)))
        }
    }
}

/// Opens a link to `addr` with `streams` data connections, shaped to `bandwidth` bytes per
/// second if given, charged to a host's shared `budget` if given, over TLS if `tls` is given.
pub async fn connect(
    addr: SocketAddr,
    streams: u8,
    bandwidth: Option<u64>,
    budget: Option<Arc<Mutex<TokenBucket>>>,
    tls: Option<&TlsSetup>,
) -> Result<LinkEnd, TcpLinkError> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(TcpLinkError::Streams {
            streams,
            limit: MAX_STREAMS,
        });
    }
    let id = link_id();
    let preamble = |role| Preamble {
        link_id: id,
        role,
        streams,
    };
    let bounded = |role| async move {
        tokio::time::timeout(CONNECT_TIMEOUT, open(addr, preamble(role), tls))
            .await
            .map_err(|_| TcpLinkError::Timeout("connect"))?
    };
    let control = bounded(0).await?;
    let mut data = Vec::with_capacity(streams as usize);
    for role in 1..=streams {
        data.push(bounded(role).await?);
    }
    let mut budgets: Vec<_> = bandwidth
        .map(|r| Arc::new(Mutex::new(TokenBucket::new(r))))
        .into_iter()
        .collect();
    budgets.extend(budget);
    build_end(control, data, budgets)
}

/// Accepts links on `listener` and hands each assembled [`LinkEnd`] to `links`. Runs until
/// `links` is closed. Connections that do not open with a valid preamble in time are dropped
/// and counted in the returned error tally.
pub async fn serve(
    listener: TcpListener,
    links: mpsc::Sender<LinkEnd>,
    rejected: Arc<std::sync::atomic::AtomicU64>,
    tls: Option<TlsSetup>,
) {
    let (arrived_tx, mut arrived) = mpsc::channel::<(Preamble, Conn)>(256);
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server));
    let accept = async {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of descriptors or similar: back off instead of spinning the thread.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = arrived_tx.clone();
            let rejected = Arc::clone(&rejected);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Handshake and preamble share one deadline: a silent or slow peer costs a task
                // for at most that long.
                let greeted = tokio::time::timeout(PREAMBLE_TIMEOUT, async move {
                    let _ = stream.set_nodelay(true);
                    let mut buf = [0u8; PREAMBLE_LEN];
                    let conn = match acceptor {
                        None => {
                            let mut s = stream;
                            s.read_exact(&mut buf).await?;
                            Conn::Plain(s)
                        }
                        Some(a) => {
                            let mut s = a.accept(stream).await?;
                            s.read_exact(&mut buf).await?;
                            Conn::TlsServer(Box::new(s))
                        }
                    };
                    Ok::<_, io::Error>((buf, conn))
                })
                .await;
                match greeted {
                    Ok(Ok((buf, conn))) => match Preamble::decode(&buf) {
                        Ok(p) => {
                            let _ = tx.send((p, conn)).await;
                        }
                        Err(_) => {
                            rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    },
                    _ => {
                        rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    };
    let assemble = async {
        let mut pending: HashMap<u64, PendingLink> = HashMap::new();
        while let Some((p, stream)) = arrived.recv().await {
            let now = tokio::time::Instant::now();
            pending.retain(|_, (t, _, _)| now.duration_since(*t) < ASSEMBLY_TIMEOUT);
            if !pending.contains_key(&p.link_id) && pending.len() >= MAX_PENDING_LINKS {
                if let Some(oldest) = pending.iter().min_by_key(|(_, (t, _, _))| *t).map(|(k, _)| *k) {
                    pending.remove(&oldest);
                }
            }
            let entry = pending
                .entry(p.link_id)
                .or_insert_with(|| (now, None, (0..p.streams).map(|_| None).collect()));
            // A mismatched stream count or a role already taken is refused alone: it must not
            // disturb the link being assembled.
            let taken = match p.role {
                0 => entry.1.is_some(),
                r => entry.2.get(r as usize - 1).is_none_or(Option::is_some),
            };
            if entry.2.len() != p.streams as usize || taken {
                rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            match p.role {
                0 => entry.1 = Some(stream),
                r => entry.2[r as usize - 1] = Some(stream),
            }
            let complete = entry.1.is_some() && entry.2.iter().all(Option::is_some);
            if complete {
                if let Some((_, Some(control), data)) = pending.remove(&p.link_id) {
                    let end = build_end(control, data.into_iter().flatten().collect(), Vec::new());
                    match end {
                        Ok(end) => {
                            if links.send(end).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => {
                            rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = assemble => {}
    }
}

/// A link being assembled: when its first connection came, its control connection, its data
/// connections by role.
type PendingLink = (tokio::time::Instant, Option<Conn>, Vec<Option<Conn>>);

fn build_end(control: Conn, data: Vec<Conn>, budgets: Vec<Arc<Mutex<TokenBucket>>>) -> Result<LinkEnd, TcpLinkError> {
    let (out_tx, out_rx) = mpsc::channel::<Timed>(CONTROL_CHANNEL_FRAMES);
    let (in_tx, in_rx) = mpsc::channel::<Timed>(CONTROL_CHANNEL_FRAMES);
    match control {
        Conn::Plain(s) => spawn_control(s, out_rx, in_tx),
        Conn::TlsClient(s) => spawn_control(*s, out_rx, in_tx),
        Conn::TlsServer(s) => spawn_control(*s, out_rx, in_tx),
    }

    let pool = FramePool::new();
    let (bulk_tx, bulk_rx) = channel::bounded::<Timed>(DATA_CHANNEL_FRAMES);
    let (urg_tx, urg_rx) = channel::bounded::<Timed>(URGENT_CHANNEL_FRAMES);
    let (in_bulk_tx, in_bulk_rx) = channel::bounded::<Timed>(DATA_CHANNEL_FRAMES);
    let (in_urg_tx, in_urg_rx) = channel::bounded::<Timed>(URGENT_CHANNEL_FRAMES);
    let alive = Arc::new(());
    let sending = Arc::new(());
    // Writer threads take frames from one queue; with more than one, frames may overtake.
    let mut writers = 0usize;
    for (i, conn) in data.into_iter().enumerate() {
        let (b, u, p, sa) = (bulk_rx.clone(), urg_rx.clone(), pool.clone(), Arc::downgrade(&sending));
        let (ib, iu, ip, a) = (
            in_bulk_tx.clone(),
            in_urg_tx.clone(),
            pool.clone(),
            Arc::downgrade(&alive),
        );
        let writer = std::thread::Builder::new().name(format!("migratory-tx{i}"));
        let reader = std::thread::Builder::new().name(format!("migratory-rx{i}"));
        match conn {
            Conn::Plain(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(READ_POLL))?;
                s.set_write_timeout(Some(READ_POLL))?;
                let mut r = s.try_clone()?;
                let mut w = s;
                writers += 1;
                writer.spawn(move || {
                    data_writer(&mut w, &b, &u, &p, &sa);
                    let _ = w.shutdown(std::net::Shutdown::Write);
                })?;
                reader.spawn(move || {
                    data_reader(&mut r, &ib, &iu, &ip, &a);
                    // Only our reading side: the same socket may still carry frames the other way.
                    let _ = r.shutdown(std::net::Shutdown::Read);
                })?;
            }
            // Over TLS a data connection carries pages one way, source to target: the
            // connecting side only writes it, the accepting side only reads it.
            Conn::TlsClient(s) => {
                let (tcp, tls) = (*s).into_inner();
                let tcp = tcp.into_std()?;
                tcp.set_nonblocking(false)?;
                tcp.set_write_timeout(Some(READ_POLL))?;
                let mut w = rustls::StreamOwned::new(tls, tcp);
                writers += 1;
                writer.spawn(move || {
                    data_writer(&mut w, &b, &u, &p, &sa);
                    w.conn.send_close_notify();
                    let _ = w.flush();
                    let _ = w.sock.shutdown(std::net::Shutdown::Write);
                })?;
            }
            Conn::TlsServer(s) => {
                let (tcp, tls) = (*s).into_inner();
                let tcp = tcp.into_std()?;
                tcp.set_nonblocking(false)?;
                tcp.set_read_timeout(Some(READ_POLL))?;
                let mut r = rustls::StreamOwned::new(tls, tcp);
                reader.spawn(move || {
                    data_reader(&mut r, &ib, &iu, &ip, &a);
                    let _ = r.sock.shutdown(std::net::Shutdown::Both);
                })?;
            }
        }
    }
    Ok(LinkEnd {
        control: ControlChannel {
            tx: out_tx,
            rx: in_rx,
            latency: Duration::ZERO,
        },
        data_tx: DataSender {
            tx: bulk_tx,
            urgent: urg_tx,
            budgets,
            latency: Duration::ZERO,
            _alive: Some(sending),
            injected: Default::default(),
            ordered: writers <= 1,
        },
        data_rx: DataReceiver {
            rx: in_bulk_rx,
            urgent: in_urg_rx,
            _alive: Some(alive),
        },
        pool,
    })
}

fn spawn_control<S>(stream: S, out: mpsc::Receiver<Timed>, inbound: mpsc::Sender<Timed>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    tokio::spawn(control_writer(w, out));
    tokio::spawn(control_reader(r, inbound));
}

async fn control_writer<W: tokio::io::AsyncWrite>(w: tokio::io::WriteHalf<W>, mut rx: mpsc::Receiver<Timed>) {
    let mut w = w;
    while let Some(t) = rx.recv().await {
        // A peer that stops reading is as gone as one that closed.
        match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, w.write_all(&t.frame)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    let _ = w.shutdown().await;
}

async fn control_reader<R: tokio::io::AsyncRead>(r: tokio::io::ReadHalf<R>, tx: mpsc::Sender<Timed>) {
    // Ends with the socket or with the Link: a silent peer must not keep this task forever.
    let closed = tx.clone();
    tokio::select! {
        _ = read_control_frames(r, tx) => {}
        _ = closed.closed() => {}
    }
}

async fn read_control_frames<R: tokio::io::AsyncRead>(r: tokio::io::ReadHalf<R>, tx: mpsc::Sender<Timed>) {
    let mut r = r;
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n == 0 || n > MAX_FRAME_LEN {
            return;
        }
        // The buffer grows with what actually arrives, not with what the length claims.
        let mut frame = Vec::with_capacity(4 + n.min(64 * 1024));
        frame.extend_from_slice(&len);
        match (&mut r).take(n as u64).read_to_end(&mut frame).await {
            Ok(got) if got == n => {}
            _ => return,
        }
        let t = Timed {
            due: std::time::Instant::now(),
            frame: bytes::Bytes::from(frame),
        };
        if tx.send(t).await.is_err() {
            return;
        }
    }
}

fn data_writer<W: Write>(
    s: &mut W,
    bulk: &channel::Receiver<Timed>,
    urgent: &channel::Receiver<Timed>,
    pool: &FramePool,
    alive: &Weak<()>,
) {
    loop {
        let next = match urgent.try_recv() {
            Ok(t) => Ok(t),
            Err(_) => channel::select! {
                recv(urgent) -> t => t,
                recv(bulk) -> t => t,
            },
        };
        let Ok(t) = next else { break };
        if !matches!(write_full(s, &t.frame, alive), Ok(true)) {
            break;
        }
        pool.give(t.frame);
    }
    let _ = s.flush();
}

/// Writes `buf` completely; `Ok(false)` if every sender went away while the peer was not
/// reading (a stopped or silent peer must not hold this thread forever). Both a plain socket
/// and a rustls stream report a timed-out write before consuming anything, so retrying is safe.
fn write_full<W: Write>(s: &mut W, buf: &[u8], alive: &Weak<()>) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match s.write(&buf[at..]) {
            Ok(0) => return Ok(false),
            Ok(n) => at += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if alive.upgrade().is_none() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads into `buf` completely; `Ok(false)` if the consumer went away or the peer closed.
fn read_full<R: Read>(s: &mut R, buf: &mut [u8], alive: &Weak<()>) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => return Ok(false),
            Ok(n) => at += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if alive.upgrade().is_none() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn data_reader<R: Read>(
    s: &mut R,
    bulk: &channel::Sender<Timed>,
    urgent: &channel::Sender<Timed>,
    pool: &FramePool,
    alive: &Weak<()>,
) {
    loop {
        let mut len = [0u8; 4];
        if !matches!(read_full(s, &mut len, alive), Ok(true)) {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        // Page frames never exceed a full batch.
        if !(2..=FRAME_CAPACITY - 4).contains(&n) {
            break;
        }
        let mut buf = pool.take();
        start_frame_buffer(&mut buf);
        buf.put_slice(&len);
        buf.resize(4 + n, 0);
        if !matches!(read_full(s, &mut buf[4..], alive), Ok(true)) {
            break;
        }
        if buf[4] != TAG_PAGES {
            break;
        }
        let lane = if buf[5] & FLAG_PULLED != 0 { urgent } else { bulk };
        let t = Timed {
            due: std::time::Instant::now(),
            frame: buf.freeze(),
        };
        if lane.send(t).is_err() {
            break;
        }
    }
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
