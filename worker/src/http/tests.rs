//! Tests of `http` handlers against a real local HTTP server (axum on 127.0.0.1): results, error
//! mapping, timeouts, cancels, secrets and the circuit breaker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use drover_shared::settings::{BreakerSettings, HttpHandler, Secret};
use drover_shared::task::ErrorKind;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{HttpHandlers, HttpSetupError};
use crate::circuit::CircuitState;

/// What the test server saw and how `/flaky` answers.
#[derive(Default)]
struct Server {
    hits: AtomicUsize,
    flaky_ok: AtomicBool,
}

async fn echo(State(s): State<Arc<Server>>, body: String) -> String {
    s.hits.fetch_add(1, Ordering::SeqCst);
    body
}

async fn headers(State(s): State<Arc<Server>>, h: HeaderMap) -> String {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let get = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    serde_json::json!({
        "content-type": get("content-type"),
        "x-token": get("x-token"),
        "user-agent": get("user-agent"),
    })
    .to_string()
}

async fn text(State(s): State<Arc<Server>>) -> &'static str {
    s.hits.fetch_add(1, Ordering::SeqCst);
    "plain text"
}

async fn fail(State(s): State<Arc<Server>>) -> (StatusCode, &'static str) {
    s.hits.fetch_add(1, Ordering::SeqCst);
    (StatusCode::INTERNAL_SERVER_ERROR, "boom: database down")
}

async fn bad(State(s): State<Arc<Server>>) -> (StatusCode, &'static str) {
    s.hits.fetch_add(1, Ordering::SeqCst);
    (StatusCode::UNPROCESSABLE_ENTITY, "field x is missing")
}

async fn slow(State(s): State<Arc<Server>>) -> &'static str {
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    "late"
}

async fn big(State(s): State<Arc<Server>>) -> String {
    s.hits.fetch_add(1, Ordering::SeqCst);
    "y".repeat(10_000)
}

async fn flaky(State(s): State<Arc<Server>>) -> (StatusCode, &'static str) {
    s.hits.fetch_add(1, Ordering::SeqCst);
    if s.flaky_ok.load(Ordering::SeqCst) {
        (StatusCode::OK, "{\"ok\":true}")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "try later")
    }
}

/// Starts the test server on a random local port; it stops with the test's runtime.
async fn start() -> (SocketAddr, Arc<Server>) {
    let state = Arc::new(Server::default());
    let app = Router::new()
        .route("/echo", post(echo))
        .route("/headers", post(headers))
        .route("/text", post(text))
        .route("/fail", post(fail))
        .route("/bad", post(bad))
        .route("/slow", post(slow))
        .route("/big", post(big))
        .route("/flaky", post(flaky))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, state)
}

fn handler(url: String) -> HttpHandler {
    HttpHandler {
        url,
        timeout_ms: 5_000,
        ..HttpHandler::default()
    }
}

fn handlers(entries: Vec<(&str, HttpHandler)>) -> HttpHandlers {
    let config: BTreeMap<String, HttpHandler> = entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    HttpHandlers::new(&config).unwrap()
}

fn payload(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn state_of(h: &HttpHandlers, ty: &str) -> CircuitState {
    h.circuit_states()
        .into_iter()
        .find(|(t, _)| t == ty)
        .map(|(_, s)| s)
        .unwrap()
}

#[tokio::test]
async fn success_returns_the_body_as_json_or_string() {
    let (addr, _) = start().await;
    let h = handlers(vec![
        ("echo", handler(format!("http://{addr}/echo"))),
        ("text", handler(format!("http://{addr}/text"))),
    ]);
    let none = CancellationToken::new();
    let input = r#"{"z": 1, "a": [true, null]}"#;
    let out = h
        .call("echo", &payload(input), soon(), &none)
        .await
        .unwrap();
    assert_eq!(out.get(), input);
    let out = h.call("text", &payload("{}"), soon(), &none).await.unwrap();
    assert_eq!(out.get(), r#""plain text""#);
    assert!(h.handles("echo") && !h.handles("nope"));
    let err = h
        .call("nope", &payload("{}"), soon(), &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnknownType);
}

#[tokio::test]
async fn content_type_and_configured_headers_are_sent_and_values_stay_secret() {
    let (addr, _) = start().await;
    let mut cfg = handler(format!("http://{addr}/headers?token=url-secret"));
    cfg.headers = BTreeMap::from([("X-Token".to_owned(), Secret::new("tok-s3cret"))]);
    let h = handlers(vec![("hdr", cfg)]);
    let out = h
        .call("hdr", &payload("{}"), soon(), &CancellationToken::new())
        .await
        .unwrap();
    let seen: serde_json::Value = serde_json::from_str(out.get()).unwrap();
    assert_eq!(seen["content-type"], "application/json");
    assert_eq!(seen["x-token"], "tok-s3cret");
    assert!(
        seen["user-agent"]
            .as_str()
            .unwrap()
            .starts_with("drover-worker/")
    );
    let debug = format!("{h:?}");
    assert!(
        !debug.contains("tok-s3cret") && !debug.contains("url-secret"),
        "{debug}"
    );
    assert!(debug.contains(&format!("http://{addr}")), "{debug}");

    // A bad header value is refused without being shown.
    let mut cfg = handler(format!("http://{addr}/headers"));
    cfg.headers = BTreeMap::from([("X-Token".to_owned(), Secret::new("bad\nsecret-value"))]);
    let err = HttpHandlers::new(&BTreeMap::from([("hdr".to_owned(), cfg)])).unwrap_err();
    assert!(matches!(err, HttpSetupError::HeaderValue { .. }));
    assert!(!err.to_string().contains("secret-value"), "{err}");
    let err = HttpHandlers::new(&BTreeMap::from([(
        "u".to_owned(),
        handler("ftp://example.invalid/x".to_owned()),
    )]))
    .unwrap_err();
    assert!(matches!(err, HttpSetupError::Url { .. }), "{err}");
}

#[tokio::test]
async fn non_2xx_is_a_handler_error_with_status_and_excerpt() {
    let (addr, _) = start().await;
    let h = handlers(vec![
        ("fail", handler(format!("http://{addr}/fail?key=hidden"))),
        ("bad", handler(format!("http://{addr}/bad"))),
    ]);
    let none = CancellationToken::new();
    let err = h
        .call("fail", &payload("{}"), soon(), &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert_eq!(
        err.message,
        format!(
            "http handler \"fail\" (http://{addr}): HTTP 500 Internal Server Error: boom: database down"
        )
    );
    let err = h
        .call("bad", &payload("{}"), soon(), &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message
            .ends_with("HTTP 422 Unprocessable Entity: field x is missing"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn a_body_over_the_cap_fails() {
    let (addr, _) = start().await;
    let mut cfg = handler(format!("http://{addr}/big"));
    cfg.max_response_bytes = 1_000;
    let h = handlers(vec![("big", cfg)]);
    let err = h
        .call("big", &payload("{}"), soon(), &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message.contains("max_response_bytes (1000 bytes)"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn timeouts_from_the_handler_and_from_the_deadline() {
    let (addr, _) = start().await;
    let mut short = handler(format!("http://{addr}/slow"));
    short.timeout_ms = 200;
    let h = handlers(vec![
        ("short", short),
        ("long", handler(format!("http://{addr}/slow"))),
    ]);
    let none = CancellationToken::new();
    let started = Instant::now();
    let err = h
        .call("short", &payload("{}"), soon(), &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(
        err.message
            .ends_with("no answer within timeout_ms (200 ms)"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_millis(300);
    let err = h
        .call("long", &payload("{}"), deadline, &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(
        err.message.ends_with("deadline passed before an answer"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn cancel_ends_the_call_and_does_not_count_against_the_target() {
    let (addr, _) = start().await;
    let mut cfg = handler(format!("http://{addr}/slow"));
    cfg.breaker.failures = 1;
    let h = Arc::new(handlers(vec![("slow", cfg)]));
    let cancel = CancellationToken::new();
    let call = {
        let (h, cancel) = (Arc::clone(&h), cancel.clone());
        tokio::spawn(async move { h.call("slow", &payload("{}"), soon(), &cancel).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_millis(100));
    assert_eq!(state_of(&h, "slow"), CircuitState::Closed);
}

#[tokio::test]
async fn connection_refused_is_a_handler_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = handlers(vec![(
        "gone",
        handler(format!("http://127.0.0.1:{port}/x?t=secret")),
    )]);
    let err = h
        .call("gone", &payload("{}"), soon(), &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(err.message.contains("cannot connect"), "{}", err.message);
    assert!(!err.message.contains("secret"), "{}", err.message);
}

#[tokio::test]
async fn breaker_opens_after_consecutive_failures_and_half_opens_after_the_cooldown() {
    let (addr, server) = start().await;
    let mut cfg = handler(format!("http://{addr}/flaky"));
    cfg.breaker = BreakerSettings {
        failures: 3,
        cooldown_ms: 400,
    };
    let h = handlers(vec![("flaky", cfg)]);
    let none = CancellationToken::new();
    let body = payload("{}");
    let call = || h.call("flaky", &body, soon(), &none);

    for _ in 0..3 {
        assert_eq!(state_of(&h, "flaky"), CircuitState::Closed);
        let err = call().await.unwrap_err();
        assert!(err.message.contains("HTTP 503"), "{}", err.message);
    }
    assert_eq!(state_of(&h, "flaky"), CircuitState::Open);
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);

    // Open: fail fast, the server sees nothing.
    let err = call().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message
            .contains("circuit open after 3 consecutive failures; failing fast until 20"),
        "{}",
        err.message
    );
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);

    // After the cool-down a probe goes through; it fails, so the circuit opens again.
    let until = Instant::now() + Duration::from_secs(5);
    while state_of(&h, "flaky") != CircuitState::HalfOpen {
        assert!(Instant::now() < until, "never half-opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = call().await.unwrap_err();
    assert!(err.message.contains("HTTP 503"), "{}", err.message);
    assert_eq!(server.hits.load(Ordering::SeqCst), 4);
    assert_eq!(state_of(&h, "flaky"), CircuitState::Open);
    assert!(call().await.unwrap_err().message.contains("circuit open"));

    // Next cool-down: the target has recovered; the probe closes the circuit.
    server.flaky_ok.store(true, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(5);
    while state_of(&h, "flaky") != CircuitState::HalfOpen {
        assert!(Instant::now() < until, "never half-opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = call().await.unwrap();
    assert_eq!(out.get(), r#"{"ok":true}"#);
    assert_eq!(state_of(&h, "flaky"), CircuitState::Closed);
    assert_eq!(server.hits.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn client_errors_do_not_open_the_breaker_but_timeouts_do() {
    let (addr, _) = start().await;
    let mut bad = handler(format!("http://{addr}/bad"));
    bad.breaker.failures = 1;
    let mut slow = handler(format!("http://{addr}/slow"));
    slow.breaker.failures = 1;
    slow.timeout_ms = 100;
    let h = handlers(vec![("bad", bad), ("slow", slow)]);
    let none = CancellationToken::new();
    for _ in 0..3 {
        let err = h
            .call("bad", &payload("{}"), soon(), &none)
            .await
            .unwrap_err();
        assert!(err.message.contains("HTTP 422"), "{}", err.message);
    }
    assert_eq!(state_of(&h, "bad"), CircuitState::Closed);
    let err = h
        .call("slow", &payload("{}"), soon(), &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert_eq!(state_of(&h, "slow"), CircuitState::Open);
}
