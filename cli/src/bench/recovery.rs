//! `recovery`: a dispatcher and at least three workers; per trial, 12 `sleep` tasks (3 s each)
//! start, the worker holding most of them gets SIGKILL, and each of its tasks is timed from the
//! kill to the `started_at` of its attempt on another worker (from the records; ms precision,
//! taken at the middle of the millisecond). A fresh worker replaces the killed one; every task
//! must still succeed.

use super::BenchArgs;
use super::fleet::{QUEUE, RecordView, Target, wall_ms, watch_records};
use super::report::{Row, Section};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use drover_shared::bench::{Summary, publish_all};
use drover_shared::topology::TopologyConfig;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Tasks started per trial.
const PER_TRIAL: usize = 12;

/// How long each task sleeps.
const SLEEP_MS: u64 = 3_000;

/// Minimum workers: the killed one and at least two to take over.
const MIN_WORKERS: usize = 3;

/// One record revision of a bench task.
struct Seen {
    key: String,
    state: String,
    worker: Option<String>,
    started_ms: Option<i64>,
}

/// Runs the scenario (spawned fleets only).
pub(crate) async fn run(target: &Target, args: &BenchArgs) -> anyhow::Result<Section> {
    if !target.is_spawned() {
        bail!("recovery kills worker processes: run it with --spawn");
    }
    let workers = args.workers.max(MIN_WORKERS);
    let ttl = TopologyConfig::default().worker_ttl();
    let mut fleet = target.fleet("rec", 1, workers).await?;
    let names = fleet.names.clone();
    let tag = format!("{}-r", target.run_id);
    let result = async {
        let mut watch = watch_records(&target.js, &names).await?;
        let (tx, mut events) = mpsc::unbounded_channel();
        let prefix = tag.clone();
        let forward = tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                if !entry.key.starts_with(&prefix) {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<RecordView>(&entry.value) else {
                    continue;
                };
                let seen = Seen {
                    state: v.state.to_owned(),
                    worker: v.worker.map(str::to_owned),
                    started_ms: v.started_ms(),
                    key: entry.key,
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        let bar = super::progress(args.trials as u64, "recovery trials");
        let (mut times, mut lost, mut moved) = (Vec::new(), 0, 0);
        let mut trials = Vec::new();
        for trial in 0..args.trials {
            let ids: Vec<String> = (0..PER_TRIAL)
                .map(|i| format!("{tag}{trial}-{i}"))
                .collect();
            let body: Vec<serde_json::Value> = ids
                .iter()
                .map(|id| serde_json::json!({"type":"sleep","id":id,"payload":{"ms":SLEEP_MS}}))
                .collect();
            publish_all(
                &target.js,
                &names.submit_subject(QUEUE),
                [Bytes::from(serde_json::to_vec(&body)?)],
                |_| {},
            )
            .await?;
            // Every task running, and where.
            let mut running: HashMap<String, String> = HashMap::new();
            let mut done: HashSet<String> = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while running.len() < PER_TRIAL {
                let seen = next(&mut events, deadline).await.with_context(|| {
                    format!("only {} of {PER_TRIAL} sleep tasks started", running.len())
                })?;
                if seen.state == "running"
                    && let Some(w) = seen.worker
                {
                    running.insert(seen.key, w);
                } else if seen.state == "succeeded" {
                    done.insert(seen.key);
                }
            }
            // Tasks that already succeeded are not held by anyone any more: with more tasks in
            // the batch than the worker's concurrency, the first ones finish before the last
            // ones start.
            running.retain(|id, _| !done.contains(id));
            let mut per_worker: HashMap<&str, usize> = HashMap::new();
            for w in running.values() {
                *per_worker.entry(w.as_str()).or_default() += 1;
            }
            let Some((victim, _)) = per_worker.into_iter().max_by_key(|(_, n)| *n) else {
                bail!("no task is running");
            };
            let victim = victim.to_owned();
            let mut held: HashSet<String> = running
                .iter()
                .filter(|(_, w)| **w == victim)
                .map(|(id, _)| id.clone())
                .collect();
            let component = fleet
                .take(&victim)
                .with_context(|| format!("worker {victim} is not a process of this bench"))?;
            let killed_wall = wall_ms();
            let killed = Instant::now();
            component.signal(libc::SIGKILL);
            let held_count = held.len();
            moved += held_count;
            // Each held task starting on another worker.
            let deadline = killed + ttl + Duration::from_secs(60);
            let mut trial_times = Vec::new();
            while !held.is_empty() {
                let Ok(seen) = next(&mut events, deadline).await else {
                    break;
                };
                if seen.state == "succeeded" {
                    done.insert(seen.key.clone());
                    // Finished by the victim just before it died: nothing to restart.
                    if seen.worker.as_deref() == Some(victim.as_str()) {
                        held.remove(&seen.key);
                        continue;
                    }
                }
                let elsewhere = seen.worker.as_deref().is_some_and(|w| w != victim);
                if elsewhere
                    && matches!(seen.state.as_str(), "running" | "succeeded")
                    && held.remove(&seen.key)
                {
                    let ms = seen.started_ms.map_or_else(
                        || killed.elapsed().as_secs_f64() * 1e3,
                        |s| (s as f64 + 0.5 - killed_wall).max(0.0),
                    );
                    trial_times.push(ms);
                }
            }
            lost += held.len();
            component.reap(Duration::from_secs(5)).await;
            fleet.start("drover-worker")?;
            // Every task of the trial succeeded.
            let deadline = Instant::now() + Duration::from_millis(SLEEP_MS) + ttl * 4;
            while done.len() < PER_TRIAL {
                let Ok(seen) = next(&mut events, deadline).await else {
                    break;
                };
                if seen.state == "succeeded" {
                    done.insert(seen.key);
                }
            }
            lost += PER_TRIAL - done.len().min(PER_TRIAL);
            trials.push(serde_json::json!({
                "killed": victim,
                "tasks_held": held_count,
                "restart_ms": trial_times,
            }));
            times.extend(trial_times);
            fleet.wait_ready(workers).await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        forward.abort();
        let goal = ttl.as_secs_f64() * 1e3 + 1_000.0;
        let mut rows = Vec::new();
        let summary = Summary::of(&mut times);
        if let Some(s) = summary {
            rows.push(Row::plain(
                "worker SIGKILL → task restarted p50",
                s.p50,
                "ms",
            ));
            rows.push(
                Row::plain("worker SIGKILL → task restarted p99", s.p99, "ms").target(
                    format!("p99 ≤ worker TTL + 1 s ({goal:.0} ms)"),
                    s.p99 <= goal,
                ),
            );
        }
        Ok::<_, anyhow::Error>(Section {
            scenario: "recovery".into(),
            lost,
            detail: serde_json::json!({
                "workers": workers,
                "worker_ttl_ms": ttl.as_millis() as u64,
                "tasks_per_trial": PER_TRIAL,
                "sleep_ms": SLEEP_MS,
                "tasks_moved": moved,
                "restart_ms": summary,
                "trials": trials,
            }),
            rows,
            curves: Vec::new(),
        })
    }
    .await;
    fleet.stop().await;
    result
}

/// The next record revision, or an error at `deadline`.
async fn next(
    events: &mut mpsc::UnboundedReceiver<Seen>,
    deadline: Instant,
) -> anyhow::Result<Seen> {
    match tokio::time::timeout_at(deadline.into(), events.recv()).await {
        Ok(Some(seen)) => Ok(seen),
        Ok(None) => bail!("the record watch ended"),
        Err(_) => bail!("timed out waiting for task records"),
    }
}
