//! Admission: whether a migration may land here, and where. A slot under the host's cap, the
//! negotiation (`Welcome` or `Refuse`), the source's proof of the cluster key, and the
//! reservation that starts the data plane. A fence query is answered here too, in place of a
//! migration.

use std::sync::Arc;
use std::time::Duration;

use super::super::ask::BACKEND_ASK;
use super::finish::{failed, violation, Exit};
use super::host_port::ReserveIncoming;
use super::run::{halted, Flow, TargetRun};
use crate::clock;
use crate::dataplane::TargetPlane;
use crate::format::VmConfig;
use crate::link::{LinkEvent, LinkEvents};
use crate::protocol::auth;
use crate::protocol::negotiation::{accept_hello, negotiate};
use crate::protocol::{AbortReason, Algorithm, Capabilities, Compression, ControlMessage, PageCodecs};

/// The nonces of the cluster-key handshake, and whether the source has proved the key.
#[derive(Debug, Default)]
pub(super) struct Handshake {
    authenticated: bool,
    /// Ours, sent in `Welcome`.
    nonce: Vec<u8>,
    /// The source's, from `Hello`.
    source_nonce: Vec<u8>,
}

impl TargetRun {
    /// Queued behind the host's cap: the Link already answers the source's pings, and the
    /// source's Hello waits in the inbox until a slot frees, the step bound passes, or the host
    /// shuts down.
    pub(super) async fn wait_for_slot(&mut self, inbox: &mut LinkEvents) -> Flow {
        let Some(mut slot) = self.slot.take() else {
            return Ok(());
        };
        let deadline = clock::now() + self.params.step_timeout;
        let mut halt = self.halt.clone();
        loop {
            let reading = self.pending.is_none();
            tokio::select! {
                granted = &mut slot => return granted.map_err(|_| failed("target host stopped")),
                halt = halted(&mut halt, false) => return Err(halt.exit()),
                // A recovery link takes no slot: its migration holds one already, and waiting
                // would keep that migration's guest paused.
                ev = inbox.recv(), if reading => match ev {
                    Some(LinkEvent::Received(m)) => {
                        let resume = matches!(m, ControlMessage::Hello { resume: true, .. });
                        self.pending = Some(m);
                        if resume {
                            return Ok(());
                        }
                    }
                    Some(LinkEvent::Lost(e)) => return Err(Exit::LinkLost(e.to_string())),
                    None => return Err(Exit::LinkLost("link actor stopped".into())),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let reason = AbortReason::TargetFailed {
                        detail: format!(
                            "host {} stayed at its cap of incoming migrations for {} s",
                            self.host_name,
                            self.params.step_timeout.as_secs()
                        ),
                    };
                    let _ = self.send(ControlMessage::Refuse { reason }).await;
                    return Err(Exit::Clean);
                }
            }
        }
    }

    /// Answers `Hello` with `Welcome` or `Refuse`. `requested`: the algorithm of a new
    /// migration; `None` for a recovery link, which carries on an algorithm agreed already, so
    /// only versions are checked.
    pub(super) async fn negotiate(
        &mut self,
        source: &Capabilities,
        requested: Option<crate::format::Wire<Algorithm>>,
        source_nonce: Vec<u8>,
    ) -> Flow {
        if self.params.refuse_new && requested.is_some() {
            return self.refuse(AbortReason::ShuttingDown).await;
        }
        let checked = accept_hello(source, &self.caps).and_then(|v| match requested {
            Some(a) => negotiate(source, &self.caps, a).map(|_| v),
            None => Ok(v),
        });
        let version = match checked {
            Ok(version) => version,
            Err(e) => return self.refuse(e.into()).await,
        };
        let proof = match &self.params.key {
            Some(key) => {
                if source_nonce.len() != auth::NONCE_LEN {
                    return self
                        .refuse(AbortReason::Unauthenticated {
                            detail: "this host requires a cluster key; the source offered none".into(),
                        })
                        .await;
                }
                self.handshake.nonce = auth::nonce().map_err(failed)?;
                key.prove(auth::TARGET, &source_nonce, &self.handshake.nonce)
            }
            None => Vec::new(),
        };
        self.handshake.source_nonce = source_nonce;
        self.send(ControlMessage::Welcome {
            version,
            capabilities: self.caps.clone(),
            nonce: self.handshake.nonce.clone(),
            proof,
        })
        .await
    }

    /// Says no to the source and ends the run cleanly: nothing was reserved yet.
    async fn refuse(&self, reason: AbortReason) -> Flow {
        self.send(ControlMessage::Refuse { reason }).await?;
        Err(Exit::Clean)
    }

    pub(super) fn authenticate(&mut self, proof: &[u8]) -> Flow {
        let Some(key) = &self.params.key else {
            // No key here: nothing to check, the proof is ignored.
            return Ok(());
        };
        let Handshake {
            nonce, source_nonce, ..
        } = &self.handshake;
        if key.verify(auth::SOURCE, nonce, source_nonce, proof) {
            self.handshake.authenticated = true;
            Ok(())
        } else {
            Err(Exit::Fail(AbortReason::Unauthenticated {
                detail: "the source's proof does not match this host's cluster key".into(),
            }))
        }
    }

    /// Reserves the VM through the host and starts the data plane on the link's data half.
    pub(super) async fn reserve(&mut self, config: VmConfig, commit: crate::vmm::MemoryCommit) -> Flow {
        if self.params.key.is_some() && !self.handshake.authenticated {
            return Err(Exit::Fail(AbortReason::Unauthenticated {
                detail: "Reserve before a valid Authenticate".into(),
            }));
        }
        let (data_rx, pool) = self.data.take().ok_or_else(|| violation("second reservation"))?;
        let reserve = ReserveIncoming {
            config,
            commit,
            decorate: None,
        };
        // Longer than the host's own bound on the backend: the host answers first, and a
        // reservation is never made for an asker that has gone.
        let bound = BACKEND_ASK + Duration::from_secs(30);
        let (vm, guest) = self.host.reserve(reserve, bound).await.map_err(Exit::Fail)?;
        self.vm = Some((vm, Arc::clone(&guest)));
        let accept = PageCodecs {
            lz4: self.caps.compression.contains(&Compression::Lz4),
            xbzrle: self.caps.compression.contains(&Compression::Xbzrle),
        };
        self.plane = Some(TargetPlane::spawn(guest, data_rx, pool, accept).map_err(failed)?);
        self.send(ControlMessage::Reserved).await
    }

    /// A peer's fence asks whether `vm` lives here: the host's answer goes back, and the run
    /// ends.
    pub(super) async fn answer_query(&self, vm: String) -> Exit {
        let state = match self.host.vm_status(vm.clone()).await {
            Ok(s) => s,
            Err(e) => return failed(e),
        };
        match self.send(ControlMessage::VmStatus { vm, state }).await {
            Ok(()) => Exit::Answered,
            Err(e) => e,
        }
    }
}
