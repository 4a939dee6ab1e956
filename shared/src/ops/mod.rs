//! The ops HTTP surface every Drover component serves (SPEC §9): Prometheus `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! * [`Health`] — liveness, readiness and named checks, updated by the component.
//! * [`Metrics`] — the metric registry, with the process metrics already in it; metrics are
//!   declared as [`MetricDef`] constants (name, help, unit) in each component's `metrics.rs`.
//! * [`serve`] — binds the address (port 0 = any free port), returns the bound address at once,
//!   and serves until the shutdown future completes.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | 200, every metric in the OpenMetrics 1.0.0 text format ([`CONTENT_TYPE`]) |
//! | `GET /healthz` | 200 `ok` while live (the main loop runs), else 503 `not live: starting` or `…: stopped` |
//! | `GET /readyz` | 200 `ok` when ready, else 503 and one line per reason, failing checks by name |
//! | anything else | 404 |
//!
//! # Declaring a component's metrics
//!
//! ```
//! use drover_shared::ops::{Metrics, MetricDef, Unit, Counter, Family, Gauge, Histogram};
//!
//! // metrics.rs: every name once, with help text and unit.
//! pub const BATCHES_PUBLISHED: MetricDef =
//!     MetricDef::new("drover_batches_published", "Sealed batches published to a worker");
//! pub const BATCH_SEAL: MetricDef =
//!     MetricDef::new("drover_batch_seal", "Time to compress, encrypt and sign a batch")
//!         .with_unit(Unit::Seconds);
//! pub const OUTCOMES: MetricDef =
//!     MetricDef::new("drover_task_outcomes", "Task outcomes recorded, by queue and outcome");
//! pub const PARTITIONS_OWNED: MetricDef =
//!     MetricDef::new("drover_partitions_owned", "Partitions this worker consumes");
//!
//! type OutcomeLabels = [(&'static str, String); 2]; // or a struct deriving EncodeLabelSet
//!
//! /// The component's metric handles; cloning one is cheap.
//! pub struct DispatcherMetrics {
//!     pub batches_published: Counter,
//!     pub batch_seal: Histogram,
//!     pub outcomes: Family<OutcomeLabels, Counter>,
//!     pub partitions_owned: Gauge,
//! }
//!
//! impl DispatcherMetrics {
//!     pub fn register(m: &mut Metrics) -> Self {
//!         Self {
//!             batches_published: m.counter(&BATCHES_PUBLISHED),
//!             batch_seal: m.latency_histogram(&BATCH_SEAL),
//!             outcomes: m.family(&OUTCOMES),
//!             partitions_owned: m.gauge(&PARTITIONS_OWNED),
//!         }
//!     }
//! }
//!
//! let mut registry = Metrics::new("dispatcher", env!("CARGO_PKG_VERSION"));
//! let metrics = DispatcherMetrics::register(&mut registry);
//! metrics.batches_published.inc();
//! metrics.batch_seal.observe(0.000_8);
//! metrics.outcomes
//!     .get_or_create(&[("queue", "default".into()), ("outcome", "ok".into())])
//!     .inc();
//! let text = registry.render();
//! assert!(text.contains("drover_batches_published_total 1"));
//! assert!(text.contains("drover_task_outcomes_total{queue=\"default\",outcome=\"ok\"} 1"));
//! ```
//!
//! # Process metrics
//!
//! [`Metrics::new`] registers `drover_build_info{version,component}` (1), `drover_up` (1),
//! `drover_process_uptime_seconds`, and, read from `/proc/self` at each scrape,
//! `drover_process_cpu_seconds_total`, `drover_process_resident_memory_bytes` and
//! `drover_process_open_fds`. A value that cannot be read is left out of the scrape.
//!
//! # Serving
//!
//! ```no_run
//! # use std::future::Future;
//! # async fn run(
//! #     shutdown: impl Future<Output = ()> + Send + 'static,
//! # ) -> Result<(), drover_shared::ops::OpsError> {
//! use drover_shared::ops::{serve, Health, Metrics};
//! use std::sync::Arc;
//!
//! let health = Health::new();
//! let metrics = Arc::new(Metrics::new("worker", env!("CARGO_PKG_VERSION")));
//! // With the root CancellationToken: `token.clone().cancelled_owned()`.
//! let addr = serve("127.0.0.1:0", metrics, health.clone(), shutdown).await?;
//! tracing::info!(%addr, "ops HTTP listening"); // and store it in the component's KV record
//! health.set_live(true);
//! # Ok(()) }
//! ```

mod health;
mod metrics;
mod process;
pub mod service;

pub use health::Health;
pub use metrics::{
    BYTES_BUCKETS, COUNT_BUCKETS, LATENCY_BUCKETS, MetricDef, Metrics, Unit, new_bytes_histogram,
    new_count_histogram, new_latency_histogram,
};
pub use process::{
    BUILD_INFO, PROCESS_CPU, PROCESS_OPEN_FDS, PROCESS_RESIDENT_MEMORY, PROCESS_UPTIME, UP,
};
/// The `prometheus-client` crate this module builds on, for what the helpers do not cover.
pub use prometheus_client;
/// The metric types a component's metrics struct holds, re-exported so a component needs no
/// direct `prometheus-client` dependency (except to derive `EncodeLabelSet` on a label struct).
pub use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument;

/// The `Content-Type` of `/metrics`: the OpenMetrics 1.0.0 text format that prometheus-client
/// encodes (with its `# EOF` trailer), which Prometheus asks for first in its `Accept` header.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` of `/healthz`, `/readyz` and the 404 answer.
const TEXT: &str = "text/plain; charset=utf-8";

/// Why the ops server could not start. Each message names the address.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The address is not `host:port`, or its host does not resolve.
    #[error(
        "bad ops HTTP address {addr:?} (expected host:port, e.g. 127.0.0.1:9090; port 0 picks a free port): {source}"
    )]
    BadAddress {
        /// The address as given.
        addr: String,
        /// The parse or resolution error.
        source: io::Error,
    },
    /// The address is valid but cannot be bound (in use, not local, no permission).
    #[error("cannot listen for ops HTTP on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// The bind error.
        source: io::Error,
    },
}

/// What each handler needs.
#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    health: Health,
}

/// Binds `addr` (`host:port`; port 0 picks a free port), starts serving `/metrics`, `/healthz`
/// and `/readyz` on a spawned task, and returns the bound address at once. The server stops
/// accepting when `shutdown` completes (pass `token.clone().cancelled_owned()` for a
/// `CancellationToken`), lets requests in flight finish, and closes the listening socket.
///
/// Must be called within a tokio runtime.
pub async fn serve<F>(
    addr: &str,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: F,
) -> Result<SocketAddr, OpsError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let candidates: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| OpsError::BadAddress {
            addr: addr.to_owned(),
            source,
        })?
        .collect();
    let listener = tokio::net::TcpListener::bind(candidates.as_slice())
        .await
        .map_err(|source| OpsError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| OpsError::Bind {
        addr: addr.to_owned(),
        source,
    })?;

    let app = router(OpsState { metrics, health });
    let server = async move {
        match axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            Ok(()) => tracing::debug!("ops HTTP server stopped"),
            Err(e) => tracing::error!(error = %e, "ops HTTP server failed"),
        }
    };
    // On shutdown the task stops by itself; an error is logged (the component keeps running:
    // its work does not depend on being observed).
    tokio::spawn(server.instrument(tracing::info_span!("ops_http", addr = %local)));
    Ok(local)
}

fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics_handler(State(state): State<OpsState>) -> Response {
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn healthz(State(state): State<OpsState>) -> Response {
    match state.health.not_live_reason() {
        None => text(StatusCode::OK, "ok\n".to_owned()),
        Some(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {why}\n"),
        ),
    }
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let reasons = state.health.not_ready_reasons();
    if reasons.is_empty() {
        text(StatusCode::OK, "ok\n".to_owned())
    } else {
        let mut body = reasons.join("\n");
        body.push('\n');
        text(StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found; try /metrics, /healthz or /readyz\n".to_owned(),
    )
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT)], body).into_response()
}
