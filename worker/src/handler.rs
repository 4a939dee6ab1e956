//! The handler API (SPEC §6.1): what a task type runs, and what it sees while running.
//!
//! * [`TaskContext`] — id, attempt, idempotency key `<id>:<attempt>`, key, shard, deadline,
//!   cancellation token, [`TaskContext::progress`], [`TaskContext::checkpoint`] and
//!   [`TaskContext::last_checkpoint`] (sealed in `drover-checkpoints`, so they survive failover).
//! * [`HandlerError`] — how a handler says an attempt failed.
//! * [`Registry`] — task type → [`HandlerKind`]. Rust closures and the built-ins are kinds;
//!   the configured `exec` and `http` handlers plug in as one variant and one match arm each
//!   (see [`HandlerKind`]).

use crate::builtins::Builtin;
use crate::checkpoint::{CheckpointError, Checkpoints};
use drover_shared::outcome::MAX_RESULT_BYTES;
use drover_shared::task::{ErrorKind, ShardInfo, Task, TaskError};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a handler says an attempt failed. The kind decides whether the leader retries:
/// [`HandlerError::new`] (kind `handler`) is retried while attempts remain,
/// [`HandlerError::invalid`] (kind `invalid`) never is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    kind: ErrorKind,
    message: String,
}

impl HandlerError {
    /// A failure that another attempt may fix (kind `handler`).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Handler,
            message: message.into(),
        }
    }

    /// The input can never work (kind `invalid`): no retry.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Invalid,
            message: message.into(),
        }
    }

    /// The error kind recorded.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message recorded.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<HandlerError> for TaskError {
    fn from(e: HandlerError) -> Self {
        TaskError {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        Self::invalid(format!("payload: {e}"))
    }
}

impl From<CheckpointError> for HandlerError {
    fn from(e: CheckpointError) -> Self {
        Self::new(format!("checkpoint: {e}"))
    }
}

/// What a Rust handler may return as its result: anything that becomes JSON.
pub trait HandlerOutput: Send {
    /// The result as JSON text.
    fn into_raw(self) -> Result<Box<RawValue>, serde_json::Error>;
}

impl HandlerOutput for Box<RawValue> {
    fn into_raw(self) -> Result<Box<RawValue>, serde_json::Error> {
        Ok(self)
    }
}

impl HandlerOutput for serde_json::Value {
    fn into_raw(self) -> Result<Box<RawValue>, serde_json::Error> {
        serde_json::value::to_raw_value(&self)
    }
}

impl HandlerOutput for () {
    fn into_raw(self) -> Result<Box<RawValue>, serde_json::Error> {
        RawValue::from_string("null".to_owned())
    }
}

/// Where [`TaskContext::progress`] reports go: `(task id, fraction)`.
pub type ProgressSink = Arc<dyn Fn(&str, f64) + Send + Sync>;

/// Everything a handler knows about the attempt it runs.
#[derive(Clone)]
pub struct TaskContext {
    task: Arc<Task>,
    worker_id: Arc<str>,
    deadline: Instant,
    cancel: CancellationToken,
    checkpoints: Checkpoints,
    progress: ProgressSink,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.task.id)
            .field("attempt", &self.task.attempt)
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    /// A context for one attempt of `task`.
    pub(crate) fn new(
        task: Arc<Task>,
        worker_id: Arc<str>,
        deadline: Instant,
        cancel: CancellationToken,
        checkpoints: Checkpoints,
        progress: ProgressSink,
    ) -> Self {
        Self {
            task,
            worker_id,
            deadline,
            cancel,
            checkpoints,
            progress,
        }
    }

    /// Task id.
    pub fn id(&self) -> &str {
        &self.task.id
    }

    /// 1-based attempt number.
    pub fn attempt(&self) -> u32 {
        self.task.attempt
    }

    /// `<id>:<attempt>`: the same for every run of this attempt (a run can repeat only around
    /// failures, SPEC §7), different for the next attempt.
    pub fn idempotency_key(&self) -> String {
        self.task.idempotency_key()
    }

    /// The task's affinity/ordering key.
    pub fn key(&self) -> Option<&str> {
        self.task.key.as_deref()
    }

    /// Shard position, for shard tasks.
    pub fn shard(&self) -> Option<ShardInfo> {
        self.task.shard
    }

    /// The id of the worker running this attempt.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Task type.
    pub fn task_type(&self) -> &str {
        &self.task.task_type
    }

    /// Queue.
    pub fn queue(&self) -> &str {
        &self.task.queue
    }

    /// Free labels of the task.
    pub fn meta(&self) -> &BTreeMap<String, String> {
        &self.task.meta
    }

    /// When the attempt times out (`timeout_ms` after it started).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Fired when the attempt is cancelled (`drover.api.cancel`), times out, or the worker
    /// fences itself or gives up draining. A handler should return soon after.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// `true` once [`TaskContext::cancellation`] fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports progress in `[0, 1]`: counted in a metric and written best-effort into the task's
    /// record as `meta.progress` (`"0.420"`), at most every 500 ms and always when it reaches 1
    /// ([`crate::progress`]).
    pub fn progress(&self, fraction: f64) {
        (self.progress)(&self.task.id, fraction.clamp(0.0, 1.0));
    }

    /// Stores `bytes` as this task's checkpoint (sealed with the envelope codec in
    /// `drover-checkpoints`), replacing the previous one. A later attempt — on any worker —
    /// reads it with [`TaskContext::last_checkpoint`].
    pub async fn checkpoint(&self, bytes: impl AsRef<[u8]>) -> Result<(), CheckpointError> {
        self.checkpoints.store(&self.task, bytes.as_ref()).await
    }

    /// The last checkpoint stored by any attempt of this task, if any.
    pub async fn last_checkpoint(&self) -> Result<Option<Vec<u8>>, CheckpointError> {
        self.checkpoints.load(&self.task).await
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Box<RawValue>, TaskError>> + Send>>;

/// A type-erased Rust handler.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn call(&self, ctx: TaskContext, payload: Box<RawValue>) -> HandlerFuture;
}

/// Adapts a closure `|ctx, payload: P| async { Ok(output) }` (P any `DeserializeOwned`, e.g.
/// `serde_json::Value`, `Box<RawValue>` or your own struct) into a [`Handler`].
struct FnHandler<F, P> {
    f: F,
    _payload: std::marker::PhantomData<fn(P)>,
}

impl<F, P, Fut, O> Handler for FnHandler<F, P>
where
    F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
    P: DeserializeOwned + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    O: HandlerOutput + 'static,
{
    fn call(&self, ctx: TaskContext, payload: Box<RawValue>) -> HandlerFuture {
        let payload: P = match serde_json::from_str(payload.get()) {
            Ok(p) => p,
            Err(e) => {
                let err = TaskError::from(HandlerError::from(e));
                return Box::pin(async move { Err(err) });
            }
        };
        let fut = (self.f)(ctx, payload);
        Box::pin(async move {
            let out = fut.await.map_err(TaskError::from)?;
            out.into_raw().map_err(|e| TaskError {
                kind: ErrorKind::Handler,
                message: format!("result is not JSON: {e}"),
            })
        })
    }
}

/// Wraps a closure as a [`Handler`].
pub fn from_fn<F, P, Fut, O>(f: F) -> Arc<dyn Handler>
where
    F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
    P: DeserializeOwned + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    O: HandlerOutput + 'static,
{
    Arc::new(FnHandler {
        f,
        _payload: std::marker::PhantomData,
    })
}

/// One kind of handler.
///
/// Adding a kind is one variant here and one arm in [`HandlerKind::invoke`].
#[derive(Clone)]
pub enum HandlerKind {
    /// A Rust handler given to [`crate::WorkerBuilder::handler`].
    Rust(Arc<dyn Handler>),
    /// One of the demo handlers (`worker.builtins`).
    Builtin(Builtin),
    /// A `[worker.exec.<type>]` table: one sandboxed process per run ([`crate::exec`]).
    Exec(Arc<drover_shared::settings::ExecHandler>),
    /// A `[worker.http.<type>]` table: a POST per run, behind the type's circuit breaker
    /// ([`crate::http`]).
    Http(Arc<crate::http::HttpHandlers>),
}

impl fmt::Debug for HandlerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rust(_) => f.write_str("Rust"),
            Self::Builtin(b) => write!(f, "Builtin({b:?})"),
            Self::Exec(_) => f.write_str("Exec"),
            Self::Http(_) => f.write_str("Http"),
        }
    }
}

impl HandlerKind {
    /// Runs one attempt; the caller enforces the deadline and cancellation around it. A result
    /// longer (as JSON) than [`MAX_RESULT_BYTES`] fails the attempt (`handler`): it could not
    /// travel in an outcome message.
    pub async fn invoke(
        &self,
        ctx: TaskContext,
        payload: Box<RawValue>,
    ) -> Result<Box<RawValue>, TaskError> {
        let result = self.invoke_unbounded(ctx, payload).await?;
        let len = result.get().len();
        if len > MAX_RESULT_BYTES {
            return Err(TaskError {
                kind: ErrorKind::Handler,
                message: format!(
                    "the result is {len} bytes as JSON, more than the {MAX_RESULT_BYTES} bytes \
                     an outcome can carry"
                ),
            });
        }
        Ok(result)
    }

    async fn invoke_unbounded(
        &self,
        ctx: TaskContext,
        payload: Box<RawValue>,
    ) -> Result<Box<RawValue>, TaskError> {
        match self {
            Self::Rust(h) => h.call(ctx, payload).await,
            Self::Builtin(b) => b.run(&ctx, &payload).await,
            Self::Exec(cfg) => {
                let identity = crate::exec::Identity::of(&ctx);
                crate::exec::run(cfg, &payload, &identity, ctx.deadline(), ctx.cancellation()).await
            }
            Self::Http(h) => {
                h.call(
                    ctx.task_type(),
                    &payload,
                    ctx.deadline(),
                    ctx.cancellation(),
                )
                .await
            }
        }
    }
}

/// Task type → handler.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, HandlerKind>,
    http: Option<Arc<crate::http::HttpHandlers>>,
}

impl Registry {
    /// The handlers the settings ask for: the built-ins when `worker.builtins` is on, then the
    /// `[worker.exec.<type>]` and `[worker.http.<type>]` tables (which replace a built-in of the
    /// same name).
    pub fn from_settings(
        settings: &drover_shared::settings::WorkerSettings,
    ) -> Result<Self, crate::http::HttpSetupError> {
        let mut r = Self::default();
        if settings.builtins {
            for b in Builtin::ALL {
                r.insert(b.name(), HandlerKind::Builtin(b));
            }
        }
        for (task_type, cfg) in &settings.exec {
            r.insert(task_type.clone(), HandlerKind::Exec(Arc::new(cfg.clone())));
        }
        if !settings.http.is_empty() {
            let http = Arc::new(crate::http::HttpHandlers::new(&settings.http)?);
            for task_type in settings.http.keys() {
                r.insert(task_type.clone(), HandlerKind::Http(http.clone()));
            }
            r.http = Some(http);
        }
        Ok(r)
    }

    /// The `http` handlers, for their circuit states.
    pub fn http(&self) -> Option<&Arc<crate::http::HttpHandlers>> {
        self.http.as_ref()
    }

    /// Registers (or replaces) the handler of `task_type`.
    pub fn insert(&mut self, task_type: impl Into<String>, kind: HandlerKind) {
        self.handlers.insert(task_type.into(), kind);
    }

    /// The handler of `task_type`.
    pub fn get(&self, task_type: &str) -> Option<&HandlerKind> {
        self.handlers.get(task_type)
    }

    /// Registered task types, sorted.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}
