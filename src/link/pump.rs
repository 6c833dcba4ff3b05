//! The moving parts of an established TCP link: two tokio tasks bridge the control connection
//! to the Link's channels, and one blocking thread per direction per data connection writes
//! and reads page batches straight from and into pooled buffers.
//!
//! With frame MACs ([`super::secure`]) each frame on the wire is followed by its tag; the
//! reader checks it before the frame goes anywhere, and a frame that fails closes the whole
//! link through its [`LinkFault`]. Control frames waiting for the Link are bounded in bytes
//! ([`CONTROL_CHANNEL_BYTES`]) as well as in count: the reader stops reading the socket while
//! the budget is spent.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use crossbeam::channel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::pull::spawn_pull;
use super::secure::{FrameMac, Session, Side, TAG_LEN};
use super::{
    ControlChannel, DataReceiver, DataSender, FramePool, LinkEnd, LinkFault, Timed, TokenBucket, CONTROL_CHANNEL_BYTES,
    CONTROL_CHANNEL_FRAMES, DATA_CHANNEL_FRAMES, URGENT_CHANNEL_FRAMES,
};
use crate::protocol::frame::{MAX_FRAME_LEN, TAG_PAGES};
use crate::protocol::pages::FLAG_PULLED;
use crate::protocol::pages::{start_frame_buffer, FRAME_CAPACITY};

/// How often a blocked data-stream reader looks up to see whether its consumer is gone.
pub(super) const READ_POLL: Duration = Duration::from_millis(200);
/// Longest one control frame may take to write: a peer that stops reading is gone.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection on its way to a link: its handshake (TLS) is done and its preamble exchanged.
pub(super) enum Conn {
    Plain(TcpStream),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    /// The TLS exporter of this connection (the channel binding of its proofs); empty on plain
    /// TCP.
    pub(super) fn binding(&self) -> Vec<u8> {
        let label = super::secure::TLS_EXPORTER_LABEL;
        let out = match self {
            Conn::Plain(_) => return Vec::new(),
            Conn::TlsClient(s) => s.get_ref().1.export_keying_material(vec![0u8; 32], label, None),
            Conn::TlsServer(s) => s.get_ref().1.export_keying_material(vec![0u8; 32], label, None),
        };
        // Only fails before the handshake completes, which every Conn is past; an empty
        // binding then makes the proofs fail rather than pass.
        out.unwrap_or_default()
    }

    pub(super) fn is_tls(&self) -> bool {
        !matches!(self, Conn::Plain(_))
    }
}

/// Reads and writes a [`Conn`], whatever its kind.
macro_rules! on_conn {
    ($conn:expr, $s:ident => $body:expr) => {
        match $conn {
            Conn::Plain($s) => $body,
            Conn::TlsClient($s) => {
                let $s = &mut **$s;
                $body
            }
            Conn::TlsServer($s) => {
                let $s = &mut **$s;
                $body
            }
        }
    };
}
pub(super) use on_conn;

/// Starts the tasks and threads of a link over its authenticated connections.
pub(super) fn build_end(
    control: Conn,
    data: Vec<Conn>,
    pull: Option<Conn>,
    budgets: Vec<Arc<Mutex<TokenBucket>>>,
    session: &Session,
    side: Side,
) -> io::Result<LinkEnd> {
    let (out_tx, out_rx) = mpsc::channel::<Timed>(CONTROL_CHANNEL_FRAMES);
    let (in_tx, in_rx) = mpsc::channel::<Timed>(CONTROL_CHANNEL_FRAMES);
    let fault = LinkFault::default();
    let control_io = ControlIo {
        macs: session.frame_macs(side, 0),
        fault: fault.clone(),
        budget: Arc::new(Semaphore::new(CONTROL_CHANNEL_BYTES)),
    };
    match control {
        Conn::Plain(s) => spawn_control(s, out_rx, in_tx, control_io),
        Conn::TlsClient(s) => spawn_control(*s, out_rx, in_tx, control_io),
        Conn::TlsServer(s) => spawn_control(*s, out_rx, in_tx, control_io),
    }

    let pool = FramePool::new();
    let (bulk_tx, bulk_rx) = channel::bounded::<Timed>(DATA_CHANNEL_FRAMES);
    let (urg_tx, urg_rx) = channel::bounded::<Timed>(URGENT_CHANNEL_FRAMES);
    let (in_bulk_tx, in_bulk_rx) = channel::bounded::<Timed>(DATA_CHANNEL_FRAMES);
    let (in_urg_tx, in_urg_rx) = channel::bounded::<Timed>(URGENT_CHANNEL_FRAMES);
    let alive = Arc::new(());
    let sending = Arc::new(());
    // With a pull connection, urgent frames and page requests go on it alone.
    let lane = match pull {
        Some(conn) => Some(spawn_pull(conn, session, side, &pool, &fault, &urg_rx, &in_urg_tx)?),
        None => None,
    };
    let data_urgent = lane.is_none().then(|| urg_rx.clone());
    // Writer threads take frames from one queue; with more than one, frames may overtake.
    let mut writers = 0usize;
    for (i, conn) in data.into_iter().enumerate() {
        // Data connection i carries role i + 1: the MAC key schedule of each is its own.
        let (seal, open) = match session.frame_macs(side, i as u8 + 1) {
            Some((s, o)) => (Some(s), Some(o)),
            None => (None, None),
        };
        let out = DataOut {
            bulk: bulk_rx.clone(),
            urgent: data_urgent.clone(),
            pool: pool.clone(),
            alive: Arc::downgrade(&sending),
            mac: seal,
        };
        let inn = DataIn {
            bulk: in_bulk_tx.clone(),
            urgent: in_urg_tx.clone(),
            pool: pool.clone(),
            alive: Arc::downgrade(&alive),
            mac: open,
            fault: fault.clone(),
        };
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
                    let mut out = out;
                    out.run(&mut w);
                    let _ = w.shutdown(std::net::Shutdown::Write);
                })?;
                reader.spawn(move || {
                    let mut inn = inn;
                    inn.run(&mut r);
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
                    let mut out = out;
                    out.run(&mut w);
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
                    let mut inn = inn;
                    inn.run(&mut r);
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
            fault,
        },
        data_tx: DataSender {
            tx: bulk_tx,
            urgent: urg_tx,
            requests: lane.as_ref().map(|l| l.requests.clone()),
            budgets,
            latency: Duration::ZERO,
            _alive: Some(sending),
            _pull: lane.as_ref().map(|l| Arc::clone(&l.alive)),
            throttle: None,
            ordered: writers <= 1,
        },
        data_rx: DataReceiver {
            rx: in_bulk_rx,
            urgent: in_urg_rx,
            asks: lane.as_ref().map(|l| l.asks.clone()),
            _alive: Some(alive),
            _pull: lane.map(|l| l.alive),
        },
        pool,
    })
}

/// What the control tasks of one link share: the MACs of both directions, where to report a
/// bad frame, and the byte budget of frames waiting for the Link.
struct ControlIo {
    macs: Option<(FrameMac, FrameMac)>,
    fault: LinkFault,
    budget: Arc<Semaphore>,
}

fn spawn_control<S>(stream: S, out: mpsc::Receiver<Timed>, inbound: mpsc::Sender<Timed>, io: ControlIo)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let (seal, open) = match io.macs {
        Some((s, o)) => (Some(s), Some(o)),
        None => (None, None),
    };
    tokio::spawn(control_writer(w, out, seal));
    tokio::spawn(control_reader(r, inbound, open, io.fault, io.budget));
}

async fn control_writer<W: tokio::io::AsyncWrite>(
    w: tokio::io::WriteHalf<W>,
    mut rx: mpsc::Receiver<Timed>,
    mut mac: Option<FrameMac>,
) {
    let mut w = w;
    while let Some(t) = rx.recv().await {
        let write = async {
            match mac.as_mut() {
                // One write, so that a frame and its tag leave in one segment.
                Some(m) => {
                    let tag = m.seal(&t.frame);
                    let mut sealed = Vec::with_capacity(t.frame.len() + TAG_LEN);
                    sealed.extend_from_slice(&t.frame);
                    sealed.extend_from_slice(&tag);
                    w.write_all(&sealed).await
                }
                None => w.write_all(&t.frame).await,
            }
        };
        // A peer that stops reading is as gone as one that closed.
        match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    let _ = w.shutdown().await;
}

async fn control_reader<R: tokio::io::AsyncRead>(
    r: tokio::io::ReadHalf<R>,
    tx: mpsc::Sender<Timed>,
    mac: Option<FrameMac>,
    fault: LinkFault,
    budget: Arc<Semaphore>,
) {
    // Ends with the socket, with the Link (a silent peer must not keep this task forever), or
    // when a data connection found a forged frame.
    let closed = tx.clone();
    tokio::select! {
        _ = read_control_frames(r, tx, mac, &fault, budget) => {}
        _ = closed.closed() => {}
        _ = fault.raised() => {}
    }
}

/// A control frame's bytes together with their share of the link's byte budget: the share
/// returns when the last reference to the frame is dropped (after the Link decoded it).
struct BudgetedFrame {
    bytes: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for BudgetedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

async fn read_control_frames<R: tokio::io::AsyncRead>(
    r: tokio::io::ReadHalf<R>,
    tx: mpsc::Sender<Timed>,
    mut mac: Option<FrameMac>,
    fault: &LinkFault,
    budget: Arc<Semaphore>,
) {
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
        // Wait for room before reading the body: a peer that floods stalls on its own socket.
        let Ok(permit) = Arc::clone(&budget).acquire_many_owned((4 + n) as u32).await else {
            return;
        };
        // The buffer grows with what actually arrives, not with what the length claims.
        let mut frame = Vec::with_capacity(4 + n.min(64 * 1024));
        frame.extend_from_slice(&len);
        match (&mut r).take(n as u64).read_to_end(&mut frame).await {
            Ok(got) if got == n => {}
            _ => return,
        }
        if let Some(m) = mac.as_mut() {
            let mut tag = [0u8; TAG_LEN];
            if r.read_exact(&mut tag).await.is_err() {
                return;
            }
            if let Err(e) = m.open(&frame, &tag) {
                fault.raise(e);
                return;
            }
        }
        let t = Timed {
            due: std::time::Instant::now(),
            frame: Bytes::from_owner(BudgetedFrame {
                bytes: frame,
                _permit: permit,
            }),
        };
        if tx.send(t).await.is_err() {
            return;
        }
    }
}

/// One data connection's sending half: frames from the link's queues to the socket.
struct DataOut {
    bulk: channel::Receiver<Timed>,
    /// `None` when the link's pull connection carries the urgent frames.
    urgent: Option<channel::Receiver<Timed>>,
    pool: FramePool,
    alive: Weak<()>,
    mac: Option<FrameMac>,
}

impl DataOut {
    fn run<W: Write>(&mut self, s: &mut W) {
        let mut scratch = Vec::with_capacity(if self.mac.is_some() { FRAME_CAPACITY } else { 0 });
        loop {
            let next = match &self.urgent {
                None => self.bulk.recv(),
                Some(urgent) => match urgent.try_recv() {
                    Ok(t) => Ok(t),
                    Err(_) => channel::select! {
                        recv(urgent) -> t => t,
                        recv(self.bulk) -> t => t,
                    },
                },
            };
            let Ok(t) = next else { break };
            let written = match self.mac.as_mut() {
                None => write_full(s, &t.frame, &self.alive),
                Some(m) => {
                    // Sealed in a copy: the frame is shared and goes back to the pool.
                    scratch.clear();
                    scratch.extend_from_slice(&t.frame);
                    let (header, body) = scratch.split_at_mut(4.min(t.frame.len()));
                    let tag = m.seal_data(header, body);
                    write_full(s, &scratch, &self.alive).and_then(|ok| {
                        if ok {
                            write_full(s, &tag, &self.alive)
                        } else {
                            Ok(false)
                        }
                    })
                }
            };
            if !matches!(written, Ok(true)) {
                break;
            }
            self.pool.give(t.frame);
        }
        let _ = s.flush();
    }
}

/// One data connection's receiving half: frames from the socket, checked, to the link's queues.
struct DataIn {
    bulk: channel::Sender<Timed>,
    urgent: channel::Sender<Timed>,
    pool: FramePool,
    alive: Weak<()>,
    mac: Option<FrameMac>,
    fault: LinkFault,
}

impl DataIn {
    fn run<R: Read>(&mut self, s: &mut R) {
        loop {
            let mut len = [0u8; 4];
            if !matches!(read_full(s, &mut len, &self.alive), Ok(true)) {
                break;
            }
            let n = u32::from_be_bytes(len) as usize;
            // Page frames never exceed a full batch.
            if !(2..=FRAME_CAPACITY - 4).contains(&n) {
                break;
            }
            let mut buf = self.pool.take();
            start_frame_buffer(&mut buf);
            buf.put_slice(&len);
            buf.resize(4 + n, 0);
            if !matches!(read_full(s, &mut buf[4..], &self.alive), Ok(true)) {
                break;
            }
            if let Some(m) = self.mac.as_mut() {
                let mut tag = [0u8; TAG_LEN];
                if !matches!(read_full(s, &mut tag, &self.alive), Ok(true)) {
                    break;
                }
                let (header, body) = buf.split_at_mut(4);
                if let Err(e) = m.open_data(header, body, &tag) {
                    // The whole link goes: the control side reports why.
                    self.fault.raise(e);
                    break;
                }
            }
            if buf[4] != TAG_PAGES {
                break;
            }
            let lane = if buf[5] & FLAG_PULLED != 0 {
                &self.urgent
            } else {
                &self.bulk
            };
            let t = Timed {
                due: std::time::Instant::now(),
                frame: buf.freeze(),
            };
            if lane.send(t).is_err() {
                break;
            }
        }
    }
}

/// Writes `buf` completely; `Ok(false)` if every sender went away while the peer was not
/// reading (a stopped or silent peer must not hold this thread forever). Both a plain socket
/// and a rustls stream report a timed-out write before consuming anything, so retrying is safe.
pub(super) fn write_full<W: Write>(s: &mut W, buf: &[u8], alive: &Weak<()>) -> io::Result<bool> {
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
pub(super) fn read_full<R: Read>(s: &mut R, buf: &mut [u8], alive: &Weak<()>) -> io::Result<bool> {
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
