//! Where a migration's target is and how to open a link to it: once at the start, and again
//! when post-copy recovery replaces a link lost in the pull phase.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use actix::prelude::*;

use super::host::{AcceptLink, Host};
use super::receiver::ReceiverParams;
use crate::link::tls::TlsSetup;
use crate::link::{self, LinkEnd, Shaping, TokenBucket};
use crate::protocol::auth::ClusterKey;

/// The way to the target.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// A host of the same engine: a fresh in-process pair, its far end handed to the host.
    InProcess {
        target: Addr<Host>,
        shaping: Shaping,
        budget: Option<Arc<Mutex<TokenBucket>>>,
        params: ReceiverParams,
    },
    /// A daemon over TCP (and TLS when configured).
    Tcp {
        addr: SocketAddr,
        streams: u8,
        bandwidth: Option<u64>,
        budget: Option<Arc<Mutex<TokenBucket>>>,
        tls: Option<TlsSetup>,
        key: Option<ClusterKey>,
    },
}

impl Route {
    /// Opens a new link; the error says why none could be opened.
    pub async fn connect(&self) -> Result<LinkEnd, String> {
        match self {
            Route::InProcess {
                target,
                shaping,
                budget,
                params,
            } => {
                if !target.connected() {
                    return Err("the target host stopped".into());
                }
                let (near, far) = link::pair_with_budget(*shaping, budget.clone());
                target
                    .send(AcceptLink {
                        end: far,
                        params: params.clone(),
                    })
                    .await
                    .map_err(|e| format!("the target host stopped: {e}"))?;
                Ok(near)
            }
            Route::Tcp {
                addr,
                streams,
                bandwidth,
                budget,
                tls,
                key,
            } => link::tcp::connect(*addr, *streams, *bandwidth, budget.clone(), tls.as_ref(), key.as_ref())
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}")),
        }
    }
}
