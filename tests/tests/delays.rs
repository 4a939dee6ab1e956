//! Delayed tasks, unique tasks and cancel of scheduled/queued tasks (SPEC §1.1, §1.3, §2, §7)
//! against a real nats-server and real `drover-dispatcher` / `drover-worker` processes.
//!
//! Lateness is the task's `started_at` (stamped by the worker when the attempt starts) minus
//! its due instant; every process runs on this machine, so they share the clock.

use async_nats::jetstream::{self, context::Context, kv};
use async_nats::{Client, HeaderMap};
use chrono::{DateTime, Utc};
use drover_shared::names::Names;
use drover_shared::task::{TaskRecord, TaskState};
use drover_tests::observe::wait_leader;
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const QUEUE: &str = "default";

struct Rig {
    server: NatsServer,
    dispatchers: Vec<DroverProcess>,
    workers: Vec<DroverProcess>,
    client: Client,
    js: Context,
    names: Names,
}

impl Rig {
    async fn start(dispatchers: usize, workers: usize) -> Self {
        let server = NatsServer::start().await;
        let url = server.client_url();
        let dispatchers: Vec<DroverProcess> = (1..=dispatchers)
            .map(|i| DroverProcess::dispatcher(&format!("d{i}"), &url, 8))
            .collect();
        let client = server.connect().await;
        let js = jetstream::new(client.clone());
        let names = Names::default();
        wait_leader(&js, &names, None, Duration::from_secs(30)).await;
        let mut rig = Self {
            server,
            dispatchers,
            workers: Vec::new(),
            client,
            js,
            names,
        };
        for i in 1..=workers {
            rig.add_worker(&format!("w{i}"), QUEUE);
        }
        rig
    }

    fn add_worker(&mut self, id: &str, queues: &str) {
        self.workers.push(DroverProcess::start(
            id,
            "drover-worker",
            &[
                "--nats-url".into(),
                self.server.client_url(),
                "--id".into(),
                id.into(),
                "--queues".into(),
                queues.into(),
                "--concurrency".into(),
                "256".into(),
            ],
            &[
                ("DROVER_KEYS", TEST_KEYS.to_owned()),
                ("DROVER_LOG", "info".to_owned()),
            ],
        ));
    }

    fn logs(&self) -> String {
        self.dispatchers
            .iter()
            .chain(&self.workers)
            .map(|p| format!("---- {} ----\n{}", p.name(), tail(&p.log(), 40)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn tasks(&self) -> kv::Store {
        self.js
            .get_key_value(self.names.bucket("tasks"))
            .await
            .unwrap()
    }

    /// Every record write of `drover-tasks` from the start on, as it comes, that `keep` accepts.
    async fn record_feed(
        &self,
        keep: fn(&TaskRecord) -> bool,
    ) -> tokio::sync::mpsc::UnboundedReceiver<TaskRecord> {
        let mut watch = self.tasks().await.watch_with_history(">").await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<TaskRecord>();
        tokio::spawn(async move {
            while let Some(Ok(e)) = watch.next().await {
                if let Ok(r) = serde_json::from_slice::<TaskRecord>(&e.value)
                    && keep(&r)
                    && tx.send(r).is_err()
                {
                    break;
                }
            }
        });
        rx
    }

    async fn publish(&self, queue: &str, body: Value) {
        self.js
            .publish(self.names.submit_subject(queue), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn request(&self, endpoint: &str, body: Value) -> Value {
        let reply = self
            .client
            .request(self.names.api(endpoint), body.to_string().into())
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    }

    async fn record(&self, id: &str) -> Option<TaskRecord> {
        let v = self.tasks().await.get(id).await.unwrap()?;
        serde_json::from_slice(&v).ok()
    }

    /// Waits until the record of `id` satisfies `done`.
    async fn wait_record(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&TaskRecord) -> bool,
    ) -> TaskRecord {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.record(id).await
                && done(&r)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "record of {id} not as expected within {timeout:?}: {:?}\n{}",
                self.record(id).await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last rejected record on `drover.rejected.<queue>`, as (error code, body).
    async fn last_rejected(&self, queue: &str) -> Option<(String, Value)> {
        let stream = self.js.get_stream(self.names.dlq_stream()).await.unwrap();
        let m = stream
            .direct_get_last_for_subject(self.names.rejected_subject(queue))
            .await
            .ok()?;
        let code = m.headers.get("Drover-Error-Code")?.as_str().to_owned();
        Some((code, serde_json::from_slice(&m.payload).ok()?))
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test]
async fn delayed_tasks_run_at_their_time_and_past_ones_at_once() {
    let rig = Rig::start(1, 1).await;

    // Stream path, delay_ms: `scheduled` with next_run_at at once, started not before it.
    let submitted = now_ms();
    rig.publish(
        QUEUE,
        json!({"type": "noop", "id": "late-1", "delay_ms": 2000}),
    )
    .await;
    let r = rig
        .wait_record("late-1", Duration::from_secs(10), |r| {
            r.state != TaskState::Queued
        })
        .await;
    assert_eq!(r.state, TaskState::Scheduled, "{r:?}");
    let due = ms(r.next_run_at.expect("a scheduled record has next_run_at"));
    assert!((due - submitted - 2000).abs() < 1000, "due {due}");
    let r = rig
        .wait_record("late-1", Duration::from_secs(15), |r| {
            r.state == TaskState::Succeeded
        })
        .await;
    let late = ms(r.started_at.unwrap()) - due;
    eprintln!("delay_ms task started {late} ms after its due instant");
    assert!(late >= 0, "started {} ms early", -late);
    assert!(late < 1000, "started {late} ms late");

    // Validated path, run_at.
    let at = Utc::now() + chrono::Duration::milliseconds(1500);
    let reply = rig
        .request(
            "submit.default",
            json!({"type": "noop", "id": "at-1", "run_at": drover_shared::task::format_time(&at)}),
        )
        .await;
    assert_eq!(reply["ids"], json!(["at-1"]), "{reply}");
    let r = rig
        .wait_record("at-1", Duration::from_secs(15), |r| {
            r.state == TaskState::Succeeded
        })
        .await;
    let late = ms(r.started_at.unwrap()) - ms(at);
    eprintln!("run_at task started {late} ms after its due instant");
    assert!((0..1000).contains(&late), "late {late} ms");

    // run_at in the past (and delay 0) runs at once, without a scheduled state.
    let t0 = now_ms();
    rig.publish(
        QUEUE,
        json!([
            {"type": "noop", "id": "past-1", "run_at": "2001-01-01T00:00:00Z"},
            {"type": "noop", "id": "zero-1", "delay_ms": 0}
        ]),
    )
    .await;
    for id in ["past-1", "zero-1"] {
        let r = rig
            .wait_record(id, Duration::from_secs(10), |r| {
                r.state == TaskState::Succeeded
            })
            .await;
        assert!(r.next_run_at.is_none());
        let after = ms(r.started_at.unwrap()) - t0;
        assert!(after < 1000, "{id} started {after} ms after submit");
    }

    // Both given: an error on both paths.
    let both =
        json!({"type": "noop", "id": "both-1", "delay_ms": 10, "run_at": "2030-01-01T00:00:00Z"});
    let reply = rig.request("submit.default", both.clone()).await;
    assert_eq!(reply["error"]["code"], "invalid_field", "{reply}");
    rig.publish(QUEUE, both).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((code, body)) = rig.last_rejected(QUEUE).await
            && body["id"] == "both-1"
        {
            assert_eq!(code, "invalid_field");
            break;
        }
        assert!(Instant::now() < deadline, "no rejected record for both-1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rig.record("both-1").await.is_none());
}

#[tokio::test]
async fn unique_keys_hold_for_their_window_on_both_paths() {
    let rig = Rig::start(1, 1).await;
    let task = |id: &str| json!({"type": "noop", "id": id, "unique_key": "report-7", "unique_for_ms": 1500});

    // Validated path: the first takes the key, a second one within the window is refused.
    let reply = rig.request("submit.default", task("u-a")).await;
    assert_eq!(reply["ids"], json!(["u-a"]), "{reply}");
    let reply = rig.request("submit.default", task("u-b")).await;
    assert_eq!(reply["error"]["code"], "duplicate", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("report-7") && message.contains("u-a"),
        "{message}"
    );

    // Stream path: a rejected record with the reason, never silence.
    rig.publish(QUEUE, task("u-c")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((code, body)) = rig.last_rejected(QUEUE).await
            && body["id"] == "u-c"
        {
            assert_eq!(code, "duplicate");
            break;
        }
        assert!(Instant::now() < deadline, "no rejected record for u-c");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same task id again is the duplicate-id case, not a unique-key refusal.
    let reply = rig.request("submit.default", task("u-a")).await;
    assert_eq!(reply["duplicates"], json!(["u-a"]), "{reply}");
    rig.wait_record("u-a", Duration::from_secs(10), |r| {
        r.state == TaskState::Succeeded
    })
    .await;
    assert!(rig.record("u-b").await.is_none() && rig.record("u-c").await.is_none());

    // After the window (1.5 s → 2 s) a new task is accepted, twice in a row: the second proves
    // the TTL is also set on a claim re-created over the server's expiry marker.
    for id in ["u-d", "u-e"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = rig.request("submit.default", task(id)).await;
            if reply["ids"] == json!([id]) {
                break;
            }
            assert_eq!(reply["error"]["code"], "duplicate", "{reply}");
            assert!(Instant::now() < deadline, "{id}: key still taken: {reply}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rig.wait_record(id, Duration::from_secs(10), |r| {
            r.state == TaskState::Succeeded
        })
        .await;
    }
    // Stream path after the window.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    rig.publish(QUEUE, task("u-f")).await;
    rig.wait_record("u-f", Duration::from_secs(10), |r| {
        r.state == TaskState::Succeeded
    })
    .await;
}

#[tokio::test]
async fn cancelled_scheduled_and_queued_tasks_never_run() {
    let mut rig = Rig::start(1, 1).await;

    // Scheduled: cancelled while waiting for its time; the timer fires and is dropped.
    rig.publish(
        QUEUE,
        json!({"type": "noop", "id": "c-sched", "delay_ms": 1500}),
    )
    .await;
    rig.wait_record("c-sched", Duration::from_secs(10), |r| {
        r.state == TaskState::Scheduled
    })
    .await;
    let reply = rig.request("cancel", json!({"id": "c-sched"})).await;
    assert_eq!(reply["previous_state"], "scheduled", "{reply}");
    // A sibling due just after it proves the timers have fired.
    rig.publish(
        QUEUE,
        json!({"type": "noop", "id": "c-sib", "delay_ms": 1600}),
    )
    .await;
    rig.wait_record("c-sib", Duration::from_secs(15), |r| {
        r.state == TaskState::Succeeded
    })
    .await;
    let r = rig.record("c-sched").await.unwrap();
    assert_eq!(r.state, TaskState::Cancelled);
    assert!(r.started_at.is_none(), "{r:?}");

    // Queued: no worker serves queue `idle` yet, so the task waits in DROVER_WORK.
    rig.publish("idle", json!({"type": "noop", "id": "c-q", "key": "k"}))
        .await;
    rig.wait_record("c-q", Duration::from_secs(10), |r| {
        r.state == TaskState::Queued
    })
    .await;
    let reply = rig.request("cancel", json!({"id": "c-q"})).await;
    assert_eq!(reply["previous_state"], "queued", "{reply}");
    // Same key, so the same partition, after it: once it ran, the cancelled one was seen.
    rig.publish("idle", json!({"type": "noop", "id": "c-after", "key": "k"}))
        .await;
    rig.add_worker("w-idle", "idle");
    rig.wait_record("c-after", Duration::from_secs(30), |r| {
        r.state == TaskState::Succeeded
    })
    .await;
    let r = rig.record("c-q").await.unwrap();
    assert_eq!(r.state, TaskState::Cancelled);
    assert!(r.started_at.is_none(), "{r:?}");

    // A cancelled task stays cancelled: cancelling again is refused.
    let reply = rig.request("cancel", json!({"id": "c-q"})).await;
    assert_eq!(reply["error"]["code"], "not_allowed", "{reply}");
}

/// Retry timers take the delayed tasks' path (fire early, held to the exact instant), so a retry
/// starts within a few ms of its `next_run_at`, not on the server scheduler's 250 ms tick. Both
/// routes: a backoff shorter than the hold-ahead (straight to `due`) and a longer one (a
/// `Nats-Schedule` firing 1 s early).
#[tokio::test]
async fn retries_start_at_their_backoff_instant() {
    let rig = Rig::start(1, 1).await;
    let mut rx = rig.record_feed(|_| true).await;
    // 3 attempts each: two retries per task; 8 tasks with a 400 ms backoff, 8 with 2,500 ms.
    let tasks: Vec<Value> = (0..16)
        .map(|i| {
            let initial = if i < 8 { 400 } else { 2_500 };
            json!({"type": "fail", "id": format!("r{i}"), "max_attempts": 3,
                   "backoff": {"initial_ms": initial, "factor": 1.0, "jitter": 0.0}})
        })
        .collect();
    rig.publish(QUEUE, Value::Array(tasks)).await;

    // (id, attempt) → planned start of that attempt (the retrying record's next_run_at) and
    // its actual start (started_at of any record of that attempt).
    let mut planned: HashMap<(String, u32), i64> = HashMap::new();
    let mut started: HashMap<(String, u32), i64> = HashMap::new();
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while failed < 16 {
        let Ok(Some(r)) = tokio::time::timeout_at(deadline.into(), rx.recv()).await else {
            panic!(
                "only {failed} of 16 tasks failed for good in time\n{}",
                rig.logs()
            );
        };
        if r.state == TaskState::Retrying {
            let at = ms(r.next_run_at.expect("retrying records carry next_run_at"));
            planned.insert((r.id.clone(), r.attempt + 1), at);
        }
        if let Some(s) = r.started_at {
            started.insert((r.id.clone(), r.attempt), ms(s));
        }
        if r.state == TaskState::Failed {
            assert_eq!(r.attempt, 3, "{r:?}");
            failed += 1;
        }
    }
    assert_eq!(planned.len(), 32, "two retries per task: {planned:?}");
    let mut short = Vec::new();
    let mut long = Vec::new();
    for ((id, attempt), at) in &planned {
        let late = started[&(id.clone(), *attempt)] - at;
        assert!(
            late >= 0,
            "{id} attempt {attempt} started {} ms early",
            -late
        );
        let i: usize = id[1..].parse().unwrap();
        if i < 8 { &mut short } else { &mut long }.push(late);
    }
    short.sort_unstable();
    long.sort_unstable();
    eprintln!(
        "retry lateness: 400 ms backoff (direct) p50 {} ms max {} ms; \
         2,500 ms backoff (scheduled) p50 {} ms max {} ms",
        percentile(&short, 0.5),
        short.last().unwrap(),
        percentile(&long, 0.5),
        long.last().unwrap()
    );
    // The scheduler's tick alone would make these 0–250 ms late (median about 125 ms).
    for (what, late) in [("direct", &short), ("scheduled", &long)] {
        assert!(
            percentile(late, 0.5) <= 50,
            "{what} retries: median lateness {} ms: {late:?}",
            percentile(late, 0.5)
        );
        assert!(
            *late.last().unwrap() < 200,
            "{what} retries: max lateness {} ms: {late:?}",
            late.last().unwrap()
        );
    }
}

/// Issue #6: 10,000 tasks with delays spread over 5 s, the leader SIGKILLed midway: none lost,
/// none early, lateness reported. `DROVER_DELAY_TEST_TASKS` scales the count.
#[tokio::test]
async fn ten_thousand_delayed_tasks_survive_a_leader_kill() {
    let n: usize = std::env::var("DROVER_DELAY_TEST_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let spread_ms: i64 = 5_000;
    let rig = Rig::start(2, 2).await;
    // Every terminal record, from the start.
    let mut rx = rig.record_feed(|r| r.state.is_terminal()).await;

    let base = now_ms() + 4_000;
    let due: Vec<i64> = (0..n)
        .map(|i| base + (i as i64 * spread_ms) / n as i64)
        .collect();
    let submit_start = Instant::now();
    let mut acks = Vec::new();
    for (c, chunk) in due.chunks(100).enumerate() {
        let tasks: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, &t)| {
                let at = DateTime::from_timestamp_millis(t).unwrap();
                json!({"type": "noop", "id": format!("t{}", c * 100 + j),
                       "run_at": drover_shared::task::format_time(&at)})
            })
            .collect();
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("chunk-{c}"));
        acks.push(
            rig.js
                .publish_with_headers(
                    rig.names.submit_subject(QUEUE),
                    h,
                    serde_json::to_vec(&tasks).unwrap().into(),
                )
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    eprintln!(
        "submitted {n} delayed tasks in {:?}",
        submit_start.elapsed()
    );

    // SIGKILL the leader halfway through the spread.
    let kill_at = base + spread_ms / 2;
    tokio::time::sleep(Duration::from_millis((kill_at - now_ms()).max(0) as u64)).await;
    let leader = wait_leader(&rig.js, &rig.names, None, Duration::from_secs(5)).await;
    let killed_ms = now_ms();
    let victim = rig
        .dispatchers
        .iter()
        .position(|d| d.name() == leader)
        .unwrap();
    rig.dispatchers[victim].kill();
    let next = wait_leader(&rig.js, &rig.names, Some(&leader), Duration::from_secs(15)).await;
    let new_leader_ms = now_ms();
    eprintln!(
        "SIGKILLed leader {leader}; {next} leads {} ms later",
        new_leader_ms - killed_ms
    );

    // Every task must finish.
    let mut done: HashMap<String, TaskRecord> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while done.len() < n {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(r)) => {
                done.insert(r.id.clone(), r);
            }
            _ => break,
        }
    }
    let missing: Vec<String> = (0..n)
        .map(|i| format!("t{i}"))
        .filter(|id| !done.contains_key(id))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {n} tasks never finished, e.g. {missing:?}\n{}",
        n - done.len(),
        rig.logs()
    );

    // Lateness, split into tasks the failover could not serve on time and the rest. A task is
    // affected if it was due from one hold-ahead before the kill until the held timers of the
    // dead leader came back (the due consumer's ack_wait after their delivery) and a new leader
    // was in place.
    let affected_until = (killed_ms + 2_500).max(new_leader_ms) + 200;
    let mut normal = Vec::new();
    let mut affected = Vec::new();
    let mut early = Vec::new();
    for (i, &t) in due.iter().enumerate() {
        let r = &done[&format!("t{i}")];
        assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
        let late = ms(r.started_at.expect("terminal records carry started_at")) - t;
        if late < 0 {
            early.push((i, late));
        }
        if t >= killed_ms - 1_000 && t <= affected_until {
            affected.push(late);
        } else {
            normal.push(late);
        }
    }
    normal.sort_unstable();
    affected.sort_unstable();
    eprintln!(
        "delay precision, {n} tasks over {spread_ms} ms, leader SIGKILLed at +{} ms: \
         unaffected {} tasks p50 {} ms p99 {} ms max {} ms; \
         failover window {} tasks p50 {} ms p99 {} ms max {} ms",
        killed_ms - base,
        normal.len(),
        percentile(&normal, 0.5),
        percentile(&normal, 0.99),
        normal.last().copied().unwrap_or(0),
        affected.len(),
        percentile(&affected, 0.5),
        percentile(&affected, 0.99),
        affected.last().copied().unwrap_or(0),
    );
    assert!(
        early.is_empty(),
        "{} tasks started before their time, e.g. {:?}",
        early.len(),
        &early[..early.len().min(5)]
    );
    let bound: i64 = std::env::var("DROVER_DELAY_TEST_P99_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    assert!(
        percentile(&normal, 0.99) <= bound,
        "p99 lateness of tasks outside the failover window is above {bound} ms"
    );
}
