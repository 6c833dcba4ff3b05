//! The common x86-64 vCPU state: architectural registers in architectural units, with no
//! hypervisor's packing, field order or side records.
//!
//! Conventions that make every conversion lossless and every state comparable with `==`:
//! - segment attributes are unpacked into one field per descriptor bit;
//! - registers that have a field of their own (TSC, APIC base, EFER, FS/GS base) never also
//!   appear in the MSR list ([`MSRS_WITH_OWN_FIELD`]);
//! - the MSR list is strictly ascending by index, so it has exactly one order;
//! - the xsave area is either empty (FPU never used) or starts with the full 512-byte legacy
//!   FXSAVE region, as every real XSAVE image does.

use serde::{Deserialize, Serialize};

use super::{FormatError, MAX_VCPUS};

/// Most MSRs a vCPU state may carry.
pub const MAX_MSRS: usize = 1024;

/// Largest xsave area accepted: 64 KiB, well above any XSAVE feature set shipped.
pub const MAX_XSAVE_BYTES: usize = 64 * 1024;

/// Size of the local APIC register page.
pub const LAPIC_REGISTER_BYTES: usize = 1024;

/// Size of the legacy FXSAVE region that opens every non-empty xsave area.
pub const XSAVE_LEGACY_BYTES: usize = 512;

/// Architectural MSR indices used by the format and the native layouts.
pub mod msr_index {
    /// IA32_TIME_STAMP_COUNTER.
    pub const TSC: u32 = 0x10;
    /// IA32_APIC_BASE.
    pub const APIC_BASE: u32 = 0x1b;
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_EFER.
    pub const EFER: u32 = 0xc000_0080;
    /// IA32_STAR: SYSCALL/SYSRET segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// IA32_LSTAR: 64-bit SYSCALL target.
    pub const LSTAR: u32 = 0xc000_0082;
    /// IA32_CSTAR: compatibility-mode SYSCALL target.
    pub const CSTAR: u32 = 0xc000_0083;
    /// IA32_FMASK: RFLAGS mask applied by SYSCALL.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// IA32_FS_BASE.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// IA32_GS_BASE.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// IA32_KERNEL_GS_BASE: the value SWAPGS exchanges with GS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC_AUX: the value RDTSCP returns in ECX.
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// MSRs that [`VcpuState`] holds in dedicated fields (`tsc`, `apic_base`, `efer`, `fs.base`,
/// `gs.base`) and that therefore must not appear in [`VcpuState::msrs`].
pub const MSRS_WITH_OWN_FIELD: [u32; 5] = [
    msr_index::TSC,
    msr_index::APIC_BASE,
    msr_index::EFER,
    msr_index::FS_BASE,
    msr_index::GS_BASE,
];

/// True when `addr` is canonical for 48-bit virtual addresses: bits 63..47 all equal.
pub fn is_canonical(addr: u64) -> bool {
    // Sign-extend from bit 47 and compare.
    (((addr << 16) as i64) >> 16) as u64 == addr
}

/// Segment descriptor attributes, one field per descriptor bit group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegmentAttributes {
    /// Segment type, 4 bits (0..=15).
    pub type_: u8,
    /// Descriptor type: `true` for code/data, `false` for system (TSS, LDT, gates).
    pub s: bool,
    /// Descriptor privilege level, 2 bits (0..=3).
    pub dpl: u8,
    /// Segment present.
    pub present: bool,
    /// Available for system software.
    pub avl: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Default operation size (D/B): 32-bit when set.
    pub db: bool,
    /// Granularity: limit in 4 KiB units when set (the `limit` field is always in bytes).
    pub g: bool,
    /// The segment register is unusable (loaded with a null selector), as VMX reports it.
    pub unusable: bool,
}

/// A segment register with its hidden part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// Visible selector.
    pub selector: u16,
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (already scaled by granularity).
    pub limit: u32,
    /// Attributes.
    pub attributes: SegmentAttributes,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address; canonical.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u16,
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Msr {
    /// MSR index as used by RDMSR/WRMSR.
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// An exception that will be delivered before the next instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingException {
    /// Exception vector.
    pub vector: u8,
    /// Error code pushed with it, for the exceptions that have one.
    pub error_code: Option<u32>,
}

/// Events in flight at the moment the vCPU stopped, which must be delivered after it resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingEvents {
    /// Exception being delivered.
    pub exception: Option<PendingException>,
    /// Vector of the external interrupt being injected.
    pub interrupt: Option<u8>,
    /// An NMI is waiting to be delivered.
    pub nmi_pending: bool,
    /// NMIs are blocked (an NMI handler is running).
    pub nmi_masked: bool,
}

/// One x86-64 vCPU in the common format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index within its VM, `0..MAX_VCPUS`.
    pub id: u32,
    /// General-purpose registers in this order: rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp,
    /// r8, r9, r10, r11, r12, r13, r14, r15.
    pub gprs: [u64; 16],
    /// Instruction pointer; canonical.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// Code segment.
    pub cs: Segment,
    /// Data segment.
    pub ds: Segment,
    /// Extra segment.
    pub es: Segment,
    /// FS; its base is IA32_FS_BASE and must be canonical.
    pub fs: Segment,
    /// GS; its base is IA32_GS_BASE and must be canonical.
    pub gs: Segment,
    /// Stack segment.
    pub ss: Segment,
    /// Task register; base canonical.
    pub tr: Segment,
    /// Local descriptor table register; base canonical.
    pub ldtr: Segment,
    /// Global descriptor table register.
    pub gdtr: DescriptorTable,
    /// Interrupt descriptor table register.
    pub idtr: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2: the last page-fault address.
    pub cr2: u64,
    /// CR3: page-table root.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8: task priority, 4 bits (bits 63..4 are reserved).
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// Other MSRs, strictly ascending by index, none of [`MSRS_WITH_OWN_FIELD`].
    pub msrs: Vec<Msr>,
    /// FPU/SSE/AVX state as an XSAVE image: empty, or [`XSAVE_LEGACY_BYTES`] to
    /// [`MAX_XSAVE_BYTES`] bytes. Opaque beyond that.
    #[serde(with = "super::blob")]
    pub xsave: Vec<u8>,
    /// Guest time-stamp counter (IA32_TSC) at the moment of capture.
    pub tsc: u64,
    /// Events in flight.
    pub events: PendingEvents,
    /// The local APIC's register page: [`LAPIC_REGISTER_BYTES`] bytes at the offsets of the
    /// xAPIC register map in the Intel SDM (vol. 3A, "Local APIC Register Address Map"), or
    /// empty for a VM without a local APIC model. An architectural page rather than a list of
    /// fields, because every hypervisor that emulates the APIC keeps exactly this page.
    #[serde(default, with = "super::blob")]
    pub lapic: Vec<u8>,
}

// Register bits used to build a plausible initial state.
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_DEFAULT_ADDR: u64 = 0xfee0_0000;
/// RFLAGS bit 1 reads as one.
const RFLAGS_FIXED: u64 = 1 << 1;
/// Offsets of FCW and MXCSR in the legacy FXSAVE region, and their reset values.
const FXSAVE_FCW_OFFSET: usize = 0;
const FXSAVE_MXCSR_OFFSET: usize = 24;
const FCW_RESET: u16 = 0x037f;
const MXCSR_RESET: u32 = 0x1f80;

impl VcpuState {
    /// A plausible vCPU `id` just after a loader has switched it into 64-bit long mode: flat
    /// 64-bit code and data segments, paging on, SYSCALL MSRs set, a reset FPU.
    pub fn initial_long_mode(id: u32) -> VcpuState {
        let code = Segment {
            selector: 0x08,
            base: 0,
            limit: 0xffff_ffff,
            attributes: SegmentAttributes {
                type_: 0xb, // execute/read, accessed
                s: true,
                present: true,
                l: true,
                g: true,
                ..SegmentAttributes::default()
            },
        };
        let data = Segment {
            selector: 0x10,
            base: 0,
            limit: 0xffff_ffff,
            attributes: SegmentAttributes {
                type_: 0x3, // read/write, accessed
                s: true,
                present: true,
                db: true,
                g: true,
                ..SegmentAttributes::default()
            },
        };
        let tr = Segment {
            selector: 0x18,
            base: 0,
            limit: 0x67,
            attributes: SegmentAttributes {
                type_: 0xb, // busy 64-bit TSS
                present: true,
                ..SegmentAttributes::default()
            },
        };
        let ldtr = Segment {
            attributes: SegmentAttributes {
                type_: 0x2, // LDT
                unusable: true,
                ..SegmentAttributes::default()
            },
            ..Segment::default()
        };
        let mut xsave = vec![0u8; XSAVE_LEGACY_BYTES];
        xsave[FXSAVE_FCW_OFFSET..FXSAVE_FCW_OFFSET + 2].copy_from_slice(&FCW_RESET.to_le_bytes());
        xsave[FXSAVE_MXCSR_OFFSET..FXSAVE_MXCSR_OFFSET + 4].copy_from_slice(&MXCSR_RESET.to_le_bytes());
        let mut gprs = [0u64; 16];
        gprs[6] = 0x8000 + 0x1000 * u64::from(id); // rsp: one small stack per vCPU
        VcpuState {
            id,
            gprs,
            rip: 0x10_0000,
            rflags: RFLAGS_FIXED,
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldtr,
            gdtr: DescriptorTable {
                base: 0x500,
                limit: 0x27,
            },
            idtr: DescriptorTable {
                base: 0x1000,
                limit: 0xfff,
            },
            cr0: CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr2: 0,
            cr3: 0x9000,
            cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            cr8: 0,
            efer: EFER_SCE | EFER_LME | EFER_LMA,
            apic_base: APIC_DEFAULT_ADDR | APIC_BASE_ENABLE | if id == 0 { APIC_BASE_BSP } else { 0 },
            msrs: vec![
                Msr {
                    index: msr_index::STAR,
                    value: (0x1b << 48) | (0x08 << 32),
                },
                Msr {
                    index: msr_index::LSTAR,
                    value: 0xffff_ffff_8100_0000,
                },
                Msr {
                    index: msr_index::SYSCALL_MASK,
                    value: 0x4_7700,
                },
                Msr {
                    index: msr_index::TSC_AUX,
                    value: u64::from(id),
                },
            ],
            xsave,
            tsc: 0,
            events: PendingEvents::default(),
            lapic: Vec::new(),
        }
    }

    /// The segments with their names, in the order errors report them.
    pub fn segments(&self) -> [(&'static str, &Segment); 8] {
        [
            ("cs", &self.cs),
            ("ds", &self.ds),
            ("es", &self.es),
            ("fs", &self.fs),
            ("gs", &self.gs),
            ("ss", &self.ss),
            ("tr", &self.tr),
            ("ldtr", &self.ldtr),
        ]
    }

    /// Checks everything a target hypervisor would refuse or a layout could not hold; the
    /// error names the first offending field.
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.id >= MAX_VCPUS {
            return Err(FormatError::VcpuIdOutOfRange {
                id: self.id,
                limit: MAX_VCPUS,
            });
        }
        let addresses = [
            ("rip", self.rip),
            ("fs.base", self.fs.base),
            ("gs.base", self.gs.base),
            ("tr.base", self.tr.base),
            ("ldtr.base", self.ldtr.base),
            ("gdtr.base", self.gdtr.base),
            ("idtr.base", self.idtr.base),
        ];
        for (field, value) in addresses {
            if !is_canonical(value) {
                return Err(FormatError::NonCanonical { field, value });
            }
        }
        for (segment, seg) in self.segments() {
            let a = &seg.attributes;
            if a.type_ > 0xf {
                return Err(FormatError::InvalidSegmentAttribute {
                    segment,
                    attribute: "type",
                    value: a.type_,
                });
            }
            if a.dpl > 3 {
                return Err(FormatError::InvalidSegmentAttribute {
                    segment,
                    attribute: "dpl",
                    value: a.dpl,
                });
            }
        }
        if self.cr8 > 0xf {
            return Err(FormatError::ReservedBits {
                field: "cr8",
                value: self.cr8,
            });
        }
        validate_msrs(&self.msrs)?;
        let len = self.xsave.len();
        if len != 0 && !(XSAVE_LEGACY_BYTES..=MAX_XSAVE_BYTES).contains(&len) {
            return Err(FormatError::XsaveSize {
                len,
                min: XSAVE_LEGACY_BYTES,
                max: MAX_XSAVE_BYTES,
            });
        }
        let len = self.lapic.len();
        if len != 0 && len != LAPIC_REGISTER_BYTES {
            return Err(FormatError::LapicSize { len });
        }
        Ok(())
    }
}

fn validate_msrs(msrs: &[Msr]) -> Result<(), FormatError> {
    if msrs.len() > MAX_MSRS {
        return Err(FormatError::TooManyMsrs {
            count: msrs.len(),
            limit: MAX_MSRS,
        });
    }
    let mut previous: Option<u32> = None;
    for msr in msrs {
        if MSRS_WITH_OWN_FIELD.contains(&msr.index) {
            return Err(FormatError::MsrHasOwnField { index: msr.index });
        }
        if let Some(previous) = previous.filter(|&p| p >= msr.index) {
            return Err(FormatError::MsrOrder {
                index: msr.index,
                previous,
            });
        }
        previous = Some(msr.index);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_initial_long_mode_is_valid_and_in_long_mode() {
        for id in [0, 1, MAX_VCPUS - 1] {
            let s = VcpuState::initial_long_mode(id);
            assert_eq!(s.validate(), Ok(()));
            assert_eq!(s.id, id);
            assert!(s.cr0 & CR0_PE != 0 && s.cr0 & CR0_PG != 0);
            assert!(s.cr4 & CR4_PAE != 0);
            assert!(s.efer & EFER_LME != 0 && s.efer & EFER_LMA != 0);
            assert!(s.cs.attributes.l && !s.cs.attributes.db);
            assert_eq!(s.xsave.len(), 512);
            assert_eq!(&s.xsave[0..2], &[0x7f, 0x03]);
            assert_eq!(&s.xsave[24..28], &[0x80, 0x1f, 0, 0]);
            assert!(s.msrs.iter().any(|m| m.index == msr_index::LSTAR));
        }
    }

    #[test]
    fn test_is_canonical_boundaries() {
        assert!(is_canonical(0));
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
        assert!(!is_canonical(0x0000_8000_0000_0000));
        assert!(!is_canonical(0xffff_7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(is_canonical(u64::MAX));
    }

    #[test]
    fn test_non_canonical_addresses_are_named() {
        let bad = 0x0000_8000_0000_0000;
        type Setter = fn(&mut VcpuState, u64);
        let cases: [(&str, Setter); 7] = [
            ("rip", |s, v| s.rip = v),
            ("fs.base", |s, v| s.fs.base = v),
            ("gs.base", |s, v| s.gs.base = v),
            ("tr.base", |s, v| s.tr.base = v),
            ("ldtr.base", |s, v| s.ldtr.base = v),
            ("gdtr.base", |s, v| s.gdtr.base = v),
            ("idtr.base", |s, v| s.idtr.base = v),
        ];
        for (field, set) in cases {
            let mut s = VcpuState::initial_long_mode(0);
            set(&mut s, bad);
            assert_eq!(s.validate(), Err(FormatError::NonCanonical { field, value: bad }));
        }
    }

    #[test]
    fn test_out_of_range_attributes_are_rejected() {
        let mut s = VcpuState::initial_long_mode(0);
        s.ss.attributes.type_ = 16;
        assert_eq!(
            s.validate(),
            Err(FormatError::InvalidSegmentAttribute {
                segment: "ss",
                attribute: "type",
                value: 16
            })
        );
        let mut s = VcpuState::initial_long_mode(0);
        s.tr.attributes.dpl = 4;
        assert_eq!(
            s.validate(),
            Err(FormatError::InvalidSegmentAttribute {
                segment: "tr",
                attribute: "dpl",
                value: 4
            })
        );
    }

    #[test]
    fn test_cr8_reserved_bits_are_rejected() {
        let mut s = VcpuState::initial_long_mode(0);
        s.cr8 = 0x10;
        assert_eq!(
            s.validate(),
            Err(FormatError::ReservedBits {
                field: "cr8",
                value: 0x10
            })
        );
    }

    #[test]
    fn test_msr_list_rules() {
        let mut s = VcpuState::initial_long_mode(0);
        s.msrs = (0..=MAX_MSRS as u32)
            .map(|index| Msr {
                index: 0x1000 + index,
                value: 0,
            })
            .collect();
        assert_eq!(
            s.validate(),
            Err(FormatError::TooManyMsrs {
                count: MAX_MSRS + 1,
                limit: MAX_MSRS
            })
        );
        s.msrs = vec![Msr { index: 0x200, value: 1 }, Msr { index: 0x200, value: 2 }];
        assert_eq!(
            s.validate(),
            Err(FormatError::MsrOrder {
                index: 0x200,
                previous: 0x200
            })
        );
        for index in MSRS_WITH_OWN_FIELD {
            s.msrs = vec![Msr { index, value: 0 }];
            assert_eq!(s.validate(), Err(FormatError::MsrHasOwnField { index }));
        }
    }

    #[test]
    fn test_xsave_size_rules() {
        let mut s = VcpuState::initial_long_mode(0);
        for (len, ok) in [
            (0, true),
            (1, false),
            (511, false),
            (512, true),
            (4096, true),
            (MAX_XSAVE_BYTES, true),
            (MAX_XSAVE_BYTES + 1, false),
        ] {
            s.xsave = vec![0; len];
            assert_eq!(s.validate().is_ok(), ok, "{len}");
        }
    }

    #[test]
    fn test_vcpu_id_limit() {
        let mut s = VcpuState::initial_long_mode(0);
        s.id = MAX_VCPUS;
        assert_eq!(
            s.validate(),
            Err(FormatError::VcpuIdOutOfRange {
                id: MAX_VCPUS,
                limit: MAX_VCPUS
            })
        );
    }
}
