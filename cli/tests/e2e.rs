//! The whole system end to end through the real binaries, the way a newcomer uses it: `drover up`
//! in a temporary directory (its own nats-server, two dispatchers, two workers); tasks submitted
//! with the CLI, with nats-py (the Python example, installed from PyPI) and with a raw async-nats
//! JetStream publish all complete; the CLI's views (`status`, `wait`, `tasks`, `workers`,
//! `leader`, `queues`, `dlq ls`) show what happened; Ctrl-C (and, in a test of its own, SIGTERM)
//! stops everything and leaves no process behind.

mod common;

use async_nats::jetstream;
use common::{root, venv_python};
use drover_tests::drover_bin;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `drover up` as a child; SIGKILLed on drop if the test fails before Ctrl-C.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(dir: &std::path::Path, port: u16, monitor: u16) -> Self {
        let mut child = Command::new(drover_bin("drover"))
            .args(["up", "--status-every", "0"])
            .args(["--port", &port.to_string()])
            .args(["--monitor-port", &monitor.to_string()])
            .arg("--dir")
            .arg(dir)
            .current_dir(root())
            .env_remove("DROVER_KEYS")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads output until a line contains `what`.
    fn until(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(what);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "drover up never printed {what:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` and waits (30 s at most) for `drover up` to exit.
    fn stop_with(&mut self, signal: libc::c_int, name: &str) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "drover up did not stop on {name}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI against the fleet.
fn drover(url: &str, args: &[&str]) -> Output {
    Command::new(drover_bin("drover"))
        .args(args)
        .env("DROVER_NATS_URL", url)
        .output()
        .unwrap()
}

/// Runs the CLI with `--output json`, expecting exit 0, and parses what it printed.
fn drover_json(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = drover(url, &all);
    assert!(
        out.status.success(),
        "drover {args:?}: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "drover {args:?} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn a_local_fleet_runs_tasks_from_every_kind_of_client_and_stops_cleanly() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    let (port, monitor) = (free_port(), free_port());
    let url = format!("nats://127.0.0.1:{port}");
    let mut up = Up::start(dir.path(), port, monitor);
    up.until("Running; press Ctrl-C to stop.", Duration::from_secs(120));
    let printed = up.seen.join("\n");
    assert!(printed.contains("leader       dispatcher-"), "{printed}");

    // 1. The CLI, waiting for the outcome.
    let out = drover(
        &url,
        &[
            "submit",
            "echo",
            "--payload",
            r#"{"via":"cli"}"#,
            "--id",
            "e2e-cli",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    // 2. nats-py, through the example (it waits for the terminal record itself).
    if let Some(python) = &python {
        let out = Command::new(python)
            .arg(root().join("examples/python/submit.py"))
            .args(["--nats-url", &url, "--id", "e2e-py", "--type", "echo"])
            .args(["--payload", r#"{"via":"python"}"#, "--timeout", "60"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    // 3. A raw JetStream publish from async-nats, id from Nats-Msg-Id.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = jetstream::new(client);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "e2e-raw");
        js.publish_with_headers(
            "drover.submit.default",
            headers,
            r#"{"type":"echo","payload":{"via":"raw"}}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    });
    // A task that fails for good, for the DLQ view.
    let out = drover(
        &url,
        &["submit", "fail", "--id", "e2e-fail", "--max-attempts", "1"],
    );
    assert!(out.status.success(), "{out:?}");

    let mut ids = vec!["e2e-cli", "e2e-raw"];
    if python.is_some() {
        ids.push("e2e-py");
    }
    let mut wait = vec!["wait"];
    wait.extend(&ids);
    wait.extend(["--timeout", "60s"]);
    let out = drover(&url, &wait);
    assert!(out.status.success(), "drover wait: {out:?}");
    // A failed task makes `wait` exit 1, as documented.
    let out = drover(&url, &["wait", "e2e-fail", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    for id in &ids {
        let v = drover_json(&url, &["status", id])["task"].clone();
        assert_eq!(v["state"], "succeeded", "{id}: {v}");
        assert!(v["worker"].as_str().unwrap().starts_with("worker-"), "{v}");
    }
    let raw = drover_json(&url, &["status", "e2e-raw"]);
    assert_eq!(raw["task"]["result"]["via"], "raw", "{raw}");

    let tasks = drover_json(&url, &["tasks", "--limit", "50"]);
    let listed: Vec<&str> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    for id in ids.iter().chain(&["e2e-fail"]) {
        assert!(listed.contains(id), "{id} not in `drover tasks`: {tasks}");
    }
    let failed = drover_json(&url, &["tasks", "--state", "failed"]);
    assert_eq!(failed["tasks"].as_array().unwrap().len(), 1, "{failed}");

    let workers = drover_json(&url, &["workers"]);
    let workers = workers["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let leader = drover_json(&url, &["leader"])["leader"].clone();
    assert!(
        leader["id"].as_str().unwrap().starts_with("dispatcher-"),
        "{leader}"
    );
    let queues = drover_json(&url, &["queues"]);
    assert!(queues.to_string().contains("default"), "{queues}");
    let dlq = drover_json(&url, &["dlq", "ls"]);
    assert!(dlq.to_string().contains("e2e-fail"), "{dlq}");

    // The processes `drover up` started, as the fleet's own records name them.
    let mut pids: Vec<u32> = workers
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    pids.extend(leader["pid"].as_u64().map(|p| p as u32));
    assert_eq!(pids.len(), 3, "pids of 2 workers and the leader: {pids:?}");
    let server_pid: u32 = std::fs::read_to_string(dir.path().join("nats.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);

    // Ctrl-C: everything stops, nothing is left behind.
    let status = up.stop_with(libc::SIGINT, "Ctrl-C");
    assert!(status.success(), "drover up exited {status:?}");
    for pid in pids
        .iter()
        .chain(std::iter::once(&server_pid).filter(|p| **p != 0))
    {
        assert!(!alive(*pid), "process {pid} outlived drover up");
    }
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nats-server still listening"
    );
}

/// SIGTERM (`kill`, a service manager) stops the fleet and the server `drover up` started, as
/// Ctrl-C does, instead of killing it and leaving them running.
#[test]
fn sigterm_stops_the_fleet_drover_up_started() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut up = Up::start(dir.path(), port, free_port());
    up.until("Running; press Ctrl-C", Duration::from_secs(60));
    let pid = up.child.id();
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        children.len(),
        5,
        "a server, 2 dispatchers, 2 workers: {children:?}"
    );
    let status = up.stop_with(libc::SIGTERM, "SIGTERM");
    assert!(status.success(), "drover up exited {status:?}");
    for child in children {
        assert!(!alive(child), "process {child} outlived drover up");
    }
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nats-server still listening"
    );
}
