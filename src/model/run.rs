//! The simulation: virtual time, fluid memory and links, the engine's plans.
//!
//! Placeholder signature; the core is being written.

use super::{ModelOutcome, Scenario};

/// A run that cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The scenario asks for something the model cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// Runs `scenario` in virtual time; `seed` overrides the scenario's.
pub fn run(_scenario: &Scenario, _seed: Option<u64>) -> Result<ModelOutcome, ModelError> {
    Err(ModelError::Unsupported("the simulation core is not written yet".into()))
}
