//! Newtypes and units at the memory boundary.

use std::fmt;
use std::str::FromStr;

/// Size of a guest page. The common format carries the page size, but every backend here uses
/// 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;

/// Index of a guest page (guest physical address / page size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

/// A byte count parsed from human input: `1GiB`, `256MiB`, `4096`, `64k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A byte size that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: expected a number with an optional unit (B, KiB, MiB, GiB, KB, MB, GB)")]
pub struct ByteSizeError {
    /// What the user wrote.
    pub input: String,
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ByteSizeError { input: s.to_string() };
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().map_err(|_| err())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024.0 * 1024.0,
            "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            _ => return Err(err()),
        };
        let bytes = value * mult;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(err());
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        const KI: f64 = 1024.0;
        if b >= KI * KI * KI {
            write!(f, "{:.2} GiB", b / (KI * KI * KI))
        } else if b >= KI * KI {
            write!(f, "{:.1} MiB", b / (KI * KI))
        } else if b >= KI {
            write!(f, "{:.1} KiB", b / KI)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parses_binary_and_decimal_units() {
        assert_eq!("256MiB".parse::<ByteSize>(), Ok(ByteSize(256 << 20)));
        assert_eq!("1GiB".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert_eq!("100MB".parse::<ByteSize>(), Ok(ByteSize(100_000_000)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("1.5k".parse::<ByteSize>(), Ok(ByteSize(1536)));
    }

    #[test]
    fn test_rejects_garbage() {
        assert!("".parse::<ByteSize>().is_err());
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("-5MiB".parse::<ByteSize>().is_err());
    }
}
