//! Cluster authentication: both sides prove knowledge of a shared key with HMAC-SHA256 over
//! fresh nonces, before anything is reserved.
//!
//! ```text
//! source: Hello { nonce_s }                       ──▶
//!         ◀── Welcome { nonce_t, proof_t = HMAC(key, "target" ‖ nonce_s ‖ nonce_t) }
//! source checks proof_t, then Authenticate { proof_s = HMAC(key, "source" ‖ nonce_t ‖ nonce_s) } ──▶
//! target checks proof_s before it accepts Reserve
//! ```
//! Each proof covers the other side's fresh nonce, so a recorded exchange cannot be replayed,
//! and the two labels keep a proof from being reflected back.
//!
//! Over TCP the transport proves the same key first, before the engine sees a single frame,
//! and authenticates every frame after (see [`crate::link::secure`]); this exchange then runs
//! inside an authenticated link, and on its own for in-process links.
//!
//! A key is at least [`MIN_KEY_LEN`] random bytes, written as hex in a key file or in
//! [`KEY_ENV`]; [`ClusterKey::from_file`] also says whether the file is readable by others, and
//! leaves it to the caller to warn.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Environment variable holding the cluster key (hex) when no file is given.
pub const KEY_ENV: &str = "MIGRATORY_CLUSTER_KEY";
/// Shortest key accepted: 256 bits, so that guessing it is out of reach.
pub const MIN_KEY_LEN: usize = 32;
/// Longest key accepted.
const MAX_KEY_LEN: usize = 2048;
/// Longest key file read (hex digits and whitespace).
const MAX_KEY_FILE_LEN: usize = 2 * MAX_KEY_LEN + 64;

/// Errors of authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file could not be read.
    #[error("cannot read cluster key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key is too short or too long.
    #[error("cluster key of {len} bytes: it must hold {MIN_KEY_LEN}..={MAX_KEY_LEN} bytes")]
    KeyLength {
        /// Its length.
        len: usize,
    },
    /// The key text is not hexadecimal.
    #[error("cluster key is not hex: {detail}")]
    NotHex {
        /// What was wrong (never the key itself).
        detail: String,
    },
    /// No randomness for a nonce.
    #[error("cannot read /dev/urandom: {0}")]
    Random(std::io::Error),
}

/// The shared cluster key. Its bytes never appear in Debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes>)", self.0.len())
    }
}

/// A key file that others than its owner may read: the caller decides how loudly to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoosePermissions {
    /// The file.
    pub path: PathBuf,
    /// Its permission bits (e.g. `0o644`).
    pub mode: u32,
}

impl fmt::Display for LoosePermissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster key file {} has mode {:o}: group or others may read it (chmod 600)",
            self.path.display(),
            self.mode
        )
    }
}

/// A key read from a file, with what the file's permissions give away.
#[derive(Debug, Clone)]
pub struct LoadedKey {
    /// The key.
    pub key: ClusterKey,
    /// Set if the file is group- or world-readable.
    pub loose_permissions: Option<LoosePermissions>,
}

impl ClusterKey {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`] of them).
    pub fn new(bytes: &[u8]) -> Result<Self, AuthError> {
        if bytes.len() < MIN_KEY_LEN || bytes.len() > MAX_KEY_LEN {
            return Err(AuthError::KeyLength { len: bytes.len() });
        }
        Ok(Self(bytes.to_vec()))
    }

    /// A key from its hex text, as a key file or [`KEY_ENV`] holds it (surrounding whitespace,
    /// such as a file's final newline, is dropped).
    pub fn from_hex(text: &[u8]) -> Result<Self, AuthError> {
        let text = text.trim_ascii();
        if text.len() % 2 != 0 {
            return Err(AuthError::NotHex {
                detail: format!("{} digits, an odd count", text.len()),
            });
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(AuthError::NotHex {
                detail: "a character that is not a hex digit".into(),
            }),
        };
        let bytes = text
            .chunks_exact(2)
            .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
            .collect::<Result<Vec<u8>, AuthError>>()?;
        Self::new(&bytes)
    }

    /// Reads a hex key file; also reports whether group or others may read it.
    pub fn from_file(path: &Path) -> Result<LoadedKey, AuthError> {
        let read = |e| AuthError::Read {
            path: path.display().to_string(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            file.metadata().map_err(read)?.permissions().mode() & 0o777
        };
        let mut buf = Vec::new();
        file.take(MAX_KEY_FILE_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(read)?;
        let key = Self::from_hex(&buf)?;
        let loose_permissions = (mode & 0o077 != 0).then(|| LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
        Ok(LoadedKey { key, loose_permissions })
    }

    /// The key from [`KEY_ENV`] (hex), if set.
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        match std::env::var_os(KEY_ENV) {
            Some(v) => Self::from_hex(v.as_encoded_bytes()).map(Some),
            None => Ok(None),
        }
    }

    /// HMAC-SHA256 keyed with the cluster key.
    pub(crate) fn hmac(&self) -> Hmac<Sha256> {
        keyed(&self.0)
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        let mut m = self.hmac();
        m.update(label);
        m.update(&(first.len() as u32).to_be_bytes());
        m.update(first);
        m.update(second);
        m
    }

    /// The proof of side `label` over the two nonces.
    pub fn prove(&self, label: &[u8], first: &[u8], second: &[u8]) -> Vec<u8> {
        self.mac(label, first, second).finalize().into_bytes().to_vec()
    }

    /// Checks a proof in constant time.
    pub fn verify(&self, label: &[u8], first: &[u8], second: &[u8], proof: &[u8]) -> bool {
        self.mac(label, first, second).verify_slice(proof).is_ok()
    }
}

/// HMAC-SHA256 under `key` (a cluster key or a session key).
pub(crate) fn keyed(key: &[u8]) -> Hmac<Sha256> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// Label of the target's proof.
pub const TARGET: &[u8] = b"migratory-target-v1";
/// Label of the source's proof.
pub const SOURCE: &[u8] = b"migratory-source-v1";

/// A fresh random nonce.
pub fn nonce() -> Result<Vec<u8>, AuthError> {
    let mut n = vec![0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(AuthError::Random)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(byte: u8) -> ClusterKey {
        ClusterKey::new(&[byte; MIN_KEY_LEN]).expect("key")
    }

    #[test]
    fn test_proofs_bind_key_label_and_nonces() {
        let (k, other) = (key_of(1), key_of(2));
        let (a, b) = (nonce().expect("nonce"), nonce().expect("nonce"));
        let p = k.prove(TARGET, &a, &b);
        assert!(k.verify(TARGET, &a, &b, &p));
        assert!(!other.verify(TARGET, &a, &b, &p), "wrong key");
        assert!(!k.verify(SOURCE, &a, &b, &p), "a proof cannot be reflected");
        assert!(!k.verify(TARGET, &b, &a, &p), "nonces are ordered");
        assert!(!k.verify(TARGET, &a, &b, &[]), "missing proof");
        assert_ne!(a, b);
    }

    #[test]
    fn test_key_length_and_debug() {
        assert!(matches!(
            ClusterKey::new(b"short"),
            Err(AuthError::KeyLength { len: 5 })
        ));
        assert!(matches!(
            ClusterKey::new(&[7; MIN_KEY_LEN - 1]),
            Err(AuthError::KeyLength { len: 31 })
        ));
        assert_eq!(format!("{:?}", key_of(3)), "ClusterKey(<32 bytes>)");
    }

    #[test]
    fn test_hex_key_trimmed_and_checked() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let k = ClusterKey::from_hex(format!("  {hex}\n").as_bytes()).expect("hex key");
        let mut raw = Vec::new();
        for _ in 0..2 {
            raw.extend([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
            ]);
        }
        assert_eq!(k, ClusterKey::new(&raw).expect("raw"));
        assert!(matches!(
            ClusterKey::from_hex(&hex.as_bytes()[..62]),
            Err(AuthError::KeyLength { len: 31 })
        ));
        assert!(matches!(
            ClusterKey::from_hex(&hex.as_bytes()[..63]),
            Err(AuthError::NotHex { .. })
        ));
        let text_key = "correct horse battery staple, and more of it";
        assert!(matches!(
            ClusterKey::from_hex(text_key.as_bytes()),
            Err(AuthError::NotHex { .. })
        ));
    }

    #[test]
    fn test_key_file_reports_loose_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("migratory-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cluster.key");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        for (mode, loose) in [(0o600, false), (0o640, true), (0o604, true), (0o400, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let loaded = ClusterKey::from_file(&path).expect("key file");
            assert_eq!(loaded.key, ClusterKey::new(&[0xab; 32]).expect("key"));
            assert_eq!(loaded.loose_permissions.is_some(), loose, "mode {mode:o}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
