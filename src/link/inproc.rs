//! Two link ends joined in one process: the demo's and most tests' link.

use std::sync::{Arc, Mutex};

use crossbeam::channel;

use super::{
    ControlChannel, DataReceiver, DataSender, FramePool, LinkEnd, Shaping, TokenBucket, CONTROL_CHANNEL_FRAMES,
    DATA_CHANNEL_FRAMES, URGENT_CHANNEL_FRAMES,
};

/// A connected pair of link ends with the given shaping in each direction.
pub fn pair(shaping: Shaping) -> (LinkEnd, LinkEnd) {
    pair_with_budget(shaping, None)
}

/// Like [`pair`], with the first end's sends also charged to `budget` (its host's bandwidth
/// budget, shared with the host's other migrations).
pub fn pair_with_budget(shaping: Shaping, budget: Option<Arc<Mutex<TokenBucket>>>) -> (LinkEnd, LinkEnd) {
    let (c_ab_tx, c_ab_rx) = tokio::sync::mpsc::channel(CONTROL_CHANNEL_FRAMES);
    let (c_ba_tx, c_ba_rx) = tokio::sync::mpsc::channel(CONTROL_CHANNEL_FRAMES);
    let (d_ab_tx, d_ab_rx) = channel::bounded(DATA_CHANNEL_FRAMES);
    let (d_ba_tx, d_ba_rx) = channel::bounded(DATA_CHANNEL_FRAMES);
    let (u_ab_tx, u_ab_rx) = channel::bounded(URGENT_CHANNEL_FRAMES);
    let (u_ba_tx, u_ba_rx) = channel::bounded(URGENT_CHANNEL_FRAMES);
    // The pull lane's requests, each way: a queue of their own, as a TCP link's pull
    // connection is a socket of its own.
    let (r_ab_tx, r_ab_rx) = channel::bounded(URGENT_CHANNEL_FRAMES);
    let (r_ba_tx, r_ba_rx) = channel::bounded(URGENT_CHANNEL_FRAMES);
    let cap = || {
        shaping
            .bandwidth_bytes_per_sec
            .map(|r| Arc::new(Mutex::new(TokenBucket::new(r))))
    };
    let mut a_budgets: Vec<_> = cap().into_iter().collect();
    a_budgets.extend(budget);
    // Frames cross from one end to the other, so both recycle into one pool.
    let pool = FramePool::new();
    let a = LinkEnd {
        control: ControlChannel {
            tx: c_ab_tx,
            rx: c_ba_rx,
            latency: shaping.latency,
            fault: Default::default(),
        },
        data_tx: DataSender {
            tx: d_ab_tx,
            urgent: u_ab_tx,
            requests: Some(r_ba_rx),
            budgets: a_budgets,
            latency: shaping.latency,
            _alive: None,
            _pull: None,
            throttle: None,
            // One channel: frames arrive in the order sent.
            ordered: true,
        },
        data_rx: DataReceiver {
            rx: d_ba_rx,
            urgent: u_ba_rx,
            asks: Some(r_ab_tx),
            _alive: None,
            _pull: None,
        },
        pool: pool.clone(),
    };
    let b = LinkEnd {
        control: ControlChannel {
            tx: c_ba_tx,
            rx: c_ab_rx,
            latency: shaping.latency,
            fault: Default::default(),
        },
        data_tx: DataSender {
            tx: d_ba_tx,
            urgent: u_ba_tx,
            requests: Some(r_ab_rx),
            budgets: cap().into_iter().collect(),
            latency: shaping.latency,
            _alive: None,
            _pull: None,
            throttle: None,
            // One channel: frames arrive in the order sent.
            ordered: true,
        },
        data_rx: DataReceiver {
            rx: d_ab_rx,
            urgent: u_ab_rx,
            asks: Some(r_ba_tx),
            _alive: None,
            _pull: None,
        },
        pool,
    };
    (a, b)
}
