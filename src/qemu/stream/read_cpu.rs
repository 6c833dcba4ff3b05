//! The `cpu_common`, `cpu` (version 12) and `apic` (version 3) sections into [`QemuCpu`],
//! following target/i386/machine.c (`vmstate_x86_cpu`), cpu/cpu-common.c and
//! hw/intc/apic_common.c.
//!
//! What is carried, and what is not:
//! * every main `cpu` field [`QemuCpu`] has a place for, by name;
//! * MSRs: the `cpu/*` subsections that carry MSRs go into [`QemuCpu::msrs`] with their
//!   architectural index (target/i386/cpu.h), always; the MSR-valued main fields (MTRRs,
//!   MCG_STATUS/MCG_CTL and the MCE banks, the kvmclock MSRs, VM_HSAVE_PA) go there too when
//!   they are not zero, zero being their reset value;
//! * main fields with no place and no guest-visible effect here are read and dropped:
//!   `fpregs_format_vmstate` (must be 0), `sipi_vector` (only meaningful with the refused
//!   `apic_sipi`), `mcg_cap` (a CPU-model capability the destination sets itself), the SVM
//!   nesting fields (`vm_vmcb`, `tsc_offset`, `intercept*`, `v_tpr`: used only while a nested
//!   guest runs, which `hflags` GUEST refuses); `env.error_code` is not in the stream at all
//!   (QEMU carries only `has_error_code`), so [`QemuCpu::error_code`] is 0;
//! * subsections with no guest state: `cpu/tsc_khz` (the TSC frequency the source ran at,
//!   which QEMU only compares with the destination's) and `cpu_common/crash_occurred`
//!   (QEMU's record that the guest reported a panic);
//! * every other subsection is refused by name ([`StreamError::UnsupportedSubsection`]),
//!   among them `cpu/exception_info` (sent only while a nested guest runs),
//!   `cpu/mpx`, `cpu/avx512`, `cpu/pkru` (register state [`QemuCpu`] has no place for),
//!   `cpu/nested_state`, `cpu/svn_npt`, `cpu_common/exception_index` (TCG mid-exception)
//!   and `apic_sipi` (a vCPU waiting for its start-up IPI).

use super::sections::{DeviceSection, DeviceSections, Fields, Value};
use super::StreamError;
use crate::format::native::qemu::{QemuApic, QemuCpu, QemuFpReg, QemuSegment};

/// The `cpu` section version read.
pub const CPU_VERSION: u32 = 12;
/// The `cpu_common` section version read.
pub const CPU_COMMON_VERSION: u32 = 1;
/// The `apic` section version read.
pub const APIC_VERSION: u32 = 3;
/// `HF_GUEST_MASK`: a nested guest is running.
const HF_GUEST: u32 = 1 << 21;

/// IA32_MISC_ENABLE, and QEMU's `MSR_IA32_MISC_ENABLE_DEFAULT` (fast strings on).
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_DEFAULT: u64 = 1;

/// MSR fields: (field, first index, index step per array element).
type MsrFields = &'static [(&'static str, u32, u32)];

/// MSR-carrying `cpu/*` subsections and their fields.
const MSR_SUBSECTIONS: &[(&str, MsrFields)] = &[
    ("cpu/async_pf_msr", &[("env.async_pf_en_msr", 0x4b56_4d02, 1)]),
    ("cpu/async_pv_eoi_msr", &[("env.pv_eoi_en_msr", 0x4b56_4d04, 1)]),
    ("cpu/steal_time_msr", &[("env.steal_time_msr", 0x4b56_4d03, 1)]),
    ("cpu/poll_control_msr", &[("env.poll_control_msr", 0x4b56_4d05, 1)]),
    ("cpu/msr_tsc_adjust", &[("env.tsc_adjust", 0x3b, 1)]),
    ("cpu/msr_tscdeadline", &[("env.tsc_deadline", 0x6e0, 1)]),
    ("cpu/msr_ia32_misc_enable", &[("env.msr_ia32_misc_enable", 0x1a0, 1)]),
    (
        "cpu/msr_ia32_feature_control",
        &[("env.msr_ia32_feature_control", 0x3a, 1)],
    ),
    (
        "cpu/msr_architectural_pmu",
        &[
            ("env.msr_fixed_ctr_ctrl", 0x38d, 1),
            ("env.msr_global_ctrl", 0x38f, 1),
            ("env.msr_global_status", 0x38e, 1),
            ("env.msr_global_ovf_ctrl", 0x390, 1),
            ("env.msr_fixed_counters", 0x309, 1),
            ("env.msr_gp_counters", 0xc1, 1),
            ("env.msr_gp_evtsel", 0x186, 1),
        ],
    ),
    (
        "cpu/msr_hyperv_hypercall",
        &[
            ("env.msr_hv_guest_os_id", 0x4000_0000, 1),
            ("env.msr_hv_hypercall", 0x4000_0001, 1),
        ],
    ),
    ("cpu/msr_hyperv_vapic", &[("env.msr_hv_vapic", 0x4000_0073, 1)]),
    ("cpu/msr_hyperv_time", &[("env.msr_hv_tsc", 0x4000_0021, 1)]),
    ("cpu/msr_hyperv_crash", &[("env.msr_hv_crash_params", 0x4000_0100, 1)]),
    ("cpu/msr_hyperv_runtime", &[("env.msr_hv_runtime", 0x4000_0010, 1)]),
    (
        "cpu/msr_hyperv_synic",
        &[
            ("env.msr_hv_synic_control", 0x4000_0080, 1),
            ("env.msr_hv_synic_evt_page", 0x4000_0082, 1),
            ("env.msr_hv_synic_msg_page", 0x4000_0083, 1),
            ("env.msr_hv_synic_sint", 0x4000_0090, 1),
        ],
    ),
    (
        "cpu/msr_hyperv_stimer",
        &[
            ("env.msr_hv_stimer_config", 0x4000_00b0, 2),
            ("env.msr_hv_stimer_count", 0x4000_00b1, 2),
        ],
    ),
    (
        "cpu/msr_hyperv_reenlightenment",
        &[
            ("env.msr_hv_reenlightenment_control", 0x4000_0106, 1),
            ("env.msr_hv_tsc_emulation_control", 0x4000_0107, 1),
            ("env.msr_hv_tsc_emulation_status", 0x4000_0108, 1),
        ],
    ),
    ("cpu/xss", &[("env.xss", 0xda0, 1)]),
    ("cpu/umwait", &[("env.umwait", 0xe1, 1)]),
    ("cpu/msr_smi_count", &[("env.msr_smi_count", 0x34, 1)]),
    ("cpu/spec_ctrl", &[("env.spec_ctrl", 0x48, 1)]),
    ("cpu/mcg_ext_ctl", &[("env.mcg_ext_ctl", 0x4d0, 1)]),
    (
        "cpu/intel_pt",
        &[
            ("env.msr_rtit_ctrl", 0x570, 1),
            ("env.msr_rtit_status", 0x571, 1),
            ("env.msr_rtit_output_base", 0x560, 1),
            ("env.msr_rtit_output_mask", 0x561, 1),
            ("env.msr_rtit_cr3_match", 0x572, 1),
            ("env.msr_rtit_addrs", 0x580, 1),
        ],
    ),
    ("cpu/virt_ssbd", &[("env.virt_ssbd", 0xc001_011f, 1)]),
];

/// MSR-valued main `cpu` fields, carried when not zero: (field, first index, step).
const MAIN_MSRS: MsrFields = &[
    ("env.mtrr_deftype", 0x2ff, 1),
    ("env.mcg_status", 0x17a, 1),
    ("env.mcg_ctl", 0x17b, 1),
    // MC0_CTL, MC0_STATUS, MC0_ADDR, MC0_MISC, MC1_CTL, ...: QEMU keeps them in that order.
    ("env.mce_banks", 0x400, 1),
    // QEMU keeps the values of the kvmclock MSRs under their new (0x4b564dxx) numbers.
    ("env.wall_clock_msr", 0x4b56_4d00, 1),
    ("env.system_time_msr", 0x4b56_4d01, 1),
    ("env.vm_hsave", 0xc001_0117, 1),
];

/// The fixed-range MTRRs in `env.mtrr_fixed` order: 64K_00000, 16K_80000, 16K_A0000, then
/// the eight 4K ranges.
const MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];

/// Subsections accepted without carrying anything (see the module doc).
const IGNORED_SUBSECTIONS: [&str; 2] = ["cpu/tsc_khz", "cpu_common/crash_occurred"];

/// One [`QemuCpu`] per `cpu` section, in ascending instance order, each with the
/// `cpu_common` and (if present) `apic` sections of the same instance.
pub fn cpus_from_sections(d: &DeviceSections) -> Result<Vec<QemuCpu>, StreamError> {
    let mut cpus: Vec<&DeviceSection> = d.sections.iter().filter(|s| s.idstr == "cpu").collect();
    if cpus.is_empty() {
        return Err(StreamError::MissingSection { name: "cpu".into() });
    }
    cpus.sort_by_key(|s| s.instance_id);
    cpus.iter()
        .map(|cpu| {
            let n = cpu.instance_id;
            let common = d.find("cpu_common", n).ok_or_else(|| StreamError::MissingSection {
                name: format!("cpu_common instance {n}"),
            })?;
            let apic = d.find("apic", n).map(apic_from).transpose()?;
            cpu_from(common, cpu, apic)
        })
        .collect()
}

fn version(s: &DeviceSection, want: u32) -> Result<(), StreamError> {
    if s.version_id == want {
        Ok(())
    } else {
        Err(StreamError::UnsupportedState {
            what: format!("{} section version {} ({} is read)", s.idstr, s.version_id, want),
        })
    }
}

fn cpu_from(common: &DeviceSection, cpu: &DeviceSection, apic: Option<QemuApic>) -> Result<QemuCpu, StreamError> {
    version(common, CPU_COMMON_VERSION)?;
    version(cpu, CPU_VERSION)?;
    for sub in common.fields.subsections() {
        if !IGNORED_SUBSECTIONS.contains(&sub.name()) {
            return Err(StreamError::UnsupportedSubsection {
                name: sub.name().into(),
            });
        }
    }
    let f = &cpu.fields;
    let hflags: u32 = f.uint("env.hflags")?;
    if hflags & HF_GUEST != 0 {
        return Err(StreamError::UnsupportedState {
            what: format!("a nested guest running (hflags {hflags:#x})"),
        });
    }
    let fmt = f.u64("env.fpregs_format_vmstate")?;
    if fmt != 0 {
        return Err(StreamError::UnsupportedState {
            what: format!("fpregs format {fmt} (only softfloat, 0, exists)"),
        });
    }
    let fpregs = f
        .struct_array("env.fpregs")?
        .into_iter()
        .map(|r| {
            let t = r.structure("tmp")?;
            Ok(QemuFpReg {
                mantissa: t.u64("tmp_mant")?,
                exponent: t.uint("tmp_exp")?,
            })
        })
        .collect::<Result<Vec<_>, StreamError>>()?;
    let segs = f
        .struct_array("env.segs")?
        .into_iter()
        .map(segment)
        .collect::<Result<Vec<_>, StreamError>>()?;
    let xmm = pairs(f, "env.xmm_regs[0]", "_q_ZMMReg[0]", "_q_ZMMReg[1]")?;
    let ymmh = pairs(f, "env.xmm_regs[1]", "_q_ZMMReg[2]", "_q_ZMMReg[3]")?;
    let mut out = QemuCpu {
        halted: common.fields.uint("halted")?,
        interrupt_request: common.fields.uint("interrupt_request")?,
        regs: fixed(f.u64_array("env.regs")?, "env.regs", f)?,
        eip: f.u64("env.eip")?,
        eflags: f.u64("env.eflags")?,
        hflags,
        hflags2: f.uint("env.hflags2")?,
        fpuc: f.uint("env.fpuc")?,
        fpus: f.uint("env.fpus_vmstate")?,
        fptag: f.uint("env.fptag_vmstate")?,
        fpregs: fixed(fpregs, "env.fpregs", f)?,
        fpop: 0,
        fpip: 0,
        fpdp: 0,
        segs: fixed(segs, "env.segs", f)?,
        ldt: segment(f.structure("env.ldt")?)?,
        tr: segment(f.structure("env.tr")?)?,
        gdt: segment(f.structure("env.gdt")?)?,
        idt: segment(f.structure("env.idt")?)?,
        sysenter_cs: f.uint("env.sysenter_cs")?,
        sysenter_esp: f.u64("env.sysenter_esp")?,
        sysenter_eip: f.u64("env.sysenter_eip")?,
        cr0: f.u64("env.cr[0]")?,
        cr2: f.u64("env.cr[2]")?,
        cr3: f.u64("env.cr[3]")?,
        cr4: f.u64("env.cr[4]")?,
        dr: fixed(f.u64_array("env.dr")?, "env.dr", f)?,
        a20_mask: int(f, "env.a20_mask")?,
        mxcsr: f.uint("env.mxcsr")?,
        xmm,
        ymmh,
        efer: f.u64("env.efer")?,
        star: f.u64("env.star")?,
        lstar: f.u64("env.lstar")?,
        cstar: f.u64("env.cstar")?,
        fmask: f.u64("env.fmask")?,
        kernelgsbase: f.u64("env.kernelgsbase")?,
        smbase: f.uint("env.smbase")?,
        pat: f.u64("env.pat")?,
        tsc: f.u64("env.tsc")?,
        tsc_aux: f.u64("env.tsc_aux")?,
        xcr0: f.u64("env.xcr0")?,
        xstate_bv: f.u64("env.xstate_bv")?,
        interrupt_injected: int(f, "env.interrupt_injected")?,
        mp_state: f.uint("env.mp_state")?,
        exception_nr: int(f, "env.exception_nr")?,
        has_error_code: f.uint("env.has_error_code")?,
        error_code: 0,
        soft_interrupt: f.uint("env.soft_interrupt")?,
        nmi_injected: f.uint("env.nmi_injected")?,
        nmi_pending: f.uint("env.nmi_pending")?,
        msrs: Vec::new(),
        apic,
    };
    let mut msrs: Vec<(u32, u64)> = Vec::new();
    for &(name, first, step) in MAIN_MSRS {
        msr_values(f, name, first, step, &mut msrs)?;
    }
    for (i, v) in f.u64_array("env.mtrr_fixed")?.into_iter().enumerate() {
        let index = MTRR_FIXED.get(i).copied().ok_or_else(|| StreamError::Malformed {
            at: f.get("env.mtrr_fixed").map_or(0, Value::offset),
            what: format!("env.mtrr_fixed has more than {} entries", MTRR_FIXED.len()),
        })?;
        msrs.push((index, v));
    }
    for (i, var) in f.struct_array("env.mtrr_var")?.into_iter().enumerate() {
        let i = i as u32;
        msrs.push((0x200 + 2 * i, var.u64("base")?));
        msrs.push((0x201 + 2 * i, var.u64("mask")?));
    }
    msrs.retain(|&(_, v)| v != 0);
    for sub in f.subsections() {
        let name = sub.name();
        if name == "cpu/fpop_ip_dp" {
            out.fpop = sub.uint("env.fpop")?;
            out.fpip = sub.u64("env.fpip")?;
            out.fpdp = sub.u64("env.fpdp")?;
        } else if let Some((_, list)) = MSR_SUBSECTIONS.iter().find(|(n, _)| *n == name) {
            // Carried as sent, zero included: the subsection says the value matters.
            for &(field, first, step) in *list {
                msr_values(sub, field, first, step, &mut msrs)?;
            }
        } else if !IGNORED_SUBSECTIONS.contains(&name) {
            return Err(StreamError::UnsupportedSubsection { name: name.into() });
        }
    }
    // QEMU sends these subsections only when the value differs from its default, so an absent
    // one says the MSR holds the default (`*_needed` in target/i386/machine.c).
    for (index, default) in [(MSR_IA32_MISC_ENABLE, MISC_ENABLE_DEFAULT)] {
        if !msrs.iter().any(|&(i, _)| i == index) {
            msrs.push((index, default));
        }
    }
    msrs.sort_unstable_by_key(|&(i, _)| i);
    if let Some(w) = msrs.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(StreamError::UnsupportedState {
            what: format!("MSR {:#x} carried twice", w[0].0),
        });
    }
    out.msrs = msrs;
    Ok(out)
}

/// Pushes the value(s) of `name` (a scalar or an array) with indices `first + step * i`.
fn msr_values(f: &Fields, name: &str, first: u32, step: u32, out: &mut Vec<(u32, u64)>) -> Result<(), StreamError> {
    let v = f.get(name)?;
    let values: Vec<u64> = match v {
        Value::Array(_) => f.u64_array(name)?,
        _ => vec![f.u64(name)?],
    };
    for (i, value) in values.into_iter().enumerate() {
        let index = u32::try_from(i)
            .ok()
            .and_then(|i| i.checked_mul(step))
            .and_then(|o| first.checked_add(o))
            .ok_or_else(|| StreamError::Malformed {
                at: v.offset(),
                what: format!("{name} has too many entries"),
            })?;
        out.push((index, value));
    }
    Ok(())
}

fn segment(s: &Fields) -> Result<QemuSegment, StreamError> {
    Ok(QemuSegment {
        selector: s.uint("selector")?,
        base: s.u64("base")?,
        limit: s.uint("limit")?,
        flags: s.uint("flags")?,
    })
}

/// An int32 field.
fn int(f: &Fields, name: &str) -> Result<i32, StreamError> {
    let v = f.i64(name)?;
    i32::try_from(v).map_err(|_| StreamError::Malformed {
        at: f.get(name).map_or(0, Value::offset),
        what: format!("{name} {v} is not an int32"),
    })
}

/// The 16 (lo, hi) u64 pairs of an xmm/ymmh struct array.
fn pairs(f: &Fields, name: &str, lo: &str, hi: &str) -> Result<[[u64; 2]; 16], StreamError> {
    let v = f
        .struct_array(name)?
        .into_iter()
        .map(|r| Ok([r.u64(lo)?, r.u64(hi)?]))
        .collect::<Result<Vec<_>, StreamError>>()?;
    fixed(v, name, f)
}

/// A vector of exactly `N` elements as an array.
fn fixed<T, const N: usize>(v: Vec<T>, name: &str, f: &Fields) -> Result<[T; N], StreamError> {
    let len = v.len();
    v.try_into().map_err(|_| StreamError::Malformed {
        at: f.get(name).map_or(0, Value::offset),
        what: format!("{name} has {len} elements, {N} expected"),
    })
}

fn apic_from(s: &DeviceSection) -> Result<QemuApic, StreamError> {
    version(s, APIC_VERSION)?;
    if let Some(sub) = s.fields.subsections().first() {
        return Err(StreamError::UnsupportedSubsection {
            name: sub.name().into(),
        });
    }
    let f = &s.fields;
    let words = |name: &str| -> Result<Vec<u32>, StreamError> {
        f.u64_array(name)?
            .into_iter()
            .map(|v| {
                u32::try_from(v).map_err(|_| StreamError::Malformed {
                    at: f.get(name).map_or(0, Value::offset),
                    what: format!("{name} element {v:#x} is not a u32"),
                })
            })
            .collect()
    };
    Ok(QemuApic {
        apicbase: f.uint("apicbase")?,
        id: f.uint("id")?,
        arb_id: f.uint("arb_id")?,
        tpr: f.uint("tpr")?,
        spurious_vec: f.uint("spurious_vec")?,
        log_dest: f.uint("log_dest")?,
        dest_mode: f.uint("dest_mode")?,
        isr: fixed(words("isr")?, "isr", f)?,
        tmr: fixed(words("tmr")?, "tmr", f)?,
        irr: fixed(words("irr")?, "irr", f)?,
        lvt: fixed(words("lvt")?, "lvt", f)?,
        esr: f.uint("esr")?,
        icr: fixed(words("icr")?, "icr", f)?,
        divide_conf: f.uint("divide_conf")?,
        count_shift: int(f, "count_shift")?,
        initial_count: f.uint("initial_count")?,
        initial_count_load_time: f.i64("initial_count_load_time")?,
        next_time: f.i64("next_time")?,
    })
}
