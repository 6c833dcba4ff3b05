//! `/vms`: the VMs of the daemon's host, and the operator's actions on held copies.

use serde::{Deserialize, Serialize};

use crate::engine::VmSpec;
use crate::vm::VmInfo;
use crate::vmm::WorkloadSpec;

/// `POST /vms`: a sim VM to create and start. Left out, `vcpus` and `working_set_bytes` take
/// the engine's defaults ([`VmSpec::new`], [`WorkloadSpec::default`]) and the guest is idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVm {
    /// The VM's id: 1 to 64 characters, see [`crate::format::check_name`].
    pub id: String,
    /// Guest RAM, a multiple of 4 KiB.
    pub memory_bytes: u64,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Bytes of pages the guest's writer dirties per second; 0 is an idle guest.
    #[serde(default)]
    pub dirty_rate_bytes_per_sec: u64,
    /// The part of memory the writer dirties (its hot set for `hot-set`).
    #[serde(default = "default_working_set_bytes")]
    pub working_set_bytes: u64,
    /// Where the writer writes: `uniform`, `hot-set` (the default) or `sequential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

fn default_vcpus() -> u32 {
    VmSpec::new(String::new(), 0).vcpus
}

fn default_working_set_bytes() -> u64 {
    WorkloadSpec::default().working_set_bytes
}

/// A VM as the API shows it: each entry of `GET /vms`, and the answer to `POST /vms` and
/// `POST /vms/{id}/resume`.
///
/// The daemon always sends the guest's three counters; they are optional here so that an
/// answer without them (or with `null`) still reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// The VM's id.
    pub id: String,
    /// Its lifecycle state (`running`, `paused`, ...), or for a held copy the reason it is held
    /// (`committed-unconfirmed`, `stale`, `unverified`, `awaiting-pages`).
    pub state: String,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The native vCPU layout of the host's backend (`kvm`, `xen-hvm`).
    pub layout: String,
    /// Pages the guest wrote (for a kvm guest, its own progress counter, carried across moves).
    pub writes: Option<u64>,
    /// Verify passes of a self-checking guest (0 for a guest that does not check itself).
    pub verify_passes: Option<u64>,
    /// Pages a self-checking guest found not as it wrote them; must stay 0.
    pub integrity_errors: Option<u64>,
    /// Why a copy is held, and the peer where the other copy may be; `None` unless held.
    pub reason: Option<String>,
    /// The operator actions a held copy allows (`resume`, `discard`, `recover`).
    #[serde(default)]
    pub actions: Vec<String>,
}

impl From<&VmInfo> for Vm {
    fn from(v: &VmInfo) -> Self {
        Self {
            id: v.config.id.0.clone(),
            state: match &v.held {
                Some(h) => h.reason.name().to_string(),
                None => v.state.name().to_string(),
            },
            memory_bytes: v.config.memory_bytes,
            vcpus: v.config.vcpus,
            layout: v.layout.to_string(),
            writes: Some(v.stats.writes),
            verify_passes: Some(v.stats.verify_passes),
            integrity_errors: Some(v.stats.integrity_errors),
            reason: v.held.as_ref().map(|h| match &h.peer {
                Some(peer) => format!("{} (peer {peer})", h.detail),
                None => h.detail.clone(),
            }),
            actions: v
                .held
                .as_ref()
                .map(|h| h.reason.actions().iter().map(|a| a.name().to_string()).collect())
                .unwrap_or_default(),
        }
    }
}

/// `POST /vms/{id}/resume`: run a held `committed-unconfirmed` (or `stale`) copy again. The
/// resume is fenced: the peer is asked first whether it holds the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeVm {
    /// The peer is known to be dead: resume even if it cannot be asked. A peer that answers
    /// that it holds the VM still refuses the resume.
    #[serde(default)]
    pub peer_is_dead: bool,
}

/// The answer to `POST /vms/{id}/discard`: the held copy is destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discarded {
    /// The VM whose copy was destroyed.
    pub discarded: String,
}

/// `POST /vms/{id}/recover`: carry on the post-copy pull of a held `stale` copy. Answered with
/// a [`MigrationStarted`](super::MigrationStarted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverVm {
    /// Where the target's migration listener is now (`HOST:PORT`), if it moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_create_vm_takes_the_engine_defaults() {
        let body: CreateVm = serde_json::from_value(json!({"id": "vm1", "memory_bytes": 16 << 20})).unwrap();
        let spec = VmSpec::new("vm1", 16 << 20);
        assert_eq!(body.vcpus, spec.vcpus);
        assert_eq!(body.working_set_bytes, spec.workload.working_set_bytes);
        assert_eq!((body.dirty_rate_bytes_per_sec, body.pattern), (0, None));
    }

    #[test]
    fn test_operator_bodies_refuse_unknown_fields() {
        assert!(serde_json::from_value::<ResumeVm>(json!({"peer_is_ded": true})).is_err());
        assert!(serde_json::from_value::<RecoverVm>(json!({"too": "h:1"})).is_err());
        assert_eq!(serde_json::to_value(RecoverVm::default()).unwrap(), json!({}));
    }

    #[test]
    fn test_vm_reads_an_answer_without_the_guest_counters() {
        let vm: Vm = serde_json::from_value(json!({"id": "vm1", "state": "running", "memory_bytes": 4096,
            "vcpus": 1, "layout": "kvm", "writes": null}))
        .unwrap();
        assert_eq!((vm.writes, vm.verify_passes, vm.reason), (None, None, None));
        assert!(vm.actions.is_empty());
    }
}
