//! `drover wait <id>...`: watch task records in `<prefix>-tasks` until every one is terminal
//! (a KV watch on the keys, no polling), with a progress bar on a terminal. Also the watch
//! behind `drover submit --wait`.

use super::nats::Ctx;
use super::output::{Format, Table, clip, human_duration, or_dash};
use super::status::{outcome_line, record_lines};
use super::{CliError, Common, Exit, parse_duration, print_json};
use async_nats::jetstream::kv::Operation;
use drover_shared::task::{TaskRecord, TaskState};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// More ids than this are watched with one wildcard watch filtered here, rather than one
/// filter subject per id.
const MAX_FILTER_SUBJECTS: usize = 100;

/// Flags of `drover wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Task ids.
    #[arg(required = true, num_args = 1..)]
    pub ids: Vec<String>,
    /// Give up after this long (e.g. 30s, 5m) with exit 3; default: wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// The exit code a set of terminal records earns: 0 if every task succeeded, else 1.
pub fn exit_for<'a>(records: impl IntoIterator<Item = &'a TaskRecord>) -> Exit {
    if records.into_iter().all(|r| r.state == TaskState::Succeeded) {
        Exit::Ok
    } else {
        Exit::Failed
    }
}

/// Counts of terminal states, for the summary line: `3 succeeded, 1 failed`.
pub fn summary<'a>(records: impl IntoIterator<Item = &'a TaskRecord>) -> String {
    let mut counts: BTreeMap<usize, (TaskState, usize)> = BTreeMap::new();
    for r in records {
        let order = TaskState::ALL
            .iter()
            .position(|s| *s == r.state)
            .unwrap_or(0);
        counts.entry(order).or_insert((r.state, 0)).1 += 1;
    }
    counts
        .values()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the watch reports as records change.
pub trait Progress {
    /// A record of one of the ids arrived (`done` of `total` are terminal now).
    fn update(&mut self, record: &TaskRecord, done: usize, total: usize);
    /// The watch ended.
    fn finish(&mut self);
}

/// No progress display.
pub struct Silent;

impl Progress for Silent {
    fn update(&mut self, _: &TaskRecord, _: usize, _: usize) {}
    fn finish(&mut self) {}
}

/// A progress bar on stderr.
pub struct Bar(indicatif::ProgressBar);

impl Bar {
    /// A bar over `total` tasks.
    pub fn new(total: usize) -> Self {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} terminal  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(bar)
    }
}

impl Progress for Bar {
    fn update(&mut self, record: &TaskRecord, done: usize, _total: usize) {
        self.0.set_position(done as u64);
        self.0
            .set_message(clip(&format!("{} {}", record.id, record.state), 40));
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Watches the records of `ids` until all are terminal, or until `timeout` (exit 3, naming
/// what is still open). Ids without a record are waited for (their submission may be on its
/// way). Returns the terminal records by id.
pub async fn watch_terminal(
    ctx: &Ctx,
    ids: &[String],
    timeout: Option<Duration>,
    progress: &mut dyn Progress,
) -> Result<HashMap<String, TaskRecord>, CliError> {
    let kv = ctx.bucket("tasks").await?;
    let mut watch = if ids.len() <= MAX_FILTER_SUBJECTS {
        kv.watch_many_with_history(ids.iter().map(String::as_str))
            .await
    } else {
        kv.watch_with_history(">").await
    }
    .map_err(|e| CliError::nats("cannot watch the task records", e))?;
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut latest: HashMap<String, TaskRecord> = HashMap::new();
    let mut terminal: HashMap<String, TaskRecord> = HashMap::new();
    let deadline = timeout.map(|t| Instant::now() + t);
    while terminal.len() < wanted.len() {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), watch.next()).await {
                Ok(n) => n,
                Err(_) => {
                    progress.finish();
                    return Err(timed_out(timeout.unwrap_or_default(), ids, &latest));
                }
            },
            None => watch.next().await,
        };
        let Some(entry) = next else {
            progress.finish();
            return Err(CliError::unreachable(
                "the watch on the task records ended (connection lost?)",
            ));
        };
        let entry = entry.map_err(|e| CliError::nats("watching the task records", e))?;
        if !wanted.contains(entry.key.as_str()) {
            continue;
        }
        if entry.operation != Operation::Put {
            terminal.remove(&entry.key);
            latest.remove(&entry.key);
            continue;
        }
        let record: TaskRecord = match serde_json::from_slice(&entry.value) {
            Ok(r) => r,
            Err(e) => {
                progress.finish();
                return Err(CliError::failed(format!(
                    "the record of task {:?} cannot be read: {e}",
                    entry.key
                )));
            }
        };
        if record.state.is_terminal() {
            terminal.insert(entry.key.clone(), record.clone());
        } else {
            // A retry moved it out of its terminal state again.
            terminal.remove(&entry.key);
        }
        progress.update(&record, terminal.len(), wanted.len());
        latest.insert(entry.key, record);
    }
    progress.finish();
    Ok(terminal)
}

fn timed_out(after: Duration, ids: &[String], latest: &HashMap<String, TaskRecord>) -> CliError {
    let open: Vec<String> = ids
        .iter()
        .filter(|id| !latest.get(*id).is_some_and(|r| r.state.is_terminal()))
        .map(|id| match latest.get(id) {
            Some(r) => format!("{id} ({})", r.state),
            None => format!("{id} (no record yet)"),
        })
        .collect();
    let shown: Vec<&str> = open.iter().take(5).map(String::as_str).collect();
    let more = if open.len() > 5 {
        format!(" and {} more", open.len() - 5)
    } else {
        String::new()
    };
    CliError::unreachable(format!(
        "timed out after {}: {} task(s) not finished: {}{more}",
        human_duration(after),
        open.len(),
        shown.join(", ")
    ))
}

/// `drover wait`.
pub async fn run(args: WaitArgs) -> Result<Exit, CliError> {
    for id in &args.ids {
        if !drover_shared::task::is_valid_any_id(id) {
            return Err(CliError::usage(format!(
                "{id:?} is not a task id: ids match [A-Za-z0-9][A-Za-z0-9_-]{{0,127}} (or start with '_' when generated)"
            )));
        }
    }
    let mut ids = args.ids.clone();
    ids.dedup();
    let ctx = Ctx::connect(&args.common).await?;
    let show_bar = !args.quiet && ctx.format == Format::Table && std::io::stderr().is_terminal();
    let mut bar;
    let mut silent = Silent;
    let progress: &mut dyn Progress = if show_bar {
        bar = Bar::new(ids.len());
        &mut bar
    } else {
        &mut silent
    };
    let records = watch_terminal(&ctx, &ids, args.timeout, progress).await?;
    let ordered: Vec<&TaskRecord> = ids.iter().filter_map(|id| records.get(id)).collect();
    let exit = exit_for(ordered.iter().copied());
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "ok": exit == Exit::Ok,
            "tasks": ordered,
        })),
        Format::Table if ordered.len() == 1 => {
            print!("{}", record_lines(ordered[0]));
        }
        Format::Table => {
            let mut t = Table::new(&[
                ("ID", 36),
                ("STATE", 0),
                ("ATTEMPT", 0),
                ("DURATION", 0),
                ("RESULT / ERROR", 50),
            ]);
            for r in &ordered {
                t.row(vec![
                    r.id.clone(),
                    r.state.to_string(),
                    format!("{}/{}", r.attempt, r.max_attempts),
                    or_dash(
                        r.duration_ms
                            .map(|ms| human_duration(Duration::from_millis(ms))),
                    ),
                    outcome_line(r),
                ]);
            }
            print!("{}", t.render());
            println!("{}", summary(ordered.iter().copied()));
        }
    }
    if exit != Exit::Ok {
        let bad: Vec<&str> = ordered
            .iter()
            .filter(|r| r.state != TaskState::Succeeded)
            .map(|r| r.id.as_str())
            .collect();
        eprintln!(
            "error: {} of {} task(s) did not succeed: {}",
            bad.len(),
            ordered.len(),
            clip(&bad.join(", "), 200)
        );
    }
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, state: TaskState) -> TaskRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "queue": "default", "type": "echo", "state": state, "attempt": 1,
            "max_attempts": 3, "submitted_at": "2026-01-01T00:00:00.000Z"
        }))
        .unwrap()
    }

    #[test]
    fn exit_and_summary() {
        let ok = [
            rec("a", TaskState::Succeeded),
            rec("b", TaskState::Succeeded),
        ];
        assert_eq!(exit_for(&ok), Exit::Ok);
        assert_eq!(summary(&ok), "2 succeeded");
        let mixed = [
            rec("a", TaskState::Cancelled),
            rec("b", TaskState::Succeeded),
            rec("c", TaskState::Failed),
            rec("d", TaskState::Succeeded),
        ];
        assert_eq!(exit_for(&mixed), Exit::Failed);
        assert_eq!(summary(&mixed), "2 succeeded, 1 failed, 1 cancelled");
        assert_eq!(
            exit_for(&[rec("u", TaskState::UpstreamFailed)]),
            Exit::Failed
        );
    }

    #[test]
    fn timeout_names_open_tasks() {
        let mut latest = HashMap::new();
        latest.insert("a".to_owned(), rec("a", TaskState::Queued));
        latest.insert("b".to_owned(), rec("b", TaskState::Succeeded));
        let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        let e = timed_out(Duration::from_secs(2), &ids, &latest);
        assert_eq!(e.exit, Exit::Unreachable);
        assert_eq!(
            e.message,
            "timed out after 2.0s: 2 task(s) not finished: a (queued), c (no record yet)"
        );
    }
}
