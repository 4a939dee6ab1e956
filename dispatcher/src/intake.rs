//! From an intake message to routed tasks (SPEC §1.1, §4): which queue it is for, whether it is
//! valid, the ids of its tasks, and the partition each goes to. Pure: the leader loop feeds it
//! the message and carries out the result.

use crate::delays::Plan;
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::names::{Names, is_valid_queue};
use drover_shared::partition::partition_for_key;
use drover_shared::task::{Shards, Task, assign_ids, check_workflow, parse_submission};
use std::collections::HashMap;

/// The `rejected` queue token used when the subject's queue token itself is invalid.
pub const INVALID_QUEUE: &str = "_invalid";

/// A submission that cannot be accepted: where its rejected record goes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The queue token of `drover.rejected.<queue>` ([`INVALID_QUEUE`] for a bad queue name).
    pub queue: String,
    /// The error, as a client sees it.
    pub error: ApiError,
}

/// An accepted submission: its queue and tasks, in submit order, each at attempt 1.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Queue.
    pub queue: String,
    /// Tasks with ids assigned and defaults applied.
    pub tasks: Vec<Task>,
    /// Per task (same order): its delay and uniqueness window.
    pub plans: Vec<Plan>,
    /// `depends_on` and `shards` of the tasks that have either, by task id (they do not travel
    /// in the normalized task; [`crate::deps`] holds and fans out such tasks).
    pub scheduling: HashMap<String, Scheduling>,
}

/// The dependency and fan-out fields of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduling {
    /// Ids that must have `succeeded` before the task starts.
    pub depends_on: Vec<String>,
    /// Shard count (`Shards::One` for an ordinary task).
    pub shards: Shards,
}

/// What the intake needs to know about the server and the queue defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    /// The server's `max_payload`: larger submissions are `too_large`.
    pub max_payload: usize,
    /// Per-attempt timeout for tasks that name none.
    pub default_timeout_ms: u64,
}

/// The queue a submit subject is for: `<prefix>.submit.<queue>`.
pub fn queue_of<'a>(names: &Names, subject: &'a str) -> Result<&'a str, Rejection> {
    let token = subject
        .strip_prefix(names.prefix())
        .and_then(|s| s.strip_prefix(".submit."))
        .unwrap_or(subject);
    if is_valid_queue(token) {
        Ok(token)
    } else {
        Err(Rejection {
            queue: INVALID_QUEUE.to_owned(),
            error: ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "subject {subject:?} does not name a valid queue: publish to {}.submit.<queue> with a queue matching [a-z0-9][a-z0-9_-]{{0,63}}",
                    names.prefix()
                ),
            )
            .with_field("queue"),
        })
    }
}

/// Validates one intake message and gives its tasks their ids (SPEC §1.1).
///
/// `msg_id` is the message's `Nats-Msg-Id`, `seq` its stream sequence, `now_ms` the submit
/// time stamped on the tasks.
pub fn prepare(
    names: &Names,
    subject: &str,
    body: &[u8],
    msg_id: Option<&str>,
    seq: u64,
    now_ms: i64,
    limits: IntakeLimits,
) -> Result<Accepted, Rejection> {
    let queue = queue_of(names, subject)?;
    let reject = |error: ApiError| Rejection {
        queue: queue.to_owned(),
        error,
    };
    let mut sub = parse_submission(body, limits.max_payload).map_err(reject)?;
    assign_ids(&mut sub, msg_id, seq).map_err(reject)?;
    check_workflow(&sub.tasks).map_err(reject)?;
    let tasks = sub
        .tasks
        .iter()
        .map(|spec| Task::first_attempt(spec, queue, limits.default_timeout_ms, now_ms))
        .collect();
    let plans = sub
        .tasks
        .iter()
        .map(|spec| Plan::of(spec, now_ms))
        .collect();
    let scheduling = sub
        .tasks
        .iter()
        .filter(|spec| !spec.depends_on.is_empty() || !spec.shards.is_one())
        .filter_map(|spec| {
            let id = spec.id.clone()?;
            Some((
                id,
                Scheduling {
                    depends_on: spec.depends_on.clone(),
                    shards: spec.shards,
                },
            ))
        })
        .collect();
    Ok(Accepted {
        queue: queue.to_owned(),
        tasks,
        plans,
        scheduling,
    })
}

/// How tasks without a key pick a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Each submission message goes to the next partition in turn (the default).
    #[default]
    RoundRobin,
    /// Uniformly random partition; the caller supplies the random number.
    Random,
    /// The partition with the fewest pending messages ([`crate::load`]); the round-robin turn
    /// computed here breaks ties.
    LeastLoaded,
}

/// The keyless submissions of one intake chunk go to at most this many partitions per queue
/// (round-robin and random strategies): consecutive submissions share a turn in runs, so under
/// load an envelope carries dozens of tasks instead of a handful (a chunk of 512 single
/// submits over 64 partitions made envelopes of 8), and each envelope's fixed costs — the
/// worker's delivery, batched record read, outcome message and ack, the leader's outcome
/// handling — are shared by more tasks. Measured: docs/benchmarks.md.
pub const KEYLESS_SPREAD: usize = 8;

/// How many consecutive submissions of a queue share one keyless turn when a chunk holds
/// `submissions` of them: enough that the chunk takes at most [`KEYLESS_SPREAD`] turns, and 1
/// for a lone submission (light load) or for `least_loaded`, which weighs every submission.
pub fn run_length(submissions: usize, strategy: Strategy) -> usize {
    match strategy {
        Strategy::LeastLoaded => 1,
        Strategy::RoundRobin | Strategy::Random => submissions.div_ceil(KEYLESS_SPREAD).max(1),
    }
}

/// Partition choice per queue: keyed tasks by FNV-1a of the key, keyless ones by the strategy.
#[derive(Debug, Default)]
pub struct Router {
    next: HashMap<String, u32>,
}

impl Router {
    /// The partition of a task of `queue` with `partitions` partitions. `turn` is the keyless
    /// partition of this submission message (see [`Router::keyless`]).
    pub fn partition(key: Option<&str>, partitions: u32, turn: u32) -> u32 {
        match key {
            Some(k) => partition_for_key(k, partitions),
            None => turn % partitions.max(1),
        }
    }

    /// The partition the keyless tasks of the next submission message of `queue` go to, so that
    /// an array stays together in one envelope.
    pub fn keyless(
        &mut self,
        queue: &str,
        partitions: u32,
        strategy: Strategy,
        random: u32,
    ) -> u32 {
        let partitions = partitions.max(1);
        match strategy {
            Strategy::Random => random % partitions,
            Strategy::RoundRobin | Strategy::LeastLoaded => {
                let n = self.next.entry(queue.to_owned()).or_insert(0);
                let p = *n % partitions;
                *n = n.wrapping_add(1);
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_of_keyless_submissions_takes_at_most_eight_turns() {
        assert_eq!(
            run_length(1, Strategy::RoundRobin),
            1,
            "a lone one: own turn"
        );
        assert_eq!(run_length(8, Strategy::RoundRobin), 1);
        assert_eq!(run_length(9, Strategy::RoundRobin), 2);
        assert_eq!(run_length(512, Strategy::Random), 64);
        assert_eq!(run_length(512, Strategy::LeastLoaded), 1);
        // 512 submissions, one turn per run: 8 distinct partitions of 64, 64 tasks each.
        let mut r = Router::default();
        let run = run_length(512, Strategy::RoundRobin);
        let mut turns = Vec::new();
        for i in 0..512 {
            if i % run == 0 {
                turns.push(r.keyless("q", 64, Strategy::RoundRobin, 0));
            }
        }
        assert_eq!(turns, (0..8).collect::<Vec<u32>>());
    }

    const LIMITS: IntakeLimits = IntakeLimits {
        max_payload: 1 << 20,
        default_timeout_ms: 300_000,
    };

    fn prep(subject: &str, body: &str, msg_id: Option<&str>) -> Result<Accepted, Rejection> {
        prepare(
            &Names::default(),
            subject,
            body.as_bytes(),
            msg_id,
            42,
            1000,
            LIMITS,
        )
    }

    #[test]
    fn accepts_singles_and_arrays_with_ids() {
        let a = prep("drover.submit.mail", r#"{"type":"echo","payload":1}"#, None).unwrap();
        assert_eq!(a.queue, "mail");
        assert_eq!(a.tasks[0].id, "_s42");
        assert_eq!(a.tasks[0].attempt, 1);
        assert_eq!(a.tasks[0].timeout_ms, 300_000);
        assert_eq!(a.tasks[0].submitted_ms, 1000);
        let a = prep(
            "drover.submit.default",
            r#"[{"type":"a"},{"type":"b","id":"mine"}]"#,
            Some("batch7"),
        )
        .unwrap();
        let ids: Vec<_> = a.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["batch7-0", "mine"]);
    }

    #[test]
    fn rejections_say_where_and_why() {
        let r = prep("drover.submit.Bad", r#"{"type":"a"}"#, None).unwrap_err();
        assert_eq!(r.queue, INVALID_QUEUE);
        assert!(r.error.message.contains("drover.submit.Bad"));
        let r = prep("drover.submit.a.b", r#"{"type":"a"}"#, None).unwrap_err();
        assert_eq!(r.queue, INVALID_QUEUE);

        let r = prep("drover.submit.q", "{not json", None).unwrap_err();
        assert_eq!(
            (r.queue.as_str(), r.error.code),
            ("q", ErrorCode::InvalidJson)
        );
        let r = prep(
            "drover.submit.q",
            r#"[{"type":"a"},{"type":"b","x":1}]"#,
            None,
        )
        .unwrap_err();
        assert_eq!(
            (r.error.code, r.error.index),
            (ErrorCode::UnknownField, Some(1))
        );
        let r = prep("drover.submit.q", r#"{"type":"a"}"#, Some("bad id")).unwrap_err();
        assert_eq!(r.error.field.as_deref(), Some("Nats-Msg-Id"));
        let a = prep(
            "drover.submit.q",
            r#"{"type":"a","id":"c","depends_on":["x"]}"#,
            None,
        )
        .unwrap();
        assert_eq!(a.scheduling["c"].depends_on, ["x"]);
        let r = prep(
            "drover.submit.q",
            r#"{"type":"a","delay_ms":5,"run_at":"2030-01-01T00:00:00Z"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(r.error.code, ErrorCode::InvalidField);
        let a = prep("drover.submit.q", r#"{"type":"a","delay_ms":5}"#, None).unwrap();
        assert_eq!(a.plans[0].due_ms, Some(1005));
    }

    #[test]
    fn routing() {
        assert_eq!(
            Router::partition(Some("customer-7"), 64, 5),
            partition_for_key("customer-7", 64)
        );
        assert_eq!(Router::partition(None, 64, 70), 6);
        let mut r = Router::default();
        let seq: Vec<u32> = (0..5)
            .map(|_| r.keyless("q", 3, Strategy::RoundRobin, 0))
            .collect();
        assert_eq!(seq, [0, 1, 2, 0, 1]);
        assert_eq!(
            r.keyless("other", 3, Strategy::RoundRobin, 0),
            0,
            "per queue"
        );
        assert_eq!(r.keyless("q", 8, Strategy::Random, 13), 5);
    }
}
