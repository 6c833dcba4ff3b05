//! Committing a mapping's pages: at once, or in the background while pages arrive.
//!
//! Committing is the kernel zeroing each page, one 4 KiB fault at a time: for a GiB that is
//! 0.2 s on a quiet 2-core machine and over a second on a busy one. A reservation that commits
//! every page before answering puts all of that before the first page moves. Committed in the
//! background instead, it overlaps the transfer: a page that arrives first is faulted in by its
//! write, as any first touch is, and the committer skips nothing (MADV_POPULATE_WRITE leaves a
//! page that is already there as it is).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::units::PAGE_SIZE;

/// Bytes committed per madvise call: short calls let another thread take the mmap lock (see
/// [`commit_range`]'s callers), and a stop request is seen between them.
pub(super) const PART_BYTES: usize = 4 << 20;

/// Commits `[base + start, base + start + n)` with MADV_POPULATE_WRITE. On a kernel older
/// than 5.14 (EINVAL) with `write_fallback`, by writing the zero each fresh page still holds;
/// without it, the call returns `Ok(false)`: nothing was committed, first touches will.
///
/// # Safety
/// The range must lie inside a private anonymous mapping that stays mapped for the whole call.
/// With `write_fallback`, no byte of it may have been written yet (the fallback writes zeros).
pub(super) unsafe fn commit_range(base: usize, start: usize, n: usize, write_fallback: bool) -> std::io::Result<bool> {
    // SAFETY: the caller guarantees the range is mapped; MADV_POPULATE_WRITE only faults pages
    // in and leaves their contents as they are.
    let r = unsafe { libc::madvise((base + start) as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    if !write_fallback {
        return Ok(false);
    }
    for at in (start..start + n).step_by(PAGE_SIZE) {
        // SAFETY: `at` is inside the mapping (the caller's guarantee), and nothing but zeros is
        // there yet: writing the zero it holds commits the page.
        unsafe { std::ptr::write_volatile((base + at) as *mut u8, 0) };
    }
    Ok(true)
}

/// What the background commit came to: `None` while it runs.
#[derive(Debug, Default)]
struct Outcome {
    result: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

/// A thread committing a mapping in the background, from its first page to its last. The
/// mapping's owner must call [`Committer::stop`] before unmapping.
#[derive(Debug)]
pub(super) struct Committer {
    stop: Arc<AtomicBool>,
    outcome: Arc<Outcome>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    /// Starts committing `[base, base + len)`.
    ///
    /// # Safety
    /// `[base, base + len)` must be a private anonymous mapping that stays mapped until
    /// [`Committer::stop`] has returned: the owner unmaps only after it.
    pub(super) unsafe fn start(base: usize, len: usize) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(Outcome::default());
        let (halt, out) = (Arc::clone(&stop), Arc::clone(&outcome));
        let thread = std::thread::Builder::new()
            .name("migratory-commit".into())
            .spawn(move || {
                let mut result = Ok(());
                for at in (0..len).step_by(PART_BYTES) {
                    if halt.load(Ordering::Relaxed) {
                        result = Err("stopped before every page was committed".to_string());
                        break;
                    }
                    // SAFETY: `start`'s contract: the mapping stays until `stop` has joined
                    // this thread. No write fallback: pages may already hold what arrived.
                    match unsafe { commit_range(base, at, PART_BYTES.min(len - at), false) } {
                        Ok(true) => {}
                        // An old kernel: first touches commit the pages.
                        Ok(false) => break,
                        Err(e) => {
                            result = Err(format!("committing {len} bytes failed at byte {at}: {e}"));
                            break;
                        }
                    }
                }
                *out.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                out.done.notify_all();
            })?;
        Ok(Self {
            stop,
            outcome,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Blocks until every page is committed, or the commit failed.
    pub(super) fn wait(&self) -> Result<(), String> {
        let mut result = self.outcome.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone();
            }
            result = self.outcome.done.wait(result).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// True once the commit has ended, well or not.
    pub(super) fn finished(&self) -> bool {
        self.outcome.result.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Stops the thread at its next part and joins it.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            // A panic in the thread left nothing mapped behind: nothing to do but go on.
            let _ = t.join();
        }
    }
}
