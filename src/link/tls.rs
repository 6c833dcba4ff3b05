//! TLS with mutual authentication for every stream of a migration (rustls, ring provider).
//!
//! Guest memory is secret, so with TLS configured both the control connection and every data
//! connection are encrypted, and each side must present a certificate signed by the cluster's
//! CA. Handshakes run on tokio; data connections then continue on blocking threads with the
//! same rustls connection state.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors of TLS set-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// PEM contents that do not parse, or hold nothing usable.
    #[error("bad {what}: {detail}")]
    Pem {
        /// Certificate, key or CA.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Both halves of a host's TLS identity: as a server (incoming) and as a client (outgoing).
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// Accepts peers whose certificates the CA signed.
    pub server: Arc<ServerConfig>,
    /// Presents this host's certificate and checks the peer's against the CA.
    pub client: Arc<ClientConfig>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl TlsSetup {
    /// From PEM files: this host's certificate chain, its private key, and the cluster CA.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
    }

    /// From PEM bytes.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, TlsError> {
        let pem = |what: &'static str| {
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                what,
                detail: e.to_string(),
            }
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(pem("certificate"))?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                what: "certificate",
                detail: "no certificate in the file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem("private key"))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(ca.map_err(pem("CA"))?).map_err(|e| TlsError::Pem {
                what: "CA",
                detail: e.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                what: "CA",
                detail: "no CA certificate in the file".into(),
            });
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let client_verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(config)?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(certs, key)
            .map_err(config)?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}
