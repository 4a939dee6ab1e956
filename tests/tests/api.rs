//! The request API (SPEC §1.3) against a real nats-server and real dispatcher processes: every
//! replica answers, each request once; the validated submit path; status, cancel and retry.

use async_nats::jetstream::{self, context::Context};
use async_nats::{Client, HeaderMap};
use drover_shared::names::Names;
use drover_shared::task::{ErrorKind, Task, TaskError, TaskRecord, TaskSpec, TaskState};
use drover_tests::{DroverProcess, NatsServer};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

fn dispatcher(server_url: &str, name: &str) -> DroverProcess {
    DroverProcess::dispatcher(name, server_url, 4)
}

/// Starts `n` dispatchers and waits until each serves the API and one leads.
async fn fleet(server: &NatsServer, n: usize) -> (Vec<DroverProcess>, Client, Context) {
    let ds: Vec<DroverProcess> = (1..=n)
        .map(|i| dispatcher(&server.client_url(), &format!("d{i}")))
        .collect();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    for d in &ds {
        while !d.log().contains("serving the request API") {
            assert!(
                Instant::now() < deadline,
                "{} does not serve the API:\n{}",
                d.name(),
                d.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    leader_id(&js, &Names::default(), deadline).await;
    (ds, client, js)
}

async fn leader_id(js: &Context, names: &Names, deadline: Instant) -> String {
    loop {
        if let Ok(kv) = js.get_key_value(names.bucket("election")).await
            && let Ok(Some(v)) = kv.get("leader").await
            && let Ok(v) = serde_json::from_slice::<Value>(&v)
            && let Some(id) = v["id"].as_str()
        {
            return id.to_owned();
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request; the JSON reply and the replica that answered.
async fn call(
    client: &Client,
    subject: &str,
    body: impl Into<Vec<u8>>,
    msg_id: Option<&str>,
) -> (Value, String) {
    let mut headers = HeaderMap::new();
    if let Some(m) = msg_id {
        headers.insert("Nats-Msg-Id", m);
    }
    let body: Vec<u8> = body.into();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request_with_headers(subject.to_owned(), headers, body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject} within 10 s"))
    .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
    let replica = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Drover-Replica"))
        .map(|v| v.as_str().to_owned())
        .expect("every reply names its replica");
    let value = serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
        panic!(
            "reply is not JSON ({e}): {}",
            String::from_utf8_lossy(&reply.payload)
        )
    });
    (value, replica)
}

async fn ask(client: &Client, subject: &str, body: impl Into<Vec<u8>>) -> Value {
    call(client, subject, body, None).await.0
}

fn id_req(id: &str) -> Vec<u8> {
    json!({ "id": id }).to_string().into_bytes()
}

#[track_caller]
fn assert_ok(reply: &Value) {
    assert_eq!(reply["ok"], true, "expected success, got {reply}");
}

#[track_caller]
fn assert_error(reply: &Value, code: &str) -> Value {
    let e = &reply["error"];
    assert_eq!(e["code"], code, "expected {code}, got {reply}");
    assert!(!e["message"].as_str().unwrap_or_default().is_empty());
    e.clone()
}

fn ids(reply: &Value, key: &str) -> Vec<String> {
    reply[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {reply}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Every task in `DROVER_WORK`, decoded.
async fn work_tasks(js: &Context, names: &Names) -> Vec<Task> {
    drover_tests::observe::work_tasks(js, names)
        .await
        .into_iter()
        .map(|d| d.task)
        .collect()
}

/// Waits until every id in `want` is in `DROVER_WORK`; returns how often each id is there.
async fn wait_for_work(js: &Context, names: &Names, want: &[String]) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for t in work_tasks(js, names).await {
            *seen.entry(t.id).or_default() += 1;
        }
        if want.iter().all(|id| seen.contains_key(id)) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "not all of {want:?} reached DROVER_WORK; there: {:?}",
            seen.keys().collect::<BTreeSet<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `status` of `id` succeeds; returns the record.
async fn wait_record(client: &Client, names: &Names, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = ask(client, &names.api("status"), id_req(id)).await;
        if reply["ok"] == true {
            return reply["task"].clone();
        }
        assert_error(&reply, "not_found");
        assert!(Instant::now() < deadline, "no record of {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_replica_answers_each_request_once_leader_or_not() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let (ds, client, js) = fleet(&server, 2).await;
    let leader = leader_id(&js, &names, Instant::now() + Duration::from_secs(5)).await;

    // The queue group spreads requests over both replicas; the non-leader answers too.
    let mut answered_by = BTreeSet::new();
    for _ in 0..40 {
        let (reply, replica) = call(&client, &names.api("status"), id_req("nope"), None).await;
        let e = assert_error(&reply, "not_found");
        assert_eq!(e["field"], "id");
        answered_by.insert(replica);
    }
    assert_eq!(
        answered_by,
        BTreeSet::from(["d1".to_owned(), "d2".to_owned()]),
        "both replicas answer (leader {leader})"
    );

    // Exactly one reply per request.
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    for _ in 0..10 {
        client
            .publish_with_reply(names.api("status"), inbox.clone(), id_req("nope").into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut got = 0;
    while got < 10 {
        tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .unwrap_or_else(|_| panic!("only {got} of 10 replies"));
        got += 1;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), replies.next())
            .await
            .is_err(),
        "10 requests, more than 10 replies"
    );

    // Malformed requests get error replies, never silence.
    for endpoint in ["status", "cancel", "retry"] {
        let subject = names.api(endpoint);
        assert_error(&ask(&client, &subject, "{not json").await, "invalid_json");
        assert_error(&ask(&client, &subject, "").await, "invalid_json");
        assert_error(&ask(&client, &subject, "[1]").await, "invalid_field");
        let e = assert_error(&ask(&client, &subject, "{}").await, "invalid_field");
        assert_eq!(e["field"], "id");
        let e = assert_error(
            &ask(&client, &subject, r#"{"id":"a","force":true}"#).await,
            "unknown_field",
        );
        assert_eq!(e["field"], "force");
    }
    let submit = names.api("submit.default");
    assert_error(&ask(&client, &submit, "{not json").await, "invalid_json");
    let e = assert_error(
        &ask(
            &client,
            &names.api("submit.Bad_Queue"),
            r#"{"type":"noop"}"#,
        )
        .await,
        "invalid_field",
    );
    assert_eq!(e["field"], "queue");
    let e = assert_error(
        &ask(&client, &names.api("submit.a.b"), r#"{"type":"noop"}"#).await,
        "invalid_field",
    );
    assert_eq!(e["field"], "queue");

    // With the leader gone, the other replica answers, whether it leads yet or not. A request
    // sent before the server has noticed the dead connection can be routed to it and is lost
    // (as with any crashed replica), so wait for the first answer, then every one must come.
    ds.iter().find(|d| d.name() == leader).unwrap().kill();
    let survivor = if leader == "d1" { "d2" } else { "d1" };
    let status = names.api("status");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::time::timeout(
        Duration::from_millis(500),
        client.request(status.clone(), id_req("nope").into()),
    )
    .await
    .is_err()
    {
        assert!(Instant::now() < deadline, "{survivor} does not answer");
    }
    for _ in 0..10 {
        let (reply, replica) = call(&client, &status, id_req("nope"), None).await;
        assert_error(&reply, "not_found");
        assert_eq!(replica, survivor);
    }
}

#[tokio::test]
async fn validated_submit_reaches_work_with_the_replied_ids() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let (_ds, client, js) = fleet(&server, 2).await;
    let submit = names.api("submit.default");
    let mut expected: Vec<String> = Vec::new();

    // Single tasks: the header's id, a generated `_s<seq>` id, the task's own id.
    let (r, _) = call(&client, &submit, r#"{"type":"noop"}"#, Some("one")).await;
    assert_ok(&r);
    assert_eq!(ids(&r, "ids"), ["one"]);
    assert_eq!(r["queue"], "default");
    assert!(ids(&r, "duplicates").is_empty());
    expected.extend(ids(&r, "ids"));

    let r = ask(&client, &submit, r#"{"type":"echo","payload":{"x":[1,2]}}"#).await;
    assert_ok(&r);
    let generated = ids(&r, "ids");
    assert_eq!(generated.len(), 1);
    assert!(generated[0].starts_with("_s"), "{generated:?}");
    expected.extend(generated.clone());

    let r = ask(&client, &submit, r#"{"type":"noop","id":"own-1"}"#).await;
    assert_eq!(ids(&r, "ids"), ["own-1"]);
    expected.push("own-1".into());

    // Arrays: ids from the header or the stream sequence, own ids kept.
    let (r, _) = call(
        &client,
        &submit,
        r#"[{"type":"noop"},{"type":"noop","id":"mine"},{"type":"noop","key":"k"}]"#,
        Some("batch"),
    )
    .await;
    assert_eq!(ids(&r, "ids"), ["batch-0", "mine", "batch-2"]);
    expected.extend(ids(&r, "ids"));
    let r = ask(
        &client,
        &names.api("submit.mail"),
        r#"[{"type":"a"},{"type":"b"}]"#,
    )
    .await;
    assert_eq!(r["queue"], "mail");
    let arr = ids(&r, "ids");
    let base = arr[0].strip_suffix("-0").unwrap();
    assert!(base.starts_with("_s"));
    assert_eq!(arr[1], format!("{base}-1"));
    expected.extend(arr);

    // Each reaches DROVER_WORK once, under the id the reply gave.
    let seen = wait_for_work(&js, &names, &expected).await;
    for id in &expected {
        assert_eq!(seen[id], 1, "{id} dispatched once");
    }
    let tasks = work_tasks(&js, &names).await;
    let echo = tasks.iter().find(|t| t.id == generated[0]).unwrap();
    assert_eq!(
        echo.payload.get(),
        r#"{"x":[1,2]}"#,
        "payload byte for byte"
    );

    // Invalid submissions are refused whole and nothing is published.
    let submit_stream = js.get_stream(names.submit_stream()).await.unwrap();
    let before = submit_stream.get_info().await.unwrap().state.last_sequence;
    let e = assert_error(
        &ask(
            &client,
            &submit,
            r#"[{"type":"noop","id":"ok-0"},{"type":"noop","max_attempts":0},{"type":"noop"}]"#,
        )
        .await,
        "invalid_field",
    );
    assert_eq!(
        (e["index"].clone(), e["field"].clone()),
        (json!(1), json!("max_attempts"))
    );
    let e = assert_error(
        &ask(&client, &submit, r#"{"type":"noop","bogus":1}"#).await,
        "unknown_field",
    );
    assert_eq!(e["field"], "bogus");
    let e = assert_error(
        &ask(
            &client,
            &submit,
            r#"{"type":"noop","delay_ms":500,"run_at":"2030-01-01T00:00:00Z"}"#,
        )
        .await,
        "invalid_field",
    );
    assert!(e["message"].as_str().unwrap().contains("run_at"), "{e}");
    let (r, _) = call(&client, &submit, r#"{"type":"noop"}"#, Some("bad id")).await;
    assert_eq!(assert_error(&r, "invalid_field")["field"], "Nats-Msg-Id");
    assert_error(
        &ask(
            &client,
            &submit,
            r#"[{"type":"a","id":"x"},{"type":"b","id":"x"}]"#,
        )
        .await,
        "duplicate",
    );
    assert_error(&ask(&client, &submit, "[]").await, "invalid_field");
    assert_eq!(
        submit_stream.get_info().await.unwrap().state.last_sequence,
        before,
        "a refused submission is not published"
    );

    // Duplicates: an id with a record is listed and not run again; the rest of the array is.
    wait_record(&client, &names, "own-1").await;
    let r = ask(&client, &submit, r#"{"type":"noop","id":"own-1"}"#).await;
    assert_ok(&r);
    assert_eq!(ids(&r, "duplicates"), ["own-1"]);
    let r = ask(
        &client,
        &submit,
        r#"[{"type":"noop","id":"own-1"},{"type":"noop","id":"fresh"}]"#,
    )
    .await;
    assert_eq!(ids(&r, "ids"), ["own-1", "fresh"]);
    assert_eq!(ids(&r, "duplicates"), ["own-1"]);
    // The same request again, same Nats-Msg-Id: all duplicates.
    let (r, _) = call(&client, &submit, r#"{"type":"noop"}"#, Some("one")).await;
    assert_eq!(ids(&r, "duplicates"), ["one"]);
    let seen = wait_for_work(&js, &names, &["fresh".to_owned()]).await;
    assert_eq!((seen["own-1"], seen["one"], seen["fresh"]), (1, 1, 1));

    // Status of a known and an unknown id.
    let rec = wait_record(&client, &names, "batch-2").await;
    assert_eq!(
        (
            rec["id"].as_str(),
            rec["state"].as_str(),
            rec["key"].as_str()
        ),
        (Some("batch-2"), Some("queued"), Some("k"))
    );
    let r = ask(&client, &names.api("status"), id_req("batch-2")).await;
    assert!(r["revision"].as_u64().unwrap() > 0);
    assert_error(
        &ask(&client, &names.api("status"), id_req("never-submitted")).await,
        "not_found",
    );
}

#[tokio::test]
async fn cancel_a_queued_task_and_refuse_a_terminal_one() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let (_ds, client, js) = fleet(&server, 2).await;
    let mut cancels = client.subscribe("drover.ctl.cancel.>").await.unwrap();
    client.flush().await.unwrap();

    let r = ask(
        &client,
        &names.api("submit.default"),
        r#"{"type":"sleep","id":"c1"}"#,
    )
    .await;
    assert_ok(&r);
    // No worker runs: it stays queued.
    assert_eq!(wait_record(&client, &names, "c1").await["state"], "queued");

    let r = ask(&client, &names.api("cancel"), id_req("c1")).await;
    assert_ok(&r);
    assert_eq!(
        (r["state"].as_str(), r["previous_state"].as_str()),
        (Some("cancelled"), Some("queued"))
    );
    let kv = js.get_key_value(names.bucket("tasks")).await.unwrap();
    let rec: TaskRecord = serde_json::from_slice(&kv.get("c1").await.unwrap().unwrap()).unwrap();
    assert_eq!(rec.state, TaskState::Cancelled);
    assert_eq!(rec.error.unwrap().kind, ErrorKind::Cancelled);
    assert!(rec.finished_at.is_some());

    let heard = tokio::time::timeout(Duration::from_secs(5), cancels.next())
        .await
        .expect("workers hear the cancel")
        .unwrap();
    assert_eq!(heard.subject.as_str(), "drover.ctl.cancel.c1");

    // Terminal: refused, naming the state; unknown: not found.
    let r = ask(&client, &names.api("cancel"), id_req("c1")).await;
    let e = assert_error(&r, "not_allowed");
    assert!(e["message"].as_str().unwrap().contains("cancelled"), "{e}");
    assert_error(
        &ask(&client, &names.api("cancel"), id_req("ghost")).await,
        "not_found",
    );
    // A succeeded task cannot be cancelled either.
    put_record(&js, &names, "done", TaskState::Succeeded).await;
    let r = ask(&client, &names.api("cancel"), id_req("done")).await;
    assert!(
        assert_error(&r, "not_allowed")["message"]
            .as_str()
            .unwrap()
            .contains("succeeded")
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), cancels.next())
            .await
            .is_err(),
        "a refused cancel notifies nobody"
    );
}

/// Writes a record of `id` in `state` (queue `default`, type `echo`), as a dispatcher would.
async fn put_record(js: &Context, names: &Names, id: &str, state: TaskState) {
    let kv = js.get_key_value(names.bucket("tasks")).await.unwrap();
    let t = "2026-01-31T12:00:00.000Z";
    let mut rec = json!({
        "id": id, "queue": "default", "type": "echo", "state": state, "attempt": 0,
        "max_attempts": 3, "key": null, "worker": null, "partition": 1, "submitted_at": t,
        "started_at": null, "finished_at": null, "next_run_at": null, "duration_ms": null,
        "error": null, "result": null, "parent": null, "shard": null, "meta": {},
    });
    if state.is_terminal() {
        rec["attempt"] = json!(3);
        rec["worker"] = json!("w1");
        rec["started_at"] = json!(t);
        rec["finished_at"] = json!(t);
    }
    if state == TaskState::Failed {
        rec["error"] = json!(TaskError {
            kind: ErrorKind::Handler,
            message: "boom".into(),
        });
    }
    // The record parses as the dispatcher's own type.
    let _: TaskRecord = serde_json::from_value(rec.clone()).unwrap();
    kv.put(id, serde_json::to_vec(&rec).unwrap().into())
        .await
        .unwrap();
}

/// Writes the dead-letter copy of a failed task, as the outcome handler will (SPEC §7): the task
/// as it travelled, header `Drover-Task-Id`.
async fn put_dead_letter(js: &Context, names: &Names, id: &str, payload: Value) {
    let mut spec = TaskSpec::new("echo").with_payload(&payload).unwrap();
    spec.id = Some(id.to_owned());
    let mut task = Task::first_attempt(&spec, "default", 300_000, 0);
    task.attempt = 3;
    let mut headers = HeaderMap::new();
    headers.insert("Drover-Task-Id", id);
    js.publish_with_headers(
        names.dlq_subject("default"),
        headers,
        serde_json::to_vec(&task).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn retry_a_failed_task_from_its_dead_letter_copy() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let (_ds, client, js) = fleet(&server, 1).await;
    let retry = names.api("retry");
    let kv = js.get_key_value(names.bucket("tasks")).await.unwrap();
    // Core subscribers see what is published into the intake stream.
    let mut intake = client.subscribe("drover.submit.>").await.unwrap();
    client.flush().await.unwrap();

    put_record(&js, &names, "r1", TaskState::Failed).await;
    put_dead_letter(&js, &names, "other", json!(0)).await;
    put_dead_letter(&js, &names, "r1", json!({"x": 1})).await;
    put_dead_letter(&js, &names, "other", json!(0)).await;

    let r = ask(&client, &retry, id_req("r1")).await;
    assert_ok(&r);
    assert_eq!(
        (
            r["state"].as_str(),
            r["retry"].as_u64(),
            r["queue"].as_str()
        ),
        (Some("queued"), Some(1), Some("default"))
    );
    let rec: TaskRecord = serde_json::from_slice(&kv.get("r1").await.unwrap().unwrap()).unwrap();
    assert_eq!((rec.state, rec.attempt), (TaskState::Queued, 0));
    assert!(rec.error.is_none() && rec.finished_at.is_none() && rec.worker.is_none());

    let m = tokio::time::timeout(Duration::from_secs(5), intake.next())
        .await
        .expect("the retry is published")
        .unwrap();
    assert_eq!(m.subject.as_str(), "drover.submit.default");
    let h = m.headers.clone().unwrap();
    assert_eq!(h.get("Drover-Retry").unwrap().as_str(), "1");
    assert_eq!(h.get("Drover-Task-Id").unwrap().as_str(), "r1");
    assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "r1-retry-1");
    let spec = TaskSpec::from_json(&m.payload).unwrap();
    assert_eq!(
        (
            spec.id.as_deref(),
            spec.task_type.as_str(),
            spec.payload.get()
        ),
        (Some("r1"), "echo", r#"{"x":1}"#)
    );

    // Not failed any more: refused.
    let e = assert_error(&ask(&client, &retry, id_req("r1")).await, "not_allowed");
    assert!(e["message"].as_str().unwrap().contains("queued"), "{e}");

    // Failed again, second copy: the second retry.
    put_record(&js, &names, "r1", TaskState::Failed).await;
    put_dead_letter(&js, &names, "r1", json!({"x": 2})).await;
    let r = ask(&client, &retry, id_req("r1")).await;
    assert_eq!(r["retry"], 2, "{r}");
    let m = tokio::time::timeout(Duration::from_secs(5), intake.next())
        .await
        .unwrap()
        .unwrap();
    let h = m.headers.clone().unwrap();
    assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "r1-retry-2");
    assert_eq!(
        TaskSpec::from_json(&m.payload).unwrap().payload.get(),
        r#"{"x":2}"#,
        "the newest copy"
    );

    // A generated id stays out of the body; the header names the task.
    put_record(&js, &names, "_s999", TaskState::Failed).await;
    put_dead_letter(&js, &names, "_s999", json!(null)).await;
    assert_ok(&ask(&client, &retry, id_req("_s999")).await);
    let m = tokio::time::timeout(Duration::from_secs(5), intake.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.headers.unwrap().get("Drover-Task-Id").unwrap().as_str(),
        "_s999"
    );
    assert!(TaskSpec::from_json(&m.payload).unwrap().id.is_none());

    // No copy, not failed, unknown: refused with the reason.
    put_record(&js, &names, "r2", TaskState::Failed).await;
    let e = assert_error(&ask(&client, &retry, id_req("r2")).await, "not_allowed");
    assert!(
        e["message"].as_str().unwrap().contains("dead-letter"),
        "{e}"
    );
    for state in [TaskState::Succeeded, TaskState::Cancelled] {
        put_record(&js, &names, "r3", state).await;
        let e = assert_error(&ask(&client, &retry, id_req("r3")).await, "not_allowed");
        assert!(
            e["message"].as_str().unwrap().contains(state.as_str()),
            "{e}"
        );
    }
    assert_error(&ask(&client, &retry, id_req("ghost")).await, "not_found");
}
