//! Native vCPU layouts: the shapes in which hypervisors keep vCPU state, and lossless
//! conversions between them and the common [`VcpuState`].
//!
//! # When to use what
//! A backend keeps its vCPUs as a [`NativeVcpu`] in the layout it was configured with
//! ([`NativeLayout`]), runs them there ([`NativeVcpu::advance`]), and converts with
//! [`NativeVcpu::to_common`] when state leaves the host and [`NativeVcpu::from_common`] when it
//! arrives. The layout-specific types ([`KvmVcpu`], [`XenHvmCpu`]) are public so tests and
//! tools can build and inspect native states field by field.
//!
//! # Guarantees
//! For every state `s` with `s.validate() == Ok(())`, `from_common(l, s)?.to_common()? == s` for
//! every layout `l`; for every native state `n` that `to_common` accepts,
//! `from_common(n.layout(), &n.to_common()?)? == n`. A native value the common format cannot
//! carry (a Xen debug register, a KVM soft interrupt, ...) is refused by `to_common` with
//! [`NativeError::Unrepresentable`] instead of being silently dropped.

pub mod kvm;
pub mod qemu;
pub mod xen_hvm;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{is_canonical, FormatError, VcpuState};

pub use kvm::{
    KvmDtable, KvmException, KvmInterrupt, KvmMsrEntry, KvmNmi, KvmRegs, KvmSegment, KvmSregs, KvmVcpu, KvmVcpuEvents,
};
pub use xen_hvm::{XenHvmCpu, XenLapic};

/// Bytes `rip` moves per simulated instruction in [`NativeVcpu::advance`].
pub const SIMULATED_INSTRUCTION_BYTES: u64 = 3;

/// TSC ticks per simulated instruction in [`NativeVcpu::advance`].
pub const SIMULATED_TSC_TICKS_PER_INSTRUCTION: u64 = 2;

/// Which native layout a backend keeps its vCPUs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NativeLayout {
    /// Shaped like KVM's `kvm_regs`/`kvm_sregs`/MSR list/`kvm_vcpu_events`: `"kvm"`.
    Kvm,
    /// Shaped like Xen's HVM save records (`hvm_hw_cpu` and friends): `"xen-hvm"`.
    XenHvm,
}

impl NativeLayout {
    /// Every layout, e.g. to test a conversion matrix or advertise capabilities.
    pub const ALL: [NativeLayout; 2] = [NativeLayout::Kvm, NativeLayout::XenHvm];

    /// The name used on the wire, in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            NativeLayout::Kvm => "kvm",
            NativeLayout::XenHvm => "xen-hvm",
        }
    }
}

impl fmt::Display for NativeLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NativeLayout {
    type Err = NativeError;

    fn from_str(s: &str) -> Result<NativeLayout, NativeError> {
        NativeLayout::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| NativeError::UnknownLayout { name: s.to_owned() })
    }
}

/// A vCPU in one of the native layouts.
// A VM holds a handful of these for its whole life, all in one layout; boxing the larger
// variant would add an indirection to every access to save memory nobody misses.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NativeVcpu {
    /// KVM-shaped.
    Kvm(KvmVcpu),
    /// Xen-HVM-shaped.
    XenHvm(XenHvmCpu),
}

impl NativeVcpu {
    /// The layout this vCPU is kept in.
    pub fn layout(&self) -> NativeLayout {
        match self {
            NativeVcpu::Kvm(_) => NativeLayout::Kvm,
            NativeVcpu::XenHvm(_) => NativeLayout::XenHvm,
        }
    }

    /// Converts a common-format state into `layout`, after validating it.
    pub fn from_common(layout: NativeLayout, s: &VcpuState) -> Result<NativeVcpu, NativeError> {
        Ok(match layout {
            NativeLayout::Kvm => NativeVcpu::Kvm(KvmVcpu::from_common(s)?),
            NativeLayout::XenHvm => NativeVcpu::XenHvm(XenHvmCpu::from_common(s)?),
        })
    }

    /// Converts to the common format, refusing native values that are invalid or that the
    /// common format cannot carry.
    pub fn to_common(&self) -> Result<VcpuState, NativeError> {
        match self {
            NativeVcpu::Kvm(v) => v.to_common(),
            NativeVcpu::XenHvm(v) => v.to_common(),
        }
    }

    /// Simulates running `instructions` instructions, changing the state in the native
    /// representation itself: `rip` moves forward by [`SIMULATED_INSTRUCTION_BYTES`] each
    /// (staying canonical), `rax` counts up, `rcx` counts down as a loop counter would, and the
    /// TSC ticks [`SIMULATED_TSC_TICKS_PER_INSTRUCTION`] each. Both layouts make the same
    /// change, so advancing then converting equals converting then advancing.
    pub fn advance(&mut self, instructions: u64) {
        match self {
            NativeVcpu::Kvm(v) => v.advance(instructions),
            NativeVcpu::XenHvm(v) => v.advance(instructions),
        }
    }
}

/// Where `rip` lands after `instructions` simulated instructions: wrapping arithmetic, then
/// sign-extended from bit 47 so that running off the end of the lower half lands in the upper
/// half instead of on a non-canonical address.
fn advanced_rip(rip: u64, instructions: u64) -> u64 {
    let raw = rip.wrapping_add(instructions.wrapping_mul(SIMULATED_INSTRUCTION_BYTES));
    (((raw << 16) as i64) >> 16) as u64
}

fn advanced_tsc(tsc: u64, instructions: u64) -> u64 {
    tsc.wrapping_add(instructions.wrapping_mul(SIMULATED_TSC_TICKS_PER_INSTRUCTION))
}

/// Why a native state could not be converted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NativeError {
    /// A layout name did not parse.
    #[error("unknown native layout {name:?}, expected \"kvm\" or \"xen-hvm\"")]
    UnknownLayout {
        /// The refused name.
        name: String,
    },
    /// A packed word or padding field has bits set that the layout reserves.
    #[error("{field} = {value:#x} has reserved bits set")]
    ReservedBits {
        /// Native field name, e.g. `cs_arbytes` or `sregs.cs.padding`.
        field: String,
        /// The refused value.
        value: u64,
    },
    /// A byte-wide boolean holds something other than 0 or 1.
    #[error("{field} = {value} is not a boolean (0 or 1)")]
    InvalidFlag {
        /// Native field name, e.g. `sregs.cs.present`.
        field: String,
        /// The refused value.
        value: u8,
    },
    /// An unpacked attribute holds more bits than it has.
    #[error("{field} = {value} exceeds its maximum of {max}")]
    OutOfRange {
        /// Native field name, e.g. `sregs.ss.dpl`.
        field: String,
        /// The refused value.
        value: u64,
        /// The largest valid value.
        max: u64,
    },
    /// An address that must be canonical is not.
    #[error("{field} = {value:#x} is not a canonical 48-bit address")]
    NonCanonical {
        /// Native field name.
        field: String,
        /// The refused address.
        value: u64,
    },
    /// A valid native value that the common format has no place for.
    #[error("{field} = {value:#x} cannot be represented in the common format")]
    Unrepresentable {
        /// Native field name.
        field: String,
        /// The refused value.
        value: u64,
    },
    /// The native MSR list is longer than any valid state needs.
    #[error("{count} native MSR entries exceed the limit of {limit}")]
    TooManyMsrs {
        /// Entries found.
        count: usize,
        /// The limit for this layout.
        limit: usize,
    },
    /// The native MSR list is not strictly ascending by index.
    #[error("MSR {index:#x} follows MSR {previous:#x}; entries must be strictly ascending")]
    MsrOrder {
        /// The out-of-order index.
        index: u32,
        /// The index before it.
        previous: u32,
    },
    /// The MSR list holds an MSR the layout keeps in a dedicated field.
    #[error("MSR {index:#x} belongs in its dedicated field, not in the MSR list")]
    MsrHasOwnField {
        /// The refused index.
        index: u32,
    },
    /// A required MSR entry is missing.
    #[error("MSR {index:#x} is missing from the MSR list")]
    MissingMsr {
        /// The missing index.
        index: u32,
    },
    /// Two native fields that must agree do not.
    #[error("{field} = {value:#x} disagrees with {other}")]
    Inconsistent {
        /// The field found wrong.
        field: String,
        /// Its value.
        value: u64,
        /// The field it must agree with.
        other: String,
    },
    /// The common-format state is invalid (on the way in) or the converted one would be (on
    /// the way out).
    #[error("invalid common-format state")]
    InvalidCommon(#[from] FormatError),
}

/// Checks a byte-wide boolean and returns its value.
fn flag(field: impl FnOnce() -> String, value: u8) -> Result<bool, NativeError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(NativeError::InvalidFlag { field: field(), value }),
    }
}

/// Checks that an address is canonical.
fn canonical(field: impl FnOnce() -> String, value: u64) -> Result<u64, NativeError> {
    if is_canonical(value) {
        Ok(value)
    } else {
        Err(NativeError::NonCanonical { field: field(), value })
    }
}

/// Checks that a native value fits the narrower common field it maps to.
fn narrow<T: TryFrom<u64>>(field: impl FnOnce() -> String, value: u64) -> Result<T, NativeError> {
    T::try_from(value).map_err(|_| NativeError::Unrepresentable { field: field(), value })
}

/// Checks that a field the layout reserves is zero.
fn reserved_zero(field: impl FnOnce() -> String, value: u64) -> Result<(), NativeError> {
    if value == 0 {
        Ok(())
    } else {
        Err(NativeError::ReservedBits { field: field(), value })
    }
}

/// Checks that a native value equals the only one the common format can reproduce.
fn fixed(field: impl FnOnce() -> String, value: u64, expected: u64) -> Result<(), NativeError> {
    if value == expected {
        Ok(())
    } else {
        Err(NativeError::Unrepresentable { field: field(), value })
    }
}

/// Checks that MSR indices are strictly ascending, none of them in `own_field`.
fn check_msr_indices(indices: impl Iterator<Item = u32>, own_field: &[u32]) -> Result<(), NativeError> {
    let mut previous: Option<u32> = None;
    for index in indices {
        if own_field.contains(&index) {
            return Err(NativeError::MsrHasOwnField { index });
        }
        if let Some(previous) = previous.filter(|&p| p >= index) {
            return Err(NativeError::MsrOrder { index, previous });
        }
        previous = Some(index);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Msr, PendingException};

    /// A state that exercises every field with a non-default value.
    pub(super) fn busy_state() -> VcpuState {
        let mut s = VcpuState::initial_long_mode(3);
        s.gprs = core::array::from_fn(|i| (i as u64 + 1) * 0x0101_0101_0101_0101);
        s.rip = 0xffff_8000_0000_1000;
        s.rflags = 0x0000_0000_0024_0a97;
        s.fs.base = 0x7fff_ffff_f000;
        s.gs.base = 0xffff_ffff_ffff_f000;
        s.gs.attributes.unusable = true;
        s.ds.attributes = crate::format::SegmentAttributes {
            type_: 0xf,
            s: true,
            dpl: 3,
            present: true,
            avl: true,
            l: false,
            db: true,
            g: true,
            unusable: false,
        };
        s.es.selector = 0xffff;
        s.es.limit = u32::MAX;
        s.gdtr = crate::format::DescriptorTable {
            base: 0xffff_8000_0000_0000,
            limit: u16::MAX,
        };
        s.cr2 = u64::MAX;
        s.cr8 = 0xf;
        s.apic_base = 0xfee0_0900;
        s.msrs = vec![
            Msr { index: 0, value: 1 },
            Msr {
                index: 0x174,
                value: 0x10,
            },
            Msr {
                index: 0x175,
                value: 0xffff_c900_0000_0000,
            },
            Msr {
                index: 0x277,
                value: 0x0007_0406_0007_0406,
            },
            Msr {
                index: 0xc000_0081,
                value: 0x0023_0010_0000_0000,
            },
            Msr {
                index: 0xc000_0102,
                value: 0xffff_8880_1234_0000,
            },
            Msr {
                index: u32::MAX,
                value: u64::MAX,
            },
        ];
        s.xsave = (0..1088u32).map(|i| (i * 31 % 251) as u8).collect();
        s.tsc = u64::MAX - 7;
        s.lapic = (0..1024u32).map(|i| (i * 7 % 253) as u8).collect();
        s.events = crate::format::PendingEvents {
            exception: Some(PendingException {
                vector: 13,
                error_code: Some(0xffff_ffff),
            }),
            interrupt: Some(0xef),
            nmi_pending: true,
            nmi_masked: true,
        };
        s
    }

    #[test]
    fn test_layout_names_round_trip() {
        for layout in NativeLayout::ALL {
            assert_eq!(layout.to_string().parse::<NativeLayout>(), Ok(layout));
        }
        assert_eq!(NativeLayout::XenHvm.to_string(), "xen-hvm");
        assert_eq!(
            "xen".parse::<NativeLayout>(),
            Err(NativeError::UnknownLayout { name: "xen".into() })
        );
    }

    #[test]
    fn test_layout_serde_uses_names() {
        let bytes = rmp_serde::to_vec(&NativeLayout::XenHvm).unwrap();
        let name: String = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(name, "xen-hvm");
        let back: NativeLayout = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, NativeLayout::XenHvm);
    }

    #[test]
    fn test_every_layout_round_trips_hand_picked_states() {
        let states = [
            VcpuState::initial_long_mode(0),
            busy_state(),
            VcpuState {
                xsave: Vec::new(),
                msrs: Vec::new(),
                ..busy_state()
            },
        ];
        for layout in NativeLayout::ALL {
            for s in &states {
                let native = NativeVcpu::from_common(layout, s).unwrap();
                assert_eq!(native.layout(), layout);
                assert_eq!(&native.to_common().unwrap(), s, "{layout}");
            }
        }
    }

    #[test]
    fn test_from_common_validates_first() {
        let mut s = VcpuState::initial_long_mode(0);
        s.rip = 0x0000_8000_0000_0000;
        for layout in NativeLayout::ALL {
            assert_eq!(
                NativeVcpu::from_common(layout, &s),
                Err(NativeError::InvalidCommon(FormatError::NonCanonical {
                    field: "rip",
                    value: 0x0000_8000_0000_0000
                }))
            );
        }
    }

    #[test]
    fn test_advance_changes_state_identically_in_every_layout() {
        let start = busy_state();
        let mut results = Vec::new();
        for layout in NativeLayout::ALL {
            let mut native = NativeVcpu::from_common(layout, &start).unwrap();
            native.advance(1000);
            results.push(native.to_common().unwrap());
        }
        assert_eq!(results[0], results[1]);
        let after = &results[0];
        assert_ne!(after, &start);
        assert_eq!(after.rip, start.rip + 3000);
        assert_eq!(after.gprs[0], start.gprs[0] + 1000);
        assert_eq!(after.gprs[2], start.gprs[2] - 1000);
        assert_eq!(after.tsc, start.tsc.wrapping_add(2000));
    }

    #[test]
    fn test_advance_keeps_rip_canonical() {
        let mut s = VcpuState::initial_long_mode(0);
        s.rip = 0x0000_7fff_ffff_fffe;
        for layout in NativeLayout::ALL {
            let mut native = NativeVcpu::from_common(layout, &s).unwrap();
            native.advance(1);
            let rip = native.to_common().unwrap().rip;
            assert!(is_canonical(rip), "{rip:#x}");
        }
    }
}
