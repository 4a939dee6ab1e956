//! `drover dlq ls|show|replay|purge` over `<PREFIX>_DLQ`: dead tasks (`<prefix>.dlq.<queue>`,
//! header `Drover-Task-Id`, body the task as it travelled), rejected submissions
//! (`<prefix>.rejected.<queue>`, the original bytes with the reason in `Drover-Error`) and
//! quarantined envelopes (`<prefix>.quarantine`).
//!
//! Replay runs a dead task again through `<prefix>.api.retry` (the dispatcher re-submits it from
//! its newest dead copy and resets the record). Rejected submissions and quarantined envelopes
//! are never replayed: the same bytes would be refused again, so they are shown to be fixed and
//! submitted anew. Replay leaves the copies in place (the retry counter is derived from them);
//! `purge` removes them.

use super::nats::{ApiCallError, Ctx, Scanned, scan, to_chrono};
use super::output::{Format, Table, age, clip, or_dash};
use super::{CliError, Common, Exit, print_json};
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use base64::Engine as _;
use drover_shared::error::ErrorCode;
use drover_shared::names::{Names, is_valid_queue};
use serde::Serialize;
use std::collections::BTreeMap;

/// Header naming the task of a dead-letter copy.
pub const HDR_TASK_ID: &str = "Drover-Task-Id";
/// Headers that may carry the reason of a DLQ message, in the order they are looked at.
pub const REASON_HEADERS: [&str; 5] = [
    "Drover-Error-Code",
    "Drover-Reason",
    "Drover-Error-Kind",
    "Drover-Error",
    "Drover-Quarantine-Reason",
];

/// `drover dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead, rejected and quarantined messages (newest last).
    Ls {
        /// Only this queue's dead and rejected messages.
        #[arg(long, short = 'q')]
        queue: Option<String>,
        /// At most this many (the newest).
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: usize,
        /// Common flags.
        #[command(flatten)]
        common: Common,
    },
    /// Show one message: subject, headers and body.
    Show {
        /// Stream sequence in the DLQ stream (from `dlq ls`).
        seq: u64,
        /// Common flags.
        #[command(flatten)]
        common: Common,
    },
    /// Run dead tasks again (`drover.api.retry`); rejected and quarantined messages are refused.
    Replay {
        /// Stream sequence of one dead message.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        seq: Option<u64>,
        /// Every dead task (of --queue, or of all queues).
        #[arg(long)]
        all: bool,
        /// With --all: only this queue.
        #[arg(long, short = 'q', requires = "all")]
        queue: Option<String>,
        /// Common flags.
        #[command(flatten)]
        common: Common,
    },
    /// Delete DLQ messages (of --queue, or all of them). Needs --yes.
    Purge {
        /// Only this queue's dead and rejected messages.
        #[arg(long, short = 'q')]
        queue: Option<String>,
        /// Really delete.
        #[arg(long)]
        yes: bool,
        /// Common flags.
        #[command(flatten)]
        common: Common,
    },
}

/// What a DLQ message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A task out of attempts (`<prefix>.dlq.<queue>`).
    Dead,
    /// A submission the intake refused (`<prefix>.rejected.<queue>`).
    Rejected,
    /// An envelope that failed verification (`<prefix>.quarantine`).
    Quarantine,
}

impl Kind {
    /// The wire-ish name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Rejected => "rejected",
            Self::Quarantine => "quarantine",
        }
    }
}

/// The kind and queue of a DLQ subject (`None` for a subject Drover does not write).
pub fn classify(names: &Names, subject: &str) -> Option<(Kind, Option<String>)> {
    let rest = subject.strip_prefix(names.prefix())?.strip_prefix('.')?;
    if rest == "quarantine" {
        return Some((Kind::Quarantine, None));
    }
    let (kind, queue) = rest.split_once('.')?;
    let kind = match kind {
        "dlq" => Kind::Dead,
        "rejected" => Kind::Rejected,
        _ => return None,
    };
    Some((kind, Some(queue.to_owned())))
}

/// The reason a message's headers give, if any.
pub fn reason(headers: Option<&HeaderMap>) -> Option<String> {
    let h = headers?;
    REASON_HEADERS
        .iter()
        .find_map(|name| h.get(*name).map(|v| v.as_str().to_owned()))
}

/// Headers as `name → values`, sorted, for display.
pub fn header_map(headers: Option<&HeaderMap>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(h) = headers {
        for (name, values) in h.iter() {
            out.insert(
                name.to_string(),
                values.iter().map(|v| v.as_str().to_owned()).collect(),
            );
        }
    }
    out
}

/// One listed message (the `--output json` element of `dlq ls`).
#[derive(Debug, Clone, Serialize)]
pub struct DlqRow {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// Kind.
    pub kind: Kind,
    /// Queue (none for quarantine).
    pub queue: Option<String>,
    /// Task id (dead copies).
    pub task_id: Option<String>,
    /// Reason, from the headers.
    pub reason: Option<String>,
    /// Store time.
    pub time: String,
}

fn check_queue(q: &Option<String>) -> Result<(), CliError> {
    match q {
        Some(q) if !is_valid_queue(q) => Err(CliError::usage(format!(
            "--queue {q:?} is not a queue name: use [a-z0-9][a-z0-9_-]{{0,63}}"
        ))),
        _ => Ok(()),
    }
}

/// Subject filters of the messages of `queue` (all of the stream when `None`).
fn filters(names: &Names, queue: Option<&str>, dead_only: bool) -> Vec<String> {
    match (queue, dead_only) {
        (Some(q), true) => vec![names.dlq_subject(q)],
        (Some(q), false) => vec![names.dlq_subject(q), names.rejected_subject(q)],
        (None, true) => vec![names.dlq_subject(">")],
        (None, false) => Vec::new(),
    }
}

async fn scan_dlq(ctx: &Ctx, filters: &[String]) -> Result<Vec<Scanned>, CliError> {
    let stream = ctx.stream(&ctx.names.dlq_stream()).await?;
    scan(&ctx.client, &stream, filters, DeliverPolicy::All, true).await
}

/// `drover dlq ...`.
pub async fn run(cmd: DlqCommand) -> Result<Exit, CliError> {
    match cmd {
        DlqCommand::Ls {
            queue,
            limit,
            common,
        } => {
            check_queue(&queue)?;
            let ctx = Ctx::connect(&common).await?;
            ls(&ctx, queue.as_deref(), limit).await
        }
        DlqCommand::Show { seq, common } => {
            let ctx = Ctx::connect(&common).await?;
            show(&ctx, seq).await
        }
        DlqCommand::Replay {
            seq,
            all,
            queue,
            common,
        } => {
            check_queue(&queue)?;
            let ctx = Ctx::connect(&common).await?;
            match (seq, all) {
                (Some(seq), false) => replay_one(&ctx, seq).await,
                _ => replay_all(&ctx, queue.as_deref()).await,
            }
        }
        DlqCommand::Purge { queue, yes, common } => {
            check_queue(&queue)?;
            if !yes {
                return Err(CliError::usage(
                    "refusing to purge without --yes (this deletes the messages for good)",
                ));
            }
            let ctx = Ctx::connect(&common).await?;
            purge(&ctx, queue.as_deref()).await
        }
    }
}

async fn ls(ctx: &Ctx, queue: Option<&str>, limit: usize) -> Result<Exit, CliError> {
    let msgs = scan_dlq(ctx, &filters(&ctx.names, queue, false)).await?;
    let total = msgs.len();
    let rows: Vec<DlqRow> = msgs[total.saturating_sub(limit)..]
        .iter()
        .filter_map(|m| {
            let (kind, queue) = classify(&ctx.names, &m.subject)?;
            Some(DlqRow {
                seq: m.seq,
                subject: m.subject.clone(),
                kind,
                queue,
                task_id: m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(HDR_TASK_ID))
                    .map(|v| v.as_str().to_owned()),
                reason: reason(m.headers.as_ref()),
                time: drover_shared::task::format_time(&m.time),
            })
        })
        .collect();
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({ "messages": rows, "total": total })),
        Format::Table => {
            if rows.is_empty() {
                println!("the dead-letter stream {} is empty", ctx.names.dlq_stream());
                return Ok(Exit::Ok);
            }
            let now = chrono::Utc::now();
            let mut t = Table::new(&[
                ("SEQ", 0),
                ("AGE", 0),
                ("KIND", 0),
                ("QUEUE", 16),
                ("TASK", 30),
                ("REASON", 40),
            ]);
            for (r, m) in rows.iter().zip(&msgs[total.saturating_sub(limit)..]) {
                t.row(vec![
                    r.seq.to_string(),
                    age(m.time, now),
                    r.kind.as_str().to_owned(),
                    or_dash(r.queue.as_ref()),
                    or_dash(r.task_id.as_ref()),
                    or_dash(r.reason.as_ref()),
                ]);
            }
            print!("{}", t.render());
            println!("{} shown of {total}", rows.len());
        }
    }
    Ok(Exit::Ok)
}

/// One raw DLQ message, or exit 1 naming the sequence.
async fn get(
    ctx: &Ctx,
    seq: u64,
) -> Result<async_nats::jetstream::message::StreamMessage, CliError> {
    let stream = ctx.stream(&ctx.names.dlq_stream()).await?;
    stream.get_raw_message(seq).await.map_err(|e| {
        if e.kind() == LastRawMessageErrorKind::NoMessageFound {
            CliError::failed(format!(
                "no message {seq} in {} (purged, or never there; `drover dlq ls` lists them)",
                ctx.names.dlq_stream()
            ))
        } else {
            CliError::nats(
                &format!("cannot read message {seq} of {}", ctx.names.dlq_stream()),
                e,
            )
        }
    })
}

async fn show(ctx: &Ctx, seq: u64) -> Result<Exit, CliError> {
    let m = get(ctx, seq).await?;
    let subject = m.subject.to_string();
    let (kind, queue) = classify(&ctx.names, &subject).map_or((None, None), |(k, q)| (Some(k), q));
    let headers = header_map(Some(&m.headers));
    let body: Option<serde_json::Value> = serde_json::from_slice(&m.payload).ok();
    let time = to_chrono(m.time.unix_timestamp_nanos());
    match ctx.format {
        Format::Json => {
            let mut v = serde_json::json!({
                "seq": m.sequence,
                "subject": subject,
                "kind": kind,
                "queue": queue,
                "time": drover_shared::task::format_time(&time),
                "headers": headers,
                "body": body,
            });
            if body.is_none() {
                v["body_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(&m.payload)
                    .into();
            }
            print_json(&v);
        }
        Format::Table => {
            println!("seq      {}", m.sequence);
            println!("subject  {subject}");
            println!("kind     {}", kind.map_or("unknown", Kind::as_str));
            println!("queue    {}", or_dash(queue));
            println!(
                "time     {}",
                super::output::time_with_age(time, chrono::Utc::now())
            );
            println!("headers");
            for (k, vs) in &headers {
                for v in vs {
                    println!("  {k}: {}", clip(v, 300));
                }
            }
            match body {
                Some(b) => println!(
                    "body\n{}",
                    serde_json::to_string_pretty(&b).unwrap_or_default()
                ),
                None => println!("body     {} bytes, not JSON", m.payload.len()),
            }
        }
    }
    Ok(Exit::Ok)
}

/// The retry of one task: its reply, or the error.
async fn retry(ctx: &Ctx, id: &str) -> Result<serde_json::Value, ApiCallError> {
    let body = serde_json::json!({ "id": id }).to_string().into_bytes();
    ctx.api("retry", body, HeaderMap::new()).await
}

async fn replay_one(ctx: &Ctx, seq: u64) -> Result<Exit, CliError> {
    let m = get(ctx, seq).await?;
    let subject = m.subject.to_string();
    match classify(&ctx.names, &subject) {
        Some((Kind::Dead, _)) => {}
        Some((Kind::Rejected, _)) => {
            let why = reason(Some(&m.headers)).unwrap_or_else(|| "invalid".to_owned());
            return Err(CliError::failed(format!(
                "message {seq} is a rejected submission ({}); the same bytes would be rejected again: fix the task and submit it anew (`drover dlq show {seq}` shows the original)",
                clip(&why, 200)
            )));
        }
        Some((Kind::Quarantine, _)) => {
            return Err(CliError::failed(format!(
                "message {seq} is a quarantined envelope; it cannot be replayed (its tasks stay recorded as they were; `drover dlq show {seq}` shows the reason)"
            )));
        }
        None => {
            return Err(CliError::failed(format!(
                "message {seq} on {subject} is not a Drover dead letter"
            )));
        }
    }
    let id = m
        .headers
        .get(HDR_TASK_ID)
        .map(|v| v.as_str().to_owned())
        .ok_or_else(|| {
            CliError::failed(format!(
                "message {seq} has no {HDR_TASK_ID} header, so its task is unknown"
            ))
        })?;
    let reply = retry(ctx, &id).await?;
    match ctx.format {
        Format::Json => print_json(&reply),
        Format::Table => println!(
            "replayed {id} (retry {}, queue {}): {}",
            reply["retry"],
            reply["queue"].as_str().unwrap_or("?"),
            reply["state"].as_str().unwrap_or("queued")
        ),
    }
    Ok(Exit::Ok)
}

async fn replay_all(ctx: &Ctx, queue: Option<&str>) -> Result<Exit, CliError> {
    let msgs = scan_dlq(ctx, &filters(&ctx.names, queue, true)).await?;
    let mut ids: Vec<String> = Vec::new();
    for m in &msgs {
        if let Some(id) = m.headers.as_ref().and_then(|h| h.get(HDR_TASK_ID))
            && !ids.iter().any(|i| i == id.as_str())
        {
            ids.push(id.as_str().to_owned());
        }
    }
    let mut results = Vec::new();
    let (mut replayed, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    for id in &ids {
        let (status, detail) = match retry(ctx, id).await {
            Ok(r) => {
                replayed += 1;
                ("replayed", format!("retry {}", r["retry"]))
            }
            Err(ApiCallError::Api(e)) if e.code == ErrorCode::NotAllowed => {
                skipped += 1;
                ("skipped", e.message)
            }
            Err(e @ (ApiCallError::NoResponders(_) | ApiCallError::Timeout(_))) => {
                return Err(e.into());
            }
            Err(e) => {
                failed += 1;
                ("failed", e.to_string())
            }
        };
        results.push(serde_json::json!({ "id": id, "status": status, "detail": detail }));
    }
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "results": results,
            "replayed": replayed,
            "skipped": skipped,
            "failed": failed,
        })),
        Format::Table => {
            let mut t = Table::new(&[("ID", 36), ("RESULT", 0), ("DETAIL", 60)]);
            for r in &results {
                t.row(vec![
                    r["id"].as_str().unwrap_or_default().to_owned(),
                    r["status"].as_str().unwrap_or_default().to_owned(),
                    r["detail"].as_str().unwrap_or_default().to_owned(),
                ]);
            }
            if !t.is_empty() {
                print!("{}", t.render());
            }
            println!(
                "{replayed} replayed, {skipped} skipped (not failed any more), {failed} failed"
            );
        }
    }
    if failed > 0 {
        return Err(CliError::failed(format!(
            "{failed} task(s) could not be replayed"
        )));
    }
    Ok(Exit::Ok)
}

async fn purge(ctx: &Ctx, queue: Option<&str>) -> Result<Exit, CliError> {
    let stream = ctx.stream(&ctx.names.dlq_stream()).await?;
    let mut purged = 0u64;
    let subjects = filters(&ctx.names, queue, false);
    if subjects.is_empty() {
        purged += stream
            .purge()
            .await
            .map_err(|e| CliError::nats("cannot purge the DLQ", e))?
            .purged;
    } else {
        for s in subjects {
            purged += stream
                .purge()
                .filter(s)
                .await
                .map_err(|e| CliError::nats("cannot purge the DLQ", e))?
                .purged;
        }
    }
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({ "purged": purged })),
        Format::Table => println!("purged {purged} message(s) from {}", ctx.names.dlq_stream()),
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_classify() {
        let n = Names::default();
        assert_eq!(
            classify(&n, "drover.dlq.mail"),
            Some((Kind::Dead, Some("mail".into())))
        );
        assert_eq!(
            classify(&n, "drover.rejected._invalid"),
            Some((Kind::Rejected, Some("_invalid".into())))
        );
        assert_eq!(
            classify(&n, "drover.quarantine"),
            Some((Kind::Quarantine, None))
        );
        assert_eq!(classify(&n, "drover.other.x"), None);
        assert_eq!(classify(&n, "droverx.dlq.a"), None);
    }

    #[test]
    fn reasons_and_filters() {
        let mut h = HeaderMap::new();
        h.insert("Drover-Error", "{...}");
        h.insert("Drover-Error-Code", "invalid_field");
        assert_eq!(reason(Some(&h)).as_deref(), Some("invalid_field"));
        assert_eq!(reason(None), None);
        let n = Names::default();
        assert_eq!(
            filters(&n, Some("q"), false),
            ["drover.dlq.q", "drover.rejected.q"]
        );
        assert_eq!(filters(&n, None, true), ["drover.dlq.>"]);
        assert!(filters(&n, None, false).is_empty());
        assert_eq!(header_map(Some(&h))["Drover-Error-Code"], ["invalid_field"]);
    }
}
