//! Control messages and the types they carry.

use serde::{Deserialize, Serialize};

use super::capabilities::{Algorithm, Capabilities};
use crate::format::{DeviceState, VcpuState, VmConfig, Wire};

/// Why a migration was aborted; carried both ways so each side learns the other's reason.
///
/// A kind this build does not know decodes as [`AbortReason::Unknown`]. Builds of protocol
/// version 2 from before that variant fail to decode one instead, so a reason meant for them
/// travels as an existing kind with a `detail` (as negotiation's refusals do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AbortReason {
    /// The user cancelled.
    #[error("cancelled by the user")]
    Cancelled,
    /// No common protocol version.
    #[error(
        "protocol version mismatch: source speaks {source_min}..={source_max}, target {target_min}..={target_max}"
    )]
    VersionMismatch {
        /// Oldest version the source speaks.
        source_min: u32,
        /// Newest version the source speaks.
        source_max: u32,
        /// Oldest version the target speaks.
        target_min: u32,
        /// Newest version the target speaks.
        target_max: u32,
    },
    /// The target cannot read the source's common-format version.
    #[error("common format version {offered} not supported (target reads {supported:?})")]
    FormatVersion {
        /// Version the source writes.
        offered: u32,
        /// Versions the target reads.
        supported: Vec<u32>,
    },
    /// The requested algorithm or compression is outside the common pool.
    #[error("negotiation failed: {detail}")]
    Negotiation {
        /// What each side offers.
        detail: String,
    },
    /// A side could not prove it holds the cluster key.
    #[error("authentication failed: {detail}")]
    Unauthenticated {
        /// What was wrong (never the key).
        detail: String,
    },
    /// The target host has not enough free memory.
    #[error("reservation refused: not enough memory: {requested_bytes} bytes requested, {available_bytes} available")]
    InsufficientMemory {
        /// Bytes asked for.
        requested_bytes: u64,
        /// Bytes free in the target's budget.
        available_bytes: u64,
    },
    /// The target refused or failed the reservation for another reason.
    #[error("reservation failed: {detail}")]
    ReservationFailed {
        /// The backend's words.
        detail: String,
    },
    /// The target could not load vCPU or device state.
    #[error("target could not load state: {detail}")]
    StateLoadFailed {
        /// The backend's words.
        detail: String,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: {detail}")]
    ProtocolViolation {
        /// What was wrong.
        detail: String,
    },
    /// The source failed (backend, tracker).
    #[error("source failed: {detail}")]
    SourceFailed {
        /// What failed.
        detail: String,
    },
    /// The target failed for a reason not listed above.
    #[error("target failed: {detail}")]
    TargetFailed {
        /// What failed.
        detail: String,
    },
    /// Pre-copy stalled and the policy chose to abort.
    #[error("pre-copy did not converge: {detail}")]
    NotConverging {
        /// The policy's reason.
        detail: String,
    },
    /// The target's digests of the pages it received differ from the source's memory at the
    /// pause: the migration rolls back before `Commit`.
    #[error("verification failed: {pages} pages differ (first: {first:?})")]
    VerificationFailed {
        /// How many pages differ.
        pages: u64,
        /// The first of them (at most 64).
        first: Vec<u64>,
    },
    /// The target host is shutting down and takes no new migration.
    #[error("target host is shutting down")]
    ShuttingDown,
    /// A step took longer than its bound.
    #[error("timed out in {stage} after {after_ms} ms")]
    Timeout {
        /// Stage name.
        stage: String,
        /// Milliseconds waited.
        after_ms: u64,
    },
    /// A reason from a newer peer that this build does not know; still an abort. (A reason of
    /// a known kind whose fields do not decode lands here too, named by its kind.)
    #[error("aborted for a reason this build does not know: {kind}")]
    // Tried only when no kind above matches; a new reason must go above it.
    #[serde(untagged)]
    Unknown {
        /// The reason's kind as the peer sent it.
        kind: String,
    },
}

/// A control message. Field names are kept on the wire (MessagePack maps), so adding a field
/// with `#[serde(default)]` is a compatible change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ControlMessage {
    /// Source opens: what it speaks and offers, and which algorithm it wants.
    Hello {
        /// Source's capabilities.
        capabilities: Capabilities,
        /// The requested algorithm (may be `auto`; from a newer peer, one this build does not
        /// know, which negotiation refuses by name).
        requested: Wire<Algorithm>,
        /// The VM that will come.
        vm: String,
        /// Fresh nonce the target's proof must cover (empty when the source has no key).
        #[serde(default, with = "serde_bytes_compat")]
        nonce: Vec<u8>,
        /// Post-copy recovery: this link replaces the lost one of `vm`'s pull phase. The
        /// source then always sends `Authenticate` (an empty proof without a key) and the
        /// target answers `Resumed` or `Refuse`.
        #[serde(default)]
        resume: bool,
    },
    /// Target accepts and states its own capabilities and the version chosen.
    Welcome {
        /// Protocol version both will speak.
        version: u32,
        /// Target's capabilities.
        capabilities: Capabilities,
        /// Fresh nonce the source's proof must cover (empty when the target has no key).
        #[serde(default, with = "serde_bytes_compat")]
        nonce: Vec<u8>,
        /// HMAC proof that the target holds the cluster key (empty without a key).
        #[serde(default, with = "serde_bytes_compat")]
        proof: Vec<u8>,
    },
    /// The source's proof that it holds the cluster key; required before `Reserve` by a target
    /// that has one.
    Authenticate {
        /// HMAC proof over the target's and the source's nonces.
        #[serde(with = "serde_bytes_compat")]
        proof: Vec<u8>,
    },
    /// Target refuses the connection.
    Refuse {
        /// Why.
        reason: AbortReason,
    },
    /// Reserve resources for the VM.
    Reserve {
        /// The VM's configuration.
        config: VmConfig,
        /// The algorithm that will run (refused by name if this build does not know it).
        algorithm: Wire<Algorithm>,
        /// How the target announces the VM's NICs after activation; `None` (and what an older
        /// source sends) is QEMU's defaults. Left out of the message when `None`, so a message
        /// without it encodes as protocol version 2 did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        announce: Option<crate::announce::AnnounceParams>,
    },
    /// Reservation made.
    Reserved,
    /// A round of page batches has been sent.
    RoundDone {
        /// Round number (0 is the full pass).
        round: u32,
        /// Batches sent since the start of the migration.
        batches_total: u64,
    },
    /// The source has paused; the last batches are out.
    Suspend {
        /// Batches sent since the start, the final count before state follows.
        batches_total: u64,
        /// Post-copy: the bitmap of pages the target does not have yet (little-endian words).
        #[serde(with = "serde_bytes_compat")]
        missing: Vec<u8>,
        /// The target sends its digests after `Activated` instead of before `Prepared`: the
        /// source verifies after activation, keeping the hashing out of the downtime. Absent
        /// (an older source): before `Prepared`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        digests_after_activation: bool,
    },
    /// vCPU state in the common format.
    VcpuState {
        /// One per vCPU.
        vcpus: Vec<VcpuState>,
    },
    /// Device state in the common format.
    DeviceState {
        /// Named, versioned blobs.
        devices: Vec<DeviceState>,
    },
    /// Target has a consistent image and loaded state.
    Prepared,
    /// Source hands ownership to the target.
    Commit,
    /// Target resumed the VM.
    Activated,
    /// Post-copy: pages the target's guest is waiting for.
    PageRequest {
        /// Page indices, most urgent first.
        pages: Vec<u64>,
    },
    /// Post-copy recovery, target to source: the new link carries the pull phase on; these are
    /// the pages the target still lacks (bitmap, little-endian words).
    Resumed {
        /// Missing-page bitmap.
        #[serde(with = "serde_bytes_compat")]
        missing: Vec<u8>,
    },
    /// Post-copy, target to source: every page is present. Source to target: the source copy
    /// is freed, the migration is over.
    Complete,
    /// Source to target, after `Activated` when `Suspend` said `digests_after_activation`: send
    /// the digests now. Asked for rather than pushed, so that they do not queue in front of
    /// `Activated` on the source's side.
    SendDigests,
    /// Target's digests of the pages as received, for verification.
    Digests {
        /// First page these digests cover.
        first_page: u64,
        /// One digest per page.
        digests: Vec<u64>,
        /// True on the last part.
        last: bool,
        /// On the last part: pages the target guest has not written since activation whose
        /// memory differs from what was received (a local write-path check), at most 64.
        #[serde(default)]
        memory_mismatches: Vec<u64>,
        /// On the last part: post-copy faults the target guest took, and their summed wait.
        #[serde(default)]
        faults: u64,
        /// Seconds the faults waited in all.
        #[serde(default)]
        fault_wait_s: f64,
    },
    /// Either side gives up.
    Abort {
        /// Why.
        reason: AbortReason,
    },
    /// Fencing: a host holding a paused copy of `vm` whose `Commit` went unanswered asks the
    /// peer, on a fresh link and instead of `Hello`, whether the VM lives there.
    QueryVm {
        /// The VM.
        vm: String,
    },
    /// The answer to `QueryVm`.
    VmStatus {
        /// The VM.
        vm: String,
        /// `absent`, or the VM's state on the peer (`running`, `incoming`, `awaiting-pages`...).
        state: String,
    },
    /// Liveness probe; any frame counts as a sign of life.
    Ping {
        /// Sequence number.
        seq: u64,
    },
}

impl ControlMessage {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Hello { .. } => "Hello",
            ControlMessage::Welcome { .. } => "Welcome",
            ControlMessage::Authenticate { .. } => "Authenticate",
            ControlMessage::Refuse { .. } => "Refuse",
            ControlMessage::Reserve { .. } => "Reserve",
            ControlMessage::Reserved => "Reserved",
            ControlMessage::RoundDone { .. } => "RoundDone",
            ControlMessage::Suspend { .. } => "Suspend",
            ControlMessage::VcpuState { .. } => "VcpuState",
            ControlMessage::DeviceState { .. } => "DeviceState",
            ControlMessage::Prepared => "Prepared",
            ControlMessage::Commit => "Commit",
            ControlMessage::Activated => "Activated",
            ControlMessage::PageRequest { .. } => "PageRequest",
            ControlMessage::Resumed { .. } => "Resumed",
            ControlMessage::Complete => "Complete",
            ControlMessage::SendDigests => "SendDigests",
            ControlMessage::Digests { .. } => "Digests",
            ControlMessage::Abort { .. } => "Abort",
            ControlMessage::QueryVm { .. } => "QueryVm",
            ControlMessage::VmStatus { .. } => "VmStatus",
            ControlMessage::Ping { .. } => "Ping",
        }
    }
}

/// Byte vectors as MessagePack binary rather than an array of integers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{DeviceState, MacAddr, NativeLayout, NicConfig, VcpuState, VmConfig, VmId, PAGE_SIZE};
    use crate::protocol::capabilities::Compression;
    use crate::protocol::frame::{decode_control, encode_control, frame_body, FrameDecoder, TAG_CONTROL};

    #[test]
    fn test_messages_round_trip() {
        for m in [
            ControlMessage::Suspend {
                batches_total: 3,
                missing: vec![1, 2, 3],
                digests_after_activation: true,
            },
            ControlMessage::Abort {
                reason: AbortReason::InsufficientMemory {
                    requested_bytes: 10,
                    available_bytes: 5,
                },
            },
            ControlMessage::PageRequest { pages: vec![5, 9] },
            ControlMessage::Commit,
        ] {
            let f = encode_control(&m).expect("encode");
            let back = decode_control(&frame_body(&f).expect("body")).expect("decode");
            assert_eq!(back, m);
        }
    }

    #[test]
    fn test_announce_params_travel_in_reserve_and_an_old_reserve_has_none() {
        let config = VmConfig {
            id: VmId("vm".into()),
            name: "vm".into(),
            vcpus: 1,
            memory_bytes: 1 << 20,
            page_size: PAGE_SIZE,
            nics: Vec::new(),
        };
        let announce = crate::announce::AnnounceParams {
            rounds: 3,
            ..Default::default()
        };
        let with = ControlMessage::Reserve {
            config: config.clone(),
            algorithm: Algorithm::Precopy.into(),
            announce: Some(announce),
        };
        let f = encode_control(&with).expect("encode");
        assert_eq!(decode_control(&frame_body(&f).expect("body")).expect("decode"), with);
        // A source of protocol version 2 sends no `announce` field.
        let old = serde_json::json!({"type": "Reserve", "config": config, "algorithm": "precopy"});
        let mut body = vec![TAG_CONTROL];
        body.extend(rmp_serde::to_vec_named(&old).expect("encode"));
        match decode_control(&body).expect("decodes") {
            ControlMessage::Reserve { announce, .. } => assert_eq!(announce, None),
            other => panic!("decoded as {}", other.name()),
        }
    }

    #[test]
    fn test_an_abort_for_a_reason_from_a_newer_peer_decodes() {
        for kind in ["Abort", "Refuse"] {
            let msg = serde_json::json!({
                "type": kind,
                "reason": { "kind": "gpu-lost", "device": "0000:01:00.0" },
            });
            let mut body = vec![TAG_CONTROL];
            body.extend(rmp_serde::to_vec_named(&msg).expect("encode"));
            let reason = match decode_control(&body).expect("decodes") {
                ControlMessage::Abort { reason } | ControlMessage::Refuse { reason } => reason,
                other => panic!("decoded as {}", other.name()),
            };
            assert_eq!(
                reason,
                AbortReason::Unknown {
                    kind: "gpu-lost".into()
                }
            );
            assert!(reason.to_string().contains("gpu-lost"), "{reason}");
        }
    }

    /// The messages stored in `tests/data/protocol-v2-control.bin`, one frame each, as protocol
    /// version 2 encodes them. Never change them: the file is what peers of version 2 send.
    fn golden_messages() -> Vec<ControlMessage> {
        let caps = |layouts: Vec<NativeLayout>| Capabilities {
            protocol_min: 2,
            protocol_max: 2,
            format_versions: vec![1],
            // What version 2 offered: every algorithm before `random`.
            algorithms: vec![
                Algorithm::StopAndCopy,
                Algorithm::Precopy,
                Algorithm::Postcopy,
                Algorithm::Hybrid,
                Algorithm::Auto,
            ],
            layouts: layouts.into_iter().map(Wire::from).collect(),
            compression: vec![Compression::None, Compression::Lz4, Compression::Xbzrle],
        };
        let bytes = |n: u8| (0..32).map(|i| i ^ n).collect::<Vec<u8>>();
        let detail = || "golden detail".to_string();
        let reasons = || {
            vec![
                AbortReason::Cancelled,
                AbortReason::VersionMismatch {
                    source_min: 2,
                    source_max: 3,
                    target_min: 1,
                    target_max: 1,
                },
                AbortReason::FormatVersion {
                    offered: 2,
                    supported: vec![1],
                },
                AbortReason::Negotiation { detail: detail() },
                AbortReason::Unauthenticated { detail: detail() },
                AbortReason::InsufficientMemory {
                    requested_bytes: 1 << 30,
                    available_bytes: 1 << 20,
                },
                AbortReason::ReservationFailed { detail: detail() },
                AbortReason::StateLoadFailed { detail: detail() },
                AbortReason::ProtocolViolation { detail: detail() },
                AbortReason::SourceFailed { detail: detail() },
                AbortReason::TargetFailed { detail: detail() },
                AbortReason::NotConverging { detail: detail() },
                AbortReason::VerificationFailed {
                    pages: 3,
                    first: vec![1, 5, 9],
                },
                AbortReason::ShuttingDown,
                AbortReason::Timeout {
                    stage: "stopcopy".into(),
                    after_ms: 30_000,
                },
            ]
        };
        let mut out = vec![
            ControlMessage::Hello {
                capabilities: caps(vec![NativeLayout::Kvm, NativeLayout::XenHvm]),
                requested: Algorithm::Hybrid.into(),
                vm: "golden-vm".into(),
                nonce: bytes(1),
                resume: false,
            },
            ControlMessage::Welcome {
                version: 2,
                capabilities: caps(vec![NativeLayout::XenHvm]),
                nonce: bytes(2),
                proof: bytes(3),
            },
            ControlMessage::Authenticate { proof: bytes(4) },
            ControlMessage::Reserve {
                config: VmConfig {
                    id: VmId("golden-vm".into()),
                    name: "protocol v2 golden".into(),
                    vcpus: 1,
                    memory_bytes: 16 << 20,
                    page_size: PAGE_SIZE,
                    nics: vec![NicConfig {
                        id: "net0".into(),
                        mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
                    }],
                },
                algorithm: Algorithm::Postcopy.into(),
                announce: None,
            },
            ControlMessage::Reserved,
            ControlMessage::RoundDone {
                round: 3,
                batches_total: 77,
            },
            ControlMessage::Suspend {
                batches_total: 80,
                missing: vec![0xff, 0x01],
                digests_after_activation: false,
            },
            ControlMessage::VcpuState {
                vcpus: vec![VcpuState::initial_long_mode(0)],
            },
            ControlMessage::DeviceState {
                devices: vec![DeviceState {
                    name: "serial0".into(),
                    version: 1,
                    data: b"16550A".to_vec(),
                }],
            },
            ControlMessage::Prepared,
            ControlMessage::Commit,
            ControlMessage::Activated,
            ControlMessage::PageRequest { pages: vec![7, 3] },
            ControlMessage::Resumed { missing: vec![0x0f] },
            ControlMessage::Complete,
            ControlMessage::Digests {
                first_page: 0,
                digests: vec![u64::MAX, 1],
                last: true,
                memory_mismatches: vec![5],
                faults: 2,
                fault_wait_s: 0.25,
            },
            ControlMessage::QueryVm { vm: "golden-vm".into() },
            ControlMessage::VmStatus {
                vm: "golden-vm".into(),
                state: "absent".into(),
            },
            ControlMessage::Ping { seq: 9 },
        ];
        out.extend(reasons().into_iter().map(|reason| ControlMessage::Refuse { reason }));
        out.extend(reasons().into_iter().map(|reason| ControlMessage::Abort { reason }));
        out
    }

    #[test]
    fn test_golden_v2_frames_decode_and_encode_byte_identical() {
        let golden = include_bytes!("../../tests/data/protocol-v2-control.bin");
        let mut decoder = FrameDecoder::new();
        decoder.feed(golden);
        let mut encoded = Vec::new();
        for expected in golden_messages() {
            let body = decoder.next_body().expect("frame").expect("a frame per message");
            assert_eq!(decode_control(&body).expect("decode"), expected);
            encoded.extend_from_slice(&encode_control(&expected).expect("encode"));
        }
        assert_eq!(decoder.next_body(), Ok(None), "no frames beyond the messages");
        assert!(encoded == golden, "known values encode as protocol version 2 did");
    }
}
