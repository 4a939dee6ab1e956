//! The pure part of the schedule endpoints: parsing `{"id"}` requests and the reply bodies.

use drover_shared::cron::check_id;
use drover_shared::error::{ApiError, ErrorCode};
use serde::Serialize;

/// Parses `{"id":"<schedule id>"}`, the body of delete, pause, resume and trigger.
pub fn parse_schedule_id(body: &[u8]) -> Result<String, ApiError> {
    const SHAPE: &str = r#"a request is a JSON object {"id":"<schedule id>"}"#;
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("not valid JSON: {e}; {SHAPE}"),
        )
    })?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::new(ErrorCode::InvalidField, SHAPE));
    };
    if let Some(other) = obj.keys().find(|k| k.as_str() != "id") {
        return Err(ApiError::new(
            ErrorCode::UnknownField,
            format!("unknown field `{other}`; {SHAPE}"),
        )
        .with_field(other.clone()));
    }
    match obj.get("id") {
        Some(serde_json::Value::String(id)) => {
            check_id(id)?;
            Ok(id.clone())
        }
        Some(_) => Err(ApiError::invalid_field("id", "must be a string")),
        None => Err(ApiError::invalid_field(
            "id",
            "is required: the id of the schedule",
        )),
    }
}

/// The `not_found` error of an unknown schedule.
pub fn not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no schedule {id:?}; list them with `drover schedule ls` or create it with schedule.put"
        ),
    )
    .with_field("id")
}

/// Reply of `schedule.put`.
#[derive(Debug, Serialize)]
pub struct PutReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// The schedule id.
    pub id: &'a str,
    /// `true` when no schedule of this id existed.
    pub created: bool,
    /// KV revision written.
    pub revision: u64,
    /// The next fire time (RFC 3339) of a cron schedule that is not paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_fire: Option<String>,
}

/// Reply of `schedule.delete`, `pause` and `resume`.
#[derive(Debug, Serialize)]
pub struct StateReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// The schedule id.
    pub id: &'a str,
    /// Whether the schedule is paused now (absent after delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// `true` after delete.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Reply of `schedule.trigger`.
#[derive(Debug, Serialize)]
pub struct TriggerReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// The schedule id.
    pub id: &'a str,
    /// The id of the task submitted.
    pub task_id: &'a str,
    /// The queue it was submitted to.
    pub queue: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_requests() {
        assert_eq!(
            parse_schedule_id(br#"{"id":"nightly"}"#).unwrap(),
            "nightly"
        );
        let e = parse_schedule_id(br#"{"id":"nightly","x":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownField);
        let e = parse_schedule_id(b"{}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("id"));
        let e = parse_schedule_id(b"nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = parse_schedule_id(br#"{"id":"_x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
    }
}
