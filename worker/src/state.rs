//! What every part of a running worker shares: its NATS handles, settings, handler registry,
//! metrics, the fence [`Gate`], the cancel map and the batches in flight.

use crate::checkpoint::Checkpoints;
use crate::fence::{Fence, FenceAction};
use crate::handler::Registry;
use crate::metrics::WorkerMetrics;
use async_nats::jetstream::{self, kv, stream};
use drover_shared::envelope::CodecConfig;
use drover_shared::keyring::Keyring;
use drover_shared::names::Names;
use drover_shared::topology::QueueConsumerConfig;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Timing and limits of a running worker, from the settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Worker TTL (max_age of `drover-workers`, ack_wait of partition consumers).
    pub ttl: Duration,
    /// Fence margin.
    pub fence_margin: Duration,
    /// How long running attempts may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Deliveries of one batch after which it is poison.
    pub max_redeliveries: u32,
    /// Write `running` records (off when `dispatcher.tracking = "terminal"`).
    pub track_running: bool,
    /// Per-queue partition consumer settings, for provisioning a missing consumer.
    pub consumers: HashMap<String, QueueConsumerConfig>,
}

impl RunConfig {
    /// How long one pull request waits for a batch: well within one heartbeat.
    pub fn fetch_expiry(&self) -> Duration {
        (self.heartbeat / 2).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// How long an envelope with an unknown key id waits before it is delivered again.
    pub fn unknown_kid_delay(&self) -> Duration {
        self.heartbeat
    }
}

/// The fence as the rest of the worker sees it: a [`Fence`] behind a lock, plus a token per
/// unfenced period that is cancelled the moment the worker fences (which cancels every
/// attempt started in that period and tells their batches not to ack).
#[derive(Debug)]
pub struct Gate {
    fence: Mutex<Fence>,
    period: Mutex<CancellationToken>,
    fenced_tx: watch::Sender<bool>,
    metrics: Arc<WorkerMetrics>,
}

impl Gate {
    /// A gate, fenced until the first successful heartbeat.
    pub fn new(ttl: Duration, margin: Duration, metrics: Arc<WorkerMetrics>) -> Self {
        let period = CancellationToken::new();
        period.cancel();
        metrics.fenced.set(1);
        Self {
            fence: Mutex::new(Fence::new(ttl, margin)),
            period: Mutex::new(period),
            fenced_tx: watch::channel(true).0,
            metrics,
        }
    }

    fn apply(&self, action: Option<FenceAction>) {
        match action {
            Some(FenceAction::Fence) => {
                warn!(
                    "no successful heartbeat within TTL - margin: fenced (starting and acking nothing)"
                );
                self.period
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .cancel();
                self.metrics.fenced.set(1);
                self.metrics.fence_events.inc();
                self.fenced_tx.send_replace(true);
            }
            Some(FenceAction::Unfence) => {
                *self.period.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
                self.metrics.fenced.set(0);
                self.fenced_tx.send_replace(false);
                info!("heartbeat registered: not fenced");
            }
            None => {}
        }
    }

    /// The token of the current unfenced period, if the worker may act now (fencing first if
    /// time ran out). Attempts and batches started now hold it.
    pub fn period(&self) -> Option<CancellationToken> {
        if !self.may_act() {
            return None;
        }
        Some(
            self.period
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// `true` if the worker may start, publish or ack right now; fences if time ran out.
    pub fn may_act(&self) -> bool {
        let now = Instant::now();
        let (ok, action) = {
            let mut f = self.fence.lock().unwrap_or_else(|e| e.into_inner());
            let action = f.check(now);
            (f.may_act(now), action)
        };
        self.apply(action);
        ok
    }

    /// A heartbeat sent at `sent_at` succeeded.
    pub fn heartbeat_ok(&self, sent_at: Instant) {
        let action = self
            .fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_heartbeat_ok(sent_at, Instant::now());
        self.apply(action);
    }

    /// A heartbeat failed.
    pub fn heartbeat_failed(&self) {
        let action = self
            .fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_heartbeat_failed(Instant::now());
        self.apply(action);
    }

    /// When the fence falls without another successful heartbeat.
    pub fn deadline(&self) -> Option<Instant> {
        self.fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deadline()
    }

    /// Waits until the worker is not fenced.
    pub async fn unfenced(&self) {
        let mut rx = self.fenced_tx.subscribe();
        let _ = rx.wait_for(|fenced| !fenced).await;
    }
}

/// Everything the worker's tasks share.
pub struct Shared {
    /// This worker's id.
    pub id: String,
    /// Names under the prefix.
    pub names: Names,
    /// The NATS connection.
    pub client: async_nats::Client,
    /// JetStream, with publish backpressure.
    pub js: jetstream::Context,
    /// `drover-tasks`.
    pub tasks_kv: kv::Store,
    /// `DROVER_OUTCOMES` (direct gets of a redelivered batch's outcomes).
    pub outcomes: stream::Stream,
    /// Envelope keys.
    pub keys: Arc<Keyring>,
    /// Codec settings.
    pub codec: CodecConfig,
    /// Task type → handler.
    pub registry: Registry,
    /// Checkpoint store.
    pub checkpoints: Checkpoints,
    /// Metrics.
    pub metrics: Arc<WorkerMetrics>,
    /// Worker-wide limit of attempts running at once.
    pub slots: Arc<Semaphore>,
    /// The fence.
    pub gate: Gate,
    /// Timing and limits.
    pub cfg: RunConfig,
    /// Fired on the first shutdown signal: pull nothing more, start nothing more.
    pub draining: CancellationToken,
    /// Fired when the drain timeout passes: cancel what still runs.
    pub kill: CancellationToken,
    /// Task id → cancel request token of its pending or running attempt.
    pub cancels: Mutex<HashMap<String, CancellationToken>>,
    /// Batch number → ack reply subject of every batch in flight (for `+WPI`).
    pub inflight: Mutex<HashMap<u64, async_nats::Subject>>,
    /// Source of batch numbers.
    pub next_batch: AtomicU64,
    /// Attempts running now.
    pub running: AtomicUsize,
    /// Tasks received to run and not finished yet (waiting for a slot or running): the load
    /// that decides whether `running` records are written at once or coalesced away.
    pub in_hand: AtomicUsize,
}

impl Shared {
    /// Records `reply` as in flight; returns its number for [`Shared::done_inflight`].
    pub fn add_inflight(&self, reply: async_nats::Subject) -> u64 {
        let n = self.next_batch.fetch_add(1, Ordering::Relaxed);
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(n, reply);
        n
    }

    /// The batch `n` is no longer in flight.
    pub fn done_inflight(&self, n: u64) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&n);
    }

    /// Reply subjects of every batch in flight.
    pub fn inflight_replies(&self) -> Vec<async_nats::Subject> {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Registers a cancel token for task `id`.
    pub fn register_cancel(&self, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), token.clone());
        token
    }

    /// Forgets the cancel token of task `id`.
    pub fn unregister_cancel(&self, id: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// A cancel request for task `id`: fires its token, if it is pending or running here.
    pub fn cancel(&self, id: &str) -> bool {
        match self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }
}
