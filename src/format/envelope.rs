//! The versioned envelope in which a [`VmState`] is written to disk or sent over the wire.
//!
//! Layout (all integers big-endian):
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 8    | magic `MIGRVMST`                        |
//! | 8      | 4    | format version ([`FORMAT_VERSION`])     |
//! | 12     | 4    | payload length in bytes                 |
//! | 16     | 8    | xxh3-64 of the payload                  |
//! | 24     | len  | payload: msgpack map with named fields  |
//!
//! Decoding checks, in order and before allocating anything for the payload: header length,
//! magic, version, length against [`MAX_STATE_BYTES`], length against the input, checksum. Only
//! then is the payload decoded, and the result validated, so a caller never sees a state that
//! [`VmState::validate`] would refuse. Named fields make adding a `#[serde(default)]` field a
//! change older readers survive.

use xxhash_rust::xxh3::xxh3_64;

use super::{FormatError, VmState, FORMAT_VERSION};

/// First eight bytes of every envelope.
pub const ENVELOPE_MAGIC: [u8; 8] = *b"MIGRVMST";

/// Size of the fixed header before the payload.
pub const ENVELOPE_HEADER_LEN: usize = 24;

/// Largest payload accepted or produced: 16 MiB. Memory pages never travel in a `VmState`, so
/// this bounds vCPU and device state only.
pub const MAX_STATE_BYTES: usize = 16 * 1024 * 1024;

const VERSION_OFFSET: usize = 8;
const LENGTH_OFFSET: usize = 12;
const CHECKSUM_OFFSET: usize = 16;

/// Validates `state` and writes it in an envelope.
pub fn encode_vm_state(state: &VmState) -> Result<Vec<u8>, FormatError> {
    state.validate()?;
    let payload = rmp_serde::to_vec_named(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    if payload.len() > MAX_STATE_BYTES {
        return Err(FormatError::LengthOverLimit {
            len: payload.len() as u64,
            limit: MAX_STATE_BYTES as u64,
        });
    }
    // Fits in u32: MAX_STATE_BYTES is far below u32::MAX.
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.extend_from_slice(&ENVELOPE_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&xxh3_64(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads the format version of an envelope without checking anything past it, so a caller can
/// say which version it was handed even when it cannot decode it.
pub fn peek_version(bytes: &[u8]) -> Result<u32, FormatError> {
    check_magic(bytes, LENGTH_OFFSET)?;
    Ok(be_u32(bytes, VERSION_OFFSET))
}

/// Checks and decodes an envelope written by [`encode_vm_state`], then validates the state.
pub fn decode_vm_state(bytes: &[u8]) -> Result<VmState, FormatError> {
    check_magic(bytes, ENVELOPE_HEADER_LEN)?;
    let found = be_u32(bytes, VERSION_OFFSET);
    if found != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let len = be_u32(bytes, LENGTH_OFFSET);
    if len as usize > MAX_STATE_BYTES {
        return Err(FormatError::LengthOverLimit {
            len: u64::from(len),
            limit: MAX_STATE_BYTES as u64,
        });
    }
    let body = &bytes[ENVELOPE_HEADER_LEN..];
    let len = len as usize;
    if body.len() < len {
        return Err(FormatError::Truncated {
            needed: ENVELOPE_HEADER_LEN + len,
            available: bytes.len(),
        });
    }
    if body.len() > len {
        return Err(FormatError::TrailingBytes {
            extra: body.len() - len,
        });
    }
    let expected = be_u64(bytes, CHECKSUM_OFFSET);
    let actual = xxh3_64(body);
    if actual != expected {
        return Err(FormatError::ChecksumMismatch { expected, actual });
    }
    let mut de = rmp_serde::Deserializer::new(body);
    let state: VmState = serde::Deserialize::deserialize(&mut de).map_err(|e| FormatError::Decode(e.to_string()))?;
    let rest = de.get_ref().len();
    if rest != 0 {
        return Err(FormatError::TrailingBytes { extra: rest });
    }
    state.validate()?;
    Ok(state)
}

/// Checks that `bytes` holds at least `needed` bytes and starts with the magic.
fn check_magic(bytes: &[u8], needed: usize) -> Result<(), FormatError> {
    if bytes.len() < needed {
        return Err(FormatError::Truncated {
            needed,
            available: bytes.len(),
        });
    }
    let mut found = [0u8; 8];
    found.copy_from_slice(&bytes[..8]);
    if found != ENVELOPE_MAGIC {
        return Err(FormatError::BadMagic { found });
    }
    Ok(())
}

/// Big-endian u32 at `at`; the caller has checked the length.
fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Big-endian u64 at `at`; the caller has checked the length.
fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        DeviceState, MacAddr, MemoryLayout, Msr, NicConfig, PendingException, VcpuState, VmConfig, VmId, PAGE_SIZE,
    };

    /// The state stored in `tests/data/format-v1.bin`. Never change it: the file is what version
    /// 1 readers must keep decoding.
    fn golden_state() -> VmState {
        let mut vcpu1 = VcpuState::initial_long_mode(1);
        vcpu1.gprs = core::array::from_fn(|i| 0x1111_1111_1111_1111 * (i as u64 % 15 + 1));
        vcpu1.rip = 0xffff_ffff_8100_1234;
        vcpu1.rflags = 0x246;
        vcpu1.cr2 = 0xdead_b000;
        vcpu1.cr8 = 0xf;
        vcpu1.fs.base = 0x7f00_0000_1000;
        vcpu1.gs.base = 0xffff_8880_0000_0000;
        vcpu1.msrs.insert(
            0,
            Msr {
                index: 0x174,
                value: 0x10,
            },
        );
        vcpu1.xsave.extend((0..64u8).map(|b| b.wrapping_mul(7)));
        vcpu1.tsc = 123_456_789_000;
        vcpu1.events.exception = Some(PendingException {
            vector: 14,
            error_code: Some(0x2),
        });
        vcpu1.events.interrupt = Some(0x30);
        vcpu1.events.nmi_masked = true;
        VmState {
            config: VmConfig {
                id: VmId("golden-vm".into()),
                name: "format v1 golden".into(),
                vcpus: 2,
                memory_bytes: 16 << 20,
                page_size: PAGE_SIZE,
                nics: vec![NicConfig {
                    id: "net0".into(),
                    mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
                }],
            },
            vcpus: vec![VcpuState::initial_long_mode(0), vcpu1],
            devices: vec![
                DeviceState {
                    name: "serial0".into(),
                    version: 1,
                    data: b"16550A".to_vec(),
                },
                DeviceState {
                    name: "virtio-net:net0".into(),
                    version: 3,
                    data: Vec::new(),
                },
            ],
            memory: MemoryLayout::flat(16 << 20),
        }
    }

    fn header(version: u32, len: u32, checksum: u64) -> Vec<u8> {
        let mut h = ENVELOPE_MAGIC.to_vec();
        h.extend_from_slice(&version.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&checksum.to_be_bytes());
        h
    }

    #[test]
    fn test_round_trip() {
        let state = golden_state();
        let bytes = encode_vm_state(&state).unwrap();
        assert_eq!(&bytes[..8], b"MIGRVMST");
        assert_eq!(peek_version(&bytes), Ok(FORMAT_VERSION));
        assert_eq!(decode_vm_state(&bytes), Ok(state));
    }

    #[test]
    fn test_golden_v1_decodes() {
        let bytes = include_bytes!("../../tests/data/format-v1.bin");
        assert_eq!(peek_version(bytes), Ok(1));
        assert_eq!(decode_vm_state(bytes), Ok(golden_state()));
    }

    #[test]
    fn test_version_mismatch_is_typed() {
        let mut bytes = encode_vm_state(&golden_state()).unwrap();
        bytes[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(peek_version(&bytes), Ok(2));
        assert_eq!(
            decode_vm_state(&bytes),
            Err(FormatError::UnsupportedVersion { found: 2, supported: 1 })
        );
    }

    #[test]
    fn test_bad_magic_is_rejected() {
        let mut bytes = encode_vm_state(&golden_state()).unwrap();
        bytes[0] = b'X';
        let err = decode_vm_state(&bytes).unwrap_err();
        assert_eq!(err, FormatError::BadMagic { found: *b"XIGRVMST" });
        assert_eq!(peek_version(&bytes), Err(err));
    }

    #[test]
    fn test_truncated_input_is_rejected() {
        let bytes = encode_vm_state(&golden_state()).unwrap();
        assert_eq!(
            decode_vm_state(&bytes[..10]),
            Err(FormatError::Truncated {
                needed: ENVELOPE_HEADER_LEN,
                available: 10
            })
        );
        assert_eq!(
            peek_version(&bytes[..11]),
            Err(FormatError::Truncated {
                needed: 12,
                available: 11
            })
        );
        let cut = bytes.len() - 1;
        assert_eq!(
            decode_vm_state(&bytes[..cut]),
            Err(FormatError::Truncated {
                needed: bytes.len(),
                available: cut
            })
        );
        assert_eq!(
            decode_vm_state(&[]),
            Err(FormatError::Truncated {
                needed: ENVELOPE_HEADER_LEN,
                available: 0
            })
        );
    }

    #[test]
    fn test_length_over_limit_is_rejected_before_reading_payload() {
        // A 24-byte header claiming a 4 GiB - 1 payload: refused from the header alone.
        let bytes = header(FORMAT_VERSION, u32::MAX, 0);
        assert_eq!(
            decode_vm_state(&bytes),
            Err(FormatError::LengthOverLimit {
                len: u64::from(u32::MAX),
                limit: MAX_STATE_BYTES as u64
            })
        );
        let bytes = header(FORMAT_VERSION, MAX_STATE_BYTES as u32 + 1, 0);
        assert!(matches!(
            decode_vm_state(&bytes),
            Err(FormatError::LengthOverLimit { .. })
        ));
    }

    #[test]
    fn test_checksum_mismatch_is_rejected() {
        let mut bytes = encode_vm_state(&golden_state()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert!(matches!(
            decode_vm_state(&bytes),
            Err(FormatError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn test_trailing_bytes_are_rejected() {
        let mut bytes = encode_vm_state(&golden_state()).unwrap();
        bytes.push(0);
        assert_eq!(decode_vm_state(&bytes), Err(FormatError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn test_trailing_msgpack_inside_checksummed_payload_is_rejected() {
        let mut payload = rmp_serde::to_vec_named(&golden_state()).unwrap();
        payload.push(0xc0); // msgpack nil
        let mut bytes = header(FORMAT_VERSION, payload.len() as u32, xxh3_64(&payload));
        bytes.extend_from_slice(&payload);
        assert_eq!(decode_vm_state(&bytes), Err(FormatError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn test_garbage_payload_with_valid_checksum_is_a_decode_error() {
        let payload = [0x92, 0x01];
        let mut bytes = header(FORMAT_VERSION, 2, xxh3_64(&payload));
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode_vm_state(&bytes), Err(FormatError::Decode(_))));
    }

    #[test]
    fn test_invalid_state_is_neither_written_nor_read() {
        let mut state = golden_state();
        state.vcpus[1].rip = 0x0000_8000_0000_0000;
        assert!(matches!(
            encode_vm_state(&state),
            Err(FormatError::NonCanonical { field: "rip", .. })
        ));
        // Bypass encode's validation to prove decode validates on its own.
        let payload = rmp_serde::to_vec_named(&state).unwrap();
        let mut bytes = header(FORMAT_VERSION, payload.len() as u32, xxh3_64(&payload));
        bytes.extend_from_slice(&payload);
        assert!(matches!(
            decode_vm_state(&bytes),
            Err(FormatError::NonCanonical { field: "rip", .. })
        ));
    }

    #[test]
    fn test_vm_state_validation_checks_vcpus_and_devices() {
        let mut state = golden_state();
        state.vcpus.pop();
        assert_eq!(state.validate(), Err(FormatError::VcpuCount { found: 1, expected: 2 }));
        let mut state = golden_state();
        state.vcpus.swap(0, 1);
        assert_eq!(state.validate(), Err(FormatError::VcpuOutOfOrder { index: 0, id: 1 }));
        let mut state = golden_state();
        state.devices[1].name = "serial0".into();
        assert_eq!(
            state.validate(),
            Err(FormatError::DuplicateDevice { name: "serial0".into() })
        );
    }

    #[test]
    fn test_byte_blobs_are_encoded_as_msgpack_bin() {
        let mut state = golden_state();
        state.devices[0].data = vec![0xff; 1000];
        let small = encode_vm_state(&golden_state()).unwrap().len();
        let big = encode_vm_state(&state).unwrap().len();
        // 1000 bytes in a bin16 cost 1000 + a few; as an array of u8 they would cost 2000.
        assert!(big - small < 1010, "{}", big - small);
    }
}
