//! The dispatcher's metrics (SPEC §9): names, help text and units in one place.

use drover_shared::ops::{Counter, Family, Gauge, Histogram, MetricDef, Metrics, Unit};

/// 1 while this replica leads.
pub const LEADER: MetricDef = MetricDef::new("drover_leader", "1 while this replica is the leader");
/// Times this replica became leader.
pub const LEADER_CHANGES: MetricDef = MetricDef::new(
    "drover_leader_changes",
    "Times this replica started leading",
);
/// Time this replica observed without any leader.
pub const LEADERLESS: MetricDef = MetricDef::new(
    "drover_leaderless",
    "Time this replica observed with no leader holding the lease",
)
.with_unit(Unit::Seconds);
/// Leader step-downs by reason.
pub const STEP_DOWNS: MetricDef = MetricDef::new(
    "drover_leader_step_downs",
    "Times this replica stopped leading, by reason",
);
/// Tasks dispatched into envelopes.
pub const TASKS_DISPATCHED: MetricDef = MetricDef::new(
    "drover_tasks_dispatched",
    "Tasks published in durable envelopes",
);
/// Envelopes published.
pub const ENVELOPES: MetricDef =
    MetricDef::new("drover_envelopes", "Envelopes (task batches) published");
/// Tasks per envelope.
pub const BATCH_TASKS: MetricDef = MetricDef::new("drover_batch_tasks", "Tasks per envelope");
/// Envelope plaintext size.
pub const BATCH_PLAINTEXT: MetricDef =
    MetricDef::new("drover_batch_plaintext", "Envelope size before compression")
        .with_unit(Unit::Bytes);
/// Envelope body size.
pub const BATCH_SEALED: MetricDef = MetricDef::new(
    "drover_batch_sealed",
    "Envelope body size after compression and encryption",
)
.with_unit(Unit::Bytes);
/// Rejected submissions by error code.
pub const REJECTED: MetricDef = MetricDef::new(
    "drover_submissions_rejected",
    "Submissions rejected at intake, by error code",
);
/// Duplicate task ids dropped.
pub const DUPLICATES: MetricDef = MetricDef::new(
    "drover_duplicates",
    "Tasks not dispatched because their id was already submitted",
);
/// Intake messages handed back for a retry after a failed downstream write.
pub const INTAKE_RETRIES: MetricDef = MetricDef::new(
    "drover_intake_retries",
    "Intake messages NAKed because a downstream write failed",
);

/// Labels of a per-code or per-reason counter.
pub type ReasonLabel = [(&'static str, &'static str); 1];

/// The dispatcher's metric handles.
#[derive(Debug, Clone)]
pub struct DispatcherMetrics {
    /// [`LEADER`].
    pub leader: Gauge,
    /// [`LEADER_CHANGES`].
    pub leader_changes: Counter,
    /// [`LEADERLESS`], in seconds.
    pub leaderless: Counter<f64, std::sync::atomic::AtomicU64>,
    /// [`STEP_DOWNS`].
    pub step_downs: Family<ReasonLabel, Counter>,
    /// [`TASKS_DISPATCHED`].
    pub tasks_dispatched: Counter,
    /// [`ENVELOPES`].
    pub envelopes: Counter,
    /// [`BATCH_TASKS`].
    pub batch_tasks: Histogram,
    /// [`BATCH_PLAINTEXT`].
    pub batch_plaintext: Histogram,
    /// [`BATCH_SEALED`].
    pub batch_sealed: Histogram,
    /// [`REJECTED`].
    pub rejected: Family<ReasonLabel, Counter>,
    /// [`DUPLICATES`].
    pub duplicates: Counter,
    /// [`INTAKE_RETRIES`].
    pub intake_retries: Counter,
}

impl DispatcherMetrics {
    /// Registers every dispatcher metric in `m`.
    pub fn register(m: &mut Metrics) -> Self {
        let leaderless = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        m.register(&LEADERLESS, leaderless.clone());
        Self {
            leader: m.gauge(&LEADER),
            leader_changes: m.counter(&LEADER_CHANGES),
            leaderless,
            step_downs: m.family(&STEP_DOWNS),
            tasks_dispatched: m.counter(&TASKS_DISPATCHED),
            envelopes: m.counter(&ENVELOPES),
            batch_tasks: m.count_histogram(&BATCH_TASKS),
            batch_plaintext: m.bytes_histogram(&BATCH_PLAINTEXT),
            batch_sealed: m.bytes_histogram(&BATCH_SEALED),
            rejected: m.family(&REJECTED),
            duplicates: m.counter(&DUPLICATES),
            intake_retries: m.counter(&INTAKE_RETRIES),
        }
    }

    /// Metrics registered nowhere, for tests and tools that run a pipeline without a server.
    pub fn unregistered() -> Self {
        Self::register(&mut Metrics::new("dispatcher", env!("CARGO_PKG_VERSION")))
    }
}
