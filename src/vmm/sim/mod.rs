//! The `sim` backend: a synthetic guest with real memory.
//!
//! Guest RAM is a real anonymous mapping filled with pseudo-random content; a writer thread
//! stands in for the vCPUs and dirties pages at a configured rate and pattern. vCPU state is kept
//! in the host's chosen native layout (`kvm` or `xen-hvm`) and advanced as the writer runs, so a
//! migration really has to convert it. Use it for demos, tests and fault injection; it runs
//! everywhere.

mod guest;
mod hypervisor;
mod writer;

pub use guest::SimGuest;
pub use hypervisor::SimHypervisor;
