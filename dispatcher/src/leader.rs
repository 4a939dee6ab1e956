//! What the elected leader does while its lease is valid (SPEC §5): consume the intake, route and
//! seal tasks, publish envelopes, and ack intake only after its envelopes are durable.
//!
//! The loop is cancelled the moment the election says to stop leading; anything it holds
//! unacknowledged then comes back to the next leader through the intake consumer's `ack_wait`
//! (or at once, on a graceful hand-over, because it NAKs them).

use crate::api::{HDR_RETRY, HDR_TASK_ID};
use crate::batcher::{Batch, Batcher, BatcherConfig, Route};
use crate::delays::unique::{ClaimResult, UniqueStore};
use crate::delays::{self, Claim, HDR_UNIQUE_CLAIM};
use crate::events::EventSink;
use crate::handover;
use crate::intake::{self, IntakeLimits, Rejection, Router, Strategy};
use crate::load::Loads;
use crate::metrics::DispatcherMetrics;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, context::PublishAckFuture};
use drover_shared::envelope::{self, BatchMeta, CodecConfig};
use drover_shared::keyring::Keyring;
use drover_shared::names::Names;
use drover_shared::settings::Events;
use drover_shared::task::{Task, TaskRecord, TaskState};
use drover_shared::topology::{self, QueueConsumerConfig};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Header on a task record written at intake: the intake stream sequence it came from, so a
/// redelivered intake message can tell its own earlier write from a true duplicate.
pub const HDR_INTAKE_SEQ: &str = "Drover-Intake-Seq";

/// How long one intake pull request waits for messages at most.
const INTAKE_PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Task records written before their acks are awaited.
const RECORD_WINDOW: usize = 4096;

/// A chunk of intake stops growing at this many submission bytes as well as at
/// `dispatcher.intake_fetch` messages: 512 arrays of 100 tasks would be 51,200 tasks (and their
/// records) in hand at once, which is what made a 100k-task array backlog cost the leader
/// ~150 MiB and stall its outcome handling behind giant chunks.
const MAX_CHUNK_BYTES: usize = 512 * 1024;

/// Chunks of intake whose PubAcks and acks are awaited while the next chunk is prepared.
const CHUNKS_SETTLING: usize = 2;

/// Settings of the leader's dispatch pipeline.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Envelope sizing.
    pub batcher: BatcherConfig,
    /// Sealing.
    pub codec: CodecConfig,
    /// Partitions of a queue seen for the first time, unless `queue_partitions` names it.
    pub default_partitions: u32,
    /// Partitions of predeclared queues (`[queues.<name>]`).
    pub queue_partitions: HashMap<String, u32>,
    /// Keyless routing of queues not in `queue_strategies`.
    pub strategy: Strategy,
    /// Keyless routing of predeclared queues (`[queues.<name>] strategy`).
    pub queue_strategies: HashMap<String, Strategy>,
    /// Per-attempt timeout for tasks that name none.
    pub default_timeout_ms: u64,
    /// Most intake messages handled as one chunk.
    pub max_chunk: usize,
    /// Write a `queued` record per task at intake (`tracking = "full"`); it is also the
    /// duplicate check.
    pub track_queued: bool,
    /// Partition consumer settings for new queues.
    pub queue_consumers: QueueConsumerConfig,
    /// Which lifecycle events are published (`dispatcher.events`).
    pub events: Events,
}

/// What a leader needs from the process.
#[derive(Clone)]
pub struct LeaderContext {
    /// JetStream.
    pub js: jetstream::Context,
    /// Names under the prefix.
    pub names: Names,
    /// Envelope keys.
    pub keys: Arc<Keyring>,
    /// Settings.
    pub config: Arc<LeaderConfig>,
    /// Server `max_payload`.
    pub max_payload: usize,
    /// Where the pipeline counts what it does.
    pub metrics: Arc<DispatcherMetrics>,
    /// Where lifecycle events go.
    pub events: EventSink,
    /// The dependency actor of the current term ([`crate::deps`]); a no-op outside a term.
    pub deps: crate::deps::Deps,
}

/// Why leading stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// A NATS request failed.
    #[error("{0}: {1}")]
    Nats(&'static str, String),
}

pub(crate) fn nats_err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> LeaderError {
    move |e| LeaderError::Nats(what, e.to_string())
}

/// Opens the durable pull consumer `consumer` of `stream` (provisioned by the topology), for
/// one of the leader's loops: intake, outcomes, due timers.
pub(crate) async fn leader_consumer(
    ctx: &LeaderContext,
    stream: &str,
    consumer: &str,
) -> Result<PullConsumer, LeaderError> {
    ctx.js
        .get_stream(stream)
        .await
        .map_err(|e| nats_err("open a leader stream")(&e))?
        .get_consumer(consumer)
        .await
        .map_err(|e| nats_err("open a leader consumer")(&e))
}

/// One intake message being handled.
struct Held {
    msg: jetstream::Message,
    /// Envelopes of this chunk it has tasks in must be durable before it is acked.
    ok: bool,
    /// `Drover-Retry: <n>` of a retry published by `drover.api.retry`.
    retry: Option<String>,
}

/// An envelope published and not yet confirmed: the `from` indexes of its tasks, its PubAck.
type Pending = (Vec<usize>, PublishAckFuture);

/// Waits for the PubAcks of `pending`; returns the `from` indexes of envelopes not stored.
async fn durable(ctx: &LeaderContext, pending: Vec<Pending>) -> HashSet<usize> {
    let mut failed = HashSet::new();
    for (from, ack) in pending {
        match ack.await {
            Ok(_) => {
                ctx.metrics.envelopes.inc();
                ctx.metrics.tasks_dispatched.inc_by(from.len() as u64);
            }
            Err(e) => {
                warn!(error = %e, "envelope not stored; its tasks will be retried");
                failed.extend(from);
            }
        }
    }
    failed
}

/// The second half of a chunk of intake: its envelopes are published, their PubAcks (and those
/// of its rejected records) outstanding. [`Settle::run`] waits for them and acks every message
/// whose steps are durable, NAKs the rest. It runs while the leader prepares the next chunk:
/// the server stores one chunk's envelopes while the next one's records are created, instead of
/// every chunk paying its round trips one after another.
struct Settle {
    ctx: LeaderContext,
    held: Vec<Held>,
    envelopes: Vec<Pending>,
    rejects: Vec<(usize, PublishAckFuture)>,
}

impl Settle {
    async fn run(mut self, cancel: CancellationToken) {
        for i in durable(&self.ctx, self.envelopes).await {
            self.held[i].ok = false;
        }
        for (i, ack) in self.rejects {
            if ack.await.is_err() {
                self.held[i].ok = false;
            }
        }
        // Ack only what is durable downstream; everything else comes back. What is durable is
        // acked even when leadership ended meanwhile: NAKing it would only make the successor
        // dispatch it a second time.
        let leading = !cancel.is_cancelled();
        for h in self.held {
            let kind = if h.ok {
                AckKind::Ack
            } else {
                self.ctx.metrics.intake_retries.inc();
                // While leading, a failed step is retried after a pause; once leadership ended,
                // NAK without delay, so the message is due before anything newer when the
                // successor pulls (per-key order).
                AckKind::Nak(leading.then_some(Duration::from_millis(250)))
            };
            if let Err(e) = h.msg.ack_with(kind).await {
                debug!(error = %e, "intake ack");
            }
        }
    }
}

/// Leads in `epoch` until `cancel` fires: dispatch every intake message exactly once into
/// `DROVER_WORK`, in order per partition. Returns `true` when leadership ended with every intake
/// delivery of this term acked or NAKed (confirmed) and no pull request left open, so a graceful
/// hand-over may be recorded ([`crate::handover`]).
pub async fn lead(
    ctx: LeaderContext,
    epoch: u64,
    cancel: CancellationToken,
) -> Result<bool, LeaderError> {
    let names = &ctx.names;
    let consumer = leader_consumer(&ctx, &names.submit_stream(), &names.intake_consumer()).await?;
    let election = ctx.js.get_key_value(names.bucket("election")).await.ok();

    handover::wait_for_predecessor(&consumer, election.as_ref(), epoch, &cancel).await?;
    if cancel.is_cancelled() {
        return Ok(true);
    }
    info!(epoch, "leading: dispatching intake");

    let mut intake = handover::IntakePull::open(
        &ctx.js,
        consumer,
        ctx.config.max_chunk.max(1),
        INTAKE_PULL_EXPIRES,
    )
    .await?;

    let mut state = Pipeline::new(ctx.clone(), epoch);
    let mut in_hand = Vec::new();
    let mut settling: std::collections::VecDeque<tokio::task::JoinHandle<()>> =
        std::collections::VecDeque::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            m = intake.next() => m,
        };
        let Some(first) = first else { break };
        let mut chunk = Vec::with_capacity(64);
        let mut bytes = 0;
        match first {
            Ok(m) => {
                bytes += m.payload.len();
                chunk.push(m);
            }
            Err(e) => {
                debug!(error = %e, "intake pull");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let room = |chunk: &Vec<_>, bytes: usize| {
            chunk.len() < ctx.config.max_chunk && bytes < MAX_CHUNK_BYTES
        };
        // Take what is already here without waiting: under load chunks grow and batches fill;
        // when idle a lone task leaves at once.
        while room(&chunk, bytes) {
            match intake.next_now() {
                Some(m) => {
                    bytes += m.payload.len();
                    chunk.push(m);
                }
                None => break,
            }
        }
        // Adaptive linger (`dispatcher.linger_ms`): a busy intake (more than one message was
        // waiting) keeps collecting for up to `linger`, so envelopes fill across pull
        // batches; an idle one (a lone message) never waits.
        let linger = ctx.config.batcher.linger;
        if chunk.len() > 1 && room(&chunk, bytes) && !linger.is_zero() {
            let until = tokio::time::Instant::now() + linger;
            while room(&chunk, bytes) {
                match tokio::time::timeout_at(until, intake.next()).await {
                    Ok(Some(Ok(m))) => {
                        bytes += m.payload.len();
                        chunk.push(m);
                    }
                    Ok(Some(Err(_))) => continue,
                    _ => break,
                }
            }
        }
        if cancel.is_cancelled() {
            in_hand = chunk;
            break;
        }
        // The chunks before this one wait for their PubAcks and ack their messages meanwhile;
        // at most CHUNKS_SETTLING of them at once.
        while settling.len() >= CHUNKS_SETTLING {
            if let Some(h) = settling.pop_front() {
                let _ = h.await;
            }
        }
        // Ask for the next chunk's messages now, so they arrive while this one is dispatched.
        if let Err(e) = intake.top_up().await {
            debug!(error = %e, "intake pull");
        }
        let settle = state.dispatch(chunk).await;
        settling.push_back(tokio::spawn(settle.run(cancel.clone())));
    }
    // Every chunk in hand is acked (what is durable) or NAKed before the pull is released.
    for h in settling {
        let _ = h.await;
    }
    // Leadership ended: release the pull so nothing more arrives, and hand back what came.
    let Some(mut held) = intake.release().await else {
        warn!(
            epoch,
            "intake pull not released in time; the successor waits for redelivery"
        );
        return Ok(false);
    };
    held.append(&mut in_hand);
    let n = held.len();
    let clean = handover::nak_confirmed(held).await;
    debug!(epoch, returned = n, clean, "intake released");
    Ok(clean)
}

/// Gives every predeclared queue (`[queues.<name>]`) its state record (partition count) and
/// partition consumers, so assignment and workers see the configured partitions before the
/// first submit. Run by a new leader before it assigns or dispatches.
pub async fn declare_queues(ctx: &LeaderContext, epoch: u64) {
    let mut pipeline = Pipeline::new(ctx.clone(), epoch);
    let mut declared: Vec<&String> = ctx.config.queue_partitions.keys().collect();
    declared.sort();
    for queue in declared {
        if let Err(e) = pipeline.queue(queue).await {
            warn!(%queue, error = %e, "cannot prepare a predeclared queue; will retry at its first submit");
        }
    }
}

/// How long [`provision_in_background`] keeps trying.
const PROVISION_FOR: Duration = Duration::from_secs(120);

/// Creates or updates the partition consumers of `queue`, retrying with backoff for up to
/// [`PROVISION_FOR`] (a JetStream node restarting makes consumer reads time out for seconds).
async fn provision_in_background(ctx: LeaderContext, queue: String, partitions: u32) {
    let began = std::time::Instant::now();
    let mut failures = 0u32;
    loop {
        match topology::provision_queue(
            &ctx.js,
            &ctx.names,
            &queue,
            partitions,
            &ctx.config.queue_consumers,
        )
        .await
        {
            Ok(_) => return,
            Err(e) => {
                failures += 1;
                if began.elapsed() >= PROVISION_FOR {
                    warn!(%queue, error = %e, "cannot provision the partition consumers; workers create them when they pull");
                    return;
                }
                debug!(%queue, error = %e, failures, "provisioning partition consumers; retrying");
                tokio::time::sleep(crate::supervise::retry_delay(failures)).await;
            }
        }
    }
}

/// Per-queue facts the leader keeps.
struct QueueInfo {
    partitions: u32,
}

/// The dispatch pipeline of one leadership term: queue preparation, routing, and sealing tasks
/// into envelopes. The intake ([`lead`]) and the due timers ([`crate::due`]) each own one.
pub(crate) struct Pipeline {
    ctx: LeaderContext,
    epoch: u64,
    router: Router,
    queues: HashMap<String, QueueInfo>,
    records: Option<jetstream::stream::Stream>,
    unique: Option<UniqueStore>,
    /// Partition loads of `least_loaded` queues.
    loads: HashMap<String, Loads>,
}

/// A task whose first attempt waits for its time.
struct Delayed {
    task: Task,
    from: usize,
    due_ms: i64,
}

/// A task whose record the intake creates: `queued` (routed) or `scheduled` (delayed).
trait NewRecord {
    fn task(&self) -> &Task;
    fn from(&self) -> usize;
    fn record(&self) -> TaskRecord;
}

fn submitted_at(task: &Task) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(task.submitted_ms).unwrap_or_else(chrono::Utc::now)
}

impl NewRecord for Routed {
    fn task(&self) -> &Task {
        &self.task
    }
    fn from(&self) -> usize {
        self.from
    }
    fn record(&self) -> TaskRecord {
        TaskRecord::new(&self.task, TaskState::Queued, submitted_at(&self.task))
    }
}

impl NewRecord for Delayed {
    fn task(&self) -> &Task {
        &self.task
    }
    fn from(&self) -> usize {
        self.from
    }
    fn record(&self) -> TaskRecord {
        let mut r = TaskRecord::new(&self.task, TaskState::Scheduled, submitted_at(&self.task));
        r.next_run_at = chrono::DateTime::from_timestamp_millis(self.due_ms);
        r
    }
}

/// A task on its way into an envelope, with the index of the message it came from.
pub(crate) struct Routed {
    /// The task, as it will travel.
    pub task: Task,
    /// Index of the source message in the caller's list.
    pub from: usize,
    /// Its partition.
    pub partition: u32,
}

impl Pipeline {
    /// A pipeline for leadership term `epoch`.
    pub(crate) fn new(ctx: LeaderContext, epoch: u64) -> Self {
        Self {
            ctx,
            epoch,
            router: Router::default(),
            queues: HashMap::new(),
            records: None,
            unique: None,
            loads: HashMap::new(),
        }
    }

    /// The leader context this pipeline dispatches for.
    pub(crate) fn ctx(&self) -> &LeaderContext {
        &self.ctx
    }

    /// Handles one chunk of intake messages up to the publishes of its envelopes (in chunk
    /// order, so per-partition order holds); the returned [`Settle`] waits for their PubAcks and
    /// acks or NAKs every message.
    async fn dispatch(&mut self, chunk: Vec<jetstream::Message>) -> Settle {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let limits = IntakeLimits {
            max_payload: self.ctx.max_payload,
            default_timeout_ms: self.ctx.config.default_timeout_ms,
        };
        let mut held: Vec<Held> = Vec::with_capacity(chunk.len());
        let mut accepted: Vec<(usize, intake::Accepted)> = Vec::new();
        let mut rejected: Vec<(usize, Rejection)> = Vec::new();
        for msg in chunk {
            let i = held.len();
            let seq = msg.info().map_or(0, |info| info.stream_sequence);
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let msg_id = header("Nats-Msg-Id");
            // A retry (`drover.api.retry`) names its task in `Drover-Task-Id` (a generated `_…`
            // id cannot be in the body, and its `Nats-Msg-Id` is not an id base).
            let retry = header(HDR_RETRY).zip(header(HDR_TASK_ID));
            let prepared = intake::prepare(
                &self.ctx.names,
                msg.subject.as_str(),
                &msg.payload,
                if retry.is_some() {
                    None
                } else {
                    msg_id.as_deref()
                },
                seq,
                now_ms,
                limits,
            );
            match (prepared, &retry) {
                (Ok(mut a), Some((_, id))) if a.tasks.len() == 1 => {
                    a.tasks[0].id.clone_from(id);
                    accepted.push((i, a));
                }
                (Ok(a), _) => accepted.push((i, a)),
                (Err(r), _) => rejected.push((i, r)),
            }
            held.push(Held {
                msg,
                ok: true,
                retry: retry.map(|(n, _)| n),
            });
        }

        // Uniqueness windows first: a key held by another task rejects the whole message.
        if accepted
            .iter()
            .any(|(_, a)| a.plans.iter().any(|p| p.unique.is_some()))
        {
            let mut keep = Vec::with_capacity(accepted.len());
            for (i, a) in accepted {
                match self.claim_unique(&held[i].msg, &a).await {
                    Ok(None) => keep.push((i, a)),
                    Ok(Some(error)) => rejected.push((
                        i,
                        Rejection {
                            queue: a.queue.clone(),
                            error,
                        },
                    )),
                    Err(e) => {
                        warn!(error = %e, "cannot claim a unique key; will retry");
                        held[i].ok = false;
                    }
                }
            }
            accepted = keep;
        }
        // Dependencies outside a message must exist (`missing_dependency`, all or nothing).
        let (known, unread) =
            crate::deps::intake::check_missing(&self.ctx, &mut accepted, &mut rejected).await;
        for i in unread {
            held[i].ok = false;
        }
        let scheduling: HashMap<String, intake::Scheduling> = accepted
            .iter()
            .flat_map(|(_, a)| a.scheduling.clone())
            .collect();

        // Rejected submissions: a record with the original bytes and the reason, then ack.
        let mut rejects = Vec::new();
        for (i, r) in &rejected {
            self.ctx
                .metrics
                .rejected
                .get_or_create(&[("code", r.error.code.as_str())])
                .inc();
            match self.publish_rejected(&held[*i].msg, r).await {
                Ok(ack) => rejects.push((*i, ack)),
                Err(e) => {
                    warn!(error = %e, "cannot record a rejected submission; will retry");
                    held[*i].ok = false;
                }
            }
        }

        // Queues seen for the first time get their partitions and consumers.
        let mut routed: Vec<Routed> = Vec::new();
        let mut delayed: Vec<Delayed> = Vec::new();
        let mut per_queue: HashMap<String, usize> = HashMap::new();
        for (_, a) in &accepted {
            *per_queue.entry(a.queue.clone()).or_default() += 1;
        }
        // Per queue: the turn of the current run and how many more submissions may share it
        // (`intake::run_length`).
        let mut runs: HashMap<String, (u32, usize)> = HashMap::new();
        for (i, a) in accepted {
            let partitions = match self.queue(&a.queue).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(queue = %a.queue, error = %e, "cannot prepare queue; will retry");
                    held[i].ok = false;
                    continue;
                }
            };
            let turn = match runs.get_mut(&a.queue) {
                Some((turn, left)) if *left > 0 => {
                    *left -= 1;
                    *turn
                }
                _ => {
                    let turn = self
                        .keyless(&a.queue, partitions, a.tasks.len() as u64)
                        .await;
                    let run = intake::run_length(per_queue[&a.queue], self.strategy(&a.queue));
                    runs.insert(a.queue.clone(), (turn, run - 1));
                    turn
                }
            };
            for (task, plan) in a.tasks.into_iter().zip(a.plans) {
                if let Some(due_ms) = plan.due_ms {
                    delayed.push(Delayed {
                        task,
                        from: i,
                        due_ms,
                    });
                    continue;
                }
                let partition = Router::partition(task.key.as_deref(), partitions, turn);
                routed.push(Routed {
                    task,
                    from: i,
                    partition,
                });
            }
        }

        // Tasks waiting for dependencies are held durably (or fail upstream) instead.
        let seqs: Vec<u64> = held
            .iter()
            .map(|h| h.msg.info().map_or(0, |i| i.stream_sequence))
            .collect();
        let (rest, unheld) =
            crate::deps::intake::admit(&self.ctx, self.epoch, routed, &scheduling, &known, |i| {
                seqs[i]
            })
            .await;
        routed = rest;
        for i in unheld {
            held[i].ok = false;
        }

        // Duplicate check and `queued` records.
        if self.ctx.config.track_queued && !routed.is_empty() {
            routed = self.record_queued(routed, &mut held).await;
        }
        // Delayed tasks: `scheduled` record (always: cancel needs it), then their timers.
        if !delayed.is_empty() {
            self.schedule(delayed, &mut held).await;
        }
        // Sharded tasks fan out over distinct workers.
        routed = crate::deps::shards::expand(self, routed, &scheduling).await;

        // Batch per partition, seal, publish pipelined.
        let (envelopes, failed) = self.publish(routed).await;
        for i in failed {
            held[i].ok = false;
        }
        Settle {
            ctx: self.ctx.clone(),
            held,
            envelopes,
            rejects,
        }
    }

    /// Seals `routed` into envelopes per (queue, partition), publishes them pipelined and waits
    /// for their PubAcks. Returns the `from` indexes some of whose tasks are not durably in
    /// `DROVER_WORK` (their source message must come back).
    pub(crate) async fn send(&mut self, routed: Vec<Routed>) -> HashSet<usize> {
        let (pending, mut failed) = self.publish(routed).await;
        failed.extend(durable(&self.ctx, pending).await);
        failed
    }

    /// Seals `routed` into envelopes per (queue, partition) and publishes them pipelined, in
    /// order. Returns the PubAcks to wait for, with the `from` indexes of each envelope's tasks,
    /// and the `from` indexes whose envelope could not be published.
    async fn publish(&mut self, routed: Vec<Routed>) -> (Vec<Pending>, HashSet<usize>) {
        let mut failed = HashSet::new();
        let mut batcher: Batcher<Routed> = Batcher::new(self.ctx.config.batcher);
        let mut batches = Vec::new();
        for r in routed {
            let route = Route {
                queue: r.task.queue.clone(),
                partition: r.partition,
            };
            let size = r.task.payload.get().len() + 160;
            batches.extend(batcher.push(route, r, size, std::time::Instant::now()));
        }
        batches.extend(batcher.flush_all());
        let mut pending: Vec<Pending> = Vec::new();
        for batch in batches {
            let from: Vec<usize> = batch.items.iter().map(|r| r.from).collect();
            match self.publish_envelope(batch).await {
                Ok(ack) => pending.push((from, ack)),
                Err(e) => {
                    warn!(error = %e, "cannot publish an envelope; its tasks will be retried");
                    failed.extend(from);
                }
            }
        }
        (pending, failed)
    }

    /// The partition of `task` (key → FNV, keyless by the queue's strategy, one turn per call),
    /// preparing its queue on first sight.
    pub(crate) async fn route(&mut self, task: &Task) -> Result<u32, LeaderError> {
        let partitions = self.queue(&task.queue).await?;
        let turn = self.keyless(&task.queue, partitions, 1).await;
        Ok(Router::partition(task.key.as_deref(), partitions, turn))
    }

    /// The keyless strategy of `queue`.
    fn strategy(&self, queue: &str) -> Strategy {
        self.ctx
            .config
            .queue_strategies
            .get(queue)
            .copied()
            .unwrap_or(self.ctx.config.strategy)
    }

    /// The partition of the keyless tasks (`tasks` of them) of the next submission message of
    /// `queue`, by the queue's strategy.
    async fn keyless(&mut self, queue: &str, partitions: u32, tasks: u64) -> u32 {
        let strategy = self.strategy(queue);
        let turn = self
            .router
            .keyless(queue, partitions, strategy, rand::random());
        if strategy != Strategy::LeastLoaded {
            return turn;
        }
        let now = std::time::Instant::now();
        let stale = self.loads.get(queue).is_none_or(|l| l.needs_refresh(now));
        if stale {
            let pending = self.read_loads(queue, partitions).await;
            self.loads
                .entry(queue.to_owned())
                .or_insert_with(|| Loads::new(partitions))
                .observe(&pending, now);
        }
        self.loads
            .entry(queue.to_owned())
            .or_insert_with(|| Loads::new(partitions))
            .pick(turn, tasks)
    }

    /// Pending messages (undelivered + unacked) of each partition consumer of `queue`, read
    /// concurrently; `None` where the read failed.
    async fn read_loads(&self, queue: &str, partitions: u32) -> Vec<Option<u64>> {
        let Ok(stream) = self.ctx.js.get_stream(self.ctx.names.work_stream()).await else {
            return vec![None; partitions as usize];
        };
        let names = &self.ctx.names;
        futures::future::join_all((0..partitions).map(|p| {
            let stream = stream.clone();
            let name = names.work_consumer(queue, p);
            async move {
                let info = stream.consumer_info(name).await.ok()?;
                Some(info.num_pending + info.num_ack_pending as u64)
            }
        }))
        .await
    }

    /// Partitions of `queue`, creating its state record and consumers on first sight.
    async fn queue(&mut self, queue: &str) -> Result<u32, LeaderError> {
        if let Some(q) = self.queues.get(queue) {
            return Ok(q.partitions);
        }
        let state = self
            .ctx
            .js
            .get_key_value(self.ctx.names.bucket("state"))
            .await
            .map_err(|e| nats_err("open state bucket")(&e))?;
        let key = format!("queue.{queue}");
        let known = state
            .get(&key)
            .await
            .map_err(|e| nats_err("read queue state")(&e))?;
        let partitions = match known {
            Some(v) => serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|v| v.get("partitions")?.as_u64())
                .map_or(self.ctx.config.default_partitions, |p| p as u32),
            None => {
                let p = self
                    .ctx
                    .config
                    .queue_partitions
                    .get(queue)
                    .copied()
                    .unwrap_or(self.ctx.config.default_partitions);
                let value = serde_json::json!({ "partitions": p, "created_epoch": self.epoch });
                // A concurrent creator (an older leader) wins; read what it wrote next time.
                let _ = state.create(&key, value.to_string().into()).await;
                p
            }
        };
        // Dispatch needs only the partition count: envelopes land in DROVER_WORK whether or not
        // the partition consumers exist (workers create missing ones too). So the consumers are
        // provisioned beside the dispatch: while a node restarts, reading a consumer can time
        // out for seconds, and the intake must not wait for that.
        tokio::spawn(provision_in_background(
            self.ctx.clone(),
            queue.to_owned(),
            partitions,
        ));
        self.queues
            .insert(queue.to_owned(), QueueInfo { partitions });
        Ok(partitions)
    }

    /// Creates a `queued` record per task (pipelined `create`s). A task whose record already
    /// exists is a duplicate and is dropped — unless the record came from this very intake
    /// message (a redelivery after a crash between record and envelope), which goes on.
    async fn record_queued(&mut self, routed: Vec<Routed>, held: &mut [Held]) -> Vec<Routed> {
        self.record_new(routed, held).await
    }

    /// Creates a record per task (see [`Pipeline::record_queued`]); returns the tasks that go on.
    async fn record_new<T: NewRecord>(&mut self, items: Vec<T>, held: &mut [Held]) -> Vec<T> {
        let mut keep = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        // In windows, so the acks awaited at once stay bounded whatever the chunk holds.
        while items.peek().is_some() {
            let window: Vec<T> = items.by_ref().take(RECORD_WINDOW).collect();
            self.record_window(window, held, &mut keep).await;
        }
        keep
    }

    async fn record_window<T: NewRecord>(
        &mut self,
        window: Vec<T>,
        held: &mut [Held],
        keep: &mut Vec<T>,
    ) {
        let bucket = self.ctx.names.bucket("tasks");
        let mut acks = Vec::with_capacity(window.len());
        for r in &window {
            let seq = held[r.from()]
                .msg
                .info()
                .map(|i| i.stream_sequence)
                .unwrap_or(0);
            let record = r.record();
            let body = serde_json::to_vec(&record).unwrap_or_default();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            headers.insert(HDR_INTAKE_SEQ, seq.to_string());
            let ack = self
                .ctx
                .js
                .publish_with_headers(
                    format!("$KV.{bucket}.{}", r.task().id),
                    headers,
                    body.into(),
                )
                .await;
            acks.push((ack, seq));
        }
        for (r, (ack, seq)) in window.into_iter().zip(acks) {
            let result = match ack {
                Ok(fut) => fut.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => keep.push(r),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence =>
                {
                    let retry = held[r.from()].retry.clone();
                    if self
                        .is_own_record(&r.task().id, seq, retry.as_deref())
                        .await
                    {
                        keep.push(r);
                    } else {
                        self.ctx.metrics.duplicates.inc();
                        debug!(task_id = %r.task().id, "duplicate id; not run again");
                    }
                }
                Err(e) => {
                    warn!(task_id = %r.task().id, error = %e, "cannot write task record; will retry");
                    held[r.from()].ok = false;
                }
            }
        }
    }

    /// `true` if the record of `id` is still `queued` (or `scheduled`) and was written for intake
    /// sequence `seq`
    /// — or, for a retry (`retry` = its `Drover-Retry`), reset by `drover.api.retry` with that
    /// same retry number.
    async fn is_own_record(&mut self, id: &str, seq: u64, retry: Option<&str>) -> bool {
        let bucket = self.ctx.names.bucket("tasks");
        if self.records.is_none() {
            self.records = self.ctx.js.get_stream(format!("KV_{bucket}")).await.ok();
        }
        let Some(stream) = &self.records else {
            return false;
        };
        match stream
            .direct_get_last_for_subject(format!("$KV.{bucket}.{id}"))
            .await
        {
            Ok(m) => {
                let own = match retry {
                    Some(n) => m.headers.get(HDR_RETRY).is_some_and(|v| v.as_str() == n),
                    None => m
                        .headers
                        .get(HDR_INTAKE_SEQ)
                        .is_some_and(|v| v.as_str() == seq.to_string()),
                };
                let queued = serde_json::from_slice::<TaskRecord>(&m.payload)
                    .is_ok_and(|r| matches!(r.state, TaskState::Queued | TaskState::Scheduled));
                own && queued
            }
            Err(_) => false,
        }
    }

    /// Writes the `scheduled` records of `delayed` (the duplicate check, as for `queued`), then
    /// publishes their timers and waits for the PubAcks; a source message with a failed step
    /// comes back.
    async fn schedule(&mut self, delayed: Vec<Delayed>, held: &mut [Held]) {
        let delayed = self.record_new(delayed, held).await;
        let mut acks = Vec::with_capacity(delayed.len());
        for d in &delayed {
            let seq = held[d.from]
                .msg
                .info()
                .map(|i| i.stream_sequence)
                .unwrap_or(0);
            let timer = delays::TimerId::Delay { intake_seq: seq };
            acks.push(
                delays::timer::publish(&self.ctx, self.epoch, &d.task, timer, d.due_ms).await,
            );
        }
        for (d, ack) in delayed.iter().zip(acks) {
            let result = match ack {
                Ok(fut) => fut.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    self.ctx.metrics.delayed_scheduled.inc();
                    self.ctx.events.emit(&d.record());
                }
                Err(e) => {
                    warn!(task_id = %d.task.id, error = %e, "timer not stored; will retry");
                    held[d.from].ok = false;
                }
            }
        }
    }

    /// Claims the uniqueness windows of `a`'s tasks. `Ok(Some(error))`: a key is held by another
    /// task, so the message is rejected (the keys it did claim are given back).
    async fn claim_unique(
        &mut self,
        msg: &jetstream::Message,
        a: &intake::Accepted,
    ) -> Result<Option<drover_shared::error::ApiError>, String> {
        if self.unique.is_none() {
            self.unique = Some(UniqueStore::open(&self.ctx.js, &self.ctx.names).await?);
        }
        let Some(store) = self.unique.clone() else {
            return Err("no unique bucket".into());
        };
        let token = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HDR_UNIQUE_CLAIM))
            .map(|v| v.as_str().to_owned());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut mine = Vec::new();
        for (index, (task, plan)) in a.tasks.iter().zip(&a.plans).enumerate() {
            let Some(window) = &plan.unique else { continue };
            let key = delays::unique_kv_key(&a.queue, &window.key);
            let claim = Claim::new(&a.queue, window, Some(&task.id), token.as_deref(), now_ms);
            let result = store
                .claim(
                    &key,
                    &claim,
                    delays::ttl_secs(window.window_ms),
                    Some(&task.id),
                    token.as_deref(),
                )
                .await;
            match result {
                Ok(ClaimResult::Claimed | ClaimResult::Own) => mine.push(key),
                Ok(ClaimResult::Taken(holder)) => {
                    for key in &mine {
                        let _ = store.release(key).await;
                    }
                    debug!(task_id = %task.id, "unique key taken; submission rejected");
                    return Ok(Some(
                        holder.duplicate_error((a.tasks.len() > 1).then_some(index)),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    async fn publish_envelope(&self, batch: Batch<Routed>) -> Result<PublishAckFuture, String> {
        let tasks: Vec<&Task> = batch.items.iter().map(|r| &r.task).collect();
        let meta = BatchMeta::new(&batch.route.queue, batch.route.partition, self.epoch);
        let sealed = envelope::seal(&self.ctx.keys, &self.ctx.config.codec, meta, &tasks)
            .map_err(|e| e.to_string())?;
        let m = &self.ctx.metrics;
        m.batch_tasks.observe(tasks.len() as f64);
        m.batch_plaintext
            .observe(sealed.stats.plaintext_bytes as f64);
        m.batch_sealed.observe(sealed.stats.body_bytes as f64);
        let (headers, body) = sealed.into_parts();
        let mut map = HeaderMap::new();
        for (k, v) in headers.to_pairs() {
            map.insert(k, v);
        }
        let subject = self
            .ctx
            .names
            .work_subject(&batch.route.queue, batch.route.partition);
        self.ctx
            .js
            .publish_with_headers(subject, map, body.into())
            .await
            .map_err(|e| e.to_string())
    }

    async fn publish_rejected(
        &self,
        msg: &jetstream::Message,
        r: &Rejection,
    ) -> Result<PublishAckFuture, String> {
        let mut headers = HeaderMap::new();
        headers.insert("Drover-Error-Code", r.error.code.as_str());
        headers.insert(
            "Drover-Error",
            String::from_utf8_lossy(&r.error.to_json()).replace(['\r', '\n'], " "),
        );
        headers.insert("Drover-Subject", msg.subject.as_str());
        if let Ok(info) = msg.info() {
            headers.insert("Drover-Intake-Seq", info.stream_sequence.to_string());
        }
        self.ctx
            .js
            .publish_with_headers(
                self.ctx.names.rejected_subject(&r.queue),
                headers,
                msg.payload.clone(),
            )
            .await
            .map_err(|e| e.to_string())
    }
}
