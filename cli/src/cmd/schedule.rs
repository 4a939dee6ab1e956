//! `drover schedule add|ls|rm|pause|resume|trigger` (SPEC §1.4): `add` builds a schedule object
//! from flags (the task template from the same flags as `drover submit`), validates it locally
//! with the dispatcher's own rules (bad input is exit 2 before any network I/O) and sends it to
//! `<prefix>.api.schedule.put`; `ls` reads `<prefix>-schedules` and each schedule's `cron.<id>`
//! in `<prefix>-state` (last fire) and computes the next fire time; the others are one request
//! each to `<prefix>.api.schedule.{delete,pause,resume,trigger}`.

use super::nats::Ctx;
use super::output::{Format, Table, or_dash};
use super::submit::{TaskFlags, build_task, read_payload};
use super::{CliError, Common, Exit, parse_duration, print_json};
use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use drover_shared::cron::{CronState, Schedule};
use drover_shared::task::format_time;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;

/// `drover schedule` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ScheduleCommand {
    /// Create or replace a schedule: a cron expression (or a trigger subject) and a task.
    Add(Box<AddArgs>),
    /// List schedules with their next and last fire times.
    Ls {
        /// Common flags.
        #[command(flatten)]
        common: Common,
    },
    /// Delete a schedule (runs already submitted are not touched).
    Rm(IdArgs),
    /// Pause a schedule: it does not fire until resumed.
    Pause(IdArgs),
    /// Resume a paused schedule (times missed while paused are not caught up).
    Resume(IdArgs),
    /// Submit one run of a schedule now.
    Trigger(IdArgs),
}

/// A schedule id and the common flags.
#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// Schedule id.
    pub id: String,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// Flags of `drover schedule add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Schedule id (also the middle of its task ids: `cron-<id>-<unix seconds>`).
    pub id: String,
    /// Task type (handler name) of each run, e.g. `report`.
    #[arg(value_name = "TYPE")]
    pub task_type: String,
    /// When to fire: 5 fields `min hour dom mon dow`, 6 with seconds first, or `@every 30s`.
    #[arg(long, required_unless_present = "trigger_subject")]
    pub cron: Option<String>,
    /// IANA time zone of --cron (default UTC), e.g. Europe/Berlin.
    #[arg(long = "tz", default_value = "UTC")]
    pub timezone: String,
    /// Fire once per message on this subject instead, with the message as payload.
    #[arg(long, conflicts_with = "cron")]
    pub trigger_subject: Option<String>,
    /// After downtime: one run now (fire_once), none (skip), or every missed time (catch_up).
    #[arg(long, value_parser = ["fire_once", "skip", "catch_up"], default_value = "fire_once")]
    pub misfire: String,
    /// With --misfire catch_up: at most this many missed runs (the newest).
    #[arg(long)]
    pub catch_up_limit: Option<u32>,
    /// While the previous run is not finished: start anyway (allow) or skip the fire (skip).
    #[arg(long, value_parser = ["allow", "skip"], default_value = "allow")]
    pub overlap: String,
    /// Store the schedule paused.
    #[arg(long)]
    pub paused: bool,
    /// Queue of the runs.
    #[arg(long, short = 'q', default_value = "default")]
    pub queue: String,
    /// Payload of each run: inline JSON, `@file`, or `@-` for stdin. Default `null`.
    #[arg(long, short = 'p')]
    pub payload: Option<String>,
    /// Affinity/ordering key of each run.
    #[arg(long)]
    pub key: Option<String>,
    /// Start each run this long after its fire time (e.g. 5s).
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Total attempts of each run (1-100; default 3).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Per-attempt time limit (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// A free label `k=v` of each run (repeatable).
    #[arg(long = "meta", value_name = "K=V")]
    pub meta: Vec<String>,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// The schedule object of `add`'s flags, validated with the dispatcher's rules; `prefix` is the
/// subject prefix. Every problem is a usage error naming the flag.
pub fn build_schedule(
    a: &AddArgs,
    payload: Option<&str>,
    prefix: &str,
) -> Result<Vec<u8>, CliError> {
    let task = build_task(&TaskFlags {
        task_type: &a.task_type,
        payload,
        key: a.key.as_deref(),
        delay: a.delay,
        max_attempts: a.max_attempts,
        timeout: a.timeout,
        meta: &a.meta,
        ..TaskFlags::default()
    })?;
    let task: Value = serde_json::from_slice(&task)
        .map_err(|e| CliError::usage(format!("cannot encode the task: {e}")))?;
    let mut obj = Map::new();
    obj.insert("id".into(), Value::String(a.id.clone()));
    if let Some(c) = &a.cron {
        obj.insert("cron".into(), Value::String(c.clone()));
    }
    obj.insert("timezone".into(), Value::String(a.timezone.clone()));
    if let Some(s) = &a.trigger_subject {
        obj.insert("trigger_subject".into(), Value::String(s.clone()));
    }
    obj.insert("task".into(), task);
    obj.insert("queue".into(), Value::String(a.queue.clone()));
    obj.insert("misfire".into(), Value::String(a.misfire.clone()));
    if let Some(n) = a.catch_up_limit {
        obj.insert("catch_up_limit".into(), n.into());
    }
    obj.insert("overlap".into(), Value::String(a.overlap.clone()));
    obj.insert("paused".into(), Value::Bool(a.paused));
    let bytes = serde_json::to_vec(&Value::Object(obj))
        .map_err(|e| CliError::usage(format!("cannot encode the schedule: {e}")))?;
    Schedule::parse(&bytes, prefix).map_err(|e| {
        let flag = match e.field.as_deref().unwrap_or("") {
            "id" => "ID: ",
            "cron" => "--cron: ",
            "timezone" => "--tz: ",
            "trigger_subject" => "--trigger-subject: ",
            "catch_up_limit" => "--catch-up-limit: ",
            "queue" => "--queue: ",
            _ => "",
        };
        CliError::usage(format!("{flag}{e}"))
    })?;
    Ok(bytes)
}

/// `drover schedule`.
pub async fn run(cmd: ScheduleCommand) -> Result<Exit, CliError> {
    match cmd {
        ScheduleCommand::Add(a) => add(*a).await,
        ScheduleCommand::Ls { common } => ls(&common).await,
        ScheduleCommand::Rm(a) => simple(a, "delete").await,
        ScheduleCommand::Pause(a) => simple(a, "pause").await,
        ScheduleCommand::Resume(a) => simple(a, "resume").await,
        ScheduleCommand::Trigger(a) => simple(a, "trigger").await,
    }
}

async fn add(a: AddArgs) -> Result<Exit, CliError> {
    let names = super::nats::names(&a.common)?;
    let payload = a.payload.as_deref().map(read_payload).transpose()?;
    let body = build_schedule(&a, payload.as_deref(), names.prefix())?;
    let ctx = Ctx::connect(&a.common).await?;
    let reply = ctx.api("schedule.put", body, HeaderMap::new()).await?;
    match ctx.format {
        Format::Json => print_json(&reply),
        Format::Table => println!(
            "{} schedule {}{}",
            if reply["created"].as_bool() == Some(true) {
                "created"
            } else {
                "replaced"
            },
            a.id,
            reply["next_fire"]
                .as_str()
                .map(|t| format!(", next fire {t}"))
                .unwrap_or_default()
        ),
    }
    Ok(Exit::Ok)
}

async fn simple(a: IdArgs, op: &str) -> Result<Exit, CliError> {
    drover_shared::cron::check_id(&a.id).map_err(|e| CliError::usage(format!("ID: {e}")))?;
    let ctx = Ctx::connect(&a.common).await?;
    let body = serde_json::json!({ "id": a.id }).to_string().into_bytes();
    let reply = ctx
        .api(&format!("schedule.{op}"), body, HeaderMap::new())
        .await?;
    match ctx.format {
        Format::Json => print_json(&reply),
        Format::Table => match op {
            "delete" => println!("deleted schedule {}", a.id),
            "pause" => println!("paused schedule {}", a.id),
            "resume" => println!("resumed schedule {}", a.id),
            _ => println!(
                "triggered schedule {}: task {}",
                a.id,
                reply["task_id"].as_str().unwrap_or("?")
            ),
        },
    }
    Ok(Exit::Ok)
}

/// One row of `ls`.
#[derive(Debug, serde::Serialize)]
struct Row {
    id: String,
    cron: Option<String>,
    timezone: String,
    trigger_subject: Option<String>,
    queue: String,
    r#type: Option<String>,
    paused: bool,
    misfire: drover_shared::cron::Misfire,
    overlap: drover_shared::cron::Overlap,
    next_fire: Option<String>,
    last_fire: Option<String>,
    last_task: Option<String>,
}

/// The `ls` row of a schedule with its state at `now`.
fn row(s: Schedule, written: DateTime<Utc>, state: Option<&CronState>, now: DateTime<Utc>) -> Row {
    let last = state.and_then(|st| DateTime::from_timestamp(st.last_fire, 0));
    let next_fire = match (s.paused, s.expr()) {
        (false, Ok(Some(expr))) => {
            let from = last.map_or(written, |l| l.max(written)).max(now);
            expr.next_after(from).map(|t| format_time(&t))
        }
        _ => None,
    };
    let task_type = serde_json::from_str::<Value>(s.task.get())
        .ok()
        .and_then(|t| t["type"].as_str().map(str::to_owned));
    Row {
        next_fire,
        last_fire: last.map(|t| format_time(&t)),
        last_task: state.and_then(|st| st.last_task.clone()),
        r#type: task_type,
        id: s.id,
        cron: s.cron,
        timezone: s.timezone,
        trigger_subject: s.trigger_subject,
        queue: s.queue,
        paused: s.paused,
        misfire: s.misfire,
        overlap: s.overlap,
    }
}

async fn ls(common: &Common) -> Result<Exit, CliError> {
    let ctx = Ctx::connect(common).await?;
    let schedules = ctx.latest("schedules", ">").await?;
    let states: HashMap<String, CronState> = ctx
        .latest("state", "cron.>")
        .await?
        .into_iter()
        .filter_map(|v| {
            Some((
                v.key.strip_prefix("cron.")?.to_owned(),
                serde_json::from_slice(&v.value).ok()?,
            ))
        })
        .collect();
    let now = Utc::now();
    let rows: Vec<Row> = schedules
        .into_iter()
        .filter_map(|v| {
            let s: Schedule = serde_json::from_slice(&v.value).ok()?;
            let state = states.get(&s.id);
            Some(row(s, v.created, state, now))
        })
        .collect();
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({ "schedules": rows })),
        Format::Table => {
            let mut t = Table::new(&[
                ("ID", 40),
                ("WHEN", 30),
                ("TZ", 20),
                ("QUEUE", 20),
                ("TYPE", 24),
                ("PAUSED", 6),
                ("NEXT FIRE", 24),
                ("LAST FIRE", 24),
            ]);
            for r in &rows {
                t.row(vec![
                    r.id.clone(),
                    r.cron
                        .clone()
                        .or_else(|| r.trigger_subject.as_ref().map(|s| format!("on {s}")))
                        .unwrap_or_default(),
                    r.timezone.clone(),
                    r.queue.clone(),
                    or_dash(r.r#type.as_ref()),
                    if r.paused { "yes" } else { "no" }.into(),
                    or_dash(r.next_fire.as_ref()),
                    or_dash(r.last_fire.as_ref()),
                ]);
            }
            if t.is_empty() {
                println!("no schedules");
            } else {
                print!("{}", t.render());
            }
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ScheduleCommand,
    }

    fn add(args: &[&str]) -> Result<Vec<u8>, CliError> {
        let mut argv = vec!["x", "add"];
        argv.extend_from_slice(args);
        let Cli {
            cmd: ScheduleCommand::Add(a),
        } = Cli::try_parse_from(argv).map_err(|e| CliError::usage(e.to_string()))?
        else {
            unreachable!("add parses to Add")
        };
        build_schedule(&a, a.payload.as_deref(), "drover")
    }

    #[test]
    fn add_builds_a_valid_schedule() {
        let b = add(&[
            "nightly",
            "report",
            "--cron",
            "0 3 * * *",
            "--tz",
            "Europe/Berlin",
            "-p",
            r#"{"a":1}"#,
            "--misfire",
            "catch_up",
            "--catch-up-limit",
            "5",
            "--overlap",
            "skip",
        ])
        .unwrap();
        let s = Schedule::parse(&b, "drover").unwrap();
        assert_eq!(s.catch_up_limit, 5);
        assert_eq!(s.timezone, "Europe/Berlin");
        assert!(s.task.get().contains("\"report\""));
    }

    #[test]
    fn add_names_the_flag_of_a_mistake() {
        let e = add(&["a", "t", "--cron", "* * *"]).unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        assert!(e.message.starts_with("--cron: "), "{}", e.message);
        let e = add(&["a", "t", "--cron", "* * * * *", "--tz", "Mars/Base"]).unwrap_err();
        assert!(e.message.starts_with("--tz: "), "{}", e.message);
        assert!(e.message.contains("Europe/Berlin"), "{}", e.message);
        assert!(
            add(&["a", "t"]).is_err(),
            "needs --cron or --trigger-subject"
        );
    }

    #[test]
    fn ls_rows_show_next_and_last_fire() {
        let s = Schedule::parse(
            br#"{"id":"a","cron":"*/10 * * * * *","task":{"type":"t"}}"#,
            "drover",
        )
        .unwrap();
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let state = CronState {
            last_fire: now.timestamp() - 5,
            last_task: Some("cron-a-1767225600".into()),
            last_run_at: None,
        };
        let r = row(s, now - chrono::TimeDelta::hours(1), Some(&state), now);
        assert_eq!(r.next_fire.as_deref(), Some("2026-01-01T00:00:10.000Z"));
        assert_eq!(r.last_fire.as_deref(), Some("2026-01-01T00:00:00.000Z"));
        assert_eq!(r.r#type.as_deref(), Some("t"));
    }
}
