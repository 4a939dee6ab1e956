//! Dispatch benchmark (issue 3): tasks per second from intake to durable envelopes, next to raw
//! JetStream publish throughput measured on the same server in the same run, and leader
//! fail-over times over repeated SIGKILL and SIGTERM trials.
//!
//! `cargo bench -p drover-tests --bench dispatch` (release binaries, one local nats-server, file
//! storage). Environment: `DROVER_BENCH_TASKS` (default 50,000), `DROVER_BENCH_TRIALS`
//! (default 20; 0 skips the fail-over trials). Prints numbers; asserts nothing about speed.

use async_nats::HeaderMap;
use bytes::Bytes;
use drover_shared::bench::{
    PAYLOAD_BYTES, WINDOW, js_context, noop_task, percentile, publish_all, raw_baseline,
    record_floor,
};
use drover_shared::names::Names;
use drover_tests::observe::{leader_value, wait_leader};
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use futures::StreamExt;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A release `drover-dispatcher`; `DROVER_DISPATCHER__*` and `DROVER_TOPOLOGY__*` variables of
/// the bench's own environment pass through, for trying settings.
fn dispatcher(name: &str, url: &str, prefix: &str) -> DroverProcess {
    let mut env = vec![
        ("DROVER_KEYS", TEST_KEYS.to_owned()),
        ("DROVER_LOG", "warn".to_owned()),
    ];
    let passed: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("DROVER_DISPATCHER__") || k.starts_with("DROVER_TOPOLOGY__"))
        .collect();
    env.extend(passed.iter().map(|(k, v)| (k.as_str(), v.clone())));
    DroverProcess::start(
        name,
        "drover-dispatcher",
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

/// Counts tasks in envelopes seen on `<prefix>.work.>` until `n` arrived; returns the time from
/// `since` to the last one.
async fn await_dispatched(sub: &mut async_nats::Subscriber, n: usize, since: Instant) -> Duration {
    let mut seen = 0;
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(120), sub.next())
            .await
            .expect("envelopes keep coming")
            .expect("subscription open");
        seen += count_of(m.headers.as_ref());
    }
    since.elapsed()
}

fn count_of(headers: Option<&HeaderMap>) -> usize {
    headers
        .and_then(|h| h.get("Drover-Count"))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

struct Row {
    name: String,
    rate: f64,
    ratio: Option<f64>,
    note: String,
}

#[tokio::main]
async fn main() {
    let n = env_usize("DROVER_BENCH_TASKS", 50_000);
    let trials = env_usize("DROVER_BENCH_TRIALS", 20);
    // Build the release binaries before any clock starts.
    drover_tests::drover_bin("drover-dispatcher");
    let server = NatsServer::start().await;
    let url = server.client_url();
    let client = server.connect().await;
    let js = js_context(client.clone());
    let mut rows = Vec::new();

    // Raw JetStream, the same 200-byte bodies on scratch streams (drover_shared::bench, also
    // what `drover bench` runs): pipelined publish, and publish + pull-consume + ack
    // concurrently on a work queue (one queue hop, the floor under any dispatcher that consumes
    // an intake).
    let bodies: Vec<Bytes> = (0..n)
        .map(|i| serde_json::to_vec(&noop_task(i, None)).unwrap().into())
        .collect();
    let raw = raw_baseline(&js, "bench_raw", &bodies, |_, _| {})
        .await
        .expect("raw baseline");
    let raw_rate = raw.publish_rate;
    let consume_rate = raw.publish_consume_rate;
    rows.push(Row {
        name: format!("raw JetStream publish ({PAYLOAD_BYTES} B, {WINDOW} acks in flight)"),
        rate: raw_rate,
        ratio: None,
        note: format!("{n} msgs"),
    });
    rows.push(Row {
        name: "raw JetStream publish + pull-consume + ack (concurrent, work queue)".into(),
        rate: consume_rate,
        ratio: Some(consume_rate / raw_rate),
        note: format!("{n} msgs"),
    });
    // The floor under any dispatcher that keeps SPEC's duplicate check: the same, plus a
    // record create per message before its ack (no envelopes, no validation, no crypto).
    let floor = record_floor(&js, "bench_floor", &bodies, 1, false, |_, _| {})
        .await
        .expect("record floor");
    rows.push(Row {
        name: "raw floor: publish + consume + ack + a record create per task".into(),
        rate: floor,
        ratio: Some(floor / raw_rate),
        note: format!("{n} msgs"),
    });

    // Single submits, published while the leader dispatches: submit → durable envelope.
    {
        let names = Names::new("bsingle").unwrap();
        let _d = dispatcher("bs1", &url, names.prefix());
        wait_leader(&js, &names, None, Duration::from_secs(30)).await;
        let mut sub = client.subscribe(names.subject("work.>")).await.unwrap();
        client.flush().await.unwrap();
        let started = Instant::now();
        let subject = names.submit_subject("default");
        let publish = tokio::spawn({
            let js = js.clone();
            let bodies = bodies.clone();
            async move {
                publish_all(&js, &subject, bodies, |_| {})
                    .await
                    .expect("publish")
            }
        });
        let took = await_dispatched(&mut sub, n, started).await;
        let published = publish.await.unwrap();
        let rate = n as f64 / took.as_secs_f64();
        rows.push(Row {
            name: "dispatch, single submits (concurrent submit + dispatch)".into(),
            rate,
            ratio: Some(rate / raw_rate),
            note: format!("{n} tasks in {took:.2?}; submits took {published:.2?}"),
        });
    }

    // The same, from a backlog: the intake is full before the first leader starts.
    {
        let names = Names::new("bbacklog").unwrap();
        let first = dispatcher("bb0", &url, names.prefix());
        wait_leader(&js, &names, None, Duration::from_secs(30)).await;
        first.terminate(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish_all(
            &js,
            &names.submit_subject("default"),
            bodies.clone(),
            |_| {},
        )
        .await
        .expect("publish");
        let mut sub = client.subscribe(names.subject("work.>")).await.unwrap();
        client.flush().await.unwrap();
        let _d = dispatcher("bb1", &url, names.prefix());
        // Clock from the first envelope: leader start-up is the fail-over figure's business.
        let first_env = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        let first_count = count_of(first_env.headers.as_ref());
        let took = await_dispatched(&mut sub, n - first_count, started).await;
        let rate = (n - first_count) as f64 / took.as_secs_f64();
        rows.push(Row {
            name: "dispatch, single submits (draining a backlog)".into(),
            rate,
            ratio: Some(rate / raw_rate),
            note: format!("{n} tasks, {took:.2?} after the first envelope"),
        });
    }

    // Array submits of 100 tasks.
    {
        let names = Names::new("barray").unwrap();
        let _d = dispatcher("ba1", &url, names.prefix());
        wait_leader(&js, &names, None, Duration::from_secs(30)).await;
        let arrays: Vec<Bytes> = (0..n / 100)
            .map(|a| {
                let arr: Vec<_> = (0..100).map(|j| noop_task(a * 100 + j, None)).collect();
                serde_json::to_vec(&arr).unwrap().into()
            })
            .collect();
        let mut sub = client.subscribe(names.subject("work.>")).await.unwrap();
        client.flush().await.unwrap();
        let started = Instant::now();
        let subject = names.submit_subject("default");
        let publish = tokio::spawn({
            let js = js.clone();
            async move {
                publish_all(&js, &subject, arrays, |_| {})
                    .await
                    .expect("publish")
            }
        });
        let took = await_dispatched(&mut sub, n / 100 * 100, started).await;
        publish.await.unwrap();
        let rate = (n / 100 * 100) as f64 / took.as_secs_f64();
        rows.push(Row {
            name: "dispatch, arrays of 100 (concurrent submit + dispatch)".into(),
            rate,
            ratio: Some(rate / raw_rate),
            note: format!("{} tasks in {took:.2?}", n / 100 * 100),
        });
    }

    println!();
    println!("| measurement | tasks/s | × raw publish | × raw publish+consume | detail |");
    println!("|---|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {} | {:.2} | {} |",
            r.name,
            r.rate,
            r.ratio.map_or("—".into(), |x| format!("{x:.2}")),
            r.rate / consume_rate,
            r.note
        );
    }

    // Fail-over: three replicas, a steady trickle of tasks, kill the leader, time until the
    // first envelope of the next term.
    let signals: &[(&str, i32)] = if trials == 0 {
        &[]
    } else {
        &[("SIGKILL", libc::SIGKILL), ("SIGTERM", libc::SIGTERM)]
    };
    for &(label, signal) in signals {
        let names = Names::new(&format!("bfail{}", signal)).unwrap();
        let mut fleet: Vec<DroverProcess> = (0..3)
            .map(|i| dispatcher(&format!("f{signal}-{i}"), &url, names.prefix()))
            .collect();
        let mut spawned = 3;
        let mut leader = wait_leader(&js, &names, None, Duration::from_secs(30)).await;
        let mut sub = client.subscribe(names.subject("work.>")).await.unwrap();
        client.flush().await.unwrap();
        let trickle = tokio::spawn({
            let js = js.clone();
            let subject = names.submit_subject("default");
            async move {
                let mut i = 0usize;
                loop {
                    let body: Bytes = serde_json::to_vec(&noop_task(i, None)).unwrap().into();
                    let _ = js.publish(subject.clone(), body).await;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
        let mut times = Vec::with_capacity(trials);
        for _ in 0..trials {
            // Let the current leader settle, and know its epoch.
            tokio::time::sleep(Duration::from_millis(700)).await;
            let epoch_now = leader_value(&js, &names).await.expect("a leader")["epoch"]
                .as_u64()
                .expect("the leader value carries its epoch");
            let victim = fleet.iter().position(|d| d.name() == leader).unwrap();
            let killed_at = Instant::now();
            fleet[victim].signal(signal);
            let took = loop {
                let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
                    .await
                    .expect("a new leader dispatches")
                    .unwrap();
                let epoch = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Drover-Epoch"))
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .unwrap_or(0);
                if epoch > epoch_now {
                    break killed_at.elapsed();
                }
            };
            times.push(took);
            let old = fleet.remove(victim);
            old.terminate(Duration::from_secs(5));
            spawned += 1;
            fleet.push(dispatcher(
                &format!("f{signal}-{spawned}"),
                &url,
                names.prefix(),
            ));
            leader = wait_leader(&js, &names, Some(&leader), Duration::from_secs(10)).await;
        }
        trickle.abort();
        times.sort();
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        println!(
            "fail-over on {label}, {trials} trials: median {}, p99 {}, min {}, max {}; all: {:?}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(times[0]),
            ms(times[times.len() - 1]),
            times.iter().map(|t| t.as_millis()).collect::<Vec<_>>()
        );
    }
    drop(server);
}
