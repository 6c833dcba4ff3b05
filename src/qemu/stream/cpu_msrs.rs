//! Where QEMU's `cpu` section keeps the MSRs of [`QemuCpu::msrs`]: in main fields (MTRRs,
//! machine-check banks, kvmclock, VM_HSAVE_PA) or in the `cpu/*` subsections, whose `needed`
//! compares them with QEMU's reset values. [`msr`] lists every index accepted; any other is
//! [`StreamError::UnsupportedMsr`], rather than state silently dropped.
//!
//! [`QemuCpu::msrs`]: crate::format::native::qemu::QemuCpu::msrs

use super::StreamError;

/// The MSR indexes [`encode_cpu`](crate::qemu::stream::write_cpu::encode_cpu) accepts in
/// [`QemuCpu::msrs`](crate::format::native::qemu::QemuCpu::msrs), and where QEMU keeps them.
pub mod msr {
    /// KVM wall clock, legacy index (`env.wall_clock_msr`, main field).
    pub const KVM_WALL_CLOCK: u32 = 0x11;
    /// KVM system time, legacy index (`env.system_time_msr`, main field).
    pub const KVM_SYSTEM_TIME: u32 = 0x12;
    /// KVM wall clock (`env.wall_clock_msr`, main field); preferred over the legacy index.
    pub const KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    /// KVM system time (`env.system_time_msr`, main field); preferred over the legacy index.
    pub const KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    /// `cpu/async_pf_msr`.
    pub const KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
    /// `cpu/steal_time_msr`.
    pub const KVM_STEAL_TIME: u32 = 0x4b56_4d03;
    /// `cpu/async_pv_eoi_msr`.
    pub const KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
    /// `cpu/poll_control_msr` (QEMU's default is 1).
    pub const KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
    /// `cpu/msr_smi_count`.
    pub const SMI_COUNT: u32 = 0x34;
    /// `cpu/msr_ia32_feature_control`.
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    /// `cpu/msr_tsc_adjust`.
    pub const IA32_TSC_ADJUST: u32 = 0x3b;
    /// `cpu/spec_ctrl`.
    pub const IA32_SPEC_CTRL: u32 = 0x48;
    /// `cpu/umwait` (a u32 in the stream).
    pub const IA32_UMWAIT_CONTROL: u32 = 0xe1;
    /// `env.mcg_cap`, main field.
    pub const MCG_CAP: u32 = 0x179;
    /// `env.mcg_status`, main field.
    pub const MCG_STATUS: u32 = 0x17a;
    /// `env.mcg_ctl`, main field.
    pub const MCG_CTL: u32 = 0x17b;
    /// `cpu/msr_ia32_misc_enable` (QEMU's default is 1).
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// `env.mtrr_var[i]`: base at `MTRR_PHYS_BASE0 + 2i`, mask at `+ 2i + 1`, i < 8.
    pub const MTRR_PHYS_BASE0: u32 = 0x200;
    /// `env.mtrr_fixed[0]`.
    pub const MTRR_FIX64K_00000: u32 = 0x250;
    /// `env.mtrr_fixed[1]`.
    pub const MTRR_FIX16K_80000: u32 = 0x258;
    /// `env.mtrr_fixed[2]`.
    pub const MTRR_FIX16K_A0000: u32 = 0x259;
    /// `env.mtrr_fixed[3..11]`: `0x268..=0x26f`.
    pub const MTRR_FIX4K_C0000: u32 = 0x268;
    /// `env.mtrr_deftype`, main field.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// `env.mce_banks[0..40]`: `0x400..0x428`.
    pub const MC0_CTL: u32 = 0x400;
    /// `cpu/tscdeadline`.
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// `cpu/xss`.
    pub const IA32_XSS: u32 = 0xda0;
    /// `cpu/virt_ssbd`.
    pub const VIRT_SSBD: u32 = 0xc001_011f;
    /// `env.vm_hsave`, main field (SVM host save area).
    pub const VM_HSAVE_PA: u32 = 0xc001_0117;
    /// `cpu/msr_architectural_pmu`: `env.msr_gp_counters[i]` at `P6_PERFCTR0 + i`, i < 18.
    pub const P6_PERFCTR0: u32 = 0xc1;
    /// `cpu/msr_architectural_pmu`: `env.msr_gp_evtsel[i]` at `P6_EVNTSEL0 + i`, i < 18.
    pub const P6_EVNTSEL0: u32 = 0x186;
    /// `cpu/msr_architectural_pmu`: `env.msr_fixed_counters[i]` at `PERF_FIXED_CTR0 + i`, i < 3.
    pub const PERF_FIXED_CTR0: u32 = 0x309;
    /// `cpu/msr_architectural_pmu`.
    pub const PERF_FIXED_CTR_CTRL: u32 = 0x38d;
    /// `cpu/msr_architectural_pmu`.
    pub const PERF_GLOBAL_STATUS: u32 = 0x38e;
    /// `cpu/msr_architectural_pmu`.
    pub const PERF_GLOBAL_CTRL: u32 = 0x38f;
    /// `cpu/msr_architectural_pmu`.
    pub const PERF_GLOBAL_OVF_CTRL: u32 = 0x390;
}

/// QEMU's `MSR_IA32_MISC_ENABLE_DEFAULT`: the value its `needed` compares against.
pub(super) const MISC_ENABLE_DEFAULT: u64 = 1;
/// QEMU's reset value of `env.poll_control_msr`.
pub(super) const POLL_CONTROL_DEFAULT: u64 = 1;
/// `MCE_BANKS_DEF * 4`.
const MCE_BANK_MSRS: usize = 40;
/// `MSR_MTRRcap_VCNT`.
const MTRR_VARS: usize = 8;
/// QEMU 7.2's `MAX_FIXED_COUNTERS`.
const PMU_FIXED_COUNTERS: usize = 3;
/// QEMU 7.2's `MAX_GP_COUNTERS` (`MSR_IA32_PERF_STATUS - MSR_P6_EVNTSEL0`; later QEMUs: 15).
const PMU_GP_COUNTERS: usize = 18;

/// `env.mce_banks` (arrays this long have no `Default`).
#[derive(Debug)]
pub(super) struct MceBanks(pub(super) [u64; MCE_BANK_MSRS]);

impl Default for MceBanks {
    fn default() -> Self {
        MceBanks([0; MCE_BANK_MSRS])
    }
}

/// The MSR-held state of the `cpu` section, with QEMU's reset values where the list has none.
#[derive(Debug, Default)]
pub(super) struct MsrState {
    pub(super) system_time: Option<u64>,
    pub(super) system_time_legacy: u64,
    pub(super) wall_clock: Option<u64>,
    pub(super) wall_clock_legacy: u64,
    pub(super) async_pf: u64,
    pub(super) steal_time: u64,
    pub(super) pv_eoi: u64,
    pub(super) poll_control: Option<u64>,
    pub(super) smi_count: u64,
    pub(super) feature_control: u64,
    pub(super) tsc_adjust: u64,
    pub(super) spec_ctrl: u64,
    pub(super) umwait: u32,
    pub(super) mcg_cap: u64,
    pub(super) mcg_status: u64,
    pub(super) mcg_ctl: u64,
    pub(super) misc_enable: Option<u64>,
    pub(super) mtrr_var: [[u64; 2]; MTRR_VARS],
    pub(super) mtrr_fixed: [u64; 11],
    pub(super) mtrr_deftype: u64,
    pub(super) mce_banks: MceBanks,
    pub(super) tsc_deadline: u64,
    pub(super) xss: u64,
    pub(super) virt_ssbd: u64,
    pub(super) vm_hsave: u64,
    pub(super) pmu: Pmu,
}

/// The `cpu/msr_architectural_pmu` subsection (QEMU 7.2: 3 fixed and 18 general counters).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Pmu {
    pub(super) fixed_ctr_ctrl: u64,
    pub(super) global_ctrl: u64,
    pub(super) global_status: u64,
    pub(super) global_ovf_ctrl: u64,
    pub(super) fixed_counters: [u64; PMU_FIXED_COUNTERS],
    pub(super) gp_counters: [u64; PMU_GP_COUNTERS],
    pub(super) gp_evtsel: [u64; PMU_GP_COUNTERS],
}

impl Pmu {
    /// QEMU's `pmu_enable_needed`.
    pub(super) fn any_set(&self) -> bool {
        [
            self.fixed_ctr_ctrl,
            self.global_ctrl,
            self.global_status,
            self.global_ovf_ctrl,
        ]
        .iter()
        .chain(&self.fixed_counters)
        .chain(&self.gp_counters)
        .chain(&self.gp_evtsel)
        .any(|v| *v != 0)
    }
}

impl MsrState {
    pub(super) fn from_list(list: &[(u32, u64)]) -> Result<MsrState, StreamError> {
        let mut s = MsrState::default();
        for &(index, value) in list {
            match index {
                msr::KVM_SYSTEM_TIME_NEW => s.system_time = Some(value),
                msr::KVM_SYSTEM_TIME => s.system_time_legacy = value,
                msr::KVM_WALL_CLOCK_NEW => s.wall_clock = Some(value),
                msr::KVM_WALL_CLOCK => s.wall_clock_legacy = value,
                msr::KVM_ASYNC_PF_EN => s.async_pf = value,
                msr::KVM_STEAL_TIME => s.steal_time = value,
                msr::KVM_PV_EOI_EN => s.pv_eoi = value,
                msr::KVM_POLL_CONTROL => s.poll_control = Some(value),
                msr::SMI_COUNT => s.smi_count = value,
                msr::IA32_FEATURE_CONTROL => s.feature_control = value,
                msr::IA32_TSC_ADJUST => s.tsc_adjust = value,
                msr::IA32_SPEC_CTRL => s.spec_ctrl = value,
                msr::IA32_UMWAIT_CONTROL => {
                    s.umwait = u32::try_from(value).map_err(|_| StreamError::TooLarge {
                        what: "IA32_UMWAIT_CONTROL (a u32 in QEMU)",
                        value,
                        limit: u64::from(u32::MAX),
                    })?
                }
                msr::MCG_CAP => s.mcg_cap = value,
                msr::MCG_STATUS => s.mcg_status = value,
                msr::MCG_CTL => s.mcg_ctl = value,
                msr::IA32_MISC_ENABLE => s.misc_enable = Some(value),
                i if (msr::MTRR_PHYS_BASE0..msr::MTRR_PHYS_BASE0 + 2 * MTRR_VARS as u32).contains(&i) => {
                    let n = (i - msr::MTRR_PHYS_BASE0) as usize;
                    s.mtrr_var[n / 2][n % 2] = value;
                }
                msr::MTRR_FIX64K_00000 => s.mtrr_fixed[0] = value,
                msr::MTRR_FIX16K_80000 => s.mtrr_fixed[1] = value,
                msr::MTRR_FIX16K_A0000 => s.mtrr_fixed[2] = value,
                i if (msr::MTRR_FIX4K_C0000..msr::MTRR_FIX4K_C0000 + 8).contains(&i) => {
                    s.mtrr_fixed[3 + (i - msr::MTRR_FIX4K_C0000) as usize] = value;
                }
                msr::MTRR_DEF_TYPE => s.mtrr_deftype = value,
                i if (msr::MC0_CTL..msr::MC0_CTL + MCE_BANK_MSRS as u32).contains(&i) => {
                    s.mce_banks.0[(i - msr::MC0_CTL) as usize] = value;
                }
                msr::IA32_TSC_DEADLINE => s.tsc_deadline = value,
                msr::IA32_XSS => s.xss = value,
                msr::VIRT_SSBD => s.virt_ssbd = value,
                msr::VM_HSAVE_PA => s.vm_hsave = value,
                msr::PERF_FIXED_CTR_CTRL => s.pmu.fixed_ctr_ctrl = value,
                msr::PERF_GLOBAL_CTRL => s.pmu.global_ctrl = value,
                msr::PERF_GLOBAL_STATUS => s.pmu.global_status = value,
                msr::PERF_GLOBAL_OVF_CTRL => s.pmu.global_ovf_ctrl = value,
                i if (msr::PERF_FIXED_CTR0..msr::PERF_FIXED_CTR0 + PMU_FIXED_COUNTERS as u32).contains(&i) => {
                    s.pmu.fixed_counters[(i - msr::PERF_FIXED_CTR0) as usize] = value;
                }
                i if (msr::P6_PERFCTR0..msr::P6_PERFCTR0 + PMU_GP_COUNTERS as u32).contains(&i) => {
                    s.pmu.gp_counters[(i - msr::P6_PERFCTR0) as usize] = value;
                }
                i if (msr::P6_EVNTSEL0..msr::P6_EVNTSEL0 + PMU_GP_COUNTERS as u32).contains(&i) => {
                    s.pmu.gp_evtsel[(i - msr::P6_EVNTSEL0) as usize] = value;
                }
                index => return Err(StreamError::UnsupportedMsr { index }),
            }
        }
        Ok(s)
    }
}
