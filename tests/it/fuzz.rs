//! Hostile input, fuzzed in the test suite: the frame decoder, control decoding, page batches
//! and the receiver's state machine never panic and never accept an oversized length.

use bytes::Bytes;
use migratory::engine::receiver_state::ReceiverState;
use migratory::format::NativeLayout;
use migratory::protocol::frame::{decode_control, encode_control, FrameDecoder};
use migratory::protocol::{AbortReason, Algorithm, Capabilities, ControlMessage, PageBatch, MAX_FRAME_LEN};
use proptest::prelude::*;

fn message(i: u8, n: u64) -> ControlMessage {
    match i % 12 {
        0 => ControlMessage::Hello {
            capabilities: Capabilities::full(vec![NativeLayout::Kvm]),
            requested: Algorithm::ALL[(n % 5) as usize].into(),
            vm: format!("vm{n}"),
            nonce: vec![n as u8; (n % 40) as usize],
            resume: n % 3 == 0,
        },
        1 => ControlMessage::Reserved,
        2 => ControlMessage::RoundDone {
            round: n as u32,
            batches_total: n,
        },
        3 => ControlMessage::Suspend {
            batches_total: n,
            missing: vec![0xff; (n % 17) as usize],
            digests_after_activation: n % 2 == 0,
        },
        4 => ControlMessage::VcpuState { vcpus: Vec::new() },
        5 => ControlMessage::DeviceState { devices: Vec::new() },
        6 => ControlMessage::Prepared,
        7 => ControlMessage::Commit,
        8 => ControlMessage::Activated,
        9 => ControlMessage::PageRequest { pages: vec![n; 3] },
        10 => ControlMessage::Complete,
        _ => ControlMessage::Abort {
            reason: AbortReason::Cancelled,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn test_stream_decoder_never_panics_nor_overallocates(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..32)) {
        let mut d = FrameDecoder::new();
        for c in &chunks {
            d.feed(c);
            while let Ok(Some(body)) = d.next_body() {
                prop_assert!(body.len() <= MAX_FRAME_LEN);
            }
        }
    }

    #[test]
    fn test_control_and_batch_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_control(&bytes);
        let _ = PageBatch::decode(Bytes::from(bytes));
    }

    #[test]
    fn test_mutated_control_frames_never_panic(i in any::<u8>(), n in any::<u64>(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let frame = encode_control(&message(i, n)).expect("encode");
        let mut body = frame[4..].to_vec();
        for (at, x) in flips {
            let len = body.len();
            body[at % len] ^= x;
        }
        let _ = decode_control(&body);
    }

    #[test]
    fn test_receiver_state_machine_accepts_any_order_without_panic(seq in prop::collection::vec((any::<u8>(), any::<u64>()), 0..24)) {
        let mut state = ReceiverState::AwaitHello;
        for (i, n) in seq {
            match state.clone().step(message(i, n)) {
                Ok((next, _)) => state = next,
                Err(e) => {
                    // A typed refusal names the state and the message.
                    prop_assert!(!e.state.is_empty() && !e.message.is_empty());
                }
            }
        }
    }
}
