//! Dirty page tracking.
//!
//! [`AtomicBitmap`] is the lock-free bitmap a guest's writers set and a tracker drains;
//! [`PageSet`] is the plain, owned result of a drain that the engine hands to the data plane.
//! The [`DirtyTracker`] actor wraps a backend's bitmap behind start / collect / stop messages.

mod bitmap;
mod page_set;
mod tracker;

pub use bitmap::AtomicBitmap;
pub use page_set::PageSet;
pub use tracker::{CollectDirtyPages, DirtyError, DirtyLogSource, DirtyTracker, StartDirtyLog, StopDirtyLog};
