//! Pure decisions about one received batch (SPEC §6, §7): which tasks to run, which to skip
//! (their attempt is already recorded, or the task is terminal, e.g. cancelled before it
//! started), how the ones to run chain by `key`, and what a delivery count means.

use drover_shared::outcome::attempt_is_recorded;
use drover_shared::task::{Task, TaskRecord};
use std::collections::{BTreeMap, HashSet};

/// What happens to one task of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Run it.
    Run,
    /// Its record already holds this attempt's outcome, or the task is terminal.
    SkipRecorded,
    /// An outcome message for this attempt is already in `DROVER_OUTCOMES` (not yet applied
    /// by the leader).
    SkipOutcomePublished,
}

/// Decides, task by task, whether to run. `records[i]` is the current record of `tasks[i]`
/// (`None`: no record, e.g. `tracking = "terminal"`); `published` holds the `(id, attempt)`
/// pairs already found on the batch's outcome subject.
pub fn dispositions(
    tasks: &[Task],
    records: &[Option<TaskRecord>],
    published: &HashSet<(String, u32)>,
) -> Vec<Disposition> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, task)| {
            if records
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|r| attempt_is_recorded(r, task.attempt))
            {
                Disposition::SkipRecorded
            } else if published.contains(&(task.id.clone(), task.attempt)) {
                Disposition::SkipOutcomePublished
            } else {
                Disposition::Run
            }
        })
        .collect()
}

/// Groups the indices `run` (ascending, batch order) into chains that run one after another:
/// tasks with the same `key` form one chain in batch order; every task without a key is a
/// chain of its own. Chains are returned in the order of their first task.
pub fn chains(tasks: &[Task], run: &[usize]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut by_key: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in run {
        match tasks[i].key.as_deref() {
            Some(key) => match by_key.get(key) {
                Some(&c) => out[c].push(i),
                None => {
                    by_key.insert(key, out.len());
                    out.push(vec![i]);
                }
            },
            None => out.push(vec![i]),
        }
    }
    out
}

/// What to do with a delivery, from its delivery count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// First delivery: run everything not skipped by records.
    First,
    /// A redelivery: also look for outcomes already published for this batch.
    Redelivered,
    /// More than `max_redeliveries`: the batch is poison; its unfinished tasks fail as `lost`
    /// and it is terminated.
    Poison,
}

/// Classifies a delivery (`delivered` counts from 1).
pub fn delivery(delivered: i64, max_redeliveries: u32) -> Delivery {
    if delivered > i64::from(max_redeliveries) {
        Delivery::Poison
    } else if delivered > 1 {
        Delivery::Redelivered
    } else {
        Delivery::First
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::{TaskSpec, TaskState};

    fn task(id: &str, key: Option<&str>, attempt: u32) -> Task {
        Task {
            id: id.into(),
            attempt,
            key: key.map(Into::into),
            ..Task::first_attempt(&TaskSpec::new("echo"), "q", 1000, 0)
        }
    }

    fn record(t: &Task, state: TaskState, attempt: u32) -> TaskRecord {
        let mut r = TaskRecord::new(t, state, chrono::Utc::now());
        r.attempt = attempt;
        r
    }

    #[test]
    fn skips_recorded_terminal_and_published_attempts() {
        let tasks = vec![
            task("a", None, 1),
            task("b", None, 1),
            task("c", None, 2),
            task("d", None, 1),
            task("e", None, 1),
        ];
        let records = vec![
            Some(record(&tasks[0], TaskState::Queued, 0)),
            Some(record(&tasks[1], TaskState::Cancelled, 0)),
            Some(record(&tasks[2], TaskState::Retrying, 1)),
            None,
            Some(record(&tasks[4], TaskState::Running, 1)),
        ];
        let published: HashSet<_> = [("d".to_owned(), 1)].into();
        assert_eq!(
            dispositions(&tasks, &records, &published),
            vec![
                Disposition::Run,
                Disposition::SkipRecorded,
                Disposition::Run,
                Disposition::SkipOutcomePublished,
                Disposition::Run,
            ]
        );
    }

    #[test]
    fn same_key_tasks_chain_in_batch_order() {
        let tasks = vec![
            task("1", Some("k"), 1),
            task("2", None, 1),
            task("3", Some("j"), 1),
            task("4", Some("k"), 1),
            task("5", None, 1),
            task("6", Some("k"), 1),
        ];
        assert_eq!(
            chains(&tasks, &[0, 1, 2, 3, 4, 5]),
            vec![vec![0, 3, 5], vec![1], vec![2], vec![4]]
        );
        assert_eq!(chains(&tasks, &[1, 3]), vec![vec![1], vec![3]]);
    }

    #[test]
    fn delivery_counts() {
        assert_eq!(delivery(1, 5), Delivery::First);
        assert_eq!(delivery(2, 5), Delivery::Redelivered);
        assert_eq!(delivery(5, 5), Delivery::Redelivered);
        assert_eq!(delivery(6, 5), Delivery::Poison);
        assert_eq!(delivery(2, 1), Delivery::Poison);
    }
}
