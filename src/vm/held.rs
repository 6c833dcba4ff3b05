//! Copies left behind. A migration that fails past commitment can leave a copy of the VM that
//! neither runs nor migrates: the source's paused copy after an unanswered `Commit`, the
//! source's copy after a post-copy pull that could not be recovered, or the target's copy that
//! still lacks pages. Such a copy is **held**: the host lists it with its reason, and only an
//! operator action ends it. Nothing frees or resumes a held copy by itself, because either
//! could lose the VM or run it twice.
//!
//! | reason | side | the copy | actions |
//! |---|---|---|---|
//! | `committed-unconfirmed` | source | complete, paused; the target may or may not have activated | `resume` (fenced by asking the peer), `discard` |
//! | `stale` | source | paused since a post-copy switchover; holds pages the target may lack | `recover`, `resume` (fenced), `discard` |
//! | `unverified` | source | paused; the target runs the VM but its pages were not (or not all) confirmed | `discard` |
//! | `awaiting-pages` | target | owns the VM but lacks pages only the source holds; paused, still takes a recovery link | `discard` here; `recover` on the source's host |

use std::net::SocketAddr;

/// Why a copy is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReason {
    /// Source: `Commit` went out and no `Activated` came back.
    CommittedUnconfirmed,
    /// Source: post-copy switched over, then the pull could not finish.
    Stale,
    /// Source: the target runs the VM, but verification failed or never came.
    Unverified,
    /// Target: post-copy lost its source while pages were missing.
    AwaitingPages,
}

/// What an operator may do with a held copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Run the copy here again (fenced: the peer must not hold the VM).
    Resume,
    /// Destroy the copy.
    Discard,
    /// Carry the post-copy pull on over a new link.
    Recover,
}

impl OperatorAction {
    /// The action's name in listings, the API and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            OperatorAction::Resume => "resume",
            OperatorAction::Discard => "discard",
            OperatorAction::Recover => "recover",
        }
    }
}

impl HeldReason {
    /// The state name a listing shows for the copy.
    pub fn name(self) -> &'static str {
        match self {
            HeldReason::CommittedUnconfirmed => "committed-unconfirmed",
            HeldReason::Stale => "stale",
            HeldReason::Unverified => "unverified",
            HeldReason::AwaitingPages => "awaiting-pages",
        }
    }

    /// The actions for a person: `resume or discard`.
    pub fn actions_text(self) -> String {
        self.actions().iter().map(|a| a.name()).collect::<Vec<_>>().join(" or ")
    }

    /// The operator actions that work on the host holding the copy.
    pub fn actions(self) -> &'static [OperatorAction] {
        use OperatorAction::*;
        match self {
            HeldReason::CommittedUnconfirmed => &[Resume, Discard],
            // Resume too: when the target never took `Commit` (or discarded its half before it
            // ran), the fence hears `absent` and this complete copy is the VM.
            HeldReason::Stale => &[Recover, Resume, Discard],
            HeldReason::Unverified => &[Discard],
            // Recovery runs from the source's host, which holds the pages: here only discard.
            HeldReason::AwaitingPages => &[Discard],
        }
    }
}

/// Where the other copy of a held VM may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A host of this engine, by name.
    Local(String),
    /// A daemon's migration listener.
    Remote(SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Local(name) => write!(f, "host {name}"),
            Peer::Remote(addr) => write!(f, "{addr}"),
        }
    }
}

/// A held copy: why, what happened, and where the other copy may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCopy {
    /// Why the copy is held.
    pub reason: HeldReason,
    /// The error that left it so.
    pub detail: String,
    /// The other side of the migration, when known.
    pub peer: Option<Peer>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_held_copy_has_discard_and_only_complete_source_copies_resume() {
        for r in [
            HeldReason::CommittedUnconfirmed,
            HeldReason::Stale,
            HeldReason::Unverified,
            HeldReason::AwaitingPages,
        ] {
            assert!(r.actions().contains(&OperatorAction::Discard), "{}", r.name());
            // Only a source copy, which is complete, may resume (and only past the fence).
            let resumable = r.actions().contains(&OperatorAction::Resume);
            let source_side = matches!(r, HeldReason::CommittedUnconfirmed | HeldReason::Stale);
            assert_eq!(resumable, source_side, "{}", r.name());
        }
    }
}
