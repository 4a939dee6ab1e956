//! Tests of the ops HTTP surface (SPEC §9) over real loopback HTTP: `/metrics` content and
//! content type, `/healthz` and `/readyz` following `Health`, binding, shutdown and bad addresses.

use drover_shared::ops::{
    self, CONTENT_TYPE, Counter, Family, Health, MetricDef, Metrics, OpsError, Unit,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const REQUESTS: MetricDef = MetricDef::new("drover_test_requests", "Requests seen by the test");
const WAIT: MetricDef =
    MetricDef::new("drover_test_wait", "Time the test waited").with_unit(Unit::Seconds);
const PAYLOAD: MetricDef =
    MetricDef::new("drover_test_payload", "Payload sizes").with_unit(Unit::Bytes);
const OUTCOMES: MetricDef = MetricDef::new("drover_test_outcomes", "Outcomes, by queue");

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    body: String,
}

/// Sends one request with `Connection: close` and reads the whole response.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\
         Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let content_type = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    Reply {
        status,
        content_type,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

/// A server on a random loopback port; dropping the sender (or sending) stops it.
async fn start(metrics: Metrics, health: Health) -> (SocketAddr, oneshot::Sender<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = ops::serve("127.0.0.1:0", Arc::new(metrics), health, async move {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    (addr, stop)
}

/// The metric name of each sample line (everything before `{` or the space).
fn sample_names(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect()
}

fn sample_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_has_registered_and_process_metrics_with_the_openmetrics_type() {
    let mut metrics = Metrics::new("worker", "1.2.3");
    let requests = metrics.counter(&REQUESTS);
    let wait = metrics.latency_histogram(&WAIT);
    let payload = metrics.bytes_histogram(&PAYLOAD);
    let outcomes: Family<[(&'static str, String); 1], Counter> = metrics.family(&OUTCOMES);
    let (addr, _stop) = start(metrics, Health::new()).await;

    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.content_type.as_deref(), Some(CONTENT_TYPE));
    assert_eq!(
        CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = &reply.body;
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics needs the EOF trailer:\n{text}"
    );
    assert!(
        text.contains("# TYPE drover_test_requests counter\n"),
        "{text}"
    );
    assert!(text.contains("# HELP drover_test_requests Requests seen by the test.\n"));
    assert_eq!(sample_value(text, "drover_test_requests_total"), Some(0.0));
    assert!(text.contains("# TYPE drover_test_wait_seconds histogram\n"));
    assert!(text.contains("# UNIT drover_test_wait_seconds seconds\n"));
    assert!(text.contains("# TYPE drover_test_payload_bytes histogram\n"));

    // Process metrics, registered by Metrics::new.
    assert!(
        text.contains(r#"drover_build_info{version="1.2.3",component="worker"} 1"#),
        "{text}"
    );
    assert_eq!(sample_value(text, "drover_up"), Some(1.0));
    assert!(sample_value(text, "drover_process_uptime_seconds").unwrap() >= 0.0);
    if cfg!(target_os = "linux") {
        assert!(text.contains("# TYPE drover_process_cpu_seconds counter\n"));
        assert!(sample_value(text, "drover_process_cpu_seconds_total").unwrap() >= 0.0);
        assert!(sample_value(text, "drover_process_resident_memory_bytes").unwrap() > 0.0);
        assert!(sample_value(text, "drover_process_open_fds").unwrap() > 0.0);
    }

    for name in sample_names(text) {
        assert!(name.starts_with("drover_"), "{name} in\n{text}");
    }
    for line in text
        .lines()
        .filter(|l| l.starts_with("# ") && *l != "# EOF")
    {
        let name = line.split(' ').nth(2).unwrap();
        assert!(name.starts_with("drover_"), "{line}");
    }

    // Updates show at the next scrape.
    requests.inc();
    requests.inc_by(2);
    wait.observe(0.003);
    wait.observe(45.0);
    payload.observe(300.0);
    outcomes.get_or_create(&[("queue", "default".into())]).inc();
    let text = get(addr, "/metrics").await.body;
    assert_eq!(sample_value(&text, "drover_test_requests_total"), Some(3.0));
    assert_eq!(
        sample_value(&text, "drover_test_wait_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        sample_value(&text, r#"drover_test_wait_seconds_bucket{le="0.0025"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample_value(&text, r#"drover_test_wait_seconds_bucket{le="0.005"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&text, r#"drover_test_wait_seconds_bucket{le="30.0"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&text, r#"drover_test_wait_seconds_bucket{le="+Inf"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample_value(&text, r#"drover_test_payload_bytes_bucket{le="1024.0"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&text, r#"drover_test_outcomes_total{queue="default"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn latency_buckets_span_50_microseconds_to_30_seconds() {
    let buckets = ops::LATENCY_BUCKETS;
    assert_eq!(buckets.first(), Some(&0.000_05));
    assert_eq!(buckets.last(), Some(&30.0));
    assert!(
        buckets
            .windows(2)
            .all(|w| w[1] > w[0] && w[1] / w[0] <= 3.0)
    );
    assert!(ops::BYTES_BUCKETS.windows(2).all(|w| w[1] == w[0] * 4.0));
    assert!(ops::COUNT_BUCKETS.windows(2).all(|w| w[1] > w[0]));
}

#[test]
fn metric_defs_know_their_exposed_names() {
    assert_eq!(REQUESTS.exposed_name(), "drover_test_requests");
    assert_eq!(WAIT.exposed_name(), "drover_test_wait_seconds");
    assert_eq!(
        ops::PROCESS_RESIDENT_MEMORY.exposed_name(),
        "drover_process_resident_memory_bytes"
    );
    assert_eq!(
        ops::PROCESS_CPU.exposed_name(),
        "drover_process_cpu_seconds"
    );
}

#[test]
#[should_panic(expected = "drover_")]
fn a_metric_name_without_the_prefix_is_refused() {
    let name = String::from("tasks");
    let _ = MetricDef::new(name.leak(), "help");
}

#[test]
#[should_panic(expected = "_total")]
fn a_metric_name_with_a_suffix_the_exposition_adds_is_refused() {
    let name = String::from("drover_tasks_total");
    let _ = MetricDef::new(name.leak(), "help");
}

#[tokio::test]
async fn healthz_follows_liveness() {
    let health = Health::new();
    let (addr, _stop) = start(Metrics::new("dispatcher", "0.0.0"), health.clone()).await;

    let reply = get(addr, "/healthz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "not live: starting\n")
    );
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );

    health.set_live(true);
    let reply = get(addr, "/healthz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));

    health.set_live(false);
    let reply = get(addr, "/healthz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "not live: stopped\n")
    );
}

#[tokio::test]
async fn readyz_follows_readiness_and_names_failing_checks() {
    let health = Health::new();
    let (addr, _stop) = start(Metrics::new("worker", "0.0.0"), health.clone()).await;

    let reply = get(addr, "/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, "not live: starting\nnot ready: starting\n");

    health.set_live(true);
    health.set_ready(false, "provisioning streams");
    let reply = get(addr, "/readyz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "not ready: provisioning streams\n")
    );

    health.set_ready(true, "");
    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
    assert!(health.is_ready());

    health.set_check("nats", Err("disconnected"));
    health.set_check("kv", Ok(()));
    health.set_check("assignment", Err("no partitions yet"));
    let reply = get(addr, "/readyz").await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.body.contains("check nats failing: disconnected"),
        "{}",
        reply.body
    );
    assert!(
        reply
            .body
            .contains("check assignment failing: no partitions yet")
    );
    assert!(!reply.body.contains("kv"), "a passing check is not listed");
    assert!(!health.is_ready());

    health.set_check("nats", Ok(()));
    health.remove_check("assignment");
    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));

    // Not live means not ready, whatever the flag says.
    health.set_live(false);
    let reply = get(addr, "/readyz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "not live: stopped\n")
    );
}

#[tokio::test]
async fn health_clones_share_state_and_default_is_not_ready() {
    let health = Health::default();
    assert!(!health.is_live());
    assert!(!health.is_ready());
    let clone = health.clone();
    clone.set_live(true);
    clone.set_ready(true, "ignored");
    assert!(health.is_live() && health.is_ready());
    assert!(health.not_ready_reasons().is_empty());
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let (addr, _stop) = start(Metrics::new("worker", "0.0.0"), Health::new()).await;
    assert_eq!(get(addr, "/").await.status, 404);
    assert_eq!(get(addr, "/metrics/extra").await.status, 404);
    assert_eq!(get(addr, "/health").await.status, 404);
    assert_eq!(request(addr, "POST", "/metrics").await.status, 405);
    assert_eq!(request(addr, "HEAD", "/healthz").await.status, 503);
}

#[tokio::test]
async fn port_zero_binds_a_real_port_and_shutdown_closes_it() {
    let (addr, stop) = start(Metrics::new("worker", "0.0.0"), Health::new()).await;
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    assert_eq!(get(addr, "/metrics").await.status, 200);

    // An idle keep-alive connection must not keep the listener open after shutdown.
    let _idle = TcpStream::connect(addr).await.expect("connect");

    stop.send(()).expect("server task alive");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("unexpected connect error after shutdown: {e}"),
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(_) => panic!("{addr} still accepts connections 10 s after shutdown"),
        }
    }
}

#[tokio::test]
async fn two_servers_get_different_ports() {
    let (a, _stop_a) = start(Metrics::new("worker", "0.0.0"), Health::new()).await;
    let (b, _stop_b) = start(Metrics::new("worker", "0.0.0"), Health::new()).await;
    assert_ne!(a.port(), b.port());
}

#[tokio::test]
async fn a_bad_address_is_a_clear_error() {
    let metrics = Arc::new(Metrics::new("worker", "0.0.0"));
    let err = ops::serve("not an address", metrics.clone(), Health::new(), async {})
        .await
        .expect_err("no port");
    assert!(matches!(err, OpsError::BadAddress { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("\"not an address\""), "{message}");
    assert!(message.contains("host:port"), "{message}");

    let err = ops::serve("127.0.0.1:99999", metrics, Health::new(), async {})
        .await
        .expect_err("port out of range");
    assert!(matches!(err, OpsError::BadAddress { .. }), "{err:?}");
}

#[tokio::test]
async fn an_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = ops::serve(
        &addr,
        Arc::new(Metrics::new("worker", "0.0.0")),
        Health::new(),
        async {},
    )
    .await
    .expect_err("address in use");
    assert!(matches!(err, OpsError::Bind { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot listen for ops HTTP on {addr}: ")),
        "{message}"
    );
}
