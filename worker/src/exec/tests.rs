//! Tests of `exec` runs against real processes: process groups, limits, environment, working
//! directories, timeouts and cancels (no part of the OS is mocked).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use drover_shared::settings::{CwdPolicy, ExecHandler, Secret};
use drover_shared::task::{ErrorKind, TaskError};
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{IDENTITY_ENV, Identity, run};
use drover_shared::task::ShardInfo;

/// Secrets placed in the test process's environment; no child may see them.
const FAKE_KEYS: &str = "k1:c2VjcmV0LXNob3VsZC1uZXZlci1sZWFr";
const FAKE_SECRET: &str = "hunter2-must-not-leak";

/// Puts the fake secrets into this process's environment (once, before any test spawns).
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: Rust's own environment accesses (`var_os`, `Command::spawn`) take the
        // standard library's environment lock, and nothing in these tests reads the environment
        // through libc directly.
        unsafe {
            std::env::set_var("DROVER_KEYS", FAKE_KEYS);
            std::env::set_var("DROVER_PASSWORD", FAKE_SECRET);
            std::env::set_var("DROVER_TEST_WORKER_SECRET", FAKE_SECRET);
        }
    });
}

fn cfg(argv: &[&str]) -> ExecHandler {
    ExecHandler {
        argv: argv.iter().map(ToString::to_string).collect(),
        timeout_grace_ms: 300,
        ..ExecHandler::default()
    }
}

fn sh(script: &str) -> ExecHandler {
    cfg(&["/bin/sh", "-c", script])
}

/// The identity of attempt 3 of task `t-1` on worker `w-7`.
fn identity(shard: Option<ShardInfo>) -> Identity {
    Identity {
        task_id: "t-1".into(),
        task_type: "resize".into(),
        queue: "images".into(),
        attempt: 3,
        worker_id: "w-7".into(),
        shard,
    }
}

/// The identity variables a non-shard run gets, sorted.
const IDENTITY_NAMES: [&str; 5] = [
    "DROVER_ATTEMPT",
    "DROVER_QUEUE",
    "DROVER_TASK_ID",
    "DROVER_TASK_TYPE",
    "DROVER_WORKER_ID",
];

fn payload(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("test payload is JSON")
}

async fn go(
    config: &ExecHandler,
    input: &str,
    within: Duration,
) -> Result<Box<RawValue>, TaskError> {
    setup();
    run(
        config,
        &payload(input),
        &identity(None),
        Instant::now() + within,
        &CancellationToken::new(),
    )
    .await
}

/// Live (non-zombie) processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` is a live (non-zombie) process.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Polls until none of `pids` (and nothing in their groups) is alive, or fails after 3 s.
async fn assert_all_gone(pids: &[i32]) {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let left: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&p| alive(p) || !group_members(p).is_empty())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < until, "still alive: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Waits until `path` holds `n` pids (the script has started its processes).
async fn wait_for_pids(path: &Path, n: usize) -> Vec<i32> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = read_pids(path);
        if pids.len() >= n {
            return pids;
        }
        assert!(Instant::now() < until, "script did not write {n} pids");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fixed(dir: &Path) -> CwdPolicy {
    CwdPolicy::Fixed(dir.to_owned())
}

#[tokio::test]
async fn payload_on_stdin_and_json_stdout_is_the_result() {
    let input = r#"{"b": [1, 2, {"c": "d"}], "a": "é"}"#;
    let out = go(&cfg(&["cat"]), input, Duration::from_secs(10))
        .await
        .unwrap();
    // Byte for byte: key order and spacing kept.
    assert_eq!(out.get(), input);
}

#[tokio::test]
async fn text_stdout_becomes_a_string_and_empty_stdout_null() {
    let out = go(&sh("echo hello world"), "{}", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.get(), r#""hello world\n""#);
    let out = go(&sh("true"), "{}", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.get(), "null");
}

#[tokio::test]
async fn a_program_that_ignores_a_large_stdin_still_succeeds() {
    let big = format!("\"{}\"", "x".repeat(4 * 1024 * 1024));
    let out = go(&sh("echo 7"), &big, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.get(), "7");
}

#[tokio::test]
async fn non_zero_exit_is_a_handler_error_with_the_stderr_tail() {
    let err = go(
        &sh("echo first >&2; echo 'bad input' >&2; exit 3"),
        "{}",
        Duration::from_secs(10),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert_eq!(err.message, "exit status 3: first\nbad input");

    // Only the tail is kept.
    let mut c = sh("head -c 100000 /dev/zero | tr '\\0' x >&2; echo THE-END >&2; exit 1");
    c.stderr_tail_bytes = 32;
    let err = go(&c, "{}", Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message.starts_with("exit status 1: …x"),
        "{}",
        err.message
    );
    assert!(err.message.ends_with("THE-END"), "{}", err.message);
    assert!(err.message.len() < 64, "{}", err.message);
}

#[tokio::test]
async fn the_environment_is_scrubbed() {
    let mut c = cfg(&["/usr/bin/env"]);
    c.env_allow = vec![
        "PATH".into(),
        // Even if listed (validation refuses this), the worker's keys never pass.
        "DROVER_KEYS".into(),
        "DROVER_PASSWORD".into(),
        "NOT_SET_ANYWHERE_XYZ".into(),
    ];
    c.env = BTreeMap::from([("GREETING".to_owned(), Secret::new("hi there"))]);
    let out = go(&c, "{}", Duration::from_secs(10)).await.unwrap();
    let text: String = serde_json::from_str(out.get()).unwrap();
    assert!(
        !text.contains(FAKE_KEYS) && !text.contains(FAKE_SECRET),
        "leak: {text}"
    );
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    let mut expected = vec!["GREETING", "PATH"];
    expected.extend(IDENTITY_NAMES);
    expected.sort_unstable();
    assert_eq!(names, expected, "{text}");
    assert!(text.contains("GREETING=hi there\n"));
    assert!(text.contains(&format!("PATH={}\n", std::env::var("PATH").unwrap())));

    // No allow-list at all: only the attempt's identity.
    let out = go(&cfg(&["/usr/bin/env"]), "{}", Duration::from_secs(10))
        .await
        .unwrap();
    let text: String = serde_json::from_str(out.get()).unwrap();
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    assert_eq!(names, IDENTITY_NAMES, "{text}");
}

#[tokio::test]
async fn the_attempt_identity_is_passed_and_cannot_be_spoofed() {
    setup();
    let mut c = cfg(&["/usr/bin/env"]);
    // The configuration tries to set (and to copy from the worker) identity variables.
    c.env = BTreeMap::from([
        ("DROVER_TASK_ID".to_owned(), Secret::new("spoofed")),
        ("DROVER_SHARD_INDEX".to_owned(), Secret::new("99")),
    ]);
    c.env_allow = vec!["DROVER_WORKER_ID".into(), "DROVER_SHARD_TOTAL".into()];
    let env_of = |out: Box<RawValue>| -> BTreeMap<String, String> {
        let text: String = serde_json::from_str(out.get()).unwrap();
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let expected_plain = BTreeMap::from(
        [
            ("DROVER_TASK_ID", "t-1"),
            ("DROVER_TASK_TYPE", "resize"),
            ("DROVER_QUEUE", "images"),
            ("DROVER_ATTEMPT", "3"),
            ("DROVER_WORKER_ID", "w-7"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );

    // Not a shard: no shard variables at all, not even the configured one.
    let out = run(
        &c,
        &payload("{}"),
        &identity(None),
        Instant::now() + Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(env_of(out), expected_plain);

    // A shard: both shard variables, from the task.
    let out = run(
        &c,
        &payload("{}"),
        &identity(Some(ShardInfo { index: 2, total: 8 })),
        Instant::now() + Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut expected = expected_plain.clone();
    expected.insert("DROVER_SHARD_INDEX".into(), "2".into());
    expected.insert("DROVER_SHARD_TOTAL".into(), "8".into());
    assert_eq!(env_of(out), expected);
    assert_eq!(IDENTITY_ENV.len(), expected.len());
}

#[tokio::test]
async fn a_fresh_working_directory_is_empty_private_and_removed() {
    let out = go(
        &sh("pwd; ls -A | wc -l; stat -c %a .; echo data > made-here"),
        "{}",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let text: String = serde_json::from_str(out.get()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let dir = PathBuf::from(lines[0]);
    assert_ne!(dir, std::env::current_dir().unwrap());
    assert!(
        dir.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("drover-exec-")
    );
    assert_eq!(lines[1].trim(), "0", "the directory was not empty");
    assert_eq!(lines[2], "700");
    assert!(!dir.exists(), "{} was not removed", dir.display());

    // Two runs never share a directory.
    let a = go(&sh("pwd"), "{}", Duration::from_secs(10)).await.unwrap();
    let b = go(&sh("pwd"), "{}", Duration::from_secs(10)).await.unwrap();
    assert_ne!(a.get(), b.get());
}

#[tokio::test]
async fn a_fixed_working_directory_is_used_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = sh("pwd; echo data > kept");
    c.cwd = fixed(dir.path());
    let out = go(&c, "{}", Duration::from_secs(10)).await.unwrap();
    let text: String = serde_json::from_str(out.get()).unwrap();
    assert_eq!(Path::new(text.trim()), dir.path().canonicalize().unwrap());
    assert!(dir.path().join("kept").exists());
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    // The leader forks a grandchild that sleeps forever, then sleeps itself.
    let mut c = sh("sleep 1000 & echo $! > pids; echo $$ >> pids; sleep 1000");
    c.cwd = fixed(dir.path());
    let started = Instant::now();
    let err = go(&c, "{}", Duration::from_millis(700)).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind, ErrorKind::Timeout, "{}", err.message);
    assert!(err.message.contains("SIGTERM"), "{}", err.message);
    assert!(
        took < Duration::from_millis(700 + 300 + 1_000),
        "took {took:?}"
    );
    let pids = read_pids(&dir.path().join("pids"));
    assert_eq!(pids.len(), 2, "pids: {pids:?}");
    // pids[1] is the leader, so also the process group id.
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn a_group_that_ignores_sigterm_gets_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = sh("trap '' TERM; sleep 1000 & echo $! > pids; echo $$ >> pids; sleep 1000");
    c.cwd = fixed(dir.path());
    c.timeout_grace_ms = 400;
    let started = Instant::now();
    let err = go(&c, "{}", Duration::from_millis(500)).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(
        err.message.contains("SIGKILL after 400 ms"),
        "{}",
        err.message
    );
    assert!(
        took >= Duration::from_millis(900),
        "grace not honoured: {took:?}"
    );
    assert!(took < Duration::from_millis(2_500), "took {took:?}");
    assert_all_gone(&read_pids(&dir.path().join("pids"))).await;
}

#[tokio::test]
async fn cancel_ends_the_run_promptly_and_kills_the_group() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut c = sh("sleep 1000 & echo $! > pids; echo $$ >> pids; sleep 1000");
    c.cwd = fixed(dir.path());
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            run(
                &c,
                &payload("{}"),
                &identity(None),
                Instant::now() + Duration::from_secs(60),
                &cancel,
            )
            .await
        })
    };
    let pids = wait_for_pids(&dir.path().join("pids"), 2).await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let err = task.await.unwrap().unwrap_err();
    let took = cancelled_at.elapsed();
    assert_eq!(err.kind, ErrorKind::Cancelled, "{}", err.message);
    // `sleep` dies on SIGTERM: no grace needed.
    assert!(took < Duration::from_millis(250), "took {took:?}");
    assert_all_gone(&pids).await;

    // Cancelled before it starts: nothing runs.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let err = run(
        &sh("echo ran"),
        &payload("{}"),
        &identity(None),
        Instant::now() + Duration::from_secs(5),
        &cancel,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Cancelled);
}

#[tokio::test]
async fn dropping_the_run_kills_the_group() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut c = sh("sleep 1000 & echo $! > pids; echo $$ >> pids; sleep 1000");
    c.cwd = fixed(dir.path());
    let task = tokio::spawn(async move {
        run(
            &c,
            &payload("{}"),
            &identity(None),
            Instant::now() + Duration::from_secs(60),
            &CancellationToken::new(),
        )
        .await
    });
    let pids = wait_for_pids(&dir.path().join("pids"), 2).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn background_processes_do_not_outlive_a_successful_run() {
    let dir = tempfile::tempdir().unwrap();
    // The background sleep keeps stdout open; the run must still end at the leader's exit.
    let mut c = sh("sleep 1000 & echo $! > pids; echo $$ >> pids; echo done");
    c.cwd = fixed(dir.path());
    let started = Instant::now();
    let out = go(&c, "{}", Duration::from_secs(30)).await.unwrap();
    assert_eq!(out.get(), r#""done\n""#);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_all_gone(&read_pids(&dir.path().join("pids"))).await;
}

#[tokio::test]
async fn cpu_limit_kills_with_sigxcpu() {
    let mut c = sh("while :; do :; done");
    c.cpu_secs = Some(1);
    let started = Instant::now();
    let err = go(&c, "{}", Duration::from_secs(20)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Killed, "{}", err.message);
    assert!(
        err.message.starts_with("killed by SIGXCPU (24)"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("CPU time limit of 1 s"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Role switch for [`memory_limit_kills_the_process`]: set in the child it starts.
const ALLOC_ROLE: &str = "DROVER_EXEC_TEST_ALLOCATE";

/// The memory limit: this same test binary is started as the `exec` program, in the role of a
/// native program that allocates 1 GiB under a 128 MiB `RLIMIT_AS`. The allocation fails and
/// Rust aborts (SIGABRT), which must come back as `killed`.
#[test]
fn memory_limit_kills_the_process() {
    if std::env::var_os(ALLOC_ROLE).is_some() {
        let v = vec![1u8; 1 << 30];
        // Only reached if the limit did not hold; the parent then sees exit status 0.
        std::process::exit(i32::from(v[v.len() - 1]) - 1);
    }
    let exe = std::env::current_exe().unwrap();
    let mut c = cfg(&[
        exe.to_str().unwrap(),
        "--exact",
        "exec::tests::memory_limit_kills_the_process",
        "--test-threads=1",
        "--nocapture",
    ]);
    c.memory_mb = 128;
    c.env = BTreeMap::from([(ALLOC_ROLE.to_owned(), Secret::new("1"))]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(go(&c, "{}", Duration::from_secs(30)))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Killed, "{}", err.message);
    assert!(
        err.message.starts_with("killed by SIGABRT (6)"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("memory limit of 128 MiB"),
        "{}",
        err.message
    );
    // The program's own last words are in the stderr tail.
    assert!(
        err.message
            .contains("memory allocation of 1073741824 bytes failed"),
        "{}",
        err.message
    );

    // Without the tight limit the same program gets its memory.
    c.memory_mb = 4 * 1024;
    let out = rt.block_on(go(&c, "{}", Duration::from_secs(30)));
    assert!(out.is_ok(), "{out:?}");
}

#[tokio::test]
async fn too_much_stdout_kills_the_group_and_fails() {
    let mut c = cfg(&["yes"]);
    c.max_output_bytes = 1000;
    let started = Instant::now();
    let err = go(&c, "{}", Duration::from_secs(20)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message.contains("max_output_bytes (1000 bytes)"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Exactly at the cap is fine.
    let mut c = sh("head -c 1000 /dev/zero | tr '\\0' a");
    c.max_output_bytes = 1000;
    let out = go(&c, "{}", Duration::from_secs(10)).await.unwrap();
    assert_eq!(out.get().len(), 1002);
}

#[tokio::test]
async fn a_result_an_outcome_cannot_carry_fails_the_attempt() {
    use drover_shared::outcome::{MAX_OUTCOME_MESSAGE_BYTES, MAX_RESULT_BYTES};
    // 100,000 control bytes are within a 1 MiB output cap, but escaped as a JSON string
    // ("\u0001" each) they are 600,002 bytes: more than one outcome message holds.
    let mut c = sh("head -c 100000 /dev/zero | tr '\\0' '\\1'");
    c.max_output_bytes = 1024 * 1024;
    let err = go(&c, "{}", Duration::from_secs(20)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message.contains("600002 bytes as JSON")
            && err.message.contains(&format!("{MAX_RESULT_BYTES} bytes")),
        "{}",
        err.message
    );
    const { assert!(MAX_RESULT_BYTES < MAX_OUTCOME_MESSAGE_BYTES) };

    // The largest result that fits is returned whole: a JSON string of MAX_RESULT_BYTES.
    let n = MAX_RESULT_BYTES - 2;
    let mut c = sh(&format!(
        "printf '\"'; head -c {n} /dev/zero | tr '\\0' a; printf '\"'"
    ));
    c.max_output_bytes = 1024 * 1024;
    let out = go(&c, "{}", Duration::from_secs(20)).await.unwrap();
    assert_eq!(out.get().len(), MAX_RESULT_BYTES);
}

#[tokio::test]
async fn programs_that_cannot_start_are_handler_errors() {
    let err = go(&cfg(&["no-such-program-xyz"]), "{}", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message.contains("not found in the worker's PATH"),
        "{}",
        err.message
    );

    let err = go(&cfg(&["/nonexistent/prog"]), "{}", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);
    assert!(
        err.message.starts_with("cannot start /nonexistent/prog"),
        "{}",
        err.message
    );

    let err = go(&cfg(&[]), "{}", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);

    let mut c = sh("true");
    c.cwd = CwdPolicy::Fixed(PathBuf::from("/nonexistent/dir"));
    let err = go(&c, "{}", Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Handler);

    let err = go(&sh("true"), "{}", Duration::ZERO).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout);
}

#[tokio::test]
async fn killed_by_a_signal_names_it() {
    let err = go(&sh("kill -USR1 $$"), "{}", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Killed);
    assert_eq!(err.message, "killed by SIGUSR1 (10)");
}
