//! `drover up --demo` end to end through the real binaries: installs/starts a project-local
//! nats-server, provisions it, starts dispatchers and workers, runs the demo workload to the end
//! (successes in key order, a failure retried into the DLQ), and leaves no process behind.

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
    assert!(
        stdout.contains("fleet        2 dispatcher(s), 2 worker(s) started"),
        "{stdout}"
    );
    assert!(stdout.contains("leader       dispatcher-"), "{stdout}");
    assert_eq!(stdout.matches("worker       ").count(), 2, "{stdout}");
    assert!(
        stdout.contains("7 tasks finished")
            && stdout.contains("6 succeeded, 1 failed after 3 attempts"),
        "{stdout}"
    );
    // The failing task retried twice before it failed for good.
    let fail_lines: Vec<&str> = stdout.lines().filter(|l| l.contains("-fail ")).collect();
    assert_eq!(
        fail_lines.iter().filter(|l| l.contains("retrying")).count(),
        2,
        "{stdout}"
    );
    // Keyed tasks finished in submit order (the demo checks their finish times).
    assert!(stdout.contains("finished in submit order"), "{stdout}");
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
