//! `drover workers`: the live workers from their heartbeats in `<prefix>-workers` (queues,
//! capacity, running tasks, host/pid, age of the last heartbeat) and the partitions each owns
//! according to `assignment.<queue>` in `<prefix>-state`.

use super::nats::{Ctx, KvValue};
use super::output::{Format, Table, age, or_dash, ranges};
use super::{CliError, Common, Exit, print_json};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Flags of `drover workers`.
#[derive(Debug, clap::Args)]
pub struct WorkersArgs {
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// The fields of a heartbeat record (SPEC §6) the listing shows; missing ones are defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Heartbeat {
    /// Worker id.
    pub id: String,
    /// Queues served.
    pub queues: Vec<String>,
    /// Ring weight.
    pub capacity: Option<u64>,
    /// Tasks running now.
    pub running: Option<u64>,
    /// Host name.
    pub host: Option<String>,
    /// Process id.
    pub pid: Option<u64>,
    /// Build version.
    pub version: Option<String>,
    /// Metrics address.
    pub addr: Option<String>,
}

/// `assignment.<queue>` as far as the listing needs it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AssignmentView {
    /// Leader term that wrote it.
    pub epoch: u64,
    /// Write counter.
    pub version: u64,
    /// Partition → worker.
    pub partitions: BTreeMap<String, String>,
}

/// One worker as listed (the `--output json` element).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    /// Worker id (the KV key).
    pub id: String,
    /// Queues served.
    pub queues: Vec<String>,
    /// Ring weight.
    pub capacity: Option<u64>,
    /// Tasks running.
    pub running: Option<u64>,
    /// Host.
    pub host: Option<String>,
    /// Pid.
    pub pid: Option<u64>,
    /// Version.
    pub version: Option<String>,
    /// When the last heartbeat was stored (server time, RFC 3339).
    pub heartbeat_at: String,
    /// Milliseconds since then.
    pub heartbeat_age_ms: i64,
    /// Owned partitions per queue.
    pub partitions: BTreeMap<String, Vec<u32>>,
    /// The heartbeat record as stored.
    pub record: serde_json::Value,
}

/// Partitions owned per worker and queue, from `(queue, assignment)` pairs.
pub fn owned(
    assignments: &[(String, AssignmentView)],
) -> BTreeMap<String, BTreeMap<String, Vec<u32>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
    for (queue, a) in assignments {
        for (p, worker) in &a.partitions {
            if let Ok(p) = p.parse::<u32>() {
                out.entry(worker.clone())
                    .or_default()
                    .entry(queue.clone())
                    .or_default()
                    .push(p);
            }
        }
    }
    for queues in out.values_mut() {
        for ps in queues.values_mut() {
            ps.sort_unstable();
        }
    }
    out
}

/// The assignments stored in `<prefix>-state`, by queue.
pub async fn assignments(ctx: &Ctx) -> Result<Vec<(String, AssignmentView)>, CliError> {
    Ok(ctx
        .latest("state", "assignment.>")
        .await?
        .into_iter()
        .filter_map(|v| {
            let queue = v.key.strip_prefix("assignment.")?.to_owned();
            Some((queue, serde_json::from_slice(&v.value).ok()?))
        })
        .collect())
}

/// The rows of the listing, sorted by id.
pub fn rows(
    heartbeats: &[KvValue],
    assignments: &[(String, AssignmentView)],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<WorkerRow> {
    let owned = owned(assignments);
    let mut rows: Vec<WorkerRow> = heartbeats
        .iter()
        .map(|v| {
            let record: serde_json::Value =
                serde_json::from_slice(&v.value).unwrap_or(serde_json::Value::Null);
            let hb: Heartbeat = serde_json::from_value(record.clone()).unwrap_or_default();
            WorkerRow {
                id: v.key.clone(),
                queues: hb.queues,
                capacity: hb.capacity,
                running: hb.running,
                host: hb.host,
                pid: hb.pid,
                version: hb.version,
                heartbeat_at: drover_shared::task::format_time(&v.created),
                heartbeat_age_ms: (now - v.created).num_milliseconds().max(0),
                partitions: owned.get(&v.key).cloned().unwrap_or_default(),
                record,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

/// `drover workers`.
pub async fn run(args: WorkersArgs) -> Result<Exit, CliError> {
    let ctx = Ctx::connect(&args.common).await?;
    let heartbeats = ctx.latest("workers", ">").await?;
    let assignments = assignments(&ctx).await?;
    let now = chrono::Utc::now();
    let rows = rows(&heartbeats, &assignments, now);
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({ "workers": rows })),
        Format::Table => {
            if rows.is_empty() {
                println!(
                    "no live workers (no heartbeat in {})",
                    ctx.names.bucket("workers")
                );
                return Ok(Exit::Ok);
            }
            let mut t = Table::new(&[
                ("ID", 30),
                ("QUEUES", 20),
                ("CAP", 0),
                ("RUN", 0),
                ("HOST/PID", 24),
                ("HEARTBEAT", 0),
                ("PARTITIONS", 30),
            ]);
            for r in &rows {
                let parts: Vec<String> = r
                    .partitions
                    .iter()
                    .map(|(q, ps)| format!("{q}:{}", ranges(ps)))
                    .collect();
                t.row(vec![
                    r.id.clone(),
                    r.queues.join(","),
                    or_dash(r.capacity),
                    or_dash(r.running),
                    format!("{}/{}", or_dash(r.host.as_ref()), or_dash(r.pid)),
                    age(
                        now - chrono::Duration::milliseconds(r.heartbeat_age_ms),
                        now,
                    ),
                    or_dash(Some(parts.join(" "))),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_per_worker() {
        let a: AssignmentView = serde_json::from_str(
            r#"{"epoch":3,"version":2,"partitions":{"0":"w1","1":"w2","2":"w1","10":"w1"}}"#,
        )
        .unwrap();
        let b: AssignmentView =
            serde_json::from_str(r#"{"epoch":3,"version":1,"partitions":{"0":"w2"}}"#).unwrap();
        let o = owned(&[("default".into(), a), ("mail".into(), b)]);
        assert_eq!(o["w1"]["default"], vec![0, 2, 10]);
        assert_eq!(o["w2"]["default"], vec![1]);
        assert_eq!(o["w2"]["mail"], vec![0]);
    }

    #[test]
    fn rows_from_heartbeats() {
        let now = chrono::Utc::now();
        let hb = KvValue {
            key: "w1".into(),
            value: bytes::Bytes::from_static(
                br#"{"id":"w1","queues":["default"],"capacity":2,"running":1,"host":"h","pid":7,"extra":true}"#,
            ),
            created: now - chrono::Duration::milliseconds(1500),
        };
        let a: AssignmentView =
            serde_json::from_str(r#"{"partitions":{"0":"w1","1":"w1"}}"#).unwrap();
        let r = rows(&[hb], &[("default".into(), a)], now);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].capacity, Some(2));
        assert_eq!(r[0].heartbeat_age_ms, 1500);
        assert_eq!(r[0].partitions["default"], vec![0, 1]);
        assert_eq!(r[0].record["extra"], true);
    }
}
