//! The worker against a real nats-server, as real processes and in-process (SPEC §3, §6, §6.1,
//! §7). No dispatcher runs here: each test provisions the topology, writes `assignment.<queue>`
//! and `queued` records, and seals and publishes envelopes itself, the way the leader would, and
//! reads the outcome messages straight from `DROVER_OUTCOMES`.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, context::Context};
use drover_shared::envelope::{self, BatchMeta, CodecConfig};
use drover_shared::keyring::Keyring;
use drover_shared::names::Names;
use drover_shared::outcome::{Outcome, OutcomeMessage, OutcomeStatus};
use drover_shared::partition::partition_for_key;
use drover_shared::ring::{self, Member};
use drover_shared::settings::{Secret, Settings};
use drover_shared::task::{ErrorKind, Task, TaskRecord, TaskState};
use drover_shared::topology::{self, QueueConsumerConfig, TopologyConfig};
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use drover_worker::{HandlerError, Worker};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TTL_MS: u64 = 2_000;
const HEARTBEAT_MS: u64 = 500;
const FENCE_MARGIN_MS: u64 = 500;

fn keyring() -> Keyring {
    Keyring::parse(TEST_KEYS).unwrap()
}

fn topology_config() -> TopologyConfig {
    TopologyConfig {
        worker_ttl_ms: TTL_MS,
        ..TopologyConfig::default()
    }
}

fn now_ms() -> i64 {
    envelope::now_ms() as i64
}

/// One test's server, names and JetStream handle, provisioned like a dispatcher would.
struct Fixture {
    server: NatsServer,
    js: Context,
    client: async_nats::Client,
    names: Names,
    next_seq: u64,
    outcomes: Vec<(String, Outcome)>,
}

impl Fixture {
    async fn start() -> Self {
        let server = NatsServer::start().await;
        let client = server.connect().await;
        let names = Names::new("drover").unwrap();
        topology::provision(&client, &names, &topology_config())
            .await
            .unwrap();
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(8192)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Self {
            server,
            js,
            client,
            names,
            next_seq: 1,
            outcomes: Vec::new(),
        }
    }

    async fn queue(&self, queue: &str, partitions: u32) {
        topology::provision_queue(
            &self.js,
            &self.names,
            queue,
            partitions,
            &QueueConsumerConfig {
                max_in_flight: 1,
                ack_wait: Duration::from_millis(TTL_MS),
            },
        )
        .await
        .unwrap();
    }

    fn worker(&self, id: &str, queues: &str, extra: &[(&str, String)]) -> DroverProcess {
        let mut env = vec![
            ("DROVER_KEYS", TEST_KEYS.to_owned()),
            ("DROVER_LOG", "info,drover_worker=debug".to_owned()),
            ("DROVER_TOPOLOGY__WORKER_TTL_MS", TTL_MS.to_string()),
            ("DROVER_WORKER__HEARTBEAT_MS", HEARTBEAT_MS.to_string()),
            (
                "DROVER_WORKER__FENCE_MARGIN_MS",
                FENCE_MARGIN_MS.to_string(),
            ),
        ];
        env.extend(extra.iter().cloned());
        DroverProcess::start(
            id,
            "drover-worker",
            &[
                "--nats-url".into(),
                self.server.client_url(),
                "--id".into(),
                id.into(),
                "--queues".into(),
                queues.into(),
            ],
            &env,
        )
    }

    /// Settings for an in-process worker.
    fn settings(&self, id: &str, queue: &str) -> Settings {
        let mut s = Settings {
            id: Some(id.to_owned()),
            ..Settings::default()
        };
        s.nats.url = vec![self.server.client_url()];
        s.keys.inline = Some(Secret::new(TEST_KEYS));
        s.topology = topology_config();
        s.worker.queues = vec![queue.to_owned()];
        s.worker.heartbeat_ms = HEARTBEAT_MS;
        s.worker.fence_margin_ms = FENCE_MARGIN_MS;
        s.worker.concurrency = Some(8);
        s
    }

    async fn kv(&self, bucket: &str) -> jetstream::kv::Store {
        self.js
            .get_key_value(self.names.bucket(bucket))
            .await
            .unwrap()
    }

    /// Waits until every id in `ids` has a key in `drover-workers`.
    async fn wait_workers(&self, ids: &[&str], procs: &[&DroverProcess]) {
        let kv = self.kv("workers").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut all = true;
            for id in ids {
                if kv.get(*id).await.unwrap().is_none() {
                    all = false;
                }
            }
            if all {
                return;
            }
            let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
            assert!(
                Instant::now() < deadline,
                "workers {ids:?} did not register; logs:\n{}",
                logs.join("\n----\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes `assignment.<queue>` with `partitions` (partition → owner).
    async fn assign(
        &self,
        queue: &str,
        epoch: u64,
        version: u64,
        partitions: &BTreeMap<u32, String>,
    ) {
        let members: BTreeMap<&str, u32> = partitions.values().map(|w| (w.as_str(), 1)).collect();
        let value = serde_json::json!({
            "epoch": epoch,
            "version": version,
            "partitions": partitions.iter().map(|(p, w)| (p.to_string(), w)).collect::<BTreeMap<_, _>>(),
            "members": members,
        });
        self.kv("state")
            .await
            .put(
                format!("assignment.{queue}"),
                serde_json::to_vec(&value).unwrap().into(),
            )
            .await
            .unwrap();
    }

    /// The leader's placement of `queue` over the live workers, with the shared ring.
    async fn assign_from_ring(
        &self,
        queue: &str,
        partitions: u32,
        epoch: u64,
    ) -> BTreeMap<u32, String> {
        let kv = self.kv("workers").await;
        let mut keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
        keys.sort();
        let members: Vec<Member> = keys.iter().map(|k| Member::new(k.clone(), 1)).collect();
        let placed = ring::assign(queue, partitions, &members).unwrap().unwrap();
        let map = placed.partitions().clone();
        self.assign(queue, epoch, 1, &map).await;
        map
    }

    /// Writes `queued` records (as the leader does) and publishes one sealed envelope.
    async fn dispatch(&self, queue: &str, partition: u32, tasks: &[Task]) {
        self.dispatch_sealed(queue, partition, tasks, &keyring())
            .await;
    }

    async fn write_queued(&self, tasks: &[Task]) {
        let bucket = self.names.bucket("tasks");
        let mut acks = Vec::new();
        for t in tasks {
            let rec = TaskRecord::new(t, TaskState::Queued, chrono::Utc::now());
            let mut h = HeaderMap::new();
            h.insert("Nats-Expected-Last-Subject-Sequence", "0");
            acks.push(
                self.js
                    .publish_with_headers(
                        format!("$KV.{bucket}.{}", t.id),
                        h,
                        serde_json::to_vec(&rec).unwrap().into(),
                    )
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }

    async fn dispatch_sealed(&self, queue: &str, partition: u32, tasks: &[Task], ring: &Keyring) {
        self.write_queued(tasks).await;
        let (headers, body) = seal(ring, queue, partition, tasks);
        self.publish_raw(queue, partition, headers, body).await;
    }

    async fn publish_raw(&self, queue: &str, partition: u32, headers: HeaderMap, body: Vec<u8>) {
        self.js
            .publish_with_headers(
                self.names.work_subject(queue, partition),
                headers,
                body.into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Reads the outcome messages published since the last call (without consuming them).
    async fn poll_outcomes(&mut self) {
        let stream = self
            .js
            .get_stream(self.names.outcomes_stream())
            .await
            .unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        while self.next_seq <= last {
            if let Ok(m) = stream.get_raw_message(self.next_seq).await {
                let om = OutcomeMessage::decode(&m.payload).unwrap();
                for o in om.outcomes {
                    self.outcomes.push((om.worker.clone(), o));
                }
            }
            self.next_seq += 1;
        }
    }

    /// Polls until `done(outcomes)` or the timeout.
    async fn wait_outcomes(
        &mut self,
        timeout: Duration,
        what: &str,
        procs: &[&DroverProcess],
        done: impl Fn(&[(String, Outcome)]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_outcomes().await;
            if done(&self.outcomes) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = procs
                    .iter()
                    .map(|p| format!("== {}\n{}", p.name(), tail(&p.log(), 60)))
                    .collect();
                panic!(
                    "timed out waiting for {what}: {} outcomes so far\n{}",
                    self.outcomes.len(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn outcomes_of(&self, id: &str) -> Vec<&(String, Outcome)> {
        self.outcomes
            .iter()
            .filter(|(_, o)| o.task.id == id)
            .collect()
    }

    async fn record(&self, id: &str) -> Option<TaskRecord> {
        self.kv("tasks")
            .await
            .get(id)
            .await
            .unwrap()
            .map(|v| serde_json::from_slice(&v).unwrap())
    }

    /// Waits until `id`'s record says `running` on `worker`.
    async fn wait_running_on(&self, id: &str, worker: &str, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.record(id).await
                && r.state == TaskState::Running
                && r.worker.as_deref() == Some(worker)
            {
                return t0.elapsed();
            }
            assert!(t0.elapsed() < timeout, "{id} never ran on {worker}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn task(id: &str, queue: &str, ty: &str, payload: serde_json::Value, key: Option<&str>) -> Task {
    Task {
        id: id.into(),
        queue: queue.into(),
        task_type: ty.into(),
        payload: serde_json::value::to_raw_value(&payload).unwrap(),
        attempt: 1,
        max_attempts: 3,
        timeout_ms: 60_000,
        key: key.map(Into::into),
        backoff: None,
        shard: None,
        parent: None,
        submitted_ms: now_ms(),
        meta: Default::default(),
    }
}

fn seal(ring: &Keyring, queue: &str, partition: u32, tasks: &[Task]) -> (HeaderMap, Vec<u8>) {
    let sealed = envelope::seal(
        ring,
        &CodecConfig::default(),
        BatchMeta::new(queue, partition, 1),
        tasks,
    )
    .unwrap();
    let mut headers = HeaderMap::new();
    for (k, v) in sealed.headers.to_pairs() {
        headers.insert(k, v.as_str());
    }
    (headers, sealed.body)
}

fn one_each(outcomes: &[(String, Outcome)]) -> HashMap<(String, u32), usize> {
    let mut n = HashMap::new();
    for (_, o) in outcomes {
        *n.entry((o.task.id.clone(), o.task.attempt)).or_insert(0) += 1;
    }
    n
}

fn assert_no_duplicate_outcomes(outcomes: &[(String, Outcome)]) {
    let dups: Vec<_> = one_each(outcomes)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        dups.is_empty(),
        "attempts with more than one outcome: {dups:?}"
    );
}

/// (a) 10,000 tasks over 16 partitions and 3 worker processes: one outcome per attempt, and
/// per key the outcomes appear in submit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_tasks_run_once_each_in_key_order() {
    let mut f = Fixture::start().await;
    const P: u32 = 16;
    const N: usize = 10_000;
    const KEYS: usize = 64;
    f.queue("bulk", P).await;
    let extra = [("DROVER_CONCURRENCY", "16".to_owned())];
    let w: Vec<DroverProcess> = (1..=3)
        .map(|i| f.worker(&format!("bulk-w{i}"), "bulk", &extra))
        .collect();
    let procs: Vec<&DroverProcess> = w.iter().collect();
    f.wait_workers(&["bulk-w1", "bulk-w2", "bulk-w3"], &procs)
        .await;
    let owners = f.assign_from_ring("bulk", P, 1).await;
    assert_eq!(owners.len(), P as usize);
    assert_eq!(
        owners
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "every worker owns partitions: {owners:?}"
    );

    // Route like the leader: key → partition; batches of at most 256 per partition, in order.
    let mut per_partition: BTreeMap<u32, Vec<Task>> = BTreeMap::new();
    for i in 0..N {
        let key = format!("k{}", i % KEYS);
        let p = partition_for_key(&key, P);
        per_partition.entry(p).or_default().push(task(
            &format!("bulk-{i}"),
            "bulk",
            "echo",
            serde_json::json!({"seq": i, "key": key}),
            Some(&key),
        ));
    }
    let t0 = Instant::now();
    for (p, tasks) in &per_partition {
        for chunk in tasks.chunks(256) {
            f.dispatch("bulk", *p, chunk).await;
        }
    }
    f.wait_outcomes(Duration::from_secs(90), "10,000 outcomes", &procs, |o| {
        o.len() >= N
    })
    .await;
    let elapsed = t0.elapsed();
    eprintln!("10,000 tasks dispatched and run in {elapsed:?}");

    let counts = one_each(&f.outcomes);
    assert_eq!(counts.len(), N, "one outcome per task");
    assert_no_duplicate_outcomes(&f.outcomes);
    let mut by_worker: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for (worker, o) in &f.outcomes {
        assert_eq!(o.status, OutcomeStatus::Succeeded, "{o:?}");
        *by_worker.entry(worker.as_str()).or_default() += 1;
        let result: serde_json::Value =
            serde_json::from_str(o.result.as_ref().unwrap().get()).unwrap();
        let seq = result["seq"].as_i64().unwrap();
        let key = result["key"].as_str().unwrap().to_owned();
        assert_eq!(o.task.key.as_deref(), Some(key.as_str()));
        // Outcomes are published in finishing order: per key, that must be submit order.
        let prev = last_seq.insert(key.clone(), seq);
        assert!(
            prev.is_none_or(|p| p < seq),
            "key {key}: {seq} finished after {prev:?}"
        );
        // The owner of the partition ran it.
        let p = partition_for_key(&key, P);
        assert_eq!(owners[&p], *worker);
    }
    eprintln!("outcomes per worker: {by_worker:?}");
    assert_eq!(by_worker.len(), 3);
    // The work stream is drained: every batch acked.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = f.js.get_stream(f.names.work_stream()).await.unwrap();
        if s.info().await.unwrap().state.messages == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "batches left unacked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `running` is best-effort (SPEC §1.2): with more than 8 tasks in hand a worker writes it
    // only for attempts still running 20 ms after their start, so these µs echo tasks may skip
    // it. What was written is a CAS over the `queued` record, by the partition's owner.
    for i in [0, 1, KEYS, N - 1] {
        let id = format!("bulk-{i}");
        let r = f.record(&id).await.unwrap();
        match r.state {
            TaskState::Queued => assert!(r.worker.is_none(), "{r:?}"),
            TaskState::Running => {
                let p = partition_for_key(&format!("k{}", i % KEYS), P);
                assert_eq!(r.worker.as_ref(), Some(&owners[&p]), "{r:?}");
                assert_eq!(r.partition, Some(p), "{r:?}");
            }
            other => panic!("{id}: unexpected state {other:?}"),
        }
    }
}

/// (b) SIGKILL mid-batch: the batch is redelivered to the partition's new owner within TTL + 1 s
/// of moving the assignment, and its tasks that already had an outcome are not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_worker_batch_restarts_elsewhere_without_rerunning_finished_tasks() {
    let mut f = Fixture::start().await;
    f.queue("kq", 2).await;
    let w1 = f.worker("kq-w1", "kq", &[]);
    let w2 = f.worker("kq-w2", "kq", &[]);
    f.wait_workers(&["kq-w1", "kq-w2"], &[&w1, &w2]).await;
    f.assign(
        "kq",
        1,
        1,
        &[(0, "kq-w1".to_owned()), (1, "kq-w2".to_owned())].into(),
    )
    .await;
    let mut tasks: Vec<Task> = (0..4)
        .map(|i| {
            task(
                &format!("kq-fast-{i}"),
                "kq",
                "noop",
                serde_json::Value::Null,
                None,
            )
        })
        .collect();
    tasks.extend((0..2).map(|i| {
        task(
            &format!("kq-slow-{i}"),
            "kq",
            "sleep",
            serde_json::json!({"ms": 2500}),
            None,
        )
    }));
    f.dispatch("kq", 0, &tasks).await;
    // The fast ones report while the slow ones still run on w1.
    f.wait_outcomes(Duration::from_secs(20), "fast outcomes", &[&w1], |o| {
        o.len() >= 4
    })
    .await;
    f.wait_running_on("kq-slow-0", "kq-w1", Duration::from_secs(5))
        .await;
    w1.kill();
    let moved = Instant::now();
    f.assign(
        "kq",
        1,
        2,
        &[(0, "kq-w2".to_owned()), (1, "kq-w2".to_owned())].into(),
    )
    .await;
    f.wait_running_on("kq-slow-0", "kq-w2", Duration::from_millis(TTL_MS + 3_000))
        .await;
    let restart = moved.elapsed();
    eprintln!("restarted on kq-w2 {restart:?} after the assignment moved");
    assert!(
        restart <= Duration::from_millis(TTL_MS + 1_000),
        "restart took {restart:?}"
    );
    f.wait_outcomes(Duration::from_secs(15), "slow outcomes", &[&w2], |o| {
        o.iter()
            .filter(|(_, o)| o.task.id.starts_with("kq-slow"))
            .count()
            >= 2
    })
    .await;
    // Let anything that would wrongly run again show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.poll_outcomes().await;
    assert_no_duplicate_outcomes(&f.outcomes);
    for i in 0..4 {
        let o = f.outcomes_of(&format!("kq-fast-{i}"));
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].0, "kq-w1");
    }
    for i in 0..2 {
        let o = f.outcomes_of(&format!("kq-slow-{i}"));
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].0, "kq-w2");
        assert_eq!(o[0].1.status, OutcomeStatus::Succeeded);
    }
    assert!(
        w2.log().contains("tasks already recorded"),
        "the redelivery skipped the finished tasks"
    );
}

/// (c) SIGSTOP past the TTL: the stopped worker fences itself on waking — it acks nothing,
/// publishes nothing, starts nothing — and no attempt gets a second outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_worker_fences_itself_on_wake() {
    let mut f = Fixture::start().await;
    f.queue("sq", 2).await;
    let w1 = f.worker("sq-w1", "sq", &[]);
    let w2 = f.worker("sq-w2", "sq", &[]);
    f.wait_workers(&["sq-w1", "sq-w2"], &[&w1, &w2]).await;
    f.assign(
        "sq",
        1,
        1,
        &[(0, "sq-w1".to_owned()), (1, "sq-w2".to_owned())].into(),
    )
    .await;
    let tasks: Vec<Task> = (0..3)
        .map(|i| {
            task(
                &format!("sq-{i}"),
                "sq",
                "sleep",
                serde_json::json!({"ms": 1500}),
                None,
            )
        })
        .collect();
    f.dispatch("sq", 0, &tasks).await;
    f.wait_running_on("sq-0", "sq-w1", Duration::from_secs(10))
        .await;
    w1.stop();
    // Its key expires (limit markers make it visible); then the leader would move p0.
    let workers = f.kv("workers").await;
    let deadline = Instant::now() + Duration::from_millis(TTL_MS + 3_000);
    while workers.get("sq-w1").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "stopped worker's key never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.assign(
        "sq",
        1,
        2,
        &[(0, "sq-w2".to_owned()), (1, "sq-w2".to_owned())].into(),
    )
    .await;
    f.wait_running_on("sq-0", "sq-w2", Duration::from_millis(TTL_MS + 3_000))
        .await;
    // Wake it while w2 runs the batch: its own sleeps are due, but it is fenced.
    w1.cont();
    f.wait_outcomes(
        Duration::from_secs(15),
        "outcomes from sq-w2",
        &[&w1, &w2],
        |o| o.len() >= 3,
    )
    .await;
    // w1 comes back (re-registers) and sees the new assignment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.get("sq-w1").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "sq-w1 did not re-register:\n{}",
            w1.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.poll_outcomes().await;
    assert_no_duplicate_outcomes(&f.outcomes);
    assert_eq!(f.outcomes.len(), 3);
    assert!(
        f.outcomes.iter().all(|(w, _)| w == "sq-w2"),
        "{:?}",
        f.outcomes
            .iter()
            .map(|(w, o)| (w, &o.task.id))
            .collect::<Vec<_>>()
    );
    let log = w1.log();
    assert!(log.contains("fenced"), "sq-w1 did not fence:\n{log}");
    assert!(
        log.contains("not fenced"),
        "sq-w1 did not come back:\n{log}"
    );
    // After coming back it works normally: a new batch on its own partition runs.
    let moved = r#"partition moved away: finishing the batch in flight queue="sq" partition=1"#;
    let moved_before = w2.log().matches(moved).count();
    f.assign(
        "sq",
        1,
        3,
        &[(0, "sq-w2".to_owned()), (1, "sq-w1".to_owned())].into(),
    )
    .await;
    // Until sq-w2 has seen the move, a pull it made earlier may still take the batch.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w2.log().matches(moved).count() == moved_before {
        assert!(
            Instant::now() < deadline,
            "sq-w2 kept partition 1:\n{}",
            w2.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.dispatch(
        "sq",
        1,
        &[task(
            "sq-after",
            "sq",
            "noop",
            serde_json::Value::Null,
            None,
        )],
    )
    .await;
    f.wait_outcomes(Duration::from_secs(10), "sq-after", &[&w1], |o| {
        o.iter().any(|(_, o)| o.task.id == "sq-after")
    })
    .await;
    assert_eq!(f.outcomes_of("sq-after")[0].0, "sq-w1");
}

/// Quarantine copies (`Drover-Reason`) in `DROVER_DLQ`.
async fn quarantine_reasons(f: &Fixture) -> Vec<String> {
    let stream = f.js.get_stream(f.names.dlq_stream()).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await
            && m.subject.as_str() == f.names.quarantine_subject()
        {
            let reason = m
                .headers
                .get("Drover-Reason")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            assert!(m.headers.get("Drover-Error").is_some());
            out.push(reason);
        }
    }
    out.sort();
    out
}

/// (d) Envelopes that do not open are quarantined with their reason and terminated; an
/// unknown kid is NAKed, then quarantined; a poison batch fails its tasks as `lost`; the worker
/// keeps processing good batches throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_envelopes_are_quarantined_and_poison_batches_fail_as_lost() {
    let mut f = Fixture::start().await;
    f.queue("dq", 2).await;
    let good = keyring();
    // Poison batch on partition 1: delivered (and NAKed) twice before the worker sees it.
    let poison: Vec<Task> = (0..2)
        .map(|i| {
            task(
                &format!("dq-poison-{i}"),
                "dq",
                "noop",
                serde_json::Value::Null,
                None,
            )
        })
        .collect();
    f.dispatch("dq", 1, &poison).await;
    let consumer: jetstream::consumer::PullConsumer =
        f.js.get_stream(f.names.work_stream())
            .await
            .unwrap()
            .get_consumer(&f.names.work_consumer("dq", 1))
            .await
            .unwrap();
    for _ in 0..2 {
        let mut b = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let m = b.next().await.unwrap().unwrap();
        m.ack_with(AckKind::Nak(None)).await.unwrap();
    }

    // Bad envelopes on partition 0.
    let t = |id: &str| task(id, "dq", "echo", serde_json::json!({"id": id}), None);
    let (h, mut body) = seal(&good, "dq", 0, &[t("dq-tampered")]);
    let last = body.len() - 1;
    body[last] ^= 1;
    f.publish_raw("dq", 0, h, body).await;
    let (h, body) = seal(&good, "dq", 0, &[t("dq-truncated")]);
    f.publish_raw("dq", 0, h, body[..body.len() / 2].to_vec())
        .await;
    let wrong = Keyring::parse("test1:BBECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let (h, body) = seal(&wrong, "dq", 0, &[t("dq-wrong-key")]);
    f.publish_raw("dq", 0, h, body).await;
    let (h, body) = seal(&good, "other", 0, &[t("dq-mismatch")]);
    f.publish_raw("dq", 0, h, body).await;
    let unknown = Keyring::parse("nokey:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let (h, body) = seal(&unknown, "dq", 0, &[t("dq-unknown-kid")]);
    f.publish_raw("dq", 0, h, body).await;
    f.dispatch("dq", 0, &[t("dq-good-1")]).await;

    let w1 = f.worker(
        "dq-w1",
        "dq",
        &[("DROVER_WORKER__MAX_REDELIVERIES", "2".to_owned())],
    );
    f.wait_workers(&["dq-w1"], &[&w1]).await;
    f.assign(
        "dq",
        1,
        1,
        &[(0, "dq-w1".to_owned()), (1, "dq-w1".to_owned())].into(),
    )
    .await;
    f.wait_outcomes(
        Duration::from_secs(20),
        "good and lost outcomes",
        &[&w1],
        |o| {
            o.iter().any(|(_, o)| o.task.id == "dq-good-1")
                && o.iter()
                    .filter(|(_, o)| o.task.id.starts_with("dq-poison"))
                    .count()
                    >= 2
        },
    )
    .await;
    for i in 0..2 {
        let o = f.outcomes_of(&format!("dq-poison-{i}"));
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].1.status, OutcomeStatus::Failed);
        assert_eq!(o[0].1.error.as_ref().unwrap().kind, ErrorKind::Lost);
    }
    let good_out = f.outcomes_of("dq-good-1");
    assert_eq!(good_out[0].1.status, OutcomeStatus::Succeeded);
    // Every bad envelope is quarantined (the unknown kid after its redeliveries).
    let deadline = Instant::now() + Duration::from_secs(15);
    let reasons = loop {
        let r = quarantine_reasons(&f).await;
        if r.len() >= 5 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "quarantined so far: {r:?}\n{}",
            tail(&w1.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        reasons,
        vec![
            "bad_signature",
            "bad_signature",
            "bad_signature",
            "subject_mismatch",
            "unknown_kid"
        ]
    );
    assert!(
        w1.log().contains("unknown key id; NAKed"),
        "the unknown kid was NAKed first"
    );
    // Nothing is left in the work stream (TERM removes from a work-queue stream) and the worker
    // still runs the next good batch.
    f.dispatch("dq", 0, &[t("dq-good-2")]).await;
    f.wait_outcomes(Duration::from_secs(10), "dq-good-2", &[&w1], |o| {
        o.iter().any(|(_, o)| o.task.id == "dq-good-2")
    })
    .await;
    assert!(w1.is_running());
    assert_no_duplicate_outcomes(&f.outcomes);
}

/// (e) A cancel ends a running `sleep` within 100 ms; a checkpoint written by attempt 1 on one
/// worker is read by attempt 2 on another (Rust handler API, in-process workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_is_prompt_and_checkpoints_survive_failover() {
    let mut f = Fixture::start().await;
    f.queue("eq", 1).await;
    let handler = |ctx: drover_worker::TaskContext, _p: serde_json::Value| async move {
        if ctx.attempt() == 1 {
            ctx.checkpoint(format!("written by attempt 1 of {}", ctx.id()))
                .await?;
            Err(HandlerError::new("attempt 1 fails on purpose"))
        } else {
            let cp = ctx.last_checkpoint().await?.unwrap_or_default();
            Ok(
                serde_json::json!({"checkpoint": String::from_utf8_lossy(&cp), "key": ctx.idempotency_key()}),
            )
        }
    };
    let shutdown = CancellationToken::new();
    let wa = Worker::builder(f.settings("eq-a", "eq"))
        .handler("ckpt", handler)
        .build()
        .unwrap();
    let wb = Worker::builder(f.settings("eq-b", "eq"))
        .handler("ckpt", handler)
        .build()
        .unwrap();
    let ha = tokio::spawn(wa.run(shutdown.clone()));
    let hb = tokio::spawn(wb.run(shutdown.clone()));
    f.wait_workers(&["eq-a", "eq-b"], &[]).await;
    f.assign("eq", 1, 1, &[(0, "eq-a".to_owned())].into()).await;

    // Cancel a running sleep.
    f.dispatch(
        "eq",
        0,
        &[task(
            "eq-sleep",
            "eq",
            "sleep",
            serde_json::json!({"ms": 30_000}),
            None,
        )],
    )
    .await;
    f.wait_running_on("eq-sleep", "eq-a", Duration::from_secs(10))
        .await;
    let sent = now_ms();
    let t0 = Instant::now();
    f.client
        .publish(f.names.cancel_subject("eq-sleep"), "{}".into())
        .await
        .unwrap();
    f.client.flush().await.unwrap();
    f.wait_outcomes(Duration::from_secs(5), "the cancelled outcome", &[], |o| {
        o.iter().any(|(_, o)| o.task.id == "eq-sleep")
    })
    .await;
    let o = &f.outcomes_of("eq-sleep")[0].1;
    assert_eq!(o.status, OutcomeStatus::Cancelled);
    let ended_after = o.finished_ms - sent;
    eprintln!(
        "cancel ended the sleep {ended_after} ms after the request; outcome seen after {:?}",
        t0.elapsed()
    );
    assert!(
        ended_after <= 100,
        "sleep ended {ended_after} ms after the cancel"
    );

    // Checkpoint: attempt 1 on eq-a.
    let mut t = task("eq-ckpt", "eq", "ckpt", serde_json::Value::Null, None);
    f.dispatch("eq", 0, std::slice::from_ref(&t)).await;
    f.wait_outcomes(Duration::from_secs(10), "attempt 1", &[], |o| {
        o.iter().any(|(_, o)| o.task.id == "eq-ckpt")
    })
    .await;
    let first = f.outcomes_of("eq-ckpt")[0].clone();
    assert_eq!(first.0, "eq-a");
    assert_eq!(first.1.status, OutcomeStatus::Failed);
    // The partition moves to eq-b; attempt 2 arrives there (as the leader's retry would).
    f.assign("eq", 1, 2, &[(0, "eq-b".to_owned())].into()).await;
    t.attempt = 2;
    let cp = f
        .kv("checkpoints")
        .await
        .get("eq-ckpt")
        .await
        .unwrap()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&cp).contains("written by"),
        "checkpoints are sealed"
    );
    // Wait until eq-a let go (its pull loop stops within one fetch expiry).
    tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS)).await;
    f.publish_raw_task(&t).await;
    f.wait_outcomes(Duration::from_secs(10), "attempt 2", &[], |o| {
        o.iter()
            .any(|(_, o)| o.task.id == "eq-ckpt" && o.task.attempt == 2)
    })
    .await;
    let second = f
        .outcomes
        .iter()
        .find(|(_, o)| o.task.id == "eq-ckpt" && o.task.attempt == 2)
        .unwrap()
        .clone();
    assert_eq!(second.0, "eq-b");
    assert_eq!(second.1.status, OutcomeStatus::Succeeded);
    let result: serde_json::Value = serde_json::from_str(second.1.result.unwrap().get()).unwrap();
    assert_eq!(result["checkpoint"], "written by attempt 1 of eq-ckpt");
    assert_eq!(result["key"], "eq-ckpt:2");

    // Shutdown: both return and deregister.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), ha)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), hb)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let workers = f.kv("workers").await;
    assert!(workers.get("eq-a").await.unwrap().is_none());
    assert!(workers.get("eq-b").await.unwrap().is_none());
}

/// `TaskContext::progress` (SPEC §6.1) shows in the running record as `meta.progress`, rate
/// limited, and the final 1.0 is always written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_is_written_into_the_running_record() {
    let f = Fixture::start().await;
    f.queue("pq", 1).await;
    let handler = |ctx: drover_worker::TaskContext, _p: serde_json::Value| async move {
        ctx.progress(0.25);
        // Within the rate limit: dropped.
        ctx.progress(0.5);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ctx.progress(1.0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok::<_, HandlerError>(serde_json::Value::Null)
    };
    let w = f
        .worker_in_process("pq", "pq-a", |b| b.handler("prog", handler))
        .await;
    f.dispatch(
        "pq",
        0,
        &[task("pq-1", "pq", "prog", serde_json::Value::Null, None)],
    )
    .await;
    let progress = |r: &TaskRecord| r.meta.get("progress").cloned();
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while seen.last().map(String::as_str) != Some("1.000") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "progress seen so far: {seen:?}"
        );
        if let Some(r) = f.record("pq-1").await
            && let Some(p) = progress(&r)
        {
            assert_eq!(r.state, TaskState::Running, "{r:?}");
            if seen.last() != Some(&p) {
                seen.push(p);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, ["0.250", "1.000"], "0.5 came within 500 ms of 0.25");
    w.stop().await;
}

/// An outcome carries the revision of the task's record as its attempt last saw it, so the leader
/// can write the terminal record over it without reading first: the `running` record's revision
/// when the worker wrote it, the `queued` one when it wrote nothing.
#[tokio::test]
async fn outcomes_carry_the_record_revision_the_attempt_last_saw() {
    let mut f = Fixture::start().await;
    f.queue("rq", 1).await;
    let handler = |_ctx: drover_worker::TaskContext, _p: serde_json::Value| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, HandlerError>(serde_json::Value::Null)
    };
    let w = f
        .worker_in_process("rq", "rq-a", |b| b.handler("nap", handler))
        .await;
    f.dispatch(
        "rq",
        0,
        &[task("rq-1", "rq", "nap", serde_json::Value::Null, None)],
    )
    .await;
    f.wait_outcomes(Duration::from_secs(10), "rq-1", &[], |o| {
        o.iter().any(|(_, o)| o.task.id == "rq-1")
    })
    .await;
    // No leader here: the record is still the worker's `running` write.
    let entry = f.kv("tasks").await.entry("rq-1").await.unwrap().unwrap();
    let record: TaskRecord = serde_json::from_slice(&entry.value).unwrap();
    assert_eq!(record.state, TaskState::Running);
    assert_eq!(f.outcomes_of("rq-1")[0].1.revision, Some(entry.revision));
    w.stop().await;
}

/// A worker running in this test's process (for handlers of the test's own).
struct InProcess {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), drover_worker::WorkerError>>,
}

impl InProcess {
    /// Stops the worker and waits for it to exit cleanly.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

impl Fixture {
    /// Starts worker `id` of `queue` in this process with the handlers `with` adds, waits for
    /// its registration, and assigns it the only partition of `queue`.
    async fn worker_in_process(
        &self,
        queue: &str,
        id: &str,
        with: impl FnOnce(drover_worker::WorkerBuilder) -> drover_worker::WorkerBuilder,
    ) -> InProcess {
        let builder = with(Worker::builder(self.settings(id, queue)));
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(builder.build().unwrap().run(shutdown.clone()));
        self.wait_workers(&[id], &[]).await;
        self.assign(queue, 1, 1, &[(0, id.to_owned())].into()).await;
        InProcess { shutdown, handle }
    }

    /// Publishes a task's envelope without touching its record (a retry's record is the leader's).
    async fn publish_raw_task(&self, t: &Task) {
        let (h, body) = seal(&keyring(), &t.queue, 0, std::slice::from_ref(t));
        self.publish_raw(&t.queue, 0, h, body).await;
    }
}

/// A worker started without keys exits 2 with a message saying how to make them.
#[test]
fn worker_without_keys_exits_2_with_advice() {
    let out = std::process::Command::new(drover_tests::drover_bin("drover-worker"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drover keys gen"), "{err}");
}

/// (f) SIGTERM to a worker process with tasks running: it stops pulling, lets the attempts that
/// can finish within `drain_timeout_ms` finish and report, hands the batch whose task cannot
/// finish back with a NAK (redelivered at once, not after `ack_wait`), deletes its heartbeat key
/// (an explicit delete, not an expiry), and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_finishes_short_tasks_and_hands_back_the_rest() {
    const QUEUE: &str = "dq";
    // Long enough that a redelivery inside it can only come from the NAK.
    const ACK_WAIT: Duration = Duration::from_secs(30);
    let mut f = Fixture::start().await;
    topology::provision_queue(
        &f.js,
        &f.names,
        QUEUE,
        2,
        &QueueConsumerConfig {
            max_in_flight: 1,
            ack_wait: ACK_WAIT,
        },
    )
    .await
    .unwrap();
    let drain = [("DROVER_WORKER__DRAIN_TIMEOUT_MS", "1500".to_owned())];
    let w1 = f.worker("dq-w1", QUEUE, &drain);
    f.wait_workers(&["dq-w1"], &[&w1]).await;
    f.assign(
        QUEUE,
        1,
        1,
        &[(0, "dq-w1".into()), (1, "dq-w1".into())].into(),
    )
    .await;
    let short: Vec<Task> = (0..2)
        .map(|i| {
            task(
                &format!("dq-short-{i}"),
                QUEUE,
                "sleep",
                serde_json::json!({"ms": 700}),
                None,
            )
        })
        .collect();
    let long = task(
        "dq-long",
        QUEUE,
        "sleep",
        serde_json::json!({"ms": 4000}),
        None,
    );
    f.dispatch(QUEUE, 0, &short).await;
    f.dispatch(QUEUE, 1, std::slice::from_ref(&long)).await;
    for id in ["dq-short-0", "dq-short-1", "dq-long"] {
        f.wait_running_on(id, "dq-w1", Duration::from_secs(10))
            .await;
    }

    let signalled = Instant::now();
    let status = w1
        .terminate(Duration::from_secs(15))
        .expect("the worker exits on SIGTERM");
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        tail(&w1.log(), 40)
    );
    eprintln!("worker exited {took:?} after SIGTERM");
    // Drain timeout plus the cancelled attempt's wind-down, well before the long task's end.
    assert!(took < Duration::from_millis(3_500), "took {took:?}");

    // The short tasks finished and reported; the long one has no outcome from w1.
    f.wait_outcomes(Duration::from_secs(5), "short outcomes", &[&w1], |o| {
        o.len() >= 2
    })
    .await;
    for t in &short {
        let o = f.outcomes_of(&t.id);
        assert_eq!(o.len(), 1, "{}", t.id);
        assert_eq!(o[0].1.status, OutcomeStatus::Succeeded);
    }
    assert!(f.outcomes_of("dq-long").is_empty());

    // The heartbeat key was deleted on the way out (an expiry would be a purge marker).
    let entry = f
        .kv("workers")
        .await
        .entry("dq-w1")
        .await
        .unwrap()
        .expect("the worker's key has a delete marker");
    assert_eq!(entry.operation, jetstream::kv::Operation::Delete);
    let log = w1.log();
    assert!(log.contains("deregistered"), "{}", tail(&log, 40));

    // The short batch was acked; the long one was handed back and is redelivered at once.
    let work = f.js.get_stream(f.names.work_stream()).await.unwrap();
    let mut p0 = work
        .get_consumer::<jetstream::consumer::pull::Config>(&f.names.work_consumer(QUEUE, 0))
        .await
        .unwrap();
    let info = p0.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "{info:?}");
    let w2 = f.worker("dq-w2", QUEUE, &[]);
    f.wait_workers(&["dq-w2"], &[&w2]).await;
    f.assign(
        QUEUE,
        1,
        2,
        &[(0, "dq-w2".into()), (1, "dq-w2".into())].into(),
    )
    .await;
    let again = f
        .wait_running_on("dq-long", "dq-w2", Duration::from_secs(10))
        .await;
    assert!(
        signalled.elapsed() < ACK_WAIT,
        "redelivered by the NAK, not by ack_wait ({again:?})"
    );
    f.wait_outcomes(Duration::from_secs(15), "the long task", &[&w2], |o| {
        o.iter().any(|(_, o)| o.task.id == "dq-long")
    })
    .await;
    let o = f.outcomes_of("dq-long");
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].0, "dq-w2");
    assert_eq!(o[0].1.status, OutcomeStatus::Succeeded);
}

/// The batched record read (`drover_shared::kv_batch`, used by the worker per batch and by the
/// leader per outcome message) returns exactly the current entry of each key that has one:
/// latest revision, delete markers as not-put, absent keys missing — across request chunks.
#[tokio::test]
async fn batched_record_read_returns_current_entries() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = Names::new("drover").unwrap();
    topology::provision(&client, &names, &topology_config())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let bucket = names.bucket("tasks");
    let kv = js.get_key_value(&bucket).await.unwrap();
    let n = drover_shared::kv_batch::MAX_KEYS_PER_REQUEST + 44;
    let mut expected = HashMap::new();
    for i in 0..n {
        let id = format!("t-{i}");
        let mut rev = kv.put(&id, format!("v1-{i}").into()).await.unwrap();
        if i % 3 == 0 {
            rev = kv.put(&id, format!("v2-{i}").into()).await.unwrap();
        }
        if i % 7 == 0 {
            kv.delete(&id).await.unwrap();
            expected.insert(id, None);
        } else {
            expected.insert(
                id,
                Some((format!("v{}-{i}", if i % 3 == 0 { 2 } else { 1 }), rev)),
            );
        }
    }
    let mut keys: Vec<String> = expected.keys().cloned().collect();
    keys.push("never-written".into());
    let got = drover_shared::kv_batch::get_many(&client, &bucket, &keys)
        .await
        .unwrap();
    assert!(!got.contains_key("never-written"));
    assert_eq!(got.len(), n);
    for (id, want) in &expected {
        let e = &got[id];
        match want {
            None => assert!(!e.is_put, "{id} was deleted"),
            Some((value, rev)) => {
                assert!(e.is_put, "{id}");
                assert_eq!(e.value, value.as_bytes(), "{id}");
                assert_eq!(e.revision, *rev, "{id}");
                let age = chrono::Utc::now() - e.stored_at.expect("the server's stored time");
                assert!(
                    age >= chrono::Duration::zero() && age < chrono::Duration::seconds(60),
                    "{id} stored {age} ago"
                );
            }
        }
    }
    // None of the keys exists: an empty map, not an error.
    let none = drover_shared::kv_batch::get_many(&client, &bucket, &["nope".to_owned()])
        .await
        .unwrap();
    assert!(none.is_empty());
}
