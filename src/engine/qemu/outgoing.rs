//! A migration of a VM to a QEMU started with `-incoming tcp:HOST:PORT`.
//!
//! The VM is taken like any outgoing one (`BeginOutgoing`: no second migration of it starts).
//! Round 0 sends every page; later rounds send what the dirty log caught, until the engine's
//! own plan (pre-copy's settle rule, or stop-and-copy at once) says to stop. Then the VM
//! pauses, the last pages, the vCPU in QEMU's layout, the end of the stream. QEMU answers on
//! the return path:
//! * `SHUT(0)`: QEMU loaded the stream and started the VM; this copy is destroyed.
//! * `SHUT(1)`, or any failure before the stream was complete: QEMU cannot run the VM (it never
//!   had the vCPU state); this copy resumes.
//! * nothing (the connection closed or went silent after a complete stream): QEMU may run the
//!   VM, so this copy is held paused as `committed-unconfirmed`, never resumed behind the
//!   operator's back ([`QemuLegError::Unconfirmed`]): `vm resume --peer-is-dead` once QEMU is
//!   known not to run it, `vm discard` once it does. (QEMU 7.2 answers a failed load by exiting,
//!   without `SHUT(1)`, so a closed return path says nothing either way.)

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;

use super::{record, Direction, QemuLegError, QemuLegReport, DEFAULT_MACHINE, GUEST_RAM_BLOCK, MAX_QEMU_RAM_BYTES};
use crate::dirty::PageSet;
use crate::engine::host::{GetVm, HoldVm, Host, ReleaseVm};
use crate::engine::plan::{for_algorithm, Next, RoundObservation, Verdict};
use crate::engine::{EngineError, PolicyConfig};
use crate::format::native::qemu::QemuCpu;
use crate::protocol::Algorithm;
use crate::qemu::process::Accel;
use crate::qemu::stream::return_path::{read_return_message, ReturnMessage};
use crate::qemu::stream::writer::StreamWriter;
use crate::qemu::stream::{RamBlock, StreamError, PAGE_SIZE};
use crate::units::PageIndex;
use crate::vm::{BeginOutgoing, EndOutgoing, GetGuest, HeldCopy, HeldReason, PauseVm, ResumeVm, Vm};
use crate::vmm::Guest;

/// The algorithms a QEMU target can take from this engine: QEMU's post-copy needs its own
/// page-request protocol on the return path, which this engine does not speak.
pub const QEMU_POOL: [Algorithm; 2] = [Algorithm::StopAndCopy, Algorithm::Precopy];

/// What a switchover to QEMU costs besides the last pages, for the plan's stopping rule:
/// QEMU loading the device sections and starting the vCPU, measured at 5–30 ms here.
const FIXED_SWITCHOVER: Duration = Duration::from_millis(20);

/// How a migration to QEMU runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ToQemuOptions {
    /// Where the QEMU listens (`-incoming tcp:HOST:PORT`).
    pub addr: SocketAddr,
    /// The machine type written in the stream; the QEMU must run the same one.
    pub machine: String,
    /// `precopy` or `stop-and-copy` ([`QEMU_POOL`]).
    pub algorithm: Algorithm,
    /// The stopping rule's limits (downtime, rounds, traffic).
    pub policy: PolicyConfig,
    /// The QEMU's accelerator: TCG keeps TR in a form of its own
    /// ([`QemuCpu::tr_for_tcg`]).
    pub accel: Accel,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long QEMU may take to confirm after the complete stream.
    pub confirm_timeout: Duration,
    /// Fault injection: flips bit 0 of the first byte of this guest page in every copy of it
    /// the stream carries, as a corrupted stream would; the guest's own check on QEMU must
    /// catch it.
    pub flip_page: Option<u64>,
}

impl ToQemuOptions {
    /// Pre-copy to `addr` with the default machine type and limits.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            machine: DEFAULT_MACHINE.to_string(),
            algorithm: Algorithm::Precopy,
            policy: PolicyConfig::default(),
            accel: Accel::Kvm,
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            flip_page: None,
        }
    }
}

type Writer = StreamWriter<TcpStream>;

/// The stream while it is being written.
struct Sending {
    writer: Writer,
    rp: TcpStream,
    dirty: PageSet,
    pages: u64,
    rounds: u32,
    stop_reason: Option<String>,
}

/// Moves `vm` of `host` to the QEMU of `options`.
pub(crate) async fn send(host: Addr<Host>, vm: String, options: ToQemuOptions) -> Result<QemuLegReport, QemuLegError> {
    let result = run(host, vm, options).await;
    record(Direction::ToQemu, &result);
    result
}

async fn run(host: Addr<Host>, id: String, options: ToQemuOptions) -> Result<QemuLegReport, QemuLegError> {
    let started = Instant::now();
    if !QEMU_POOL.contains(&options.algorithm) {
        return Err(QemuLegError::Refused(format!(
            "a QEMU target takes stop-and-copy or precopy, not {}",
            options.algorithm.name()
        )));
    }
    let vm = host
        .send(GetVm(id.clone()))
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| QemuLegError::Refused(format!("no VM {id:?} on this host")))?;
    vm.send(BeginOutgoing)
        .await
        .map_err(EngineError::from)?
        .map_err(|e| QemuLegError::Refused(format!("{id} cannot be migrated now: {e}")))?;
    let guest = match vm.send(GetGuest).await {
        Ok(g) => g,
        Err(e) => {
            give_back(&vm, false).await;
            return Err(EngineError::from(e).into());
        }
    };
    let ram_bytes = guest.memory().len() as u64;
    let g = Arc::clone(&guest);
    let opts = options.clone();
    let rounds = crate::offload::run("qemu-out-rounds", move || precopy(g.as_ref(), &opts)).await;
    let sending = match flatten(rounds) {
        Ok(s) => s,
        Err(e) => {
            let _ = guest.stop_dirty_log();
            give_back(&vm, false).await;
            return Err(e);
        }
    };
    let paused = vm.send(PauseVm).await;
    if !matches!(paused, Ok(Ok(_))) {
        let _ = guest.stop_dirty_log();
        give_back(&vm, false).await;
        return Err(QemuLegError::Refused(format!("pausing {id} failed: {paused:?}")));
    }
    let paused_at = Instant::now();
    let g = Arc::clone(&guest);
    let (confirm, flip, accel) = (options.confirm_timeout, options.flip_page, options.accel);
    let finished = crate::offload::run("qemu-out-switchover", move || {
        switchover(sending, g.as_ref(), confirm, flip, accel)
    })
    .await;
    let _ = guest.stop_dirty_log();
    match flatten(finished) {
        Ok(done) => {
            let downtime = paused_at.elapsed();
            // QEMU runs the VM: this copy goes.
            let _ = vm.send(EndOutgoing { moved: true }).await;
            host.do_send(ReleaseVm(id.clone()));
            Ok(QemuLegReport {
                direction: Direction::ToQemu,
                vm: id,
                machine: options.machine,
                ram_bytes,
                stream_bytes: done.stream_bytes,
                pages: done.pages,
                rounds: done.rounds,
                downtime,
                total: started.elapsed(),
                stop_reason: done.stop_reason,
                ram_digest: None,
                landed: None,
            })
        }
        Err(e @ QemuLegError::Unconfirmed { .. }) => {
            // Paused, and held so: QEMU may be running it. The operator resumes it
            // (`vm resume --peer-is-dead`) once QEMU is known not to, or discards it.
            host.do_send(HoldVm {
                vm: id,
                copy: HeldCopy {
                    reason: HeldReason::CommittedUnconfirmed,
                    detail: e.to_string(),
                    peer: None,
                },
            });
            Err(e)
        }
        Err(e) => {
            give_back(&vm, true).await;
            Err(e)
        }
    }
}

fn flatten<T>(r: Result<Result<T, QemuLegError>, crate::offload::OffloadError>) -> Result<T, QemuLegError> {
    r.map_err(|e| QemuLegError::Refused(e.to_string()))?
}

/// The migration failed where QEMU cannot run the VM: it runs on here.
async fn give_back(vm: &Addr<Vm>, paused: bool) {
    if paused {
        if let Ok(Err(e)) = vm.send(ResumeVm).await {
            tracing::error!(error = %e, "resuming a VM after a failed migration to QEMU");
        }
    }
    let _ = vm.send(EndOutgoing { moved: false }).await;
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> QemuLegError {
    move |e| QemuLegError::Io {
        what,
        detail: e.to_string(),
    }
}

/// Connects, writes the opening and the rounds the plan asks for; the VM still runs.
fn precopy(guest: &dyn Guest, options: &ToQemuOptions) -> Result<Sending, QemuLegError> {
    let memory = guest.memory();
    let ram_bytes = memory.len() as u64;
    if ram_bytes > MAX_QEMU_RAM_BYTES {
        return Err(QemuLegError::Refused(format!(
            "{ram_bytes} bytes of RAM: QEMU's pc machine maps at most {MAX_QEMU_RAM_BYTES} bytes from address 0"
        )));
    }
    let stream = TcpStream::connect_timeout(&options.addr, options.connect_timeout).map_err(io("connect to QEMU"))?;
    stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
    let rp = stream.try_clone().map_err(io("clone the connection"))?;
    let mut writer = StreamWriter::new(stream);
    writer.header(&options.machine)?;
    writer.open_return_path()?;
    writer.ram_setup(&[RamBlock {
        name: GUEST_RAM_BLOCK.to_string(),
        length: ram_bytes,
    }])?;
    guest
        .start_dirty_log()
        .map_err(|e| QemuLegError::Refused(format!("dirty log: {e}")))?;
    let vm_pages = memory.page_count();
    let mut plan = for_algorithm(options.algorithm, options.policy, &QEMU_POOL, 0);
    let mut verdict = plan.start(vm_pages, None);
    let mut dirty = PageSet::full(vm_pages);
    let mut pages = 0u64;
    let mut round = 0u32;
    let mut stop_reason = None;
    let precopy_started = Instant::now();
    loop {
        stop_reason = last_reason(&verdict).or(stop_reason);
        match verdict.next {
            Next::Round { .. } => {}
            Next::Switchover(_) => break,
            Next::Abort { detail } => return Err(QemuLegError::Refused(format!("the plan gave up: {detail}"))),
        }
        let t = Instant::now();
        writer.begin_round()?;
        let sent = send_pages(&mut writer, guest, &dirty, options.flip_page)?;
        writer.end_pages()?;
        pages += sent;
        let took = t.elapsed().as_secs_f64().max(1e-6);
        guest
            .sync_dirty_log()
            .map_err(|e| QemuLegError::Refused(format!("dirty log: {e}")))?;
        dirty = guest.dirty_bitmap().drain();
        let obs = RoundObservation {
            round,
            remaining_pages: dirty.len(),
            dirty_pages_per_sec: dirty.len() as f64 / took,
            bandwidth_bytes_per_sec: (sent * PAGE_SIZE as u64) as f64 / took,
            fixed_switchover: FIXED_SWITCHOVER,
            precopy_elapsed: precopy_started.elapsed(),
            sent_pages: pages,
            vm_pages,
        };
        verdict = plan.after_round(&obs);
        round += 1;
    }
    Ok(Sending {
        writer,
        rp,
        dirty,
        pages,
        rounds: round,
        stop_reason,
    })
}

fn last_reason(v: &Verdict) -> Option<String> {
    v.decisions.last().map(|c| format!("{}: {}", c.action, c.reason))
}

fn send_pages(writer: &mut Writer, guest: &dyn Guest, set: &PageSet, flip: Option<u64>) -> Result<u64, QemuLegError> {
    let memory = guest.memory();
    let mut page = [0u8; PAGE_SIZE];
    let mut sent = 0;
    for p in set.iter() {
        memory
            .read_page(PageIndex(p), &mut page)
            .map_err(|e| QemuLegError::Refused(format!("reading page {p}: {e}")))?;
        if flip == Some(p) {
            page[0] ^= 1;
        }
        writer.page(0, p * PAGE_SIZE as u64, &page)?;
        sent += 1;
    }
    Ok(sent)
}

/// What a complete, confirmed stream did.
struct Done {
    stream_bytes: u64,
    pages: u64,
    rounds: u32,
    stop_reason: Option<String>,
}

/// With the VM paused: the last pages, the vCPUs, the end; then QEMU's answer.
fn switchover(
    mut s: Sending,
    guest: &dyn Guest,
    confirm: Duration,
    flip: Option<u64>,
    accel: Accel,
) -> Result<Done, QemuLegError> {
    guest
        .sync_dirty_log()
        .map_err(|e| QemuLegError::Refused(format!("dirty log: {e}")))?;
    s.dirty.union_with(&guest.dirty_bitmap().drain());
    s.writer.begin_last_pages()?;
    s.pages += send_pages(&mut s.writer, guest, &s.dirty, flip)?;
    s.writer.end_pages()?;
    let vcpus = guest
        .save_vcpus()
        .map_err(|e| QemuLegError::Refused(format!("saving the vCPUs: {e}")))?;
    for (i, v) in vcpus.iter().enumerate() {
        let mut cpu = QemuCpu::from_common(v)?;
        if accel == Accel::Tcg {
            cpu.tr_for_tcg();
        }
        s.writer.cpu(i as u32, &cpu)?;
    }
    s.writer.finish()?;
    // From here QEMU has everything it needs to run the VM.
    let waited = Instant::now();
    s.rp.set_read_timeout(Some(confirm))
        .map_err(io("set the read timeout"))?;
    loop {
        match read_return_message(&mut s.rp) {
            Ok(ReturnMessage::Shut { failed: false }) => break,
            Ok(ReturnMessage::Shut { failed: true }) => return Err(QemuLegError::QemuFailed),
            Ok(_) if waited.elapsed() < confirm => continue,
            Ok(_) | Err(StreamError::Io(_)) | Err(_) => {
                return Err(QemuLegError::Unconfirmed {
                    waited: waited.elapsed(),
                })
            }
        }
    }
    Ok(Done {
        stream_bytes: s.writer.bytes_written(),
        pages: s.pages,
        rounds: s.rounds,
        stop_reason: s.stop_reason,
    })
}
