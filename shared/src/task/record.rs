//! The normalized task that travels in envelopes, task states, and the `drover-tasks` record.

use super::*;
use crate::retry::Backoff;
use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fmt;

// ---- the normalized task ------------------------------------------------------------------------

/// One shard of a sharded task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// 0-based shard index.
    pub index: u32,
    /// Number of shards.
    pub total: u32,
}

/// A task as it travels in an envelope (SPEC §3 step 1): every default applied, with the attempt
/// number and the queue it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Task id.
    pub id: String,
    /// Queue.
    pub queue: String,
    /// Handler name.
    #[serde(rename = "type")]
    pub task_type: String,
    /// Handler input.
    pub payload: Box<RawValue>,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Total attempts allowed.
    pub max_attempts: u32,
    /// Per-attempt limit in milliseconds.
    pub timeout_ms: u64,
    /// Affinity/ordering key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Retry delays, when not the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Shard position, for shard tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    /// The parent task of a shard task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Submit time, ms since the Unix epoch.
    pub submitted_ms: i64,
    /// Free labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

impl Task {
    /// The first attempt of `spec` (whose id must be assigned) in `queue`, with `default_timeout_ms`
    /// where the task names none.
    pub fn first_attempt(
        spec: &TaskSpec,
        queue: &str,
        default_timeout_ms: u64,
        submitted_ms: i64,
    ) -> Self {
        Self {
            id: spec.id.clone().unwrap_or_default(),
            queue: queue.to_owned(),
            task_type: spec.task_type.clone(),
            payload: spec.payload.clone(),
            attempt: 1,
            max_attempts: spec.effective_max_attempts(),
            timeout_ms: spec.timeout_ms.unwrap_or(default_timeout_ms),
            key: spec.key.clone(),
            backoff: spec.backoff,
            shard: None,
            parent: None,
            submitted_ms,
            meta: spec.meta.clone(),
        }
    }

    /// The idempotency key handlers may use: `<id>:<attempt>`.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.id, self.attempt)
    }
}

// ---- the record ---------------------------------------------------------------------------------

/// Where a task is in its life (SPEC §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for its time or its dependencies.
    Scheduled,
    /// Dispatched, not yet started.
    Queued,
    /// A worker runs it.
    Running,
    /// An attempt failed; the next one waits for its backoff.
    Retrying,
    /// Done. Terminal.
    Succeeded,
    /// Out of attempts, or failed in a way retrying cannot fix. Terminal.
    Failed,
    /// Cancelled. Terminal.
    Cancelled,
    /// A dependency failed, so it never ran. Terminal.
    UpstreamFailed,
}

impl TaskState {
    /// Every state, in life order.
    pub const ALL: [TaskState; 8] = [
        Self::Scheduled,
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::UpstreamFailed,
    ];

    /// The state's wire name, e.g. `"upstream_failed"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::UpstreamFailed => "upstream_failed",
        }
    }

    /// `true` for the four terminal states.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::UpstreamFailed
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt or a task failed (`error.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The handler returned an error.
    Handler,
    /// The attempt ran past its timeout.
    Timeout,
    /// A memory/CPU limit or a signal killed it.
    Killed,
    /// Its worker died, or its batch was poisoned.
    Lost,
    /// The task is invalid.
    Invalid,
    /// No handler for the task's type.
    UnknownType,
    /// Cancelled by request.
    Cancelled,
}

impl ErrorKind {
    /// Whether an attempt that failed this way may be retried. An unknown type, an invalid task
    /// or a cancellation will not get better by retrying.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Handler | Self::Timeout | Self::Killed | Self::Lost
        )
    }
}

/// `error` of a task record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// Class of failure.
    pub kind: ErrorKind,
    /// What happened, for a person.
    pub message: String,
}

/// The value of `drover-tasks.<id>` (SPEC §1.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Task id.
    pub id: String,
    /// Queue.
    pub queue: String,
    /// Handler name.
    #[serde(rename = "type")]
    pub task_type: String,
    /// Current state.
    pub state: TaskState,
    /// Current (or last) attempt, 0 before the first starts.
    pub attempt: u32,
    /// Total attempts allowed.
    pub max_attempts: u32,
    /// Affinity key.
    #[serde(default)]
    pub key: Option<String>,
    /// The worker of the current or last attempt.
    #[serde(default)]
    pub worker: Option<String>,
    /// Partition it was routed to.
    #[serde(default)]
    pub partition: Option<u32>,
    /// When it was submitted.
    #[serde(with = "time_ms")]
    pub submitted_at: DateTime<Utc>,
    /// When the current or last attempt started.
    #[serde(default, with = "opt_time_ms")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    #[serde(default, with = "opt_time_ms")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When the next attempt (or the first, for scheduled tasks) is due.
    #[serde(default, with = "opt_time_ms")]
    pub next_run_at: Option<DateTime<Utc>>,
    /// Duration of the last attempt.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// The last failure.
    #[serde(default)]
    pub error: Option<TaskError>,
    /// The handler's result.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    /// The parent of a shard task.
    #[serde(default)]
    pub parent: Option<String>,
    /// Shard position.
    #[serde(default)]
    pub shard: Option<ShardInfo>,
    /// Free labels.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

impl TaskRecord {
    /// A fresh record of `task` in `state`.
    pub fn new(task: &Task, state: TaskState, submitted_at: DateTime<Utc>) -> Self {
        Self {
            id: task.id.clone(),
            queue: task.queue.clone(),
            task_type: task.task_type.clone(),
            state,
            attempt: 0,
            max_attempts: task.max_attempts,
            key: task.key.clone(),
            worker: None,
            partition: None,
            submitted_at,
            started_at: None,
            finished_at: None,
            next_run_at: None,
            duration_ms: None,
            error: None,
            result: None,
            parent: task.parent.clone(),
            shard: task.shard,
            meta: task.meta.clone(),
        }
    }
}

/// Serde for a required timestamp: RFC 3339, UTC, milliseconds.
mod time_ms {
    use super::*;
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_time(t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(de::Error::custom)
    }
}

/// Serde for an optional timestamp: RFC 3339, UTC, milliseconds, or `null`.
mod opt_time_ms {
    use super::*;
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        ser_opt_time(t, s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(de::Error::custom)
            })
            .transpose()
    }
}
