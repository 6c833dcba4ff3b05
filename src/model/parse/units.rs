//! The values a scenario writes with units: sizes, rates and durations, each a string so that
//! the unit is never guessed. They deserialize straight from TOML strings, so a bad value is
//! reported by toml with the span of the value itself.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

use crate::units::{ByteSize, ByteSizeError};

/// A value with units that does not parse.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum UnitError {
    /// A size ByteSize refused.
    #[error(transparent)]
    Size(#[from] ByteSizeError),
    /// A quantity that cannot be negative.
    #[error("{input:?} is negative: a {what} cannot be")]
    Negative {
        /// What was written.
        input: String,
        /// `rate`, `duration`, ...
        what: &'static str,
    },
    /// A quantity that must be above zero (a bandwidth).
    #[error("{input:?} is zero: a bandwidth must be positive")]
    Zero {
        /// What was written.
        input: String,
    },
    /// A number without its unit, which would leave the reader to guess it.
    #[error("{input:?} has no unit: write it as {example}")]
    NoUnit {
        /// What was written.
        input: String,
        /// A correct value of the same kind.
        example: &'static str,
    },
    /// A unit this kind of value does not know.
    #[error("{input:?} has an unknown unit: {known}")]
    UnknownUnit {
        /// What was written.
        input: String,
        /// The units that are known.
        known: &'static str,
    },
    /// `Mb`, `kb`: megabits to some, megabytes to others.
    #[error("{input:?} is ambiguous: write bits as \"Mbit/s\" or bytes as \"MB/s\"")]
    AmbiguousBits {
        /// What was written.
        input: String,
    },
    /// Not a number at all.
    #[error("{input:?} is not a number with a unit, such as {example}")]
    NotANumber {
        /// What was written.
        input: String,
        /// A correct value of the same kind.
        example: &'static str,
    },
}

/// A value read from a TOML string through its `FromStr`.
pub(crate) trait TextValue: FromStr {
    /// What the value looks like, for toml's "invalid type" message.
    const EXPECTING: &'static str;
}

/// Turns any [`TextValue`] into a serde visitor, so every kind of value shares one error path.
struct TextVisitor<T>(PhantomData<T>);

impl<T: TextValue> Visitor<'_> for TextVisitor<T>
where
    T::Err: fmt::Display,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

fn deserialize_text<'de, D: Deserializer<'de>, T: TextValue>(d: D) -> Result<T, D::Error>
where
    T::Err: fmt::Display,
{
    d.deserialize_str(TextVisitor(PhantomData))
}

/// This module's values deserialize through their `FromStr`, like [`Text`] but without the
/// wrapper.
macro_rules! deserialize_as_text {
    ($($value:ty),*) => {$(
        impl<'de> Deserialize<'de> for $value {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_text(d)
            }
        }
    )*};
}

deserialize_as_text!(Size, DirtyRate, Bandwidth, Seconds);

/// A value whose type (an algorithm, a layout) already knows how to parse itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Text<T>(pub T);

impl<'de, T: TextValue> Deserialize<'de> for Text<T>
where
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_text(d).map(Text)
    }
}

impl TextValue for crate::protocol::Algorithm {
    const EXPECTING: &'static str = "an algorithm name such as \"precopy\"";
}

impl TextValue for crate::engine::Priority {
    const EXPECTING: &'static str = "a priority, \"low\", \"normal\" or \"high\"";
}

impl TextValue for crate::format::NativeLayout {
    const EXPECTING: &'static str = "a native layout, \"kvm\" or \"xen-hvm\"";
}

/// A size, bytes: `"4GiB"`, `"512MiB"`, `"100MB"` (ByteSize's grammar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub u64);

impl FromStr for Size {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        Ok(Size(s.parse::<ByteSize>()?.0))
    }
}

impl TextValue for Size {
    const EXPECTING: &'static str = "a size with a unit, such as \"4GiB\"";
}

const RATE_EXAMPLE: &str = "\"10Gbit\", \"1Gbit/s\" or \"100MB/s\"";
const RATE_UNITS: &str = "bits per second (Kbit, Mbit, Gbit, Tbit, written \"Gbit\", \"Gbit/s\" or \"Gbps\") \
                          or bytes per second (B, KB, MB, GB, KiB, MiB, GiB, written \"MB\" or \"MB/s\")";

/// A rate that may be zero (a guest that writes nothing), bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DirtyRate(pub f64);

impl FromStr for DirtyRate {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_rate(s).map(DirtyRate)
    }
}

impl TextValue for DirtyRate {
    const EXPECTING: &'static str = "a rate with a unit, such as \"50MB/s\"";
}

/// A bandwidth, which must be above zero, bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bandwidth(pub f64);

impl FromStr for Bandwidth {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        let bytes_per_sec = parse_rate(s)?;
        if bytes_per_sec > 0.0 {
            Ok(Bandwidth(bytes_per_sec))
        } else {
            Err(UnitError::Zero { input: s.to_owned() })
        }
    }
}

impl TextValue for Bandwidth {
    const EXPECTING: &'static str = "a bandwidth with a unit, such as \"10Gbit\"";
}

/// A duration or a point in virtual time, seconds: `"20ms"`, `"1.5s"`, `"10m"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Seconds(pub f64);

impl FromStr for Seconds {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        const EXAMPLE: &str = "\"20ms\", \"1.5s\" or \"10m\"";
        let (value, unit) = split_number(s, s, "duration", EXAMPLE)?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => {
                return Err(UnitError::NoUnit {
                    input: s.to_owned(),
                    example: EXAMPLE,
                })
            }
            _ => {
                return Err(UnitError::UnknownUnit {
                    input: s.to_owned(),
                    known: "ns, us, ms, s, m (or min), h",
                })
            }
        };
        Ok(Seconds(value * scale))
    }
}

impl TextValue for Seconds {
    const EXPECTING: &'static str = "a duration with a unit, such as \"1.5s\"";
}

/// A guest's write rate: one rate, or a range `[low, high]` from which each VM draws its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RateSpec {
    /// Every VM writes at this rate, bytes per second.
    Fixed(f64),
    /// Each VM draws its rate uniformly from `low..=high`, bytes per second.
    Range(f64, f64),
}

struct RateSpecVisitor;

impl<'de> Visitor<'de> for RateSpecVisitor {
    type Value = RateSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rate such as \"50MB/s\", or a range such as [\"10MB/s\", \"100MB/s\"]")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RateSpec, E> {
        parse_rate(v).map(RateSpec::Fixed).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RateSpec, A::Error> {
        let mut next = |i| {
            seq.next_element::<DirtyRate>()?
                .ok_or_else(|| de::Error::invalid_length(i, &self))
        };
        let (low, high) = (next(0)?.0, next(1)?.0);
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(3, &self));
        }
        if low > high {
            return Err(de::Error::custom(format_args!(
                "the range's low end ({low} B/s) is above its high end ({high} B/s)"
            )));
        }
        Ok(RateSpec::Range(low, high))
    }
}

impl<'de> Deserialize<'de> for RateSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RateSpecVisitor)
    }
}

/// Parses a rate in bits or bytes per second into bytes per second; zero is allowed.
fn parse_rate(s: &str) -> Result<f64, UnitError> {
    let t = s.trim();
    let (body, in_bits) = match t.strip_suffix("bps") {
        Some(prefix) => (prefix, true),
        None => {
            let body = t.strip_suffix("/s").unwrap_or(t);
            match body.strip_suffix("bit") {
                Some(prefix) => (prefix, true),
                None => (body, false),
            }
        }
    };
    let (value, unit) = split_number(s, body, "rate", RATE_EXAMPLE)?;
    let unknown = || UnitError::UnknownUnit {
        input: s.to_owned(),
        known: RATE_UNITS,
    };
    if in_bits {
        let scale = match unit.to_ascii_lowercase().as_str() {
            "" => 1.0,
            "k" => 1e3,
            "m" => 1e6,
            "g" => 1e9,
            "t" => 1e12,
            _ => return Err(unknown()),
        };
        return Ok(value * scale / 8.0);
    }
    if unit.is_empty() {
        return Err(UnitError::NoUnit {
            input: s.to_owned(),
            example: RATE_EXAMPLE,
        });
    }
    // A lower-case b means bits in network speak and bytes in ByteSize's: refuse to guess.
    if unit.ends_with('b') {
        return Err(UnitError::AmbiguousBits { input: s.to_owned() });
    }
    body.parse::<ByteSize>().map(|b| b.0 as f64).map_err(|_| unknown())
}

/// Splits `"1.5 GiB"` into `(1.5, "GiB")`, refusing a negative or missing number; `input`
/// is the whole value, for messages.
fn split_number<'a>(
    input: &str,
    s: &'a str,
    what: &'static str,
    example: &'static str,
) -> Result<(f64, &'a str), UnitError> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(UnitError::Negative {
            input: input.to_owned(),
            what,
        });
    }
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(end);
    match number.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok((v, unit.trim())),
        _ => Err(UnitError::NotANumber {
            input: input.to_owned(),
            example,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rates_in_bits_and_bytes() {
        for (text, bytes_per_sec) in [
            ("10Gbit", 1.25e9),
            ("1Gbit/s", 1.25e8),
            ("1Gbps", 1.25e8),
            ("100 Mbit/s", 1.25e7),
            ("100MB/s", 1e8),
            ("50MiB/s", 50.0 * 1024.0 * 1024.0),
            ("0B/s", 0.0),
        ] {
            assert_eq!(parse_rate(text), Ok(bytes_per_sec), "{text}");
        }
    }

    #[test]
    fn test_rates_refused() {
        assert!(matches!(parse_rate("-5MB/s"), Err(UnitError::Negative { .. })));
        assert!(matches!(parse_rate("100"), Err(UnitError::NoUnit { .. })));
        assert!(matches!(parse_rate("100Mb/s"), Err(UnitError::AmbiguousBits { .. })));
        assert!(matches!(parse_rate("5 furlongs"), Err(UnitError::UnknownUnit { .. })));
        assert!(matches!(parse_rate("fast"), Err(UnitError::NotANumber { .. })));
        assert!(matches!("0Gbit".parse::<Bandwidth>(), Err(UnitError::Zero { .. })));
    }

    #[test]
    fn test_durations() {
        for (text, seconds) in [
            ("20ms", 0.02),
            ("1.5s", 1.5),
            ("10m", 600.0),
            ("2h", 7200.0),
            ("0s", 0.0),
        ] {
            assert_eq!(text.parse::<Seconds>(), Ok(Seconds(seconds)), "{text}");
        }
        assert!(matches!("-1s".parse::<Seconds>(), Err(UnitError::Negative { .. })));
        assert!(matches!("5".parse::<Seconds>(), Err(UnitError::NoUnit { .. })));
        assert!(matches!(
            "5 fortnights".parse::<Seconds>(),
            Err(UnitError::UnknownUnit { .. })
        ));
    }
}
