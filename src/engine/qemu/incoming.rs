//! A migration from QEMU into a VM on a kvm host.
//!
//! QEMU drives: it sends the block list, then pre-copy rounds of pages, pauses its VM, sends
//! the last pages and the device sections. Pages land in the reserved guest's memory as they
//! arrive (a page sent twice is simply overwritten, so what the guest wrote during the rounds
//! lands as in any pre-copy). The vCPU state is converted QEMU layout → common format → kvm
//! when the device sections have arrived; the guest resumes; and only then does QEMU hear
//! `SHUT(0)` on the return path and end its side. Every failure before that answers
//! `SHUT(1)` (or closes the connection), the reservation is released, and QEMU resumes its own
//! copy: the VM runs on exactly one host.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;

use super::{record, Direction, QemuLegError, QemuLegReport, GUEST_RAM_BLOCK, MAX_QEMU_RAM_BYTES};
use crate::engine::host::{Host, ReleaseVm};
use crate::engine::receiver::ReserveIncoming;
use crate::format::native::qemu::QemuCpu;
use crate::format::{VcpuState, VmConfig, VmId};
use crate::qemu::digest::RamDigest;
use crate::qemu::stream::reader::{Command, PageData, Record, StreamReader};
use crate::qemu::stream::return_path::{write_pong, write_shut};
use crate::qemu::stream::sections::{classify_block, BlockKind};
use crate::qemu::stream::{RamBlock, StreamError, PAGE_SIZE};
use crate::units::PageIndex;
use crate::vm::{LoadVmState, ResumeVm, Vm};
use crate::vmm::{Guest, MemoryCommit};

/// `CPU_INTERRUPT_HARD` of QEMU's `cpu_common.interrupt_request`: an external interrupt
/// line is raised.
const CPU_INTERRUPT_HARD: u32 = 0x2;

/// How a migration from QEMU is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromQemuOptions {
    /// The id the VM gets here; `None` names it `qemu-<milliseconds since the epoch>`.
    pub vm: Option<String>,
    /// The longest silence of the stream before it is given up.
    pub read_timeout: Duration,
    /// Fault injection: flips bit 0 of the first byte of this guest page in every copy of it
    /// the stream brings, as a corrupted stream would; the RAM digest and the guest's own
    /// check must catch it.
    pub flip_page: Option<u64>,
}

impl Default for FromQemuOptions {
    fn default() -> Self {
        Self {
            vm: None,
            read_timeout: Duration::from_secs(60),
            flip_page: None,
        }
    }
}

type Reader = StreamReader<std::io::BufReader<TcpStream>>;

/// The return path to QEMU, once QEMU opened it; answers nothing before.
struct ReturnPath(Option<TcpStream>);

impl ReturnPath {
    fn pong(&mut self, value: u32) -> Result<(), StreamError> {
        match &mut self.0 {
            Some(s) => write_pong(s, value),
            None => Ok(()),
        }
    }

    fn shut(&mut self, failed: bool) {
        if let Some(s) = &mut self.0 {
            // QEMU may be gone already; it then learns nothing, and there is no one to tell.
            let _ = write_shut(s, failed).and_then(|_| s.flush().map_err(StreamError::from));
        }
    }
}

/// What the stream said before its first page.
struct Opening {
    reader: Reader,
    rp: ReturnPath,
    machine: String,
    blocks: Vec<RamBlock>,
    ram: usize,
}

/// What the pages and devices brought.
struct Landed {
    reader: Reader,
    rp: ReturnPath,
    vcpus: Vec<VcpuState>,
    digest: RamDigest,
    pages: u64,
    rounds: u32,
    last_pages_at: Instant,
}

/// Takes one migration from QEMU on `stream` into a new VM on `host` (whose backend is
/// `backend`: only kvm runs the guest).
pub(crate) async fn receive(
    host: Addr<Host>,
    backend: String,
    stream: TcpStream,
    options: FromQemuOptions,
) -> Result<QemuLegReport, QemuLegError> {
    let result = run(host, backend, stream, options).await;
    record(Direction::FromQemu, &result);
    result
}

async fn run(
    host: Addr<Host>,
    backend: String,
    stream: TcpStream,
    options: FromQemuOptions,
) -> Result<QemuLegReport, QemuLegError> {
    let started = Instant::now();
    if backend != "kvm" {
        // Dropping the connection unread fails QEMU's side, which then resumes its VM.
        return Err(QemuLegError::Refused(format!(
            "a VM from QEMU runs on the kvm backend; this host runs {backend}"
        )));
    }
    let io = |what: &'static str| {
        move |e: std::io::Error| QemuLegError::Io {
            what,
            detail: e.to_string(),
        }
    };
    stream
        .set_read_timeout(Some(options.read_timeout))
        .map_err(io("set the read timeout"))?;
    stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
    let rp = stream.try_clone().map_err(io("clone the connection"))?;
    let reader = StreamReader::new(std::io::BufReader::with_capacity(1 << 20, stream));
    let opening = crate::offload::run("qemu-in-open", move || open(reader, ReturnPath(Some(rp))))
        .await
        .map_err(|e| QemuLegError::Refused(e.to_string()))?;
    let Opening {
        reader,
        mut rp,
        machine,
        blocks,
        ram,
    } = match opening {
        Ok(o) => o,
        Err((e, mut rp)) => {
            rp.shut(true);
            return Err(e);
        }
    };
    let id = options.vm.clone().unwrap_or_else(default_name);
    let ram_bytes = blocks[ram].length;
    let config = VmConfig {
        id: VmId(id.clone()),
        name: id.clone(),
        vcpus: 1,
        memory_bytes: ram_bytes,
        page_size: PAGE_SIZE as u32,
        nics: Vec::new(),
    };
    let reserve = ReserveIncoming {
        config,
        commit: MemoryCommit::Background,
        decorate: None,
    };
    let (vm, guest) = match host.send(reserve).await {
        Ok(Ok(pair)) => pair,
        other => {
            rp.shut(true);
            let detail = match other {
                Ok(Err(reason)) => reason.to_string(),
                Err(e) => e.to_string(),
                Ok(Ok(_)) => String::new(),
            };
            return Err(QemuLegError::Refused(format!("reserving {id}: {detail}")));
        }
    };
    let g = Arc::clone(&guest);
    let flip = options.flip_page;
    let landed = crate::offload::run("qemu-in-pages", move || land(reader, rp, ram, g.as_ref(), flip)).await;
    let landed = match landed {
        Ok(Ok(l)) => l,
        Ok(Err((e, mut rp))) => {
            host.do_send(ReleaseVm(id));
            rp.shut(true);
            return Err(e);
        }
        Err(e) => {
            host.do_send(ReleaseVm(id));
            return Err(QemuLegError::Refused(e.to_string()));
        }
    };
    let Landed {
        reader,
        mut rp,
        vcpus,
        digest,
        pages,
        rounds,
        last_pages_at,
    } = landed;
    if let Err(e) = activate(&vm, vcpus).await {
        host.do_send(ReleaseVm(id));
        rp.shut(true);
        return Err(e);
    }
    let downtime = last_pages_at.elapsed();
    rp.shut(false);
    Ok(QemuLegReport {
        direction: Direction::FromQemu,
        vm: id,
        machine,
        ram_bytes,
        stream_bytes: reader.bytes_read(),
        pages,
        rounds,
        downtime,
        total: started.elapsed(),
        stop_reason: None,
        ram_digest: Some(digest.combined()),
        landed: Some(digest),
    })
}

fn default_name() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("qemu-{ms}")
}

/// Reads the header, the commands before the RAM and the block list; checks that the machine
/// can be carried.
fn open(mut reader: Reader, mut rp: ReturnPath) -> Result<Opening, (QemuLegError, ReturnPath)> {
    let fail = |e: QemuLegError, rp| Err((e, rp));
    let header = match reader.read_header() {
        Ok(h) => h,
        Err(e) => return fail(e.into(), rp),
    };
    loop {
        let record = match reader.next_record() {
            Ok(r) => r,
            Err(e) => return fail(e.into(), rp),
        };
        match record {
            Record::Command(Command::OpenReturnPath) => {}
            Record::Command(Command::Ping(v)) => {
                if let Err(e) = rp.pong(v) {
                    return fail(e.into(), rp);
                }
            }
            Record::RamBlocks(blocks) => {
                let ram = match guest_ram(&blocks) {
                    Ok(i) => i,
                    Err(e) => return fail(e, rp),
                };
                return Ok(Opening {
                    reader,
                    rp,
                    machine: header.machine,
                    blocks,
                    ram,
                });
            }
            other => {
                let what = record_name(&other);
                return fail(
                    StreamError::Malformed {
                        at: reader.bytes_read(),
                        what: format!("{what} before the RAM block list"),
                    }
                    .into(),
                    rp,
                );
            }
        }
    }
}

/// The index of the guest RAM block; every other block must be firmware.
fn guest_ram(blocks: &[RamBlock]) -> Result<usize, QemuLegError> {
    let mut ram = None;
    for (i, b) in blocks.iter().enumerate() {
        if classify_block(&b.name)? == BlockKind::GuestRam {
            ram = Some(i);
        }
    }
    let i = ram.ok_or_else(|| StreamError::MissingSection {
        name: format!("RAM block {GUEST_RAM_BLOCK}"),
    })?;
    let len = blocks[i].length;
    if len > MAX_QEMU_RAM_BYTES || len % PAGE_SIZE as u64 != 0 || len == 0 {
        return Err(QemuLegError::Refused(format!(
            "{GUEST_RAM_BLOCK} of {len} bytes: a VM from QEMU must have whole pages of RAM, at most {MAX_QEMU_RAM_BYTES} bytes (the pc machine's RAM below its PCI hole)"
        )));
    }
    Ok(i)
}

fn record_name(r: &Record<'_>) -> &'static str {
    match r {
        Record::Command(_) => "a command",
        Record::RamBlocks(_) => "a second block list",
        Record::Page { .. } => "a page",
        Record::RoundEnd => "the end of a round",
        Record::LastPagesEnd => "the end of the last pages",
        Record::Devices(_) => "the device sections",
    }
}

/// Lands the pages in `guest` until the device sections, and converts the vCPUs.
fn land(
    mut reader: Reader,
    mut rp: ReturnPath,
    ram: usize,
    guest: &dyn Guest,
    flip: Option<u64>,
) -> Result<Landed, (QemuLegError, ReturnPath)> {
    let memory = guest.memory();
    let mut digest = RamDigest::zeroed(memory.page_count());
    let mut pages = 0u64;
    let mut rounds = 0u32;
    let mut last_pages_at = None;
    let mut fill = [0u8; PAGE_SIZE];
    let mut flipped = [0u8; PAGE_SIZE];
    loop {
        let record = match reader.next_record() {
            Ok(r) => r,
            Err(e) => return Err((e.into(), rp)),
        };
        let landed = match record {
            Record::Page { block, offset, data } if block == ram => {
                pages += 1;
                let index = PageIndex(offset / PAGE_SIZE as u64);
                let data = match data {
                    _ if flip == Some(index.0) => {
                        match data {
                            PageData::Fill(b) => flipped.fill(b),
                            PageData::Bytes(bytes) => flipped.copy_from_slice(bytes),
                        }
                        flipped[0] ^= 1;
                        PageData::Bytes(&flipped[..])
                    }
                    other => other,
                };
                match data {
                    PageData::Fill(0) => {
                        digest.set_fill(index.0, 0);
                        memory.zero_page(index)
                    }
                    PageData::Fill(b) => {
                        fill.fill(b);
                        digest.set(index.0, &fill);
                        memory.write_page(index, &fill)
                    }
                    PageData::Bytes(bytes) => {
                        digest.set(index.0, bytes);
                        memory.write_page(index, bytes)
                    }
                }
                .map_err(|e| QemuLegError::Refused(format!("page at {offset:#x} of {GUEST_RAM_BLOCK}: {e}")))
            }
            // Firmware: the receiving side has its own (see the module doc of `engine::qemu`).
            Record::Page { .. } => Ok(()),
            Record::Command(Command::Ping(v)) => rp.pong(v).map_err(QemuLegError::from),
            Record::Command(Command::OpenReturnPath) => Ok(()),
            Record::RoundEnd => {
                rounds += 1;
                Ok(())
            }
            Record::LastPagesEnd => {
                last_pages_at = Some(Instant::now());
                Ok(())
            }
            Record::RamBlocks(_) => Err(StreamError::Malformed {
                at: reader.bytes_read(),
                what: "a second RAM block list".into(),
            }
            .into()),
            Record::Devices(devices) => {
                let vcpus = crate::qemu::stream::read_cpu::cpus_from_sections(&devices)
                    .map_err(QemuLegError::from)
                    .and_then(|cpus| to_common(&cpus));
                return match vcpus {
                    Ok(vcpus) => Ok(Landed {
                        reader,
                        rp,
                        vcpus,
                        digest,
                        pages,
                        rounds,
                        last_pages_at: last_pages_at.unwrap_or_else(Instant::now),
                    }),
                    Err(e) => Err((e, rp)),
                };
            }
        };
        if let Err(e) = landed {
            return Err((e, rp));
        }
    }
}

/// QEMU's vCPUs in the common format; the kvm backend runs one.
fn to_common(cpus: &[QemuCpu]) -> Result<Vec<VcpuState>, QemuLegError> {
    if cpus.len() != 1 {
        return Err(QemuLegError::Refused(format!(
            "the kvm backend runs 1-vCPU guests; QEMU sent {} vCPUs",
            cpus.len()
        )));
    }
    let mut out = Vec::with_capacity(cpus.len());
    for (i, c) in cpus.iter().enumerate() {
        let mut c = c.clone();
        // A vCPU from TCG holds TR as available; ours must be busy (KVM on VMX needs it).
        c.tr_from_tcg();
        // The HARD bit mirrors the interrupt line of QEMU's PIC or APIC, platform state that
        // does not travel (the receiving side's PIC starts from reset); every other request
        // (NMI, SMI, INIT, SIPI) is vCPU state and is refused by the conversion.
        c.interrupt_request &= !CPU_INTERRUPT_HARD;
        out.push(c.to_common(i as u32)?);
    }
    Ok(out)
}

/// Loads the vCPU state and runs the VM.
async fn activate(vm: &Addr<Vm>, vcpus: Vec<VcpuState>) -> Result<(), QemuLegError> {
    let failed = |what: &str, e: String| QemuLegError::Refused(format!("{what}: {e}"));
    vm.send(LoadVmState {
        vcpus,
        devices: Vec::new(),
    })
    .await
    .map_err(|e| failed("loading the vCPU state", e.to_string()))?
    .map_err(|e| failed("loading the vCPU state", e.to_string()))?;
    vm.send(ResumeVm)
        .await
        .map_err(|e| failed("resuming the VM", e.to_string()))?
        .map_err(|e| failed("resuming the VM", e.to_string()))?;
    Ok(())
}
