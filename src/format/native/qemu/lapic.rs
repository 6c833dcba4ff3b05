//! QEMU's `apic` section <-> the common local-APIC register page, as `kvm_get_apic_state` and
//! `kvm_put_apic_state` (`hw/i386/kvm/apic.c`) convert it.
//!
//! Each xAPIC register is a little-endian u32 at the start of its 16-byte slot:
//! ID 0x20 (APIC ID in bits 24..31), APR 0x90 (`arb_id`, which `kvm_get_apic_state` reads from
//! there; written back to the same place so that it round-trips), TPR 0x80, LDR 0xd0 (bits
//! 24..31), DFR 0xe0 (model in bits 28..31, the rest all ones), SVR 0xf0, ISR/TMR/IRR at
//! 0x100/0x180/0x200 in 16-byte strides, ESR 0x280, ICR 0x300/0x310, LVT timer, thermal,
//! performance counter, LINT0, LINT1, error at 0x320..0x370, initial count 0x380, divide
//! configuration 0x3e0.
//!
//! **Not state**, ignored on the way in and written as 0 on the way out, as `kvm_put_apic_state`
//! leaves them: the version register (0x30), PPR (0xa0), EOI (0xb0, write-only), RRD (0xc0) and
//! the timer's current count (0x390); KVM and QEMU compute them. Every other byte of the page
//! (the upper 12 bytes of each slot, reserved registers, the CMCI LVT, the bits of ID, LDR and
//! DFR named above as fixed) must hold what `kvm_put_apic_state` writes, or the page is refused
//! as unrepresentable, naming the byte (`lapic[0x2f0]`).

use super::QemuApic;
use crate::format::native::NativeError;
use crate::format::LAPIC_REGISTER_BYTES;

/// Offsets of the registers whose slots are not state (see the module docs).
pub const LAPIC_NON_STATE: [usize; 5] = [0x30, 0xa0, 0xb0, 0xc0, 0x390];

const ID: usize = 0x20;
const TPR: usize = 0x80;
const APR: usize = 0x90;
const LDR: usize = 0xd0;
const DFR: usize = 0xe0;
const SVR: usize = 0xf0;
const ISR: usize = 0x100;
const TMR: usize = 0x180;
const IRR: usize = 0x200;
const ESR: usize = 0x280;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
const LVT0: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_DIVIDE: usize = 0x3e0;
/// DFR bits 0..27, which read as ones.
const DFR_ONES: u32 = 0x0fff_ffff;
const SLOT: usize = 16;

/// `count_shift` as QEMU derives it from the divide configuration register.
pub fn count_shift(divide_conf: u32) -> i32 {
    let v = (divide_conf & 3) | ((divide_conf >> 1) & 4);
    ((v + 1) & 7) as i32
}

fn register(page: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]])
}

/// The register page of `a`.
pub(super) fn page_from_apic(a: &QemuApic) -> Vec<u8> {
    let mut page = vec![0u8; LAPIC_REGISTER_BYTES];
    let mut set = |at: usize, v: u32| page[at..at + 4].copy_from_slice(&v.to_le_bytes());
    set(ID, u32::from(a.id) << 24);
    set(TPR, u32::from(a.tpr));
    set(APR, u32::from(a.arb_id));
    set(LDR, u32::from(a.log_dest) << 24);
    set(DFR, (u32::from(a.dest_mode) << 28) | DFR_ONES);
    set(SVR, a.spurious_vec);
    for i in 0..8 {
        set(ISR + SLOT * i, a.isr[i]);
        set(TMR + SLOT * i, a.tmr[i]);
        set(IRR + SLOT * i, a.irr[i]);
    }
    set(ESR, a.esr);
    set(ICR_LOW, a.icr[0]);
    set(ICR_HIGH, a.icr[1]);
    for (i, &v) in a.lvt.iter().enumerate() {
        set(LVT0 + SLOT * i, v);
    }
    set(TIMER_INITIAL, a.initial_count);
    set(TIMER_DIVIDE, a.divide_conf);
    page
}

/// Reads a register page into an APIC with base `apicbase`, refusing any byte that
/// [`page_from_apic`] would not reproduce (non-state registers excepted). The page must be
/// [`LAPIC_REGISTER_BYTES`] long (checked by the caller's validation).
pub(super) fn apic_from_page(page: &[u8], apicbase: u32) -> Result<QemuApic, NativeError> {
    let mut a = QemuApic {
        apicbase,
        ..QemuApic::default()
    };
    for slot in (0..LAPIC_REGISTER_BYTES).step_by(SLOT) {
        if LAPIC_NON_STATE.contains(&slot) {
            continue;
        }
        if let Some(j) = (slot + 4..slot + SLOT).find(|&j| page[j] != 0) {
            return Err(unrepresentable(j, u64::from(page[j])));
        }
        let v = register(page, slot);
        // The bits of `v` this register cannot hold, which must be 0 (1 for DFR's low bits).
        let spill = match slot {
            ID => {
                a.id = (v >> 24) as u8;
                v & 0x00ff_ffff
            }
            TPR => {
                a.tpr = v as u8;
                v & !0xff
            }
            APR => {
                a.arb_id = v as u8;
                v & !0xff
            }
            LDR => {
                a.log_dest = (v >> 24) as u8;
                v & 0x00ff_ffff
            }
            DFR => {
                a.dest_mode = (v >> 28) as u8;
                (v & DFR_ONES) ^ DFR_ONES
            }
            SVR => {
                a.spurious_vec = v;
                0
            }
            ESR => {
                a.esr = v;
                0
            }
            ICR_LOW => {
                a.icr[0] = v;
                0
            }
            ICR_HIGH => {
                a.icr[1] = v;
                0
            }
            TIMER_INITIAL => {
                a.initial_count = v;
                0
            }
            TIMER_DIVIDE => {
                a.divide_conf = v;
                0
            }
            _ if (ISR..ISR + 8 * SLOT).contains(&slot) => {
                a.isr[(slot - ISR) / SLOT] = v;
                0
            }
            _ if (TMR..TMR + 8 * SLOT).contains(&slot) => {
                a.tmr[(slot - TMR) / SLOT] = v;
                0
            }
            _ if (IRR..IRR + 8 * SLOT).contains(&slot) => {
                a.irr[(slot - IRR) / SLOT] = v;
                0
            }
            _ if (LVT0..LVT0 + 6 * SLOT).contains(&slot) => {
                a.lvt[(slot - LVT0) / SLOT] = v;
                0
            }
            _ => v,
        };
        if spill != 0 {
            return Err(unrepresentable(slot, u64::from(v)));
        }
    }
    a.count_shift = count_shift(a.divide_conf);
    Ok(a)
}

fn unrepresentable(at: usize, value: u64) -> NativeError {
    NativeError::Unrepresentable {
        field: format!("lapic[{at:#x}]"),
        value,
    }
}

/// Sets the slots of the non-state registers to 0, as [`page_from_apic`] leaves them, so that
/// pages can be compared modulo what this layout normalises.
pub fn normalise_page(page: &mut [u8]) {
    if page.len() != LAPIC_REGISTER_BYTES {
        return;
    }
    for slot in LAPIC_NON_STATE {
        page[slot..slot + SLOT].fill(0);
    }
}
