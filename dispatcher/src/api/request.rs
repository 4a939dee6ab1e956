//! The pure part of the request API: parsing requests, planning submit ids, the record
//! transitions of cancel and retry, and rebuilding a task from its dead-letter copy. No NATS.

use chrono::{DateTime, Utc};
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::names::{Names, is_valid_queue};
use drover_shared::task::{
    ErrorKind, Task, TaskError, TaskRecord, TaskSpec, TaskState, is_valid_any_id, is_valid_id,
};
use serde::Serialize;
use serde_json::value::RawValue;

/// The stream sequence the submit endpoint validates with before the real one is known. A real
/// stream sequence is never 0, so an id built from it (`_s0`, `_s0-<i>`) is never a real id.
pub const PLACEHOLDER_SEQ: u64 = 0;

/// The endpoint a request subject names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `<prefix>.api.submit.<queue>`, with the raw queue token (checked by the handler, so a
    /// bad one gets an error reply rather than silence).
    Submit(&'a str),
    /// `<prefix>.api.status`.
    Status,
    /// `<prefix>.api.cancel`.
    Cancel,
    /// `<prefix>.api.retry`.
    Retry,
    /// `<prefix>.api.schedule.<op>`, with the raw operation token (see `crate::schedule`).
    Schedule(&'a str),
}

impl Endpoint<'_> {
    /// A short stable name for logs and spans.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Submit(_) => "submit",
            Self::Status => "status",
            Self::Cancel => "cancel",
            Self::Retry => "retry",
            Self::Schedule(_) => "schedule",
        }
    }
}

/// The endpoint of `subject`, or `None` when it is not one of the API's subjects.
pub fn route<'a>(names: &Names, subject: &'a str) -> Option<Endpoint<'a>> {
    let rest = subject
        .strip_prefix(names.prefix())?
        .strip_prefix(".api.")?;
    match rest {
        "status" => Some(Endpoint::Status),
        "cancel" => Some(Endpoint::Cancel),
        "retry" => Some(Endpoint::Retry),
        _ => rest
            .strip_prefix("submit.")
            .map(Endpoint::Submit)
            .or_else(|| rest.strip_prefix("schedule.").map(Endpoint::Schedule)),
    }
}

/// Checks the queue token of a submit subject.
pub fn check_queue<'a>(names: &Names, token: &'a str) -> Result<&'a str, ApiError> {
    if is_valid_queue(token) {
        Ok(token)
    } else {
        Err(ApiError::invalid_field(
            "queue",
            format!(
                "{token:?} is not a queue name: request {} with a queue matching [a-z0-9][a-z0-9_-]{{0,63}}",
                names.api("submit.<queue>")
            ),
        ))
    }
}

/// Parses `{"id":"<task id>"}`, the body of status, cancel and retry.
pub fn parse_id_request(body: &[u8]) -> Result<String, ApiError> {
    const SHAPE: &str = r#"a request is a JSON object {"id":"<task id>"}"#;
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("not valid JSON: {e}; {SHAPE}"),
        )
    })?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("{SHAPE}, got {}", kind_of(&value)),
        ));
    };
    if let Some(other) = obj.keys().find(|k| k.as_str() != "id") {
        return Err(ApiError {
            code: ErrorCode::UnknownField,
            message: format!("unknown field `{other}`; {SHAPE}"),
            field: Some(other.clone()),
            index: None,
        });
    }
    let id = match obj.get("id") {
        None => {
            return Err(ApiError::invalid_field(
                "id",
                "is required: the id of the task",
            ));
        }
        Some(serde_json::Value::String(s)) => s,
        Some(v) => {
            return Err(ApiError::invalid_field(
                "id",
                format!("must be a string, got {}", kind_of(v)),
            ));
        }
    };
    if !is_valid_any_id(id) {
        return Err(ApiError::invalid_field(
            "id",
            format!(
                "{id:?} is not a task id: ids match [A-Za-z0-9][A-Za-z0-9_-]{{0,127}}, or start with '_' for generated ids"
            ),
        ));
    }
    Ok(id.clone())
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

// ---- submit ids ---------------------------------------------------------------------------------

/// The id a task of a validated submission will get from the intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedId {
    /// Known before publishing: the task's own id or one derived from `Nats-Msg-Id`.
    Known(String),
    /// `_s<stream seq><suffix>`: known once the PubAck gives the stream sequence.
    FromSeq {
        /// `""` for a single task, `-<index>` for an array element.
        suffix: String,
    },
}

impl PlannedId {
    /// The id, given the stream sequence of the submission message.
    pub fn resolve(&self, seq: u64) -> String {
        match self {
            Self::Known(id) => id.clone(),
            Self::FromSeq { suffix } => format!("_s{seq}{suffix}"),
        }
    }

    /// The id if it is known before publishing.
    pub fn known(&self) -> Option<&str> {
        match self {
            Self::Known(id) => Some(id),
            Self::FromSeq { .. } => None,
        }
    }
}

/// Plans the ids of tasks that `intake::prepare` accepted with [`PLACEHOLDER_SEQ`]: an id
/// derived from the stream sequence (`_s0`, `_s0-<i>`; only possible without `Nats-Msg-Id`,
/// and never a client id, which cannot start with `_`) is resolved after the PubAck.
pub fn plan_ids(tasks: &[Task], msg_id: Option<&str>) -> Vec<PlannedId> {
    let placeholder = format!("_s{PLACEHOLDER_SEQ}");
    tasks
        .iter()
        .map(|t| match t.id.strip_prefix(&placeholder) {
            Some(suffix) if msg_id.is_none() && (suffix.is_empty() || suffix.starts_with('-')) => {
                PlannedId::FromSeq {
                    suffix: suffix.to_owned(),
                }
            }
            _ => PlannedId::Known(t.id.clone()),
        })
        .collect()
}

/// The `Nats-Msg-Id` of the message the submit endpoint publishes: the request's own, else the
/// id of a single task that names one, so the stream's duplicate window catches a re-sent
/// copy. The intake assigns the same ids either way (a task's own id wins over the header).
pub fn forward_msg_id<'a>(msg_id: Option<&'a str>, planned: &'a [PlannedId]) -> Option<&'a str> {
    msg_id.or(match planned {
        [PlannedId::Known(id)] => Some(id.as_str()),
        _ => None,
    })
}

/// `{"ok":true,"ids":[...],"queue":"...","duplicates":[...]}`.
#[derive(Debug, Serialize)]
pub struct SubmitReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// Every task's id, in submit order (duplicates included).
    pub ids: &'a [String],
    /// The queue.
    pub queue: &'a str,
    /// The ids that were already submitted and are not run again.
    pub duplicates: &'a [String],
}

/// `{"ok":true,"task":<record>,"revision":n}`.
#[derive(Debug, Serialize)]
pub struct StatusReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// The record as stored in `drover-tasks`.
    pub task: &'a RawValue,
    /// Its KV revision (for clients that compare-and-set).
    pub revision: u64,
}

/// `{"ok":true,"id":"...","state":"cancelled","previous_state":"..."}`.
#[derive(Debug, Serialize)]
pub struct CancelReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// The task.
    pub id: &'a str,
    /// `cancelled`.
    pub state: TaskState,
    /// The state it was cancelled in.
    pub previous_state: TaskState,
}

/// `{"ok":true,"id":"...","queue":"...","state":"queued","retry":n}`.
#[derive(Debug, Serialize)]
pub struct RetryReply<'a> {
    /// Always `true`.
    pub ok: bool,
    /// The task.
    pub id: &'a str,
    /// Its queue.
    pub queue: &'a str,
    /// `queued`.
    pub state: TaskState,
    /// Which retry this is (1 for the first).
    pub retry: u64,
}

// ---- record transitions -------------------------------------------------------------------------

/// The record of `id` once cancelled at `now`, or `not_allowed` when it is already terminal.
pub fn cancel_record(record: &TaskRecord, now: DateTime<Utc>) -> Result<TaskRecord, ApiError> {
    if record.state.is_terminal() {
        return Err(ApiError::new(
            ErrorCode::NotAllowed,
            format!(
                "task {:?} is already {}, a terminal state; only scheduled, queued, running and retrying tasks can be cancelled",
                record.id, record.state
            ),
        )
        .with_field("state"));
    }
    let mut next = record.clone();
    next.state = TaskState::Cancelled;
    next.finished_at = Some(now);
    next.next_run_at = None;
    next.error = Some(TaskError {
        kind: ErrorKind::Cancelled,
        message: format!("cancelled by request while {}", record.state),
    });
    Ok(next)
}

/// Checks that `record` may be retried: only `failed` tasks are (SPEC §1.1, "a failed task").
pub fn check_retry(record: &TaskRecord) -> Result<(), ApiError> {
    let why = match record.state {
        TaskState::Failed => return Ok(()),
        TaskState::Succeeded => {
            "succeeded tasks are not run again; submit a new task with a new id"
        }
        TaskState::Cancelled => {
            "cancelled tasks are not retried (a cancel is deliberate); submit the task again with a new id"
        }
        TaskState::UpstreamFailed => {
            "it never ran because a dependency failed; retry the failed dependency, or submit the task again with a new id"
        }
        _ => "it has not finished; only failed tasks can be retried",
    };
    Err(ApiError::new(
        ErrorCode::NotAllowed,
        format!("task {:?} is {}: {why}", record.id, record.state),
    )
    .with_field("state"))
}

/// The record of a retried task: `queued` at attempt 0, with everything of the last series of
/// attempts cleared. `submitted_at`, `max_attempts`, `key`, `meta` and shard facts are kept.
pub fn retry_record(record: &TaskRecord) -> TaskRecord {
    TaskRecord {
        state: TaskState::Queued,
        attempt: 0,
        worker: None,
        partition: None,
        started_at: None,
        finished_at: None,
        next_run_at: None,
        duration_ms: None,
        error: None,
        result: None,
        ..record.clone()
    }
}

/// The submission a retry publishes, rebuilt from the task's dead-letter copy.
///
/// The copy is the task as it travelled (a [`Task`], what the outcome handler holds) or, for
/// copies written by other tools, a task object as submitted. The body names the task's `id`
/// when it is a client id; a generated id (`_s…`) cannot appear in a submission, so the intake
/// takes it from the `Drover-Task-Id` header of a retry.
pub fn resubmission(copy: &[u8], id: &str) -> Result<Vec<u8>, ApiError> {
    let mut spec = match serde_json::from_slice::<Task>(copy) {
        Ok(task) => {
            let mut spec = TaskSpec::new(task.task_type);
            spec.payload = task.payload;
            spec.key = task.key;
            spec.max_attempts = Some(task.max_attempts);
            spec.backoff = task.backoff;
            spec.timeout_ms = Some(task.timeout_ms);
            spec.meta = task.meta;
            spec
        }
        Err(_) => {
            let mut stripped = copy.to_vec();
            // A copy of a task with a generated id cannot pass the client-id rule; the id is
            // replaced below anyway.
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(copy)
                && let Some(obj) = v.as_object_mut()
                && obj.remove("id").is_some()
            {
                stripped = serde_json::to_vec(&v).unwrap_or(stripped);
            }
            TaskSpec::from_json(&stripped).map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "the dead-letter copy of task {id:?} is neither a task nor a task object ({e}); it cannot be retried"
                    ),
                )
            })?
        }
    };
    spec.id = is_valid_id(id).then(|| id.to_owned());
    serde_json::to_vec(&spec)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot encode the task: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::TaskSpec;

    fn names() -> Names {
        Names::default()
    }

    #[test]
    fn routes() {
        let n = names();
        assert_eq!(
            route(&n, "drover.api.submit.mail"),
            Some(Endpoint::Submit("mail"))
        );
        assert_eq!(
            route(&n, "drover.api.submit.a.b"),
            Some(Endpoint::Submit("a.b"))
        );
        assert_eq!(route(&n, "drover.api.status"), Some(Endpoint::Status));
        assert_eq!(route(&n, "drover.api.cancel"), Some(Endpoint::Cancel));
        assert_eq!(route(&n, "drover.api.retry"), Some(Endpoint::Retry));
        assert_eq!(
            route(&n, "drover.api.schedule.put"),
            Some(Endpoint::Schedule("put"))
        );
        assert_eq!(route(&n, "other.api.status"), None);
        assert!(check_queue(&n, "mail").is_ok());
        let e = check_queue(&n, "a.b").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::InvalidField, Some("queue"))
        );
        assert!(e.message.contains("\"a.b\""), "{}", e.message);
    }

    #[test]
    fn id_requests() {
        assert_eq!(parse_id_request(br#"{"id":"t1"}"#).unwrap(), "t1");
        assert_eq!(parse_id_request(br#" {"id":"_s42-3"} "#).unwrap(), "_s42-3");
        let code = |b: &[u8]| {
            let e = parse_id_request(b).unwrap_err();
            (e.code, e.field)
        };
        assert_eq!(code(b"{nope").0, ErrorCode::InvalidJson);
        assert_eq!(code(b"").0, ErrorCode::InvalidJson);
        assert_eq!(code(b"[]"), (ErrorCode::InvalidField, None));
        assert_eq!(code(b"{}"), (ErrorCode::InvalidField, Some("id".into())));
        assert_eq!(
            code(br#"{"id":7}"#),
            (ErrorCode::InvalidField, Some("id".into()))
        );
        assert_eq!(
            code(br#"{"id":"a b"}"#),
            (ErrorCode::InvalidField, Some("id".into()))
        );
        assert_eq!(
            code(br#"{"id":"a","x":1}"#),
            (ErrorCode::UnknownField, Some("x".into()))
        );
    }

    fn task(id: &str) -> Task {
        let mut spec = TaskSpec::new("noop");
        spec.id = Some(id.to_owned());
        Task::first_attempt(&spec, "q", 1000, 0)
    }

    #[test]
    fn ids_from_the_sequence_resolve_after_the_puback() {
        let tasks = [task("_s0-0"), task("mine"), task("_s0-2")];
        let plan = plan_ids(&tasks, None);
        assert_eq!(plan[1], PlannedId::Known("mine".into()));
        let ids: Vec<String> = plan.iter().map(|p| p.resolve(77)).collect();
        assert_eq!(ids, ["_s77-0", "mine", "_s77-2"]);
        assert_eq!(plan_ids(&[task("_s0")], None)[0].resolve(5), "_s5");
        // With a Nats-Msg-Id every id is known, whatever it looks like.
        assert_eq!(
            plan_ids(&[task("m-0")], Some("m")),
            [PlannedId::Known("m-0".into())]
        );
        // A real `_s` id of another message is not the placeholder.
        assert_eq!(plan_ids(&[task("_s01")], None)[0].known(), Some("_s01"));
    }

    #[test]
    fn forwarded_msg_id() {
        let known = [PlannedId::Known("a".into())];
        let seq = [PlannedId::FromSeq {
            suffix: String::new(),
        }];
        assert_eq!(forward_msg_id(Some("m"), &known), Some("m"));
        assert_eq!(forward_msg_id(None, &known), Some("a"));
        assert_eq!(forward_msg_id(None, &seq), None);
        let two = [PlannedId::Known("a".into()), PlannedId::Known("b".into())];
        assert_eq!(forward_msg_id(None, &two), None);
    }

    fn record(state: TaskState) -> TaskRecord {
        let mut r = TaskRecord::new(&task("t1"), state, Utc::now());
        r.attempt = 3;
        r.worker = Some("w1".into());
        r.started_at = Some(Utc::now());
        r
    }

    #[test]
    fn cancel_only_before_the_end() {
        let now = Utc::now();
        for state in TaskState::ALL {
            let r = cancel_record(&record(state), now);
            if state.is_terminal() {
                let e = r.unwrap_err();
                assert_eq!(e.code, ErrorCode::NotAllowed);
                assert!(e.message.contains(state.as_str()), "{}", e.message);
            } else {
                let r = r.unwrap();
                assert_eq!(r.state, TaskState::Cancelled);
                assert_eq!(r.finished_at, Some(now));
                assert_eq!(r.error.unwrap().kind, ErrorKind::Cancelled);
                assert_eq!(r.attempt, 3, "the attempt count stays");
            }
        }
    }

    #[test]
    fn retry_only_failed_and_from_scratch() {
        for state in TaskState::ALL {
            let r = check_retry(&record(state));
            assert_eq!(r.is_ok(), state == TaskState::Failed, "{state}");
            if let Err(e) = r {
                assert_eq!(e.code, ErrorCode::NotAllowed);
                assert!(e.message.contains(state.as_str()));
            }
        }
        let mut failed = record(TaskState::Failed);
        failed.error = Some(TaskError {
            kind: ErrorKind::Handler,
            message: "boom".into(),
        });
        let r = retry_record(&failed);
        assert_eq!((r.state, r.attempt), (TaskState::Queued, 0));
        assert!(r.error.is_none() && r.worker.is_none() && r.started_at.is_none());
        assert_eq!(r.submitted_at, failed.submitted_at);
    }

    #[test]
    fn resubmission_from_a_task_or_a_task_object() {
        let mut spec = TaskSpec::new("echo")
            .with_payload(&serde_json::json!({"a": [1, 2]}))
            .unwrap();
        spec.id = Some("t1".into());
        spec.key = Some("k".into());
        spec.max_attempts = Some(5);
        let t = Task::first_attempt(&spec, "q", 300_000, 1);
        let body = resubmission(&serde_json::to_vec(&t).unwrap(), "t1").unwrap();
        let back = TaskSpec::from_json(&body).unwrap();
        assert_eq!(back.id.as_deref(), Some("t1"));
        assert_eq!(back.task_type, "echo");
        assert_eq!(back.payload.get(), r#"{"a":[1,2]}"#);
        assert_eq!(
            (back.key.as_deref(), back.max_attempts),
            (Some("k"), Some(5))
        );

        // A generated id stays out of the body.
        let body = resubmission(&serde_json::to_vec(&t).unwrap(), "_s9").unwrap();
        assert!(TaskSpec::from_json(&body).unwrap().id.is_none());
        // A task object as submitted, even one carrying a generated id.
        let body = resubmission(br#"{"type":"noop","id":"_s9","payload":1}"#, "_s9").unwrap();
        assert_eq!(TaskSpec::from_json(&body).unwrap().payload.get(), "1");
        let e = resubmission(b"\"nope\"", "t1").unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
    }
}
