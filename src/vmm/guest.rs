//! The narrow interface every backend's VM offers the engine.

use std::sync::Arc;

use crate::dirty::{DirtyLogSource, PageSet};
use crate::format::{DeviceState, NativeError, NativeLayout, VcpuState, VmConfig};
use crate::memory::{GuestMemory, MemoryError};

/// Errors of a backend or its guest.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest memory failed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// Converting vCPU state between the native layout and the common format failed.
    #[error("vCPU state conversion ({layout}): {source}")]
    Conversion {
        /// The backend's native layout.
        layout: NativeLayout,
        /// What the converter said.
        source: NativeError,
    },
    /// The state handed to the guest does not fit it.
    #[error("state does not fit this VM: {detail}")]
    StateMismatch {
        /// What does not fit.
        detail: String,
    },
    /// A device blob the backend does not know, or of a version it cannot load.
    #[error("device {name} version {version} is not supported")]
    UnsupportedDevice {
        /// Device name.
        name: String,
        /// Blob version.
        version: u32,
    },
    /// A device blob that does not parse.
    #[error("device {name}: malformed state ({len} bytes)")]
    MalformedDevice {
        /// Device name.
        name: String,
        /// Blob length.
        len: usize,
    },
    /// The operation needs the guest in another state.
    #[error("guest is {actual}, operation needs {needed}")]
    WrongState {
        /// What the guest is.
        actual: &'static str,
        /// What the operation needs.
        needed: &'static str,
    },
    /// The backend's thread could not be started.
    #[error("could not start guest thread: {0}")]
    Thread(std::io::Error),
    /// A hypervisor call failed.
    #[error("{op}: {detail}")]
    Hypervisor {
        /// The call (an ioctl, opening the device...).
        op: &'static str,
        /// What the hypervisor said.
        detail: String,
    },
    /// A backend this build or platform does not have.
    #[error("the {backend} backend needs {needs}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// An injected or simulated backend failure.
    #[error("backend failure: {0}")]
    Failed(String),
    /// Blocking guest work run off the actor thread panicked (or found no thread to run on).
    #[error(transparent)]
    Offload(#[from] crate::offload::OffloadError),
}

/// A thread name for a guest's thread: `prefix-id`, with the id escaped. A VM id comes from a
/// user or a peer and may hold any character; `std::thread::Builder::spawn` panics on a name
/// with a NUL byte, which must never follow from an id.
pub fn guest_thread_name(prefix: &str, id: &crate::format::VmId) -> String {
    format!("{prefix}-{}", id.0.escape_debug())
}

/// Where a post-copy target reports pages its guest touched before they arrived.
pub type FaultSink = tokio::sync::mpsc::UnboundedSender<u64>;

/// Counters a guest keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestStats {
    /// Guest writes (simulated stores or guest-reported progress) since creation on this host.
    pub writes: u64,
    /// Post-copy faults taken.
    pub faults: u64,
    /// Sum of post-copy fault latencies, in seconds.
    pub fault_wait_s: f64,
    /// Times a self-checking guest verified all it wrote (0 for guests that do not check).
    pub verify_passes: u64,
    /// Pages (or ledgers) a self-checking guest found not as it wrote them: lost or stale
    /// memory, seen from inside the guest. Must stay 0.
    pub integrity_errors: u64,
}

/// One VM as its backend runs it. Methods are quick (microseconds to a few milliseconds) and
/// thread-safe; bulk work (page copies) is done by callers on data-plane threads through
/// [`Guest::memory`].
pub trait Guest: DirtyLogSource + Send + Sync + std::fmt::Debug {
    /// The VM's configuration.
    fn config(&self) -> &VmConfig;
    /// The backend's native vCPU layout.
    fn layout(&self) -> NativeLayout;
    /// Guest RAM.
    fn memory(&self) -> &GuestMemory;
    /// Starts or resumes the guest.
    fn resume(&self) -> Result<(), VmmError>;
    /// Stops the guest; when this returns no guest write is in flight.
    fn pause(&self) -> Result<(), VmmError>;
    /// True while the guest runs.
    fn is_running(&self) -> bool;
    /// vCPU state, converted from the native layout to the common format. Guest paused.
    fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError>;
    /// Loads vCPU state, converting from the common format to the native layout.
    fn load_vcpus(&self, vcpus: &[VcpuState]) -> Result<(), VmmError>;
    /// Device state as named, versioned blobs. Guest paused.
    fn save_devices(&self) -> Result<Vec<DeviceState>, VmmError>;
    /// Loads device state.
    fn load_devices(&self, devices: &[DeviceState]) -> Result<(), VmmError>;
    /// Post-copy: marks `missing` as not yet present; a guest access to one of them waits for
    /// [`Guest::page_installed`] and is reported once to `faults`.
    fn begin_demand_paging(&self, missing: &PageSet, faults: FaultSink) -> Result<(), VmmError>;
    /// Claims a missing page for installation; false if it is present or being installed (a
    /// duplicate push or pull), in which case the caller must not write it.
    fn claim_page(&self, page: u64) -> bool;
    /// Marks a claimed page as written and wakes any access waiting for it.
    fn page_installed(&self, page: u64);
    /// Writes a claimed page (`None`: a zero page) and marks it installed. A backend whose
    /// missing pages trap in the kernel (userfaultfd) must install through the trap, not with a
    /// plain store, and overrides this.
    fn install_page(&self, page: u64, data: Option<&[u8]>) -> Result<(), VmmError> {
        let at = crate::units::PageIndex(page);
        match data {
            Some(bytes) => self.memory().write_page(at, bytes)?,
            None => self.memory().zero_page(at)?,
        }
        self.page_installed(page);
        Ok(())
    }
    /// Pages still missing (post-copy), 0 otherwise.
    fn missing_pages(&self) -> u64;
    /// The set of pages still missing (post-copy recovery tells the source which to resend).
    fn missing_set(&self) -> PageSet;
    /// Counters.
    fn stats(&self) -> GuestStats;
    /// Stops every guest thread for good; memory is freed when the last reference drops.
    fn shutdown(&self);
}

/// A shared guest.
pub type GuestRef = Arc<dyn Guest>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::VmId;

    #[test]
    fn test_guest_thread_name_of_any_id_starts_a_thread() {
        for id in ["a\u{0}b", "\u{0}", "plain", "é\n\t"] {
            let name = guest_thread_name("t", &VmId(id.to_string()));
            assert!(!name.contains('\0'), "{name:?}");
            let t = std::thread::Builder::new().name(name).spawn(|| ()).expect("spawns");
            t.join().expect("joins");
        }
    }
}
