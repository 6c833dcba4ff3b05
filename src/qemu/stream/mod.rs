//! QEMU's migration stream (`docs/devel/migration.rst`, `migration/savevm.c`, `migration/ram.c`):
//! a writer that produces a stream QEMU 7.2 loads with `-incoming`, and the return path QEMU
//! answers on.
//!
//! * [`writer`]: [`writer::StreamWriter`], header, commands, the `ram` sections and the
//!   trailing device description;
//! * [`write_cpu`]: the `cpu_common`, `cpu` and `apic` sections of one vCPU, with their
//!   description;
//! * [`cpu_msrs`]: where the `cpu` section keeps each MSR;
//! * [`return_path`]: the messages the destination sends back (`MIG_RP_MSG_*`).
//!
//! (This worktree's copy holds only the items the writer needs; the reader side owns the file.)

pub mod cpu_msrs;
pub mod return_path;
pub mod write_cpu;
pub mod writer;

use thiserror::Error;

/// The target page size of x86 QEMU, the unit of every ram record.
pub const PAGE_SIZE: usize = 4096;

/// One RAM block of the `ram` section's block list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's RAMBlock id, e.g. `pc.ram`.
    pub name: String,
    /// Its used length, bytes.
    pub length: u64,
}

/// Why a stream could not be read or written.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The transport.
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A number beyond what the stream format or this codec allows.
    #[error("{what} is {value}, more than the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A vCPU MSR that no field or subsection of QEMU's `cpu` section carries.
    #[error("MSR {index:#x} has no place in QEMU's cpu section")]
    UnsupportedMsr {
        /// The MSR index.
        index: u32,
    },
    /// A writer call out of the stream's order (e.g. a page outside a ram section).
    #[error("{call} is not allowed {state}")]
    OutOfOrder {
        /// The method called.
        call: &'static str,
        /// Where the writer was.
        state: &'static str,
    },
    /// A page of another length than [`PAGE_SIZE`].
    #[error("a page of {len} bytes, not {PAGE_SIZE}")]
    PageLength {
        /// The length given.
        len: usize,
    },
    /// A block index that the ram setup did not declare.
    #[error("ram block index {index}, but {count} blocks were declared")]
    NoSuchBlock {
        /// The index given.
        index: usize,
        /// How many blocks the setup declared.
        count: usize,
    },
    /// A page offset that is not page-aligned or not inside its block.
    #[error("page offset {offset:#x} in ram block {block} of {length:#x} bytes")]
    PageOffset {
        /// The block's name.
        block: String,
        /// The offset given.
        offset: u64,
        /// The block's length.
        length: u64,
    },
    /// A ram block whose length is not a whole number of pages.
    #[error("ram block {name} of {length:#x} bytes is not a whole number of pages")]
    UnalignedRamBlock {
        /// The block's name.
        name: String,
        /// Its length.
        length: u64,
    },
    /// The destination reported that it failed to load the stream (`MIG_RP_MSG_SHUT` with 1).
    #[error("the destination failed to load the stream (MIG_RP_MSG_SHUT {value})")]
    DestinationFailed {
        /// The value SHUT carried.
        value: u32,
    },
    /// The return path ended before the destination said it was done.
    #[error("the return path closed before MIG_RP_MSG_SHUT: {reason}")]
    ReturnPathClosed {
        /// End of stream, or the socket error.
        reason: String,
    },
    /// A return-path message that breaks its format.
    #[error("return-path message type {kind} with {len} bytes: {what}")]
    BadReturnMessage {
        /// The message type.
        kind: u16,
        /// Its length field.
        len: u16,
        /// What is wrong.
        what: &'static str,
    },
}
