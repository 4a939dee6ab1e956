//! `drover status <id>`: one task record, from `<prefix>.api.status`, or read from
//! `<prefix>-tasks` directly when no dispatcher answers. Exit 1 when the task ended without
//! success (failed, cancelled, upstream_failed) or does not exist.

use super::nats::{ApiCallError, Ctx};
use super::output::{Format, clip, human_duration, key_values, or_dash, time_with_age};
use super::wait::exit_for;
use super::{CliError, Common, Exit, print_json};
use async_nats::HeaderMap;
use drover_shared::task::{TaskRecord, TaskState};
use std::time::Duration;

/// Flags of `drover status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Task id.
    pub id: String,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// The result or error of a record in one line: `{"x":1}`, `handler: boom`, or `-`.
pub fn outcome_line(r: &TaskRecord) -> String {
    if let Some(e) = &r.error
        && r.state != TaskState::Succeeded
    {
        return format!("{}: {}", error_kind(e), e.message);
    }
    match &r.result {
        Some(v) => v.get().to_owned(),
        None => "-".to_owned(),
    }
}

/// The wire name of an error's kind, e.g. `handler`.
pub fn error_kind(e: &drover_shared::task::TaskError) -> String {
    serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A record as `key  value` lines.
pub fn record_lines(r: &TaskRecord) -> String {
    let now = chrono::Utc::now();
    let mut pairs: Vec<(&str, String)> = vec![
        ("id", r.id.clone()),
        ("queue", r.queue.clone()),
        ("type", r.task_type.clone()),
        ("state", r.state.to_string()),
        ("attempt", format!("{}/{}", r.attempt, r.max_attempts)),
        ("key", or_dash(r.key.as_ref())),
        ("partition", or_dash(r.partition)),
        ("worker", or_dash(r.worker.as_ref())),
        ("submitted_at", time_with_age(r.submitted_at, now)),
        (
            "started_at",
            or_dash(r.started_at.map(|t| time_with_age(t, now))),
        ),
        (
            "finished_at",
            or_dash(r.finished_at.map(|t| time_with_age(t, now))),
        ),
    ];
    if let Some(t) = r.next_run_at {
        pairs.push(("next_run_at", time_with_age(t, now)));
    }
    pairs.push((
        "duration",
        or_dash(
            r.duration_ms
                .map(|ms| human_duration(Duration::from_millis(ms))),
        ),
    ));
    if let Some(e) = &r.error {
        pairs.push(("error", format!("{}: {}", error_kind(e), e.message)));
    }
    if let Some(v) = &r.result {
        pairs.push(("result", clip(v.get(), 2000)));
    }
    if let Some(p) = &r.parent {
        pairs.push(("parent", p.clone()));
    }
    if let Some(s) = r.shard {
        pairs.push(("shard", format!("{}/{}", s.index, s.total)));
    }
    if !r.meta.is_empty() {
        let meta: Vec<String> = r.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.push(("meta", meta.join(" ")));
    }
    key_values(&pairs)
}

/// The record of `id` and its revision: from the API, or straight from the bucket when no
/// dispatcher answers. `not_found` is exit 1.
pub async fn fetch(ctx: &Ctx, id: &str) -> Result<(serde_json::Value, u64), CliError> {
    let body = serde_json::json!({ "id": id }).to_string().into_bytes();
    match ctx.api("status", body, HeaderMap::new()).await {
        Ok(reply) => {
            let revision = reply["revision"].as_u64().unwrap_or(0);
            Ok((reply["task"].clone(), revision))
        }
        Err(ApiCallError::NoResponders(_)) => {
            let kv = ctx.bucket("tasks").await?;
            let entry = kv
                .entry(id)
                .await
                .map_err(|e| CliError::nats("cannot read the task record", e))?;
            match entry {
                Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                    let v = serde_json::from_slice(&e.value).map_err(|err| {
                        CliError::failed(format!("the record of task {id:?} is not JSON: {err}"))
                    })?;
                    Ok((v, e.revision))
                }
                _ => Err(not_found(id)),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The not-found error of a task id.
pub fn not_found(id: &str) -> CliError {
    CliError::failed(format!(
        "not_found: no task {id:?}: it was never submitted, its record expired, or its submission is still on its way to the dispatcher"
    ))
}

/// `drover status`.
pub async fn run(args: StatusArgs) -> Result<Exit, CliError> {
    if !drover_shared::task::is_valid_any_id(&args.id) {
        return Err(CliError::usage(format!(
            "{:?} is not a task id: ids match [A-Za-z0-9][A-Za-z0-9_-]{{0,127}} (or start with '_' when generated)",
            args.id
        )));
    }
    let ctx = Ctx::connect(&args.common).await?;
    let (value, revision) = fetch(&ctx, &args.id).await?;
    let record: TaskRecord = serde_json::from_value(value.clone()).map_err(|e| {
        CliError::failed(format!(
            "the record of task {:?} cannot be read: {e}",
            args.id
        ))
    })?;
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({ "task": value, "revision": revision })),
        Format::Table => print!("{}", record_lines(&record)),
    }
    let exit = if record.state.is_terminal() {
        exit_for([&record])
    } else {
        Exit::Ok
    };
    if exit != Exit::Ok {
        eprintln!(
            "error: task {} {}: {}",
            record.id,
            record.state,
            outcome_line(&record)
        );
    }
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_a_failed_record() {
        let r: TaskRecord = serde_json::from_value(serde_json::json!({
            "id": "t1", "queue": "default", "type": "echo", "state": "failed", "attempt": 3,
            "max_attempts": 3, "submitted_at": "2026-01-01T00:00:00.000Z",
            "duration_ms": 1500, "error": {"kind": "handler", "message": "boom"},
            "meta": {"a": "b"}
        }))
        .unwrap();
        assert_eq!(outcome_line(&r), "handler: boom");
        let text = record_lines(&r);
        assert!(text.contains("state         failed\n"), "{text}");
        assert!(text.contains("attempt       3/3\n"), "{text}");
        assert!(text.contains("error         handler: boom\n"), "{text}");
        assert!(text.contains("duration      1.5s\n"), "{text}");
        assert!(text.contains("meta          a=b\n"), "{text}");
        assert!(text.contains("worker        -\n"), "{text}");
    }

    #[test]
    fn result_of_a_succeeded_record() {
        let r: TaskRecord = serde_json::from_value(serde_json::json!({
            "id": "t1", "queue": "default", "type": "echo", "state": "succeeded", "attempt": 1,
            "max_attempts": 3, "submitted_at": "2026-01-01T00:00:00.000Z", "result": {"x": 1}
        }))
        .unwrap();
        assert_eq!(outcome_line(&r), r#"{"x":1}"#);
    }
}
