//! Long-mode boot: the structures that let a vCPU start directly in 64-bit mode.
//!
//! There is no firmware and no boot loader. [`write_boot_tables`] writes a GDT, a TSS and page
//! tables that identity-map guest RAM with 2 MiB pages, and [`setup_long_mode`] loads a vCPU's
//! registers as if a boot loader had just switched to long mode and jumped to the entry point.
//! Everything lives in low memory below [`BOOT_RESERVED_END`]:
//!
//! | address | what |
//! |---|---|
//! | [`GDT_ADDR`] | the GDT: null, 64-bit code ([`CODE_SELECTOR`]), data ([`DATA_SELECTOR`]), TSS ([`TSS_SELECTOR`]) |
//! | [`TSS_ADDR`] | the 64-bit TSS, whose I/O permission bitmap opens [`GUEST_PORTS`] and [`DEBUGCON_PORT`], nothing else |
//! | [`PML4_ADDR`] | the PML4, one entry |
//! | [`PDPT_ADDR`] | the PDPT, one entry per GiB |
//! | [`PD_ADDR`] | one page directory per GiB, 512 entries of 2 MiB each |
//!
//! # Why the guest runs at CPL 3
//!
//! The guest starts in ring 3, with user pages, and reaches its ports through the TSS I/O
//! bitmap. Where `/dev/kvm` is PVM (the `kvm_pvm` module: virtualization by page tables, for
//! cloud VMs without VMX/SVM, as on the machines this project is built on), guest code at CPL 0
//! runs some 2,500 times slower than at CPL 3: measured there, a `dec`/`jnz` loop ran 0.55 M
//! iterations/s against 1.4 G, and page stores 2 MB/s against 6 GB/s. That is PVM emulating
//! supervisor code that is not PVM-aware, while user code runs natively. With VMX or SVM both
//! rings run natively, and an `out` the bitmap allows still exits to the VMM, so ring 3 costs
//! nothing there. PVM also clears IOPL, which is why the bitmap, not IOPL, grants the ports.
//!
//! The IDT is empty (limit 0): the guest runs with interrupts off, so any exception (a `#GP`
//! from an `out` to a port the bitmap does not open, for instance) becomes a triple fault, which
//! KVM reports as a shutdown exit rather than letting the guest run on.

use std::ops::RangeInclusive;

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the TSS that the task register names.
pub const TSS_ADDR: u64 = 0x600;
/// The I/O ports the guest may write from CPL 3, each with an access of up to
/// [`GUEST_PORT_ACCESS_BYTES`]; any other access faults (see the module docs).
pub const GUEST_PORTS: RangeInclusive<u16> = 0x510..=0x513;
/// The widest access to a port of [`GUEST_PORTS`]: a 32-bit `out` to port `p` covers ports
/// `p..p + 4`, and the CPU requires the bitmap to allow all four.
pub const GUEST_PORT_ACCESS_BYTES: u16 = 4;
/// The isa-debugcon port (QEMU's `-device isa-debugcon,iobase=0xe9`), open to CPL 3 for byte
/// accesses only: the guest reports text there, which QEMU routes to a chardev and our VMM
/// reads in its port exits.
pub const DEBUGCON_PORT: u16 = crate::qemu::guest::DEBUGCON_PORT;
/// Guest-physical address of the PML4, loaded into CR3.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the first page directory; the others follow, one per GiB.
pub const PD_ADDR: u64 = 0x3000;
/// The most RAM the boot page tables map.
pub const MAX_RAM_BYTES: u64 = 64 << 30;
/// End of the low memory the boot structures may use: the page directories for
/// [`MAX_RAM_BYTES`]. Guest code and data belong above it.
pub const BOOT_RESERVED_END: u64 = PD_ADDR + (MAX_RAM_BYTES / GIB) * PAGE_TABLE_BYTES;
/// Selector of the flat 64-bit code segment: GDT entry 1, requested privilege 3.
pub const CODE_SELECTOR: u16 = 0x08 | USER_RPL;
/// Selector of the flat data segment (also used for the stack): GDT entry 2, privilege 3.
pub const DATA_SELECTOR: u16 = 0x10 | USER_RPL;
/// GDT selector of the 64-bit TSS (a 16-byte descriptor).
pub const TSS_SELECTOR: u16 = 0x18;

const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;
const PAGE_TABLE_BYTES: u64 = 4096;
const ENTRIES_PER_TABLE: u64 = 512;
const USER_RPL: u16 = 3;
const USER_DPL: u8 = 3;

/// A 64-bit TSS without its I/O bitmap; the bitmap follows at this offset.
const TSS_HEADER_BYTES: usize = 0x68;
/// Offset of the TSS field that gives the I/O bitmap's offset.
const TSS_IO_MAP_BASE_FIELD: usize = 0x66;
/// The last port a bitmap bit must allow.
const LAST_OPEN_PORT: u16 = {
    let guest_ports_end = *GUEST_PORTS.end() + GUEST_PORT_ACCESS_BYTES - 1;
    if DEBUGCON_PORT > guest_ports_end {
        DEBUGCON_PORT
    } else {
        guest_ports_end
    }
};
/// One bit per port up to the last open port, then the all-ones byte the CPU requires at the end
/// (it reads two bytes per check).
const IO_BITMAP_BYTES: usize = LAST_OPEN_PORT as usize / 8 + 2;
const TSS_LIMIT: u32 = (TSS_HEADER_BYTES + IO_BITMAP_BYTES - 1) as u32;

const _: () = assert!(GDT_ADDR + GDT_ENTRIES as u64 * 8 <= TSS_ADDR);
const _: () = assert!(TSS_ADDR + (TSS_LIMIT as u64) < PML4_ADDR);

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
/// Lets CPL 3 use the mapping; needed at every level.
const PTE_USER: u64 = 1 << 2;
const PTE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
/// In a page-directory entry: maps a 2 MiB page rather than pointing to a page table.
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment types (the low four bits of the access byte).
const TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
const TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
/// A system-segment type: a busy 64-bit TSS, the only kind VMX accepts in TR.
const TYPE_TSS_BUSY: u8 = 0xb;

/// The flat 64-bit code segment, as the vCPU's hidden segment state.
const CODE_SEGMENT: kvm_segment = kvm_segment {
    base: 0,
    limit: 0xffff_ffff,
    selector: CODE_SELECTOR,
    type_: TYPE_CODE_EXEC_READ_ACCESSED,
    present: 1,
    dpl: USER_DPL,
    db: 0,
    s: 1,
    l: 1,
    g: 1,
    avl: 0,
    unusable: 0,
    padding: 0,
};
/// The flat data segment for DS, ES, FS, GS and SS.
const DATA_SEGMENT: kvm_segment = kvm_segment {
    selector: DATA_SELECTOR,
    type_: TYPE_DATA_READ_WRITE_ACCESSED,
    db: 1,
    l: 0,
    ..CODE_SEGMENT
};
/// The task register: KVM on VMX refuses to enter a guest whose TR is unusable, and the I/O
/// bitmap is what lets CPL 3 reach its ports.
const TSS_SEGMENT: kvm_segment = kvm_segment {
    base: TSS_ADDR,
    limit: TSS_LIMIT,
    selector: TSS_SELECTOR,
    type_: TYPE_TSS_BUSY,
    present: 1,
    dpl: 0,
    db: 0,
    s: 0,
    l: 0,
    g: 0,
    avl: 0,
    unusable: 0,
    padding: 0,
};

/// Why the guest could not be prepared to boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// More RAM than the boot page tables map.
    #[error("guest RAM of {ram_bytes} bytes exceeds the {limit} bytes the boot page tables map")]
    RamTooLarge {
        /// The requested RAM.
        ram_bytes: u64,
        /// [`MAX_RAM_BYTES`].
        limit: u64,
    },
    /// Guest memory does not hold the address a boot structure goes to.
    #[error("writing the boot structures at guest address {addr:#x}")]
    GuestMemory {
        /// Guest-physical address of the failed write.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("{ioctl} failed")]
    Kvm {
        /// The ioctl's name.
        ioctl: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Writes the GDT, the TSS and page tables that identity-map `ram_bytes` rounded up to whole GiB
/// (at least one) into `mem`. `mem` must hold the tables: from 0 to [`PD_ADDR`] plus 4 KiB per
/// GiB mapped, never more than [`BOOT_RESERVED_END`].
pub fn write_boot_tables(mem: &GuestMemoryMmap<()>, ram_bytes: u64) -> Result<(), BootError> {
    if ram_bytes > MAX_RAM_BYTES {
        return Err(BootError::RamTooLarge {
            ram_bytes,
            limit: MAX_RAM_BYTES,
        });
    }
    let gibs = ram_bytes.div_ceil(GIB).max(1);

    let gdt = gdt_entries();
    write(
        mem,
        GDT_ADDR,
        &gdt.iter().flat_map(|entry| entry.to_le_bytes()).collect::<Vec<u8>>(),
    )?;
    write(mem, TSS_ADDR, &tss())?;

    // Whole tables, zeros included, so that memory that is not fresh cannot leave stray mappings.
    // One PML4 entry maps 512 GiB, more than MAX_RAM_BYTES.
    write(
        mem,
        PML4_ADDR,
        &table(|index| (index == 0).then_some(PDPT_ADDR | PTE_FLAGS)),
    )?;
    write(
        mem,
        PDPT_ADDR,
        &table(|gib| (gib < gibs).then_some((PD_ADDR + gib * PAGE_TABLE_BYTES) | PTE_FLAGS)),
    )?;
    for gib in 0..gibs {
        let pd = table(|entry| Some((gib * GIB + entry * TWO_MIB) | PTE_FLAGS | PTE_HUGE));
        write(mem, PD_ADDR + gib * PAGE_TABLE_BYTES, &pd)?;
    }
    Ok(())
}

/// The TSS: all zeros (no stack is ever switched to) but for the I/O bitmap, whose bits are set
/// (port denied) except for the bytes that accesses to [`GUEST_PORTS`] cover and
/// [`DEBUGCON_PORT`].
fn tss() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_HEADER_BYTES + IO_BITMAP_BYTES];
    tss[TSS_IO_MAP_BASE_FIELD..TSS_IO_MAP_BASE_FIELD + 2].copy_from_slice(&(TSS_HEADER_BYTES as u16).to_le_bytes());
    let bitmap = &mut tss[TSS_HEADER_BYTES..];
    bitmap.fill(0xff);
    let guest_ports = *GUEST_PORTS.start()..=*GUEST_PORTS.end() + GUEST_PORT_ACCESS_BYTES - 1;
    for port in guest_ports.chain(std::iter::once(DEBUGCON_PORT)) {
        bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
    }
    tss
}

/// One 4 KiB page table; `entry(index)` gives each entry, `None` for not present.
fn table(entry: impl Fn(u64) -> Option<u64>) -> Vec<u8> {
    (0..ENTRIES_PER_TABLE)
        .flat_map(|index| entry(index).unwrap_or(0).to_le_bytes())
        .collect()
}

/// Loads `vcpu` with the state of a CPU that has just entered 64-bit mode with the tables of
/// [`write_boot_tables`] and dropped to CPL 3 (see the module docs): paging on, CR3 at
/// [`PML4_ADDR`], flat segments, `rip` = `entry`, `rsp` = `stack_top`, interrupts off. The FPU
/// and the other registers keep their reset state.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64, stack_top: u64) -> Result<(), BootError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    sregs.cs = CODE_SEGMENT;
    sregs.ds = DATA_SEGMENT;
    sregs.es = DATA_SEGMENT;
    sregs.fs = DATA_SEGMENT;
    sregs.gs = DATA_SEGMENT;
    sregs.ss = DATA_SEGMENT;
    sregs.tr = TSS_SEGMENT;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))?;

    // Bit 1 of RFLAGS is reserved and always set; IF stays clear; IOPL stays 0 (see the module
    // docs).
    let regs = kvm_regs {
        rip: entry,
        rsp: stack_top,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_error("KVM_SET_REGS"))?;
    Ok(())
}

const GDT_ENTRIES: usize = 5;

/// The GDT as u64 words, built from the same segments the vCPU is loaded with, so that a guest
/// reloading a selector gets what it already has.
fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let tss = descriptor(&TSS_SEGMENT);
    // A system descriptor in long mode takes two slots; the second holds base bits 63..32 (0).
    [0, descriptor(&CODE_SEGMENT), descriptor(&DATA_SEGMENT), tss, 0]
}

/// Encodes a segment with a base below 4 GiB as an 8-byte GDT descriptor.
fn descriptor(segment: &kvm_segment) -> u64 {
    let (base, limit) = (segment.base, u64::from(segment.limit));
    // With granularity set, the descriptor counts the limit in 4 KiB units.
    let limit = if segment.g == 1 { limit >> 12 } else { limit };
    let access = u64::from(segment.type_)
        | u64::from(segment.s) << 4
        | u64::from(segment.dpl) << 5
        | u64::from(segment.present) << 7;
    let flags =
        u64::from(segment.avl) | u64::from(segment.l) << 1 | u64::from(segment.db) << 2 | u64::from(segment.g) << 3;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | ((base >> 24) & 0xff) << 56
}

fn write(mem: &GuestMemoryMmap<()>, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemory { addr, source })
}

fn kvm_error(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { ioctl, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(bytes: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn test_descriptors_match_the_textbook_encodings() {
        assert_eq!(
            gdt_entries(),
            [
                0,
                0x00af_fb00_0000_ffff,
                0x00cf_f300_0000_ffff,
                0x0000_8b00_0600_010b,
                0
            ]
        );
    }

    #[test]
    fn test_page_tables_identity_map_ram_rounded_up_to_a_gib() {
        let mem = memory(BOOT_RESERVED_END);
        write_boot_tables(&mem, 3 * GIB + 1).unwrap();
        assert_eq!(read(&mem, PML4_ADDR), PDPT_ADDR | 0x7);
        for gib in 0..4 {
            let pd = PD_ADDR + gib * PAGE_TABLE_BYTES;
            assert_eq!(read(&mem, PDPT_ADDR + gib * 8), pd | 0x7);
            assert_eq!(read(&mem, pd), (gib * GIB) | 0x87);
            assert_eq!(read(&mem, pd + 511 * 8), (gib * GIB + 511 * TWO_MIB) | 0x87);
        }
        assert_eq!(read(&mem, PDPT_ADDR + 4 * 8), 0, "a fifth GiB was mapped");
        assert_eq!(read(&mem, GDT_ADDR + 8), 0x00af_fb00_0000_ffff);
    }

    #[test]
    fn test_tss_io_bitmap_opens_the_guest_ports_and_debugcon_only() {
        let mem = memory(BOOT_RESERVED_END);
        write_boot_tables(&mem, GIB).unwrap();
        let io_map_base: u16 = mem.read_obj(GuestAddress(TSS_ADDR + 0x66)).unwrap();
        let denied = |port: u16| {
            let byte: u8 = mem
                .read_obj(GuestAddress(TSS_ADDR + u64::from(io_map_base) + u64::from(port / 8)))
                .unwrap();
            byte & (1 << (port % 8)) != 0
        };
        // A 32-bit out to 0x513 also covers 0x514..=0x516; debugcon takes bytes at 0xe9. Ports
        // past the TSS limit (here from 0x520) are denied by the limit rather than by bits.
        let open = |port: u16| (0x510..=0x516).contains(&port) || port == 0xe9;
        let last_in_limit = (u64::from(TSS_LIMIT) + 1 - u64::from(io_map_base)) * 8 - 1;
        assert_eq!(last_in_limit, 0x51f);
        assert!((0..=0x51f).all(|port| denied(port) != open(port)));
        // The CPU reads two bytes per check: the byte past the last port's must be all ones.
        let tail: u8 = mem.read_obj(GuestAddress(TSS_ADDR + u64::from(TSS_LIMIT))).unwrap();
        assert_eq!(tail, 0xff);
    }

    #[test]
    fn test_ram_beyond_the_limit_is_rejected() {
        let mem = memory(BOOT_RESERVED_END);
        write_boot_tables(&mem, MAX_RAM_BYTES).unwrap();
        let error = write_boot_tables(&mem, MAX_RAM_BYTES + 1).unwrap_err();
        assert!(matches!(error, BootError::RamTooLarge { ram_bytes, .. } if ram_bytes == MAX_RAM_BYTES + 1));
    }

    #[test]
    fn test_memory_too_small_for_the_tables_is_an_error() {
        let mem = memory(PD_ADDR);
        let error = write_boot_tables(&mem, GIB).unwrap_err();
        assert!(
            matches!(error, BootError::GuestMemory { addr: PD_ADDR, .. }),
            "{error:?}"
        );
    }
}
