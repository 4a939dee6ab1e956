//! Partition assignment (SPEC §4): while leading, watch `drover-workers`, and on every join,
//! leave or expiry compute the bounded-load ring of each affected queue and write
//! `assignment.<queue>` in `drover-state`, stamped with the leader's epoch, by compare-and-set.
//!
//! | part | role |
//! |---|---|
//! | [`record`] | the JSON records read and written ([`AssignmentRecord`], worker and queue records) |
//! | [`plan`] | which queues need a new assignment, and when ([`Planner`], no I/O) |
//! | [`decide`](mod@decide) | what to write for one queue given what is stored ([`decide()`], no I/O) |
//! | `feed` | a KV watch that knows when its initial values are in and reopens itself |
//! | this module | the thin NATS shell: the loop, and [`reconcile`] (read, decide, compare-and-set) |
//!
//! The dispatcher spawns [`assign_loop`] next to [`crate::leader::lead`] when leadership starts,
//! with the same cancellation token. The loop:
//!
//! * watches every key of `drover-workers` (expiry shows up as a limit marker, i.e. a non-put
//!   entry) and every key of `drover-state` (queue records add queues and set their partition
//!   count; assignment records tell which queues exist and whether a later term wrote one);
//! * acts only once both watches have delivered their initial values, so a new leader never
//!   writes from a partial view; changes are gathered for [`AssignConfig::debounce`] so a burst
//!   of joins becomes one write per queue, and every queue is re-checked each
//!   [`AssignConfig::recheck`] in case a watch missed something; a lost watch is reopened;
//! * stops (returning `Ok`) when it finds an assignment written in a later term — it has been
//!   deposed — and at once when the token is cancelled.
//!
//! Errors on the way (a failed read or write, a lost watch) are logged and retried; the loop
//! ends with an error only for an unusable configuration.

pub mod decide;
mod feed;
pub mod plan;
pub mod record;

pub use decide::{Decision, decide};
pub use plan::{Planner, PlannerConfig, Target};
pub use record::{AssignmentRecord, assignment_key};

use async_nats::jetstream::{self, kv};
use drover_shared::names::Names;
use drover_shared::ring::{self, MAX_PARTITIONS, RingError};
use feed::WatchFeed;
use plan::{Action, Event, Feed};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Compare-and-set attempts on one key before giving up for this round.
pub const MAX_CAS_ATTEMPTS: u32 = 8;

/// Most time between attempts to open a bucket or reopen a lost watch.
const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(5);

/// Settings of the assigner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignConfig {
    /// Partitions of a queue that has no `queue.<queue>` record yet (the dispatcher's
    /// `--partitions`). The assigner never creates that record; the intake does.
    pub default_partitions: u32,
    /// How long changes are gathered before writing (coalesces bursts of joins).
    pub debounce: Duration,
    /// How often every queue is re-checked without a change; the worker TTL.
    pub recheck: Duration,
    /// Delay before a failed write is tried again.
    pub retry: Duration,
}

impl AssignConfig {
    /// The default debounce.
    pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(30);
    /// The default retry delay.
    pub const DEFAULT_RETRY: Duration = Duration::from_millis(500);

    /// Defaults for a dispatcher whose queues default to `default_partitions` partitions and
    /// whose workers expire after `worker_ttl`.
    pub const fn new(default_partitions: u32, worker_ttl: Duration) -> Self {
        Self {
            default_partitions,
            debounce: Self::DEFAULT_DEBOUNCE,
            recheck: worker_ttl,
            retry: Self::DEFAULT_RETRY,
        }
    }

    fn planner(&self) -> PlannerConfig {
        PlannerConfig {
            default_partitions: self.default_partitions,
            debounce: self.debounce,
            recheck: self.recheck,
            retry: self.retry,
        }
    }
}

/// What the assigner needs from the process.
#[derive(Clone)]
pub struct AssignContext {
    /// JetStream.
    pub js: jetstream::Context,
    /// Names under the prefix.
    pub names: Names,
    /// Settings.
    pub config: AssignConfig,
}

/// Why an assignment step failed.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// The configuration cannot work.
    #[error("invalid assignment configuration: {0}")]
    Config(String),
    /// A NATS request failed.
    #[error("{op}: {message}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        message: String,
    },
    /// The ring refused the inputs (a partition count out of range).
    #[error("cannot compute the assignment of queue {queue}: {source}")]
    Ring {
        /// The queue.
        queue: String,
        /// The ring's error.
        source: RingError,
    },
    /// Every compare-and-set lost against a concurrent writer.
    #[error("assignment.{queue}: compare-and-set lost {attempts} times in a row")]
    Contended {
        /// The queue.
        queue: String,
        /// Attempts made.
        attempts: u32,
    },
}

impl AssignError {
    /// `true` if trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Nats { .. } | Self::Contended { .. })
    }
}

fn nats_err(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> AssignError {
    move |e| AssignError::Nats {
        op,
        message: e.to_string(),
    }
}

/// The result of one [`reconcile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// The stored assignment was already right; nothing written.
    Unchanged,
    /// A new assignment was written.
    Written {
        /// What was written.
        record: AssignmentRecord,
        /// Its revision in `drover-state`.
        revision: u64,
        /// Partitions whose owner changed from the previous record.
        moved: usize,
    },
    /// The stored assignment comes from a later term; nothing written, stop assigning.
    Deposed {
        /// The stored record's epoch.
        epoch: u64,
    },
}

/// One compare-and-set step for one queue: read `assignment.<queue>` from `state` (the
/// `drover-state` bucket), [`decide()`] for the leader of `epoch`, and write with `update` on the
/// revision read (`create` when the key never existed). A lost compare-and-set re-reads and
/// decides again — so a record of a later term, written meanwhile, is seen and refused.
pub async fn reconcile(
    state: &kv::Store,
    target: &Target,
    epoch: u64,
) -> Result<Reconciled, AssignError> {
    let key = assignment_key(&target.queue);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let entry = state
            .entry(key.clone())
            .await
            .map_err(|e| nats_err("read assignment")(&e))?;
        let (stored, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let stored = AssignmentRecord::parse(&e.value).unwrap_or_else(|err| {
                    warn!(key = %key, error = %err, "stored assignment unreadable; replacing it");
                    unreadable(&e.value)
                });
                (Some(stored), Some(e.revision))
            }
            // Deleted or purged: write over the marker.
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        };
        let decision =
            decide(target, stored.as_ref(), epoch).map_err(|source| AssignError::Ring {
                queue: target.queue.clone(),
                source,
            })?;
        let record = match decision {
            Decision::Deposed { stored_epoch } => {
                return Ok(Reconciled::Deposed {
                    epoch: stored_epoch,
                });
            }
            Decision::Unchanged => return Ok(Reconciled::Unchanged),
            Decision::Write(record) => record,
        };
        let value = record.to_json().into();
        let written = match revision {
            Some(rev) => state.update(&key, value, rev).await.map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
            None => state.create(&key, value).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
        };
        match written {
            Ok(revision) => {
                let moved = stored.map_or(record.partitions.len(), |s| {
                    ring::moved(&s.assignment(), &record.assignment())
                });
                return Ok(Reconciled::Written {
                    record,
                    revision,
                    moved,
                });
            }
            Err((true, _)) => {
                debug!(key = %key, "assignment changed under us; re-reading");
            }
            Err((false, message)) => {
                return Err(AssignError::Nats {
                    op: "write assignment",
                    message,
                });
            }
        }
    }
    Err(AssignError::Contended {
        queue: target.queue.clone(),
        attempts: MAX_CAS_ATTEMPTS,
    })
}

/// A stand-in for a stored record that does not parse: no owners, epoch 0, and the version it
/// carries if that much can be read, so versions keep increasing.
fn unreadable(bytes: &[u8]) -> AssignmentRecord {
    let version = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("version")?.as_u64())
        .unwrap_or(0);
    AssignmentRecord {
        version,
        ..AssignmentRecord::default()
    }
}

/// Assigns partitions for the leader of `epoch` until `cancel` fires or a later term's
/// assignment shows it has been deposed (both return `Ok`). See the module documentation.
pub async fn assign_loop(
    ctx: AssignContext,
    epoch: u64,
    cancel: CancellationToken,
) -> Result<(), AssignError> {
    let cfg = ctx.config;
    if !(1..=MAX_PARTITIONS).contains(&cfg.default_partitions) {
        return Err(AssignError::Config(format!(
            "default partitions must be between 1 and {MAX_PARTITIONS}, got {}",
            cfg.default_partitions
        )));
    }
    if cfg.recheck.is_zero() {
        return Err(AssignError::Config(
            "recheck period must be positive".into(),
        ));
    }
    let Some(state_kv) = open_bucket(&ctx, "state", &cancel).await else {
        return Ok(());
    };
    let Some(workers_kv) = open_bucket(&ctx, "workers", &cancel).await else {
        return Ok(());
    };
    let mut workers = WatchFeed::new(Feed::Workers, workers_kv, &ctx.names);
    let mut state = WatchFeed::new(Feed::State, state_kv.clone(), &ctx.names);
    let mut planner = Planner::new(cfg.planner(), epoch);
    info!(epoch, "assigning partitions");

    loop {
        let mut events = Vec::new();
        for feed in [&mut workers, &mut state] {
            if feed.reopen_due(Instant::now()) {
                events.extend(feed.open(&ctx.js).await);
            }
        }
        if events.is_empty() {
            let deadline = [
                planner.next_deadline(),
                workers.deadline(),
                state.deadline(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            events = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                item = workers.next() => workers.on_item(item),
                item = state.next() => state.on_item(item),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    let mut evs = workers.on_timer(now);
                    evs.extend(state.on_timer(now));
                    evs.push(Event::Tick);
                    evs
                }
            };
        }
        for event in events {
            for action in planner.on_event(event, Instant::now()) {
                match action {
                    Action::Warn { key, reason } => warn!(%key, %reason, "assignment input"),
                    Action::Deposed { epoch: newer } => {
                        info!(
                            epoch,
                            newer, "an assignment of a later term exists; deposed"
                        );
                        return Ok(());
                    }
                    Action::Reconcile(target) => {
                        let result = tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return Ok(()),
                            r = reconcile(&state_kv, &target, epoch) => r,
                        };
                        match result {
                            Ok(Reconciled::Unchanged) => {
                                debug!(queue = %target.queue, "assignment unchanged");
                            }
                            Ok(Reconciled::Written {
                                record,
                                revision,
                                moved,
                            }) => info!(
                                queue = %target.queue,
                                epoch,
                                version = record.version,
                                revision,
                                partitions = record.partitions.len(),
                                members = record.members.len(),
                                moved,
                                "assignment written"
                            ),
                            Ok(Reconciled::Deposed { epoch: newer }) => {
                                info!(epoch, newer, queue = %target.queue,
                                    "assignment written in a later term; deposed");
                                return Ok(());
                            }
                            Err(e) => {
                                warn!(queue = %target.queue, error = %e, "assignment not written; will retry");
                                planner.on_event(
                                    Event::Failed {
                                        queue: target.queue.clone(),
                                    },
                                    Instant::now(),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Opens a bucket, retrying with backoff until it works or `cancel` fires (`None`).
async fn open_bucket(
    ctx: &AssignContext,
    suffix: &str,
    cancel: &CancellationToken,
) -> Option<kv::Store> {
    let name = ctx.names.bucket(suffix);
    let mut backoff = Duration::from_millis(100);
    loop {
        match ctx.js.get_key_value(&name).await {
            Ok(kv) => return Some(kv),
            Err(e) => warn!(bucket = %name, error = %e, "cannot open bucket; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_REOPEN_BACKOFF);
    }
}
