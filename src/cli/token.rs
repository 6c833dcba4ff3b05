//! The control API's bearer token: where its file lives, how `serve` creates it and checks it
//! on each request, and how both the daemon and the client read it.
//!
//! The file holds one line: the token, printable ASCII without spaces, at least
//! [`MIN_TOKEN_CHARS`] characters (a fresh one is 32 random bytes as 64 hex digits). Its default
//! place is `$MIGRATORY_API_TOKEN_FILE`, else `$HOME/.migratory/api-token`, so a daemon and the
//! CLI run by the same user agree on it without any flag.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable naming the token file when no flag does.
pub const TOKEN_FILE_ENV: &str = "MIGRATORY_API_TOKEN_FILE";

/// The environment variable holding the token itself (read by the client only).
pub const TOKEN_ENV: &str = "MIGRATORY_API_TOKEN";

/// The shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_CHARS: usize = 32;

/// The largest token file read; a token is one short line.
const MAX_TOKEN_FILE_BYTES: usize = 1024;

/// Random bytes in a token created by `serve`.
const NEW_TOKEN_BYTES: usize = 32;

/// Why the API token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Neither a flag, nor `$MIGRATORY_API_TOKEN_FILE`, nor `$HOME` says where the file is.
    #[error("no place for the API token file: pass --api-token-file, or set {TOKEN_FILE_ENV} or HOME")]
    NoDefaultPath,
    /// The file could not be read.
    #[error("cannot read the API token file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file (or its directory) could not be created.
    #[error("cannot create the API token file {}", path.display())]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The token is not usable.
    #[error("the API token from {from} {reason}")]
    Invalid {
        /// Where it came from (a path or the variable's name).
        from: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No randomness for a new token.
    #[error("cannot make a new API token")]
    Random(#[source] migratory::protocol::auth::AuthError),
}

/// `$MIGRATORY_API_TOKEN_FILE`, else `$HOME/.migratory/api-token`; `None` when neither is set.
pub fn default_path() -> Option<PathBuf> {
    let nonempty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    match (nonempty(TOKEN_FILE_ENV), nonempty("HOME")) {
        (Some(file), _) => Some(PathBuf::from(file)),
        (None, Some(home)) => Some(Path::new(&home).join(".migratory").join("api-token")),
        (None, None) => None,
    }
}

/// The token in `text`, whose origin `from` names errors: surrounding whitespace is dropped;
/// what is left must be [`MIN_TOKEN_CHARS`] or more printable ASCII characters without spaces
/// (it goes verbatim into an HTTP header).
pub fn parse(text: &str, from: &str) -> Result<String, TokenError> {
    let token = text.trim();
    let invalid = |reason: String| TokenError::Invalid {
        from: from.to_string(),
        reason,
    };
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("holds a space, a control or a non-ASCII character".to_string()));
    }
    if token.len() < MIN_TOKEN_CHARS {
        return Err(invalid(format!(
            "has {} characters; it needs at least {MIN_TOKEN_CHARS}",
            token.len()
        )));
    }
    Ok(token.to_string())
}

/// Reads the token from `path`.
pub fn read(path: &Path) -> Result<String, TokenError> {
    let read_err = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_TOKEN_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let from = path.display().to_string();
    if bytes.len() > MAX_TOKEN_FILE_BYTES {
        return Err(TokenError::Invalid {
            from,
            reason: format!("is over {MAX_TOKEN_FILE_BYTES} bytes"),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| TokenError::Invalid {
        from: from.clone(),
        reason: "is not UTF-8".to_string(),
    })?;
    parse(&text, &from)
}

/// The token in `path`, made first if the file does not exist: 32 random bytes as hex, in a
/// file of mode 0600 whose missing directories are made with mode 0700. Returns the token and
/// whether it was made now.
pub fn create_or_read(path: &Path) -> Result<(String, bool), TokenError> {
    match read(path) {
        Err(TokenError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        other => return other.map(|t| (t, false)),
    }
    let create_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TokenError::Create { path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create_err(dir))?;
    }
    let random = migratory::protocol::auth::nonce().map_err(TokenError::Random)?;
    let token: String = random
        .iter()
        .take(NEW_TOKEN_BYTES)
        .map(|b| format!("{b:02x}"))
        .collect();
    // Written whole under a private name, then linked into place: a daemon starting at the same
    // moment either finds no file or a complete one, and the first link wins.
    let staging = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .and_then(|mut f| {
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()
        });
    let linked = written.and_then(|()| fs::hard_link(&staging, path));
    let _ = fs::remove_file(&staging);
    match linked {
        Ok(()) => Ok((token, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read(path).map(|t| (t, false)),
        Err(e) => Err(create_err(path)(e)),
    }
}

/// The file's mode when group or others may read or write it; `None` when it is private (or
/// cannot be inspected).
pub fn exposed_mode(path: &Path) -> Option<u32> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Why a request's credentials were refused: what the daemon answers with its 401. The message
/// says whether the token was missing or wrong, never what it is.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The `error` text.
    pub message: &'static str,
    /// The `WWW-Authenticate` header.
    pub challenge: &'static str,
    /// A token was sent and it was not the right one (worth a log line).
    pub wrong: bool,
}

/// `Ok` when `authorization` (the header's value, if sent) is `Bearer <expected>`, the scheme
/// in any case; otherwise what to answer.
pub fn check_bearer(authorization: Option<&[u8]>, expected: &str) -> Result<(), Refusal> {
    let Some(bytes) = authorization else {
        return Err(Refusal {
            message: "missing bearer token: send `Authorization: Bearer <token>` with the token \
                      from the daemon's API token file (--api-token-file)",
            challenge: "Bearer realm=\"migratory\"",
            wrong: false,
        });
    };
    let scheme_ok = bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ");
    if !scheme_ok {
        return Err(Refusal {
            message: "malformed Authorization header: expected `Bearer <token>`",
            challenge: "Bearer realm=\"migratory\", error=\"invalid_request\"",
            wrong: false,
        });
    }
    if same_secret(bytes[7..].trim_ascii(), expected.as_bytes()) {
        return Ok(());
    }
    Err(Refusal {
        message: "wrong bearer token",
        challenge: "Bearer realm=\"migratory\", error=\"invalid_token\"",
        wrong: true,
    })
}

/// Compares two secrets in time that depends only on their lengths (public: every token made
/// here is 64 hex digits), so a caller cannot learn the token a byte at a time.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    let diff = given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn refusal(header: Option<&str>) -> Result<(), Refusal> {
        check_bearer(header.map(str::as_bytes), TOKEN)
    }

    #[test]
    fn test_bearer_check_tells_missing_malformed_and_wrong_apart() {
        assert_eq!(refusal(Some(&format!("Bearer {TOKEN}"))), Ok(()));
        assert_eq!(refusal(Some(&format!("bearer  {TOKEN} "))), Ok(()));
        let missing = refusal(None).unwrap_err();
        assert!(missing.message.starts_with("missing") && !missing.wrong, "{missing:?}");
        for malformed in [TOKEN.to_string(), format!("Basic {TOKEN}"), "Bearer".to_string()] {
            let r = refusal(Some(&malformed)).unwrap_err();
            assert!(r.message.starts_with("malformed"), "{malformed}: {r:?}");
        }
        for wrong in [
            "Bearer x",
            &format!("Bearer {}", &TOKEN[1..]),
            &format!("Bearer {TOKEN}0"),
        ] {
            let r = refusal(Some(wrong)).unwrap_err();
            assert!(r.wrong && r.message == "wrong bearer token", "{wrong}: {r:?}");
            assert!(r.challenge.starts_with("Bearer "), "{r:?}");
            assert!(!r.message.contains(TOKEN));
        }
    }

    #[test]
    fn test_same_secret_needs_equal_length_and_bytes() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "migratory-token-test-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn test_created_token_is_64_hex_in_a_private_file_and_read_back() {
        let dir = scratch("create");
        let path = dir.join("sub").join("api-token");
        let (token, created) = create_or_read(&path).unwrap();
        assert!(created);
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        assert_eq!(exposed_mode(&path), None);
        assert_eq!(create_or_read(&path).unwrap(), (token.clone(), false));
        assert_eq!(read(&path).unwrap(), token);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(exposed_mode(&path), Some(0o644));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn test_bad_tokens_are_refused() {
        assert!(parse(&format!("  {}\n", "a".repeat(32)), "x").is_ok());
        for bad in [
            "short",
            &format!("{} b", "a".repeat(32)),
            &format!("{}\r\nX: y", "a".repeat(32)),
        ] {
            assert!(matches!(parse(bad, "x"), Err(TokenError::Invalid { .. })), "{bad:?}");
        }
    }

    #[test]
    fn test_missing_file_is_a_read_error() {
        let err = read(&scratch("missing").join("none")).unwrap_err();
        assert!(matches!(err, TokenError::Read { .. }), "{err:?}");
    }
}
