//! The client examples of `examples/` against a real nats-server and dispatcher: the Python one
//! (nats-py, installed from PyPI into a venv under `target/`) submits over the durable path,
//! sees `queued`, and reports the terminal record the test writes. Skipped only when `python3`
//! is not installed, and then loudly. The Node one (`@nats-io/*` packages, `npm ci` from the
//! lock file) does the same and reports a failed task with exit 1; skipped only without node.

mod common;

use common::{finish, fleet, root, venv_python, wait_state};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Reads the example's stdout until it reports `state queued` (so the test writes the terminal
/// record only once the example watches), returning what it printed so far.
async fn until_queued(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut seen = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            seen.push_str(&line);
            seen.push('\n');
            if line == "state queued" {
                return;
            }
        }
        panic!("the example ended before it saw `queued`");
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the example never reported `queued`");
    seen
}

#[tokio::test]
async fn python_example_submits_and_waits_for_the_terminal_record() {
    let Some(python) = tokio::task::spawn_blocking(venv_python).await.unwrap() else {
        return;
    };
    let (server, _d, js) = fleet(2).await;
    let url = server.client_url();
    let script = root().join("examples/python/submit.py");

    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .args([
            "--nats-url",
            &url,
            "--id",
            "py-1",
            "--payload",
            r#"{"x":1}"#,
        ])
        .args(["--key", "customer-42", "--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_state(&js, "py-1", "queued").await;
    let head = until_queued(&mut child).await;
    finish(&js, "py-1", "succeeded", json!({"x": 1}), None).await;
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the example did not end")
        .unwrap();
    let stdout = head + &String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("submitted py-1 to drover.submit.default"),
        "{stdout}"
    );
    // The partition the doc's formula gives for this key.
    assert!(stdout.contains("goes to partition 62 of 64"), "{stdout}");
    assert!(stdout.contains("state queued\n"), "{stdout}");
    let json_start = stdout.find('{').unwrap();
    let record: Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(
        (record["state"].as_str(), &record["result"]),
        (Some("succeeded"), &json!({"x": 1}))
    );

    // Nothing finishes it: exit 3 after the timeout.
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--nats-url", &url, "--id", "py-2", "--timeout", "1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // A bad payload: exit 2.
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--nats-url", &url, "--payload", "{nope"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `examples/node` with its packages installed (`npm ci` from the lock file, once).
fn node_example() -> Option<PathBuf> {
    let dir = root().join("examples/node");
    if Command::new("node").arg("--version").output().is_err()
        || Command::new("npm").arg("--version").output().is_err()
    {
        eprintln!("SKIPPED: node/npm are not installed, so examples/node cannot be checked");
        return None;
    }
    if !dir.join("node_modules/@nats-io/kv").is_dir() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm");
        assert!(
            out.status.success(),
            "npm ci in examples/node failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(dir)
}

#[tokio::test]
async fn node_example_submits_and_waits_for_the_terminal_record() {
    let Some(dir) = tokio::task::spawn_blocking(node_example).await.unwrap() else {
        return;
    };
    let (server, _d, js) = fleet(2).await;
    let url = server.client_url();
    let mut child = tokio::process::Command::new("node")
        .arg("submit.mjs")
        .args([
            "--nats-url",
            &url,
            "--id",
            "js-1",
            "--payload",
            r#"{"x":2}"#,
        ])
        .args(["--key", "customer-42", "--timeout", "30"])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_state(&js, "js-1", "queued").await;
    let head = until_queued(&mut child).await;
    finish(
        &js,
        "js-1",
        "failed",
        Value::Null,
        Some(json!({"kind": "handler", "message": "boom"})),
    )
    .await;
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the example did not end")
        .unwrap();
    let stdout = head + &String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A failed task is exit 1, with the record printed.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("submitted js-1 to drover.submit.default"),
        "{stdout}"
    );
    assert!(stdout.contains("goes to partition 62 of 64"), "{stdout}");
    assert!(stdout.contains("state queued\n"), "{stdout}");
    let record: Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(record["error"]["message"], "boom");
}
