//! The worker's partition set (SPEC §4, §6): a pure state machine fed with the
//! `assignment.<queue>` records the leader writes, emitting which partition consumers to start
//! and stop. Records from an older leader term (epoch lower than the highest seen for the queue)
//! are ignored, as are records of queues this worker does not serve.
//!
//! Stopping a partition only stops *pulling* it: the batch in flight finishes and is acked, so
//! nothing is dropped, and (with the partition consumer's `max_ack_pending = 1`) its new owner
//! gets the next batch only after that ack, so nothing runs twice.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// What to do with one partition consumer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Start pulling `partition` of `queue`.
    Start {
        /// Queue.
        queue: String,
        /// Partition.
        partition: u32,
    },
    /// Stop pulling it (the batch in flight finishes).
    Stop {
        /// Queue.
        queue: String,
        /// Partition.
        partition: u32,
    },
}

/// The part of `assignment.<queue>` a worker reads; unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AssignmentView {
    /// Leader term that wrote it.
    pub epoch: u64,
    /// Write counter of the key.
    #[serde(default)]
    pub version: u64,
    /// Partition → owner.
    #[serde(default)]
    pub partitions: BTreeMap<u32, String>,
}

impl AssignmentView {
    /// Parses a stored record.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[derive(Debug, Default, Clone)]
struct QueueState {
    epoch: u64,
    version: u64,
    owned: BTreeSet<u32>,
}

/// The partitions this worker pulls, per queue.
#[derive(Debug, Clone)]
pub struct PartitionSet {
    worker: String,
    queues: BTreeMap<String, QueueState>,
}

impl PartitionSet {
    /// An empty set for `worker`, serving `queues`.
    pub fn new(worker: impl Into<String>, queues: impl IntoIterator<Item = String>) -> Self {
        Self {
            worker: worker.into(),
            queues: queues
                .into_iter()
                .map(|q| (q, QueueState::default()))
                .collect(),
        }
    }

    /// The partitions of `queue` currently owned.
    pub fn owned(&self, queue: &str) -> BTreeSet<u32> {
        self.queues
            .get(queue)
            .map(|q| q.owned.clone())
            .unwrap_or_default()
    }

    /// Number of partitions owned over all queues.
    pub fn len(&self) -> usize {
        self.queues.values().map(|q| q.owned.len()).sum()
    }

    /// `true` when no partition is owned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new `assignment.<queue>` record: the partitions to start and stop.
    pub fn on_assignment(&mut self, queue: &str, record: &AssignmentView) -> Vec<Action> {
        let Some(state) = self.queues.get_mut(queue) else {
            return Vec::new();
        };
        if record.epoch < state.epoch
            || (record.epoch == state.epoch
                && record.version != 0
                && record.version < state.version)
        {
            return Vec::new();
        }
        state.epoch = record.epoch;
        state.version = record.version;
        let next: BTreeSet<u32> = record
            .partitions
            .iter()
            .filter(|(_, owner)| **owner == self.worker)
            .map(|(&p, _)| p)
            .collect();
        let mut actions: Vec<Action> = state
            .owned
            .difference(&next)
            .map(|&partition| Action::Stop {
                queue: queue.to_owned(),
                partition,
            })
            .collect();
        actions.extend(
            next.difference(&state.owned)
                .map(|&partition| Action::Start {
                    queue: queue.to_owned(),
                    partition,
                }),
        );
        state.owned = next;
        actions
    }

    /// The assignment key was deleted or purged: stop every partition of `queue` (the epoch
    /// floor stays).
    pub fn on_removed(&mut self, queue: &str) -> Vec<Action> {
        let Some(state) = self.queues.get_mut(queue) else {
            return Vec::new();
        };
        std::mem::take(&mut state.owned)
            .into_iter()
            .map(|partition| Action::Stop {
                queue: queue.to_owned(),
                partition,
            })
            .collect()
    }

    /// Shutdown: stop everything.
    pub fn stop_all(&mut self) -> Vec<Action> {
        let queues: Vec<String> = self.queues.keys().cloned().collect();
        queues.iter().flat_map(|q| self.on_removed(q)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: u64, version: u64, owners: &[(u32, &str)]) -> AssignmentView {
        AssignmentView {
            epoch,
            version,
            partitions: owners.iter().map(|(p, w)| (*p, (*w).to_owned())).collect(),
        }
    }

    fn start(p: u32) -> Action {
        Action::Start {
            queue: "q".into(),
            partition: p,
        }
    }

    fn stop(p: u32) -> Action {
        Action::Stop {
            queue: "q".into(),
            partition: p,
        }
    }

    #[test]
    fn starts_and_stops_the_difference() {
        let mut s = PartitionSet::new("w1", ["q".to_owned()]);
        assert_eq!(
            s.on_assignment("q", &rec(1, 1, &[(0, "w1"), (1, "w2"), (2, "w1")])),
            vec![start(0), start(2)]
        );
        assert_eq!(
            s.on_assignment("q", &rec(1, 2, &[(0, "w2"), (1, "w1"), (2, "w1")])),
            vec![stop(0), start(1)]
        );
        assert_eq!(s.owned("q"), [1, 2].into());
        assert_eq!(s.len(), 2);
        // The same record again changes nothing.
        assert!(
            s.on_assignment("q", &rec(1, 2, &[(0, "w2"), (1, "w1"), (2, "w1")]))
                .is_empty()
        );
    }

    #[test]
    fn ignores_older_epochs_and_versions_and_other_queues() {
        let mut s = PartitionSet::new("w1", ["q".to_owned()]);
        s.on_assignment("q", &rec(5, 10, &[(0, "w1")]));
        assert!(s.on_assignment("q", &rec(4, 11, &[(1, "w1")])).is_empty());
        assert!(s.on_assignment("q", &rec(5, 9, &[(1, "w1")])).is_empty());
        assert!(
            s.on_assignment("other", &rec(9, 1, &[(1, "w1")]))
                .is_empty()
        );
        assert_eq!(s.owned("q"), [0].into());
        // A newer epoch wins even with a lower version.
        assert_eq!(
            s.on_assignment("q", &rec(6, 1, &[(1, "w1")])),
            vec![stop(0), start(1)]
        );
    }

    #[test]
    fn removal_and_shutdown_stop_everything() {
        let mut s = PartitionSet::new("w1", ["q".to_owned()]);
        s.on_assignment("q", &rec(1, 1, &[(0, "w1"), (3, "w1")]));
        assert_eq!(s.on_removed("q"), vec![stop(0), stop(3)]);
        s.on_assignment("q", &rec(1, 2, &[(7, "w1")]));
        assert_eq!(s.stop_all(), vec![stop(7)]);
        assert!(s.is_empty());
    }

    #[test]
    fn parses_the_leaders_record() {
        let v = AssignmentView::parse(
            br#"{"epoch":7,"version":2,"partitions":{"0":"a","10":"b"},"members":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(v.epoch, 7);
        assert_eq!(v.partitions.get(&10).map(String::as_str), Some("b"));
        assert!(AssignmentView::parse(b"{}").is_err());
    }
}
