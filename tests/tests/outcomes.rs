//! Outcome handling against a real nats-server and real dispatcher processes (SPEC §1.2, §5, §7):
//! success and duplicate outcomes, retries through `DROVER_DELAYED` (also across a leader
//! change), dead letters and events, `drover.api.retry`, quarantine of garbage, permanent
//! errors, and cancelled records that no outcome overwrites.
//!
//! The worker is simulated: the test reads the envelopes in `DROVER_WORK` (opening them with the
//! shared codec) and publishes `OutcomeMessage`s to `drover.outcome.<queue>.<batch>` as a
//! worker would.

use async_nats::jetstream::{self, context::Context};
use async_nats::{Client, HeaderMap};
use drover_shared::envelope::{self, CodecConfig, EnvelopeHeaders};
use drover_shared::keyring::Keyring;
use drover_shared::names::Names;
use drover_shared::outcome::{Outcome, OutcomeMessage};
use drover_shared::task::{ErrorKind, Task, TaskError, TaskRecord, TaskState};
use drover_tests::{DroverProcess, NatsServer};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const QUEUE: &str = "default";

/// An envelope's task as the simulated worker received it.
#[derive(Debug, Clone)]
struct Received {
    task: Task,
    batch: String,
    partition: u32,
    epoch: u64,
    at: Instant,
}

/// Test rig: a server, dispatchers, a client, and the simulated worker's read position.
struct Rig {
    _server: NatsServer,
    ds: Vec<DroverProcess>,
    client: Client,
    js: Context,
    names: Names,
    next_seq: u64,
    seen: Vec<Received>,
}

impl Rig {
    async fn start(dispatchers: usize) -> Self {
        let server = NatsServer::start().await;
        let ds: Vec<DroverProcess> = (1..=dispatchers)
            .map(|i| DroverProcess::dispatcher(&format!("d{i}"), &server.client_url(), 4))
            .collect();
        let client = server.connect().await;
        let js = jetstream::new(client.clone());
        let mut rig = Self {
            _server: server,
            ds,
            client,
            js,
            names: Names::default(),
            next_seq: 1,
            seen: Vec::new(),
        };
        rig.leader(None, Duration::from_secs(30)).await;
        rig
    }

    /// The leader's id (one other than `not`), waiting up to `timeout`.
    async fn leader(&mut self, not: Option<&str>, timeout: Duration) -> String {
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

    async fn submit(&self, task: Value) {
        self.js
            .publish(self.names.submit_subject(QUEUE), task.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Reads envelopes that arrived since the last call.
    async fn poll_work(&mut self) {
        let stream = self.js.get_stream(self.names.work_stream()).await.unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let ring = Keyring::parse(drover_tests::TEST_KEYS).unwrap();
        while self.next_seq <= last {
            let seq = self.next_seq;
            self.next_seq += 1;
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let headers = m.headers.clone();
            let (hdr, opened): (EnvelopeHeaders, _) = envelope::open_message::<Task>(
                &ring,
                &CodecConfig::default(),
                &self.names,
                m.subject.as_str(),
                |name| headers.get(name).map(|v| v.as_str()),
                &m.payload,
            )
            .expect("every envelope opens");
            for task in opened.tasks {
                self.seen.push(Received {
                    task,
                    batch: hdr.batch_id(),
                    partition: hdr.partition,
                    epoch: hdr.epoch,
                    at: Instant::now(),
                });
            }
        }
    }

    /// Waits for the envelope carrying attempt `attempt` of `id`.
    async fn wait_attempt(&mut self, id: &str, attempt: u32, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_work().await;
            if let Some(r) = self
                .seen
                .iter()
                .find(|r| r.task.id == id && r.task.attempt == attempt)
            {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "attempt {attempt} of {id} not dispatched within {timeout:?}; seen {:?}\n{}",
                self.seen
                    .iter()
                    .map(|r| (&r.task.id, r.task.attempt))
                    .collect::<Vec<_>>(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many envelopes carried `id` at `attempt`.
    async fn count_attempts(&mut self, id: &str, attempt: u32) -> usize {
        self.poll_work().await;
        self.seen
            .iter()
            .filter(|r| r.task.id == id && r.task.attempt == attempt)
            .count()
    }

    /// Publishes the outcomes of one received batch as worker `w1` would.
    async fn report(&self, r: &Received, outcomes: Vec<Outcome>) {
        let msg = OutcomeMessage {
            batch: r.batch.clone(),
            queue: QUEUE.into(),
            partition: r.partition,
            worker: "w1".into(),
            epoch: r.epoch,
            part: 0,
            outcomes,
        };
        self.publish_outcome(&r.batch, msg.encode()).await;
    }

    async fn publish_outcome(&self, batch: &str, body: Vec<u8>) {
        self.js
            .publish(self.names.outcome_subject(QUEUE, batch), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn succeed(&self, r: &Received, result: Value) {
        let now = now_ms();
        let raw = serde_json::value::RawValue::from_string(result.to_string()).unwrap();
        self.report(
            r,
            vec![Outcome::succeeded(r.task.clone(), raw, now - 5, now)],
        )
        .await;
    }

    async fn fail(&self, r: &Received, kind: ErrorKind) {
        let now = now_ms();
        let error = TaskError {
            kind,
            message: format!("attempt {} failed", r.task.attempt),
        };
        self.report(
            r,
            vec![Outcome::failed(r.task.clone(), error, now - 5, now)],
        )
        .await;
    }

    /// The record of `id` and its revision.
    async fn record(&self, id: &str) -> Option<(TaskRecord, u64)> {
        let kv = self
            .js
            .get_key_value(self.names.bucket("tasks"))
            .await
            .unwrap();
        let e = kv.entry(id).await.unwrap()?;
        Some((serde_json::from_slice(&e.value).ok()?, e.revision))
    }

    /// Waits until the record of `id` is in `state`.
    async fn wait_state(&self, id: &str, state: TaskState, timeout: Duration) -> (TaskRecord, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((r, rev)) = self.record(id).await
                && r.state == state
            {
                return (r, rev);
            }
            assert!(
                Instant::now() < deadline,
                "{id} not {state:?} within {timeout:?}: {:?}\n{}",
                self.record(id).await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the leader has handled every outcome published so far.
    async fn outcomes_drained(&self) {
        let stream = self
            .js
            .get_stream(self.names.outcomes_stream())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c: jetstream::consumer::PullConsumer = stream
                .get_consumer(&self.names.outcomes_consumer())
                .await
                .unwrap();
            let info = c.info().await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "outcomes not drained: {info:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The newest message on `subject` in `stream`, waiting up to `timeout`.
    async fn last_on(
        &self,
        stream: &str,
        subject: &str,
        timeout: Duration,
    ) -> async_nats::jetstream::message::StreamMessage {
        let s = self.js.get_stream(stream).await.unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(m) = s.get_last_raw_message_by_subject(subject).await {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "nothing on {subject} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ask(&self, endpoint: &str, body: Value) -> Value {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            self.client.request_with_headers(
                self.names.api(endpoint),
                HeaderMap::new(),
                body.to_string().into(),
            ),
        )
        .await
        .expect("a reply")
        .expect("request");
        serde_json::from_slice(&reply.payload).unwrap()
    }

    fn logs(&self) -> String {
        self.ds
            .iter()
            .map(|d| {
                let log = d.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", d.name(), tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn success_is_recorded_once_and_a_duplicate_changes_nothing() {
    let mut rig = Rig::start(1).await;
    rig.submit(json!({"id": "ok1", "type": "echo", "payload": {"a": 1}}))
        .await;
    let r = rig.wait_attempt("ok1", 1, T).await;
    rig.succeed(&r, json!({"echo": 1})).await;
    let (rec, rev) = rig.wait_state("ok1", TaskState::Succeeded, T).await;
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.result.as_ref().unwrap().get(), r#"{"echo":1}"#);
    assert_eq!(rec.worker.as_deref(), Some("w1"));
    assert_eq!(rec.partition, Some(r.partition));
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    assert_eq!(rec.duration_ms, Some(5));

    // The same outcome again (a redelivered or republished message): nothing changes.
    rig.succeed(&r, json!({"echo": 2})).await;
    rig.outcomes_drained().await;
    let (again, rev2) = rig.record("ok1").await.unwrap();
    assert_eq!(rev2, rev, "a duplicate outcome must not write");
    assert_eq!(again.result.unwrap().get(), r#"{"echo":1}"#);
    assert_eq!(rig.count_attempts("ok1", 2).await, 0);
}

#[tokio::test]
async fn failures_retry_after_backoff_then_dead_letter_and_api_retry_runs_again() {
    let mut rig = Rig::start(1).await;
    rig.submit(json!({
        "id": "f1", "type": "flaky", "payload": {"p": 7}, "max_attempts": 3,
        "backoff": {"initial_ms": 200, "factor": 2.0, "max_ms": 5000, "jitter": 0.0}
    }))
    .await;
    let a1 = rig.wait_attempt("f1", 1, T).await;
    rig.fail(&a1, ErrorKind::Handler).await;
    let (rec, _) = rig.wait_state("f1", TaskState::Retrying, T).await;
    assert!(rec.next_run_at.is_some());
    assert_eq!(rec.error.as_ref().unwrap().kind, ErrorKind::Handler);
    let failed_at = Instant::now();
    let a2 = rig.wait_attempt("f1", 2, T).await;
    let waited = a2.at.duration_since(failed_at);
    eprintln!("attempt 2 after {waited:?} (backoff 200 ms)");
    assert!(
        waited >= Duration::from_millis(100),
        "attempt 2 came too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "attempt 2 too late: {waited:?}"
    );
    assert_eq!(
        a2.task.payload.get(),
        r#"{"p":7}"#,
        "the payload travels on"
    );
    rig.fail(&a2, ErrorKind::Timeout).await;
    rig.wait_state("f1", TaskState::Retrying, T).await;
    let failed_at = Instant::now();
    let a3 = rig.wait_attempt("f1", 3, T).await;
    let waited = a3.at.duration_since(failed_at);
    eprintln!("attempt 3 after {waited:?} (backoff 400 ms)");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    rig.fail(&a3, ErrorKind::Handler).await;
    let (rec, _) = rig.wait_state("f1", TaskState::Failed, T).await;
    assert_eq!(rec.attempt, 3);
    assert!(rec.finished_at.is_some());

    // The dead-letter copy: the task as it travelled, with its payload.
    let dlq = rig
        .last_on(&rig.names.dlq_stream(), &rig.names.dlq_subject(QUEUE), T)
        .await;
    assert_eq!(dlq.headers.get("Drover-Task-Id").unwrap().as_str(), "f1");
    assert_eq!(
        dlq.headers.get("Drover-Error-Kind").unwrap().as_str(),
        "handler"
    );
    let copy: Task = serde_json::from_slice(&dlq.payload).unwrap();
    assert_eq!(copy.payload.get(), r#"{"p":7}"#);

    // The terminal event.
    let ev = rig
        .last_on(
            &rig.names.events_stream(),
            &rig.names.events_subject(QUEUE, "failed"),
            T,
        )
        .await;
    let events: Vec<Value> = serde_json::from_slice(&ev.payload).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["id"] == "f1" && e["state"] == "failed" && e["attempt"] == 3),
        "{events:?}"
    );

    // drover.api.retry: a new series, attempt 1 again, same payload.
    let reply = rig.ask("retry", json!({"id": "f1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let deadline = Instant::now() + T;
    while rig.count_attempts("f1", 1).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the retry was not dispatched\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n1 = rig
        .seen
        .iter()
        .rfind(|r| r.task.id == "f1" && r.task.attempt == 1)
        .unwrap()
        .clone();
    assert!(n1.at > a3.at);
    assert_eq!(n1.task.payload.get(), r#"{"p":7}"#);
    assert_eq!(rig.count_attempts("f1", 1).await, 2);
    rig.succeed(&n1, json!("finally")).await;
    let (rec, _) = rig.wait_state("f1", TaskState::Succeeded, T).await;
    assert_eq!(rec.attempt, 1);
}

#[tokio::test]
async fn a_retry_timer_survives_a_leader_kill() {
    let mut rig = Rig::start(3).await;
    let first = rig.leader(None, T).await;
    rig.submit(json!({
        "id": "hk", "type": "flaky", "max_attempts": 3,
        "backoff": {"initial_ms": 1500, "factor": 2.0, "jitter": 0.0}
    }))
    .await;
    let a1 = rig.wait_attempt("hk", 1, T).await;
    rig.fail(&a1, ErrorKind::Handler).await;
    rig.wait_state("hk", TaskState::Retrying, T).await;
    // The timer is durable in DROVER_DELAYED; kill the leader before it fires.
    let d = rig.ds.iter().find(|d| d.name() == first).unwrap();
    d.kill();
    let second = rig.leader(Some(&first), Duration::from_secs(15)).await;
    eprintln!("leader {first} killed; {second} leads");
    let a2 = rig.wait_attempt("hk", 2, Duration::from_secs(15)).await;
    assert!(
        a2.epoch > a1.epoch,
        "attempt 2 dispatched by the new leader"
    );
    rig.fail(&a2, ErrorKind::Handler).await;
    rig.wait_attempt("hk", 3, Duration::from_secs(15)).await;
    assert_eq!(rig.count_attempts("hk", 2).await, 1);
}

#[tokio::test]
async fn garbage_outcomes_are_quarantined_and_the_leader_goes_on() {
    let mut rig = Rig::start(1).await;
    rig.publish_outcome("junk", b"{not json".to_vec()).await;
    let q = rig
        .last_on(&rig.names.dlq_stream(), &rig.names.quarantine_subject(), T)
        .await;
    assert_eq!(
        q.headers.get("Drover-Reason").unwrap().as_str(),
        "invalid_outcome"
    );
    assert_eq!(q.payload.as_ref(), b"{not json");
    rig.submit(json!({"id": "after", "type": "echo"})).await;
    let r = rig.wait_attempt("after", 1, T).await;
    rig.succeed(&r, json!(1)).await;
    rig.wait_state("after", TaskState::Succeeded, T).await;
    assert!(rig.ds[0].is_running());
}

#[tokio::test]
async fn unknown_type_fails_at_once_without_retry() {
    let mut rig = Rig::start(1).await;
    rig.submit(json!({"id": "u1", "type": "nope", "max_attempts": 5,
        "backoff": {"initial_ms": 100, "jitter": 0.0}}))
        .await;
    let r = rig.wait_attempt("u1", 1, T).await;
    rig.fail(&r, ErrorKind::UnknownType).await;
    let (rec, _) = rig.wait_state("u1", TaskState::Failed, T).await;
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.error.unwrap().kind, ErrorKind::UnknownType);
    let dlq = rig
        .last_on(&rig.names.dlq_stream(), &rig.names.dlq_subject(QUEUE), T)
        .await;
    assert_eq!(dlq.headers.get("Drover-Task-Id").unwrap().as_str(), "u1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.count_attempts("u1", 2).await, 0, "no retry");
}

#[tokio::test]
async fn cancelled_records_are_never_overwritten() {
    let mut rig = Rig::start(1).await;
    // Cancelled while queued; the worker's success and failure come later.
    rig.submit(json!({"id": "c1", "type": "echo"})).await;
    let r = rig.wait_attempt("c1", 1, T).await;
    let reply = rig.ask("cancel", json!({"id": "c1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let (_, rev) = rig.wait_state("c1", TaskState::Cancelled, T).await;
    rig.succeed(&r, json!(1)).await;
    rig.fail(&r, ErrorKind::Handler).await;
    rig.outcomes_drained().await;
    let (rec, rev2) = rig.record("c1").await.unwrap();
    assert_eq!((rec.state, rev2), (TaskState::Cancelled, rev));

    // Cancelled while retrying: the timer fires and is dropped.
    rig.submit(json!({"id": "c2", "type": "echo", "max_attempts": 3,
        "backoff": {"initial_ms": 800, "jitter": 0.0}}))
        .await;
    let r = rig.wait_attempt("c2", 1, T).await;
    rig.fail(&r, ErrorKind::Handler).await;
    rig.wait_state("c2", TaskState::Retrying, T).await;
    let reply = rig.ask("cancel", json!({"id": "c2"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let (_, rev) = rig.wait_state("c2", TaskState::Cancelled, T).await;
    let deadline = Instant::now() + T;
    while !rig.ds[0].log().contains("timer dropped") {
        assert!(
            Instant::now() < deadline,
            "timer not dropped:\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.count_attempts("c2", 2).await, 0);
    assert_eq!(rig.record("c2").await.unwrap().1, rev);
}

/// A success carrying the record revision its worker read is written over that revision
/// unread; when the record changed since (a cancel, the same outcome recorded already), the
/// compare-and-set conflicts and the leader decides on the record as it is.
#[tokio::test]
async fn a_success_carrying_its_revision_is_recorded_and_a_stale_one_changes_nothing() {
    let mut rig = Rig::start(1).await;
    rig.submit(json!({"id": "rv1", "type": "echo"})).await;
    let r = rig.wait_attempt("rv1", 1, T).await;
    let (queued, read) = rig.wait_state("rv1", TaskState::Queued, T).await;
    let now = now_ms();
    let success = |result: &str| {
        Outcome::succeeded(
            r.task.clone(),
            serde_json::value::RawValue::from_string(result.to_owned()).unwrap(),
            now - 5,
            now,
        )
        .with_revision(Some(read))
    };
    rig.report(&r, vec![success("1")]).await;
    let (rec, rev) = rig.wait_state("rv1", TaskState::Succeeded, T).await;
    assert!(rev > read);
    assert_eq!(rec.result.as_ref().unwrap().get(), "1");
    assert_eq!(rec.submitted_at, queued.submitted_at);
    assert_eq!(
        (rec.attempt, rec.worker.as_deref(), rec.partition),
        (1, Some("w1"), Some(r.partition))
    );
    // The same outcome again, over the revision it read: a conflict, then a duplicate.
    rig.report(&r, vec![success("2")]).await;
    rig.outcomes_drained().await;
    let (again, rev2) = rig.record("rv1").await.unwrap();
    assert_eq!(rev2, rev, "a duplicate outcome must not write");
    assert_eq!(again.result.unwrap().get(), "1");

    // Cancelled after the worker read the record: the success does not overwrite it.
    rig.submit(json!({"id": "rv2", "type": "echo"})).await;
    let r = rig.wait_attempt("rv2", 1, T).await;
    let (_, read) = rig.wait_state("rv2", TaskState::Queued, T).await;
    let reply = rig.ask("cancel", json!({"id": "rv2"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let (_, cancelled) = rig.wait_state("rv2", TaskState::Cancelled, T).await;
    let now = now_ms();
    let raw = serde_json::value::RawValue::from_string("1".to_owned()).unwrap();
    rig.report(
        &r,
        vec![Outcome::succeeded(r.task.clone(), raw, now - 5, now).with_revision(Some(read))],
    )
    .await;
    rig.outcomes_drained().await;
    let (rec, rev) = rig.record("rv2").await.unwrap();
    assert_eq!((rec.state, rev), (TaskState::Cancelled, cancelled));
}
