//! The bodies of the daemon's HTTP/JSON control API (`migratory serve`), written once for both
//! ends: the daemon decodes the requests and encodes the answers with these types, and the
//! `migratory` CLI does the reverse. A control plane that writes its own client can use them
//! too.
//!
//! | method and path | request body | answer |
//! |---|---|---|
//! | `GET /vms` | | `200` `[`[`Vm`]`]` |
//! | `POST /vms` | [`CreateVm`] | `201` [`Vm`] |
//! | `DELETE /vms/{id}` | | `204`, no body |
//! | `POST /vms/{id}/resume` | [`ResumeVm`] (may be left out) | `200` [`Vm`] |
//! | `POST /vms/{id}/discard` | | `200` [`Discarded`] |
//! | `POST /vms/{id}/recover` | [`RecoverVm`] (may be left out) | `202` [`MigrationStarted`] |
//! | `POST /vms/{id}/to-qemu` | [`ToQemu`] | `200` [`QemuLeg`], once QEMU runs the VM |
//! | `POST /migrations` | [`StartMigration`] | `202` [`MigrationStarted`] |
//! | `GET /migrations` | | `200` `[`[`MigrationStatus`]`]` |
//! | `GET /migrations/{id}` | | `200` [`MigrationStatus`] |
//! | `POST /migrations/{id}/cancel` | | `200` [`CancelRequested`] |
//! | `POST /drain` | [`StartDrain`] | `202` [`DrainStarted`] |
//! | `GET /drain` | | `200` [`DrainStatus`] |
//! | `POST /shutdown` | [`Shutdown`] (may be left out) | `202` [`ShutdownStarted`] |
//!
//! Every refusal or failure is a 4xx or 5xx status with an [`ApiError`].
//!
//! How the JSON looks, and why:
//! * Field names are snake_case with their unit (`memory_bytes`, `downtime_limit_ms`), as the
//!   Rust fields are named; enum values are kebab-case (`stop-and-copy`, `committed-unconfirmed`),
//!   as in the engine's [`MigrationReport`].
//! * A request's optional field is left out when it has no value, so the daemon's default
//!   applies; the daemon treats an absent field and `null` alike. The operator's bodies refuse
//!   unknown fields, so a misspelt `peer_is_dead` or `force` is an error, never a silent no.
//! * A migration's status is the engine's own [`MigrationStatus`], reused as it is. Clients read
//!   it as a [`MigrationStatusView`], because the engine's type cannot be decoded (see there).
//! * Algorithms, compression choices, fault plans and write patterns travel as the text their
//!   `FromStr` reads, so the daemon's refusal of a bad one quotes the parser's own words.

mod error;
mod host;
mod migrations;
mod qemu;
mod vms;

pub use error::ApiError;
pub use host::{DrainStarted, DrainStatus, DrainedVm, Shutdown, ShutdownStarted, StartDrain, StayedVm};
pub use migrations::{CancelRequested, MigrationStarted, MigrationStatusView, StartMigration};
pub use qemu::{QemuLeg, ToQemu};
pub use vms::{CreateVm, Discarded, RecoverVm, ResumeVm, Vm};

pub use crate::engine::{MigrationReport, MigrationStatus, Phase};
