//! How the daemon says no: a status and an [`ApiError`] body, whether from its own checks or
//! from an [`EngineError`]. Handlers return `Result<HttpResponse, Refusal>` and refuse with `?`.

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use migratory::api::ApiError;
use migratory::engine::EngineError;

/// A request the daemon does not carry out, and why.
#[derive(Debug)]
pub(super) struct Refusal {
    status: StatusCode,
    body: ApiError,
}

impl Refusal {
    /// `status` with `error` as the reason.
    pub(super) fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError::new(error),
        }
    }

    /// 400 naming the request field that was refused.
    pub(super) fn field(field: &str, e: impl fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ApiError::of_field(field, format!("invalid `{field}`: {e}")),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.body.error)
    }
}

impl ResponseError for Refusal {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(&self.body)
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::UnknownHost(_) | EngineError::UnknownVm { .. } | EngineError::UnknownMigration(_) => {
                StatusCode::NOT_FOUND
            }
            EngineError::DuplicateVm(_)
            | EngineError::TooLateToCancel(_)
            | EngineError::InsufficientMemory { .. }
            // Other migrations' floors hold the bandwidth budget this floor needs.
            | EngineError::FloorUnavailable { .. }
            // An operator action on a copy in the wrong state, or a resume the peer fenced off.
            | EngineError::ActionNotApplicable { .. }
            | EngineError::Fenced { .. } => StatusCode::CONFLICT,
            EngineError::InvalidConfig(_) | EngineError::Vm(_) => StatusCode::BAD_REQUEST,
            EngineError::Link { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_engine_errors_map_to_their_status() {
        for (e, status) in [
            (EngineError::UnknownMigration(9), StatusCode::NOT_FOUND),
            (EngineError::TooLateToCancel(9), StatusCode::CONFLICT),
            (
                EngineError::Fenced {
                    vm: "vm1".into(),
                    detail: "the peer holds it".into(),
                },
                StatusCode::CONFLICT,
            ),
            (EngineError::EngineStopped, StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let text = e.to_string();
            let refusal = Refusal::from(e);
            assert_eq!((refusal.status, refusal.body), (status, ApiError::new(text)));
        }
    }
}
