//! The intake's dependency steps, run by [`crate::leader::Pipeline`] for each chunk: reject
//! messages that name unknown dependencies, then hold (or fail) the tasks whose parents have not
//! all succeeded, durably, before the chunk's messages are acked.

use super::plan::{self, Admission, Parent};
use super::store::{HeldEntry, held_key};
use crate::intake::{Accepted, Rejection, Scheduling};
use crate::leader::{HDR_INTAKE_SEQ, LeaderContext, Routed};
use crate::records::Records;
use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use drover_shared::task::{TaskRecord, TaskState};
use std::collections::{HashMap, HashSet};
use tracing::{debug, info, warn};

/// What the intake learned about parents outside their messages, by id.
pub type Known = HashMap<String, Parent>;

/// Rejects (moves to `rejected`) every accepted message with a dependency that is neither in the
/// message, nor in an earlier accepted message of this chunk, nor a task with a record
/// (`missing_dependency`; the whole array, SPEC §1.1). Returns what is known of the parents
/// that do exist, and the indexes of messages whose parents could not be read (to come back).
pub(crate) async fn check_missing(
    ctx: &LeaderContext,
    accepted: &mut Vec<(usize, Accepted)>,
    rejected: &mut Vec<(usize, Rejection)>,
) -> (Known, Vec<usize>) {
    let mut known = Known::new();
    let mut failed = Vec::new();
    if accepted
        .iter()
        .all(|(_, a)| a.scheduling.values().all(|s| s.depends_on.is_empty()))
    {
        return (known, failed);
    }
    let records = match Records::open(&ctx.js, &ctx.names).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot open task records to check dependencies; will retry");
            let with_deps: Vec<usize> = accepted
                .iter()
                .filter(|(_, a)| a.scheduling.values().any(|s| !s.depends_on.is_empty()))
                .map(|(i, _)| *i)
                .collect();
            accepted.retain(|(i, _)| !with_deps.contains(i));
            return (known, with_deps);
        }
    };
    let mut earlier: HashSet<String> = HashSet::new();
    let mut keep = Vec::with_capacity(accepted.len());
    for (i, a) in std::mem::take(accepted) {
        let inside: HashSet<&str> = a.tasks.iter().map(|t| t.id.as_str()).collect();
        let outside: Vec<&String> = a
            .scheduling
            .values()
            .flat_map(|s| s.depends_on.iter())
            .filter(|d| !inside.contains(d.as_str()) && !known.contains_key(d.as_str()))
            .collect();
        let mut read_failed = false;
        for d in outside {
            if earlier.contains(d) {
                known.insert(d.clone(), Parent::Pending);
                continue;
            }
            match records.read(d).await {
                Ok(c) => {
                    known.insert(d.clone(), Parent::of(c.record.as_ref()));
                }
                Err(e) => {
                    warn!(error = %e, "cannot read a dependency's record; will retry");
                    read_failed = true;
                    break;
                }
            }
        }
        if read_failed {
            failed.push(i);
            continue;
        }
        let tasks: Vec<(&str, &[String])> = a
            .tasks
            .iter()
            .map(|t| (t.id.as_str(), deps_of(&a.scheduling, &t.id)))
            .collect();
        let missing = plan::find_missing(&tasks, a.tasks.len() > 1, |id| {
            known.get(id).is_some_and(|p| *p != Parent::Missing)
        });
        match missing {
            Some(error) => rejected.push((
                i,
                Rejection {
                    queue: a.queue.clone(),
                    error,
                },
            )),
            None => {
                earlier.extend(a.tasks.iter().map(|t| t.id.clone()));
                keep.push((i, a));
            }
        }
    }
    *accepted = keep;
    (known, failed)
}

fn deps_of<'a>(scheduling: &'a HashMap<String, Scheduling>, id: &str) -> &'a [String] {
    scheduling
        .get(id)
        .map(|s| s.depends_on.as_slice())
        .unwrap_or(&[])
}

/// Decides every routed task of the chunk ([`plan::admit`] per source message) and takes the
/// ones that may not start now out of `routed`: a held task gets its `scheduled` record
/// (created with expected sequence 0 — the duplicate check — and `Drover-Intake-Seq`) and its
/// `held.<id>` entry, then is handed to the leader's [`super::Deps`]; a task with a failed
/// parent gets its terminal `upstream_failed` record. Returns the tasks to dispatch now and the
/// source indexes whose writes failed (their messages must come back). `seq(from)` is the
/// intake stream sequence of source message `from`.
pub(crate) async fn admit(
    ctx: &LeaderContext,
    epoch: u64,
    routed: Vec<Routed>,
    scheduling: &HashMap<String, Scheduling>,
    known: &Known,
    seq: impl Fn(usize) -> u64,
) -> (Vec<Routed>, HashSet<usize>) {
    let mut failed = HashSet::new();
    if !routed
        .iter()
        .any(|r| !deps_of(scheduling, &r.task.id).is_empty())
    {
        return (routed, failed);
    }
    // Group per source message, in order.
    let mut decisions: HashMap<String, Admission> = HashMap::new();
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (k, r) in routed.iter().enumerate() {
        match groups.last_mut() {
            Some((from, members)) if *from == r.from => members.push(k),
            _ => groups.push((r.from, vec![k])),
        }
    }
    for (_, members) in &groups {
        let tasks: Vec<(&str, &[String])> = members
            .iter()
            .map(|&k| {
                let id = routed[k].task.id.as_str();
                (id, deps_of(scheduling, id))
            })
            .collect();
        let admitted = plan::admit(&tasks, |id| {
            known.get(id).copied().unwrap_or(Parent::Pending)
        });
        for ((id, _), a) in tasks.iter().zip(admitted) {
            decisions.insert((*id).to_owned(), a);
        }
    }
    let state = match ctx.js.get_key_value(ctx.names.bucket("state")).await {
        Ok(kv) => Some(kv),
        Err(e) => {
            warn!(error = %e, "cannot open the state bucket to hold tasks; will retry");
            None
        }
    };
    let mut dispatch = Vec::with_capacity(routed.len());
    for r in routed {
        let decision = decisions.remove(&r.task.id).unwrap_or(Admission::Dispatch);
        let sched = scheduling.get(&r.task.id);
        let seq = seq(r.from);
        match decision {
            Admission::Dispatch => dispatch.push(r),
            Admission::Hold => {
                let Some(state) = &state else {
                    failed.insert(r.from);
                    continue;
                };
                let parents = sched.map(|s| s.depends_on.clone()).unwrap_or_default();
                let shards = sched.map_or(Default::default(), |s| s.shards);
                let entry = match HeldEntry::seal(
                    &ctx.keys,
                    &ctx.config.codec,
                    epoch,
                    &r.task,
                    &parents,
                    shards,
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(task_id = %r.task.id, error = %e, "cannot hold a task");
                        failed.insert(r.from);
                        continue;
                    }
                };
                match create_record(ctx, &plan::scheduled_record(&r.task), seq).await {
                    Created::Ours => {}
                    Created::Duplicate => continue,
                    Created::Failed(e) => {
                        warn!(task_id = %r.task.id, error = %e, "cannot write a scheduled record; will retry");
                        failed.insert(r.from);
                        continue;
                    }
                }
                if let Err(e) = state
                    .put(held_key(&r.task.id), entry.to_json().into())
                    .await
                {
                    warn!(task_id = %r.task.id, error = %e, "cannot store a held task; will retry");
                    failed.insert(r.from);
                    continue;
                }
                debug!(task_id = %r.task.id, parents = parents.len(), "held until its dependencies succeed");
                ctx.metrics.deps_held.inc();
                ctx.deps.held(&r.task.id, &parents);
            }
            Admission::UpstreamFailed { parent, state } => {
                let record = plan::upstream_failed(
                    plan::scheduled_record(&r.task),
                    &parent,
                    state,
                    chrono::Utc::now(),
                );
                match create_record(ctx, &record, seq).await {
                    Created::Ours => {
                        info!(task_id = %r.task.id, %parent, "upstream_failed at intake");
                        ctx.metrics.deps_upstream_failed.inc();
                        ctx.events.emit(&record);
                        ctx.deps.finished(&record.id, record.state);
                    }
                    Created::Duplicate => {}
                    Created::Failed(e) => {
                        warn!(task_id = %r.task.id, error = %e, "cannot write an upstream_failed record; will retry");
                        failed.insert(r.from);
                    }
                }
            }
        }
    }
    (dispatch, failed)
}

enum Created {
    /// Written now, or by this very intake message before (a redelivery).
    Ours,
    /// Another submission holds the id.
    Duplicate,
    Failed(String),
}

/// Creates `record` if the id has none; an existing record written for intake sequence `seq`
/// counts as ours (redelivery), any other as a duplicate id.
async fn create_record(ctx: &LeaderContext, record: &TaskRecord, seq: u64) -> Created {
    let bucket = ctx.names.bucket("tasks");
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    headers.insert(HDR_INTAKE_SEQ, seq.to_string());
    let body = serde_json::to_vec(record).unwrap_or_default();
    let subject = format!("$KV.{bucket}.{}", record.id);
    let result = match ctx
        .js
        .publish_with_headers(subject, headers, body.into())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Created::Ours,
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            let own = match ctx.js.get_stream(format!("KV_{bucket}")).await {
                Ok(stream) => stream
                    .direct_get_last_for_subject(format!("$KV.{bucket}.{}", record.id))
                    .await
                    .map(|m| {
                        m.headers
                            .get(HDR_INTAKE_SEQ)
                            .is_some_and(|v| v.as_str() == seq.to_string())
                            && serde_json::from_slice::<TaskRecord>(&m.payload).is_ok_and(|r| {
                                matches!(r.state, TaskState::Scheduled | TaskState::UpstreamFailed)
                            })
                    })
                    .unwrap_or(false),
                Err(_) => false,
            };
            if own {
                Created::Ours
            } else {
                ctx.metrics.duplicates.inc();
                debug!(task_id = %record.id, "duplicate id; not held again");
                Created::Duplicate
            }
        }
        Err(e) => Created::Failed(e.to_string()),
    }
}
