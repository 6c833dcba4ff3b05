//! The VM lifecycle state machine (pure).

use std::fmt;

/// Where a VM is in its life on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Reserved for an incoming migration; holds memory, does not run.
    Incoming,
    /// Running.
    Running,
    /// Paused by a user or the engine.
    Paused,
    /// Being migrated away; `running` says whether the guest still runs here.
    Outgoing {
        /// True until the stop-and-copy pause.
        running: bool,
    },
    /// Gone from this host (moved away, destroyed, or a reservation released).
    Stopped,
}

impl Lifecycle {
    /// Short name for errors and listings.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Incoming => "incoming",
            Lifecycle::Running => "running",
            Lifecycle::Paused => "paused",
            Lifecycle::Outgoing { running: true } => "migrating (running)",
            Lifecycle::Outgoing { running: false } => "migrating (paused)",
            Lifecycle::Stopped => "stopped",
        }
    }

    /// True if the guest executes in this state.
    pub fn is_running(self) -> bool {
        matches!(self, Lifecycle::Running | Lifecycle::Outgoing { running: true })
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What can happen to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleCommand {
    /// Run the guest.
    Resume,
    /// Stop the guest.
    Pause,
    /// A migration takes the VM.
    BeginOutgoing,
    /// The migration ends; `moved` says whether the VM now lives elsewhere.
    EndOutgoing {
        /// True if the target owns the VM.
        moved: bool,
    },
    /// Destroy the VM.
    Stop,
}

/// A command not allowed in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("VM is {state}: cannot {command:?}")]
pub struct LifecycleError {
    /// The state.
    pub state: Lifecycle,
    /// The refused command.
    pub command: LifecycleCommand,
}

impl Lifecycle {
    /// The state after `command`, or why it is refused.
    pub fn apply(self, command: LifecycleCommand) -> Result<Lifecycle, LifecycleError> {
        use Lifecycle::*;
        use LifecycleCommand as C;
        let next = match (self, command) {
            (Incoming | Paused | Running, C::Resume) => Running,
            (Outgoing { .. }, C::Resume) => Outgoing { running: true },
            (Running | Paused, C::Pause) => Paused,
            (Outgoing { .. }, C::Pause) => Outgoing { running: false },
            (Running, C::BeginOutgoing) => Outgoing { running: true },
            (Paused, C::BeginOutgoing) => Outgoing { running: false },
            (Outgoing { .. }, C::EndOutgoing { moved: true }) => Stopped,
            (Outgoing { running: true }, C::EndOutgoing { moved: false }) => Running,
            (Outgoing { running: false }, C::EndOutgoing { moved: false }) => Paused,
            (s, C::Stop) if s != Stopped => Stopped,
            (state, command) => return Err(LifecycleError { state, command }),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleCommand as C;

    #[test]
    fn test_outgoing_vm_returns_to_its_previous_run_state() {
        let s = Lifecycle::Running.apply(C::BeginOutgoing).expect("begin");
        let s = s.apply(C::Pause).expect("pause");
        assert_eq!(s, Lifecycle::Outgoing { running: false });
        let s = s.apply(C::Resume).expect("resume");
        assert_eq!(s.apply(C::EndOutgoing { moved: false }), Ok(Lifecycle::Running));
    }

    #[test]
    fn test_invalid_transitions_name_state_and_command() {
        let err = Lifecycle::Incoming.apply(C::BeginOutgoing).expect_err("refused");
        assert_eq!(err.state, Lifecycle::Incoming);
        assert!(err.to_string().contains("incoming"));
        assert!(Lifecycle::Running
            .apply(C::BeginOutgoing)
            .and_then(|s| s.apply(C::BeginOutgoing))
            .is_err());
        assert!(Lifecycle::Stopped.apply(C::Resume).is_err());
    }
}
