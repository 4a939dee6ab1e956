//! The worker process (SPEC §6): [`Worker::builder`] → [`Worker::run`]. The async shell around
//! the pure parts: it registers and heartbeats in `drover-workers` (driving the fence), watches
//! `assignment.<queue>` (driving the partition set), pulls the owned partitions, listens for
//! cancel requests, and drains on shutdown.
//!
//! Shutdown (the `shutdown` token of [`Worker::run`]): stop pulling and starting; attempts that
//! run may finish within `worker.drain_timeout_ms`, then they are cancelled; batches with
//! unfinished tasks are NAKed after the outcomes of their finished ones; the heartbeat key is
//! deleted, so the leader reassigns at once instead of after the TTL.

use crate::batch::{self, Origin};
use crate::checkpoint::Checkpoints;
use crate::handler::{self, HandlerError, HandlerKind, HandlerOutput, Registry, TaskContext};
use crate::metrics::WorkerMetrics;
use crate::partitions::{Action, AssignmentView, PartitionSet};
use crate::state::{Gate, RunConfig, Shared};
use async_nats::jetstream::{self, kv};
use drover_shared::config::ConnectArgs;
use drover_shared::keyring::Keyring;
use drover_shared::ops::{self, Health, Metrics};
use drover_shared::settings::{Settings, SettingsError, Tracking};
use drover_shared::topology::{self, QueueConsumerConfig};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad or incomplete settings (no keys, bad queue name, …).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A queue name or the prefix is invalid.
    #[error("invalid name: {0}")]
    Name(#[from] drover_shared::names::NameError),
    /// The ops HTTP endpoint could not start.
    #[error(transparent)]
    Ops(#[from] ops::OpsError),
    /// NATS is unreachable.
    #[error(transparent)]
    Connect(#[from] drover_shared::connect::ConnectError),
    /// Provisioning failed.
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    /// An `[worker.http.<type>]` table cannot be used.
    #[error(transparent)]
    Http(#[from] crate::http::HttpSetupError),
    /// A NATS request the worker cannot start without failed.
    #[error("{what}: {message}")]
    Nats {
        /// What was attempted.
        what: &'static str,
        /// The client's error.
        message: String,
    },
}

fn nats_err(what: &'static str) -> impl FnOnce(String) -> WorkerError {
    move |message| WorkerError::Nats { what, message }
}

/// Builds a [`Worker`]: settings, plus Rust handlers.
pub struct WorkerBuilder {
    settings: Settings,
    registry: Result<Registry, crate::http::HttpSetupError>,
}

impl WorkerBuilder {
    /// Registers a Rust handler for `task_type` (it replaces a built-in of the same name). The
    /// payload is deserialized into `P` (`serde_json::Value`, `Box<RawValue>` or your own
    /// type; a payload that does not fit fails the attempt with kind `invalid`).
    ///
    /// ```no_run
    /// # use drover_worker::{Worker, HandlerError};
    /// # fn demo(settings: drover_shared::settings::Settings) {
    /// let worker = Worker::builder(settings)
    ///     .handler("add", |_ctx, p: (i64, i64)| async move {
    ///         Ok::<_, HandlerError>(serde_json::json!(p.0 + p.1))
    ///     })
    ///     .build();
    /// # }
    /// ```
    pub fn handler<F, P, Fut, O>(mut self, task_type: impl Into<String>, f: F) -> Self
    where
        F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
        P: DeserializeOwned + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
        O: HandlerOutput + 'static,
    {
        if let Ok(r) = &mut self.registry {
            r.insert(task_type, HandlerKind::Rust(handler::from_fn(f)));
        }
        self
    }

    /// Registers any [`HandlerKind`] for `task_type`.
    pub fn handler_kind(mut self, task_type: impl Into<String>, kind: HandlerKind) -> Self {
        if let Ok(r) = &mut self.registry {
            r.insert(task_type, kind);
        }
        self
    }

    /// Checks the settings (keys present, queue names valid) and returns the worker.
    pub fn build(self) -> Result<Worker, WorkerError> {
        let settings = self.settings.resolved();
        let keys = settings.keyring()?;
        for q in &settings.worker.queues {
            drover_shared::names::validate_queue(q)?;
        }
        settings.names()?;
        Ok(Worker {
            id: settings.id.clone().unwrap_or_default(),
            settings,
            registry: self.registry?,
            keys: Arc::new(keys),
        })
    }
}

/// A worker, ready to [`run`](Worker::run).
pub struct Worker {
    id: String,
    settings: Settings,
    registry: Registry,
    keys: Arc<Keyring>,
}

/// The value of `drover-workers.<id>` (SPEC §6).
#[derive(Debug, Serialize)]
struct WorkerRecord<'a> {
    id: &'a str,
    queues: &'a [String],
    capacity: u32,
    running: usize,
    load: Load,
    version: &'a str,
    started_at: &'a str,
    host: &'a str,
    pid: u32,
    addr: &'a str,
}

/// `load` of a worker record: `cpu` is the 1-minute load average per core, `mem` the resident
/// set size in bytes (Linux `/proc`; 0 where unavailable).
#[derive(Debug, Serialize)]
struct Load {
    cpu: f64,
    mem: u64,
}

fn load() -> Load {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let cpu = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |l| l / cores);
    let mem = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    Load { cpu, mem }
}

impl Worker {
    /// A builder with `settings` (layered config; `resolved()` is applied in `build`) and the
    /// built-in handlers when `worker.builtins` is on.
    pub fn builder(settings: Settings) -> WorkerBuilder {
        WorkerBuilder {
            registry: Registry::from_settings(&settings.worker),
            settings,
        }
    }

    /// This worker's id (its key in `drover-workers`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The effective settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Runs until `shutdown` fires, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let settings = &self.settings;
        let names = settings.names()?;
        let mut registry = Metrics::new("worker", env!("CARGO_PKG_VERSION"));
        let metrics = Arc::new(WorkerMetrics::register(&mut registry));
        let health = Health::new();
        let ops_stop = CancellationToken::new();
        let addr = ops::serve(
            &settings.metrics.addr,
            Arc::new(registry),
            health.clone(),
            ops_stop.clone().cancelled_owned(),
        )
        .await?;
        info!(%addr, id = %self.id, "serving /metrics, /healthz, /readyz");
        health.set_live(true);

        let nats = &settings.nats;
        let connect = ConnectArgs {
            nats_url: nats.url_string(),
            creds: nats.creds.clone(),
            user: nats.user.clone(),
            password: nats.password.as_ref().map(|p| p.expose().to_owned()),
            tls_ca: nats.tls_ca.clone(),
            tls_cert: nats.tls_cert.clone(),
            tls_key: nats.tls_key.clone(),
            prefix: nats.prefix.clone(),
        };
        let client = drover_shared::connect::connect(
            &connect,
            &format!("drover-worker {}", self.id),
            Duration::from_secs(10),
        )
        .await?;
        let report = topology::provision(&client, &names, &settings.topology).await?;
        info!(%report, "provisioned");
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(4096)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let bucket = |name: &'static str| {
            let js = js.clone();
            let full = names.bucket(name);
            async move {
                js.get_key_value(full)
                    .await
                    .map_err(|e| e.to_string())
                    .map_err(nats_err("opening a KV bucket"))
            }
        };
        let workers_kv = bucket("workers").await?;
        let state_kv = bucket("state").await?;
        let tasks_kv = bucket("tasks").await?;
        let checkpoints_kv = bucket("checkpoints").await?;
        let outcomes = js
            .get_stream(names.outcomes_stream())
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_err("opening the outcomes stream"))?;

        let w = &settings.worker;
        let ttl = settings.topology.worker_ttl();
        let cfg = RunConfig {
            heartbeat: Duration::from_millis(w.heartbeat_ms),
            ttl,
            fence_margin: Duration::from_millis(w.fence_margin_ms),
            drain_timeout: Duration::from_millis(w.drain_timeout_ms),
            max_redeliveries: w.max_redeliveries,
            track_running: settings.dispatcher.tracking == Tracking::Full,
            consumers: w
                .queues
                .iter()
                .map(|q| {
                    (
                        q.clone(),
                        QueueConsumerConfig {
                            max_in_flight: i64::from(settings.queue(q).max_in_flight),
                            ack_wait: ttl,
                        },
                    )
                })
                .collect(),
        };
        let concurrency = w.effective_concurrency().max(1);
        let shared = Arc::new(Shared {
            id: self.id.clone(),
            names: names.clone(),
            client: client.clone(),
            js: js.clone(),
            tasks_kv,
            outcomes,
            keys: self.keys.clone(),
            codec: settings.codec,
            registry: self.registry,
            checkpoints: Checkpoints::new(Some(checkpoints_kv), self.keys.clone(), settings.codec),
            metrics: metrics.clone(),
            slots: Arc::new(Semaphore::new(concurrency)),
            gate: Gate::new(ttl, cfg.fence_margin, metrics.clone()),
            cfg,
            draining: shutdown.clone(),
            kill: CancellationToken::new(),
            cancels: Default::default(),
            inflight: Default::default(),
            next_batch: AtomicU64::new(0),
            in_hand: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        });

        // Cancel requests first, so none is missed for a batch received later.
        let mut cancels = client
            .subscribe(names.cancel_subject("*"))
            .await
            .map_err(|e| e.to_string())
            .map_err(nats_err("subscribing to cancel requests"))?;
        client.flush().await.ok();
        let background = CancellationToken::new();
        let cancel_task = tokio::spawn({
            let (shared, stop) = (shared.clone(), background.clone());
            async move {
                loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        m = cancels.next() => {
                            let Some(m) = m else { break };
                            let id = m.subject.as_str().rsplit('.').next().unwrap_or_default();
                            if shared.cancel(id) {
                                info!(task_id = id, "cancel requested");
                            }
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("cancels"))
        });

        let record = HeartbeatRecord {
            queues: w.queues.clone(),
            capacity: w.capacity,
            started_at: drover_shared::task::format_time(&chrono::Utc::now()),
            host: drover_shared::config::hostname(),
            addr: addr.to_string(),
        };
        let heartbeat = tokio::spawn(
            heartbeat_loop(
                shared.clone(),
                workers_kv.clone(),
                record,
                background.clone(),
            )
            .instrument(tracing::info_span!("heartbeat")),
        );
        let watchdog = tokio::spawn(fence_watchdog(shared.clone(), background.clone()));
        health.set_ready(true, "registered");

        let loops = assignment_loop(shared.clone(), state_kv, w.queues.clone()).await;

        // Drain: partition loops stop pulling; running attempts get drain_timeout to finish.
        info!("shutting down: draining");
        health.set_ready(false, "draining");
        let all = futures::future::join_all(loops);
        tokio::pin!(all);
        if tokio::time::timeout(shared.cfg.drain_timeout, &mut all)
            .await
            .is_err()
        {
            warn!(
                running = shared.running.load(Ordering::Relaxed),
                "drain timeout passed: cancelling the attempts still running"
            );
            shared.kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut all).await;
        }
        background.cancel();
        let _ = heartbeat.await;
        let _ = watchdog.await;
        let _ = cancel_task.await;
        match workers_kv.delete(&shared.id).await {
            Ok(()) => info!("deregistered"),
            Err(e) => {
                warn!(error = %e, "could not delete the heartbeat key; it expires on its own")
            }
        }
        health.set_live(false);
        client.flush().await.ok();
        ops_stop.cancel();
        Ok(())
    }
}

/// The parts of the heartbeat record that do not change.
struct HeartbeatRecord {
    queues: Vec<String>,
    capacity: u32,
    started_at: String,
    host: String,
    addr: String,
}

/// Puts the worker record every heartbeat, feeds the fence, and sends `+WPI` for every batch
/// in flight while not fenced.
async fn heartbeat_loop(
    shared: Arc<Shared>,
    kv: kv::Store,
    record: HeartbeatRecord,
    stop: CancellationToken,
) {
    let period = shared.cfg.heartbeat;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let value = serde_json::to_vec(&WorkerRecord {
            id: &shared.id,
            queues: &record.queues,
            capacity: record.capacity,
            running: shared.running.load(Ordering::Relaxed),
            load: load(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: &record.started_at,
            host: &record.host,
            pid: std::process::id(),
            addr: &record.addr,
        })
        .unwrap_or_default();
        if let Some(http) = shared.registry.http() {
            for (target, state) in http.circuit_states() {
                shared
                    .metrics
                    .circuit_state
                    .get_or_create(&[("target", target)])
                    .set(state.gauge_value());
            }
        }
        let sent_at = Instant::now();
        match tokio::time::timeout(period, kv.put(&shared.id, value.into())).await {
            Ok(Ok(_)) => shared.gate.heartbeat_ok(sent_at),
            Ok(Err(e)) => {
                shared.metrics.heartbeat_failures.inc();
                debug!(error = %e, "heartbeat failed");
                shared.gate.heartbeat_failed();
            }
            Err(_) => {
                shared.metrics.heartbeat_failures.inc();
                debug!("heartbeat timed out");
                shared.gate.heartbeat_failed();
            }
        }
        if shared.gate.may_act() {
            for reply in shared.inflight_replies() {
                let _ = shared.client.publish(reply, "+WPI".into()).await;
            }
        }
    }
}

/// Fences the worker the moment its last heartbeat's validity runs out, even when nothing
/// else checks (running attempts are cancelled then, not at their next ack).
async fn fence_watchdog(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let wait = async {
            match shared.gate.deadline() {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => shared.gate.unfenced().await,
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = wait => {}
        }
        shared.gate.may_act();
        // The deadline moves with every heartbeat; re-read it after a short pause at most.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Watches `assignment.*` in `drover-state` and runs one pull loop per owned partition until
/// the worker drains; returns the handles of every loop started, to await their batches.
async fn assignment_loop(
    shared: Arc<Shared>,
    state_kv: kv::Store,
    queues: Vec<String>,
) -> Vec<JoinHandle<()>> {
    let mut set = PartitionSet::new(shared.id.clone(), queues);
    let mut running: HashMap<(String, u32), CancellationToken> = HashMap::new();
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    let draining = shared.draining.clone();
    'outer: while !draining.is_cancelled() {
        let mut watch = match state_kv.watch_with_history("assignment.*").await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot watch assignments; retrying");
                tokio::select! {
                    () = draining.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                biased;
                () = draining.cancelled() => break 'outer,
                e = watch.next() => e,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    debug!(error = %e, "assignment watch error");
                    continue;
                }
                None => break,
            };
            let Some(queue) = entry.key.strip_prefix("assignment.") else {
                continue;
            };
            let actions = if entry.operation == kv::Operation::Put {
                match AssignmentView::parse(&entry.value) {
                    Ok(view) => set.on_assignment(queue, &view),
                    Err(e) => {
                        warn!(queue, error = %e, "ignoring an unreadable assignment");
                        continue;
                    }
                }
            } else {
                set.on_removed(queue)
            };
            apply(&shared, actions, &mut running, &mut handles);
            shared.metrics.partitions_owned.set(set.len() as i64);
        }
    }
    let actions = set.stop_all();
    apply(&shared, actions, &mut running, &mut handles);
    shared.metrics.partitions_owned.set(0);
    handles
}

fn apply(
    shared: &Arc<Shared>,
    actions: Vec<Action>,
    running: &mut HashMap<(String, u32), CancellationToken>,
    handles: &mut Vec<JoinHandle<()>>,
) {
    handles.retain(|h| !h.is_finished());
    for action in actions {
        match action {
            Action::Start { queue, partition } => {
                info!(queue, partition, "partition assigned: pulling");
                let stop = CancellationToken::new();
                running.insert((queue.clone(), partition), stop.clone());
                let span = tracing::info_span!("partition", queue = %queue, partition);
                handles.push(tokio::spawn(
                    partition_loop(shared.clone(), queue, partition, stop).instrument(span),
                ));
            }
            Action::Stop { queue, partition } => {
                info!(
                    queue,
                    partition, "partition moved away: finishing the batch in flight"
                );
                if let Some(stop) = running.remove(&(queue, partition)) {
                    stop.cancel();
                }
            }
        }
    }
}

/// Pulls one partition, one batch at a time, until stopped or draining.
async fn partition_loop(
    shared: Arc<Shared>,
    queue: String,
    partition: u32,
    stop: CancellationToken,
) {
    let origin = Origin {
        queue: queue.clone(),
        partition,
    };
    let consumer = loop {
        match ensure_consumer(&shared, &queue, partition).await {
            Ok(c) => break c,
            Err(e) => {
                warn!(error = %e, "cannot open the partition consumer; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = shared.draining.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let expiry = shared.cfg.fetch_expiry();
    // Pull failures in a row: the first and every 50th are logged (a node restarting, a
    // consumer leader moving), so a partition that cannot be pulled is visible.
    let mut failures = 0u32;
    loop {
        if stop.is_cancelled() || shared.draining.is_cancelled() {
            return;
        }
        if !shared.gate.may_act() {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = shared.draining.cancelled() => return,
                () = shared.gate.unfenced() => continue,
            }
        }
        let mut batch = match consumer
            .fetch()
            .max_messages(1)
            .expires(expiry)
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                if failures % 50 == 1 {
                    warn!(error = %e, failures, "cannot pull the partition; retrying");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut refused = false;
        while let Some(m) = batch.next().await {
            let msg = match m {
                Ok(msg) => msg,
                Err(e) => {
                    failures += 1;
                    refused = true;
                    if failures % 50 == 1 {
                        warn!(error = %e, failures, "partition pull refused; retrying");
                    }
                    continue;
                }
            };
            // Arrived for a pull made before the partition moved away or shutdown began:
            // hand it back at once, for the new owner (or the next life of this worker).
            if shared.draining.is_cancelled() || stop.is_cancelled() {
                if shared.gate.may_act() {
                    let _ = msg
                        .ack_with(async_nats::jetstream::AckKind::Nak(None))
                        .await;
                }
                continue;
            }
            batch::process(&shared, msg, &origin).await;
        }
        if refused {
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else {
            failures = 0;
        }
    }
}

async fn ensure_consumer(
    shared: &Shared,
    queue: &str,
    partition: u32,
) -> Result<jetstream::consumer::PullConsumer, String> {
    let stream = shared
        .js
        .get_stream(shared.names.work_stream())
        .await
        .map_err(|e| e.to_string())?;
    let qcfg = shared
        .cfg
        .consumers
        .get(queue)
        .cloned()
        .unwrap_or(QueueConsumerConfig {
            max_in_flight: 1,
            ack_wait: shared.cfg.ttl,
        });
    let config = topology::work_consumer(&shared.names, queue, partition, &qcfg);
    stream
        .get_or_create_consumer(&shared.names.work_consumer(queue, partition), config)
        .await
        .map_err(|e| e.to_string())
}

/// Logs a spawned task's failure; for embedders that spawn [`Worker::run`].
pub fn log_exit(result: Result<(), WorkerError>) {
    if let Err(e) = result {
        error!(error = %e, "worker stopped with an error");
    }
}
