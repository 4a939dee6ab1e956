//! `memory`: the resident memory (RSS) of one dispatcher and one worker, idle (3 s after the
//! fleet is ready and warmed up), and the peak while a backlog of up to 100,000 `noop` tasks
//! (arrays of 100, submitted at once) is dispatched and run; sampled every 100 ms.

use super::BenchArgs;
use super::fleet::{QUEUE, Target, follow_until_done, watch_records};
use super::report::{Row, Section};
use super::throughput::warm_up;
use anyhow::{Context as _, bail};
use bytes::Bytes;
use drover_shared::bench::{noop_task, publish_all, rss_mib};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The backlog the issue names.
const BACKLOG: usize = 100_000;

/// Target for an idle worker, MB (10^6 bytes, as the issue writes it).
const WORKER_IDLE_MIB: f64 = 20.0;

/// Target for the dispatcher (idle and under the backlog), MB.
const DISPATCHER_MIB: f64 = 64.0;

/// MiB → MB.
fn mb(mib: f64) -> f64 {
    mib * 1.048_576
}

/// Runs the scenario (spawned fleets only).
pub(crate) async fn run(target: &Target, args: &BenchArgs) -> anyhow::Result<Section> {
    if !target.is_spawned() {
        bail!("memory reads the RSS of fleet processes: run it with --spawn");
    }
    let fleet = target.fleet("mem", 1, 1).await?;
    let names = fleet.names.clone();
    let result = async {
        let pid_of = |bin: &str| {
            fleet
                .components
                .iter()
                .find(|c| c.name().contains(bin))
                .and_then(|c| c.pid())
                .with_context(|| format!("no {bin} process"))
        };
        let (dpid, wpid) = (pid_of("-d")?, pid_of("-w")?);
        warm_up(target, &names, &format!("{}-mw", target.run_id)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = (
            rss_mib(dpid).context("dispatcher gone")?,
            rss_mib(wpid).context("worker gone")?,
        );
        let n = args.tasks.min(BACKLOG);
        let tag = format!("{}-m", target.run_id);
        let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
        let tasks: Vec<serde_json::Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| noop_task(i, Some(id)))
            .collect();
        let bodies: Vec<Bytes> = tasks
            .chunks(100)
            .map(|c| serde_json::to_vec(c).map(Bytes::from))
            .collect::<Result<_, _>>()?;
        let mut pending: HashSet<String> = ids.into_iter().collect();
        let mut watch = watch_records(&target.js, &names).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = (0.0f64, 0.0f64);
                while !stop.load(Ordering::Relaxed) {
                    peak.0 = peak.0.max(rss_mib(dpid).unwrap_or(0.0));
                    peak.1 = peak.1.max(rss_mib(wpid).unwrap_or(0.0));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                peak
            }
        });
        let bar = super::progress(n as u64, "memory backlog");
        publish_all(&target.js, &names.submit_subject(QUEUE), bodies, |_| {}).await?;
        let (ok, _, _) = follow_until_done(
            &mut watch,
            &mut pending,
            Duration::from_secs(30),
            |_, _, _| bar.inc(1),
        )
        .await?;
        bar.finish_and_clear();
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.await?;
        let rows = vec![
            Row::plain("worker RSS, idle", idle.1, "MiB").target(
                format!("< {WORKER_IDLE_MIB:.0} MB"),
                mb(idle.1) < WORKER_IDLE_MIB,
            ),
            Row::plain("dispatcher RSS, idle", idle.0, "MiB").target(
                format!("< {DISPATCHER_MIB:.0} MB"),
                mb(idle.0) < DISPATCHER_MIB,
            ),
            Row::plain(
                format!("worker RSS, peak through a {n}-task backlog"),
                peak.1,
                "MiB",
            ),
            Row::plain(
                format!("dispatcher RSS, peak through a {n}-task backlog"),
                peak.0,
                "MiB",
            )
            .target(
                format!("< {DISPATCHER_MIB:.0} MB"),
                mb(peak.0) < DISPATCHER_MIB,
            ),
        ];
        Ok::<_, anyhow::Error>(Section {
            scenario: "memory".into(),
            lost: n - ok,
            detail: serde_json::json!({
                "backlog": n,
                "dispatcher_idle_mib": idle.0,
                "worker_idle_mib": idle.1,
                "dispatcher_peak_mib": peak.0,
                "worker_peak_mib": peak.1,
            }),
            rows,
            curves: Vec::new(),
        })
    }
    .await;
    fleet.stop().await;
    result
}
