//! The records partition assignment reads and writes: worker heartbeats (`drover-workers`), queue
//! records and assignments (`drover-state`), parsed leniently — a bad record is an error value,
//! never a panic.

use drover_shared::names::is_valid_queue;
use drover_shared::ring::{Assignment, MAX_PARTITIONS, MAX_WEIGHT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Key prefix of assignment records in `drover-state`.
pub const ASSIGNMENT_PREFIX: &str = "assignment.";

/// Key prefix of queue records in `drover-state`.
pub const QUEUE_PREFIX: &str = "queue.";

/// The key of `queue`'s assignment in `drover-state`: `assignment.<queue>`.
pub fn assignment_key(queue: &str) -> String {
    format!("{ASSIGNMENT_PREFIX}{queue}")
}

/// The value of `assignment.<queue>` in `drover-state` (SPEC §4), e.g.
/// `{"epoch":7,"version":3,"partitions":{"0":"worker-a",...},"members":{"worker-a":1,...}}`.
///
/// Workers watch it and ignore a record whose `epoch` is lower than the highest they have seen.
/// Unknown fields are ignored, so the leader may add fields without breaking older readers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The term of the leader that wrote it (its election `create` revision, SPEC §5).
    pub epoch: u64,
    /// Counts the writes of this key, starting at 1; increases with every write, across leaders.
    pub version: u64,
    /// Partition → owning worker id. Empty when the queue has no live worker: nobody pulls.
    #[serde(default)]
    pub partitions: BTreeMap<u32, String>,
    /// Worker id → ring weight of the members it was computed for; the next rebalance uses it
    /// to tell which workers are new.
    #[serde(default)]
    pub members: BTreeMap<String, u32>,
}

impl AssignmentRecord {
    /// Parses a stored record.
    pub fn parse(bytes: &[u8]) -> Result<Self, RecordError> {
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))
    }

    /// The JSON stored in `drover-state`.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing maps with integer and string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The ring's view of it: the previous assignment for [`drover_shared::ring::rebalance`].
    pub fn assignment(&self) -> Assignment {
        Assignment::from_parts(self.partitions.clone(), self.members.clone())
    }

    /// The partitions owned by `worker`, ascending.
    pub fn owned_by<'a>(&'a self, worker: &'a str) -> impl Iterator<Item = u32> + 'a {
        self.partitions
            .iter()
            .filter(move |(_, owner)| owner.as_str() == worker)
            .map(|(&p, _)| p)
    }
}

/// Why a record was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the expected shape.
    #[error("not a valid record: {0}")]
    Json(String),
    /// A queue name does not match `[a-z0-9][a-z0-9_-]{0,63}`.
    #[error("queue name {0:?} is invalid: it must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    Queue(String),
    /// A partition count outside `1..=MAX_PARTITIONS`.
    #[error("partitions must be between 1 and {MAX_PARTITIONS}, got {0}")]
    Partitions(u64),
}

/// What the assigner takes from a worker's heartbeat record: the queues it serves and its ring
/// weight. Everything else in the record (`running`, `load`, …) changes with every heartbeat and
/// does not affect the assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEntry {
    /// Queues the worker serves.
    pub queues: BTreeSet<String>,
    /// Ring weight: the worker's `capacity`, capped at [`MAX_WEIGHT`]; 0 takes no partitions.
    pub weight: u32,
    /// The capacity asked for, when it was above [`MAX_WEIGHT`] and got capped.
    pub capped_from: Option<u64>,
}

#[derive(Deserialize)]
struct RawWorker {
    queues: Vec<String>,
    #[serde(default = "default_capacity")]
    capacity: u64,
}

const fn default_capacity() -> u64 {
    1
}

/// Parses a worker record of `drover-workers` (SPEC §6). `queues` is required; `capacity`
/// defaults to 1; unknown fields are ignored.
pub fn parse_worker(bytes: &[u8]) -> Result<WorkerEntry, RecordError> {
    let raw: RawWorker =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
    if let Some(bad) = raw.queues.iter().find(|q| !is_valid_queue(q)) {
        return Err(RecordError::Queue(bad.clone()));
    }
    let weight = u32::try_from(raw.capacity.min(u64::from(MAX_WEIGHT))).unwrap_or(MAX_WEIGHT);
    Ok(WorkerEntry {
        queues: raw.queues.into_iter().collect(),
        weight,
        capped_from: (raw.capacity > u64::from(MAX_WEIGHT)).then_some(raw.capacity),
    })
}

/// Parses the partition count out of a queue record `{"partitions":P,...}` of `drover-state`.
pub fn parse_queue_partitions(bytes: &[u8]) -> Result<u32, RecordError> {
    #[derive(Deserialize)]
    struct RawQueue {
        partitions: u64,
    }
    let raw: RawQueue =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
    match u32::try_from(raw.partitions) {
        Ok(p) if (1..=MAX_PARTITIONS).contains(&p) => Ok(p),
        _ => Err(RecordError::Partitions(raw.partitions)),
    }
}

/// Which of the assigner's keys a `drover-state` key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKey<'a> {
    /// `queue.<queue>`.
    Queue(&'a str),
    /// `assignment.<queue>`.
    Assignment(&'a str),
    /// Anything else (`cron.*`, `scaling.*`, a malformed queue name): not ours.
    Other,
}

impl<'a> StateKey<'a> {
    /// Classifies a `drover-state` key.
    pub fn parse(key: &'a str) -> Self {
        let valid = |q: &'a str| is_valid_queue(q).then_some(q);
        if let Some(q) = key.strip_prefix(QUEUE_PREFIX).and_then(valid) {
            Self::Queue(q)
        } else if let Some(q) = key.strip_prefix(ASSIGNMENT_PREFIX).and_then(valid) {
            Self::Assignment(q)
        } else {
            Self::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_record_round_trips_with_string_partition_keys() {
        let rec = AssignmentRecord {
            epoch: 7,
            version: 2,
            partitions: [
                (0, "a".to_owned()),
                (10, "b".to_owned()),
                (2, "a".to_owned()),
            ]
            .into(),
            members: [("a".to_owned(), 1), ("b".to_owned(), 2)].into(),
        };
        let json = String::from_utf8(rec.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"epoch":7,"version":2,"partitions":{"0":"a","2":"a","10":"b"},"members":{"a":1,"b":2}}"#
        );
        assert_eq!(AssignmentRecord::parse(json.as_bytes()).unwrap(), rec);
        assert_eq!(rec.owned_by("a").collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(rec.assignment().owner(10), Some("b"));
        // Unknown fields are ignored; missing maps are empty.
        let rec = AssignmentRecord::parse(br#"{"epoch":1,"version":1,"x":true}"#).unwrap();
        assert!(rec.partitions.is_empty() && rec.members.is_empty());
        assert!(AssignmentRecord::parse(br#"{"epoch":"x"}"#).is_err());
    }

    #[test]
    fn worker_records_are_parsed_leniently_but_never_trusted() {
        let w = parse_worker(
            br#"{"id":"w1","queues":["default","emails"],"capacity":2,"running":3,
                "load":{"cpu":0.5,"mem":10},"version":"0.1.0","started_at":"x","host":"h",
                "pid":1,"addr":null,"future":{"field":1}}"#,
        )
        .unwrap();
        assert_eq!(w.weight, 2);
        assert_eq!(
            w.queues.iter().map(String::as_str).collect::<Vec<_>>(),
            ["default", "emails"]
        );
        assert_eq!(parse_worker(br#"{"queues":[]}"#).unwrap().weight, 1);
        let big = parse_worker(br#"{"queues":["q"],"capacity":1000}"#).unwrap();
        assert_eq!((big.weight, big.capped_from), (MAX_WEIGHT, Some(1000)));
        assert!(matches!(
            parse_worker(b"not json"),
            Err(RecordError::Json(_))
        ));
        assert!(matches!(
            parse_worker(br#"{"queues":"default"}"#),
            Err(RecordError::Json(_))
        ));
        assert!(matches!(
            parse_worker(br#"{"queues":["Bad Queue"]}"#),
            Err(RecordError::Queue(_))
        ));
        assert!(parse_worker(br#"{"queues":["q"],"capacity":-1}"#).is_err());
    }

    #[test]
    fn queue_records_and_state_keys() {
        assert_eq!(
            parse_queue_partitions(br#"{"partitions":16,"created_epoch":3}"#),
            Ok(16)
        );
        assert_eq!(
            parse_queue_partitions(br#"{"partitions":0}"#),
            Err(RecordError::Partitions(0))
        );
        assert!(parse_queue_partitions(br#"{}"#).is_err());
        assert_eq!(StateKey::parse("queue.default"), StateKey::Queue("default"));
        assert_eq!(
            StateKey::parse("assignment.emails"),
            StateKey::Assignment("emails")
        );
        assert_eq!(StateKey::parse("cron.nightly"), StateKey::Other);
        assert_eq!(StateKey::parse("queue.Bad"), StateKey::Other);
        assert_eq!(assignment_key("default"), "assignment.default");
    }
}
