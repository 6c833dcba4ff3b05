//! The DirtyTracker actor: dirty logging of one migrating VM.

use std::sync::Arc;

use actix::prelude::*;

use super::{AtomicBitmap, PageSet};
use crate::offload::{self, OffloadError};

/// Anything whose writes end up in a dirty bitmap: a sim guest sets it on every store; a kvm
/// guest's writes land in KVM's dirty log, which [`DirtyLogSource::sync_dirty_log`] folds in.
pub trait DirtyLogSource: Send + Sync {
    /// The bitmap of pages written (as of the last sync).
    fn dirty_bitmap(&self) -> &AtomicBitmap;

    /// Begins logging from now on, forgetting what was written before.
    fn start_dirty_log(&self) -> Result<(), DirtyError> {
        self.dirty_bitmap().clear_all();
        Ok(())
    }

    /// Moves what the hypervisor logged since the last sync into the bitmap. Nothing to do
    /// where writes set the bitmap directly.
    fn sync_dirty_log(&self) -> Result<(), DirtyError> {
        Ok(())
    }

    /// Ends logging (a hypervisor stops write-protecting pages).
    fn stop_dirty_log(&self) -> Result<(), DirtyError> {
        Ok(())
    }
}

/// Errors of dirty tracking.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DirtyError {
    /// Collect or stop without a start.
    #[error("dirty logging is not started")]
    NotStarted,
    /// The hypervisor's dirty log failed.
    #[error("dirty log: {0}")]
    Log(String),
    /// The dirty-log call, run off the actor thread, panicked (or found no thread).
    #[error(transparent)]
    Offload(#[from] OffloadError),
}

/// Tracks the pages one VM dirties between rounds.
///
/// Start, collect and stop call into the backend (for kvm: the memory slot's flags,
/// `KVM_GET_DIRTY_LOG`), which may block; each runs on a thread of its own
/// ([`crate::offload`]) while the actor holds its mailbox (`AtomicResponse`): commands are
/// handled one at a time and in order, and the tracker has no queries to keep answering.
pub struct DirtyTracker {
    source: Arc<dyn DirtyLogSource>,
    logging: bool,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker").field("logging", &self.logging).finish()
    }
}

impl DirtyTracker {
    /// A tracker over `source`'s bitmap, not yet logging.
    pub fn new(source: Arc<dyn DirtyLogSource>) -> Self {
        Self { source, logging: false }
    }
}

impl Actor for DirtyTracker {
    type Context = Context<Self>;
}

/// Start logging: forget what was dirtied before (the first round sends every page anyway).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), DirtyError>")]
pub struct StartDirtyLog;

/// Fetch and clear the pages dirtied since the last collect (or the start).
#[derive(Debug, Message)]
#[rtype(result = "Result<PageSet, DirtyError>")]
pub struct CollectDirtyPages;

/// Stop logging.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), DirtyError>")]
pub struct StopDirtyLog;

type Reply<T> = AtomicResponse<DirtyTracker, Result<T, DirtyError>>;

fn ready<T: 'static>(r: Result<T, DirtyError>) -> Reply<T> {
    AtomicResponse::new(Box::pin(fut::ready(r)))
}

fn flatten<T>(r: Result<Result<T, DirtyError>, OffloadError>) -> Result<T, DirtyError> {
    r?
}

impl Handler<StartDirtyLog> for DirtyTracker {
    type Result = Reply<()>;

    fn handle(&mut self, _: StartDirtyLog, _: &mut Self::Context) -> Self::Result {
        let source = Arc::clone(&self.source);
        let work = offload::run("dirty-log-start", move || source.start_dirty_log());
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|r, act, _| {
            flatten(r)?;
            act.logging = true;
            Ok(())
        })))
    }
}

impl Handler<CollectDirtyPages> for DirtyTracker {
    type Result = Reply<PageSet>;

    fn handle(&mut self, _: CollectDirtyPages, _: &mut Self::Context) -> Self::Result {
        if !self.logging {
            return ready(Err(DirtyError::NotStarted));
        }
        let source = Arc::clone(&self.source);
        let work = offload::run("dirty-log-sync", move || {
            source.sync_dirty_log()?;
            Ok(source.dirty_bitmap().drain())
        });
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|r, _, _| flatten(r))))
    }
}

impl Handler<StopDirtyLog> for DirtyTracker {
    type Result = Reply<()>;

    fn handle(&mut self, _: StopDirtyLog, _: &mut Self::Context) -> Self::Result {
        if !self.logging {
            return ready(Err(DirtyError::NotStarted));
        }
        self.logging = false;
        let source = Arc::clone(&self.source);
        let work = offload::run("dirty-log-stop", move || source.stop_dirty_log());
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|r, _, ctx| {
            ctx.stop();
            flatten(r)
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source whose sync panics, to show the panic reaches the caller as an error.
    struct Exploding(AtomicBitmap);

    impl DirtyLogSource for Exploding {
        fn dirty_bitmap(&self) -> &AtomicBitmap {
            &self.0
        }
        fn sync_dirty_log(&self) -> Result<(), DirtyError> {
            panic!("dirty log exploded")
        }
    }

    #[actix::test]
    async fn test_panicking_sync_is_an_error_and_the_tracker_lives_on() {
        let tracker = DirtyTracker::new(Arc::new(Exploding(AtomicBitmap::new(8)))).start();
        tracker.send(StartDirtyLog).await.expect("answers").expect("starts");
        let err = tracker
            .send(CollectDirtyPages)
            .await
            .expect("answers")
            .expect_err("panics");
        assert!(
            matches!(err, DirtyError::Offload(OffloadError::Panicked { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("dirty log exploded"), "{err}");
        tracker.send(StopDirtyLog).await.expect("still answers").expect("stops");
    }

    #[actix::test]
    async fn test_collect_before_start_is_refused() {
        let tracker = DirtyTracker::new(Arc::new(Exploding(AtomicBitmap::new(8)))).start();
        let err = tracker.send(CollectDirtyPages).await.expect("answers");
        assert_eq!(err, Err(DirtyError::NotStarted));
    }
}
