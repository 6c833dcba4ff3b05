//! The switchover, seen from the target: every batch applied, demand paging armed for the
//! pages that did not come (post-copy), the vCPU and device state loaded and read back, and
//! `Prepared` (after the digests, in the pre-copy order).

use std::sync::Arc;

use super::super::ask::{ask, GUEST_ASK};
use super::finish::{failed, violation, Exit};
use super::run::{Flow, TargetRun};
use crate::dirty::PageSet;
use crate::format::{DeviceState, VcpuState};
use crate::protocol::{AbortReason, ControlMessage};
use crate::vm::LoadVmState;

impl TargetRun {
    /// The source has paused and sent `batches` in all: waits until each is applied, then
    /// arms demand paging for `missing` (a page bitmap, empty unless post-copy).
    pub(super) async fn suspend(&mut self, batches: u64, missing: &[u8]) -> Flow {
        let plane = self.plane("pages before reservation")?;
        match tokio::time::timeout(self.params.step_timeout, plane.wait_applied(batches)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => {
                return Err(Exit::Fail(AbortReason::Timeout {
                    stage: "stopcopy".into(),
                    after_ms: self.params.step_timeout.as_millis() as u64,
                }))
            }
        }
        // Every page is here: memory committed in the background must be whole before
        // `Prepared`, so that a host that cannot back the VM refuses while the source still
        // owns it. With pages missing (post-copy) the commit goes on after activation instead,
        // beside the pages that arrive (a backend that drops the missing pages waits for it
        // first, in `begin_demand_paging`).
        let guest = self.guest()?;
        if missing.is_empty() && !guest.memory().committed() {
            let g = Arc::clone(&guest);
            let waited = tokio::task::spawn_blocking(move || g.memory().wait_committed()).await;
            match waited {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Exit::Fail(AbortReason::TargetFailed {
                        detail: format!("the reservation's memory could not be committed: {e}"),
                    }))
                }
                Err(e) => return Err(failed(e)),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let pages = guest.memory().page_count();
        let set = PageSet::from_bytes(missing, pages).ok_or_else(|| {
            violation(format!(
                "missing-page bitmap of {} bytes for {pages} pages",
                missing.len()
            ))
        })?;
        // A pushed or pulled page that arrives damaged is asked for again, like a fault.
        plane.refetch_to(self.wanted.sink.clone());
        guest
            .begin_demand_paging(&set, self.wanted.sink.clone())
            .map_err(failed)?;
        self.postcopy = true;
        Ok(())
    }

    /// Loads the state into the VM, checks that it reads back unchanged, and answers
    /// `Prepared`.
    pub(super) async fn load_state(&mut self, vcpus: Vec<VcpuState>, devices: Vec<DeviceState>) -> Flow {
        let (vm, guest) = self.vm.clone().ok_or_else(|| violation("state before reservation"))?;
        let load = ask(
            &vm,
            LoadVmState {
                vcpus: vcpus.clone(),
                devices,
            },
            "vm state load",
            GUEST_ASK,
        );
        let load_failed = |detail: String| Exit::Fail(AbortReason::StateLoadFailed { detail });
        match load.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(load_failed(e.to_string())),
            Err(e) => return Err(failed(e)),
        }
        // The state now lives in this backend's native layout; reading it back must give what
        // the source sent, or the conversion lost something.
        let back = guest.save_vcpus().map_err(|e| load_failed(e.to_string()))?;
        if back != vcpus {
            return Err(load_failed(format!(
                "vCPU state changed through the {} layout",
                guest.layout()
            )));
        }
        if !self.postcopy && !self.digests_after_activation {
            // Verification before commitment: the source compares these with its memory and
            // rolls back on a difference, while it still owns the VM.
            self.send_digests(false).await?;
        }
        self.send(ControlMessage::Prepared).await
    }
}
