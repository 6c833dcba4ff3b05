//! The DirtyTracker actor: dirty logging of one migrating VM.

use std::sync::Arc;

use actix::prelude::*;

use super::{AtomicBitmap, PageSet};

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
}

/// Tracks the pages one VM dirties between rounds.
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

impl Handler<StartDirtyLog> for DirtyTracker {
    type Result = Result<(), DirtyError>;

    fn handle(&mut self, _: StartDirtyLog, _: &mut Self::Context) -> Self::Result {
        self.source.start_dirty_log()?;
        self.logging = true;
        Ok(())
    }
}

impl Handler<CollectDirtyPages> for DirtyTracker {
    type Result = Result<PageSet, DirtyError>;

    fn handle(&mut self, _: CollectDirtyPages, _: &mut Self::Context) -> Self::Result {
        if !self.logging {
            return Err(DirtyError::NotStarted);
        }
        self.source.sync_dirty_log()?;
        Ok(self.source.dirty_bitmap().drain())
    }
}

impl Handler<StopDirtyLog> for DirtyTracker {
    type Result = Result<(), DirtyError>;

    fn handle(&mut self, _: StopDirtyLog, ctx: &mut Self::Context) -> Self::Result {
        if !self.logging {
            return Err(DirtyError::NotStarted);
        }
        self.logging = false;
        ctx.stop();
        self.source.stop_dirty_log()
    }
}
