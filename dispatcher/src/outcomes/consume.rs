//! The async shell of outcome handling: pull `DROVER_OUTCOMES`, handle several messages at once
//! and the outcomes of each concurrently, ack each message after all its writes.

use super::{HDR_ERROR, HDR_REASON, HDR_SUBJECT};
use crate::leader::{LeaderContext, LeaderError};
use crate::records::{CAS_ATTEMPTS, Current, Records, WriteError};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use drover_shared::outcome::{Outcome, OutcomeDecision, OutcomeMessage, OutcomeStatus, decide};
use drover_shared::task::{Task, TaskRecord};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Outcome messages handled at once.
const MESSAGES_IN_FLIGHT: usize = 16;
/// Outcomes handled at once, over all messages in hand.
const OUTCOMES_IN_FLIGHT: usize = 256;
/// How long a message whose writes failed waits before it comes back.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Consumes outcomes while leading in `epoch`, until `cancel` fires; messages in hand are
/// finished (or left to redelivery) before it returns.
pub async fn consume(
    ctx: LeaderContext,
    epoch: u64,
    cancel: CancellationToken,
) -> Result<(), LeaderError> {
    let names = &ctx.names;
    let nats = crate::leader::nats_err;
    let consumer =
        crate::leader::leader_consumer(&ctx, &names.outcomes_stream(), &names.outcomes_consumer())
            .await?;
    let records = Records::open(&ctx.js, names)
        .await
        .map_err(|e| nats("open task records")(&e))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(MESSAGES_IN_FLIGHT)
        .expires(Duration::from_secs(1))
        .heartbeat(Duration::from_millis(500))
        .messages()
        .await
        .map_err(|e| nats("pull outcomes")(&e))?;
    info!(epoch, "leading: handling outcomes");
    let handler = Arc::new(Handler {
        ctx: ctx.clone(),
        epoch,
        records,
        slots: tokio::sync::Semaphore::new(OUTCOMES_IN_FLIGHT),
    });
    messages
        .take_until(cancel.cancelled_owned())
        .for_each_concurrent(MESSAGES_IN_FLIGHT, |m| {
            let handler = handler.clone();
            async move {
                match m {
                    Ok(m) => handler.message(m).await,
                    Err(e) => debug!(error = %e, "outcomes pull"),
                }
            }
        })
        .await;
    Ok(())
}

/// The record to decide a success on without reading it: the revision its worker saw, with no
/// record. Sound because the worker ran the attempt only on a record that did not have it
/// recorded yet, and the write is a compare-and-set over that revision: if anyone wrote since
/// (a cancel, a duplicate of this outcome already recorded), it conflicts and the record is read
/// and decided on again. The record written is built from the outcome's task either way
/// ([`decide`] takes only `submitted_at` from the old record, which the task carries too).
/// Failures and cancellations are always read: they may schedule a retry or a DLQ copy before
/// the record write, which must be decided on the record as it is.
fn known_revision(outcome: &Outcome) -> Option<Current> {
    match (outcome.status, outcome.revision) {
        (OutcomeStatus::Succeeded, Some(revision)) if revision > 0 => Some(Current {
            record: None,
            revision,
        }),
        _ => None,
    }
}

/// What one outcome came to.
enum Done {
    Handled,
    Duplicate,
}

struct Handler {
    ctx: LeaderContext,
    epoch: u64,
    records: Records,
    /// Outcomes handled at once, over all messages.
    slots: tokio::sync::Semaphore,
}

impl Handler {
    async fn message(&self, msg: jetstream::Message) {
        let decoded = match OutcomeMessage::decode(&msg.payload) {
            Ok(d) => d,
            Err(e) => {
                warn!(subject = %msg.subject, error = %e, "undecodable outcome message; quarantined");
                quarantine(&self.ctx, &msg, "invalid_outcome", &e.to_string()).await;
                return;
            }
        };
        // A success whose worker knew the record's revision is written over it unread (see
        // `known_revision`); the rest are read, in one batched read when there are several.
        let unread: Vec<String> = decoded
            .outcomes
            .iter()
            .filter(|o| known_revision(o).is_none())
            .map(|o| o.task.id.clone())
            .collect();
        let mut first_reads = self.records.read_many(unread).await;
        let results: Vec<Result<(), String>> =
            futures::future::join_all(decoded.outcomes.iter().map(|o| {
                let first = known_revision(o)
                    .or_else(|| first_reads.as_mut().and_then(|m| m.remove(&o.task.id)));
                self.bounded(&decoded, o, first)
            }))
            .await;
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        let kind = if failed.is_empty() {
            AckKind::Ack
        } else {
            warn!(batch = %decoded.batch, failed = failed.len(), first = %failed[0], "outcomes not recorded; the message comes back");
            AckKind::Nak(Some(RETRY_DELAY))
        };
        if let Err(e) = msg.ack_with(kind).await {
            debug!(error = %e, "outcome ack");
        }
    }

    /// [`Handler::outcome`] once a slot is free.
    async fn bounded(
        &self,
        msg: &OutcomeMessage,
        outcome: &Outcome,
        first: Option<Current>,
    ) -> Result<(), String> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| "shutting down".to_owned())?;
        self.outcome(msg, outcome, first).await
    }

    /// Carries out one outcome: decide against the current record, timer/DLQ, record.
    /// `first` is the record as read for the whole message (the first decision uses it; a
    /// compare-and-set conflict reads again).
    async fn outcome(
        &self,
        msg: &OutcomeMessage,
        outcome: &Outcome,
        mut first: Option<Current>,
    ) -> Result<(), String> {
        let m = &self.ctx.metrics;
        let id = &outcome.task.id;
        for _ in 0..CAS_ATTEMPTS {
            let current = match first.take() {
                Some(c) => c,
                None => self.records.read(id).await?,
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let sample = rand::random::<f64>() * 2.0 - 1.0;
            let decision = decide(
                current.record.as_ref(),
                outcome,
                &msg.worker,
                msg.partition,
                sample,
                now_ms,
            );
            let (record, dead) = match decision {
                OutcomeDecision::Duplicate => {
                    m.outcome_duplicates.inc();
                    debug!(task_id = %id, attempt = outcome.task.attempt, "outcome already recorded");
                    // A redelivery after a crash before the shard parent was settled.
                    if let Some(r) = current.record.as_ref().filter(|r| r.state.is_terminal()) {
                        self.settle_shard_parent(r).await?;
                    }
                    return self.done(outcome, Done::Duplicate);
                }
                OutcomeDecision::Retry { record, next, .. } => {
                    let fire_at = record.next_run_at.unwrap_or_else(chrono::Utc::now);
                    self.schedule(&next, outcome.started_ms, fire_at).await?;
                    (record, false)
                }
                OutcomeDecision::Finish { record, dead } => {
                    if dead {
                        self.dead_letter(outcome).await?;
                    }
                    (record, dead)
                }
            };
            match self.records.write(id, current.revision, &record).await {
                Ok(_) => {
                    if dead {
                        m.dead_lettered.inc();
                    }
                    if record.next_run_at.is_some() {
                        m.retries_scheduled.inc();
                    }
                    log_record(&record);
                    self.ctx.events.emit(&record);
                    self.ctx.deps.finished(&record.id, record.state);
                    if record.state.is_terminal() {
                        self.settle_shard_parent(&record).await?;
                    }
                    return self.done(outcome, Done::Handled);
                }
                Err(WriteError::Conflict) => {
                    m.cas_conflicts.inc();
                    debug!(task_id = %id, "record changed while handling its outcome; deciding again");
                }
                Err(WriteError::Nats(e)) => return Err(e),
            }
        }
        Err(format!("the record of {id} kept changing"))
    }

    /// For a terminal shard record: settles its parent (before the ack, so a crash redelivers
    /// the outcome and settles again) and tells the dependency actor when the parent finished.
    async fn settle_shard_parent(&self, record: &TaskRecord) -> Result<(), String> {
        if record.shard.is_none() || record.parent.is_none() {
            return Ok(());
        }
        let settled = crate::deps::shards::settle_parent(&self.ctx, &self.records, record).await?;
        if let Some(parent) = settled.parent {
            log_record(&parent);
            self.ctx.events.emit(&parent);
            self.ctx.deps.finished(&parent.id, parent.state);
        }
        for shard in settled.cancelled {
            log_record(&shard);
            self.ctx.events.emit(&shard);
        }
        Ok(())
    }

    fn done(&self, outcome: &Outcome, _: Done) -> Result<(), String> {
        let status = match outcome.status {
            OutcomeStatus::Succeeded => "succeeded",
            OutcomeStatus::Failed => "failed",
            OutcomeStatus::Cancelled => "cancelled",
        };
        self.ctx
            .metrics
            .outcomes
            .get_or_create(&[("status", status)])
            .inc();
        Ok(())
    }

    /// Puts attempt `next` on a `DROVER_DELAYED` timer due at `fire_at`: the delayed tasks' own
    /// path ([`crate::delays::timer::publish`]), so a retry also fires early and is held by the
    /// due consumer to its exact instant instead of leaving on the scheduler's tick.
    async fn schedule(
        &self,
        next: &Task,
        failed_started_ms: i64,
        fire_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), String> {
        let timer = crate::delays::TimerId::Retry {
            attempt: next.attempt,
            failed_started_ms,
        };
        crate::delays::timer::publish(
            &self.ctx,
            self.epoch,
            next,
            timer,
            fire_at.timestamp_millis(),
        )
        .await?
        .await
        .map_err(|e| format!("retry timer of {} not stored: {e}", next.id))?;
        Ok(())
    }

    /// Copies the task as it travelled (with its payload) to `<prefix>.dlq.<queue>`.
    async fn dead_letter(&self, outcome: &Outcome) -> Result<(), String> {
        let task = &outcome.task;
        let body = serde_json::to_vec(task).map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        for (k, v) in super::dead_letter_headers(outcome) {
            headers.insert(k, v);
        }
        self.ctx
            .js
            .publish_with_headers(
                self.ctx.names.dlq_subject(&task.queue),
                headers,
                body.into(),
            )
            .await
            .map_err(|e| format!("dead-letter copy of {}: {e}", task.id))?
            .await
            .map_err(|e| format!("dead-letter copy of {} not stored: {e}", task.id))?;
        Ok(())
    }
}

fn log_record(record: &TaskRecord) {
    let state = record.state.as_str();
    match &record.error {
        Some(e) => {
            info!(task_id = %record.id, attempt = record.attempt, state, error = %e.message, "outcome recorded")
        }
        None => debug!(task_id = %record.id, attempt = record.attempt, state, "outcome recorded"),
    }
}

/// Copies `msg` to `<prefix>.quarantine` with `reason`, then terminates it (after the copy's
/// PubAck; if the copy fails, the message is NAKed and comes back).
pub(crate) async fn quarantine(
    ctx: &LeaderContext,
    msg: &jetstream::Message,
    reason: &'static str,
    detail: &str,
) {
    ctx.metrics
        .quarantined
        .get_or_create(&[("reason", reason)])
        .inc();
    let mut headers = HeaderMap::new();
    if let Some(h) = &msg.headers {
        for (k, values) in h.iter() {
            for v in values {
                let name = k.to_string();
                if !name.starts_with("Nats-") {
                    headers.append(name.as_str(), v.as_str());
                }
            }
        }
    }
    headers.insert(HDR_REASON, reason);
    headers.insert(HDR_ERROR, super::header_line(detail));
    headers.insert(HDR_SUBJECT, msg.subject.as_str());
    let copied = match ctx
        .js
        .publish_with_headers(ctx.names.quarantine_subject(), headers, msg.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let kind = match copied {
        Ok(()) => AckKind::Term,
        Err(e) => {
            warn!(error = %e, "cannot quarantine a message; it comes back");
            AckKind::Nak(Some(RETRY_DELAY))
        }
    };
    if let Err(e) = msg.ack_with(kind).await {
        debug!(error = %e, "quarantine ack");
    }
}
