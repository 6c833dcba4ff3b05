//! The guest QEMU runs for the busy-case comparison: a Multiboot (v1) image, assembled here with
//! iced-x86 for one [`GuestSpec`], that QEMU loads with `-kernel`.
//!
//! QEMU's Multiboot loader enters the image in 32-bit protected mode with paging off and flat
//! segments, so plain 32-bit code reaches every byte of a guest of up to 3 GiB without page
//! tables. The guest first writes one word to every page of its data area (leaving one page in
//! [`GuestSpec::zero_one_in`] zero, as the sim guest leaves its zero fraction), so that QEMU
//! migrates as many non-zero pages as migratory does; then it writes one word per page of its
//! hot set, page after page, paced against the TSC so that it dirties
//! [`GuestSpec::rate_bytes_per_sec`]. With KVM the guest's TSC runs at the host's rate, and the
//! host measures that rate ([`host_tsc_hz`]) and writes it, as ticks per batch, into the image.
//! Between batches the guest halts (`hlt`) until the next tick of the PIT, programmed to
//! [`TIMER_HZ`], instead of spinning: like the sim guest's writer, which sleeps between its
//! writes, it leaves the host's CPUs to the migration. IRQ 0 is the only interrupt unmasked,
//! and interrupts are on only inside `sti; hlt`; the handler acknowledges the tick and
//! returns to the instruction after the `hlt`.
//!
//! # Guest-physical layout
//!
//! | address | what |
//! |---|---|
//! | [`IMAGE_ADDR`] | the image: the Multiboot header ([`MultibootHeader`], 32 bytes) |
//! | [`PARAMS_ADDR`] | the parameter block the host writes: u32 fields at the `PARAM_*` offsets |
//! | `IMAGE_ADDR + TEXT_*_OFFSET` | the texts the guest prints, NUL-terminated |
//! | `IMAGE_ADDR + HANDLER_OFFSET` | the timer interrupt's handler |
//! | [`CODE_ADDR`] | the code; the entry point |
//! | [`STACK_TOP`] | the stack, growing down towards the image |
//! | [`IDT_ADDR`] | the interrupt descriptor table (vectors 0x20 to 0x2f, the PIC's remapped IRQs); its IDTR at [`IDTR_ADDR`] |
//! | [`STATE_ADDR`] | the state block: u32 fields at the `STATE_*` offsets; a memory dump of the paused guest reads its progress without its registers |
//! | [`STATE_ADDR`] + 4 KiB | free: room for a per-page ledger (a self-checking guest, issue 18) |
//! | [`DATA_ADDR`] | the data area up to the end of RAM; the hot set is its first pages |
//!
//! Everything the code reads comes from the parameter block, so a later guest can keep this
//! image's layout and add checks (a ledger of page generations, verify passes, verdicts on the
//! same port) without moving anything here.
//!
//! # Reports
//!
//! The guest writes text lines to the isa-debugcon port [`DEBUGCON_PORT`]:
//! [`READY_LINE`] after the fill, then `pass XXXXXXXX` (the passes over the hot set, in hex)
//! every [`GuestSpec::report_every_passes`] passes.

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use thiserror::Error;

/// Where the image is loaded (1 MiB), and where its Multiboot header is.
pub const IMAGE_ADDR: u32 = 0x10_0000;
/// The parameter block, right after the header.
pub const PARAMS_ADDR: u32 = IMAGE_ADDR + HEADER_BYTES as u32;
/// The code and the entry point.
pub const CODE_ADDR: u32 = IMAGE_ADDR + CODE_OFFSET as u32;
/// The initial stack pointer.
pub const STACK_TOP: u32 = 0x1F_F000;
/// The IDT, right above the stack.
pub const IDT_ADDR: u32 = STACK_TOP;
/// The IDTR operand of `lidt` (limit u16, base u32), at the end of the IDT's page.
pub const IDTR_ADDR: u32 = IDT_ADDR + 0xff0;
/// The vector of IRQ 0 once the PIC is remapped; IRQ 0-15 take 16 vectors from here.
pub const IRQ_BASE_VECTOR: u32 = 0x20;
/// The PIT's tick rate while the guest waits (its deadline is checked on every tick).
pub const TIMER_HZ: u32 = 1000;
/// The PIT's input clock.
const PIT_HZ: u32 = 1_193_182;
/// The state block (2 MiB).
pub const STATE_ADDR: u32 = 0x20_0000;
/// The first page of the data area and of the hot set (4 MiB).
pub const DATA_ADDR: u32 = 0x40_0000;
/// The I/O port of isa-debugcon (`-device isa-debugcon,iobase=0xe9`).
pub const DEBUGCON_PORT: u16 = 0xe9;
/// The line the guest prints once its data area is filled and the hot-set loop starts.
pub const READY_LINE: &str = "migratory-guest: ready";
/// The start of each progress line.
pub const PASS_PREFIX: &str = "pass ";

/// The Multiboot v1 header magic.
pub const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
/// Header flags: bit 16, the address fields are valid (the image is not ELF).
pub const MULTIBOOT_FLAGS: u32 = 1 << 16;
/// Bytes of the header: magic, flags, checksum and the five address fields.
pub const HEADER_BYTES: usize = 32;
/// Where the timer interrupt's handler is in the image.
pub const HANDLER_OFFSET: usize = 0x80;
/// Where the code starts in the image.
pub const CODE_OFFSET: usize = 0x100;
/// Where [`READY_LINE`] (with its newline and a NUL) is in the image.
pub const TEXT_READY_OFFSET: usize = 0x50;
/// Where [`PASS_PREFIX`] (with a NUL) is in the image.
pub const TEXT_PASS_OFFSET: usize = 0x68;

/// Parameter: `PARAMS_MAGIC`, so a reader can tell the block from garbage.
pub const PARAM_MAGIC: u32 = 0x00;
/// Parameter: the layout version, [`PARAMS_VERSION`].
pub const PARAM_VERSION: u32 = 0x04;
/// Parameter: the end of RAM, bytes (the data area ends there).
pub const PARAM_MEMORY_END: u32 = 0x08;
/// Parameter: pages of the hot set, from [`DATA_ADDR`].
pub const PARAM_HOT_SET_PAGES: u32 = 0x0c;
/// Parameter: one page in this many of the data area stays zero (0: none).
pub const PARAM_ZERO_ONE_IN: u32 = 0x10;
/// Parameter: pages written between two looks at the TSC.
pub const PARAM_BATCH_PAGES: u32 = 0x14;
/// Parameter: TSC ticks one batch should take, low half.
pub const PARAM_TICKS_PER_BATCH_LO: u32 = 0x18;
/// Parameter: TSC ticks one batch should take, high half.
pub const PARAM_TICKS_PER_BATCH_HI: u32 = 0x1c;
/// Parameter: how far (TSC ticks) the guest may fall behind its pace before it stops catching
/// up, so that a long stall (a paused VM) is not followed by a burst.
pub const PARAM_MAX_LAG_TICKS: u32 = 0x20;
/// Parameter: passes over the hot set between two progress lines.
pub const PARAM_REPORT_EVERY_PASSES: u32 = 0x24;
/// Bytes of the parameter block.
pub const PARAMS_BYTES: usize = 0x28;
/// The parameter block's magic: `MGQG` in memory.
pub const PARAMS_MAGIC: u32 = u32::from_le_bytes(*b"MGQG");
/// The parameter block's layout version.
pub const PARAMS_VERSION: u32 = 1;

/// State: pages written to the hot set since boot, low half.
pub const STATE_PROGRESS_LO: u32 = 0x00;
/// State: pages written to the hot set since boot, high half.
pub const STATE_PROGRESS_HI: u32 = 0x04;
/// State: passes over the hot set completed.
pub const STATE_PASSES: u32 = 0x08;
/// State: the next hot-set page.
pub const STATE_CURSOR: u32 = 0x0c;
/// State: the TSC deadline of the current batch, low half.
pub const STATE_DEADLINE_LO: u32 = 0x10;
/// State: the TSC deadline of the current batch, high half.
pub const STATE_DEADLINE_HI: u32 = 0x14;
/// State: 1 while filling, 2 in the hot-set loop.
pub const STATE_PHASE: u32 = 0x18;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// The largest guest: RAM must end below QEMU pc's PCI hole and fit 32-bit addresses.
pub const MAX_MEMORY_BYTES: u64 = 3 << 30;

const _: () = assert!(HEADER_BYTES + PARAMS_BYTES <= TEXT_READY_OFFSET);
const _: () = assert!(TEXT_READY_OFFSET + READY_LINE.len() + 2 <= TEXT_PASS_OFFSET);
// The text and its NUL end before the code.
const _: () = assert!(TEXT_PASS_OFFSET + PASS_PREFIX.len() < HANDLER_OFFSET);
const _: () = assert!((IRQ_BASE_VECTOR + 16) * 8 <= IDTR_ADDR - IDT_ADDR);
const _: () = assert!(STACK_TOP < STATE_ADDR && STATE_ADDR + 0x1000 < DATA_ADDR);

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSpec {
    /// Guest RAM, bytes (QEMU's `-m`); a multiple of 1 MiB.
    pub memory_bytes: u64,
    /// Bytes of the hot set, from [`DATA_ADDR`]; at least one page.
    pub hot_set_bytes: u64,
    /// Bytes of pages dirtied per second (each page write dirties one page); at least one page.
    pub rate_bytes_per_sec: u64,
    /// The TSC's rate, ticks per second ([`host_tsc_hz`] under KVM).
    pub tsc_hz: u64,
    /// One data page in this many stays zero (0: all are written).
    pub zero_one_in: u32,
    /// Passes over the hot set between two progress lines (at least 1).
    pub report_every_passes: u32,
}

impl GuestSpec {
    /// The busy case: `memory_bytes` of RAM, a hot set of `hot_set_bytes` written at
    /// `rate_bytes_per_sec`, one page in ten left zero (the sim's default zero fraction),
    /// a progress line every pass.
    pub fn busy(memory_bytes: u64, hot_set_bytes: u64, rate_bytes_per_sec: u64, tsc_hz: u64) -> Self {
        Self {
            memory_bytes,
            hot_set_bytes,
            rate_bytes_per_sec,
            tsc_hz,
            zero_one_in: 10,
            report_every_passes: 1,
        }
    }

    /// Guest RAM in MiB, as QEMU's `-m` takes it.
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes >> 20
    }
}

/// Why no image was built.
#[derive(Debug, Error)]
pub enum GuestError {
    /// RAM is not a multiple of 1 MiB, too small for the layout, or too large.
    #[error("guest RAM of {bytes} bytes: want a multiple of 1 MiB from {min} to {max} bytes")]
    Memory {
        /// The RAM asked for.
        bytes: u64,
        /// The smallest RAM the layout needs.
        min: u64,
        /// [`MAX_MEMORY_BYTES`].
        max: u64,
    },
    /// The hot set is empty or does not fit between [`DATA_ADDR`] and the end of RAM.
    #[error("hot set of {bytes} bytes: want 1 page to {limit} bytes")]
    HotSet {
        /// The hot set asked for.
        bytes: u64,
        /// The data area's size.
        limit: u64,
    },
    /// The rate is under one page per second, or the TSC rate is 0.
    #[error("pace of {rate_bytes_per_sec} B/s against a TSC of {tsc_hz} Hz cannot be kept")]
    Pace {
        /// The rate asked for.
        rate_bytes_per_sec: u64,
        /// The TSC rate given.
        tsc_hz: u64,
    },
    /// `report_every_passes` is 0.
    #[error("report_every_passes must be at least 1")]
    ZeroReportEvery,
    /// The timer handler outgrew its room in the layout (five instructions: only a change to
    /// them gets here).
    #[error("timer handler of {len} bytes exceeds {limit}")]
    HandlerTooLong {
        /// Its length.
        len: usize,
        /// The room.
        limit: usize,
    },
    /// iced-x86 refused the code.
    #[error("assembling the guest")]
    Assemble(#[source] IcedError),
}

/// Pages between two looks at the TSC: about 2.6 ms of writes at 100 MB/s.
const BATCH_PAGES: u32 = 64;

/// Builds the image for `spec`: header, parameter block, code.
pub fn build_image(spec: &GuestSpec) -> Result<Vec<u8>, GuestError> {
    let min_memory = u64::from(DATA_ADDR) + PAGE_SIZE;
    if spec.memory_bytes % (1 << 20) != 0 || !(min_memory..=MAX_MEMORY_BYTES).contains(&spec.memory_bytes) {
        return Err(GuestError::Memory {
            bytes: spec.memory_bytes,
            min: min_memory.next_multiple_of(1 << 20),
            max: MAX_MEMORY_BYTES,
        });
    }
    let data_bytes = spec.memory_bytes - u64::from(DATA_ADDR);
    if !(PAGE_SIZE..=data_bytes).contains(&spec.hot_set_bytes) {
        return Err(GuestError::HotSet {
            bytes: spec.hot_set_bytes,
            limit: data_bytes,
        });
    }
    if spec.rate_bytes_per_sec < PAGE_SIZE || spec.tsc_hz == 0 {
        return Err(GuestError::Pace {
            rate_bytes_per_sec: spec.rate_bytes_per_sec,
            tsc_hz: spec.tsc_hz,
        });
    }
    if spec.report_every_passes == 0 {
        return Err(GuestError::ZeroReportEvery);
    }
    let ticks_per_batch =
        u128::from(spec.tsc_hz) * u128::from(BATCH_PAGES) * u128::from(PAGE_SIZE) / u128::from(spec.rate_bytes_per_sec);
    let ticks_per_batch = u64::try_from(ticks_per_batch).unwrap_or(u64::MAX);
    // A tenth of a second of lag, at most what a u32 holds.
    let max_lag = u32::try_from(spec.tsc_hz / 10).unwrap_or(u32::MAX);
    // The checks above bound every value below to u32.
    let as_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let params: [(u32, u32); 10] = [
        (PARAM_MAGIC, PARAMS_MAGIC),
        (PARAM_VERSION, PARAMS_VERSION),
        (PARAM_MEMORY_END, as_u32(spec.memory_bytes)),
        (PARAM_HOT_SET_PAGES, as_u32(spec.hot_set_bytes / PAGE_SIZE)),
        (PARAM_ZERO_ONE_IN, spec.zero_one_in),
        (PARAM_BATCH_PAGES, BATCH_PAGES),
        (PARAM_TICKS_PER_BATCH_LO, ticks_per_batch as u32),
        (PARAM_TICKS_PER_BATCH_HI, (ticks_per_batch >> 32) as u32),
        (PARAM_MAX_LAG_TICKS, max_lag),
        (PARAM_REPORT_EVERY_PASSES, spec.report_every_passes),
    ];
    let code = emit().map_err(GuestError::Assemble)?;
    let handler = emit_handler().map_err(GuestError::Assemble)?;
    if HANDLER_OFFSET + handler.len() > CODE_OFFSET {
        return Err(GuestError::HandlerTooLong {
            len: handler.len(),
            limit: CODE_OFFSET - HANDLER_OFFSET,
        });
    }

    let mut image = vec![0u8; CODE_OFFSET];
    let header = MultibootHeader::for_image(code.len());
    image[..HEADER_BYTES].copy_from_slice(&header.to_bytes());
    for (offset, value) in params {
        let at = HEADER_BYTES + offset as usize;
        image[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    for (at, text) in [
        (TEXT_READY_OFFSET, format!("{READY_LINE}\n")),
        (TEXT_PASS_OFFSET, PASS_PREFIX.to_string()),
    ] {
        // The NUL after each text is the zero already there.
        image[at..at + text.len()].copy_from_slice(text.as_bytes());
    }
    image[HANDLER_OFFSET..HANDLER_OFFSET + handler.len()].copy_from_slice(&handler);
    image.extend_from_slice(&code);
    Ok(image)
}

/// A Multiboot v1 header with the address fields (flag bit 16), as this image carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// [`MULTIBOOT_MAGIC`].
    pub magic: u32,
    /// [`MULTIBOOT_FLAGS`].
    pub flags: u32,
    /// Makes magic + flags + checksum wrap to 0.
    pub checksum: u32,
    /// Where the header is loaded.
    pub header_addr: u32,
    /// Where the image's first byte is loaded.
    pub load_addr: u32,
    /// The end of what is loaded (0: the whole file).
    pub load_end_addr: u32,
    /// The end of zeroed memory after it (0: none).
    pub bss_end_addr: u32,
    /// The entry point.
    pub entry_addr: u32,
}

impl MultibootHeader {
    fn for_image(code_len: usize) -> Self {
        let load_end = IMAGE_ADDR as usize + CODE_OFFSET + code_len;
        Self {
            magic: MULTIBOOT_MAGIC,
            flags: MULTIBOOT_FLAGS,
            checksum: 0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(MULTIBOOT_FLAGS)),
            header_addr: IMAGE_ADDR,
            load_addr: IMAGE_ADDR,
            load_end_addr: u32::try_from(load_end).unwrap_or(u32::MAX),
            bss_end_addr: 0,
            entry_addr: CODE_ADDR,
        }
    }

    /// The header's bytes, little-endian fields in order.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        let fields = [
            self.magic,
            self.flags,
            self.checksum,
            self.header_addr,
            self.load_addr,
            self.load_end_addr,
            self.bss_end_addr,
            self.entry_addr,
        ];
        for (chunk, field) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&field.to_le_bytes());
        }
        out
    }

    /// The header at the start of `image`, if it has 32 bytes.
    pub fn read(image: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u32> {
            let bytes = image.get(i * 4..i * 4 + 4)?;
            Some(u32::from_le_bytes(bytes.try_into().ok()?))
        };
        Some(Self {
            magic: word(0)?,
            flags: word(1)?,
            checksum: word(2)?,
            header_addr: word(3)?,
            load_addr: word(4)?,
            load_end_addr: word(5)?,
            bss_end_addr: word(6)?,
            entry_addr: word(7)?,
        })
    }

    /// Whether a Multiboot v1 loader takes it: the magic, a checksum that sums to 0, and with
    /// flag 16 addresses in order (header not before the load address, entry inside the image).
    pub fn is_valid(&self) -> bool {
        let sum = self.magic.wrapping_add(self.flags).wrapping_add(self.checksum);
        let addresses = self.flags & MULTIBOOT_FLAGS == 0
            || (self.header_addr >= self.load_addr
                && (self.load_end_addr == 0 || self.load_end_addr > self.entry_addr)
                && self.entry_addr >= self.load_addr);
        self.magic == MULTIBOOT_MAGIC && sum == 0 && addresses
    }
}

/// The host's TSC rate, measured against the monotonic clock over 50 ms. Under KVM a guest's
/// TSC runs at this rate (without TSC scaling, which QEMU uses only when asked).
pub fn host_tsc_hz() -> u64 {
    let start = (std::time::Instant::now(), rdtsc());
    std::thread::sleep(std::time::Duration::from_millis(50));
    let end = (std::time::Instant::now(), rdtsc());
    let secs = end.0.duration_since(start.0).as_secs_f64();
    if secs > 0.0 {
        (end.1.wrapping_sub(start.1) as f64 / secs) as u64
    } else {
        0
    }
}

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads a counter; it has no memory effect and no precondition, and this
    // module is built only for x86-64 (lib.rs).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Absolute 32-bit addresses of a parameter and a state field.
fn param(offset: u32) -> AsmMemoryOperand {
    dword_ptr(u64::from(PARAMS_ADDR + offset))
}

fn state(offset: u32) -> AsmMemoryOperand {
    dword_ptr(u64::from(STATE_ADDR + offset))
}

/// The timer's handler: acknowledges IRQ 0 at the PIC, drops the interrupt frame and jumps to
/// the EIP it saved (the instruction after the `hlt`), with interrupts left off. No `iret`:
/// KVM here (nested) failed to emulate one in protected mode with paging off, and the only
/// place interrupts are on is `sti; hlt`, so the frame always returns there. Clobbers eax
/// and ecx, which the wait loop reloads.
fn emit_handler() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    a.mov(al, 0x20u32)?;
    a.out(0x20u32, al)?;
    a.pop(ecx)?;
    a.add(esp, 8u32)?;
    a.jmp(ecx)?;
    a.assemble(u64::from(IMAGE_ADDR) + HANDLER_OFFSET as u64)
}

/// Points vectors 0x20-0x2f at the handler, remaps the PIC there with only IRQ 0 unmasked,
/// starts the PIT at [`TIMER_HZ`]. Interrupts stay off except inside `sti; hlt`.
fn emit_timer_setup(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let handler = IMAGE_ADDR + HANDLER_OFFSET as u32;
    // A 32-bit interrupt gate: selector = the CS the loader left, present, DPL 0.
    a.mov(ax, cs)?;
    a.movzx(ecx, ax)?;
    a.shl(ecx, 16u32)?;
    a.or(ecx, handler & 0xffff)?;
    a.mov(edx, (handler & 0xffff_0000) | 0x8e00)?;
    a.mov(edi, IDT_ADDR + IRQ_BASE_VECTOR * 8)?;
    a.mov(ebx, 16u32)?;
    let mut gates = a.create_label();
    a.set_label(&mut gates)?;
    a.mov(dword_ptr(edi), ecx)?;
    a.mov(dword_ptr(edi + 4), edx)?;
    a.add(edi, 8u32)?;
    a.dec(ebx)?;
    a.jnz(gates)?;
    a.mov(word_ptr(u64::from(IDTR_ADDR)), (IRQ_BASE_VECTOR + 16) * 8 - 1)?;
    a.mov(dword_ptr(u64::from(IDTR_ADDR + 2)), IDT_ADDR)?;
    a.lidt(ptr(u64::from(IDTR_ADDR)))?;
    // The 8259 pair: ICW1 (edge, cascade, ICW4), ICW2 (vector bases), ICW3 (slave on IRQ 2),
    // ICW4 (8086 mode), then the masks.
    for (port, value) in [
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, IRQ_BASE_VECTOR),
        (0xa1, IRQ_BASE_VECTOR + 8),
        (0x21, 0x04),
        (0xa1, 0x02),
        (0x21, 0x01),
        (0xa1, 0x01),
        (0x21, 0xfe),
        (0xa1, 0xff),
    ] {
        a.mov(al, value)?;
        a.out(port as u32, al)?;
    }
    // PIT channel 0, low then high byte of the divisor, mode 2 (rate generator).
    let divisor = PIT_HZ / TIMER_HZ;
    for (port, value) in [(0x43u32, 0x34u32), (0x40, divisor & 0xff), (0x40, divisor >> 8)] {
        a.mov(al, value)?;
        a.out(port, al)?;
    }
    Ok(())
}

fn emit() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut print_str = a.create_label();
    let mut print_hex = a.create_label();
    let port = u32::from(DEBUGCON_PORT);

    // Entry: interrupts off until the IDT is set up; a stack for the print routines.
    a.cli()?;
    a.cld()?;
    a.mov(esp, STACK_TOP)?;
    a.mov(state(STATE_PHASE), 1u32)?;

    // Fill: one word per data page, the page's own address (non-zero, distinct), skipping one
    // page in PARAM_ZERO_ONE_IN so that the zero fraction matches the sim guest's.
    let mut fill_loop = a.create_label();
    let mut fill_write = a.create_label();
    let mut fill_next = a.create_label();
    let mut fill_done = a.create_label();
    a.mov(edi, DATA_ADDR)?;
    a.xor(ebx, ebx)?;
    a.set_label(&mut fill_loop)?;
    a.cmp(edi, param(PARAM_MEMORY_END))?;
    a.jae(fill_done)?;
    a.mov(eax, param(PARAM_ZERO_ONE_IN))?;
    a.test(eax, eax)?;
    a.jz(fill_write)?;
    a.inc(ebx)?;
    a.cmp(ebx, eax)?;
    a.jb(fill_write)?;
    a.xor(ebx, ebx)?;
    a.jmp(fill_next)?;
    a.set_label(&mut fill_write)?;
    a.mov(dword_ptr(edi), edi)?;
    a.set_label(&mut fill_next)?;
    a.add(edi, PAGE_SIZE as u32)?;
    a.jmp(fill_loop)?;
    a.set_label(&mut fill_done)?;

    emit_timer_setup(&mut a)?;
    a.mov(state(STATE_PHASE), 2u32)?;
    a.mov(esi, IMAGE_ADDR + TEXT_READY_OFFSET as u32)?;
    a.call(print_str)?;
    a.rdtsc()?;
    a.mov(state(STATE_DEADLINE_LO), eax)?;
    a.mov(state(STATE_DEADLINE_HI), edx)?;

    // The hot-set loop: a batch of page writes, then wait for the batch's deadline.
    let mut main_loop = a.create_label();
    let mut batch_loop = a.create_label();
    let mut store_cursor = a.create_label();
    let mut no_report = a.create_label();
    a.set_label(&mut main_loop)?;
    a.mov(ecx, param(PARAM_BATCH_PAGES))?;
    a.set_label(&mut batch_loop)?;
    a.mov(eax, state(STATE_CURSOR))?;
    a.shl(eax, 12u32)?;
    a.add(eax, DATA_ADDR)?;
    a.mov(edx, state(STATE_PROGRESS_LO))?;
    a.mov(dword_ptr(eax), edx)?;
    a.add(state(STATE_PROGRESS_LO), 1)?;
    a.adc(state(STATE_PROGRESS_HI), 0)?;
    a.mov(eax, state(STATE_CURSOR))?;
    a.inc(eax)?;
    a.cmp(eax, param(PARAM_HOT_SET_PAGES))?;
    a.jb(store_cursor)?;
    // A pass is done: count it, and print it when one is due.
    a.xor(eax, eax)?;
    a.inc(state(STATE_PASSES))?;
    a.push(eax)?;
    a.push(ecx)?;
    a.mov(eax, state(STATE_PASSES))?;
    a.xor(edx, edx)?;
    a.div(param(PARAM_REPORT_EVERY_PASSES))?;
    a.test(edx, edx)?;
    a.jnz(no_report)?;
    a.mov(esi, IMAGE_ADDR + TEXT_PASS_OFFSET as u32)?;
    a.call(print_str)?;
    a.mov(eax, state(STATE_PASSES))?;
    a.call(print_hex)?;
    a.mov(al, b'\n' as u32)?;
    a.out(port, al)?;
    a.set_label(&mut no_report)?;
    a.pop(ecx)?;
    a.pop(eax)?;
    a.set_label(&mut store_cursor)?;
    a.mov(state(STATE_CURSOR), eax)?;
    a.dec(ecx)?;
    a.jnz(batch_loop)?;

    // Pace: deadline += ticks per batch; spin until the TSC passes it. Behind by more than
    // PARAM_MAX_LAG_TICKS, start afresh from now instead of catching up in a burst.
    let mut wait = a.create_label();
    let mut early = a.create_label();
    let mut resync = a.create_label();
    a.mov(eax, param(PARAM_TICKS_PER_BATCH_LO))?;
    a.add(state(STATE_DEADLINE_LO), eax)?;
    a.mov(eax, param(PARAM_TICKS_PER_BATCH_HI))?;
    a.adc(state(STATE_DEADLINE_HI), eax)?;
    a.set_label(&mut wait)?;
    a.rdtsc()?;
    a.sub(eax, state(STATE_DEADLINE_LO))?;
    a.sbb(edx, state(STATE_DEADLINE_HI))?;
    a.js(early)?;
    a.test(edx, edx)?;
    a.jnz(resync)?;
    a.cmp(eax, param(PARAM_MAX_LAG_TICKS))?;
    a.jbe(main_loop)?;
    a.set_label(&mut resync)?;
    a.rdtsc()?;
    a.mov(state(STATE_DEADLINE_LO), eax)?;
    a.mov(state(STATE_DEADLINE_HI), edx)?;
    a.jmp(main_loop)?;
    a.set_label(&mut early)?;
    // `sti` takes effect after `hlt` starts, so the tick always lands in the `hlt`.
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;

    // print_str(esi = NUL-terminated text); clobbers eax, esi.
    let mut str_done = a.create_label();
    a.set_label(&mut print_str)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(str_done)?;
    a.out(port, al)?;
    a.jmp(print_str)?;
    a.set_label(&mut str_done)?;
    a.ret()?;

    // print_hex(eax): eight hex digits; clobbers eax, ebx, ecx.
    let mut hex_loop = a.create_label();
    let mut hex_digit = a.create_label();
    a.set_label(&mut print_hex)?;
    a.mov(ebx, eax)?;
    a.mov(ecx, 8u32)?;
    a.set_label(&mut hex_loop)?;
    a.rol(ebx, 4u32)?;
    a.mov(eax, ebx)?;
    a.and(eax, 0xfu32)?;
    a.cmp(eax, 10u32)?;
    a.jb(hex_digit)?;
    a.add(eax, u32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut hex_digit)?;
    a.add(eax, u32::from(b'0'))?;
    a.out(port, al)?;
    a.dec(ecx)?;
    a.jnz(hex_loop)?;
    a.ret()?;

    a.assemble(u64::from(CODE_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec::busy(64 << 20, 8 << 20, 100_000_000, 2_300_000_000)
    }

    #[test]
    fn test_multiboot_header_is_valid() {
        let image = build_image(&spec()).unwrap();
        let h = MultibootHeader::read(&image).unwrap();
        assert_eq!(h.magic, MULTIBOOT_MAGIC);
        assert_eq!(h.flags, MULTIBOOT_FLAGS);
        assert_eq!(h.magic.wrapping_add(h.flags).wrapping_add(h.checksum), 0);
        assert!(h.is_valid());
        assert_eq!(h.entry_addr, CODE_ADDR);
        assert_eq!(h.load_end_addr as usize, IMAGE_ADDR as usize + image.len());
        // A loader scans only the first 8 KiB.
        assert!(image.len() < 8192);
        let mut bad = h;
        bad.checksum = bad.checksum.wrapping_add(1);
        assert!(!bad.is_valid());
    }

    #[test]
    fn test_parameters_land_at_their_documented_offsets() {
        let image = build_image(&spec()).unwrap();
        let at = |offset: u32| {
            let i = HEADER_BYTES + offset as usize;
            u32::from_le_bytes(image[i..i + 4].try_into().unwrap())
        };
        assert_eq!(at(PARAM_MAGIC), PARAMS_MAGIC);
        assert_eq!(at(PARAM_VERSION), PARAMS_VERSION);
        assert_eq!(at(PARAM_MEMORY_END), 64 << 20);
        assert_eq!(at(PARAM_HOT_SET_PAGES), 2048);
        assert_eq!(at(PARAM_BATCH_PAGES), BATCH_PAGES);
        // 64 pages at 100 MB/s take 2.62 ms: 6.03 M ticks at 2.3 GHz.
        let ticks = u64::from(at(PARAM_TICKS_PER_BATCH_LO)) | u64::from(at(PARAM_TICKS_PER_BATCH_HI)) << 32;
        assert_eq!(ticks, 2_300_000_000 * 64 * 4096 / 100_000_000);
    }

    #[test]
    fn test_code_decodes_as_32_bit() {
        let image = build_image(&spec()).unwrap();
        let code = &image[CODE_OFFSET..];
        let mut d = iced_x86::Decoder::with_ip(32, code, u64::from(CODE_ADDR), iced_x86::DecoderOptions::NONE);
        let first = d.decode();
        assert_eq!(first.mnemonic(), iced_x86::Mnemonic::Cli);
    }

    #[test]
    fn test_bad_specs_are_refused() {
        let refused = |s: GuestSpec| build_image(&s).unwrap_err();
        assert!(matches!(
            refused(GuestSpec {
                memory_bytes: 4 << 30,
                ..spec()
            }),
            GuestError::Memory { .. }
        ));
        assert!(matches!(
            refused(GuestSpec {
                hot_set_bytes: 64 << 20,
                ..spec()
            }),
            GuestError::HotSet { .. }
        ));
        assert!(matches!(
            refused(GuestSpec { tsc_hz: 0, ..spec() }),
            GuestError::Pace { .. }
        ));
        assert!(matches!(
            refused(GuestSpec {
                report_every_passes: 0,
                ..spec()
            }),
            GuestError::ZeroReportEvery
        ));
    }
}
