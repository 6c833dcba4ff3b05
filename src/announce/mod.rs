//! Making the network follow a VM: after activation the target announces each NIC's MAC at
//! its new place, in rounds of RARP and gratuitous ARP frames, as QEMU's `announce_self` does.
//!
//! * [`frame`]: the frames for one MAC, pure; start here to see what goes on the wire.
//! * [`schedule`]: [`AnnounceParams`] (QEMU's `announce-*` parameters) and when each round goes
//!   out, pure.
//! * [`socket`]: the AF_PACKET socket that sends them on one interface.
//! * [`Announcer`]: the rounds for a VM's MACs on a thread of their own, so an announcement
//!   never delays `Activated`; each frame sent is counted in
//!   [`ANNOUNCE_FRAMES_TOTAL`](crate::telemetry::metric::ANNOUNCE_FRAMES_TOTAL).
//!
//! A host sends frames only if it was given an interface (`HostConfig::announce_via`,
//! `serve --announce-via`); without one an activation is only an event.

pub mod frame;
pub mod schedule;
pub mod socket;

use std::io;
use std::thread::JoinHandle;

pub use frame::FrameKind;
pub use schedule::AnnounceParams;
pub use socket::PacketSocket;

use crate::format::MacAddr;
use crate::telemetry::metric::ANNOUNCE_FRAMES_TOTAL;

/// Why an announcement could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// A parameter is outside QEMU's bounds.
    #[error("announce parameter {name} = {value} is outside {min}..={max}")]
    ParamOutOfRange {
        /// The parameter's name, as in [`AnnounceParams`].
        name: &'static str,
        /// The value given.
        value: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// Not something Linux accepts as an interface name.
    #[error("{name:?} is not an interface name (1 to 15 bytes; no NUL, '/', ':' or whitespace)")]
    InterfaceName {
        /// The name given.
        name: String,
    },
    /// No interface of that name in this network namespace.
    #[error("no interface {interface}")]
    NoInterface {
        /// The interface.
        interface: String,
        /// The OS's error.
        source: io::Error,
    },
    /// The packet socket could not be opened (it needs CAP_NET_RAW).
    #[error("cannot open a packet socket for {interface}")]
    Socket {
        /// The interface.
        interface: String,
        /// The OS's error.
        source: io::Error,
    },
    /// The packet socket could not be bound to the interface.
    #[error("cannot bind a packet socket to {interface}")]
    Bind {
        /// The interface.
        interface: String,
        /// The OS's error.
        source: io::Error,
    },
    /// A frame could not be sent.
    #[error("cannot send an announce frame on {interface}")]
    Send {
        /// The interface.
        interface: String,
        /// The OS's error.
        source: io::Error,
    },
    /// A frame went out in part (or was too short to be one).
    #[error("sent {sent} of a {len}-byte frame on {interface}")]
    ShortSend {
        /// The interface.
        interface: String,
        /// Bytes sent.
        sent: usize,
        /// Bytes of the frame.
        len: usize,
    },
    /// The announcing thread could not start.
    #[error("cannot start the announce thread")]
    Thread {
        /// The OS's error.
        source: io::Error,
    },
}

/// What an announcement sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceSummary {
    /// The interface the frames went out on.
    pub interface: String,
    /// Rounds sent.
    pub rounds: u32,
    /// Frames sent, every kind and MAC together.
    pub frames: u64,
}

/// Announces MACs on one interface with one set of parameters.
#[derive(Debug, Clone)]
pub struct Announcer {
    interface: String,
    params: AnnounceParams,
}

impl Announcer {
    /// An announcer for `interface` (opened only when it runs).
    pub fn new(interface: impl Into<String>, params: AnnounceParams) -> Self {
        Self {
            interface: interface.into(),
            params,
        }
    }

    /// The interface the frames go out on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Frames [`Self::run`] sends for `macs` when nothing fails.
    pub fn frame_count(&self, macs: usize) -> u64 {
        self.params.frame_count(macs)
    }

    /// Sends every round for `macs` on this thread, blocking for the whole schedule: each
    /// round a RARP then a gratuitous ARP per MAC, in the order given. Stops at the first
    /// frame that cannot be sent.
    pub fn run(&self, macs: &[MacAddr]) -> Result<AnnounceSummary, AnnounceError> {
        self.params.validate()?;
        let socket = PacketSocket::open(&self.interface)?;
        let frames: Vec<(FrameKind, [u8; frame::FRAME_LEN])> = macs
            .iter()
            .flat_map(|&mac| FrameKind::ALL.map(|kind| (kind, kind.frame(mac))))
            .collect();
        let mut summary = AnnounceSummary {
            interface: self.interface.clone(),
            rounds: 0,
            frames: 0,
        };
        for delay in self.params.delays() {
            // Measured from the round before, as QEMU re-arms its timer after each round.
            std::thread::sleep(delay);
            for (kind, bytes) in &frames {
                socket.send(bytes)?;
                metrics::counter!(ANNOUNCE_FRAMES_TOTAL, "kind" => kind.label()).increment(1);
                summary.frames += 1;
            }
            summary.rounds += 1;
        }
        Ok(summary)
    }

    /// Runs [`Self::run`] on a thread of its own and returns at once. A failure is logged
    /// (`tracing`, warn) and returned by the thread; dropping the handle leaves the thread to
    /// finish alone. The thread is in the caller's network namespace.
    pub fn spawn(
        self,
        macs: Vec<MacAddr>,
    ) -> Result<JoinHandle<Result<AnnounceSummary, AnnounceError>>, AnnounceError> {
        std::thread::Builder::new()
            .name("migratory-announce".into())
            .spawn(move || {
                let sent = self.run(&macs);
                if let Err(e) = &sent {
                    tracing::warn!(interface = %self.interface, error = %e, source = ?std::error::Error::source(e), "network announcement failed");
                }
                sent
            })
            .map_err(|source| AnnounceError::Thread { source })
    }

    /// [`Self::spawn`], detached: true if the thread started. Every failure, to start or to
    /// send, is logged (`tracing`, warn); nothing waits for the rounds.
    pub fn start(self, macs: Vec<MacAddr>) -> bool {
        let interface = self.interface.clone();
        match self.spawn(macs) {
            Ok(_detached) => true,
            Err(e) => {
                tracing::warn!(%interface, error = %e, "network announcement not started");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bad_params_and_bad_names_fail_before_any_frame() {
        let endless = AnnounceParams {
            rounds: 5000,
            ..AnnounceParams::default()
        };
        let err = Announcer::new("lo", endless)
            .run(&[MacAddr::local_from_seed(1)])
            .unwrap_err();
        assert!(
            matches!(err, AnnounceError::ParamOutOfRange { name: "rounds", .. }),
            "{err:?}"
        );
        let err = Announcer::new("not/an-iface", AnnounceParams::default())
            .run(&[MacAddr::local_from_seed(1)])
            .unwrap_err();
        assert!(matches!(err, AnnounceError::InterfaceName { .. }), "{err:?}");
    }

    #[test]
    fn test_a_failure_in_the_thread_comes_back_through_its_handle() {
        let handle = Announcer::new("no-such-if1", AnnounceParams::default())
            .spawn(vec![MacAddr::local_from_seed(2)])
            .expect("thread starts");
        let err = handle.join().expect("no panic").unwrap_err();
        assert!(matches!(err, AnnounceError::NoInterface { ref interface, .. } if interface == "no-such-if1"));
    }
}
