//! Publishing timers into `DROVER_DELAYED` (the NATS half of [`super::timer_headers`]): the
//! task sealed as a one-task envelope. Delayed tasks' first attempts and retries both go
//! through [`publish`], so both fire early and are held to their exact instant by
//! [`crate::due`].

use super::{TimerId, timer_headers};
use crate::leader::LeaderContext;
use crate::outcomes::DELAYED_PARTITION;
use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishAckFuture;
use drover_shared::envelope::{self, BatchMeta};
use drover_shared::task::Task;

/// Seals `task` and publishes its timer `timer`, due at `due_ms`; returns the PubAck to await.
pub async fn publish(
    ctx: &LeaderContext,
    epoch: u64,
    task: &Task,
    timer: TimerId,
    due_ms: i64,
) -> Result<PublishAckFuture, String> {
    let meta = BatchMeta::new(&task.queue, DELAYED_PARTITION, epoch);
    let sealed = envelope::seal(
        &ctx.keys,
        &ctx.config.codec,
        meta,
        std::slice::from_ref(task),
    )
    .map_err(|e| format!("seal the timer of {}: {e}", task.id))?;
    let (env, body) = sealed.into_parts();
    let mut headers = HeaderMap::new();
    for (k, v) in env.to_pairs() {
        // The fired copy has no `Nats-Msg-Id`; the batch id travels in `Drover-Batch`.
        if k != "Nats-Msg-Id" {
            headers.insert(k, v);
        }
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (subject, extra) = timer_headers(&ctx.names, &task.queue, &task.id, timer, due_ms, now_ms);
    for (k, v) in extra {
        headers.insert(k, v);
    }
    ctx.js
        .publish_with_headers(subject, headers, body.into())
        .await
        .map_err(|e| format!("publish the timer of {}: {e}", task.id))
}
