//! Sharded broadcast (SPEC §1.1 `shards`): a task with `shards: N | "all"` becomes shard tasks
//! `<id>-s<index>` (`shard: {index,total}`, `parent: <id>`) routed to partitions owned by
//! distinct workers in the queue's current `assignment.<queue>`; the parent's record completes
//! when every shard succeeded and fails when one fails for good; the shards still pending or
//! running are then cancelled.
//!
//! Placement: the owners of the queue's partitions, sorted by id, take shards in turn (shard `i`
//! → worker `i mod W`, that worker's `(i / W)`-th partition), so N ≤ W shards land on N distinct
//! workers and N > W spread as evenly as possible (counts differ by at most one). `"all"` is one
//! shard per worker owning a partition of the queue when the task is dispatched. With no
//! assignment (no live worker yet) shards are routed like keyless tasks, and `"all"` is one shard.

use crate::assign::{AssignmentRecord, assignment_key};
use crate::intake::Scheduling;
use crate::leader::{LeaderContext, Pipeline, Routed};
use crate::records::{CAS_ATTEMPTS, Records, WriteError};
use async_nats::HeaderMap;
use drover_shared::task::{ErrorKind, ShardInfo, Shards, Task, TaskError, TaskRecord, TaskState};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use tracing::{debug, warn};

/// The id of shard `index` of `parent`.
pub fn shard_id(parent: &str, index: u32) -> String {
    format!("{parent}-s{index}")
}

/// The partition of each shard (`None`: route it like a keyless task), in shard order.
pub fn targets(shards: Shards, assignment: Option<&AssignmentRecord>) -> Vec<Option<u32>> {
    let mut by_worker: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    if let Some(a) = assignment {
        for (&p, w) in &a.partitions {
            by_worker.entry(w.as_str()).or_default().push(p);
        }
    }
    let workers: Vec<&Vec<u32>> = by_worker.values().collect();
    let n = match shards {
        Shards::One => 1,
        Shards::Count(n) => n.max(1),
        Shards::All => u32::try_from(workers.len()).unwrap_or(u32::MAX).max(1),
    };
    if workers.is_empty() {
        return vec![None; n as usize];
    }
    let w = workers.len();
    (0..n as usize)
        .map(|i| {
            let parts = workers[i % w];
            Some(parts[(i / w) % parts.len()])
        })
        .collect()
}

/// The shard tasks of `parent`, one per target.
pub fn shard_tasks(parent: &Task, count: usize) -> Vec<Task> {
    let total = u32::try_from(count).unwrap_or(u32::MAX);
    (0..total)
        .map(|index| {
            let mut t = parent.clone();
            t.id = shard_id(&parent.id, index);
            t.shard = Some(ShardInfo { index, total });
            t.parent = Some(parent.id.clone());
            t
        })
        .collect()
}

/// The parent's terminal record once its shards (`shards[i]` = record of shard `i`, if any)
/// decide it: `failed` as soon as one shard ended without success, `succeeded` (results as an
/// array in shard order) when all did. `None` while undecided or if the parent is terminal.
pub fn aggregate(
    parent: &TaskRecord,
    shards: &[Option<TaskRecord>],
    now: chrono::DateTime<chrono::Utc>,
) -> Option<TaskRecord> {
    if parent.state.is_terminal() {
        return None;
    }
    let mut next = parent.clone();
    let started = shards.iter().flatten().filter_map(|s| s.started_at).min();
    if let Some(bad) = shards
        .iter()
        .flatten()
        .find(|s| s.state.is_terminal() && s.state != TaskState::Succeeded)
    {
        let why = bad.error.as_ref().map_or("", |e| e.message.as_str());
        next.state = TaskState::Failed;
        next.error = Some(TaskError {
            kind: bad.error.as_ref().map_or(ErrorKind::Handler, |e| e.kind),
            message: format!("shard {} ended {}: {why}", bad.id, bad.state),
        });
        next.started_at = started.or(Some(now));
        next.finished_at = Some(now);
        next.next_run_at = None;
        return Some(next);
    }
    if shards.is_empty()
        || !shards
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.state == TaskState::Succeeded))
    {
        return None;
    }
    let finished = shards.iter().flatten().filter_map(|s| s.finished_at).max();
    let results: Vec<&RawValue> = shards
        .iter()
        .flatten()
        .map(|s| {
            s.result
                .as_deref()
                .unwrap_or_else(|| serde_json::from_str("null").expect("null parses"))
        })
        .collect();
    next.state = TaskState::Succeeded;
    next.error = None;
    next.result = serde_json::to_string(&results)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok());
    next.started_at = started.or(Some(now));
    next.finished_at = finished.or(Some(now));
    next.duration_ms = match (next.started_at, next.finished_at) {
        (Some(s), Some(f)) => u64::try_from((f - s).num_milliseconds()).ok(),
        _ => None,
    };
    Some(next)
}

/// The fan-out step of the dispatch pipeline: every routed task whose scheduling asks for
/// shards is replaced by its shard tasks, placed by [`targets`] on the queue's current
/// assignment. The parent's record must exist for the aggregation, so it is created (`queued`)
/// when the intake did not write one (`tracking = "terminal"`); shard records are created
/// `queued` when `track_queued`.
pub(crate) async fn expand(
    pipeline: &mut Pipeline,
    routed: Vec<Routed>,
    scheduling: &HashMap<String, Scheduling>,
) -> Vec<Routed> {
    if !routed.iter().any(|r| {
        scheduling
            .get(&r.task.id)
            .is_some_and(|s| !s.shards.is_one())
    }) {
        return routed;
    }
    let ctx = pipeline.ctx().clone();
    let state = ctx.js.get_key_value(ctx.names.bucket("state")).await.ok();
    let mut assignments: HashMap<String, Option<AssignmentRecord>> = HashMap::new();
    let mut out = Vec::with_capacity(routed.len());
    for r in routed {
        let shards = match scheduling.get(&r.task.id) {
            Some(s) if !s.shards.is_one() => s.shards,
            _ => {
                out.push(r);
                continue;
            }
        };
        if !assignments.contains_key(&r.task.queue) {
            let a = match &state {
                Some(kv) => kv
                    .get(assignment_key(&r.task.queue))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| AssignmentRecord::parse(&v).ok()),
                None => None,
            };
            assignments.insert(r.task.queue.clone(), a);
        }
        let targets = targets(shards, assignments[&r.task.queue].as_ref());
        if !ctx.config.track_queued {
            let submitted = chrono::DateTime::from_timestamp_millis(r.task.submitted_ms)
                .unwrap_or_else(chrono::Utc::now);
            create(
                &ctx,
                &TaskRecord::new(&r.task, TaskState::Queued, submitted),
            )
            .await;
        }
        let tasks = shard_tasks(&r.task, targets.len());
        debug!(task_id = %r.task.id, shards = tasks.len(), "fanning out shards");
        for (task, target) in tasks.into_iter().zip(targets) {
            let partition = match target {
                Some(p) => p,
                None => match pipeline.route(&task).await {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(task_id = %task.id, error = %e, "cannot route a shard; partition 0");
                        0
                    }
                },
            };
            if ctx.config.track_queued {
                let submitted = chrono::DateTime::from_timestamp_millis(task.submitted_ms)
                    .unwrap_or_else(chrono::Utc::now);
                let mut record = TaskRecord::new(&task, TaskState::Queued, submitted);
                record.partition = Some(partition);
                create(&ctx, &record).await;
            }
            out.push(Routed {
                task,
                from: r.from,
                partition,
            });
        }
    }
    out
}

/// Creates `record` if its key has none (best-effort; an existing record — a redelivery — wins).
async fn create(ctx: &crate::leader::LeaderContext, record: &TaskRecord) {
    let bucket = ctx.names.bucket("tasks");
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let body = serde_json::to_vec(record).unwrap_or_default();
    let result = match ctx
        .js
        .publish_with_headers(format!("$KV.{bucket}.{}", record.id), headers, body.into())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        debug!(task_id = %record.id, error = %e, "shard record not created");
    }
}

/// The cancelled record of shard `index` of `total` of a parent that failed (`parent`, its
/// failed record), given the shard's current record: `None` when it already ended. A shard with
/// no record (not started while only terminal states are tracked) gets one built from the
/// parent, so a worker that receives it later skips it.
pub fn cancel_sibling(
    parent: &TaskRecord,
    index: u32,
    total: u32,
    sibling: Option<&TaskRecord>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<TaskRecord> {
    let mut next = match sibling {
        Some(r) if r.state.is_terminal() => return None,
        Some(r) => r.clone(),
        None => {
            let mut r = parent.clone();
            r.id = shard_id(&parent.id, index);
            r.parent = Some(parent.id.clone());
            r.shard = Some(ShardInfo { index, total });
            r.started_at = None;
            r.worker = None;
            r.partition = None;
            r.result = None;
            r.duration_ms = None;
            r
        }
    };
    let why = parent.error.as_ref().map_or("", |e| e.message.as_str());
    next.state = TaskState::Cancelled;
    next.finished_at = Some(now);
    next.next_run_at = None;
    next.error = Some(TaskError {
        kind: ErrorKind::Cancelled,
        message: format!("cancelled: its parent {} failed ({why})", parent.id),
    });
    Some(next)
}

/// What settling a shard's parent changed.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// The parent's new terminal record, if this call wrote it.
    pub parent: Option<TaskRecord>,
    /// Sibling shards this call cancelled because the parent failed.
    pub cancelled: Vec<TaskRecord>,
}

/// After shard `shard` (a record with `parent` and `shard`) finished: reads the parent and
/// every sibling, and writes the parent's terminal record when they decide it (compare-and-set;
/// a lost race re-reads). When the parent is (or becomes) `failed`, the siblings still pending
/// or running are cancelled ([`cancel_sibling`], compare-and-set, then `ctl.cancel.<id>` so a
/// running attempt stops): their results could no longer change the parent's outcome. This
/// also runs for a redelivered outcome, so a crash between the parent's write and the cancels
/// is repaired.
pub(crate) async fn settle_parent(
    ctx: &LeaderContext,
    records: &Records,
    shard: &TaskRecord,
) -> Result<Settled, String> {
    let (Some(parent), Some(info)) = (&shard.parent, shard.shard) else {
        return Ok(Settled::default());
    };
    for _ in 0..CAS_ATTEMPTS {
        let current = records.read(parent).await?;
        let Some(record) = current.record else {
            return Ok(Settled::default());
        };
        if record.state.is_terminal() && record.state != TaskState::Failed {
            return Ok(Settled::default());
        }
        let reads = (0..info.total).map(|i| {
            let id = shard_id(parent, i);
            async move { records.read(&id).await.map(|c| c.record) }
        });
        let siblings: Vec<Option<TaskRecord>> = futures::future::try_join_all(reads).await?;
        if record.state == TaskState::Failed {
            let cancelled = cancel_siblings(ctx, records, &record, &siblings).await?;
            return Ok(Settled {
                parent: None,
                cancelled,
            });
        }
        let Some(next) = aggregate(&record, &siblings, chrono::Utc::now()) else {
            return Ok(Settled::default());
        };
        match records.write(parent, current.revision, &next).await {
            Ok(_) => {
                let cancelled = if next.state == TaskState::Failed {
                    cancel_siblings(ctx, records, &next, &siblings).await?
                } else {
                    Vec::new()
                };
                return Ok(Settled {
                    parent: Some(next),
                    cancelled,
                });
            }
            Err(WriteError::Conflict) => continue,
            Err(WriteError::Nats(e)) => return Err(e),
        }
    }
    Err(format!("the record of shard parent {parent} kept changing"))
}

/// Cancels the siblings of failed `parent` that have not ended (`seen` = their records as just
/// read, which spares the reads when all ended); returns the records written.
async fn cancel_siblings(
    ctx: &LeaderContext,
    records: &Records,
    parent: &TaskRecord,
    seen: &[Option<TaskRecord>],
) -> Result<Vec<TaskRecord>, String> {
    let total = u32::try_from(seen.len()).unwrap_or(u32::MAX);
    let open = seen
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.as_ref().is_some_and(|r| r.state.is_terminal()))
        .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX));
    let cancels = open.map(|index| async move {
        let id = shard_id(&parent.id, index);
        for _ in 0..CAS_ATTEMPTS {
            let current = records.read(&id).await?;
            let Some(next) = cancel_sibling(
                parent,
                index,
                total,
                current.record.as_ref(),
                chrono::Utc::now(),
            ) else {
                return Ok(None);
            };
            match records.write(&id, current.revision, &next).await {
                Ok(_) => {
                    let body = serde_json::json!({ "id": id }).to_string();
                    if let Err(e) = ctx
                        .js
                        .client()
                        .publish(ctx.names.cancel_subject(&id), body.into())
                        .await
                    {
                        // The record is cancelled: a worker not yet started skips it; one
                        // running finishes and its outcome is dropped as late.
                        debug!(task_id = %id, error = %e, "cancel not announced");
                    }
                    return Ok(Some(next));
                }
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Nats(e)) => return Err(e),
            }
        }
        Err(format!("the record of shard {id} kept changing"))
    });
    let done: Vec<Option<TaskRecord>> = futures::future::try_join_all(cancels).await?;
    Ok(done.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::TaskSpec;

    fn assignment(pairs: &[(u32, &str)]) -> AssignmentRecord {
        AssignmentRecord {
            epoch: 1,
            version: 1,
            partitions: pairs.iter().map(|(p, w)| (*p, w.to_string())).collect(),
            members: Default::default(),
        }
    }

    fn owners(a: &AssignmentRecord, t: &[Option<u32>]) -> Vec<String> {
        t.iter()
            .map(|p| a.partitions[&p.unwrap()].clone())
            .collect()
    }

    #[test]
    fn shards_land_on_distinct_workers_then_spread_evenly() {
        let a = assignment(&[
            (0, "w2"),
            (1, "w1"),
            (2, "w3"),
            (3, "w1"),
            (4, "w2"),
            (5, "w3"),
        ]);
        let t = targets(Shards::Count(3), Some(&a));
        assert_eq!(owners(&a, &t), ["w1", "w2", "w3"]);
        let t = targets(Shards::All, Some(&a));
        assert_eq!(t.len(), 3);
        let t = targets(Shards::Count(7), Some(&a));
        let o = owners(&a, &t);
        assert_eq!(o, ["w1", "w2", "w3", "w1", "w2", "w3", "w1"]);
        // A worker's second shard goes to its second partition.
        assert_eq!(t[0], Some(1));
        assert_eq!(t[3], Some(3));
        assert_eq!(targets(Shards::All, None), vec![None]);
        assert_eq!(targets(Shards::Count(4), None), vec![None; 4]);
    }

    fn parent_task() -> Task {
        Task {
            id: "p".into(),
            payload: RawValue::from_string("1".into()).unwrap(),
            max_attempts: 2,
            ..Task::first_attempt(&TaskSpec::new("echo"), "q", 1000, 0)
        }
    }

    #[test]
    fn shard_tasks_name_their_parent_and_position() {
        let s = shard_tasks(&parent_task(), 3);
        assert_eq!(s[2].id, "p-s2");
        assert_eq!(s[2].shard, Some(ShardInfo { index: 2, total: 3 }));
        assert_eq!(s[2].parent.as_deref(), Some("p"));
        assert_eq!(s[2].payload.get(), "1");
    }

    #[test]
    fn parent_settles_on_all_success_or_first_failure() {
        let now = chrono::Utc::now();
        let parent = TaskRecord::new(&parent_task(), TaskState::Queued, now);
        let shard = |i: u32, state: TaskState| {
            let mut r = TaskRecord::new(&shard_tasks(&parent_task(), 2)[i as usize], state, now);
            r.started_at = Some(now);
            r.finished_at = state.is_terminal().then_some(now);
            r.result = (state == TaskState::Succeeded)
                .then(|| RawValue::from_string(format!("{i}")).unwrap());
            r
        };
        assert!(aggregate(&parent, &[Some(shard(0, TaskState::Succeeded)), None], now).is_none());
        assert!(
            aggregate(
                &parent,
                &[
                    Some(shard(0, TaskState::Succeeded)),
                    Some(shard(1, TaskState::Running))
                ],
                now
            )
            .is_none()
        );
        let done = aggregate(
            &parent,
            &[
                Some(shard(0, TaskState::Succeeded)),
                Some(shard(1, TaskState::Succeeded)),
            ],
            now,
        )
        .unwrap();
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(done.result.unwrap().get(), "[0,1]");
        let failed = aggregate(&parent, &[Some(shard(0, TaskState::Failed)), None], now).unwrap();
        assert_eq!(failed.state, TaskState::Failed);
        assert!(failed.error.unwrap().message.contains("p-s0"));
        assert!(aggregate(&failed_clone(&parent), &[], now).is_none());
    }

    #[test]
    fn a_failed_parent_cancels_the_shards_still_open() {
        let now = chrono::Utc::now();
        let mut parent = TaskRecord::new(&parent_task(), TaskState::Failed, now);
        parent.error = Some(TaskError {
            kind: ErrorKind::Handler,
            message: "shard p-s0 ended failed: boom".into(),
        });
        let shards = shard_tasks(&parent_task(), 3);
        let running = TaskRecord::new(&shards[1], TaskState::Running, now);
        let c = cancel_sibling(&parent, 1, 3, Some(&running), now).unwrap();
        assert_eq!(c.state, TaskState::Cancelled);
        assert_eq!(c.id, "p-s1");
        assert_eq!(c.finished_at, Some(now));
        let e = c.error.unwrap();
        assert_eq!(e.kind, ErrorKind::Cancelled);
        assert!(
            e.message.contains("p-s0 ended failed: boom"),
            "{}",
            e.message
        );
        // No record yet: one is made from the parent, naming the shard.
        let c = cancel_sibling(&parent, 2, 3, None, now).unwrap();
        assert_eq!(c.id, "p-s2");
        assert_eq!(c.parent.as_deref(), Some("p"));
        assert_eq!(c.shard, Some(ShardInfo { index: 2, total: 3 }));
        assert_eq!(c.state, TaskState::Cancelled);
        assert!(c.started_at.is_none());
        // Ended shards are left alone.
        for state in [
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::Cancelled,
        ] {
            let r = TaskRecord::new(&shards[0], state, now);
            assert!(cancel_sibling(&parent, 0, 3, Some(&r), now).is_none());
        }
    }

    fn failed_clone(r: &TaskRecord) -> TaskRecord {
        let mut r = r.clone();
        r.state = TaskState::Failed;
        r
    }
}
