//! Blocking guest work, off the actor threads, with its panics caught.
//!
//! Pausing a guest (up to seconds on kvm, while a vCPU leaves the kernel), reading KVM's dirty
//! log, saving and loading vCPU state, creating or reserving a guest (mapping and filling its
//! memory) and shutting one down all block. The engine's actors share a few threads, so one of
//! these calls made inside a handler would stall every migration on the host. The `Vm`,
//! `DirtyTracker` and `Backend` actors therefore hand such work to [`run`], which starts a
//! thread for it and resolves when the work ends; the actor awaits that future while it keeps
//! serving its other messages (or queues them, see each actor's doc).
//!
//! **Why a thread per call, not tokio's blocking pool.** The work is rare (a handful of calls per
//! migration) and a thread start costs tens of microseconds. A runtime waits for its blocking
//! pool when it shuts down, so a guest stuck in an ioctl would also hang the embedder's drop of
//! the engine; a plain thread is simply left behind. The calls need no runtime context either,
//! so they work from the backend's arbiter as from the engine's thread.
//!
//! **Panics.** The work runs under `catch_unwind`: a panic in a backend or a guest becomes
//! [`OffloadError::Panicked`], carrying the panic message, for the one caller that asked. Guest
//! state behind a panic is whatever the panicking code left; the guests' own locks recover from
//! poisoning, and the actors keep their last committed state (a failed pause leaves the VM
//! "running" in its lifecycle).

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Blocking work that did not return a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// No thread could be started for the work (the process is out of threads or memory).
    #[error("could not start a thread for {what}: {detail}")]
    Spawn {
        /// The work.
        what: &'static str,
        /// What the OS said.
        detail: String,
    },
    /// The work panicked.
    #[error("{what} panicked: {message}")]
    Panicked {
        /// The work.
        what: &'static str,
        /// The panic's message (`<non-string panic payload>` when it carried none).
        message: String,
    },
}

/// Starts `work` on a thread of its own now, and returns a future of its result. Dropping the
/// future detaches the work (it still runs to its end); awaiting it never blocks the caller's
/// thread. `what` names the work in errors and in the thread's name.
pub(crate) fn run<T, F>(what: &'static str, work: F) -> impl Future<Output = Result<T, OffloadError>> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("migratory-{what}"))
        .spawn(move || {
            // The work's captures (guest handles) are only used again through their own locks,
            // which recover from poisoning; see the module doc.
            let result = catch_unwind(AssertUnwindSafe(work)).map_err(|payload| panic_message(&*payload));
            // The caller may have stopped waiting (a detached shutdown, a timed-out ask).
            let _ = tx.send(result);
        })
        .map(|_| ())
        .map_err(|e| OffloadError::Spawn {
            what,
            detail: e.to_string(),
        });
    async move {
        spawned?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(OffloadError::Panicked { what, message }),
            // The sender is dropped without sending only if the thread died outside
            // `catch_unwind` (a panic while dropping the panic payload): still a panic.
            Err(_) => Err(OffloadError::Panicked {
                what,
                message: "the thread ended without a result".into(),
            }),
        }
    }
}

/// The message of a panic payload (`panic!` with a literal gives `&str`, with arguments `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_work_result_comes_back() {
        assert_eq!(run("sum", || 2 + 2).await, Ok(4));
    }

    #[tokio::test]
    async fn test_panic_becomes_a_typed_error_with_its_message() {
        let err = run("explode", || -> u32 { panic!("boom {}", 7) })
            .await
            .expect_err("panics");
        assert_eq!(
            err,
            OffloadError::Panicked {
                what: "explode",
                message: "boom 7".into()
            }
        );
        assert_eq!(err.to_string(), "explode panicked: boom 7");
        let err = run("literal", || -> u32 { panic!("plain") }).await.expect_err("panics");
        assert!(err.to_string().contains("plain"), "{err}");
    }

    #[tokio::test]
    async fn test_work_runs_off_the_callers_thread() {
        let caller = std::thread::current().id();
        let worker = run("where", || std::thread::current().id()).await.expect("runs");
        assert_ne!(worker, caller);
    }
}
