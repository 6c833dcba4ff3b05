//! Backends: the hypervisor side of a VM.
//!
//! The engine codes against [`Guest`] (one running or incoming VM), the [`Hypervisor`] trait
//! (one backend on a host: what it can do, and its guests' creation) and the [`Backend`] actor
//! that runs a hypervisor's blocking calls off the engine's threads. A host names its backend
//! with a [`BackendSpec`]; the engine never names one itself. The `sim` backend is a synthetic
//! guest with real memory and a writer workload; it runs everywhere and is the default for
//! demos, tests and fault injection. A backend keeps vCPU state in its own native layout and
//! converts to and from the common format at the boundary, so that the engine never sees a
//! native structure. Every backend runs the same [`WorkloadSpec`].

mod backend;
mod guest;
mod hypervisor;
pub mod sim;
mod spec;
mod workload;

pub use backend::{decorate_next_guest, Backend, CreateVm, DestroyGuest, GuestDecorator, ReserveVm};
pub use guest::{guest_thread_name, FaultSink, Guest, GuestRef, GuestStats, VmmError};
pub use hypervisor::{Hypervisor, HypervisorCapabilities, MemoryCommit};
pub use spec::{BackendSpec, BackendSpecError, Unsupported};
pub use workload::{Pattern, WorkloadSpec};

// The one platform gate: the kvm backend exists on x86-64 Linux; elsewhere a kvm spec gets a
// stand-in that refuses, with the reason, when the host is added.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn kvm_hypervisor() -> std::sync::Arc<dyn Hypervisor> {
    std::sync::Arc::new(kvm::KvmHypervisor)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn kvm_hypervisor() -> std::sync::Arc<dyn Hypervisor> {
    std::sync::Arc::new(Unsupported {
        name: "kvm",
        needs: "x86-64 Linux",
    })
}
