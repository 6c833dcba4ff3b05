//! QEMU's FPU, SSE and AVX registers <-> the common XSAVE image, as `kvm_put_xsave` and
//! `kvm_get_xsave` convert them (`x86_cpu_xsave_all_areas` and `x86_cpu_xrstor_all_areas`).
//!
//! The image is [`QEMU_XSAVE_BYTES`] long, the size of `struct kvm_xsave` and of every image the
//! kvm backend captures, in the standard (non-compacted) format:
//! - legacy region: FCW 0, FSW 2 (with TOP in bits 11..13, as `fpus_vmstate` has it), abridged
//!   FTW 4 (`fptag_vmstate`: bit set = register valid), FOP 6, FIP 8, FDP 16 (64-bit forms),
//!   MXCSR 24, ST0-ST7 at 32 + 16·i (80 bits each), XMM0-XMM15 at 160 + 16·i;
//! - XSAVE header at 512: XSTATE_BV (`xstate_bv`), XCOMP_BV (must be 0: standard format);
//! - YMM high halves at 576 + 16·i.
//!
//! `fpregs[i]` is slot `i` of the image, as `kvm_put_xsave` copies it (TCG numbers the same
//! array physically, so a TCG vCPU with TOP ≠ 0 sees its stack rotated; QEMU's own migration
//! between TCG and KVM has the same property).
//!
//! **Not state**, ignored on the way in and written as fixed values on the way out: byte 5
//! (reserved, 0), MXCSR_MASK at 28 (a property of the CPU: written as 0xffff, what TCG's FXSAVE
//! and every CPU with DAZ report), bytes 10..15 of each ST slot, 416..512 (reserved and
//! software-available, 0), the header's reserved bytes 528..576 (0), and every byte from 832 on
//! (0: the components there, AVX-512, PKRU, MPX, ..., must be absent from XSTATE_BV, and an
//! absent component's bytes are ignored by XRSTOR). A component past AVX that XSTATE_BV marks
//! present while every byte from 832 on is zero is in its init state (all these components'
//! init state is zeros): its bit is dropped rather than refused. Any other bit past AVX is
//! refused.

use super::{QemuCpu, QemuFpReg};
use crate::format::native::NativeError;

/// Length of the XSAVE image this layout produces and accepts.
pub const QEMU_XSAVE_BYTES: usize = 4096;
/// XSTATE_BV components QEMU's stream carries here: x87, SSE, AVX.
pub const QEMU_XSTATE_COMPONENTS: u64 = 0b111;
/// The MXCSR_MASK written into every image.
pub const MXCSR_MASK: u32 = 0xffff;

const FCW: usize = 0;
const FSW: usize = 2;
const FTW: usize = 4;
const FOP: usize = 6;
const FIP: usize = 8;
const FDP: usize = 16;
const MXCSR: usize = 24;
const MXCSR_MASK_AT: usize = 28;
const ST0: usize = 32;
const XMM0: usize = 160;
const XSTATE_BV: usize = 512;
const XCOMP_BV: usize = 520;
const YMMH0: usize = 576;
/// End of the state this layout carries.
const YMMH_END: usize = YMMH0 + 16 * 16;

fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

fn u16_at(image: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([image[at], image[at + 1]])
}

fn u32_at(image: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&image[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(image: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&image[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The XSAVE image of `q`'s FPU/SSE/AVX registers. `fptag` must fit a byte (checked by the
/// caller).
pub(super) fn image_from_qemu(q: &QemuCpu) -> Vec<u8> {
    let mut image = vec![0u8; QEMU_XSAVE_BYTES];
    put(&mut image, FCW, &q.fpuc.to_le_bytes());
    put(&mut image, FSW, &q.fpus.to_le_bytes());
    image[FTW] = q.fptag as u8;
    put(&mut image, FOP, &q.fpop.to_le_bytes());
    put(&mut image, FIP, &q.fpip.to_le_bytes());
    put(&mut image, FDP, &q.fpdp.to_le_bytes());
    put(&mut image, MXCSR, &q.mxcsr.to_le_bytes());
    put(&mut image, MXCSR_MASK_AT, &MXCSR_MASK.to_le_bytes());
    for (i, r) in q.fpregs.iter().enumerate() {
        put(&mut image, ST0 + 16 * i, &r.mantissa.to_le_bytes());
        put(&mut image, ST0 + 16 * i + 8, &r.exponent.to_le_bytes());
    }
    for (i, x) in q.xmm.iter().enumerate() {
        put(&mut image, XMM0 + 16 * i, &x[0].to_le_bytes());
        put(&mut image, XMM0 + 16 * i + 8, &x[1].to_le_bytes());
    }
    put(&mut image, XSTATE_BV, &q.xstate_bv.to_le_bytes());
    for (i, y) in q.ymmh.iter().enumerate() {
        put(&mut image, YMMH0 + 16 * i, &y[0].to_le_bytes());
        put(&mut image, YMMH0 + 16 * i + 8, &y[1].to_le_bytes());
    }
    image
}

/// Checks what QEMU cannot hold: components beyond x87/SSE/AVX, or a compacted image.
pub(super) fn check_xstate_bv(field: &str, xstate_bv: u64) -> Result<(), NativeError> {
    if xstate_bv & !QEMU_XSTATE_COMPONENTS != 0 {
        return Err(NativeError::Unrepresentable {
            field: field.to_owned(),
            value: xstate_bv,
        });
    }
    Ok(())
}

/// Fills `q`'s FPU/SSE/AVX fields from a common XSAVE image, refusing state QEMU cannot hold.
pub(super) fn image_into_qemu(image: &[u8], q: &mut QemuCpu) -> Result<(), NativeError> {
    if image.len() != QEMU_XSAVE_BYTES {
        return Err(NativeError::Unrepresentable {
            field: "xsave.len()".into(),
            value: image.len() as u64,
        });
    }
    let mut xstate_bv = u64_at(image, XSTATE_BV);
    if image[YMMH_END..].iter().all(|&b| b == 0) {
        // Components past AVX whose area is all zeros are in their init state, which XRSTOR
        // also loads for a clear bit (KVM may report PKRU = 0 this way).
        xstate_bv &= QEMU_XSTATE_COMPONENTS;
    }
    check_xstate_bv("xsave.xstate_bv", xstate_bv)?;
    let xcomp_bv = u64_at(image, XCOMP_BV);
    if xcomp_bv != 0 {
        return Err(NativeError::Unrepresentable {
            field: "xsave.xcomp_bv".into(),
            value: xcomp_bv,
        });
    }
    q.fpuc = u16_at(image, FCW);
    q.fpus = u16_at(image, FSW);
    q.fptag = u16::from(image[FTW]);
    q.fpop = u16_at(image, FOP);
    q.fpip = u64_at(image, FIP);
    q.fpdp = u64_at(image, FDP);
    q.mxcsr = u32_at(image, MXCSR);
    for (i, r) in q.fpregs.iter_mut().enumerate() {
        *r = QemuFpReg {
            mantissa: u64_at(image, ST0 + 16 * i),
            exponent: u16_at(image, ST0 + 16 * i + 8),
        };
    }
    for (i, x) in q.xmm.iter_mut().enumerate() {
        *x = [u64_at(image, XMM0 + 16 * i), u64_at(image, XMM0 + 16 * i + 8)];
    }
    q.xstate_bv = xstate_bv;
    for (i, y) in q.ymmh.iter_mut().enumerate() {
        *y = [u64_at(image, YMMH0 + 16 * i), u64_at(image, YMMH0 + 16 * i + 8)];
    }
    Ok(())
}

/// Sets every byte of `image` that is not state (see the module docs) to the value
/// [`image_from_qemu`] writes there; `image` must be [`QEMU_XSAVE_BYTES`] long. Lets tests and
/// callers compare images modulo what this layout normalises.
pub fn normalise_image(image: &mut [u8]) {
    if image.len() != QEMU_XSAVE_BYTES {
        return;
    }
    image[FTW + 1] = 0;
    put(image, MXCSR_MASK_AT, &MXCSR_MASK.to_le_bytes());
    for i in 0..8 {
        image[ST0 + 16 * i + 10..ST0 + 16 * i + 16].fill(0);
    }
    image[XMM0 + 16 * 16..XSTATE_BV].fill(0);
    image[XCOMP_BV + 8..YMMH0].fill(0);
    image[YMMH_END..].fill(0);
}
