//! Guest memory: one anonymous mapping per VM, addressed by [`PageIndex`](crate::units::PageIndex).
//!
//! Use [`GuestMemory`] wherever page bytes are read or written; the data plane reads straight
//! from it into a batch buffer and writes straight from a received batch into it, so each page is
//! copied once per side.

mod commit;
mod guest_memory;

pub(crate) use guest_memory::is_zero;
pub use guest_memory::{GuestMemory, MemoryError, SplitMix64};
