//! Dependencies, workflows and sharded broadcast (SPEC §1.1 `depends_on`, `shards`; §1.2
//! `scheduled`, `upstream_failed`; §1.5 `cycle`, `missing_dependency`) against a real
//! nats-server with real dispatcher and worker processes: a 100-task DAG completes in dependency
//! order across a leader SIGKILL (with the release latency measured), a failing node fails
//! exactly its descendants, a cancelled held task fails its dependents, cycles and unknown
//! dependencies are rejected on both submit paths, and shards land on distinct workers and
//! survive a worker's SIGKILL.

use async_nats::jetstream::{self, context::Context};
use async_nats::{Client, HeaderMap};
use drover_shared::names::Names;
use drover_shared::task::{TaskRecord, TaskState};
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

const QUEUE: &str = "default";
const TTL_MS: u64 = 2_000;
const PARTITIONS: u32 = 8;

struct Rig {
    server: NatsServer,
    ds: Vec<DroverProcess>,
    ws: Vec<DroverProcess>,
    client: Client,
    js: Context,
    names: Names,
    /// Partitions of the queue (`DROVER_QUEUES__DEFAULT__PARTITIONS` of every process).
    partitions: u32,
}

fn common_env(partitions: u32) -> Vec<(&'static str, String)> {
    vec![
        ("DROVER_KEYS", TEST_KEYS.to_owned()),
        ("DROVER_LOG", "info".to_owned()),
        ("DROVER_TOPOLOGY__WORKER_TTL_MS", TTL_MS.to_string()),
        ("DROVER_WORKER__HEARTBEAT_MS", "400".to_owned()),
        ("DROVER_WORKER__FENCE_MARGIN_MS", "500".to_owned()),
        ("DROVER_QUEUES__DEFAULT__PARTITIONS", partitions.to_string()),
    ]
}

impl Rig {
    async fn start(dispatchers: usize, workers: usize) -> Self {
        Self::start_with(dispatchers, workers, PARTITIONS).await
    }

    /// A rig whose queue has `partitions` partitions.
    async fn start_with(dispatchers: usize, workers: usize, partitions: u32) -> Self {
        let server = NatsServer::start().await;
        let url = server.client_url();
        let ds = (1..=dispatchers)
            .map(|i| {
                DroverProcess::start(
                    &format!("d{i}"),
                    "drover-dispatcher",
                    &[
                        "--nats-url".into(),
                        url.clone(),
                        "--id".into(),
                        format!("d{i}"),
                    ],
                    &common_env(partitions),
                )
            })
            .collect();
        let client = server.connect().await;
        let js = jetstream::new(client.clone());
        let mut rig = Self {
            server,
            ds,
            ws: Vec::new(),
            client,
            js,
            names: Names::default(),
            partitions,
        };
        rig.leader(None, Duration::from_secs(30)).await;
        for i in 1..=workers {
            rig.add_worker(&format!("w{i}"));
        }
        rig.wait_assigned(workers, Duration::from_secs(30)).await;
        rig
    }

    fn add_worker(&mut self, id: &str) {
        let mut env = common_env(self.partitions);
        env.push(("DROVER_CONCURRENCY", "32".to_owned()));
        self.ws.push(DroverProcess::start(
            id,
            "drover-worker",
            &[
                "--nats-url".into(),
                self.server.client_url(),
                "--id".into(),
                id.into(),
                "--queues".into(),
                QUEUE.into(),
            ],
            &env,
        ));
    }

    /// The leader's id (one other than `not`).
    async fn leader(&self, not: Option<&str>, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(kv) = self.js.get_key_value(self.names.bucket("election")).await
                && let Ok(Some(v)) = kv.get("leader").await
                && let Ok(v) = serde_json::from_slice::<Value>(&v)
                && let Some(id) = v["id"].as_str()
                && Some(id) != not
            {
                return id.to_owned();
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `assignment.default` spreads the partitions over `n` workers.
    async fn wait_assigned(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(owners) = self.owners().await
                && owners.len() == n
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "assignment never reached {n} workers: {:?}\n{}",
                self.owners().await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn owners(&self) -> Option<BTreeSet<String>> {
        let kv = self
            .js
            .get_key_value(self.names.bucket("state"))
            .await
            .ok()?;
        let v = kv.get(format!("assignment.{QUEUE}")).await.ok()??;
        let v: Value = serde_json::from_slice(&v).ok()?;
        Some(
            v["partitions"]
                .as_object()?
                .values()
                .filter_map(|w| w.as_str().map(str::to_owned))
                .collect(),
        )
    }

    async fn submit(&self, body: Value) {
        self.js
            .publish(self.names.submit_subject(QUEUE), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn api_submit(&self, body: Value) -> Value {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            self.client.request_with_headers(
                self.names.api(&format!("submit.{QUEUE}")),
                HeaderMap::new(),
                body.to_string().into(),
            ),
        )
        .await
        .expect("a reply")
        .expect("request");
        serde_json::from_slice(&reply.payload).unwrap()
    }

    async fn ask(&self, endpoint: &str, body: Value) -> Value {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            self.client
                .request(self.names.api(endpoint), body.to_string().into()),
        )
        .await
        .expect("a reply")
        .expect("request");
        serde_json::from_slice(&reply.payload).unwrap()
    }

    async fn record(&self, id: &str) -> Option<TaskRecord> {
        let kv = self
            .js
            .get_key_value(self.names.bucket("tasks"))
            .await
            .ok()?;
        let e = kv.entry(id).await.ok()??;
        serde_json::from_slice(&e.value).ok()
    }

    /// Waits until every id in `ids` is terminal; returns their records.
    async fn wait_terminal(
        &self,
        ids: &[String],
        timeout: Duration,
    ) -> HashMap<String, TaskRecord> {
        let deadline = Instant::now() + timeout;
        let mut done: HashMap<String, TaskRecord> = HashMap::new();
        loop {
            for id in ids {
                if done.contains_key(id) {
                    continue;
                }
                if let Some(r) = self.record(id).await
                    && r.state.is_terminal()
                {
                    done.insert(id.clone(), r);
                }
            }
            if done.len() == ids.len() {
                return done;
            }
            if Instant::now() >= deadline {
                let mut missing = Vec::new();
                for id in ids.iter().filter(|id| !done.contains_key(*id)).take(10) {
                    missing.push((id.clone(), self.record(id).await.map(|r| r.state)));
                }
                panic!(
                    "{} of {} tasks not terminal within {timeout:?}, e.g. {missing:?}\n{}",
                    ids.len() - done.len(),
                    ids.len(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_state(&self, id: &str, state: TaskState, timeout: Duration) -> TaskRecord {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.record(id).await
                && r.state == state
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{id} not {state} within {timeout:?}: {:?}\n{}",
                self.record(id).await.map(|r| r.state),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The newest rejected record of the queue (waiting up to `timeout`) as `(code, headers)`.
    async fn rejected_since(&self, after: u64, timeout: Duration) -> Vec<String> {
        let s = self.js.get_stream(self.names.dlq_stream()).await.unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            let last = s.get_info().await.unwrap().state.last_sequence;
            let mut codes = Vec::new();
            for seq in after + 1..=last {
                if let Ok(m) = s.get_raw_message(seq).await
                    && m.subject.as_str() == self.names.rejected_subject(QUEUE)
                    && let Some(code) = m.headers.get("Drover-Error-Code")
                {
                    codes.push(code.as_str().to_owned());
                }
            }
            if !codes.is_empty() || Instant::now() >= deadline {
                return codes;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn dlq_last_seq(&self) -> u64 {
        let s = self.js.get_stream(self.names.dlq_stream()).await.unwrap();
        s.get_info().await.unwrap().state.last_sequence
    }

    fn logs(&self) -> String {
        self.ds
            .iter()
            .chain(self.ws.iter())
            .map(|d| {
                let log = d.log();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", d.name(), tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A deterministic layered DAG: `levels` × `width` tasks; each task below the first level
/// depends on 1..=3 tasks of the level above (fan-in), and every task above has at least one
/// child (fan-out).
/// The array submission of `tasks` (from [`dag`]) as `sleep` tasks of `ms` each, and their ids.
fn sleep_tasks(tasks: &[(String, Vec<String>)], ms: u64) -> (Value, Vec<String>) {
    let body = tasks
        .iter()
        .map(|(id, deps)| json!({"id": id, "type": "sleep", "payload": {"ms": ms}, "depends_on": deps}))
        .collect();
    let ids = tasks.iter().map(|(id, _)| id.clone()).collect();
    (Value::Array(body), ids)
}

fn dag(prefix: &str, levels: usize, width: usize) -> Vec<(String, Vec<String>)> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let id = |l: usize, i: usize| format!("{prefix}-{l}-{i}");
    let mut tasks = Vec::new();
    for l in 0..levels {
        for i in 0..width {
            let mut deps = BTreeSet::new();
            if l > 0 {
                deps.insert(id(l - 1, i)); // every task above gets a child
                let extra = (next() % 3) as usize;
                for _ in 0..extra {
                    deps.insert(id(l - 1, (next() as usize) % width));
                }
            }
            tasks.push((id(l, i), deps.into_iter().collect()));
        }
    }
    tasks
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Milliseconds from a child's last parent finishing to the child starting, per child.
fn release_latencies(
    tasks: &[(String, Vec<String>)],
    records: &HashMap<String, TaskRecord>,
) -> Vec<(String, i64, chrono::DateTime<chrono::Utc>)> {
    let mut out = Vec::new();
    for (id, deps) in tasks {
        if deps.is_empty() {
            continue;
        }
        let child = &records[id];
        let last = deps
            .iter()
            .filter_map(|d| records[d].finished_at)
            .max()
            .unwrap();
        let started = child.started_at.unwrap();
        out.push((id.clone(), (started - last).num_milliseconds(), last));
    }
    out
}

/// Issue #6: dependents start within 50 ms of their last parent. A 200-task DAG (10 levels of
/// 20, fan-in and fan-out, 20 ms tasks) with no fault, on the default 64 partitions; reports
/// p50/p99 of the release latency (`DROVER_TEST_RELEASE_BINS=1` for release binaries). Asserts
/// only a loose bound, since the shared test machine's load decides the tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dependents_start_soon_after_their_last_parent() {
    let lat = release_latency_of_a_dag(64).await;
    assert!(
        percentile(&lat, 0.5) < 250,
        "median release latency {} ms",
        percentile(&lat, 0.5)
    );
}

/// The same DAG on 8 partitions: with `max_in_flight = 1` a partition runs one envelope at a
/// time, so 20 concurrent tasks over 8 partitions queue behind each other (a child may wait
/// for a 20 ms sibling in its partition). Reported next to the 64-partition figure; the bound
/// asserted is loose for the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dependents_on_few_partitions_queue_behind_siblings() {
    let lat = release_latency_of_a_dag(8).await;
    assert!(
        percentile(&lat, 0.5) < 500,
        "median release latency {} ms",
        percentile(&lat, 0.5)
    );
}

/// Runs the 200-task DAG on a queue of `partitions` partitions, 1 dispatcher, 3 workers;
/// checks every task succeeded and no child started before a parent finished; returns the
/// release latencies (ms), sorted.
async fn release_latency_of_a_dag(partitions: u32) -> Vec<i64> {
    let rig = Rig::start_with(1, 3, partitions).await;
    let tasks = dag("rel", 10, 20);
    let (body, ids) = sleep_tasks(&tasks, 20);
    rig.submit(body).await;
    let records = rig.wait_terminal(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(records[id].state, TaskState::Succeeded, "{:?}", records[id]);
    }
    let mut lat: Vec<i64> = release_latencies(&tasks, &records)
        .into_iter()
        .map(|(_, ms, _)| ms)
        .collect();
    lat.sort_unstable();
    println!(
        "release latency (last parent finished -> child started), {partitions} partitions, {} children, no fault: p50 {} ms, p99 {} ms, max {} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );
    assert!(lat[0] >= 0, "a child started before its parent finished");
    lat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dag_completes_in_dependency_order_across_a_leader_kill() {
    let rig = Rig::start(2, 3).await;
    let tasks = dag("dag", 10, 10);
    let (body, ids) = sleep_tasks(&tasks, 60);
    let first = rig.leader(None, Duration::from_secs(5)).await;
    rig.submit(body).await;

    // Held tasks show `scheduled` (the last level waits for nine levels).
    let r = rig
        .wait_state("dag-9-0", TaskState::Scheduled, Duration::from_secs(10))
        .await;
    assert!(r.started_at.is_none());

    // SIGKILL the leader once some levels are done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rig
        .record("dag-3-0")
        .await
        .is_none_or(|r| r.state != TaskState::Succeeded)
    {
        assert!(
            Instant::now() < deadline,
            "level 3 never ran\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = chrono::Utc::now();
    let leader = rig.ds.iter().find(|d| d.name() == first).unwrap();
    leader.kill();
    let second = rig.leader(Some(&first), Duration::from_secs(15)).await;
    let took_over = chrono::Utc::now();
    assert_ne!(first, second);

    let records = rig.wait_terminal(&ids, Duration::from_secs(90)).await;
    for (id, deps) in &tasks {
        let r = &records[id];
        assert_eq!(r.state, TaskState::Succeeded, "{id}: {r:?}");
        for d in deps {
            let p = &records[d];
            assert!(
                r.started_at.unwrap() >= p.finished_at.unwrap(),
                "{id} started {:?} before its parent {d} finished {:?}",
                r.started_at,
                p.finished_at
            );
        }
    }
    // No held entry is left behind.
    let state = rig
        .js
        .get_key_value(rig.names.bucket("state"))
        .await
        .unwrap();
    let mut keys = state.keys().await.unwrap();
    use futures::StreamExt;
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        assert!(!k.starts_with("held."), "held entry {k} left behind");
    }

    let lat = release_latencies(&tasks, &records);
    let window = |at: &chrono::DateTime<chrono::Utc>| {
        *at >= killed_at - chrono::Duration::milliseconds(200)
            && *at <= took_over + chrono::Duration::milliseconds(500)
    };
    let mut steady: Vec<i64> = lat
        .iter()
        .filter(|(_, _, at)| !window(at))
        .map(|(_, ms, _)| *ms)
        .collect();
    let mut failover: Vec<i64> = lat
        .iter()
        .filter(|(_, _, at)| window(at))
        .map(|(_, ms, _)| *ms)
        .collect();
    steady.sort_unstable();
    failover.sort_unstable();
    println!(
        "release latency (last parent finished -> child started), {} children outside the failover window: p50 {} ms, p99 {} ms, max {} ms",
        steady.len(),
        percentile(&steady, 0.5),
        percentile(&steady, 0.99),
        steady.last().copied().unwrap_or(0)
    );
    println!(
        "release latency for {} children whose last parent finished around the leader kill ({} ms leaderless): p50 {} ms, max {} ms",
        failover.len(),
        (took_over - killed_at).num_milliseconds(),
        percentile(&failover, 0.5),
        failover.last().copied().unwrap_or(0)
    );
    assert!(!steady.is_empty());
    assert!(
        percentile(&steady, 0.5) < 250,
        "median release latency {} ms",
        percentile(&steady, 0.5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_node_fails_exactly_its_descendants_and_cancel_reaches_dependents() {
    let rig = Rig::start(1, 2).await;
    // a → b(fails) → d → f ;  a → c → e ; d also needs c ; g independent of b.
    let spec = [
        ("a", vec![], "noop"),
        ("b", vec!["a"], "fail"),
        ("c", vec!["a"], "noop"),
        ("d", vec!["b", "c"], "noop"),
        ("e", vec!["c"], "noop"),
        ("f", vec!["d"], "noop"),
        ("g", vec!["a", "c"], "noop"),
    ];
    let body: Vec<Value> = spec
        .iter()
        .map(|(id, deps, ty)| {
            json!({"id": format!("ff-{id}"), "type": ty, "max_attempts": 1,
                   "payload": if *ty == "fail" { json!({"message": "boom"}) } else { Value::Null },
                   "depends_on": deps.iter().map(|d| format!("ff-{d}")).collect::<Vec<_>>()})
        })
        .collect();
    rig.submit(Value::Array(body)).await;
    let ids: Vec<String> = spec.iter().map(|(id, _, _)| format!("ff-{id}")).collect();
    let records = rig.wait_terminal(&ids, Duration::from_secs(30)).await;
    let states: BTreeMap<&str, TaskState> = spec
        .iter()
        .map(|(id, _, _)| (*id, records[&format!("ff-{id}")].state))
        .collect();
    use TaskState::*;
    assert_eq!(
        states,
        BTreeMap::from([
            ("a", Succeeded),
            ("b", Failed),
            ("c", Succeeded),
            ("d", UpstreamFailed),
            ("e", Succeeded),
            ("f", UpstreamFailed),
            ("g", Succeeded),
        ])
    );
    let d = &records["ff-d"];
    assert!(d.error.as_ref().unwrap().message.contains("ff-b"), "{d:?}");
    assert!(d.finished_at.is_some() && d.worker.is_none());
    let f = &records["ff-f"];
    assert!(f.error.as_ref().unwrap().message.contains("ff-d"), "{f:?}");

    // A task submitted later that depends on the failed one fails at intake, on both paths.
    rig.submit(json!({"id": "late", "type": "noop", "depends_on": ["ff-b"]}))
        .await;
    let late = rig
        .wait_state("late", UpstreamFailed, Duration::from_secs(10))
        .await;
    assert!(late.error.unwrap().message.contains("ff-b"));
    // And one depending on a succeeded task runs at once.
    rig.submit(json!({"id": "late-ok", "type": "noop", "depends_on": ["ff-a", "ff-g"]}))
        .await;
    rig.wait_state("late-ok", Succeeded, Duration::from_secs(10))
        .await;

    // Cancel of a held task: it becomes cancelled, its dependent upstream_failed, its parent
    // runs on.
    rig.submit(json!([
        {"id": "slow", "type": "sleep", "payload": {"ms": 1500}},
        {"id": "held", "type": "noop", "depends_on": ["slow"]},
        {"id": "after", "type": "noop", "depends_on": ["held"]}
    ]))
    .await;
    rig.wait_state("held", Scheduled, Duration::from_secs(10))
        .await;
    let reply = rig.ask("cancel", json!({"id": "held"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let after = rig
        .wait_state("after", UpstreamFailed, Duration::from_secs(10))
        .await;
    assert!(after.error.unwrap().message.contains("held"));
    rig.wait_state("slow", Succeeded, Duration::from_secs(10))
        .await;
    // The cancelled task never ran, even after its parent succeeded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = rig.record("held").await.unwrap();
    assert_eq!(held.state, Cancelled);
    assert!(held.worker.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cycles_and_missing_dependencies_are_rejected_on_both_paths() {
    let rig = Rig::start(1, 1).await;
    // Validated path.
    let cyc = json!([
        {"id": "c1", "type": "noop", "depends_on": ["c3"]},
        {"id": "c2", "type": "noop", "depends_on": ["c1"]},
        {"id": "c3", "type": "noop", "depends_on": ["c2"]}
    ]);
    let reply = rig.api_submit(cyc.clone()).await;
    assert_eq!(reply["error"]["code"], "cycle", "{reply}");
    let own = rig
        .api_submit(json!({"id": "me", "type": "noop", "depends_on": ["me"]}))
        .await;
    assert_eq!(own["error"]["code"], "cycle", "{own}");
    let missing = json!([
        {"id": "m1", "type": "noop"},
        {"id": "m2", "type": "noop", "depends_on": ["m1", "nobody"]}
    ]);
    let reply = rig.api_submit(missing.clone()).await;
    assert_eq!(reply["error"]["code"], "missing_dependency", "{reply}");
    assert_eq!(reply["error"]["index"], 1, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nobody")
    );

    // Stream path: a rejected record each, and no task of either array exists.
    let before = rig.dlq_last_seq().await;
    rig.submit(cyc).await;
    let codes = rig.rejected_since(before, Duration::from_secs(10)).await;
    assert_eq!(codes, ["cycle"]);
    let before = rig.dlq_last_seq().await;
    rig.submit(missing).await;
    let codes = rig.rejected_since(before, Duration::from_secs(10)).await;
    assert_eq!(codes, ["missing_dependency"]);
    for id in ["c1", "c2", "c3", "m1", "m2"] {
        assert!(rig.record(id).await.is_none(), "{id} has a record");
    }

    // A dependency on an existing task is accepted on the validated path and runs after it.
    let ok = rig.api_submit(json!([{"id": "p1", "type": "noop"}])).await;
    assert_eq!(ok["ok"], true, "{ok}");
    rig.wait_state("p1", TaskState::Succeeded, Duration::from_secs(10))
        .await;
    let ok = rig
        .api_submit(json!({"id": "k1", "type": "noop", "depends_on": ["p1"]}))
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    rig.wait_state("k1", TaskState::Succeeded, Duration::from_secs(10))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_land_on_distinct_workers_and_survive_a_worker_kill() {
    let rig = Rig::start(1, 3).await;
    rig.submit(json!({"id": "bc", "type": "echo", "payload": {"x": 1}, "shards": 3}))
        .await;
    let parent = rig
        .wait_state("bc", TaskState::Succeeded, Duration::from_secs(20))
        .await;
    let shard_ids: Vec<String> = (0..3).map(|i| format!("bc-s{i}")).collect();
    let shards = rig.wait_terminal(&shard_ids, Duration::from_secs(5)).await;
    let workers: BTreeSet<String> = shards.values().map(|r| r.worker.clone().unwrap()).collect();
    assert_eq!(workers.len(), 3, "shards on {workers:?}");
    for (i, id) in shard_ids.iter().enumerate() {
        let r = &shards[id];
        assert_eq!(r.parent.as_deref(), Some("bc"));
        assert_eq!(r.shard.unwrap().index, i as u32);
        assert_eq!(r.shard.unwrap().total, 3);
    }
    assert_eq!(parent.result.unwrap().get(), r#"[{"x":1},{"x":1},{"x":1}]"#);

    // "all": one per live worker.
    rig.submit(json!({"id": "every", "type": "noop", "shards": "all"}))
        .await;
    rig.wait_state("every", TaskState::Succeeded, Duration::from_secs(20))
        .await;
    let all: Vec<String> = (0..3).map(|i| format!("every-s{i}")).collect();
    let recs = rig.wait_terminal(&all, Duration::from_secs(5)).await;
    let on: BTreeSet<String> = recs.values().map(|r| r.worker.clone().unwrap()).collect();
    assert_eq!(on.len(), 3);
    assert!(rig.record("every-s3").await.is_none());

    // A shard's worker is SIGKILLed mid-run: its shard completes elsewhere.
    rig.submit(json!({"id": "long", "type": "sleep", "payload": {"ms": 2500}, "shards": 3}))
        .await;
    let ids: Vec<String> = (0..3).map(|i| format!("long-s{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let victim = loop {
        let mut running = Vec::new();
        for id in &ids {
            if let Some(r) = rig.record(id).await
                && r.state == TaskState::Running
            {
                running.push(r);
            }
        }
        if running.len() == 3 {
            break running[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "shards never all ran\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let killed = victim.worker.clone().unwrap();
    rig.ws.iter().find(|w| w.name() == killed).unwrap().kill();
    let parent = rig
        .wait_state("long", TaskState::Succeeded, Duration::from_secs(30))
        .await;
    assert!(parent.finished_at.is_some());
    let r = rig.record(&victim.id).await.unwrap();
    assert_eq!(r.state, TaskState::Succeeded);
    assert_ne!(r.worker.as_deref(), Some(killed.as_str()), "{r:?}");
}

/// A shard that ends without success fails its parent at once, and the shards still running
/// are cancelled rather than left to run to an end that can no longer change the parent.
#[tokio::test]
async fn a_failed_shard_cancels_the_siblings_still_running() {
    let rig = Rig::start(1, 3).await;
    rig.submit(
        json!({"id": "sc", "type": "sleep", "payload": {"ms": 30000},
                      "timeout_ms": 60000, "shards": 3}),
    )
    .await;
    let ids: Vec<String> = (0..3).map(|i| format!("sc-s{i}")).collect();
    for id in &ids {
        rig.wait_state(id, TaskState::Running, Duration::from_secs(20))
            .await;
    }
    // Shard 1 ends without success (cancelled by request): the parent fails.
    let cancelled_at = Instant::now();
    let reply = rig.ask("cancel", json!({"id": "sc-s1"})).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let parent = rig
        .wait_state("sc", TaskState::Failed, Duration::from_secs(10))
        .await;
    assert!(
        parent.error.as_ref().unwrap().message.contains("sc-s1"),
        "{parent:?}"
    );
    // Its siblings, 30 s from their end, are cancelled within seconds.
    let done = rig.wait_terminal(&ids, Duration::from_secs(10)).await;
    for id in ["sc-s0", "sc-s2"] {
        let r = &done[id];
        assert_eq!(r.state, TaskState::Cancelled, "{r:?}");
        let e = r.error.as_ref().unwrap();
        assert!(e.message.contains("parent sc failed"), "{e:?}");
    }
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(10),
        "siblings ended {:?} after the first shard",
        cancelled_at.elapsed()
    );
    // The workers stopped them: no sibling reports success afterwards.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in ["sc-s0", "sc-s2"] {
        assert_eq!(rig.record(id).await.unwrap().state, TaskState::Cancelled);
    }
}
