//! The guest's debugcon lines (format in [`super`]'s docs, "Debugcon lines"): the parser a host
//! reads them with, and the bounded line buffer the kvm backend assembles them in.

use super::{DEBUGCON_PREFIX, DEBUGCON_READY_LINE};

/// The longest line kept; the guest's lines are 80 bytes at most, so anything longer is not
/// the guest's and is cut there (the rest of it up to its newline is dropped).
pub const MAX_DEBUGCON_LINE_BYTES: usize = 256;

/// What one pass line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugconReport {
    /// The low 32 bits of the verify passes completed.
    pub pass: u32,
    /// The progress counter: pages written so far.
    pub progress: u64,
    /// The low 32 bits of the mismatches the guest has found.
    pub mismatches: u32,
}

/// Reads a pass line (with or without its newline); `None` for anything else, the ready line
/// included (compare it with [`DEBUGCON_READY_LINE`]). Strict: the words, single spaces and
/// digit counts must be exactly the guest's.
pub fn parse_debugcon_line(line: &str) -> Option<DebugconReport> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let rest = line.strip_prefix(DEBUGCON_PREFIX)?;
    let mut words = rest.split(' ');
    let mut field = |name: &str, digits: usize| -> Option<u64> {
        if words.next()? != name {
            return None;
        }
        let hex = words.next()?;
        let well_formed = hex.len() == digits && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        well_formed.then(|| u64::from_str_radix(hex, 16).ok()).flatten()
    };
    let pass = u32::try_from(field("pass", 8)?).ok()?;
    let progress = field("progress", 16)?;
    let mismatches = u32::try_from(field("mismatches", 8)?).ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(DebugconReport {
        pass,
        progress,
        mismatches,
    })
}

/// True for the line the guest writes after its init pass (with or without its newline).
pub fn is_debugcon_ready_line(line: &str) -> bool {
    line.strip_suffix('\n').unwrap_or(line) == DEBUGCON_READY_LINE.trim_end_matches('\n')
}

/// Assembles the bytes written to the debugcon port into lines, keeping at most
/// [`MAX_DEBUGCON_LINE_BYTES`] of each.
#[derive(Debug, Default)]
pub struct DebugconLine {
    bytes: Vec<u8>,
    truncated: bool,
}

impl DebugconLine {
    /// Takes one byte; returns the line it completes (without its newline), if it is `\n`.
    pub fn push(&mut self, byte: u8) -> Option<String> {
        if byte == b'\n' {
            let line = String::from_utf8_lossy(&self.bytes).into_owned();
            self.bytes.clear();
            self.truncated = false;
            return Some(line);
        }
        if self.bytes.len() < MAX_DEBUGCON_LINE_BYTES {
            self.bytes.push(byte);
        } else {
            self.truncated = true;
        }
        None
    }

    /// True when the line being assembled was cut at [`MAX_DEBUGCON_LINE_BYTES`].
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_reads_the_documented_example() {
        let line = "migratory-guest: pass 0000001a progress 00000000000f4240 mismatches 00000000\n";
        assert_eq!(
            parse_debugcon_line(line),
            Some(DebugconReport {
                pass: 0x1a,
                progress: 1_000_000,
                mismatches: 0
            })
        );
        assert_eq!(parse_debugcon_line(line.trim_end()), parse_debugcon_line(line));
        let max = "migratory-guest: pass ffffffff progress ffffffffffffffff mismatches ffffffff";
        assert_eq!(
            parse_debugcon_line(max),
            Some(DebugconReport {
                pass: u32::MAX,
                progress: u64::MAX,
                mismatches: u32::MAX
            })
        );
    }

    #[test]
    fn test_parse_refuses_anything_else() {
        let bad = [
            "",
            "migratory-guest: ready",
            "migratory-guest: pass 1a progress 00000000000f4240 mismatches 00000000",
            "migratory-guest: pass 0000001A progress 00000000000f4240 mismatches 00000000",
            "migratory-guest: pass 0000001a progress 00000000000f4240 mismatches 00000000 x",
            "migratory-guest: pass 0000001a  progress 00000000000f4240 mismatches 00000000",
            "migratory-guest: pass 0000001a progress 00000000000f424g mismatches 00000000",
            "migratory-guest: pass 0000001a mismatches 00000000 progress 00000000000f4240",
            "other-guest: pass 0000001a progress 00000000000f4240 mismatches 00000000",
            "migratory-guest: pass +000001a progress 00000000000f4240 mismatches 00000000",
        ];
        for line in bad {
            assert_eq!(parse_debugcon_line(line), None, "{line:?}");
        }
        assert!(is_debugcon_ready_line(DEBUGCON_READY_LINE));
        assert!(is_debugcon_ready_line("migratory-guest: ready"));
        assert!(!is_debugcon_ready_line("migratory-guest: ready!"));
    }

    #[test]
    fn test_line_buffer_splits_lines_and_bounds_them() {
        let mut buffer = DebugconLine::default();
        let mut lines = Vec::new();
        for &b in b"one\ntwo\n\n" {
            lines.extend(buffer.push(b));
        }
        assert_eq!(lines, ["one", "two", ""]);
        for _ in 0..10 * MAX_DEBUGCON_LINE_BYTES {
            assert_eq!(buffer.push(b'x'), None);
        }
        assert!(buffer.truncated());
        let long = buffer.push(b'\n').unwrap();
        assert_eq!(long.len(), MAX_DEBUGCON_LINE_BYTES);
        assert!(!buffer.truncated());
        assert_eq!(buffer.push(b'\n').as_deref(), Some(""));
    }
}
