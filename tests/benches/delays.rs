//! Delay precision benchmark (issue #6): how late delayed tasks start, with 1,000 and 10,000
//! (and, with `DROVER_BENCH_DELAYED=1000,10000,100000`, more) delayed tasks pending at once.
//!
//! `cargo bench -p drover-tests --bench delays` (release binaries; `--profile dev` runs the debug
//! ones). Per count: a fresh local nats-server, one dispatcher, two `noop` workers; the tasks are
//! submitted with `run_at` spread evenly over `DROVER_BENCH_SPREAD_MS` (default 10,000 ms, at
//! least 1 ms per task) after
//! a lead time long enough to submit them all, so they are all pending before the first is due.
//! Lateness = the record's `started_at` (stamped by the worker as the attempt starts) − `run_at`.
//! Prints p50 / p99 / max; asserts only that every task ran and none early.
//!
//! `DROVER_BENCH_PENDING=100000,1000000` (counts, cumulative) then measures memory with that
//! many delayed tasks pending (due in an hour, submitted as arrays of 100; no workers): the
//! leader's RSS, the nats-server's RSS and the store directory's size at 0 pending and at each
//! count. `DROVER_BENCH_DELAYED=none` skips the precision runs.

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use drover_shared::names::Names;
use drover_shared::task::{TaskRecord, TaskState, format_time};
use drover_tests::observe::wait_leader;
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn component(bin: &str, name: &str, url: &str, extra: &[(&str, String)]) -> DroverProcess {
    let mut env = vec![
        ("DROVER_KEYS", TEST_KEYS.to_owned()),
        ("DROVER_LOG", "warn".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    DroverProcess::start(
        name,
        bin,
        &["--nats-url".into(), url.into(), "--id".into(), name.into()],
        &env,
    )
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs `n` delayed tasks spread over `spread_ms`; returns sorted lateness in ms.
async fn run(n: usize, spread_ms: i64) -> Vec<i64> {
    let server = NatsServer::start().await;
    let url = server.client_url();
    let names = Names::default();
    let _d = component(
        "drover-dispatcher",
        "d1",
        &url,
        &[("DROVER_QUEUES__DEFAULT__PARTITIONS", "16".into())],
    );
    let client = server.connect().await;
    let js = jetstream::new(client);
    wait_leader(&js, &names, None, Duration::from_secs(30)).await;
    let worker_args = [("DROVER_WORKER__CONCURRENCY", "512".to_owned())];
    let _w1 = component("drover-worker", "w1", &url, &worker_args);
    let _w2 = component("drover-worker", "w2", &url, &worker_args);

    let kv = js.get_key_value(names.bucket("tasks")).await.unwrap();
    let mut watch = kv.watch_with_history(">").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<TaskRecord>();
    tokio::spawn(async move {
        while let Some(Ok(e)) = watch.next().await {
            if let Ok(r) = serde_json::from_slice::<TaskRecord>(&e.value)
                && r.state.is_terminal()
                && tx.send(r).is_err()
            {
                break;
            }
        }
    });

    // Lead time: 1 ms per task to take them in, plus 5 s.
    let lead_ms = 5_000 + n as i64;
    let base = Utc::now().timestamp_millis() + lead_ms;
    let due: Vec<i64> = (0..n)
        .map(|i| base + (i as i64 * spread_ms) / n as i64)
        .collect();
    let started = Instant::now();
    let mut acks = Vec::new();
    for (c, chunk) in due.chunks(100).enumerate() {
        let tasks: Vec<serde_json::Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, &t)| {
                let at = DateTime::from_timestamp_millis(t).unwrap();
                serde_json::json!({"type": "noop", "id": format!("t{}", c * 100 + j), "run_at": format_time(&at)})
            })
            .collect();
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("chunk-{c}"));
        acks.push(
            js.publish_with_headers(
                names.submit_subject("default"),
                h,
                serde_json::to_vec(&tasks).unwrap().into(),
            )
            .await
            .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    let submitted = started.elapsed();
    // How many timers were stored (pending) when the first task fell due.
    let delayed = js.get_stream(names.delayed_stream()).await.unwrap();
    let mut pending_at_first = 0;
    while Utc::now().timestamp_millis() < base {
        let mut s = delayed.clone();
        pending_at_first = s.info().await.map(|i| i.state.messages).unwrap_or(0);
        if pending_at_first as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut done: HashMap<String, TaskRecord> = HashMap::new();
    let deadline = Instant::now()
        + Duration::from_millis((base - Utc::now().timestamp_millis()).max(0) as u64)
        + Duration::from_millis(spread_ms as u64)
        + Duration::from_secs(60);
    while done.len() < n {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(r)) => {
                done.insert(r.id.clone(), r);
            }
            _ => break,
        }
    }
    assert_eq!(done.len(), n, "not every delayed task finished");
    let mut late: Vec<i64> = due
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let r = &done[&format!("t{i}")];
            assert_eq!(r.state, TaskState::Succeeded);
            r.started_at.unwrap().timestamp_millis() - t
        })
        .collect();
    late.sort_unstable();
    assert!(late[0] >= 0, "a task started {} ms early", -late[0]);
    eprintln!(
        "  {n} tasks published to the intake in {submitted:?} (lead {lead_ms} ms); {pending_at_first} timers stored before the first was due"
    );
    late
}

/// Size of everything under `dir`, MiB.
fn du_mib(dir: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if meta.is_dir() {
            std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0)
        } else {
            // Allocated blocks, as `du` counts them.
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512
        }
    }
    walk(dir) as f64 / (1024.0 * 1024.0)
}

/// Memory with `levels` (cumulative counts) delayed tasks pending, due in an hour.
async fn pending(levels: &[usize]) {
    let server = NatsServer::start().await;
    let url = server.client_url();
    let names = Names::default();
    let d = component(
        "drover-dispatcher",
        "d1",
        &url,
        &[("DROVER_QUEUES__DEFAULT__PARTITIONS", "16".into())],
    );
    let client = server.connect().await;
    let js = drover_shared::bench::js_context(client);
    wait_leader(&js, &names, None, Duration::from_secs(30)).await;
    let delayed = js.get_stream(names.delayed_stream()).await.unwrap();
    let report = |label: String| {
        let leader = d
            .pid()
            .and_then(drover_shared::bench::rss_mib)
            .unwrap_or(0.0);
        let nats = server
            .pid()
            .and_then(drover_shared::bench::rss_mib)
            .unwrap_or(0.0);
        let disk = du_mib(&server.store_dir());
        println!(
            "  {label:>9} pending: leader RSS {leader:.1} MiB, nats-server RSS {nats:.1} MiB, store {disk:.1} MiB"
        );
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    report("0".into());
    let due = Utc::now() + chrono::Duration::hours(1);
    let at = format_time(&due);
    let mut submitted = 0usize;
    for &level in levels {
        let started = Instant::now();
        let from = submitted;
        let mut acks = std::collections::VecDeque::new();
        while submitted < level {
            let n = (level - submitted).min(100);
            let tasks: Vec<serde_json::Value> = (submitted..submitted + n)
                .map(|i| serde_json::json!({"type": "noop", "id": format!("p{i}"), "run_at": at}))
                .collect();
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("pending-{submitted}"));
            acks.push_back(
                js.publish_with_headers(
                    names.submit_subject("default"),
                    h,
                    serde_json::to_vec(&tasks).unwrap().into(),
                )
                .await
                .unwrap(),
            );
            if acks.len() >= 64 {
                acks.pop_front().unwrap().await.unwrap();
            }
            submitted += n;
        }
        for a in acks {
            a.await.unwrap();
        }
        // Until the leader has taken every task in: one timer each in DROVER_DELAYED.
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let mut s = delayed.clone();
            let count = s.info().await.map(|i| i.state.messages).unwrap_or(0);
            if count as usize >= level {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {level} timers stored"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        report(level.to_string());
        println!(
            "            (taken in: {:.0} tasks/s)",
            (level - from) as f64 / took.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    let pending_levels: Vec<usize> = std::env::var("DROVER_BENCH_PENDING")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_default();
    let counts: Vec<usize> = std::env::var("DROVER_BENCH_DELAYED")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000]);
    let spread_ms: i64 = std::env::var("DROVER_BENCH_SPREAD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    println!(
        "delay precision ({} build), tasks spread over {spread_ms} ms:",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    for n in counts {
        // At least 1 ms per task, so the fleet's throughput is not what is measured.
        let spread_ms = spread_ms.max(n as i64);
        let late = run(n, spread_ms).await;
        println!(
            "  {n:>7} pending delayed tasks over {spread_ms} ms: lateness p50 {} ms, p99 {} ms, max {} ms",
            percentile(&late, 0.5),
            percentile(&late, 0.99),
            late.last().copied().unwrap_or(0)
        );
    }
    if !pending_levels.is_empty() {
        println!("memory with delayed tasks pending (due in 1 h, no workers):");
        pending(&pending_levels).await;
    }
}
