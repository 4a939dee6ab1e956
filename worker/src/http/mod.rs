//! `http` handlers (SPEC §6.1): POST the task's payload to a configured URL
//! (`[worker.http.<type>]`); a 2xx answer is success and its body the result. Each target (one
//! per task type) has a circuit breaker ([`crate::circuit`]): after consecutive failures calls
//! fail at once for a cool-down, then one probe is let through.
//!
//! What counts against a target: a connection or protocol error, no answer in time, a 5xx or
//! 429 status. Other non-2xx statuses fail the attempt (kind `handler`) but show the target is
//! up, so they count as a success for the breaker. A cancelled call counts neither way.
//!
//! The client connects directly (no `HTTP_PROXY`), does not follow redirects (a 3xx fails the
//! attempt: configured headers often carry tokens that must not travel to another host) and
//! speaks HTTP/1.1 over TCP or TLS (rustls, the system's root certificates). Messages name the
//! task type and the target's origin, never the URL's path or query, nor a header value.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use drover_shared::settings::HttpHandler;
use drover_shared::task::{ErrorKind, TaskError};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde_json::value::RawValue;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::circuit::{Breaker, CircuitState, Rejection, Ticket};
use crate::exec::output;

/// Most bytes of a non-2xx answer's body quoted in the error message.
const ERROR_EXCERPT_BYTES: usize = 2 * 1024;

/// A configuration the HTTP handlers cannot work with (the settings' validation catches most of
/// these first). Messages never contain a header value.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    /// The URL does not parse or is not `http(s)://`.
    #[error("worker.http.{task_type}.url: {reason}")]
    Url {
        /// The handler's task type.
        task_type: String,
        /// What is wrong.
        reason: String,
    },
    /// A header name is not a valid HTTP field name.
    #[error("worker.http.{task_type}.headers: {name:?} is not a header name")]
    HeaderName {
        /// The handler's task type.
        task_type: String,
        /// The configured name.
        name: String,
    },
    /// A header value has bytes HTTP does not allow (the value is secret and not shown).
    #[error(
        "worker.http.{task_type}.headers.{name}: the value is not a valid header value \
         (not shown: header values are secret)"
    )]
    HeaderValue {
        /// The handler's task type.
        task_type: String,
        /// The header's name.
        name: String,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// One configured target.
struct Target {
    url: Url,
    /// `scheme://host:port`, for messages.
    origin: String,
    headers: HeaderMap,
    timeout: Duration,
    max_body: usize,
    breaker: Mutex<Breaker>,
}

/// Every `http` handler of a worker, sharing one connection pool.
pub struct HttpHandlers {
    client: reqwest::Client,
    targets: BTreeMap<String, Target>,
}

impl fmt::Debug for HttpHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.targets.iter().map(|(ty, t)| (ty, &t.origin)))
            .finish()
    }
}

impl HttpHandlers {
    /// Prepares the handlers of `config` (`[worker.http]`, by task type): parses URLs and
    /// headers and builds the client.
    pub fn new(config: &BTreeMap<String, HttpHandler>) -> Result<Self, HttpSetupError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("drover-worker/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| HttpSetupError::Client(error_chain(&e)))?;
        let mut targets = BTreeMap::new();
        for (task_type, h) in config {
            targets.insert(task_type.clone(), Target::new(task_type, h)?);
        }
        Ok(Self { client, targets })
    }

    /// Whether `task_type` has an `http` handler.
    pub fn handles(&self, task_type: &str) -> bool {
        self.targets.contains_key(task_type)
    }

    /// Runs one attempt of `task_type`'s handler: POSTs `payload` and returns the answer's body
    /// (JSON if it parses, else a string, `null` when empty).
    ///
    /// Errors: `unknown_type` without such a handler; `handler` for a non-2xx status (with a
    /// body excerpt), a connection failure, a body over `max_response_bytes` or an open circuit;
    /// `timeout` when neither `timeout_ms` nor `deadline` saw an answer; `cancelled` on cancel.
    pub async fn call(
        &self,
        task_type: &str,
        payload: &RawValue,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Box<RawValue>, TaskError> {
        let Some(target) = self.targets.get(task_type) else {
            return Err(TaskError {
                kind: ErrorKind::UnknownType,
                message: format!("no http handler for type {task_type:?}"),
            });
        };
        let now = Instant::now();
        let ticket = lock(&target.breaker).try_acquire(now.into_std());
        let admitted = match ticket {
            Ok(ticket) => Admitted {
                breaker: &target.breaker,
                ticket: Some(ticket),
            },
            Err(rejection) => return Err(circuit_error(task_type, target, rejection, now)),
        };
        let outcome = target
            .post(&self.client, payload, deadline, cancel, now)
            .await;
        match &outcome {
            Ok(_) | Err(Failure::Rejected(_)) => admitted.success(),
            Err(Failure::Cancelled) => admitted.abandon(),
            Err(Failure::Target(_) | Failure::Timeout(_)) => admitted.failure(),
        }
        outcome.map_err(|f| f.into_task_error(task_type, &target.origin))
    }

    /// Each target's breaker state, by task type (for metrics and `drover workers`).
    pub fn circuit_states(&self) -> Vec<(String, CircuitState)> {
        let now = Instant::now().into_std();
        self.targets
            .iter()
            .map(|(ty, t)| (ty.clone(), lock(&t.breaker).state(now)))
            .collect()
    }
}

/// Why a call failed, sorted by what it says about the target.
#[derive(Debug)]
enum Failure {
    /// The target answered, but not with success (4xx other than 429, 3xx, a body too long).
    Rejected(String),
    /// The target is unwell: unreachable, 5xx, 429.
    Target(String),
    /// No answer in time.
    Timeout(String),
    /// Cancelled by the caller.
    Cancelled,
}

impl Failure {
    fn into_task_error(self, task_type: &str, origin: &str) -> TaskError {
        let (kind, what) = match self {
            Self::Rejected(m) | Self::Target(m) => (ErrorKind::Handler, m),
            Self::Timeout(m) => (ErrorKind::Timeout, m),
            Self::Cancelled => (ErrorKind::Cancelled, "cancelled".to_owned()),
        };
        TaskError {
            kind,
            message: format!("http handler {task_type:?} ({origin}): {what}"),
        }
    }
}

/// An admitted call's ticket; reports `abandoned` if dropped unreported (the call's future was
/// dropped), so a half-open probe cannot hold its slot forever.
struct Admitted<'a> {
    breaker: &'a Mutex<Breaker>,
    ticket: Option<Ticket>,
}

impl Admitted<'_> {
    fn success(mut self) {
        if let Some(t) = self.ticket.take() {
            lock(self.breaker).on_success(t);
        }
    }

    fn failure(mut self) {
        if let Some(t) = self.ticket.take() {
            lock(self.breaker).on_failure(t, Instant::now().into_std());
        }
    }

    fn abandon(mut self) {
        if let Some(t) = self.ticket.take() {
            lock(self.breaker).on_abandoned(t);
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            lock(self.breaker).on_abandoned(t);
        }
    }
}

/// The breaker lock; a panic elsewhere while holding it leaves a usable breaker.
fn lock(m: &Mutex<Breaker>) -> std::sync::MutexGuard<'_, Breaker> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn circuit_error(
    task_type: &str,
    target: &Target,
    rejection: Rejection,
    now: Instant,
) -> TaskError {
    let what = match rejection {
        Rejection::Open { until, failures } => {
            let left = until.saturating_duration_since(now.into_std());
            let wall = chrono::Duration::from_std(left)
                .ok()
                .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                .map_or_else(
                    || "a long time".to_owned(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
            format!(
                "circuit open after {failures} consecutive failures; failing fast until {wall} \
                 (in {:.1} s)",
                left.as_secs_f64()
            )
        }
        Rejection::ProbeInFlight => {
            "circuit half-open and its probe request is still running; failing fast until it \
             answers"
                .to_owned()
        }
    };
    TaskError {
        kind: ErrorKind::Handler,
        message: format!("http handler {task_type:?} ({}): {what}", target.origin),
    }
}

impl Target {
    fn new(task_type: &str, h: &HttpHandler) -> Result<Self, HttpSetupError> {
        let url_error = |reason: String| HttpSetupError::Url {
            task_type: task_type.to_owned(),
            reason,
        };
        let url = Url::parse(&h.url).map_err(|e| url_error(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(url_error(format!(
                "must be http:// or https://, not {}://",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(url_error(
                "carries credentials; send them in a header instead".to_owned(),
            ));
        }
        let origin = url.origin().ascii_serialization();

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &h.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                HttpSetupError::HeaderName {
                    task_type: task_type.to_owned(),
                    name: name.clone(),
                }
            })?;
            let mut v =
                HeaderValue::from_str(value.expose()).map_err(|_| HttpSetupError::HeaderValue {
                    task_type: task_type.to_owned(),
                    name: name.clone(),
                })?;
            v.set_sensitive(true);
            headers.insert(header, v);
        }
        Ok(Self {
            url,
            origin,
            headers,
            timeout: Duration::from_millis(h.timeout_ms.max(1)),
            max_body: h.max_response_bytes,
            breaker: Mutex::new(Breaker::new(
                h.breaker.failures,
                Duration::from_millis(h.breaker.cooldown_ms),
            )),
        })
    }

    async fn post(
        &self,
        client: &reqwest::Client,
        payload: &RawValue,
        deadline: Instant,
        cancel: &CancellationToken,
        start: Instant,
    ) -> Result<Box<RawValue>, Failure> {
        let own_end = start.checked_add(self.timeout).unwrap_or(deadline);
        let (end, why) = if own_end < deadline {
            (
                own_end,
                format!(
                    "no answer within timeout_ms ({} ms)",
                    self.timeout.as_millis()
                ),
            )
        } else {
            (deadline, "deadline passed before an answer".to_owned())
        };
        let exchange = async {
            let response = client
                .post(self.url.clone())
                .headers(self.headers.clone())
                .body(payload.get().as_bytes().to_vec())
                .send()
                .await
                .map_err(|e| Failure::Target(format!("request failed: {}", error_chain(&e))))?;
            let status = response.status();
            let cap = if status.is_success() {
                self.max_body
            } else {
                ERROR_EXCERPT_BYTES
            };
            let (body, cut) = read_body(response, cap).await.map_err(|e| {
                Failure::Target(format!(
                    "HTTP {status}: reading the body failed: {}",
                    error_chain(&e)
                ))
            })?;
            Ok((status, body, cut))
        };
        let (status, body, cut) = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(Failure::Cancelled),
            () = sleep_until(end) => return Err(Failure::Timeout(why)),
            r = exchange => r?,
        };
        if status.is_success() {
            if cut {
                return Err(Failure::Rejected(format!(
                    "HTTP {status}: the body passed max_response_bytes ({} bytes)",
                    self.max_body
                )));
            }
            return output::to_bounded_result(&body).map_err(Failure::Rejected);
        }
        let mut message = format!("HTTP {status}");
        let excerpt = String::from_utf8_lossy(&body);
        let excerpt = excerpt.trim();
        if !excerpt.is_empty() {
            message.push_str(": ");
            message.push_str(excerpt);
            if cut {
                message.push('…');
            }
        }
        if counts_against_target(status) {
            Err(Failure::Target(message))
        } else {
            Err(Failure::Rejected(message))
        }
    }
}

/// Whether a non-2xx `status` says the target is unwell (5xx, 429) rather than that it refused
/// this request.
fn counts_against_target(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Reads up to `cap` body bytes; `true` when the body was longer (the rest is not read).
async fn read_body(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// An error and its causes, `: `-joined, without the URL (it may carry a token in its query).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_body() || e.is_decode() {
        "bad response body".to_owned()
    } else if e.is_request() {
        "sending the request failed".to_owned()
    } else {
        "HTTP error".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
