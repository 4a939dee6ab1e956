//! The request API of SPEC §1.3, served by every replica — leader or not — in one queue group,
//! so each request is answered once, by whichever replica the server picks: validated submit,
//! status, cancel and retry over core NATS request-reply, JSON in and out.
//!
//! | module | role |
//! |---|---|
//! | [`request`] | pure: routing, request parsing, submit ids, the cancel/retry record transitions |
//! | `submit` | `<prefix>.api.submit.<queue>`: validate like the intake, then publish into `DROVER_SUBMIT` |
//! | `control` | `<prefix>.api.{status,cancel,retry}` over `drover-tasks` (compare-and-set on revisions) |
//! | `crate::schedule` | `<prefix>.api.schedule.{put,delete,pause,resume,trigger}` over `drover-schedules` |
//!
//! Every request gets exactly one reply: `{"ok":true,...}` or the error object of §1.5. A
//! handler that hits a NATS failure answers `unavailable`; one that panics answers `internal`.
//! Replies carry the answering replica's id in the `Drover-Replica` header.
//!
//! The API never creates task records: the leader's intake creates them (a create with expected
//! sequence 0 is its duplicate check), so a record written here would turn the submission into
//! a duplicate.

mod control;
pub mod request;
mod submit;

use crate::delays::unique::UniqueStore;
use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, Message, Subscriber};
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::names::Names;
use futures::{FutureExt, StreamExt};
use request::Endpoint;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

/// Header on every reply: the id of the replica that answered.
pub const HDR_REPLICA: &str = "Drover-Replica";
/// Header of a retry submission and of the record it resets: which retry of the task it is.
pub const HDR_RETRY: &str = "Drover-Retry";
/// Header naming the task of a retry submission and of a dead-letter copy.
pub const HDR_TASK_ID: &str = "Drover-Task-Id";
/// Requests handled at once per replica; more wait in the subscription.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a shutting-down replica keeps answering what it already received.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Longest scan of a queue's dead letters for a retry.
pub const DLQ_SCAN_DEADLINE: Duration = Duration::from_secs(4);
/// Compare-and-set attempts on a record before giving up with `unavailable`.
pub const CAS_ATTEMPTS: usize = 5;

/// What the API needs from the process.
#[derive(Clone)]
pub struct ApiContext {
    /// The connection requests arrive on and replies leave by.
    pub client: async_nats::Client,
    /// JetStream on that connection.
    pub js: jetstream::Context,
    /// Names under the prefix.
    pub names: Names,
    /// This replica's id (the `Drover-Replica` reply header).
    pub replica: String,
    /// The server's `max_payload`: larger submissions are `too_large`.
    pub max_payload: usize,
    /// Per-attempt timeout of tasks that name none (as the intake applies it).
    pub default_timeout_ms: u64,
}

impl ApiContext {
    /// The queue group every replica's subscriptions join: `<prefix>-api`.
    pub fn queue_group(&self) -> String {
        self.names.bucket("api")
    }
}

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Subscribing to an endpoint failed.
    #[error("cannot subscribe to {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// What the client said.
        reason: String,
    },
    /// The task bucket cannot be opened (is the topology provisioned?).
    #[error("cannot open the task bucket {bucket}: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// What the server said.
        reason: String,
    },
}

/// Shared state of the handlers.
pub(crate) struct Api {
    ctx: ApiContext,
    tasks: kv::Store,
    unique: UniqueStore,
    schedules: crate::schedule::api::ScheduleApi,
}

/// `unavailable`, for a NATS request that failed: the same request may succeed later.
pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("{what}: {e}; retry the request later"),
    )
}

/// Serves the API until `cancel` fires, then stops taking requests and answers those already
/// received (for up to [`DRAIN_DEADLINE`]). Every replica runs it, leader or not.
pub async fn serve_api(ctx: ApiContext, cancel: CancellationToken) -> Result<(), ServeError> {
    let bucket = ctx.names.bucket("tasks");
    let tasks = ctx
        .js
        .get_key_value(&bucket)
        .await
        .map_err(|e| ServeError::Bucket {
            bucket: bucket.clone(),
            reason: e.to_string(),
        })?;
    let unique = UniqueStore::open(&ctx.js, &ctx.names)
        .await
        .map_err(|reason| ServeError::Bucket {
            bucket: ctx.names.bucket("unique"),
            reason,
        })?;
    let schedules = crate::schedule::api::ScheduleApi::open(
        ctx.js.clone(),
        ctx.names.clone(),
        crate::intake::IntakeLimits {
            max_payload: ctx.max_payload,
            default_timeout_ms: ctx.default_timeout_ms,
        },
    )
    .await
    .map_err(|reason| ServeError::Bucket {
        bucket: ctx.names.bucket("schedules"),
        reason,
    })?;
    let group = ctx.queue_group();
    let mut subs: Vec<Subscriber> = Vec::new();
    for endpoint in ["submit.>", "status", "cancel", "retry", "schedule.*"] {
        let subject = ctx.names.api(endpoint);
        let sub = ctx
            .client
            .queue_subscribe(subject.clone(), group.clone())
            .await
            .map_err(|e| ServeError::Subscribe {
                subject,
                reason: e.to_string(),
            })?;
        subs.push(sub);
    }
    info!(replica = %ctx.replica, group = %group, "serving the request API");
    let api = Arc::new(Api {
        ctx,
        tasks,
        unique,
        schedules,
    });
    let mut incoming = futures::stream::select_all(subs);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut running = JoinSet::new();

    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
            m = incoming.next() => m,
        };
        let Some(msg) = msg else {
            warn!("request API subscriptions closed");
            return Ok(());
        };
        spawn_answer(&api, &permits, &mut running, msg).await;
    }

    // Stop taking new requests; answer what the server already sent.
    for sub in incoming.iter_mut() {
        if let Err(e) = sub.drain().await {
            debug!(error = %e, "draining an API subscription");
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, incoming.next()).await {
        spawn_answer(&api, &permits, &mut running, msg).await;
    }
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, running.join_next()).await {}
    if !running.is_empty() {
        warn!(
            requests = running.len(),
            "request API stopped with requests unanswered"
        );
    }
    running.abort_all();
    Ok(())
}

/// Answers `msg` in its own task, waiting for room when [`MAX_IN_FLIGHT`] are running.
async fn spawn_answer(
    api: &Arc<Api>,
    permits: &Arc<Semaphore>,
    running: &mut JoinSet<()>,
    msg: Message,
) {
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return;
    };
    let span = tracing::debug_span!("api", subject = %msg.subject);
    let api = api.clone();
    running.spawn(
        async move {
            api.answer(msg).await;
            drop(permit);
        }
        .instrument(span),
    );
}

impl Api {
    /// Handles one request and sends its one reply.
    async fn answer(&self, msg: Message) {
        let Some(reply) = msg.reply.clone() else {
            debug!(subject = %msg.subject, "request without a reply subject; ignored");
            return;
        };
        let body = match AssertUnwindSafe(self.handle(&msg)).catch_unwind().await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                debug!(code = %e.code, message = %e.message, "request refused");
                e.to_json()
            }
            Err(_) => {
                warn!(subject = %msg.subject, "request handler panicked");
                ApiError::new(
                    ErrorCode::Internal,
                    "the request failed inside the dispatcher; this is a bug, please report it",
                )
                .to_json()
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(HDR_REPLICA, self.ctx.replica.as_str());
        if let Err(e) = self
            .ctx
            .client
            .publish_with_headers(reply, headers, body.into())
            .await
        {
            warn!(error = %e, "cannot send a reply");
        }
    }

    async fn handle(&self, msg: &Message) -> Result<Vec<u8>, ApiError> {
        let endpoint = request::route(&self.ctx.names, msg.subject.as_str()).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no such endpoint: {}", msg.subject),
            )
        })?;
        match endpoint {
            Endpoint::Submit(queue) => self.submit(queue, msg).await,
            Endpoint::Status => self.status(&request::parse_id_request(&msg.payload)?).await,
            Endpoint::Cancel => self.cancel(&request::parse_id_request(&msg.payload)?).await,
            Endpoint::Retry => self.retry(&request::parse_id_request(&msg.payload)?).await,
            Endpoint::Schedule(op) => self.schedules.handle(op, &msg.payload).await,
        }
    }
}

/// Serializes a success reply.
pub(crate) fn to_reply<T: serde::Serialize>(reply: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(reply)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot encode the reply: {e}")))
}
