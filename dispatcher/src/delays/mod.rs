//! Delayed and unique tasks (SPEC §1.1 `run_at`/`delay_ms`, `unique_key`/`unique_for_ms`; §2
//! `DROVER_DELAYED`, `drover-unique`): the pure decisions. The NATS shells are [`timer`] (sealed
//! one-task timers) and [`unique`] (uniqueness claims); the leader's intake and
//! [`crate::due`] carry them out.
//!
//! **Timers.** A task whose earliest start lies in the future gets a `scheduled` record and a
//! sealed one-task timer in `DROVER_DELAYED` instead of an envelope (retry timers, published by
//! [`crate::outcomes`], take exactly the same path, [`timer::publish`], with their own
//! [`TimerId`]); the intake message is acked after the timer's
//! PubAck. The timer carries its due instant in the `Drover-Due` header (ms since the epoch).
//! The server's message scheduler ticks at about 250 ms, so a timer asks the server to fire
//! [`HOLD_AHEAD`] *before* the due instant; the leader's due consumer then holds the fired copy
//! (unacked) in a bounded in-memory set ([`Held`]) and dispatches it at the exact instant. A
//! task due sooner than that skips the scheduler and goes straight to `<prefix>.due.<queue>`,
//! where it is held the same way. Only tasks due within [`HOLD_AHEAD`] are ever in memory, so the
//! leader's memory does not grow with pending delayed tasks; a crashed leader's held copies come
//! back to its successor after the due consumer's `ack_wait`.
//!
//! **Uniqueness.** A task with `unique_key` claims `<queue>.<sha256 hex of unique_key>` in
//! `drover-unique` by create-if-absent, with a per-message TTL of the window rounded up to whole
//! seconds. The value ([`Claim`]) names the task id (when known) and the claim token of the
//! validated submit that took it, so a redelivered intake message, a retry of the same task, or
//! the intake of a submission the API already claimed for recognises the claim as its own.

pub mod timer;
pub mod unique;

use chrono::{DateTime, Utc};
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::names::Names;
use drover_shared::task::{TaskSpec, format_time};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// Header of a timer (schedule message or direct due message): the due instant, ms since the
/// Unix epoch.
pub const HDR_DUE: &str = "Drover-Due";
/// Header of a validated submission that claimed its unique keys before publishing: the claim
/// token stored in the claims.
pub const HDR_UNIQUE_CLAIM: &str = "Drover-Unique-Claim";
/// How long before its due instant the server fires a timer to the leader, which holds it and
/// dispatches it on time. Larger than the scheduler's tick (about 250 ms) with room for load.
pub const HOLD_AHEAD: Duration = Duration::from_millis(1000);
/// Most fired timers the leader holds at once; beyond it, it stops pulling and the rest wait in
/// the server.
pub const MAX_HELD: usize = 100_000;

/// What the intake does with one task besides dispatching it: its time and its uniqueness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The earliest start, ms since the epoch, when it lies in the future at intake.
    pub due_ms: Option<i64>,
    /// The uniqueness window to claim.
    pub unique: Option<UniqueWindow>,
}

/// `unique_key` with `unique_for_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueWindow {
    /// The key as submitted.
    pub key: String,
    /// The window, ms.
    pub window_ms: u64,
}

impl Plan {
    /// The plan of `spec` submitted at `now_ms`: a past or zero delay starts at once.
    pub fn of(spec: &TaskSpec, now_ms: i64) -> Self {
        let now = DateTime::from_timestamp_millis(now_ms).unwrap_or_else(Utc::now);
        let due_ms = spec
            .not_before(now)
            .map(|t| t.timestamp_millis())
            .filter(|&t| t > now_ms);
        let unique = spec
            .unique_key
            .clone()
            .zip(spec.unique_for_ms)
            .map(|(key, window_ms)| UniqueWindow { key, window_ms });
        Self { due_ms, unique }
    }
}

/// Where a timer for a task due at `due_ms` goes, decided at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerRoute {
    /// A schedule on `<prefix>.delayed.<queue>.<id>` firing at this instant (ms), which is
    /// [`HOLD_AHEAD`] before the due instant.
    Schedule(i64),
    /// Straight onto `<prefix>.due.<queue>`: due too soon for the scheduler.
    Direct,
}

/// The route of a timer due at `due_ms`.
pub fn timer_route(due_ms: i64, now_ms: i64) -> TimerRoute {
    let fire = due_ms - HOLD_AHEAD.as_millis() as i64;
    // Firing within a scheduler tick of now gains nothing over holding it now.
    if fire > now_ms + 250 {
        TimerRoute::Schedule(fire)
    } else {
        TimerRoute::Direct
    }
}

/// The `Nats-Msg-Id` of a timer: what makes a second publish of the same timer (a redelivered
/// intake message, a redelivered outcome) a duplicate the stream drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerId {
    /// A delayed task's first attempt, from intake message `intake_seq`: `delay-<id>-<seq>`.
    Delay {
        /// Stream sequence of the intake message.
        intake_seq: u64,
    },
    /// Attempt `attempt` after a failed attempt that started at `failed_started_ms` (ms):
    /// `retry-<id>-<attempt>-<started>`, so a new series after `drover.api.retry` gets ids of
    /// its own.
    Retry {
        /// The attempt the timer starts.
        attempt: u32,
        /// When the failed attempt started, ms since the epoch.
        failed_started_ms: i64,
    },
}

impl TimerId {
    /// The `Nats-Msg-Id` value for task `id`.
    pub fn msg_id(self, id: &str) -> String {
        match self {
            Self::Delay { intake_seq } => format!("delay-{id}-{intake_seq}"),
            Self::Retry {
                attempt,
                failed_started_ms,
            } => format!("retry-{id}-{attempt}-{failed_started_ms}"),
        }
    }
}

/// Headers (besides the envelope's own `Drover-*`) and subject of the timer of task `id` in
/// `queue`, due at `due_ms` — a delayed task's first attempt or a retry, one path for both.
pub fn timer_headers(
    names: &Names,
    queue: &str,
    id: &str,
    timer: TimerId,
    due_ms: i64,
    now_ms: i64,
) -> (String, Vec<(&'static str, String)>) {
    let mut headers = vec![
        ("Nats-Msg-Id", timer.msg_id(id)),
        (HDR_DUE, due_ms.to_string()),
    ];
    match timer_route(due_ms, now_ms) {
        TimerRoute::Schedule(fire_ms) => {
            let at = DateTime::from_timestamp_millis(fire_ms).unwrap_or_else(Utc::now);
            headers.push(("Nats-Schedule", format!("@at {}", format_time(&at))));
            headers.push(("Nats-Schedule-Target", names.due_subject(queue)));
            (names.delayed_subject(queue, id), headers)
        }
        TimerRoute::Direct => (names.due_subject(queue), headers),
    }
}

/// The due instant of a fired timer from its `Drover-Due` header; `None` (run now) when absent
/// or unreadable, as for retry timers.
pub fn due_of(header: Option<&str>) -> Option<i64> {
    header.and_then(|v| v.trim().parse().ok())
}

/// Fired timers held until their due instant: a set ordered by time, bounded by the caller
/// (see [`MAX_HELD`]). Pure; time is passed in.
#[derive(Debug)]
pub struct Held<T> {
    items: BTreeMap<(i64, u64), T>,
    next: u64,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            next: 0,
        }
    }
}

impl<T> Held<T> {
    /// Holds `item` until `due_ms`.
    pub fn push(&mut self, due_ms: i64, item: T) {
        self.items.insert((due_ms, self.next), item);
        self.next += 1;
    }

    /// The earliest due instant held.
    pub fn next_due(&self) -> Option<i64> {
        self.items.keys().next().map(|(t, _)| *t)
    }

    /// Takes every item due at or before `now_ms`, earliest first, with its due instant.
    pub fn take_due(&mut self, now_ms: i64) -> Vec<(i64, T)> {
        let later = self.items.split_off(&(now_ms + 1, 0));
        std::mem::replace(&mut self.items, later)
            .into_iter()
            .map(|((t, _), item)| (t, item))
            .collect()
    }

    /// Takes everything, e.g. to hand it back when leadership ends.
    pub fn drain(&mut self) -> Vec<T> {
        std::mem::take(&mut self.items).into_values().collect()
    }

    /// How many items are held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// `true` when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

// ---- uniqueness ---------------------------------------------------------------------------------

/// The `drover-unique` key of `unique_key` in `queue`: `<queue>.<sha256 hex>`.
pub fn unique_kv_key(queue: &str, unique_key: &str) -> String {
    let digest = Sha256::digest(unique_key.as_bytes());
    let mut key = String::with_capacity(queue.len() + 65);
    key.push_str(queue);
    key.push('.');
    for b in digest {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// The claim's TTL: the window rounded up to whole seconds (at least one).
pub fn ttl_secs(window_ms: u64) -> u64 {
    window_ms.div_ceil(1000).max(1)
}

/// The value of a `drover-unique` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The task holding the key, when its id was known at claim time.
    #[serde(default)]
    pub task: Option<String>,
    /// The claim token of the validated submit that took it.
    #[serde(default)]
    pub claim: Option<String>,
    /// The queue.
    pub queue: String,
    /// The `unique_key` as submitted.
    pub unique_key: String,
    /// When the window ends (RFC 3339).
    pub until: String,
}

impl Claim {
    /// A claim of `window` for task `task` (if known) with token `claim`, made at `now_ms`.
    pub fn new(
        queue: &str,
        window: &UniqueWindow,
        task: Option<&str>,
        claim: Option<&str>,
        now_ms: i64,
    ) -> Self {
        let until_ms = now_ms.saturating_add((ttl_secs(window.window_ms) * 1000) as i64);
        let until = DateTime::from_timestamp_millis(until_ms).unwrap_or_else(Utc::now);
        Self {
            task: task.map(str::to_owned),
            claim: claim.map(str::to_owned),
            queue: queue.to_owned(),
            unique_key: window.key.clone(),
            until: format_time(&until),
        }
    }

    /// `true` if this claim belongs to task `task` or to the submission carrying `claim`.
    pub fn is_own(&self, task: Option<&str>, claim: Option<&str>) -> bool {
        (task.is_some() && self.task.as_deref() == task)
            || (claim.is_some() && self.claim.as_deref() == claim)
    }

    /// The `duplicate` error for another task with this key, at `index` of an array.
    pub fn duplicate_error(&self, index: Option<usize>) -> ApiError {
        let holder = match &self.task {
            Some(t) => format!("task {t:?}"),
            None => "an earlier submission".to_owned(),
        };
        let e = ApiError::new(
            ErrorCode::Duplicate,
            format!(
                "unique_key {:?} is already taken in queue {:?} by {holder} until {} (its unique_for_ms window); submit it after the window ends, or with another unique_key",
                self.unique_key, self.queue, self.until
            ),
        )
        .with_field("unique_key");
        match index {
            Some(i) => e.at_index(i),
            None => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> TaskSpec {
        TaskSpec::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn plans_future_times_only() {
        let now = 1_700_000_000_000;
        assert_eq!(Plan::of(&spec(r#"{"type":"a"}"#), now), Plan::default());
        assert_eq!(
            Plan::of(&spec(r#"{"type":"a","delay_ms":0}"#), now).due_ms,
            None
        );
        assert_eq!(
            Plan::of(&spec(r#"{"type":"a","delay_ms":1500}"#), now).due_ms,
            Some(now + 1500)
        );
        let past = r#"{"type":"a","run_at":"2001-01-01T00:00:00Z"}"#;
        assert_eq!(Plan::of(&spec(past), now).due_ms, None);
        let future = r#"{"type":"a","run_at":"2100-01-01T00:00:00.250Z"}"#;
        assert_eq!(Plan::of(&spec(future), now).due_ms, Some(4_102_444_800_250));
        let u = Plan::of(
            &spec(r#"{"type":"a","unique_key":"k","unique_for_ms":1500}"#),
            now,
        );
        assert_eq!(
            u.unique,
            Some(UniqueWindow {
                key: "k".into(),
                window_ms: 1500
            })
        );
    }

    #[test]
    fn timers_fire_ahead_or_go_straight_to_due() {
        let names = Names::default();
        assert_eq!(timer_route(10_000, 0), TimerRoute::Schedule(9_000));
        assert_eq!(timer_route(1_200, 0), TimerRoute::Direct);
        let delay = TimerId::Delay { intake_seq: 7 };
        let (subject, h) = timer_headers(&names, "mail", "t1", delay, 10_000, 0);
        assert_eq!(subject, "drover.delayed.mail.t1");
        assert!(h.contains(&("Nats-Msg-Id", "delay-t1-7".into())));
        assert!(h.contains(&(HDR_DUE, "10000".into())));
        assert!(h.contains(&("Nats-Schedule", "@at 1970-01-01T00:00:09.000Z".into())));
        assert!(h.contains(&("Nats-Schedule-Target", "drover.due.mail".into())));
        let (subject, h) = timer_headers(&names, "mail", "t1", delay, 500, 0);
        assert_eq!(subject, "drover.due.mail");
        assert!(!h.iter().any(|(k, _)| k.starts_with("Nats-Schedule")));
        // A retry takes the same route, with an id of its own per failed attempt.
        let retry = TimerId::Retry {
            attempt: 2,
            failed_started_ms: 42,
        };
        let (subject, h) = timer_headers(&names, "mail", "t1", retry, 10_000, 0);
        assert_eq!(subject, "drover.delayed.mail.t1");
        assert!(h.contains(&("Nats-Msg-Id", "retry-t1-2-42".into())));
        assert!(h.contains(&(HDR_DUE, "10000".into())));
        assert!(h.contains(&("Nats-Schedule", "@at 1970-01-01T00:00:09.000Z".into())));
        assert_eq!(due_of(Some("123")), Some(123));
        assert_eq!(due_of(Some("x")), None);
        assert_eq!(due_of(None), None);
    }

    #[test]
    fn held_timers_come_out_in_time_order() {
        let mut h = Held::default();
        h.push(30, "c");
        h.push(10, "a");
        h.push(10, "b");
        h.push(20, "x");
        assert_eq!(h.next_due(), Some(10));
        assert_eq!(h.take_due(9), vec![]);
        assert_eq!(h.take_due(20), vec![(10, "a"), (10, "b"), (20, "x")]);
        assert_eq!(h.len(), 1);
        assert_eq!(h.next_due(), Some(30));
        assert_eq!(h.drain(), vec!["c"]);
        assert!(h.is_empty());
    }

    #[test]
    fn unique_keys_and_claims() {
        let k = unique_kv_key("mail", "abc");
        assert_eq!(
            k,
            "mail.ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ttl_secs(1), 1);
        assert_eq!(ttl_secs(1000), 1);
        assert_eq!(ttl_secs(1001), 2);
        let w = UniqueWindow {
            key: "abc".into(),
            window_ms: 1500,
        };
        let c = Claim::new("mail", &w, Some("t1"), Some("tok"), 0);
        assert_eq!(c.until, "1970-01-01T00:00:02.000Z");
        assert!(c.is_own(Some("t1"), None));
        assert!(c.is_own(Some("t2"), Some("tok")));
        assert!(!c.is_own(Some("t2"), Some("other")));
        assert!(!c.is_own(None, None));
        let e = c.duplicate_error(Some(3));
        assert_eq!(e.code, ErrorCode::Duplicate);
        assert_eq!(e.index, Some(3));
        assert!(e.message.contains("\"abc\"") && e.message.contains("t1"));
    }
}
