//! Property tests of the common format: every valid state survives every conversion path and
//! the envelope unchanged, and no input makes decoding panic.

use std::collections::BTreeMap;

use migratory::format::native::kvm::{
    KvmDtable, KvmException, KvmInterrupt, KvmMsrEntry, KvmNmi, KvmRegs, KvmSegment, KvmSregs, KvmVcpu, KvmVcpuEvents,
};
use migratory::format::native::xen_hvm::{
    XenHvmCpu, XenLapic, ARBYTES_MASK, DR6_INIT, DR7_INIT, EVENT_TYPE_HW_EXCEPTION, FPU_INITIALISED, MSR_FLAGS_MASK,
    PENDING_EVENT_ERROR_VALID, PENDING_EVENT_TYPE_SHIFT, PENDING_EVENT_VALID, XEN_NAMED_MSRS,
};
use migratory::format::{
    decode_vm_state, encode_vm_state, msr_index, DescriptorTable, DeviceState, MacAddr, MemoryLayout, Msr,
    NativeLayout, NativeVcpu, NicConfig, PendingEvents, PendingException, Segment, SegmentAttributes, VcpuState,
    VmConfig, VmId, VmState, ENVELOPE_HEADER_LEN, LAPIC_REGISTER_BYTES, MAX_VCPUS, MSRS_WITH_OWN_FIELD, PAGE_SIZE,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;

const CASES: u32 = 256;

// The qemu layout's part, in its own file to keep this one readable.
#[path = "format_props/qemu.rs"]
mod qemu;

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// Any canonical 48-bit address, with the boundaries of both halves over-represented.
fn canonical() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => any::<u64>().prop_map(|a| (((a << 16) as i64) >> 16) as u64),
        1 => select(vec![
            0,
            0x0000_7fff_ffff_ffff,
            0xffff_8000_0000_0000,
            u64::MAX
        ]),
    ]
}

/// MSR indices: mostly interesting ones (named Xen fields, common MSRs), sometimes anything.
fn msr_index_strategy() -> impl Strategy<Value = u32> {
    let mut interesting = XEN_NAMED_MSRS.to_vec();
    interesting.extend([0, 0x3a, 0x277, 0xc000_0104, 0x4000_0000, u32::MAX]);
    prop_oneof![select(interesting), any::<u32>()]
}

/// Ascending MSR entries none of whose indices are in `excluded`.
fn msr_map(excluded: &'static [u32]) -> impl Strategy<Value = BTreeMap<u32, u64>> {
    btree_map(msr_index_strategy(), any::<u64>(), 0..24).prop_map(move |mut m| {
        m.retain(|i, _| !excluded.contains(i));
        m
    })
}

/// Empty, or between the legacy region and 4 KiB of arbitrary bytes.
fn xsave() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        4 => (512usize..=4096).prop_flat_map(|n| vec(any::<u8>(), n)),
    ]
}

fn lapic() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        2 => vec(any::<u8>(), LAPIC_REGISTER_BYTES),
    ]
}

fn bit() -> impl Strategy<Value = u8> {
    0u8..=1
}

// ---------------------------------------------------------------------------------------------
// Common-format states
// ---------------------------------------------------------------------------------------------

fn attributes() -> impl Strategy<Value = SegmentAttributes> {
    (
        0u8..16,
        any::<bool>(),
        0u8..4,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(type_, s, dpl, present, avl, l, db, g, unusable)| SegmentAttributes {
            type_,
            s,
            dpl,
            present,
            avl,
            l,
            db,
            g,
            unusable,
        })
}

fn segment(base: BoxedStrategy<u64>) -> impl Strategy<Value = Segment> {
    (any::<u16>(), base, any::<u32>(), attributes()).prop_map(|(selector, base, limit, attributes)| Segment {
        selector,
        base,
        limit,
        attributes,
    })
}

fn any_segment() -> impl Strategy<Value = Segment> {
    segment(any::<u64>().boxed())
}

fn canonical_segment() -> impl Strategy<Value = Segment> {
    segment(canonical().boxed())
}

fn dtable() -> impl Strategy<Value = DescriptorTable> {
    (canonical(), any::<u16>()).prop_map(|(base, limit)| DescriptorTable { base, limit })
}

fn events() -> impl Strategy<Value = PendingEvents> {
    (
        proptest::option::of((any::<u8>(), proptest::option::of(any::<u32>()))),
        proptest::option::of(any::<u8>()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(exception, interrupt, nmi_pending, nmi_masked)| PendingEvents {
            exception: exception.map(|(vector, error_code)| PendingException { vector, error_code }),
            interrupt,
            nmi_pending,
            nmi_masked,
        })
}

/// Any state that `VcpuState::validate` accepts.
fn vcpu_state() -> impl Strategy<Value = VcpuState> {
    let regs = (
        0..MAX_VCPUS,
        proptest::array::uniform16(any::<u64>()),
        canonical(),
        any::<u64>(),
    );
    let segments = (
        any_segment(),
        any_segment(),
        any_segment(),
        canonical_segment(),
        canonical_segment(),
        any_segment(),
        canonical_segment(),
        canonical_segment(),
    );
    let control = (
        dtable(),
        dtable(),
        proptest::array::uniform4(any::<u64>()),
        0u64..16,
        any::<u64>(),
        any::<u64>(),
    );
    let rest = (msr_map(&MSRS_WITH_OWN_FIELD), xsave(), any::<u64>(), events(), lapic());
    (regs, segments, control, rest).prop_map(
        |(
            (id, gprs, rip, rflags),
            (cs, ds, es, fs, gs, ss, tr, ldtr),
            (gdtr, idtr, [cr0, cr2, cr3, cr4], cr8, efer, apic_base),
            (msrs, xsave, tsc, events, lapic),
        )| VcpuState {
            id,
            gprs,
            rip,
            rflags,
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
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
            apic_base,
            msrs: msrs.into_iter().map(|(index, value)| Msr { index, value }).collect(),
            xsave,
            tsc,
            events,
            lapic,
        },
    )
}

fn vm_state() -> impl Strategy<Value = VmState> {
    let config = (
        "[a-z][a-z0-9-]{0,15}",
        ".{0,24}",
        1u32..=4,
        1u64..=1024,
        vec(any::<u64>(), 0..4),
    );
    let devices = vec((any::<u32>(), vec(any::<u8>(), 0..256)), 0..4);
    (config, devices).prop_flat_map(|((id, name, vcpus, pages, seeds), devices)| {
        let memory_bytes = pages * u64::from(PAGE_SIZE);
        let config = VmConfig {
            id: VmId(id),
            name,
            vcpus,
            memory_bytes,
            page_size: PAGE_SIZE,
            nics: seeds
                .iter()
                .enumerate()
                .map(|(i, &seed)| NicConfig {
                    id: format!("net{i}"),
                    mac: MacAddr::local_from_seed(seed),
                })
                .collect(),
        };
        let devices: Vec<DeviceState> = devices
            .into_iter()
            .enumerate()
            .map(|(i, (version, data))| DeviceState {
                name: format!("dev{i}"),
                version,
                data,
            })
            .collect();
        vec(vcpu_state(), vcpus as usize).prop_map(move |mut vcpus| {
            for (i, v) in vcpus.iter_mut().enumerate() {
                v.id = i as u32;
            }
            VmState {
                config: config.clone(),
                vcpus,
                devices: devices.clone(),
                memory: MemoryLayout::flat(memory_bytes),
            }
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Native states, generated field by field (not through the converters), so that the
// properties also check that the converters' notion of a valid native state is complete.
// ---------------------------------------------------------------------------------------------

fn kvm_segment(base: BoxedStrategy<u64>) -> impl Strategy<Value = KvmSegment> {
    (
        base,
        any::<u32>(),
        any::<u16>(),
        0u8..16,
        0u8..4,
        proptest::array::uniform7(bit()),
    )
        .prop_map(
            |(base, limit, selector, type_, dpl, [present, db, s, l, g, avl, unusable])| KvmSegment {
                base,
                limit,
                selector,
                type_,
                present,
                dpl,
                db,
                s,
                l,
                g,
                avl,
                unusable,
                padding: 0,
            },
        )
}

fn kvm_dtable() -> impl Strategy<Value = KvmDtable> {
    (canonical(), any::<u16>()).prop_map(|(base, limit)| KvmDtable {
        base,
        limit,
        padding: [0; 3],
    })
}

const KVM_SREGS_MSRS: [u32; 4] = [
    msr_index::APIC_BASE,
    msr_index::EFER,
    msr_index::FS_BASE,
    msr_index::GS_BASE,
];

fn kvm_vcpu() -> impl Strategy<Value = KvmVcpu> {
    let regs =
        (proptest::array::uniform16(any::<u64>()), canonical(), any::<u64>()).prop_map(|(g, rip, rflags)| KvmRegs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip,
            rflags,
        });
    let any_base = || any::<u64>().boxed();
    let canon = || canonical().boxed();
    let segments = (
        kvm_segment(any_base()),
        kvm_segment(any_base()),
        kvm_segment(any_base()),
        kvm_segment(canon()),
        kvm_segment(canon()),
        kvm_segment(any_base()),
        kvm_segment(canon()),
        kvm_segment(canon()),
    );
    let control = (
        kvm_dtable(),
        kvm_dtable(),
        proptest::array::uniform4(any::<u64>()),
        0u64..16,
        any::<u64>(),
        any::<u64>(),
    );
    let exception = prop_oneof![
        Just(KvmException::default()),
        (any::<u8>(), bit(), any::<u32>()).prop_map(|(nr, has_error_code, code)| KvmException {
            injected: 1,
            nr,
            has_error_code,
            pad: 0,
            error_code: if has_error_code == 1 { code } else { 0 },
        }),
    ];
    let rest = (
        0..MAX_VCPUS,
        msr_map(&KVM_SREGS_MSRS),
        any::<u64>(),
        xsave(),
        exception,
        proptest::option::of(any::<u8>()),
        bit(),
        bit(),
    );
    (regs, segments, control, rest)
        .prop_map(
            |(
                regs,
                (cs, ds, es, fs, gs, ss, tr, ldt),
                (gdt, idt, [cr0, cr2, cr3, cr4], cr8, efer, apic_base),
                (id, mut msr_map, tsc, xsave, exception, interrupt, nmi_pending, nmi_masked),
            )| {
                // The TSC entry is mandatory; keep the one drawn if any.
                msr_map.entry(msr_index::TSC).or_insert(tsc);
                let mut interrupt_bitmap = [0u64; 4];
                if let Some(v) = interrupt {
                    interrupt_bitmap[usize::from(v / 64)] = 1 << (v % 64);
                }
                KvmVcpu {
                    id,
                    regs,
                    sregs: KvmSregs {
                        cs,
                        ds,
                        es,
                        fs,
                        gs,
                        ss,
                        tr,
                        ldt,
                        gdt,
                        idt,
                        cr0,
                        cr2,
                        cr3,
                        cr4,
                        cr8,
                        efer,
                        apic_base,
                        interrupt_bitmap,
                    },
                    msrs: msr_map
                        .into_iter()
                        .map(|(index, data)| KvmMsrEntry {
                            index,
                            reserved: 0,
                            data,
                        })
                        .collect(),
                    xsave,
                    events: KvmVcpuEvents {
                        exception,
                        interrupt: KvmInterrupt {
                            injected: u8::from(interrupt.is_some()),
                            nr: interrupt.unwrap_or(0),
                            soft: 0,
                            shadow: 0,
                        },
                        nmi: KvmNmi {
                            injected: 0,
                            pending: nmi_pending,
                            masked: nmi_masked,
                            pad: 0,
                        },
                    },
                    lapic: Vec::new(),
                }
            },
        )
        .prop_flat_map(|vcpu| lapic().prop_map(move |lapic| KvmVcpu { lapic, ..vcpu.clone() }))
}

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

/// One segment's Xen fields: selector, limit, base, arbytes.
fn xen_segment(base: BoxedStrategy<u64>) -> impl Strategy<Value = (u32, u32, u64, u32)> {
    (0u32..=0xffff, any::<u32>(), base, any::<u32>())
        .prop_map(|(sel, limit, base, ar)| (sel, limit, base, ar & ARBYTES_MASK))
}

fn xen_hvm_cpu() -> impl Strategy<Value = XenHvmCpu> {
    let fpu = prop_oneof![
        1 => Just(([0u8; 512], 0, Vec::new())),
        4 => (vec(any::<u8>(), 512), vec(any::<u8>(), 0..3584)).prop_map(|(legacy, ext)| {
            let mut fpu = [0u8; 512];
            fpu.copy_from_slice(&legacy);
            (fpu, FPU_INITIALISED, ext)
        }),
    ];
    let regs = (
        proptest::array::uniform16(any::<u64>()),
        canonical(),
        proptest::array::uniform6(any::<u64>()),
    );
    let any_base = || any::<u64>().boxed();
    let canon = || canonical().boxed();
    let segments = (
        xen_segment(any_base()),
        xen_segment(any_base()),
        xen_segment(any_base()),
        xen_segment(canon()),
        xen_segment(canon()),
        xen_segment(any_base()),
        xen_segment(canon()),
        xen_segment(canon()),
        (canonical(), 0u32..=0xffff),
        (canonical(), 0u32..=0xffff),
    );
    let pending = prop_oneof![
        Just((0u32, 0u32)),
        (any::<u8>(), any::<bool>(), any::<u32>()).prop_map(|(vector, has_code, code)| {
            let mut ev =
                PENDING_EVENT_VALID | (EVENT_TYPE_HW_EXCEPTION << PENDING_EVENT_TYPE_SHIFT) | u32::from(vector);
            if has_code {
                ev |= PENDING_EVENT_ERROR_VALID;
            }
            (ev, if has_code { code } else { 0 })
        }),
    ];
    let msrs = (
        0..=MSR_FLAGS_MASK,
        proptest::array::uniform9(any::<u64>()),
        msr_map(&XEN_OWN_FIELD_MSRS),
    );
    let rest = (
        0..MAX_VCPUS as u16,
        fpu,
        pending,
        (bit(), bit()),
        (any::<u64>(), 0u32..16, proptest::option::of(any::<u8>())),
        any::<u64>(),
    );
    (regs, segments, msrs, rest)
        .prop_map(
            |(
                (g, rip, [rflags, cr0, cr2, cr3, cr4, msr_efer]),
                (cs, ds, es, fs, gs, ss, tr, ldtr, idtr, gdtr),
                (msr_flags, named, extra),
                (instance, (fpu_regs, flags, xsave_extended), (pending_event, error_code), nmi, lapic, tsc),
            )| {
                // Absent named MSRs read zero.
                let named: [u64; 9] = core::array::from_fn(|i| if msr_flags & (1 << i) != 0 { named[i] } else { 0 });
                let (apic_base_msr, cr8, interrupt) = lapic;
                let mut irr = [0u32; 8];
                if let Some(v) = interrupt {
                    irr[usize::from(v / 32)] = 1 << (v % 32);
                }
                XenHvmCpu {
                    instance,
                    fpu_regs,
                    rax: g[0],
                    rbx: g[1],
                    rcx: g[2],
                    rdx: g[3],
                    rbp: g[4],
                    rsi: g[5],
                    rdi: g[6],
                    rsp: g[7],
                    r8: g[8],
                    r9: g[9],
                    r10: g[10],
                    r11: g[11],
                    r12: g[12],
                    r13: g[13],
                    r14: g[14],
                    r15: g[15],
                    rip,
                    rflags,
                    cr0,
                    cr2,
                    cr3,
                    cr4,
                    dr0: 0,
                    dr1: 0,
                    dr2: 0,
                    dr3: 0,
                    dr6: DR6_INIT,
                    dr7: DR7_INIT,
                    cs_sel: cs.0,
                    ds_sel: ds.0,
                    es_sel: es.0,
                    fs_sel: fs.0,
                    gs_sel: gs.0,
                    ss_sel: ss.0,
                    tr_sel: tr.0,
                    ldtr_sel: ldtr.0,
                    cs_limit: cs.1,
                    ds_limit: ds.1,
                    es_limit: es.1,
                    fs_limit: fs.1,
                    gs_limit: gs.1,
                    ss_limit: ss.1,
                    tr_limit: tr.1,
                    ldtr_limit: ldtr.1,
                    idtr_limit: idtr.1,
                    gdtr_limit: gdtr.1,
                    cs_base: cs.2,
                    ds_base: ds.2,
                    es_base: es.2,
                    fs_base: fs.2,
                    gs_base: gs.2,
                    ss_base: ss.2,
                    tr_base: tr.2,
                    ldtr_base: ldtr.2,
                    idtr_base: idtr.0,
                    gdtr_base: gdtr.0,
                    cs_arbytes: cs.3,
                    ds_arbytes: ds.3,
                    es_arbytes: es.3,
                    fs_arbytes: fs.3,
                    gs_arbytes: gs.3,
                    ss_arbytes: ss.3,
                    tr_arbytes: tr.3,
                    ldtr_arbytes: ldtr.3,
                    sysenter_cs: named[0],
                    sysenter_esp: named[1],
                    sysenter_eip: named[2],
                    msr_star: named[3],
                    msr_lstar: named[4],
                    msr_cstar: named[5],
                    msr_syscall_mask: named[6],
                    shadow_gs: named[7],
                    msr_tsc_aux: named[8],
                    msr_flags,
                    msr_efer,
                    tsc,
                    pending_event,
                    error_code,
                    flags,
                    pad0: 0,
                    nmi_pending: nmi.0,
                    nmi_masked: nmi.1,
                    lapic: XenLapic {
                        apic_base_msr,
                        tpr: cr8 << 4,
                        irr,
                    },
                    msrs: extra.into_iter().collect(),
                    xsave_extended,
                    lapic_regs: Vec::new(),
                }
            },
        )
        .prop_flat_map(|cpu| {
            lapic().prop_map(move |lapic_regs| XenHvmCpu {
                lapic_regs,
                ..cpu.clone()
            })
        })
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn via(layout: NativeLayout, s: &VcpuState) -> VcpuState {
    NativeVcpu::from_common(layout, s)
        .and_then(|n| n.to_common())
        .unwrap_or_else(|e| panic!("{layout}: {e:?}"))
}

/// Re-encodes an envelope's header around a changed payload, so the mutation reaches the
/// msgpack decoder instead of stopping at the checksum.
fn reseal(envelope: &mut [u8]) {
    let sum = xxhash_rust::xxh3::xxh3_64(&envelope[ENVELOPE_HEADER_LEN..]);
    envelope[16..24].copy_from_slice(&sum.to_be_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn test_generated_common_states_are_valid(s in vcpu_state()) {
        prop_assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn test_common_kvm_common_is_identity(s in vcpu_state()) {
        prop_assert_eq!(via(NativeLayout::Kvm, &s), s);
    }

    #[test]
    fn test_common_xen_common_is_identity(s in vcpu_state()) {
        prop_assert_eq!(via(NativeLayout::XenHvm, &s), s);
    }

    #[test]
    fn test_cross_hypervisor_path_is_identity(s in vcpu_state()) {
        let through_xen = via(NativeLayout::XenHvm, &s);
        let through_both = via(NativeLayout::Kvm, &through_xen);
        prop_assert_eq!(&through_both, &s);
        // And back the other way, with the native states compared too.
        let kvm = NativeVcpu::from_common(NativeLayout::Kvm, &s).unwrap();
        let xen = NativeVcpu::from_common(NativeLayout::XenHvm, &kvm.to_common().unwrap()).unwrap();
        let kvm_again = NativeVcpu::from_common(NativeLayout::Kvm, &xen.to_common().unwrap()).unwrap();
        prop_assert_eq!(kvm_again, kvm);
    }

    #[test]
    fn test_kvm_common_kvm_is_identity(k in kvm_vcpu()) {
        let common = k.to_common().unwrap_or_else(|e| panic!("{e:?}: {k:?}"));
        prop_assert_eq!(KvmVcpu::from_common(&common).unwrap(), k);
    }

    #[test]
    fn test_xen_common_xen_is_identity(x in xen_hvm_cpu()) {
        let common = x.to_common().unwrap_or_else(|e| panic!("{e:?}: {x:?}"));
        prop_assert_eq!(XenHvmCpu::from_common(&common).unwrap(), x);
    }

    #[test]
    fn test_advance_commutes_with_conversion(s in vcpu_state(), n in any::<u64>()) {
        let mut results = Vec::new();
        for layout in NativeLayout::ALL {
            let mut native = NativeVcpu::from_common(layout, &s).unwrap();
            native.advance(n);
            results.push(native.to_common().unwrap());
        }
        prop_assert_eq!(&results[0], &results[1]);
    }

    #[test]
    fn test_envelope_round_trip(state in vm_state()) {
        let bytes = encode_vm_state(&state).unwrap();
        prop_assert_eq!(decode_vm_state(&bytes).unwrap(), state);
    }

    #[test]
    fn test_decode_never_panics_on_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..256),
        magic_prefix in any::<bool>(),
    ) {
        let mut input = if magic_prefix { b"MIGRVMST\0\0\0\x01".to_vec() } else { Vec::new() };
        input.extend_from_slice(&bytes);
        let _ = decode_vm_state(&input);
    }

    #[test]
    fn test_decode_never_panics_on_mutated_envelopes(
        state in vm_state(),
        flips in vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        resealed in any::<bool>(),
    ) {
        let mut bytes = encode_vm_state(&state).unwrap();
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if resealed && bytes.len() >= ENVELOPE_HEADER_LEN {
            reseal(&mut bytes);
        }
        // Whatever decode accepts is valid; everything else is a typed error, never a panic.
        if let Ok(decoded) = decode_vm_state(&bytes) {
            prop_assert_eq!(decoded.validate(), Ok(()));
        }
    }
}
