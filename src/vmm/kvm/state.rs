//! One vCPU's state between KVM's ioctl structures and the KVM-shaped native layout.
//!
//! The native layout ([`KvmVcpu`]) is plain data the format module converts to and from the
//! common format; this file is the only place that touches `kvm_bindings` register structures.
//! Capture order follows what the registers depend on: nothing in a GET depends on another,
//! but a SET does — `KVM_SET_SREGS` (CR0/CR4/EFER, APIC base) goes before the MSRs and the
//! LAPIC page, and the pending events go last so that nothing loaded after them clears them.

use kvm_bindings::{
    kvm_dtable, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xsave, Msrs,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
};
use kvm_ioctls::VcpuFd;

use crate::format::native::kvm::{
    KvmDtable, KvmException, KvmInterrupt, KvmMsrEntry, KvmNmi, KvmRegs, KvmSegment, KvmSregs, KvmVcpu, KvmVcpuEvents,
};
use crate::format::{msr_index, LAPIC_REGISTER_BYTES};

/// Errors reading or writing a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// An ioctl failed.
    #[error("{op}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("{op} handled {done} of {asked} MSRs")]
    PartialMsrs {
        /// The ioctl.
        op: &'static str,
        /// MSRs handled.
        done: usize,
        /// MSRs asked for.
        asked: usize,
    },
    /// The state holds something this VM cannot take.
    #[error("vCPU state does not fit: {0}")]
    Unfit(String),
}

/// MSRs worth carrying for a 64-bit guest, beyond those `kvm_sregs` holds: the SYSCALL and
/// SYSENTER set, the swap-GS base, TSC_AUX, PAT and MISC_ENABLE, plus the TSC. Each is kept
/// only if the host's KVM reports it in `KVM_GET_MSR_INDEX_LIST`.
pub const CARRIED_MSRS: [u32; 12] = [
    msr_index::TSC,
    0x1a0, // IA32_MISC_ENABLE
    msr_index::SYSENTER_CS,
    msr_index::SYSENTER_ESP,
    msr_index::SYSENTER_EIP,
    0x277, // IA32_PAT
    msr_index::STAR,
    msr_index::LSTAR,
    msr_index::CSTAR,
    msr_index::SYSCALL_MASK,
    msr_index::KERNEL_GS_BASE,
    msr_index::TSC_AUX,
];

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { op, source }
}

/// The carried MSRs this host supports, ascending (the native layout's order).
pub fn supported_msrs(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm.get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut out: Vec<u32> = CARRIED_MSRS
        .iter()
        .copied()
        .filter(|i| list.as_slice().contains(i))
        .collect();
    out.sort_unstable();
    if !out.contains(&msr_index::TSC) {
        return Err(VcpuStateError::Unfit("KVM does not expose IA32_TSC".into()));
    }
    Ok(out)
}

/// Reads every register of a stopped vCPU.
pub fn capture(vcpu: &VcpuFd, id: u32, msrs: &[u32]) -> Result<KvmVcpu, VcpuStateError> {
    let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
    let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let events = vcpu.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut list = Msrs::from_entries(&entries)
        .map_err(|e| VcpuStateError::Unfit(format!("MSR list of {}: {e:?}", entries.len())))?;
    let done = vcpu.get_msrs(&mut list).map_err(ioctl("KVM_GET_MSRS"))?;
    if done != entries.len() {
        return Err(VcpuStateError::PartialMsrs {
            op: "KVM_GET_MSRS",
            done,
            asked: entries.len(),
        });
    }
    if events.smi.smm != 0 || events.smi.pending != 0 || events.triple_fault.pending != 0 {
        return Err(VcpuStateError::Unfit(
            "vCPU is in or entering SMM, or triple-faulting".into(),
        ));
    }
    Ok(KvmVcpu {
        id,
        regs: regs_from_kvm(&regs),
        sregs: sregs_from_kvm(&sregs),
        msrs: list
            .as_slice()
            .iter()
            .map(|m| KvmMsrEntry {
                index: m.index,
                reserved: m.reserved,
                data: m.data,
            })
            .collect(),
        xsave: xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect(),
        events: events_from_kvm(&events),
        lapic: lapic.regs.iter().map(|&b| b as u8).collect(),
    })
}

/// Writes every register of a stopped vCPU.
pub fn restore(vcpu: &VcpuFd, state: &KvmVcpu) -> Result<(), VcpuStateError> {
    vcpu.set_sregs(&sregs_to_kvm(&state.sregs))
        .map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs_to_kvm(&state.regs))
        .map_err(ioctl("KVM_SET_REGS"))?;
    if !state.xsave.is_empty() {
        let mut xsave = kvm_xsave::default();
        if state.xsave.len() > xsave.region.len() * 4 {
            return Err(VcpuStateError::Unfit(format!(
                "xsave image of {} bytes; this KVM takes {}",
                state.xsave.len(),
                xsave.region.len() * 4
            )));
        }
        for (word, bytes) in xsave.region.iter_mut().zip(state.xsave.chunks(4)) {
            let mut b = [0u8; 4];
            b[..bytes.len()].copy_from_slice(bytes);
            *word = u32::from_le_bytes(b);
        }
        // SAFETY: KVM_SET_XSAVE reads past the 4 KiB of `kvm_xsave` only when the process has
        // enabled XSTATE features dynamically (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM, e.g. for
        // AMX). This VMM never does, so KVM reads exactly `xsave`, which lives for the call.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    }
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            reserved: 0,
            data: m.data,
        })
        .collect();
    let list = Msrs::from_entries(&entries)
        .map_err(|e| VcpuStateError::Unfit(format!("MSR list of {}: {e:?}", entries.len())))?;
    let done = vcpu.set_msrs(&list).map_err(ioctl("KVM_SET_MSRS"))?;
    if done != entries.len() {
        // KVM stops at the first MSR it refuses: name it, it is what the user has to look at.
        let refused = entries.get(done).map(|e| e.index).unwrap_or(0);
        return Err(VcpuStateError::Unfit(format!(
            "KVM_SET_MSRS refused MSR {refused:#x} ({done} of {} written)",
            entries.len()
        )));
    }
    if !state.lapic.is_empty() {
        if state.lapic.len() != LAPIC_REGISTER_BYTES {
            return Err(VcpuStateError::Unfit(format!(
                "LAPIC page of {} bytes",
                state.lapic.len()
            )));
        }
        let mut lapic = kvm_lapic_state::default();
        for (dst, &src) in lapic.regs.iter_mut().zip(&state.lapic) {
            *dst = src as std::os::raw::c_char;
        }
        vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    }
    vcpu.set_vcpu_events(&events_to_kvm(&state.events))
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Builds `$ty` from the same-named fields of `$src`: the KVM structures and the native layout
/// mirror each other field for field, and a missed field must be a compile error.
macro_rules! mirror {
    ($src:expr => $ty:ident { $($field:ident),* $(,)? }) => {
        $ty { $($field: $src.$field),* }
    };
}

macro_rules! regs {
    ($src:expr => $ty:ident) => {
        mirror!($src => $ty {
            rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags,
        })
    };
}

macro_rules! segment {
    ($src:expr => $ty:ident) => {
        mirror!($src => $ty { base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable, padding })
    };
}

macro_rules! sregs {
    ($src:expr => $ty:ident, $seg:ident, $dt:ident) => {{
        let s = $src;
        $ty {
            cs: segment!(s.cs => $seg),
            ds: segment!(s.ds => $seg),
            es: segment!(s.es => $seg),
            fs: segment!(s.fs => $seg),
            gs: segment!(s.gs => $seg),
            ss: segment!(s.ss => $seg),
            tr: segment!(s.tr => $seg),
            ldt: segment!(s.ldt => $seg),
            gdt: mirror!(s.gdt => $dt { base, limit, padding }),
            idt: mirror!(s.idt => $dt { base, limit, padding }),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }};
}

fn regs_from_kvm(r: &kvm_regs) -> KvmRegs {
    regs!(r => KvmRegs)
}

fn regs_to_kvm(r: &KvmRegs) -> kvm_regs {
    regs!(r => kvm_regs)
}

fn sregs_from_kvm(s: &kvm_sregs) -> KvmSregs {
    sregs!(s => KvmSregs, KvmSegment, KvmDtable)
}

fn sregs_to_kvm(s: &KvmSregs) -> kvm_sregs {
    sregs!(s => kvm_sregs, kvm_segment, kvm_dtable)
}

fn events_from_kvm(e: &kvm_vcpu_events) -> KvmVcpuEvents {
    KvmVcpuEvents {
        exception: KvmException {
            injected: e.exception.injected,
            nr: e.exception.nr,
            has_error_code: e.exception.has_error_code,
            pad: 0,
            error_code: e.exception.error_code,
        },
        interrupt: KvmInterrupt {
            injected: e.interrupt.injected,
            nr: e.interrupt.nr,
            soft: e.interrupt.soft,
            shadow: e.interrupt.shadow,
        },
        nmi: KvmNmi {
            injected: e.nmi.injected,
            pending: e.nmi.pending,
            masked: e.nmi.masked,
            pad: e.nmi.pad,
        },
    }
}

fn events_to_kvm(e: &KvmVcpuEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events {
        // Without these flags KVM would ignore the NMI-pending and interrupt-shadow fields and
        // keep whatever the fresh vCPU had.
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    k.exception.injected = e.exception.injected;
    k.exception.nr = e.exception.nr;
    k.exception.has_error_code = e.exception.has_error_code;
    k.exception.error_code = e.exception.error_code;
    k.interrupt.injected = e.interrupt.injected;
    k.interrupt.nr = e.interrupt.nr;
    k.interrupt.soft = e.interrupt.soft;
    k.interrupt.shadow = e.interrupt.shadow;
    k.nmi.injected = e.nmi.injected;
    k.nmi.pending = e.nmi.pending;
    k.nmi.masked = e.nmi.masked;
    k
}
