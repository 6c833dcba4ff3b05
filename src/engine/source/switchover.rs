//! `stopcopy`, `commitment` and `activation`: the pause, the final pages or their hand-over to
//! demand paging, the state, the verification of every page, the point of no return, and the
//! release of the source copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::fail::{local, Fail};
use super::SourceRun;
use crate::clock;
use crate::dirty::{CollectDirtyPages, PageSet, StopDirtyLog};
use crate::engine::ask::{ask, GUEST_ASK};
use crate::engine::plan::Switchover;
use crate::engine::testpoint;
use crate::engine::verify;
use crate::protocol::ControlMessage;
use crate::units::PAGE_SIZE;
use crate::vm::{EndOutgoing, PauseVm, SaveVmState};

/// Most `Digests` messages a target may send before `Prepared` (an older target's way): a
/// 16 TiB VM's worth at the receiver's 2^20 digests per message.
const MAX_DIGEST_MESSAGES: usize = 4096;

impl SourceRun {
    /// Pauses the VM and sends what it needs to run on the target: for stop-and-copy the last
    /// dirty pages (verifying before commit, hashing the still memory meanwhile), for
    /// post-copy the map of the pages the target will pull; then the state. Only what needs
    /// the VM paused happens between the pause and `Activated`: the dirty log is torn down,
    /// and the digests compared (unless before commit), after it.
    pub(super) async fn switchover(&mut self, how: Switchover) -> Result<(), Fail> {
        let pending = self.take_pending();
        let mut pages = self.pause_and_collect(pending).await?;
        self.maybe_lose_page(&mut pages);
        let digests_after_activation = match how {
            Switchover::StopAndCopy => {
                let after = self.machine.verifies_after_activation();
                // Memory is still from here on: hash it while the last pages travel, when
                // verifying before commit, or when those pages are most of the VM (a
                // stop-and-copy) so that the hash overlaps their transfer. A short final set
                // leaves the cores to the downtime; the hash then runs after it.
                let most = pages.len().saturating_mul(4) >= self.s.guest.memory().page_count();
                if !after || most {
                    self.hashing = Some(self.hash_memory());
                }
                let final_started = clock::now();
                let rate = self.s.req.policy.rate_cap;
                let round = self.rounds;
                let stats = self.send_round(round, pages, rate).await?;
                self.final_pages_time = clock::now().duration_since(final_started);
                self.parts.final_pages_s = self.final_pages_time.as_secs_f64();
                if stats.bytes > 0 && self.bandwidth == 0.0 {
                    self.bandwidth = stats.page_bytes_per_sec();
                }
                self.first_pass_done = true;
                self.set_remaining(0);
                self.send_state(Vec::new(), after).await?;
                after
            }
            Switchover::Postcopy => {
                let missing = pages.to_bytes();
                // The pull serves and pushes these.
                self.pending = pages;
                self.send_state(missing, false).await?;
                false
            }
        };
        tracing::debug!(digests_after_activation, "state sent");
        Ok(())
    }

    /// `Prepared`: the target holds the state (and, verifying before commit, the digests
    /// matched).
    pub(super) async fn prepared(&mut self) -> Result<(), Fail> {
        let since = clock::now();
        loop {
            match self.recv().await? {
                ControlMessage::Prepared => break,
                // A target that does not know `digests_after_activation` sends them here.
                m @ ControlMessage::Digests { .. } if self.early_digests.len() < MAX_DIGEST_MESSAGES => {
                    self.early_digests.push(m)
                }
                other => return Err(Fail::Protocol(format!("expected Prepared, got {}", other.name()))),
            }
        }
        self.parts.prepare_s = clock::now().duration_since(since).as_secs_f64();
        Ok(())
    }

    /// `Activated` ends the downtime; its figures feed the next migration's predictions. The
    /// dirty log, idle since the pause, is torn down only now.
    pub(super) async fn activated(&mut self) -> Result<(), Fail> {
        self.expect("Activated").await?;
        let now = clock::now();
        self.downtime = self.paused_at.map(|t| now.duration_since(t));
        if let Some(sent) = self.commit_sent {
            self.parts.activation_s = now.duration_since(sent).as_secs_f64();
        }
        self.record_switchover(self.final_pages_time);
        self.close_stage();
        if let Some(tracker) = self.tracker.take() {
            let _ = ask(&tracker, StopDirtyLog, "dirty log stop", GUEST_ASK).await;
        }
        Ok(())
    }

    /// Pauses the VM (the start of downtime) and takes the final dirty set. The dirty log
    /// stays on (idle: the guest is paused) until the downtime is over.
    async fn pause_and_collect(&mut self, mut pages: PageSet) -> Result<PageSet, Fail> {
        let was_running = self.s.guest.is_running();
        if self.faults.as_ref().is_some_and(|f| f.pause_fails.get()) {
            return Err(Fail::Local("injected fault: backend error on pause".into()));
        }
        // Marked before the ask: if it times out, the pause still lands later in the VM's turn,
        // and a rollback must resume after it.
        self.paused_by_us = was_running;
        self.vm_call(PauseVm).await?.map_err(local)?;
        let paused = clock::now();
        self.paused_at = Some(paused);
        testpoint::hold(testpoint::Point::Stopcopy, self.s.id).await;
        if let Some(tracker) = &self.tracker {
            let last = ask(tracker, CollectDirtyPages, "dirty log collect", GUEST_ASK)
                .await
                .map_err(local)?
                .map_err(local)?;
            pages.union_with(&last);
        }
        self.parts.pause_s = clock::now().duration_since(paused).as_secs_f64();
        self.set_remaining(pages.len());
        Ok(pages)
    }

    /// The injected `lose-dirty-page`: a guest write the dirty log missed. One byte of a page
    /// of the paused source changes behind the log, and the page leaves the switchover's set, so
    /// the target keeps an older copy of it. The page is the first of the set, or page 0 when
    /// the set is empty (the write alone then makes the copies differ).
    fn maybe_lose_page(&self, pages: &mut PageSet) {
        if !self.faults.as_ref().is_some_and(|f| f.lose_page.take()) {
            return;
        }
        let page = pages.iter().next().unwrap_or(0);
        pages.remove(page);
        let memory = self.s.guest.memory();
        let mut bytes = vec![0u8; PAGE_SIZE];
        let written = memory
            .read_page(crate::units::PageIndex(page), &mut bytes)
            .and_then(|()| {
                bytes[0] = bytes[0].wrapping_add(1);
                memory.write_page(crate::units::PageIndex(page), &bytes)
            });
        match written {
            Ok(()) => tracing::warn!(page, "injected fault: a guest write the dirty log missed"),
            Err(e) => tracing::warn!(page, error = %e, "injected fault: the lost write could not be made"),
        }
    }

    /// `Suspend`, then the state. `digests_after_activation`: the target sends its digests
    /// after `Activated` instead of before `Prepared`.
    async fn send_state(&mut self, missing: Vec<u8>, digests_after_activation: bool) -> Result<(), Fail> {
        let since = clock::now();
        let batches_total = self.plane.as_ref().map(|p| p.batches_sent()).unwrap_or(0);
        self.send(ControlMessage::Suspend {
            batches_total,
            missing,
            digests_after_activation,
        })
        .await?;
        let (vcpus, devices) = self.vm_call(SaveVmState).await?.map_err(local)?;
        self.send(ControlMessage::VcpuState { vcpus }).await?;
        self.send(ControlMessage::DeviceState { devices }).await?;
        self.parts.state_s = clock::now().duration_since(since).as_secs_f64();
        Ok(())
    }

    /// The point of no return. A cancel acknowledged before this instant wins (the Migration
    /// actor and this run share a thread, so nothing slips between the check and the store).
    pub(super) fn commit(&mut self) -> Result<(), Fail> {
        if *self.s.cancel.borrow() {
            return Err(Fail::Cancelled);
        }
        self.s.committed.store(true, Ordering::Release);
        self.commit_sent = Some(clock::now());
        Ok(())
    }

    /// Digests of the source's memory, computed off the actor thread; call once the guest is
    /// paused for good.
    fn hash_memory(&self) -> tokio::task::JoinHandle<Vec<u64>> {
        let guest = Arc::clone(&self.s.guest);
        tokio::task::spawn_blocking(move || verify::digests(guest.as_ref()))
    }

    /// Receives the target's digests of every page as it received it and compares them with
    /// the source's memory. A difference is a [`Fail::Verification`]. `ask`: the target waits
    /// for `SendDigests` (verification after activation).
    pub(super) async fn verify(&mut self, ask: bool) -> Result<(), Fail> {
        // Stop-and-copy began hashing at the pause; after a pull the memory is just as still.
        let hashing = match self.hashing.take() {
            Some(h) => h,
            None => self.hash_memory(),
        };
        let verify_started = clock::now();
        let mut early = std::mem::take(&mut self.early_digests).into_iter();
        if ask && early.len() == 0 {
            self.send(ControlMessage::SendDigests).await?;
        }
        let pages = self.s.guest.memory().page_count() as usize;
        let mut target = Vec::with_capacity(pages);
        let memory_mismatches;
        loop {
            let next = match early.next() {
                Some(m) => m,
                None => self.expect("Digests").await?,
            };
            match next {
                ControlMessage::Digests {
                    first_page,
                    digests,
                    last,
                    memory_mismatches: mm,
                    faults,
                    fault_wait_s,
                } => {
                    if first_page != target.len() as u64 || target.len() + digests.len() > pages {
                        return Err(Fail::Protocol(format!(
                            "digests from page {first_page} ({} of them) do not follow the {} received",
                            digests.len(),
                            target.len()
                        )));
                    }
                    target.extend_from_slice(&digests);
                    if last {
                        memory_mismatches = mm;
                        let mean = if faults > 0 { fault_wait_s / faults as f64 } else { 0.0 };
                        self.faults_seen = (faults, mean);
                        break;
                    }
                }
                other => return Err(Fail::Protocol(format!("expected Digests, got {}", other.name()))),
            }
        }
        let source = hashing.await.map_err(local)?;
        let count = verify::count_differences(&source, &target) as u64;
        let mut mismatched = verify::compare(&source, &target);
        mismatched.extend(
            memory_mismatches
                .into_iter()
                .take(crate::engine::receiver::MAX_LISTED_MISMATCHES),
        );
        mismatched.sort_unstable();
        mismatched.dedup();
        mismatched.truncate(crate::engine::receiver::MAX_LISTED_MISMATCHES);
        self.verification = clock::now().duration_since(verify_started);
        if self.cancellable() {
            // Before commit: inside the downtime.
            self.parts.verify_s = self.verification.as_secs_f64();
        }
        self.verified = mismatched.is_empty() && target.len() == source.len();
        self.mismatched = mismatched.clone();
        if !self.verified {
            return Err(Fail::Verification {
                count: count.max(mismatched.len() as u64),
                mismatched,
            });
        }
        Ok(())
    }

    /// The target verified every page and runs the VM: free the source copy and complete.
    pub(super) async fn release(&mut self) -> Result<(), Fail> {
        self.vm_call(EndOutgoing { moved: true }).await?.map_err(local)?;
        self.paused_by_us = false;
        // The copy here is gone and the target holds every page: a link that fails now changes
        // nothing; the target owns the VM whether or not it hears this.
        if let Err(e) = self.send(ControlMessage::Complete).await {
            tracing::warn!(error = ?e, "the final Complete did not reach the target; it runs the VM regardless");
        }
        Ok(())
    }
}
