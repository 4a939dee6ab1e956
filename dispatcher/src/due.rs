//! Fired timers (SPEC §2 `DROVER_DELAYED`, §7): the leader consumes `<prefix>.due.>`, opens each
//! sealed task (see [`crate::outcomes`] for the sealing convention), writes a best-effort
//! `queued` record for the attempt, and dispatches it through the same routing, batching and
//! sealing as the intake ([`crate::leader::Pipeline`]). A timer is acked only after the PubAcks
//! of its envelopes; a timer whose task is terminal meanwhile (e.g. cancelled while scheduled or
//! retrying) is dropped with an ack.
//!
//! A timer with a `Drover-Due` instant still in the future (a delayed task's timer fires
//! [`crate::delays::HOLD_AHEAD`] early) is held unacked in a bounded in-memory set and handled at
//! that instant, so delayed tasks leave on time rather than on the server scheduler's tick.
//! Held timers are NAKed when leadership ends, so the next leader gets them at once.

use crate::delays::{self, HDR_DUE, Held, MAX_HELD};
use crate::leader::{LeaderContext, LeaderError, Pipeline, Routed};
use crate::outcomes::{DELAYED_PARTITION, quarantine};
use crate::records::{CAS_ATTEMPTS, Records, WriteError};
use async_nats::jetstream::{self, AckKind};
use drover_shared::envelope::{self, EnvelopeHeaders, Expected};
use drover_shared::task::{Task, TaskRecord, TaskState};
use futures::StreamExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Timers handled as one chunk.
const MAX_CHUNK: usize = 256;
/// How long an unopenable timer with an unknown key id waits before it is tried again.
const UNKNOWN_KID_DELAY: Duration = Duration::from_secs(5);
/// Record reads and writes in flight at once while preparing a chunk.
const RECORDS_IN_FLIGHT: usize = 64;

/// What to do with a fired timer's task, given its current record.
#[derive(Debug, Clone)]
pub enum DueDecision {
    /// Do not run it: the reason, for the log.
    Skip(&'static str),
    /// Dispatch it; first write this `queued` record (best-effort), if any.
    Dispatch(Option<Box<TaskRecord>>),
}

/// Decides a fired timer for `task` (attempt n) against its record.
pub fn decide_due(existing: Option<&TaskRecord>, task: &Task, track_queued: bool) -> DueDecision {
    let queued = |base: Option<&TaskRecord>| {
        track_queued.then(|| {
            let mut r = Box::new(match base {
                Some(r) => r.clone(),
                None => {
                    let submitted = chrono::DateTime::from_timestamp_millis(task.submitted_ms)
                        .unwrap_or_else(chrono::Utc::now);
                    TaskRecord::new(task, TaskState::Queued, submitted)
                }
            });
            r.state = TaskState::Queued;
            r.attempt = task.attempt;
            r.next_run_at = None;
            r.started_at = None;
            r.finished_at = None;
            r.duration_ms = None;
            r.worker = None;
            r.partition = None;
            r
        })
    };
    let Some(record) = existing else {
        return DueDecision::Dispatch(queued(None));
    };
    if record.state.is_terminal() {
        return DueDecision::Skip("terminal");
    }
    if record.attempt > task.attempt {
        return DueDecision::Skip("superseded");
    }
    if record.attempt == task.attempt {
        return match record.state {
            // Dispatched before, its timer not acked (a crash in between): dispatch again.
            TaskState::Queued | TaskState::Scheduled => DueDecision::Dispatch(None),
            // Already started or already failed again: this timer is stale.
            _ => DueDecision::Skip("started"),
        };
    }
    DueDecision::Dispatch(queued(Some(record)))
}

/// Consumes fired timers while leading in `epoch`, until `cancel` fires.
pub async fn consume(
    ctx: LeaderContext,
    epoch: u64,
    cancel: CancellationToken,
) -> Result<(), LeaderError> {
    let names = &ctx.names;
    let nats = crate::leader::nats_err;
    let consumer =
        crate::leader::leader_consumer(&ctx, &names.delayed_stream(), &names.due_consumer())
            .await?;
    let records = Records::open(&ctx.js, names)
        .await
        .map_err(|e| nats("open task records")(&e))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(MAX_CHUNK)
        .expires(Duration::from_secs(1))
        .heartbeat(Duration::from_millis(500))
        .messages()
        .await
        .map_err(|e| nats("pull due timers")(&e))?;
    info!(epoch, "leading: dispatching due timers");
    let mut due = Due {
        pipeline: Pipeline::new(ctx.clone(), epoch),
        ctx,
        records,
    };
    let mut held: Held<jetstream::Message> = Held::default();
    loop {
        let wake = held.next_due().map(|due_ms| {
            let wait = (due_ms - now_ms()).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = sleep_until(wake), if wake.is_some() => {
                let ready = held.take_due(now_ms());
                let mut ready = ready.into_iter().map(|(due, m)| (Some(due), m)).peekable();
                while ready.peek().is_some() {
                    let chunk: Vec<_> = ready.by_ref().take(MAX_CHUNK).collect();
                    due.chunk(chunk, &cancel).await;
                }
                continue;
            }
            m = messages.next(), if held.len() < MAX_HELD => m,
        };
        let Some(first) = first else { break };
        let mut chunk = Vec::new();
        match first {
            Ok(m) => chunk.push(m),
            Err(e) => {
                debug!(error = %e, "due pull");
                continue;
            }
        }
        while chunk.len() < MAX_CHUNK {
            match futures::FutureExt::now_or_never(messages.next()) {
                Some(Some(Ok(m))) => chunk.push(m),
                Some(Some(Err(_))) => continue,
                _ => break,
            }
        }
        // Timers due later are held until their instant; the rest go now.
        let now = now_ms();
        let mut ready = Vec::with_capacity(chunk.len());
        for m in chunk {
            let due_ms = delays::due_of(
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(HDR_DUE))
                    .map(|v| v.as_str()),
            );
            match due_ms {
                Some(t) if t > now => held.push(t, m),
                _ => ready.push((due_ms, m)),
            }
        }
        if !ready.is_empty() {
            due.chunk(ready, &cancel).await;
        }
    }
    // Leadership ended: what is held goes back to the server for the next leader.
    for m in held.drain() {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

type BoxedPrepare<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>;

struct Due {
    ctx: LeaderContext,
    pipeline: Pipeline,
    records: Records,
}

impl Due {
    /// Handles fired timers (with their due instants, if any) end to end: every one is acked,
    /// NAKed or quarantined by the time it returns.
    async fn chunk(
        &mut self,
        chunk: Vec<(Option<i64>, jetstream::Message)>,
        cancel: &CancellationToken,
    ) {
        let (dues, chunk): (Vec<Option<i64>>, Vec<jetstream::Message>) = chunk.into_iter().unzip();
        let mut ok = vec![true; chunk.len()];
        let mut keep = vec![true; chunk.len()];
        let mut opened: Vec<(usize, Task)> = Vec::new();
        for (i, msg) in chunk.iter().enumerate() {
            let tasks = match self.open(msg) {
                Ok(t) => t,
                Err(Unopenable::UnknownKid) => {
                    keep[i] = false;
                    let _ = msg.ack_with(AckKind::Nak(Some(UNKNOWN_KID_DELAY))).await;
                    continue;
                }
                Err(Unopenable::Bad(reason, detail)) => {
                    keep[i] = false;
                    warn!(subject = %msg.subject, reason, "unopenable timer; quarantined");
                    quarantine(&self.ctx, msg, reason, &detail).await;
                    continue;
                }
            };
            opened.extend(tasks.into_iter().map(|t| (i, t)));
        }
        // Records are read (and `queued` written) concurrently; routing keeps the chunk's order.
        let prepared: Vec<Result<bool, String>> = {
            let this = &*self;
            // Boxed, so the spawned future stays `Send` for every lifetime (a plain closure
            // over `&(usize, Task)` is not general enough for `tokio::spawn`).
            let futures: Vec<BoxedPrepare<'_>> = opened
                .iter()
                .map(|(_, task)| Box::pin(this.prepare(task)) as BoxedPrepare<'_>)
                .collect();
            futures::stream::iter(futures)
                .buffered(RECORDS_IN_FLIGHT)
                .collect()
                .await
        };
        let mut routed = Vec::new();
        for ((i, task), prepared) in opened.into_iter().zip(prepared) {
            match prepared {
                Ok(true) => match self.pipeline.route(&task).await {
                    Ok(partition) => routed.push(Routed {
                        task,
                        from: i,
                        partition,
                    }),
                    Err(e) => {
                        warn!(task_id = %task.id, error = %e, "cannot route a due task; it comes back");
                        ok[i] = false;
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    warn!(task_id = %task.id, error = %e, "cannot read the record of a due task; it comes back");
                    ok[i] = false;
                }
            }
        }
        let sent: Vec<usize> = routed.iter().map(|r| r.from).collect();
        let failed = self.pipeline.send(routed).await;
        let now = now_ms();
        for i in sent {
            if failed.contains(&i) {
                continue;
            }
            self.ctx.metrics.due_dispatched.inc();
            if let Some(due_ms) = dues[i] {
                let late = (now - due_ms).max(0) as f64 / 1000.0;
                self.ctx.metrics.due_lateness.observe(late);
            }
        }
        let leading = !cancel.is_cancelled();
        for (i, msg) in chunk.into_iter().enumerate() {
            if !keep[i] {
                continue;
            }
            let kind = if ok[i] && leading && !failed.contains(&i) {
                AckKind::Ack
            } else {
                AckKind::Nak(Some(Duration::from_millis(250)))
            };
            if let Err(e) = msg.ack_with(kind).await {
                debug!(error = %e, "due ack");
            }
        }
    }

    /// The sealed tasks of a fired timer on `<prefix>.due.<queue>`.
    fn open(&self, msg: &jetstream::Message) -> Result<Vec<Task>, Unopenable> {
        let queue = msg
            .subject
            .as_str()
            .strip_prefix(self.ctx.names.prefix())
            .and_then(|s| s.strip_prefix(".due."))
            .ok_or_else(|| {
                Unopenable::Bad(
                    "subject_mismatch",
                    format!("{} is not a due subject", msg.subject),
                )
            })?;
        let empty = async_nats::HeaderMap::new();
        let h = msg.headers.as_ref().unwrap_or(&empty);
        // The server strips `Nats-Msg-Id` from a fired copy; the batch id it must equal is in
        // `Drover-Batch` (and under the signature).
        let lookup = |name: &'static str| {
            let name = if name == "Nats-Msg-Id" {
                "Drover-Batch"
            } else {
                name
            };
            h.get(name).map(|v| v.as_str())
        };
        let opened = EnvelopeHeaders::from_lookup(lookup).and_then(|headers| {
            envelope::open::<Task>(
                &self.ctx.keys,
                &self.ctx.config.codec,
                Expected::Location {
                    queue,
                    partition: DELAYED_PARTITION,
                },
                &headers,
                &msg.payload,
            )
        });
        match opened {
            Ok(o) if o.tasks.iter().all(|t| t.queue == queue) => Ok(o.tasks),
            Ok(_) => Err(Unopenable::Bad(
                "subject_mismatch",
                format!("a sealed task is not of queue {queue}"),
            )),
            Err(e) if e.is_unknown_kid() => Err(Unopenable::UnknownKid),
            Err(e) => Err(Unopenable::Bad(e.reason(), e.to_string())),
        }
    }

    /// Reads the record and writes `queued` for this attempt; `false` if the task must not run.
    async fn prepare(&self, task: &Task) -> Result<bool, String> {
        let track = self.ctx.config.track_queued;
        for _ in 0..CAS_ATTEMPTS {
            let current = self.records.read(&task.id).await?;
            match decide_due(current.record.as_ref(), task, track) {
                DueDecision::Skip(why) => {
                    self.ctx.metrics.due_skipped.inc();
                    let state = current.record.as_ref().map_or("none", |r| r.state.as_str());
                    info!(task_id = %task.id, attempt = task.attempt, state, why, "timer dropped: task not run again");
                    return Ok(false);
                }
                DueDecision::Dispatch(None) => return Ok(true),
                DueDecision::Dispatch(Some(record)) => {
                    match self
                        .records
                        .write(&task.id, current.revision, &record)
                        .await
                    {
                        Ok(_) => {
                            self.ctx.events.emit(&record);
                            return Ok(true);
                        }
                        Err(WriteError::Conflict) => {
                            self.ctx.metrics.cas_conflicts.inc();
                        }
                        // Best-effort: the record write is not what makes the attempt durable.
                        Err(WriteError::Nats(e)) => {
                            debug!(task_id = %task.id, error = %e, "queued record not written");
                            return Ok(true);
                        }
                    }
                }
            }
        }
        Ok(true)
    }
}

enum Unopenable {
    UnknownKid,
    Bad(&'static str, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::TaskSpec;
    use serde_json::value::RawValue;

    fn task(attempt: u32) -> Task {
        Task {
            id: "t".into(),
            payload: RawValue::from_string("1".into()).unwrap(),
            attempt,
            ..Task::first_attempt(&TaskSpec::new("x"), "q", 1, 0)
        }
    }

    fn record(state: TaskState, attempt: u32) -> TaskRecord {
        let mut r = TaskRecord::new(&task(attempt), state, chrono::Utc::now());
        r.attempt = attempt;
        r.next_run_at = Some(chrono::Utc::now());
        r
    }

    #[test]
    fn retrying_record_becomes_queued_for_the_next_attempt() {
        match decide_due(Some(&record(TaskState::Retrying, 1)), &task(2), true) {
            DueDecision::Dispatch(Some(r)) => {
                assert_eq!(r.state, TaskState::Queued);
                assert_eq!(r.attempt, 2);
                assert!(r.next_run_at.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide_due(Some(&record(TaskState::Retrying, 1)), &task(2), false),
            DueDecision::Dispatch(None)
        ));
        assert!(matches!(
            decide_due(None, &task(2), true),
            DueDecision::Dispatch(Some(_))
        ));
    }

    #[test]
    fn terminal_started_and_superseded_tasks_are_not_run() {
        for s in [
            TaskState::Cancelled,
            TaskState::Succeeded,
            TaskState::Failed,
        ] {
            assert!(matches!(
                decide_due(Some(&record(s, 1)), &task(2), true),
                DueDecision::Skip("terminal")
            ));
        }
        assert!(matches!(
            decide_due(Some(&record(TaskState::Running, 2)), &task(2), true),
            DueDecision::Skip("started")
        ));
        assert!(matches!(
            decide_due(Some(&record(TaskState::Queued, 3)), &task(2), true),
            DueDecision::Skip("superseded")
        ));
        assert!(matches!(
            decide_due(Some(&record(TaskState::Queued, 2)), &task(2), true),
            DueDecision::Dispatch(None)
        ));
    }
}
