//! QEMU's x86 vCPU state, in the shape its migration stream carries it: the `cpu_common`, `cpu`
//! and `apic` sections of `target/i386/machine.c` and `hw/intc/apic_common.c` (section versions
//! 1, 12 and 3 in QEMU 2.x to 9.x), with the MSRs its `cpu/*` subsections carry gathered into one
//! list. The stream codec ([`crate::qemu::stream`]) reads and writes these fields by name; this
//! module converts them to and from the common [`VcpuState`].
//!
//! Unlike [`super::kvm`] and [`super::xen_hvm`], no backend keeps its vCPUs in this layout: QEMU
//! is the hypervisor that does, and this is the form in which a vCPU crosses to or from it.

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
