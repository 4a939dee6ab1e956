//! Helpers the CLI's integration tests share: a server with a leading dispatcher, and task
//! records read and written the way the leader does, the Python example's venv.
// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use async_nats::jetstream::{self, context::Context};
use drover_shared::names::Names;
use drover_tests::{DroverProcess, NatsServer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A server and one dispatcher that leads and serves the API.
pub async fn fleet(partitions: u32) -> (NatsServer, DroverProcess, Context) {
    let server = NatsServer::start().await;
    let d = DroverProcess::dispatcher("d1", &server.client_url(), partitions);
    let js = jetstream::new(server.connect().await);
    let names = Names::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let serving = d.log().contains("serving the request API");
        let leads = match js.get_key_value(names.bucket("election")).await {
            Ok(kv) => kv
                .get("leader")
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
                .is_some_and(|v| v["epoch"].is_u64()),
            Err(_) => false,
        };
        if serving && leads {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dispatcher not ready:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (server, d, js)
}

pub async fn record(js: &Context, id: &str) -> Option<Value> {
    let kv = js.get_key_value("drover-tasks").await.ok()?;
    let v = kv.get(id).await.ok()??;
    serde_json::from_slice(&v).ok()
}

pub async fn wait_state(js: &Context, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = record(js, id).await
            && r["state"] == state
        {
            return r;
        }
        assert!(Instant::now() < deadline, "task {id} never reached {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Overwrites a record with a terminal one, as the leader would write it.
pub async fn finish(js: &Context, id: &str, state: &str, result: Value, error: Option<Value>) {
    let kv = js.get_key_value("drover-tasks").await.unwrap();
    let mut r = record(js, id).await.unwrap_or_else(|| {
        json!({"id": id, "queue": "default", "type": "echo", "attempt": 0, "max_attempts": 3,
               "submitted_at": "2026-01-01T00:00:00.000Z"})
    });
    r["state"] = json!(state);
    r["attempt"] = json!(1);
    r["worker"] = json!("w-test");
    r["started_at"] = json!("2026-01-01T00:00:01.000Z");
    r["finished_at"] = json!("2026-01-01T00:00:01.250Z");
    r["duration_ms"] = json!(250);
    r["result"] = result;
    if let Some(e) = error {
        r["error"] = e;
    }
    kv.put(id, serde_json::to_vec(&r).unwrap().into())
        .await
        .unwrap();
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A venv with the Python example's requirements, made once (pip is quiet when they are installed).
pub fn venv_python() -> Option<PathBuf> {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: python3 is not installed, so examples/python cannot be checked");
        return None;
    }
    let venv = root().join("target/py-examples");
    let python = venv.join("bin/python");
    if !python.is_file() {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(st.success(), "python3 -m venv {} failed", venv.display());
    }
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(root().join("examples/python/requirements.txt"))
        .output()
        .expect("pip");
    assert!(
        out.status.success(),
        "pip install -r examples/python/requirements.txt failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(python)
}
