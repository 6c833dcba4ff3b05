//! What one side speaks and offers: protocol versions, algorithms, native layouts and page
//! compression, and how an offer travels.
//!
//! This is the vocabulary the rest of the protocol is written in, so it depends on nothing
//! else in `protocol`: messages carry it, negotiation intersects it.
//!
//! # Offers from newer builds
//! A newer peer offers values this build does not know. On the wire each list holds
//! [`Wire`] values, so such an offer decodes: unknown algorithms and compression methods are
//! dropped (this build cannot run them, so they are never in common), and unknown layouts are
//! kept by name (they are informational and reported as the peer named them). Known values
//! encode exactly as they did before the lists were made extensible.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::format::{NativeLayout, Wire, FORMAT_VERSION};

/// Newest protocol version this build speaks. Version 2 verifies page digests before
/// `Commit`; version 1 freed the source copy before its verification.
pub const PROTOCOL_VERSION: u32 = 2;
/// Oldest protocol version this build still accepts. Version 1 is refused: its order frees the
/// source copy before the target's digests are checked, and it was never released.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// A migration algorithm of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Pause, send everything, activate.
    StopAndCopy,
    /// Iterative rounds while the guest runs, then a short stop-and-copy.
    Precopy,
    /// Activate on the target at once, pull missing pages on fault, push the rest.
    Postcopy,
    /// A bounded number of pre-copy rounds, then post-copy.
    Hybrid,
    /// Choose from the negotiated pool with the cost model.
    Auto,
    /// Pick uniformly among the concrete algorithms of the negotiated pool (the paper's "chosen
    /// randomly"). The source picks; the target only ever reserves for the pick.
    Random,
}

impl Algorithm {
    /// Every algorithm, in a stable order.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::StopAndCopy,
        Algorithm::Precopy,
        Algorithm::Postcopy,
        Algorithm::Hybrid,
        Algorithm::Auto,
        Algorithm::Random,
    ];

    /// The name used in reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::StopAndCopy => "stop-and-copy",
            Algorithm::Precopy => "precopy",
            Algorithm::Postcopy => "postcopy",
            Algorithm::Hybrid => "hybrid",
            Algorithm::Auto => "auto",
            Algorithm::Random => "random",
        }
    }

    /// True for an algorithm that moves pages by itself, false for the two that choose one
    /// (`auto`, `random`).
    pub fn is_concrete(self) -> bool {
        !matches!(self, Algorithm::Auto | Algorithm::Random)
    }

    /// What a `Hello` asks for. `random` is resolved on the source after negotiation, so it
    /// asks as `auto` does (any concrete algorithm in common): a peer built before `random`
    /// knows that name, and the target only ever sees the pick, in `Reserve`.
    pub fn in_hello(self) -> Algorithm {
        match self {
            Algorithm::Random => Algorithm::Auto,
            other => other,
        }
    }

    /// True if the algorithm ends with demand paging on the target.
    pub fn is_postcopy_family(self) -> bool {
        matches!(self, Algorithm::Postcopy | Algorithm::Hybrid)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop-and-copy" | "stopcopy" => Ok(Algorithm::StopAndCopy),
            "precopy" | "pre-copy" => Ok(Algorithm::Precopy),
            "postcopy" | "post-copy" => Ok(Algorithm::Postcopy),
            "hybrid" => Ok(Algorithm::Hybrid),
            "auto" => Ok(Algorithm::Auto),
            "random" => Ok(Algorithm::Random),
            other => Err(format!(
                "unknown algorithm {other:?} (stop-and-copy, precopy, postcopy, hybrid, auto, random)"
            )),
        }
    }
}

/// Page compression of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Raw pages (zero pages are always sent as markers).
    None,
    /// Full pages as LZ4 blocks when that saves enough.
    Lz4,
    /// Re-sent pages as deltas against the copy the target already holds.
    Xbzrle,
}

impl Compression {
    /// Every method this build speaks.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Xbzrle];

    /// The name used in offers, reports and errors.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Xbzrle => "xbzrle",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one side speaks and offers.
///
/// On the wire, `compression` keeps only `none` (what peers built before page compression
/// accept) and the methods go in `page_compression`, which those peers ignore and which is
/// empty when they send theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "CapabilitiesWire", from = "CapabilitiesWire")]
pub struct Capabilities {
    /// Oldest protocol version spoken.
    pub protocol_min: u32,
    /// Newest protocol version spoken.
    pub protocol_max: u32,
    /// Common-format versions read and written.
    pub format_versions: Vec<u32>,
    /// Algorithms offered that this build knows.
    pub algorithms: Vec<Algorithm>,
    /// Native layouts of this side's backends, as named (informational: state always travels
    /// in the common format).
    pub layouts: Vec<Wire<NativeLayout>>,
    /// Compression offered that this build knows.
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
            layouts: layouts.into_iter().map(Wire::from).collect(),
            compression: Compression::ALL.to_vec(),
        }
    }
}

/// [`Capabilities`] as it travels.
#[derive(Serialize, Deserialize)]
struct CapabilitiesWire {
    protocol_min: u32,
    protocol_max: u32,
    format_versions: Vec<u32>,
    algorithms: Vec<Wire<Algorithm>>,
    layouts: Vec<Wire<NativeLayout>>,
    compression: Vec<Wire<Compression>>,
    #[serde(default)]
    page_compression: Vec<Wire<Compression>>,
}

impl From<Capabilities> for CapabilitiesWire {
    fn from(c: Capabilities) -> Self {
        let (legacy, methods) = c.compression.into_iter().partition(|m| *m == Compression::None);
        let wire = |v: Vec<Compression>| v.into_iter().map(Wire::from).collect();
        Self {
            protocol_min: c.protocol_min,
            protocol_max: c.protocol_max,
            format_versions: c.format_versions,
            algorithms: c.algorithms.into_iter().map(Wire::from).collect(),
            layouts: c.layouts,
            compression: wire(legacy),
            page_compression: wire(methods),
        }
    }
}

impl From<CapabilitiesWire> for Capabilities {
    fn from(w: CapabilitiesWire) -> Self {
        let mut compression: Vec<Compression> = Vec::new();
        for m in w.compression.into_iter().chain(w.page_compression) {
            if let Ok(m) = m.known() {
                if !compression.contains(&m) {
                    compression.push(m);
                }
            }
        }
        Self {
            protocol_min: w.protocol_min,
            protocol_max: w.protocol_max,
            format_versions: w.format_versions,
            algorithms: w.algorithms.into_iter().filter_map(|a| a.known().ok()).collect(),
            layouts: w.layouts,
            compression,
        }
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "protocol {}..={}, format {:?}, algorithms [{}], layouts [{}], compression [{}]",
            self.protocol_min,
            self.protocol_max,
            self.format_versions,
            names(&self.algorithms),
            names(&self.layouts),
            names(&self.compression)
        )
    }
}

/// `items` as a comma-separated list, the form offers take in messages and errors.
pub(super) fn names<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_algorithm_names_parse_back() {
        for a in Algorithm::ALL {
            assert_eq!(a.name().parse::<Algorithm>(), Ok(a));
        }
    }

    #[test]
    fn test_algorithm_names_are_the_metric_labels() {
        assert_eq!(
            Algorithm::ALL.map(Algorithm::name),
            crate::telemetry::metric::ALGORITHMS
        );
    }

    #[test]
    fn test_an_offer_from_a_newer_build_decodes() {
        let newer = serde_json::json!({
            "protocol_min": 2,
            "protocol_max": 3,
            "format_versions": [1, 2],
            "algorithms": ["precopy", "quantum-copy", "postcopy"],
            "layouts": ["kvm", "qemu-x86"],
            "compression": ["none"],
            "page_compression": ["zstd", "lz4"],
            "gpu_state": true,
        });
        let bytes = rmp_serde::to_vec_named(&newer).expect("encode");
        let seen: Capabilities = rmp_serde::from_slice(&bytes).expect("a newer offer decodes");
        assert_eq!(seen.algorithms, vec![Algorithm::Precopy, Algorithm::Postcopy]);
        assert_eq!(
            seen.layouts,
            vec![Wire::Known(NativeLayout::Kvm), Wire::Unknown("qemu-x86".into())]
        );
        assert_eq!(seen.compression, vec![Compression::None, Compression::Lz4]);
        assert!(seen.to_string().contains("layouts [kvm, qemu-x86]"), "{seen}");
    }
}
