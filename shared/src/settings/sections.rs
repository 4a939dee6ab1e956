//! The sections of the configuration file: `[nats]`, `[keys]`, `[dispatcher]`, `[worker]`,
//! `[queues.<name>]`, `[metrics]` and `[log]` (`[topology]` and `[codec]` reuse
//! [`crate::topology::TopologyConfig`] and [`crate::envelope::CodecConfig`]).
//!
//! Every struct denies unknown fields and takes its defaults from `Default`, so a file names
//! only what it changes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::handlers::{ExecHandler, HttpHandler};
use super::secret::Secret;
use crate::config::LogFormat;

// ---- [nats] -------------------------------------------------------------------------------------

/// The default NATS server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// How to reach NATS, and the prefix of every name Drover uses there (SPEC §1, §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URLs: a list, or one string with comma-separated URLs (a cluster).
    #[serde(deserialize_with = "list::deserialize")]
    pub url: Vec<String>,
    /// Credentials file (JWT + nkey seed). Excludes `user`/`password`.
    pub creds: Option<PathBuf>,
    /// User name, together with `password`.
    pub user: Option<String>,
    /// Password of `user`; never printed.
    pub password: Option<Secret>,
    /// CA certificate to verify the server with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS, together with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Prefix of every subject, stream, bucket and consumer.
    pub prefix: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: vec![DEFAULT_NATS_URL.to_owned()],
            creds: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            prefix: crate::names::DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl NatsSettings {
    /// The URLs as one comma-separated string, the form NATS clients accept.
    pub fn url_string(&self) -> String {
        self.url.join(",")
    }
}

// ---- [keys] -------------------------------------------------------------------------------------

/// Where the envelope keyring comes from (SPEC §3, §8). At most one of the two; `DROVER_KEYS`
/// sets `inline` and so replaces a `file` from the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysSettings {
    /// The keyring itself, `kid:base64,kid2:base64` (the `DROVER_KEYS` form); never printed.
    pub inline: Option<Secret>,
    /// A key file in the same format, one item per line or comma-separated, `#` comments.
    pub file: Option<PathBuf>,
}

// ---- [dispatcher] -------------------------------------------------------------------------------

/// Which task states the leader writes to `drover-tasks` (SPEC §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tracking {
    /// Every state, best effort for intermediate ones (coalesced under load).
    #[default]
    Full,
    /// Only terminal states (plus `scheduled`/`retrying` bookkeeping the leader needs).
    Terminal,
}

/// Which lifecycle events go to `DROVER_EVENTS` (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Events {
    /// No events.
    None,
    /// Terminal states only.
    #[default]
    Terminal,
    /// Every state change.
    All,
}

const fn default_lease_margin_ms() -> u64 {
    250
}
const fn default_max_batch() -> usize {
    256
}
const fn default_max_batch_bytes() -> usize {
    256 * 1024
}
const fn default_linger_ms() -> u64 {
    1
}
const fn default_intake_fetch() -> usize {
    512
}
const fn default_dispatcher_drain_ms() -> u64 {
    10_000
}

/// The dispatcher replica and, when it leads, its intake and batcher (SPEC §3, §5).
///
/// The lease itself is `topology.lease_ms`: it is the max_age of the election bucket, which
/// every replica must agree on, so it has exactly one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherSettings {
    /// A leader stops leading this long before its lease could expire on the server (covers
    /// clock skew between NATS servers); at most half of `topology.lease_ms`.
    pub lease_margin_ms: u64,
    /// Most tasks in one envelope (1..=4096).
    pub max_batch: usize,
    /// Most plaintext bytes in one envelope, before compression (1 KiB..=`codec.max_decompressed`).
    pub max_batch_bytes: usize,
    /// Longest a task waits for company in a busy intake, in milliseconds (0..=1000).
    pub linger_ms: u64,
    /// Intake messages asked for per pull (1..=`topology.intake_max_ack_pending`).
    pub intake_fetch: usize,
    /// Which task states are written to `drover-tasks`: `full` or `terminal`.
    pub tracking: Tracking,
    /// Which lifecycle events are published: `none`, `terminal` or `all`.
    pub events: Events,
    /// Seal task results in `drover-tasks` with the envelope codec, so submitters cannot read
    /// them (SPEC §8).
    pub encrypt_results: bool,
    /// On SIGTERM, how long the leader may take to hand over before it exits anyway, in ms.
    pub drain_timeout_ms: u64,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            lease_margin_ms: default_lease_margin_ms(),
            max_batch: default_max_batch(),
            max_batch_bytes: default_max_batch_bytes(),
            linger_ms: default_linger_ms(),
            intake_fetch: default_intake_fetch(),
            tracking: Tracking::default(),
            events: Events::default(),
            encrypt_results: false,
            drain_timeout_ms: default_dispatcher_drain_ms(),
        }
    }
}

// ---- [worker] -----------------------------------------------------------------------------------

const fn default_capacity() -> u32 {
    1
}
const fn default_heartbeat_ms() -> u64 {
    1_000
}
const fn default_fence_margin_ms() -> u64 {
    500
}
const fn default_worker_drain_ms() -> u64 {
    30_000
}
const fn default_max_redeliveries() -> u32 {
    5
}

/// A worker process (SPEC §6). Its TTL is `topology.worker_ttl_ms` (the max_age of the workers
/// bucket and the ack wait of partition consumers), so it has exactly one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Queues to serve: a list, or one comma-separated string.
    #[serde(deserialize_with = "list::deserialize")]
    pub queues: Vec<String>,
    /// Tasks run at once; unset means 4 × the number of CPU cores.
    pub concurrency: Option<usize>,
    /// Weight in the partition ring (1..=1000).
    pub capacity: u32,
    /// Heartbeat period in milliseconds; twice it must be less than `topology.worker_ttl_ms`.
    pub heartbeat_ms: u64,
    /// A worker without a successful heartbeat for `topology.worker_ttl_ms − fence_margin_ms`
    /// fences itself (starts nothing, acks nothing).
    pub fence_margin_ms: u64,
    /// On SIGTERM, how long running tasks may take to finish before the rest are NAKed, in ms.
    pub drain_timeout_ms: u64,
    /// Deliveries of one batch after which its unfinished tasks fail as `lost` (1..=100).
    pub max_redeliveries: u32,
    /// Serve the built-in demo handlers `noop`, `echo`, `sleep` and `fail`.
    pub builtins: bool,
    /// External-process handlers, by task type.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exec: BTreeMap<String, ExecHandler>,
    /// HTTP handlers, by task type.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub http: BTreeMap<String, HttpHandler>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            queues: vec!["default".to_owned()],
            concurrency: None,
            capacity: default_capacity(),
            heartbeat_ms: default_heartbeat_ms(),
            fence_margin_ms: default_fence_margin_ms(),
            drain_timeout_ms: default_worker_drain_ms(),
            max_redeliveries: default_max_redeliveries(),
            builtins: true,
            exec: BTreeMap::new(),
            http: BTreeMap::new(),
        }
    }
}

impl WorkerSettings {
    /// `concurrency`, or 4 × the CPU cores this process may use when it is unset.
    pub fn effective_concurrency(&self) -> usize {
        self.concurrency.unwrap_or_else(|| {
            4 * std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        })
    }
}

// ---- [queues.<name>] ----------------------------------------------------------------------------

/// How a task without a key picks its partition (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each partition in turn.
    #[default]
    RoundRobin,
    /// The partition with the fewest pending messages.
    LeastLoaded,
    /// A uniformly random partition.
    Random,
}

const fn default_partitions() -> u32 {
    64
}
const fn default_queue_timeout_ms() -> u64 {
    300_000
}
const fn default_queue_max_in_flight() -> u32 {
    1
}

/// Options of one queue. A queue exists from its first submit with these defaults; a
/// `[queues.<name>]` table predeclares it with other values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Partitions (1..=1024); fixed for the queue's life, and the most workers it can use.
    pub partitions: u32,
    /// Partition choice for tasks without a key.
    pub strategy: Strategy,
    /// Attempt timeout of tasks that give none, in milliseconds.
    pub timeout_ms: u64,
    /// Batches of one partition in flight at once (1 keeps per-key order; 1..=1024).
    pub max_in_flight: u32,
    /// Start paused: tasks are accepted but not dispatched until `drover.api.queue.resume`.
    pub paused: bool,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            partitions: default_partitions(),
            strategy: Strategy::default(),
            timeout_ms: default_queue_timeout_ms(),
            max_in_flight: default_queue_max_in_flight(),
            paused: false,
        }
    }
}

// ---- [metrics], [log] ---------------------------------------------------------------------------

/// The default metrics address: loopback, any free port.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:0";

/// The HTTP endpoint with `/metrics`, `/healthz` and `/readyz` (SPEC §9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// `host:port` to listen on; port 0 picks a free one (the bound address is logged).
    pub addr: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            addr: DEFAULT_METRICS_ADDR.to_owned(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` (human-readable lines) or `json` (one object per line).
    #[serde(with = "log_format")]
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or directives (`info,drover_worker=debug`).
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

// ---- serde helpers ------------------------------------------------------------------------------

/// [`LogFormat`] (a clap value enum) as the strings `text` and `json`.
pub(crate) mod log_format {
    use crate::config::LogFormat;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub(crate) const fn as_str(format: LogFormat) -> &'static str {
        match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    pub(crate) fn serialize<S: Serializer>(f: &LogFormat, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(as_str(*f))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LogFormat, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(de::Error::custom(format_args!(
                "unknown log format `{other}`, expected `text` or `json`"
            ))),
        }
    }
}

/// A list of strings given as an array or as one comma-separated string (`"a,b"`), so the
/// same setting reads naturally in TOML and in an environment variable.
pub(crate) mod list {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or an array of strings")]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }

    /// Splits `s` at commas, trimming items and dropping empty ones.
    pub(crate) fn split(s: &str) -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) => split(&s),
            Raw::Many(v) => v.into_iter().map(|s| s.trim().to_owned()).collect(),
        })
    }
}
