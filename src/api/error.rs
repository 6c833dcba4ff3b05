//! The body of every refusal.

use serde::{Deserialize, Serialize};

/// What the daemon answers with a 4xx or 5xx status: `{"error": "..."}`, plus `field` when one
/// field of the request was refused (an id that is not a valid name, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Why, in words meant for the operator.
    pub error: String,
    /// The request field that was refused, if the refusal is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// A refusal that is not about one field.
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            field: None,
        }
    }

    /// A refusal of the request field `field`.
    pub fn of_field(field: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            field: Some(field.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_field_appears_only_when_one_was_refused() {
        assert_eq!(
            serde_json::to_value(ApiError::new("no VM")).unwrap(),
            json!({"error": "no VM"})
        );
        assert_eq!(
            serde_json::to_value(ApiError::of_field("id", "bad id")).unwrap(),
            json!({"error": "bad id", "field": "id"})
        );
    }
}
