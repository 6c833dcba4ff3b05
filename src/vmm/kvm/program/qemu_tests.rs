//! The program under real QEMU, TCG and KVM: a 32-bit Multiboot stub (QEMU's `-kernel` loader
//! starts 32-bit code) switches to long mode with [`super::super::boot`]'s tables and drops to
//! CPL 3 at the program's entry, as the kvm backend starts it. Nothing then answers the
//! program's ports but debugcon: it must make progress, pace itself and report on its own.

use iced_x86::code_asm::*;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::qemu::{find_qemu, Accel, Qemu, QemuConfig};
use crate::vmm::kvm::boot::{write_boot_tables, CODE_SELECTOR, DATA_SELECTOR, GDT_ADDR, TSS_SELECTOR};

/// Where the image is loaded: the program first, at its address (QEMU's Multiboot loader
/// wants 1 MiB or above), then the header, the stub and a copy of the boot tables.
const LOAD_ADDR: u32 = CODE_ADDR as u32;
const HEADER_OFFSET: u32 = 0x1000;
const STUB_OFFSET: u32 = 0x1040;
const TABLES_OFFSET: u32 = 0x2000;
/// The boot structures, from the GDT to the end of the first page directory.
const TABLES_START: u32 = GDT_ADDR as u32;
const TABLES_END: u32 = 0x4000;
const STUB_GDT_OFFSET: u32 = 0x6000;
const IMAGE_BYTES: usize = 0x6100;
/// The stub's 64-bit part, from the stub's start.
const LONG_OFFSET: u32 = 0x200;
const STUB_STACK: u32 = 0x9_0000;
const MEMORY_MIB: u64 = 64;

fn image(spec: &ProgramSpec) -> Vec<u8> {
    let code = assemble(spec).unwrap();
    let tables = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    write_boot_tables(&tables, MEMORY_MIB << 20).unwrap();
    let mut low = vec![0u8; (TABLES_END - TABLES_START) as usize];
    tables
        .read_slice(&mut low, GuestAddress(u64::from(TABLES_START)))
        .unwrap();

    assert!(code.len() <= HEADER_OFFSET as usize);
    let mut img = vec![0u8; IMAGE_BYTES];
    img[..code.len()].copy_from_slice(&code);
    let magic: u32 = 0x1BAD_B002;
    let flags: u32 = 1 << 16;
    let header = [
        magic,
        flags,
        0u32.wrapping_sub(magic.wrapping_add(flags)),
        LOAD_ADDR + HEADER_OFFSET,
        LOAD_ADDR,
        0,
        0,
        LOAD_ADDR + STUB_OFFSET,
    ];
    for (i, w) in header.iter().enumerate() {
        let at = HEADER_OFFSET as usize + i * 4;
        img[at..at + 4].copy_from_slice(&w.to_le_bytes());
    }
    img[TABLES_OFFSET as usize..TABLES_OFFSET as usize + low.len()].copy_from_slice(&low);
    // The stub's own GDT: null, ring-0 64-bit code, ring-0 data; and its GDTR, then the real
    // GDT's GDTR.
    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    let at = STUB_GDT_OFFSET as usize;
    for (i, e) in gdt.iter().enumerate() {
        img[at + i * 8..at + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    img[at + 0x20..at + 0x22].copy_from_slice(&23u16.to_le_bytes());
    img[at + 0x22..at + 0x26].copy_from_slice(&(LOAD_ADDR + STUB_GDT_OFFSET).to_le_bytes());
    img[at + 0x30..at + 0x32].copy_from_slice(&(5 * 8 - 1u16).to_le_bytes());
    img[at + 0x32..at + 0x3a].copy_from_slice(&GDT_ADDR.to_le_bytes());
    let stub = stub().unwrap();
    img[STUB_OFFSET as usize..STUB_OFFSET as usize + stub.len()].copy_from_slice(&stub);
    img
}

fn stub() -> Result<Vec<u8>, IcedError> {
    let gdtr = LOAD_ADDR + STUB_GDT_OFFSET + 0x20;
    let real_gdtr = LOAD_ADDR + STUB_GDT_OFFSET + 0x30;
    let mut a = CodeAssembler::new(32)?;
    a.cli()?;
    a.mov(esp, STUB_STACK)?;
    a.mov(esi, LOAD_ADDR + TABLES_OFFSET)?;
    a.mov(edi, TABLES_START)?;
    a.mov(ecx, TABLES_END - TABLES_START)?;
    a.cld()?;
    a.rep().movsb()?;
    a.lgdt(ptr(u64::from(gdtr)))?;
    a.mov(eax, cr4)?;
    a.or(eax, 1 << 5)?;
    a.mov(cr4, eax)?;
    a.mov(eax, 0x1000u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xC000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 1 << 8)?;
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8001_0001u32 as i32)?;
    a.mov(cr0, eax)?;
    // A far return to 0x08:LONG_OFFSET, the 64-bit part.
    a.push(0x08u32)?;
    a.push(LOAD_ADDR + STUB_OFFSET + LONG_OFFSET)?;
    a.retf()?;
    // 64-bit code from here (decoded as 64-bit once CS is the long-mode segment).
    let mut a64 = CodeAssembler::new(64)?;
    a64.lgdt(ptr(u64::from(real_gdtr)))?;
    // The TSS descriptor is marked busy (as the vCPU's TR is); ltr wants it available.
    a64.mov(byte_ptr(GDT_ADDR + u64::from(TSS_SELECTOR) + 5), 0x89u32)?;
    a64.mov(ax, u32::from(TSS_SELECTOR))?;
    a64.ltr(ax)?;
    a64.mov(ax, u32::from(DATA_SELECTOR))?;
    a64.mov(ds, ax)?;
    a64.mov(es, ax)?;
    a64.mov(fs, ax)?;
    a64.mov(gs, ax)?;
    a64.push(i32::from(DATA_SELECTOR))?;
    a64.mov(rax, STACK_TOP)?;
    a64.push(rax)?;
    a64.push(2i32)?;
    a64.push(i32::from(CODE_SELECTOR))?;
    a64.mov(rax, CODE_ADDR)?;
    a64.push(rax)?;
    a64.iretq()?;
    let mut code = a.assemble(u64::from(LOAD_ADDR + STUB_OFFSET))?;
    assert!(code.len() <= LONG_OFFSET as usize);
    code.resize(LONG_OFFSET as usize, 0xcc);
    code.extend(a64.assemble(u64::from(LOAD_ADDR + STUB_OFFSET + LONG_OFFSET))?);
    Ok(code)
}

#[test]
fn test_program_runs_under_qemu_alone() {
    let Some(binary) = find_qemu() else {
        println!("SKIPPED: qemu-system-x86_64 not found");
        return;
    };
    const RATE: u64 = 8 << 20;
    let tsc_hz = crate::qemu::host_tsc_hz();
    let spec = ProgramSpec {
        working_set_pages: 1024,
        batch_pages: 4,
        verify_every_batches: 256,
        pattern: ProgramPattern::Random { seed: 99 },
        rate_bytes_per_sec: RATE,
        tsc_ticks_per_batch: 4 * PAGE_SIZE * tsc_hz / RATE,
    };
    let mut accels = vec![Accel::Tcg];
    if Accel::detect() == Accel::Kvm {
        accels.push(Accel::Kvm);
    }
    for accel in accels {
        let config = QemuConfig {
            binary: binary.clone(),
            accel,
            memory_mib: MEMORY_MIB,
            incoming: false,
            machine: "pc".into(),
            extra_args: Vec::new(),
        };
        let qemu = Qemu::start(&config, Some(&image(&spec))).unwrap();
        qemu.wait_for_output(DEBUGCON_READY_LINE, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{accel:?}: {e}: {}", qemu.stderr_tail()));
        let start = Instant::now();
        let pass_lines = |out: &str| -> Vec<DebugconReport> { out.lines().filter_map(parse_debugcon_line).collect() };
        while pass_lines(&qemu.debug_output()).len() < 6 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let elapsed = start.elapsed();
        let out = qemu.debug_output();
        let reports = pass_lines(&out);
        assert!(reports.len() >= 6, "{accel:?}: {out}");
        assert!(
            reports.iter().zip(1..).all(|(r, pass)| r.pass == pass),
            "{accel:?}: {out}"
        );
        assert!(reports.iter().all(|r| r.mismatches == 0), "{accel:?}: {out}");
        // A behaviour check, not a benchmark: paced by nobody but itself, the guest keeps near
        // its rate (a factor of 3, as timing on a shared host is noisy; polling adds 50 ms).
        let last = reports[reports.len() - 1];
        let rate = ((last.progress - spec.working_set_pages) * PAGE_SIZE) as f64 / elapsed.as_secs_f64();
        println!(
            "{accel:?}: {} pass lines in {elapsed:?}, {:.1} MiB/s (target {} MiB/s); last {last:?}",
            reports.len(),
            rate / f64::from(1 << 20),
            RATE >> 20
        );
        assert!(
            rate > RATE as f64 / 3.0 && rate < RATE as f64 * 3.0,
            "{accel:?}: {rate:.0} bytes/s against {RATE}"
        );
    }
}
