//! Schedules (SPEC §1.4): the `drover.api.schedule.{put,delete,pause,resume,trigger}` endpoints
//! (every replica, in the API's queue group) and the leader's evaluator.
//!
//! | part | role |
//! |---|---|
//! | `drover_shared::cron` | pure: the schedule object, cron expressions and DST rules, misfire decisions |
//! | [`request`] | pure: parsing the `{"id"}` requests and the reply bodies |
//! | this module | the NATS shell shared by both: publishing a run into the intake, keeping `DROVER_TRIGGERS`' subjects in sync |
//! | `api` | the endpoints over `drover-schedules` |
//! | [`eval`] | leader only: fires cron schedules (state `cron.<id>` in `drover-state`) and consumes `DROVER_TRIGGERS` |
//!
//! **Exactly one task per fire time.** A run is a plain submission to `<prefix>.submit.<queue>`
//! whose id is derived from the fire time (`cron-<schedule>-<unix seconds>`) and sent as
//! `Nats-Msg-Id` too. The evaluator publishes it (and waits for the PubAck) *before* it advances
//! `cron.<id>` by compare-and-set, so a leader that dies in between leaves the fire to its
//! successor, whose publish of the same id is dropped by the stream's duplicate window or by the
//! intake's record create (expected sequence 0).

pub(crate) mod api;
pub mod eval;
pub mod request;

use async_nats::HeaderMap;
use async_nats::jetstream;
use drover_shared::cron::{Schedule, trigger_stream_subjects};
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::names::Names;
use std::collections::BTreeSet;

/// Why a schedule operation against NATS failed.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A NATS request failed.
    #[error("{op}: {message}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// What the client or server said.
        message: String,
    },
    /// The schedule cannot be turned into a task.
    #[error("{0}")]
    Invalid(ApiError),
}

impl ScheduleError {
    fn nats(op: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Nats {
            op,
            message: e.to_string(),
        }
    }

    /// The error as an API reply.
    pub fn to_api(&self) -> ApiError {
        match self {
            Self::Invalid(e) => e.clone(),
            Self::Nats { .. } => ApiError::new(
                ErrorCode::Unavailable,
                format!("{self}; retry the request later"),
            ),
        }
    }
}

/// Publishes one run of `schedule` into the intake as task `id` (payload: the template's, or
/// `payload`), and waits for its PubAck. Returns `true` when the stream already had it (same id
/// within its duplicate window).
pub async fn submit_run(
    js: &jetstream::Context,
    names: &Names,
    schedule: &Schedule,
    id: &str,
    payload: Option<&[u8]>,
) -> Result<bool, ScheduleError> {
    let body = schedule
        .task_json(id, payload)
        .map_err(ScheduleError::Invalid)?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    let ack = js
        .publish_with_headers(names.submit_subject(&schedule.queue), headers, body.into())
        .await
        .map_err(|e| ScheduleError::nats("publish a scheduled run", e))?
        .await
        .map_err(|e| ScheduleError::nats("store a scheduled run in the intake", e))?;
    Ok(ack.duplicate)
}

/// Makes `DROVER_TRIGGERS` capture `subjects` (trigger subjects of schedules). With `exact`, the
/// stream's subject list becomes exactly its own `<prefix>.trigger.>` plus `subjects` (subjects
/// no schedule uses any more are dropped; the stream's messages are kept); without, subjects are
/// only added. Updates the stream only when its list differs, so it is idempotent.
pub async fn sync_trigger_subjects(
    js: &jetstream::Context,
    names: &Names,
    subjects: &BTreeSet<String>,
    exact: bool,
) -> Result<(), ScheduleError> {
    let mut stream = js
        .get_stream(names.triggers_stream())
        .await
        .map_err(|e| ScheduleError::nats("open the trigger stream", e))?;
    let info = stream
        .info()
        .await
        .map_err(|e| ScheduleError::nats("read the trigger stream", e))?;
    let mut config = info.config.clone();
    let want = trigger_stream_subjects(names.prefix(), subjects.iter().map(String::as_str));
    let next: Vec<String> = if exact {
        want
    } else {
        let mut all: BTreeSet<String> = config.subjects.iter().cloned().collect();
        all.extend(want);
        all.into_iter().collect()
    };
    let mut have = config.subjects.clone();
    have.sort();
    if have == next {
        return Ok(());
    }
    config.subjects = next;
    js.update_stream(&config).await.map_err(|e| {
        ScheduleError::Invalid(ApiError::new(
            ErrorCode::NotAllowed,
            format!(
                "the trigger stream cannot capture these subjects ({e}); a trigger subject must not be captured by another stream — pick another subject"
            ),
        ))
    })?;
    Ok(())
}
