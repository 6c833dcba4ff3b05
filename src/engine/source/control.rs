//! The run's control plane: messages to and from the target over the Link actor, with the
//! step timeout, the user's cancel (before commitment) and the planned faults watched while it
//! waits; and asks of the VM actor.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::prelude::*;

use super::fail::{local, Fail};
use super::{faults, SourceRun};
use crate::clock;
use crate::engine::ask::{ask, GUEST_ASK};
use crate::engine::error::Side;
use crate::link::{Link, LinkEvent, SendControl};
use crate::protocol::ControlMessage;
use crate::vm::Vm;

impl SourceRun {
    pub(super) async fn send(&self, msg: ControlMessage) -> Result<(), Fail> {
        let link = self.link.as_ref().ok_or_else(|| Fail::Link("no link".into()))?;
        match link.send(SendControl(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Fail::Link(e.to_string())),
            Err(e) => Err(Fail::Link(e.to_string())),
        }
    }

    pub(super) fn cancellable(&self) -> bool {
        !self.s.committed.load(Ordering::Acquire)
    }

    /// The next control message from the target, with the step timeout and, before
    /// commitment, the user's cancel. Page requests are served on the way.
    pub(super) async fn recv(&mut self) -> Result<ControlMessage, Fail> {
        // In pull the wait spans the whole background push; the keepalive bounds a dead peer.
        let deadline = if self.machine.pulling() {
            clock::now() + Duration::from_secs(365 * 24 * 3600)
        } else {
            clock::now() + self.s.req.step_timeout
        };
        loop {
            let cancellable = self.cancellable();
            let mut cancel = self.s.cancel.clone();
            let inbox = self.inbox.as_mut().ok_or_else(|| Fail::Link("no link".into()))?;
            let due = faults::due(self.faults.as_ref(), self.machine.stage());
            let ev = tokio::select! {
                biased;
                _ = cancel.wait_for(|c| *c), if cancellable => return Err(Fail::Cancelled),
                ev = inbox.recv() => ev,
                fired = due => {
                    for fault in fired {
                        self.inject(fault)?;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Fail::Timeout(self.machine.stage().map(|s| s.name()).unwrap_or("start")))
                }
            };
            match ev {
                Some(LinkEvent::Received(ControlMessage::PageRequest { pages })) => {
                    if let Some(plane) = &self.plane {
                        for p in pages {
                            plane.pull(p);
                        }
                    }
                }
                Some(LinkEvent::Received(ControlMessage::Abort { reason })) => {
                    return Err(Fail::Aborted {
                        side: Side::Target,
                        reason,
                    })
                }
                Some(LinkEvent::Received(ControlMessage::Refuse { reason })) => {
                    return Err(Fail::Aborted {
                        side: Side::Target,
                        reason,
                    })
                }
                Some(LinkEvent::Received(m)) => return Ok(m),
                Some(LinkEvent::Lost(e)) => return Err(Fail::Link(e.to_string())),
                None => return Err(Fail::Link("link actor stopped".into())),
            }
        }
    }

    pub(super) async fn expect(&mut self, want: &'static str) -> Result<ControlMessage, Fail> {
        crate::engine::testpoint::hold_before_reply(want, self.s.id).await;
        let m = self.recv().await?;
        if m.name() == want {
            Ok(m)
        } else {
            Err(Fail::Protocol(format!("expected {want}, got {}", m.name())))
        }
    }

    /// Runs a data-plane job, abandoning it on cancel (the plane stops at the next batch).
    /// While a round runs, the control link still speaks: a cancel, the target's `Abort`, or
    /// the keepalive declaring the target silent all stop the round at its next batch.
    pub(super) async fn with_cancel<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, crate::dataplane::DataPlaneError>>,
        inbox: &mut crate::link::LinkEvents,
    ) -> Result<T, Fail> {
        let mut cancel = self.s.cancel.clone();
        let cancellable = self.cancellable();
        let stop = |fail: Fail| {
            if let Some(p) = &self.plane {
                p.abort();
            }
            Err(fail)
        };
        tokio::pin!(fut);
        let data_failed = loop {
            let due = faults::due(self.faults.as_ref(), self.machine.stage());
            tokio::select! {
            r = &mut fut => match r {
                Ok(v) => return Ok(v),
                Err(e) => break e,
            },
            _ = cancel.wait_for(|c| *c), if cancellable => return stop(Fail::Cancelled),
            fired = due => {
                for fault in fired {
                    if let Err(fail) = self.inject(fault) {
                        return stop(fail);
                    }
                }
            }
            ev = inbox.recv() => return stop(match ev {
                Some(LinkEvent::Received(ControlMessage::Abort { reason })) => Fail::Aborted {
                    side: Side::Target,
                    reason,
                },
                Some(LinkEvent::Received(other)) => {
                    Fail::Protocol(format!("unexpected {} while pages were being sent", other.name()))
                }
                Some(LinkEvent::Lost(e)) => Fail::Link(e.to_string()),
                None => Fail::Link("link actor stopped".into()),
            }),
            }
        };
        // The data channel can close before the target's Abort (which explains why) arrives on
        // the control link; give the control link a moment to deliver it.
        let wait = self.s.req.keepalive.timeout.min(Duration::from_secs(2));
        match tokio::time::timeout(wait, inbox.recv()).await {
            Ok(Some(LinkEvent::Received(ControlMessage::Abort { reason }))) => Err(Fail::Aborted {
                side: Side::Target,
                reason,
            }),
            _ => Err(Fail::Link(data_failed.to_string())),
        }
    }

    pub(super) async fn vm_call<M>(&self, msg: M) -> Result<M::Result, Fail>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Vm: Handler<M>,
    {
        ask(&self.s.vm, msg, std::any::type_name::<M>(), GUEST_ASK)
            .await
            .map_err(local)
    }

    /// Starts a Link actor on `control`; its events arrive in `self.inbox`.
    pub(super) fn open_link(&mut self, control: crate::link::ControlChannel) {
        let (owner_tx, inbox) = crate::link::event_channel();
        self.link = Some(Link::new(control, owner_tx, self.s.req.keepalive).start());
        self.inbox = Some(inbox);
    }
}
