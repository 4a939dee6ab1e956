//! # drover-worker
//!
//! A stateless Drover worker (SPEC §6) and the handler API for users who embed their own Rust
//! handlers (SPEC §6.1).
//!
//! ```no_run
//! use drover_worker::{HandlerError, Worker};
//! # async fn demo(settings: drover_shared::settings::Settings) -> Result<(), Box<dyn std::error::Error>> {
//! let worker = Worker::builder(settings)
//!     .handler("greet", |ctx, name: String| async move {
//!         Ok::<_, HandlerError>(serde_json::json!({"hello": name, "attempt": ctx.attempt()}))
//!     })
//!     .build()?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! worker.run(shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! | module | role |
//! |---|---|
//! | [`fence`] | pure: heartbeat results + time → fenced or not |
//! | [`partitions`] | pure: `assignment.<queue>` records → start/stop partition consumers |
//! | [`plan`] | pure: which tasks of a batch run, key chains, delivery counts |
//! | [`handler`] | `TaskContext`, `HandlerError`, the registry of handler kinds |
//! | [`builtins`] | `noop`, `echo`, `sleep`, `fail` |
//! | [`checkpoint`] | sealed checkpoints in `drover-checkpoints` |
//! | [`batch`] | one envelope from delivery to ack (NATS) |
//! | [`state`] | what the running parts share; the fence gate |
//! | [`run`] | the process: heartbeat, assignment watch, pull loops, cancel listener, drain |
//! | [`metrics`] | every worker metric, as constants |
//! | [`exec`] | `exec` handlers: one sandboxed process per run |
//! | [`http`] | `http` handlers: a POST per task, per-type circuit breaker |
//! | [`circuit`] | pure: the circuit breaker state machine |

#![warn(missing_docs)]

pub mod batch;
pub mod builtins;
pub mod checkpoint;
pub mod circuit;
pub mod exec;
pub mod fence;
pub mod handler;
pub mod http;
pub mod metrics;
pub mod partitions;
pub mod plan;
pub mod progress;
pub mod run;
pub mod state;

pub use handler::{HandlerError, HandlerKind, HandlerOutput, Registry, TaskContext};
pub use run::{Worker, WorkerBuilder, WorkerError};
