//! The kvm backend: a micro-VMM on /dev/kvm running a self-checking guest.
//!
//! - [`boot`]: long-mode page tables, GDT and boot registers.
//! - [`program`]: the guest program, assembled with iced-x86: it writes pages at a paced rate,
//!   keeps a ledger of what it wrote, verifies it, and reports through port I/O.
//! - `vcpu`: one thread per vCPU, a command loop around `KVM_RUN` (run, pause, save, load).
//! - `state`: vCPU registers between KVM's ioctl structures and the KVM-shaped native layout.
//! - `demand`: post-copy demand paging with [`uffd`] (userfaultfd).
//! - [`KvmGuest`]: the [`crate::vmm::Guest`] the engine sees, with KVM's dirty log behind it.
//! - [`KvmHypervisor`]: the [`crate::vmm::Hypervisor`] that creates them, and says whether this
//!   host can post-copy.
//!
//! The only module with `unsafe` besides guest memory itself; the engine never imports it.

pub mod boot;
mod demand;
mod guest;
mod hypervisor;
pub mod program;
mod state;
pub mod uffd;
mod vcpu;

pub use guest::{kvm_available, open_kvm, program_for, KvmGuest, Pacing, KVM_GUEST_DEVICE, KVM_GUEST_DEVICE_VERSION};
pub use hypervisor::KvmHypervisor;
pub use vcpu::GuestReport;
