//! `latency`: tasks submitted at fixed rates (`--rates`, each for `--duration` s). Per task:
//! submit → handler start, from the `started_at` the worker stamps (ms precision, so each sample
//! is taken at the middle of its millisecond: ±0.5 ms), and submit → its `succeeded` record seen
//! by a watch on `drover-tasks` (this host's clock for both ends).

use super::BenchArgs;
use super::fleet::{QUEUE, Target, follow_until_done, wall_ms, watch_records};
use super::report::{Row, Section};
use super::throughput::warm_up;
use bytes::Bytes;
use drover_shared::bench::{Summary, noop_task};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// No new terminal record for this long ends the wait; what is missing counts as lost.
const STALL: Duration = Duration::from_secs(30);

/// When task `i` was submitted: monotonic and wall clock (ms since the epoch).
type SubmitTimes = Arc<Mutex<Vec<Option<(Instant, f64)>>>>;

/// Runs every rate on one fleet.
pub(crate) async fn run(target: &Target, args: &BenchArgs) -> anyhow::Result<Section> {
    let fleet = target.fleet("lat", 1, args.workers).await?;
    let names = fleet.names.clone();
    let result = async {
        warm_up(target, &names, &format!("{}-lw", target.run_id)).await?;
        let mut rows = Vec::new();
        let mut detail = Vec::new();
        let mut curves = Vec::new();
        let mut lost = 0;
        for &rate in &args.rates {
            let mut r = one_rate(target, &names, rate, args.duration).await?;
            lost += r.lost;
            let s = Summary::of(&mut r.start);
            let e = Summary::of(&mut r.e2e);
            if let Some(s) = s {
                let strict = rate <= 200;
                let p50 = Row::plain(format!("{rate}/s submit → start p50"), s.p50, "ms");
                let p99 = Row::plain(format!("{rate}/s submit → start p99"), s.p99, "ms");
                if strict {
                    rows.push(p50.target("≤ 1.5 ms", s.p50 <= 1.5));
                    rows.push(p99.target("≤ 5 ms", s.p99 <= 5.0));
                } else {
                    rows.push(p50);
                    rows.push(p99);
                }
            }
            if let Some(e) = e {
                rows.push(Row::plain(
                    format!("{rate}/s submit → succeeded p50"),
                    e.p50,
                    "ms",
                ));
                rows.push(Row::plain(
                    format!("{rate}/s submit → succeeded p99"),
                    e.p99,
                    "ms",
                ));
            }
            detail.push(serde_json::json!({
                "rate": rate,
                "achieved_rate": r.achieved_rate,
                "tasks": r.tasks,
                "succeeded": r.e2e.len(),
                "lost": r.lost,
                "submit_to_start_ms": s,
                "submit_to_succeeded_ms": e,
            }));
            curves.push((format!("{rate}/s submit → start"), r.start));
            curves.push((format!("{rate}/s submit → succeeded"), r.e2e));
        }
        Ok::<_, anyhow::Error>(Section {
            scenario: "latency".into(),
            lost,
            detail: serde_json::json!({ "workers": args.workers, "rates": detail }),
            rows,
            curves,
        })
    }
    .await;
    fleet.stop().await;
    result
}

/// The samples of one rate.
struct RateResult {
    tasks: usize,
    achieved_rate: f64,
    start: Vec<f64>,
    e2e: Vec<f64>,
    lost: usize,
}

async fn one_rate(
    target: &Target,
    names: &drover_shared::names::Names,
    rate: u32,
    duration: f64,
) -> anyhow::Result<RateResult> {
    let n = ((f64::from(rate) * duration).round() as usize).max(1);
    let tag = format!("{}-l{rate}", target.run_id);
    let bodies: Vec<Bytes> = (0..n)
        .map(|i| serde_json::to_vec(&noop_task(i, Some(&format!("{tag}-{i}")))).map(Bytes::from))
        .collect::<Result<_, _>>()?;
    let mut pending: HashSet<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let times: SubmitTimes = Arc::new(Mutex::new(vec![None; n]));
    let mut watch = watch_records(&target.js, names).await?;
    let bar = super::progress(n as u64, &format!("latency {rate}/s"));
    let publisher = tokio::spawn(paced(
        target.js.clone(),
        names.submit_subject(QUEUE),
        bodies,
        rate,
        times.clone(),
    ));
    let (mut start, mut e2e) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (ok, _, _) = follow_until_done(&mut watch, &mut pending, STALL, |key, view, seen| {
        bar.inc(1);
        let Some(i) = key.rsplit('-').next().and_then(|i| i.parse::<usize>().ok()) else {
            return;
        };
        let Some((at, wall)) = times.lock().ok().and_then(|t| t.get(i).copied().flatten()) else {
            return;
        };
        e2e.push(seen.duration_since(at).as_secs_f64() * 1e3);
        if let Some(started) = view.started_ms() {
            start.push((started as f64 + 0.5 - wall).max(0.0));
        }
    })
    .await?;
    bar.finish_and_clear();
    let took = publisher.await??;
    Ok(RateResult {
        tasks: n,
        achieved_rate: n as f64 / took.as_secs_f64(),
        start,
        e2e,
        lost: n - ok,
    })
}

/// Publishes `bodies` so that body `i` leaves at `i / rate` s after the start, noting each
/// submit time just before its publish; PubAcks are awaited off the pacing path. Returns the
/// time the submits took.
async fn paced(
    js: async_nats::jetstream::Context,
    subject: String,
    bodies: Vec<Bytes>,
    rate: u32,
    times: SubmitTimes,
) -> anyhow::Result<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let acks = tokio::spawn(async move {
        while let Some(ack) = rx.recv().await {
            let ack: async_nats::jetstream::context::PublishAckFuture = ack;
            ack.await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let started = Instant::now();
    let interval = 1.0 / f64::from(rate);
    for (i, body) in bodies.into_iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 * interval);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        if let Ok(mut t) = times.lock() {
            t[i] = Some((Instant::now(), wall_ms()));
        }
        let ack = js.publish(subject.clone(), body).await?;
        tx.send(ack)
            .map_err(|_| anyhow::anyhow!("the PubAck task ended"))?;
    }
    drop(tx);
    acks.await??;
    Ok(started.elapsed())
}
