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

use std::fmt;
use std::io::Read;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Environment variable holding the cluster key when no file is given.
pub const KEY_ENV: &str = "MIGRATORY_CLUSTER_KEY";
/// Shortest key accepted.
const MIN_KEY_LEN: usize = 16;
/// Longest key file read.
const MAX_KEY_LEN: usize = 4096;

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

impl ClusterKey {
    /// A key from bytes (trailing whitespace, such as a file's final newline, is dropped).
    pub fn new(bytes: &[u8]) -> Result<Self, AuthError> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let key = &bytes[..end];
        if key.len() < MIN_KEY_LEN || key.len() > MAX_KEY_LEN {
            return Err(AuthError::KeyLength { len: key.len() });
        }
        Ok(Self(key.to_vec()))
    }

    /// Reads a key file (at most 4 KiB).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let read = |e| AuthError::Read {
            path: path.display().to_string(),
            source: e,
        };
        let mut buf = Vec::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_KEY_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(read)?;
        Self::new(&buf)
    }

    /// The key from [`KEY_ENV`], if set.
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        match std::env::var_os(KEY_ENV) {
            Some(v) => Self::new(v.as_encoded_bytes()).map(Some),
            None => Ok(None),
        }
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; new_from_slice cannot fail for it.
        let mut m = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
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

    #[test]
    fn test_proofs_bind_key_label_and_nonces() {
        let k = ClusterKey::new(b"correct horse battery staple\n").expect("key");
        let other = ClusterKey::new(b"another key of enough length").expect("key");
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
        let k = ClusterKey::new(b"0123456789abcdef").expect("key");
        assert_eq!(format!("{k:?}"), "ClusterKey(<16 bytes>)");
    }
}
