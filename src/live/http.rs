//! The daemons' control API, through the CLI's own client (`cli::client`): one definition of
//! how this binary speaks HTTP to a daemon.

use std::net::SocketAddr;

use serde_json::Value;

use crate::cli::client::{require_success, ApiClient, ClientError};

/// Why a request to a daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request did not get through, or the daemon refused it.
    #[error("{method} {path} on {addr}: {source}")]
    Client {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The daemon's API address.
        addr: SocketAddr,
        /// Why (boxed: a client error is large, and errors travel up every call).
        #[source]
        source: Box<ClientError>,
    },
    /// The answer is not what the API documents.
    #[error("{method} {path} on {addr}: malformed answer: {reason}")]
    Malformed {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The daemon's API address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

/// One daemon's control API over TCP.
#[derive(Debug, Clone)]
pub struct Api {
    addr: SocketAddr,
    client: Result<ApiClient, String>,
}

impl Api {
    /// The API at `addr`, sending `token` with every request.
    pub fn new(addr: SocketAddr, token: String) -> Self {
        let client = ApiClient::new(&format!("http://{addr}"))
            .map(|c| c.with_token(Some(token)))
            .map_err(|e| e.to_string());
        Self { addr, client }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, HttpError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.request("POST", path, Some(body))
    }

    fn request(&self, method: &'static str, path: &str, body: Option<&Value>) -> Result<Value, HttpError> {
        let client = self.client.as_ref().map_err(|reason| HttpError::Malformed {
            method,
            path: path.to_string(),
            addr: self.addr,
            reason: reason.clone(),
        })?;
        let answer = match method {
            "POST" => client.post(path, body),
            _ => client.get(path, body),
        };
        answer.and_then(require_success).map_err(|source| HttpError::Client {
            method,
            path: path.to_string(),
            addr: self.addr,
            source: Box::new(source),
        })
    }
}
