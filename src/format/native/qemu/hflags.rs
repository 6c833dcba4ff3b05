//! QEMU's cached mode bits (`env.hflags`, `env.hflags2`), as `target/i386/cpu.h` numbers them,
//! and how QEMU 7.2 derives them from the registers.
//!
//! TCG translates code with these bits, so a state handed to QEMU must carry the values QEMU
//! itself would hold. [`QemuCpu::compute_hflags`] follows what TCG maintains incrementally
//! (`cpu_x86_load_seg_cache`, `cpu_x86_update_cr0`/`cr4`, `cpu_load_efer`,
//! `cpu_x86_update_dr7`), which agrees with `x86_update_hflags` except for one choice: the
//! EFLAGS bits TF, IOPL, RF, VM and AC are left out. TCG never stores them in `hflags`
//! (`cpu_get_tb_cpu_state` ORs them in from EFLAGS for every translation block), and a copy left
//! in `hflags` would stay set after the guest cleared the flag.
//!
//! In 64-bit code SS32 is set, as `x86_update_hflags` and a CS load set it; TCG leaves it at
//! SS.B after a later SS load (a null SS loaded by an interrupt clears it), which no 64-bit
//! instruction reads. Checked against the hflags of real QEMU 7.2 streams in real mode (TCG) and
//! 32-bit protected mode (KVM) by `tests/format_props/qemu.rs`; long mode follows the source.

use super::QemuCpu;

/// Current privilege level, bits 0..1.
pub const HF_CPL_MASK: u32 = 3;
/// Interrupts inhibited for one instruction (STI / MOV SS shadow).
pub const HF_INHIBIT_IRQ_MASK: u32 = 1 << 3;
/// 32-bit code segment.
pub const HF_CS32_MASK: u32 = 1 << 4;
/// 32-bit stack segment.
pub const HF_SS32_MASK: u32 = 1 << 5;
/// DS, ES and SS bases must be added to addresses.
pub const HF_ADDSEG_MASK: u32 = 1 << 6;
/// CR0.PE.
pub const HF_PE_MASK: u32 = 1 << 7;
/// EFLAGS.TF position (not kept by TCG).
pub const HF_TF_MASK: u32 = 1 << 8;
/// CR0.MP.
pub const HF_MP_MASK: u32 = 1 << 9;
/// CR0.EM.
pub const HF_EM_MASK: u32 = 1 << 10;
/// CR0.TS.
pub const HF_TS_MASK: u32 = 1 << 11;
/// EFLAGS.IOPL position (not kept by TCG).
pub const HF_IOPL_MASK: u32 = 3 << 12;
/// Long mode active (EFER.LMA).
pub const HF_LMA_MASK: u32 = 1 << 14;
/// 64-bit code segment.
pub const HF_CS64_MASK: u32 = 1 << 15;
/// EFLAGS.RF position (not kept by TCG).
pub const HF_RF_MASK: u32 = 1 << 16;
/// EFLAGS.VM position (not kept by TCG).
pub const HF_VM_MASK: u32 = 1 << 17;
/// EFLAGS.AC position (not kept by TCG).
pub const HF_AC_MASK: u32 = 1 << 18;
/// In system-management mode.
pub const HF_SMM_MASK: u32 = 1 << 19;
/// EFER.SVME.
pub const HF_SVME_MASK: u32 = 1 << 20;
/// Running an SVM guest (intercepts active).
pub const HF_GUEST_MASK: u32 = 1 << 21;
/// CR4.OSFXSR.
pub const HF_OSFXSR_MASK: u32 = 1 << 22;
/// CR4.SMAP.
pub const HF_SMAP_MASK: u32 = 1 << 23;
/// An I/O breakpoint is enabled in DR7.
pub const HF_IOBPT_MASK: u32 = 1 << 24;
/// MPX enabled (CR4.OSXSAVE, XCR0 and BNDCFGx).
pub const HF_MPX_EN_MASK: u32 = 1 << 25;
/// MPX bound registers in use.
pub const HF_MPX_IU_MASK: u32 = 1 << 26;
/// CR4.UMIP.
pub const HF_UMIP_MASK: u32 = 1 << 27;
/// AVX enabled (CR4.OSXSAVE and XCR0 SSE|YMM).
pub const HF_AVX_EN_MASK: u32 = 1 << 28;

/// `hflags` bits that are state of their own rather than a cache of registers, none of which
/// the common format carries.
pub const HF_STATE_BITS: u32 = HF_INHIBIT_IRQ_MASK | HF_SMM_MASK | HF_GUEST_MASK | HF_MPX_IU_MASK;
/// `hflags` bits QEMU 7.2 defines.
pub const HF_DEFINED_BITS: u32 = (1 << 29) - 1;

/// Global interrupt flag (set outside SVM's CLGI).
pub const HF2_GIF_MASK: u32 = 1 << 0;
/// IF saved on VMRUN.
pub const HF2_HIF_MASK: u32 = 1 << 1;
/// NMIs blocked: an NMI handler is running.
pub const HF2_NMI_MASK: u32 = 1 << 2;
/// V_INTR_MASKING of the running SVM guest.
pub const HF2_VINTR_MASK: u32 = 1 << 3;
/// An SMI arrived inside an NMI handler.
pub const HF2_SMM_INSIDE_NMI_MASK: u32 = 1 << 4;
/// BNDCFGx.BNDPRESERVE.
pub const HF2_MPX_PR_MASK: u32 = 1 << 5;
/// Nested paging of the running SVM guest.
pub const HF2_NPT_MASK: u32 = 1 << 6;
/// IGNNE# asserted.
pub const HF2_IGNNE_MASK: u32 = 1 << 7;
/// Virtual GIF; set whenever no SVM guest with vGIF runs (QEMU's reset value).
pub const HF2_VGIF_MASK: u32 = 1 << 8;

const DESC_DPL_SHIFT: u32 = 13;
const DESC_L_MASK: u32 = 1 << 21;
const DESC_B_MASK: u32 = 1 << 22;
const CR0_PE: u64 = 1 << 0;
const CR0_MP_EM_TS: u64 = 0b1110;
const CR4_UMIP: u64 = 1 << 11;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_SMAP: u64 = 1 << 21;
const EFER_LMA: u64 = 1 << 10;
const EFER_SVME: u64 = 1 << 12;
const EFLAGS_VM: u64 = 1 << 17;
const XCR0_SSE_YMM: u64 = 0b110;
const DR7_TYPE_IO_RW: u64 = 2;

/// Indices of CS, SS, DS and ES in `env.segs`.
const R_ES: usize = 0;
const R_CS: usize = 1;
const R_SS: usize = 2;
const R_DS: usize = 3;

impl QemuCpu {
    /// The `hflags` QEMU 7.2 holds for these registers (see the module docs for the EFLAGS
    /// bits): CPL from SS.DPL as `cpu_post_load` takes it; PE, MP, EM, TS from CR0; OSFXSR, SMAP,
    /// UMIP from CR4; LMA and SVME from EFER; CS32/SS32/CS64 from CS.L (with LMA) or the D/B
    /// bits; ADDSEG as `cpu_x86_load_seg_cache` decides it; AVX_EN from CR4.OSXSAVE and XCR0;
    /// IOBPT from DR7. INHIBIT_IRQ, SMM, SVM guest mode and MPX are never set.
    pub fn compute_hflags(&self) -> u32 {
        let cs = &self.segs[R_CS];
        let ss = &self.segs[R_SS];
        let mut h = (ss.flags >> DESC_DPL_SHIFT) & HF_CPL_MASK;
        if self.cr0 & CR0_PE != 0 {
            h |= HF_PE_MASK;
        }
        // CR0 bits 1..3 land on hflags bits 9..11, in the same order.
        h |= ((self.cr0 & CR0_MP_EM_TS) as u32) << 8;
        for (cr4, hf) in [
            (CR4_OSFXSR, HF_OSFXSR_MASK),
            (CR4_SMAP, HF_SMAP_MASK),
            (CR4_UMIP, HF_UMIP_MASK),
        ] {
            if self.cr4 & cr4 != 0 {
                h |= hf;
            }
        }
        if self.efer & EFER_LMA != 0 {
            h |= HF_LMA_MASK;
        }
        if self.efer & EFER_SVME != 0 {
            h |= HF_SVME_MASK;
        }
        if h & HF_LMA_MASK != 0 && cs.flags & DESC_L_MASK != 0 {
            // 64-bit code: segment bases other than FS/GS are ignored, so no ADDSEG.
            h |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK;
        } else {
            if cs.flags & DESC_B_MASK != 0 {
                h |= HF_CS32_MASK;
            }
            if ss.flags & DESC_B_MASK != 0 {
                h |= HF_SS32_MASK;
            }
            let flat = self.segs[R_DS].base | self.segs[R_ES].base | ss.base == 0;
            if self.cr0 & CR0_PE == 0 || self.eflags & EFLAGS_VM != 0 || h & HF_CS32_MASK == 0 || !flat {
                h |= HF_ADDSEG_MASK;
            }
        }
        if self.cr4 & CR4_OSXSAVE != 0 && self.xcr0 & XCR0_SSE_YMM == XCR0_SSE_YMM {
            h |= HF_AVX_EN_MASK;
        }
        if self.io_breakpoint_enabled() {
            h |= HF_IOBPT_MASK;
        }
        h
    }

    /// Whether DR7 enables a breakpoint of the I/O type, which makes TCG check port accesses.
    fn io_breakpoint_enabled(&self) -> bool {
        let dr7 = self.dr[7];
        (0..4).any(|i| {
            let enabled = (dr7 >> (2 * i)) & 3 != 0;
            let kind = (dr7 >> (16 + 4 * i)) & 3;
            enabled && kind == DR7_TYPE_IO_RW
        })
    }
}
