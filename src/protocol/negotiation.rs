//! The pool a migration may use: the intersection of both sides' [`Capabilities`].
//!
//! Negotiation happens before anything is reserved: the source states what it speaks and
//! offers in `Hello`, the target answers with its own in `Welcome` (or refuses), and both
//! compute the same [`Pool`]. A request outside it fails with an error naming both offers; a
//! request for an algorithm this build does not know (from a newer peer) fails with an error
//! naming it ([`known_algorithm`]).
//!
//! Compression follows the same rule: a method is used only if both sides offer it, and an
//! explicit request for one the peer lacks is refused ([`choose_compression`]). Peers built
//! before page compression offer only `none`, and would reject a value they do not know in
//! the `compression` list, so the methods travel in a field of their own that such peers
//! ignore (see [`Capabilities`]).

use std::fmt;
use std::str::FromStr;

use super::capabilities::{names, Algorithm, Capabilities, Compression};
use super::message::AbortReason;
use super::pages::PageCodecs;
use crate::format::Wire;

/// What a migration asks of page compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionChoice {
    /// Raw pages only.
    Off,
    /// LZ4 for full pages; refused if the target does not offer it.
    Lz4,
    /// XBZRLE deltas for re-sent pages; refused if the target does not offer it.
    Xbzrle,
    /// XBZRLE for re-sent pages, LZ4 for the pages sent whole; refused unless both are offered.
    Both,
    /// The methods that won on the benchmark ([`auto_compression`]), where both sides offer
    /// them; never refused.
    #[default]
    Auto,
}

/// The fastest link cap at which [`CompressionChoice::Auto`] compresses with LZ4: 1 Gbit/s.
pub const AUTO_LZ4_MAX_LINK_BYTES_PER_SEC: u64 = 125_000_000;

/// What [`CompressionChoice::Auto`] asks for on a link capped at `link_bytes_per_sec` (`None`:
/// uncapped), as measured by `migratory bench --compression` (pre-copy of a 256 MiB sim guest
/// writing 100 MB/s over a 64 MiB hot set or over all memory; medians of three, as ratios over
/// `off`):
///
/// - XBZRLE always: on a 1 Gbit/s link it cut total time to 0.74-0.77, bytes to 0.71-0.77
///   and downtime to 0.01-0.67. It is used only where pre-copy re-sends pages, so it costs
///   nothing elsewhere. The sim's writer changes one word per page it dirties, its best case.
/// - LZ4 only at or below 1 Gbit/s: there the link is the bottleneck, compressing is free in
///   time and whatever it saves is a win (total 0.83-0.96 on its own, 0.66-0.74 with XBZRLE;
///   what compresses in the sim is zero pages the writer has touched). Uncapped, where the CPU
///   is the bottleneck, it made an idle stop-and-copy 15-45% slower and saved nothing.
pub fn auto_compression(link_bytes_per_sec: Option<u64>) -> PageCodecs {
    PageCodecs {
        lz4: link_bytes_per_sec.is_some_and(|b| b <= AUTO_LZ4_MAX_LINK_BYTES_PER_SEC),
        xbzrle: true,
    }
}

impl CompressionChoice {
    /// Every choice, in a stable order.
    pub const ALL: [CompressionChoice; 5] = [
        CompressionChoice::Off,
        CompressionChoice::Lz4,
        CompressionChoice::Xbzrle,
        CompressionChoice::Both,
        CompressionChoice::Auto,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            CompressionChoice::Off => "off",
            CompressionChoice::Lz4 => "lz4",
            CompressionChoice::Xbzrle => "xbzrle",
            CompressionChoice::Both => "both",
            CompressionChoice::Auto => "auto",
        }
    }

    /// The methods asked for on a link capped at `link_bytes_per_sec`, before negotiation.
    pub fn wanted(self, link_bytes_per_sec: Option<u64>) -> PageCodecs {
        match self {
            CompressionChoice::Off => PageCodecs::NONE,
            CompressionChoice::Lz4 => PageCodecs {
                lz4: true,
                xbzrle: false,
            },
            CompressionChoice::Xbzrle => PageCodecs {
                lz4: false,
                xbzrle: true,
            },
            CompressionChoice::Both => PageCodecs {
                lz4: true,
                xbzrle: true,
            },
            CompressionChoice::Auto => auto_compression(link_bytes_per_sec),
        }
    }
}

impl fmt::Display for CompressionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CompressionChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CompressionChoice::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown compression {s:?} (off, lz4, xbzrle, both, auto)"))
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
    /// A peer asked for an algorithm this build does not know (a newer peer's).
    #[error("algorithm {name:?} is unknown to this build, which knows [{}]", names(&Algorithm::ALL))]
    UnknownAlgorithm {
        /// The name the peer sent.
        name: String,
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
    /// Compression was asked for that one side does not offer.
    #[error("compression {requested} needs methods both sides offer; source offers [{source_offer}], target offers [{target_offer}]")]
    Compression {
        /// What was asked for.
        requested: CompressionChoice,
        /// Source's methods.
        source_offer: String,
        /// Target's methods.
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

/// The source's choice of page encodings for a migration asked to use `choice` on a link
/// capped at `link_bytes_per_sec`, given both sides' offers. `auto` takes what both offer of
/// [`auto_compression`]; an explicit method one side lacks is refused, as an algorithm outside
/// the pool is.
pub fn choose_compression(
    choice: CompressionChoice,
    link_bytes_per_sec: Option<u64>,
    source: &Capabilities,
    target: &Capabilities,
) -> Result<PageCodecs, NegotiationError> {
    let both = |m: Compression| source.compression.contains(&m) && target.compression.contains(&m);
    let wanted = choice.wanted(link_bytes_per_sec);
    let offered = PageCodecs {
        lz4: both(Compression::Lz4),
        xbzrle: both(Compression::Xbzrle),
    };
    let usable = PageCodecs {
        lz4: wanted.lz4 && offered.lz4,
        xbzrle: wanted.xbzrle && offered.xbzrle,
    };
    if choice != CompressionChoice::Auto && usable != wanted {
        return Err(NegotiationError::Compression {
            requested: choice,
            source_offer: names(&source.compression),
            target_offer: names(&target.compression),
        });
    }
    Ok(usable)
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

/// An algorithm a peer asked for (in `Hello` or `Reserve`), refused if this build does not
/// know it.
pub fn known_algorithm(requested: Wire<Algorithm>) -> Result<Algorithm, NegotiationError> {
    requested
        .known()
        .map_err(|name| NegotiationError::UnknownAlgorithm { name })
}

/// Both sides' computation of the pool, and the check of the requested algorithm against it.
/// `auto` and `random` need at least one concrete algorithm in the pool; `random` needs only
/// the source to offer it. The request is the source's own
/// [`Algorithm`] or, on the target, the [`Wire`] value its `Hello` carried.
pub fn negotiate(
    source: &Capabilities,
    target: &Capabilities,
    requested: impl Into<Wire<Algorithm>>,
) -> Result<Pool, NegotiationError> {
    let version = accept_hello(source, target)?;
    let requested = known_algorithm(requested.into())?;
    let algorithms: Vec<Algorithm> = source
        .algorithms
        .iter()
        .copied()
        .filter(|a| target.algorithms.contains(a))
        .collect();
    let concrete = algorithms.iter().any(|a| a.is_concrete());
    // `random` is the source's own choice among the pool (its `Hello` asks as `auto`), so a
    // target built before it need not offer it.
    let offered = match requested {
        Algorithm::Random => source.algorithms.contains(&requested),
        _ => algorithms.contains(&requested),
    };
    if !offered || !concrete {
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
    use crate::format::NativeLayout;
    use crate::protocol::capabilities::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    use crate::protocol::frame::{decode_control, TAG_CONTROL};
    use crate::protocol::ControlMessage;
    use serde::{Deserialize, Serialize};

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
    fn test_random_needs_only_the_source_to_offer_it_and_a_concrete_algorithm_in_common() {
        // A target built before `random`: its offer lacks it, and its check of the `Hello`
        // sees `auto`.
        let s = caps(&Algorithm::ALL);
        let old = caps(&[Algorithm::Precopy, Algorithm::Postcopy, Algorithm::Auto]);
        let pool = negotiate(&s, &old, Algorithm::Random).expect("random against an older target");
        assert_eq!(
            pool.algorithms,
            vec![Algorithm::Precopy, Algorithm::Postcopy, Algorithm::Auto]
        );
        assert!(negotiate(&s, &old, Algorithm::Random.in_hello()).is_ok());
        // Nothing concrete in common, or a source that does not offer it: refused.
        let choosers = caps(&[Algorithm::Auto, Algorithm::Random]);
        assert!(negotiate(&choosers, &choosers, Algorithm::Random).is_err());
        assert!(negotiate(&old, &s, Algorithm::Random).is_err());
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

    fn offering(methods: &[Compression]) -> Capabilities {
        Capabilities {
            compression: methods.to_vec(),
            ..Capabilities::full(vec![NativeLayout::Kvm])
        }
    }

    #[test]
    fn test_compression_needs_both_sides() {
        let full = offering(&Compression::ALL);
        let old = offering(&[Compression::None]);
        let lz4_only = offering(&[Compression::None, Compression::Lz4]);
        let lz4 = PageCodecs {
            lz4: true,
            xbzrle: false,
        };
        let both = PageCodecs {
            lz4: true,
            xbzrle: true,
        };
        let choose = |c, s, t| choose_compression(c, None, s, t);
        assert_eq!(choose(CompressionChoice::Both, &full, &full), Ok(both));
        assert_eq!(choose(CompressionChoice::Lz4, &full, &lz4_only), Ok(lz4));
        assert_eq!(choose(CompressionChoice::Off, &full, &full), Ok(PageCodecs::NONE));
        // Auto never refuses, and takes nothing a side lacks.
        assert_eq!(choose(CompressionChoice::Auto, &full, &old), Ok(PageCodecs::NONE));
        assert_eq!(
            choose(CompressionChoice::Auto, &full, &full),
            Ok(auto_compression(None))
        );
        assert_eq!(
            choose_compression(CompressionChoice::Auto, Some(125_000_000), &full, &lz4_only),
            Ok(lz4)
        );
        let err = choose(CompressionChoice::Xbzrle, &full, &lz4_only).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("target offers [none, lz4]"), "{text}");
        assert!(text.contains("source offers [none, lz4, xbzrle]"), "{text}");
        assert!(matches!(AbortReason::from(err), AbortReason::Negotiation { .. }));
        assert!(choose(CompressionChoice::Both, &lz4_only, &full).is_err());
    }

    #[test]
    fn test_auto_compresses_with_lz4_only_on_slow_links() {
        let xbzrle = PageCodecs {
            lz4: false,
            xbzrle: true,
        };
        assert_eq!(auto_compression(None), xbzrle);
        assert_eq!(auto_compression(Some(10_000_000_000 / 8)), xbzrle);
        assert_eq!(
            auto_compression(Some(AUTO_LZ4_MAX_LINK_BYTES_PER_SEC)),
            PageCodecs {
                lz4: true,
                xbzrle: true
            }
        );
    }

    /// `Capabilities` as built before page compression: the only value it knows is `none`.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct OldCapabilities {
        protocol_min: u32,
        protocol_max: u32,
        format_versions: Vec<u32>,
        algorithms: Vec<Algorithm>,
        layouts: Vec<NativeLayout>,
        compression: Vec<OldCompression>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum OldCompression {
        None,
    }

    #[test]
    fn test_offers_interoperate_with_peers_before_compression() {
        let new = Capabilities::full(vec![NativeLayout::Kvm]);
        // An old peer reads a new offer, seeing only `none`.
        let bytes = rmp_serde::to_vec_named(&new).expect("encode");
        let seen: OldCapabilities = rmp_serde::from_slice(&bytes).expect("an old peer decodes it");
        assert_eq!(seen.compression, vec![OldCompression::None]);
        // A new peer reads an old offer: `none` only, so no method is used.
        let old = OldCapabilities {
            compression: vec![OldCompression::None],
            ..seen
        };
        let bytes = rmp_serde::to_vec_named(&old).expect("encode");
        let back: Capabilities = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back.compression, vec![Compression::None]);
        assert_eq!(
            choose_compression(CompressionChoice::Auto, None, &new, &back),
            Ok(PageCodecs::NONE)
        );
        // New to new keeps every method, and a method from a newer build is dropped.
        let bytes = rmp_serde::to_vec_named(&new).expect("encode");
        let back: Capabilities = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, new);
        let mut newer = serde_json::to_value(&new).expect("json");
        newer["page_compression"] = serde_json::json!(["lz4", "zstd", "xbzrle"]);
        let back: Capabilities = serde_json::from_value(newer).expect("unknown methods are tolerated");
        assert_eq!(back.compression, Compression::ALL.to_vec());
    }

    /// A `Hello` as a newer build sends it: an algorithm, a layout and a compression method
    /// this build does not know, a field it has never heard of, and a request for the unknown
    /// algorithm.
    fn newer_hello() -> ControlMessage {
        let hello = serde_json::json!({
            "type": "Hello",
            "capabilities": {
                "protocol_min": 2,
                "protocol_max": 3,
                "format_versions": [1],
                "algorithms": ["quantum-copy", "precopy", "postcopy"],
                "layouts": ["qemu-x86", "kvm"],
                "compression": ["none"],
                "page_compression": ["zstd", "xbzrle"],
            },
            "requested": "quantum-copy",
            "vm": "v",
            "nonce": [],
            "resume": false,
            "priority": 7,
        });
        let mut body = vec![TAG_CONTROL];
        body.extend(rmp_serde::to_vec_named(&hello).expect("encode"));
        decode_control(&body).expect("a newer peer's Hello decodes")
    }

    #[test]
    fn test_a_newer_peers_unknown_offers_are_not_in_common() {
        let ControlMessage::Hello { capabilities, .. } = newer_hello() else {
            panic!("not a Hello");
        };
        let ours = Capabilities::full(vec![NativeLayout::Kvm]);
        let pool = negotiate(&capabilities, &ours, Algorithm::Precopy).expect("pool");
        assert_eq!(pool.algorithms, vec![Algorithm::Precopy, Algorithm::Postcopy]);
        assert_eq!(pool.compression, vec![Compression::None, Compression::Xbzrle]);
        assert_eq!(names(&capabilities.layouts), "qemu-x86, kvm");
    }

    #[test]
    fn test_a_request_for_an_unknown_algorithm_is_refused_by_name() {
        let ControlMessage::Hello {
            capabilities,
            requested,
            ..
        } = newer_hello()
        else {
            panic!("not a Hello");
        };
        let ours = Capabilities::full(vec![NativeLayout::Kvm]);
        let err = negotiate(&capabilities, &ours, requested).expect_err("refused");
        assert_eq!(
            err,
            NegotiationError::UnknownAlgorithm {
                name: "quantum-copy".into()
            }
        );
        // Peers of every build read the refusal: it travels as a negotiation failure.
        match AbortReason::from(err) {
            AbortReason::Negotiation { detail } => assert!(detail.contains("\"quantum-copy\""), "{detail}"),
            other => panic!("refused as {other:?}"),
        }
        assert_eq!(known_algorithm(Wire::Known(Algorithm::Hybrid)), Ok(Algorithm::Hybrid));
    }

    #[test]
    fn test_compression_choice_names_parse_back() {
        for c in CompressionChoice::ALL {
            assert_eq!(c.name().parse::<CompressionChoice>(), Ok(c));
        }
        assert!("gzip".parse::<CompressionChoice>().is_err());
    }
}
