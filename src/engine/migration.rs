//! The Migration actor: one outgoing migration. It runs the source's stages
//! ([`super::source`]) in its context, answers cancel requests, and hands the final report to
//! the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;
use tracing::Instrument;

use super::error::EngineError;
use super::report::MigrationReport;
use super::source::{SourceRun, SourceSetup};

/// An outgoing migration.
#[derive(Debug)]
pub struct Migration {
    id: u64,
    run: Option<SourceRun>,
    cancel: watch::Sender<bool>,
    committed: Arc<AtomicBool>,
    on_finish: Recipient<MigrationFinished>,
}

impl Migration {
    pub(crate) fn new(mut setup: SourceSetup, on_finish: Recipient<MigrationFinished>) -> Self {
        let (cancel, cancel_rx) = watch::channel(false);
        setup.cancel = cancel_rx;
        let committed = Arc::clone(&setup.committed);
        Self {
            id: setup.id,
            run: Some(SourceRun::new(setup)),
            cancel,
            committed,
            on_finish,
        }
    }
}

impl Actor for Migration {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(run) = self.run.take() {
            // One span per migration; stage events inside it carry its id, VM and algorithm.
            let span = run.span();
            ctx.spawn(run.run().instrument(span).into_actor(self).map(|report, act, ctx| {
                tracing::info!(
                    id = report.id,
                    result = report.result.label(),
                    downtime_ms = report.downtime_s * 1e3,
                    total_s = report.total_s,
                    verified = report.verified,
                    "migration finished"
                );
                act.on_finish.do_send(MigrationFinished(Box::new(report)));
                ctx.stop();
            }));
        }
    }
}

/// The report of a finished migration, sent to the engine.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct MigrationFinished(pub Box<MigrationReport>);

/// Cancel the migration; refused once the target owns the VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct CancelMigration;

impl Handler<CancelMigration> for Migration {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, _: CancelMigration, _: &mut Self::Context) -> Self::Result {
        if self.committed.load(Ordering::Acquire) {
            return Err(EngineError::TooLateToCancel(self.id));
        }
        self.cancel.send_replace(true);
        Ok(())
    }
}
