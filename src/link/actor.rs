//! The Link actor: the control plane of one peer connection.

use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{ControlChannel, LinkError, Timed};
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

/// Owns one control channel: encodes and sends, decodes and forwards, pings, and watches for
/// silence. The owner reads [`LinkEvent`]s from the channel given at start.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::Sender<Timed>,
    rx: Option<mpsc::Receiver<Timed>>,
    latency: Duration,
    owner: mpsc::UnboundedSender<LinkEvent>,
    keepalive: Keepalive,
    last_rx: Instant,
    ping_seq: u64,
    lost: bool,
}

impl Link {
    /// A link over `channel` that reports to `owner`.
    pub fn new(channel: ControlChannel, owner: mpsc::UnboundedSender<LinkEvent>, keepalive: Keepalive) -> Self {
        Self {
            tx: channel.tx,
            rx: Some(channel.rx),
            latency: channel.latency,
            owner,
            keepalive,
            last_rx: clock::now(),
            ping_seq: 0,
            lost: false,
        }
    }

    fn lose(&mut self, err: LinkError, ctx: &mut Context<Self>) {
        if !self.lost {
            self.lost = true;
            // The owner may be gone already; then nobody needs the news.
            let _ = self.owner.send(LinkEvent::Lost(err));
        }
        ctx.stop();
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
            Ok(m) => {
                if self.owner.send(LinkEvent::Received(m)).is_err() {
                    ctx.stop();
                }
            }
            Err(e) => self.lose(LinkError::BadFrame(e.to_string()), ctx),
        }
    }
}

impl Handler<PeerClosed> for Link {
    type Result = ();

    fn handle(&mut self, _: PeerClosed, ctx: &mut Self::Context) {
        self.lose(LinkError::Closed, ctx);
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
