//! Parsing and validating a submission, field by field, so every error names its field.

use super::*;
use crate::error::{ApiError, ErrorCode};
use crate::retry::Backoff;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

// ---- the submission ---------------------------------------------------------------------------

/// How many shard tasks a task fans out into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shards {
    /// A fixed count, 1..=1024. One means no fan-out.
    Count(u32),
    /// One shard per live worker of the queue at dispatch time.
    All,
    /// No fan-out (the same as `Count(1)`; the default).
    #[default]
    One,
}

impl Shards {
    /// `true` for the default, a single unsharded task.
    pub fn is_one(&self) -> bool {
        matches!(self, Shards::One | Shards::Count(1))
    }
}

impl Serialize for Shards {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Shards::Count(n) => s.serialize_u32(*n),
            Shards::One => s.serialize_u32(1),
            Shards::All => s.serialize_str("all"),
        }
    }
}

/// A task as submitted (SPEC §1.1), validated and with defaults left unapplied where a queue's
/// configuration supplies them. Serializes back to the wire form.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSpec {
    /// Handler name.
    #[serde(rename = "type")]
    pub task_type: String,
    /// Handler input, exactly the bytes the client sent (`null` when absent).
    pub payload: Box<RawValue>,
    /// Task id; `None` until [`assign_ids`] fills it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Affinity/ordering key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Total attempts before `failed`; `None` means the default (3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Retry delays; `None` means the defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Per-attempt limit; `None` means the queue's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Earliest start, absolute.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time"
    )]
    pub run_at: Option<DateTime<Utc>>,
    /// Earliest start, relative to the submit time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Ids that must have `succeeded` before this task starts (no repeats).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Fan-out.
    #[serde(skip_serializing_if = "Shards::is_one")]
    pub shards: Shards,
    /// Uniqueness key (with `unique_for_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Uniqueness window in milliseconds (with `unique_key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_for_ms: Option<u64>,
    /// Free labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

pub(crate) fn ser_opt_time<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(t)),
        None => s.serialize_none(),
    }
}

/// Formats a timestamp the way every Drover record does: RFC 3339, UTC, milliseconds.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl TaskSpec {
    /// A task of `task_type` with a `null` payload and every option at its default.
    pub fn new(task_type: impl Into<String>) -> Self {
        Self {
            task_type: task_type.into(),
            payload: null_payload(),
            id: None,
            key: None,
            max_attempts: None,
            backoff: None,
            timeout_ms: None,
            run_at: None,
            delay_ms: None,
            depends_on: Vec::new(),
            shards: Shards::One,
            unique_key: None,
            unique_for_ms: None,
            meta: BTreeMap::new(),
        }
    }

    /// Sets the payload from any serializable value.
    pub fn with_payload<T: Serialize>(mut self, payload: &T) -> Result<Self, serde_json::Error> {
        self.payload = serde_json::value::to_raw_value(payload)?;
        Ok(self)
    }

    /// Parses and validates one task object.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        let raw: &RawValue = serde_json::from_slice(bytes).map_err(invalid_json)?;
        parse_task(raw)
    }

    /// Checks every rule of SPEC §1.1 on an already-built spec (for specs made in code rather
    /// than parsed).
    pub fn validate(&self) -> Result<(), ApiError> {
        // Round-tripping through the parser keeps one source of truth for the rules.
        let bytes = serde_json::to_vec(self)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot encode task: {e}")))?;
        Self::from_json(&bytes).map(|_| ())
    }

    /// The effective total attempts.
    pub fn effective_max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }

    /// The earliest start time given the submit time `now`, or `None` to start at once.
    pub fn not_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match (self.run_at, self.delay_ms) {
            (Some(at), _) if at > now => Some(at),
            (_, Some(ms)) if ms > 0 => {
                Some(now + chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX)))
            }
            _ => None,
        }
    }
}

fn null_payload() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// A parsed submission: one task, or a batch (array) accepted or rejected as a whole.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The tasks, in submit order.
    pub tasks: Vec<TaskSpec>,
    /// `true` when the message was a JSON array.
    pub is_array: bool,
}

/// Parses a submission message (SPEC §1.1): a task object or a non-empty array of them.
///
/// `max_bytes` is the largest message accepted (the server's `max_payload`); larger input is
/// `too_large`. The first invalid element rejects the whole array, with its `index`.
pub fn parse_submission(bytes: &[u8], max_bytes: usize) -> Result<Submission, ApiError> {
    if bytes.len() > max_bytes {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "submission is {} bytes, larger than the limit of {max_bytes} bytes; split it or put large data elsewhere and pass a reference",
                bytes.len()
            ),
        ));
    }
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_slice(bytes).map_err(invalid_json)?;
            if items.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::InvalidField,
                    "an array submission must hold at least one task",
                ));
            }
            let tasks = items
                .iter()
                .enumerate()
                .map(|(i, raw)| parse_task(raw).map_err(|e| e.at_index(i)))
                .collect::<Result<_, _>>()?;
            Ok(Submission {
                tasks,
                is_array: true,
            })
        }
        Some(b'{') => Ok(Submission {
            tasks: vec![TaskSpec::from_json(bytes)?],
            is_array: false,
        }),
        _ => {
            // Either not JSON at all, or JSON of the wrong shape: say which.
            let _: &RawValue = serde_json::from_slice(bytes).map_err(invalid_json)?;
            Err(ApiError::new(
                ErrorCode::InvalidField,
                "a submission must be a JSON object (one task) or an array of task objects",
            ))
        }
    }
}

fn invalid_json(e: serde_json::Error) -> ApiError {
    ApiError::new(ErrorCode::InvalidJson, format!("not valid JSON: {e}"))
}

/// The fields of one JSON object, in order, with their raw values; repeated names are kept so
/// that they can be reported.
struct RawFields<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawFields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawFields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(k) = map.next_key::<String>()? {
                    fields.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(RawFields(fields))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A short, printable excerpt of a raw JSON value for error messages.
fn excerpt(raw: &RawValue) -> String {
    let s = raw.get();
    if s.chars().count() <= 40 {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(40).collect::<String>())
    }
}

fn field<'a, T: Deserialize<'a>>(name: &str, raw: &'a RawValue, rule: &str) -> Result<T, ApiError> {
    serde_json::from_str(raw.get())
        .map_err(|_| ApiError::invalid_field(name, format!("{rule}, got {}", excerpt(raw))))
}

fn parse_task(raw: &RawValue) -> Result<TaskSpec, ApiError> {
    let RawFields(fields) = serde_json::from_str(raw.get()).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidField,
            format!("a task must be a JSON object, got {}", excerpt(raw)),
        )
    })?;
    let mut spec = TaskSpec::new(String::new());
    let mut seen: HashSet<&str> = HashSet::with_capacity(fields.len());
    let mut has_type = false;
    for (name, raw) in &fields {
        if !seen.insert(name.as_str()) {
            return Err(ApiError::invalid_field(
                name.as_str(),
                "appears more than once in the task object",
            ));
        }
        let raw: &RawValue = raw;
        match name.as_str() {
            "type" => {
                let rule = "must be a string matching [A-Za-z0-9_.:-]{1,64} naming a handler";
                let t: String = field("type", raw, rule)?;
                if !is_valid_type(&t) {
                    return Err(ApiError::invalid_field(
                        "type",
                        format!("{rule}, got {t:?}"),
                    ));
                }
                spec.task_type = t;
                has_type = true;
            }
            "payload" => spec.payload = raw.to_owned(),
            "id" => {
                let id: String = field("id", raw, "must be a string")?;
                if !is_valid_id(&id) {
                    return Err(ApiError::invalid_field(
                        "id",
                        format!("{ID_RULE}, got {id:?}"),
                    ));
                }
                spec.id = Some(id);
            }
            "key" => spec.key = opt_key("key", raw)?,
            "max_attempts" => {
                let rule = "must be an integer from 1 to 100";
                let n: u32 = field("max_attempts", raw, rule)?;
                if !(1..=MAX_ATTEMPTS_LIMIT).contains(&n) {
                    return Err(ApiError::invalid_field(
                        "max_attempts",
                        format!("{rule}, got {n}"),
                    ));
                }
                spec.max_attempts = Some(n);
            }
            "backoff" => {
                let b: Backoff = serde_json::from_str(raw.get()).map_err(|e| {
                    ApiError::invalid_field(
                        "backoff",
                        format!(
                            "must be an object with optional fields initial_ms, factor, max_ms, jitter ({e})"
                        ),
                    )
                })?;
                b.validate().map_err(|e| {
                    ApiError::new(ErrorCode::InvalidField, e.to_string()).with_field(e.field())
                })?;
                spec.backoff = Some(b);
            }
            "timeout_ms" => {
                let rule = "must be an integer number of milliseconds, at least 1";
                let n: u64 = field("timeout_ms", raw, rule)?;
                if n == 0 {
                    return Err(ApiError::invalid_field(
                        "timeout_ms",
                        format!("{rule}, got 0"),
                    ));
                }
                spec.timeout_ms = Some(n);
            }
            "run_at" => {
                let rule = "must be an RFC 3339 timestamp such as \"2026-01-31T12:00:00Z\"";
                let s: String = field("run_at", raw, rule)?;
                let t = DateTime::parse_from_rfc3339(&s).map_err(|e| {
                    ApiError::invalid_field("run_at", format!("{rule}, got {s:?} ({e})"))
                })?;
                spec.run_at = Some(t.with_timezone(&Utc));
            }
            "delay_ms" => {
                spec.delay_ms = Some(field(
                    "delay_ms",
                    raw,
                    "must be a non-negative integer number of milliseconds",
                )?)
            }
            "depends_on" => {
                let rule = "must be an array of task ids";
                let ids: Vec<String> = field("depends_on", raw, rule)?;
                if ids.len() > MAX_DEPENDENCIES {
                    return Err(ApiError::invalid_field(
                        "depends_on",
                        format!(
                            "lists {} ids; at most {MAX_DEPENDENCIES} are allowed",
                            ids.len()
                        ),
                    ));
                }
                let mut unique = HashSet::with_capacity(ids.len());
                for id in ids {
                    if !is_valid_any_id(&id) {
                        return Err(ApiError::invalid_field(
                            "depends_on",
                            format!("{id:?} is not a task id: ids {}", &ID_RULE[5..]),
                        ));
                    }
                    if unique.insert(id.clone()) {
                        spec.depends_on.push(id);
                    }
                }
            }
            "shards" => spec.shards = parse_shards(raw)?,
            "unique_key" => spec.unique_key = opt_key("unique_key", raw)?,
            "unique_for_ms" => {
                let rule = "must be an integer number of milliseconds, at least 1";
                let n: u64 = field("unique_for_ms", raw, rule)?;
                if n == 0 {
                    return Err(ApiError::invalid_field(
                        "unique_for_ms",
                        format!("{rule}, got 0"),
                    ));
                }
                spec.unique_for_ms = Some(n);
            }
            "meta" => spec.meta = parse_meta(raw)?,
            other => {
                return Err(ApiError {
                    code: ErrorCode::UnknownField,
                    message: format!(
                        "unknown field `{other}`; a task has the fields {}",
                        TASK_FIELDS.join(", ")
                    ),
                    field: Some(other.to_owned()),
                    index: None,
                });
            }
        }
    }
    if !has_type {
        return Err(ApiError::invalid_field(
            "type",
            "is required: the name of the handler that runs the task",
        ));
    }
    if spec.run_at.is_some() && spec.delay_ms.is_some() {
        return Err(ApiError::invalid_field(
            "delay_ms",
            "cannot be given together with `run_at`; use one of them",
        ));
    }
    match (&spec.unique_key, spec.unique_for_ms) {
        (Some(_), None) => {
            return Err(ApiError::invalid_field(
                "unique_for_ms",
                "is required with `unique_key`: how long, in milliseconds, the key stays taken",
            ));
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid_field(
                "unique_key",
                "is required with `unique_for_ms`: the key that must be unique in the queue",
            ));
        }
        _ => {}
    }
    Ok(spec)
}

fn opt_key(name: &str, raw: &RawValue) -> Result<Option<String>, ApiError> {
    let rule = "must be a string of at most 256 bytes";
    let key: Option<String> = field(name, raw, rule)?;
    match key {
        Some(k) if k.len() > MAX_KEY_BYTES => Err(ApiError::invalid_field(
            name,
            format!("{rule}, got {} bytes", k.len()),
        )),
        Some(k) if k.is_empty() => Err(ApiError::invalid_field(
            name,
            "must not be empty; leave it out instead",
        )),
        k => Ok(k),
    }
}

fn parse_shards(raw: &RawValue) -> Result<Shards, ApiError> {
    let rule = "must be an integer from 1 to 1024, or \"all\" (one shard per live worker)";
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        N(u32),
        S(String),
    }
    match field::<Wire>("shards", raw, rule)? {
        Wire::N(1) => Ok(Shards::One),
        Wire::N(n) if (2..=MAX_SHARDS).contains(&n) => Ok(Shards::Count(n)),
        Wire::S(s) if s == "all" => Ok(Shards::All),
        _ => Err(ApiError::invalid_field(
            "shards",
            format!("{rule}, got {}", excerpt(raw)),
        )),
    }
}

fn parse_meta(raw: &RawValue) -> Result<BTreeMap<String, String>, ApiError> {
    let meta: BTreeMap<String, String> =
        field("meta", raw, "must be an object whose values are strings")?;
    if meta.len() > MAX_META_ENTRIES {
        return Err(ApiError::invalid_field(
            "meta",
            format!(
                "has {} entries; at most {MAX_META_ENTRIES} are allowed",
                meta.len()
            ),
        ));
    }
    for (k, v) in &meta {
        if k.is_empty() || k.len() > MAX_META_KEY_BYTES {
            return Err(ApiError::invalid_field(
                format!("meta.{k}"),
                format!("keys must be 1 to {MAX_META_KEY_BYTES} bytes long"),
            ));
        }
        if v.len() > MAX_META_VALUE_BYTES {
            return Err(ApiError::invalid_field(
                format!("meta.{k}"),
                format!(
                    "values must be at most {MAX_META_VALUE_BYTES} bytes long, got {} bytes",
                    v.len()
                ),
            ));
        }
    }
    Ok(meta)
}
