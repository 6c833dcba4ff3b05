//! The common format: the neutral, versioned state of a VM that every hypervisor backend converts
//! to and from.
//!
//! # When to use what
//! - [`VmConfig`] describes the VM (size, vCPUs, NICs) and is agreed on before any page moves.
//! - [`VcpuState`] is one x86-64 vCPU in hypervisor-independent units; backends convert their
//!   own layout to it and back through [`native::NativeVcpu`].
//! - [`DeviceState`] is an opaque, named, versioned device blob: the format only carries it.
//! - [`VmState`] gathers all of the above; [`encode_vm_state`] and [`decode_vm_state`] write and
//!   read it inside a checked envelope (magic, version, length cap, checksum), which is what goes
//!   to disk or over the wire.
//! - [`Wire`] carries a value of an enum that newer builds extend (a [`NativeLayout`] in a
//!   peer's offer), so that one this build does not know is named instead of failing a decode.
//!
//! Validation lives next to each type (`validate`) and is run by the envelope on both encode and
//! decode, so nothing that would be refused on reading is ever written.
//!
//! This module and `protocol` are the only places that derive `Serialize`: everything here is
//! plain data meant to cross a process boundary.

pub mod device;
pub mod envelope;
pub mod name;
pub mod native;
pub mod vcpu;
pub mod vm_config;
pub mod wire;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use device::DeviceState;
pub use envelope::{
    decode_vm_state, encode_vm_state, peek_version, ENVELOPE_HEADER_LEN, ENVELOPE_MAGIC, MAX_STATE_BYTES,
};
pub use name::{check_name, NameError, MAX_NAME_BYTES};
pub use native::{NativeError, NativeLayout, NativeVcpu};
pub use vcpu::{
    is_canonical, msr_index, DescriptorTable, Msr, PendingEvents, PendingException, Segment, SegmentAttributes,
    VcpuState, LAPIC_REGISTER_BYTES, MAX_MSRS, MAX_XSAVE_BYTES, MSRS_WITH_OWN_FIELD, XSAVE_LEGACY_BYTES,
};
pub use vm_config::{MacAddr, NicConfig, VmConfig, VmId, MAX_NICS, MAX_VCPUS, MAX_VM_MEMORY_BYTES, PAGE_SIZE};
pub use wire::Wire;

/// Version of the common format written by this build.
///
/// Independent of the crate version: it changes only when the encoded shape changes in a way an
/// older reader cannot accept. Adding a `#[serde(default)]` field does not require a bump.
pub const FORMAT_VERSION: u32 = 1;

/// One contiguous range of guest-physical memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical address of the first byte; a multiple of [`PAGE_SIZE`].
    pub guest_addr: u64,
    /// Length in bytes; a non-zero multiple of [`PAGE_SIZE`].
    pub size: u64,
}

/// Where the VM's RAM sits in guest-physical address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Regions in ascending address order, non-overlapping.
    pub regions: Vec<MemoryRegion>,
}

impl MemoryLayout {
    /// One region of `bytes` starting at guest-physical address 0: the layout of every VM the
    /// engine creates today.
    pub fn flat(bytes: u64) -> MemoryLayout {
        MemoryLayout {
            regions: vec![MemoryRegion {
                guest_addr: 0,
                size: bytes,
            }],
        }
    }

    /// Sum of the region sizes, saturating rather than wrapping on absurd input.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().fold(0u64, |acc, r| acc.saturating_add(r.size))
    }

    /// Checks that regions are page aligned, non-empty, ascending, non-overlapping and inside
    /// the 64-bit address space, and that they add up to `memory_bytes`.
    pub fn validate(&self, memory_bytes: u64) -> Result<(), FormatError> {
        let page = u64::from(PAGE_SIZE);
        // The first address a following region may start at.
        let mut next_free = 0u64;
        for (index, r) in self.regions.iter().enumerate() {
            let bad = || FormatError::InvalidMemoryRegion {
                index,
                guest_addr: r.guest_addr,
                size: r.size,
            };
            if r.size == 0 || r.size % page != 0 || r.guest_addr % page != 0 {
                return Err(bad());
            }
            if r.guest_addr < next_free {
                return Err(bad());
            }
            next_free = r.guest_addr.checked_add(r.size).ok_or_else(bad)?;
        }
        let layout_bytes = self.total_bytes();
        if layout_bytes != memory_bytes {
            return Err(FormatError::MemorySizeMismatch {
                layout_bytes,
                config_bytes: memory_bytes,
            });
        }
        Ok(())
    }
}

/// Everything needed to recreate a paused VM elsewhere, apart from its memory contents (pages
/// travel on the data plane, not in this structure).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// What the VM is.
    pub config: VmConfig,
    /// One entry per vCPU, `vcpus[i].id == i`.
    pub vcpus: Vec<VcpuState>,
    /// Device blobs, names unique.
    pub devices: Vec<DeviceState>,
    /// Guest-physical placement of the VM's RAM.
    pub memory: MemoryLayout,
}

impl VmState {
    /// Checks the whole state: config, memory layout against the config, one vCPU per configured
    /// vCPU in id order, each vCPU valid, device names unique.
    pub fn validate(&self) -> Result<(), FormatError> {
        self.config.validate()?;
        self.memory.validate(self.config.memory_bytes)?;
        let expected = self.config.vcpus as usize;
        if self.vcpus.len() != expected {
            return Err(FormatError::VcpuCount {
                found: self.vcpus.len(),
                expected,
            });
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            // Position equals id, so ids are unique and a receiver can index by id.
            if vcpu.id as usize != index {
                return Err(FormatError::VcpuOutOfOrder { index, id: vcpu.id });
            }
            vcpu.validate()?;
        }
        for (i, dev) in self.devices.iter().enumerate() {
            if self.devices[..i].iter().any(|d| d.name == dev.name) {
                return Err(FormatError::DuplicateDevice { name: dev.name.clone() });
            }
        }
        Ok(())
    }
}

/// Why a common-format value or envelope was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// A [`VmConfig`] field is out of range.
    #[error("invalid config field {field}: {value}")]
    InvalidConfig {
        /// Field name, e.g. `page_size`.
        field: &'static str,
        /// The refused value, rendered.
        value: String,
    },
    /// A MAC address string did not parse.
    #[error("invalid MAC address {input:?}, expected six hex octets separated by ':'")]
    InvalidMacAddr {
        /// The refused text.
        input: String,
    },
    /// An address that must be canonical (bits 63..47 all equal) is not.
    #[error("{field} = {value:#x} is not a canonical 48-bit address")]
    NonCanonical {
        /// Field name, e.g. `rip` or `fs.base`.
        field: &'static str,
        /// The refused address.
        value: u64,
    },
    /// A segment attribute field holds more bits than it has.
    #[error("segment {segment}: attribute {attribute} = {value} is out of range")]
    InvalidSegmentAttribute {
        /// Segment name, e.g. `cs`.
        segment: &'static str,
        /// Attribute name, `type` or `dpl`.
        attribute: &'static str,
        /// The refused value.
        value: u8,
    },
    /// A register has architecturally reserved bits set.
    #[error("{field} = {value:#x} has reserved bits set")]
    ReservedBits {
        /// Register name, e.g. `cr8`.
        field: &'static str,
        /// The refused value.
        value: u64,
    },
    /// A vCPU id is outside `0..MAX_VCPUS`.
    #[error("vCPU id {id} is not below the limit of {limit}")]
    VcpuIdOutOfRange {
        /// The refused id.
        id: u32,
        /// [`MAX_VCPUS`].
        limit: u32,
    },
    /// More MSRs than [`MAX_MSRS`].
    #[error("{count} MSRs exceed the limit of {limit}")]
    TooManyMsrs {
        /// Number of MSRs found.
        count: usize,
        /// [`MAX_MSRS`].
        limit: usize,
    },
    /// The MSR list is not strictly ascending by index (which also rules out duplicates).
    #[error("MSR {index:#x} follows MSR {previous:#x}; MSRs must be strictly ascending by index")]
    MsrOrder {
        /// The out-of-order index.
        index: u32,
        /// The index before it.
        previous: u32,
    },
    /// The MSR list holds an MSR that the state carries in a field of its own (TSC, APIC base,
    /// EFER, FS/GS base); two copies could disagree, so one is refused.
    #[error("MSR {index:#x} belongs in its own field, not in the MSR list")]
    MsrHasOwnField {
        /// The refused index.
        index: u32,
    },
    /// The xsave area is neither empty nor between the 512-byte legacy region and
    /// [`MAX_XSAVE_BYTES`].
    #[error("xsave area of {len} bytes: must be empty or {min}..={max} bytes")]
    XsaveSize {
        /// Its length.
        len: usize,
        /// [`XSAVE_LEGACY_BYTES`].
        min: usize,
        /// [`MAX_XSAVE_BYTES`].
        max: usize,
    },
    /// The local APIC page is neither empty nor [`LAPIC_REGISTER_BYTES`] long.
    #[error("local APIC page of {len} bytes: must be empty or {LAPIC_REGISTER_BYTES} bytes")]
    LapicSize {
        /// Its length.
        len: usize,
    },
    /// A [`VmState`] has a different number of vCPUs than its config says.
    #[error("{found} vCPU states for a VM configured with {expected} vCPUs")]
    VcpuCount {
        /// vCPU states present.
        found: usize,
        /// `config.vcpus`.
        expected: usize,
    },
    /// A [`VmState`]'s vCPU at position `index` does not have id `index`.
    #[error("vCPU at position {index} has id {id}")]
    VcpuOutOfOrder {
        /// Position in the list.
        index: usize,
        /// Its id.
        id: u32,
    },
    /// A memory region is empty, unaligned, overlapping, out of order or past 2^64.
    #[error("memory region {index} at {guest_addr:#x} of {size:#x} bytes is invalid")]
    InvalidMemoryRegion {
        /// Position in the layout.
        index: usize,
        /// Its start.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// The memory layout does not add up to the configured memory size.
    #[error("memory layout holds {layout_bytes} bytes, config says {config_bytes}")]
    MemorySizeMismatch {
        /// Sum of the region sizes.
        layout_bytes: u64,
        /// `config.memory_bytes`.
        config_bytes: u64,
    },
    /// Two devices share a name.
    #[error("device {name:?} appears more than once")]
    DuplicateDevice {
        /// The repeated name.
        name: String,
    },
    /// The envelope was written by a format version this build does not read.
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// The input does not start with [`ENVELOPE_MAGIC`].
    #[error("bad magic {found:02x?}, not a migratory VM state")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The payload's checksum does not match the header.
    #[error("payload checksum {actual:#018x} does not match header checksum {expected:#018x}")]
    ChecksumMismatch {
        /// Checksum stored in the header.
        expected: u64,
        /// Checksum of the payload received.
        actual: u64,
    },
    /// A length exceeds its cap.
    #[error("length {len} exceeds the limit of {limit} bytes")]
    LengthOverLimit {
        /// The length claimed or produced.
        len: u64,
        /// The cap.
        limit: u64,
    },
    /// The input ends before the header or the payload it announces.
    #[error("input truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the header says must be there.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// Bytes follow the payload (in the envelope or inside the msgpack payload).
    #[error("{extra} unexpected bytes after the payload")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The msgpack payload did not decode into a [`VmState`].
    #[error("payload does not decode: {0}")]
    Decode(String),
    /// The state could not be encoded to msgpack.
    #[error("state does not encode: {0}")]
    Encode(String),
}

/// Serde helper that writes byte vectors as one msgpack `bin` value instead of an array of
/// integers: xsave areas and device blobs are kilobytes, and an array would cost up to twice the
/// size and a per-byte decode.
pub(crate) mod blob {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BlobVisitor)
    }

    struct BlobVisitor;

    impl<'de> Visitor<'de> for BlobVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_flat_layout_validates_against_its_size() {
        let layout = MemoryLayout::flat(1 << 20);
        assert_eq!(layout.total_bytes(), 1 << 20);
        assert_eq!(layout.validate(1 << 20), Ok(()));
        assert_eq!(
            layout.validate(2 << 20),
            Err(FormatError::MemorySizeMismatch {
                layout_bytes: 1 << 20,
                config_bytes: 2 << 20
            })
        );
    }

    #[test]
    fn test_overlapping_regions_are_rejected() {
        let layout = MemoryLayout {
            regions: vec![
                MemoryRegion {
                    guest_addr: 0,
                    size: 0x2000,
                },
                MemoryRegion {
                    guest_addr: 0x1000,
                    size: 0x1000,
                },
            ],
        };
        assert_eq!(
            layout.validate(0x3000),
            Err(FormatError::InvalidMemoryRegion {
                index: 1,
                guest_addr: 0x1000,
                size: 0x1000
            })
        );
    }

    #[test]
    fn test_region_past_address_space_is_rejected() {
        let layout = MemoryLayout {
            regions: vec![MemoryRegion {
                guest_addr: u64::MAX - 0xfff,
                size: 0x2000,
            }],
        };
        assert!(matches!(
            layout.validate(0x2000),
            Err(FormatError::InvalidMemoryRegion { index: 0, .. })
        ));
    }
}
