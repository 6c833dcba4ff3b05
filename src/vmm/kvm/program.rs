//! The self-checking guest program that the kvm backend runs.
//!
//! The program is x86-64 machine code, assembled here with iced-x86 for one [`ProgramSpec`]. It
//! writes pages of its working set at a rate the VMM paces, keeps a ledger of the generation each
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
/// * `rax`, `rcx`, `rdx`, `r8`–`r11`: scratch, clobbered by both subroutines.
fn emit(spec: &ProgramSpec) -> Result<Vec<u8>, IcedError> {
    let state = |offset: u64| qword_ptr(rbp + offset as i32);
    let mut a = CodeAssembler::new(64)?;
    let mut fill_page = a.create_label();
    let mut check_page = a.create_label();
    let mut main_loop = a.create_label();

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

    // Main loop: one batch, its progress exit, and a verify pass when one is due.
    a.set_label(&mut main_loop)?;
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

    a.assemble(CODE_ADDR)
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
            },
        ];
        for spec in specs {
            let code = assemble(&spec).unwrap();
            assert!(code.len() < CODE_MAX_BYTES, "{spec:?}: {} bytes", code.len());
            let mut decoder = Decoder::with_ip(64, &code, CODE_ADDR, DecoderOptions::NONE);
            let mut outs = 0;
            for instruction in &mut decoder {
                assert!(
                    !instruction.is_invalid(),
                    "{spec:?}: invalid at {:#x}",
                    instruction.ip()
                );
                if instruction.code() == Code::Out_DX_EAX {
                    outs += 1;
                }
            }
            // Ready, progress, a page mismatch, a ledger mismatch, verified.
            assert_eq!(outs, 5, "{spec:?}");
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
        use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
        use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
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
            mem: GuestMemoryMmap<()>,
        }

        impl TestGuest {
            fn start(kvm: &Kvm, spec: ProgramSpec) -> TestGuest {
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
                vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
                    .unwrap();
                setup_long_mode(&vcpu, CODE_ADDR, STACK_TOP).unwrap();
                TestGuest {
                    vcpu,
                    _vm: vm,
                    spec,
                    mem,
                }
            }

            /// Runs the vCPU to its next report; any other exit fails the test with the registers.
            fn next(&mut self) -> Report {
                let unexpected = match self.vcpu.run().expect("KVM_RUN") {
                    VcpuExit::IoOut(port, data) => {
                        let value = u32::from_le_bytes(data.try_into().expect("out dx, eax writes 4 bytes"));
                        match port {
                            PORT_READY => return Report::Ready(value),
                            PORT_PROGRESS => return Report::Progress(value),
                            PORT_VERIFIED => return Report::Verified(value),
                            PORT_MISMATCH => return Report::Mismatch(value),
                            _ => format!("out to port {port:#x} with {value:#x}"),
                        }
                    }
                    other => format!("{other:?}"),
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
                    },
                );
            }
        }
    }
}
