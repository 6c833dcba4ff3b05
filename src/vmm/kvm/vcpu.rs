//! The vCPU thread: a state loop that owns one `VcpuFd`, runs the guest while asked to, paces
//! its writes, and answers commands with past-tense replies.
//!
//! Commands are served only outside `KVM_RUN`. To reach a vCPU that is inside it, the sender
//! kicks the thread with a signal whose handler does nothing: the ioctl returns `EINTR`, and the
//! loop reads its commands. The kick is repeated until the reply arrives, which closes the race
//! of a signal landing just before the thread re-enters `KVM_RUN`; the guest's own port exits
//! (one per batch of pages) bound that race anyway.
//!
//! Bytes the guest writes to its debugcon port are assembled into lines (bounded), logged at
//! debug level, and the last complete one is kept in the [`GuestReport`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::program::{
    DebugconLine, MISMATCHES_OFFSET, PORT_DEBUGCON, PORT_MISMATCH, PORT_PROGRESS, PORT_READY, PORT_VERIFIED,
    PROGRESS_OFFSET, STATE_ADDR, VERIFY_PASSES_OFFSET,
};
use super::state::{capture, restore, VcpuStateError};
use crate::format::native::kvm::KvmVcpu;

/// How long a command may wait for the vCPU to leave `KVM_RUN` and answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval between kicks while a command waits.
const KICK_EVERY: Duration = Duration::from_millis(2);
/// Longest single pacing sleep: the loop re-reads commands at least this often.
const MAX_PACE_SLEEP: Duration = Duration::from_millis(50);

/// What the guest has told the VMM about itself, shared by the vCPU thread and the VMM.
#[derive(Debug, Default)]
pub struct GuestReport {
    /// The guest's progress counter (pages written since it booted, wherever it ran).
    pub progress: AtomicU64,
    /// Verify passes completed.
    pub verify_passes: AtomicU64,
    /// Mismatches the guest reported.
    pub mismatches: AtomicU64,
    /// The last page the guest reported as mismatching (`u64::MAX` before any).
    pub last_mismatch: AtomicU64,
    /// The guest finished its init pass.
    pub ready: AtomicBool,
    /// Why the guest stopped on its own (a triple fault, an entry failure...), if it did.
    pub crash: Mutex<Option<String>>,
    /// Lines the guest has completed on its debugcon port here.
    pub debugcon_lines: AtomicU64,
    /// The last of them, without its newline.
    debugcon_last: Mutex<Option<String>>,
}

impl GuestReport {
    /// A report of a guest that has not said anything yet.
    pub fn new() -> Self {
        Self {
            last_mismatch: AtomicU64::new(u64::MAX),
            ..Self::default()
        }
    }

    fn crashed(&self, why: String) {
        tracing::error!(%why, "kvm guest stopped");
        *self.crash.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why the guest stopped on its own, if it did.
    pub fn crash_reason(&self) -> Option<String> {
        self.crash.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last complete line the guest wrote to its debugcon port under this VMM, without its
    /// newline (format in [`super::program`], "Debugcon lines"; read it with
    /// [`super::program::parse_debugcon_line`]).
    pub fn last_debugcon_line(&self) -> Option<String> {
        self.debugcon_last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn debugcon_line(&self, vcpu: u32, line: String, truncated: bool) {
        tracing::debug!(vcpu, %line, truncated, "guest debugcon");
        *self.debugcon_last.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
        self.debugcon_lines.fetch_add(1, Ordering::Release);
    }

    /// Refreshes the counters from the guest's state header.
    fn read_header(&self, mem: &GuestMemoryMmap<()>) {
        let field = |off: u64| mem.read_obj::<u64>(GuestAddress(STATE_ADDR + off)).ok();
        if let Some(p) = field(PROGRESS_OFFSET) {
            self.progress.store(p, Ordering::Relaxed);
        }
        if let Some(v) = field(VERIFY_PASSES_OFFSET) {
            self.verify_passes.store(v, Ordering::Relaxed);
        }
        if let Some(m) = field(MISMATCHES_OFFSET) {
            self.mismatches.store(m, Ordering::Relaxed);
        }
    }
}

enum Command {
    Run {
        rate_pages_per_sec: f64,
        reply: Sender<()>,
    },
    Pause {
        reply: Sender<()>,
    },
    Save {
        reply: Sender<Result<KvmVcpu, VcpuStateError>>,
    },
    Load {
        state: Box<KvmVcpu>,
        reply: Sender<Result<(), VcpuStateError>>,
    },
    Stop,
}

/// Errors talking to a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread did not answer in time (stuck in the kernel, or gone).
    #[error("vCPU {id} did not answer {command} within {timeout:?}")]
    Timeout {
        /// vCPU index.
        id: u32,
        /// The command.
        command: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// The thread is gone.
    #[error("vCPU {id} thread has exited")]
    Gone {
        /// vCPU index.
        id: u32,
    },
    /// Reading or writing registers failed.
    #[error(transparent)]
    State(#[from] VcpuStateError),
    /// The thread could not be started.
    #[error("could not start vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// The VMM's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    id: u32,
    tx: Sender<Command>,
    pthread: libc::pthread_t,
    join: Mutex<Option<JoinHandle<()>>>,
}

extern "C" fn on_kick(_: libc::c_int) {}

fn kick_signal() -> libc::c_int {
    // glibc keeps the first real-time signals for itself below SIGRTMIN; one above is ours.
    libc::SIGRTMIN() + 1
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sigaction` is integers, a handler address and a signal set, for all of
        // which zero is a valid value ("no flags, default handler, empty set").
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        // SAFETY: writes only the set it is given, which lives in `action` for the call.
        unsafe { libc::sigemptyset(&raw mut action.sa_mask) };
        // SAFETY: the new action is a valid struct read for the call, the old one is not asked
        // for (null). The handler does nothing, so it is async-signal-safe, and the signal is
        // ours (above SIGRTMIN). SA_RESTART is deliberately absent so that KVM_RUN returns
        // EINTR instead of being restarted.
        unsafe { libc::sigaction(kick_signal(), &raw const action, std::ptr::null_mut()) };
    });
}

impl VcpuThread {
    /// Starts the thread for `vcpu`, paused.
    pub fn spawn(
        id: u32,
        vcpu: VcpuFd,
        msrs: Arc<Vec<u32>>,
        mem: Arc<GuestMemoryMmap<()>>,
        report: Arc<GuestReport>,
        name: String,
    ) -> Result<Self, VcpuError> {
        install_kick_handler();
        let (tx, rx) = bounded(16);
        let (ptx, prx) = bounded(1);
        let join = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = ptx.send(unsafe { libc::pthread_self() });
                let mut l = Loop {
                    id,
                    vcpu,
                    msrs,
                    mem,
                    report,
                    rx,
                    running: None,
                    stopped: false,
                    debugcon: DebugconLine::default(),
                };
                l.run();
            })
            .map_err(VcpuError::Spawn)?;
        let pthread = prx.recv().map_err(|_| VcpuError::Gone { id })?;
        Ok(Self {
            id,
            tx,
            pthread,
            join: Mutex::new(Some(join)),
        })
    }

    /// Signals the thread out of `KVM_RUN`, unless `stop` has taken its handle (it then kicks
    /// the thread itself until it ends).
    fn kick(&self) {
        let join = self.join.lock().unwrap_or_else(|p| p.into_inner());
        if join.is_some() {
            // Under the lock, so that `stop` cannot take the handle and join meanwhile.
            self.signal();
        }
    }

    /// Sends the kick signal. Only while the thread's handle is unjoined: held in `join`
    /// (under its lock) or by `stop` before it joins.
    fn signal(&self) {
        // SAFETY: the pthread_t came from the thread itself, and the thread is not joined yet
        // (see above), so the id is still its own even if the thread has exited: the signal
        // reaches it, or fails with ESRCH. The handler it runs does nothing.
        unsafe { libc::pthread_kill(self.pthread, kick_signal()) };
    }

    fn ask<T>(&self, name: &'static str, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, VcpuError> {
        let (reply, answer) = bounded(1);
        self.tx
            .send_timeout(make(reply), COMMAND_TIMEOUT)
            .map_err(|_| VcpuError::Gone { id: self.id })?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            self.kick();
            match answer.recv_timeout(KICK_EVERY) {
                Ok(v) => return Ok(v),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone { id: self.id }),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout {
                        id: self.id,
                        command: name,
                        timeout: COMMAND_TIMEOUT,
                    })
                }
            }
        }
    }

    /// Runs the guest, pacing it to `rate_pages_per_sec` (0: only until its first batch).
    pub fn run(&self, rate_pages_per_sec: f64) -> Result<(), VcpuError> {
        self.ask("run", |reply| Command::Run {
            rate_pages_per_sec,
            reply,
        })
    }

    /// Stops the guest; when this returns the vCPU is outside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.ask("pause", |reply| Command::Pause { reply })
    }

    /// Reads every register (the vCPU is paused by this call first).
    pub fn save(&self) -> Result<KvmVcpu, VcpuError> {
        Ok(self.ask("save", |reply| Command::Save { reply })??)
    }

    /// Writes every register (the vCPU is paused by this call first).
    pub fn load(&self, state: KvmVcpu) -> Result<(), VcpuError> {
        Ok(self.ask("load", |reply| Command::Load {
            state: Box::new(state),
            reply,
        })??)
    }

    /// Ends the thread and waits for it.
    pub fn stop(&self) {
        let handle = self.join.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = self.tx.send(Command::Stop);
            while !h.is_finished() {
                self.signal();
                std::thread::sleep(KICK_EVERY);
            }
            let _ = h.join();
        }
    }
}

/// Pacing of a running guest: the rate, and the instant and progress it is measured from —
/// taken at the first progress exit after a (re)start, because reading the guest's header in
/// the command itself could fault on a page post-copy has not brought yet.
struct Pace {
    pages_per_sec: f64,
    from: Option<(Instant, u64)>,
}

struct Loop {
    id: u32,
    vcpu: VcpuFd,
    msrs: Arc<Vec<u32>>,
    mem: Arc<GuestMemoryMmap<()>>,
    report: Arc<GuestReport>,
    rx: Receiver<Command>,
    running: Option<Pace>,
    stopped: bool,
    /// The debugcon line being written; a line cut by a migration continues, as a fragment,
    /// wherever the guest runs next.
    debugcon: DebugconLine,
}

impl Loop {
    fn run(&mut self) {
        while !self.stopped {
            // Paused: block for a command. Running: take whatever is queued, then enter the guest.
            let cmd = if self.running.is_some() {
                self.rx.try_recv().ok()
            } else {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            if let Some(cmd) = cmd {
                self.serve(cmd);
                continue;
            }
            self.enter();
        }
    }

    /// Handles one command.
    fn serve(&mut self, cmd: Command) {
        match cmd {
            Command::Run {
                rate_pages_per_sec,
                reply,
            } => {
                self.running = Some(Pace {
                    pages_per_sec: rate_pages_per_sec,
                    from: None,
                });
                if self.report.crash_reason().is_some() {
                    self.running = None;
                }
                let _ = reply.send(());
            }
            Command::Pause { reply } => {
                self.running = None;
                let _ = reply.send(());
            }
            Command::Save { reply } => {
                self.running = None;
                let _ = reply.send(capture(&self.vcpu, self.id, &self.msrs));
            }
            Command::Load { state, reply } => {
                self.running = None;
                let _ = reply.send(restore(&self.vcpu, &state));
            }
            Command::Stop => {
                self.running = None;
                self.stopped = true;
            }
        }
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn enter(&mut self) {
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return,
            Err(e) => {
                self.report.crashed(format!("KVM_RUN failed: {e}"));
                self.running = None;
                return;
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                let value = u32::from_le_bytes(v);
                self.port_out(port, value);
            }
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) => {}
            VcpuExit::Intr => {}
            other => {
                let why = format!("vCPU {} exit {other:?}", self.id);
                let regs = self.vcpu.get_regs().map(|r| format!(" at rip {:#x}", r.rip));
                self.report.crashed(why + &regs.unwrap_or_default());
                self.running = None;
            }
        }
    }

    fn port_out(&mut self, port: u16, value: u32) {
        match port {
            PORT_PROGRESS => {
                self.report.read_header(&self.mem);
                self.pace();
            }
            PORT_VERIFIED => self.report.read_header(&self.mem),
            PORT_MISMATCH => {
                self.report.read_header(&self.mem);
                self.report.last_mismatch.store(u64::from(value), Ordering::Relaxed);
                tracing::error!(
                    vcpu = self.id,
                    page = value,
                    "guest reports a page that does not match its ledger"
                );
            }
            PORT_READY => {
                self.report.read_header(&self.mem);
                self.report.ready.store(true, Ordering::Release);
                // The init pass is not paced: the rate applies from the next batch.
                if let Some(p) = &mut self.running {
                    p.from = None;
                }
            }
            PORT_DEBUGCON => {
                // isa-debugcon takes the low byte of any access, as QEMU's does.
                let truncated = self.debugcon.truncated();
                if let Some(line) = self.debugcon.push(value as u8) {
                    self.report.debugcon_line(self.id, line, truncated);
                }
            }
            other => tracing::debug!(port = other, value, "guest wrote an unknown port"),
        }
    }

    /// Holds the guest to its rate: waits until the time its progress is due, listening for
    /// commands meanwhile (a pause must not wait out a pacing sleep).
    fn pace(&mut self) {
        let Some(p) = &mut self.running else { return };
        let progress = self.report.progress.load(Ordering::Relaxed);
        let (since, at) = *p.from.get_or_insert((Instant::now(), progress));
        let done = progress.saturating_sub(at);
        let due = if p.pages_per_sec > 0.0 {
            since + Duration::from_secs_f64(done as f64 / p.pages_per_sec)
        } else {
            // An idle guest: it wrote its first batch; hold it there until told otherwise.
            Instant::now() + Duration::from_secs(3600)
        };
        loop {
            let now = Instant::now();
            if now >= due {
                return;
            }
            match self.rx.recv_timeout((due - now).min(MAX_PACE_SLEEP)) {
                Ok(cmd) => {
                    self.serve(cmd);
                    if self.running.is_none() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.running = None;
                    return;
                }
            }
        }
    }
}
