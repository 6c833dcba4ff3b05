//! Links: how two hosts reach each other.
//!
//! A link has two planes. The **control plane** carries framed control messages in order; the
//! [`Link`] actor owns it (framing, keepalive, liveness). The **data plane** carries page
//! batches on crossbeam channels between dedicated threads, never through a mailbox.
//! [`LinkEnd`] is the seam a transport implements: the in-process pair here, a TCP connection
//! later, both seen by the engine as the same channels.

mod actor;
pub mod gate;
mod inproc;
mod pool;
mod pull;
mod pump;
pub mod secure;
mod shaper;
pub mod tcp;
pub mod tls;

pub use actor::{
    event_channel, CloseLink, Keepalive, Link, LinkEvent, LinkEvents, SendControl, LINK_EVENTS, LINK_EVENT_BYTES,
};
pub use inproc::{pair, pair_with_budget};
pub use pool::FramePool;
pub use pull::{
    decode_request, encode_request, pull_connections_opened, pull_requests_received, PullAsk, PullRequestError,
    MAX_REQUEST_PAGES,
};
pub use shaper::{weighted_shares, Claim, Shaping, SharedBudget, TokenBucket};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel;

/// Frames in flight per data channel: bounds memory (at ~1 MiB a batch) and gives backpressure.
pub const DATA_CHANNEL_FRAMES: usize = 16;
/// Control frames in flight per direction.
pub const CONTROL_CHANNEL_FRAMES: usize = 4096;
/// Bytes of control frames from a TCP peer waiting for the Link at once: with frames of up to
/// 32 MiB, a count alone would let one peer park 128 GiB in the channel.
pub const CONTROL_CHANNEL_BYTES: usize = 64 << 20;

/// Errors of a link.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// The peer closed or vanished.
    #[error("link closed by peer")]
    Closed,
    /// No frame arrived within the keepalive bound.
    #[error("peer silent for {silent_ms} ms (keepalive bound {bound_ms} ms)")]
    Silent {
        /// How long nothing arrived.
        silent_ms: u64,
        /// The bound.
        bound_ms: u64,
    },
    /// The peer sent a frame that does not decode.
    #[error("bad frame from peer: {0}")]
    BadFrame(String),
    /// The send queue is full: the peer does not keep up.
    #[error("control queue full ({CONTROL_CHANNEL_FRAMES} frames)")]
    Backpressure,
    /// A frame whose MAC does not verify: changed, replayed, dropped or reordered on the way.
    #[error("frame {seq} on connection {conn} failed authentication (changed, replayed or reordered)")]
    Tampered {
        /// Connection: 0 control, 1.. data.
        conn: u8,
        /// The frame's place in that connection's direction.
        seq: u64,
    },
    /// The pull connection closed while the link was in use: the link is lost with it.
    #[error("the pull connection closed")]
    PullClosed,
    /// The owner's event queue is full: the peer sends faster than the owner reads.
    #[error("peer floods the link: {events} messages of {bytes} bytes wait for the owner")]
    Overflow {
        /// Messages waiting.
        events: usize,
        /// Their frames' bytes, the one that did not fit included.
        bytes: usize,
    },
}

/// Why a transport closed a link under the Link actor, for the actor to report instead of a
/// plain [`LinkError::Closed`]. Shared by the control reader and the data threads of one link.
#[derive(Debug, Clone, Default)]
pub struct LinkFault(Arc<FaultState>);

#[derive(Debug, Default)]
struct FaultState {
    error: std::sync::OnceLock<LinkError>,
    raised: tokio::sync::Notify,
}

impl LinkFault {
    /// Records `err` (the first one wins) and wakes whoever waits in [`Self::raised`].
    pub fn raise(&self, err: LinkError) {
        let _ = self.0.error.set(err);
        self.0.raised.notify_one();
    }

    /// The recorded error, if any.
    pub fn get(&self) -> Option<LinkError> {
        self.0.error.get().cloned()
    }

    /// Returns once an error is recorded.
    pub async fn raised(&self) {
        while self.0.error.get().is_none() {
            self.0.raised.notified().await;
        }
    }
}

/// A frame with the instant it may be delivered (send time plus link latency).
#[derive(Debug)]
pub struct Timed {
    /// Earliest delivery.
    pub due: Instant,
    /// The whole frame, length prefix included.
    pub frame: Bytes,
}

/// One end of the control plane.
#[derive(Debug)]
pub struct ControlChannel {
    /// Frames to the peer.
    pub tx: tokio::sync::mpsc::Sender<Timed>,
    /// Frames from the peer.
    pub rx: tokio::sync::mpsc::Receiver<Timed>,
    /// Latency added to each frame sent.
    pub latency: Duration,
    /// Set by the transport when it closes the link for a reason of its own.
    pub fault: LinkFault,
}

/// Frames in flight on the urgent lane (post-copy pulls), and page requests in flight on the
/// pull lane.
pub const URGENT_CHANNEL_FRAMES: usize = 64;

/// Extra pacing of a data sender: a decorator that slows, or watches, what leaves. Fault
/// injection installs one (a stall, a bandwidth collapse, byte triggers); a link without one
/// pays nothing for it.
pub trait Throttle: Send + Sync + std::fmt::Debug {
    /// How long a frame of `bytes` waits before it leaves; called once per frame, on the data
    /// plane's thread, before the frame is sent.
    fn delay(&self, bytes: usize) -> Duration;
}

/// Sends page batch frames to the peer, shaped by the link's shared bandwidth budget. Two
/// lanes: bulk frames, and urgent frames (post-copy pulls) that never queue behind bulk ones,
/// as QEMU's post-copy preempt channel does.
///
/// A link with a **pull lane** (in-process, and TCP where the peer accepted the pull
/// connection) carries urgent frames apart from the bulk ones all the way to the peer, and
/// brings the peer's page requests here ([`Self::pull_requests`]); without one, urgent frames
/// share the data connections (ahead of queued bulk frames, but behind what the sockets hold)
/// and requests come over the control link.
#[derive(Debug, Clone)]
pub struct DataSender {
    tx: channel::Sender<Timed>,
    urgent: channel::Sender<Timed>,
    /// Page request frames from the peer's pull lane; `None`: the peer asks over control.
    requests: Option<channel::Receiver<Timed>>,
    /// The link's own cap, and the host's budget shared by all its migrations.
    budgets: Vec<Arc<Mutex<TokenBucket>>>,
    latency: Duration,
    /// Held while anyone may send; socket writers blocked on a stalled peer give up when the
    /// last clone is gone.
    _alive: Option<Arc<()>>,
    /// Held while this end uses its pull connection (shared with the [`DataReceiver`]).
    _pull: Option<Arc<()>>,
    /// A decorator's extra pacing (fault injection), if any.
    throttle: Option<Arc<dyn Throttle>>,
    /// True if bulk frames arrive in the order sent (one stream carries them).
    ordered: bool,
}

impl DataSender {
    /// True if bulk frames reach the peer in the order they were sent. Several TCP streams
    /// may reorder them; anything that depends on order (a delta after its base) checks this.
    pub fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// The peer's page request frames ([`decode_request`]), if this link has a pull lane.
    pub fn pull_requests(&self) -> Option<channel::Receiver<Timed>> {
        self.requests.clone()
    }

    /// Installs `throttle` on this sender and the clones made from it after.
    pub fn throttle(&mut self, throttle: Arc<dyn Throttle>) {
        self.throttle = Some(throttle);
    }

    fn pace(&self, bytes: usize, stop: &AtomicBool) {
        let budgets = self
            .budgets
            .iter()
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).take(bytes as u64))
            .max()
            .unwrap_or_default();
        let extra = self.throttle.as_ref().map(|t| t.delay(bytes)).unwrap_or_default();
        let wait = budgets.max(extra);
        // In slices, so that a cancel is not held up by a long wait on a slow link.
        let until = Instant::now() + wait;
        while !stop.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(STOP_POLL));
        }
    }

    fn timed(&self, frame: Bytes) -> Timed {
        Timed {
            due: Instant::now() + self.latency,
            frame,
        }
    }

    /// Sends one bulk frame, waiting for bandwidth tokens and channel space. Runs on a
    /// data-plane thread, never on an actor. Fails if the peer is gone, or once `stop` is set
    /// (a stalled peer must not hold the sender forever).
    pub fn send(&self, frame: Bytes, stop: &AtomicBool) -> Result<(), LinkError> {
        self.pace(frame.len(), stop);
        send_until(&self.tx, self.timed(frame), stop)
    }

    /// Sends one urgent frame ahead of queued bulk frames; it still counts against the budget.
    pub fn send_urgent(&self, frame: Bytes, stop: &AtomicBool) -> Result<(), LinkError> {
        self.pace(frame.len(), stop);
        send_until(&self.urgent, self.timed(frame), stop)
    }
}

fn send_until(tx: &channel::Sender<Timed>, mut t: Timed, stop: &AtomicBool) -> Result<(), LinkError> {
    loop {
        match tx.send_timeout(t, STOP_POLL) {
            Ok(()) => return Ok(()),
            Err(channel::SendTimeoutError::Disconnected(_)) => return Err(LinkError::Closed),
            Err(channel::SendTimeoutError::Timeout(back)) => {
                if stop.load(Ordering::Acquire) {
                    return Err(LinkError::Closed);
                }
                t = back;
            }
        }
    }
}

/// How often a blocked data-plane send looks up for a stop request.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Receives page batch frames from the peer, urgent ones first; asks for pages on the pull
/// lane if the link has one.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    rx: channel::Receiver<Timed>,
    urgent: channel::Receiver<Timed>,
    /// Page requests to the peer's pull lane; `None`: pages are asked for over control.
    asks: Option<channel::Sender<Timed>>,
    /// Held while anyone receives; socket readers stop when the last clone is gone.
    _alive: Option<Arc<()>>,
    /// Held while this end uses its pull connection (shared with the [`DataSender`]).
    _pull: Option<Arc<()>>,
}

/// What a bounded wait on a [`DataReceiver`] gave.
#[derive(Debug)]
pub enum DataRecv {
    /// A frame.
    Frame(Bytes),
    /// Nothing within the wait.
    Idle,
    /// The peer is gone.
    Closed,
}

/// Which of a receiver's lanes to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Bulk frames only.
    Bulk,
    /// Urgent frames (pulled pages) only.
    Urgent,
}

impl DataReceiver {
    /// True if this link has a pull lane of its own ([`Self::ask`] can send).
    pub fn has_pull_lane(&self) -> bool {
        self.asks.is_some()
    }

    /// Asks the peer for `pages` on the pull lane, without waiting. [`PullAsk::Sent`] only if
    /// the request is on its way; otherwise the caller asks over the control link.
    pub fn ask(&self, pages: &[u64]) -> PullAsk {
        let Some(asks) = &self.asks else {
            return PullAsk::NoLane;
        };
        let t = Timed {
            due: Instant::now(),
            frame: encode_request(pages),
        };
        match asks.try_send(t) {
            Ok(()) => PullAsk::Sent,
            Err(channel::TrySendError::Full(_)) => PullAsk::Full,
            Err(channel::TrySendError::Disconnected(_)) => PullAsk::Closed,
        }
    }

    /// This receiver, asking for pages on `other`'s pull lane: for a decorator that puts a
    /// thread between a link's data half and the plane (the page requests still reach the
    /// link's peer).
    pub fn asking_through(mut self, other: &DataReceiver) -> Self {
        self.asks.clone_from(&other.asks);
        self
    }

    /// The next frame of `lane` alone, as [`Self::recv_timeout`] delivers it: a data plane
    /// that applies pulled pages on a thread of their own reads each lane separately.
    pub fn recv_lane_timeout(&self, lane: Lane, wait: Duration) -> DataRecv {
        let rx = match lane {
            Lane::Bulk => &self.rx,
            Lane::Urgent => &self.urgent,
        };
        match rx.recv_timeout(wait) {
            Ok(t) => deliver(t),
            Err(channel::RecvTimeoutError::Timeout) => DataRecv::Idle,
            Err(channel::RecvTimeoutError::Disconnected) => DataRecv::Closed,
        }
    }

    /// The next frame (an urgent one if any is waiting), delivered no earlier than its due
    /// instant; gives up after `wait` so the caller can check for a stop request.
    pub fn recv_timeout(&self, wait: Duration) -> DataRecv {
        let got = match self.urgent.try_recv() {
            Ok(t) => Ok(t),
            Err(_) => {
                channel::select! {
                    recv(self.urgent) -> t => t.map_err(|_| ()),
                    recv(self.rx) -> t => t.map_err(|_| ()),
                    default(wait) => return DataRecv::Idle,
                }
            }
        }
        // A closed lane is ready at once even while the other still holds frames the peer sent
        // before it went away: those are delivered first.
        .or_else(|()| self.urgent.try_recv().or_else(|_| self.rx.try_recv()).map_err(|_| ()));
        match got {
            Ok(t) => deliver(t),
            // One lane closed means the peer dropped its sender: both go together.
            Err(()) => DataRecv::Closed,
        }
    }
}

/// A frame, no earlier than its due instant (in-process latency shaping).
fn deliver(t: Timed) -> DataRecv {
    let now = Instant::now();
    if t.due > now {
        std::thread::sleep(t.due - now);
    }
    DataRecv::Frame(t.frame)
}

/// One end of a link, as a transport hands it to the engine.
#[derive(Debug)]
pub struct LinkEnd {
    /// Ordered control frames.
    pub control: ControlChannel,
    /// Page batches out.
    pub data_tx: DataSender,
    /// Page batches in.
    pub data_rx: DataReceiver,
    /// Where page frame buffers are taken from and given back.
    pub pool: FramePool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_an_in_process_link_has_a_pull_lane_apart_from_the_bulk_one() {
        let (a, b) = pair(Shaping::default());
        let stop = AtomicBool::new(false);
        // Fill the bulk lane: neither pulled pages nor requests wait behind it.
        for _ in 0..DATA_CHANNEL_FRAMES {
            assert!(a.data_tx.send(Bytes::from_static(b"bulk"), &stop).is_ok());
        }
        assert!(b.data_rx.has_pull_lane());
        assert_eq!(b.data_rx.ask(&[7, 9]), PullAsk::Sent);
        let requests = a.data_tx.pull_requests().expect("a pull lane");
        let asked = requests.recv_timeout(Duration::from_secs(1)).expect("the request");
        assert_eq!(decode_request(&asked.frame), Ok(vec![7, 9]));
        a.data_tx
            .send_urgent(Bytes::from_static(b"pulled"), &stop)
            .expect("the urgent lane has room");
        match b.data_rx.recv_lane_timeout(Lane::Urgent, Duration::from_secs(1)) {
            DataRecv::Frame(f) => assert_eq!(&f[..], b"pulled"),
            other => panic!("no pulled frame: {other:?}"),
        }
        assert!(matches!(
            b.data_rx.recv_lane_timeout(Lane::Bulk, Duration::from_secs(1)),
            DataRecv::Frame(f) if &f[..] == b"bulk"
        ));
        // The other way too: each end asks its peer.
        assert_eq!(a.data_rx.ask(&[1]), PullAsk::Sent);
        assert!(b.data_tx.pull_requests().expect("lane").try_recv().is_ok());
    }
}
