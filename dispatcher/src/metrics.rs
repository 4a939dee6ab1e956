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

/// Outcomes handled, by status.
pub const OUTCOMES: MetricDef = MetricDef::new(
    "drover_outcomes",
    "Task outcomes handled by the leader, by status (succeeded, failed, cancelled)",
);
/// Retries scheduled through `DROVER_DELAYED`.
pub const RETRIES_SCHEDULED: MetricDef = MetricDef::new(
    "drover_retries_scheduled",
    "Failed attempts given another attempt through a DROVER_DELAYED timer",
);
/// Tasks that failed for good and were copied to the dead-letter subject.
pub const DEAD_LETTERED: MetricDef = MetricDef::new(
    "drover_dead_lettered",
    "Tasks that failed for good and were copied to <prefix>.dlq.<queue>",
);
/// Outcomes whose attempt was already recorded.
pub const OUTCOME_DUPLICATES: MetricDef = MetricDef::new(
    "drover_outcome_duplicates",
    "Outcomes ignored because their attempt was already recorded (redelivery, or the task was terminal)",
);
/// Compare-and-set conflicts on task records.
pub const CAS_CONFLICTS: MetricDef = MetricDef::new(
    "drover_record_cas_conflicts",
    "Task record writes by the leader that lost a compare-and-set and were decided again",
);
/// Messages quarantined by the leader, by reason.
pub const QUARANTINED: MetricDef = MetricDef::new(
    "drover_quarantined",
    "Outcome and timer messages the leader terminated and copied to <prefix>.quarantine, by reason",
);
/// Due timers that dispatched a next attempt.
pub const DUE_DISPATCHED: MetricDef = MetricDef::new(
    "drover_due_dispatched",
    "Fired DROVER_DELAYED timers whose task was dispatched again",
);
/// Due timers dropped because the task was already terminal.
pub const DUE_SKIPPED: MetricDef = MetricDef::new(
    "drover_due_skipped",
    "Fired DROVER_DELAYED timers dropped because their task was terminal (e.g. cancelled)",
);
/// Delayed tasks given a `scheduled` record and a timer at intake.
pub const DELAYED_SCHEDULED: MetricDef = MetricDef::new(
    "drover_delayed_scheduled",
    "Tasks with a future run_at/delay_ms given a scheduled record and a DROVER_DELAYED timer",
);
/// How late delayed tasks left the leader.
pub const DUE_LATENESS: MetricDef = MetricDef::new(
    "drover_due_lateness",
    "Time from a delayed task's due instant to the PubAck of its envelope",
)
.with_unit(Unit::Seconds);
/// Tasks held for their dependencies.
pub const DEPS_HELD: MetricDef = MetricDef::new(
    "drover_deps_held",
    "Tasks held at intake (state scheduled) until every task in their depends_on succeeded",
);
/// Held tasks released.
pub const DEPS_RELEASED: MetricDef = MetricDef::new(
    "drover_deps_released",
    "Held tasks dispatched because their last dependency succeeded",
);
/// Tasks failed because a dependency did not succeed.
pub const DEPS_UPSTREAM_FAILED: MetricDef = MetricDef::new(
    "drover_deps_upstream_failed",
    "Tasks recorded upstream_failed because a dependency failed, was cancelled or was itself upstream_failed",
);
/// Lifecycle events published.
pub const EVENTS: MetricDef = MetricDef::new(
    "drover_events",
    "Lifecycle events published to DROVER_EVENTS",
);
/// Lifecycle events dropped.
pub const EVENTS_DROPPED: MetricDef = MetricDef::new(
    "drover_events_dropped",
    "Lifecycle events dropped because the publisher was behind or NATS refused them",
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
    /// [`OUTCOMES`], labelled `status`.
    pub outcomes: Family<ReasonLabel, Counter>,
    /// [`RETRIES_SCHEDULED`].
    pub retries_scheduled: Counter,
    /// [`DEAD_LETTERED`].
    pub dead_lettered: Counter,
    /// [`OUTCOME_DUPLICATES`].
    pub outcome_duplicates: Counter,
    /// [`CAS_CONFLICTS`].
    pub cas_conflicts: Counter,
    /// [`QUARANTINED`], labelled `reason`.
    pub quarantined: Family<ReasonLabel, Counter>,
    /// [`DUE_DISPATCHED`].
    pub due_dispatched: Counter,
    /// [`DUE_SKIPPED`].
    pub due_skipped: Counter,
    /// [`DELAYED_SCHEDULED`].
    pub delayed_scheduled: Counter,
    /// [`DUE_LATENESS`].
    pub due_lateness: Histogram,
    /// [`DEPS_HELD`].
    pub deps_held: Counter,
    /// [`DEPS_RELEASED`].
    pub deps_released: Counter,
    /// [`DEPS_UPSTREAM_FAILED`].
    pub deps_upstream_failed: Counter,
    /// [`EVENTS`].
    pub events: Counter,
    /// [`EVENTS_DROPPED`].
    pub events_dropped: Counter,
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
            outcomes: m.family(&OUTCOMES),
            retries_scheduled: m.counter(&RETRIES_SCHEDULED),
            dead_lettered: m.counter(&DEAD_LETTERED),
            outcome_duplicates: m.counter(&OUTCOME_DUPLICATES),
            cas_conflicts: m.counter(&CAS_CONFLICTS),
            quarantined: m.family(&QUARANTINED),
            due_dispatched: m.counter(&DUE_DISPATCHED),
            due_skipped: m.counter(&DUE_SKIPPED),
            delayed_scheduled: m.counter(&DELAYED_SCHEDULED),
            due_lateness: m.latency_histogram(&DUE_LATENESS),
            deps_held: m.counter(&DEPS_HELD),
            deps_released: m.counter(&DEPS_RELEASED),
            deps_upstream_failed: m.counter(&DEPS_UPSTREAM_FAILED),
            events: m.counter(&EVENTS),
            events_dropped: m.counter(&EVENTS_DROPPED),
        }
    }

    /// Metrics registered nowhere, for tests and tools that run a pipeline without a server.
    pub fn unregistered() -> Self {
        Self::register(&mut Metrics::new("dispatcher", env!("CARGO_PKG_VERSION")))
    }
}
