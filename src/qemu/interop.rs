//! Driving a QEMU that trades VMs with this engine, over QMP: a QEMU waiting for a migration
//! from us, a QEMU told to migrate to us, and the checks around them (the guest's reports on
//! debugcon, the RAM digest of a paused source).
//!
//! The QEMU side of the two directions, as a user would type it:
//!
//! ```text
//! # migratory -> QEMU: QEMU waits with the same machine type and RAM size
//! qemu-system-x86_64 -machine pc-i440fx-7.2,accel=kvm -cpu qemu64 -m 256 -nodefaults -nographic \
//!     -chardev file,id=dc,path=debugcon.log -device isa-debugcon,iobase=0xe9,chardev=dc \
//!     -incoming tcp:127.0.0.1:4444
//! migratory migrate VM --to-qemu 127.0.0.1:4444
//! # QEMU -> migratory (`migratory serve --backend kvm --qemu-incoming 127.0.0.1:5555`), in QMP:
//! { "execute": "migrate-set-capabilities",
//!   "arguments": { "capabilities": [ { "capability": "return-path", "state": true } ] } }
//! { "execute": "migrate", "arguments": { "uri": "tcp:127.0.0.1:5555" } }
//! ```

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use thiserror::Error;

use super::digest::{RamDigest, PAGE_BYTES};
use super::process::{ProcessError, Qemu, QemuConfig};
use super::qmp::{MigrationInfo, QmpError};
use crate::vmm::kvm::program::{parse_debugcon_line, DebugconReport};

/// How often QMP is polled while waiting; the figures come from QEMU, so this sets only how
/// soon an end is seen.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// How much guest memory one `pmemsave` writes to the scratch file at a time.
const PMEMSAVE_CHUNK: u64 = 64 << 20;

/// Why driving a QEMU peer failed.
#[derive(Debug, Error)]
pub enum InteropError {
    /// Starting or talking to the process.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A QMP exchange.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The QEMU waiting for a migration names no TCP port.
    #[error("the incoming QEMU names no TCP port: {info:?}")]
    NoIncomingPort {
        /// Its `query-migrate`.
        info: Box<MigrationInfo>,
    },
    /// QEMU's migration ended otherwise than completed.
    #[error("QEMU migration {status}: {error}")]
    Failed {
        /// `failed`, `cancelled`, ...
        status: String,
        /// QEMU's `error-desc`.
        error: String,
    },
    /// Something did not happen in time.
    #[error("{what} after {waited:?}")]
    Timeout {
        /// What was awaited, and the last state seen.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// Reading QEMU's memory dump.
    #[error("reading QEMU's memory dump: {0}")]
    Dump(#[source] std::io::Error),
}

/// Starts a QEMU (`config.incoming` must be set) with no kernel, waiting for a migration on an
/// ephemeral loopback port, and returns it with that address.
pub fn start_receiving(config: &QemuConfig) -> Result<(Qemu, SocketAddr), InteropError> {
    let mut qemu = Qemu::start(config, None)?;
    let addr = listen(&mut qemu)?;
    Ok((qemu, addr))
}

/// Tells a QEMU started with `-incoming defer` to listen on an ephemeral loopback port, and
/// returns where.
pub fn listen(qemu: &mut Qemu) -> Result<SocketAddr, InteropError> {
    qemu.qmp()
        .execute("migrate-incoming", Some(json!({ "uri": "tcp:127.0.0.1:0" })))?;
    let info = qemu.qmp().query_migrate()?;
    let port = info
        .socket_address
        .as_ref()
        .and_then(|list| list.iter().find(|a| a.kind == "inet"))
        .and_then(|a| a.port.as_deref())
        .and_then(|p| p.parse::<u16>().ok());
    match port {
        Some(port) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        None => Err(InteropError::NoIncomingPort { info: Box::new(info) }),
    }
}

/// Starts QEMU's migration of its VM to `to`, with the return path on (so that QEMU waits for
/// the receiver's verdict) and `max_bandwidth` bytes/s.
pub fn send_to(qemu: &mut Qemu, to: SocketAddr, max_bandwidth: u64) -> Result<(), InteropError> {
    qemu.qmp().execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [ { "capability": "return-path", "state": true } ] })),
    )?;
    qemu.qmp().execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": max_bandwidth })),
    )?;
    qemu.qmp()
        .execute("migrate", Some(json!({ "uri": format!("tcp:{to}") })))?;
    Ok(())
}

/// Waits until QEMU's outgoing migration completed (its figures) or failed.
pub fn wait_for_end(qemu: &mut Qemu, timeout: Duration) -> Result<MigrationInfo, InteropError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qemu.qmp().query_migrate()?;
        let status = info.status.clone().unwrap_or_default();
        match status.as_str() {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(InteropError::Failed {
                    status,
                    error: info.error_desc.unwrap_or_default(),
                })
            }
            _ if Instant::now() >= deadline => {
                return Err(InteropError::Timeout {
                    what: format!("QEMU migration still {status}"),
                    waited: timeout,
                })
            }
            _ => std::thread::sleep(POLL_EVERY),
        }
    }
}

/// Waits until QEMU's VM is in `state` (`running`, `postmigrate`, ...).
pub fn wait_for_state(qemu: &mut Qemu, state: &str, timeout: Duration) -> Result<(), InteropError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = qemu.qmp().run_state()?;
        if now == state {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(InteropError::Timeout {
                what: format!("QEMU's VM is {now}, not {state}"),
                waited: timeout,
            });
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// The self-checking guest's reports on QEMU's debugcon, oldest first.
pub fn guest_reports(qemu: &Qemu) -> Vec<DebugconReport> {
    qemu.debug_output().lines().filter_map(parse_debugcon_line).collect()
}

/// Waits until the guest has reported `count` more verify passes on debugcon than `after`.
pub fn wait_for_reports(
    qemu: &Qemu,
    after: usize,
    count: usize,
    timeout: Duration,
) -> Result<Vec<DebugconReport>, InteropError> {
    let deadline = Instant::now() + timeout;
    loop {
        let reports = guest_reports(qemu);
        if reports.len() >= after + count {
            return Ok(reports);
        }
        if Instant::now() >= deadline {
            return Err(InteropError::Timeout {
                what: format!(
                    "the guest reported {} verify passes on QEMU's debugcon, not {}; it printed: {}",
                    reports.len(),
                    after + count,
                    qemu.debug_output().lines().last().unwrap_or("nothing")
                ),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The per-page digests of a paused QEMU's first `ram_bytes` of guest-physical memory, read
/// with `pmemsave` in chunks through a scratch file.
pub fn ram_digest(qemu: &mut Qemu, ram_bytes: u64) -> Result<RamDigest, InteropError> {
    let pages = ram_bytes / PAGE_BYTES as u64;
    let mut digest = RamDigest::zeroed(pages);
    let path = qemu.scratch_file("pmemsave.bin");
    let mut page = vec![0u8; PAGE_BYTES];
    let mut at = 0u64;
    while at < ram_bytes {
        let size = PMEMSAVE_CHUNK.min(ram_bytes - at);
        qemu.qmp().execute(
            "pmemsave",
            Some(json!({ "val": at, "size": size, "filename": path.display().to_string() })),
        )?;
        let mut file = std::io::BufReader::new(std::fs::File::open(&path).map_err(InteropError::Dump)?);
        for i in 0..size / PAGE_BYTES as u64 {
            file.read_exact(&mut page).map_err(InteropError::Dump)?;
            digest.set(at / PAGE_BYTES as u64 + i, &page);
        }
        at += size;
    }
    let _ = std::fs::remove_file(&path);
    Ok(digest)
}
