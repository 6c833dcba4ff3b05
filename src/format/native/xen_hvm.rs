//! The Xen-HVM-shaped native layout, after Xen's HVM save records: `struct hvm_hw_cpu` (field
//! order kept), plus the pieces Xen saves in other records, modelled as extra fields.
//!
//! Choices, and why:
//! - **GPR order** is Xen's: rax, rbx, rcx, rdx, rbp, rsi, rdi, rsp, r8..r15 (rbp before rsi,
//!   unlike the common format and KVM).
//! - **Segment attributes** are packed into `<seg>_arbytes`: bits 0-11 as Xen's
//!   `segment_register.attr` (type 0-3, s 4, dpl 5-6, p 7, avl 8, l 9, db 10, g 11) and the
//!   VMX "unusable" flag at bit 16, where the VMX access-rights field keeps it; every other bit
//!   is reserved ([`ARBYTES_MASK`]).
//! - **pending_event** is packed as Xen packs it (VMX interruption-information layout): vector
//!   bits 0-7, type bits 8-10, error-code-valid bit 11, bits 12-30 reserved, valid bit 31. It
//!   carries the common format's pending exception as a hardware exception (type 3); other
//!   event types are refused as unrepresentable. The error code is in `error_code`.
//! - **Named MSRs**: SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE (`shadow_gs`)
//!   and TSC_AUX have fields of their own. The common MSR list may or may not hold each of them,
//!   so `msr_flags` (obsolete and ignored in Xen) records which named fields hold a present MSR,
//!   bit `i` for [`XEN_NAMED_MSRS`]`[i]`; an absent one must read zero. Other MSRs go to `msrs`,
//!   Xen's separate `CPU_MSR` record, strictly ascending.
//! - **FPU**: `fpu_regs` is the 512-byte FXSAVE region; bytes beyond it go to `xsave_extended`
//!   (Xen's `CPU_XSAVE` record). `flags` bit 0 (`XEN_X86_FPU_INITIALISED`) is set exactly when
//!   the common xsave area is non-empty.
//! - **LAPIC**: CR8 is the high nibble of the TPR and the APIC base is the LAPIC record's
//!   `apic_base_msr`; an injected external interrupt is its single bit in the IRR. The full
//!   register page, when the VM has one, is Xen's `LAPIC_REGS` record, kept verbatim.
//! - **NMI** pending and blocked state, which Xen keeps outside any save record, are two flags.
//! - **Debug registers** have no place in the common format: dr0-dr3 must be 0, dr6 and dr7
//!   their reset values.

use super::{
    advanced_rip, advanced_tsc, canonical, check_msr_indices, fixed, flag, narrow, reserved_zero, NativeError,
};
use crate::format::{
    msr_index, DescriptorTable, Msr, PendingEvents, PendingException, Segment, SegmentAttributes, VcpuState, MAX_MSRS,
    XSAVE_LEGACY_BYTES,
};

/// Bits of `<seg>_arbytes` that carry attributes; the rest are reserved.
pub const ARBYTES_MASK: u32 = 0x1_0fff;
const AR_S: u32 = 1 << 4;
const AR_DPL_SHIFT: u32 = 5;
const AR_P: u32 = 1 << 7;
const AR_AVL: u32 = 1 << 8;
const AR_L: u32 = 1 << 9;
const AR_DB: u32 = 1 << 10;
const AR_G: u32 = 1 << 11;
const AR_UNUSABLE: u32 = 1 << 16;

/// `pending_event` bit 31: an event is pending.
pub const PENDING_EVENT_VALID: u32 = 1 << 31;
/// `pending_event` bit 11: `error_code` is pushed with the event.
pub const PENDING_EVENT_ERROR_VALID: u32 = 1 << 11;
/// Shift of the 3-bit event type in `pending_event`.
pub const PENDING_EVENT_TYPE_SHIFT: u32 = 8;
/// Event type of a hardware exception (Xen's `X86_EVENTTYPE_HW_EXCEPTION`).
pub const EVENT_TYPE_HW_EXCEPTION: u32 = 3;
/// Bits 12-30 of `pending_event`, reserved.
pub const PENDING_EVENT_RESERVED: u32 = 0x7fff_f000;

/// `flags` bit 0: the FPU state in `fpu_regs` is live.
pub const FPU_INITIALISED: u32 = 1;

/// Reset value of DR6, the only one the common format can reproduce.
pub const DR6_INIT: u64 = 0xffff_0ff0;
/// Reset value of DR7, the only one the common format can reproduce.
pub const DR7_INIT: u64 = 0x400;

/// MSRs with a named field, in ascending index order; `msr_flags` bit `i` marks entry `i` as
/// present.
pub const XEN_NAMED_MSRS: [u32; 9] = [
    msr_index::SYSENTER_CS,
    msr_index::SYSENTER_ESP,
    msr_index::SYSENTER_EIP,
    msr_index::STAR,
    msr_index::LSTAR,
    msr_index::CSTAR,
    msr_index::SYSCALL_MASK,
    msr_index::KERNEL_GS_BASE,
    msr_index::TSC_AUX,
];

/// Bits of `msr_flags` in use.
pub const MSR_FLAGS_MASK: u64 = (1 << XEN_NAMED_MSRS.len()) - 1;

/// MSRs that never appear in the `msrs` list: the named ones, and those held elsewhere (`tsc`,
/// `lapic.apic_base_msr`, `msr_efer`, `fs_base`, `gs_base`).
const XEN_OWN_FIELD_MSRS: [u32; 14] = [
    msr_index::SYSENTER_CS,
    msr_index::SYSENTER_ESP,
    msr_index::SYSENTER_EIP,
    msr_index::STAR,
    msr_index::LSTAR,
    msr_index::CSTAR,
    msr_index::SYSCALL_MASK,
    msr_index::KERNEL_GS_BASE,
    msr_index::TSC_AUX,
    msr_index::TSC,
    msr_index::APIC_BASE,
    msr_index::EFER,
    msr_index::FS_BASE,
    msr_index::GS_BASE,
];

/// The bits of Xen's LAPIC records the common format maps to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenLapic {
    /// IA32_APIC_BASE (`hvm_hw_lapic.apic_base_msr`).
    pub apic_base_msr: u64,
    /// Task-priority register: bits 7-4 are CR8; bits 3-0 (the priority sub-class, which CR8
    /// cannot express) must be 0; bits 31-8 are reserved.
    pub tpr: u32,
    /// Interrupt request register, 256 bits: at most one bit, the interrupt being injected.
    pub irr: [u32; 8],
}

/// A vCPU in the Xen-HVM-shaped layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XenHvmCpu {
    /// vCPU index: the save record's instance number.
    pub instance: u16,
    /// 512-byte FXSAVE region; all zero unless `flags` has [`FPU_INITIALISED`].
    pub fpu_regs: [u8; 512],
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RBP.
    pub rbp: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RSP.
    pub rsp: u64,
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
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// DR0; must be 0.
    pub dr0: u64,
    /// DR1; must be 0.
    pub dr1: u64,
    /// DR2; must be 0.
    pub dr2: u64,
    /// DR3; must be 0.
    pub dr3: u64,
    /// DR6; must be [`DR6_INIT`].
    pub dr6: u64,
    /// DR7; must be [`DR7_INIT`].
    pub dr7: u64,
    /// CS selector, at most 0xffff.
    pub cs_sel: u32,
    /// DS selector, at most 0xffff.
    pub ds_sel: u32,
    /// ES selector, at most 0xffff.
    pub es_sel: u32,
    /// FS selector, at most 0xffff.
    pub fs_sel: u32,
    /// GS selector, at most 0xffff.
    pub gs_sel: u32,
    /// SS selector, at most 0xffff.
    pub ss_sel: u32,
    /// TR selector, at most 0xffff.
    pub tr_sel: u32,
    /// LDTR selector, at most 0xffff.
    pub ldtr_sel: u32,
    /// CS limit in bytes.
    pub cs_limit: u32,
    /// DS limit in bytes.
    pub ds_limit: u32,
    /// ES limit in bytes.
    pub es_limit: u32,
    /// FS limit in bytes.
    pub fs_limit: u32,
    /// GS limit in bytes.
    pub gs_limit: u32,
    /// SS limit in bytes.
    pub ss_limit: u32,
    /// TR limit in bytes.
    pub tr_limit: u32,
    /// LDTR limit in bytes.
    pub ldtr_limit: u32,
    /// IDTR limit, at most 0xffff.
    pub idtr_limit: u32,
    /// GDTR limit, at most 0xffff.
    pub gdtr_limit: u32,
    /// CS base.
    pub cs_base: u64,
    /// DS base.
    pub ds_base: u64,
    /// ES base.
    pub es_base: u64,
    /// FS base; canonical.
    pub fs_base: u64,
    /// GS base; canonical.
    pub gs_base: u64,
    /// SS base.
    pub ss_base: u64,
    /// TR base; canonical.
    pub tr_base: u64,
    /// LDTR base; canonical.
    pub ldtr_base: u64,
    /// IDTR base; canonical.
    pub idtr_base: u64,
    /// GDTR base; canonical.
    pub gdtr_base: u64,
    /// CS attributes, packed (see the module docs).
    pub cs_arbytes: u32,
    /// DS attributes, packed.
    pub ds_arbytes: u32,
    /// ES attributes, packed.
    pub es_arbytes: u32,
    /// FS attributes, packed.
    pub fs_arbytes: u32,
    /// GS attributes, packed.
    pub gs_arbytes: u32,
    /// SS attributes, packed.
    pub ss_arbytes: u32,
    /// TR attributes, packed.
    pub tr_arbytes: u32,
    /// LDTR attributes, packed.
    pub ldtr_arbytes: u32,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_KERNEL_GS_BASE.
    pub shadow_gs: u64,
    /// Presence bits of the named MSR fields, bit `i` for [`XEN_NAMED_MSRS`]`[i]`.
    pub msr_flags: u64,
    /// IA32_LSTAR.
    pub msr_lstar: u64,
    /// IA32_STAR.
    pub msr_star: u64,
    /// IA32_CSTAR.
    pub msr_cstar: u64,
    /// IA32_FMASK.
    pub msr_syscall_mask: u64,
    /// IA32_EFER (always present).
    pub msr_efer: u64,
    /// IA32_TSC_AUX.
    pub msr_tsc_aux: u64,
    /// Guest TSC.
    pub tsc: u64,
    /// Pending exception, packed (see the module docs).
    pub pending_event: u32,
    /// Error code of the pending exception; 0 when it has none.
    pub error_code: u32,
    /// Bit 0: [`FPU_INITIALISED`]; other bits reserved.
    pub flags: u32,
    /// Must be zero.
    pub pad0: u32,
    /// An NMI is pending, 0 or 1.
    pub nmi_pending: u8,
    /// NMIs are blocked, 0 or 1.
    pub nmi_masked: u8,
    /// LAPIC record fields.
    pub lapic: XenLapic,
    /// The `CPU_MSR` record: MSRs without a named field, strictly ascending by index.
    pub msrs: Vec<(u32, u64)>,
    /// The `CPU_XSAVE` record past the legacy region: xsave bytes beyond the first 512.
    pub xsave_extended: Vec<u8>,
    /// The `LAPIC_REGS` record: the 1 KiB APIC register page, or empty without one.
    pub lapic_regs: Vec<u8>,
}

/// Packs attributes into `arbytes`.
pub fn pack_arbytes(a: &SegmentAttributes) -> u32 {
    let bit = |set: bool, mask: u32| if set { mask } else { 0 };
    u32::from(a.type_ & 0xf)
        | bit(a.s, AR_S)
        | (u32::from(a.dpl & 3) << AR_DPL_SHIFT)
        | bit(a.present, AR_P)
        | bit(a.avl, AR_AVL)
        | bit(a.l, AR_L)
        | bit(a.db, AR_DB)
        | bit(a.g, AR_G)
        | bit(a.unusable, AR_UNUSABLE)
}

/// Unpacks `arbytes`, refusing reserved bits; `field` names it in the error.
pub fn unpack_arbytes(field: &str, ar: u32) -> Result<SegmentAttributes, NativeError> {
    if ar & !ARBYTES_MASK != 0 {
        return Err(NativeError::ReservedBits {
            field: field.to_owned(),
            value: u64::from(ar),
        });
    }
    Ok(SegmentAttributes {
        type_: (ar & 0xf) as u8,
        s: ar & AR_S != 0,
        dpl: ((ar >> AR_DPL_SHIFT) & 3) as u8,
        present: ar & AR_P != 0,
        avl: ar & AR_AVL != 0,
        l: ar & AR_L != 0,
        db: ar & AR_DB != 0,
        g: ar & AR_G != 0,
        unusable: ar & AR_UNUSABLE != 0,
    })
}

const SEGMENT_NAMES: [&str; 8] = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"];

impl XenHvmCpu {
    /// Converts a common-format state, after validating it.
    pub fn from_common(s: &VcpuState) -> Result<XenHvmCpu, NativeError> {
        s.validate()?;
        let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15] = s.gprs;
        let mut fpu_regs = [0u8; XSAVE_LEGACY_BYTES];
        let (flags, xsave_extended) = if s.xsave.is_empty() {
            (0, Vec::new())
        } else {
            // Validation guarantees at least the legacy region.
            fpu_regs.copy_from_slice(&s.xsave[..XSAVE_LEGACY_BYTES]);
            (FPU_INITIALISED, s.xsave[XSAVE_LEGACY_BYTES..].to_vec())
        };
        let (pending_event, error_code) = match s.events.exception {
            None => (0, 0),
            Some(e) => (
                PENDING_EVENT_VALID
                    | (EVENT_TYPE_HW_EXCEPTION << PENDING_EVENT_TYPE_SHIFT)
                    | u32::from(e.vector)
                    | if e.error_code.is_some() {
                        PENDING_EVENT_ERROR_VALID
                    } else {
                        0
                    },
                e.error_code.unwrap_or(0),
            ),
        };
        let mut irr = [0u32; 8];
        if let Some(v) = s.events.interrupt {
            irr[usize::from(v / 32)] = 1 << (v % 32);
        }
        let seg = |g: &Segment| (u32::from(g.selector), g.limit, g.base, pack_arbytes(&g.attributes));
        let (cs_sel, cs_limit, cs_base, cs_arbytes) = seg(&s.cs);
        let (ds_sel, ds_limit, ds_base, ds_arbytes) = seg(&s.ds);
        let (es_sel, es_limit, es_base, es_arbytes) = seg(&s.es);
        let (fs_sel, fs_limit, fs_base, fs_arbytes) = seg(&s.fs);
        let (gs_sel, gs_limit, gs_base, gs_arbytes) = seg(&s.gs);
        let (ss_sel, ss_limit, ss_base, ss_arbytes) = seg(&s.ss);
        let (tr_sel, tr_limit, tr_base, tr_arbytes) = seg(&s.tr);
        let (ldtr_sel, ldtr_limit, ldtr_base, ldtr_arbytes) = seg(&s.ldtr);
        let mut cpu = XenHvmCpu {
            // Validation keeps ids below MAX_VCPUS, far inside u16.
            instance: s.id as u16,
            fpu_regs,
            rax,
            rbx,
            rcx,
            rdx,
            rbp,
            rsi,
            rdi,
            rsp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip: s.rip,
            rflags: s.rflags,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            dr0: 0,
            dr1: 0,
            dr2: 0,
            dr3: 0,
            dr6: DR6_INIT,
            dr7: DR7_INIT,
            cs_sel,
            ds_sel,
            es_sel,
            fs_sel,
            gs_sel,
            ss_sel,
            tr_sel,
            ldtr_sel,
            cs_limit,
            ds_limit,
            es_limit,
            fs_limit,
            gs_limit,
            ss_limit,
            tr_limit,
            ldtr_limit,
            idtr_limit: u32::from(s.idtr.limit),
            gdtr_limit: u32::from(s.gdtr.limit),
            cs_base,
            ds_base,
            es_base,
            fs_base,
            gs_base,
            ss_base,
            tr_base,
            ldtr_base,
            idtr_base: s.idtr.base,
            gdtr_base: s.gdtr.base,
            cs_arbytes,
            ds_arbytes,
            es_arbytes,
            fs_arbytes,
            gs_arbytes,
            ss_arbytes,
            tr_arbytes,
            ldtr_arbytes,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            shadow_gs: 0,
            msr_flags: 0,
            msr_lstar: 0,
            msr_star: 0,
            msr_cstar: 0,
            msr_syscall_mask: 0,
            msr_efer: s.efer,
            msr_tsc_aux: 0,
            tsc: s.tsc,
            pending_event,
            error_code,
            flags,
            pad0: 0,
            nmi_pending: u8::from(s.events.nmi_pending),
            nmi_masked: u8::from(s.events.nmi_masked),
            lapic: XenLapic {
                apic_base_msr: s.apic_base,
                // Validation keeps CR8 within 4 bits.
                tpr: (s.cr8 as u32) << 4,
                irr,
            },
            msrs: Vec::new(),
            xsave_extended,
            lapic_regs: s.lapic.clone(),
        };
        for m in &s.msrs {
            match XEN_NAMED_MSRS.iter().position(|&i| i == m.index) {
                Some(slot) => {
                    *cpu.named_msr_mut(slot) = m.value;
                    cpu.msr_flags |= 1 << slot;
                }
                // The common list is ascending, so this one stays ascending too.
                None => cpu.msrs.push((m.index, m.value)),
            }
        }
        Ok(cpu)
    }

    /// Converts to the common format, refusing invalid or unrepresentable native values.
    pub fn to_common(&self) -> Result<VcpuState, NativeError> {
        canonical(|| "rip".into(), self.rip)?;
        for (field, value) in [
            ("dr0", self.dr0),
            ("dr1", self.dr1),
            ("dr2", self.dr2),
            ("dr3", self.dr3),
        ] {
            fixed(|| field.into(), value, 0)?;
        }
        fixed(|| "dr6".into(), self.dr6, DR6_INIT)?;
        fixed(|| "dr7".into(), self.dr7, DR7_INIT)?;
        reserved_zero(|| "pad0".into(), u64::from(self.pad0))?;

        let mut segments = [Segment::default(); 8];
        for (i, (name, sel, limit, base, ar)) in self.segment_fields().into_iter().enumerate() {
            if matches!(name, "fs" | "gs" | "tr" | "ldtr") {
                canonical(|| format!("{name}_base"), base)?;
            }
            segments[i] = Segment {
                selector: narrow(|| format!("{name}_sel"), u64::from(sel))?,
                base,
                limit,
                attributes: unpack_arbytes(&format!("{name}_arbytes"), ar)?,
            };
        }
        let [cs, ds, es, fs, gs, ss, tr, ldtr] = segments;
        let gdtr = DescriptorTable {
            base: canonical(|| "gdtr_base".into(), self.gdtr_base)?,
            limit: narrow(|| "gdtr_limit".into(), u64::from(self.gdtr_limit))?,
        };
        let idtr = DescriptorTable {
            base: canonical(|| "idtr_base".into(), self.idtr_base)?,
            limit: narrow(|| "idtr_limit".into(), u64::from(self.idtr_limit))?,
        };

        let s = VcpuState {
            id: u32::from(self.instance),
            gprs: [
                self.rax, self.rbx, self.rcx, self.rdx, self.rsi, self.rdi, self.rsp, self.rbp, self.r8, self.r9,
                self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
            ],
            rip: self.rip,
            rflags: self.rflags,
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldtr,
            gdtr,
            idtr,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8()?,
            efer: self.msr_efer,
            apic_base: self.lapic.apic_base_msr,
            msrs: self.msrs_to_common()?,
            xsave: self.xsave_to_common()?,
            tsc: self.tsc,
            events: self.events_to_common()?,
            lapic: self.lapic_regs.clone(),
        };
        s.validate()?;
        Ok(s)
    }

    /// See [`super::NativeVcpu::advance`].
    pub fn advance(&mut self, instructions: u64) {
        self.rip = advanced_rip(self.rip, instructions);
        self.rax = self.rax.wrapping_add(instructions);
        self.rcx = self.rcx.wrapping_sub(instructions);
        self.tsc = advanced_tsc(self.tsc, instructions);
    }

    /// Selector, limit, base and arbytes of each segment, in common-format order.
    fn segment_fields(&self) -> [(&'static str, u32, u32, u64, u32); 8] {
        let v = [
            (self.cs_sel, self.cs_limit, self.cs_base, self.cs_arbytes),
            (self.ds_sel, self.ds_limit, self.ds_base, self.ds_arbytes),
            (self.es_sel, self.es_limit, self.es_base, self.es_arbytes),
            (self.fs_sel, self.fs_limit, self.fs_base, self.fs_arbytes),
            (self.gs_sel, self.gs_limit, self.gs_base, self.gs_arbytes),
            (self.ss_sel, self.ss_limit, self.ss_base, self.ss_arbytes),
            (self.tr_sel, self.tr_limit, self.tr_base, self.tr_arbytes),
            (self.ldtr_sel, self.ldtr_limit, self.ldtr_base, self.ldtr_arbytes),
        ];
        core::array::from_fn(|i| {
            let (sel, limit, base, ar) = v[i];
            (SEGMENT_NAMES[i], sel, limit, base, ar)
        })
    }

    /// Name and value of the named MSR field in `slot` of [`XEN_NAMED_MSRS`].
    fn named_msr(&self, slot: usize) -> (&'static str, u64) {
        match slot {
            0 => ("sysenter_cs", self.sysenter_cs),
            1 => ("sysenter_esp", self.sysenter_esp),
            2 => ("sysenter_eip", self.sysenter_eip),
            3 => ("msr_star", self.msr_star),
            4 => ("msr_lstar", self.msr_lstar),
            5 => ("msr_cstar", self.msr_cstar),
            6 => ("msr_syscall_mask", self.msr_syscall_mask),
            7 => ("shadow_gs", self.shadow_gs),
            _ => ("msr_tsc_aux", self.msr_tsc_aux),
        }
    }

    fn named_msr_mut(&mut self, slot: usize) -> &mut u64 {
        match slot {
            0 => &mut self.sysenter_cs,
            1 => &mut self.sysenter_esp,
            2 => &mut self.sysenter_eip,
            3 => &mut self.msr_star,
            4 => &mut self.msr_lstar,
            5 => &mut self.msr_cstar,
            6 => &mut self.msr_syscall_mask,
            7 => &mut self.shadow_gs,
            _ => &mut self.msr_tsc_aux,
        }
    }

    fn cr8(&self) -> Result<u64, NativeError> {
        let tpr = self.lapic.tpr;
        reserved_zero(|| "lapic.tpr".into(), u64::from(tpr & !0xff))?;
        // The sub-class nibble has no CR8 equivalent.
        fixed(|| "lapic.tpr".into(), u64::from(tpr & 0xf), 0)?;
        Ok(u64::from(tpr >> 4))
    }

    /// Merges the present named MSRs and the `CPU_MSR` list into one ascending list.
    fn msrs_to_common(&self) -> Result<Vec<Msr>, NativeError> {
        reserved_zero(|| "msr_flags".into(), self.msr_flags & !MSR_FLAGS_MASK)?;
        if self.msrs.len() > MAX_MSRS {
            return Err(NativeError::TooManyMsrs {
                count: self.msrs.len(),
                limit: MAX_MSRS,
            });
        }
        check_msr_indices(self.msrs.iter().map(|m| m.0), &XEN_OWN_FIELD_MSRS)?;
        let mut named = Vec::with_capacity(XEN_NAMED_MSRS.len());
        for (slot, &index) in XEN_NAMED_MSRS.iter().enumerate() {
            let (field, value) = self.named_msr(slot);
            if self.msr_flags & (1 << slot) != 0 {
                named.push(Msr { index, value });
            } else {
                // An absent MSR must not hold a value the round trip would drop.
                fixed(|| field.into(), value, 0)?;
            }
        }
        let mut out = Vec::with_capacity(named.len() + self.msrs.len());
        let mut named = named.into_iter().peekable();
        for &(index, value) in &self.msrs {
            while let Some(n) = named.next_if(|n| n.index < index) {
                out.push(n);
            }
            out.push(Msr { index, value });
        }
        out.extend(named);
        Ok(out)
    }

    fn xsave_to_common(&self) -> Result<Vec<u8>, NativeError> {
        reserved_zero(|| "flags".into(), u64::from(self.flags & !FPU_INITIALISED))?;
        if self.flags & FPU_INITIALISED == 0 {
            if let Some(at) = self.fpu_regs.iter().position(|&b| b != 0) {
                return Err(NativeError::Unrepresentable {
                    field: format!("fpu_regs[{at}]"),
                    value: u64::from(self.fpu_regs[at]),
                });
            }
            fixed(|| "xsave_extended.len()".into(), self.xsave_extended.len() as u64, 0)?;
            return Ok(Vec::new());
        }
        let mut xsave = Vec::with_capacity(XSAVE_LEGACY_BYTES + self.xsave_extended.len());
        xsave.extend_from_slice(&self.fpu_regs);
        xsave.extend_from_slice(&self.xsave_extended);
        Ok(xsave)
    }

    fn events_to_common(&self) -> Result<PendingEvents, NativeError> {
        let ev = self.pending_event;
        reserved_zero(|| "pending_event".into(), u64::from(ev & PENDING_EVENT_RESERVED))?;
        let exception = if ev & PENDING_EVENT_VALID == 0 {
            fixed(|| "pending_event".into(), u64::from(ev), 0)?;
            fixed(|| "error_code".into(), u64::from(self.error_code), 0)?;
            None
        } else {
            let kind = (ev >> PENDING_EVENT_TYPE_SHIFT) & 7;
            fixed(
                || "pending_event.type".into(),
                u64::from(kind),
                u64::from(EVENT_TYPE_HW_EXCEPTION),
            )?;
            let error_code = if ev & PENDING_EVENT_ERROR_VALID != 0 {
                Some(self.error_code)
            } else {
                fixed(|| "error_code".into(), u64::from(self.error_code), 0)?;
                None
            };
            Some(PendingException {
                vector: (ev & 0xff) as u8,
                error_code,
            })
        };
        let bits: u32 = self.lapic.irr.iter().map(|w| w.count_ones()).sum();
        let interrupt = match bits {
            0 => None,
            1 => {
                // Exactly one bit is set: find its word and position.
                let word = self.lapic.irr.iter().position(|&w| w != 0).unwrap_or(0);
                Some((word * 32) as u8 + self.lapic.irr[word].trailing_zeros() as u8)
            }
            _ => {
                return Err(NativeError::Unrepresentable {
                    field: "lapic.irr (bits set)".into(),
                    value: u64::from(bits),
                })
            }
        };
        Ok(PendingEvents {
            exception,
            interrupt,
            nmi_pending: flag(|| "nmi_pending".into(), self.nmi_pending)?,
            nmi_masked: flag(|| "nmi_masked".into(), self.nmi_masked)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::busy_state;
    use super::*;

    fn xen() -> XenHvmCpu {
        XenHvmCpu::from_common(&busy_state()).unwrap()
    }

    fn err_of(mutate: impl FnOnce(&mut XenHvmCpu)) -> NativeError {
        let mut x = xen();
        mutate(&mut x);
        x.to_common().unwrap_err()
    }

    #[test]
    fn test_arbytes_layout() {
        let a = SegmentAttributes {
            type_: 0xb,
            s: true,
            dpl: 3,
            present: true,
            avl: false,
            l: true,
            db: false,
            g: true,
            unusable: false,
        };
        // 0xb | s 0x10 | dpl 0x60 | p 0x80 | l 0x200 | g 0x800
        assert_eq!(pack_arbytes(&a), 0xafb);
        assert_eq!(unpack_arbytes("cs_arbytes", 0xafb), Ok(a));
        let unusable = SegmentAttributes {
            unusable: true,
            ..SegmentAttributes::default()
        };
        assert_eq!(pack_arbytes(&unusable), 0x1_0000);
        assert_eq!(
            pack_arbytes(&SegmentAttributes {
                avl: true,
                db: true,
                ..SegmentAttributes::default()
            }),
            0x500
        );
    }

    #[test]
    fn test_arbytes_reserved_bits_are_rejected() {
        for bad in [0x1000, 0x8000, 0x2_0000, 0x8000_0000] {
            assert_eq!(
                unpack_arbytes("ss_arbytes", bad | 0x93),
                Err(NativeError::ReservedBits {
                    field: "ss_arbytes".into(),
                    value: u64::from(bad | 0x93)
                })
            );
        }
        assert_eq!(
            err_of(|x| x.tr_arbytes |= 0x1000),
            NativeError::ReservedBits {
                field: "tr_arbytes".into(),
                value: 0x108b
            }
        );
    }

    #[test]
    fn test_busy_state_maps_field_by_field() {
        let s = busy_state();
        let x = xen();
        assert_eq!(x.rbp, s.gprs[7]);
        assert_eq!(x.rsi, s.gprs[4]);
        assert_eq!(x.rsp, s.gprs[6]);
        assert_eq!(x.instance, 3);
        // SYSENTER_CS, SYSENTER_ESP, STAR and KERNEL_GS_BASE are named; the rest are listed.
        assert_eq!(x.msr_flags, 0b1000_1011);
        assert_eq!(x.sysenter_cs, 0x10);
        assert_eq!(x.shadow_gs, 0xffff_8880_1234_0000);
        assert_eq!(x.msr_lstar, 0);
        assert_eq!(
            x.msrs,
            vec![(0, 1), (0x277, 0x0007_0406_0007_0406), (u32::MAX, u64::MAX)]
        );
        assert_eq!(x.flags, FPU_INITIALISED);
        assert_eq!(x.xsave_extended.len(), 1088 - 512);
        // Valid | hardware exception | error code valid | #GP
        assert_eq!(x.pending_event, 0x8000_0b0d);
        assert_eq!(x.error_code, 0xffff_ffff);
        assert_eq!(x.lapic.tpr, 0xf0);
        assert_eq!(x.lapic.irr[7], 1 << 15);
        assert_eq!(x.ds_arbytes, 0xdff);
        assert_eq!(x.gs_arbytes & AR_UNUSABLE, AR_UNUSABLE);
        assert_eq!(x.to_common().unwrap(), s);
    }

    #[test]
    fn test_empty_xsave_leaves_fpu_uninitialised() {
        let s = VcpuState {
            xsave: Vec::new(),
            ..busy_state()
        };
        let x = XenHvmCpu::from_common(&s).unwrap();
        assert_eq!(x.flags, 0);
        assert!(x.fpu_regs.iter().all(|&b| b == 0));
        assert_eq!(x.to_common().unwrap(), s);
        let mut stale = x.clone();
        stale.fpu_regs[5] = 1;
        assert_eq!(
            stale.to_common(),
            Err(NativeError::Unrepresentable {
                field: "fpu_regs[5]".into(),
                value: 1
            })
        );
    }

    #[test]
    fn test_pending_event_rules() {
        assert_eq!(
            err_of(|x| x.pending_event |= 1 << 12),
            NativeError::ReservedBits {
                field: "pending_event".into(),
                value: 1 << 12
            }
        );
        // An external interrupt (type 0) is not where the common format keeps interrupts.
        assert_eq!(
            err_of(|x| x.pending_event = PENDING_EVENT_VALID | 0x20),
            NativeError::Unrepresentable {
                field: "pending_event.type".into(),
                value: 0
            }
        );
        assert_eq!(
            err_of(|x| x.pending_event &= !PENDING_EVENT_ERROR_VALID),
            NativeError::Unrepresentable {
                field: "error_code".into(),
                value: 0xffff_ffff
            }
        );
        assert_eq!(
            err_of(|x| x.pending_event = 0x30b),
            NativeError::Unrepresentable {
                field: "pending_event".into(),
                value: 0x30b
            }
        );
    }

    #[test]
    fn test_non_canonical_bases_are_rejected() {
        let bad = 0x0001_0000_0000_0000;
        assert_eq!(
            err_of(|x| x.ldtr_base = bad),
            NativeError::NonCanonical {
                field: "ldtr_base".into(),
                value: bad
            }
        );
        assert_eq!(
            err_of(|x| x.idtr_base = bad),
            NativeError::NonCanonical {
                field: "idtr_base".into(),
                value: bad
            }
        );
    }

    #[test]
    fn test_unrepresentable_values_are_rejected() {
        type Mutation = Box<dyn Fn(&mut XenHvmCpu)>;
        let cases: Vec<(&str, u64, Mutation)> = vec![
            ("dr0", 0x1000, Box::new(|x| x.dr0 = 0x1000)),
            ("dr7", 0x401, Box::new(|x| x.dr7 = 0x401)),
            ("cs_sel", 0x1_0000, Box::new(|x| x.cs_sel = 0x1_0000)),
            ("gdtr_limit", 0x1_0000, Box::new(|x| x.gdtr_limit = 0x1_0000)),
            ("lapic.tpr", 0x1, Box::new(|x| x.lapic.tpr = 0xf1)),
            ("msr_lstar", 0x42, Box::new(|x| x.msr_lstar = 0x42)),
            (
                "lapic.irr (bits set)",
                2,
                Box::new(|x| x.lapic.irr = [0b11, 0, 0, 0, 0, 0, 0, 0]),
            ),
        ];
        for (field, value, mutate) in cases {
            assert_eq!(
                err_of(mutate),
                NativeError::Unrepresentable {
                    field: field.into(),
                    value
                }
            );
        }
    }

    #[test]
    fn test_reserved_words_must_be_zero() {
        assert_eq!(
            err_of(|x| x.pad0 = 1),
            NativeError::ReservedBits {
                field: "pad0".into(),
                value: 1
            }
        );
        assert_eq!(
            err_of(|x| x.flags |= 2),
            NativeError::ReservedBits {
                field: "flags".into(),
                value: 2
            }
        );
        assert_eq!(
            err_of(|x| x.msr_flags |= 1 << 9),
            NativeError::ReservedBits {
                field: "msr_flags".into(),
                value: 1 << 9
            }
        );
        assert_eq!(
            err_of(|x| x.lapic.tpr = 0x1f0),
            NativeError::ReservedBits {
                field: "lapic.tpr".into(),
                value: 0x100
            }
        );
    }

    #[test]
    fn test_msr_list_rules() {
        assert_eq!(
            err_of(|x| x.msrs.insert(1, (msr_index::LSTAR, 5))),
            NativeError::MsrHasOwnField {
                index: msr_index::LSTAR
            }
        );
        assert_eq!(
            err_of(|x| x.msrs.insert(0, (msr_index::TSC, 5))),
            NativeError::MsrHasOwnField { index: msr_index::TSC }
        );
        assert_eq!(
            err_of(|x| x.msrs.swap(0, 1)),
            NativeError::MsrOrder {
                index: 0,
                previous: 0x277
            }
        );
        assert_eq!(
            err_of(|x| x.msrs = vec![(0, 0); MAX_MSRS + 1]),
            NativeError::TooManyMsrs {
                count: MAX_MSRS + 1,
                limit: MAX_MSRS
            }
        );
    }

    #[test]
    fn test_non_boolean_nmi_flag_is_rejected() {
        assert_eq!(
            err_of(|x| x.nmi_pending = 3),
            NativeError::InvalidFlag {
                field: "nmi_pending".into(),
                value: 3
            }
        );
    }
}
