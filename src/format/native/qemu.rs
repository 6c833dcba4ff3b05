//! QEMU's x86 vCPU state, in the shape its migration stream carries it: the `cpu_common`, `cpu`
//! and `apic` sections of `target/i386/machine.c` and `hw/intc/apic_common.c` (section versions
//! 1, 12 and 3 in QEMU 2.x to 9.x), with the MSRs its `cpu/*` subsections carry gathered into one
//! list. The stream codec ([`crate::qemu::stream`]) reads and writes these fields by name; this
//! module converts them to and from the common [`VcpuState`].
//!
//! Unlike [`super::kvm`] and [`super::xen_hvm`], no backend keeps its vCPUs in this layout: QEMU
//! is the hypervisor that does, and this is the form in which a vCPU crosses to or from it.
//!
//! # Conversions, after QEMU's own (`target/i386/kvm/kvm.c`, `hw/i386/kvm/apic.c`)
//! - **GPRs**: `regs` is in encoding order (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15).
//! - **Segments**: `flags` holds the attribute bits where the descriptor's high dword has them
//!   ([`SEGMENT_ATTRIBUTE_BITS`]). TCG also leaves copies of base bits 31..16 and limit bits
//!   19..16 in the other bits of `flags`; they are not state (the cache's `base` and `limit`
//!   are), so [`QemuCpu::to_common`] ignores them and [`QemuCpu::from_common`] writes them zero.
//!   As in `set_seg`/`get_seg`, *unusable* is *not present*: a common segment is representable
//!   only when `unusable == !present` (KVM reports every segment so). Unlike `get_seg`, which
//!   writes flags 0 for an unusable segment, the other attribute bits are kept with P clear, so an
//!   unusable LDTR keeps its type; flags 0 is the all-zero unusable segment. In real mode (CR0.PE
//!   clear) CS.DPL must be 0, because QEMU's `cpu_post_load` clears every DPL otherwise.
//! - **GDTR/IDTR** use only `base` and `limit` (at most 0xffff); `selector` and `flags` are 0.
//! - **Debug registers** have no place in the common format: DR0-DR3 must be 0, DR6 and DR7 their
//!   reset values; `dr[4]` and `dr[5]` (aliases, 0 under TCG, copies of DR6/DR7 under KVM) are
//!   not state and are written 0. `a20_mask` must be -1 (A20 open), `xcr0` 1 (x87 only, QEMU's reset value: the
//!   common format has no XCR0 and KVM keeps it outside the state it carries).
//! - **MSRs**: the named fields (SYSENTER_CS/ESP/EIP, PAT, STAR, LSTAR, CSTAR, FMASK,
//!   KERNEL_GS_BASE, TSC_AUX: [`QEMU_NAMED_MSRS`]) always appear in the common list; a common state
//!   without one of them gets QEMU's reset value (0, PAT [`PAT_RESET`]), so only states listing all
//!   ten convert back unchanged. `smbase` is IA32_SMBASE (0x9e), listed only when it differs from
//!   [`SMBASE_RESET`] (an entry equal to the reset value is refused: it could not come back). The
//!   MSRs in `msrs` are those of [`qemu_list_msr`]; any other MSR is unrepresentable.
//!   `sysenter_cs` is 32 bits wide.
//! - **APIC**: `apic.apicbase` is IA32_APIC_BASE (a u32: bases above 4 GiB and x2APIC mode are
//!   refused), CR8 is TPR bits 7..4, and the register page converts as `kvm_get_apic_state` and
//!   `kvm_put_apic_state` do (see [`lapic`]). A vCPU without an `apic` section has an empty page,
//!   an APIC base of 0 and CR8 0; a common state with an empty page but a non-zero APIC base or
//!   CR8 is refused.
//! - **FPU/SSE/AVX** become a [`QEMU_XSAVE_BYTES`]-byte XSAVE image as `kvm_put_xsave` builds it
//!   (see [`xsave`]).
//! - **Events**: `exception_nr` (-1 for none) with `has_error_code`/`error_code`,
//!   `interrupt_injected` (-1 for none), `nmi_pending` and the NMI mask in `hflags2`. A soft
//!   interrupt, an NMI being injected, a halted vCPU, a pending `interrupt_request` or an
//!   `mp_state` other than runnable cannot be carried and are refused. Without an exception,
//!   `has_error_code` and `error_code` are stale leftovers (TCG never clears them) and are
//!   ignored, as is `error_code` when `has_error_code` is 0.
//! - **hflags/hflags2** are caches QEMU keeps of the registers; [`QemuCpu::compute_hflags`] gives
//!   what QEMU 7.2 holds for them. [`QemuCpu::to_common`] ignores the cached bits and refuses the
//!   ones that are state the common format lacks (interrupt shadow, SMM, SVM guest mode, MPX
//!   bounds in use); [`QemuCpu::from_common`] writes `compute_hflags()` and `hflags2` = GIF | VGIF
//!   (what QEMU holds outside an SVM guest) plus the NMI mask.
//! - **Not state**, ignored by `to_common` and written by `from_common` as: `apic.count_shift`
//!   (derived from `divide_conf`, as `kvm_get_apic_state` derives it; a freshly reset QEMU holds 0
//!   there), and the timer's `initial_count_load_time` and `next_time` (QEMU virtual-clock
//!   nanoseconds, meaningless on another host: 0).
//!
//! With those normalisations, `from_common(&q.to_common(id)?)? == q` for every `q` that
//! `to_common` accepts, and `from_common(s)?.to_common(s.id)? == s` for every valid `s` in the
//! representable set described above; `from_common` refuses the others with
//! [`NativeError::Unrepresentable`] naming the common field.

mod hflags;
pub mod lapic;
pub mod xsave;

pub use hflags::*;

use serde::{Deserialize, Serialize};

/// One segment cache entry (`SegmentCache`): QEMU keeps the descriptor's attribute bits where
/// the descriptor's high dword has them (type 8..11, S 12, DPL 13..14, P 15, AVL 20, L 21,
/// D/B 22, G 23) and the limit in bytes. The stream carries `selector` as a u32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuSegment {
    /// Visible selector (u32 in the stream, u16 architecturally).
    pub selector: u32,
    /// Linear base.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Attribute bits in descriptor-high-dword positions.
    pub flags: u32,
}

/// One x87 register as the stream's `fpreg_tmp` carries it: 64-bit mantissa, 16-bit sign and
/// exponent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuFpReg {
    /// Significand.
    pub mantissa: u64,
    /// Sign (bit 15) and biased exponent.
    pub exponent: u16,
}

/// The `apic` section (`APICCommonState`), version 3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuApic {
    /// IA32_APIC_BASE, low 32 bits (the stream carries a u32).
    pub apicbase: u32,
    /// APIC ID.
    pub id: u8,
    /// Arbitration ID.
    pub arb_id: u8,
    /// Task priority register.
    pub tpr: u8,
    /// Spurious-interrupt vector register.
    pub spurious_vec: u32,
    /// Logical destination.
    pub log_dest: u8,
    /// Destination format (the DFR's model, high nibble).
    pub dest_mode: u8,
    /// In-service register, 256 bits.
    pub isr: [u32; 8],
    /// Trigger-mode register, 256 bits.
    pub tmr: [u32; 8],
    /// Interrupt-request register, 256 bits.
    pub irr: [u32; 8],
    /// Local vector table: timer, thermal, performance counter, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    /// Error status register.
    pub esr: u32,
    /// Interrupt command register, low then high dword.
    pub icr: [u32; 2],
    /// Timer divide configuration.
    pub divide_conf: u32,
    /// Timer shift QEMU derives from `divide_conf`.
    pub count_shift: i32,
    /// Timer initial count.
    pub initial_count: u32,
    /// QEMU virtual-clock time of the last initial-count load, ns.
    pub initial_count_load_time: i64,
    /// QEMU virtual-clock time of the next timer expiry, ns.
    pub next_time: i64,
}

/// The `cpu_common` and `cpu` sections of one vCPU, with its `apic` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuCpu {
    /// `cpu_common.halted`.
    pub halted: u32,
    /// `cpu_common.interrupt_request`.
    pub interrupt_request: u32,
    /// `env.regs`, in QEMU's (the encoding's) order: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI,
    /// R8..R15.
    pub regs: [u64; 16],
    /// `env.eip`.
    pub eip: u64,
    /// `env.eflags`.
    pub eflags: u64,
    /// `env.hflags`: QEMU's cached mode bits (CPL, CS32, SS32, ADDSEG, PE, MP/EM/TS, LMA, CS64,
    /// OSFXSR, ...). TCG runs on them, so they must agree with the registers.
    pub hflags: u32,
    /// `env.hflags2`: GIF, HIF, NMI mask, ...
    pub hflags2: u32,
    /// `env.fpuc`: x87 control word.
    pub fpuc: u16,
    /// `env.fpus_vmstate`: x87 status word with the top-of-stack in bits 11..13.
    pub fpus: u16,
    /// `env.fptag_vmstate`: abridged tag byte, bit set = register valid.
    pub fptag: u16,
    /// `env.fpregs`: ST0..ST7 in physical register order.
    pub fpregs: [QemuFpReg; 8],
    /// `cpu/fpop_ip_dp` subsection: last x87 opcode.
    pub fpop: u16,
    /// `cpu/fpop_ip_dp` subsection: last x87 instruction pointer.
    pub fpip: u64,
    /// `cpu/fpop_ip_dp` subsection: last x87 data pointer.
    pub fpdp: u64,
    /// `env.segs`: ES, CS, SS, DS, FS, GS.
    pub segs: [QemuSegment; 6],
    /// `env.ldt`.
    pub ldt: QemuSegment,
    /// `env.tr`.
    pub tr: QemuSegment,
    /// `env.gdt` (only base and limit are meaningful).
    pub gdt: QemuSegment,
    /// `env.idt` (only base and limit are meaningful).
    pub idt: QemuSegment,
    /// `env.sysenter_cs` (u32 in the stream).
    pub sysenter_cs: u32,
    /// `env.sysenter_esp`.
    pub sysenter_esp: u64,
    /// `env.sysenter_eip`.
    pub sysenter_eip: u64,
    /// `env.cr[0]`.
    pub cr0: u64,
    /// `env.cr[2]`.
    pub cr2: u64,
    /// `env.cr[3]`.
    pub cr3: u64,
    /// `env.cr[4]`.
    pub cr4: u64,
    /// `env.dr`: DR0..DR7.
    pub dr: [u64; 8],
    /// `env.a20_mask`: -1 with the A20 gate open.
    pub a20_mask: i32,
    /// `env.mxcsr`.
    pub mxcsr: u32,
    /// `env.xmm_regs[i]` low 128 bits, as two u64 each.
    pub xmm: [[u64; 2]; 16],
    /// `env.xmm_regs[i]` bits 128..255 (the YMM high halves), as two u64 each.
    pub ymmh: [[u64; 2]; 16],
    /// `env.efer`.
    pub efer: u64,
    /// `env.star`.
    pub star: u64,
    /// `env.lstar`.
    pub lstar: u64,
    /// `env.cstar`.
    pub cstar: u64,
    /// `env.fmask`.
    pub fmask: u64,
    /// `env.kernelgsbase`.
    pub kernelgsbase: u64,
    /// `env.smbase`.
    pub smbase: u32,
    /// `env.pat`.
    pub pat: u64,
    /// `env.tsc`.
    pub tsc: u64,
    /// `env.tsc_aux`.
    pub tsc_aux: u64,
    /// `env.xcr0`.
    pub xcr0: u64,
    /// `env.xstate_bv`.
    pub xstate_bv: u64,
    /// `env.interrupt_injected`: the vector being injected, or -1.
    pub interrupt_injected: i32,
    /// `env.mp_state`.
    pub mp_state: u32,
    /// `env.exception_nr`: the exception being delivered, or -1.
    pub exception_nr: i32,
    /// `env.has_error_code`.
    pub has_error_code: u8,
    /// `env.error_code`.
    pub error_code: u32,
    /// `env.soft_interrupt`.
    pub soft_interrupt: u8,
    /// `env.nmi_injected`.
    pub nmi_injected: u8,
    /// `env.nmi_pending`.
    pub nmi_pending: u8,
    /// MSRs carried by `cpu/*` subsections (TSC_ADJUST, MISC_ENABLE, KVM's paravirtual MSRs,
    /// ...), strictly ascending by index.
    pub msrs: Vec<(u32, u64)>,
    /// The `apic` section; `None` for a vCPU without one.
    pub apic: Option<QemuApic>,
}

use super::{canonical, check_msr_indices, fixed, flag, narrow, NativeError};
use crate::format::{
    msr_index, DescriptorTable, Msr, PendingEvents, PendingException, Segment, SegmentAttributes, VcpuState,
    LAPIC_REGISTER_BYTES, MAX_MSRS,
};
pub use lapic::count_shift;
pub use xsave::QEMU_XSAVE_BYTES;

/// Bits of a segment's `flags` that hold attributes: type 8..11, S 12, DPL 13..14, P 15,
/// AVL 20, L 21, D/B 22, G 23. The others hold copies of base and limit bits (not state).
pub const SEGMENT_ATTRIBUTE_BITS: u32 = 0x00f0_ff00;
const DESC_TYPE_SHIFT: u32 = 8;
const DESC_S: u32 = 1 << 12;
const DESC_DPL_SHIFT: u32 = 13;
const DESC_P: u32 = 1 << 15;
const DESC_AVL: u32 = 1 << 20;
const DESC_L: u32 = 1 << 21;
const DESC_B: u32 = 1 << 22;
const DESC_G: u32 = 1 << 23;

/// QEMU's names of `env.segs[i]`, in its order (ES, CS, SS, DS, FS, GS).
pub const QEMU_SEGMENT_NAMES: [&str; 6] = ["es", "cs", "ss", "ds", "fs", "gs"];

/// `env.smbase` after reset, the value an absent IA32_SMBASE entry stands for.
pub const SMBASE_RESET: u32 = 0x3_0000;
/// IA32_SMBASE, which carries `smbase` in the common MSR list.
pub const MSR_SMBASE: u32 = 0x9e;
/// IA32_PAT after reset, the value QEMU gets when the common list has no PAT entry.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// IA32_PAT.
pub const MSR_PAT: u32 = 0x277;
/// DR6's reset value, the only one the common format can reproduce.
pub const DR6_RESET: u64 = 0xffff_0ff0;
/// DR7's reset value, the only one the common format can reproduce.
pub const DR7_RESET: u64 = 0x400;
/// XCR0 after reset (x87 only), the only value the common format can reproduce.
pub const XCR0_RESET: u64 = 1;
/// `a20_mask` with the A20 gate open.
pub const A20_OPEN: i32 = -1;
/// `mp_state` of a runnable vCPU (KVM_MP_STATE_RUNNABLE).
pub const MP_STATE_RUNNABLE: u32 = 0;
/// IA32_APIC_BASE.EXTD: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;

/// MSRs with a named field of their own, in ascending order.
pub const QEMU_NAMED_MSRS: [u32; 10] = [
    msr_index::SYSENTER_CS,
    msr_index::SYSENTER_ESP,
    msr_index::SYSENTER_EIP,
    MSR_PAT,
    msr_index::STAR,
    msr_index::LSTAR,
    msr_index::CSTAR,
    msr_index::SYSCALL_MASK,
    msr_index::KERNEL_GS_BASE,
    msr_index::TSC_AUX,
];

/// MSRs the stream carries outside the named fields, by index range: SMI count, feature control,
/// TSC adjust, speculation control, the machine-check registers (MCG_CAP/STATUS/CTL and the 10
/// banks), MISC_ENABLE, the MTRRs, TSC deadline and KVM's paravirtual MSRs.
pub const QEMU_LIST_MSRS: [(u32, u32); 14] = [
    (0x34, 0x34),
    (0x3a, 0x3b),
    (0x48, 0x48),
    (0x179, 0x17b),
    (0x1a0, 0x1a0),
    (0x200, 0x20f),
    (0x250, 0x250),
    (0x258, 0x259),
    (0x268, 0x26f),
    (0x2ff, 0x2ff),
    (0x400, 0x427),
    (0x6e0, 0x6e0),
    (0x4b56_4d00, 0x4b56_4d06),
    // MSR_VIRT_SSBD.
    (0xc001_011f, 0xc001_011f),
];

/// Whether `index` may appear in [`QemuCpu::msrs`].
pub fn qemu_list_msr(index: u32) -> bool {
    QEMU_LIST_MSRS.iter().any(|&(lo, hi)| (lo..=hi).contains(&index))
}

/// The attribute bits of `a` in `flags` positions (`unusable` is not among them: it is !P).
pub fn pack_flags(a: &SegmentAttributes) -> u32 {
    let bit = |set: bool, mask: u32| if set { mask } else { 0 };
    (u32::from(a.type_ & 0xf) << DESC_TYPE_SHIFT)
        | bit(a.s, DESC_S)
        | (u32::from(a.dpl & 3) << DESC_DPL_SHIFT)
        | bit(a.present, DESC_P)
        | bit(a.avl, DESC_AVL)
        | bit(a.l, DESC_L)
        | bit(a.db, DESC_B)
        | bit(a.g, DESC_G)
}

/// The attributes of `flags`, unusable exactly when not present (as QEMU's `set_seg`); the bits
/// outside [`SEGMENT_ATTRIBUTE_BITS`] are ignored.
pub fn unpack_flags(flags: u32) -> SegmentAttributes {
    let present = flags & DESC_P != 0;
    SegmentAttributes {
        type_: ((flags >> DESC_TYPE_SHIFT) & 0xf) as u8,
        s: flags & DESC_S != 0,
        dpl: ((flags >> DESC_DPL_SHIFT) & 3) as u8,
        present,
        avl: flags & DESC_AVL != 0,
        l: flags & DESC_L != 0,
        db: flags & DESC_B != 0,
        g: flags & DESC_G != 0,
        unusable: !present,
    }
}

/// Common GPR index of QEMU's `regs[i]` for i < 8 (R8..R15 keep their place).
const GPR_TO_COMMON: [usize; 8] = [0, 2, 3, 1, 6, 7, 4, 5];
const CR0_PE: u64 = 1;
const CS: usize = 1;

fn unrepresentable(field: impl Into<String>, value: u64) -> NativeError {
    NativeError::Unrepresentable {
        field: field.into(),
        value,
    }
}

/// TR's type for a loaded 64-bit TSS as KVM reports it and VMX requires it: busy.
const TSS64_BUSY: u32 = 0xb;
/// The same TSS as QEMU's TCG caches it after `ltr` (the descriptor's type before it was
/// marked busy); TCG checks CPL-3 port access only against a TR of this type.
const TSS64_AVAILABLE: u32 = 0x9;

impl QemuCpu {
    /// Sets TR's cached type the way QEMU's TCG holds a loaded 64-bit TSS (available, 9), for a
    /// QEMU that runs TCG: with the busy type KVM uses (11), TCG refuses every CPL-3 port access
    /// that the TSS's I/O bitmap allows. KVM on this project's PVM hosts takes either type; on
    /// VMX it needs 11, so call this only for a TCG destination.
    pub fn tr_for_tcg(&mut self) {
        let system = self.tr.flags & (1 << 12) == 0;
        if system && (self.tr.flags >> DESC_TYPE_SHIFT) & 0xf == TSS64_BUSY {
            self.tr.flags = (self.tr.flags & !(0xf << DESC_TYPE_SHIFT)) | (TSS64_AVAILABLE << DESC_TYPE_SHIFT);
        }
    }

    /// The reverse of [`QemuCpu::tr_for_tcg`], for a vCPU that comes from QEMU's TCG: a loaded
    /// TSS is busy architecturally, and KVM on VMX refuses an available one in TR.
    pub fn tr_from_tcg(&mut self) {
        let system = self.tr.flags & (1 << 12) == 0;
        if system && (self.tr.flags >> DESC_TYPE_SHIFT) & 0xf == TSS64_AVAILABLE {
            self.tr.flags = (self.tr.flags & !(0xf << DESC_TYPE_SHIFT)) | (TSS64_BUSY << DESC_TYPE_SHIFT);
        }
    }

    /// Converts to the common format as vCPU `id`, refusing values that are invalid or that the
    /// common format cannot carry; fields that are not state are ignored (module docs).
    pub fn to_common(&self, id: u32) -> Result<VcpuState, NativeError> {
        self.check_unrepresentable()?;
        canonical(|| "eip".into(), self.eip)?;
        let mut gprs = [0u64; 16];
        for (i, &v) in self.regs.iter().enumerate() {
            gprs[GPR_TO_COMMON.get(i).copied().unwrap_or(i)] = v;
        }
        let mut segs = [Segment::default(); 6];
        for (i, q) in self.segs.iter().enumerate() {
            segs[i] = segment_to_common(&format!("segs.{}", QEMU_SEGMENT_NAMES[i]), q)?;
        }
        if self.cr0 & CR0_PE == 0 && segs[CS].attributes.dpl != 0 {
            return Err(unrepresentable("segs.cs.flags", u64::from(self.segs[CS].flags)));
        }
        let [es, cs, ss, ds, fs, gs] = segs;
        for (name, seg) in [("segs.fs", &fs), ("segs.gs", &gs)] {
            canonical(|| format!("{name}.base"), seg.base)?;
        }
        let tr = segment_to_common("tr", &self.tr)?;
        let ldtr = segment_to_common("ldt", &self.ldt)?;
        canonical(|| "tr.base".into(), tr.base)?;
        canonical(|| "ldt.base".into(), ldtr.base)?;
        let (apic_base, cr8, lapic) = match &self.apic {
            None => (0, 0, Vec::new()),
            Some(a) => {
                if u64::from(a.apicbase) & APIC_BASE_EXTD != 0 {
                    return Err(unrepresentable("apic.apicbase", u64::from(a.apicbase)));
                }
                (u64::from(a.apicbase), u64::from(a.tpr >> 4), lapic::page_from_apic(a))
            }
        };
        if self.fptag > 0xff {
            return Err(unrepresentable("fptag", u64::from(self.fptag)));
        }
        xsave::check_xstate_bv("xstate_bv", self.xstate_bv)?;
        let s = VcpuState {
            id,
            gprs,
            rip: self.eip,
            rflags: self.eflags,
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldtr,
            gdtr: dtable_to_common("gdt", &self.gdt)?,
            idtr: dtable_to_common("idt", &self.idt)?,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8,
            efer: self.efer,
            apic_base,
            msrs: self.msrs_to_common()?,
            xsave: xsave::image_from_qemu(self),
            tsc: self.tsc,
            events: self.events_to_common()?,
            lapic,
        };
        s.validate()?;
        Ok(s)
    }

    /// Converts a common-format state, after validating it, refusing what QEMU cannot hold with
    /// [`NativeError::Unrepresentable`] naming the common field. Sets `hflags` to
    /// [`QemuCpu::compute_hflags`] and `hflags2` to GIF | VGIF plus the NMI mask, as QEMU holds
    /// them.
    pub fn from_common(s: &VcpuState) -> Result<QemuCpu, NativeError> {
        s.validate()?;
        let mut regs = [0u64; 16];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = s.gprs[GPR_TO_COMMON.get(i).copied().unwrap_or(i)];
        }
        if s.cr0 & CR0_PE == 0 && s.cs.attributes.dpl != 0 {
            return Err(unrepresentable("cs.attributes.dpl", u64::from(s.cs.attributes.dpl)));
        }
        let seg = |name: &str, g: &Segment| segment_from_common(name, g);
        let apic = Self::apic_from_common(s)?;
        let events = &s.events;
        let (exception_nr, has_error_code, error_code) = match events.exception {
            None => (-1, 0, 0),
            Some(PendingException { vector, error_code }) => (
                i32::from(vector),
                u8::from(error_code.is_some()),
                error_code.unwrap_or(0),
            ),
        };
        let mut q = QemuCpu {
            halted: 0,
            interrupt_request: 0,
            regs,
            eip: s.rip,
            eflags: s.rflags,
            hflags: 0,
            hflags2: HF2_GIF_MASK | HF2_VGIF_MASK | if events.nmi_masked { HF2_NMI_MASK } else { 0 },
            fpuc: 0,
            fpus: 0,
            fptag: 0,
            fpregs: [QemuFpReg::default(); 8],
            fpop: 0,
            fpip: 0,
            fpdp: 0,
            segs: [
                seg("es", &s.es)?,
                seg("cs", &s.cs)?,
                seg("ss", &s.ss)?,
                seg("ds", &s.ds)?,
                seg("fs", &s.fs)?,
                seg("gs", &s.gs)?,
            ],
            ldt: seg("ldtr", &s.ldtr)?,
            tr: seg("tr", &s.tr)?,
            gdt: dtable_from_common(&s.gdtr),
            idt: dtable_from_common(&s.idtr),
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            dr: [0, 0, 0, 0, 0, 0, DR6_RESET, DR7_RESET],
            a20_mask: A20_OPEN,
            mxcsr: 0,
            xmm: [[0; 2]; 16],
            ymmh: [[0; 2]; 16],
            efer: s.efer,
            star: 0,
            lstar: 0,
            cstar: 0,
            fmask: 0,
            kernelgsbase: 0,
            smbase: SMBASE_RESET,
            pat: PAT_RESET,
            tsc: s.tsc,
            tsc_aux: 0,
            xcr0: XCR0_RESET,
            xstate_bv: 0,
            interrupt_injected: events.interrupt.map_or(-1, i32::from),
            mp_state: MP_STATE_RUNNABLE,
            exception_nr,
            has_error_code,
            error_code,
            soft_interrupt: 0,
            nmi_injected: 0,
            nmi_pending: u8::from(events.nmi_pending),
            msrs: Vec::new(),
            apic,
        };
        xsave::image_into_qemu(&s.xsave, &mut q)?;
        q.msrs_from_common(&s.msrs)?;
        q.hflags = q.compute_hflags();
        Ok(q)
    }

    /// Refuses the fields that are state the common format has no place for.
    fn check_unrepresentable(&self) -> Result<(), NativeError> {
        fixed(|| "halted".into(), u64::from(self.halted), 0)?;
        fixed(|| "interrupt_request".into(), u64::from(self.interrupt_request), 0)?;
        fixed(
            || "mp_state".into(),
            u64::from(self.mp_state),
            u64::from(MP_STATE_RUNNABLE),
        )?;
        fixed(
            || "a20_mask".into(),
            self.a20_mask as u32 as u64,
            A20_OPEN as u32 as u64,
        )?;
        fixed(|| "xcr0".into(), self.xcr0, XCR0_RESET)?;
        // dr[4] and dr[5] are not state: DR4/DR5 alias DR6/DR7, TCG leaves them 0 and QEMU's
        // KVM code copies DR6/DR7 into them.
        for (i, &v) in self.dr.iter().enumerate() {
            let reset = match i {
                4 | 5 => continue,
                6 => DR6_RESET,
                7 => DR7_RESET,
                _ => 0,
            };
            fixed(|| format!("dr[{i}]"), v, reset)?;
        }
        if self.hflags & (HF_STATE_BITS | !HF_DEFINED_BITS) != 0 {
            return Err(unrepresentable("hflags", u64::from(self.hflags)));
        }
        // GIF clear (inside CLGI) and the nested-SVM/SMM/MPX bits are state; VGIF is a cache.
        let h2_state =
            HF2_HIF_MASK | HF2_VINTR_MASK | HF2_SMM_INSIDE_NMI_MASK | HF2_MPX_PR_MASK | HF2_NPT_MASK | HF2_IGNNE_MASK;
        let h2_known = HF2_GIF_MASK | HF2_NMI_MASK | HF2_VGIF_MASK | h2_state;
        if self.hflags2 & HF2_GIF_MASK == 0 || self.hflags2 & (h2_state | !h2_known) != 0 {
            return Err(unrepresentable("hflags2", u64::from(self.hflags2)));
        }
        fixed(|| "soft_interrupt".into(), u64::from(self.soft_interrupt), 0)?;
        fixed(|| "nmi_injected".into(), u64::from(self.nmi_injected), 0)?;
        Ok(())
    }

    fn events_to_common(&self) -> Result<PendingEvents, NativeError> {
        let vector = |field: &str, v: i32| -> Result<Option<u8>, NativeError> {
            match v {
                -1 => Ok(None),
                0..=255 => Ok(Some(v as u8)),
                _ => Err(NativeError::OutOfRange {
                    field: field.to_owned(),
                    value: v as u32 as u64,
                    max: 255,
                }),
            }
        };
        let exception = match vector("exception_nr", self.exception_nr)? {
            None => None,
            Some(vector) => Some(PendingException {
                vector,
                error_code: flag(|| "has_error_code".into(), self.has_error_code)?.then_some(self.error_code),
            }),
        };
        Ok(PendingEvents {
            exception,
            interrupt: vector("interrupt_injected", self.interrupt_injected)?,
            nmi_pending: flag(|| "nmi_pending".into(), self.nmi_pending)?,
            nmi_masked: self.hflags2 & HF2_NMI_MASK != 0,
        })
    }

    /// The named MSRs, `smbase` when not at reset, and `msrs`, in one ascending list.
    fn msrs_to_common(&self) -> Result<Vec<Msr>, NativeError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(NativeError::TooManyMsrs {
                count: self.msrs.len(),
                limit: MAX_MSRS,
            });
        }
        check_msr_indices(self.msrs.iter().map(|m| m.0), &[])?;
        if let Some(&(index, value)) = self.msrs.iter().find(|m| !qemu_list_msr(m.0)) {
            return Err(unrepresentable(format!("msrs[{index:#x}]"), value));
        }
        let mut out: Vec<Msr> = self.msrs.iter().map(|&(index, value)| Msr { index, value }).collect();
        for (slot, &index) in QEMU_NAMED_MSRS.iter().enumerate() {
            out.push(Msr {
                index,
                value: self.named_msr(slot),
            });
        }
        if self.smbase != SMBASE_RESET {
            out.push(Msr {
                index: MSR_SMBASE,
                value: u64::from(self.smbase),
            });
        }
        // The three sources are disjoint (qemu_list_msr excludes the named ones and SMBASE).
        out.sort_unstable_by_key(|m| m.index);
        Ok(out)
    }

    fn msrs_from_common(&mut self, msrs: &[Msr]) -> Result<(), NativeError> {
        for m in msrs {
            let field = || format!("msrs[{:#x}]", m.index);
            if let Some(slot) = QEMU_NAMED_MSRS.iter().position(|&i| i == m.index) {
                if m.index == msr_index::SYSENTER_CS {
                    self.sysenter_cs = narrow(field, m.value)?;
                } else {
                    *self.named_msr_mut(slot) = m.value;
                }
            } else if m.index == MSR_SMBASE {
                let smbase: u32 = narrow(field, m.value)?;
                if smbase == SMBASE_RESET {
                    // Indistinguishable from an absent entry on the way back.
                    return Err(unrepresentable(field(), m.value));
                }
                self.smbase = smbase;
            } else if qemu_list_msr(m.index) {
                // The common list is ascending, so this one stays ascending too.
                self.msrs.push((m.index, m.value));
            } else {
                return Err(unrepresentable(field(), m.value));
            }
        }
        Ok(())
    }

    fn named_msr(&self, slot: usize) -> u64 {
        match slot {
            0 => u64::from(self.sysenter_cs),
            1 => self.sysenter_esp,
            2 => self.sysenter_eip,
            3 => self.pat,
            4 => self.star,
            5 => self.lstar,
            6 => self.cstar,
            7 => self.fmask,
            8 => self.kernelgsbase,
            _ => self.tsc_aux,
        }
    }

    /// The u64 named fields; slot 0 (the 32-bit SYSENTER_CS) is set by the caller.
    fn named_msr_mut(&mut self, slot: usize) -> &mut u64 {
        match slot {
            1 => &mut self.sysenter_esp,
            2 => &mut self.sysenter_eip,
            3 => &mut self.pat,
            4 => &mut self.star,
            5 => &mut self.lstar,
            6 => &mut self.cstar,
            7 => &mut self.fmask,
            8 => &mut self.kernelgsbase,
            _ => &mut self.tsc_aux,
        }
    }

    fn apic_from_common(s: &VcpuState) -> Result<Option<QemuApic>, NativeError> {
        if s.lapic.is_empty() {
            // No APIC: QEMU has nowhere else to keep its base and the TPR.
            fixed(|| "apic_base".into(), s.apic_base, 0)?;
            fixed(|| "cr8".into(), s.cr8, 0)?;
            return Ok(None);
        }
        debug_assert_eq!(s.lapic.len(), LAPIC_REGISTER_BYTES);
        if s.apic_base & APIC_BASE_EXTD != 0 {
            return Err(unrepresentable("apic_base", s.apic_base));
        }
        let apicbase: u32 = narrow(|| "apic_base".into(), s.apic_base)?;
        let apic = lapic::apic_from_page(&s.lapic, apicbase)?;
        if u64::from(apic.tpr >> 4) != s.cr8 {
            return Err(unrepresentable("cr8", s.cr8));
        }
        Ok(Some(apic))
    }
}

fn segment_to_common(name: &str, q: &QemuSegment) -> Result<Segment, NativeError> {
    Ok(Segment {
        selector: narrow(|| format!("{name}.selector"), u64::from(q.selector))?,
        base: q.base,
        limit: q.limit,
        attributes: unpack_flags(q.flags),
    })
}

fn segment_from_common(name: &str, s: &Segment) -> Result<QemuSegment, NativeError> {
    let a = &s.attributes;
    if a.unusable == a.present {
        return Err(unrepresentable(
            format!("{name}.attributes.unusable"),
            u64::from(a.unusable),
        ));
    }
    Ok(QemuSegment {
        selector: u32::from(s.selector),
        base: s.base,
        limit: s.limit,
        flags: pack_flags(a),
    })
}

fn dtable_to_common(name: &str, q: &QemuSegment) -> Result<DescriptorTable, NativeError> {
    fixed(|| format!("{name}.selector"), u64::from(q.selector), 0)?;
    fixed(|| format!("{name}.flags"), u64::from(q.flags), 0)?;
    Ok(DescriptorTable {
        base: canonical(|| format!("{name}.base"), q.base)?,
        limit: narrow(|| format!("{name}.limit"), u64::from(q.limit))?,
    })
}

fn dtable_from_common(d: &DescriptorTable) -> QemuSegment {
    QemuSegment {
        selector: 0,
        base: d.base,
        limit: u32::from(d.limit),
        flags: 0,
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::format::FormatError;

    /// A representable common state with every part in use.
    fn state() -> VcpuState {
        let mut s = super::super::tests::busy_state();
        s.gs.attributes.present = false;
        s.msrs
            .retain(|m| qemu_list_msr(m.index) || QEMU_NAMED_MSRS.contains(&m.index));
        for &index in &QEMU_NAMED_MSRS {
            if !s.msrs.iter().any(|m| m.index == index) {
                s.msrs.push(Msr { index, value: 0x1000 });
            }
        }
        s.msrs.push(Msr { index: 0x1a0, value: 1 });
        s.msrs.sort_by_key(|m| m.index);
        s.xsave = vec![0; QEMU_XSAVE_BYTES];
        s.xsave[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        s.xsave[28..32].copy_from_slice(&xsave::MXCSR_MASK.to_le_bytes());
        s.xsave[32] = 0xaa; // ST0 mantissa
        s.xsave[593] = 0xbb; // YMM1 high half, byte 1
        s.xsave[512] = 0x7;
        let mut apic = QemuApic {
            apicbase: 0xfee0_0900,
            id: 3,
            tpr: 0xf5,
            spurious_vec: 0x1ff,
            dest_mode: 0xf,
            ..QemuApic::default()
        };
        apic.irr[7] = 1 << 15;
        apic.lvt = [0x1_0000, 0x1_0000, 0x1_0000, 0x8700, 0x8400, 0x1_0000];
        s.lapic = lapic::page_from_apic(&apic);
        s
    }

    fn qemu() -> QemuCpu {
        QemuCpu::from_common(&state()).unwrap()
    }

    fn err_of(mutate: impl FnOnce(&mut QemuCpu)) -> NativeError {
        let mut q = qemu();
        mutate(&mut q);
        q.to_common(3).unwrap_err()
    }

    fn refused(field: &str, value: u64) -> NativeError {
        NativeError::Unrepresentable {
            field: field.into(),
            value,
        }
    }

    #[test]
    fn test_tr_takes_tcg_s_available_type_and_back() {
        let kvm = qemu();
        let mut q = kvm.clone();
        q.tr.flags = (q.tr.flags & !(0xf << 8)) | (0xb << 8);
        let busy = q.clone();
        q.tr_for_tcg();
        assert_eq!((q.tr.flags >> 8) & 0xf, 0x9);
        q.tr_from_tcg();
        assert_eq!(q, busy);
    }

    #[test]
    fn test_busy_state_maps_field_by_field() {
        let s = state();
        let q = qemu();
        // QEMU order: RAX RCX RDX RBX RSP RBP RSI RDI; common: rax rbx rcx rdx rsi rdi rsp rbp.
        assert_eq!(q.regs[0], s.gprs[0]);
        assert_eq!(q.regs[1], s.gprs[2]);
        assert_eq!(q.regs[3], s.gprs[1]);
        assert_eq!(q.regs[4], s.gprs[6]);
        assert_eq!(q.regs[5], s.gprs[7]);
        assert_eq!(q.regs[6], s.gprs[4]);
        assert_eq!(q.regs[15], s.gprs[15]);
        assert_eq!(q.segs[3].flags, 0x00d0_ff00, "DS: every attribute but L");
        assert_eq!(q.segs[5].flags & DESC_P, 0, "GS unusable: not present");
        assert_eq!(q.apic.map(|a| a.tpr >> 4), Some(0xf));
        assert_eq!(q.fpregs[0].mantissa, 0xaa);
        assert_eq!(q.ymmh[1][0], 0xbb << 8);
        assert_eq!(q.xstate_bv, 7);
        assert_eq!((q.exception_nr, q.has_error_code, q.error_code), (13, 1, 0xffff_ffff));
        assert_eq!(q.interrupt_injected, 0xef);
        assert_eq!(q.hflags2, HF2_GIF_MASK | HF2_NMI_MASK | HF2_VGIF_MASK);
        assert_eq!(q.pat, 0x0007_0406_0007_0406);
        assert_eq!(q.msrs, vec![(0x1a0, 1)]);
        assert_eq!(q.to_common(3).unwrap(), s);
    }

    #[test]
    fn test_state_the_common_format_lacks_is_refused() {
        assert_eq!(err_of(|q| q.halted = 1), refused("halted", 1));
        assert_eq!(err_of(|q| q.mp_state = 3), refused("mp_state", 3));
        assert_eq!(err_of(|q| q.interrupt_request = 2), refused("interrupt_request", 2));
        assert_eq!(err_of(|q| q.soft_interrupt = 1), refused("soft_interrupt", 1));
        assert_eq!(err_of(|q| q.nmi_injected = 1), refused("nmi_injected", 1));
        assert_eq!(err_of(|q| q.a20_mask = !(1 << 20)), refused("a20_mask", 0xffef_ffff));
        assert_eq!(err_of(|q| q.xcr0 = 7), refused("xcr0", 7));
        assert_eq!(err_of(|q| q.dr[7] = 0x401), refused("dr[7]", 0x401));
        assert_eq!(err_of(|q| q.xstate_bv = 0xe7), refused("xstate_bv", 0xe7));
        assert_eq!(err_of(|q| q.fptag = 0x100), refused("fptag", 0x100));
        let h = qemu().hflags | HF_INHIBIT_IRQ_MASK;
        assert_eq!(err_of(|q| q.hflags = h), refused("hflags", u64::from(h)));
        assert_eq!(err_of(|q| q.hflags2 = HF2_VGIF_MASK), refused("hflags2", 0x100));
        assert_eq!(err_of(|q| q.hflags2 |= HF2_NPT_MASK), refused("hflags2", 0x145));
    }

    #[test]
    fn test_invalid_native_values_are_named() {
        assert_eq!(
            err_of(|q| q.segs[2].selector = 0x1_0000),
            refused("segs.ss.selector", 0x1_0000)
        );
        assert_eq!(err_of(|q| q.gdt.flags = 0x9300), refused("gdt.flags", 0x9300));
        assert_eq!(err_of(|q| q.idt.limit = 0x1_0000), refused("idt.limit", 0x1_0000));
        assert_eq!(
            err_of(|q| q.ldt.base = 1 << 47),
            NativeError::NonCanonical {
                field: "ldt.base".into(),
                value: 1 << 47
            }
        );
        assert_eq!(
            err_of(|q| q.exception_nr = 256),
            NativeError::OutOfRange {
                field: "exception_nr".into(),
                value: 256,
                max: 255
            }
        );
        assert_eq!(
            err_of(|q| q.has_error_code = 2),
            NativeError::InvalidFlag {
                field: "has_error_code".into(),
                value: 2
            }
        );
        assert_eq!(
            err_of(|q| q.msrs.push((0x4000_0000, 1))),
            refused("msrs[0x40000000]", 1)
        );
        assert_eq!(
            err_of(|q| q.msrs.insert(0, (0x200, 1))),
            NativeError::MsrOrder {
                index: 0x1a0,
                previous: 0x200
            }
        );
        assert_eq!(
            err_of(|q| {
                if let Some(a) = &mut q.apic {
                    a.apicbase |= 1 << 10;
                }
            }),
            refused("apic.apicbase", 0xfee0_0d00)
        );
        assert_eq!(
            err_of(|q| {
                q.cr0 &= !1;
                q.segs[1].flags |= 3 << 13;
            }),
            refused("segs.cs.flags", 0x00a0_fb00),
        );
    }

    #[test]
    fn test_smbase_is_listed_only_away_from_reset() {
        let mut q = qemu();
        assert!(!q.to_common(3).unwrap().msrs.iter().any(|m| m.index == MSR_SMBASE));
        q.smbase = 0xa_0000;
        let s = q.to_common(3).unwrap();
        assert!(s.msrs.contains(&Msr {
            index: MSR_SMBASE,
            value: 0xa_0000
        }));
        assert_eq!(QemuCpu::from_common(&s).unwrap(), q);
    }

    #[test]
    fn test_empty_lapic_needs_no_apic_state() {
        let mut s = state();
        s.lapic.clear();
        assert_eq!(QemuCpu::from_common(&s), Err(refused("apic_base", 0xfee0_0900)));
        s.apic_base = 0;
        assert_eq!(QemuCpu::from_common(&s), Err(refused("cr8", 0xf)));
        s.cr8 = 0;
        let q = QemuCpu::from_common(&s).unwrap();
        assert_eq!(q.apic, None);
        assert_eq!(q.to_common(s.id).unwrap(), s);
    }

    #[test]
    fn test_invalid_common_state_is_refused_first() {
        let mut s = state();
        s.rip = 1 << 47;
        assert_eq!(
            QemuCpu::from_common(&s),
            Err(NativeError::InvalidCommon(FormatError::NonCanonical {
                field: "rip",
                value: 1 << 47
            }))
        );
    }

    #[test]
    fn test_count_shift_follows_the_divide_register() {
        // Divide by 2, 4, 8, 16, 32, 64, 128, 1 (SDM encoding 0b0000..0b1011 with bit 2 unused).
        let shifts: Vec<i32> = [0, 1, 2, 3, 8, 9, 10, 11].into_iter().map(count_shift).collect();
        assert_eq!(shifts, [1, 2, 3, 4, 5, 6, 7, 0]);
    }
}
