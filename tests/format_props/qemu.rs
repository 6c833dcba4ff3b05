//! The qemu layout's properties: every QEMU state it accepts comes back unchanged (modulo the
//! documented non-state fields), every common state in its representable set comes back
//! unchanged, states outside that set are refused by name, a state of this project's kvm boot
//! survives kvm -> common -> qemu -> common -> kvm, and `compute_hflags` agrees with the hflags
//! real QEMU 7.2 saved.

use super::*;
use migratory::format::native::qemu::lapic::LAPIC_NON_STATE;
use migratory::format::native::qemu::{
    count_shift, qemu_list_msr, QemuApic, QemuCpu, QemuFpReg, QemuSegment, A20_OPEN, APIC_BASE_EXTD, DR6_RESET,
    DR7_RESET, HF2_GIF_MASK, HF2_NMI_MASK, HF2_VGIF_MASK, HF_CPL_MASK, HF_CS32_MASK, HF_CS64_MASK, HF_DEFINED_BITS,
    HF_LMA_MASK, HF_PE_MASK, HF_SS32_MASK, HF_STATE_BITS, MSR_PAT, MSR_SMBASE, QEMU_LIST_MSRS, QEMU_NAMED_MSRS,
    QEMU_XSAVE_BYTES, SEGMENT_ATTRIBUTE_BITS, SMBASE_RESET, XCR0_RESET,
};
use migratory::format::native::NativeError;

// ---------------------------------------------------------------------------------------------
// QEMU states, generated field by field
// ---------------------------------------------------------------------------------------------

fn qemu_segment(base: BoxedStrategy<u64>) -> impl Strategy<Value = QemuSegment> {
    (0u32..=0xffff, base, any::<u32>(), any::<u32>()).prop_map(|(selector, base, limit, flags)| QemuSegment {
        selector,
        base,
        limit,
        flags: flags & SEGMENT_ATTRIBUTE_BITS,
    })
}

fn qemu_dtable() -> impl Strategy<Value = QemuSegment> {
    (canonical(), 0u32..=0xffff).prop_map(|(base, limit)| QemuSegment {
        selector: 0,
        base,
        limit,
        flags: 0,
    })
}

/// Indices the layout lists in `msrs`: mostly range ends, sometimes anything inside a range.
fn qemu_list_msr_index() -> impl Strategy<Value = u32> {
    let ends: Vec<u32> = QEMU_LIST_MSRS.iter().flat_map(|&(lo, hi)| [lo, hi]).collect();
    prop_oneof![
        select(ends),
        select(QEMU_LIST_MSRS.to_vec()).prop_flat_map(|(lo, hi)| lo..=hi),
    ]
}

fn qemu_apic() -> impl Strategy<Value = QemuApic> {
    let ids = (any::<u32>(), any::<[u8; 4]>(), 0u8..16, any::<u32>());
    let vectors = (
        any::<[u32; 8]>(),
        any::<[u32; 8]>(),
        any::<[u32; 8]>(),
        any::<[u32; 6]>(),
    );
    let rest = (any::<u32>(), any::<[u32; 2]>(), any::<u32>(), any::<u32>());
    (ids, vectors, rest).prop_map(
        |(
            (apicbase, [id, arb_id, tpr, log_dest], dest_mode, spurious_vec),
            (isr, tmr, irr, lvt),
            (esr, icr, divide_conf, initial_count),
        )| {
            QemuApic {
                apicbase: apicbase & !(APIC_BASE_EXTD as u32),
                id,
                arb_id,
                tpr,
                spurious_vec,
                log_dest,
                dest_mode,
                isr,
                tmr,
                irr,
                lvt,
                esr,
                icr,
                divide_conf,
                count_shift: count_shift(divide_conf),
                initial_count,
                initial_count_load_time: 0,
                next_time: 0,
            }
        },
    )
}

/// Any QEMU state that `to_common` accepts, with its non-state fields as `from_common` writes
/// them.
fn qemu_cpu() -> impl Strategy<Value = QemuCpu> {
    let any_base = || any::<u64>().boxed();
    let canon = || canonical().boxed();
    let regs = (
        proptest::array::uniform16(any::<u64>()),
        canonical(),
        any::<u64>(),
        proptest::array::uniform4(any::<u64>()),
        any::<u64>(),
        any::<u64>(),
    );
    let segments = (
        [
            qemu_segment(any_base()),
            qemu_segment(any_base()),
            qemu_segment(any_base()),
            qemu_segment(any_base()),
            qemu_segment(canon()),
            qemu_segment(canon()),
        ],
        qemu_segment(canon()),
        qemu_segment(canon()),
        qemu_dtable(),
        qemu_dtable(),
    );
    let fpu = (
        any::<[u16; 2]>(),
        0u16..=0xff,
        proptest::array::uniform8((any::<u64>(), any::<u16>())),
        (any::<u16>(), any::<u64>(), any::<u64>(), any::<u32>()),
        proptest::array::uniform16(any::<[u64; 2]>()),
        proptest::array::uniform16(any::<[u64; 2]>()),
        0u64..8,
    );
    let named = (any::<u32>(), proptest::array::uniform9(any::<u64>()), any::<u32>());
    let exception = prop_oneof![
        Just((-1i32, 0u8, 0u32)),
        (0i32..=255, bit(), any::<u32>()).prop_map(|(nr, has, code)| (nr, has, if has == 1 { code } else { 0 })),
    ];
    let events = (prop_oneof![Just(-1i32), 0i32..=255], exception, bit(), any::<bool>());
    let rest = (
        btree_map(qemu_list_msr_index(), any::<u64>(), 0..16),
        proptest::option::of(qemu_apic()),
    );
    (regs, segments, fpu, named, events, rest).prop_map(
        |(
            (g, eip, eflags, [cr0, cr2, cr3, cr4], efer, tsc),
            (mut segs, ldt, tr, gdt, idt),
            ([fpuc, fpus], fptag, fpregs, (fpop, fpip, fpdp, mxcsr), xmm, ymmh, xstate_bv),
            (sysenter_cs, n, smbase),
            (interrupt_injected, (exception_nr, has_error_code, error_code), nmi_pending, nmi_masked),
            (msrs, apic),
        )| {
            if cr0 & 1 == 0 {
                // Real mode: QEMU would clear the DPLs of a CS with DPL != 0.
                segs[1].flags &= !(3 << 13);
            }
            let mut q = QemuCpu {
                halted: 0,
                interrupt_request: 0,
                regs: g,
                eip,
                eflags,
                hflags: 0,
                hflags2: HF2_GIF_MASK | HF2_VGIF_MASK | if nmi_masked { HF2_NMI_MASK } else { 0 },
                fpuc,
                fpus,
                fptag,
                fpregs: fpregs.map(|(mantissa, exponent)| QemuFpReg { mantissa, exponent }),
                fpop,
                fpip,
                fpdp,
                segs,
                ldt,
                tr,
                gdt,
                idt,
                sysenter_cs,
                sysenter_esp: n[0],
                sysenter_eip: n[1],
                cr0,
                cr2,
                cr3,
                cr4,
                dr: [0, 0, 0, 0, 0, 0, DR6_RESET, DR7_RESET],
                a20_mask: A20_OPEN,
                mxcsr,
                xmm,
                ymmh,
                efer,
                star: n[2],
                lstar: n[3],
                cstar: n[4],
                fmask: n[5],
                kernelgsbase: n[6],
                smbase,
                pat: n[7],
                tsc,
                tsc_aux: n[8],
                xcr0: XCR0_RESET,
                xstate_bv,
                interrupt_injected,
                mp_state: 0,
                exception_nr,
                has_error_code,
                error_code,
                soft_interrupt: 0,
                nmi_injected: 0,
                nmi_pending,
                msrs: msrs.into_iter().collect(),
                apic,
            };
            q.hflags = q.compute_hflags();
            q
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Common states in the qemu layout's representable set
// ---------------------------------------------------------------------------------------------

/// Attributes with `unusable == !present`.
fn qemu_attributes() -> impl Strategy<Value = SegmentAttributes> {
    attributes().prop_map(|a| SegmentAttributes {
        unusable: !a.present,
        ..a
    })
}

fn qemu_common_segment(base: BoxedStrategy<u64>) -> impl Strategy<Value = Segment> {
    (any::<u16>(), base, any::<u32>(), qemu_attributes()).prop_map(|(selector, base, limit, attributes)| Segment {
        selector,
        base,
        limit,
        attributes,
    })
}

/// A common state in the representable set: `initial_long_mode` with a 4 KiB XSAVE image and
/// no APIC.
fn base_common() -> VcpuState {
    let mut s = VcpuState::initial_long_mode(0);
    s.xsave.resize(QEMU_XSAVE_BYTES, 0);
    s.xsave[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    s.apic_base = 0;
    s
}

/// A 4 KiB XSAVE image whose non-state bytes hold what the layout writes there.
fn qemu_xsave() -> impl Strategy<Value = Vec<u8>> {
    (vec(any::<u8>(), 512 + 256), 0u64..8).prop_map(|(bytes, xstate_bv)| {
        let mut image = vec![0u8; QEMU_XSAVE_BYTES];
        image[..512].copy_from_slice(&bytes[..512]);
        image[576..832].copy_from_slice(&bytes[512..]);
        image[512..520].copy_from_slice(&xstate_bv.to_le_bytes());
        migratory::format::native::qemu::xsave::normalise_image(&mut image);
        image
    })
}

/// APIC base, CR8 and register page, consistent as the layout needs them.
fn qemu_apic_common() -> impl Strategy<Value = (u64, u64, Vec<u8>)> {
    prop_oneof![
        1 => Just((0u64, 0u64, Vec::new())),
        3 => qemu_apic().prop_map(|a| {
            let mut q = QemuCpu::from_common(&base_common()).expect("base_common is representable");
            q.apic = Some(a);
            let s = q.to_common(0).expect("a generated APIC converts");
            (s.apic_base, s.cr8, s.lapic)
        }),
    ]
}

/// Common states `from_common` accepts and `to_common` reproduces exactly.
fn qemu_representable_state() -> impl Strategy<Value = VcpuState> {
    let any_base = || any::<u64>().boxed();
    let canon = || canonical().boxed();
    let segments = (
        qemu_common_segment(any_base()),
        qemu_common_segment(any_base()),
        qemu_common_segment(any_base()),
        qemu_common_segment(canon()),
        qemu_common_segment(canon()),
        qemu_common_segment(any_base()),
        qemu_common_segment(canon()),
        qemu_common_segment(canon()),
    );
    let msrs = (
        proptest::array::uniform10(any::<u64>()),
        proptest::option::of(any::<u32>().prop_filter("reset SMBASE is never listed", |&v| v != SMBASE_RESET)),
        btree_map(qemu_list_msr_index(), any::<u64>(), 0..16),
    )
        .prop_map(|(named, smbase, mut map)| {
            for (i, &index) in QEMU_NAMED_MSRS.iter().enumerate() {
                // SYSENTER_CS is 32 bits wide in QEMU.
                let value = if index == msr_index::SYSENTER_CS {
                    named[i] & 0xffff_ffff
                } else {
                    named[i]
                };
                map.insert(index, value);
            }
            if let Some(v) = smbase {
                map.insert(MSR_SMBASE, u64::from(v));
            }
            map.into_iter()
                .map(|(index, value)| Msr { index, value })
                .collect::<Vec<_>>()
        });
    (vcpu_state(), segments, msrs, qemu_xsave(), qemu_apic_common()).prop_map(
        |(mut s, (cs, ds, es, fs, gs, ss, tr, ldtr), msrs, xsave, (apic_base, cr8, lapic))| {
            s.cs = cs;
            s.ds = ds;
            s.es = es;
            s.fs = fs;
            s.gs = gs;
            s.ss = ss;
            s.tr = tr;
            s.ldtr = ldtr;
            if s.cr0 & 1 == 0 {
                s.cs.attributes.dpl = 0;
            }
            s.msrs = msrs;
            s.xsave = xsave;
            s.apic_base = apic_base;
            s.cr8 = cr8;
            s.lapic = lapic;
            s
        },
    )
}

/// One way out of the representable set, and the field `from_common` must name.
fn violate(s: &mut VcpuState, which: usize, pick: u64) -> String {
    match which % 9 {
        0 => {
            s.ldtr.attributes.unusable = s.ldtr.attributes.present;
            "ldtr.attributes.unusable".into()
        }
        1 => {
            s.xsave.truncate(512 + (pick as usize % 1024));
            "xsave.len()".into()
        }
        2 => {
            // A component past AVX in use: its bit, and a non-zero byte in its area.
            s.xsave[512] |= 0x8 << (pick % 5);
            s.xsave[832 + (pick as usize >> 8) % (QEMU_XSAVE_BYTES - 832)] = 1 | pick as u8;
            "xsave.xstate_bv".into()
        }
        3 => {
            // An MSR outside every carried range, e.g. IA32_ARCH_CAPABILITIES or an AMD one.
            let index = [0x10a, 0x8b, 0xc001_0015, 0x4000_0000][pick as usize % 4];
            assert!(!qemu_list_msr(index));
            s.msrs.push(Msr { index, value: pick });
            s.msrs.sort_by_key(|m| m.index);
            format!("msrs[{index:#x}]")
        }
        4 => {
            s.msrs.retain(|m| m.index != MSR_SMBASE);
            s.msrs.push(Msr {
                index: MSR_SMBASE,
                value: u64::from(SMBASE_RESET),
            });
            s.msrs.sort_by_key(|m| m.index);
            "msrs[0x9e]".into()
        }
        5 => {
            s.apic_base = (pick | 1) << 32;
            if s.lapic.is_empty() {
                s.lapic = vec![0; LAPIC_REGISTER_BYTES];
            }
            "apic_base".into()
        }
        6 => {
            if s.lapic.is_empty() {
                s.cr8 = 1 + pick % 15;
            } else {
                s.cr8 = (u64::from(s.lapic[0x80] >> 4) + 1 + pick % 15) % 16;
            }
            "cr8".into()
        }
        7 => {
            // A byte the page does not carry: a reserved slot or the upper bytes of a register.
            let slots: Vec<usize> = (0..64)
                .map(|i| i * 16)
                .filter(|at| !LAPIC_NON_STATE.contains(at))
                .collect();
            let at = slots[pick as usize % slots.len()] + 4 + (pick as usize / 64) % 12;
            if s.lapic.is_empty() {
                s.lapic = vec![0; LAPIC_REGISTER_BYTES];
                s.lapic[0xe0..0xe4].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
                s.apic_base = 0xfee0_0000;
                s.cr8 = 0;
            }
            s.lapic[at] |= 1;
            format!("lapic[{at:#x}]")
        }
        _ => {
            s.cr0 &= !1;
            s.cs.attributes.dpl = 1 + (pick % 3) as u8;
            "cs.attributes.dpl".into()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// This project's kvm boot state (src/vmm/kvm/boot.rs setup_long_mode), built as boot.rs does
// ---------------------------------------------------------------------------------------------

/// A present segment; `[s, dpl, l, db, g]` as `kvm_segment` has them.
fn kvm_seg(selector: u16, base: u64, limit: u32, type_: u8, [s, dpl, l, db, g]: [u8; 5]) -> KvmSegment {
    KvmSegment {
        base,
        limit,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The vCPU right after `setup_long_mode`, with the MSRs, xsave image and APIC page KVM
/// reports after reset.
fn kvm_boot_vcpu() -> KvmVcpu {
    let code = kvm_seg(0x0b, 0, 0xffff_ffff, 0xb, [1, 3, 1, 0, 1]);
    let data = kvm_seg(0x13, 0, 0xffff_ffff, 0x3, [1, 3, 0, 1, 1]);
    let tss = kvm_seg(0x18, 0x600, 0x10b, 0xb, [0; 5]);
    let ldt = KvmSegment {
        type_: 2,
        present: 0,
        unusable: 1,
        ..KvmSegment::default()
    };
    let mut xsave = vec![0u8; QEMU_XSAVE_BYTES];
    xsave[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    xsave[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    xsave[512] = 0x3;
    let mut lapic = vec![0u8; LAPIC_REGISTER_BYTES];
    let mut reg = |at: usize, v: u32| lapic[at..at + 4].copy_from_slice(&v.to_le_bytes());
    reg(0x30, 0x0005_0014); // version: not state, KVM recomputes it
    reg(0xe0, 0xffff_ffff);
    reg(0xf0, 0xff);
    for lvt in [0x320, 0x330, 0x340, 0x360, 0x370] {
        reg(lvt, 0x1_0000);
    }
    reg(0x350, 0x700);
    let msr = |index: u32, data: u64| KvmMsrEntry {
        index,
        reserved: 0,
        data,
    };
    let mut msrs = vec![
        msr(msr_index::TSC, 123_456),
        msr(0x1a0, 1),
        msr(MSR_PAT, 0x0007_0406_0007_0406),
    ];
    msrs.extend(QEMU_NAMED_MSRS.iter().filter(|&&i| i != MSR_PAT).map(|&i| msr(i, 0)));
    msrs.sort_by_key(|m| m.index);
    KvmVcpu {
        id: 0,
        regs: KvmRegs {
            rip: 0x20_0000,
            rsp: 0x30_0000,
            rflags: 0x2,
            ..KvmRegs::default()
        },
        sregs: KvmSregs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: tss,
            ldt,
            gdt: KvmDtable {
                base: 0x500,
                limit: 5 * 8 - 1,
                padding: [0; 3],
            },
            idt: KvmDtable::default(),
            cr0: 1 | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31),
            cr2: 0,
            cr3: 0x1000,
            cr4: 1 << 5,
            cr8: 0,
            efer: (1 << 8) | (1 << 10),
            apic_base: 0xfee0_0900,
            interrupt_bitmap: [0; 4],
        },
        msrs,
        xsave,
        events: KvmVcpuEvents::default(),
        lapic,
    }
}

// ---------------------------------------------------------------------------------------------
// Real QEMU 7.2 streams: hflags next to the registers they derive from
// ---------------------------------------------------------------------------------------------

/// Reads the registers `compute_hflags` uses, and the saved hflags, from the `cpu` section
/// (version 12, instance 0) of a captured stream. Offsets follow the section's fixed field list.
fn captured_cpu(stream: &[u8]) -> Option<(QemuCpu, u32)> {
    let mut pattern = vec![3u8];
    pattern.extend_from_slice(b"cpu");
    pattern.extend_from_slice(&0u32.to_be_bytes());
    pattern.extend_from_slice(&12u32.to_be_bytes());
    let at = stream.windows(pattern.len()).position(|w| w == pattern.as_slice())? + pattern.len();
    let cpu = stream.get(at..at + 900)?;
    let u32_at = |o: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&cpu[o..o + 4]);
        u32::from_be_bytes(b)
    };
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&cpu[o..o + 8]);
        u64::from_be_bytes(b)
    };
    let mut q = QemuCpu::from_common(&base_common()).expect("base_common is representable");
    q.eflags = u64_at(136);
    let hflags = u32_at(144);
    // regs 128, eip, eflags, hflags, 4 FPU words, 8 x 10-byte fpregs: the segments start at 236.
    for (i, seg) in q.segs.iter_mut().enumerate() {
        let o = 236 + 20 * i;
        *seg = QemuSegment {
            selector: u32_at(o),
            base: u64_at(o + 4),
            limit: u32_at(o + 12),
            flags: u32_at(o + 16),
        };
    }
    q.cr0 = u64_at(456);
    q.cr4 = u64_at(480);
    for (i, dr) in q.dr.iter_mut().enumerate() {
        *dr = u64_at(488 + 8 * i);
    }
    // a20_mask, mxcsr, 16 XMM registers, then EFER.
    q.efer = u64_at(816);
    Some((q, hflags))
}

// ---------------------------------------------------------------------------------------------
// Properties and checks
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn test_qemu_common_qemu_is_identity(q in qemu_cpu(), id in 0..MAX_VCPUS) {
        let common = q.to_common(id).unwrap_or_else(|e| panic!("{e:?}: {q:?}"));
        prop_assert_eq!(common.id, id);
        prop_assert_eq!(QemuCpu::from_common(&common).unwrap(), q);
    }

    #[test]
    fn test_qemu_non_state_fields_are_ignored(
        q in qemu_cpu(),
        noise in proptest::array::uniform8(any::<u32>()),
        times in any::<(i64, i64, i32)>(),
        stale in any::<(u8, u32)>(),
    ) {
        let clean = q.to_common(0).unwrap();
        let mut n = q.clone();
        for (seg, bits) in n.segs.iter_mut().zip(noise) {
            seg.flags |= bits & !SEGMENT_ATTRIBUTE_BITS;
        }
        n.tr.flags |= noise[6] & !SEGMENT_ATTRIBUTE_BITS;
        n.ldt.flags |= noise[7] & !SEGMENT_ATTRIBUTE_BITS;
        n.hflags = noise[0] & HF_DEFINED_BITS & !HF_STATE_BITS;
        n.hflags2 ^= noise[1] & HF2_VGIF_MASK;
        n.dr[4] = u64::from(noise[2]);
        n.dr[5] = u64::from(noise[3]);
        if let Some(a) = &mut n.apic {
            (a.initial_count_load_time, a.next_time, a.count_shift) = times;
        }
        if n.exception_nr == -1 {
            (n.has_error_code, n.error_code) = stale;
        } else if n.has_error_code == 0 {
            n.error_code = stale.1;
        }
        prop_assert_eq!(n.to_common(0).unwrap(), clean);
    }

    #[test]
    fn test_generated_qemu_representable_states_are_valid(s in qemu_representable_state()) {
        prop_assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn test_common_qemu_common_is_identity(s in qemu_representable_state()) {
        let q = QemuCpu::from_common(&s).unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert_eq!(q.hflags, q.compute_hflags());
        prop_assert_eq!(q.to_common(s.id).unwrap(), s);
    }

    #[test]
    fn test_states_outside_the_qemu_set_are_refused_by_name(
        s in qemu_representable_state(),
        which in 0usize..9,
        pick in any::<u64>(),
    ) {
        let mut s = s;
        let field = violate(&mut s, which, pick);
        prop_assert_eq!(s.validate(), Ok(()));
        match QemuCpu::from_common(&s) {
            Err(NativeError::Unrepresentable { field: named, .. }) => prop_assert_eq!(named, field),
            other => prop_assert!(false, "expected Unrepresentable {{ {} }}, got {:?}", field, other),
        }
    }
}

#[test]
fn test_kvm_boot_state_survives_kvm_qemu_kvm() {
    let k = kvm_boot_vcpu();
    let common = k.to_common().unwrap();
    let q = QemuCpu::from_common(&common).unwrap();
    assert_eq!(q.hflags & HF_CPL_MASK, 3);
    assert_eq!(
        q.hflags,
        3 | HF_PE_MASK | HF_LMA_MASK | HF_CS64_MASK | HF_CS32_MASK | HF_SS32_MASK
    );
    // Unusable LDTR: P clear, its type kept.
    assert_eq!(q.ldt.flags, 2 << 8);
    assert_eq!(q.tr.flags, 0x8b00);
    assert_eq!(q.segs[1].flags, 0x00a0_fb00);
    assert_eq!(
        q.apic.map(|a| (a.apicbase, a.spurious_vec, a.dest_mode)),
        Some((0xfee0_0900, 0xff, 0xf))
    );
    let back = KvmVcpu::from_common(&q.to_common(0).unwrap()).unwrap();
    let mut expected = k.clone();
    // The version register is the one thing not carried; KVM_SET_LAPIC recomputes it.
    expected.lapic[0x30..0x34].fill(0);
    assert_eq!(back, expected);
}

#[test]
fn test_compute_hflags_matches_real_qemu() {
    let mut checked = 0;
    for (path, mode) in [
        ("/tmp/qcap/s.bin", "TCG, real mode"),
        ("/tmp/qcap/k.bin", "KVM, protected mode"),
    ] {
        let Ok(stream) = std::fs::read(path) else {
            println!("SKIPPED: {path} ({mode}) is not there");
            continue;
        };
        let (q, hflags) = captured_cpu(&stream).unwrap_or_else(|| panic!("no cpu section in {path}"));
        assert_eq!(q.compute_hflags(), hflags, "{path} ({mode})");
        checked += 1;
    }
    println!("compute_hflags checked against {checked} captured QEMU 7.2 stream(s)");
}

#[test]
fn test_components_past_avx_in_init_state_are_dropped() {
    let mut s = base_common();
    // x87, SSE and PKRU (value 0).
    s.xsave[512..520].copy_from_slice(&(0x3u64 | 1 << 9).to_le_bytes());
    let q = QemuCpu::from_common(&s).unwrap();
    assert_eq!(q.xstate_bv, 0x3);
    s.xsave[2688] = 0x55; // PKRU's slot in the standard format
    assert_eq!(
        QemuCpu::from_common(&s),
        Err(NativeError::Unrepresentable {
            field: "xsave.xstate_bv".into(),
            value: 0x203
        })
    );
}

#[test]
fn test_named_msrs_absent_from_common_get_reset_values() {
    let q = QemuCpu::from_common(&base_common()).unwrap();
    assert_eq!((q.pat, q.smbase, q.cstar), (0x0007_0406_0007_0406, SMBASE_RESET, 0));
    let back = q.to_common(0).unwrap();
    // The round trip lists all ten named MSRs.
    assert!(QEMU_NAMED_MSRS.iter().all(|i| back.msrs.iter().any(|m| m.index == *i)));
}
