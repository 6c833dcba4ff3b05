//! Activation: `Commit` arrived, the VM belongs to this host. It resumes here, its NICs are
//! announced at their new place, and `Activated` ends the downtime. A post-copy guest still
//! lacks pages: the pull phase starts.

use actix::Addr;

use super::super::ask::{ask, GUEST_ASK};
use super::finish::{failed, violation};
use super::run::{Flow, TargetRun};
use crate::announce::Announcer;
use crate::engine::MigrationEvent;
use crate::protocol::ControlMessage;
use crate::vm::{ResumeVm, Vm};
use crate::vmm::Guest;

impl TargetRun {
    pub(super) async fn activate(&mut self) -> Flow {
        self.committed = true;
        let (vm, guest) = self.vm.clone().ok_or_else(|| violation("commit before reservation"))?;
        let id = guest.config().id.0.clone();
        // A post-copy link lost from here on is recoverable: the recovery path is registered
        // before anything else can fail. The host keeps the only sender: discarding the copy
        // there ends a wait for recovery.
        if self.postcopy {
            if let Some(to) = self.recovery.to.take() {
                self.host.register_recoverable(id.clone(), to);
            }
        }
        if self.postcopy {
            // Track what the guest writes from now on: those pages may differ from what
            // arrived, and the check after the pull must tell them apart.
            guest.start_dirty_log().map_err(failed)?;
        }
        resume(&vm).await?;
        // The VM has run here: a fence asking later must not hear `absent`, even once the VM
        // has moved on, or the source's older copy could resume beside it.
        self.host.committed(id);
        self.send(ControlMessage::Activated).await?;
        // After `Activated`, so the downtime never includes it; the frames go out on a thread.
        self.announce(guest.as_ref());
        // Verifying after activation, the source asks for the digests (`SendDigests`).
        if self.postcopy {
            self.pulling = true;
            self.check_pull_done().await
        } else {
            Ok(())
        }
    }

    /// Announces every NIC's MAC at its new place: a host with an interface sends the rounds
    /// of frames in the background; each NIC's event says where they went.
    fn announce(&self, guest: &dyn Guest) {
        let nics = &guest.config().nics;
        let via = match &self.announce_via {
            Some(iface) if !nics.is_empty() => {
                let macs = nics.iter().map(|n| n.mac).collect();
                Announcer::new(iface.clone(), self.announce)
                    .start(macs)
                    .then(|| iface.clone())
            }
            _ => None,
        };
        let frames = if via.is_some() { self.announce.frame_count(1) } else { 0 };
        for nic in nics {
            self.publish(MigrationEvent::NetworkAnnounced {
                nic: nic.id.clone(),
                mac: nic.mac.to_string(),
                host: self.host_name.clone(),
                via: via.clone(),
                frames,
            });
        }
    }
}

/// Resumes the VM; a failure is the target's.
pub(super) async fn resume(vm: &Addr<Vm>) -> Flow {
    match ask(vm, ResumeVm, "vm resume", GUEST_ASK).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(failed(e)),
        Err(e) => Err(failed(e)),
    }
}
