//! The NATS adapter of the shared crate: the definitions of every stream, KV bucket and consumer
//! of SPEC §2, and provisioning that creates what is missing, updates what may be updated, and
//! never deletes anything.
//!
//! Definitions are pure functions of a [`Names`] and a [`TopologyConfig`], so they can be tested
//! and printed without a server; [`provision`] and [`provision_queue`] carry them out. Each
//! compares what the server has with what Drover needs and only sends an update when they differ,
//! so running it twice is a no-op the second time, and every component can run it at start.

use crate::names::Names;
use async_nats::jetstream::{
    self, consumer,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The oldest nats-server Drover runs on: 2.12 brought message schedules (durable timers),
/// per-message TTLs and KV limit markers (visible lease expiry).
pub const MIN_SERVER_VERSION: (u32, u32, u32) = (2, 12, 0);

/// Where streams keep their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk (survives a server restart).
    #[default]
    File,
    /// In memory (fast, lost on restart; for tests and benchmarks).
    Memory,
}

impl From<Storage> for StorageType {
    fn from(s: Storage) -> Self {
        match s {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        }
    }
}

/// How Drover's streams and buckets are sized and replicated. Part of every component's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Replicas of every stream and bucket: 1 on a laptop, 3 in production.
    pub replicas: usize,
    /// File or memory storage.
    pub storage: Storage,
    /// Leader lease, in milliseconds (max_age of `drover-election`; SPEC §5).
    pub lease_ms: u64,
    /// Worker heartbeat TTL, in milliseconds (max_age of `drover-workers`; SPEC §6).
    pub worker_ttl_ms: u64,
    /// How long task records and checkpoints are kept, in seconds.
    pub task_retention_secs: u64,
    /// Duplicate window of the submit and work streams, in milliseconds.
    pub duplicate_window_ms: u64,
    /// Largest size of the intake stream in bytes; -1 for no limit. When full, submits fail
    /// visibly (discard new) rather than dropping tasks.
    pub submit_max_bytes: i64,
    /// Largest size of the work stream in bytes; -1 for no limit.
    pub work_max_bytes: i64,
    /// Largest size of the lifecycle event history in bytes (oldest dropped first).
    pub events_max_bytes: i64,
    /// How long lifecycle events are kept, in seconds.
    pub events_max_age_secs: u64,
    /// Largest size of the dead-letter stream in bytes; -1 for no limit.
    pub dlq_max_bytes: i64,
    /// Largest size of the `drover-tasks` bucket in bytes; -1 for no limit.
    pub tasks_max_bytes: i64,
    /// Intake messages the leader may hold unacknowledged (pipelining depth).
    pub intake_max_ack_pending: i64,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            storage: Storage::File,
            lease_ms: 1_500,
            worker_ttl_ms: 3_000,
            task_retention_secs: 24 * 3600,
            duplicate_window_ms: 120_000,
            submit_max_bytes: -1,
            work_max_bytes: -1,
            events_max_bytes: 1 << 30,
            events_max_age_secs: 7 * 24 * 3600,
            dlq_max_bytes: -1,
            tasks_max_bytes: -1,
            intake_max_ack_pending: 65_536,
        }
    }
}

impl TopologyConfig {
    /// The leader lease.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    /// The worker TTL.
    pub fn worker_ttl(&self) -> Duration {
        Duration::from_millis(self.worker_ttl_ms)
    }
}

/// Per-partition consumer settings of one queue (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConsumerConfig {
    /// Batches of one partition in flight at once (`max_ack_pending`); 1 keeps per-key order.
    pub max_in_flight: i64,
    /// How long a delivered batch may go unacknowledged (the worker TTL).
    pub ack_wait: Duration,
}

// ---- errors -------------------------------------------------------------------------------------

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The server is older than [`MIN_SERVER_VERSION`].
    #[error(
        "nats-server {found} is too old: Drover needs {}.{}.{} or newer (message schedules, \
         per-message TTL and KV limit markers); install a current one with `bash nats/install.sh`",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1, MIN_SERVER_VERSION.2
    )]
    ServerTooOld {
        /// The version the server reported.
        found: String,
    },
    /// JetStream is off on the server or for this account.
    #[error(
        "JetStream is not available on this server/account ({0}); start nats-server with -js or `jetstream: enabled` in its config"
    )]
    NoJetStream(String),
    /// An existing stream differs in a way that cannot be changed without deleting data.
    #[error(
        "stream {stream} exists with {what}, but Drover needs {want}; Drover never deletes data, \
         so move or remove the stream yourself (e.g. `nats stream backup` then `nats stream rm`)"
    )]
    Incompatible {
        /// Stream name.
        stream: String,
        /// What it has.
        what: String,
        /// What Drover needs.
        want: String,
    },
    /// The server refused a request.
    #[error("{action} {name}: {source}")]
    Nats {
        /// What was being done (`create stream`, …).
        action: &'static str,
        /// The object.
        name: String,
        /// The server's or client's error.
        #[source]
        source: async_nats::Error,
    },
}

impl TopologyError {
    fn nats(action: &'static str, name: &str, source: impl Into<async_nats::Error>) -> Self {
        Self::Nats {
            action,
            name: name.to_owned(),
            source: source.into(),
        }
    }

    /// `true` when retrying later may help (a timeout or a server in the middle of an election).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Nats { .. })
    }
}

// ---- versions -----------------------------------------------------------------------------------

/// Parses `major.minor.patch` (ignoring a leading `v` and any `-suffix`).
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// Checks a server version string against [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str) -> Result<(), TopologyError> {
    match parse_version(version) {
        Some(v) if v >= MIN_SERVER_VERSION => Ok(()),
        _ => Err(TopologyError::ServerTooOld {
            found: version.to_owned(),
        }),
    }
}

// ---- definitions ----------------------------------------------------------------------------------

fn base_stream(name: String, subjects: Vec<String>, cfg: &TopologyConfig) -> stream::Config {
    stream::Config {
        name,
        subjects,
        storage: cfg.storage.into(),
        num_replicas: cfg.replicas.max(1),
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        max_message_size: -1,
        max_consumers: -1,
        duplicate_window: Duration::from_millis(cfg.duplicate_window_ms),
        ..Default::default()
    }
}

/// A work-queue stream that never drops a pending message: discard new, no max age.
fn work_queue(
    name: String,
    subjects: Vec<String>,
    max_bytes: i64,
    cfg: &TopologyConfig,
) -> stream::Config {
    stream::Config {
        retention: RetentionPolicy::WorkQueue,
        discard: DiscardPolicy::New,
        max_bytes,
        ..base_stream(name, subjects, cfg)
    }
}

/// The streams of SPEC §2 (not the KV buckets; see [`bucket_streams`]).
pub fn streams(names: &Names, cfg: &TopologyConfig) -> Vec<stream::Config> {
    let p = names.prefix();
    let mut submit = work_queue(
        names.submit_stream(),
        vec![format!("{p}.submit.>")],
        cfg.submit_max_bytes,
        cfg,
    );
    submit.description = Some("Drover intake: tasks as clients submitted them".into());
    let mut work = work_queue(
        names.work_stream(),
        vec![format!("{p}.work.>")],
        cfg.work_max_bytes,
        cfg,
    );
    work.description = Some("Drover envelopes: sealed batches per queue partition".into());
    let mut outcomes = work_queue(
        names.outcomes_stream(),
        vec![format!("{p}.outcome.>")],
        -1,
        cfg,
    );
    outcomes.description = Some("Drover outcomes: worker results per batch".into());
    // Workers read the last outcome of a batch after a redelivery.
    outcomes.allow_direct = true;

    // Message schedules cannot be combined with discard-new; nothing is dropped here anyway
    // because the stream has no limits.
    let delayed = stream::Config {
        description: Some("Drover durable timers: run_at, delays and retries".into()),
        retention: RetentionPolicy::WorkQueue,
        discard: DiscardPolicy::Old,
        allow_message_schedules: true,
        allow_rollup: true,
        ..base_stream(
            names.delayed_stream(),
            vec![format!("{p}.delayed.>"), format!("{p}.due.>")],
            cfg,
        )
    };
    let triggers = stream::Config {
        description: Some("Drover event triggers of schedules".into()),
        retention: RetentionPolicy::WorkQueue,
        discard: DiscardPolicy::New,
        ..base_stream(names.triggers_stream(), vec![format!("{p}.trigger.>")], cfg)
    };
    let events = stream::Config {
        description: Some("Drover lifecycle events".into()),
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: Duration::from_secs(cfg.events_max_age_secs),
        max_bytes: cfg.events_max_bytes,
        ..base_stream(names.events_stream(), vec![format!("{p}.events.>")], cfg)
    };
    let dlq = stream::Config {
        description: Some(
            "Drover dead letters, rejected submissions and quarantined envelopes".into(),
        ),
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_bytes: cfg.dlq_max_bytes,
        allow_direct: true,
        ..base_stream(
            names.dlq_stream(),
            vec![
                format!("{p}.dlq.>"),
                format!("{p}.rejected.>"),
                names.quarantine_subject(),
            ],
            cfg,
        )
    };
    vec![submit, work, outcomes, delayed, triggers, events, dlq]
}

/// One KV bucket's definition.
#[derive(Debug, Clone, Copy)]
struct Bucket<'a> {
    suffix: &'a str,
    description: &'a str,
    history: i64,
    max_age: Duration,
    max_bytes: i64,
    /// Per-key TTLs and delete markers on expiry (`limit_markers`).
    markers: bool,
}

/// The stream behind a KV bucket, exactly as async-nats' `create_key_value` would make it, so
/// that the `nats` CLI and every client library see an ordinary bucket.
fn kv_stream(names: &Names, b: Bucket<'_>, cfg: &TopologyConfig) -> stream::Config {
    let bucket = names.bucket(b.suffix);
    // The server needs a marker TTL of at least one second.
    let marker_ttl = b.max_age.max(Duration::from_secs(1));
    stream::Config {
        description: Some(b.description.to_owned()),
        max_messages_per_subject: b.history,
        max_age: b.max_age,
        max_bytes: b.max_bytes,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        allow_message_ttl: b.markers,
        subject_delete_marker_ttl: b.markers.then_some(marker_ttl),
        duplicate_window: if b.max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            b.max_age.min(Duration::from_secs(120))
        },
        ..base_stream(format!("KV_{bucket}"), vec![format!("$KV.{bucket}.>")], cfg)
    }
}

/// The KV buckets of SPEC §2, as the streams that hold them.
pub fn bucket_streams(names: &Names, cfg: &TopologyConfig) -> Vec<stream::Config> {
    let retention = Duration::from_secs(cfg.task_retention_secs);
    let none = Duration::ZERO;
    [
        Bucket {
            suffix: "election",
            description: "Drover leader lease",
            history: 1,
            max_age: cfg.lease(),
            max_bytes: -1,
            markers: true,
        },
        Bucket {
            suffix: "workers",
            description: "Drover worker heartbeats",
            history: 1,
            max_age: cfg.worker_ttl(),
            max_bytes: -1,
            markers: true,
        },
        Bucket {
            suffix: "state",
            description: "Drover leader state: assignments, cron, queues, scaling",
            history: 5,
            max_age: none,
            max_bytes: -1,
            markers: false,
        },
        Bucket {
            suffix: "tasks",
            description: "Drover task records",
            history: 1,
            max_age: retention,
            max_bytes: cfg.tasks_max_bytes,
            markers: false,
        },
        Bucket {
            suffix: "unique",
            description: "Drover uniqueness windows",
            history: 1,
            max_age: none,
            max_bytes: -1,
            markers: true,
        },
        Bucket {
            suffix: "checkpoints",
            description: "Drover handler checkpoints (sealed)",
            history: 1,
            max_age: retention,
            max_bytes: -1,
            markers: false,
        },
        Bucket {
            suffix: "schedules",
            description: "Drover schedules",
            history: 5,
            max_age: none,
            max_bytes: -1,
            markers: false,
        },
    ]
    .into_iter()
    .map(|b| kv_stream(names, b, cfg))
    .collect()
}

fn pull(
    name: String,
    filter: String,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name),
        filter_subject: filter,
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait,
        max_deliver: -1,
        max_ack_pending,
        ..Default::default()
    }
}

/// The leader's durable consumers, as `(stream, consumer)` pairs (SPEC §2, §5).
///
/// The intake consumer's `ack_wait` is the lease, so a crashed leader's unacked intake comes
/// back to its successor before anything newer.
pub fn leader_consumers(
    names: &Names,
    cfg: &TopologyConfig,
) -> Vec<(String, consumer::pull::Config)> {
    let p = names.prefix();
    let lease = cfg.lease().max(Duration::from_millis(100));
    vec![
        (
            names.submit_stream(),
            pull(
                names.intake_consumer(),
                format!("{p}.submit.>"),
                lease,
                cfg.intake_max_ack_pending,
            ),
        ),
        (
            names.outcomes_stream(),
            // Short as well: outcomes a crashed leader had pulled come back to its successor
            // after this, and until then their tasks' records (and the dependents of those
            // tasks) wait. A redelivery while the leader still handles a message is harmless:
            // outcomes are idempotent by (id, attempt).
            pull(
                names.outcomes_consumer(),
                format!("{p}.outcome.>"),
                (lease + Duration::from_secs(1)).max(Duration::from_secs(2)),
                cfg.intake_max_ack_pending,
            ),
        ),
        (
            names.delayed_stream(),
            // Short: the leader holds a delayed task's fired timer for up to a second before
            // its due instant, and a crashed leader's held timers must come back promptly.
            pull(
                names.due_consumer(),
                format!("{p}.due.>"),
                (lease + Duration::from_secs(1)).max(Duration::from_secs(2)),
                cfg.intake_max_ack_pending,
            ),
        ),
        (
            names.triggers_stream(),
            pull(
                names.triggers_consumer(),
                String::new(),
                Duration::from_secs(30),
                cfg.intake_max_ack_pending,
            ),
        ),
    ]
}

/// The durable consumer of one work partition (SPEC §2, §6).
pub fn work_consumer(
    names: &Names,
    queue: &str,
    partition: u32,
    qcfg: &QueueConsumerConfig,
) -> consumer::pull::Config {
    pull(
        names.work_consumer(queue, partition),
        names.work_subject(queue, partition),
        qcfg.ack_wait,
        qcfg.max_in_flight.max(1),
    )
}

// ---- provisioning ---------------------------------------------------------------------------------

/// What provisioning did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It did not exist and was created.
    Created,
    /// It existed and was brought up to date.
    Updated,
    /// It was already as needed.
    Unchanged,
}

/// One line of a [`ProvisionReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionEntry {
    /// `stream`, `kv` or `consumer`.
    pub kind: &'static str,
    /// Name (bucket name for `kv`, `STREAM/consumer` for consumers).
    pub name: String,
    /// What happened.
    pub change: Change,
}

/// What [`provision`] did, object by object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    /// Every object Drover needs, in definition order.
    pub entries: Vec<ProvisionEntry>,
}

impl ProvisionReport {
    /// `true` when nothing was created or changed.
    pub fn is_noop(&self) -> bool {
        self.entries.iter().all(|e| e.change == Change::Unchanged)
    }

    /// Number of entries with `change`.
    pub fn count(&self, change: Change) -> usize {
        self.entries.iter().filter(|e| e.change == change).count()
    }
}

impl fmt::Display for ProvisionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} created, {} updated, {} unchanged",
            self.count(Change::Created),
            self.count(Change::Updated),
            self.count(Change::Unchanged)
        )
    }
}

/// Checks the server version and JetStream, then creates or updates every stream, bucket and
/// leader consumer Drover needs. Idempotent; never deletes data.
pub async fn provision(
    client: &async_nats::Client,
    names: &Names,
    cfg: &TopologyConfig,
) -> Result<ProvisionReport, TopologyError> {
    check_server_version(&client.server_info().version)?;
    let js = jetstream::new(client.clone());
    js.query_account().await.map_err(account_error)?;

    let mut report = ProvisionReport::default();
    for config in streams(names, cfg) {
        let change = ensure_stream(&js, config.clone()).await?;
        report.entries.push(ProvisionEntry {
            kind: "stream",
            name: config.name,
            change,
        });
    }
    for config in bucket_streams(names, cfg) {
        let name = config.name.trim_start_matches("KV_").to_owned();
        let change = ensure_stream(&js, config).await?;
        report.entries.push(ProvisionEntry {
            kind: "kv",
            name,
            change,
        });
    }
    for (stream, consumer) in leader_consumers(names, cfg) {
        report
            .entries
            .push(ensure_consumer(&js, &stream, consumer).await?);
    }
    Ok(report)
}

/// Classifies a failed account query: JetStream off is final; a timeout or a cluster still
/// electing its meta leader is worth retrying.
fn account_error(e: jetstream::context::AccountError) -> TopologyError {
    use async_nats::jetstream::ErrorCode;
    use jetstream::context::AccountErrorKind;
    match e.kind() {
        AccountErrorKind::JetStreamUnavailable => TopologyError::NoJetStream(e.to_string()),
        AccountErrorKind::JetStream(err)
            if matches!(
                err.error_code(),
                ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            ) =>
        {
            TopologyError::NoJetStream(e.to_string())
        }
        _ => TopologyError::nats("query account", "JetStream", e),
    }
}

/// Creates or updates the per-partition consumers of `queue` (partitions `0..partitions`).
pub async fn provision_queue(
    js: &jetstream::Context,
    names: &Names,
    queue: &str,
    partitions: u32,
    qcfg: &QueueConsumerConfig,
) -> Result<ProvisionReport, TopologyError> {
    let stream = names.work_stream();
    let mut report = ProvisionReport::default();
    for p in 0..partitions {
        let consumer = work_consumer(names, queue, p, qcfg);
        report
            .entries
            .push(ensure_consumer(js, &stream, consumer).await?);
    }
    Ok(report)
}

/// Creates `want`, or brings an existing stream of that name up to date with it.
///
/// Only the settings Drover owns are compared and changed; the rest of an existing stream's
/// config (placement, metadata, anything an operator tuned that Drover does not define) is kept,
/// and subjects are only ever added. Storage and retention cannot change without losing data, so
/// a difference there is an error.
async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
) -> Result<Change, TopologyError> {
    let name = want.name.clone();
    let have = match js.get_stream(&name).await {
        Ok(mut s) => s
            .info()
            .await
            .map_err(|e| TopologyError::nats("read stream", &name, e))?
            .config
            .clone(),
        Err(e) if is_not_found(&e) => {
            js.create_stream(want)
                .await
                .map_err(|e| TopologyError::nats("create stream", &name, e))?;
            return Ok(Change::Created);
        }
        Err(e) => return Err(TopologyError::nats("read stream", &name, e)),
    };
    if have.storage != want.storage {
        return Err(TopologyError::Incompatible {
            stream: name,
            what: format!("storage {:?}", have.storage),
            want: format!("storage {:?}", want.storage),
        });
    }
    if have.retention != want.retention {
        return Err(TopologyError::Incompatible {
            stream: name,
            what: format!("retention {:?}", have.retention),
            want: format!("retention {:?}", want.retention),
        });
    }
    let merged = merge_stream(&have, &want);
    if merged == have {
        return Ok(Change::Unchanged);
    }
    js.update_stream(&merged)
        .await
        .map_err(|e| TopologyError::nats("update stream", &name, e))?;
    Ok(Change::Updated)
}

/// `have` with every setting Drover owns taken from `want` (subjects: the union).
fn merge_stream(have: &stream::Config, want: &stream::Config) -> stream::Config {
    let mut m = have.clone();
    for s in &want.subjects {
        if !m.subjects.contains(s) {
            m.subjects.push(s.clone());
        }
    }
    if want.description.is_some() {
        m.description.clone_from(&want.description);
    }
    m.discard = want.discard;
    m.max_age = want.max_age;
    m.max_bytes = want.max_bytes;
    m.max_messages = want.max_messages;
    m.max_messages_per_subject = want.max_messages_per_subject;
    m.max_message_size = want.max_message_size;
    m.num_replicas = want.num_replicas;
    m.duplicate_window = want.duplicate_window;
    m.allow_rollup = want.allow_rollup || (want.allow_message_schedules && have.allow_rollup);
    m.deny_delete = want.deny_delete;
    m.allow_direct = want.allow_direct;
    m.allow_message_ttl = want.allow_message_ttl;
    m.subject_delete_marker_ttl = want.subject_delete_marker_ttl;
    m.allow_message_schedules = want.allow_message_schedules;
    m
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref err)
            if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Creates `want` on `stream`, or updates an existing durable consumer of that name whose
/// Drover-owned settings differ.
async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    want: consumer::pull::Config,
) -> Result<ProvisionEntry, TopologyError> {
    let name = want.durable_name.clone().unwrap_or_default();
    let label = format!("{stream}/{name}");
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| TopologyError::nats("read stream", stream, e))?;
    let change = match s.consumer_info(&name).await {
        Ok(info) => {
            let c = &info.config;
            let same = c.filter_subject == want.filter_subject
                && c.ack_policy == want.ack_policy
                && c.ack_wait == want.ack_wait
                && c.max_deliver == want.max_deliver
                && c.max_ack_pending == want.max_ack_pending
                && c.num_replicas == want.num_replicas;
            if same {
                Change::Unchanged
            } else {
                s.update_consumer(want)
                    .await
                    .map_err(|e| TopologyError::nats("update consumer", &label, e))?;
                Change::Updated
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::ConsumerInfoErrorKind::NotFound
            ) || matches!(e.kind(), jetstream::context::ConsumerInfoErrorKind::JetStream(ref err)
                    if err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
        {
            s.create_consumer(want)
                .await
                .map_err(|e| TopologyError::nats("create consumer", &label, e))?;
            Change::Created
        }
        Err(e) => return Err(TopologyError::nats("read consumer", &label, e)),
    };
    Ok(ProvisionEntry {
        kind: "consumer",
        name: label,
        change,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.12.0-RC.3"), Some((2, 12, 0)));
        assert_eq!(parse_version("2.12"), Some((2, 12, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert!(check_server_version("2.12.0").is_ok());
        assert!(check_server_version("3.0.0").is_ok());
        let e = check_server_version("2.11.11").unwrap_err().to_string();
        assert!(
            e.contains("2.11.11") && e.contains("2.12.0") && e.contains("nats/install.sh"),
            "{e}"
        );
        assert!(check_server_version("").is_err());
    }

    #[test]
    fn work_queues_never_drop_pending_messages() {
        let names = Names::default();
        let cfg = TopologyConfig::default();
        for s in streams(&names, &cfg) {
            if s.retention == RetentionPolicy::WorkQueue && !s.allow_message_schedules {
                assert_eq!(s.discard, DiscardPolicy::New, "{}", s.name);
            }
            if s.retention == RetentionPolicy::WorkQueue {
                assert!(s.max_age.is_zero(), "{} must have no max_age", s.name);
            }
        }
        let submit = &streams(&names, &cfg)[0];
        assert_eq!(submit.name, "DROVER_SUBMIT");
        assert!(
            !submit.allow_rollup && !submit.allow_message_ttl && !submit.allow_message_schedules
        );
    }

    #[test]
    fn buckets_follow_the_spec() {
        let names = Names::new("acme").unwrap();
        let cfg = TopologyConfig::default();
        let b = bucket_streams(&names, &cfg);
        let get = |n: &str| b.iter().find(|s| s.name == n).unwrap();
        let election = get("KV_acme-election");
        assert_eq!(election.max_age, Duration::from_millis(1500));
        assert!(election.allow_message_ttl);
        assert_eq!(
            election.subject_delete_marker_ttl,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(get("KV_acme-state").max_messages_per_subject, 5);
        assert_eq!(get("KV_acme-tasks").max_age, Duration::from_secs(86400));
        assert!(get("KV_acme-unique").allow_message_ttl);
        assert_eq!(b.len(), 7);
    }

    #[test]
    fn merge_only_adds_subjects() {
        let names = Names::default();
        let cfg = TopologyConfig::default();
        let want = streams(&names, &cfg).remove(4);
        let mut have = want.clone();
        have.subjects.push("orders.created".into());
        let merged = merge_stream(&have, &want);
        assert_eq!(merged, have, "a subject added by a schedule is kept");
    }
}
