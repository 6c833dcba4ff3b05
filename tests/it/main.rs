//! Integration tests of the engine through its public API: one binary, one module per area.

mod common;

mod algorithms;
mod auth;
mod cancel;
mod compression;
mod contained;
mod embed;
mod faults;
mod fuzz;
mod held;
mod negotiation;
mod recovery;
mod stall;
mod tcp;
mod tls;
