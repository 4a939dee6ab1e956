//! Which queues need a new assignment, and when — a state machine without I/O ([`Planner`]);
//! what to write for each is [`super::decide()`].
//!
//! The async loop feeds the planner the entries of two KV watches (every key of
//! `drover-workers`, and of `drover-state`, where it picks `queue.*` and `assignment.*`) and timer ticks as [`Event`]s, with the time
//! passed in, and carries out the [`Action`]s. The planner never acts on a partial view: it
//! stays quiet until both watches have delivered their initial values, and again after a watch
//! was lost until it is back.

use super::record::{self, AssignmentRecord, StateKey, WorkerEntry};
use bytes::Bytes;
use drover_shared::ring::{self, Member};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Rechecks (worker TTLs) without a heartbeat after which a worker counts as gone even though
/// its key's expiry marker never came. The server does not place the marker when a key expires
/// while its stream has no leader (a NATS node just died): without this, a dead worker kept
/// its partitions for good (seen in the chaos suite). A live worker heartbeats several times
/// per TTL, so two TTLs of silence only happen to dead or cut-off workers.
pub const SILENT_RECHECKS: u32 = 2;

/// Timing and defaults of the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannerConfig {
    /// Partitions of a queue without a `queue.<queue>` record (the dispatcher's `--partitions`).
    pub default_partitions: u32,
    /// How long changes are gathered before acting, so a burst (workers starting together)
    /// becomes one write per queue.
    pub debounce: Duration,
    /// Every queue is re-checked this often even without changes (the worker TTL), in case a
    /// watch missed something.
    pub recheck: Duration,
    /// Delay before a queue whose write failed is tried again.
    pub retry: Duration,
}

/// One of the two watches the planner is fed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// `drover-workers`.
    Workers,
    /// `drover-state`.
    State,
}

/// What the loop observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed; check deadlines.
    Tick,
    /// An entry of `drover-workers`: `Some(value)` for a put, `None` for a delete, purge or
    /// expiry marker (the worker is gone).
    Worker {
        /// The key: the worker id.
        id: String,
        /// The record, or `None` when the key is gone.
        value: Option<Bytes>,
        /// How long before it was observed the record was written.
        age: Duration,
    },
    /// An entry of `drover-state` (any key; the planner picks its own).
    State {
        /// The key.
        key: String,
        /// The value, or `None` when the key is gone.
        value: Option<Bytes>,
    },
    /// The watch has delivered every value that existed when it started.
    Synced(Feed),
    /// The watch was lost: forget what it said until it is [`Event::Synced`] again.
    Reset(Feed),
    /// Writing `queue`'s assignment failed (NATS error); try again later.
    Failed {
        /// The queue.
        queue: String,
    },
}

/// What one queue's assignment should be computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The queue.
    pub queue: String,
    /// Its partition count.
    pub partitions: u32,
    /// Its live workers with a positive weight, sorted by id.
    pub members: Vec<Member>,
}

/// What the loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read `assignment.<queue>`, [`super::decide()`], and write by compare-and-set.
    Reconcile(Target),
    /// An assignment written in a later term was seen: stop assigning.
    Deposed {
        /// The epoch of that write.
        epoch: u64,
    },
    /// A record was skipped or corrected; log it.
    Warn {
        /// The key of the record.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

/// The leader's view of the fleet for one term, deciding when each queue is re-assigned.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: PlannerConfig,
    epoch: u64,
    /// Live workers with a valid record.
    workers: BTreeMap<String, WorkerEntry>,
    /// When each worker's last record (put) was seen.
    seen: BTreeMap<String, Instant>,
    /// Workers whose last record was skipped, with the reason already reported.
    malformed: BTreeMap<String, String>,
    /// Partition counts from `queue.<queue>` records.
    queue_partitions: BTreeMap<String, u32>,
    /// Queues that have an assignment record (seen on the watch, or written this term).
    assigned: BTreeSet<String>,
    dirty: BTreeSet<String>,
    due_at: Option<Instant>,
    next_recheck: Option<Instant>,
    workers_synced: bool,
    state_synced: bool,
    deposed: bool,
}

impl Planner {
    /// A planner for the term `epoch`, knowing nothing yet.
    pub fn new(cfg: PlannerConfig, epoch: u64) -> Self {
        Self {
            cfg,
            epoch,
            workers: BTreeMap::new(),
            seen: BTreeMap::new(),
            malformed: BTreeMap::new(),
            queue_partitions: BTreeMap::new(),
            assigned: BTreeSet::new(),
            dirty: BTreeSet::new(),
            due_at: None,
            next_recheck: None,
            workers_synced: false,
            state_synced: false,
            deposed: false,
        }
    }

    /// `true` once both watches delivered their initial values (and none was lost since).
    pub fn is_synced(&self) -> bool {
        self.workers_synced && self.state_synced
    }

    /// When the loop should next send [`Event::Tick`]; `None` while waiting on the watches.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.deposed || !self.is_synced() {
            return None;
        }
        match (self.due_at, self.next_recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every queue the leader assigns: named by a live worker, with a queue record, or with an
    /// assignment record (so a queue whose last worker left gets its empty assignment).
    pub fn queues(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.queue_partitions.keys().cloned().collect();
        all.extend(self.assigned.iter().cloned());
        for w in self.workers.values() {
            all.extend(w.queues.iter().cloned());
        }
        all
    }

    /// What `queue`'s assignment is computed from right now.
    pub fn target(&self, queue: &str) -> Target {
        Target {
            queue: queue.to_owned(),
            partitions: self
                .queue_partitions
                .get(queue)
                .copied()
                .unwrap_or(self.cfg.default_partitions),
            members: self
                .workers
                .iter()
                .filter(|(_, w)| w.weight > 0 && w.queues.contains(queue))
                .map(|(id, w)| Member::new(id.clone(), w.weight))
                .collect(),
        }
    }

    /// Applies one event at `now`.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.deposed {
            return actions;
        }
        match event {
            Event::Tick => self.tick(now, &mut actions),
            Event::Worker { id, value, age } => {
                let written = now.checked_sub(age).unwrap_or(now);
                self.worker(id, value, written.min(now), now, &mut actions)
            }
            Event::State { key, value } => self.state(&key, value, now, &mut actions),
            Event::Synced(feed) => {
                match feed {
                    Feed::Workers => self.workers_synced = true,
                    Feed::State => self.state_synced = true,
                }
                if self.is_synced() {
                    // A complete view again: check every queue at once.
                    self.dirty.extend(self.queues());
                    self.due_at = Some(now);
                    self.next_recheck = Some(now + self.cfg.recheck);
                }
            }
            Event::Reset(feed) => match feed {
                Feed::Workers => {
                    self.workers_synced = false;
                    self.workers.clear();
                    self.seen.clear();
                    self.malformed.clear();
                }
                Feed::State => {
                    self.state_synced = false;
                    self.queue_partitions.clear();
                    self.assigned.clear();
                }
            },
            Event::Failed { queue } => {
                self.dirty.insert(queue);
                self.due_at.get_or_insert(now + self.cfg.retry);
            }
        }
        actions
    }

    /// Marks `queue` for a check after the debounce (sooner if something else is due sooner,
    /// never later: a pending retry does not hold back a new change).
    fn mark(&mut self, queue: &str, now: Instant) {
        self.dirty.insert(queue.to_owned());
        let due = now + self.cfg.debounce;
        self.due_at = Some(self.due_at.map_or(due, |t| t.min(due)));
    }

    /// How long a worker may go without a record seen before it counts as gone although no
    /// expiry marker came: [`SILENT_RECHECKS`] rechecks (worker TTLs).
    pub fn silence(&self) -> Duration {
        self.cfg.recheck * SILENT_RECHECKS
    }

    fn tick(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if !self.is_synced() {
            return;
        }
        let silence = self.silence();
        let silent: Vec<String> = self
            .seen
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= silence)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            actions.push(Action::Warn {
                key: id.clone(),
                reason: format!(
                    "no heartbeat seen for {silence:?} and no expiry marker: treated as gone"
                ),
            });
            self.worker(id, None, now, now, actions);
        }
        if self.next_recheck.is_some_and(|t| now >= t) {
            self.dirty.extend(self.queues());
            self.due_at = Some(now);
            self.next_recheck = Some(now + self.cfg.recheck);
        }
        if self.due_at.is_some_and(|t| now >= t) {
            self.due_at = None;
            for queue in std::mem::take(&mut self.dirty) {
                let target = self.target(&queue);
                // The write creates the record if it is missing.
                self.assigned.insert(queue);
                actions.push(Action::Reconcile(target));
            }
        }
    }

    fn worker(
        &mut self,
        id: String,
        value: Option<Bytes>,
        written: Instant,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let parsed = value.map(|v| record::parse_worker(&v));
        let new = match parsed {
            None => {
                self.malformed.remove(&id);
                None
            }
            Some(Ok(entry)) => {
                self.malformed.remove(&id);
                if let Some(asked) = entry.capped_from
                    && self
                        .workers
                        .get(&id)
                        .is_none_or(|w| w.capped_from != Some(asked))
                {
                    actions.push(Action::Warn {
                        key: id.clone(),
                        reason: format!(
                            "capacity {asked} is above the largest ring weight {}; using {}",
                            ring::MAX_WEIGHT,
                            entry.weight
                        ),
                    });
                }
                Some(entry)
            }
            Some(Err(e)) => {
                let reason = format!("worker record skipped: {e}");
                if self.malformed.get(&id) != Some(&reason) {
                    actions.push(Action::Warn {
                        key: id.clone(),
                        reason: reason.clone(),
                    });
                    self.malformed.insert(id.clone(), reason);
                }
                None
            }
        };
        if new.is_some() {
            self.seen.insert(id.clone(), written);
        } else {
            self.seen.remove(&id);
        }
        let old = match &new {
            Some(entry) => self.workers.insert(id, entry.clone()),
            None => self.workers.remove(&id),
        };
        // A renewal with the same queues and weight changes nothing.
        let weight = |w: &Option<WorkerEntry>| w.as_ref().map_or(0, |w| w.weight);
        let queues =
            |w: &Option<WorkerEntry>| w.as_ref().map(|w| w.queues.clone()).unwrap_or_default();
        let (before, after) = (queues(&old), queues(&new));
        let changed: Vec<String> = if weight(&old) == weight(&new) {
            before.symmetric_difference(&after).cloned().collect()
        } else {
            before.union(&after).cloned().collect()
        };
        for queue in changed {
            self.mark(&queue, now);
        }
    }

    fn state(&mut self, key: &str, value: Option<Bytes>, now: Instant, actions: &mut Vec<Action>) {
        match StateKey::parse(key) {
            StateKey::Other => {}
            StateKey::Queue(queue) => {
                let partitions = match value.map(|v| record::parse_queue_partitions(&v)) {
                    Some(Ok(p)) => Some(p),
                    Some(Err(e)) => {
                        actions.push(Action::Warn {
                            key: key.to_owned(),
                            reason: format!(
                                "queue record ignored ({e}); using {} partitions",
                                self.cfg.default_partitions
                            ),
                        });
                        None
                    }
                    None => None,
                };
                let old = match partitions {
                    Some(p) => self.queue_partitions.insert(queue.to_owned(), p),
                    None => self.queue_partitions.remove(queue),
                };
                if old != partitions {
                    self.mark(queue, now);
                }
            }
            StateKey::Assignment(queue) => {
                let new = self.assigned.insert(queue.to_owned());
                let epoch = value
                    .as_deref()
                    .map(|v| AssignmentRecord::parse(v).map(|r| r.epoch));
                match epoch {
                    Some(Ok(e)) if e > self.epoch => {
                        self.deposed = true;
                        actions.push(Action::Deposed { epoch: e });
                    }
                    // Our own write coming back: nothing to do (unless we had never seen it).
                    Some(Ok(e)) if e == self.epoch && !new => {}
                    // Missing, deleted, unreadable, or written in an earlier term: check it.
                    _ => self.mark(queue, now),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 42;

    fn cfg() -> PlannerConfig {
        PlannerConfig {
            default_partitions: 16,
            debounce: ms(30),
            recheck: ms(3000),
            retry: ms(500),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn heartbeat(queues: &[&str], capacity: u32) -> Option<Bytes> {
        let v = serde_json::json!({
            "id": "ignored", "queues": queues, "capacity": capacity, "running": 0,
            "load": {"cpu": 0.1, "mem": 1}, "version": "0.1.0", "host": "h", "pid": 1,
        });
        Some(Bytes::from(v.to_string()))
    }

    fn worker(id: &str, queues: &[&str], capacity: u32) -> Event {
        Event::Worker {
            id: id.into(),
            value: heartbeat(queues, capacity),
            age: Duration::ZERO,
        }
    }

    fn gone(id: &str) -> Event {
        Event::Worker {
            id: id.into(),
            value: None,
            age: Duration::ZERO,
        }
    }

    fn state(key: &str, json: &str) -> Event {
        Event::State {
            key: key.into(),
            value: Some(Bytes::from(json.to_owned())),
        }
    }

    /// A planner with both watches synced on an empty fleet at `t0`.
    fn synced(t0: Instant) -> Planner {
        let mut p = Planner::new(cfg(), EPOCH);
        assert!(p.on_event(Event::Synced(Feed::Workers), t0).is_empty());
        assert!(p.on_event(Event::Synced(Feed::State), t0).is_empty());
        assert!(p.on_event(Event::Tick, t0).is_empty(), "nothing to assign");
        p
    }

    /// A reconciled target as (queue, partitions, [(member, weight)]).
    type Reconciled = (String, u32, Vec<(String, u32)>);

    fn reconciled(actions: &[Action]) -> Vec<Reconciled> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Reconcile(t) => Some((
                    t.queue.clone(),
                    t.partitions,
                    t.members.iter().map(|m| (m.id.clone(), m.weight)).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_burst_of_joins_is_one_reconcile_per_queue_after_the_debounce() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(worker("w2", &["default", "mail"], 2), t0 + ms(5));
        p.on_event(worker("w3", &["default"], 1), t0 + ms(10));
        assert_eq!(p.next_deadline(), Some(t0 + ms(30)));
        assert!(p.on_event(Event::Tick, t0 + ms(29)).is_empty());
        let acts = p.on_event(Event::Tick, t0 + ms(30));
        assert_eq!(
            reconciled(&acts),
            vec![
                (
                    "default".into(),
                    16,
                    vec![("w1".into(), 1), ("w2".into(), 2), ("w3".into(), 1)]
                ),
                ("mail".into(), 16, vec![("w2".into(), 2)]),
            ]
        );
        assert_eq!(p.next_deadline(), Some(t0 + ms(3000)), "only the recheck");
    }

    #[test]
    fn a_worker_silent_for_two_ttls_is_gone_even_without_an_expiry_marker() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(worker("w2", &["default"], 1), t0);
        p.on_event(Event::Tick, t0 + ms(30));
        // w2 keeps heartbeating; w1 died and its key expired without a marker.
        let mut t = t0;
        while t + ms(500) < t0 + ms(6000) {
            t += ms(500);
            p.on_event(worker("w2", &["default"], 1), t);
            let acts = p.on_event(Event::Tick, t);
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Warn { .. })),
                "nobody is silent yet at {:?}",
                t - t0
            );
        }
        let at = t0 + ms(6000);
        let mut acts = p.on_event(Event::Tick, at);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Warn { key, .. } if key == "w1")),
            "{acts:?}"
        );
        acts.extend(p.on_event(Event::Tick, at + ms(30)));
        assert_eq!(
            reconciled(&acts),
            vec![("default".into(), 16, vec![("w2".into(), 1)])]
        );
    }

    #[test]
    fn an_old_record_delivered_by_a_new_watch_counts_from_when_it_was_written() {
        let t0 = Instant::now() + ms(60_000);
        let mut p = Planner::new(cfg(), EPOCH);
        // A dead worker's record, written 5.9 s before this term's watch started.
        p.on_event(
            Event::Worker {
                id: "dead".into(),
                value: heartbeat(&["default"], 1),
                age: ms(5900),
            },
            t0,
        );
        p.on_event(Event::Synced(Feed::Workers), t0);
        p.on_event(Event::Synced(Feed::State), t0);
        let mut acts = p.on_event(Event::Tick, t0 + ms(100));
        acts.extend(p.on_event(Event::Tick, t0 + ms(130)));
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Warn { key, .. } if key == "dead")),
            "{acts:?}"
        );
        assert_eq!(reconciled(&acts).last().map(|r| r.2.len()), Some(0));
    }

    #[test]
    fn heartbeat_renewals_change_nothing_but_queue_and_weight_changes_do() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["a", "b"], 1), t0);
        p.on_event(Event::Tick, t0 + ms(30));
        // Renewals (running/load differ, queues and capacity the same).
        for i in 1..10 {
            assert!(
                p.on_event(worker("w1", &["b", "a"], 1), t0 + ms(100 * i))
                    .is_empty()
            );
        }
        assert!(p.on_event(Event::Tick, t0 + ms(1000)).is_empty());
        // Dropping a queue touches only that queue.
        p.on_event(worker("w1", &["a"], 1), t0 + ms(1000));
        let acts = p.on_event(Event::Tick, t0 + ms(1030));
        assert_eq!(reconciled(&acts), vec![("b".into(), 16, vec![])]);
        // A weight change touches every queue of the worker.
        p.on_event(worker("w1", &["a"], 3), t0 + ms(1100));
        let acts = p.on_event(Event::Tick, t0 + ms(1130));
        assert_eq!(
            reconciled(&acts),
            vec![("a".into(), 16, vec![("w1".into(), 3)])]
        );
        // Capacity 0 (draining) takes it out of the ring.
        p.on_event(worker("w1", &["a"], 0), t0 + ms(1200));
        let acts = p.on_event(Event::Tick, t0 + ms(1230));
        assert_eq!(reconciled(&acts), vec![("a".into(), 16, vec![])]);
    }

    #[test]
    fn expiry_or_delete_removes_a_worker_and_its_queue_stays_assigned_empty() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(worker("w2", &["default"], 1), t0);
        p.on_event(Event::Tick, t0 + ms(30));
        p.on_event(gone("w1"), t0 + ms(100));
        let acts = p.on_event(Event::Tick, t0 + ms(130));
        assert_eq!(
            reconciled(&acts),
            vec![("default".into(), 16, vec![("w2".into(), 1)])]
        );
        p.on_event(gone("w2"), t0 + ms(200));
        let acts = p.on_event(Event::Tick, t0 + ms(230));
        assert_eq!(reconciled(&acts), vec![("default".into(), 16, vec![])]);
        // Still re-checked (its record exists), with no members.
        let acts = p.on_event(Event::Tick, t0 + ms(3000));
        assert_eq!(reconciled(&acts), vec![("default".into(), 16, vec![])]);
        // A gone key of a worker never seen does nothing.
        assert!(p.on_event(gone("ghost"), t0 + ms(3001)).is_empty());
        assert_eq!(p.next_deadline(), Some(t0 + ms(6000)));
    }

    #[test]
    fn malformed_records_are_skipped_with_one_warning() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(Event::Tick, t0 + ms(30));
        let bad = || Event::Worker {
            id: "w1".into(),
            value: Some(Bytes::from_static(b"{oops")),
            age: Duration::ZERO,
        };
        let acts = p.on_event(bad(), t0 + ms(100));
        assert!(matches!(&acts[..], [Action::Warn { key, .. }] if key == "w1"));
        assert!(p.on_event(bad(), t0 + ms(1100)).is_empty(), "warned once");
        // The worker is no longer a member.
        let acts = p.on_event(Event::Tick, t0 + ms(1100));
        assert_eq!(reconciled(&acts), vec![("default".into(), 16, vec![])]);
        // An invalid queue name and an oversized capacity.
        let acts = p.on_event(worker("w2", &["Not Valid"], 1), t0 + ms(1200));
        assert!(matches!(&acts[..], [Action::Warn { key, reason }]
            if key == "w2" && reason.contains("Not Valid")));
        let acts = p.on_event(worker("w3", &["default"], 500), t0 + ms(1200));
        assert!(matches!(&acts[..], [Action::Warn { key, .. }] if key == "w3"));
        assert!(
            p.on_event(worker("w3", &["default"], 500), t0 + ms(1300))
                .is_empty()
        );
        let acts = p.on_event(Event::Tick, t0 + ms(1300));
        assert_eq!(
            reconciled(&acts),
            vec![("default".into(), 16, vec![("w3".into(), ring::MAX_WEIGHT)])]
        );
        // A good record again makes it a member again.
        p.on_event(worker("w1", &["default"], 1), t0 + ms(1400));
        let acts = p.on_event(Event::Tick, t0 + ms(1430));
        assert_eq!(reconciled(&acts)[0].2.len(), 2);
    }

    #[test]
    fn queue_records_set_partitions_and_add_queues_without_workers() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(
            state("queue.emails", r#"{"partitions":8,"created_epoch":1}"#),
            t0,
        );
        p.on_event(state("cron.nightly", r#"{"x":1}"#), t0);
        p.on_event(state("scaling.emails", r#"{"x":1}"#), t0);
        let acts = p.on_event(Event::Tick, t0 + ms(30));
        assert_eq!(reconciled(&acts), vec![("emails".into(), 8, vec![])]);
        // Rewriting the same record changes nothing; a bad one falls back to the default.
        p.on_event(state("queue.emails", r#"{"partitions":8}"#), t0 + ms(40));
        assert!(p.on_event(Event::Tick, t0 + ms(80)).is_empty());
        let acts = p.on_event(state("queue.emails", r#"{"partitions":0}"#), t0 + ms(100));
        assert!(matches!(&acts[..], [Action::Warn { .. }]));
        let acts = p.on_event(Event::Tick, t0 + ms(130));
        assert_eq!(reconciled(&acts), vec![("emails".into(), 16, vec![])]);
    }

    #[test]
    fn nothing_happens_before_both_watches_are_synced_then_everything_is_checked() {
        let t0 = Instant::now();
        let mut p = Planner::new(cfg(), EPOCH);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(state("queue.emails", r#"{"partitions":4}"#), t0);
        p.on_event(
            state(
                "assignment.old",
                r#"{"epoch":3,"version":9,"partitions":{},"members":{}}"#,
            ),
            t0,
        );
        assert_eq!(p.next_deadline(), None);
        assert!(p.on_event(Event::Tick, t0 + ms(100)).is_empty());
        p.on_event(Event::Synced(Feed::Workers), t0 + ms(100));
        assert!(p.on_event(Event::Tick, t0 + ms(200)).is_empty());
        p.on_event(Event::Synced(Feed::State), t0 + ms(200));
        assert_eq!(p.next_deadline(), Some(t0 + ms(200)));
        let acts = p.on_event(Event::Tick, t0 + ms(200));
        let queues: Vec<String> = reconciled(&acts).into_iter().map(|r| r.0).collect();
        assert_eq!(queues, ["default", "emails", "old"]);
    }

    #[test]
    fn a_lost_watch_pauses_planning_until_it_is_back() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(Event::Reset(Feed::Workers), t0 + ms(1));
        assert_eq!(p.next_deadline(), None);
        assert!(p.on_event(Event::Tick, t0 + ms(100)).is_empty());
        // The new watch re-delivers what exists (w1 has expired meanwhile, w2 joined).
        p.on_event(worker("w2", &["default"], 1), t0 + ms(200));
        p.on_event(Event::Synced(Feed::Workers), t0 + ms(200));
        let acts = p.on_event(Event::Tick, t0 + ms(200));
        assert_eq!(
            reconciled(&acts),
            vec![("default".into(), 16, vec![("w2".into(), 1)])]
        );
    }

    #[test]
    fn assignments_seen_on_the_watch() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(Event::Tick, t0 + ms(30));
        // Our own write coming back: nothing.
        let own = r#"{"epoch":42,"version":1,"partitions":{"0":"w1"},"members":{"w1":1}}"#;
        assert!(
            p.on_event(state("assignment.default", own), t0 + ms(40))
                .is_empty()
        );
        assert!(p.on_event(Event::Tick, t0 + ms(100)).is_empty());
        // Deleted by an operator, or written by an older leader: re-checked.
        p.on_event(
            Event::State {
                key: "assignment.default".into(),
                value: None,
            },
            t0 + ms(200),
        );
        assert_eq!(reconciled(&p.on_event(Event::Tick, t0 + ms(230))).len(), 1);
        let old = r#"{"epoch":41,"version":2,"partitions":{},"members":{}}"#;
        p.on_event(state("assignment.default", old), t0 + ms(300));
        assert_eq!(reconciled(&p.on_event(Event::Tick, t0 + ms(330))).len(), 1);
        // Written in a later term: deposed, and silent from then on.
        let newer = r#"{"epoch":43,"version":3,"partitions":{},"members":{}}"#;
        let acts = p.on_event(state("assignment.default", newer), t0 + ms(400));
        assert_eq!(acts, vec![Action::Deposed { epoch: 43 }]);
        assert_eq!(p.next_deadline(), None);
        assert!(
            p.on_event(worker("w2", &["default"], 1), t0 + ms(500))
                .is_empty()
        );
        assert!(p.on_event(Event::Tick, t0 + ms(9000)).is_empty());
    }

    #[test]
    fn a_failed_write_is_retried_later() {
        let t0 = Instant::now();
        let mut p = synced(t0);
        p.on_event(worker("w1", &["default"], 1), t0);
        p.on_event(Event::Tick, t0 + ms(30));
        p.on_event(
            Event::Failed {
                queue: "default".into(),
            },
            t0 + ms(31),
        );
        assert_eq!(p.next_deadline(), Some(t0 + ms(531)));
        assert!(p.on_event(Event::Tick, t0 + ms(500)).is_empty());
        assert_eq!(reconciled(&p.on_event(Event::Tick, t0 + ms(531))).len(), 1);
        // A change while a retry is pending is not held back by it.
        p.on_event(
            Event::Failed {
                queue: "default".into(),
            },
            t0 + ms(600),
        );
        p.on_event(worker("w2", &["mail"], 1), t0 + ms(610));
        assert_eq!(p.next_deadline(), Some(t0 + ms(640)));
        let queues: Vec<String> = reconciled(&p.on_event(Event::Tick, t0 + ms(640)))
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(queues, ["default", "mail"]);
    }
}
