//! Capabilities and their intersection, the pool a migration may use.
//!
//! Negotiation happens before anything is reserved: the source states what it speaks and
//! offers in `Hello`, the target answers with its own in `Welcome` (or refuses), and both
//! compute the same [`Pool`]. A request outside it fails with an error naming both offers.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::message::{AbortReason, Algorithm};
use crate::format::{NativeLayout, FORMAT_VERSION};

/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Page compression of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Raw pages (zero pages are always sent as markers).
    None,
}

/// What one side speaks and offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Oldest protocol version spoken.
    pub protocol_min: u32,
    /// Newest protocol version spoken.
    pub protocol_max: u32,
    /// Common-format versions read and written.
    pub format_versions: Vec<u32>,
    /// Algorithms offered.
    pub algorithms: Vec<Algorithm>,
    /// Native layouts of this side's backends (informational: state always travels in the
    /// common format).
    pub layouts: Vec<NativeLayout>,
    /// Compression offered.
    pub compression: Vec<Compression>,
}

impl Capabilities {
    /// Everything this build supports, for a host whose backends use `layouts`.
    pub fn full(layouts: Vec<NativeLayout>) -> Self {
        Self {
            protocol_min: MIN_PROTOCOL_VERSION,
            protocol_max: PROTOCOL_VERSION,
            format_versions: vec![FORMAT_VERSION],
            algorithms: Algorithm::ALL.to_vec(),
            layouts,
            compression: vec![Compression::None],
        }
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<&str> = self.algorithms.iter().map(|a| a.name()).collect();
        let layouts: Vec<String> = self.layouts.iter().map(|l| l.to_string()).collect();
        write!(
            f,
            "protocol {}..={}, format {:?}, algorithms [{}], layouts [{}]",
            self.protocol_min,
            self.protocol_max,
            self.format_versions,
            algs.join(", "),
            layouts.join(", ")
        )
    }
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Protocol version spoken.
    pub version: u32,
    /// Algorithms both offer.
    pub algorithms: Vec<Algorithm>,
    /// Compression both offer.
    pub compression: Vec<Compression>,
}

impl Pool {
    /// True if `a` may run.
    pub fn offers(&self, a: Algorithm) -> bool {
        self.algorithms.contains(&a)
    }
}

/// Why negotiation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// No common protocol version.
    #[error("no common protocol version: source {source_min}..={source_max}, target {target_min}..={target_max}")]
    Version {
        /// Source's oldest.
        source_min: u32,
        /// Source's newest.
        source_max: u32,
        /// Target's oldest.
        target_min: u32,
        /// Target's newest.
        target_max: u32,
    },
    /// The target cannot read the source's format.
    #[error("common format version mismatch: source writes {source_versions:?}, target reads {target_versions:?}")]
    Format {
        /// Source's versions.
        source_versions: Vec<u32>,
        /// Target's versions.
        target_versions: Vec<u32>,
    },
    /// The request is outside the pool.
    #[error("algorithm {requested} is not in the common pool; source offers [{source_offer}], target offers [{target_offer}]")]
    Algorithm {
        /// What was asked for.
        requested: Algorithm,
        /// Source's algorithms.
        source_offer: String,
        /// Target's algorithms.
        target_offer: String,
    },
}

impl From<NegotiationError> for AbortReason {
    fn from(e: NegotiationError) -> Self {
        match e {
            NegotiationError::Version {
                source_min,
                source_max,
                target_min,
                target_max,
            } => AbortReason::VersionMismatch {
                source_min,
                source_max,
                target_min,
                target_max,
            },
            NegotiationError::Format {
                source_versions,
                target_versions,
            } => AbortReason::FormatVersion {
                offered: source_versions.iter().copied().max().unwrap_or(0),
                supported: target_versions,
            },
            other => AbortReason::Negotiation {
                detail: other.to_string(),
            },
        }
    }
}

fn names(algs: &[Algorithm]) -> String {
    algs.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
}

/// The target's check of a `Hello`: version and format. Returns the version to speak.
pub fn accept_hello(source: &Capabilities, target: &Capabilities) -> Result<u32, NegotiationError> {
    let version = source.protocol_max.min(target.protocol_max);
    if version < source.protocol_min.max(target.protocol_min) {
        return Err(NegotiationError::Version {
            source_min: source.protocol_min,
            source_max: source.protocol_max,
            target_min: target.protocol_min,
            target_max: target.protocol_max,
        });
    }
    if !source
        .format_versions
        .iter()
        .any(|v| target.format_versions.contains(v))
    {
        return Err(NegotiationError::Format {
            source_versions: source.format_versions.clone(),
            target_versions: target.format_versions.clone(),
        });
    }
    Ok(version)
}

/// Both sides' computation of the pool, and the check of the requested algorithm against it.
/// `auto` needs at least one concrete algorithm in the pool.
pub fn negotiate(source: &Capabilities, target: &Capabilities, requested: Algorithm) -> Result<Pool, NegotiationError> {
    let version = accept_hello(source, target)?;
    let algorithms: Vec<Algorithm> = source
        .algorithms
        .iter()
        .copied()
        .filter(|a| target.algorithms.contains(a))
        .collect();
    let concrete = algorithms.iter().any(|a| *a != Algorithm::Auto);
    if !algorithms.contains(&requested) || !concrete {
        return Err(NegotiationError::Algorithm {
            requested,
            source_offer: names(&source.algorithms),
            target_offer: names(&target.algorithms),
        });
    }
    let compression = source
        .compression
        .iter()
        .copied()
        .filter(|c| target.compression.contains(c))
        .collect();
    Ok(Pool {
        version,
        algorithms,
        compression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(algs: &[Algorithm]) -> Capabilities {
        Capabilities {
            algorithms: algs.to_vec(),
            ..Capabilities::full(vec![NativeLayout::Kvm])
        }
    }

    #[test]
    fn test_pool_is_the_intersection() {
        let s = caps(&[Algorithm::Precopy, Algorithm::Postcopy, Algorithm::Auto]);
        let t = caps(&[Algorithm::Precopy, Algorithm::Auto, Algorithm::StopAndCopy]);
        let pool = negotiate(&s, &t, Algorithm::Auto).expect("pool");
        assert_eq!(pool.algorithms, vec![Algorithm::Precopy, Algorithm::Auto]);
    }

    #[test]
    fn test_request_outside_pool_names_both_offers() {
        let s = caps(&[Algorithm::Precopy, Algorithm::Postcopy]);
        let t = caps(&[Algorithm::Precopy]);
        let err = negotiate(&s, &t, Algorithm::Postcopy).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("source offers [precopy, postcopy]"), "{text}");
        assert!(text.contains("target offers [precopy]"), "{text}");
    }

    #[test]
    fn test_version_and_format_mismatch() {
        let s = caps(&[Algorithm::Precopy]);
        let mut t = s.clone();
        t.protocol_min = 5;
        t.protocol_max = 6;
        assert!(matches!(accept_hello(&s, &t), Err(NegotiationError::Version { .. })));
        let mut t = s.clone();
        t.format_versions = vec![99];
        assert!(matches!(accept_hello(&s, &t), Err(NegotiationError::Format { .. })));
        // N-1 is still accepted.
        let mut older = s.clone();
        older.protocol_max = PROTOCOL_VERSION.saturating_sub(1).max(MIN_PROTOCOL_VERSION);
        assert!(accept_hello(&older, &s).is_ok());
    }
}
