//! `premigration` and `reservation`: the handshake (versions, capabilities, both proofs of
//! the cluster key), the pool both sides compute, and the target's reservation.

use std::time::Duration;
use tokio::sync::mpsc;

use super::fail::{local, Fail};
use super::SourceRun;
use crate::clock;
use crate::engine::error::Side;
use crate::protocol::auth;
use crate::protocol::negotiation::{choose_compression, negotiate, Pool};
use crate::protocol::{AbortReason, Capabilities, ControlMessage};

impl SourceRun {
    /// `Hello`, `Welcome`, and both proofs of the cluster key. Returns the version the target
    /// chose and its capabilities. A recovery link always sends `Authenticate` (empty without
    /// a key), so the target knows when to hand it over.
    pub(super) async fn handshake(&mut self, resume: bool) -> Result<(u32, Capabilities), Fail> {
        let my_nonce = match &self.s.key {
            Some(_) => auth::nonce().map_err(local)?,
            None => Vec::new(),
        };
        self.send(ControlMessage::Hello {
            capabilities: self.s.caps.clone(),
            requested: self.s.req.algorithm.in_hello().into(),
            vm: self.s.guest.config().id.0.clone(),
            nonce: my_nonce.clone(),
            resume,
        })
        .await?;
        let (version, target_caps, their_nonce, proof) = match self.expect("Welcome").await? {
            ControlMessage::Welcome {
                version,
                capabilities,
                nonce,
                proof,
            } => (version, capabilities, nonce, proof),
            other => return Err(Fail::Protocol(format!("expected Welcome, got {}", other.name()))),
        };
        let proof = match &self.s.key {
            Some(key) => {
                // The target proves the key first; only then does this side reveal its own.
                if !key.verify(auth::TARGET, &my_nonce, &their_nonce, &proof) {
                    return Err(Fail::Aborted {
                        side: Side::Source,
                        reason: AbortReason::Unauthenticated {
                            detail: "the target's proof does not match this host's cluster key".into(),
                        },
                    });
                }
                Some(key.prove(auth::SOURCE, &their_nonce, &my_nonce))
            }
            None => None,
        };
        if proof.is_some() || resume {
            self.send(ControlMessage::Authenticate {
                proof: proof.unwrap_or_default(),
            })
            .await?;
        }
        Ok((version, target_caps))
    }

    /// Opens the link, shakes hands and negotiates the pool.
    pub(super) async fn premigration(&mut self) -> Result<Pool, Fail> {
        let control = std::mem::replace(
            &mut self.s.end.control,
            crate::link::ControlChannel {
                tx: mpsc::channel(1).0,
                rx: mpsc::channel(1).1,
                latency: Duration::ZERO,
                fault: Default::default(),
            },
        );
        self.open_link(control);
        let sent = clock::now();
        let (version, target_caps) = self.handshake(false).await?;
        self.rtt = clock::now().duration_since(sent);
        self.target_layout = target_caps
            .layouts
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let pool = negotiate(&self.s.caps, &target_caps, self.s.req.algorithm).map_err(Fail::Negotiation)?;
        self.codecs = choose_compression(
            self.s.req.compression,
            self.s.req.shaping.bandwidth_bytes_per_sec,
            &self.s.caps,
            &target_caps,
        )
        .map_err(Fail::Negotiation)?;
        if pool.version != version {
            return Err(Fail::Protocol(format!(
                "target chose protocol version {version}, expected {}",
                pool.version
            )));
        }
        Ok(pool)
    }

    pub(super) async fn reservation(&mut self) -> Result<(), Fail> {
        // Refused here rather than by the target, which would only see a peer breaking the rules.
        self.s.req.announce.validate().map_err(local)?;
        self.send(ControlMessage::Reserve {
            config: self.s.guest.config().clone(),
            algorithm: self.machine.reserving().into(),
            announce: Some(self.s.req.announce),
        })
        .await?;
        self.expect("Reserved").await?;
        Ok(())
    }
}
