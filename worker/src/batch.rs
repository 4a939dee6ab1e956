//! One received envelope, from delivery to ack (SPEC §3, §6, §7): open it (quarantine what does
//! not open), read every task's record (and, on a redelivery, the outcomes already published),
//! run what is left — concurrently up to the worker's slots, same-key tasks one after another —
//! publish the outcomes as they come, and ack only after their PubAcks.
//!
//! | situation | what the batch does |
//! |---|---|
//! | does not open (tampered, truncated, wrong key, wrong subject, …) | copy to `drover.quarantine` with `Drover-Reason`/`Drover-Error`, `+TERM` |
//! | unknown kid | NAK with a delay; quarantine + `+TERM` once delivered `max_redeliveries` times |
//! | delivered more than `max_redeliveries` times | outcome `failed`/`lost` for every unfinished task, then `+TERM` |
//! | all tasks finished | outcomes published (PubAck) → double ack |
//! | shutdown left tasks unstarted or killed | outcomes of the finished ones, then NAK |
//! | the worker fenced meanwhile | nothing published, nothing acked: the batch is redelivered to the new owner |

use crate::handler::TaskContext;
use crate::plan::{self, Delivery, Disposition};
use crate::state::Shared;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use drover_shared::envelope::{self, now_ms};
use drover_shared::kv_batch;
use drover_shared::outcome::{MAX_OUTCOME_MESSAGE_BYTES, Outcome, OutcomeMessage};
use drover_shared::task::{ErrorKind, Task, TaskError, TaskRecord, TaskState};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a handler may take to return after its cancellation token fired.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Records read at once per batch (when the batched read is not available).
const RECORD_READS_IN_FLIGHT: usize = 64;

/// How long an outcome publish is retried before the batch is given up (and NAKed).
const PUBLISH_PATIENCE: Duration = Duration::from_secs(30);

/// Batches of fewer tasks read their records one by one: a batched read costs a subscription
/// and an end-of-batch message, which only pays from a few keys on (and a lone task at light
/// load must not wait for it).
const BATCHED_READ_MIN: usize = 3;

/// Tasks in hand (received, not finished) up to which `running` is written the moment an
/// attempt starts: at light load every state shows (SPEC §1.2).
const LIGHT_LOAD: usize = 8;

/// Above [`LIGHT_LOAD`], `running` is written only for attempts still running this long after
/// their start: short tasks go straight from `queued` to their terminal record (SPEC §1.2 lets
/// intermediate states be coalesced under load), which saves a KV write per task and the
/// leader's compare-and-set conflict with it.
const RUNNING_DEFER: Duration = Duration::from_millis(20);

/// Header of a quarantine copy: the stable reason label.
pub const HDR_REASON: &str = "Drover-Reason";
/// Header of a quarantine copy: the error message.
pub const HDR_ERROR: &str = "Drover-Error";
/// Header of a quarantine copy: the subject the envelope arrived on.
pub const HDR_SUBJECT: &str = "Drover-Subject";
/// Header of a quarantine copy and of outcome messages: the worker.
pub const HDR_WORKER: &str = "Drover-Worker";

/// Where a batch came from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Queue.
    pub queue: String,
    /// Partition.
    pub partition: u32,
}

/// How a batch ended (the `drover_worker_batches` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEnd {
    /// Every task finished and the outcomes are durable: acked.
    Acked,
    /// Handed back (shutdown, outcome publish failure, unknown kid).
    Nacked,
    /// Fenced: neither acked nor NAKed.
    Abandoned,
    /// Poison: `lost` outcomes, terminated.
    Lost,
    /// Did not open: quarantined and terminated.
    Quarantined,
}

impl BatchEnd {
    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Nacked => "nacked",
            Self::Abandoned => "abandoned",
            Self::Lost => "lost",
            Self::Quarantined => "quarantined",
        }
    }
}

/// Handles one delivered envelope to its end.
pub async fn process(shared: &Arc<Shared>, msg: jetstream::Message, origin: &Origin) -> BatchEnd {
    let end = process_inner(shared, msg, origin).await;
    if end == BatchEnd::Abandoned {
        info!(
            partition = origin.partition,
            "batch abandoned while fenced: neither acked nor NAKed, it comes back after ack_wait"
        );
    }
    shared
        .metrics
        .batches
        .get_or_create(&[("end", end.as_str())])
        .inc();
    end
}

async fn process_inner(shared: &Arc<Shared>, msg: jetstream::Message, origin: &Origin) -> BatchEnd {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let empty = HeaderMap::new();
    let headers = msg.headers.as_ref().unwrap_or(&empty);
    let opened = envelope::open_message::<Task>(
        &shared.keys,
        &shared.codec,
        &shared.names,
        msg.subject.as_str(),
        |name| headers.get(name).map(|v| v.as_str()),
        &msg.payload,
    );
    let (hdr, opened) = match opened {
        Ok(o) => o,
        Err(e) => {
            if e.is_unknown_kid() && delivered < i64::from(shared.cfg.max_redeliveries) {
                shared.metrics.unknown_kid.inc();
                warn!(
                    reason = e.reason(),
                    delivered, "envelope with an unknown key id; NAKed for later"
                );
                if shared.gate.may_act() {
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(shared.cfg.unknown_kid_delay())))
                        .await;
                }
                return BatchEnd::Nacked;
            }
            return quarantine(shared, &msg, e.reason(), &e.to_string()).await;
        }
    };
    let batch = hdr.batch_id();
    let Some(period) = shared.gate.period() else {
        return BatchEnd::Abandoned;
    };
    let Some(reply) = msg.reply.clone() else {
        return BatchEnd::Abandoned;
    };
    let inflight = shared.add_inflight(reply);
    let span = tracing::info_span!("batch", batch = %batch, partition = origin.partition, epoch = hdr.epoch, worker = %shared.id);
    let end = tracing::Instrument::instrument(
        run_batch(
            shared,
            &msg,
            origin,
            hdr.epoch,
            &batch,
            opened.tasks,
            delivered,
            period,
        ),
        span,
    )
    .await;
    shared.done_inflight(inflight);
    end
}

/// Copies the envelope to the quarantine subject with the reason, then terminates it.
async fn quarantine(
    shared: &Shared,
    msg: &jetstream::Message,
    reason: &str,
    error: &str,
) -> BatchEnd {
    warn!(reason, subject = %msg.subject, "envelope quarantined");
    shared
        .metrics
        .quarantined
        .get_or_create(&[("reason", static_reason(reason))])
        .inc();
    let mut headers = msg.headers.clone().unwrap_or_default();
    headers.insert(HDR_REASON, reason);
    headers.insert(HDR_ERROR, error.replace(['\r', '\n'], " "));
    headers.insert(HDR_SUBJECT, msg.subject.as_str());
    headers.insert(HDR_WORKER, shared.id.as_str());
    let published = match shared
        .js
        .publish_with_headers(
            shared.names.quarantine_subject(),
            headers,
            msg.payload.clone(),
        )
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !shared.gate.may_act() {
        return BatchEnd::Abandoned;
    }
    if published {
        let _ = msg.ack_with(AckKind::Term).await;
        BatchEnd::Quarantined
    } else {
        // Without the copy, terminating would lose the evidence: let it come back.
        let _ = msg
            .ack_with(AckKind::Nak(Some(shared.cfg.unknown_kid_delay())))
            .await;
        BatchEnd::Nacked
    }
}

fn static_reason(reason: &str) -> &'static str {
    envelope::OpenError::REASONS
        .iter()
        .copied()
        .find(|r| *r == reason)
        .unwrap_or("other")
}

/// How a batch's records and published outcomes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// Direct gets, answered by any replica: fast, but a replica may lag behind the leader (a
    /// node that just restarted is still catching up). Enough for a first delivery.
    Direct,
    /// Reads answered by the stream leader, which reflect every acknowledged write. A
    /// redelivered batch may hold tasks whose success was recorded moments ago: a stale read
    /// would run them again.
    Leader,
}

/// Reads every task's record with its revision. `Err` when a read failed: the record may
/// exist, so the batch must not run on a guess. Direct reads of three tasks or more go as one
/// batched direct get ([`drover_shared::kv_batch`]), falling back to one pipelined read per
/// task when the server refuses it; leader reads go one per task.
async fn read_records(
    shared: &Shared,
    tasks: &[Task],
    reads: Reads,
) -> Result<Vec<Option<(TaskRecord, u64)>>, String> {
    if reads == Reads::Direct && tasks.len() >= BATCHED_READ_MIN {
        let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        let bucket = shared.names.bucket("tasks");
        match kv_batch::get_many(&shared.client, &bucket, &ids).await {
            Ok(mut found) => {
                return Ok(ids
                    .iter()
                    .map(|id| {
                        let e = found.remove(id)?;
                        if !e.is_put {
                            return None;
                        }
                        serde_json::from_slice::<TaskRecord>(&e.value)
                            .ok()
                            .map(|r| (r, e.revision))
                    })
                    .collect());
            }
            Err(e) => debug!(error = %e, "batched record read failed; reading one by one"),
        }
    }
    let reads: Vec<_> = tasks
        .iter()
        .map(|t| read_record(&shared.tasks_kv, t.id.clone(), reads))
        .collect();
    futures::stream::iter(reads)
        .buffered(RECORD_READS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn read_record(
    kv: &async_nats::jetstream::kv::Store,
    id: String,
    reads: Reads,
) -> Result<Option<(TaskRecord, u64)>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let (value, revision) = match reads {
        Reads::Direct => match kv.entry(&id).await {
            Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                (e.value, e.revision)
            }
            Ok(_) => return Ok(None),
            Err(e) => return Err(format!("read record {id}: {e}")),
        },
        Reads::Leader => {
            let subject = format!("$KV.{}.{id}", kv.name);
            match kv.stream.get_last_raw_message_by_subject(&subject).await {
                // A delete or purge marker carries a `KV-Operation` header.
                Ok(m) if m.headers.get("KV-Operation").is_some() => return Ok(None),
                Ok(m) => (m.payload, m.sequence),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                    return Ok(None);
                }
                Err(e) => return Err(format!("read record {id}: {e}")),
            }
        }
    };
    Ok(serde_json::from_slice::<TaskRecord>(&value)
        .ok()
        .map(|r| (r, revision)))
}

/// `(id, attempt)` of every outcome already published for `batch` (read from the stream
/// leader: see [`Reads::Leader`]). `Err` when a read failed.
async fn published_outcomes(
    shared: &Shared,
    queue: &str,
    batch: &str,
) -> Result<HashSet<(String, u32)>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = shared.names.outcome_subject(queue, batch);
    let mut out = HashSet::new();
    let mut next = 1u64;
    loop {
        let got = shared
            .outcomes
            .raw_message_builder()
            .next_by_subject(subject.as_str())
            .sequence(next)
            .send()
            .await;
        match got {
            Ok(m) => {
                if let Ok(om) = OutcomeMessage::decode(&m.payload) {
                    out.extend(om.outcomes.into_iter().map(|o| (o.task.id, o.task.attempt)));
                }
                next = m.sequence + 1;
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(out),
            Err(e) => return Err(format!("read published outcomes: {e}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_batch(
    shared: &Arc<Shared>,
    msg: &jetstream::Message,
    origin: &Origin,
    epoch: u64,
    batch: &str,
    tasks: Vec<Task>,
    delivered: i64,
    period: CancellationToken,
) -> BatchEnd {
    let delivery = plan::delivery(delivered, shared.cfg.max_redeliveries);
    // Without the records, a task that already succeeded could run again: while JetStream is
    // unavailable (a node restarting) the reads are retried here, with the batch kept in
    // progress, rather than NAKed (every redelivery counts towards the poison limit).
    let mut failures = 0u32;
    let (records, published) = loop {
        let read = if delivery == Delivery::First {
            read_records(shared, &tasks, Reads::Direct)
                .await
                .map(|r| (r, HashSet::new()))
        } else {
            let (records, published) = tokio::join!(
                read_records(shared, &tasks, Reads::Leader),
                published_outcomes(shared, &origin.queue, batch)
            );
            records.and_then(|r| Ok((r, published?)))
        };
        match read {
            Ok(read) => break read,
            Err(e) => {
                failures += 1;
                if failures % 20 == 1 {
                    warn!(batch, error = %e, failures, "cannot read the batch's records; retrying");
                }
                if !shared.gate.may_act() || period.is_cancelled() {
                    return BatchEnd::Abandoned;
                }
                let delay = Duration::from_millis(100 << failures.min(4));
                tokio::select! {
                    () = period.cancelled() => return BatchEnd::Abandoned,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let plain: Vec<Option<TaskRecord>> = records
        .iter()
        .map(|r| r.as_ref().map(|(r, _)| r.clone()))
        .collect();
    let dispositions = plan::dispositions(&tasks, &plain, &published);
    let run: Vec<usize> = (0..tasks.len())
        .filter(|&i| dispositions[i] == Disposition::Run)
        .collect();
    let skipped = tasks.len() - run.len();
    if skipped > 0 {
        shared.metrics.tasks_skipped.inc_by(skipped as u64);
        debug!(
            skipped,
            delivered, "tasks already recorded or terminal: not run again"
        );
    }
    let publisher = Publisher {
        shared: shared.clone(),
        subject: shared.names.outcome_subject(&origin.queue, batch),
        batch: batch.to_owned(),
        origin: origin.clone(),
        epoch,
        period: period.clone(),
    };

    if delivery == Delivery::Poison {
        let now = now_ms() as i64;
        let message = format!(
            "batch delivered {delivered} times (worker.max_redeliveries = {}); its worker died or it is poison",
            shared.cfg.max_redeliveries
        );
        let outcomes: Vec<Outcome> = run
            .iter()
            .map(|&i| {
                Outcome::failed(
                    tasks[i].clone(),
                    TaskError {
                        kind: ErrorKind::Lost,
                        message: message.clone(),
                    },
                    now,
                    now,
                )
            })
            .collect();
        warn!(
            batch,
            delivered,
            lost = outcomes.len(),
            "poison batch: unfinished tasks fail as lost"
        );
        for o in &outcomes {
            count_outcome(shared, o);
        }
        if publisher.publish(outcomes, 0).await.is_err() {
            return finish_incomplete(shared, msg, &period).await;
        }
        if !shared.gate.may_act() || period.is_cancelled() {
            return BatchEnd::Abandoned;
        }
        let _ = msg.ack_with(AckKind::Term).await;
        return BatchEnd::Lost;
    }

    // Register cancel tokens now: a cancel that arrives before a task starts still counts.
    let tasks: Vec<Arc<Task>> = tasks.into_iter().map(Arc::new).collect();
    let cancels: Vec<Option<CancellationToken>> = (0..tasks.len())
        .map(|i| {
            (dispositions[i] == Disposition::Run).then(|| shared.register_cancel(&tasks[i].id))
        })
        .collect();

    let (tx, rx) = mpsc::unbounded_channel::<Outcome>();
    let plain_tasks: Vec<Task> = tasks.iter().map(|t| (**t).clone()).collect();
    let chains = plan::chains(&plain_tasks, &run);
    drop(plain_tasks);
    let mut records = records;
    let mut runners = Vec::with_capacity(chains.len());
    for chain in chains {
        let items: Vec<ChainItem> = chain
            .iter()
            .map(|&i| {
                (
                    tasks[i].clone(),
                    cancels[i].clone().unwrap_or_default(),
                    records[i].take(),
                )
            })
            .collect();
        let (shared, tx, period, partition) =
            (shared.clone(), tx.clone(), period.clone(), origin.partition);
        runners.push(async move {
            for (task, cancel, record) in items {
                match run_one(&shared, task, partition, cancel, &period, record).await {
                    Some(o) => {
                        let _ = tx.send(o);
                    }
                    // Not run or not finished: the rest of the chain waits for the redelivery,
                    // so the key's order holds.
                    None => break,
                }
            }
        });
    }
    drop(tx);
    let expected = run.len();
    shared.in_hand.fetch_add(expected, Ordering::Relaxed);
    let _in_hand = InHand {
        shared: shared.clone(),
        n: expected,
    };
    let (_, reported) = tokio::join!(futures::future::join_all(runners), publisher.pump(rx));
    for (i, c) in cancels.iter().enumerate() {
        if c.is_some() {
            shared.unregister_cancel(&tasks[i].id);
        }
    }
    match reported {
        Some(n) if n == expected => {
            if !shared.gate.may_act() || period.is_cancelled() {
                return BatchEnd::Abandoned;
            }
            if msg.double_ack().await.is_err() {
                // The ack may still have landed; if not, the batch comes back and the published
                // outcomes make the redelivery skip every task.
                warn!(batch, "batch ack not confirmed");
            }
            BatchEnd::Acked
        }
        _ => finish_incomplete(shared, msg, &period).await,
    }
}

/// Counts a batch's tasks out of [`Shared::in_hand`] when the batch ends.
struct InHand {
    shared: Arc<Shared>,
    n: usize,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.shared.in_hand.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// A batch that did not finish: NAK it (at once) unless fenced.
async fn finish_incomplete(
    shared: &Shared,
    msg: &jetstream::Message,
    period: &CancellationToken,
) -> BatchEnd {
    if !shared.gate.may_act() || period.is_cancelled() {
        return BatchEnd::Abandoned;
    }
    let _ = msg.ack_with(AckKind::Nak(None)).await;
    BatchEnd::Nacked
}

fn count_outcome(shared: &Shared, o: &Outcome) {
    let status = match o.status {
        drover_shared::outcome::OutcomeStatus::Succeeded => "succeeded",
        drover_shared::outcome::OutcomeStatus::Failed => "failed",
        drover_shared::outcome::OutcomeStatus::Cancelled => "cancelled",
    };
    let kind = o
        .error
        .as_ref()
        .map_or("none", |e| error_kind_label(e.kind));
    shared
        .metrics
        .tasks
        .get_or_create(&[("status", status), ("kind", kind)])
        .inc();
    shared
        .metrics
        .task_duration
        .observe(o.duration_ms() as f64 / 1000.0);
}

const fn error_kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Handler => "handler",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Killed => "killed",
        ErrorKind::Lost => "lost",
        ErrorKind::Invalid => "invalid",
        ErrorKind::UnknownType => "unknown_type",
        ErrorKind::Cancelled => "cancelled",
    }
}

/// One task of a chain: the task, its cancel token, its record and revision read at receipt.
type ChainItem = (Arc<Task>, CancellationToken, Option<(TaskRecord, u64)>);

/// How an attempt ended before its handler returned.
enum End {
    Done(Result<Box<serde_json::value::RawValue>, TaskError>),
    Timeout,
    Cancelled,
    Fenced,
    Killed,
}

/// Runs one attempt; `None` when it did not start or did not finish (fenced, shutdown).
async fn run_one(
    shared: &Arc<Shared>,
    task: Arc<Task>,
    partition: u32,
    cancel: CancellationToken,
    period: &CancellationToken,
    record: Option<(TaskRecord, u64)>,
) -> Option<Outcome> {
    // Wait for a slot; give up if fenced or draining meanwhile.
    let permit = tokio::select! {
        biased;
        () = period.cancelled() => return None,
        () = shared.draining.cancelled() => return None,
        p = shared.slots.clone().acquire_owned() => p.ok()?,
    };
    if shared.draining.is_cancelled() || period.is_cancelled() || !shared.gate.may_act() {
        return None;
    }
    let started = now_ms() as i64;
    if cancel.is_cancelled() {
        let o = Outcome::cancelled((*task).clone(), started, started);
        count_outcome(shared, &o);
        return Some(o);
    }
    let Some(handler) = shared.registry.get(&task.task_type).cloned() else {
        let o = Outcome::failed(
            (*task).clone(),
            TaskError {
                kind: ErrorKind::UnknownType,
                message: format!(
                    "no handler for task type {:?} on this worker",
                    task.task_type
                ),
            },
            started,
            started,
        );
        count_outcome(shared, &o);
        return Some(o);
    };
    let attempt_done = CancellationToken::new();
    let _attempt_done = attempt_done.clone().drop_guard();
    // The record's revision as this attempt knows it, for the outcome (0: unknown).
    let revision = Arc::new(AtomicU64::new(record.as_ref().map_or(0, |(_, r)| *r)));
    if shared.cfg.track_running
        && let Some((record, read)) = record
    {
        let defer = (shared.in_hand.load(Ordering::Relaxed) > LIGHT_LOAD).then_some(RUNNING_DEFER);
        write_running(
            shared,
            &task,
            partition,
            (record, read),
            started,
            defer.map(|d| (d, attempt_done)),
            revision.clone(),
        );
    }
    shared.running.fetch_add(1, Ordering::Relaxed);
    shared.metrics.running.inc();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(task.timeout_ms);
    let ctx_token = CancellationToken::new();
    let ctx = TaskContext::new(
        task.clone(),
        Arc::from(shared.id.as_str()),
        deadline,
        ctx_token.clone(),
        shared.checkpoints.clone(),
        crate::progress::sink(
            shared.tasks_kv.clone(),
            shared.metrics.progress.clone(),
            task.attempt,
        ),
    );
    let fut = handler.invoke(ctx, task.payload.clone());
    tokio::pin!(fut);
    let end = tokio::select! {
        biased;
        r = &mut fut => End::Done(r),
        () = period.cancelled() => End::Fenced,
        () = shared.kill.cancelled() => End::Killed,
        () = cancel.cancelled() => End::Cancelled,
        () = tokio::time::sleep_until(deadline) => End::Timeout,
    };
    if !matches!(end, End::Done(_)) {
        ctx_token.cancel();
        let _ = tokio::time::timeout(CANCEL_GRACE, &mut fut).await;
    }
    drop(permit);
    shared.running.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.running.dec();
    let finished = now_ms() as i64;
    let timeout_ms = task.timeout_ms;
    let task = (*task).clone();
    let outcome = match end {
        End::Done(Ok(result)) => Outcome::succeeded(task, result, started, finished),
        End::Done(Err(e)) if e.kind == ErrorKind::Cancelled && cancel.is_cancelled() => {
            Outcome::cancelled(task, started, finished)
        }
        End::Done(Err(e)) => Outcome::failed(task, e, started, finished),
        End::Cancelled => Outcome::cancelled(task, started, finished),
        End::Timeout => Outcome::failed(
            task,
            TaskError {
                kind: ErrorKind::Timeout,
                message: format!("attempt ran past its timeout of {timeout_ms} ms"),
            },
            started,
            finished,
        ),
        End::Fenced | End::Killed => return None,
    };
    let outcome = outcome.with_revision(match revision.load(Ordering::Acquire) {
        0 => None,
        r => Some(r),
    });
    count_outcome(shared, &outcome);
    Some(outcome)
}

/// Writes `running` by compare-and-set on the revision read at receipt, in the background;
/// a conflict (the leader or a cancel wrote meanwhile) skips it. With `defer = (d, done)` the
/// write waits `d` first and is dropped if the attempt finished (`done` fired) by then.
/// `known` holds the record's revision for the outcome: 0 (unknown) while the write is in
/// flight or after it failed, the new revision once it landed.
#[allow(clippy::too_many_arguments)]
fn write_running(
    shared: &Arc<Shared>,
    task: &Task,
    partition: u32,
    (mut record, revision): (TaskRecord, u64),
    started: i64,
    defer: Option<(Duration, CancellationToken)>,
    known: Arc<AtomicU64>,
) {
    if record.state.is_terminal() {
        return;
    }
    record.state = TaskState::Running;
    record.attempt = task.attempt;
    record.worker = Some(shared.id.clone());
    record.partition = Some(partition);
    record.started_at = chrono::DateTime::from_timestamp_millis(started);
    record.next_run_at = None;
    let kv = shared.tasks_kv.clone();
    let id = task.id.clone();
    let metrics = shared.metrics.clone();
    tokio::spawn(async move {
        if let Some((wait, done)) = defer {
            tokio::select! {
                () = done.cancelled() => {
                    metrics.running_coalesced.inc();
                    return;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
        let Ok(body) = serde_json::to_vec(&record) else {
            return;
        };
        known.store(0, Ordering::Release);
        match kv.update(&id, body.into(), revision).await {
            Ok(written) => known.store(written, Ordering::Release),
            Err(e) => debug!(task_id = %id, error = %e, "running record skipped"),
        }
    });
}

/// Publishes the outcomes of one batch.
struct Publisher {
    shared: Arc<Shared>,
    subject: String,
    batch: String,
    origin: Origin,
    epoch: u64,
    period: CancellationToken,
}

impl Publisher {
    /// Publishes `outcomes` as parts numbered from `first_part`, waiting for every PubAck.
    /// Returns the next part number, or an error when fenced or the stream refused.
    async fn publish(&self, outcomes: Vec<Outcome>, first_part: u32) -> Result<u32, ()> {
        let mut parts = OutcomeMessage::split(
            &self.batch,
            &self.origin.queue,
            self.origin.partition,
            &self.shared.id,
            self.epoch,
            outcomes,
            MAX_OUTCOME_MESSAGE_BYTES,
        );
        let mut next = first_part;
        for part in &mut parts {
            part.part = next;
            next += 1;
        }
        for part in parts {
            let body = bytes::Bytes::from(part.encode());
            let mut sent = false;
            // Retried for up to PUBLISH_PATIENCE: a stream whose leader died is back after the
            // server's election (seconds), and a batch given up here runs its tasks again.
            let began = std::time::Instant::now();
            for attempt in 0u32.. {
                if attempt > 0 && began.elapsed() >= PUBLISH_PATIENCE {
                    break;
                }
                // A fenced worker publishes nothing: its batch belongs to someone else now.
                if self.period.is_cancelled() || !self.shared.gate.may_act() {
                    return Err(());
                }
                let mut headers = HeaderMap::new();
                headers.insert(HDR_WORKER, self.shared.id.as_str());
                match self
                    .shared
                    .js
                    .publish_with_headers(self.subject.clone(), headers, body.clone())
                    .await
                {
                    Ok(ack) => match ack.await {
                        Ok(_) => {
                            sent = true;
                            break;
                        }
                        Err(e) if attempt % 5 == 0 => {
                            warn!(error = %e, attempt, "outcome publish not acknowledged; retrying");
                        }
                        Err(_) => {}
                    },
                    Err(e) if attempt % 5 == 0 => {
                        warn!(error = %e, attempt, "outcome publish failed; retrying");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            if !sent {
                return Err(());
            }
        }
        Ok(next)
    }

    /// Publishes outcomes as they arrive, coalescing whatever is ready into one message. Returns
    /// how many were published, or `None` if publishing stopped (fenced or refused).
    async fn pump(&self, mut rx: mpsc::UnboundedReceiver<Outcome>) -> Option<usize> {
        let mut part = 0u32;
        let mut count = 0usize;
        let mut ok = true;
        while let Some(first) = rx.recv().await {
            let mut ready = vec![first];
            while let Ok(o) = rx.try_recv() {
                ready.push(o);
            }
            if !ok {
                continue;
            }
            let n = ready.len();
            match self.publish(ready, part).await {
                Ok(next) => {
                    part = next;
                    count += n;
                }
                Err(()) => {
                    info!(batch = %self.batch, "outcomes not published (fenced or refused); the batch will be redelivered");
                    ok = false;
                }
            }
        }
        ok.then_some(count)
    }
}
