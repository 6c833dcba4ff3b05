//! The Link actor: the control plane of one peer connection.

use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{ControlChannel, LinkError, LinkFault, Timed};
use crate::clock::{self, Instant};
use crate::protocol::frame::{decode_control, encode_control, frame_body};
use crate::protocol::ControlMessage;

/// Liveness settings: a ping every `interval`; a peer silent for `timeout` is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Ping period.
    pub interval: Duration,
    /// Silence after which the peer is declared lost.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What a link tells its owner.
#[derive(Debug)]
pub enum LinkEvent {
    /// A control message from the peer (pings are consumed by the link).
    Received(ControlMessage),
    /// The link is gone; no more events follow.
    Lost(LinkError),
}

/// Events a link may hold for its owner. A peer that makes more wait (the owner is busy, or
/// queued behind the host's cap and not reading) is cut with [`LinkError::Overflow`] instead of
/// being buffered without limit.
pub const LINK_EVENTS: usize = 256;
/// Bytes of frames whose messages may wait for the owner: decoded messages are not bounded
/// by the transport's byte budget any more, and one may be as large as a frame.
pub const LINK_EVENT_BYTES: usize = 64 << 20;

/// The owner's end of a link's events.
pub type LinkEvents = mpsc::Receiver<LinkEvent>;

/// A bounded channel for a link's events ([`LINK_EVENTS`]): the sender goes to [`Link::new`].
pub fn event_channel() -> (mpsc::Sender<LinkEvent>, LinkEvents) {
    mpsc::channel(LINK_EVENTS)
}

/// Owns one control channel: encodes and sends, decodes and forwards, pings, and watches for
/// silence. The owner reads [`LinkEvent`]s from the channel given at start.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::Sender<Timed>,
    rx: Option<mpsc::Receiver<Timed>>,
    latency: Duration,
    owner: mpsc::Sender<LinkEvent>,
    fault: LinkFault,
    /// Frame sizes of the messages still waiting for the owner, oldest first, and their sum.
    waiting: std::collections::VecDeque<usize>,
    waiting_bytes: usize,
    keepalive: Keepalive,
    last_rx: Instant,
    ping_seq: u64,
    lost: bool,
}

impl Link {
    /// A link over `channel` that reports to `owner` (see [`event_channel`]).
    pub fn new(channel: ControlChannel, owner: mpsc::Sender<LinkEvent>, keepalive: Keepalive) -> Self {
        Self {
            tx: channel.tx,
            rx: Some(channel.rx),
            latency: channel.latency,
            owner,
            fault: channel.fault,
            waiting: Default::default(),
            waiting_bytes: 0,
            keepalive,
            last_rx: clock::now(),
            ping_seq: 0,
            lost: false,
        }
    }

    fn lose(&mut self, err: LinkError, ctx: &mut Context<Self>) {
        if !self.lost {
            self.lost = true;
            // The owner may be gone already; then nobody needs the news. The last slot of the
            // queue is kept for this event (see `forward`).
            let _ = self.owner.try_send(LinkEvent::Lost(err));
        }
        ctx.stop();
    }

    /// Hands a message that came in a frame of `size` bytes to the owner, within the bounds
    /// of the queue (keeping its last slot for the final `Lost`) and of [`LINK_EVENT_BYTES`].
    fn forward(&mut self, m: ControlMessage, size: usize, ctx: &mut Context<Self>) {
        if self.owner.is_closed() {
            ctx.stop();
            return;
        }
        // The owner takes events in order: whatever it took were the oldest.
        let queued = self.owner.max_capacity() - self.owner.capacity();
        while self.waiting.len() > queued {
            self.waiting_bytes -= self.waiting.pop_front().unwrap_or_default();
        }
        if self.owner.capacity() <= 1 || self.waiting_bytes + size > LINK_EVENT_BYTES {
            let err = LinkError::Overflow {
                events: queued,
                bytes: self.waiting_bytes + size,
            };
            self.lose(err, ctx);
        } else if self.owner.try_send(LinkEvent::Received(m)).is_ok() {
            self.waiting.push_back(size);
            self.waiting_bytes += size;
        } else {
            ctx.stop();
        }
    }

    fn send_frame(&mut self, frame: Bytes) -> Result<(), LinkError> {
        let due = std::time::Instant::now() + self.latency;
        self.tx.try_send(Timed { due, frame }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkError::Backpressure,
            mpsc::error::TrySendError::Closed(_) => LinkError::Closed,
        })
    }
}

impl Actor for Link {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(mut rx) = self.rx.take() {
            let me = ctx.address();
            ctx.spawn(
                async move {
                    while let Some(t) = rx.recv().await {
                        let now = std::time::Instant::now();
                        if t.due > now {
                            tokio::time::sleep(t.due - now).await;
                        }
                        // Awaiting the mailbox gives backpressure instead of dropping frames.
                        if me.send(FrameArrived(t.frame)).await.is_err() {
                            return;
                        }
                    }
                    me.do_send(PeerClosed);
                }
                .into_actor(self),
            );
        }
        ctx.run_interval(self.keepalive.interval, |act, ctx| {
            let silent = clock::now().duration_since(act.last_rx);
            if silent > act.keepalive.timeout {
                let err = LinkError::Silent {
                    silent_ms: silent.as_millis() as u64,
                    bound_ms: act.keepalive.timeout.as_millis() as u64,
                };
                act.lose(err, ctx);
                return;
            }
            act.ping_seq += 1;
            let ping = ControlMessage::Ping { seq: act.ping_seq };
            match encode_control(&ping) {
                // A closed peer is reported by the reader once it has delivered every frame
                // still queued (an Abort among them), never from here ahead of them.
                Ok(f) => {
                    let _ = act.send_frame(f);
                }
                Err(e) => act.lose(LinkError::BadFrame(e.to_string()), ctx),
            }
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct FrameArrived(Bytes);

#[derive(Message)]
#[rtype(result = "()")]
struct PeerClosed;

impl Handler<FrameArrived> for Link {
    type Result = ();

    fn handle(&mut self, msg: FrameArrived, ctx: &mut Self::Context) {
        self.last_rx = clock::now();
        let decoded = frame_body(&msg.0).and_then(|b| decode_control(&b));
        match decoded {
            Ok(ControlMessage::Ping { .. }) => {}
            Ok(m) => self.forward(m, msg.0.len(), ctx),
            Err(e) => self.lose(LinkError::BadFrame(e.to_string()), ctx),
        }
    }
}

impl Handler<PeerClosed> for Link {
    type Result = ();

    fn handle(&mut self, _: PeerClosed, ctx: &mut Self::Context) {
        // A transport that cut the link says why (a frame that failed its MAC, a flood).
        let err = self.fault.get().unwrap_or(LinkError::Closed);
        self.lose(err, ctx);
    }
}

/// Send a control message to the peer.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), LinkError>")]
pub struct SendControl(pub ControlMessage);

impl Handler<SendControl> for Link {
    type Result = Result<(), LinkError>;

    fn handle(&mut self, msg: SendControl, _: &mut Self::Context) -> Self::Result {
        let frame = encode_control(&msg.0).map_err(|e| LinkError::BadFrame(e.to_string()))?;
        self.send_frame(frame)
    }
}

/// Close the link: the peer sees it closed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CloseLink;

impl Handler<CloseLink> for Link {
    type Result = ();

    fn handle(&mut self, _: CloseLink, ctx: &mut Self::Context) {
        self.lost = true;
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{pair, Shaping};

    /// Floods a Link whose owner does not read with `frames` messages of `size` bytes each;
    /// returns how many arrived before the link was lost, and why.
    fn flood(frames: usize, size: usize) -> (usize, Option<LinkError>) {
        actix::System::new().block_on(async move {
            let (near, far) = pair(Shaping::default());
            let (tx, mut rx) = event_channel();
            let _link = Link::new(far.control, tx, Keepalive::default()).start();
            let frame = encode_control(&ControlMessage::Authenticate { proof: vec![7; size] }).expect("encode");
            for _ in 0..frames {
                let t = Timed {
                    due: std::time::Instant::now(),
                    frame: frame.clone(),
                };
                if near.control.tx.send(t).await.is_err() {
                    break;
                }
            }
            // The owner starts reading only once the link has given up (its sender is gone)
            // or has queued every message.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !rx.is_closed() && rx.len() < frames && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut received = 0;
            loop {
                match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                    Ok(Some(LinkEvent::Received(_))) => received += 1,
                    Ok(Some(LinkEvent::Lost(e))) => return (received, Some(e)),
                    Ok(None) | Err(_) => return (received, None),
                }
                if received == frames {
                    return (received, None);
                }
            }
        })
    }

    #[test]
    fn test_flood_beyond_event_count_closes_link() {
        let (received, lost) = flood(LINK_EVENTS * 2, 16);
        assert_eq!(received, LINK_EVENTS - 1, "the last slot carries the reason");
        assert!(matches!(lost, Some(LinkError::Overflow { .. })), "{lost:?}");
    }

    #[test]
    fn test_flood_beyond_event_bytes_closes_link() {
        let size = 4 << 20;
        let (received, lost) = flood(LINK_EVENTS, size);
        assert!(received * size <= LINK_EVENT_BYTES, "{received} messages held");
        assert!(matches!(lost, Some(LinkError::Overflow { .. })), "{lost:?}");
    }

    #[test]
    fn test_burst_within_bounds_is_delivered() {
        let (received, lost) = flood(LINK_EVENTS / 2, 16);
        assert_eq!((received, lost), (LINK_EVENTS / 2, None));
    }
}
