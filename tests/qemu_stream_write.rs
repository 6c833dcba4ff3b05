//! A real QEMU 7.2 (`qemu-system-x86_64 -machine pc -incoming tcp:...`) loads a stream that
//! `StreamWriter` writes for a tiny hand-built guest, answers SHUT(0) on the return path and runs
//! the guest, which prints on isa-debugcon; a stream for another machine type or RAM size makes
//! it fail, which our side sees as a typed error.
//!
//! The guest: 64 MiB, long mode at CPL 3, identity-mapped with 2 MiB user pages, a TSS whose I/O
//! bitmap opens port 0xe9 only. Its code (at 1 MiB) writes [`GREETING`] to port 0xe9 with
//! `rep outsb`, then the byte at [`FILL_ADDR`] (a page sent as a fill record), then spins.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migratory::format::native::qemu::{QemuApic, QemuCpu, QemuFpReg, QemuSegment};
use migratory::qemu::find_qemu;
use migratory::qemu::stream::return_path::{read_return_message, wait_for_shut, ReturnMessage};
use migratory::qemu::stream::write_cpu::msr;
use migratory::qemu::stream::writer::{StreamWriter, PC_I440FX_7_2};
use migratory::qemu::stream::{RamBlock, StreamError, PAGE_SIZE};

const RAM_MIB: u64 = 64;
const GREETING: &[u8] = b"hello from migratory\n";
const FILL_BYTE: u8 = b'Z';
const FILL_ADDR: u64 = 0x20_0000;
const CODE_ADDR: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x30_0000;
const GDT_ADDR: u64 = 0x500;
const TSS_ADDR: u64 = 0x600;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
const DEBUGCON_PORT: u16 = 0xe9;
/// A 64-bit TSS header, then a bitmap for ports 0..256 and the all-ones byte the CPU reads past
/// the last port checked.
const TSS_HEADER: usize = 0x68;
const IO_BITMAP_BYTES: usize = 256 / 8 + 1;
const TSS_LIMIT: u32 = (TSS_HEADER + IO_BITMAP_BYTES - 1) as u32;
const CODE_SELECTOR: u32 = 0x08 | 3;
const DATA_SELECTOR: u32 = 0x10 | 3;
const TSS_SELECTOR: u32 = 0x18;
/// How long QEMU may take to listen, load, and the guest to print.
const DEADLINE: Duration = Duration::from_secs(8);

// Segment attribute bits where QEMU keeps them (descriptor high dword).
const DESC_S: u32 = 1 << 12;
const DESC_DPL3: u32 = 3 << 13;
const DESC_P: u32 = 1 << 15;
const DESC_L: u32 = 1 << 21;
const DESC_B: u32 = 1 << 22;
const DESC_G: u32 = 1 << 23;
const TYPE_CODE_XRA: u32 = 0xb << 8;
const TYPE_DATA_RWA: u32 = 0x3 << 8;
/// An available 64-bit TSS: TCG checks CPL 3 port access only against a TSS of this type.
const TYPE_TSS_AVAILABLE: u32 = 0x9 << 8;
/// A busy 64-bit TSS: what VMX requires in TR.
const TYPE_TSS_BUSY: u32 = 0xb << 8;

// QEMU's hflags (target/i386/cpu.h, 7.2).
const HF_CPL3: u32 = 3;
const HF_CS32: u32 = 1 << 4;
const HF_SS32: u32 = 1 << 5;
const HF_PE: u32 = 1 << 7;
const HF_MP: u32 = 1 << 9;
const HF_LMA: u32 = 1 << 14;
const HF_CS64: u32 = 1 << 15;
const HF_OSFXSR: u32 = 1 << 22;
const HF2_GIF: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Accel {
    Tcg,
    Kvm,
}

/// A QEMU waiting for an incoming migration; killed and its directory removed on drop.
struct Incoming {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Incoming {
    fn start(qemu: &PathBuf, accel: Accel, ram_mib: u64) -> Incoming {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "migratory-stream-write-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        // A port that was free a moment ago; QEMU binds it itself.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let accel_name = match accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("QEMU stderr file");
        let child = Command::new(qemu)
            .args(["-machine", &format!("pc,accel={accel_name}")])
            .args(["-cpu", "qemu64", "-m", &ram_mib.to_string()])
            .args(["-nographic", "-nodefaults"])
            .arg("-chardev")
            .arg(format!("file,id=dc,path={}", dir.join("debugcon.log").display()))
            .args(["-device", &format!("isa-debugcon,iobase={DEBUGCON_PORT:#x},chardev=dc")])
            .args(["-incoming", &format!("tcp:127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting qemu-system-x86_64");
        Incoming { child, dir, port }
    }

    /// Connects once QEMU listens (it gives no other sign), or panics with its stderr.
    fn connect(&mut self) -> TcpStream {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                return s;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited with {status}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "QEMU never listened: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn debug_output(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("debugcon.log")).unwrap_or_default()
    }

    /// Waits until the guest printed `wanted`.
    fn wait_for_output(&self, wanted: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let out = self.debug_output();
            if out.windows(wanted.len()).any(|w| w == wanted) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "guest printed {:?}; QEMU stderr: {}",
                    String::from_utf8_lossy(&out),
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for QEMU to exit on its own; its status.
    fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn qemu_or_skip() -> Option<PathBuf> {
    let found = find_qemu();
    if found.is_none() {
        println!("SKIPPED: qemu-system-x86_64 is not on PATH");
    }
    found
}

fn kvm_opens() -> bool {
    OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// The guest's pages that are not zero, by guest-physical address.
fn guest_pages() -> Vec<(u64, Vec<u8>)> {
    let mut low = vec![0u8; 4 * PAGE_SIZE];
    let gdt: [u64; 5] = [0, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff, tss_descriptor(), 0];
    for (i, d) in gdt.iter().enumerate() {
        let at = GDT_ADDR as usize + i * 8;
        low[at..at + 8].copy_from_slice(&d.to_le_bytes());
    }
    let tss = TSS_ADDR as usize;
    low[tss + 0x66..tss + 0x68].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes());
    let bitmap = &mut low[tss + TSS_HEADER..tss + TSS_HEADER + IO_BITMAP_BYTES];
    bitmap.fill(0xff);
    bitmap[usize::from(DEBUGCON_PORT / 8)] &= !(1 << (DEBUGCON_PORT % 8));
    let user_rw = 0x7u64;
    low[PML4_ADDR as usize..][..8].copy_from_slice(&(PDPT_ADDR | user_rw).to_le_bytes());
    low[PDPT_ADDR as usize..][..8].copy_from_slice(&(PD_ADDR | user_rw).to_le_bytes());
    for i in 0..512u64 {
        let entry = (i << 21) | user_rw | 0x80;
        low[(PD_ADDR + i * 8) as usize..][..8].copy_from_slice(&entry.to_le_bytes());
    }

    let mut code = vec![0u8; PAGE_SIZE];
    let mut asm = Vec::new();
    asm.extend_from_slice(&[0x66, 0xba]); // mov dx, 0xe9
    asm.extend_from_slice(&DEBUGCON_PORT.to_le_bytes());
    let lea_end = asm.len() + 7;
    let msg_at = lea_end + 5 + 2 + 7 + 1 + 2;
    asm.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + msg]
    asm.extend_from_slice(&((msg_at - lea_end) as u32).to_le_bytes());
    asm.push(0xb9); // mov ecx, len
    asm.extend_from_slice(&(GREETING.len() as u32).to_le_bytes());
    asm.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    asm.extend_from_slice(&[0x8a, 0x04, 0x25]); // mov al, [FILL_ADDR]
    asm.extend_from_slice(&(FILL_ADDR as u32).to_le_bytes());
    asm.push(0xee); // out dx, al
    asm.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    assert_eq!(asm.len(), msg_at);
    asm.extend_from_slice(GREETING);
    code[..asm.len()].copy_from_slice(&asm);

    let mut pages: Vec<(u64, Vec<u8>)> = low
        .chunks(PAGE_SIZE)
        .enumerate()
        .map(|(i, p)| (i as u64 * PAGE_SIZE as u64, p.to_vec()))
        .collect();
    pages.push((CODE_ADDR, code));
    pages.push((FILL_ADDR, vec![FILL_BYTE; PAGE_SIZE]));
    pages
}

fn tss_descriptor() -> u64 {
    let (base, limit) = (TSS_ADDR, u64::from(TSS_LIMIT));
    // Present, DPL 0, type 9 (available 64-bit TSS), byte granularity.
    (limit & 0xffff) | (base & 0xff_ffff) << 16 | 0x89 << 40 | ((base >> 24) & 0xff) << 56
}

fn segment(selector: u32, flags: u32) -> QemuSegment {
    QemuSegment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        flags,
    }
}

/// The vCPU: long mode, CPL 3, at the code's first instruction, interrupts off.
fn guest_cpu(accel: Accel) -> QemuCpu {
    let code = segment(
        CODE_SELECTOR,
        TYPE_CODE_XRA | DESC_S | DESC_DPL3 | DESC_P | DESC_L | DESC_G,
    );
    let data = segment(
        DATA_SELECTOR,
        TYPE_DATA_RWA | DESC_S | DESC_DPL3 | DESC_P | DESC_B | DESC_G,
    );
    let tss_type = match accel {
        Accel::Tcg => TYPE_TSS_AVAILABLE,
        Accel::Kvm => TYPE_TSS_BUSY,
    };
    let mut regs = [0u64; 16];
    regs[4] = STACK_TOP;
    let mut lvt = [1u32 << 16; 6];
    lvt[3] = 0x700; // LINT0: ExtINT, as SeaBIOS leaves it
    QemuCpu {
        halted: 0,
        interrupt_request: 0,
        regs,
        eip: CODE_ADDR,
        eflags: 0x2,
        hflags: HF_CPL3 | HF_CS32 | HF_SS32 | HF_PE | HF_MP | HF_LMA | HF_CS64 | HF_OSFXSR,
        hflags2: HF2_GIF,
        fpuc: 0x37f,
        fpus: 0,
        fptag: 0,
        fpregs: [QemuFpReg::default(); 8],
        // Non-zero, so that the cpu/fpop_ip_dp subsection goes out and QEMU must accept it.
        fpop: 0x1d9,
        fpip: CODE_ADDR,
        fpdp: FILL_ADDR,
        // ES, CS, SS, DS, FS, GS.
        segs: [data, code, data, data, data, data],
        ldt: QemuSegment::default(),
        tr: QemuSegment {
            selector: TSS_SELECTOR,
            base: TSS_ADDR,
            limit: TSS_LIMIT,
            flags: tss_type | DESC_P,
        },
        gdt: QemuSegment {
            selector: 0,
            base: GDT_ADDR,
            limit: 5 * 8 - 1,
            flags: 0,
        },
        idt: QemuSegment::default(),
        sysenter_cs: 0,
        sysenter_esp: 0,
        sysenter_eip: 0,
        // PE, MP, ET, NE, WP, PG.
        cr0: 0x8001_0033,
        cr2: 0,
        cr3: PML4_ADDR,
        // PAE, OSFXSR, OSXMMEXCPT.
        cr4: 0x620,
        dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
        a20_mask: -1,
        mxcsr: 0x1f80,
        xmm: [[0; 2]; 16],
        ymmh: [[0; 2]; 16],
        // LME, LMA.
        efer: 0x500,
        star: 0,
        lstar: 0,
        cstar: 0,
        fmask: 0,
        kernelgsbase: 0,
        smbase: 0x3_0000,
        pat: 0x0007_0406_0007_0406,
        tsc: 0,
        tsc_aux: 0,
        xcr0: 1,
        xstate_bv: 3,
        interrupt_injected: -1,
        mp_state: 0,
        exception_nr: -1,
        has_error_code: 0,
        error_code: 0,
        soft_interrupt: 0,
        nmi_injected: 0,
        nmi_pending: 0,
        msrs: guest_msrs(accel),
        apic: Some(QemuApic {
            apicbase: 0xfee0_0900,
            id: 0,
            arb_id: 0,
            tpr: 0,
            spurious_vec: 0xff,
            log_dest: 0,
            dest_mode: 0xf,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            lvt,
            esr: 0,
            icr: [0; 2],
            divide_conf: 0,
            count_shift: 1,
            initial_count: 0,
            initial_count_load_time: 0,
            next_time: 0,
        }),
    }
}

/// MSRs that make subsections go out: under TCG a TSC adjustment, a performance counter's event
/// selector and a poll-control value other than QEMU's default (MISC_ENABLE at its default
/// stays out); under KVM none, as the host may lack them.
fn guest_msrs(accel: Accel) -> Vec<(u32, u64)> {
    match accel {
        Accel::Tcg => vec![
            (msr::IA32_TSC_ADJUST, 5),
            (msr::IA32_MISC_ENABLE, 1),
            (msr::MTRR_DEF_TYPE, 0xc06),
            (msr::KVM_POLL_CONTROL, 0),
            (msr::P6_EVNTSEL0, 0x43_0076),
        ],
        Accel::Kvm => Vec::new(),
    }
}

/// Header, return path, ram setup.
fn write_start(w: &mut StreamWriter<TcpStream>, machine: &str, ram_mib: u64) -> Result<(), StreamError> {
    w.header(machine)?;
    w.open_return_path()?;
    w.ram_setup(&[RamBlock {
        name: "pc.ram".into(),
        length: ram_mib << 20,
    }])
}

/// The rest of the migration, as a pre-copy would send it: a first round with every page of RAM
/// (most of them zero, and a stale code page), a second with the code page as it is now, the
/// last pages, the vCPU, EOF.
fn write_rest(w: &mut StreamWriter<TcpStream>, accel: Accel) -> Result<(), StreamError> {
    let pages = guest_pages();
    let zero = [0u8; PAGE_SIZE];
    w.begin_round()?;
    let mut low = pages[..pages.len() - 2].iter().peekable();
    for addr in (0..RAM_MIB << 20).step_by(PAGE_SIZE) {
        match low.next_if(|(a, _)| *a == addr) {
            Some((_, data)) => w.page(0, addr, data)?,
            None if addr == CODE_ADDR => w.page(0, addr, &[0xcc; PAGE_SIZE])?,
            None => w.page(0, addr, &zero)?,
        }
    }
    w.end_pages()?;
    w.begin_round()?;
    let (code_addr, code) = &pages[pages.len() - 2];
    w.page(0, *code_addr, code)?;
    w.end_pages()?;
    w.begin_last_pages()?;
    let (fill_addr, fill) = &pages[pages.len() - 1];
    w.page(0, *fill_addr, fill)?;
    w.end_pages()?;
    w.cpu(0, &guest_cpu(accel))?;
    w.finish()
}

fn guest_runs_after_migration(accel: Accel) {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut incoming = Incoming::start(&qemu, accel, RAM_MIB);
    let stream = incoming.connect();
    let mut return_path = stream.try_clone().expect("a second handle on the socket");
    return_path
        .set_read_timeout(Some(DEADLINE))
        .expect("socket read timeout");
    let mut w = StreamWriter::new(stream);
    let stderr = |e: StreamError| panic!("writing: {e}; QEMU stderr: {}", incoming.stderr());
    write_start(&mut w, PC_I440FX_7_2, RAM_MIB).unwrap_or_else(stderr);
    // The return path is open as soon as QEMU has read the command: a PING comes back.
    w.ping(0x5eed).unwrap_or_else(stderr);
    assert_eq!(
        read_return_message(&mut return_path).expect("PONG on the return path"),
        ReturnMessage::Pong(0x5eed)
    );
    write_rest(&mut w, accel).unwrap_or_else(stderr);
    wait_for_shut(&mut return_path).unwrap_or_else(|e| panic!("return path: {e}; QEMU stderr: {}", incoming.stderr()));
    let mut wanted = GREETING.to_vec();
    wanted.push(FILL_BYTE);
    if let Err(e) = incoming.wait_for_output(&wanted) {
        panic!("{e}");
    }
}

#[test]
fn test_qemu_tcg_loads_the_stream_and_runs_the_guest() {
    guest_runs_after_migration(Accel::Tcg);
}

#[test]
fn test_qemu_kvm_loads_the_stream_and_runs_the_guest() {
    if !kvm_opens() {
        println!("SKIPPED: /dev/kvm does not open");
        return;
    }
    guest_runs_after_migration(Accel::Kvm);
}

/// QEMU refuses the stream: it exits without SHUT(0), which the return path reports as a closed
/// connection (or SHUT(1)); the write may fail too once QEMU has gone.
fn refused(machine: &str, qemu_ram_mib: u64, stderr_says: &str) {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut incoming = Incoming::start(&qemu, Accel::Tcg, qemu_ram_mib);
    let stream = incoming.connect();
    let mut return_path = stream.try_clone().expect("a second handle on the socket");
    let mut w = StreamWriter::new(stream);
    if let Err(e) = write_start(&mut w, machine, RAM_MIB).and_then(|()| write_rest(&mut w, Accel::Tcg)) {
        assert!(matches!(e, StreamError::Io(_)), "{e}");
    }
    return_path
        .set_read_timeout(Some(DEADLINE))
        .expect("socket read timeout");
    let outcome = wait_for_shut(&mut return_path);
    assert!(
        matches!(
            outcome,
            Err(StreamError::ReturnPathClosed { .. } | StreamError::DestinationFailed { .. })
        ),
        "{outcome:?}"
    );
    let status = incoming.wait_exit().expect("QEMU did not exit");
    assert!(!status.success());
    assert!(incoming.stderr().contains(stderr_says), "{}", incoming.stderr());
}

#[test]
fn test_qemu_refuses_another_machine_type() {
    refused("pc-q35-7.2", RAM_MIB, "Machine type received is 'pc-q35-7.2'");
}

#[test]
fn test_qemu_refuses_another_ram_size() {
    refused(PC_I440FX_7_2, 2 * RAM_MIB, "Size mismatch: pc.ram");
}
