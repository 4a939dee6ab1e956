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

/// The fence as the rest of the worker sees it: a [`Fence`] and the token of the current
/// unfenced period behind one lock. The token is cancelled the moment the worker fences (which
/// cancels every attempt started in that period and tells their batches not to ack).
///
/// A transition and its token change happen under the same lock: were the heartbeat's unfence
/// and a concurrent fence applied out of order, the worker would be left unfenced with a
/// cancelled token, silently abandoning every batch it received from then on.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    fenced_tx: watch::Sender<bool>,
    metrics: Arc<WorkerMetrics>,
}

#[derive(Debug)]
struct GateState {
    fence: Fence,
    period: CancellationToken,
}

impl Gate {
    /// A gate, fenced until the first successful heartbeat.
    pub fn new(ttl: Duration, margin: Duration, metrics: Arc<WorkerMetrics>) -> Self {
        let period = CancellationToken::new();
        period.cancel();
        metrics.fenced.set(1);
        Self {
            state: Mutex::new(GateState {
                fence: Fence::new(ttl, margin),
                period,
            }),
            fenced_tx: watch::channel(true).0,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `action` to the token and the watchers; called with the state locked.
    fn apply(&self, state: &mut GateState, action: Option<FenceAction>) {
        match action {
            Some(FenceAction::Fence) => {
                warn!(
                    "no successful heartbeat within TTL - margin: fenced (starting and acking nothing)"
                );
                state.period.cancel();
                self.metrics.fenced.set(1);
                self.metrics.fence_events.inc();
                self.fenced_tx.send_replace(true);
            }
            Some(FenceAction::Unfence) => {
                state.period = CancellationToken::new();
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
        let now = Instant::now();
        let mut state = self.lock();
        let action = state.fence.check(now);
        self.apply(&mut state, action);
        state.fence.may_act(now).then(|| state.period.clone())
    }

    /// `true` if the worker may start, publish or ack right now; fences if time ran out.
    pub fn may_act(&self) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let action = state.fence.check(now);
        self.apply(&mut state, action);
        state.fence.may_act(now)
    }

    /// A heartbeat sent at `sent_at` succeeded.
    pub fn heartbeat_ok(&self, sent_at: Instant) {
        let mut state = self.lock();
        let action = state.fence.on_heartbeat_ok(sent_at, Instant::now());
        self.apply(&mut state, action);
    }

    /// A heartbeat failed.
    pub fn heartbeat_failed(&self) {
        let mut state = self.lock();
        let action = state.fence.on_heartbeat_failed(Instant::now());
        self.apply(&mut state, action);
    }

    /// When the fence falls without another successful heartbeat.
    pub fn deadline(&self) -> Option<Instant> {
        self.lock().fence.deadline()
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

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::ops::Metrics;

    fn gate(ttl: Duration) -> Gate {
        let mut registry = Metrics::new("worker", "test");
        Gate::new(
            ttl,
            Duration::ZERO,
            Arc::new(WorkerMetrics::register(&mut registry)),
        )
    }

    /// The heartbeat that lifts the fence and the check that raises it race when a stopped
    /// process wakes (the watchdog and the heartbeat tick fire together). Whatever their order,
    /// the token must agree with the fence: an unfenced worker holding a cancelled token would
    /// abandon every batch it received, without a word.
    #[test]
    fn racing_fence_and_unfence_leave_the_token_consistent() {
        let gate = Arc::new(gate(Duration::from_millis(50)));
        for round in 0..5_000 {
            {
                // Unfenced, with the last heartbeat long expired: the next check fences.
                let past = Instant::now() - Duration::from_millis(200);
                let mut state = gate.lock();
                state.fence = Fence::new(Duration::from_millis(50), Duration::ZERO);
                state.fence.on_heartbeat_ok(past, past);
                state.period = CancellationToken::new();
            }
            let start = Arc::new(std::sync::Barrier::new(2));
            let checker = {
                let (gate, start) = (gate.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    gate.may_act();
                })
            };
            start.wait();
            gate.heartbeat_ok(Instant::now());
            checker.join().unwrap();
            let state = gate.lock();
            assert_eq!(
                state.fence.is_fenced(),
                state.period.is_cancelled(),
                "round {round}: fenced = {}, token cancelled = {}",
                state.fence.is_fenced(),
                state.period.is_cancelled()
            );
        }
        assert!(gate.period().is_some_and(|p| !p.is_cancelled()));
    }
}
