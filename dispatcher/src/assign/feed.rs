//! A `watch_all` on one KV bucket as a source of planner [`Event`]s: it tells when the initial
//! values are in ([`Event::Synced`]) and, after an error, forgets ([`Event::Reset`]) and reopens
//! itself with backoff.

use super::MAX_REOPEN_BACKOFF;
use super::plan::{Event, Feed};
use async_nats::jetstream::{self, kv};
use drover_shared::names::Names;
use futures::StreamExt;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How long a new watch may take to deliver its initial values before the loop goes on
/// without the end marker (a bucket whose entries all expired meanwhile delivers nothing).
const SYNC_GRACE: Duration = Duration::from_secs(1);

/// A `watch_all` on one bucket that knows when its initial values are in, and reopens itself
/// after an error.
pub(super) struct WatchFeed {
    feed: Feed,
    kv: kv::Store,
    stream: String,
    watch: Option<kv::Watch>,
    /// While the initial values are coming: when to stop waiting for their end.
    sync_by: Option<Instant>,
    /// While closed: when to try to open it.
    reopen_at: Option<Instant>,
    backoff: Duration,
}

impl WatchFeed {
    pub(super) fn new(feed: Feed, kv: kv::Store, names: &Names) -> Self {
        let bucket = names.bucket(match feed {
            Feed::Workers => "workers",
            Feed::State => "state",
        });
        Self {
            feed,
            kv,
            stream: format!("KV_{bucket}"),
            watch: None,
            sync_by: None,
            reopen_at: Some(Instant::now()),
            backoff: Duration::from_millis(100),
        }
    }

    pub(super) fn reopen_due(&self, now: Instant) -> bool {
        self.watch.is_none() && self.reopen_at.is_some_and(|t| now >= t)
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.sync_by.or(if self.watch.is_none() {
            self.reopen_at
        } else {
            None
        })
    }

    /// Opens the watch. An empty bucket is synced at once; otherwise the entry with nothing
    /// pending after it (or [`SYNC_GRACE`]) marks the end of the initial values.
    pub(super) async fn open(&mut self, js: &jetstream::Context) -> Vec<Event> {
        let opened = async {
            let messages = js
                .get_stream(&self.stream)
                .await?
                .cached_info()
                .state
                .messages;
            // With history: the last value of every key first (`watch_all` would only
            // deliver changes made after it opens).
            let watch = self.kv.watch_with_history(">").await?;
            Ok::<_, async_nats::Error>((messages, watch))
        }
        .await;
        match opened {
            Ok((messages, watch)) => {
                self.watch = Some(watch);
                self.reopen_at = None;
                self.backoff = Duration::from_millis(100);
                if messages == 0 {
                    self.sync_by = None;
                    vec![Event::Synced(self.feed)]
                } else {
                    self.sync_by = Some(Instant::now() + SYNC_GRACE);
                    Vec::new()
                }
            }
            Err(e) => {
                warn!(stream = %self.stream, error = %e, "cannot watch; retrying");
                self.reopen_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_REOPEN_BACKOFF);
                Vec::new()
            }
        }
    }

    pub(super) async fn next(&mut self) -> Option<Result<kv::Entry, kv::WatcherError>> {
        match self.watch.as_mut() {
            Some(w) => w.next().await,
            None => std::future::pending().await,
        }
    }

    pub(super) fn on_item(
        &mut self,
        item: Option<Result<kv::Entry, kv::WatcherError>>,
    ) -> Vec<Event> {
        let entry = match item {
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return self.lost(&e),
            None => return self.lost(&"the watch ended"),
        };
        let value = (entry.operation == kv::Operation::Put).then_some(entry.value);
        let mut events = vec![match self.feed {
            Feed::Workers => Event::Worker {
                // How old the record is (server time of the put): a watch that starts delivers
                // a dead worker's last record too, and it must not look fresh.
                age: age_of(entry.created),
                id: entry.key,
                value,
            },
            Feed::State => Event::State {
                key: entry.key,
                value,
            },
        }];
        if self.sync_by.is_some() && entry.delta == 0 {
            self.sync_by = None;
            events.push(Event::Synced(self.feed));
        }
        events
    }

    pub(super) fn on_timer(&mut self, now: Instant) -> Vec<Event> {
        if self.sync_by.is_some_and(|t| now >= t) {
            self.sync_by = None;
            debug!(stream = %self.stream, "initial values took long; going on");
            return vec![Event::Synced(self.feed)];
        }
        Vec::new()
    }

    fn lost(&mut self, why: &dyn std::fmt::Display) -> Vec<Event> {
        warn!(stream = %self.stream, error = %why, "watch lost; reopening");
        self.watch = None;
        self.sync_by = None;
        self.reopen_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_REOPEN_BACKOFF);
        vec![Event::Reset(self.feed)]
    }
}

/// How long ago `created` was, by this host's clock (zero if it is in the future).
fn age_of(created: time::OffsetDateTime) -> std::time::Duration {
    (time::OffsetDateTime::now_utc() - created)
        .try_into()
        .unwrap_or_default()
}
