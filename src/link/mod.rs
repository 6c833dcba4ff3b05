//! Links: how two hosts reach each other.
//!
//! A link has two planes. The **control plane** carries framed control messages in order; the
//! [`Link`] actor owns it (framing, keepalive, liveness). The **data plane** carries page
//! batches on crossbeam channels between dedicated threads, never through a mailbox.
//! [`LinkEnd`] is the seam a transport implements: the in-process pair here, a TCP connection
//! later, both seen by the engine as the same channels.

mod actor;
mod inproc;
mod pool;
mod shaper;

pub use actor::{CloseLink, Keepalive, Link, LinkEvent, SendControl};
pub use inproc::pair;
pub use pool::FramePool;
pub use shaper::{Shaping, TokenBucket};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel;

/// Frames in flight per data channel: bounds memory (at ~1 MiB a batch) and gives backpressure.
pub const DATA_CHANNEL_FRAMES: usize = 16;
/// Control frames in flight per direction.
pub const CONTROL_CHANNEL_FRAMES: usize = 4096;

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
}

/// Sends page batch frames to the peer, shaped by the link's shared bandwidth budget.
#[derive(Debug, Clone)]
pub struct DataSender {
    tx: channel::Sender<Timed>,
    budget: Option<Arc<Mutex<TokenBucket>>>,
    latency: Duration,
}

impl DataSender {
    /// Sends one frame, waiting for bandwidth tokens and channel space. Runs on a data-plane
    /// thread, never on an actor. Fails if the peer is gone.
    pub fn send(&self, frame: Bytes) -> Result<(), LinkError> {
        if let Some(b) = &self.budget {
            let wait = b.lock().unwrap_or_else(|p| p.into_inner()).take(frame.len() as u64);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        self.tx
            .send(Timed {
                due: Instant::now() + self.latency,
                frame,
            })
            .map_err(|_| LinkError::Closed)
    }
}

/// Receives page batch frames from the peer.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    rx: channel::Receiver<Timed>,
}

impl DataReceiver {
    /// The next frame, delivered no earlier than its due instant; `None` once the peer is gone.
    pub fn recv(&self) -> Option<Bytes> {
        let t = self.rx.recv().ok()?;
        let now = Instant::now();
        if t.due > now {
            std::thread::sleep(t.due - now);
        }
        Some(t.frame)
    }
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
    /// Like [`DataReceiver::recv`], but gives up after `wait` so the caller can check for a
    /// stop request.
    pub fn recv_timeout(&self, wait: Duration) -> DataRecv {
        match self.rx.recv_timeout(wait) {
            Ok(t) => {
                let now = Instant::now();
                if t.due > now {
                    std::thread::sleep(t.due - now);
                }
                DataRecv::Frame(t.frame)
            }
            Err(channel::RecvTimeoutError::Timeout) => DataRecv::Idle,
            Err(channel::RecvTimeoutError::Disconnected) => DataRecv::Closed,
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
