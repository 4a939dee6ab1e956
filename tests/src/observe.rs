//! Reading what the dispatcher did, the way an operator would: decoding `DROVER_WORK` envelopes
//! with the test keyring, waiting for the intake to drain, and finding the leader in
//! `drover-election`. Shared by the dispatcher tests, the chaos tests and the benchmarks.

use crate::TEST_KEYS;
use async_nats::jetstream::context::Context;
use drover_shared::envelope::{self, CodecConfig};
use drover_shared::keyring::Keyring;
use drover_shared::names::Names;
use drover_shared::task::Task;
use std::time::{Duration, Instant};

/// One task found in `DROVER_WORK`.
#[derive(Debug, Clone)]
pub struct Dispatched {
    /// Stream sequence of its envelope.
    pub seq: u64,
    /// The leader epoch stamped on its envelope.
    pub epoch: u64,
    /// The task as it travelled.
    pub task: Task,
}

/// Every task in `DROVER_WORK`, decoded with [`TEST_KEYS`], in stream order.
///
/// Panics if an envelope does not open: in these tests every envelope comes from our leader.
pub async fn work_tasks(js: &Context, names: &Names) -> Vec<Dispatched> {
    let stream = js
        .get_stream(names.work_stream())
        .await
        .expect("DROVER_WORK");
    let last = stream
        .get_info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let ring = Keyring::parse(TEST_KEYS).expect("test keys");
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let headers = m.headers.clone();
        let (hdr, opened) = envelope::open_message::<Task>(
            &ring,
            &CodecConfig::default(),
            names,
            m.subject.as_str(),
            |name| headers.get(name).map(|v| v.as_str()),
            &m.payload,
        )
        .expect("every envelope opens with the test keyring");
        out.extend(opened.tasks.into_iter().map(|task| Dispatched {
            seq,
            epoch: hdr.epoch,
            task,
        }));
    }
    out
}

/// Waits until the intake stream is empty, the work stream has stopped growing and holds at
/// least `n` tasks, then returns them decoded. Panics after `timeout`.
pub async fn wait_for_tasks(
    js: &Context,
    names: &Names,
    n: usize,
    timeout: Duration,
) -> Vec<Dispatched> {
    let deadline = Instant::now() + timeout;
    let submit = js.get_stream(names.submit_stream()).await.expect("submit");
    let work = js.get_stream(names.work_stream()).await.expect("work");
    let mut last = u64::MAX;
    loop {
        let pending = submit.get_info().await.map_or(1, |i| i.state.messages);
        let envelopes = work.get_info().await.map_or(0, |i| i.state.last_sequence);
        if pending == 0 && envelopes == last {
            let tasks = work_tasks(js, names).await;
            if tasks.len() >= n {
                return tasks;
            }
            eprintln!("{} of {n} tasks in DROVER_WORK so far", tasks.len());
        }
        last = envelopes;
        assert!(
            Instant::now() < deadline,
            "only part of {n} tasks reached DROVER_WORK in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The current leader's id, from `drover-election.leader`.
pub async fn leader_id(js: &Context, names: &Names) -> Option<String> {
    Some(leader_value(js, names).await?["id"].as_str()?.to_owned())
}

/// The current leader value of `drover-election.leader` (`{"id","host","pid","since","addr",
/// "epoch"}`).
pub async fn leader_value(js: &Context, names: &Names) -> Option<serde_json::Value> {
    let kv = js.get_key_value(names.bucket("election")).await.ok()?;
    let v = kv.get("leader").await.ok()??;
    serde_json::from_slice(&v).ok()
}

/// Waits for a leader other than `not` and returns its id. Panics after `timeout`.
pub async fn wait_leader(
    js: &Context,
    names: &Names,
    not: Option<&str>,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(id) = leader_id(js, names).await
            && Some(id.as_str()) != not
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
