//! `drover queues [QUEUE]`: backlog per queue, and per partition of one queue. Queues come from
//! the `queue.<name>` records in `<prefix>-state` (plus queues with submissions not yet taken
//! in); the submit backlog from the subjects of `<PREFIX>_SUBMIT` and the `<prefix>-intake`
//! consumer; partition backlog from the consumers `<prefix>-work-<queue>-<p>` of
//! `<PREFIX>_WORK`. Work backlog is counted in envelopes (batches of tasks), as stored.

use super::nats::Ctx;
use super::output::{Format, Table, or_dash};
use super::workers::{AssignmentView, assignments};
use super::{CliError, Common, Exit, print_json};
use async_nats::jetstream::stream::Stream;
use drover_shared::names::is_valid_queue;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Consumer-info requests in flight at once.
const INFO_IN_FLIGHT: usize = 16;

/// Flags of `drover queues`.
#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    /// Show this queue's partitions one per line.
    pub queue: Option<String>,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// One partition's backlog (the `--output json` element).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionRow {
    /// Partition number.
    pub partition: u32,
    /// Worker owning it per the assignment, if any.
    pub owner: Option<String>,
    /// Envelopes stored on its subject.
    pub envelopes: u64,
    /// Envelopes not yet delivered to a worker (`None` when the consumer does not exist).
    pub pending: Option<u64>,
    /// Envelopes delivered and not yet acked.
    pub ack_pending: Option<u64>,
}

/// One queue's backlog (the `--output json` element).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QueueRow {
    /// Queue name.
    pub queue: String,
    /// Partition count from `queue.<name>` (None before the leader declared it).
    pub partitions: Option<u32>,
    /// Submissions (messages) waiting in the intake stream for this queue.
    pub submit_backlog: u64,
    /// Envelopes stored for the queue.
    pub envelopes: u64,
    /// Envelopes not yet delivered, summed over partitions.
    pub pending: u64,
    /// Envelopes delivered and unacked, summed over partitions.
    pub ack_pending: u64,
    /// Distinct workers owning its partitions.
    pub workers: usize,
    /// Partitions with no owner in the assignment.
    pub unowned: u32,
    /// Per-partition detail.
    pub partition_rows: Vec<PartitionRow>,
}

/// Per-subject message counts of `stream` under `filter`.
async fn subject_counts(stream: &Stream, filter: &str) -> Result<HashMap<String, u64>, CliError> {
    let info = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| CliError::nats("cannot read stream subjects", e))?;
    info.map_ok(|(s, n)| (s, n as u64))
        .try_collect()
        .await
        .map_err(|e| CliError::nats("cannot read stream subjects", e))
}

/// Sums a queue from its partitions.
pub fn queue_row(
    queue: &str,
    partitions: Option<u32>,
    submit_backlog: u64,
    partition_rows: Vec<PartitionRow>,
) -> QueueRow {
    let mut owners: Vec<&str> = partition_rows
        .iter()
        .filter_map(|p| p.owner.as_deref())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    QueueRow {
        queue: queue.to_owned(),
        partitions,
        submit_backlog,
        envelopes: partition_rows.iter().map(|p| p.envelopes).sum(),
        pending: partition_rows.iter().filter_map(|p| p.pending).sum(),
        ack_pending: partition_rows.iter().filter_map(|p| p.ack_pending).sum(),
        workers: owners.len(),
        unowned: partition_rows.iter().filter(|p| p.owner.is_none()).count() as u32,
        partition_rows,
    }
}

/// `drover queues`.
pub async fn run(args: QueuesArgs) -> Result<Exit, CliError> {
    if let Some(q) = &args.queue
        && !is_valid_queue(q)
    {
        return Err(CliError::usage(format!(
            "{q:?} is not a queue name: use [a-z0-9][a-z0-9_-]{{0,63}}"
        )));
    }
    let ctx = Ctx::connect(&args.common).await?;
    let names = ctx.names.clone();
    let mut declared: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for v in ctx.latest("state", "queue.>").await? {
        if let Some(q) = v.key.strip_prefix("queue.") {
            let p = serde_json::from_slice::<serde_json::Value>(&v.value)
                .ok()
                .and_then(|v| v["partitions"].as_u64())
                .and_then(|p| u32::try_from(p).ok());
            declared.insert(q.to_owned(), p);
        }
    }
    let submit = ctx.stream(&names.submit_stream()).await?;
    let submit_counts = subject_counts(&submit, &names.subject("submit.>")).await?;
    let submit_prefix = names.subject("submit.");
    let mut backlog: BTreeMap<String, u64> = BTreeMap::new();
    for (s, n) in &submit_counts {
        if let Some(q) = s.strip_prefix(&submit_prefix) {
            *backlog.entry(q.to_owned()).or_default() += n;
            declared.entry(q.to_owned()).or_insert(None);
        }
    }
    if let Some(q) = &args.queue {
        declared.retain(|k, _| k == q);
        if declared.is_empty() {
            return Err(CliError::failed(format!(
                "no queue {q:?}: it has no record in {} and nothing waiting in {}",
                names.bucket("state"),
                names.submit_stream()
            )));
        }
    }
    let intake = submit
        .consumer_info(names.intake_consumer())
        .await
        .ok()
        .map(|i| (i.num_pending, i.num_ack_pending as u64));
    let work = ctx.stream(&names.work_stream()).await?;
    let work_counts = subject_counts(&work, &names.subject("work.>")).await?;
    let assigned: HashMap<String, AssignmentView> = assignments(&ctx).await?.into_iter().collect();

    let mut rows = Vec::new();
    for (queue, partitions) in &declared {
        let p_count = partitions.unwrap_or(0);
        let infos: Vec<(u32, Option<(u64, u64)>)> = futures::stream::iter(0..p_count)
            .map(|p| {
                let work = &work;
                let name = names.work_consumer(queue, p);
                async move {
                    let info = work
                        .consumer_info(name)
                        .await
                        .ok()
                        .map(|i| (i.num_pending, i.num_ack_pending as u64));
                    (p, info)
                }
            })
            .buffered(INFO_IN_FLIGHT)
            .collect()
            .await;
        let owners = assigned.get(queue);
        let partition_rows = infos
            .into_iter()
            .map(|(p, info)| PartitionRow {
                partition: p,
                owner: owners.and_then(|a| a.partitions.get(&p.to_string()).cloned()),
                envelopes: work_counts
                    .get(&names.work_subject(queue, p))
                    .copied()
                    .unwrap_or(0),
                pending: info.map(|i| i.0),
                ack_pending: info.map(|i| i.1),
            })
            .collect();
        rows.push(queue_row(
            queue,
            *partitions,
            backlog.get(queue).copied().unwrap_or(0),
            partition_rows,
        ));
    }

    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "queues": rows,
            "intake": intake.map(|(p, a)| serde_json::json!({"pending": p, "ack_pending": a})),
        })),
        Format::Table if args.queue.is_some() => {
            let q = &rows[0];
            println!(
                "queue {}: {} partition(s), submit backlog {}, {} worker(s)",
                q.queue,
                or_dash(q.partitions),
                q.submit_backlog,
                q.workers
            );
            let mut t = Table::new(&[
                ("PARTITION", 0),
                ("OWNER", 36),
                ("ENVELOPES", 0),
                ("PENDING", 0),
                ("ACK-PENDING", 0),
            ]);
            for p in &q.partition_rows {
                t.row(vec![
                    p.partition.to_string(),
                    or_dash(p.owner.as_ref()),
                    p.envelopes.to_string(),
                    or_dash(p.pending),
                    or_dash(p.ack_pending),
                ]);
            }
            print!("{}", t.render());
        }
        Format::Table => {
            if rows.is_empty() {
                println!("no queues yet (a queue exists from its first submit)");
            } else {
                let mut t = Table::new(&[
                    ("QUEUE", 24),
                    ("PARTITIONS", 0),
                    ("SUBMIT-BACKLOG", 0),
                    ("ENVELOPES", 0),
                    ("PENDING", 0),
                    ("ACK-PENDING", 0),
                    ("WORKERS", 0),
                    ("UNOWNED", 0),
                ]);
                for q in &rows {
                    t.row(vec![
                        q.queue.clone(),
                        or_dash(q.partitions),
                        q.submit_backlog.to_string(),
                        q.envelopes.to_string(),
                        q.pending.to_string(),
                        q.ack_pending.to_string(),
                        q.workers.to_string(),
                        q.unowned.to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
            match intake {
                Some((p, a)) => println!(
                    "intake ({}): {p} waiting, {a} being dispatched",
                    names.intake_consumer()
                ),
                None => println!(
                    "intake ({}): no consumer (no leader has run yet)",
                    names.intake_consumer()
                ),
            }
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_partitions() {
        let p = |partition, owner: Option<&str>, envelopes, pending| PartitionRow {
            partition,
            owner: owner.map(str::to_owned),
            envelopes,
            pending,
            ack_pending: pending.map(|_| 1),
        };
        let q = queue_row(
            "default",
            Some(3),
            5,
            vec![
                p(0, Some("w1"), 3, Some(2)),
                p(1, Some("w1"), 1, Some(0)),
                p(2, None, 0, None),
            ],
        );
        assert_eq!((q.envelopes, q.pending, q.ack_pending), (4, 2, 2));
        assert_eq!((q.workers, q.unowned, q.submit_backlog), (1, 1, 5));
    }
}
