//! Asking an actor, with a bound on the wait.
//!
//! Every internal request (`addr.send(msg)`) goes through [`ask`], which fails with an
//! [`AskError`] naming the request when no answer comes in time or when the actor is gone.
//!
//! **What a panic does to an actor.** actix runs each actor as one tokio task on its arbiter,
//! and tokio catches a panic at the task's boundary. A handler that panics therefore ends its
//! own actor (its mailbox closes; the `stopped` hook does not run) and nothing else: the
//! System, its arbiters and every other actor run on, and those who send to the dead actor get
//! [`AskError::Stopped`]. This is why guest and backend calls, the code most likely to panic
//! on a bad input or a broken guest, run on threads of their own under `catch_unwind`
//! ([`crate::offload`]): the panic reaches the one caller as an error, and the `Vm`, `Backend`
//! or `DirtyTracker` actor lives on. Issue #13's "engine stopped" was a host's `Backend` actor
//! ended this way (a thread named after a VM id with a NUL byte), with `MailboxError::Closed`
//! reported as the whole engine stopped; telling a stopped actor from the engine is why
//! [`AskError::Stopped`] names the request.

use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use super::error::EngineError;

/// Bound on a guest command (pause, resume, state save or load, a dirty-log round): a kvm pause
/// may take 5 s, and a command may wait behind the one before it.
pub(crate) const GUEST_ASK: Duration = Duration::from_secs(30);
/// Bound on creating or reserving a VM: committing a large guest's memory takes seconds.
pub(crate) const BACKEND_ASK: Duration = Duration::from_secs(120);

/// An internal request that got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// No answer within the bound.
    #[error("{what} did not answer within {timeout:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The actor had stopped (or stopped before it answered): its mailbox is closed.
    #[error("{what}: the actor has stopped")]
    Stopped {
        /// The request.
        what: &'static str,
    },
}

/// Sends `msg` to `addr` and waits at most `timeout` for the answer; `what` names the request
/// in the error (e.g. `"vm pause"`).
pub(crate) async fn ask<A, M>(
    addr: &Addr<A>,
    msg: M,
    what: &'static str,
    timeout: Duration,
) -> Result<M::Result, AskError>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    match tokio::time::timeout(timeout, addr.send(msg)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(MailboxError::Closed)) => Err(AskError::Stopped { what }),
        // Only `Request::timeout` sets actix's own timeout, which `ask` does not use; the
        // bound is the same either way.
        Ok(Err(MailboxError::Timeout)) | Err(_) => Err(AskError::Timeout { what, timeout }),
    }
}

impl From<AskError> for EngineError {
    fn from(e: AskError) -> Self {
        match e {
            AskError::Timeout { what, timeout } => EngineError::Timeout {
                what: what.to_string(),
                after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            },
            // One actor gone is not the engine stopped (the engine's own actor is mapped to
            // `EngineStopped` by the handle).
            stopped @ AskError::Stopped { .. } => EngineError::Internal(stopped.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor whose handler panics on demand, and otherwise echoes.
    struct Fragile;

    impl Actor for Fragile {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Echo(u32);

    impl Handler<Echo> for Fragile {
        type Result = u32;
        fn handle(&mut self, msg: Echo, _: &mut Self::Context) -> u32 {
            if msg.0 == 0 {
                panic!("fragile handler exploded");
            }
            msg.0
        }
    }

    /// An actor that never answers.
    struct Silent;

    impl Actor for Silent {
        type Context = Context<Self>;
    }

    impl Handler<Echo> for Silent {
        type Result = ResponseFuture<u32>;
        fn handle(&mut self, _: Echo, _: &mut Self::Context) -> Self::Result {
            Box::pin(std::future::pending())
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(30);

    #[actix::test]
    async fn test_a_panicking_handler_ends_only_its_actor() {
        let (fragile, other) = (Fragile.start(), Fragile.start());
        assert_eq!(ask(&fragile, Echo(3), "echo", TIMEOUT).await, Ok(3));
        assert_eq!(
            ask(&fragile, Echo(0), "echo", TIMEOUT).await,
            Err(AskError::Stopped { what: "echo" })
        );
        assert_eq!(
            ask(&fragile, Echo(1), "echo", TIMEOUT).await,
            Err(AskError::Stopped { what: "echo" })
        );
        // The System and its other actors carry on.
        assert_eq!(ask(&other, Echo(5), "echo", TIMEOUT).await, Ok(5));
    }

    #[actix::test]
    async fn test_a_silent_actor_times_out_with_the_request_named() {
        let silent = Silent.start();
        let err = ask(&silent, Echo(1), "silent echo", Duration::from_millis(20))
            .await
            .expect_err("no answer");
        assert_eq!(
            err,
            AskError::Timeout {
                what: "silent echo",
                timeout: Duration::from_millis(20)
            }
        );
        assert_eq!(err.to_string(), "silent echo did not answer within 20ms");
        assert!(matches!(
            EngineError::from(err),
            EngineError::Timeout { after_ms: 20, .. }
        ));
    }
}
