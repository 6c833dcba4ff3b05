//! The data plane: dedicated threads that move pages between guest memory and a link.
//!
//! The source's [`SourcePlane`] reads pages from guest memory straight into batch frames and
//! hands them to the link's [`crate::link::DataSender`]; the target's [`TargetPlane`] writes
//! received batches straight into guest memory. Actors only send them jobs and read their
//! counters, so no actor thread ever copies a page.

mod source;
mod target;

pub use source::{RoundStats, SourcePlane};
pub use target::TargetPlane;

/// Errors of the data plane.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DataPlaneError {
    /// The link went away.
    #[error("data link closed")]
    LinkClosed,
    /// The plane's thread is gone.
    #[error("data-plane thread stopped")]
    Stopped,
    /// A page index outside guest memory (from a peer or a bitmap of the wrong VM).
    #[error("page {page} is outside guest memory of {pages} pages")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages in memory.
        pages: u64,
    },
    /// A page whose bytes do not match the digest its sender computed: the frame was
    /// corrupted on the way.
    #[error("page {page} arrived corrupted (digest mismatch)")]
    Corrupt {
        /// The page.
        page: u64,
    },
    /// A received frame that does not decode.
    #[error("bad page batch: {0}")]
    BadBatch(String),
    /// The thread could not be started.
    #[error("could not start data-plane thread: {0}")]
    Spawn(String),
}
