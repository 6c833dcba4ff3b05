//! Backends: the hypervisor side of a VM.
//!
//! The engine codes against [`Guest`] (one running or incoming VM) and the [`Backend`] actor
//! (one hypervisor on a host). The `sim` backend is a synthetic guest with real memory and a
//! writer workload; it runs everywhere and is the default for demos, tests and fault injection.
//! A backend keeps vCPU state in its own native layout and converts to and from the common
//! format at the boundary, so that the engine never sees a native structure.

mod backend;
mod guest;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
pub mod sim;

pub use backend::{decorate_next_guest, Backend, BackendKind, CreateVm, DestroyGuest, GuestDecorator, ReserveVm};
pub use guest::{guest_thread_name, FaultSink, Guest, GuestRef, GuestStats, VmmError};
