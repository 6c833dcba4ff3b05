//! The fence of `resume`: before a held copy runs again, the peer that may hold the other copy
//! is asked. Only a peer that answers `absent` lets the resume go on; a peer that cannot be
//! asked refuses it, unless the operator states that the peer is dead.

use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;

use super::host::{Host, QueryVmState};
use crate::link::tls::TlsSetup;
use crate::link::{event_channel, CloseLink, Keepalive, Link, LinkEvent, SendControl};
use crate::protocol::auth::ClusterKey;
use crate::protocol::ControlMessage;
use crate::vm::Peer;

/// How long the peer has to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The peer's answer when it does not hold the VM.
pub(crate) const ABSENT: &str = "absent";

/// Asks `peer` what it holds of `vm`: `Ok(state)`, or why it could not be asked.
pub(crate) async fn ask_peer(
    peer: &Peer,
    vm: &str,
    local: Option<Addr<Host>>,
    tls: Option<&TlsSetup>,
    key: Option<&ClusterKey>,
) -> Result<String, String> {
    match peer {
        Peer::Local(name) => match local {
            Some(host) => tokio::time::timeout(QUERY_TIMEOUT, host.send(QueryVmState(vm.to_string())))
                .await
                .map_err(|_| format!("host {name} did not answer within {QUERY_TIMEOUT:?}"))?
                .map_err(|e| format!("host {name}: {e}")),
            None => Err(format!("host {name} is gone from this engine")),
        },
        Peer::Remote(addr) => tokio::time::timeout(QUERY_TIMEOUT, ask_remote(*addr, vm, tls, key))
            .await
            .map_err(|_| format!("{addr} did not answer within {QUERY_TIMEOUT:?}"))?,
    }
}

/// The query goes over a link authenticated like a migration's (cluster key, TLS): a fence
/// believes only a peer that proved the key.
async fn ask_remote(
    addr: SocketAddr,
    vm: &str,
    tls: Option<&TlsSetup>,
    key: Option<&ClusterKey>,
) -> Result<String, String> {
    let end = crate::link::tcp::connect(addr, 1, None, None, tls, key)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let (owner, mut inbox) = event_channel();
    let link = Link::new(end.control, owner, Keepalive::default()).start();
    let asked = link
        .send(SendControl(ControlMessage::QueryVm { vm: vm.to_string() }))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let answer = match asked {
        Err(e) => Err(format!("{addr}: {e}")),
        Ok(()) => loop {
            match inbox.recv().await {
                Some(LinkEvent::Received(ControlMessage::VmStatus { vm: v, state })) if v == vm => break Ok(state),
                Some(LinkEvent::Received(ControlMessage::Refuse { reason }))
                | Some(LinkEvent::Received(ControlMessage::Abort { reason })) => {
                    break Err(format!("{addr} refused: {reason}"))
                }
                Some(LinkEvent::Received(_)) => continue,
                Some(LinkEvent::Lost(e)) => break Err(format!("{addr}: {e}")),
                None => break Err(format!("{addr}: link closed")),
            }
        },
    };
    link.do_send(CloseLink);
    answer
}
