//! The data plane: dedicated threads that move pages between guest memory and a link.
//!
//! The source's [`SourcePlane`] reads pages from guest memory straight into batch frames and
//! hands them to the link's [`crate::link::DataSender`]; the target's [`TargetPlane`] writes
//! received batches straight into guest memory. Actors only send them jobs and read their
//! counters, so no actor thread ever copies a page.
//!
//! When compression is negotiated, the source's [`encoder`] picks per page between raw, LZ4
//! and an XBZRLE delta against its [`xbzrle_cache`]; the target decodes and checks every page
//! against its digest before it touches guest memory.

pub mod encoder;
mod pull;
mod source;
mod target;
pub mod xbzrle_cache;

pub use encoder::EncodeStats;
pub use pull::{PullPaths, PREPAGE_WINDOW};
pub use source::{PlaneEncoding, RoundStats, SourcePlane};
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
    /// The backend could not install a post-copy page.
    #[error("installing page {page}: {detail}")]
    Install {
        /// The page.
        page: u64,
        /// What the backend said.
        detail: String,
    },
    /// A page of a well-formed batch whose payload does not decode, or comes in an encoding
    /// this side did not offer.
    #[error("page {page}: {error}")]
    BadPage {
        /// The page.
        page: u64,
        /// What was wrong.
        error: crate::protocol::pages::PageError,
    },
    /// A received frame that does not decode.
    #[error("bad page batch: {0}")]
    BadBatch(String),
    /// The thread could not be started.
    #[error("could not start data-plane thread: {0}")]
    Spawn(String),
}
