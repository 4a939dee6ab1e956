//! The raw JetStream baseline of a run: the same server, the same 200-byte bodies, measured
//! before any scenario (async publish into a scratch stream, then concurrent publish +
//! pull-consume + ack on a scratch work queue; both streams are deleted afterwards), and the
//! record floor: the server work SPEC mandates per task done by the plainest client
//! ([`record_floor`]).

use super::fleet::Target;
use bytes::Bytes;
use drover_shared::bench::{RawBaseline, noop_task, raw_baseline, record_floor};

/// Largest raw measurement: enough for a steady rate.
const MAX_MESSAGES: usize = 200_000;

/// Smallest raw measurement: below this start-up dominates.
const MIN_MESSAGES: usize = 2_000;

/// Measures the baseline with `tasks` messages (clamped to 2,000..=200,000), and with
/// `array = Some(k)` the record floor of the same tasks submitted `k` per message too.
pub(crate) async fn measure(
    target: &Target,
    tasks: usize,
    array: Option<usize>,
) -> anyhow::Result<RawBaseline> {
    let n = tasks.clamp(MIN_MESSAGES, MAX_MESSAGES);
    let bodies: Vec<Bytes> = (0..n)
        .map(|i| {
            let id = format!("{}-raw-{i}", target.run_id);
            serde_json::to_vec(&noop_task(i, Some(&id))).map(Bytes::from)
        })
        .collect::<Result<_, _>>()?;
    let bar = super::progress((2 * n) as u64, "raw JetStream");
    let scratch = format!("drover_bench_{}", target.run_id);
    let raw = raw_baseline(&target.js, &scratch, &bodies, |done, _| {
        bar.set_position(done as u64)
    })
    .await;
    bar.finish_and_clear();
    let mut raw = raw?;
    let bar = super::progress(n as u64, "raw record floor");
    let floor = record_floor(&target.js, &scratch, &bodies, 1, true, |done, _| {
        bar.set_position(done as u64)
    })
    .await;
    bar.finish_and_clear();
    raw.record_floor_rate = Some(floor?);
    if let Some(k) = array.filter(|&k| k > 1) {
        let arrays: Vec<Bytes> = (0..n.div_ceil(k))
            .map(|a| {
                let tasks: Vec<_> = (a * k..(a + 1) * k)
                    .map(|i| noop_task(i, Some(&format!("{}-rawa-{i}", target.run_id))))
                    .collect();
                serde_json::to_vec(&tasks).map(Bytes::from)
            })
            .collect::<Result<_, _>>()?;
        let bar = super::progress(arrays.len() as u64, "raw record floor, arrays");
        let floor = record_floor(&target.js, &scratch, &arrays, k, true, |done, _| {
            bar.set_position(done as u64)
        })
        .await;
        bar.finish_and_clear();
        raw.array_floor_rate = Some(floor?);
        raw.array_size = k;
    }
    Ok(raw)
}
