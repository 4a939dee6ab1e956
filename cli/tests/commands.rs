//! The `drover` operator commands against a real nats-server and a real `drover-dispatcher`:
//! what each command shows, and that every error path prints one line and its documented exit
//! code (0 ok, 1 task failed / not found / refused, 2 usage, 3 unreachable or timeout).

mod common;

use async_nats::HeaderMap;
use common::{finish, fleet, wait_state};
use drover_shared::names::Names;
use drover_shared::task::{Task, TaskSpec};
use drover_tests::{NatsServer, TEST_KEYS, drover_bin, free_port};
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// What one run of `drover` did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts a failure with exactly one stderr line, and returns it.
    #[track_caller]
    fn one_error(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "exit code: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:?}");
        assert!(lines[0].starts_with("error: "), "{self:?}");
        lines[0]
    }

    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }
}

/// Runs `drover args...` with a clean environment plus `env`, at most 60 s.
async fn drover_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(drover_bin("drover"));
    cmd.args(args)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
        .envs(env.iter().copied())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("drover {args:?} did not finish in 60 s"))
        .expect("cannot run drover");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `drover <args> --nats-url <url>`.
async fn drover(url: &str, args: &[&str]) -> Run {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--nats-url", url]);
    drover_env(&all, &[]).await
}

#[tokio::test]
async fn submit_status_tasks_cancel_leader_queues_workers() {
    let (server, _d, js) = fleet(4).await;
    let url = server.client_url();

    // submit: the id on stdout; json: the reply.
    let r = drover(
        &url,
        &[
            "submit",
            "echo",
            "--payload",
            r#"{"n":1}"#,
            "--id",
            "t1",
            "--meta",
            "team=ops",
        ],
    )
    .await;
    assert_eq!(r.ok().stdout, "t1\n");
    let r = drover(&url, &["submit", "noop", "--key", "k1", "-o", "json"]).await;
    let reply = r.ok().json();
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["queue"], "default");
    let generated = reply["ids"][0].as_str().unwrap().to_owned();
    assert!(generated.starts_with("_s"), "{reply}");
    // The same id again is a duplicate: still exit 0, with a note.
    let r = drover(&url, &["submit", "echo", "--id", "t1"]).await;
    assert!(r.ok().stderr.contains("submitted before"), "{r:?}");

    wait_state(&js, "t1", "queued").await;
    wait_state(&js, &generated, "queued").await;

    // status
    let r = drover(&url, &["status", "t1"]).await;
    assert!(r.ok().stdout.contains("state         queued"), "{r:?}");
    assert!(r.stdout.contains("meta          team=ops"), "{r:?}");
    let r = drover(&url, &["status", "t1", "-o", "json"]).await;
    let v = r.ok().json();
    assert_eq!(
        (v["task"]["id"].as_str(), v["task"]["state"].as_str()),
        (Some("t1"), Some("queued"))
    );
    assert!(v["revision"].as_u64().unwrap() > 0);
    // Unknown id: exit 1, one line.
    let line = drover(&url, &["status", "nope"])
        .await
        .one_error(1)
        .to_owned();
    assert!(
        line.contains("not_found") && line.contains("\"nope\""),
        "{line}"
    );

    // tasks: newest first; filters.
    let r = drover(&url, &["tasks", "-o", "json"]).await;
    let v = r.ok().json();
    let ids: Vec<&str> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [generated.as_str(), "t1"], "{v}");
    let r = drover(&url, &["tasks", "--state", "failed", "-o", "json"]).await;
    assert_eq!(r.ok().json()["tasks"], json!([]));
    let r = drover(&url, &["tasks"]).await;
    assert!(r.ok().stdout.starts_with("ID "), "{r:?}");
    assert!(r.stdout.contains("t1 "), "{r:?}");
    assert!(r.stdout.lines().all(|l| l.chars().count() <= 120), "{r:?}");

    // cancel, then status of a cancelled task is exit 1 (one line), cancel again is refused.
    let r = drover(&url, &["cancel", "t1"]).await;
    assert_eq!(r.ok().stdout, "cancelled t1 (was queued)\n");
    let r = drover(&url, &["status", "t1"]).await;
    assert!(r.one_error(1).contains("task t1 cancelled"), "{r:?}");
    assert!(r.stdout.contains("state         cancelled"), "{r:?}");
    let line = drover(&url, &["cancel", "t1"])
        .await
        .one_error(1)
        .to_owned();
    assert!(line.contains("not_allowed"), "{line}");

    // leader
    let r = drover(&url, &["leader"]).await;
    assert!(r.ok().stdout.starts_with("leader   d1\n"), "{r:?}");
    let v = drover(&url, &["leader", "-o", "json"]).await.json();
    assert_eq!(v["leader"]["id"], "d1");
    assert!(v["leader"]["epoch"].as_u64().unwrap() >= 1);

    // workers: a fake heartbeat; the leader assigns it every partition.
    let workers = js.get_key_value("drover-workers").await.unwrap();
    let beat = json!({"id": "w1", "queues": ["default"], "capacity": 2, "running": 1,
                      "host": "box", "pid": 42, "version": "test"});
    let deadline = Instant::now() + Duration::from_secs(20);
    let w = loop {
        workers.put("w1", beat.to_string().into()).await.unwrap();
        let v = drover(&url, &["workers", "-o", "json"]).await.json();
        if v["workers"][0]["partitions"]["default"] == json!([0, 1, 2, 3]) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "w1 never got the partitions: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(w["workers"][0]["id"], "w1");
    assert_eq!(w["workers"][0]["capacity"], 2);
    assert_eq!(w["workers"][0]["pid"], 42);
    let r = drover(&url, &["workers"]).await;
    let line = r.ok().stdout.lines().nth(1).unwrap().to_owned();
    assert!(
        line.starts_with("w1 ") && line.contains("box/42") && line.contains("default:0-3"),
        "{r:?}"
    );

    // queues: the queue, its partitions and envelopes waiting for the (fake) worker.
    let v = drover(&url, &["queues", "-o", "json"]).await.json();
    let q = &v["queues"][0];
    assert_eq!(
        (q["queue"].as_str(), q["partitions"].as_u64()),
        (Some("default"), Some(4)),
        "{v}"
    );
    assert_eq!(q["submit_backlog"], 0, "{v}");
    assert!(q["envelopes"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(q["partition_rows"].as_array().unwrap().len(), 4);
    let r = drover(&url, &["queues"]).await;
    assert!(r.ok().stdout.starts_with("QUEUE "), "{r:?}");
    assert!(r.stdout.contains("intake (drover-intake)"), "{r:?}");
    let r = drover(&url, &["queues", "default"]).await;
    assert!(r.ok().stdout.contains("PARTITION"), "{r:?}");
    assert_eq!(
        r.stdout.lines().filter(|l| l.contains(" w1 ")).count(),
        4,
        "{r:?}"
    );
    drover(&url, &["queues", "nosuch"]).await.one_error(1);
}

#[tokio::test]
async fn submit_wait_and_wait() {
    let (server, _d, js) = fleet(2).await;
    let url = server.client_url();

    // submit --wait follows the record (watch, no polling) until the test finishes it.
    let bin = drover_bin("drover");
    let child = tokio::process::Command::new(bin)
        .args([
            "submit",
            "echo",
            "--payload",
            "[1,2]",
            "--id",
            "sw1",
            "--wait",
            "--wait-timeout",
            "30s",
        ])
        .args(["--nats-url", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_state(&js, "sw1", "queued").await;
    finish(&js, "sw1", "succeeded", json!([1, 2]), None).await;
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("submit --wait did not end")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("sw1\n"), "{stdout}");
    assert!(stdout.contains("state         succeeded"), "{stdout}");
    assert!(stdout.contains("result        [1,2]"), "{stdout}");

    // wait on records the test wrote: one failed → exit 1 with a summary.
    finish(&js, "wa", "succeeded", json!("ok"), None).await;
    finish(
        &js,
        "wb",
        "failed",
        Value::Null,
        Some(json!({"kind": "handler", "message": "boom"})),
    )
    .await;
    let r = drover(&url, &["wait", "wa", "wb"]).await;
    assert!(
        r.one_error(1)
            .contains("1 of 2 task(s) did not succeed: wb"),
        "{r:?}"
    );
    assert!(r.stdout.contains("handler: boom"), "{r:?}");
    assert!(r.stdout.ends_with("1 succeeded, 1 failed\n"), "{r:?}");
    let r = drover(&url, &["wait", "wa", "-o", "json"]).await;
    let v = r.ok().json();
    assert_eq!(
        (v["ok"].as_bool(), v["tasks"][0]["result"].as_str()),
        (Some(true), Some("ok"))
    );

    // A task that never ends: the timeout is exit 3 naming it.
    let line = drover(&url, &["wait", "wa", "never", "--timeout", "1s"])
        .await
        .one_error(3)
        .to_owned();
    assert!(line.contains("never (no record yet)"), "{line}");
    // submit --wait on a task nothing runs: exit 3 after --wait-timeout.
    let r = drover(&url, &["submit", "noop", "--wait", "--wait-timeout", "1s"]).await;
    assert!(r.one_error(3).contains("(queued)"), "{r:?}");
    // A failed task through submit --wait: exit 1.
    let child = tokio::process::Command::new(drover_bin("drover"))
        .args([
            "submit",
            "fail",
            "--id",
            "sw2",
            "--wait",
            "-o",
            "json",
            "--nats-url",
            &url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_state(&js, "sw2", "queued").await;
    finish(
        &js,
        "sw2",
        "failed",
        Value::Null,
        Some(json!({"kind": "handler", "message": "no"})),
    )
    .await;
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["submitted"]["ids"][0].as_str(),
            v["task"]["state"].as_str()
        ),
        (Some("sw2"), Some("failed"))
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[tokio::test]
async fn dlq_ls_show_replay_purge() {
    let (server, _d, js) = fleet(2).await;
    let url = server.client_url();
    let names = Names::default();

    // A dead copy of a failed task, as the leader writes it.
    finish(
        &js,
        "dead1",
        "failed",
        Value::Null,
        Some(json!({"kind": "handler", "message": "x"})),
    )
    .await;
    let mut spec = TaskSpec::new("echo")
        .with_payload(&json!({"p": 1}))
        .unwrap();
    spec.id = Some("dead1".into());
    let task = Task::first_attempt(&spec, "default", 300_000, 0);
    let mut headers = HeaderMap::new();
    headers.insert("Drover-Task-Id", "dead1");
    headers.insert("Drover-Reason", "handler: x");
    let dead_seq = js
        .publish_with_headers(
            names.dlq_subject("default"),
            headers,
            serde_json::to_vec(&task).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    // A rejected submission through the durable path.
    js.publish(
        names.submit_subject("default"),
        r#"{"type":"echo","bogus":1}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = drover(&url, &["dlq", "ls", "-o", "json"]).await.json();
        if v["total"] == 2 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the rejected record never arrived: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["seq"], dead_seq);
    assert_eq!(
        (msgs[0]["kind"].as_str(), msgs[0]["task_id"].as_str()),
        (Some("dead"), Some("dead1"))
    );
    assert_eq!(msgs[0]["reason"], "handler: x");
    assert_eq!(
        (msgs[1]["kind"].as_str(), msgs[1]["reason"].as_str()),
        (Some("rejected"), Some("unknown_field"))
    );
    let rejected_seq = msgs[1]["seq"].as_u64().unwrap();
    let r = drover(&url, &["dlq", "ls"]).await;
    assert!(r.ok().stdout.contains(" dead "), "{r:?}");
    assert!(r.stdout.contains("2 shown of 2"), "{r:?}");

    // show
    let v = drover(&url, &["dlq", "show", &dead_seq.to_string(), "-o", "json"])
        .await
        .json();
    assert_eq!(v["body"]["id"], "dead1");
    assert_eq!(v["headers"]["Drover-Task-Id"], json!(["dead1"]));
    let r = drover(&url, &["dlq", "show", &rejected_seq.to_string()]).await;
    assert!(r.ok().stdout.contains("kind     rejected"), "{r:?}");
    assert!(r.stdout.contains("\"bogus\": 1"), "{r:?}");
    drover(&url, &["dlq", "show", "999"]).await.one_error(1);

    // replay: rejected is refused; dead goes through drover.api.retry.
    let line = drover(&url, &["dlq", "replay", &rejected_seq.to_string()])
        .await
        .one_error(1)
        .to_owned();
    assert!(
        line.contains("rejected submission") && line.contains("submit it anew"),
        "{line}"
    );
    let r = drover(&url, &["dlq", "replay", &dead_seq.to_string()]).await;
    assert!(
        r.ok().stdout.starts_with("replayed dead1 (retry 1"),
        "{r:?}"
    );
    wait_state(&js, "dead1", "queued").await;
    // Replaying everything again skips the task that is no longer failed.
    let v = drover(&url, &["dlq", "replay", "--all", "-o", "json"])
        .await
        .json();
    assert_eq!(
        (v["replayed"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(1)),
        "{v}"
    );

    // purge needs --yes.
    drover(&url, &["dlq", "purge"]).await.one_error(2);
    let v = drover(
        &url,
        &["dlq", "purge", "--queue", "default", "--yes", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(v["purged"], 2);
    assert!(
        drover(&url, &["dlq", "ls"])
            .await
            .ok()
            .stdout
            .contains("is empty")
    );
}

#[tokio::test]
async fn inspect_opens_envelopes_with_the_right_keys_only() {
    let (server, _d, js) = fleet(2).await;
    let url = server.client_url();
    drover(
        &url,
        &["submit", "echo", "--id", "env1", "--payload", r#""hi""#],
    )
    .await
    .ok();
    wait_state(&js, "env1", "queued").await;
    // The `queued` record is written before the envelope is published: wait for the envelope.
    let stream = js.get_stream("DROVER_WORK").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let seq = loop {
        let state = stream.get_info().await.unwrap().state;
        if state.messages > 0 {
            break state.first_sequence.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no envelope in DROVER_WORK"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    let with_keys = |keys: &'static str| {
        let url = url.clone();
        let seq = seq.clone();
        async move {
            drover_env(
                &["inspect", &seq, "--nats-url", &url],
                &[("DROVER_KEYS", keys)],
            )
            .await
        }
    };
    let r = with_keys(TEST_KEYS).await;
    assert!(r.ok().stdout.contains("\"id\":\"env1\""), "{r:?}");
    assert!(r.stdout.contains("kid        test1"), "{r:?}");
    assert!(
        !r.stdout.contains(TEST_KEYS.split(':').nth(1).unwrap()),
        "key material printed"
    );
    let v = drover_env(
        &["inspect", &seq, "-o", "json", "--nats-url", &url],
        &[("DROVER_KEYS", TEST_KEYS)],
    )
    .await
    .json();
    assert_eq!(v["tasks"][0]["payload"], "hi");
    assert_eq!(v["count"], 1);

    // Same kid, another secret: the signature does not verify.
    const WRONG: &str = "test1:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let r = with_keys(WRONG).await;
    let line = r.one_error(1);
    assert!(line.contains("bad_signature"), "{line}");
    assert!(!r.stderr.contains("ICEiIyQl") && !r.stdout.contains("ICEiIyQl"));
    // Another kid: unknown_kid.
    const OTHER: &str = "k9:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let line = with_keys(OTHER).await.one_error(1).to_owned();
    assert!(line.contains("unknown_kid"), "{line}");
    // No such message.
    let r = drover_env(
        &["inspect", "9999", "--nats-url", &url],
        &[("DROVER_KEYS", TEST_KEYS)],
    )
    .await;
    assert!(r.one_error(1).contains("no message 9999"), "{r:?}");
    // No keys at all: usage.
    drover_env(&["inspect", &seq, "--nats-url", &url], &[])
        .await
        .one_error(2);
}

#[tokio::test]
async fn error_paths_print_one_line_and_their_exit_code() {
    // Nothing listens on this port: exit 3.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    // (In parallel: each waits out the 5 s connect timeout.)
    let commands = [
        vec!["status", "t1"],
        vec!["tasks"],
        vec!["submit", "echo"],
        vec!["workers"],
    ];
    let runs = futures::future::join_all(commands.iter().map(|args| drover(&dead, args))).await;
    for (args, r) in commands.iter().zip(&runs) {
        assert!(
            r.one_error(3).contains("cannot connect to NATS"),
            "{args:?}: {r:?}"
        );
    }
    // Bad input is exit 2 before any network I/O (the server is unreachable, yet 2).
    let line = drover(&dead, &["submit", "echo", "--payload", "{nope"])
        .await
        .one_error(2)
        .to_owned();
    assert!(line.contains("--payload is not valid JSON"), "{line}");
    drover(
        &dead,
        &["submit", "echo", "--payload", "@/nonexistent/file"],
    )
    .await
    .one_error(2);
    drover(&dead, &["submit", "echo", "--max-attempts", "0"])
        .await
        .one_error(2);
    drover(&dead, &["submit", "echo", "--queue", "Bad"])
        .await
        .one_error(2);
    drover(&dead, &["submit", "echo", "--delay", "5x"])
        .await
        .one_error(2);
    drover(&dead, &["status", "bad id"]).await.one_error(2);
    // Invalid flags: one line, exit 2.
    let line = drover_env(&["status", "--frobnicate", "x"], &[])
        .await
        .one_error(2)
        .to_owned();
    assert!(line.contains("--frobnicate"), "{line}");
    drover_env(&["tasks", "--state", "done"], &[])
        .await
        .one_error(2);
    drover_env(&["nosuchcommand"], &[]).await.one_error(2);
    drover_env(&["submit", "echo", "--wait-timeout", "5s"], &[])
        .await
        .one_error(2);

    // A server without dispatchers: API commands are exit 3, status falls back to the bucket.
    let server = NatsServer::start().await;
    let url = server.client_url();
    drover(&url, &["init"]).await.ok();
    let line = drover(&url, &["cancel", "x1"])
        .await
        .one_error(3)
        .to_owned();
    assert!(line.contains("no dispatcher answers"), "{line}");
    drover(&url, &["submit", "echo"]).await.one_error(3);
    let line = drover(&url, &["status", "x1"])
        .await
        .one_error(1)
        .to_owned();
    assert!(line.contains("not_found"), "{line}");
    let r = drover(&url, &["leader"]).await;
    assert!(r.one_error(1).contains("no leader"), "{r:?}");
    let r = drover(&url, &["leader", "-o", "json"]).await;
    assert_eq!(r.json()["leader"], Value::Null);
    let r = drover(&url, &["workers"]).await;
    assert!(r.ok().stdout.starts_with("no live workers"), "{r:?}");
    let r = drover(&url, &["queues"]).await;
    assert!(r.ok().stdout.starts_with("no queues yet"), "{r:?}");
}
