//! Worker → leader results (SPEC §2 `DROVER_OUTCOMES`, §5 order of durable steps, §7): the
//! outcome message a worker publishes on `drover.outcome.<queue>.<batch>`, and the pure decision
//! the leader takes for each outcome against the task's current record.
//!
//! Division of labour (why the leader writes the terminal record): a worker reads each task's
//! record when a batch arrives (to skip tasks already finished or cancelled, SPEC §6) and writes
//! `running` best-effort by compare-and-set; the **leader** turns every outcome into the terminal
//! record, a retry timer, a DLQ copy and an event. One writer for terminal states keeps the
//! retry decision, the `DROVER_DELAYED` timer and the record in one place, ordered
//! timer → record → ack, so a crash between any two steps is repaired by redelivery, and it lets
//! `tracking = "terminal"` skip every write a worker would make.
//!
//! Idempotence is by `(id, attempt)`: [`decide`] returns [`OutcomeDecision::Duplicate`] for an
//! outcome whose attempt is already recorded, so a redelivered outcome message changes nothing.

use crate::retry::{RetryDecision, RetryPolicy};
use crate::task::{ErrorKind, Task, TaskError, TaskRecord, TaskState};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::time::Duration;

/// Largest outcome message body a worker publishes; bigger batches of outcomes are split into
/// parts (each part is a message of its own on the same subject).
pub const MAX_OUTCOME_MESSAGE_BYTES: usize = 512 * 1024;

/// Largest task result, as JSON text, that a worker reports: an outcome carrying it must fit
/// one outcome message ([`MAX_OUTCOME_MESSAGE_BYTES`]) with room to spare for the rest of the
/// outcome and the message (ids, times, worker, batch). A bigger result fails its attempt.
pub const MAX_RESULT_BYTES: usize = MAX_OUTCOME_MESSAGE_BYTES - 64 * 1024;

/// How an attempt ended, as the worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// The handler returned a result.
    Succeeded,
    /// The attempt failed; `error.kind` says how, and whether a retry may help.
    Failed,
    /// The attempt was aborted by `drover.api.cancel`.
    Cancelled,
}

/// The result of one attempt of one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The task as it was run. Its `payload` is kept for `failed` outcomes, where the leader needs
    /// it for another attempt or for the DLQ copy that `drover dlq replay` re-submits; for
    /// `succeeded` and `cancelled` it is `null`, to keep outcome messages small.
    pub task: Task,
    /// How the attempt ended.
    pub status: OutcomeStatus,
    /// The handler's result, for `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    /// What went wrong, for `failed` and `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// When the attempt started, ms since the Unix epoch.
    pub started_ms: i64,
    /// When the attempt ended, ms since the Unix epoch.
    pub finished_ms: i64,
    /// The revision of the task's record as this attempt last saw it (read when the batch
    /// arrived, or written as `running`), when the worker knows it. The leader writes the
    /// terminal record of a success by compare-and-set over it without reading the record first;
    /// if anyone wrote since, the write conflicts and the leader reads and decides again. Absent:
    /// the leader reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

impl Outcome {
    /// A successful attempt.
    pub fn succeeded(
        mut task: Task,
        result: Box<RawValue>,
        started_ms: i64,
        finished_ms: i64,
    ) -> Self {
        task.payload = null_payload();
        Self {
            task,
            status: OutcomeStatus::Succeeded,
            result: Some(result),
            error: None,
            started_ms,
            finished_ms,
            revision: None,
        }
    }

    /// A failed attempt; the payload stays (retry or DLQ copy).
    pub fn failed(task: Task, error: TaskError, started_ms: i64, finished_ms: i64) -> Self {
        Self {
            task,
            status: OutcomeStatus::Failed,
            result: None,
            error: Some(error),
            started_ms,
            finished_ms,
            revision: None,
        }
    }

    /// An attempt aborted by a cancel request.
    pub fn cancelled(mut task: Task, started_ms: i64, finished_ms: i64) -> Self {
        task.payload = null_payload();
        Self {
            task,
            status: OutcomeStatus::Cancelled,
            result: None,
            error: Some(TaskError {
                kind: ErrorKind::Cancelled,
                message: "cancelled by request".to_owned(),
            }),
            started_ms,
            finished_ms,
            revision: None,
        }
    }

    /// The same outcome carrying the record revision the attempt last saw (see
    /// [`Outcome::revision`]).
    #[must_use]
    pub fn with_revision(mut self, revision: Option<u64>) -> Self {
        self.revision = revision;
        self
    }

    /// Duration of the attempt in milliseconds (0 if the clock went backwards).
    pub fn duration_ms(&self) -> u64 {
        u64::try_from(self.finished_ms - self.started_ms).unwrap_or(0)
    }
}

fn null_payload() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("`null` is valid JSON")
}

/// One message on `drover.outcome.<queue>.<batch>`: the outcomes of (part of) one batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeMessage {
    /// The batch id (`Drover-Batch` of the envelope).
    pub batch: String,
    /// Queue of the batch.
    pub queue: String,
    /// Partition the batch came from.
    pub partition: u32,
    /// The worker that ran it.
    pub worker: String,
    /// The leader epoch stamped on the envelope.
    pub epoch: u64,
    /// 0-based part number, when a batch's outcomes take several messages.
    #[serde(default)]
    pub part: u32,
    /// One entry per finished task of this part.
    pub outcomes: Vec<Outcome>,
}

/// Why an outcome message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OutcomeError {
    /// The body is not an outcome message.
    #[error("invalid outcome message: {0}")]
    Invalid(#[from] serde_json::Error),
}

impl OutcomeMessage {
    /// Parses a message body.
    pub fn decode(bytes: &[u8]) -> Result<Self, OutcomeError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The JSON body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("outcome messages always serialize")
    }

    /// Splits `outcomes` of one batch into messages of at most `max_bytes` each (a single
    /// outcome bigger than that still gets a message of its own). Parts are numbered from 0.
    pub fn split(
        batch: &str,
        queue: &str,
        partition: u32,
        worker: &str,
        epoch: u64,
        outcomes: Vec<Outcome>,
        max_bytes: usize,
    ) -> Vec<OutcomeMessage> {
        let empty = |part| OutcomeMessage {
            batch: batch.to_owned(),
            queue: queue.to_owned(),
            partition,
            worker: worker.to_owned(),
            epoch,
            part,
            outcomes: Vec::new(),
        };
        let overhead = serde_json::to_vec(&empty(0)).map_or(256, |v| v.len() + 16);
        let mut parts = vec![empty(0)];
        let mut size = overhead;
        for outcome in outcomes {
            let len = serde_json::to_vec(&outcome).map_or(0, |v| v.len()) + 1;
            let last = parts.last_mut().expect("never empty");
            if !last.outcomes.is_empty() && size + len > max_bytes {
                let next = u32::try_from(parts.len()).unwrap_or(u32::MAX);
                parts.push(empty(next));
                size = overhead;
            }
            size += len;
            parts
                .last_mut()
                .expect("never empty")
                .outcomes
                .push(outcome);
        }
        parts
    }
}

// ---- the record side ----------------------------------------------------------------------------

/// `true` if `record` already holds the outcome of `attempt` (or a later one, or a terminal
/// state): a worker skips such a task on a redelivered batch, and the leader ignores such an
/// outcome.
pub fn attempt_is_recorded(record: &TaskRecord, attempt: u32) -> bool {
    record.state.is_terminal()
        || record.attempt > attempt
        || (record.attempt == attempt && record.state == TaskState::Retrying)
}

/// What the leader does with one outcome.
#[derive(Debug, Clone)]
pub enum OutcomeDecision {
    /// The attempt is already recorded (or the task is terminal): change nothing, ack.
    Duplicate,
    /// Write this terminal record; for `failed`, also copy the task to `drover.dlq.<queue>`.
    Finish {
        /// The terminal record to write.
        record: TaskRecord,
        /// Whether a DLQ copy is due (the task failed for good).
        dead: bool,
    },
    /// Schedule attempt `next.attempt` after `delay` through `DROVER_DELAYED`, then write
    /// `record` (state `retrying`, `next_run_at` set).
    Retry {
        /// The `retrying` record.
        record: TaskRecord,
        /// The next attempt of the task (payload from the outcome).
        next: Box<Task>,
        /// How long to wait before it.
        delay: Duration,
    },
}

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

/// Decides what `outcome` of a task run by `worker` on `partition` does to `existing` (the
/// current record, if any). `sample` is a uniform draw from `[-1, 1]` for the backoff jitter;
/// `now_ms` is the leader's clock.
pub fn decide(
    existing: Option<&TaskRecord>,
    outcome: &Outcome,
    worker: &str,
    partition: u32,
    sample: f64,
    now_ms: i64,
) -> OutcomeDecision {
    let task = &outcome.task;
    if let Some(record) = existing
        && attempt_is_recorded(record, task.attempt)
    {
        return OutcomeDecision::Duplicate;
    }
    let submitted_at = existing.map_or_else(|| at(task.submitted_ms), |r| r.submitted_at);
    let mut record = TaskRecord::new(task, TaskState::Running, submitted_at);
    record.attempt = task.attempt;
    record.worker = Some(worker.to_owned());
    record.partition = Some(partition);
    record.started_at = Some(at(outcome.started_ms));
    record.duration_ms = Some(outcome.duration_ms());
    record.error = outcome.error.clone();
    match outcome.status {
        OutcomeStatus::Succeeded => {
            record.state = TaskState::Succeeded;
            record.finished_at = Some(at(outcome.finished_ms));
            record.result = outcome.result.clone();
            OutcomeDecision::Finish {
                record,
                dead: false,
            }
        }
        OutcomeStatus::Cancelled => {
            record.state = TaskState::Cancelled;
            record.finished_at = Some(at(outcome.finished_ms));
            OutcomeDecision::Finish {
                record,
                dead: false,
            }
        }
        OutcomeStatus::Failed => {
            let retryable = outcome
                .error
                .as_ref()
                .is_some_and(|e| e.kind.is_retryable());
            let policy = RetryPolicy {
                max_attempts: task.max_attempts,
                backoff: task.backoff.unwrap_or_default(),
            };
            match policy.decide(task.attempt, retryable, sample) {
                RetryDecision::Retry { attempt, delay } => {
                    let mut next = task.clone();
                    next.attempt = attempt;
                    record.state = TaskState::Retrying;
                    let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                    record.next_run_at = Some(at(now_ms.saturating_add(delay_ms)));
                    OutcomeDecision::Retry {
                        record,
                        next: Box::new(next),
                        delay,
                    }
                }
                RetryDecision::GiveUp => {
                    record.state = TaskState::Failed;
                    record.finished_at = Some(at(outcome.finished_ms));
                    OutcomeDecision::Finish { record, dead: true }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(attempt: u32, max: u32) -> Task {
        Task {
            id: "t1".into(),
            queue: "default".into(),
            task_type: "echo".into(),
            payload: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
            attempt,
            max_attempts: max,
            timeout_ms: 1000,
            key: Some("k".into()),
            backoff: None,
            shard: None,
            parent: None,
            submitted_ms: 1_700_000_000_000,
            meta: Default::default(),
        }
    }

    fn err(kind: ErrorKind) -> TaskError {
        TaskError {
            kind,
            message: "boom".into(),
        }
    }

    #[test]
    fn success_finishes_and_drops_the_payload() {
        let raw = RawValue::from_string("42".into()).unwrap();
        let o = Outcome::succeeded(task(1, 3), raw, 10, 25);
        assert_eq!(o.task.payload.get(), "null");
        match decide(None, &o, "w1", 3, 0.5, 100) {
            OutcomeDecision::Finish { record, dead } => {
                assert!(!dead);
                assert_eq!(record.state, TaskState::Succeeded);
                assert_eq!(record.attempt, 1);
                assert_eq!(record.duration_ms, Some(15));
                assert_eq!(record.worker.as_deref(), Some("w1"));
                assert_eq!(record.partition, Some(3));
                assert_eq!(record.result.unwrap().get(), "42");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retryable_failure_with_attempts_left_retries_with_the_payload() {
        let o = Outcome::failed(task(1, 3), err(ErrorKind::Handler), 10, 20);
        assert_eq!(o.task.payload.get(), r#"{"a":1}"#);
        match decide(None, &o, "w1", 0, 0.0, 1_000) {
            OutcomeDecision::Retry {
                record,
                next,
                delay,
            } => {
                assert_eq!(record.state, TaskState::Retrying);
                assert_eq!(next.attempt, 2);
                assert_eq!(next.payload.get(), r#"{"a":1}"#);
                assert_eq!(delay, Duration::from_millis(1_000));
                assert_eq!(record.next_run_at.unwrap().timestamp_millis(), 2_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_attempt_and_permanent_errors_fail_into_the_dlq() {
        for o in [
            Outcome::failed(task(3, 3), err(ErrorKind::Timeout), 0, 1),
            Outcome::failed(task(1, 3), err(ErrorKind::UnknownType), 0, 1),
        ] {
            assert_eq!(o.task.payload.get(), r#"{"a":1}"#, "kept for the DLQ copy");
            match decide(None, &o, "w", 0, 0.0, 0) {
                OutcomeDecision::Finish { record, dead } => {
                    assert!(dead);
                    assert_eq!(record.state, TaskState::Failed);
                    assert!(record.finished_at.is_some());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn recorded_attempts_are_duplicates() {
        let o = Outcome::failed(task(1, 3), err(ErrorKind::Handler), 0, 1);
        let mut rec = TaskRecord::new(&o.task, TaskState::Retrying, at(0));
        rec.attempt = 1;
        assert!(matches!(
            decide(Some(&rec), &o, "w", 0, 0.0, 0),
            OutcomeDecision::Duplicate
        ));
        rec.state = TaskState::Running;
        assert!(!matches!(
            decide(Some(&rec), &o, "w", 0, 0.0, 0),
            OutcomeDecision::Duplicate
        ));
        rec.state = TaskState::Cancelled;
        assert!(matches!(
            decide(Some(&rec), &o, "w", 0, 0.0, 0),
            OutcomeDecision::Duplicate
        ));
        rec.state = TaskState::Queued;
        rec.attempt = 2;
        assert!(attempt_is_recorded(&rec, 1));
        assert!(!attempt_is_recorded(&rec, 2));
    }

    #[test]
    fn messages_split_under_the_cap_and_round_trip() {
        let outcomes: Vec<_> = (0..100)
            .map(|i| {
                let mut t = task(1, 3);
                t.id = format!("t{i}");
                Outcome::failed(t, err(ErrorKind::Handler), 0, 1)
            })
            .collect();
        let parts = OutcomeMessage::split("b", "default", 1, "w", 7, outcomes, 4_096);
        assert!(parts.len() > 1);
        let mut n = 0;
        for (i, p) in parts.iter().enumerate() {
            let bytes = p.encode();
            assert!(bytes.len() <= 4_096, "{}", bytes.len());
            let back = OutcomeMessage::decode(&bytes).unwrap();
            assert_eq!(back.part as usize, i);
            n += back.outcomes.len();
        }
        assert_eq!(n, 100);
        assert!(OutcomeMessage::decode(b"{").is_err());
    }
}
