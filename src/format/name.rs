//! Names and ids that arrive from outside: VM ids and host names, from the control API, the CLI
//! and the wire.
//!
//! One rule, [`check_name`], applied at every entry so that nothing downstream (a log line, a
//! metric label, a URL path, a file name, the engine's maps) ever sees a NUL, a newline, a slash
//! or a 4 KiB string:
//!
//! * 1 to [`MAX_NAME_BYTES`] bytes;
//! * only ASCII letters, digits and `-` `_` `.` `:` `@` (no space, no slash, no control or
//!   non-ASCII character): safe unquoted in a shell, a path segment, a Prometheus label and a
//!   file name;
//! * the first character a letter or a digit, so a name is never mistaken for a command-line
//!   flag (`-x`) nor for `.` or `..`.
//!
//! Peer addresses (`HOST:PORT`, `[v6]:PORT`) are not names and are checked where they are
//! resolved.

/// The longest name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// How many characters of an offending value an error quotes: enough to recognise it, never the
/// whole of a huge one.
const QUOTED_CHARS: usize = 40;

/// Why a name was refused. Each variant names what kind of name it was and quotes the value
/// escaped (`escape_debug`), so a hostile value cannot break the line it is printed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} is empty; it must have 1 to {limit} characters")]
    Empty {
        /// What the name names (`VM id`, `host name`).
        kind: &'static str,
        /// The longest name accepted.
        limit: usize,
    },
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("{kind} \"{value}\" is {len} bytes long; the limit is {limit}")]
    TooLong {
        /// What the name names.
        kind: &'static str,
        /// The start of the value, escaped.
        value: String,
        /// Its length in bytes.
        len: usize,
        /// The longest name accepted.
        limit: usize,
    },
    /// The name holds a character outside the allowed set.
    #[error(
        "{kind} \"{value}\" has '{character}' at byte {index}: only letters, digits and - _ . : @ \
         are allowed"
    )]
    BadCharacter {
        /// What the name names.
        kind: &'static str,
        /// The value, escaped (shortened when long).
        value: String,
        /// The first offending character, escaped.
        character: String,
        /// Its byte offset.
        index: usize,
    },
    /// The name starts with a punctuation character.
    #[error("{kind} \"{value}\" must start with a letter or a digit")]
    BadStart {
        /// What the name names.
        kind: &'static str,
        /// The value, escaped.
        value: String,
    },
}

/// Checks that `value` is an acceptable name of `kind` (`"VM id"`, `"host name"`, ...): see the
/// module docs for the rule.
///
/// ```
/// use migratory::format::{check_name, NameError};
/// assert!(check_name("VM id", "web-1.prod@eu:2").is_ok());
/// assert!(matches!(check_name("VM id", "a/b"), Err(NameError::BadCharacter { index: 1, .. })));
/// assert!(matches!(check_name("VM id", &"x".repeat(65)), Err(NameError::TooLong { len: 65, .. })));
/// ```
pub fn check_name(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty {
            kind,
            limit: MAX_NAME_BYTES,
        });
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong {
            kind,
            value: quoted(value),
            len: value.len(),
            limit: MAX_NAME_BYTES,
        });
    }
    if let Some((index, c)) = value.char_indices().find(|&(_, c)| !is_name_char(c)) {
        return Err(NameError::BadCharacter {
            kind,
            value: quoted(value),
            character: c.escape_debug().to_string(),
            index,
        });
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::BadStart {
            kind,
            value: quoted(value),
        });
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
}

/// `value` escaped, cut after [`QUOTED_CHARS`] characters with `...` to show it was cut.
fn quoted(value: &str) -> String {
    let mut out: String = value.chars().take(QUOTED_CHARS).flat_map(char::escape_debug).collect();
    if value.chars().nth(QUOTED_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_in_the_safe_set_are_accepted() {
        for ok in [
            "a",
            "vm1",
            "web-1.prod",
            "A_b:c@d",
            "0",
            "127.0.0.1:7000",
            &"x".repeat(MAX_NAME_BYTES),
        ] {
            assert_eq!(check_name("VM id", ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn test_each_bad_name_gets_its_variant() {
        let long = "y".repeat(4096);
        type Expect = fn(&NameError) -> bool;
        let cases: [(&str, Expect); 12] = [
            ("", |e| matches!(e, NameError::Empty { limit: 64, .. })),
            (&long, |e| {
                matches!(
                    e,
                    NameError::TooLong {
                        len: 4096,
                        limit: 64,
                        ..
                    }
                )
            }),
            ("a\0b", |e| matches!(e, NameError::BadCharacter { index: 1, .. })),
            ("a/b", |e| matches!(e, NameError::BadCharacter { index: 1, .. })),
            ("a\nb", |e| matches!(e, NameError::BadCharacter { index: 1, .. })),
            ("a b", |e| matches!(e, NameError::BadCharacter { index: 1, .. })),
            ("a%2Fb", |e| matches!(e, NameError::BadCharacter { index: 1, .. })),
            ("vm\u{e9}", |e| matches!(e, NameError::BadCharacter { index: 2, .. })),
            ("a\"b", |e| matches!(e, NameError::BadCharacter { index: 1, .. })),
            ("-rf", |e| matches!(e, NameError::BadStart { .. })),
            ("..", |e| matches!(e, NameError::BadStart { .. })),
            (".hidden", |e| matches!(e, NameError::BadStart { .. })),
        ];
        for (value, expected) in cases {
            let err = check_name("VM id", value).expect_err(value);
            assert!(expected(&err), "{value:?}: {err:?}");
        }
    }

    #[test]
    fn test_errors_escape_the_value_and_stay_short() {
        let err = check_name("VM id", "a\0b\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM id \"a\\0b\\n\" has '\\0' at byte 1: only letters, digits and - _ . : @ are allowed"
        );
        let err = check_name("host name", &"z".repeat(4096)).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("host name \"zzz"), "{text}");
        assert!(text.ends_with("...\" is 4096 bytes long; the limit is 64"), "{text}");
        assert!(text.len() < 200, "{text}");
        assert_eq!(
            check_name("VM id", "").unwrap_err().to_string(),
            "VM id is empty; it must have 1 to 64 characters"
        );
    }

    #[test]
    fn test_64_bytes_pass_and_65_do_not() {
        assert!(check_name("VM id", &"a".repeat(64)).is_ok());
        assert!(matches!(
            check_name("VM id", &"a".repeat(65)),
            Err(NameError::TooLong { len: 65, .. })
        ));
    }
}
