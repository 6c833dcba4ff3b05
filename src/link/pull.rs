//! The pull lane's page requests: post-copy's target asks the source for the pages its guest
//! faulted on, on a lane of their own instead of the control link, so that a request never
//! waits behind control traffic or an actor's mailbox.
//!
//! A request is a frame: 4-byte big-endian body length, the tag
//! [`crate::protocol::frame::TAG_PULL_REQUEST`], a 2-byte big-endian count, then that many
//! 8-byte big-endian page indices, most urgent first. The count is capped
//! ([`MAX_REQUEST_PAGES`]) and checked against the length before anything is allocated.
//!
//! Over TCP the lane is a connection of its own, the **pull connection**, in the manner of
//! QEMU's postcopy-preempt channel: opened after the control handshake and before the data
//! connections, proved like a data connection, every frame sealed like a data frame (its own
//! MAC key schedule, [`PULL_ROLE`]), small socket buffers and `TCP_NODELAY`. One thread per
//! direction: the writer takes urgent page frames and page requests, the reader hands pages to
//! the data receiver's urgent lane and requests to the data sender. Its loss while the link
//! is in use is the link's loss ([`LinkError::PullClosed`]): a post-copy recovery replaces both.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use crossbeam::channel;

use super::pump::{read_full, write_full, Conn, READ_POLL};
use super::secure::{FrameMac, Session, Side, TAG_LEN};
use super::{FramePool, LinkError, LinkFault, Timed, URGENT_CHANNEL_FRAMES};
use crate::protocol::frame::{TAG_PAGES, TAG_PULL_REQUEST};
use crate::protocol::pages::{start_frame_buffer, FRAME_CAPACITY};

/// Socket buffers of the pull connection, each way. Small on purpose: that connection carries
/// only page requests, the pages they ask for and a short prepaging window after each, so a
/// few dozen pages is room enough, and nothing piles up in front of the next pulled page the
/// way bulk batches pile up in a data connection's megabytes of buffer.
pub(super) const PULL_SOCKET_BUFFER: usize = 128 << 10;
/// The pull connection's role in its preamble and its id in the frame MACs' nonces: apart from
/// the control connection (0) and every data connection (1..=16).
pub(super) const PULL_ROLE: u8 = 0xFF;
/// The byte a listener answers a proved pull connection with. A listener built before pull
/// connections refuses the role and closes the connection instead: the client then goes on
/// without one, and post-copy pulls share the data and control connections as before.
pub(super) const PULL_ACCEPTED: u8 = 0x5A;

/// Most pages one request names; a caller with more sends several.
pub const MAX_REQUEST_PAGES: usize = 256;

/// Bytes of a request's body before its pages: tag and count.
const REQUEST_HEAD: usize = 1 + 2;

/// Longest request frame body.
pub(super) const MAX_REQUEST_BODY: usize = REQUEST_HEAD + 8 * MAX_REQUEST_PAGES;

/// What became of a request offered to the pull lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullAsk {
    /// On its way on the pull lane.
    Sent,
    /// The link has no pull lane: ask over the control link.
    NoLane,
    /// The lane's queue is full: ask over the control link this time.
    Full,
    /// The lane is gone (the link is being lost): the control link tells why.
    Closed,
}

/// A frame on the pull lane that is not a valid page request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PullRequestError {
    /// Not a request frame, or its length does not match its count.
    #[error("malformed page request of {len} bytes")]
    Malformed {
        /// The frame's length.
        len: usize,
    },
    /// More pages than a request may name.
    #[error("page request names {count} pages, at most {MAX_REQUEST_PAGES} allowed")]
    TooMany {
        /// The count it claimed.
        count: usize,
    },
}

/// Pull connections this process opened and a listener accepted.
static OPENED: AtomicU64 = AtomicU64::new(0);

/// Pull connections this process opened that a listener accepted, since it started: a link
/// over TCP, and every post-copy recovery link, opens one.
pub fn pull_connections_opened() -> u64 {
    OPENED.load(Ordering::Relaxed)
}

/// Page requests this process received on pull connections.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Page requests this process received on pull connections, since it started.
pub fn pull_requests_received() -> u64 {
    REQUESTS.load(Ordering::Relaxed)
}

/// Counts a pull connection the listener accepted.
pub(super) fn opened() {
    OPENED.fetch_add(1, Ordering::Relaxed);
}

/// The pull connection's half of a link end, handed to its data sender and receiver.
pub(super) struct PullLane {
    /// Page requests from the peer (for the data sender).
    pub(super) requests: channel::Receiver<Timed>,
    /// Page requests to the peer (for the data receiver).
    pub(super) asks: channel::Sender<Timed>,
    /// Held by the data sender and receiver while either uses the connection.
    pub(super) alive: Arc<()>,
}

/// Starts the two threads of an authenticated pull connection. `urgent` holds the urgent page
/// frames this end sends; `pages` takes those the peer sends.
pub(super) fn spawn_pull(
    conn: Conn,
    session: &Session,
    side: Side,
    pool: &FramePool,
    fault: &LinkFault,
    urgent: &channel::Receiver<Timed>,
    pages: &channel::Sender<Timed>,
) -> io::Result<PullLane> {
    let Conn::Plain(s) = conn else {
        // The listener refuses the role over TLS, and the client never opens one there.
        return Err(io::Error::new(io::ErrorKind::Unsupported, "pull connection over TLS"));
    };
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(READ_POLL))?;
    s.set_write_timeout(Some(READ_POLL))?;
    s.set_nodelay(true)?;
    let sock = socket2::SockRef::from(&s);
    sock.set_send_buffer_size(PULL_SOCKET_BUFFER)?;
    sock.set_recv_buffer_size(PULL_SOCKET_BUFFER)?;
    let (seal, open) = match session.frame_macs(side, PULL_ROLE) {
        Some((s, o)) => (Some(s), Some(o)),
        None => (None, None),
    };
    let (requests_tx, requests) = channel::bounded::<Timed>(URGENT_CHANNEL_FRAMES);
    let (asks, asks_rx) = channel::bounded::<Timed>(URGENT_CHANNEL_FRAMES);
    let alive = Arc::new(());
    let mut out = PullOut {
        pages: Some(urgent.clone()),
        asks: Some(asks_rx),
        pool: pool.clone(),
        alive: Arc::downgrade(&alive),
        mac: seal,
    };
    let mut inn = PullIn {
        pages: pages.clone(),
        requests: requests_tx,
        pool: pool.clone(),
        alive: Arc::downgrade(&alive),
        mac: open,
        fault: fault.clone(),
    };
    let mut r = s.try_clone()?;
    let mut w = s;
    std::thread::Builder::new()
        .name("migratory-pull-tx".into())
        .spawn(move || {
            out.run(&mut w);
            let _ = w.shutdown(std::net::Shutdown::Write);
        })?;
    std::thread::Builder::new()
        .name("migratory-pull-rx".into())
        .spawn(move || {
            inn.run(&mut r);
            let _ = r.shutdown(std::net::Shutdown::Read);
        })?;
    Ok(PullLane { requests, asks, alive })
}

/// The pull connection's sending half: pulled pages and page requests, each sealed and written
/// in one piece as soon as it is queued.
struct PullOut {
    /// Urgent page frames; `None` once every sender is gone (a target sends none).
    pages: Option<channel::Receiver<Timed>>,
    /// Page requests; `None` once every sender is gone (a source sends none).
    asks: Option<channel::Receiver<Timed>>,
    pool: FramePool,
    alive: Weak<()>,
    mac: Option<FrameMac>,
}

impl PullOut {
    fn next(&mut self) -> Option<(Timed, bool)> {
        loop {
            let got = match (&self.pages, &self.asks) {
                (Some(p), Some(a)) => channel::select! {
                    recv(p) -> t => t.map(|t| (t, true)).map_err(|_| true),
                    recv(a) -> t => t.map(|t| (t, false)).map_err(|_| false),
                },
                (Some(p), None) => p.recv().map(|t| (t, true)).map_err(|_| true),
                (None, Some(a)) => a.recv().map(|t| (t, false)).map_err(|_| false),
                (None, None) => return None,
            };
            match got {
                Ok(x) => return Some(x),
                Err(true) => self.pages = None,
                Err(false) => self.asks = None,
            }
        }
    }

    fn run<W: Write>(&mut self, s: &mut W) {
        let mut sealed = Vec::with_capacity(FRAME_CAPACITY + TAG_LEN);
        while let Some((t, page)) = self.next() {
            sealed.clear();
            sealed.extend_from_slice(&t.frame);
            if let Some(m) = self.mac.as_mut() {
                let (header, body) = sealed.split_at_mut(4.min(t.frame.len()));
                let tag = m.seal_data(header, body);
                sealed.extend_from_slice(&tag);
            }
            // One write, so that a frame and its tag leave in one segment.
            if !matches!(write_full(s, &sealed, &self.alive), Ok(true)) {
                break;
            }
            if page {
                self.pool.give(t.frame);
            }
        }
        let _ = s.flush();
    }
}

/// The pull connection's receiving half: frames checked, then pages to the urgent lane and
/// requests to whoever serves them.
/// How long a closed pull connection waits before it counts as the link's loss: long
/// enough for a loopback or LAN control connection to deliver what the peer sent before it
/// closed, short next to a post-copy recovery's timeout.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

struct PullIn {
    pages: channel::Sender<Timed>,
    requests: channel::Sender<Timed>,
    pool: FramePool,
    alive: Weak<()>,
    mac: Option<FrameMac>,
    fault: LinkFault,
}

impl PullIn {
    fn run<R: Read>(&mut self, s: &mut R) {
        let why = self.pump(s);
        if why == LinkError::PullClosed {
            // A peer that gives up sends `Abort` on the control connection and then closes
            // every connection; this one's end can be seen first. The grace lets the control
            // connection deliver the reason (and its own close) before this loss is raised.
            std::thread::sleep(CLOSE_GRACE);
        }
        // Gone while this end still uses it: the link is lost (a recovery opens a new one).
        if self.alive.upgrade().is_some() {
            self.fault.raise(why);
        }
    }

    /// Reads until the connection or this end goes; returns what ended it.
    fn pump<R: Read>(&mut self, s: &mut R) -> LinkError {
        loop {
            let mut len = [0u8; 4];
            if !matches!(read_full(s, &mut len, &self.alive), Ok(true)) {
                return LinkError::PullClosed;
            }
            let n = u32::from_be_bytes(len) as usize;
            if !(2..=FRAME_CAPACITY - 4).contains(&n) {
                return LinkError::BadFrame(format!("pull connection frame of {n} bytes"));
            }
            let mut buf = if n <= MAX_REQUEST_BODY {
                BytesMut::with_capacity(4 + MAX_REQUEST_BODY)
            } else {
                let mut b = self.pool.take();
                start_frame_buffer(&mut b);
                b
            };
            buf.put_slice(&len);
            buf.resize(4 + n, 0);
            if !matches!(read_full(s, &mut buf[4..], &self.alive), Ok(true)) {
                return LinkError::PullClosed;
            }
            if let Some(m) = self.mac.as_mut() {
                let mut tag = [0u8; TAG_LEN];
                if !matches!(read_full(s, &mut tag, &self.alive), Ok(true)) {
                    return LinkError::PullClosed;
                }
                let (header, body) = buf.split_at_mut(4);
                if let Err(e) = m.open_data(header, body, &tag) {
                    return e;
                }
            }
            let (tag, small) = (buf[4], n <= MAX_REQUEST_BODY);
            let lane = match tag {
                TAG_PAGES => &self.pages,
                TAG_PULL_REQUEST if small => {
                    REQUESTS.fetch_add(1, Ordering::Relaxed);
                    &self.requests
                }
                other => return LinkError::BadFrame(format!("tag {other:#04x} on the pull connection")),
            };
            let t = Timed {
                due: std::time::Instant::now(),
                frame: buf.freeze(),
            };
            // Nobody reads that lane on this end any more (a source has no use for pages, a
            // target none for requests once its plane is gone): the frame is dropped.
            if let Err(channel::SendError(t)) = lane.send(t) {
                self.pool.give(t.frame);
            }
        }
    }
}

/// The request frame for `pages` (the first [`MAX_REQUEST_PAGES`] of them).
pub fn encode_request(pages: &[u64]) -> Bytes {
    let pages = &pages[..pages.len().min(MAX_REQUEST_PAGES)];
    let body = REQUEST_HEAD + 8 * pages.len();
    let mut out = BytesMut::with_capacity(4 + body);
    out.put_u32(body as u32);
    out.put_u8(TAG_PULL_REQUEST);
    out.put_u16(pages.len() as u16);
    for &p in pages {
        out.put_u64(p);
    }
    out.freeze()
}

/// The pages a request frame (length prefix included) names.
pub fn decode_request(frame: &[u8]) -> Result<Vec<u64>, PullRequestError> {
    let malformed = PullRequestError::Malformed { len: frame.len() };
    let (head, pages) = match frame.split_at_checked(4 + REQUEST_HEAD) {
        Some(x) => x,
        None => return Err(malformed),
    };
    let body = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if head[4] != TAG_PULL_REQUEST || body + 4 != frame.len() {
        return Err(malformed);
    }
    let count = u16::from_be_bytes([head[5], head[6]]) as usize;
    if count > MAX_REQUEST_PAGES {
        return Err(PullRequestError::TooMany { count });
    }
    if pages.len() != 8 * count {
        return Err(malformed);
    }
    Ok(pages
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_request_round_trips_and_malformed_ones_are_refused() {
        let frame = encode_request(&[7, 1 << 40, 3]);
        assert_eq!(decode_request(&frame), Ok(vec![7, 1 << 40, 3]));
        assert_eq!(decode_request(&encode_request(&[])), Ok(vec![]));
        let long: Vec<u64> = (0..MAX_REQUEST_PAGES as u64 + 5).collect();
        assert_eq!(
            decode_request(&encode_request(&long)).map(|p| p.len()),
            Ok(MAX_REQUEST_PAGES),
            "capped, never refused"
        );
        // Truncated, padded, the wrong tag, a count beyond the cap.
        assert!(decode_request(&frame[..frame.len() - 1]).is_err());
        let mut padded = frame.to_vec();
        padded.push(0);
        assert!(decode_request(&padded).is_err());
        let mut tag = frame.to_vec();
        tag[4] = b'P';
        assert!(decode_request(&tag).is_err());
        let mut many = frame.to_vec();
        many[5..7].copy_from_slice(&(MAX_REQUEST_PAGES as u16 + 1).to_be_bytes());
        assert_eq!(
            decode_request(&many),
            Err(PullRequestError::TooMany {
                count: MAX_REQUEST_PAGES + 1
            })
        );
    }
}
