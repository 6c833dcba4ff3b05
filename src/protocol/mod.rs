//! The migration protocol: what crosses a link between a source and a target.
//!
//! ```text
//!  source (Migration)                         target (Receiver)
//!  premigration   Hello{versions, caps} ───────▶
//!                 ◀─────── Welcome{version, caps} | Refuse{reason}
//!  reservation    Reserve{config, algorithm} ──▶ admission, backend reserves
//!                 ◀──────────────────── Reserved | Abort{reason}
//!  precopy        [page batches on the data plane] RoundDone{round, batches} ...
//!  stopcopy       (source paused) last batches, Suspend{batches, missing}, VcpuState, DeviceState ─▶
//!                 ◀──────────────────── Digests{received} (pre-copy, stop-and-copy: verified
//!                                       against the source's memory before anything commits;
//!                                       a difference is Abort{VerificationFailed}, a rollback)
//!                 ◀──────────────────── Prepared  (every page applied, state loaded)
//!  commitment     Commit ─────────────────────▶ (the target owns the VM from here)
//!  activation     ◀──────────────────── Activated (target resumed, MACs announced)
//!                 Complete ───────────────────▶ (pre-copy: the source has freed its copy)
//!  pull           ◀── PageRequest{pages} (post-copy), pages pushed and pulled ...
//!                 ◀──────────────────── Complete (post-copy: target holds every page)
//!                 ◀──────────────────── Digests{received} (post-copy verification)
//!                 Complete ───────────────────▶ (source has freed its copy)
//!  any time       Abort{reason} both ways; Ping both ways for liveness
//!
//!  recovery (post-copy, the link lost after Activated, on a new link):
//!                 Hello{resume: true} ─────────▶
//!                 ◀─────── Welcome | Refuse (nothing awaits recovery)
//!                 Authenticate{proof, empty without a key} ─▶ (handed to the waiting receiver)
//!                 ◀──────────────────── Resumed{missing} (the pull carries on)
//!
//!  fence (before an operator resumes a held copy, on a new link):
//!                 QueryVm{vm} ─────────────────▶
//!                 ◀──────────────────── VmStatus{vm, state: absent | running | ...}
//! ```
//! In post-copy and hybrid, `Commit`/`Activated` come right after `Prepared` and the
//! commitment stage ends when the target holds every page. Control frames are a 4-byte
//! big-endian length, a tag byte and a MessagePack body; page batches are a tag byte, a small
//! binary header and page bytes, raw or, where both ends offered it, LZ4-compressed or as an
//! XBZRLE delta (see [`pages`], [`lz4_page`], [`xbzrle`]).
//!
//! # Module order
//! The modules form a graph without cycles; each uses only those listed before it (and, from
//! outside the protocol, `format`, `units` and, for page batches, `memory`):
//!
//! ```text
//! capabilities, auth, lz4_page, xbzrle   (leaves: nothing else from protocol)
//! message      -> capabilities
//! frame        -> message
//! pages        -> frame, lz4_page, xbzrle
//! negotiation  -> capabilities, message, pages
//! ```
//! Values a newer peer may extend (algorithms, layouts, compression methods, abort reasons)
//! decode even when unknown, and are refused by name where they matter: see
//! [`capabilities`], [`crate::format::Wire`] and [`negotiation::known_algorithm`].

pub mod auth;
pub mod capabilities;
pub mod frame;
pub mod lz4_page;
pub mod message;
pub mod negotiation;
pub mod pages;
pub mod xbzrle;

pub use capabilities::{Algorithm, Capabilities, Compression, PROTOCOL_VERSION};
pub use frame::{FrameError, MAX_FRAME_LEN};
pub use message::{AbortReason, ControlMessage};
pub use negotiation::{CompressionChoice, NegotiationError, Pool};
pub use pages::{PageBatch, PageCodecs, PageKind, PagePayload, BATCH_PAGES};
