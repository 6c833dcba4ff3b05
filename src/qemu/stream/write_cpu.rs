//! The device sections of one vCPU as QEMU 7.2 loads them: `cpu_common` (version 1), `cpu`
//! (version 12, `target/i386/machine.c`'s `vmstate_x86_cpu`) and `apic` (version 3,
//! `hw/intc/apic_common.c`), each encoded together with its entry of the JSON device description
//! QEMU appends after `QEMU_VM_EOF` (`docs/devel/migration.rst`, "VMState description").
//!
//! A VMState section has no field names or lengths in the stream: the loader walks its own field
//! list, so every field must be here, in QEMU's order and width. Fields a [`QemuCpu`] does not
//! have are written as a freshly reset QEMU vCPU would hold them (zero, or -1 for the timer
//! expiry); state QEMU keeps in MSRs is taken from [`QemuCpu::msrs`] (see [`super::cpu_msrs`]). Optional state goes in subsections, written only when QEMU's `needed`
//! would be true for the same values, so that the loader keeps its defaults otherwise.

use serde_json::{json, Value};

pub use super::cpu_msrs::msr;
use super::cpu_msrs::{MsrState, MISC_ENABLE_DEFAULT, POLL_CONTROL_DEFAULT};
use super::{kind, StreamError};
use crate::format::native::qemu::{QemuApic, QemuCpu, QemuSegment};

/// Section versions this module writes.
pub const CPU_COMMON_VERSION: u32 = 1;
/// `vmstate_x86_cpu.version_id` since QEMU 1.x.
pub const CPU_VERSION: u32 = 12;
/// `vmstate_apic_common.version_id`.
pub const APIC_VERSION: u32 = 3;

/// `APIC_LVT_MASKED` in the timer LVT.
const APIC_LVT_MASKED: u32 = 1 << 16;

/// One device section's body and its entry in the device description, ready to be framed as a
/// `QEMU_VM_SECTION_FULL`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSection {
    /// The section's idstr (`cpu_common`, `cpu`, `apic`).
    pub idstr: &'static str,
    /// Its instance id: the vCPU index (the APIC ID for `apic`, the same for these vCPUs).
    pub instance_id: u32,
    /// The section version.
    pub version_id: u32,
    /// The VMState body: fields, then subsections.
    pub body: Vec<u8>,
    /// The device's entry of the description's `devices` list.
    pub description: Value,
}

/// Encodes vCPU `index` as its `cpu_common`, `cpu` and (if it has one) `apic` sections, in the
/// order QEMU writes them. Fails with [`StreamError::UnsupportedMsr`] for an MSR the `cpu`
/// section cannot carry (rather than dropping guest state).
pub fn encode_cpu(index: u32, cpu: &QemuCpu) -> Result<Vec<EncodedSection>, StreamError> {
    let msrs = MsrState::from_list(&cpu.msrs)?;
    let mut sections = vec![
        encode_section("cpu_common", index, CPU_COMMON_VERSION, |f| {
            f.put("halted", cpu.halted);
            f.put("interrupt_request", cpu.interrupt_request);
            Vec::new()
        }),
        encode_section("cpu", index, CPU_VERSION, |f| {
            cpu_fields(f, cpu, &msrs);
            cpu_subsections(cpu, &msrs)
        }),
    ];
    if let Some(apic) = &cpu.apic {
        sections.push(encode_section("apic", index, APIC_VERSION, |f| {
            apic_fields(f, apic);
            Vec::new()
        }));
    }
    Ok(sections)
}

/// `vmstate_x86_cpu`'s fields, version 12, in its order.
fn cpu_fields(f: &mut Fields<'_>, cpu: &QemuCpu, m: &MsrState) {
    f.array("env.regs", &cpu.regs);
    f.put("env.eip", cpu.eip);
    f.put("env.eflags", cpu.eflags);
    f.put("env.hflags", cpu.hflags);
    f.put("env.fpuc", cpu.fpuc);
    f.put("env.fpus_vmstate", cpu.fpus);
    f.put("env.fptag_vmstate", cpu.fptag);
    // 0: the softfloat 80-bit format; QEMU refuses any other.
    f.put("env.fpregs_format_vmstate", 0u16);
    f.struct_array("env.fpregs", "fpreg", 0, &cpu.fpregs, |f, reg| {
        f.tmp("fpreg_tmp", 0, |f| {
            f.put("tmp_mant", reg.mantissa);
            f.put("tmp_exp", reg.exponent);
        })
    });
    f.struct_array("env.segs", "segment", 1, &cpu.segs, segment);
    for (name, seg) in [
        ("env.ldt", &cpu.ldt),
        ("env.tr", &cpu.tr),
        ("env.gdt", &cpu.gdt),
        ("env.idt", &cpu.idt),
    ] {
        f.structure(name, "segment", 1, |f| segment(f, seg));
    }
    f.put("env.sysenter_cs", cpu.sysenter_cs);
    f.put("env.sysenter_esp", cpu.sysenter_esp);
    f.put("env.sysenter_eip", cpu.sysenter_eip);
    f.put("env.cr[0]", cpu.cr0);
    f.put("env.cr[2]", cpu.cr2);
    f.put("env.cr[3]", cpu.cr3);
    f.put("env.cr[4]", cpu.cr4);
    f.array("env.dr", &cpu.dr);
    f.put("env.a20_mask", cpu.a20_mask);
    f.put("env.mxcsr", cpu.mxcsr);
    // QEMU's description names both halves of xmm_regs by their sub-array start; the second
    // gets "[1]" (the names are what its description says, not C expressions).
    f.struct_array("env.xmm_regs[0]", "xmm_reg", 1, &cpu.xmm, |f, q| {
        f.put("_q_ZMMReg[0]", q[0]);
        f.put("_q_ZMMReg[1]", q[1]);
    });
    f.put("env.efer", cpu.efer);
    f.put("env.star", cpu.star);
    f.put("env.lstar", cpu.lstar);
    f.put("env.cstar", cpu.cstar);
    f.put("env.fmask", cpu.fmask);
    f.put("env.kernelgsbase", cpu.kernelgsbase);
    f.put("env.smbase", cpu.smbase);
    f.put("env.pat", cpu.pat);
    f.put("env.hflags2", cpu.hflags2);
    // SVM: no nested guest is carried (the host save area's address is an MSR).
    f.put("env.vm_hsave", m.vm_hsave);
    f.put("env.vm_vmcb", 0u64);
    f.put("env.tsc_offset", 0u64);
    f.put("env.intercept", 0u64);
    f.put("env.intercept_cr_read", 0u16);
    f.put("env.intercept_cr_write", 0u16);
    f.put("env.intercept_dr_read", 0u16);
    f.put("env.intercept_dr_write", 0u16);
    f.put("env.intercept_exceptions", 0u32);
    f.put("env.v_tpr", 0u8);
    f.array("env.mtrr_fixed", &m.mtrr_fixed);
    f.put("env.mtrr_deftype", m.mtrr_deftype);
    f.struct_array("env.mtrr_var", "mtrr_var", 1, &m.mtrr_var, |f, v| {
        f.put("base", v[0]);
        f.put("mask", v[1]);
    });
    f.put("env.interrupt_injected", cpu.interrupt_injected);
    f.put("env.mp_state", cpu.mp_state);
    f.put("env.tsc", cpu.tsc);
    f.put("env.exception_nr", cpu.exception_nr);
    f.put("env.soft_interrupt", cpu.soft_interrupt);
    f.put("env.nmi_injected", cpu.nmi_injected);
    f.put("env.nmi_pending", cpu.nmi_pending);
    f.put("env.has_error_code", cpu.has_error_code);
    f.put("env.sipi_vector", 0u32);
    f.put("env.mcg_cap", m.mcg_cap);
    f.put("env.mcg_status", m.mcg_status);
    f.put("env.mcg_ctl", m.mcg_ctl);
    f.array("env.mce_banks", &m.mce_banks.0);
    f.put("env.tsc_aux", cpu.tsc_aux);
    f.put("env.system_time_msr", m.system_time.unwrap_or(m.system_time_legacy));
    f.put("env.wall_clock_msr", m.wall_clock.unwrap_or(m.wall_clock_legacy));
    f.put("env.xcr0", cpu.xcr0);
    f.put("env.xstate_bv", cpu.xstate_bv);
    f.struct_array("env.xmm_regs[1]", "ymmh_reg", 1, &cpu.ymmh, |f, q| {
        f.put("_q_ZMMReg[2]", q[0]);
        f.put("_q_ZMMReg[3]", q[1]);
    });
}

fn segment(f: &mut Fields<'_>, s: &QemuSegment) {
    f.put("selector", s.selector);
    f.put("base", s.base);
    f.put("limit", s.limit);
    f.put("flags", s.flags);
}

/// A subsection to write: its name, version and fields.
type Subsection<'c> = (&'static str, u32, Box<dyn Fn(&mut Fields<'_>) + 'c>);

/// The `cpu` subsections whose `needed` QEMU would find true, in `vmstate_x86_cpu`'s order.
fn cpu_subsections<'c>(cpu: &'c QemuCpu, m: &MsrState) -> Vec<Subsection<'c>> {
    let mut subs: Vec<Subsection<'c>> = Vec::new();
    let s = &mut subs;
    single(
        s,
        "cpu/async_pf_msr",
        "env.async_pf_en_msr",
        m.async_pf,
        m.async_pf != 0,
    );
    single(s, "cpu/async_pv_eoi_msr", "env.pv_eoi_en_msr", m.pv_eoi, m.pv_eoi != 0);
    single(
        s,
        "cpu/steal_time_msr",
        "env.steal_time_msr",
        m.steal_time,
        m.steal_time != 0,
    );
    let poll = m.poll_control.unwrap_or(POLL_CONTROL_DEFAULT);
    single(
        s,
        "cpu/poll_control_msr",
        "env.poll_control_msr",
        poll,
        poll != POLL_CONTROL_DEFAULT,
    );
    if cpu.fpop != 0 || cpu.fpip != 0 || cpu.fpdp != 0 {
        s.push((
            "cpu/fpop_ip_dp",
            1,
            Box::new(move |f| {
                f.put("env.fpop", cpu.fpop);
                f.put("env.fpip", cpu.fpip);
                f.put("env.fpdp", cpu.fpdp);
            }),
        ));
    }
    single(
        s,
        "cpu/msr_tsc_adjust",
        "env.tsc_adjust",
        m.tsc_adjust,
        m.tsc_adjust != 0,
    );
    single(
        s,
        "cpu/msr_tscdeadline",
        "env.tsc_deadline",
        m.tsc_deadline,
        m.tsc_deadline != 0,
    );
    let misc = m.misc_enable.unwrap_or(MISC_ENABLE_DEFAULT);
    single(
        s,
        "cpu/msr_ia32_misc_enable",
        "env.msr_ia32_misc_enable",
        misc,
        misc != MISC_ENABLE_DEFAULT,
    );
    single(
        s,
        "cpu/msr_ia32_feature_control",
        "env.msr_ia32_feature_control",
        m.feature_control,
        m.feature_control != 0,
    );
    let pmu = m.pmu;
    if pmu.any_set() {
        s.push((
            "cpu/msr_architectural_pmu",
            1,
            Box::new(move |f| {
                f.put("env.msr_fixed_ctr_ctrl", pmu.fixed_ctr_ctrl);
                f.put("env.msr_global_ctrl", pmu.global_ctrl);
                f.put("env.msr_global_status", pmu.global_status);
                f.put("env.msr_global_ovf_ctrl", pmu.global_ovf_ctrl);
                f.array("env.msr_fixed_counters", &pmu.fixed_counters);
                f.array("env.msr_gp_counters", &pmu.gp_counters);
                f.array("env.msr_gp_evtsel", &pmu.gp_evtsel);
            }),
        ));
    }
    single(s, "cpu/xss", "env.xss", m.xss, m.xss != 0);
    if m.umwait != 0 {
        let umwait = m.umwait;
        s.push(("cpu/umwait", 1, Box::new(move |f| f.put("env.umwait", umwait))));
    }
    // QEMU 7.2 machines migrate the SMI count (`migrate-smi-count` defaults on).
    single(
        s,
        "cpu/msr_smi_count",
        "env.msr_smi_count",
        m.smi_count,
        m.smi_count != 0,
    );
    single(s, "cpu/spec_ctrl", "env.spec_ctrl", m.spec_ctrl, m.spec_ctrl != 0);
    single(s, "cpu/virt_ssbd", "env.virt_ssbd", m.virt_ssbd, m.virt_ssbd != 0);
    subs
}

/// A subsection of one u64 field, when `needed`.
fn single(subs: &mut Vec<Subsection<'_>>, name: &'static str, field: &'static str, value: u64, needed: bool) {
    if needed {
        subs.push((name, 1, Box::new(move |f| f.put(field, value))));
    }
}

/// `vmstate_apic_common`'s fields, version 3.
fn apic_fields(f: &mut Fields<'_>, a: &QemuApic) {
    f.put("apicbase", a.apicbase);
    f.put("id", a.id);
    f.put("arb_id", a.arb_id);
    f.put("tpr", a.tpr);
    f.put("spurious_vec", a.spurious_vec);
    f.put("log_dest", a.log_dest);
    f.put("dest_mode", a.dest_mode);
    f.array("isr", &a.isr);
    f.array("tmr", &a.tmr);
    f.array("irr", &a.irr);
    f.array("lvt", &a.lvt);
    f.put("esr", a.esr);
    f.array("icr", &a.icr);
    f.put("divide_conf", a.divide_conf);
    f.put("count_shift", a.count_shift);
    f.put("initial_count", a.initial_count);
    f.put("initial_count_load_time", a.initial_count_load_time);
    f.put("next_time", a.next_time);
    f.put("timer_expiry", apic_timer_expiry(a));
}

/// The open-coded timer state QEMU saves: the expiry of an armed timer, -1 for none. The timer
/// runs while its LVT entry is unmasked and an initial count is loaded.
fn apic_timer_expiry(a: &QemuApic) -> i64 {
    if a.lvt[0] & APIC_LVT_MASKED == 0 && a.initial_count != 0 {
        a.next_time
    } else {
        -1
    }
}

/// Encodes one section: `fields` writes the main fields and returns the subsections to append.
fn encode_section<'c>(
    idstr: &'static str,
    instance_id: u32,
    version_id: u32,
    fields: impl FnOnce(&mut Fields<'_>) -> Vec<Subsection<'c>>,
) -> EncodedSection {
    let mut body = Vec::with_capacity(2048);
    let mut f = Fields::new(&mut body);
    let subsections = fields(&mut f);
    let main = f.finish();
    let mut sub_desc = Vec::with_capacity(subsections.len());
    for (name, version, write) in subsections {
        body.push(kind::SUBSECTION);
        // Names are compile-time constants well under 256 bytes.
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&version.to_be_bytes());
        let mut f = Fields::new(&mut body);
        write(&mut f);
        sub_desc.push(json!({ "vmsd_name": name, "version": version, "fields": f.finish() }));
    }
    let mut description = json!({
        "name": idstr,
        "instance_id": instance_id,
        "vmsd_name": idstr,
        "version": version_id,
        "fields": main,
    });
    if !sub_desc.is_empty() {
        description["subsections"] = Value::Array(sub_desc);
    }
    EncodedSection {
        idstr,
        instance_id,
        version_id,
        body,
        description,
    }
}

/// A scalar VMState type: its big-endian encoding and its name in the description.
trait Scalar: Copy {
    const TYPE: &'static str;
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! scalar {
    ($t:ty, $name:literal) => {
        impl Scalar for $t {
            const TYPE: &'static str = $name;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
        }
    };
}
scalar!(u8, "uint8");
scalar!(u16, "uint16");
scalar!(u32, "uint32");
scalar!(i32, "int32");
scalar!(u64, "uint64");
scalar!(i64, "int64");

/// Writes fields into a section body and collects their description, as QEMU's
/// `vmstate_save_state` does side by side.
struct Fields<'b> {
    body: &'b mut Vec<u8>,
    desc: Vec<Value>,
}

impl<'b> Fields<'b> {
    fn new(body: &'b mut Vec<u8>) -> Self {
        Fields { body, desc: Vec::new() }
    }

    fn finish(self) -> Vec<Value> {
        self.desc
    }

    fn put<T: Scalar>(&mut self, name: &str, value: T) {
        value.put(self.body);
        self.desc
            .push(json!({ "name": name, "type": T::TYPE, "size": T::SIZE }));
    }

    fn array<T: Scalar>(&mut self, name: &str, values: &[T]) {
        for v in values {
            v.put(self.body);
        }
        self.desc.push(json!({
            "name": name, "array_len": values.len(), "type": T::TYPE, "size": T::SIZE,
        }));
    }

    /// A struct field; the description is that of its fields (QEMU describes an array of
    /// structs by its first element).
    fn struct_desc(&mut self, write: impl FnOnce(&mut Fields<'_>)) -> (Vec<Value>, usize) {
        let start = self.body.len();
        let mut inner = Fields::new(self.body);
        write(&mut inner);
        let fields = inner.finish();
        (fields, self.body.len() - start)
    }

    fn structure(&mut self, name: &str, vmsd: &str, version: u32, write: impl FnOnce(&mut Fields<'_>)) {
        let (fields, size) = self.struct_desc(write);
        self.desc.push(json!({
            "name": name, "type": "struct",
            "struct": { "vmsd_name": vmsd, "version": version, "fields": fields },
            "size": size,
        }));
    }

    fn struct_array<T>(
        &mut self,
        name: &str,
        vmsd: &str,
        version: u32,
        items: &[T],
        write: impl Fn(&mut Fields<'_>, &T),
    ) {
        let mut first = None;
        for item in items {
            let (fields, size) = self.struct_desc(|f| write(f, item));
            first.get_or_insert((fields, size));
        }
        let (fields, size) = first.unwrap_or_default();
        self.desc.push(json!({
            "name": name, "array_len": items.len(), "type": "struct",
            "struct": { "vmsd_name": vmsd, "version": version, "fields": fields },
            "size": size,
        }));
    }

    /// `VMSTATE_WITH_TMP`: fields of a temporary struct, described inline.
    fn tmp(&mut self, vmsd: &str, version: u32, write: impl FnOnce(&mut Fields<'_>)) {
        let (fields, size) = self.struct_desc(write);
        self.desc.push(json!({
            "name": "tmp", "type": "tmp", "vmsd_name": vmsd, "version": version,
            "fields": fields, "size": size,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::native::qemu::QemuFpReg;

    pub(crate) fn sample_cpu() -> QemuCpu {
        QemuCpu {
            halted: 0,
            interrupt_request: 0,
            regs: [0; 16],
            eip: 0x10_0000,
            eflags: 2,
            hflags: 0,
            hflags2: 1,
            fpuc: 0x37f,
            fpus: 0,
            fptag: 0,
            fpregs: [QemuFpReg::default(); 8],
            fpop: 0,
            fpip: 0,
            fpdp: 0,
            segs: [QemuSegment::default(); 6],
            ldt: QemuSegment::default(),
            tr: QemuSegment::default(),
            gdt: QemuSegment::default(),
            idt: QemuSegment::default(),
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            cr0: 0x11,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            dr: [0; 8],
            a20_mask: -1,
            mxcsr: 0x1f80,
            xmm: [[0; 2]; 16],
            ymmh: [[0; 2]; 16],
            efer: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            fmask: 0,
            kernelgsbase: 0,
            smbase: 0x30000,
            pat: 0x0007_0406_0007_0406,
            tsc: 0,
            tsc_aux: 0,
            xcr0: 1,
            xstate_bv: 0,
            interrupt_injected: -1,
            mp_state: 0,
            exception_nr: -1,
            has_error_code: 0,
            error_code: 0,
            soft_interrupt: 0,
            nmi_injected: 0,
            nmi_pending: 0,
            msrs: Vec::new(),
            apic: Some(QemuApic::default()),
        }
    }

    #[test]
    fn test_sections_have_qemu_sizes_and_order() {
        let sections = encode_cpu(0, &sample_cpu()).unwrap();
        let names: Vec<_> = sections.iter().map(|s| s.idstr).collect();
        assert_eq!(names, ["cpu_common", "cpu", "apic"]);
        assert_eq!(sections[0].body.len(), 8);
        // The byte counts of QEMU 7.2's own description of these sections.
        assert_eq!(sections[1].body.len(), 1817);
        assert_eq!(sections[2].body.len(), 181);
        assert_eq!(sections[2].description["fields"].as_array().unwrap().len(), 19);
        assert!(sections[1].description.get("subsections").is_none());
    }

    #[test]
    fn test_fields_match_qemu_7_2_description_when_captured() {
        let Ok(text) = std::fs::read_to_string("/tmp/qcap/kvmdesc.json") else {
            println!("SKIPPED: no captured QEMU description at /tmp/qcap/kvmdesc.json");
            return;
        };
        let captured: Value = serde_json::from_str(&text).unwrap();
        let devices = captured["devices"].as_array().unwrap();
        for section in encode_cpu(0, &sample_cpu()).unwrap() {
            let theirs = devices.iter().find(|d| d["name"] == section.idstr).unwrap();
            assert_eq!(section.description["fields"], theirs["fields"], "{}", section.idstr);
            assert_eq!(section.description["version"], theirs["version"]);
        }
    }

    #[test]
    fn test_subsections_follow_needed() {
        let mut cpu = sample_cpu();
        cpu.fpip = 0x1234;
        cpu.msrs = vec![
            (msr::IA32_TSC_ADJUST, 5),
            (msr::IA32_MISC_ENABLE, MISC_ENABLE_DEFAULT),
            (msr::KVM_POLL_CONTROL, 0),
        ];
        let sections = encode_cpu(0, &cpu).unwrap();
        let subs: Vec<_> = sections[1].description["subsections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["vmsd_name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(subs, ["cpu/poll_control_msr", "cpu/fpop_ip_dp", "cpu/msr_tsc_adjust"]);
        let body = &sections[1].body;
        let tail = [
            &[kind::SUBSECTION, 18][..],
            b"cpu/msr_tsc_adjust",
            &[0, 0, 0, 1],
            &5u64.to_be_bytes(),
        ]
        .concat();
        assert!(body.ends_with(&tail));
    }

    #[test]
    fn test_pmu_msrs_make_the_pmu_subsection() {
        let mut cpu = sample_cpu();
        cpu.msrs = vec![(msr::P6_EVNTSEL0 + 17, 0x43_0076), (msr::VM_HSAVE_PA, 0x9000)];
        let sections = encode_cpu(0, &cpu).unwrap();
        let name = b"cpu/msr_architectural_pmu";
        let body = &sections[1].body;
        let at = body.windows(name.len()).position(|w| w == name).unwrap();
        // Name, version, then 4 + 3 + 18 + 18 u64s, the last being evtsel 17.
        assert_eq!(body.len(), at + name.len() + 4 + 43 * 8);
        assert!(body.ends_with(&0x43_0076u64.to_be_bytes()));
        assert_eq!(body[..at - 2].len(), 1817);
    }

    #[test]
    fn test_unknown_msr_is_refused() {
        let mut cpu = sample_cpu();
        cpu.msrs = vec![(0xc000_0080, 0)];
        assert!(matches!(
            encode_cpu(0, &cpu),
            Err(StreamError::UnsupportedMsr { index: 0xc000_0080 })
        ));
    }

    #[test]
    fn test_mtrr_and_mce_msrs_land_in_main_fields() {
        let mut cpu = sample_cpu();
        cpu.msrs = vec![(msr::MTRR_DEF_TYPE, 0xc06), (msr::MC0_CTL + 39, 7)];
        let sections = encode_cpu(0, &cpu).unwrap();
        let body = &sections[1].body;
        assert!(body.windows(8).any(|w| w == 0xc06u64.to_be_bytes()));
        assert!(body.windows(8).any(|w| w == 7u64.to_be_bytes()));
    }
}
