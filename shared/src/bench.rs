//! Load-generation building blocks shared by `drover bench` and the `cargo bench` programs of
//! `drover-tests`: the benchmark task body, pipelined JetStream publishing, the raw JetStream
//! baseline (async publish, and concurrent publish + pull-consume + ack, on scratch streams that
//! are deleted afterwards), latency summaries and the resident memory of a process.

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Size of a benchmark task's JSON body, the same for the raw baseline and for Drover.
pub const PAYLOAD_BYTES: usize = 200;

/// PubAcks kept in flight by [`publish_all`] (and by the context of [`js_context`]).
pub const WINDOW: usize = 4_096;

/// Why a measurement could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A NATS or JetStream call failed.
    #[error("{what}: {message}")]
    Nats {
        /// The step that failed.
        what: &'static str,
        /// The client's error.
        message: String,
    },
    /// Messages stopped arriving.
    #[error("{what}: nothing arrived for {secs} s")]
    Stalled {
        /// The step that stalled.
        what: &'static str,
        /// How long it waited.
        secs: u64,
    },
}

fn nats_err(what: &'static str) -> impl FnOnce(String) -> BenchError {
    move |message| BenchError::Nats { what, message }
}

/// A `noop` task whose JSON body is [`PAYLOAD_BYTES`] long (for ids of up to 20 characters; `i`
/// makes each body distinct). With `id`, the task carries that id.
pub fn noop_task(i: usize, id: Option<&str>) -> serde_json::Value {
    let mut task = serde_json::json!({"type": "noop", "payload": {"i": i}});
    if let Some(id) = id {
        task["id"] = id.into();
    }
    let len = serde_json::to_vec(&task).map_or(0, |v| v.len());
    // `,"pad":""` adds 9 bytes before the padding itself.
    let pad = PAYLOAD_BYTES.saturating_sub(len + 9);
    task["payload"]["pad"] = "x".repeat(pad).into();
    task
}

/// A JetStream context that keeps up to [`WINDOW`] acks in flight and waits (instead of failing)
/// when more are asked for.
pub fn js_context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(WINDOW)
        .backpressure_on_inflight(true)
        .build(client)
}

/// Publishes `bodies` to `subject` with up to [`WINDOW`] PubAcks outstanding, calling
/// `on_ack(n)` with the number acknowledged so far; returns the time until the last PubAck.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    bodies: impl IntoIterator<Item = Bytes>,
    mut on_ack: impl FnMut(usize),
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let mut acks = VecDeque::new();
    let mut acked = 0;
    for body in bodies {
        let ack = js
            .publish(subject.to_owned(), body)
            .await
            .map_err(|e| nats_err("publish")(e.to_string()))?;
        acks.push_back(ack);
        while acks.len() >= WINDOW {
            if let Some(a) = acks.pop_front() {
                a.await.map_err(|e| nats_err("puback")(e.to_string()))?;
                acked += 1;
                on_ack(acked);
            }
        }
    }
    for a in acks {
        a.await.map_err(|e| nats_err("puback")(e.to_string()))?;
        acked += 1;
        on_ack(acked);
    }
    Ok(started.elapsed())
}

/// Raw JetStream on one server: the floor under anything built on it.
#[derive(Debug, Clone, Serialize)]
pub struct RawBaseline {
    /// Messages per measurement.
    pub messages: usize,
    /// Bytes per message.
    pub message_bytes: usize,
    /// Pipelined async publish into a file stream ([`WINDOW`] PubAcks in flight), msgs/s.
    pub publish_rate: f64,
    /// Publish and pull-consume + ack at the same time on a work-queue file stream, msgs/s
    /// (consumer clock: first publish to last ack).
    pub publish_consume_rate: f64,
    /// The server work SPEC mandates per single-submit task, done by the plainest client:
    /// publish + pull-consume + ack as above, plus per consumed message a KV-style create
    /// (`Nats-Expected-Last-Subject-Sequence: 0`, the duplicate check of §1.1) and a second write
    /// to the same key (the terminal record of §1.2), the ack sent once both are stored. Tasks/s;
    /// `None` when not measured. No dispatcher can beat this on the same server.
    pub record_floor_rate: Option<f64>,
    /// The same floor for tasks submitted in arrays ([`RawBaseline::array_size`] per message):
    /// one publish, delivery and ack per array, a create and an update per task. Tasks/s;
    /// `None` when not measured.
    pub array_floor_rate: Option<f64>,
    /// Tasks per message of [`RawBaseline::array_floor_rate`].
    pub array_size: usize,
}

/// Measures [`RawBaseline`] with `bodies` on scratch streams `<scratch>_PUB` and `<scratch>_WQ`
/// (subjects `<scratch>.pub` / `<scratch>.wq`, lower-cased), which are deleted afterwards (also
/// when a step fails). `on_progress(done, total)` follows both halves.
pub async fn raw_baseline(
    js: &jetstream::Context,
    scratch: &str,
    bodies: &[Bytes],
    mut on_progress: impl FnMut(usize, usize),
) -> Result<RawBaseline, BenchError> {
    let upper = scratch.to_uppercase().replace(['.', '-'], "_");
    let lower = scratch.to_lowercase();
    let (pub_stream, wq_stream) = (format!("{upper}_PUB"), format!("{upper}_WQ"));
    let total = bodies.len() * 2;
    let result = async {
        js.create_stream(stream::Config {
            name: pub_stream.clone(),
            subjects: vec![format!("{lower}.pub")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("create the raw publish stream")(e.to_string()))?;
        let took = publish_all(js, &format!("{lower}.pub"), bodies.iter().cloned(), |n| {
            on_progress(n, total)
        })
        .await?;
        let publish_rate = bodies.len() as f64 / took.as_secs_f64();
        let _ = js.delete_stream(&pub_stream).await;

        let mut run = WorkQueueRun::start(js, &wq_stream, &format!("{lower}.wq"), bodies).await?;
        for n in 0..bodies.len() {
            let m = run.next("raw consume").await?;
            m.ack()
                .await
                .map_err(|e| nats_err("raw ack")(e.to_string()))?;
            on_progress(bodies.len() + n + 1, total);
        }
        let took = run.finish().await?;
        Ok(RawBaseline {
            messages: bodies.len(),
            message_bytes: bodies.first().map_or(0, Bytes::len),
            publish_rate,
            publish_consume_rate: bodies.len() as f64 / took.as_secs_f64(),
            record_floor_rate: None,
            array_floor_rate: None,
            array_size: 0,
        })
    }
    .await;
    let _ = js.delete_stream(&pub_stream).await;
    let _ = js.delete_stream(&wq_stream).await;
    result
}

/// A scratch work-queue stream being filled by a pipelined publisher while a pull consumer
/// takes from it: the shared half of [`raw_baseline`] and [`record_floor`].
struct WorkQueueRun {
    messages: consumer::pull::Stream,
    publisher: tokio::task::JoinHandle<Result<Duration, BenchError>>,
    started: Instant,
}

impl WorkQueueRun {
    /// Creates work-queue stream `name` on `subject` and its consumer, then starts the clock
    /// and the publisher of `bodies`.
    async fn start(
        js: &jetstream::Context,
        name: &str,
        subject: &str,
        bodies: &[Bytes],
    ) -> Result<Self, BenchError> {
        let wq = js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.to_owned()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("create a scratch work-queue stream")(e.to_string()))?;
        let consumer = wq
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("create a scratch consumer")(e.to_string()))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(512)
            .messages()
            .await
            .map_err(|e| nats_err("pull from a scratch consumer")(e.to_string()))?;
        let started = Instant::now();
        let publisher = tokio::spawn({
            let (js, bodies, subject) = (js.clone(), bodies.to_vec(), subject.to_owned());
            async move { publish_all(&js, &subject, bodies, |_| {}).await }
        });
        Ok(Self {
            messages,
            publisher,
            started,
        })
    }

    /// The next delivery; fails after 30 s without one.
    async fn next(&mut self, what: &'static str) -> Result<jetstream::Message, BenchError> {
        tokio::time::timeout(Duration::from_secs(30), self.messages.next())
            .await
            .map_err(|_| BenchError::Stalled { what, secs: 30 })?
            .ok_or_else(|| nats_err(what)("the consumer stream ended".into()))?
            .map_err(|e| nats_err(what)(e.to_string()))
    }

    /// The time since the clock started; waits for the publisher and fails with it.
    async fn finish(self) -> Result<Duration, BenchError> {
        let took = self.started.elapsed();
        self.publisher
            .await
            .map_err(|e| nats_err("scratch publisher")(e.to_string()))??;
        Ok(took)
    }
}

/// Measures a record floor with `bodies` on scratch streams `<scratch>_FLOOR` (a work queue)
/// and `<scratch>_REC` (one message per subject, like a KV bucket), deleted afterwards: publish
/// all bodies pipelined while a pull consumer takes them; for each body and each of the
/// `tasks_per_body` tasks it stands for, publish a create of `<scratch>.rec.<n>.<k>` and, with
/// `terminal_write`, an update of it (each record write carries the body, or its first 256 bytes
/// for an array), and ack the message once those PubAcks arrived. Tasks/s, first publish to last
/// ack. With `terminal_write` this is [`RawBaseline::record_floor_rate`] (single submits) or
/// [`RawBaseline::array_floor_rate`] (arrays), the end-to-end floor; without, the floor under a
/// dispatcher (intake, duplicate check; envelopes not counted).
pub async fn record_floor(
    js: &jetstream::Context,
    scratch: &str,
    bodies: &[Bytes],
    tasks_per_body: usize,
    terminal_write: bool,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<f64, BenchError> {
    let per_body = tasks_per_body.max(1);
    let upper = scratch.to_uppercase().replace(['.', '-'], "_");
    let lower = scratch.to_lowercase();
    let (wq_stream, rec_stream) = (format!("{upper}_FLOOR"), format!("{upper}_REC"));
    let result = async {
        js.create_stream(stream::Config {
            name: rec_stream.clone(),
            subjects: vec![format!("{lower}.rec.>")],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("create the floor record stream")(e.to_string()))?;
        let mut run =
            WorkQueueRun::start(js, &wq_stream, &format!("{lower}.floor"), bodies).await?;
        // The record writes get a context (and PubAck window) of their own: sharing the
        // publisher's would deadlock, each side holding permits the other waits for.
        let records = js_context(js.client());
        // Bodies in hand with their record writes' PubAcks, and how many writes that is.
        let mut in_flight = VecDeque::new();
        let mut writes_in_flight = 0;
        let mut acked = 0;
        let settle = |(writes, m): (
            Vec<jetstream::context::PublishAckFuture>,
            jetstream::Message,
        )| async move {
            for w in writes {
                w.await
                    .map_err(|e| nats_err("floor record write")(e.to_string()))?;
            }
            m.ack()
                .await
                .map_err(|e| nats_err("floor ack")(e.to_string()))
        };
        for n in 0..bodies.len() {
            let m = run.next("floor consume").await?;
            let record = if per_body == 1 {
                m.payload.clone()
            } else {
                m.payload.slice(..m.payload.len().min(256))
            };
            let mut writes = Vec::with_capacity(per_body * 2);
            for k in 0..per_body {
                let subject = format!("{lower}.rec.{n}.{k}");
                let mut expect_none = async_nats::HeaderMap::new();
                expect_none.insert("Nats-Expected-Last-Subject-Sequence", "0");
                writes.push(
                    records
                        .publish_with_headers(subject.clone(), expect_none, record.clone())
                        .await
                        .map_err(|e| nats_err("floor create")(e.to_string()))?,
                );
                if terminal_write {
                    writes.push(
                        records
                            .publish(subject, record.clone())
                            .await
                            .map_err(|e| nats_err("floor update")(e.to_string()))?,
                    );
                }
            }
            writes_in_flight += writes.len();
            in_flight.push_back((writes, m));
            while writes_in_flight >= WINDOW / 4 {
                if let Some(f) = in_flight.pop_front() {
                    writes_in_flight -= f.0.len();
                    settle(f).await?;
                    acked += 1;
                    on_progress(acked, bodies.len());
                }
            }
        }
        for f in in_flight {
            settle(f).await?;
            acked += 1;
            on_progress(acked, bodies.len());
        }
        let took = run.finish().await?;
        Ok((bodies.len() * per_body) as f64 / took.as_secs_f64())
    }
    .await;
    let _ = js.delete_stream(&wq_stream).await;
    let _ = js.delete_stream(&rec_stream).await;
    result
}

/// Percentiles of a set of samples (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// The summary of `samples` (sorted in place); `None` when empty. Percentiles are nearest
    /// rank: the smallest sample with at least p of all samples at or below it.
    pub fn of(samples: &mut [f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        Some(Self {
            count: samples.len(),
            p50: percentile(samples, 0.50),
            p90: percentile(samples, 0.90),
            p99: percentile(samples, 0.99),
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
}

/// Nearest-rank percentile `p` (0..=1) of `sorted` (ascending, not empty).
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Resident set size of process `pid` in MiB, from `/proc/<pid>/status` (Linux); `None` if the
/// process is gone or this is not Linux.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<f64>()
        .ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noop_bodies_have_the_benchmark_size() {
        for (i, id) in [(0, None), (123_456, Some("b1-throughput-123456"))] {
            let body = serde_json::to_vec(&noop_task(i, id)).unwrap();
            assert_eq!(
                body.len(),
                PAYLOAD_BYTES,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut s: Vec<f64> = (1..=100).map(f64::from).collect();
        let sum = Summary::of(&mut s).unwrap();
        assert_eq!(
            (sum.p50, sum.p90, sum.p99, sum.max),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(Summary::of(&mut []).is_none());
    }

    #[test]
    fn rss_of_this_process_is_positive() {
        assert!(rss_mib(std::process::id()).is_some_and(|m| m > 0.0));
    }
}
