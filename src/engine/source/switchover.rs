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

impl SourceRun {
    /// Pauses the VM and sends what it needs to run on the target: for stop-and-copy the last
    /// dirty pages (hashing the still memory meanwhile), for post-copy the map of the pages
    /// the target will pull; then the state.
    pub(super) async fn switchover(&mut self, how: Switchover) -> Result<(), Fail> {
        let pending = self.take_pending();
        let mut pages = self.pause_and_collect(pending).await?;
        self.maybe_lose_page(&mut pages);
        match how {
            Switchover::StopAndCopy => {
                // Memory is still from here on: hash it while the last pages travel.
                self.hashing = Some(self.hash_memory());
                let final_started = clock::now();
                let rate = self.s.req.policy.rate_cap;
                let round = self.rounds;
                let stats = self.send_round(round, pages, rate).await?;
                self.final_pages_time = clock::now().duration_since(final_started);
                if stats.bytes > 0 && self.bandwidth == 0.0 {
                    self.bandwidth = stats.page_bytes_per_sec();
                }
                self.first_pass_done = true;
                self.set_remaining(0);
                self.send_state(Vec::new()).await
            }
            Switchover::Postcopy => {
                let missing = pages.to_bytes();
                // The pull serves and pushes these.
                self.pending = pages;
                self.send_state(missing).await
            }
        }
    }

    /// `Activated` ends the downtime; its figures feed the next migration's predictions.
    pub(super) async fn activated(&mut self) -> Result<(), Fail> {
        self.expect("Activated").await?;
        self.downtime = self.paused_at.map(|t| clock::now().duration_since(t));
        self.record_switchover(self.final_pages_time);
        self.close_stage();
        Ok(())
    }

    /// Pauses the VM (the start of downtime) and takes the final dirty set.
    async fn pause_and_collect(&mut self, mut pages: PageSet) -> Result<PageSet, Fail> {
        let was_running = self.s.guest.is_running();
        if self.faults.as_ref().is_some_and(|f| f.pause_fails.get()) {
            return Err(Fail::Local("injected fault: backend error on pause".into()));
        }
        // Marked before the ask: if it times out, the pause still lands later in the VM's turn,
        // and a rollback must resume after it.
        self.paused_by_us = was_running;
        self.vm_call(PauseVm).await?.map_err(local)?;
        self.paused_at = Some(clock::now());
        testpoint::hold(testpoint::Point::Stopcopy, self.s.id).await;
        if let Some(tracker) = self.tracker.take() {
            let last = ask(&tracker, CollectDirtyPages, "dirty log collect", GUEST_ASK)
                .await
                .map_err(local)?
                .map_err(local)?;
            pages.union_with(&last);
            let _ = ask(&tracker, StopDirtyLog, "dirty log stop", GUEST_ASK).await;
        }
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

    async fn send_state(&mut self, missing: Vec<u8>) -> Result<(), Fail> {
        let batches_total = self.plane.as_ref().map(|p| p.batches_sent()).unwrap_or(0);
        self.send(ControlMessage::Suspend { batches_total, missing }).await?;
        let (vcpus, devices) = self.vm_call(SaveVmState).await?.map_err(local)?;
        self.send(ControlMessage::VcpuState { vcpus }).await?;
        self.send(ControlMessage::DeviceState { devices }).await?;
        Ok(())
    }

    /// The point of no return. A cancel acknowledged before this instant wins (the Migration
    /// actor and this run share a thread, so nothing slips between the check and the store).
    pub(super) fn commit(&mut self) -> Result<(), Fail> {
        if *self.s.cancel.borrow() {
            return Err(Fail::Cancelled);
        }
        self.s.committed.store(true, Ordering::Release);
        Ok(())
    }

    /// Digests of the source's memory, computed off the actor thread; call once the guest is
    /// paused for good.
    fn hash_memory(&self) -> tokio::task::JoinHandle<Vec<u64>> {
        let guest = Arc::clone(&self.s.guest);
        tokio::task::spawn_blocking(move || verify::digests(guest.as_ref()))
    }

    /// Receives the target's digests of every page as it received it and compares them with
    /// the source's memory. A difference is a [`Fail::Verification`].
    pub(super) async fn verify(&mut self) -> Result<(), Fail> {
        // Stop-and-copy began hashing at the pause; after a pull the memory is just as still.
        let hashing = match self.hashing.take() {
            Some(h) => h,
            None => self.hash_memory(),
        };
        let verify_started = clock::now();
        let pages = self.s.guest.memory().page_count() as usize;
        let mut target = Vec::with_capacity(pages);
        let memory_mismatches;
        loop {
            match self.expect("Digests").await? {
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
