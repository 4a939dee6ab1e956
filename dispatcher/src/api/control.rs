//! `status`, `cancel` and `retry` (SPEC §1.3) over the `drover-tasks` records. Writers
//! compare-and-set on the revision they read; on a conflict they read again and decide again.
//!
//! Retry needs the task itself, which the record does not hold: it is taken from the task's
//! newest dead-letter copy on `<prefix>.dlq.<queue>` (header `Drover-Task-Id`), written when the
//! task failed for good (SPEC §7). The record is reset to `queued` (attempt 0, header
//! `Drover-Retry: <n>`) *before* the task is published to `<prefix>.submit.<queue>` with
//! `Drover-Retry: <n>`, `Drover-Task-Id: <id>` and `Nats-Msg-Id: <id>-retry-<n>`, so the intake
//! always finds the reset record first and can recognise it as this retry's own.
//!
//! The other halves live in the leader: `crate::outcomes` writes the dead-letter copy (the `Task`
//! JSON with header `Drover-Task-Id`) when a task fails for good, and the intake
//! (`crate::leader`) takes the id of a `Drover-Retry: n` message from `Drover-Task-Id` and treats
//! an existing record as its own when it is `queued` and tagged with that same `Drover-Retry`.

use super::request::{self, CancelReply, RetryReply, StatusReply};
use super::{Api, CAS_ATTEMPTS, DLQ_SCAN_DEADLINE, HDR_RETRY, HDR_TASK_ID, to_reply, unavailable};
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, push};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::stream::DirectGetErrorKind;
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::task::{TaskRecord, TaskState};
use futures::StreamExt;
use serde_json::value::RawValue;
use tracing::{debug, info, warn};

/// A record as read: its value and revision.
struct Read {
    record: TaskRecord,
    raw: bytes::Bytes,
    revision: u64,
}

/// Why a compare-and-set write did not happen.
enum WriteError {
    /// Someone wrote the record since it was read.
    Conflict,
    /// NATS failed.
    Nats(ApiError),
}

/// The newest dead-letter copy of a task.
struct DeadLetter {
    body: bytes::Bytes,
    /// Copies of the task found (each failed series of attempts leaves one).
    copies: u64,
}

impl Api {
    pub(super) async fn status(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let read = self.read(id).await?;
        let task: &RawValue = serde_json::from_slice(&read.raw).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("the record of task {id:?} is not JSON: {e}"),
            )
        })?;
        to_reply(&StatusReply {
            ok: true,
            task,
            revision: read.revision,
        })
    }

    pub(super) async fn cancel(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read(id).await?;
            let next = request::cancel_record(&read.record, chrono::Utc::now())?;
            match self.write(id, read.revision, &next, None).await {
                Ok(_) => {
                    // A running worker aborts the attempt; one not yet started finds the record.
                    let body = serde_json::json!({ "id": id }).to_string();
                    self.ctx
                        .client
                        .publish(self.ctx.names.cancel_subject(id), body.into())
                        .await
                        .map_err(|e| unavailable("cancelled, but cannot notify workers", e))?;
                    info!(task_id = %id, previous = %read.record.state, "task cancelled");
                    return to_reply(&CancelReply {
                        ok: true,
                        id,
                        state: TaskState::Cancelled,
                        previous_state: read.record.state,
                    });
                }
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Nats(e)) => return Err(e),
            }
        }
        Err(contended(id))
    }

    pub(super) async fn retry(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let mut read = self.read(id).await?;
        request::check_retry(&read.record)?;
        let queue = read.record.queue.clone();
        let copy = self.dead_letter(&queue, id).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotAllowed,
                format!(
                    "task {id:?} has no dead-letter copy on {}, so its payload is gone and it cannot be run again; submit it again with a new id",
                    self.ctx.names.dlq_subject(&queue)
                ),
            )
        })?;
        let body = request::resubmission(&copy.body, id)?;
        let n = copy.copies;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                read = self.read(id).await?;
                request::check_retry(&read.record)?;
            }
            let next = request::retry_record(&read.record);
            let revision = match self.write(id, read.revision, &next, Some(n)).await {
                Ok(r) => r,
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Nats(e)) => return Err(e),
            };
            if let Err(e) = self.publish_retry(&queue, id, n, body).await {
                // Put the failed record back, so the task is not left `queued` with nothing on
                // its way.
                if self
                    .write_raw(id, revision, read.raw.clone(), None)
                    .await
                    .is_err()
                {
                    warn!(task_id = %id, "retry not published and the failed record not restored: it shows `queued`");
                }
                return Err(e);
            }
            info!(task_id = %id, retry = n, "task retried");
            return to_reply(&RetryReply {
                ok: true,
                id,
                queue: &queue,
                state: TaskState::Queued,
                retry: n,
            });
        }
        Err(contended(id))
    }

    async fn publish_retry(
        &self,
        queue: &str,
        id: &str,
        n: u64,
        body: Vec<u8>,
    ) -> Result<(), ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{id}-retry-{n}"));
        headers.insert(HDR_RETRY, n.to_string());
        headers.insert(HDR_TASK_ID, id);
        self.ctx
            .js
            .publish_with_headers(self.ctx.names.submit_subject(queue), headers, body.into())
            .await
            .map_err(|e| unavailable("cannot publish the retry", e))?
            .await
            .map_err(|e| unavailable("the retry was not stored in the intake stream", e))?;
        Ok(())
    }

    /// The record of `id`, or `not_found`.
    async fn read(&self, id: &str) -> Result<Read, ApiError> {
        let entry = self
            .tasks
            .entry(id)
            .await
            .map_err(|e| unavailable("cannot read the task record", e))?;
        let entry = match entry {
            Some(e) if e.operation == Operation::Put => e,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no task {id:?}: it was never submitted, its record expired, or its submission is still on its way to the dispatcher"
                    ),
                )
                .with_field("id"));
            }
        };
        let record: TaskRecord = serde_json::from_slice(&entry.value).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("the record of task {id:?} cannot be read: {e}"),
            )
        })?;
        Ok(Read {
            record,
            raw: entry.value,
            revision: entry.revision,
        })
    }

    /// Writes `record` over revision `expected`; with `retry`, tagged `Drover-Retry: <n>`.
    async fn write(
        &self,
        id: &str,
        expected: u64,
        record: &TaskRecord,
        retry: Option<u64>,
    ) -> Result<u64, WriteError> {
        let body = serde_json::to_vec(record).map_err(|e| {
            WriteError::Nats(ApiError::new(
                ErrorCode::Internal,
                format!("cannot encode the record: {e}"),
            ))
        })?;
        self.write_raw(id, expected, body.into(), retry).await
    }

    async fn write_raw(
        &self,
        id: &str,
        expected: u64,
        body: bytes::Bytes,
        retry: Option<u64>,
    ) -> Result<u64, WriteError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", expected.to_string());
        if let Some(n) = retry {
            headers.insert(HDR_RETRY, n.to_string());
        }
        let subject = format!("$KV.{}.{id}", self.ctx.names.bucket("tasks"));
        let result = match self
            .ctx
            .js
            .publish_with_headers(subject, headers, body)
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                debug!(task_id = %id, "record changed since it was read; reading again");
                Err(WriteError::Conflict)
            }
            Err(e) => Err(WriteError::Nats(unavailable(
                "cannot write the task record",
                e,
            ))),
        }
    }

    /// The newest copy of `id` on `<prefix>.dlq.<queue>`, found by scanning the headers of that
    /// subject with an ordered consumer (bodies are not sent), then fetching the one body.
    async fn dead_letter(&self, queue: &str, id: &str) -> Result<Option<DeadLetter>, ApiError> {
        let names = &self.ctx.names;
        let subject = names.dlq_subject(queue);
        let stream = self
            .ctx
            .js
            .get_stream(names.dlq_stream())
            .await
            .map_err(|e| unavailable("cannot open the dead-letter stream", e))?;
        let last = match stream.direct_get_last_for_subject(subject.as_str()).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable("cannot read the dead-letter stream", e)),
        };
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.ctx.client.new_inbox(),
                filter_subject: subject.clone(),
                headers_only: true,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("cannot scan the dead-letter stream", e))?;
        // Ephemeral; the server would also remove it 30 s after the scan.
        let consumer_name = consumer.cached_info().name.clone();
        let scan = async {
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| unavailable("cannot scan the dead-letter stream", e))?;
            let (mut newest, mut copies) = (None, 0u64);
            while let Some(m) = messages.next().await {
                let m = m.map_err(|e| unavailable("scanning the dead-letter stream", e))?;
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
                let is_copy = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(HDR_TASK_ID))
                    .is_some_and(|v| v.as_str() == id);
                if is_copy {
                    copies += 1;
                    newest = Some(seq);
                }
                if seq >= last {
                    break;
                }
            }
            Ok::<_, ApiError>((newest, copies))
        };
        let scanned = tokio::time::timeout(DLQ_SCAN_DEADLINE, scan).await;
        if let Err(e) = stream.delete_consumer(&consumer_name).await {
            debug!(error = %e, "removing the dead-letter scan consumer");
        }
        let (newest, copies) =
            scanned.map_err(|_| unavailable("scanning the dead-letter stream", "timed out"))??;
        let Some(seq) = newest else { return Ok(None) };
        let m = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| unavailable("cannot read the dead-letter copy", e))?;
        Ok(Some(DeadLetter {
            body: m.payload,
            copies,
        }))
    }
}

fn contended(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("the record of task {id:?} kept changing while being updated; retry the request"),
    )
}
