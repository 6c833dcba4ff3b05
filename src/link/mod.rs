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

/// Frames in flight on the urgent lane (post-copy pulls).
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
#[derive(Debug, Clone)]
pub struct DataSender {
    tx: channel::Sender<Timed>,
    urgent: channel::Sender<Timed>,
    /// The link's own cap, and the host's budget shared by all its migrations.
    budgets: Vec<Arc<Mutex<TokenBucket>>>,
    latency: Duration,
    /// Held while anyone may send; socket writers blocked on a stalled peer give up when the
    /// last clone is gone.
    _alive: Option<Arc<()>>,
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

    /// Like [`Self::send`], but while the bulk channel is full it also watches `interrupt`: if
    /// that yields first, the frame comes back unsent (already paced: offer it again with
    /// [`Self::resend`]) together with what interrupted. Post-copy's push uses it so that a pull
    /// arriving while the push waits for room is served at once, not after a bulk slot frees up
    /// (the wait for room was the largest share of a fault's latency in-process).
    pub fn send_unless<T>(
        &self,
        frame: Bytes,
        stop: &AtomicBool,
        interrupt: &channel::Receiver<T>,
    ) -> Result<Option<(Timed, T)>, LinkError> {
        self.pace(frame.len(), stop);
        self.resend(self.timed(frame), stop, interrupt)
    }

    /// Offers a frame handed back by [`Self::send_unless`] again.
    pub fn resend<T>(
        &self,
        t: Timed,
        stop: &AtomicBool,
        interrupt: &channel::Receiver<T>,
    ) -> Result<Option<(Timed, T)>, LinkError> {
        loop {
            let mut sel = channel::Select::new();
            let send = sel.send(&self.tx);
            let recv = sel.recv(interrupt);
            match sel.select_timeout(STOP_POLL) {
                Ok(op) if op.index() == send => {
                    return op.send(&self.tx, t).map(|()| None).map_err(|_| LinkError::Closed);
                }
                Ok(op) => {
                    debug_assert_eq!(op.index(), recv);
                    match op.recv(interrupt) {
                        Ok(v) => return Ok(Some((t, v))),
                        // Nothing can interrupt any more: a plain send.
                        Err(_) => return send_until(&self.tx, t, stop).map(|()| None),
                    }
                }
                Err(_) if stop.load(Ordering::Acquire) => return Err(LinkError::Closed),
                Err(_) => {}
            }
        }
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

/// Receives page batch frames from the peer, urgent ones first.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    rx: channel::Receiver<Timed>,
    urgent: channel::Receiver<Timed>,
    /// Held while anyone receives; socket readers stop when the last clone is gone.
    _alive: Option<Arc<()>>,
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

impl DataReceiver {
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
            Ok(t) => {
                let now = Instant::now();
                if t.due > now {
                    std::thread::sleep(t.due - now);
                }
                DataRecv::Frame(t.frame)
            }
            // One lane closed means the peer dropped its sender: both go together.
            Err(()) => DataRecv::Closed,
        }
    }
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
    fn test_send_unless_hands_frame_back_when_interrupted_while_full() {
        let (a, b) = pair(Shaping::default());
        let stop = AtomicBool::new(false);
        let (pull_tx, pull_rx) = channel::unbounded::<u64>();
        // Fill the bulk lane, then queue an interrupt.
        for _ in 0..DATA_CHANNEL_FRAMES {
            assert!(a.data_tx.send(Bytes::from_static(b"bulk"), &stop).is_ok());
        }
        pull_tx.send(7).expect("queue");
        let (held, page) = a
            .data_tx
            .send_unless(Bytes::from_static(b"late"), &stop, &pull_rx)
            .expect("link up")
            .expect("the full link gives way to the waiting interrupt");
        assert_eq!((page, &held.frame[..]), (7, &b"late"[..]));
        // Once the peer takes a frame, the held one goes out.
        assert!(matches!(
            b.data_rx.recv_timeout(Duration::from_secs(1)),
            DataRecv::Frame(_)
        ));
        assert!(a.data_tx.resend(held, &stop, &pull_rx).expect("sent").is_none());
    }
}
