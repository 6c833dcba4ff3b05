//! `target-crash`: a watcher between the Link and the run. It hands every link event on, and
//! keeps a shadow of the run's protocol machine, so it knows the stage each message starts.
//! When a crash is due (at the message of its stage, or once its byte or time trigger has
//! passed) it withholds that message and halts the run as crashed: the run then vanishes
//! without a word, exactly where the plan says.
//!
//! A byte trigger counts the page bytes that arrive on a thread between the link's data half
//! and the data plane; it is there only when a crash waits on bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::super::state::{ReceiverAction, ReceiverState};
use super::super::{Halt, HaltSender};
use crate::clock;
use crate::engine::faults::{Fault, FaultPlan, Threshold};
use crate::engine::Stage;
use crate::link::{DataReceiver, DataRecv, FramePool, LinkEvent, LinkEvents, Shaping};
use crate::protocol::ControlMessage;

/// How often byte and time triggers are looked at.
const TICK: Duration = Duration::from_millis(5);
/// How long the byte counter waits for a frame before it looks up again.
const COUNT_POLL: Duration = Duration::from_millis(20);

/// Starts the watcher on `inbox` (and the byte counter on `data` if a trigger needs it);
/// returns what the run reads from instead.
pub(super) fn install(
    plan: FaultPlan,
    halt: HaltSender,
    armed: clock::Instant,
    inbox: LinkEvents,
    data: (DataReceiver, FramePool),
) -> (LinkEvents, (DataReceiver, FramePool)) {
    let counts_bytes = plan.0.iter().any(|f| matches!(f.after, Some(Threshold::Bytes(_))));
    let (received, data) = if counts_bytes {
        let (received, data) = count_bytes(data);
        (Some(received), data)
    } else {
        (None, data)
    };
    let (to, forwarded) = crate::link::event_channel();
    let watcher = CrashWatcher {
        plan,
        halt,
        armed,
        received,
        state: ReceiverState::AwaitHello,
        postcopy: false,
    };
    actix::spawn(watcher.watch(inbox, to));
    (forwarded, data)
}

struct CrashWatcher {
    /// `target-crash` faults only.
    plan: FaultPlan,
    halt: HaltSender,
    armed: clock::Instant,
    /// Page bytes arrived so far, if a trigger counts them.
    received: Option<Arc<AtomicU64>>,
    /// Where the run is, as far as the messages handed to it tell.
    state: ReceiverState,
    /// `Suspend` named missing pages: after `Commit` the run is in its pull phase.
    postcopy: bool,
}

impl CrashWatcher {
    async fn watch(mut self, mut from: LinkEvents, to: mpsc::Sender<LinkEvent>) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            let timed = self.plan.has_thresholds(true);
            let crashed = tokio::select! {
                ev = from.recv() => match ev {
                    Some(LinkEvent::Received(m)) if self.crashes_on(&m) => true,
                    Some(ev) => {
                        if to.send(ev).await.is_err() {
                            return;
                        }
                        false
                    }
                    // Dropping `to` passes the end on.
                    None => return,
                },
                _ = tick.tick(), if timed => self.crash_due(),
                // The run ended: a trigger passing now would crash nothing.
                () = to.closed() => return,
            };
            if crashed {
                break;
            }
        }
        // Once the run has taken every event handed on before, it acts on them first and then
        // sees the halt, as if the host had died on this message.
        if let Ok(permits) = to.reserve_many(to.max_capacity()).await {
            drop(permits);
        }
        self.halt.send_replace(Some(Halt::Crashed));
        // The link and the run's inbox stay open until the run ends, so that the halt is the
        // only news it gets.
        to.closed().await;
        drop(from);
    }

    /// Steps the shadow machine with `msg`; true if a crash is planned at the stage it starts.
    fn crashes_on(&mut self, msg: &ControlMessage) -> bool {
        // The run refuses a message out of order before any stage starts.
        let Ok((next, action)) = self.state.clone().step(msg.clone()) else {
            return false;
        };
        self.state = next;
        if let ReceiverAction::Suspend { missing, .. } = &action {
            self.postcopy = !missing.is_empty();
        }
        match stage_of_action(&action) {
            Some(stage) => fires(self.plan.take(stage, true)),
            None => false,
        }
    }

    /// True if a byte or time trigger has passed in a stage where a crash may fire.
    fn crash_due(&mut self) -> bool {
        let stage = stage_of_state(&self.state, self.postcopy);
        let bytes = self.received.as_ref().map_or(0, |r| r.load(Ordering::Relaxed));
        let elapsed = clock::now().duration_since(self.armed);
        fires(self.plan.take_due(stage, true, bytes, elapsed))
    }
}

/// True if a crash came due (the plan holds nothing else).
fn fires(due: Vec<Fault>) -> bool {
    let crash = due.first();
    if let Some(f) = crash {
        tracing::warn!(fault = f.kind.name(), "injecting fault");
    }
    crash.is_some()
}

/// The source stage whose start a receiver action marks: a fault planned `@stage` fires there.
fn stage_of_action(action: &ReceiverAction) -> Option<Stage> {
    match action {
        ReceiverAction::Negotiate { .. } => Some(Stage::Premigration),
        ReceiverAction::Reserve { .. } => Some(Stage::Reservation),
        ReceiverAction::NoteRound { .. } => Some(Stage::Precopy),
        ReceiverAction::Suspend { .. } | ReceiverAction::LoadState { .. } => Some(Stage::Stopcopy),
        ReceiverAction::Activate => Some(Stage::Activation),
        _ => None,
    }
}

/// The stage a target in `state` is in, for a byte or time trigger. After `Commit` a
/// post-copy target is in its pull phase until the end: the pull is post-copy's last stage,
/// and a crash cannot fire in it.
fn stage_of_state(state: &ReceiverState, postcopy: bool) -> Stage {
    match state {
        ReceiverState::AwaitHello | ReceiverState::AwaitRecoveryProof { .. } => Stage::Premigration,
        ReceiverState::AwaitReserve => Stage::Reservation,
        ReceiverState::Receiving => Stage::Precopy,
        ReceiverState::AwaitVcpus | ReceiverState::AwaitDevices { .. } | ReceiverState::AwaitCommit => Stage::Stopcopy,
        ReceiverState::AwaitComplete | ReceiverState::Done if postcopy => Stage::Pull,
        ReceiverState::AwaitComplete | ReceiverState::Done => Stage::Activation,
    }
}

/// Puts a thread between `data` and the data plane that counts the page bytes passing; returns
/// the count and the data half the plane reads from. Pulled pages lose their urgent lane on
/// the way: a crash test measures no fault latency.
fn count_bytes((from, pool): (DataReceiver, FramePool)) -> (Arc<AtomicU64>, (DataReceiver, FramePool)) {
    let (near, far) = crate::link::pair(Shaping::default());
    let received = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&received);
    let to = near.data_tx;
    // Page requests still go to the source on the link's own pull lane.
    let far_rx = far.data_rx.asking_through(&from);
    let spawned = std::thread::Builder::new()
        .name("migratory-fault-count".into())
        .spawn(move || {
            // Ends when either side goes: the source closes its data channel, or the plane
            // stops reading (its receiver is dropped and the next send fails).
            let never = AtomicBool::new(false);
            loop {
                match from.recv_timeout(COUNT_POLL) {
                    DataRecv::Frame(frame) => {
                        counted.fetch_add(frame.len() as u64, Ordering::Relaxed);
                        if to.send(frame, &never).is_err() {
                            return;
                        }
                    }
                    DataRecv::Idle => {}
                    DataRecv::Closed => return,
                }
            }
        });
    if let Err(e) = spawned {
        // The data half went with the thread that did not start: the plane sees it closed,
        // and the migration fails as if the source had gone.
        tracing::error!(error = %e, "the fault injection's byte counter did not start");
    }
    // Frames cross from the source's end to this one: they go back to the link's pool.
    (received, (far_rx, pool))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::NativeLayout;
    use crate::protocol::{Algorithm, Capabilities};

    fn hello() -> ControlMessage {
        ControlMessage::Hello {
            capabilities: Capabilities::full(vec![NativeLayout::Kvm]),
            requested: Algorithm::Precopy.into(),
            vm: "v".into(),
            nonce: Vec::new(),
            resume: false,
        }
    }

    fn watcher(plan: &str) -> CrashWatcher {
        let (halt, _) = tokio::sync::watch::channel(None);
        CrashWatcher {
            plan: plan.parse().expect("plan"),
            halt,
            armed: clock::now(),
            received: None,
            state: ReceiverState::AwaitHello,
            postcopy: false,
        }
    }

    #[test]
    fn test_each_stage_starts_at_its_action() {
        assert_eq!(stage_of_action(&ReceiverAction::Activate), Some(Stage::Activation));
        assert_eq!(
            stage_of_action(&ReceiverAction::NoteRound { batches_total: 3 }),
            Some(Stage::Precopy)
        );
        assert_eq!(
            stage_of_action(&ReceiverAction::LoadState {
                vcpus: Vec::new(),
                devices: Vec::new()
            }),
            Some(Stage::Stopcopy)
        );
        assert_eq!(stage_of_action(&ReceiverAction::Finish), None);
        assert_eq!(
            stage_of_action(&ReceiverAction::Authenticate { proof: Vec::new() }),
            None
        );
    }

    #[test]
    fn test_a_postcopy_target_past_commit_is_in_its_pull() {
        assert_eq!(stage_of_state(&ReceiverState::AwaitHello, false), Stage::Premigration);
        assert_eq!(stage_of_state(&ReceiverState::Receiving, false), Stage::Precopy);
        assert_eq!(stage_of_state(&ReceiverState::AwaitCommit, true), Stage::Stopcopy);
        assert_eq!(stage_of_state(&ReceiverState::AwaitComplete, false), Stage::Activation);
        assert_eq!(stage_of_state(&ReceiverState::AwaitComplete, true), Stage::Pull);
    }

    #[test]
    fn test_a_crash_fires_at_the_message_of_its_stage_once() {
        let mut w = watcher("target-crash@reservation");
        assert!(!w.crashes_on(&hello()), "premigration passes");
        assert_eq!(w.state, ReceiverState::AwaitReserve);
        // Out of order: no stage starts, the shadow stays where it was.
        assert!(!w.crashes_on(&ControlMessage::Commit));
        assert_eq!(w.state, ReceiverState::AwaitReserve);
        let reserve = ControlMessage::Reserve {
            config: super::super::super::test_config("v", 256),
            algorithm: Algorithm::Precopy.into(),
            announce: None,
        };
        assert!(w.crashes_on(&reserve));
        assert!(w.plan.is_empty(), "fired once");
    }

    #[test]
    fn test_a_time_trigger_waits_for_a_stage_where_a_crash_may_fire() {
        let mut w = watcher("target-crash@0ms");
        w.state = ReceiverState::AwaitComplete;
        w.postcopy = true;
        assert!(!w.crash_due(), "not in the pull");
        w.postcopy = false;
        assert!(w.crash_due());
        assert!(!w.crash_due(), "fired once");
    }

    #[test]
    fn test_a_byte_trigger_counts_what_arrived() {
        let mut w = watcher("target-crash@1MiB");
        let received = Arc::new(AtomicU64::new(0));
        w.received = Some(Arc::clone(&received));
        w.state = ReceiverState::Receiving;
        assert!(!w.crash_due());
        received.store(2 << 20, Ordering::Relaxed);
        assert!(w.crash_due());
    }

    #[tokio::test]
    async fn test_the_watcher_withholds_the_message_and_halts_the_run_after_the_rest() {
        let (halt, mut halted) = tokio::sync::watch::channel(None);
        let mut w = watcher("target-crash@reservation");
        w.halt = halt;
        let (link_tx, from) = crate::link::event_channel();
        let (to, mut inbox) = crate::link::event_channel();
        let watching = tokio::spawn(w.watch(from, to));
        let reserve = ControlMessage::Reserve {
            config: super::super::super::test_config("v", 256),
            algorithm: Algorithm::Precopy.into(),
            announce: None,
        };
        link_tx.send(LinkEvent::Received(hello())).await.expect("sent");
        link_tx.send(LinkEvent::Received(reserve)).await.expect("sent");
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        assert_eq!(*halted.borrow(), None, "the Hello handed on is taken first");
        assert!(matches!(
            inbox.recv().await,
            Some(LinkEvent::Received(ControlMessage::Hello { .. }))
        ));
        halted.wait_for(|h| *h == Some(Halt::Crashed)).await.expect("halted");
        assert!(inbox.try_recv().is_err(), "the Reserve was withheld");
        drop(inbox);
        watching.await.expect("the watcher ends with the run's inbox");
    }
}
