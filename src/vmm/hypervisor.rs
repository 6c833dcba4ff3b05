//! The hypervisor trait: what one backend offers a host.
//!
//! The engine never names a backend. A host's [`super::Backend`] actor holds an
//! `Arc<dyn Hypervisor>` and runs its calls off the actor thread; the host asks it once for its
//! [`HypervisorCapabilities`] and offers peers only what the backend can do.
//!
//! # Adding a backend
//!
//! 1. A module under `vmm/` with a type implementing [`Hypervisor`], and the [`Guest`] it creates.
//! 2. A variant of [`super::BackendSpec`] holding only what that backend lets a host choose, with
//!    its arm in `BackendSpec::hypervisor` (and in `BackendSpec::from_flags` if the command
//!    line should name it).
//!
//! An embedder can also bring its own without touching this crate: `BackendSpec::Custom`.

use std::fmt;
use std::sync::Arc;

use super::{Guest, VmmError, WorkloadSpec};
use crate::format::{NativeLayout, VmConfig};
use crate::protocol::Algorithm;

/// One hypervisor on a host: it creates guests, and reserves empty ones for incoming
/// migrations.
///
/// Every call may block (mapping and filling memory, opening devices, booting vCPUs); callers
/// run them on a thread of their own ([`crate::offload`]), several at a time.
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// The backend's name, as `--backend` takes it and reports show it.
    fn name(&self) -> &str;

    /// What migrations to and from this backend's guests can use on this host. May probe the
    /// host (kvm opens a userfaultfd to learn whether it can post-copy): ask once, keep the
    /// answer.
    fn capabilities(&self) -> HypervisorCapabilities;

    /// Checks that this host can run the backend's guests; the error says why not.
    fn check_available(&self) -> Result<(), VmmError>;

    /// A new guest with fresh content running `workload`; it is running when returned.
    fn create_guest(&self, config: VmConfig, workload: WorkloadSpec) -> Result<Arc<dyn Guest>, VmmError>;

    /// An empty, paused guest for an incoming migration, its memory committed as `commit`
    /// says; see [`super::ReserveVm`].
    fn reserve_guest(&self, config: VmConfig, commit: MemoryCommit) -> Result<Arc<dyn Guest>, VmmError>;
}

/// How a reservation commits the incoming guest's memory, chosen from the algorithm.
///
/// Committing is the kernel zeroing every page: about 0.2 s per GiB on a quiet 2-core machine.
/// Measured there (1 GiB, in-process), committing in the background while pre-copy rounds run
/// costs the same total time as committing first (the transfer is CPU-bound, so the commit
/// only moves from reservation into round 0), and it would lengthen a stop-and-copy's
/// downtime by 60% and a post-copy switchover from 0.5 ms to 100 ms (the commit holds the
/// process's mmap lock). Hosts with cores to spare or a slower link gain the overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCommit {
    /// Before `Reserved`: stop-and-copy, whose pages all arrive inside the downtime.
    UpFront,
    /// In the background while pre-copy rounds run; waited for before `Prepared`.
    Background,
    /// Every page arrives on demand (post-copy). A backend whose demand paging needs absent
    /// pages (userfaultfd) maps RAM without committing it, instead of committing it now only
    /// to drop it at the switchover, inside the downtime; others commit up front.
    OnDemand,
}

impl MemoryCommit {
    /// The commit for a migration running `algorithm`.
    pub fn for_algorithm(algorithm: crate::protocol::Algorithm) -> Self {
        use crate::protocol::Algorithm as A;
        match algorithm {
            A::Postcopy => MemoryCommit::OnDemand,
            A::StopAndCopy => MemoryCommit::UpFront,
            A::Precopy | A::Hybrid | A::Auto | A::Random => MemoryCommit::Background,
        }
    }
}

/// What a backend can do on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypervisorCapabilities {
    /// Algorithms a migration to or from this backend's guests can use. One list for both
    /// directions, because a host offers peers one list: a backend that can only send with an
    /// algorithm leaves it out.
    pub algorithms: Vec<Algorithm>,
    /// Native layouts its guests keep vCPU state in.
    pub layouts: Vec<NativeLayout>,
}

impl HypervisorCapabilities {
    /// Every algorithm, with guests in `layouts`.
    pub fn all(layouts: Vec<NativeLayout>) -> Self {
        Self {
            algorithms: Algorithm::ALL.to_vec(),
            layouts,
        }
    }

    /// The same without the algorithms that end in demand paging on the target (post-copy and
    /// hybrid), for a backend that cannot page a guest in on demand.
    pub fn without_postcopy(mut self) -> Self {
        self.algorithms.retain(|a| !a.is_postcopy_family());
        self
    }

    /// True if the backend can run `algorithm`.
    pub fn offers(&self, algorithm: Algorithm) -> bool {
        self.algorithms.contains(&algorithm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_without_postcopy_keeps_auto_random_and_the_pre_copy_family() {
        let caps = HypervisorCapabilities::all(vec![NativeLayout::Kvm]).without_postcopy();
        assert_eq!(
            caps.algorithms,
            vec![
                Algorithm::StopAndCopy,
                Algorithm::Precopy,
                Algorithm::Auto,
                Algorithm::Random
            ]
        );
        assert!(!caps.offers(Algorithm::Hybrid));
        assert_eq!(caps.layouts, vec![NativeLayout::Kvm]);
    }
}
