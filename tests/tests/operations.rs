//! `docs/operations.md` against a real fleet (nats-server, a dispatcher and a worker process):
//! every `nats …` command the page shows is run here as the equivalent client-library call, and
//! the test checks that it shows what the page says it shows; every metric the page names is
//! served by a component. A command added to the page without a check here fails the test.

use async_nats::jetstream::{self, context::Context};
use drover_shared::names::Names;
use drover_shared::partition::partition_for_key;
use drover_shared::task::{TaskRecord, TaskState};
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS, http_get, observe};
use futures::StreamExt;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Partitions of a queue that has no configuration (the settings default).
const DEFAULT_PARTITIONS: u32 = 64;
/// A queue no worker serves, so its envelope stays in `DROVER_WORK` to be looked at.
const PARKED: &str = "parked";

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `nats …` lines of the page's `sh` code blocks.
fn commands(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in page.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && l.starts_with("nats ") => out.push(l.to_owned()),
            _ => {}
        }
    }
    out
}

/// The `drover_*` metric names of the page's metrics table (labels stripped).
fn documented_metrics(page: &str) -> Vec<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("| `drover_"))
        .map(|rest| {
            let name = rest.split('`').next().unwrap_or_default();
            format!("drover_{}", name.split('{').next().unwrap_or_default())
        })
        .collect()
}

struct Fleet {
    _server: NatsServer,
    _procs: Vec<DroverProcess>,
    client: async_nats::Client,
    js: Context,
    names: Names,
}

async fn start() -> Fleet {
    let server = NatsServer::start().await;
    let url = server.client_url();
    let dispatcher = DroverProcess::dispatcher("ops-d1", &url, 4);
    let worker = DroverProcess::start(
        "ops-w1",
        "drover-worker",
        &[
            "--nats-url".into(),
            url.clone(),
            "--id".into(),
            "ops-w1".into(),
        ],
        &[
            ("DROVER_KEYS", TEST_KEYS.into()),
            ("DROVER_LOG", "info".into()),
        ],
    );
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let names = Names::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The epoch joins the leader value at the first renewal after the winning create.
        let led = observe::leader_value(&js, &names)
            .await
            .is_some_and(|v| v["epoch"].is_u64());
        let registered = match js.get_key_value(names.bucket("workers")).await {
            Ok(kv) => matches!(kv.get("ops-w1").await, Ok(Some(_))),
            Err(_) => false,
        };
        if led && registered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no leader with an epoch, or the worker never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Fleet {
        _server: server,
        _procs: vec![dispatcher, worker],
        client,
        js,
        names,
    }
}

impl Fleet {
    async fn submit(&self, queue: &str, body: Value) {
        self.js
            .publish(self.names.submit_subject(queue), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn record(&self, id: &str) -> Option<TaskRecord> {
        let kv = self
            .js
            .get_key_value(self.names.bucket("tasks"))
            .await
            .ok()?;
        let v = kv.get(id).await.ok()??;
        serde_json::from_slice(&v).ok()
    }

    async fn wait_state(&self, id: &str, state: TaskState) -> TaskRecord {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self.record(id).await
                && r.state == state
            {
                return r;
            }
            assert!(Instant::now() < deadline, "{id} never became {state:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn last_dlq_headers(&self, subject: &str) -> async_nats::HeaderMap {
        let dlq = self.js.get_stream(self.names.dlq_stream()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(m) = dlq.get_last_raw_message_by_subject(subject).await {
                return m.headers;
            }
            assert!(Instant::now() < deadline, "nothing on {subject}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics_of(&self, addr: &str) -> String {
        let addr: SocketAddr = addr.parse().unwrap();
        http_get(addr, "/metrics", Duration::from_secs(5))
            .await
            .unwrap()
            .body
    }
}

fn header<'a>(h: &'a async_nats::HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .map(|v| v.as_str())
        .unwrap_or_else(|| panic!("header {name} missing: {h:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nats_command_of_the_operations_page_shows_what_it_says() {
    let page = page();
    let cmds = commands(&page);
    assert!(cmds.len() >= 10, "the page's commands: {cmds:?}");
    let f = start().await;

    // Live events are only seen by a subscriber that listens before they happen.
    let mut events = f.client.subscribe("drover.events.>").await.unwrap();
    f.submit(
        "default",
        json!({"type": "echo", "id": "ops-ok", "payload": "hi"}),
    )
    .await;
    f.submit(
        "default",
        json!({"type": "fail", "id": "ops-fail", "max_attempts": 1}),
    )
    .await;
    f.submit("default", json!({"type": "echo", "bogus": true}))
        .await;
    let parked_key = "ops-parked-key";
    f.submit(
        PARKED,
        json!({"type": "echo", "id": "ops-parked", "key": parked_key, "payload": "secret-ish"}),
    )
    .await;
    // Not an envelope: the worker quarantines it.
    f.js.publish(f.names.work_subject("default", 0), "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    f.wait_state("ops-ok", TaskState::Succeeded).await;
    f.wait_state("ops-fail", TaskState::Failed).await;
    f.wait_state("ops-parked", TaskState::Queued).await;

    let mut checked = 0;
    for cmd in &cmds {
        match cmd.as_str() {
            "nats stream report" => {
                let mut names: Vec<String> =
                    f.js.stream_names().map(|n| n.unwrap()).collect().await;
                names.sort();
                for s in [
                    "DROVER_SUBMIT",
                    "DROVER_WORK",
                    "DROVER_OUTCOMES",
                    "DROVER_DELAYED",
                    "DROVER_EVENTS",
                    "DROVER_DLQ",
                    "KV_drover-tasks",
                    "KV_drover-election",
                ] {
                    assert!(names.iter().any(|n| n == s), "{s} not in {names:?}");
                }
            }
            "nats stream info DROVER_SUBMIT" => {
                // Everything submitted was dispatched or rejected: no intake backlog.
                let mut s = f.js.get_stream("DROVER_SUBMIT").await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                while s.info().await.unwrap().state.messages != 0 {
                    assert!(Instant::now() < deadline, "the intake never drained");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            "nats consumer report DROVER_WORK" => {
                let work = f.js.get_stream("DROVER_WORK").await.unwrap();
                let consumers: Vec<String> =
                    work.consumer_names().map(|n| n.unwrap()).collect().await;
                assert!(
                    consumers.iter().any(|c| c == "drover-work-default-0"),
                    "{consumers:?}"
                );
                let p = partition_for_key(parked_key, DEFAULT_PARTITIONS);
                // The leader creates a new queue's partition consumers beside its dispatch.
                let name = format!("drover-work-{PARKED}-{p}");
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut c = loop {
                    match work
                        .get_consumer::<jetstream::consumer::pull::Config>(&name)
                        .await
                    {
                        Ok(c) => break c,
                        Err(e) => assert!(Instant::now() < deadline, "{name}: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                // "Unprocessed" is the partition's backlog: the parked envelope.
                assert_eq!(c.info().await.unwrap().num_pending, 1);
            }
            "nats stream get DROVER_WORK <seq>" => {
                let work = f.js.get_stream("DROVER_WORK").await.unwrap();
                let p = partition_for_key(parked_key, DEFAULT_PARTITIONS);
                let subject = f.names.work_subject(PARKED, p);
                let seq = work
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .unwrap()
                    .sequence;
                let m = work.get_raw_message(seq).await.unwrap();
                assert_eq!(header(&m.headers, "Drover-Queue"), PARKED);
                assert_eq!(header(&m.headers, "Drover-Partition"), p.to_string());
                assert_eq!(header(&m.headers, "Drover-Count"), "1");
                assert!(header(&m.headers, "Drover-Epoch").parse::<u64>().unwrap() > 0);
                assert!(!header(&m.headers, "Drover-Batch").is_empty());
                let body = String::from_utf8_lossy(&m.payload);
                assert!(!body.contains("secret-ish"), "the body is sealed");
            }
            "nats kv get drover-tasks <id>" => {
                let r = f.record("ops-ok").await.unwrap();
                assert_eq!(r.state, TaskState::Succeeded);
                assert_eq!(r.attempt, 1);
                assert_eq!(r.worker.as_deref(), Some("ops-w1"));
                assert!(r.started_at.is_some() && r.finished_at.is_some());
                let r = f.record("ops-fail").await.unwrap();
                assert!(r.error.is_some());
            }
            "nats kv watch drover-tasks <id>" => {
                let kv = f.js.get_key_value("drover-tasks").await.unwrap();
                let mut w = kv.watch_with_history("ops-ok").await.unwrap();
                let e = tokio::time::timeout(Duration::from_secs(5), w.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                let r: TaskRecord = serde_json::from_slice(&e.value).unwrap();
                assert_eq!(r.state, TaskState::Succeeded);
            }
            "nats sub 'drover.events.>'" => {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut seen = false;
                while !seen {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let m = tokio::time::timeout(left, events.next())
                        .await
                        .expect("no succeeded event for ops-ok")
                        .unwrap();
                    let arr: Vec<Value> = serde_json::from_slice(&m.payload).unwrap();
                    seen = m.subject.as_str() == "drover.events.default.succeeded"
                        && arr.iter().any(|e| e["id"] == "ops-ok");
                }
            }
            r#"nats req drover.api.status '{"id":"<id>"}'"# => {
                let reply = f
                    .client
                    .request(
                        "drover.api.status",
                        json!({"id": "ops-ok"}).to_string().into(),
                    )
                    .await
                    .unwrap();
                let v: Value = serde_json::from_slice(&reply.payload).unwrap();
                assert_eq!(v["ok"], true, "{v}");
                assert_eq!(v["task"]["state"], "succeeded", "{v}");
            }
            "nats kv get drover-election leader" => {
                let v = observe::leader_value(&f.js, &f.names).await.unwrap();
                for field in ["id", "host", "pid", "since", "addr", "epoch"] {
                    assert!(!v[field].is_null(), "{field} missing in {v}");
                }
                assert_eq!(v["id"], "ops-d1");
            }
            "nats kv ls drover-workers" => {
                let kv = f.js.get_key_value("drover-workers").await.unwrap();
                let keys: Vec<String> =
                    kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
                assert_eq!(keys, ["ops-w1"]);
                let v: Value =
                    serde_json::from_slice(&kv.get("ops-w1").await.unwrap().unwrap()).unwrap();
                for field in ["host", "pid", "queues", "addr"] {
                    assert!(!v[field].is_null(), "{field} missing in {v}");
                }
            }
            "nats kv get drover-state assignment.default" => {
                let kv = f.js.get_key_value("drover-state").await.unwrap();
                let v: Value =
                    serde_json::from_slice(&kv.get("assignment.default").await.unwrap().unwrap())
                        .unwrap();
                assert!(v["epoch"].as_u64().unwrap() > 0, "{v}");
                let owners: Vec<&Value> = v["partitions"].as_object().unwrap().values().collect();
                assert_eq!(owners.len(), 4, "{v}");
                assert!(owners.iter().all(|w| *w == "ops-w1"), "{v}");
            }
            "nats stream get DROVER_DLQ --last-for drover.dlq.default" => {
                let h = f.last_dlq_headers("drover.dlq.default").await;
                assert_eq!(header(&h, "Drover-Task-Id"), "ops-fail");
                assert_eq!(header(&h, "Drover-Error-Kind"), "handler");
                assert_eq!(header(&h, "Drover-Attempt"), "1");
                assert!(!header(&h, "Drover-Error").is_empty());
            }
            "nats stream get DROVER_DLQ --last-for drover.rejected.default" => {
                let h = f.last_dlq_headers("drover.rejected.default").await;
                assert_eq!(header(&h, "Drover-Error-Code"), "unknown_field");
                assert!(header(&h, "Drover-Error").contains("bogus"));
                assert_eq!(header(&h, "Drover-Subject"), "drover.submit.default");
            }
            "nats stream get DROVER_DLQ --last-for drover.quarantine" => {
                let h = f.last_dlq_headers("drover.quarantine").await;
                assert!(!header(&h, "Drover-Reason").is_empty());
            }
            other => panic!(
                "docs/operations.md shows `{other}`, which this test does not check: add its \
                 equivalent here"
            ),
        }
        checked += 1;
    }
    assert_eq!(checked, cmds.len());

    // Every metric the page names is served by the dispatcher or the worker.
    let leader = observe::leader_value(&f.js, &f.names).await.unwrap();
    let mut text = f.metrics_of(leader["addr"].as_str().unwrap()).await;
    let kv = f.js.get_key_value("drover-workers").await.unwrap();
    let w: Value = serde_json::from_slice(&kv.get("ops-w1").await.unwrap().unwrap()).unwrap();
    text.push_str(&f.metrics_of(w["addr"].as_str().unwrap()).await);
    let metrics = documented_metrics(&page);
    assert!(metrics.len() >= 8, "{metrics:?}");
    let served: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    for m in metrics {
        let family = m.strip_suffix("_total").unwrap_or(&m);
        assert!(
            served.iter().any(|t| t.split(' ').next() == Some(family)),
            "docs/operations.md names {m}, which no component serves; they serve:\n{}",
            served.join("\n")
        );
    }
}
