//! The KVM-shaped native layout, after the structures of KVM's userspace API: `kvm_regs`,
//! `kvm_sregs`, the `kvm_msrs` entry list, the xsave region and `kvm_vcpu_events`.
//!
//! Choices, and why:
//! - Segment attributes are unpacked into byte-wide fields as in `struct kvm_segment`; each
//!   boolean byte must be 0 or 1, `type_` at most 15, `dpl` at most 3, padding zero.
//! - The guest TSC travels as an entry for IA32_TSC (0x10) in the MSR list, which is how KVM
//!   userspace saves and restores it (`KVM_GET_MSRS`/`KVM_SET_MSRS`). The entry is required.
//! - The MSR list is strictly ascending by index, so it has a single order and converts to the
//!   common list without sorting. EFER, APIC base and FS/GS base live in `kvm_sregs` and must
//!   not appear in the list.
//! - `kvm_vcpu_events` is reduced to what the common format carries: an injected exception,
//!   an injected interrupt (mirrored in `sregs.interrupt_bitmap`, as `KVM_GET_SREGS` reports
//!   it), NMI pending and masked. Soft interrupts, interrupt shadows and an NMI already being
//!   injected cannot be carried and are refused as unrepresentable.

use super::{advanced_rip, advanced_tsc, canonical, check_msr_indices, fixed, flag, reserved_zero, NativeError};
use crate::format::{
    msr_index, DescriptorTable, Msr, PendingEvents, PendingException, Segment, SegmentAttributes, VcpuState, MAX_MSRS,
};

/// General-purpose registers, in `struct kvm_regs` order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmRegs {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// Instruction pointer; canonical.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

impl KvmRegs {
    /// The sixteen GPRs in common-format order, which is also `kvm_regs` order.
    fn gprs(&self) -> [u64; 16] {
        [
            self.rax, self.rbx, self.rcx, self.rdx, self.rsi, self.rdi, self.rsp, self.rbp, self.r8, self.r9, self.r10,
            self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    fn from_gprs(g: &[u64; 16], rip: u64, rflags: u64) -> KvmRegs {
        let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15] = *g;
        KvmRegs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip,
            rflags,
        }
    }
}

/// A segment register as `struct kvm_segment`: attributes unpacked one byte each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmSegment {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Visible selector.
    pub selector: u16,
    /// Segment type, 0..=15.
    pub type_: u8,
    /// Present, 0 or 1.
    pub present: u8,
    /// Descriptor privilege level, 0..=3.
    pub dpl: u8,
    /// Default operation size, 0 or 1.
    pub db: u8,
    /// Code/data (1) or system (0) descriptor.
    pub s: u8,
    /// 64-bit code segment, 0 or 1.
    pub l: u8,
    /// Granularity, 0 or 1.
    pub g: u8,
    /// Available for software, 0 or 1.
    pub avl: u8,
    /// Unusable, 0 or 1.
    pub unusable: u8,
    /// Must be zero.
    pub padding: u8,
}

/// GDTR or IDTR as `struct kvm_dtable`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmDtable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u16,
    /// Must be zero.
    pub padding: [u16; 3],
}

/// Special registers, in `struct kvm_sregs` order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmSregs {
    /// Code segment.
    pub cs: KvmSegment,
    /// Data segment.
    pub ds: KvmSegment,
    /// Extra segment.
    pub es: KvmSegment,
    /// FS; base canonical.
    pub fs: KvmSegment,
    /// GS; base canonical.
    pub gs: KvmSegment,
    /// Stack segment.
    pub ss: KvmSegment,
    /// Task register; base canonical.
    pub tr: KvmSegment,
    /// LDTR (KVM calls it `ldt`).
    pub ldt: KvmSegment,
    /// GDTR; base canonical.
    pub gdt: KvmDtable,
    /// IDTR; base canonical.
    pub idt: KvmDtable,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// Task priority, 0..=15.
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// One bit per vector: the interrupt being injected, if any (at most one bit).
    pub interrupt_bitmap: [u64; 4],
}

/// One entry of `struct kvm_msrs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmMsrEntry {
    /// MSR index.
    pub index: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Its value.
    pub data: u64,
}

/// The exception part of `struct kvm_vcpu_events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmException {
    /// An exception is being injected, 0 or 1.
    pub injected: u8,
    /// Its vector.
    pub nr: u8,
    /// It pushes an error code, 0 or 1.
    pub has_error_code: u8,
    /// Must be zero.
    pub pad: u8,
    /// The error code.
    pub error_code: u32,
}

/// The interrupt part of `struct kvm_vcpu_events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmInterrupt {
    /// An external interrupt is being injected, 0 or 1.
    pub injected: u8,
    /// Its vector.
    pub nr: u8,
    /// It is a software interrupt (INTn); must be 0 here.
    pub soft: u8,
    /// Interrupt shadow (STI/MOV SS blocking); must be 0 here.
    pub shadow: u8,
}

/// The NMI part of `struct kvm_vcpu_events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmNmi {
    /// An NMI is being injected; must be 0 here (the common format only knows pending NMIs).
    pub injected: u8,
    /// An NMI is pending, 0 or 1.
    pub pending: u8,
    /// NMIs are blocked, 0 or 1.
    pub masked: u8,
    /// Must be zero.
    pub pad: u8,
}

/// Events in flight, as `struct kvm_vcpu_events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmVcpuEvents {
    /// Exception being injected.
    pub exception: KvmException,
    /// Interrupt being injected.
    pub interrupt: KvmInterrupt,
    /// NMI state.
    pub nmi: KvmNmi,
}

/// A vCPU in the KVM-shaped layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmVcpu {
    /// vCPU index, as passed to `KVM_CREATE_VCPU`.
    pub id: u32,
    /// `KVM_GET_REGS`.
    pub regs: KvmRegs,
    /// `KVM_GET_SREGS`.
    pub sregs: KvmSregs,
    /// `KVM_GET_MSRS`: strictly ascending, includes IA32_TSC.
    pub msrs: Vec<KvmMsrEntry>,
    /// `KVM_GET_XSAVE` region bytes.
    pub xsave: Vec<u8>,
    /// `KVM_GET_VCPU_EVENTS`.
    pub events: KvmVcpuEvents,
    /// `KVM_GET_LAPIC`: the 1 KiB register page, or empty without an in-kernel APIC.
    pub lapic: Vec<u8>,
}

/// MSRs that live in `kvm_sregs`, never in the MSR list.
const KVM_SREGS_MSRS: [u32; 4] = [
    msr_index::APIC_BASE,
    msr_index::EFER,
    msr_index::FS_BASE,
    msr_index::GS_BASE,
];

impl KvmVcpu {
    /// Converts a common-format state, after validating it.
    pub fn from_common(s: &VcpuState) -> Result<KvmVcpu, NativeError> {
        s.validate()?;
        let mut msrs = Vec::with_capacity(s.msrs.len() + 1);
        let tsc = KvmMsrEntry {
            index: msr_index::TSC,
            reserved: 0,
            data: s.tsc,
        };
        // Insert the TSC entry where it sorts, keeping the list strictly ascending.
        let split = s.msrs.partition_point(|m| m.index < msr_index::TSC);
        let entry = |m: &Msr| KvmMsrEntry {
            index: m.index,
            reserved: 0,
            data: m.value,
        };
        msrs.extend(s.msrs[..split].iter().map(entry));
        msrs.push(tsc);
        msrs.extend(s.msrs[split..].iter().map(entry));

        let mut interrupt_bitmap = [0u64; 4];
        if let Some(v) = s.events.interrupt {
            interrupt_bitmap[usize::from(v / 64)] = 1 << (v % 64);
        }
        let exception = match s.events.exception {
            None => KvmException::default(),
            Some(e) => KvmException {
                injected: 1,
                nr: e.vector,
                has_error_code: u8::from(e.error_code.is_some()),
                pad: 0,
                error_code: e.error_code.unwrap_or(0),
            },
        };
        Ok(KvmVcpu {
            id: s.id,
            regs: KvmRegs::from_gprs(&s.gprs, s.rip, s.rflags),
            sregs: KvmSregs {
                cs: segment_from_common(&s.cs),
                ds: segment_from_common(&s.ds),
                es: segment_from_common(&s.es),
                fs: segment_from_common(&s.fs),
                gs: segment_from_common(&s.gs),
                ss: segment_from_common(&s.ss),
                tr: segment_from_common(&s.tr),
                ldt: segment_from_common(&s.ldtr),
                gdt: dtable_from_common(&s.gdtr),
                idt: dtable_from_common(&s.idtr),
                cr0: s.cr0,
                cr2: s.cr2,
                cr3: s.cr3,
                cr4: s.cr4,
                cr8: s.cr8,
                efer: s.efer,
                apic_base: s.apic_base,
                interrupt_bitmap,
            },
            msrs,
            xsave: s.xsave.clone(),
            events: KvmVcpuEvents {
                exception,
                interrupt: KvmInterrupt {
                    injected: u8::from(s.events.interrupt.is_some()),
                    nr: s.events.interrupt.unwrap_or(0),
                    soft: 0,
                    shadow: 0,
                },
                nmi: KvmNmi {
                    injected: 0,
                    pending: u8::from(s.events.nmi_pending),
                    masked: u8::from(s.events.nmi_masked),
                    pad: 0,
                },
            },
            lapic: s.lapic.clone(),
        })
    }

    /// Converts to the common format, refusing invalid or unrepresentable native values.
    pub fn to_common(&self) -> Result<VcpuState, NativeError> {
        let sr = &self.sregs;
        canonical(|| "regs.rip".into(), self.regs.rip)?;
        for (name, seg) in [("fs", &sr.fs), ("gs", &sr.gs), ("tr", &sr.tr), ("ldt", &sr.ldt)] {
            canonical(|| format!("sregs.{name}.base"), seg.base)?;
        }
        if sr.cr8 > 0xf {
            return Err(NativeError::ReservedBits {
                field: "sregs.cr8".into(),
                value: sr.cr8,
            });
        }
        let (msrs, tsc) = self.msrs_to_common()?;
        let events = self.events_to_common()?;
        let s = VcpuState {
            id: self.id,
            gprs: self.regs.gprs(),
            rip: self.regs.rip,
            rflags: self.regs.rflags,
            cs: segment_to_common("cs", &sr.cs)?,
            ds: segment_to_common("ds", &sr.ds)?,
            es: segment_to_common("es", &sr.es)?,
            fs: segment_to_common("fs", &sr.fs)?,
            gs: segment_to_common("gs", &sr.gs)?,
            ss: segment_to_common("ss", &sr.ss)?,
            tr: segment_to_common("tr", &sr.tr)?,
            ldtr: segment_to_common("ldt", &sr.ldt)?,
            gdtr: dtable_to_common("gdt", &sr.gdt)?,
            idtr: dtable_to_common("idt", &sr.idt)?,
            cr0: sr.cr0,
            cr2: sr.cr2,
            cr3: sr.cr3,
            cr4: sr.cr4,
            cr8: sr.cr8,
            efer: sr.efer,
            apic_base: sr.apic_base,
            msrs,
            xsave: self.xsave.clone(),
            tsc,
            events,
            lapic: self.lapic.clone(),
        };
        s.validate()?;
        Ok(s)
    }

    /// See [`super::NativeVcpu::advance`]. A state without a TSC entry (which `to_common`
    /// refuses anyway) keeps no TSC to advance.
    pub fn advance(&mut self, instructions: u64) {
        self.regs.rip = advanced_rip(self.regs.rip, instructions);
        self.regs.rax = self.regs.rax.wrapping_add(instructions);
        self.regs.rcx = self.regs.rcx.wrapping_sub(instructions);
        if let Some(tsc) = self.msrs.iter_mut().find(|m| m.index == msr_index::TSC) {
            tsc.data = advanced_tsc(tsc.data, instructions);
        }
    }

    /// Splits the native MSR list into the common list and the TSC.
    fn msrs_to_common(&self) -> Result<(Vec<Msr>, u64), NativeError> {
        // One more than the common limit: the TSC entry.
        let limit = MAX_MSRS + 1;
        if self.msrs.len() > limit {
            return Err(NativeError::TooManyMsrs {
                count: self.msrs.len(),
                limit,
            });
        }
        check_msr_indices(self.msrs.iter().map(|m| m.index), &KVM_SREGS_MSRS)?;
        let mut tsc = None;
        let mut msrs = Vec::with_capacity(self.msrs.len());
        for (i, m) in self.msrs.iter().enumerate() {
            reserved_zero(|| format!("msrs[{i}].reserved"), u64::from(m.reserved))?;
            if m.index == msr_index::TSC {
                tsc = Some(m.data);
            } else {
                msrs.push(Msr {
                    index: m.index,
                    value: m.data,
                });
            }
        }
        let tsc = tsc.ok_or(NativeError::MissingMsr { index: msr_index::TSC })?;
        Ok((msrs, tsc))
    }

    fn events_to_common(&self) -> Result<PendingEvents, NativeError> {
        let ev = &self.events;
        let e = &ev.exception;
        reserved_zero(|| "events.exception.pad".into(), u64::from(e.pad))?;
        let has_error_code = flag(|| "events.exception.has_error_code".into(), e.has_error_code)?;
        if !has_error_code {
            // The common format has no place for an error code nobody pushes.
            fixed(|| "events.exception.error_code".into(), u64::from(e.error_code), 0)?;
        }
        let exception = if flag(|| "events.exception.injected".into(), e.injected)? {
            Some(PendingException {
                vector: e.nr,
                error_code: has_error_code.then_some(e.error_code),
            })
        } else {
            fixed(|| "events.exception.nr".into(), u64::from(e.nr), 0)?;
            fixed(
                || "events.exception.has_error_code".into(),
                u64::from(e.has_error_code),
                0,
            )?;
            None
        };

        let irq = &ev.interrupt;
        fixed(|| "events.interrupt.soft".into(), u64::from(irq.soft), 0)?;
        fixed(|| "events.interrupt.shadow".into(), u64::from(irq.shadow), 0)?;
        let interrupt = if flag(|| "events.interrupt.injected".into(), irq.injected)? {
            Some(irq.nr)
        } else {
            fixed(|| "events.interrupt.nr".into(), u64::from(irq.nr), 0)?;
            None
        };
        let mut expected = [0u64; 4];
        if let Some(v) = interrupt {
            expected[usize::from(v / 64)] = 1 << (v % 64);
        }
        let bitmap = &self.sregs.interrupt_bitmap;
        if let Some(word) = (0..4).find(|&w| bitmap[w] != expected[w]) {
            return Err(NativeError::Inconsistent {
                field: format!("sregs.interrupt_bitmap[{word}]"),
                value: bitmap[word],
                other: "events.interrupt".into(),
            });
        }

        let nmi = &ev.nmi;
        fixed(|| "events.nmi.injected".into(), u64::from(nmi.injected), 0)?;
        reserved_zero(|| "events.nmi.pad".into(), u64::from(nmi.pad))?;
        Ok(PendingEvents {
            exception,
            interrupt,
            nmi_pending: flag(|| "events.nmi.pending".into(), nmi.pending)?,
            nmi_masked: flag(|| "events.nmi.masked".into(), nmi.masked)?,
        })
    }
}

fn segment_from_common(s: &Segment) -> KvmSegment {
    let a = &s.attributes;
    KvmSegment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: a.type_,
        present: u8::from(a.present),
        dpl: a.dpl,
        db: u8::from(a.db),
        s: u8::from(a.s),
        l: u8::from(a.l),
        g: u8::from(a.g),
        avl: u8::from(a.avl),
        unusable: u8::from(a.unusable),
        padding: 0,
    }
}

fn segment_to_common(name: &str, k: &KvmSegment) -> Result<Segment, NativeError> {
    let field = |attr: &str| format!("sregs.{name}.{attr}");
    if k.type_ > 0xf {
        return Err(NativeError::OutOfRange {
            field: field("type_"),
            value: u64::from(k.type_),
            max: 0xf,
        });
    }
    if k.dpl > 3 {
        return Err(NativeError::OutOfRange {
            field: field("dpl"),
            value: u64::from(k.dpl),
            max: 3,
        });
    }
    reserved_zero(|| field("padding"), u64::from(k.padding))?;
    Ok(Segment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        attributes: SegmentAttributes {
            type_: k.type_,
            s: flag(|| field("s"), k.s)?,
            dpl: k.dpl,
            present: flag(|| field("present"), k.present)?,
            avl: flag(|| field("avl"), k.avl)?,
            l: flag(|| field("l"), k.l)?,
            db: flag(|| field("db"), k.db)?,
            g: flag(|| field("g"), k.g)?,
            unusable: flag(|| field("unusable"), k.unusable)?,
        },
    })
}

fn dtable_from_common(d: &DescriptorTable) -> KvmDtable {
    KvmDtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

fn dtable_to_common(name: &str, k: &KvmDtable) -> Result<DescriptorTable, NativeError> {
    for (i, p) in k.padding.iter().enumerate() {
        reserved_zero(|| format!("sregs.{name}.padding[{i}]"), u64::from(*p))?;
    }
    Ok(DescriptorTable {
        base: canonical(|| format!("sregs.{name}.base"), k.base)?,
        limit: k.limit,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::busy_state;
    use super::*;
    use crate::format::FormatError;

    fn kvm() -> KvmVcpu {
        KvmVcpu::from_common(&busy_state()).unwrap()
    }

    fn err_of(mutate: impl FnOnce(&mut KvmVcpu)) -> NativeError {
        let mut k = kvm();
        mutate(&mut k);
        k.to_common().unwrap_err()
    }

    #[test]
    fn test_busy_state_maps_field_by_field() {
        let s = busy_state();
        let k = kvm();
        assert_eq!(k.regs.rax, s.gprs[0]);
        assert_eq!(k.regs.rsi, s.gprs[4]);
        assert_eq!(k.regs.rbp, s.gprs[7]);
        assert_eq!(k.regs.r15, s.gprs[15]);
        assert_eq!(k.sregs.ds.dpl, 3);
        assert_eq!(k.sregs.ds.avl, 1);
        assert_eq!(k.sregs.gs.unusable, 1);
        assert_eq!(k.sregs.cr8, 0xf);
        // IA32_TSC sits between index 0 and 0x174.
        assert_eq!(k.msrs[0].index, 0);
        assert_eq!(
            k.msrs[1],
            KvmMsrEntry {
                index: 0x10,
                reserved: 0,
                data: s.tsc
            }
        );
        assert_eq!(k.msrs.len(), s.msrs.len() + 1);
        assert_eq!(k.sregs.interrupt_bitmap, [0, 0, 0, 1 << (0xef - 192)]);
        assert_eq!(k.events.exception.error_code, 0xffff_ffff);
        assert_eq!(k.to_common().unwrap(), s);
    }

    #[test]
    fn test_non_boolean_flag_is_rejected() {
        assert_eq!(
            err_of(|k| k.sregs.cs.present = 2),
            NativeError::InvalidFlag {
                field: "sregs.cs.present".into(),
                value: 2
            }
        );
        assert_eq!(
            err_of(|k| k.events.nmi.masked = 0xff),
            NativeError::InvalidFlag {
                field: "events.nmi.masked".into(),
                value: 0xff
            }
        );
    }

    #[test]
    fn test_out_of_range_attributes_are_rejected() {
        assert_eq!(
            err_of(|k| k.sregs.ss.type_ = 16),
            NativeError::OutOfRange {
                field: "sregs.ss.type_".into(),
                value: 16,
                max: 15
            }
        );
        assert_eq!(
            err_of(|k| k.sregs.ldt.dpl = 4),
            NativeError::OutOfRange {
                field: "sregs.ldt.dpl".into(),
                value: 4,
                max: 3
            }
        );
    }

    #[test]
    fn test_padding_and_reserved_fields_must_be_zero() {
        assert_eq!(
            err_of(|k| k.sregs.tr.padding = 1),
            NativeError::ReservedBits {
                field: "sregs.tr.padding".into(),
                value: 1
            }
        );
        assert_eq!(
            err_of(|k| k.sregs.idt.padding[2] = 7),
            NativeError::ReservedBits {
                field: "sregs.idt.padding[2]".into(),
                value: 7
            }
        );
        assert_eq!(
            err_of(|k| k.msrs[3].reserved = 9),
            NativeError::ReservedBits {
                field: "msrs[3].reserved".into(),
                value: 9
            }
        );
        assert_eq!(
            err_of(|k| k.sregs.cr8 = 16),
            NativeError::ReservedBits {
                field: "sregs.cr8".into(),
                value: 16
            }
        );
    }

    #[test]
    fn test_non_canonical_bases_are_rejected() {
        let bad = 0x1234_0000_0000_0000;
        assert_eq!(
            err_of(|k| k.sregs.gs.base = bad),
            NativeError::NonCanonical {
                field: "sregs.gs.base".into(),
                value: bad
            }
        );
        assert_eq!(
            err_of(|k| k.sregs.gdt.base = bad),
            NativeError::NonCanonical {
                field: "sregs.gdt.base".into(),
                value: bad
            }
        );
        assert_eq!(
            err_of(|k| k.regs.rip = bad),
            NativeError::NonCanonical {
                field: "regs.rip".into(),
                value: bad
            }
        );
    }

    #[test]
    fn test_msr_list_rules() {
        assert_eq!(
            err_of(|k| {
                k.msrs.remove(1);
            }),
            NativeError::MissingMsr { index: 0x10 }
        );
        assert_eq!(
            err_of(|k| k.msrs.swap(2, 3)),
            NativeError::MsrOrder {
                index: 0x174,
                previous: 0x175
            }
        );
        assert_eq!(
            err_of(|k| k.msrs.insert(
                3,
                KvmMsrEntry {
                    index: msr_index::APIC_BASE,
                    reserved: 0,
                    data: 0
                }
            )),
            NativeError::MsrHasOwnField {
                index: msr_index::APIC_BASE
            }
        );
        assert_eq!(
            err_of(|k| k.msrs = vec![KvmMsrEntry::default(); MAX_MSRS + 2]),
            NativeError::TooManyMsrs {
                count: MAX_MSRS + 2,
                limit: MAX_MSRS + 1
            }
        );
    }

    #[test]
    fn test_unrepresentable_events_are_rejected() {
        assert_eq!(
            err_of(|k| k.events.interrupt.soft = 1),
            NativeError::Unrepresentable {
                field: "events.interrupt.soft".into(),
                value: 1
            }
        );
        assert_eq!(
            err_of(|k| k.events.nmi.injected = 1),
            NativeError::Unrepresentable {
                field: "events.nmi.injected".into(),
                value: 1
            }
        );
        assert_eq!(
            err_of(|k| k.events.exception.has_error_code = 0),
            NativeError::Unrepresentable {
                field: "events.exception.error_code".into(),
                value: 0xffff_ffff
            }
        );
    }

    #[test]
    fn test_interrupt_bitmap_must_match_injected_interrupt() {
        assert_eq!(
            err_of(|k| k.sregs.interrupt_bitmap[0] = 1),
            NativeError::Inconsistent {
                field: "sregs.interrupt_bitmap[0]".into(),
                value: 1,
                other: "events.interrupt".into()
            }
        );
    }

    #[test]
    fn test_invalid_common_values_surface_as_invalid_common() {
        assert_eq!(
            err_of(|k| k.xsave.truncate(100)),
            NativeError::InvalidCommon(FormatError::XsaveSize {
                len: 100,
                min: 512,
                max: 64 * 1024
            })
        );
    }
}
