//! Worker benchmark (issue 4): `noop` throughput per worker process with 1 and 3 workers, the
//! per-task cost it implies, and the resident memory of an idle worker and of one running 1,000
//! concurrent `sleep` tasks.
//!
//! `cargo bench -p drover-tests --bench worker` (release binaries, one local nats-server, one
//! dispatcher). The backlog is dispatched into `DROVER_WORK` before any worker starts; the clock
//! runs from the first outcome message to the last, so worker start-up and assignment are not
//! counted. Environment: `DROVER_BENCH_TASKS` (default 50,000). Asserts nothing about speed.

use async_nats::jetstream;
use drover_shared::bench::rss_mib;
use drover_shared::names::Names;
use drover_tests::observe::wait_leader;
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use futures::StreamExt;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn component(
    bin: &str,
    name: &str,
    url: &str,
    prefix: &str,
    extra: &[(&str, String)],
) -> DroverProcess {
    let mut env = vec![
        ("DROVER_KEYS", TEST_KEYS.to_owned()),
        ("DROVER_LOG", "warn".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    DroverProcess::start(
        name,
        bin,
        &[
            "--nats-url".into(),
            url.into(),
            "--id".into(),
            name.into(),
            "--prefix".into(),
            prefix.into(),
        ],
        &env,
    )
}

/// Submits `n` tasks built by `task` in arrays of 100 and waits until all sit in `DROVER_WORK`.
async fn backlog(
    js: &jetstream::Context,
    names: &Names,
    n: usize,
    task: impl Fn(usize) -> serde_json::Value,
) {
    let mut acks = Vec::new();
    for a in 0..n.div_ceil(100) {
        let arr: Vec<_> = (a * 100..((a + 1) * 100).min(n)).map(&task).collect();
        acks.push(
            js.publish(
                names.submit_subject("default"),
                serde_json::to_vec(&arr).unwrap().into(),
            )
            .await
            .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    let submit = js.get_stream(names.submit_stream()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while submit.get_info().await.unwrap().state.messages > 0 {
        assert!(Instant::now() < deadline, "the backlog was not dispatched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts outcomes on `<prefix>.outcome.>` until `n`; returns (first message → last message).
async fn outcomes(sub: &mut async_nats::Subscriber, n: usize) -> Duration {
    let mut seen = 0;
    let mut first = None;
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(120), sub.next())
            .await
            .expect("outcomes keep coming")
            .unwrap();
        first.get_or_insert_with(Instant::now);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        seen += v["outcomes"].as_array().map_or(0, Vec::len);
    }
    first.map_or(Duration::ZERO, |f| f.elapsed())
}

#[tokio::main]
async fn main() {
    let n = env_usize("DROVER_BENCH_TASKS", 50_000);
    drover_tests::drover_bin("drover-worker");
    let server = NatsServer::start().await;
    let url = server.client_url();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    println!("| measurement | value |");
    println!("|---|---:|");

    for workers in [1usize, 3] {
        let names = Names::new(&format!("bw{workers}")).unwrap();
        let _d = component(
            "drover-dispatcher",
            &format!("bw{workers}-d"),
            &url,
            names.prefix(),
            &[],
        );
        wait_leader(&js, &names, None, Duration::from_secs(30)).await;
        backlog(
            &js,
            &names,
            n,
            |i| serde_json::json!({"type":"noop","payload":{"i":i}}),
        )
        .await;
        let mut sub = client.subscribe(names.subject("outcome.>")).await.unwrap();
        client.flush().await.unwrap();
        let fleet: Vec<DroverProcess> = (0..workers)
            .map(|i| {
                component(
                    "drover-worker",
                    &format!("bw{workers}-w{i}"),
                    &url,
                    names.prefix(),
                    &[],
                )
            })
            .collect();
        let took = outcomes(&mut sub, n).await;
        let rate = n as f64 / took.as_secs_f64();
        println!(
            "| noop throughput, {workers} worker(s) | {rate:.0} tasks/s ({:.0} per worker; {n} tasks in {took:.2?}) |",
            rate / workers as f64
        );
        println!(
            "| worker time per task, {workers} worker(s) (wall time × workers ÷ tasks) | {:.1} µs |",
            took.as_secs_f64() * 1e6 * workers as f64 / n as f64
        );
        drop(fleet);
    }

    // Memory: idle, then 1,000 concurrent sleeps.
    let names = Names::new("bmem").unwrap();
    let _d = component("drover-dispatcher", "bmem-d", &url, names.prefix(), &[]);
    wait_leader(&js, &names, None, Duration::from_secs(30)).await;
    let w = component(
        "drover-worker",
        "bmem-w",
        &url,
        names.prefix(),
        &[("DROVER_WORKER__CONCURRENCY", "2000".into())],
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = w.pid().expect("worker runs");
    println!(
        "| worker RSS, idle | {:.1} MiB |",
        rss_mib(pid).unwrap_or(f64::NAN)
    );
    let mut sub = client.subscribe(names.subject("outcome.>")).await.unwrap();
    client.flush().await.unwrap();
    backlog(
        &js,
        &names,
        1_000,
        |i| serde_json::json!({"type":"sleep","payload":{"ms":4000},"id":format!("sleep-{i}")}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let busy = rss_mib(pid).unwrap_or(f64::NAN);
    let kv = js.get_key_value(names.bucket("workers")).await.unwrap();
    let running = kv
        .get("bmem-w")
        .await
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
        .and_then(|v| v["running"].as_u64())
        .unwrap_or(0);
    println!("| worker RSS, {running} `sleep` tasks running at once | {busy:.1} MiB |");
    outcomes(&mut sub, 1_000).await;
}
