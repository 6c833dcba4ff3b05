//! The target's protocol state machine (pure): which message may come next, and what the
//! receiver must do with it. The enum is consumed by value; an unexpected message is a typed
//! error naming the state and the message.

use crate::format::{DeviceState, VcpuState, VmConfig, Wire};
use crate::protocol::negotiation::known_algorithm;
use crate::protocol::{AbortReason, Algorithm, Capabilities, ControlMessage};

/// Where the target is in the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverState {
    /// Waiting for `Hello`.
    AwaitHello,
    /// Negotiated; waiting for `Reserve`.
    AwaitReserve,
    /// Reserved; pages arrive; waiting for `RoundDone` or `Suspend`.
    Receiving,
    /// Source paused; waiting for `VcpuState`.
    AwaitVcpus,
    /// Waiting for `DeviceState`.
    AwaitDevices {
        /// vCPUs received.
        vcpus: Vec<VcpuState>,
    },
    /// State loaded, `Prepared` sent; waiting for `Commit`.
    AwaitCommit,
    /// Activated; waiting for the source's `Complete`.
    AwaitComplete,
    /// A recovery link for `vm`'s pull phase: waiting for the source's `Authenticate`.
    AwaitRecoveryProof {
        /// The VM whose pull phase this link carries on.
        vm: String,
    },
    /// Finished (completed or aborted).
    Done,
}

impl ReceiverState {
    /// Name for errors.
    pub fn name(&self) -> &'static str {
        match self {
            ReceiverState::AwaitHello => "await-hello",
            ReceiverState::AwaitReserve => "await-reserve",
            ReceiverState::Receiving => "receiving",
            ReceiverState::AwaitVcpus => "await-vcpus",
            ReceiverState::AwaitDevices { .. } => "await-devices",
            ReceiverState::AwaitCommit => "await-commit",
            ReceiverState::AwaitComplete => "await-complete",
            ReceiverState::AwaitRecoveryProof { .. } => "await-recovery-proof",
            ReceiverState::Done => "done",
        }
    }

    /// True once the target owns the VM.
    pub fn committed(&self) -> bool {
        matches!(self, ReceiverState::AwaitComplete | ReceiverState::Done)
    }
}

/// What the receiver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverAction {
    /// Check the source's capabilities and answer `Welcome` or `Refuse`.
    Negotiate {
        /// Source's capabilities.
        capabilities: Capabilities,
        /// Requested algorithm, perhaps one this build does not know.
        requested: Wire<Algorithm>,
        /// The source's nonce.
        nonce: Vec<u8>,
    },
    /// A recovery link: check the source's capabilities and answer `Welcome` or `Refuse`.
    NegotiateRecovery {
        /// Source's capabilities.
        capabilities: Capabilities,
        /// The source's nonce.
        nonce: Vec<u8>,
    },
    /// Check the proof, then hand this link to the receiver of `vm` that awaits recovery.
    HandOver {
        /// The VM.
        vm: String,
        /// The proof.
        proof: Vec<u8>,
    },
    /// Check the source's proof of the cluster key.
    Authenticate {
        /// The proof.
        proof: Vec<u8>,
    },
    /// Reserve the VM and answer `Reserved` or `Abort`.
    Reserve {
        /// Its configuration.
        config: VmConfig,
        /// How its memory is committed, from the algorithm.
        commit: crate::vmm::MemoryCommit,
        /// How to announce the VM's NICs once it is activated here.
        announce: crate::announce::AnnounceParams,
    },
    /// Nothing to do but note the progress.
    NoteRound {
        /// Batches sent so far.
        batches_total: u64,
    },
    /// Wait for every batch, then arm demand paging for `missing`.
    Suspend {
        /// Final batch count.
        batches_total: u64,
        /// Missing-page bitmap bytes (empty unless post-copy).
        missing: Vec<u8>,
        /// The digests go after `Activated`, not before `Prepared`.
        digests_after_activation: bool,
    },
    /// Load state into the VM and answer `Prepared`.
    LoadState {
        /// vCPUs.
        vcpus: Vec<VcpuState>,
        /// Devices.
        devices: Vec<DeviceState>,
    },
    /// Resume the VM, announce it, answer `Activated`.
    Activate,
    /// The source freed its copy: the VM is ours for good.
    Finish,
    /// Send the digests of the pages as received (verification after activation).
    SendDigests,
    /// A peer's fence asks whether `vm` lives here: answer `VmStatus` and end.
    AnswerQuery {
        /// The VM.
        vm: String,
    },
    /// Answer `Abort{reason}` and release everything: the message asks for what this build
    /// cannot do.
    Abort {
        /// Why.
        reason: AbortReason,
    },
    /// The source aborted: release everything.
    Aborted {
        /// Why.
        reason: AbortReason,
    },
}

/// A message that may not come now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected {message} in state {state}")]
pub struct ReceiverError {
    /// State name.
    pub state: &'static str,
    /// Message name.
    pub message: &'static str,
}

impl ReceiverState {
    /// The one transition function.
    pub fn step(self, msg: ControlMessage) -> Result<(ReceiverState, ReceiverAction), ReceiverError> {
        use ControlMessage as M;
        use ReceiverAction as A;
        use ReceiverState as S;
        let out = match (self, msg) {
            (_, M::Abort { reason }) => (S::Done, A::Aborted { reason }),
            (
                S::AwaitHello,
                M::Hello {
                    capabilities,
                    nonce,
                    vm,
                    resume: true,
                    ..
                },
            ) => (
                S::AwaitRecoveryProof { vm },
                A::NegotiateRecovery { capabilities, nonce },
            ),
            (S::AwaitRecoveryProof { vm }, M::Authenticate { proof }) => (S::Done, A::HandOver { vm, proof }),
            (S::AwaitHello, M::QueryVm { vm }) => (S::Done, A::AnswerQuery { vm }),
            (
                S::AwaitHello,
                M::Hello {
                    capabilities,
                    requested,
                    nonce,
                    ..
                },
            ) => (
                S::AwaitReserve,
                A::Negotiate {
                    capabilities,
                    requested,
                    nonce,
                },
            ),
            (S::AwaitReserve, M::Authenticate { proof }) => (S::AwaitReserve, A::Authenticate { proof }),
            (
                S::AwaitReserve,
                M::Reserve {
                    config,
                    algorithm,
                    announce,
                },
            ) => match (known_algorithm(algorithm), checked_announce(announce)) {
                (Ok(algorithm), Ok(announce)) => (
                    S::Receiving,
                    A::Reserve {
                        config,
                        commit: crate::vmm::MemoryCommit::for_algorithm(algorithm),
                        announce,
                    },
                ),
                (Err(e), _) => (S::Done, A::Abort { reason: e.into() }),
                (_, Err(reason)) => (S::Done, A::Abort { reason }),
            },
            (S::Receiving, M::RoundDone { batches_total, .. }) => (S::Receiving, A::NoteRound { batches_total }),
            (
                S::Receiving,
                M::Suspend {
                    batches_total,
                    missing,
                    digests_after_activation,
                },
            ) => (
                S::AwaitVcpus,
                A::Suspend {
                    batches_total,
                    missing,
                    digests_after_activation,
                },
            ),
            (S::AwaitVcpus, M::VcpuState { vcpus }) => (S::AwaitDevices { vcpus }, A::NoteRound { batches_total: 0 }),
            (S::AwaitDevices { vcpus }, M::DeviceState { devices }) => {
                (S::AwaitCommit, A::LoadState { vcpus, devices })
            }
            (S::AwaitCommit, M::Commit) => (S::AwaitComplete, A::Activate),
            (S::AwaitComplete, M::Complete) => (S::Done, A::Finish),
            (S::AwaitComplete, M::SendDigests) => (S::AwaitComplete, A::SendDigests),
            (state, msg) => {
                return Err(ReceiverError {
                    state: state.name(),
                    message: msg.name(),
                })
            }
        };
        Ok(out)
    }
}

/// The announce parameters of a `Reserve` (QEMU's defaults when it has none), or the abort
/// for ones outside their bounds: a peer may not make this host announce for days.
fn checked_announce(
    announce: Option<crate::announce::AnnounceParams>,
) -> Result<crate::announce::AnnounceParams, AbortReason> {
    let announce = announce.unwrap_or_default();
    announce
        .validate()
        .map_err(|e| AbortReason::ProtocolViolation { detail: e.to_string() })?;
    Ok(announce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::NativeLayout;

    #[test]
    fn test_out_of_order_messages_are_typed_errors() {
        let err = ReceiverState::AwaitHello
            .step(ControlMessage::Commit)
            .expect_err("refused");
        assert_eq!(
            err,
            ReceiverError {
                state: "await-hello",
                message: "Commit"
            }
        );
        let (s, _) = ReceiverState::AwaitHello
            .step(ControlMessage::Hello {
                capabilities: Capabilities::full(vec![NativeLayout::Kvm]),
                requested: Algorithm::Precopy.into(),
                vm: "v".into(),
                nonce: Vec::new(),
                resume: false,
            })
            .expect("hello");
        assert!(s.clone().step(ControlMessage::Prepared).is_err());
        assert!(s.clone().step(ControlMessage::QueryVm { vm: "v".into() }).is_err());
        assert!(matches!(
            s.step(ControlMessage::Abort {
                reason: AbortReason::Cancelled
            }),
            Ok((ReceiverState::Done, ReceiverAction::Aborted { .. }))
        ));
    }

    #[test]
    fn test_a_reserve_for_an_unknown_algorithm_is_refused_by_name() {
        let reserve = ControlMessage::Reserve {
            config: VmConfig {
                id: crate::format::VmId("v".into()),
                name: "v".into(),
                vcpus: 1,
                memory_bytes: 1 << 20,
                page_size: crate::format::PAGE_SIZE,
                nics: Vec::new(),
            },
            algorithm: Wire::Unknown("quantum-copy".into()),
            announce: None,
        };
        let (s, a) = ReceiverState::AwaitReserve.step(reserve).expect("answered");
        assert_eq!(s, ReceiverState::Done);
        let ReceiverAction::Abort { reason } = a else {
            panic!("not refused: {a:?}");
        };
        assert!(reason.to_string().contains("\"quantum-copy\""), "{reason}");
    }

    #[test]
    fn test_a_reserve_carries_its_announce_params_and_bad_ones_are_refused() {
        let reserve = |announce| ControlMessage::Reserve {
            config: VmConfig {
                id: crate::format::VmId("v".into()),
                name: "v".into(),
                vcpus: 1,
                memory_bytes: 1 << 20,
                page_size: crate::format::PAGE_SIZE,
                nics: Vec::new(),
            },
            algorithm: Algorithm::Precopy.into(),
            announce,
        };
        let three = crate::announce::AnnounceParams {
            rounds: 3,
            ..Default::default()
        };
        for (sent, expected) in [(None, Default::default()), (Some(three), three)] {
            let (_, a) = ReceiverState::AwaitReserve.step(reserve(sent)).expect("answered");
            assert!(
                matches!(a, ReceiverAction::Reserve { announce, .. } if announce == expected),
                "{a:?}"
            );
        }
        let endless = crate::announce::AnnounceParams {
            rounds: 1_000_000,
            ..three
        };
        let (s, a) = ReceiverState::AwaitReserve
            .step(reserve(Some(endless)))
            .expect("answered");
        assert_eq!(s, ReceiverState::Done);
        let ReceiverAction::Abort { reason } = a else {
            panic!("not refused: {a:?}");
        };
        assert!(reason.to_string().contains("rounds"), "{reason}");
    }

    #[test]
    fn test_a_fence_query_is_answered_only_first() {
        let (s, a) = ReceiverState::AwaitHello
            .step(ControlMessage::QueryVm { vm: "v".into() })
            .expect("query");
        assert_eq!(s, ReceiverState::Done);
        assert_eq!(a, ReceiverAction::AnswerQuery { vm: "v".into() });
    }
}
