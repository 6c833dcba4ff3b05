//! Which hypervisor a host runs.
//!
//! A [`BackendSpec`] names a backend and carries only what a host may choose for it, so that no
//! spec describes a backend that cannot exist: the sim keeps vCPU state in the layout it is
//! given, kvm always in the kvm layout, so kvm has no layout to give. [`BackendSpec::hypervisor`]
//! turns a spec into the [`Hypervisor`] itself.

use std::fmt;
use std::sync::Arc;

use super::sim::SimHypervisor;
use super::{Guest, Hypervisor, HypervisorCapabilities, VmmError, WorkloadSpec};
use crate::format::{NativeLayout, VmConfig};

/// The hypervisor of a host.
#[derive(Debug, Clone)]
pub enum BackendSpec {
    /// The synthetic guest with real memory; runs everywhere.
    Sim {
        /// The native layout its guests keep vCPU state in.
        layout: NativeLayout,
    },
    /// Real guests on /dev/kvm (x86-64 Linux); vCPU state in the kvm layout.
    Kvm,
    /// A hypervisor the embedder brings: a backend outside this crate, or a test's wrapper
    /// around another.
    Custom(Arc<dyn Hypervisor>),
}

/// Why a backend named on a command line cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendSpecError {
    /// No backend has this name.
    #[error("unknown backend {name:?} ({})", BackendSpec::NAMES.join(", "))]
    UnknownBackend {
        /// The name given.
        name: String,
    },
    /// A layout the backend cannot keep vCPU state in.
    #[error("the {backend} backend keeps vCPU state in the {only} layout, not {asked}")]
    LayoutNotOffered {
        /// The backend.
        backend: &'static str,
        /// The layout asked for.
        asked: NativeLayout,
        /// The one it keeps.
        only: NativeLayout,
    },
}

impl BackendSpec {
    /// The backends a command line can name.
    pub const NAMES: [&'static str; 2] = ["sim", "kvm"];

    /// A sim backend keeping vCPU state in `layout`.
    pub fn sim(layout: NativeLayout) -> Self {
        BackendSpec::Sim { layout }
    }

    /// The backend `name` with the layout given for it on a command line, if any. The sim keeps
    /// vCPU state in `layout` (`sim_default` when none was given); kvm refuses any layout but
    /// its own rather than ignore it.
    pub fn from_flags(
        name: &str,
        layout: Option<NativeLayout>,
        sim_default: NativeLayout,
    ) -> Result<Self, BackendSpecError> {
        match name {
            "sim" => Ok(BackendSpec::sim(layout.unwrap_or(sim_default))),
            "kvm" => match layout {
                None | Some(NativeLayout::Kvm) => Ok(BackendSpec::Kvm),
                Some(asked) => Err(BackendSpecError::LayoutNotOffered {
                    backend: "kvm",
                    asked,
                    only: NativeLayout::Kvm,
                }),
            },
            other => Err(BackendSpecError::UnknownBackend {
                name: other.to_string(),
            }),
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        match self {
            BackendSpec::Sim { .. } => "sim",
            BackendSpec::Kvm => "kvm",
            BackendSpec::Custom(h) => h.name(),
        }
    }

    /// The hypervisor this spec names. Cheap, and it never fails: a backend this build or host
    /// cannot run says so in [`Hypervisor::check_available`].
    pub fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        match self {
            BackendSpec::Sim { layout } => Arc::new(SimHypervisor::new(*layout)),
            BackendSpec::Kvm => super::kvm_hypervisor(),
            BackendSpec::Custom(h) => Arc::clone(h),
        }
    }

    /// Checks that this host can run the backend (for kvm: that /dev/kvm opens).
    pub fn check_available(&self) -> Result<(), VmmError> {
        self.hypervisor().check_available()
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend this build does not have (kvm off x86-64 Linux): it offers nothing and refuses
/// every guest, so that a spec naming it fails where the host is added, with the reason.
#[derive(Debug)]
pub struct Unsupported {
    /// The backend's name.
    pub name: &'static str,
    /// What it would need.
    pub needs: &'static str,
}

impl Unsupported {
    fn refusal(&self) -> VmmError {
        VmmError::Unsupported {
            backend: self.name,
            needs: self.needs,
        }
    }
}

impl Hypervisor for Unsupported {
    fn name(&self) -> &str {
        self.name
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        HypervisorCapabilities {
            algorithms: Vec::new(),
            layouts: Vec::new(),
        }
    }

    fn check_available(&self) -> Result<(), VmmError> {
        Err(self.refusal())
    }

    fn create_guest(&self, _: VmConfig, _: WorkloadSpec) -> Result<Arc<dyn Guest>, VmmError> {
        Err(self.refusal())
    }

    fn reserve_guest(&self, _: VmConfig, _: super::MemoryCommit) -> Result<Arc<dyn Guest>, VmmError> {
        Err(self.refusal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::VmId;

    #[test]
    fn test_flags_name_only_backends_that_can_exist() {
        use NativeLayout::{Kvm, XenHvm};
        let cases: [(&str, Option<NativeLayout>, Result<&str, &str>); 6] = [
            ("sim", None, Ok("Sim { layout: XenHvm }")),
            ("sim", Some(Kvm), Ok("Sim { layout: Kvm }")),
            ("kvm", None, Ok("Kvm")),
            ("kvm", Some(Kvm), Ok("Kvm")),
            (
                "kvm",
                Some(XenHvm),
                Err("the kvm backend keeps vCPU state in the kvm layout, not xen-hvm"),
            ),
            ("qemu", None, Err("unknown backend \"qemu\" (sim, kvm)")),
        ];
        for (name, layout, want) in cases {
            let got = BackendSpec::from_flags(name, layout, XenHvm)
                .map(|spec| format!("{spec:?}"))
                .map_err(|e| e.to_string());
            assert_eq!(
                got.as_deref(),
                want.map_err(|e| e.to_string()).as_deref(),
                "{name} {layout:?}"
            );
        }
    }

    #[test]
    fn test_an_unsupported_backend_offers_nothing_and_refuses_every_guest() {
        let h = Unsupported {
            name: "kvm",
            needs: "x86-64 Linux",
        };
        assert_eq!(h.capabilities().algorithms, Vec::new());
        let refused = h.check_available().expect_err("refused");
        assert_eq!(refused.to_string(), "the kvm backend needs x86-64 Linux");
        let config = VmConfig {
            id: VmId("vm".into()),
            name: "vm".into(),
            vcpus: 1,
            memory_bytes: 1 << 20,
            page_size: crate::units::PAGE_SIZE as u32,
            nics: Vec::new(),
        };
        assert!(h.create_guest(config.clone(), WorkloadSpec::idle()).is_err());
        assert!(h.reserve_guest(config, crate::vmm::MemoryCommit::UpFront).is_err());
    }
}
