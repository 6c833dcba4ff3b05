//! Integration tests of the engine through its public API: one binary, one module per area.

mod common;
#[path = "../support/certs.rs"]
mod support_certs;

mod algorithms;
mod auth;
mod cancel;
mod choices;
mod compression;
mod contained;
mod embed;
mod faults;
mod fuzz;
mod held;
mod negotiation;
mod qos;
mod recovery;
mod stall;
mod tcp;
mod tls;
