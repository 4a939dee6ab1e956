//! `throughput`: N `noop` tasks with 200-byte bodies, submitted as fast as JetStream takes them
//! (pipelined PubAcks), one task or an array of K per message; the clock runs from the first
//! submit to the server's stored time of the last `succeeded` record. The run is observed by
//! polling the pipeline's streams until they are empty and then reading every record once with
//! batched gets, not by watching `drover-tasks` (a watch would add a delivery per record write
//! to the server's work, measuring the observer as much as the fleet).

use super::BenchArgs;
use super::fleet::{QUEUE, Target, drain_and_read, follow_until_done, watch_records};
use super::report::{Row, Section};
use bytes::Bytes;
use drover_shared::bench::{RawBaseline, noop_task, publish_all};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// No new terminal record for this long ends the wait; what is missing counts as lost.
const STALL: Duration = Duration::from_secs(30);

/// Runs the scenario with `array` tasks per submit message.
pub(crate) async fn run(
    target: &Target,
    args: &BenchArgs,
    array: usize,
    raw: &RawBaseline,
) -> anyhow::Result<Section> {
    let n = args.tasks;
    let label = if array == 1 { "single" } else { "array" };
    let fleet = target
        .fleet(&format!("thr-{label}"), 1, args.workers)
        .await?;
    let names = fleet.names.clone();
    let subject = names.submit_subject(QUEUE);
    let tag = format!("{}-t{label}", target.run_id);
    let result = async {
        warm_up(target, &names, &format!("{tag}w")).await?;
        let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
        let tasks: Vec<serde_json::Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| noop_task(i, Some(id)))
            .collect();
        let bodies: Vec<Bytes> = tasks
            .chunks(array)
            .map(|c| {
                if array == 1 {
                    serde_json::to_vec(&c[0])
                } else {
                    serde_json::to_vec(c)
                }
                .map(Bytes::from)
            })
            .collect::<Result<_, _>>()?;
        let messages = bodies.len();
        let bar = super::progress(messages as u64, &format!("throughput ({label})"));
        let submitted = Arc::new(AtomicUsize::new(0));
        let done_submitting = Arc::new(AtomicBool::new(false));
        let started_wall = chrono::Utc::now();
        let started = Instant::now();
        let publisher = tokio::spawn({
            let js = target.js.clone();
            let (submitted, done) = (submitted.clone(), done_submitting.clone());
            async move {
                let took = publish_all(&js, &subject, bodies, |acked| {
                    submitted.store(acked, Ordering::Relaxed);
                })
                .await;
                done.store(true, Ordering::Relaxed);
                took
            }
        });
        let drained = drain_and_read(
            &target.js,
            &names,
            &ids,
            &submitted,
            &done_submitting,
            STALL,
            |taken| bar.set_position(taken),
        )
        .await?;
        bar.finish_and_clear();
        let submit_took = publisher.await??;
        let (ok, failed) = (drained.succeeded, drained.failed);
        // From the first submit to the server's stored time of the last `succeeded` record
        // (same machine, same clock).
        let took = drained
            .last_success
            .and_then(|l| (l - started_wall).to_std().ok())
            .unwrap_or_else(|| started.elapsed());
        let rate = ok as f64 / took.as_secs_f64();
        let submit_rate = n as f64 / submit_took.as_secs_f64();
        let what = if array == 1 {
            "e2e, single submits".to_owned()
        } else {
            format!("e2e, arrays of {array}")
        };
        let (goal, x) = if array == 1 {
            (0.5, "0.5")
        } else {
            (1.0, "1.0")
        };
        let met = rate >= goal * raw.publish_consume_rate;
        let mut rows = vec![
            Row::rate(format!("{what} ({n} noop tasks)"), rate, raw)
                .target(format!("≥ {x} × raw publish+consume"), met),
            Row::rate(
                format!("submit rate ({messages} messages)"),
                submit_rate,
                raw,
            ),
        ];
        let floor = if array == 1 {
            raw.record_floor_rate
        } else {
            raw.array_floor_rate.filter(|_| raw.array_size == array)
        };
        if let Some(floor) = floor {
            rows.push(Row::plain(
                format!("{what} ÷ record floor"),
                rate / floor,
                "×",
            ));
        }
        Ok::<_, anyhow::Error>(Section {
            scenario: format!("throughput-{label}"),
            lost: n - ok,
            detail: serde_json::json!({
                "tasks": n,
                "array": array,
                "messages": messages,
                "workers": args.workers,
                "succeeded": ok,
                "failed": failed,
                "seconds": took.as_secs_f64(),
                "submit_seconds": submit_took.as_secs_f64(),
                "tasks_per_second": rate,
                "x_raw_publish_consume": rate / raw.publish_consume_rate,
                "x_raw_publish": rate / raw.publish_rate,
                "x_record_floor": floor.map(|f| rate / f),
            }),
            rows,
            curves: Vec::new(),
        })
    }
    .await;
    fleet.stop().await;
    result
}

/// Submits 200 tasks and waits for them, so every worker has its partition consumers running
/// before a clock starts.
pub(crate) async fn warm_up(
    target: &Target,
    names: &drover_shared::names::Names,
    tag: &str,
) -> anyhow::Result<()> {
    let ids: Vec<String> = (0..200).map(|i| format!("{tag}-{i}")).collect();
    let body: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| noop_task(i, Some(id)))
        .collect();
    let mut pending: HashSet<String> = ids.into_iter().collect();
    let mut watch = watch_records(&target.js, names).await?;
    publish_all(
        &target.js,
        &names.submit_subject(QUEUE),
        [Bytes::from(serde_json::to_vec(&body)?)],
        |_| {},
    )
    .await?;
    follow_until_done(&mut watch, &mut pending, STALL, |_, _, _| {}).await?;
    if !pending.is_empty() {
        anyhow::bail!(
            "warm-up: {} of 200 tasks did not finish in {STALL:?}; is a worker running?",
            pending.len()
        );
    }
    Ok(())
}
