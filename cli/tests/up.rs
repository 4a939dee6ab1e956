//! `drover up --demo` end to end through the real binary: installs/starts a project-local
//! nats-server, provisions it, submits the demo durably, and leaves no process behind.

use drover_tests::drover_bin;
use std::net::TcpListener;
use std::process::Command;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn up_demo_runs_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (port, monitor) = (free_port(), free_port());
    let out = Command::new(drover_bin("drover"))
        .args(["up", "--demo", "--port", &port.to_string()])
        .args(["--monitor-port", &monitor.to_string()])
        .arg("--dir")
        .arg(dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DROVER_KEYS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "drover up --demo failed\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("provisioned"), "{stdout}");
    assert_eq!(
        stdout.matches("durable in DROVER_SUBMIT").count(),
        5,
        "{stdout}"
    );
    assert!(stdout.contains("dispatchers  2 started"), "{stdout}");
    assert!(
        stdout.contains("dispatched   all demo tasks by leader dispatcher-"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches(" queued").count(),
        5,
        "every demo task has a queued record: {stdout}"
    );
    // The server is gone: its port is free again.
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nats-server still listening"
    );
    assert!(dir.path().join("nats.log").exists());
    assert!(dir.path().join("dispatcher-1.log").exists());
    // Keys were made for the local fleet, readable only by this user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("keys"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn unreachable_nats_exits_with_code_3() {
    let port = free_port();
    let out = Command::new(drover_bin("drover"))
        .args(["init", "--nats-url", &format!("nats://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect to NATS"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}
