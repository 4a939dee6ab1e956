//! `failover`: three dispatchers and the workers under a steady submit rate
//! (`--failover-rate`, default 2,000 tasks/s); every `--kill-every` s the leader gets SIGKILL
//! (`--trials` times), then SIGTERM (as often). Each trial is the time from the signal to the first
//! envelope on `<prefix>.work.>` stamped with a later epoch (`Drover-Epoch`); the signalled
//! replica is replaced by a fresh one. At the end every submitted task must have succeeded.

use super::BenchArgs;
use super::fleet::{QUEUE, Target, count_outcomes, watch_records};
use super::report::{Row, Section};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use drover_shared::bench::{Summary, noop_task};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a new term may take before the trial fails.
const NEXT_TERM_TIMEOUT: Duration = Duration::from_secs(30);

/// Dispatcher replicas.
const REPLICAS: usize = 3;

/// Runs the scenario (spawned fleets only).
pub(crate) async fn run(target: &Target, args: &BenchArgs) -> anyhow::Result<Section> {
    if !target.is_spawned() {
        bail!("failover signals dispatcher processes: run it with --spawn");
    }
    let mut fleet = target.fleet("fail", REPLICAS, args.workers).await?;
    let names = fleet.names.clone();
    let tag = format!("{}-f", target.run_id);
    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicUsize::new(0));
    let result = async {
        let counter = count_outcomes(
            watch_records(&target.js, &names).await?,
            format!("{tag}-"),
            stop.clone(),
            submitted.clone(),
            Duration::from_secs(30),
        );
        let mut envelopes = target
            .client
            .subscribe(names.subject("work.>"))
            .await
            .context("cannot subscribe to the work subjects")?;
        target.client.flush().await?;
        let load = tokio::spawn(trickle(
            target.js.clone(),
            names.submit_subject(QUEUE),
            tag.clone(),
            args.failover_rate,
            stop.clone(),
            submitted.clone(),
        ));
        let kill_every = Duration::from_secs_f64(args.kill_every);
        let bar = super::progress((2 * args.trials) as u64, "failover trials");
        let mut results = Vec::new();
        let mut last_signal = Instant::now();
        let mut epoch = 0;
        for (label, signal) in [("SIGKILL", libc::SIGKILL), ("SIGTERM", libc::SIGTERM)] {
            let mut times = Vec::with_capacity(args.trials);
            for _ in 0..args.trials {
                tokio::time::sleep_until((last_signal + kill_every).into()).await;
                let leader = fleet
                    .wait_leader(&target.js, epoch, NEXT_TERM_TIMEOUT)
                    .await?;
                epoch = leader.epoch;
                let victim = fleet.take(&leader.id).with_context(|| {
                    format!("the leader {} is not a process of this bench", leader.id)
                })?;
                last_signal = Instant::now();
                victim.signal(signal);
                let took = loop {
                    let m = tokio::time::timeout(NEXT_TERM_TIMEOUT, envelopes.next())
                        .await
                        .with_context(|| {
                            format!("no envelope of a new term {NEXT_TERM_TIMEOUT:?} after {label}")
                        })?
                        .context("the work subscription ended")?;
                    let e = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Drover-Epoch"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    if e > epoch {
                        break last_signal.elapsed();
                    }
                };
                times.push(took.as_secs_f64() * 1e3);
                victim.reap(Duration::from_secs(10)).await;
                fleet.start("drover-dispatcher")?;
                bar.inc(1);
            }
            results.push((label, times));
        }
        bar.finish_and_clear();
        stop.store(true, Ordering::Relaxed);
        load.await??;
        let n = submitted.load(Ordering::Relaxed);
        let (ok, failed) = counter.await??;
        let mut rows = Vec::new();
        let mut detail = serde_json::Map::new();
        for (label, mut times) in results {
            let all = times.clone();
            let Some(s) = Summary::of(&mut times) else {
                continue;
            };
            let (goal, text) = if label == "SIGKILL" {
                (2_000.0, "≤ 2 s")
            } else {
                (300.0, "≤ 300 ms")
            };
            rows.push(Row::plain(
                format!("{label} → next envelope p50"),
                s.p50,
                "ms",
            ));
            rows.push(
                Row::plain(format!("{label} → next envelope p99"), s.p99, "ms")
                    .target(format!("p99 {text}"), s.p99 <= goal),
            );
            detail.insert(
                label.to_lowercase(),
                serde_json::json!({"summary_ms": s, "trials_ms": all}),
            );
        }
        detail.insert("submitted".into(), n.into());
        detail.insert("succeeded".into(), ok.into());
        detail.insert("failed".into(), failed.into());
        detail.insert("rate".into(), args.failover_rate.into());
        Ok::<_, anyhow::Error>(Section {
            scenario: "failover".into(),
            lost: n - ok,
            detail: serde_json::Value::Object(detail),
            rows,
            curves: Vec::new(),
        })
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    fleet.stop().await;
    result
}

/// Submits single `noop` tasks at `rate` per second until `stop`, counting them in `submitted`
/// (ids `<tag>-<i>`). A publish that fails (no PubAck while the server is busy) is retried with the
/// same body, so every counted id was stored.
async fn trickle(
    js: async_nats::jetstream::Context,
    subject: String,
    tag: String,
    rate: u32,
    stop: Arc<AtomicBool>,
    submitted: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Bytes, _)>();
    let acks = tokio::spawn({
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            while let Some((body, ack)) = rx.recv().await {
                let ack: async_nats::jetstream::context::PublishAckFuture = ack;
                if ack.await.is_err() {
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        let stored = match js.publish(subject.clone(), body.clone()).await {
                            Ok(a) => a.await.is_ok(),
                            Err(_) => false,
                        };
                        if stored {
                            break;
                        }
                        if tries >= 10 {
                            bail!("a failover submit was not stored after 10 tries");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Ok(())
        }
    });
    let started = Instant::now();
    let interval = 1.0 / f64::from(rate);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let due = started + Duration::from_secs_f64(i as f64 * interval);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let body = Bytes::from(serde_json::to_vec(&noop_task(
            i,
            Some(&format!("{tag}-{i}")),
        ))?);
        let ack = js.publish(subject.clone(), body.clone()).await?;
        tx.send((body, ack))
            .map_err(|_| anyhow::anyhow!("the PubAck task ended"))?;
        i += 1;
        submitted.store(i, Ordering::Relaxed);
    }
    drop(tx);
    acks.await?
}
