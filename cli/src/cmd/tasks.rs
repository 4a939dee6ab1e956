//! `drover tasks`: task records from `<prefix>-tasks`, most recently submitted first, filtered by
//! queue and state. The bucket's latest values are read in one pass of an ordered consumer.

use super::nats::Ctx;
use super::output::{Format, Table, age, human_duration, or_dash};
use super::status::outcome_line;
use super::{CliError, Common, Exit, print_json};
use drover_shared::names::is_valid_queue;
use drover_shared::task::{TaskRecord, TaskState};
use std::time::Duration;

/// Flags of `drover tasks`.
#[derive(Debug, clap::Args)]
pub struct TasksArgs {
    /// Only tasks of this queue.
    #[arg(long, short = 'q')]
    pub queue: Option<String>,
    /// Only tasks in this state.
    #[arg(long, short = 's', value_parser = parse_state)]
    pub state: Option<TaskState>,
    /// At most this many (the most recently submitted).
    #[arg(long, short = 'n', default_value_t = 50)]
    pub limit: usize,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// Parses a state's wire name.
pub fn parse_state(s: &str) -> Result<TaskState, String> {
    TaskState::ALL
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| {
            let all: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            format!("{s:?} is not a state; one of {}", all.join(", "))
        })
}

/// Records matching the filters, most recently submitted first (ties by id), at most `limit`.
pub fn select(
    mut records: Vec<TaskRecord>,
    queue: Option<&str>,
    state: Option<TaskState>,
    limit: usize,
) -> Vec<TaskRecord> {
    records.retain(|r| queue.is_none_or(|q| r.queue == q) && state.is_none_or(|s| r.state == s));
    records.sort_by(|a, b| {
        b.submitted_at
            .cmp(&a.submitted_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    records.truncate(limit);
    records
}

/// `drover tasks`.
pub async fn run(args: TasksArgs) -> Result<Exit, CliError> {
    if let Some(q) = &args.queue
        && !is_valid_queue(q)
    {
        return Err(CliError::usage(format!(
            "--queue {q:?} is not a queue name: use [a-z0-9][a-z0-9_-]{{0,63}}"
        )));
    }
    let ctx = Ctx::connect(&args.common).await?;
    let values = ctx.latest("tasks", ">").await?;
    let total = values.len();
    let mut unreadable = 0usize;
    let records: Vec<TaskRecord> = values
        .into_iter()
        .filter_map(|v| {
            let r = serde_json::from_slice(&v.value).ok();
            if r.is_none() {
                unreadable += 1;
            }
            r
        })
        .collect();
    let shown = select(records, args.queue.as_deref(), args.state, args.limit);
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({ "tasks": shown, "total": total })),
        Format::Table => {
            let now = chrono::Utc::now();
            let mut t = Table::new(&[
                ("ID", 30),
                ("QUEUE", 12),
                ("TYPE", 14),
                ("STATE", 0),
                ("ATT", 0),
                ("SUBMITTED", 0),
                ("DURATION", 0),
                ("RESULT / ERROR", 30),
            ]);
            for r in &shown {
                t.row(vec![
                    r.id.clone(),
                    r.queue.clone(),
                    r.task_type.clone(),
                    r.state.to_string(),
                    format!("{}/{}", r.attempt, r.max_attempts),
                    age(r.submitted_at, now),
                    or_dash(
                        r.duration_ms
                            .map(|ms| human_duration(Duration::from_millis(ms))),
                    ),
                    outcome_line(r),
                ]);
            }
            if t.is_empty() {
                println!("no tasks");
            } else {
                print!("{}", t.render());
            }
            println!("{} shown of {total} record(s) in the bucket", shown.len());
        }
    }
    if unreadable > 0 {
        eprintln!("note: {unreadable} record(s) could not be read and are left out");
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, queue: &str, state: &str, submitted: &str) -> TaskRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "queue": queue, "type": "echo", "state": state, "attempt": 0,
            "max_attempts": 3, "submitted_at": submitted
        }))
        .unwrap()
    }

    #[test]
    fn newest_first_filtered_and_limited() {
        let all = vec![
            rec("a", "default", "queued", "2026-01-01T00:00:01.000Z"),
            rec("b", "mail", "failed", "2026-01-01T00:00:03.000Z"),
            rec("c", "default", "failed", "2026-01-01T00:00:02.000Z"),
            rec("d", "default", "queued", "2026-01-01T00:00:04.000Z"),
        ];
        let ids = |v: Vec<TaskRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(select(all.clone(), None, None, 50)),
            ["d", "b", "c", "a"]
        );
        assert_eq!(
            ids(select(all.clone(), Some("default"), None, 2)),
            ["d", "c"]
        );
        assert_eq!(
            ids(select(all.clone(), None, Some(TaskState::Failed), 50)),
            ["b", "c"]
        );
        assert!(select(all, Some("x"), None, 50).is_empty());
    }

    #[test]
    fn states_parse() {
        assert_eq!(
            parse_state("upstream_failed"),
            Ok(TaskState::UpstreamFailed)
        );
        assert!(
            parse_state("done")
                .unwrap_err()
                .contains("one of scheduled, queued")
        );
    }
}
