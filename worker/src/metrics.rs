//! The worker's metrics (SPEC §9): names, help text and units in one place.

use drover_shared::ops::{Counter, Family, Gauge, Histogram, MetricDef, Metrics, Unit};

/// Attempts finished, by outcome (`succeeded`, `failed`, `cancelled`) and error kind.
pub const TASKS: MetricDef = MetricDef::new(
    "drover_worker_tasks",
    "Task attempts finished by this worker, by status and error kind",
);
/// Duration of attempts.
pub const TASK_DURATION: MetricDef =
    MetricDef::new("drover_worker_task_duration", "Duration of task attempts")
        .with_unit(Unit::Seconds);
/// Tasks of received batches skipped because their attempt was already recorded.
pub const TASKS_SKIPPED: MetricDef = MetricDef::new(
    "drover_worker_tasks_skipped",
    "Tasks not run because their record or outcome already holds the attempt (or they are terminal)",
);
/// `running` records not written because the attempt finished within the coalescing delay
/// (the worker was loaded).
pub const RUNNING_COALESCED: MetricDef = MetricDef::new(
    "drover_worker_running_coalesced",
    "Running records skipped under load because the attempt finished first",
);
/// Batches received, by how they ended (`acked`, `nacked`, `abandoned`, `lost`, `quarantined`).
pub const BATCHES: MetricDef = MetricDef::new(
    "drover_worker_batches",
    "Envelopes received, by how they ended",
);
/// Envelopes quarantined, by reason.
pub const QUARANTINED: MetricDef = MetricDef::new(
    "drover_worker_quarantined",
    "Envelopes terminated and copied to the quarantine subject, by reason",
);
/// Envelopes with an unknown key id, NAKed for a later retry.
pub const UNKNOWN_KID: MetricDef = MetricDef::new(
    "drover_worker_unknown_kid",
    "Envelopes NAKed because their key id is not in this worker's keyring",
);
/// Partitions this worker pulls.
pub const PARTITIONS_OWNED: MetricDef = MetricDef::new(
    "drover_worker_partitions_owned",
    "Partitions this worker currently pulls",
);
/// Attempts running now.
pub const RUNNING: MetricDef = MetricDef::new("drover_worker_running", "Task attempts running now");
/// 1 while fenced.
pub const FENCED: MetricDef = MetricDef::new(
    "drover_worker_fenced",
    "1 while this worker is fenced (no successful heartbeat within TTL - margin)",
);
/// Times this worker fenced itself.
pub const FENCE_EVENTS: MetricDef = MetricDef::new(
    "drover_worker_fence_events",
    "Times this worker fenced itself",
);
/// Failed heartbeats.
pub const HEARTBEAT_FAILURES: MetricDef = MetricDef::new(
    "drover_worker_heartbeat_failures",
    "Heartbeats that did not reach drover-workers",
);
/// Progress reports from handlers.
pub const PROGRESS: MetricDef = MetricDef::new(
    "drover_worker_progress_reports",
    "Progress reports made by handlers (TaskContext::progress)",
);
/// Circuit state per handler target (0 closed, 1 half-open, 2 open); set by the HTTP handlers.
pub const CIRCUIT_STATE: MetricDef = MetricDef::new(
    "drover_worker_circuit_state",
    "Circuit breaker state per handler target: 0 closed, 1 half-open, 2 open",
);

/// Labels `[status, kind]` of [`TASKS`].
pub type OutcomeLabels = [(&'static str, &'static str); 2];
/// Labels of a per-reason counter.
pub type ReasonLabel = [(&'static str, &'static str); 1];
/// Labels of [`CIRCUIT_STATE`]: `[("target", ...)]`.
pub type TargetLabel = [(&'static str, String); 1];

/// The worker's metric handles.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// [`TASKS`].
    pub tasks: Family<OutcomeLabels, Counter>,
    /// [`TASK_DURATION`].
    pub task_duration: Histogram,
    /// [`TASKS_SKIPPED`].
    pub tasks_skipped: Counter,
    /// [`RUNNING_COALESCED`].
    pub running_coalesced: Counter,
    /// [`BATCHES`].
    pub batches: Family<ReasonLabel, Counter>,
    /// [`QUARANTINED`].
    pub quarantined: Family<ReasonLabel, Counter>,
    /// [`UNKNOWN_KID`].
    pub unknown_kid: Counter,
    /// [`PARTITIONS_OWNED`].
    pub partitions_owned: Gauge,
    /// [`RUNNING`].
    pub running: Gauge,
    /// [`FENCED`].
    pub fenced: Gauge,
    /// [`FENCE_EVENTS`].
    pub fence_events: Counter,
    /// [`HEARTBEAT_FAILURES`].
    pub heartbeat_failures: Counter,
    /// [`PROGRESS`].
    pub progress: Counter,
    /// [`CIRCUIT_STATE`].
    pub circuit_state: Family<TargetLabel, Gauge>,
}

impl WorkerMetrics {
    /// Registers every worker metric in `m`.
    pub fn register(m: &mut Metrics) -> Self {
        Self {
            tasks: m.family(&TASKS),
            task_duration: m.latency_histogram(&TASK_DURATION),
            tasks_skipped: m.counter(&TASKS_SKIPPED),
            running_coalesced: m.counter(&RUNNING_COALESCED),
            batches: m.family(&BATCHES),
            quarantined: m.family(&QUARANTINED),
            unknown_kid: m.counter(&UNKNOWN_KID),
            partitions_owned: m.gauge(&PARTITIONS_OWNED),
            running: m.gauge(&RUNNING),
            fenced: m.gauge(&FENCED),
            fence_events: m.counter(&FENCE_EVENTS),
            heartbeat_failures: m.counter(&HEARTBEAT_FAILURES),
            progress: m.counter(&PROGRESS),
            circuit_state: m.family(&CIRCUIT_STATE),
        }
    }
}
