//! The dispatcher against a real nats-server, as real processes (SPEC §1.1, §3–§5): intake to
//! envelopes exactly once and in key order, rejected submissions, and leader failover.

use async_nats::jetstream::{self, context::Context};
use drover_shared::names::Names;
use drover_tests::observe::{leader_id, wait_for_tasks, wait_leader, work_tasks};
use drover_tests::{DroverProcess, NatsServer};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A fixed test keyring (not a secret anywhere else).
const KEYS: &str = drover_tests::TEST_KEYS;

fn dispatcher(server_url: &str, name: &str) -> DroverProcess {
    DroverProcess::dispatcher(name, server_url, 16)
}

#[tokio::test]
async fn twenty_thousand_tasks_reach_work_exactly_once_in_key_order() {
    let t0 = Instant::now();
    let server = NatsServer::start().await;
    let names = Names::default();
    let _d = dispatcher(&server.client_url(), "d1");
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    wait_leader(&js, &names, None, Duration::from_secs(20)).await;
    eprintln!("leader after {:?}", t0.elapsed());

    // 10,000 single submits and 100 arrays of 100; half keyed over 25 keys, each keyed task
    // carrying its per-key sequence number.
    let mut next_per_key: HashMap<String, u64> = HashMap::new();
    let mut task = |i: usize| {
        let mut t = serde_json::json!({"type": "noop", "id": format!("t{i}")});
        if i.is_multiple_of(2) {
            let key = format!("k{}", i % 50);
            let n = next_per_key.entry(key.clone()).or_default();
            t["key"] = key.into();
            t["payload"] = serde_json::json!({ "n": *n });
            *n += 1;
        }
        t
    };
    let mut acks = Vec::new();
    for i in 0..10_000 {
        let body = serde_json::to_vec(&task(i)).unwrap();
        acks.push(
            js.publish(names.submit_subject("default"), body.into())
                .await
                .unwrap(),
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in 0..100 {
        let arr: Vec<_> = (0..100).map(|j| task(10_000 + a * 100 + j)).collect();
        let body = serde_json::to_vec(&arr).unwrap();
        acks.push(
            js.publish(names.submit_subject("default"), body.into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    eprintln!("submitted after {:?}", t0.elapsed());

    let submitted = Instant::now();
    let tasks = wait_for_tasks(&js, &names, 20_000, Duration::from_secs(90)).await;
    eprintln!(
        "20,000 tasks dispatched and decoded in {:?}",
        submitted.elapsed()
    );
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for t in tasks.iter().map(|d| &d.task) {
        *seen.entry(t.id.as_str()).or_default() += 1;
    }
    assert_eq!(tasks.len(), 20_000, "no task twice");
    assert_eq!(seen.len(), 20_000, "every task once");
    // Same-key tasks in submit order (stream order within a partition, array order within an
    // envelope).
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks.iter().map(|d| &d.task) {
        if let Some(key) = &t.key {
            let n: serde_json::Value = serde_json::from_str(t.payload.get()).unwrap();
            let n = n["n"].as_u64().unwrap();
            if let Some(prev) = last.insert(key.clone(), n) {
                assert_eq!(n, prev + 1, "key {key}: {n} after {prev}");
            }
        }
    }
    assert_eq!(last.len(), 25, "even tasks are keyed over k0, k2, ..., k48");
    // The intake is fully acknowledged and the records exist.
    let submit = js.get_stream(names.submit_stream()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while submit.get_info().await.unwrap().state.messages > 0 {
        assert!(Instant::now() < deadline, "intake not acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader's /metrics (its address is in the leader value) counts what it did.
    let kv = js.get_key_value(names.bucket("election")).await.unwrap();
    let leader: serde_json::Value =
        serde_json::from_slice(&kv.get("leader").await.unwrap().unwrap()).unwrap();
    let addr = leader["addr"].as_str().unwrap().parse().unwrap();
    let health = drover_tests::http_get(addr, "/readyz", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(health.status, 200);
    let metrics = drover_tests::http_get(addr, "/metrics", Duration::from_secs(5))
        .await
        .unwrap();
    let text = &metrics.body;
    assert!(
        text.contains("drover_tasks_dispatched_total 20000"),
        "{text}"
    );
    assert!(text.contains("drover_leader 1"), "{text}");
    let records = js.get_key_value(names.bucket("tasks")).await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&records.get("t123").await.unwrap().unwrap()).unwrap();
    assert_eq!(rec["state"], "queued");
}

#[tokio::test]
async fn invalid_submissions_become_rejected_records_and_nothing_stops() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let d = dispatcher(&server.client_url(), "d1");
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    wait_leader(&js, &names, None, Duration::from_secs(20)).await;

    let bad: Vec<(String, Vec<u8>, &str)> = vec![
        (
            names.submit_subject("default"),
            b"{not json".to_vec(),
            "invalid_json",
        ),
        (
            names.submit_subject("default"),
            br#"{"type":"x","bogus":1}"#.to_vec(),
            "unknown_field",
        ),
        (
            names.submit_subject("default"),
            br#"{"type":"x","id":"bad id"}"#.to_vec(),
            "invalid_field",
        ),
        (
            names.submit_subject("default"),
            br#"[{"type":"x"},{"type":"x","max_attempts":0}]"#.to_vec(),
            "invalid_field",
        ),
        (
            names.submit_subject("Bad_Queue"),
            br#"{"type":"x"}"#.to_vec(),
            "invalid_field",
        ),
    ];
    for (subject, body, _) in &bad {
        js.publish(subject.clone(), body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish(
        names.submit_subject("default"),
        br#"{"type":"noop","id":"good"}"#.to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let tasks = wait_for_tasks(&js, &names, 1, Duration::from_secs(20)).await;
    assert_eq!(tasks[0].task.id, "good");

    let dlq = js.get_stream(names.dlq_stream()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dlq.get_info().await.unwrap().state.messages < bad.len() as u64 {
        assert!(Instant::now() < deadline, "missing rejected records");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (seq, (_, body, code)) in (1..).zip(&bad) {
        let m = dlq.get_raw_message(seq).await.unwrap();
        assert_eq!(&m.payload[..], &body[..], "the original bytes are kept");
        assert_eq!(m.headers.get("Drover-Error-Code").unwrap().as_str(), *code);
        let err: serde_json::Value =
            serde_json::from_str(m.headers.get("Drover-Error").unwrap().as_str()).unwrap();
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let m = dlq.get_raw_message(5).await.unwrap();
    assert_eq!(m.subject.as_str(), "drover.rejected._invalid");
    assert!(d.is_running(), "the dispatcher keeps running");
}

/// Publishes a keyed probe task and returns how long it took to appear in `DROVER_WORK`.
async fn time_to_dispatch(js: &Context, names: &Names, id: &str, since: Instant) -> Duration {
    let before = work_tasks(js, names).await.len();
    js.publish(
        names.submit_subject("default"),
        serde_json::to_vec(&serde_json::json!({"type":"noop","id":id}))
            .unwrap()
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let tasks = wait_for_tasks(js, names, before + 1, Duration::from_secs(15)).await;
    assert!(tasks.iter().any(|d| d.task.id == id));
    since.elapsed()
}

#[tokio::test]
async fn failover_on_sigkill_sigterm_and_sigstop() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let url = server.client_url();
    let ds: Vec<DroverProcess> = (1..=3)
        .map(|i| dispatcher(&url, &format!("d{i}")))
        .collect();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let by_id = |id: &str| ds.iter().find(|d| d.name() == id).unwrap();

    // Exactly one leader; it dispatches.
    let first = wait_leader(&js, &names, None, Duration::from_secs(20)).await;
    time_to_dispatch(&js, &names, "warmup", Instant::now()).await;

    // SIGKILL: a new leader dispatches within lease (1.5 s) + 1 s.
    let killed = Instant::now();
    by_id(&first).kill();
    let second = wait_leader(&js, &names, Some(&first), Duration::from_secs(10)).await;
    let took = time_to_dispatch(&js, &names, "after-kill", killed).await;
    eprintln!("SIGKILL failover: {took:?}");
    assert!(
        took <= Duration::from_millis(2500),
        "SIGKILL failover took {took:?}"
    );

    // SIGTERM: hand-over within 300 ms.
    let termed = Instant::now();
    by_id(&second).signal(libc::SIGTERM);
    let third = wait_leader(&js, &names, Some(&second), Duration::from_secs(5)).await;
    let took = time_to_dispatch(&js, &names, "after-term", termed).await;
    eprintln!("SIGTERM hand-over: {took:?}");
    assert!(
        took <= Duration::from_millis(300),
        "SIGTERM hand-over took {took:?}"
    );
    assert!(
        by_id(&second)
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );

    // SIGSTOP the leader past its lease: a standby takes over; on SIGCONT the old one stops
    // leading and publishes nothing new with its old epoch after the new leader's first.
    let standby = dispatcher(&url, "d4");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !standby.log().contains("provisioned") {
        assert!(
            Instant::now() < deadline,
            "d4 did not start: {}",
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = by_id(&third);
    old.stop();
    let fourth = wait_leader(&js, &names, Some(&third), Duration::from_secs(10)).await;
    assert_eq!(fourth, "d4");
    time_to_dispatch(&js, &names, "after-stop", Instant::now()).await;
    old.cont();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..20 {
        time_to_dispatch(&js, &names, &format!("later-{i}"), Instant::now()).await;
    }
    let tasks = work_tasks(&js, &names).await;
    let new_epoch = tasks
        .iter()
        .find(|d| d.task.id == "after-stop")
        .unwrap()
        .epoch;
    let first_new = tasks.iter().position(|d| d.epoch == new_epoch).unwrap();
    let stale = tasks[first_new..]
        .iter()
        .filter(|d| d.epoch < new_epoch)
        .count();
    assert!(
        stale <= 1,
        "{stale} tasks with an old epoch after the new leader's first envelope"
    );
    assert_eq!(
        leader_id(&js, &names).await.as_deref(),
        Some(fourth.as_str())
    );
    assert!(old.log().contains("stopped leading"), "{}", old.log());
}

#[test]
fn print_config_masks_the_keys_and_shows_the_layers() {
    let out = std::process::Command::new(drover_tests::drover_bin("drover-dispatcher"))
        .args(["--print-config", "--nats-url", "nats://10.1.2.3:4222"])
        .env("DROVER_KEYS", KEYS)
        .env("DROVER_PASSWORD", "hunter2-secret")
        .env("DROVER_USER", "svc")
        .env("DROVER_DISPATCHER__MAX_BATCH", "512")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("AAECAwQF"), "key material printed:\n{text}");
    assert!(!text.contains("hunter2"), "password printed:\n{text}");
    assert!(text.contains("***"));
    assert!(text.contains("max_batch = 512"), "{text}");
    assert!(
        text.contains("nats://10.1.2.3:4222"),
        "the flag wins: {text}"
    );
}

#[test]
fn refuses_to_start_without_keys() {
    let out = std::process::Command::new(drover_tests::drover_bin("drover-dispatcher"))
        .env_remove("DROVER_KEYS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drover keys gen"), "{err}");
}

/// The leader's intake pull keeps going when the server loses its open pull request without
/// the 408 that normally ends it (here the server is SIGKILLed and restarted: the request dies
/// with it; in a cluster, with the consumer's leader node or the node the leader talks to).
/// Before the fix the credit kept for the lost request stopped the intake for good.
#[tokio::test]
async fn the_intake_pull_survives_a_lost_pull_request() {
    use drover_dispatcher::handover::IntakePull;
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "INTAKE_PULL".into(),
            subjects: vec!["intake-pull.>".into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create the stream");
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("intake".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("create the consumer");
    let mut intake = IntakePull::open(&js, consumer, 16, Duration::from_secs(1))
        .await
        .expect("open the pull");
    let publish = |n: u32| {
        let js = js.clone();
        async move {
            js.publish(format!("intake-pull.{n}"), n.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    };
    publish(1).await;
    let first = tokio::time::timeout(Duration::from_secs(5), intake.next())
        .await
        .expect("the first message within 5 s")
        .expect("subscription open")
        .expect("delivered");
    assert_eq!(first.subject.as_str(), "intake-pull.1");
    // A SIGKILL may still lose the ack's state, so the first message may come again after the
    // restart; only the second one matters below.
    first.double_ack().await.expect("ack confirmed");

    // The open request (15 messages of credit left) dies with the server.
    server.restart().await;
    let js = jetstream::new(server.connect().await);
    js.publish("intake-pull.2", "2".into())
        .await
        .expect("publish after the restart")
        .await
        .expect("stored after the restart");
    let second = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match intake.next().await {
                Some(Ok(m)) if m.subject.as_str() == "intake-pull.2" => break m,
                Some(Ok(_redelivered)) => {}
                Some(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                None => panic!("the pull's subscription ended"),
            }
        }
    })
    .await
    .expect("a message published after the restart arrives within 10 s");
    second.ack().await.expect("ack");
}
