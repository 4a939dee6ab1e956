//! Lifecycle events (SPEC §2 `DROVER_EVENTS`): compact JSON objects, batched per
//! `(queue, state)` into JSON arrays on `<prefix>.events.<queue>.<state>`.
//!
//! Which states are published follows `dispatcher.events`: `none`, `terminal` (default: the four
//! terminal states) or `all` (also `retrying` and the `queued` of a re-dispatched attempt).
//! Events are best-effort: [`EventSink::emit`] never waits — when the publisher is behind, the
//! event is dropped and counted — so an outcome's ack is never held up by its event. The
//! publisher flushes a group when it reaches [`MAX_EVENTS_PER_MESSAGE`] events and every
//! [`FLUSH_EVERY`].

use crate::metrics::DispatcherMetrics;
use async_nats::jetstream;
use drover_shared::names::Names;
use drover_shared::settings::Events;
use drover_shared::task::{TaskError, TaskRecord, TaskState, format_time};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Most events in one message.
pub const MAX_EVENTS_PER_MESSAGE: usize = 256;
/// How often partial groups are flushed.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Events waiting for the publisher before new ones are dropped.
const QUEUE_DEPTH: usize = 16_384;

/// One lifecycle event, as published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Task id.
    pub id: String,
    /// The state entered.
    pub state: TaskState,
    /// The attempt it concerns.
    pub attempt: u32,
    /// When (RFC 3339, ms).
    pub at: String,
    /// The worker that ran the attempt, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Duration of the attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The error, for `failed`, `retrying` and `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// When the next attempt runs, for `retrying`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<String>,
    #[serde(skip)]
    queue: String,
}

impl Event {
    /// The event of `record` entering its current state.
    pub fn of(record: &TaskRecord) -> Self {
        let at = record.finished_at.unwrap_or_else(chrono::Utc::now);
        Self {
            id: record.id.clone(),
            state: record.state,
            attempt: record.attempt,
            at: format_time(&at),
            worker: record.worker.clone(),
            duration_ms: record.duration_ms,
            error: record.error.clone(),
            next_run_at: record.next_run_at.as_ref().map(format_time),
            queue: record.queue.clone(),
        }
    }
}

/// Whether `level` publishes events for `state`.
pub fn wanted(level: Events, state: TaskState) -> bool {
    match level {
        Events::None => false,
        Events::Terminal => state.is_terminal(),
        Events::All => true,
    }
}

/// Pure per-`(queue, state)` grouping; a group leaves when full or on [`Grouper::drain`].
#[derive(Debug, Default)]
pub struct Grouper {
    groups: HashMap<(String, TaskState), Vec<Event>>,
}

impl Grouper {
    /// Adds `event`; returns a full group to publish, if this one filled it.
    pub fn push(&mut self, event: Event) -> Option<((String, TaskState), Vec<Event>)> {
        let key = (event.queue.clone(), event.state);
        let group = self.groups.entry(key.clone()).or_default();
        group.push(event);
        if group.len() >= MAX_EVENTS_PER_MESSAGE {
            let full = self.groups.remove(&key).unwrap_or_default();
            Some((key, full))
        } else {
            None
        }
    }

    /// Every non-empty group, leaving none.
    pub fn drain(&mut self) -> Vec<((String, TaskState), Vec<Event>)> {
        self.groups.drain().filter(|(_, v)| !v.is_empty()).collect()
    }
}

/// Where the leader hands its events; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    level: Events,
    tx: Option<mpsc::Sender<Event>>,
    metrics: Arc<DispatcherMetrics>,
}

impl EventSink {
    /// A sink that publishes nothing.
    pub fn disabled(metrics: Arc<DispatcherMetrics>) -> Self {
        Self {
            level: Events::None,
            tx: None,
            metrics,
        }
    }

    /// Starts the publisher (until `shutdown`) and returns its sink.
    pub fn spawn(
        js: jetstream::Context,
        names: Names,
        level: Events,
        metrics: Arc<DispatcherMetrics>,
        shutdown: CancellationToken,
    ) -> Self {
        if level == Events::None {
            return Self::disabled(metrics);
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(publish_loop(js, names, rx, metrics.clone(), shutdown));
        Self {
            level,
            tx: Some(tx),
            metrics,
        }
    }

    /// Publishes the event of `record`'s current state, if the level wants it; never waits.
    pub fn emit(&self, record: &TaskRecord) {
        let Some(tx) = &self.tx else { return };
        if !wanted(self.level, record.state) {
            return;
        }
        if tx.try_send(Event::of(record)).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

async fn publish_loop(
    js: jetstream::Context,
    names: Names,
    mut rx: mpsc::Receiver<Event>,
    metrics: Arc<DispatcherMetrics>,
    shutdown: CancellationToken,
) {
    let mut grouper = Grouper::default();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ready = tokio::select! {
            _ = shutdown.cancelled() => {
                // Drain what is already queued, then stop.
                while let Ok(e) = rx.try_recv() {
                    if let Some(full) = grouper.push(e) {
                        publish(&js, &names, full, &metrics).await;
                    }
                }
                for g in grouper.drain() {
                    publish(&js, &names, g, &metrics).await;
                }
                return;
            }
            e = rx.recv() => match e {
                Some(e) => grouper.push(e).into_iter().collect::<Vec<_>>(),
                None => {
                    // Every sink is gone: publish what is left and stop.
                    for g in grouper.drain() {
                        publish(&js, &names, g, &metrics).await;
                    }
                    return;
                }
            },
            _ = tick.tick() => grouper.drain(),
        };
        for g in ready {
            publish(&js, &names, g, &metrics).await;
        }
    }
}

async fn publish(
    js: &jetstream::Context,
    names: &Names,
    ((queue, state), events): ((String, TaskState), Vec<Event>),
    metrics: &DispatcherMetrics,
) {
    let n = events.len() as u64;
    let Ok(body) = serde_json::to_vec(&events) else {
        metrics.events_dropped.inc_by(n);
        return;
    };
    let subject = names.events_subject(&queue, state.as_str());
    let stored = match js.publish(subject, body.into()).await {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(2), ack)
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(_) => {
            metrics.events.inc_by(n);
        }
        Err(e) => {
            debug!(error = %e, %queue, "events not stored");
            metrics.events_dropped.inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::{Task, TaskSpec};

    fn record(id: &str, queue: &str, state: TaskState) -> TaskRecord {
        let task = Task {
            id: id.into(),
            ..Task::first_attempt(&TaskSpec::new("t"), queue, 1, 0)
        };
        TaskRecord::new(&task, state, chrono::Utc::now())
    }

    #[test]
    fn levels_pick_states() {
        assert!(!wanted(Events::None, TaskState::Failed));
        assert!(wanted(Events::Terminal, TaskState::Failed));
        assert!(wanted(Events::Terminal, TaskState::Cancelled));
        assert!(!wanted(Events::Terminal, TaskState::Retrying));
        assert!(wanted(Events::All, TaskState::Retrying));
    }

    #[test]
    fn groups_fill_per_queue_and_state() {
        let mut g = Grouper::default();
        for i in 0..MAX_EVENTS_PER_MESSAGE - 1 {
            assert!(
                g.push(Event::of(&record(&format!("a{i}"), "q", TaskState::Failed)))
                    .is_none()
            );
        }
        assert!(
            g.push(Event::of(&record("b", "q", TaskState::Succeeded)))
                .is_none()
        );
        let ((queue, state), full) = g
            .push(Event::of(&record("c", "q", TaskState::Failed)))
            .expect("the group is full");
        assert_eq!((queue.as_str(), state), ("q", TaskState::Failed));
        assert_eq!(full.len(), MAX_EVENTS_PER_MESSAGE);
        let rest = g.drain();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1[0].id, "b");
        assert!(g.drain().is_empty());
        let json = serde_json::to_value(&rest[0].1).unwrap();
        assert_eq!(json[0]["state"], "succeeded");
        assert_eq!(json[0]["attempt"], rest[0].1[0].attempt);
        assert!(json[0].get("queue").is_none());
    }
}
