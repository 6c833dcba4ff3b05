//! The self-checking guest program that the kvm backend runs.
//!
//! The program is x86-64 machine code, assembled here with iced-x86 for one [`ProgramSpec`]. It
//! writes pages of its working set at a rate (see [Pacing](#pacing)), keeps a ledger of the generation each
//! page was last written with, and regularly reads every page back and compares it with the
//! pattern its ledger entry predicts. A page that a migration failed to move, moved stale or
//! corrupted therefore shows up as a [`PORT_MISMATCH`] exit naming the page. Use it whenever a
//! test or demo needs a real guest whose memory must survive a migration bit for bit; the
//! reference [`page_word`] lets the host check the same invariant from outside.
//!
//! # Guest-physical layout
//!
//! Memory is identity-mapped by the page tables of [`super::boot`], which all live below
//! [`CODE_ADDR`].
//!
//! | address | what |
//! |---|---|
//! | [`CODE_ADDR`] | the code, at most [`CODE_MAX_BYTES`]; the entry point |
//! | [`STACK_TOP`] | the stack, growing down towards the code |
//! | [`STATE_ADDR`] | the state header: u64 fields at the `*_OFFSET` constants |
//! | [`LEDGER_ADDR`] | one u64 generation per working-set page |
//! | [`data_base`] | the working set, page `p` at `data_base + p * 4096` |
//!
//! The state lives in the header and the ledger, so a memory dump of a paused guest can be read
//! without its registers; only the position inside a verify pass (page index and ledger sum) is
//! kept in registers across its mismatch exits, and registers migrate with the vCPU. The code
//! uses no privileged instruction: [`super::boot`] starts it at CPL 3, where it runs fastest.
//!
//! The same guest runs under QEMU (TCG or KVM) once a migration has moved it there: nothing in
//! it waits for a VMM's answer (a port write nobody handles is simply ignored), it paces itself
//! by the TSC where no VMM paces it, and it reports through isa-debugcon, which QEMU routes.
//!
//! # State header
//!
//! u64 fields at [`STATE_ADDR`] + offset:
//!
//! | offset | field |
//! |---|---|
//! | 0 [`PROGRESS_OFFSET`] | pages written so far, the init pass included |
//! | 8 [`RNG_OFFSET`] | xorshift64 state of the random pattern |
//! | 16 [`VERIFY_PASSES_OFFSET`] | verify passes completed |
//! | 24 [`MISMATCHES_OFFSET`] | mismatches found |
//! | 32 [`CURSOR_OFFSET`] | next page of the sequential pattern |
//! | 40 [`BATCHES_OFFSET`] | batches completed |
//! | 48 [`TSC_TICKS_PER_BATCH_OFFSET`] | TSC ticks per batch when self-paced; 0 = no self-pacing |
//! | 56 [`TSC_DEADLINE_OFFSET`] | TSC value before which the next batch does not start |
//! | 64 [`RATE_BYTES_PER_SEC_OFFSET`] | the workload's rate, bytes/s (for whoever resumes the guest) |
//! | 72 [`WORKING_SET_PAGES_OFFSET`] | [`ProgramSpec::working_set_pages`] |
//! | 80 [`BATCH_PAGES_OFFSET`] | [`ProgramSpec::batch_pages`] |
//! | 88 [`VERIFY_EVERY_BATCHES_OFFSET`] | [`ProgramSpec::verify_every_batches`] |
//! | 96 [`PATTERN_OFFSET`] | [`PATTERN_SEQUENTIAL`] or [`PATTERN_RANDOM`] |
//! | 104 [`MAGIC_OFFSET`] | [`HEADER_MAGIC`] once the fields from 48 on are written |
//!
//! The program writes the fields from 48 on from its [`ProgramSpec`] when it boots, before the
//! init pass; [`read_header_params`] reads them back, so a guest that arrives without the
//! VMM's own device blob (from QEMU) can be resumed with the right pacing.
//!
//! # Pacing
//!
//! Under the kvm backend the VMM paces the guest: it sleeps in the [`PORT_PROGRESS`] exit.
//! Elsewhere (QEMU) nobody does, so the guest also paces itself by the TSC: before each batch
//! it spins (`pause`) until `rdtsc` reaches the deadline at [`TSC_DEADLINE_OFFSET`], then moves
//! the deadline on by [`TSC_TICKS_PER_BATCH_OFFSET`]. The TSC jumps across a migration (QEMU
//! TCG's restarts near 0; KVM carries it over the downtime): a deadline more than
//! [`TSC_SLACK_BATCHES`] batches ahead of the TSC, or more than that behind it, is reset to now,
//! so a move causes neither a stall nor a catch-up burst. A guest that is about to spin first
//! asks CPUID leaf [`VMM_PACES_CPUID_LEAF`]: when it carries [`VMM_PACES_SIGNATURE`] (the kvm
//! backend sets it), its VMM paces it and the guest starts the batch at once, so the two pacers
//! never stack and the guest never burns its CPU under our VMM. The leaf is asked per batch, so
//! the answer follows the guest across hypervisors.
//!
//! # Debugcon lines
//!
//! The guest writes text lines, byte by byte, to [`PORT_DEBUGCON`] (QEMU:
//! `-chardev file,id=dc,path=F -device isa-debugcon,iobase=0xe9,chardev=dc`):
//!
//! * [`DEBUGCON_READY_LINE`] (`migratory-guest: ready\n`) once, after the init pass;
//! * after every verify pass, `migratory-guest: pass PPPPPPPP progress GGGGGGGGGGGGGGGG
//!   mismatches MMMMMMMM\n`, one space between words: the low 32 bits of the passes completed
//!   (8 lowercase hex digits), the progress counter (16), the low 32 bits of the mismatches
//!   counted so far (8). [`parse_debugcon_line`] reads it into a [`DebugconReport`]; for example
//!   `migratory-guest: pass 0000001a progress 00000000000f4240 mismatches 00000000`.
//!
//! # Port protocol
//!
//! The guest reports with `out dx, eax` (32-bit values):
//!
//! * [`PORT_READY`] once, after the init pass, with 0.
//! * [`PORT_PROGRESS`] after every batch, with the low 32 bits of the progress counter. The VMM
//!   paces the guest in this exit and reads the full counter at [`PROGRESS_OFFSET`].
//! * [`PORT_MISMATCH`] during a verify pass, with the index of a page whose content did not match
//!   its ledger generation (the page is then repaired, so a flip is reported once), or with
//!   [`LEDGER_MISMATCH`] when the sum of the ledger did not equal the progress counter (the
//!   counter is then re-synced to the sum, so the fault is reported once). A flip in the low 32
//!   bits of a ledger entry changes the pattern that entry predicts, so it is reported as that
//!   page first and as [`LEDGER_MISMATCH`] at the end of the same pass; a flip in the high 32
//!   bits only as [`LEDGER_MISMATCH`].
//! * [`PORT_VERIFIED`] after each verify pass, with the low 32 bits of the passes completed.

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use thiserror::Error;

mod debugcon;
mod header;
#[cfg(test)]
mod qemu_tests;

pub use debugcon::{
    is_debugcon_ready_line, parse_debugcon_line, DebugconLine, DebugconReport, MAX_DEBUGCON_LINE_BYTES,
};
pub use header::{read_header_params, HeaderError, HeaderParams};

/// Guest-physical address of the code and of the entry point (1 MiB).
pub const CODE_ADDR: u64 = 0x10_0000;
/// The most code the layout leaves room for between [`CODE_ADDR`] and the stack.
pub const CODE_MAX_BYTES: usize = 64 * 1024;
/// Initial stack pointer; the stack grows down towards the end of the code.
pub const STACK_TOP: u64 = 0x18_0000;
/// Guest-physical address of the state header (2 MiB).
pub const STATE_ADDR: u64 = 0x20_0000;
/// Header field: pages written so far, the init pass included.
pub const PROGRESS_OFFSET: u64 = 0;
/// Header field: xorshift64 state of the random pattern (never 0).
pub const RNG_OFFSET: u64 = 8;
/// Header field: verify passes completed.
pub const VERIFY_PASSES_OFFSET: u64 = 16;
/// Header field: mismatches found (pages and ledger checksums).
pub const MISMATCHES_OFFSET: u64 = 24;
/// Header field: the next page of the sequential pattern.
pub const CURSOR_OFFSET: u64 = 32;
/// Header field: batches completed; a verify pass follows each multiple of
/// `verify_every_batches`, so the VMM can tell from a [`PORT_PROGRESS`] exit whether one is next.
pub const BATCHES_OFFSET: u64 = 40;
/// Header field: TSC ticks per batch of self-pacing; 0 turns self-pacing off (see
/// [Pacing](self#pacing)).
pub const TSC_TICKS_PER_BATCH_OFFSET: u64 = 48;
/// Header field: the TSC value before which the next batch does not start.
pub const TSC_DEADLINE_OFFSET: u64 = 56;
/// Header field: the workload's write rate in bytes per second, for whoever resumes the guest.
pub const RATE_BYTES_PER_SEC_OFFSET: u64 = 64;
/// Header field: the working set in pages.
pub const WORKING_SET_PAGES_OFFSET: u64 = 72;
/// Header field: pages per batch.
pub const BATCH_PAGES_OFFSET: u64 = 80;
/// Header field: batches between verify passes.
pub const VERIFY_EVERY_BATCHES_OFFSET: u64 = 88;
/// Header field: the write order, [`PATTERN_SEQUENTIAL`] or [`PATTERN_RANDOM`].
pub const PATTERN_OFFSET: u64 = 96;
/// Header field: [`HEADER_MAGIC`] once the parameter fields are written.
pub const MAGIC_OFFSET: u64 = 104;
/// The value at [`MAGIC_OFFSET`]: this program's header, layout 1.
pub const HEADER_MAGIC: u64 = u64::from_le_bytes(*b"MGGUEST1");
/// [`PATTERN_OFFSET`] of [`ProgramPattern::Sequential`].
pub const PATTERN_SEQUENTIAL: u64 = 0;
/// [`PATTERN_OFFSET`] of [`ProgramPattern::Random`].
pub const PATTERN_RANDOM: u64 = 1;
/// How far, in batches, the TSC deadline may be ahead or behind before it is reset to now.
pub const TSC_SLACK_BATCHES: u64 = 8;
/// The largest [`ProgramSpec::tsc_ticks_per_batch`]: a day per batch at 3 GHz, and small
/// enough that deadline arithmetic never overflows.
pub const MAX_TSC_TICKS_PER_BATCH: u64 = 1 << 48;
/// The largest [`ProgramSpec::rate_bytes_per_sec`] a header may record (1 TiB/s).
pub const MAX_RATE_BYTES_PER_SEC: u64 = 1 << 40;
/// CPUID leaf through which a VMM says it paces the guest in its [`PORT_PROGRESS`] exits.
pub const VMM_PACES_CPUID_LEAF: u32 = 0x4000_0100;
/// `ebx`, `ecx`, `edx` of [`VMM_PACES_CPUID_LEAF`] under a pacing VMM: "MigratoryVMM".
pub const VMM_PACES_SIGNATURE: [u32; 3] = [
    u32::from_le_bytes(*b"Migr"),
    u32::from_le_bytes(*b"ator"),
    u32::from_le_bytes(*b"yVMM"),
];
/// The isa-debugcon port the guest writes its text lines to.
pub const PORT_DEBUGCON: u16 = super::boot::DEBUGCON_PORT;
/// The line the guest writes to [`PORT_DEBUGCON`] after its init pass.
pub const DEBUGCON_READY_LINE: &str = "migratory-guest: ready\n";
/// The start of every line the guest writes to [`PORT_DEBUGCON`].
pub const DEBUGCON_PREFIX: &str = "migratory-guest: ";
/// Guest-physical address of the ledger: one u64 generation per working-set page.
pub const LEDGER_ADDR: u64 = 0x20_1000;
/// Size of a working-set page.
pub const PAGE_SIZE: u64 = 4096;
/// u64 words per working-set page.
pub const WORDS_PER_PAGE: usize = 512;
/// Multiplier that makes each word of a page differ (the 64-bit golden ratio).
pub const WORD_MIX: u64 = 0x9E37_79B9_7F4A_7C15;
/// The largest working set: page indexes must fit the 32-bit [`PORT_MISMATCH`] value, below
/// [`LEDGER_MISMATCH`].
pub const MAX_WORKING_SET_PAGES: u64 = 1 << 31;

/// Port written after every batch with the low 32 bits of progress.
pub const PORT_PROGRESS: u16 = 0x510;
/// Port written after each verify pass with the low 32 bits of the passes completed.
pub const PORT_VERIFIED: u16 = 0x511;
/// Port written with a mismatching page index, or with [`LEDGER_MISMATCH`].
pub const PORT_MISMATCH: u16 = 0x512;
/// Port written once with 0 after the init pass.
pub const PORT_READY: u16 = 0x513;
/// The [`PORT_MISMATCH`] value that reports a ledger checksum failure rather than a page.
pub const LEDGER_MISMATCH: u32 = 0xFFFF_FFFF;

/// The xorshift64 state of the sequential pattern, which draws no random numbers: the header
/// field is still never 0, so a dump reads the same way for both patterns.
const SEQUENTIAL_RNG_STATE: u64 = 1;
const TWO_MIB: u64 = 2 << 20;

// The program's memory starts above everything the boot structures reserve, and its ports are
// the ones boot lets the guest reach from CPL 3.
const _: () = assert!(super::boot::BOOT_RESERVED_END <= CODE_ADDR);
const _: () = {
    let (first, last) = (*super::boot::GUEST_PORTS.start(), *super::boot::GUEST_PORTS.end());
    let ports = [PORT_PROGRESS, PORT_VERIFIED, PORT_MISMATCH, PORT_READY];
    let mut i = 0;
    while i < ports.len() {
        assert!(first <= ports[i] && ports[i] <= last);
        i += 1;
    }
};
const _: () = assert!(MAGIC_OFFSET + 8 <= LEDGER_ADDR - STATE_ADDR);
const _: () = assert!(CODE_ADDR + CODE_MAX_BYTES as u64 <= STACK_TOP);
const _: () = assert!(STACK_TOP <= STATE_ADDR);

/// What the guest program does: how many pages it writes, in which order, and how often it
/// checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramSpec {
    /// Pages in the working set, 1 to [`MAX_WORKING_SET_PAGES`].
    pub working_set_pages: u64,
    /// Pages written between two [`PORT_PROGRESS`] exits (at least 1).
    pub batch_pages: u32,
    /// Batches between two verify passes (at least 1).
    pub verify_every_batches: u32,
    /// The order in which pages are written.
    pub pattern: ProgramPattern,
    /// The workload's rate in bytes per second: recorded in the header for whoever resumes the
    /// guest (the program paces by `tsc_ticks_per_batch`), at most [`MAX_RATE_BYTES_PER_SEC`].
    pub rate_bytes_per_sec: u64,
    /// TSC ticks per batch when no VMM paces the guest; 0: it does not pace itself. At most
    /// [`MAX_TSC_TICKS_PER_BATCH`].
    pub tsc_ticks_per_batch: u64,
}

/// The order in which the guest writes its working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramPattern {
    /// Page 0, 1, 2, … wrapping at the end of the working set.
    Sequential,
    /// Pages drawn by xorshift64 (shifts 13, 7, 17) from `seed`, modulo the working set.
    Random {
        /// The initial xorshift64 state; must not be 0 (xorshift would stay at 0 forever).
        seed: u64,
    },
}

/// Why a [`ProgramSpec`] cannot be assembled.
#[derive(Debug, Error)]
pub enum ProgramError {
    /// The working set is empty or too large for the port protocol.
    #[error("working set of {pages} pages is outside 1..={limit}")]
    WorkingSetPages {
        /// The requested number of pages.
        pages: u64,
        /// [`MAX_WORKING_SET_PAGES`].
        limit: u64,
    },
    /// A batch must write at least one page.
    #[error("batch_pages must be at least 1")]
    ZeroBatchPages,
    /// A verify pass must follow some number of batches.
    #[error("verify_every_batches must be at least 1")]
    ZeroVerifyEveryBatches,
    /// xorshift64 never leaves the state 0.
    #[error("the random pattern's seed must not be 0")]
    ZeroSeed,
    /// The rate is beyond what a header may record.
    #[error("rate of {rate} bytes/s exceeds {limit}")]
    Rate {
        /// The requested rate.
        rate: u64,
        /// [`MAX_RATE_BYTES_PER_SEC`].
        limit: u64,
    },
    /// The self-pacing period is beyond what the deadline arithmetic allows.
    #[error("{ticks} TSC ticks per batch exceed {limit}")]
    TscTicksPerBatch {
        /// The requested ticks.
        ticks: u64,
        /// [`MAX_TSC_TICKS_PER_BATCH`].
        limit: u64,
    },
    /// The assembler rejected an instruction (a bug in this module).
    #[error("assembling the guest program")]
    Assemble(#[source] IcedError),
    /// The code does not fit between [`CODE_ADDR`] and [`STACK_TOP`].
    #[error("guest program of {len} bytes exceeds {limit} bytes")]
    CodeTooLarge {
        /// Bytes of machine code.
        len: usize,
        /// [`CODE_MAX_BYTES`].
        limit: usize,
    },
}

impl ProgramSpec {
    /// Checks the limits documented on each field.
    pub fn validate(&self) -> Result<(), ProgramError> {
        if !(1..=MAX_WORKING_SET_PAGES).contains(&self.working_set_pages) {
            return Err(ProgramError::WorkingSetPages {
                pages: self.working_set_pages,
                limit: MAX_WORKING_SET_PAGES,
            });
        }
        if self.batch_pages == 0 {
            return Err(ProgramError::ZeroBatchPages);
        }
        if self.verify_every_batches == 0 {
            return Err(ProgramError::ZeroVerifyEveryBatches);
        }
        if self.pattern == (ProgramPattern::Random { seed: 0 }) {
            return Err(ProgramError::ZeroSeed);
        }
        if self.rate_bytes_per_sec > MAX_RATE_BYTES_PER_SEC {
            return Err(ProgramError::Rate {
                rate: self.rate_bytes_per_sec,
                limit: MAX_RATE_BYTES_PER_SEC,
            });
        }
        if self.tsc_ticks_per_batch > MAX_TSC_TICKS_PER_BATCH {
            return Err(ProgramError::TscTicksPerBatch {
                ticks: self.tsc_ticks_per_batch,
                limit: MAX_TSC_TICKS_PER_BATCH,
            });
        }
        Ok(())
    }
}

/// Guest-physical address of working-set page 0: the first 2 MiB boundary above the ledger.
pub fn data_base(spec: &ProgramSpec) -> u64 {
    (LEDGER_ADDR + spec.working_set_pages * 8).next_multiple_of(TWO_MIB)
}

/// Guest RAM the program needs, from address 0 to the end of its working set, in whole 2 MiB.
pub fn required_memory(spec: &ProgramSpec) -> u64 {
    (data_base(spec) + spec.working_set_pages * PAGE_SIZE).next_multiple_of(TWO_MIB)
}

/// Word `word` (0..512) of working-set page `page` written with generation `generation`: the
/// reference for what the guest writes and checks. The page index and the low 32 bits of the
/// generation make pages and generations differ; the word mix makes words within a page differ,
/// so a page copied to the wrong place or a stale copy never passes for the right one.
pub fn page_word(page: u64, generation: u64, word: usize) -> u64 {
    ((page << 32) | (generation & 0xffff_ffff)) ^ (word as u64).wrapping_mul(WORD_MIX)
}

/// Assembles the program for `spec`, to be placed at [`CODE_ADDR`] and entered there in 64-bit
/// mode with the stack at [`STACK_TOP`] and guest memory zeroed. It uses no privileged
/// instruction, so it runs at CPL 3 as [`super::boot`] sets it up (its `out`s pass the TSS I/O
/// bitmap).
pub fn assemble(spec: &ProgramSpec) -> Result<Vec<u8>, ProgramError> {
    spec.validate()?;
    let code = emit(spec).map_err(ProgramError::Assemble)?;
    if code.len() > CODE_MAX_BYTES {
        return Err(ProgramError::CodeTooLarge {
            len: code.len(),
            limit: CODE_MAX_BYTES,
        });
    }
    Ok(code)
}

/// Emits the program. Registers:
///
/// * `rbp` = [`STATE_ADDR`], `r13` = [`LEDGER_ADDR`], `r14` = working-set pages: set once.
/// * `r12` = page index of the init and verify loops, `rbx` = ledger sum of a verify pass,
///   `r15` = pages left in the batch.
/// * `rdi` = page, `rsi` = generation: the arguments of `fill_page` and `check_page`.
/// * `rax`, `rcx`, `rdx`, `r8`–`r11`: scratch, clobbered by both subroutines; `rsi` and `r8`
///   are also the arguments of `print_text` and `print_hex`, which clobber `rax`, `rcx`, `rdx`.
fn emit(spec: &ProgramSpec) -> Result<Vec<u8>, IcedError> {
    let state = |offset: u64| qword_ptr(rbp + offset as i32);
    let mut a = CodeAssembler::new(64)?;
    let mut fill_page = a.create_label();
    let mut check_page = a.create_label();
    let mut print_text = a.create_label();
    let mut print_hex = a.create_label();
    let mut main_loop = a.create_label();
    let mut texts = Texts {
        ready: a.create_label(),
        pass: a.create_label(),
        progress: a.create_label(),
        mismatches: a.create_label(),
        newline: a.create_label(),
    };

    // Entry. The VMM sets rsp too; setting it here keeps the program self-contained.
    a.mov(rsp, STACK_TOP)?;
    a.mov(rbp, STATE_ADDR)?;
    a.mov(r13, LEDGER_ADDR)?;
    // A 64-bit immediate: 2^31 does not fit cmp's sign-extended imm32.
    a.mov(r14, spec.working_set_pages)?;

    // Init pass, skipped when the header shows the program already ran.
    a.cmp(state(PROGRESS_OFFSET), 0)?;
    a.jne(main_loop)?;
    let rng_seed = match spec.pattern {
        ProgramPattern::Sequential => SEQUENTIAL_RNG_STATE,
        ProgramPattern::Random { seed } => seed,
    };
    a.mov(rax, rng_seed)?;
    a.mov(state(RNG_OFFSET), rax)?;
    // The parameters, so that whoever resumes the guest can read them; the magic last.
    let pattern = match spec.pattern {
        ProgramPattern::Sequential => PATTERN_SEQUENTIAL,
        ProgramPattern::Random { .. } => PATTERN_RANDOM,
    };
    for (offset, value) in [
        (TSC_TICKS_PER_BATCH_OFFSET, spec.tsc_ticks_per_batch),
        (TSC_DEADLINE_OFFSET, 0),
        (RATE_BYTES_PER_SEC_OFFSET, spec.rate_bytes_per_sec),
        (WORKING_SET_PAGES_OFFSET, spec.working_set_pages),
        (BATCH_PAGES_OFFSET, u64::from(spec.batch_pages)),
        (VERIFY_EVERY_BATCHES_OFFSET, u64::from(spec.verify_every_batches)),
        (PATTERN_OFFSET, pattern),
        (MAGIC_OFFSET, HEADER_MAGIC),
    ] {
        a.mov(rax, value)?;
        a.mov(state(offset), rax)?;
    }
    a.xor(r12d, r12d)?;
    let mut init_loop = a.create_label();
    a.set_label(&mut init_loop)?;
    a.mov(qword_ptr(r13 + r12 * 8), 1)?;
    a.mov(rdi, r12)?;
    a.mov(esi, 1)?;
    a.call(fill_page)?;
    a.inc(r12)?;
    a.cmp(r12, r14)?;
    a.jb(init_loop)?;
    a.mov(state(PROGRESS_OFFSET), r14)?;
    a.mov(edx, u32::from(PORT_READY))?;
    a.xor(eax, eax)?;
    a.out(dx, eax)?;
    a.lea(rsi, ptr(texts.ready))?;
    a.mov(ecx, DEBUGCON_READY_LINE.len() as u32)?;
    a.call(print_text)?;

    // Main loop: self-pacing, one batch, its progress exit, and a verify pass when one is due.
    a.set_label(&mut main_loop)?;
    emit_tsc_pacing(&mut a)?;
    a.mov(r15d, spec.batch_pages)?;
    let mut batch_loop = a.create_label();
    a.set_label(&mut batch_loop)?;
    emit_next_page(&mut a, spec.pattern)?;
    a.mov(rsi, qword_ptr(r13 + rdi * 8))?;
    a.inc(rsi)?;
    a.mov(qword_ptr(r13 + rdi * 8), rsi)?;
    a.call(fill_page)?;
    a.inc(state(PROGRESS_OFFSET))?;
    a.dec(r15d)?;
    a.jnz(batch_loop)?;
    // Count the batch before the exit, so the VMM can see in the exit whether a pass is next.
    a.inc(state(BATCHES_OFFSET))?;
    a.mov(eax, dword_ptr(rbp + PROGRESS_OFFSET as i32))?;
    a.mov(edx, u32::from(PORT_PROGRESS))?;
    a.out(dx, eax)?;
    a.mov(rax, state(BATCHES_OFFSET))?;
    a.xor(edx, edx)?;
    a.mov(ecx, spec.verify_every_batches)?;
    a.div(rcx)?;
    a.test(rdx, rdx)?;
    a.jnz(main_loop)?;

    // Verify pass: every page against its ledger entry, then the ledger against progress.
    a.xor(r12d, r12d)?;
    a.xor(ebx, ebx)?;
    let mut verify_loop = a.create_label();
    let mut verify_next = a.create_label();
    a.set_label(&mut verify_loop)?;
    a.mov(rsi, qword_ptr(r13 + r12 * 8))?;
    a.add(rbx, rsi)?;
    a.mov(rdi, r12)?;
    a.call(check_page)?;
    a.test(ecx, ecx)?;
    a.jz(verify_next)?;
    a.mov(eax, r12d)?;
    a.mov(edx, u32::from(PORT_MISMATCH))?;
    a.out(dx, eax)?;
    a.inc(state(MISMATCHES_OFFSET))?;
    // Repair, so that one corruption is reported once rather than on every pass.
    a.mov(rdi, r12)?;
    a.mov(rsi, qword_ptr(r13 + r12 * 8))?;
    a.call(fill_page)?;
    a.set_label(&mut verify_next)?;
    a.inc(r12)?;
    a.cmp(r12, r14)?;
    a.jb(verify_loop)?;
    // Init sets every entry to 1 and each write adds 1, so the ledger sums to progress.
    let mut verify_done = a.create_label();
    a.cmp(rbx, state(PROGRESS_OFFSET))?;
    a.je(verify_done)?;
    a.mov(eax, LEDGER_MISMATCH)?;
    a.mov(edx, u32::from(PORT_MISMATCH))?;
    a.out(dx, eax)?;
    a.inc(state(MISMATCHES_OFFSET))?;
    // Re-sync, so that one corruption is reported once.
    a.mov(state(PROGRESS_OFFSET), rbx)?;
    a.set_label(&mut verify_done)?;
    a.inc(state(VERIFY_PASSES_OFFSET))?;
    a.mov(eax, dword_ptr(rbp + VERIFY_PASSES_OFFSET as i32))?;
    a.mov(edx, u32::from(PORT_VERIFIED))?;
    a.out(dx, eax)?;
    // The pass line (format in the module docs).
    let fields = [
        (texts.pass, PASS_TEXT, VERIFY_PASSES_OFFSET, 8),
        (texts.progress, PROGRESS_TEXT, PROGRESS_OFFSET, 16),
        (texts.mismatches, MISMATCHES_TEXT, MISMATCHES_OFFSET, 8),
    ];
    for (label, text, offset, digits) in fields {
        a.lea(rsi, ptr(label))?;
        a.mov(ecx, text.len() as u32)?;
        a.call(print_text)?;
        a.mov(r8, state(offset))?;
        if digits < 16 {
            // print_hex starts at the top nibble.
            a.shl(r8, 64 - 4 * digits)?;
        }
        a.mov(ecx, digits)?;
        a.call(print_hex)?;
    }
    a.lea(rsi, ptr(texts.newline))?;
    a.mov(ecx, 1)?;
    a.call(print_text)?;
    a.jmp(main_loop)?;

    // fill_page(rdi = page, rsi = generation): writes the page's pattern.
    a.set_label(&mut fill_page)?;
    emit_page_setup(&mut a, data_base(spec))?;
    let mut fill_loop = a.create_label();
    a.set_label(&mut fill_loop)?;
    a.mov(rdx, rax)?;
    a.xor(rdx, r11)?;
    a.mov(qword_ptr(r8), rdx)?;
    a.add(r8, 8)?;
    a.add(r11, r10)?;
    a.dec(ecx)?;
    a.jnz(fill_loop)?;
    a.ret()?;

    // check_page(rdi = page, rsi = generation): ecx = 0 when the page holds its pattern, and
    // non-zero (the words left) when it stopped at the first word that differs.
    a.set_label(&mut check_page)?;
    emit_page_setup(&mut a, data_base(spec))?;
    let mut check_loop = a.create_label();
    let mut check_done = a.create_label();
    a.set_label(&mut check_loop)?;
    a.mov(rdx, rax)?;
    a.xor(rdx, r11)?;
    a.cmp(qword_ptr(r8), rdx)?;
    a.jne(check_done)?;
    a.add(r8, 8)?;
    a.add(r11, r10)?;
    a.dec(ecx)?;
    a.jnz(check_loop)?;
    a.set_label(&mut check_done)?;
    a.ret()?;

    // print_text(rsi = address, ecx = length, at least 1): writes the bytes to debugcon.
    a.set_label(&mut print_text)?;
    a.mov(edx, u32::from(PORT_DEBUGCON))?;
    let mut text_loop = a.create_label();
    a.set_label(&mut text_loop)?;
    a.mov(al, byte_ptr(rsi))?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.dec(ecx)?;
    a.jnz(text_loop)?;
    a.ret()?;

    // print_hex(r8 = value, its first digit in the top nibble; ecx = digits, at least 1): writes
    // lowercase hex digits to debugcon.
    a.set_label(&mut print_hex)?;
    a.mov(edx, u32::from(PORT_DEBUGCON))?;
    let mut hex_loop = a.create_label();
    let mut hex_digit = a.create_label();
    a.set_label(&mut hex_loop)?;
    a.rol(r8, 4)?;
    a.mov(eax, r8d)?;
    a.and(eax, 0xf)?;
    a.cmp(eax, 10)?;
    a.jb(hex_digit)?;
    a.add(eax, i32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut hex_digit)?;
    a.add(eax, i32::from(b'0'))?;
    a.out(dx, al)?;
    a.dec(ecx)?;
    a.jnz(hex_loop)?;
    a.ret()?;

    // The texts, after the code they are never executed.
    for (label, text) in [
        (&mut texts.ready, DEBUGCON_READY_LINE),
        (&mut texts.pass, PASS_TEXT),
        (&mut texts.progress, PROGRESS_TEXT),
        (&mut texts.mismatches, MISMATCHES_TEXT),
        (&mut texts.newline, "\n"),
    ] {
        a.set_label(label)?;
        a.db(text.as_bytes())?;
    }

    a.assemble(CODE_ADDR)
}

/// The texts of the debugcon lines, in the code segment after the code.
struct Texts {
    ready: CodeLabel,
    pass: CodeLabel,
    progress: CodeLabel,
    mismatches: CodeLabel,
    newline: CodeLabel,
}

const PASS_TEXT: &str = "migratory-guest: pass ";
const PROGRESS_TEXT: &str = " progress ";
const MISMATCHES_TEXT: &str = " mismatches ";

/// Self-pacing before a batch (see [Pacing](self#pacing)): waits until the TSC reaches the
/// deadline, unless pacing is off, the deadline is out of the slack (reset to now) or the VMM
/// says it paces; then moves the deadline on by one batch. Registers: `r11` = ticks per batch,
/// `r9` = the slack in ticks, `r8` = the deadline, `r10` = its distance from now, `r12d` = the
/// CPUID leaf was asked; clobbers `rax`, `rbx`, `rcx`, `rdx` (rdtsc, cpuid).
fn emit_tsc_pacing(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let state = |offset: u64| qword_ptr(rbp + offset as i32);
    let mut done = a.create_label();
    let mut wait = a.create_label();
    let mut ahead = a.create_label();
    let mut spin = a.create_label();
    let mut now_again = a.create_label();
    let mut reset = a.create_label();
    let mut go = a.create_label();

    a.mov(r11, state(TSC_TICKS_PER_BATCH_OFFSET))?;
    a.test(r11, r11)?;
    a.jz(done)?;
    a.mov(r9, r11)?;
    a.imul_3(r9, r9, TSC_SLACK_BATCHES as i32)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut wait)?;
    emit_rdtsc(a)?;
    a.mov(r8, state(TSC_DEADLINE_OFFSET))?;
    a.mov(r10, r8)?;
    a.sub(r10, rax)?;
    // No borrow: the deadline is now or ahead.
    a.jae(ahead)?;
    // Behind: start at once; within the slack keep the schedule (a short catch-up), beyond it
    // (the TSC jumped forward, or a long stall) restart it from now.
    a.neg(r10)?;
    a.cmp(r10, r9)?;
    a.ja(reset)?;
    a.jmp(go)?;
    a.set_label(&mut ahead)?;
    // Ahead by more than the slack: the TSC jumped back (a new QEMU); restart from now.
    a.cmp(r10, r9)?;
    a.ja(reset)?;
    a.test(r10, r10)?;
    a.jz(go)?;
    // About to spin: once per batch, ask whether the VMM paces us.
    a.test(r12d, r12d)?;
    a.jnz(spin)?;
    a.inc(r12d)?;
    a.mov(eax, VMM_PACES_CPUID_LEAF)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.cmp(ebx, VMM_PACES_SIGNATURE[0])?;
    a.jne(spin)?;
    a.cmp(ecx, VMM_PACES_SIGNATURE[1])?;
    a.jne(spin)?;
    a.cmp(edx, VMM_PACES_SIGNATURE[2])?;
    a.je(now_again)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(wait)?;
    // cpuid clobbered the TSC value.
    a.set_label(&mut now_again)?;
    emit_rdtsc(a)?;
    a.set_label(&mut reset)?;
    a.mov(r8, rax)?;
    a.set_label(&mut go)?;
    a.add(r8, r11)?;
    a.mov(state(TSC_DEADLINE_OFFSET), r8)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// `rax` = the TSC (clobbers `rdx`).
fn emit_rdtsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}

/// Picks the next page to write into `rdi` and advances the pattern's state in the header.
fn emit_next_page(a: &mut CodeAssembler, pattern: ProgramPattern) -> Result<(), IcedError> {
    let state = |offset: u64| qword_ptr(rbp + offset as i32);
    match pattern {
        ProgramPattern::Sequential => {
            // The modulo keeps the page in range even if the cursor was corrupted.
            a.mov(rax, state(CURSOR_OFFSET))?;
            a.xor(edx, edx)?;
            a.div(r14)?;
            a.mov(rdi, rdx)?;
            a.inc(rdx)?;
            let mut store = a.create_label();
            a.cmp(rdx, r14)?;
            a.jb(store)?;
            a.xor(edx, edx)?;
            a.set_label(&mut store)?;
            a.mov(state(CURSOR_OFFSET), rdx)?;
        }
        ProgramPattern::Random { .. } => {
            a.mov(rax, state(RNG_OFFSET))?;
            for (left, shift) in [(true, 13), (false, 7), (true, 17)] {
                a.mov(rdx, rax)?;
                if left {
                    a.shl(rdx, shift)?;
                } else {
                    a.shr(rdx, shift)?;
                }
                a.xor(rax, rdx)?;
            }
            a.mov(state(RNG_OFFSET), rax)?;
            a.xor(edx, edx)?;
            a.div(r14)?;
            a.mov(rdi, rdx)?;
        }
    }
    Ok(())
}

/// Common start of `fill_page` and `check_page`: `rax` = the page's base word (see
/// [`page_word`]), `r8` = the page's address, `r10` = [`WORD_MIX`], `r11` = word × mix (0),
/// `ecx` = words left.
fn emit_page_setup(a: &mut CodeAssembler, data_base: u64) -> Result<(), IcedError> {
    // A 32-bit mov zero-extends: the low 32 bits of the generation.
    a.mov(eax, esi)?;
    a.mov(rdx, rdi)?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r8, rdi)?;
    a.shl(r8, 12)?;
    a.mov(r9, data_base)?;
    a.add(r8, r9)?;
    a.mov(r10, WORD_MIX)?;
    a.xor(r11d, r11d)?;
    a.mov(ecx, WORDS_PER_PAGE as u32)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions};

    fn spec(working_set_pages: u64, pattern: ProgramPattern) -> ProgramSpec {
        ProgramSpec {
            working_set_pages,
            batch_pages: 16,
            verify_every_batches: 2,
            pattern,
            rate_bytes_per_sec: 0,
            tsc_ticks_per_batch: 0,
        }
    }

    #[test]
    fn test_assembled_code_decodes_back_for_several_specs() {
        let specs = [
            spec(1, ProgramPattern::Sequential),
            spec(
                256,
                ProgramPattern::Random {
                    seed: 0x1234_5678_9abc_def0,
                },
            ),
            spec(MAX_WORKING_SET_PAGES, ProgramPattern::Random { seed: u64::MAX }),
            ProgramSpec {
                working_set_pages: 100_000,
                batch_pages: u32::MAX,
                verify_every_batches: u32::MAX,
                pattern: ProgramPattern::Sequential,
                rate_bytes_per_sec: MAX_RATE_BYTES_PER_SEC,
                tsc_ticks_per_batch: MAX_TSC_TICKS_PER_BATCH,
            },
        ];
        for spec in specs {
            let code = assemble(&spec).unwrap();
            assert!(code.len() < CODE_MAX_BYTES, "{spec:?}: {} bytes", code.len());
            let texts = [DEBUGCON_READY_LINE, PASS_TEXT, PROGRESS_TEXT, MISMATCHES_TEXT, "\n"];
            let instructions = &code[..code.len() - texts.iter().map(|t| t.len()).sum::<usize>()];
            assert!(code.ends_with(texts.concat().as_bytes()));
            let mut decoder = Decoder::with_ip(64, instructions, CODE_ADDR, DecoderOptions::NONE);
            let mut outs = 0;
            let mut byte_outs = 0;
            for instruction in &mut decoder {
                assert!(
                    !instruction.is_invalid(),
                    "{spec:?}: invalid at {:#x}",
                    instruction.ip()
                );
                if instruction.code() == Code::Out_DX_EAX {
                    outs += 1;
                }
                if instruction.code() == Code::Out_DX_AL {
                    byte_outs += 1;
                }
            }
            // Ready, progress, a page mismatch, a ledger mismatch, verified.
            assert_eq!(outs, 5, "{spec:?}");
            // Debugcon: print_text and print_hex.
            assert_eq!(byte_outs, 2, "{spec:?}");
        }
    }

    #[test]
    fn test_validation_rejects_bad_specs() {
        let good = spec(256, ProgramPattern::Sequential);
        let rejected = |bad: ProgramSpec| assemble(&bad).unwrap_err();
        let too_large = MAX_WORKING_SET_PAGES + 1;
        assert!(matches!(
            rejected(ProgramSpec {
                working_set_pages: 0,
                ..good
            }),
            ProgramError::WorkingSetPages { pages: 0, .. }
        ));
        assert!(matches!(
            rejected(ProgramSpec { working_set_pages: too_large, ..good }),
            ProgramError::WorkingSetPages { pages, .. } if pages == too_large
        ));
        assert!(matches!(
            rejected(ProgramSpec { batch_pages: 0, ..good }),
            ProgramError::ZeroBatchPages
        ));
        assert!(matches!(
            rejected(ProgramSpec {
                verify_every_batches: 0,
                ..good
            }),
            ProgramError::ZeroVerifyEveryBatches
        ));
        assert!(matches!(
            rejected(ProgramSpec {
                pattern: ProgramPattern::Random { seed: 0 },
                ..good
            }),
            ProgramError::ZeroSeed
        ));
        assert!(matches!(
            rejected(ProgramSpec {
                rate_bytes_per_sec: MAX_RATE_BYTES_PER_SEC + 1,
                ..good
            }),
            ProgramError::Rate { rate, .. } if rate == MAX_RATE_BYTES_PER_SEC + 1
        ));
        assert!(matches!(
            rejected(ProgramSpec {
                tsc_ticks_per_batch: MAX_TSC_TICKS_PER_BATCH + 1,
                ..good
            }),
            ProgramError::TscTicksPerBatch { ticks, .. } if ticks == MAX_TSC_TICKS_PER_BATCH + 1
        ));
        assert!(good.validate().is_ok());
    }

    #[test]
    fn test_page_word_reference_values() {
        // Computed independently of this code (Python, arbitrary-precision integers masked to 64 bits).
        assert_eq!(page_word(0, 0, 0), 0);
        assert_eq!(page_word(1, 1, 0), 0x1_0000_0001);
        assert_eq!(page_word(1, 1, 1), 0x9e37_79b8_7f4a_7c14);
        assert_eq!(page_word(7, 0x1_0000_0005, 3), 0xdaa6_6d2b_7ddf_743a);
        assert_eq!(page_word(0x7fff_ffff, 0xdead_beef_cafe, 511), 0xaf44_06ba_ab42_6715);
    }

    #[test]
    fn test_layout_puts_data_on_the_first_2mib_boundary_above_the_ledger() {
        let cases = [
            (1, 0x40_0000, 0x60_0000),
            (256, 0x40_0000, 0x60_0000),
            (1 << 18, 0x60_0000, 0x4060_0000),
        ];
        for (pages, base, required) in cases {
            let spec = spec(pages, ProgramPattern::Sequential);
            assert_eq!(data_base(&spec), base, "{pages} pages");
            assert_eq!(required_memory(&spec), required, "{pages} pages");
        }
    }

    mod kvm {
        //! The flipped-byte proof: the program runs on real KVM and reports exactly the page the
        //! VMM corrupted behind its back.

        use super::super::*;
        use crate::vmm::kvm::boot::{setup_long_mode, write_boot_tables};
        use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
        use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
        use std::time::{Duration, Instant};
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

        /// Bounds every phase by exits, not by time: a phase normally ends in a few dozen.
        const MAX_EXITS_PER_PHASE: usize = 10_000;
        const CLEAN_PASSES: u32 = 3;
        const NO_MISMATCH: [u32; 0] = [];

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Report {
            Ready(u32),
            Progress(u32),
            Verified(u32),
            Mismatch(u32),
        }

        /// One VM with one vCPU running the program. Fields drop in order: the vCPU and the VM
        /// go before the memory registered with them.
        struct TestGuest {
            vcpu: VcpuFd,
            _vm: VmFd,
            spec: ProgramSpec,
            debugcon: DebugconLine,
            lines: Vec<String>,
            mem: GuestMemoryMmap<()>,
        }

        impl TestGuest {
            /// A guest whose VMM (this test) does not pace it.
            fn start(kvm: &Kvm, spec: ProgramSpec) -> TestGuest {
                Self::start_with_cpuid(kvm, spec, kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
            }

            fn start_with_cpuid(kvm: &Kvm, spec: ProgramSpec, cpuid: CpuId) -> TestGuest {
                let ram_bytes = required_memory(&spec);
                let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_bytes as usize)]).unwrap();
                let vm = kvm.create_vm().unwrap();
                // Intel needs three pages for the real-mode TSS; this address is above our RAM.
                vm.set_tss_address(0xfffb_d000).unwrap();
                let host_addr = mem.get_host_address(GuestAddress(0)).unwrap();
                let region = kvm_userspace_memory_region {
                    slot: 0,
                    flags: 0,
                    guest_phys_addr: 0,
                    memory_size: ram_bytes,
                    userspace_addr: host_addr as u64,
                };
                // SAFETY: the region is one live anonymous mapping of exactly `ram_bytes`, owned by
                // `mem`, which TestGuest drops after the VM (field order), so the kernel never
                // sees it unmapped while the VM exists; slot 0 is the VM's only slot.
                unsafe { vm.set_user_memory_region(region) }.unwrap();
                write_boot_tables(&mem, ram_bytes).unwrap();
                mem.write_slice(&assemble(&spec).unwrap(), GuestAddress(CODE_ADDR))
                    .unwrap();
                let vcpu = vm.create_vcpu(0).unwrap();
                vcpu.set_cpuid2(&cpuid).unwrap();
                setup_long_mode(&vcpu, CODE_ADDR, STACK_TOP).unwrap();
                TestGuest {
                    vcpu,
                    _vm: vm,
                    spec,
                    debugcon: DebugconLine::default(),
                    lines: Vec::new(),
                    mem,
                }
            }

            /// Runs the vCPU to its next report, collecting debugcon lines on the way; any other
            /// exit fails the test with the registers.
            fn next(&mut self) -> Report {
                let unexpected = loop {
                    match self.vcpu.run().expect("KVM_RUN") {
                        VcpuExit::IoOut(PORT_DEBUGCON, &[byte]) => self.lines.extend(self.debugcon.push(byte)),
                        VcpuExit::IoOut(port, data) => {
                            let value = u32::from_le_bytes(data.try_into().expect("out dx, eax writes 4 bytes"));
                            match port {
                                PORT_READY => return Report::Ready(value),
                                PORT_PROGRESS => return Report::Progress(value),
                                PORT_VERIFIED => return Report::Verified(value),
                                PORT_MISMATCH => return Report::Mismatch(value),
                                _ => break format!("out to port {port:#x} with {value:#x}"),
                            }
                        }
                        other => break format!("{other:?}"),
                    }
                };
                panic!(
                    "unexpected exit {unexpected}\nregs {:#x?}\nsregs {:#x?}",
                    self.vcpu.get_regs(),
                    self.vcpu.get_sregs()
                );
            }

            fn header(&self, offset: u64) -> u64 {
                self.mem.read_obj(GuestAddress(STATE_ADDR + offset)).unwrap()
            }

            fn set_header(&self, offset: u64, value: u64) {
                self.mem.write_obj(value, GuestAddress(STATE_ADDR + offset)).unwrap();
            }

            /// Runs for `span` of wall-clock time (to the first report after it); returns the
            /// pages written meanwhile.
            fn pages_written_in(&mut self, span: Duration) -> u64 {
                let (start, from) = (Instant::now(), self.header(PROGRESS_OFFSET));
                while start.elapsed() < span {
                    assert!(!matches!(self.next(), Report::Mismatch(_) | Report::Ready(_)));
                }
                self.header(PROGRESS_OFFSET) - from
            }

            fn ledger(&self, page: u64) -> u64 {
                self.mem.read_obj(GuestAddress(LEDGER_ADDR + page * 8)).unwrap()
            }

            fn flip_byte(&self, addr: u64) {
                let byte: u8 = self.mem.read_obj(GuestAddress(addr)).unwrap();
                self.mem.write_obj(byte ^ 0x5a, GuestAddress(addr)).unwrap();
            }

            /// Runs until a progress exit that a verify pass follows directly, so a flip made now
            /// cannot be overwritten by a batch before the pass sees it.
            fn run_to_verify_point(&mut self) {
                for _ in 0..MAX_EXITS_PER_PHASE {
                    match self.next() {
                        Report::Progress(_) => {
                            if self.header(BATCHES_OFFSET) % u64::from(self.spec.verify_every_batches) == 0 {
                                return;
                            }
                        }
                        Report::Verified(_) => {}
                        other => panic!("{other:?} before the verify point"),
                    }
                }
                panic!("no verify point in {MAX_EXITS_PER_PHASE} exits");
            }

            /// Runs to the end of the next verify pass; returns the mismatches it reported.
            fn run_one_pass(&mut self) -> Vec<u32> {
                let mut mismatches = Vec::new();
                for _ in 0..MAX_EXITS_PER_PHASE {
                    match self.next() {
                        Report::Mismatch(value) => mismatches.push(value),
                        Report::Verified(passes) => {
                            assert_eq!(u64::from(passes), self.header(VERIFY_PASSES_OFFSET));
                            return mismatches;
                        }
                        Report::Progress(low) => assert_eq!(low, self.header(PROGRESS_OFFSET) as u32),
                        Report::Ready(_) => panic!("ready twice"),
                    }
                }
                panic!("no verify pass in {MAX_EXITS_PER_PHASE} exits");
            }

            /// The host's own check, with the reference pattern rather than the guest's code:
            /// every page holds the pattern of its ledger generation, and the ledger sums to progress.
            fn assert_memory_consistent(&self) {
                let base = data_base(&self.spec);
                let mut page = [0u8; PAGE_SIZE as usize];
                let mut sum = 0u64;
                for p in 0..self.spec.working_set_pages {
                    let generation = self.ledger(p);
                    sum = sum.wrapping_add(generation);
                    self.mem
                        .read_slice(&mut page, GuestAddress(base + p * PAGE_SIZE))
                        .unwrap();
                    for (i, word) in page.chunks_exact(8).enumerate() {
                        let word = u64::from_le_bytes(word.try_into().unwrap());
                        assert_eq!(word, page_word(p, generation, i), "page {p} word {i}");
                    }
                }
                assert_eq!(sum, self.header(PROGRESS_OFFSET));
            }
        }

        fn check(kvm: &Kvm, spec: ProgramSpec) {
            let mut guest = TestGuest::start(kvm, spec);
            let pages = spec.working_set_pages;
            assert_eq!(guest.next(), Report::Ready(0), "{spec:?}");
            assert_eq!(guest.header(PROGRESS_OFFSET), pages);
            assert!((0..pages).all(|p| guest.ledger(p) == 1));

            // Clean passes while progress rises.
            let mut last_progress = pages;
            for pass in 1..=CLEAN_PASSES {
                assert_eq!(guest.run_one_pass(), NO_MISMATCH, "{spec:?} pass {pass}");
                let progress = guest.header(PROGRESS_OFFSET);
                assert!(progress > last_progress, "{spec:?}: progress stuck at {progress}");
                last_progress = progress;
            }
            guest.assert_memory_consistent();

            // A byte of a data page, flipped behind the guest's back: reported once, then repaired.
            let flipped_page = pages / 3;
            guest.run_to_verify_point();
            guest.flip_byte(data_base(&spec) + flipped_page * PAGE_SIZE + 1234);
            assert_eq!(guest.run_one_pass(), [flipped_page as u32], "{spec:?}");
            assert_eq!(guest.run_one_pass(), NO_MISMATCH, "{spec:?}: reported twice");
            assert_eq!(guest.header(MISMATCHES_OFFSET), 1);
            guest.assert_memory_consistent();

            // The low byte of a ledger entry: the page no longer matches the generation the entry
            // claims, and the ledger no longer sums to progress. Both reported, in that order.
            let flipped_entry = pages - 1;
            guest.run_to_verify_point();
            guest.flip_byte(LEDGER_ADDR + flipped_entry * 8);
            assert_eq!(
                guest.run_one_pass(),
                [flipped_entry as u32, LEDGER_MISMATCH],
                "{spec:?}"
            );
            assert_eq!(guest.run_one_pass(), NO_MISMATCH, "{spec:?}: reported twice");
            assert_eq!(guest.header(MISMATCHES_OFFSET), 3);
            guest.assert_memory_consistent();

            // The debugcon lines: ready, then one per pass with that pass's counters (the last
            // is written after its PORT_VERIFIED exit, so run to the next report first).
            let (passes, progress) = (guest.header(VERIFY_PASSES_OFFSET), guest.header(PROGRESS_OFFSET));
            guest.next();
            assert_eq!(guest.lines.len() as u64, passes + 1, "{:?}", guest.lines);
            assert!(is_debugcon_ready_line(&guest.lines[0]));
            let reports: Vec<DebugconReport> = guest.lines[1..]
                .iter()
                .map(|line| parse_debugcon_line(line).unwrap_or_else(|| panic!("{line:?}")))
                .collect();
            assert!(reports.iter().zip(1..).all(|(r, pass)| r.pass == pass));
            assert!(reports.windows(2).all(|w| w[0].progress < w[1].progress));
            assert_eq!(
                reports.last().copied(),
                Some(DebugconReport {
                    pass: passes as u32,
                    progress,
                    mismatches: 3
                })
            );
            println!(
                "{spec:?}: {} verify passes, {} mismatches, progress {}",
                guest.header(VERIFY_PASSES_OFFSET),
                guest.header(MISMATCHES_OFFSET),
                guest.header(PROGRESS_OFFSET)
            );
        }

        #[test]
        fn test_guest_reports_a_byte_flipped_by_the_vmm() {
            let Ok(kvm) = Kvm::new() else {
                println!("SKIPPED: /dev/kvm not available");
                return;
            };
            for pattern in [
                ProgramPattern::Sequential,
                ProgramPattern::Random {
                    seed: 0x1234_5678_9abc_def0,
                },
            ] {
                check(
                    &kvm,
                    ProgramSpec {
                        working_set_pages: 256,
                        batch_pages: 16,
                        verify_every_batches: 2,
                        pattern,
                        rate_bytes_per_sec: 0,
                        tsc_ticks_per_batch: 0,
                    },
                );
            }
        }

        /// A spec paced by the TSC alone at `rate` bytes/s, with batches of `batch_pages`.
        fn paced_spec(rate: u64, batch_pages: u32, tsc_hz: u64) -> ProgramSpec {
            let ticks = u64::from(batch_pages) * PAGE_SIZE * tsc_hz / rate;
            ProgramSpec {
                working_set_pages: 256,
                batch_pages,
                verify_every_batches: 64,
                pattern: ProgramPattern::Random { seed: 7 },
                rate_bytes_per_sec: rate,
                tsc_ticks_per_batch: ticks,
            }
        }

        /// A behaviour check, not a benchmark: with nobody else pacing it, the guest keeps near
        /// its rate (within a factor of 3, as timing on a shared host is noisy), and a TSC that
        /// jumps back or forward (a migration) causes neither a stall nor a burst.
        #[test]
        fn test_guest_paces_itself_by_the_tsc_without_a_vmm() {
            let Ok(kvm) = Kvm::new() else {
                println!("SKIPPED: /dev/kvm not available");
                return;
            };
            // Well below what the guest manages unpaced here (some 40 MiB/s with an exit every
            // 4 pages on a loaded host), so that the check is of the pacing, not of the host.
            const RATE: u64 = 4 << 20;
            let tsc_hz = crate::qemu::host_tsc_hz();
            let spec = paced_spec(RATE, 4, tsc_hz);
            let mut guest = TestGuest::start(&kvm, spec);
            assert_eq!(guest.next(), Report::Ready(0));
            let within = |pages: u64, span: Duration, what: &str| {
                let rate = (pages * PAGE_SIZE) as f64 / span.as_secs_f64();
                println!(
                    "{what}: {:.1} MiB/s, target {} MiB/s",
                    rate / f64::from(1 << 20),
                    RATE >> 20
                );
                assert!(
                    rate > RATE as f64 / 3.0 && rate < RATE as f64 * 3.0,
                    "{what}: {rate:.0} bytes/s against {RATE}"
                );
            };
            let span = Duration::from_secs(1);
            within(guest.pages_written_in(span), span, "steady");

            // The TSC jumped back by 10,000 batches, 10 s (a new QEMU): no stall.
            let jump = 10_000 * spec.tsc_ticks_per_batch;
            guest.set_header(TSC_DEADLINE_OFFSET, guest.header(TSC_DEADLINE_OFFSET) + jump);
            let span = Duration::from_millis(500);
            within(guest.pages_written_in(span), span, "after the TSC jumped back");

            // It jumped forward by as much (a long downtime): no catch-up burst.
            guest.set_header(TSC_DEADLINE_OFFSET, guest.header(TSC_DEADLINE_OFFSET) - jump);
            within(guest.pages_written_in(span), span, "after the TSC jumped forward");
            assert_eq!(guest.header(MISMATCHES_OFFSET), 0);
        }

        /// Under a VMM that says it paces (the kvm backend's CPUID leaf), the guest never waits
        /// for its TSC deadline: with 5 s per batch it still writes batch after batch at once.
        #[test]
        fn test_guest_under_a_pacing_vmm_does_not_wait_on_the_tsc() {
            let Ok(kvm) = Kvm::new() else {
                println!("SKIPPED: /dev/kvm not available");
                return;
            };
            let tsc_hz = crate::qemu::host_tsc_hz();
            let batch_pages = 4;
            // 5 s per batch.
            let spec = paced_spec(u64::from(batch_pages) * PAGE_SIZE / 5, batch_pages, tsc_hz);
            let cpuid = crate::vmm::kvm::guest::guest_cpuid(&kvm).unwrap();
            let mut guest = TestGuest::start_with_cpuid(&kvm, spec, cpuid);
            assert_eq!(guest.next(), Report::Ready(0));
            let start = Instant::now();
            for _ in 0..4 {
                assert!(matches!(guest.next(), Report::Progress(_)));
            }
            // Waiting would take 15 s at least.
            assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
            assert_eq!(guest.header(BATCHES_OFFSET), 4);
        }
    }
}
