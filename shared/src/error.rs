//! The wire error object of SPEC §1.5: `{"error":{"code","message","field"?,"index"?}}`.
//!
//! Every error Drover sends to a client — in a request reply or in a rejected record — has this
//! shape, so a client in any language can branch on `code` and show `message` to a person.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The machine-readable class of an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bytes are not JSON.
    InvalidJson,
    /// A field has the wrong type or breaks its rule.
    InvalidField,
    /// An object has a field the schema does not know.
    UnknownField,
    /// The message or a field is larger than allowed.
    TooLarge,
    /// The id was already submitted.
    Duplicate,
    /// The dependencies of a workflow form a cycle.
    Cycle,
    /// A dependency names a task that does not exist.
    MissingDependency,
    /// The task, schedule or queue does not exist.
    NotFound,
    /// The operation is not allowed in the current state.
    NotAllowed,
    /// A dependency (NATS, the leader) is unavailable; retry later.
    Unavailable,
    /// A bug or an unexpected failure inside Drover.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire, e.g. `"invalid_field"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidField => "invalid_field",
            Self::UnknownField => "unknown_field",
            Self::TooLarge => "too_large",
            Self::Duplicate => "duplicate",
            Self::Cycle => "cycle",
            Self::MissingDependency => "missing_dependency",
            Self::NotFound => "not_found",
            Self::NotAllowed => "not_allowed",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// `true` when the same request may succeed later unchanged.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Unavailable)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One error as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// What kind of error.
    pub code: ErrorCode,
    /// What was wrong and what would be right, for a person.
    pub message: String,
    /// The offending field, where there is one (dotted path, e.g. `backoff.factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The offending element of an array submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.code)?;
        if let Some(index) = self.index {
            write!(f, "task [{index}]: ")?;
        }
        f.write_str(&self.message)
    }
}

impl ApiError {
    /// An error of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            index: None,
        }
    }

    /// `invalid_field` for `field`; the message is prefixed with the field's name.
    pub fn invalid_field(field: impl Into<String>, rule: impl fmt::Display) -> Self {
        let field = field.into();
        Self {
            code: ErrorCode::InvalidField,
            message: format!("field `{field}`: {rule}"),
            field: Some(field),
            index: None,
        }
    }

    /// Sets the field.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Sets the array index (the element of a batch submission the error is about).
    pub fn at_index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The wire form, `{"error":{...}}`.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply {
            error: self.clone(),
        }
    }

    /// The wire form as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(&self.to_reply()).unwrap_or_default()
    }
}

/// The envelope `{"error": ApiError}` every error reply and rejected record uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error.
    pub error: ApiError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        let e = ApiError::invalid_field("max_attempts", "must be an integer from 1 to 100, got 0")
            .at_index(2);
        let json = String::from_utf8(e.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"invalid_field","message":"field `max_attempts`: must be an integer from 1 to 100, got 0","field":"max_attempts","index":2}}"#
        );
        let back: ErrorReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back.error, e);
        assert_eq!(
            e.to_string(),
            "invalid_field: task [2]: field `max_attempts`: must be an integer from 1 to 100, got 0"
        );
    }
}
