//! A VM's round trip through QEMU: kvm backend → QEMU (TCG or KVM) → kvm backend, with the
//! self-checking guest running all along. `migratory demo --backend kvm --through qemu-tcg`
//! runs one; the interop tests run them with faults.
//!
//! What is checked, and how:
//! * each leg's own verdict (QEMU's `SHUT` on the return path one way, our activation the
//!   other);
//! * the guest, from inside: it keeps a ledger of what it wrote and verifies every page in
//!   passes, on whichever hypervisor it runs; a page lost or changed anywhere is an
//!   `integrity_error` (reported on QEMU's debugcon while there, counted in its memory);
//! * the RAM that came back, from outside: the digest of every page as it landed here against
//!   the digest of the paused QEMU source's memory (`pmemsave`), naming the pages that differ.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use super::interop::{self, InteropError};
use super::process::{Accel, Qemu, QemuConfig};
use crate::engine::qemu::{FromQemuOptions, QemuLegError, QemuLegReport, ToQemuOptions, DEFAULT_MACHINE};
use crate::engine::{EngineError, EngineHandle};

/// How a round trip runs.
#[derive(Debug, Clone)]
pub struct RoundTripOptions {
    /// The `qemu-system-x86_64` to run.
    pub binary: PathBuf,
    /// QEMU's accelerator.
    pub accel: Accel,
    /// Verify passes the guest must report on QEMU before it comes back.
    pub passes_on_qemu: usize,
    /// Verify passes the guest must complete back here before the trip ends.
    pub passes_after: u64,
    /// QEMU's `max-bandwidth` for the way back, bytes/s.
    pub max_bandwidth: u64,
    /// How long any one wait may take.
    pub timeout: Duration,
    /// Fault injection on the way there ([`ToQemuOptions::flip_page`]).
    pub flip_page_there: Option<u64>,
    /// Fault injection on the way back ([`FromQemuOptions::flip_page`]).
    pub flip_page_back: Option<u64>,
}

impl RoundTripOptions {
    /// Two verify passes on QEMU, one back here, no bandwidth cap worth the name.
    pub fn new(binary: PathBuf, accel: Accel) -> Self {
        Self {
            binary,
            accel,
            passes_on_qemu: 2,
            passes_after: 1,
            max_bandwidth: 10_000_000_000,
            timeout: Duration::from_secs(120),
            flip_page_there: None,
            flip_page_back: None,
        }
    }

    /// `qemu-tcg` or `qemu-kvm`.
    pub fn through(&self) -> String {
        format!("qemu-{}", self.accel.name())
    }
}

/// One leg of the trip.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Leg {
    /// `kvm` or `qemu-tcg`/`qemu-kvm`.
    pub from: String,
    /// The other end.
    pub to: String,
    /// `completed` or `failed`.
    pub result: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Downtime as this engine sees it, ms (see [`QemuLegReport::downtime`]).
    pub downtime_ms: f64,
    /// QEMU's own `downtime` figure when QEMU was the source, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
    /// Total time, ms.
    pub total_ms: f64,
    /// Stream bytes.
    pub bytes: u64,
    /// Pre-copy rounds (QEMU as the source: sections before the last).
    pub rounds: u32,
}

/// What the guest did on one host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostProgress {
    /// `kvm`, `qemu-tcg`, ...
    pub host: String,
    /// Pages the guest wrote while there.
    pub pages_written: u64,
    /// Verify passes it completed there.
    pub verify_passes: u64,
    /// How long it ran there, as far as this trip saw (not for the first host, where it ran
    /// before the trip began).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Its write rate there, MB/s (pages written × 4096 over `seconds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_rate_mb_per_s: Option<f64>,
}

impl HostProgress {
    fn timed(host: String, pages_written: u64, verify_passes: u64, span: Duration) -> Self {
        let seconds = span.as_secs_f64();
        Self {
            host,
            pages_written,
            verify_passes,
            seconds: Some(seconds),
            write_rate_mb_per_s: (seconds > 0.0).then(|| pages_written as f64 * 4096.0 / seconds / 1e6),
        }
    }
}

/// The outcome of a round trip.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundTrip {
    /// `qemu-tcg` or `qemu-kvm`.
    pub through: String,
    /// The legs that ran, in order.
    pub legs: Vec<Leg>,
    /// Pages and ledgers the guest found not as it wrote them, over the whole trip (its own
    /// count, kept in its memory). Must be 0.
    pub integrity_errors: u64,
    /// The guest's progress on each host, in order.
    pub progress: Vec<HostProgress>,
    /// Pages that came back differing from the paused QEMU source's (at most 16 listed).
    pub ram_mismatched_pages: Vec<u64>,
    /// Every leg completed, the RAM matched and the guest found nothing wrong.
    pub intact: bool,
    /// Where the VM runs at the end: `kvm` or the QEMU.
    pub vm_on: String,
}

/// Why a round trip could not run (a leg that fails is a result, not this).
#[derive(Debug, Error)]
pub enum RoundTripError {
    /// The engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Driving QEMU.
    #[error(transparent)]
    Interop(#[from] InteropError),
    /// A blocking step's thread.
    #[error("{0}")]
    Thread(String),
    /// A step that cannot go on.
    #[error("{0}")]
    Setup(String),
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, RoundTripError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RoundTripError::Thread(e.to_string()))
}

fn leg_of(from: &str, to: &str, r: &Result<QemuLegReport, QemuLegError>) -> Leg {
    match r {
        Ok(r) => Leg {
            from: from.into(),
            to: to.into(),
            result: "completed".into(),
            error: None,
            downtime_ms: r.downtime.as_secs_f64() * 1e3,
            qemu_downtime_ms: None,
            total_ms: r.total.as_secs_f64() * 1e3,
            bytes: r.stream_bytes,
            rounds: r.rounds,
        },
        Err(e) => Leg {
            from: from.into(),
            to: to.into(),
            result: "failed".into(),
            error: Some(e.to_string()),
            downtime_ms: 0.0,
            qemu_downtime_ms: None,
            total_ms: 0.0,
            bytes: 0,
            rounds: 0,
        },
    }
}

/// Moves VM `vm` of kvm host `host` to a fresh QEMU and back, and checks it arrived intact.
pub async fn round_trip(
    engine: &EngineHandle,
    host: &str,
    vm: &str,
    opts: &RoundTripOptions,
) -> Result<RoundTrip, RoundTripError> {
    let through = opts.through();
    let before = engine.vm_info(host, vm).await?;
    let ram = before.config.memory_bytes;
    if ram % (1 << 20) != 0 {
        return Err(RoundTripError::Setup(format!(
            "{ram} bytes of RAM: QEMU's -m takes whole MiB"
        )));
    }
    let config = QemuConfig {
        binary: opts.binary.clone(),
        accel: opts.accel,
        memory_mib: ram >> 20,
        incoming: true,
        machine: DEFAULT_MACHINE.to_string(),
        extra_args: Vec::new(),
    };
    let (qemu, addr) = blocking(move || interop::start_receiving(&config)).await??;
    let mut out = RoundTrip {
        through: through.clone(),
        legs: Vec::new(),
        integrity_errors: 0,
        progress: Vec::new(),
        ram_mismatched_pages: Vec::new(),
        intact: false,
        vm_on: "kvm".into(),
    };
    // Leg 1: here → QEMU, once the guest has checked itself here.
    let at_leg1 = wait_for_passes(engine, host, vm, 1, opts.timeout).await?;
    let mut there = ToQemuOptions::new(addr);
    there.flip_page = opts.flip_page_there;
    there.accel = opts.accel;
    let leg1 = engine.migrate_to_qemu(host, vm, there).await;
    let mut leg = leg_of("kvm", &through, &leg1);
    if let Some(e) = &mut leg.error {
        // QEMU says why it refused the stream on its stderr.
        e.push_str(&format!("; QEMU's stderr: {}", qemu.stderr_tail()));
    }
    out.legs.push(leg);
    out.progress.push(HostProgress {
        host: "kvm".into(),
        pages_written: at_leg1.stats.writes,
        verify_passes: at_leg1.stats.verify_passes,
        seconds: None,
        write_rate_mb_per_s: None,
    });
    let on_qemu_since = Instant::now();
    if leg1.is_err() {
        out.integrity_errors = engine
            .vm_info(host, vm)
            .await
            .map(|v| v.stats.integrity_errors)
            .unwrap_or(0);
        return Ok(out);
    }
    out.vm_on = through.clone();
    // On QEMU: it runs the guest, which reports its verify passes on debugcon.
    let (passes, timeout) = (opts.passes_on_qemu, opts.timeout);
    let (qemu, reports) = blocking(move || {
        let mut qemu = qemu;
        let r = interop::wait_for_state(&mut qemu, "running", timeout)
            .and_then(|_| interop::wait_for_reports(&qemu, 0, passes, timeout));
        (qemu, r)
    })
    .await?;
    let reports = reports?;
    // Leg 2: QEMU → here.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| RoundTripError::Setup(format!("listen: {e}")))?;
    let back_addr = listener
        .local_addr()
        .map_err(|e| RoundTripError::Setup(format!("listen: {e}")))?;
    let max_bandwidth = opts.max_bandwidth;
    let accept = blocking(move || listener.accept().map(|(s, _)| s));
    let qemu = blocking(move || {
        let mut qemu = qemu;
        let r = interop::send_to(&mut qemu, back_addr, max_bandwidth);
        (qemu, r)
    })
    .await?;
    let (mut qemu, sent): (Qemu, Result<(), InteropError>) = qemu;
    sent?;
    let stream = tokio::time::timeout(opts.timeout, accept)
        .await
        .map_err(|_| RoundTripError::Setup("QEMU did not connect to migrate back".into()))??
        .map_err(|e| RoundTripError::Setup(format!("accepting QEMU's connection: {e}")))?;
    let back = FromQemuOptions {
        vm: Some(vm.to_string()),
        flip_page: opts.flip_page_back,
        ..FromQemuOptions::default()
    };
    let arrived_at = Instant::now();
    let leg2 = engine.receive_from_qemu(host, stream, back).await;
    // QEMU ran the guest until its pause, just before this: close enough for a rate.
    let back_at = Instant::now();
    let mut leg = leg_of(&through, "kvm", &leg2);
    let (mut qemu, ended) = blocking(move || {
        let r = interop::wait_for_end(&mut qemu, timeout);
        (qemu, r)
    })
    .await?;
    if let Ok(info) = &ended {
        leg.qemu_downtime_ms = info.downtime;
    }
    out.legs.push(leg);
    let last = reports.last().cloned();
    let on_qemu = interop::guest_reports(&qemu);
    let qemu_last = on_qemu.last().or(last.as_ref());
    let qemu_pages = qemu_last.map_or(0, |r| r.progress.saturating_sub(at_leg1.stats.writes));
    let arrived = match leg2 {
        Ok(r) => r,
        Err(_) => {
            // QEMU heard the failure and runs the VM again.
            out.progress.push(HostProgress::timed(
                through.clone(),
                qemu_pages,
                on_qemu.len() as u64,
                on_qemu_since.elapsed(),
            ));
            out.vm_on = through;
            return Ok(out);
        }
    };
    out.vm_on = "kvm".into();
    // From outside: the paused QEMU source's RAM against what landed here.
    let source = blocking(move || {
        let r = interop::ram_digest(&mut qemu, ram);
        (qemu, r)
    })
    .await?;
    let (_qemu, source) = source;
    let source = source?;
    if let Some(landed) = &arrived.landed {
        out.ram_mismatched_pages = landed.differing(&source, 16);
    }
    // From inside: the guest keeps checking back here.
    let at_return = engine.vm_info(host, vm).await?;
    // The guest's counter as it came back is where it stopped on QEMU.
    out.progress.push(HostProgress::timed(
        through.clone(),
        at_return
            .stats
            .writes
            .saturating_sub(at_leg1.stats.writes)
            .max(qemu_pages),
        on_qemu.len() as u64,
        back_at.saturating_duration_since(on_qemu_since),
    ));
    let wanted = at_return.stats.verify_passes + opts.passes_after;
    let now = wait_for_passes(
        engine,
        host,
        vm,
        wanted,
        opts.timeout.saturating_sub(arrived_at.elapsed()),
    )
    .await?;
    out.progress.push(HostProgress::timed(
        "kvm".into(),
        now.stats.writes.saturating_sub(at_return.stats.writes),
        now.stats.verify_passes - at_return.stats.verify_passes,
        back_at.elapsed(),
    ));
    out.integrity_errors = now.stats.integrity_errors;
    out.intact = out.legs.iter().all(|l| l.result == "completed")
        && out.ram_mismatched_pages.is_empty()
        && out.integrity_errors == 0;
    Ok(out)
}

/// Waits until the guest of `vm` has completed `passes` verify passes in all, and returns the
/// VM's view then.
async fn wait_for_passes(
    engine: &EngineHandle,
    host: &str,
    vm: &str,
    passes: u64,
    timeout: Duration,
) -> Result<crate::vm::VmInfo, RoundTripError> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = engine.vm_info(host, vm).await?;
        if v.stats.verify_passes >= passes {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(RoundTripError::Setup(format!(
                "the guest of {vm} completed {} verify passes on kvm in {timeout:?}, not {passes}",
                v.stats.verify_passes
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
