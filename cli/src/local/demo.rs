//! `drover up --demo`: a mixed workload — echo, sleep, keyed tasks that must finish in order, and
//! a failing task that retries into the dead-letter queue — submitted with plain JetStream
//! publishes, then followed through `drover-tasks` until every task is terminal.

use anyhow::bail;
use async_nats::jetstream::{self, kv};
use drover_shared::names::Names;
use drover_shared::task::{TaskRecord, TaskState};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Id suffixes of the keyed tasks, in submit order.
const KEYED: [&str; 3] = ["order-1", "order-2", "order-3"];

/// How long the demo waits for its tasks before it gives up.
const DEMO_TIMEOUT: Duration = Duration::from_secs(90);

/// One demo task: its id suffix, what it shows, and its JSON.
struct DemoTask {
    suffix: &'static str,
    task: serde_json::Value,
}

fn workload() -> Vec<DemoTask> {
    let mut tasks = vec![
        DemoTask {
            suffix: "echo",
            task: serde_json::json!({"type":"echo","payload":{"hello":"drover"}}),
        },
        DemoTask {
            suffix: "sleep",
            task: serde_json::json!({"type":"sleep","payload":{"ms":300}}),
        },
        DemoTask {
            suffix: "fail",
            task: serde_json::json!({
                "type":"fail",
                "payload":{"message":"demo failure"},
                "max_attempts":3,
                "backoff":{"initial_ms":200,"factor":2.0,"jitter":0.0}
            }),
        },
    ];
    // Same key → same partition, run one after another in submit order; 80 ms each, so their
    // finish times tell the order apart.
    for suffix in KEYED {
        tasks.push(DemoTask {
            suffix,
            task: serde_json::json!({"type":"sleep","key":"customer-42","payload":{"ms":80}}),
        });
    }
    tasks.push(DemoTask {
        suffix: "noop",
        task: serde_json::json!({"type":"noop","meta":{"source":"demo"}}),
    });
    tasks
}

/// Submits the workload and prints every state change until all tasks are terminal. Fails if
/// they are not done within [`DEMO_TIMEOUT`] or a task ends other than the demo expects.
pub async fn run(client: &async_nats::Client, names: &Names) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let tasks = workload();
    let ids: Vec<String> = tasks
        .iter()
        .map(|t| format!("demo-{run}-{}", t.suffix))
        .collect();
    let records = js.get_key_value(names.bucket("tasks")).await?;
    // Watch before submitting, so no state change is missed.
    let mut watch = records.watch_many_with_history(ids.iter()).await?;

    println!(
        "demo: submitting {} tasks to queue `default` with plain JetStream publishes",
        tasks.len()
    );
    let started = Instant::now();
    let mut acks = Vec::new();
    for (id, t) in ids.iter().zip(&tasks) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        let mut body = t.task.clone();
        body["id"] = id.as_str().into();
        let ack = js
            .publish_with_headers(
                names.submit_subject("default"),
                headers,
                serde_json::to_vec(&body)?.into(),
            )
            .await?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await?;
    }

    let width = ids.iter().map(String::len).max().unwrap_or(0);
    let mut last: HashMap<String, (TaskState, u32)> = HashMap::new();
    let mut done: BTreeMap<String, TaskRecord> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + DEMO_TIMEOUT;
    while done.len() < ids.len() {
        let entry = match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(e))) => e,
            Ok(Some(Err(e))) => bail!("watching the demo's task records failed: {e}"),
            Ok(None) => bail!("the watch on drover-tasks ended"),
            Err(_) => {
                let missing: Vec<&str> = ids
                    .iter()
                    .filter(|id| !done.contains_key(*id))
                    .map(String::as_str)
                    .collect();
                bail!(
                    "demo tasks not finished after {DEMO_TIMEOUT:?}: {}; see the *.log files in the fleet directory",
                    missing.join(", ")
                );
            }
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let Ok(record) = serde_json::from_slice::<TaskRecord>(&entry.value) else {
            continue;
        };
        let now = (record.state, record.attempt);
        if last.get(&record.id) == Some(&now) {
            continue;
        }
        last.insert(record.id.clone(), now);
        println!(
            "  {:>6.0} ms  {:<width$}  {}",
            started.elapsed().as_secs_f64() * 1e3,
            record.id,
            describe(&record),
        );
        if record.state.is_terminal() {
            done.insert(record.id.clone(), record);
        }
    }

    let took = started.elapsed();
    let failed: Vec<&TaskRecord> = done
        .values()
        .filter(|r| r.state != TaskState::Succeeded)
        .collect();
    let expected_failure = format!("demo-{run}-fail");
    for r in &failed {
        if r.id != expected_failure {
            bail!("demo task {} ended {} unexpectedly", r.id, r.state);
        }
    }
    let finished: Vec<_> = KEYED
        .iter()
        .map(|k| {
            done.get(&format!("demo-{run}-{k}"))
                .and_then(|r| r.finished_at)
        })
        .collect();
    if !finished.windows(2).all(|w| w[0].is_some() && w[0] <= w[1]) {
        bail!("the keyed demo tasks did not finish in submit order: {finished:?}");
    }
    println!();
    println!(
        "demo: the three customer-42 tasks ran one after another and finished in submit order"
    );
    println!(
        "demo: {} tasks finished in {:.1} s: {} succeeded, {} failed after {} attempts and went to the dead-letter queue ({})",
        done.len(),
        took.as_secs_f64(),
        done.len() - failed.len(),
        failed.len(),
        done.get(&expected_failure).map_or(0, |r| r.attempt),
        names.dlq_subject("default"),
    );
    println!(
        "      inspect: nats kv get {} {expected_failure}   ·   nats stream get {} --last-for {}",
        names.bucket("tasks"),
        names.dlq_stream(),
        names.dlq_subject("default"),
    );
    Ok(())
}

/// One line for a record: state, attempt, where it ran, and its result or error.
fn describe(r: &TaskRecord) -> String {
    let mut s = format!("{:<10} attempt {}", r.state.as_str(), r.attempt);
    if let Some(w) = &r.worker {
        s.push_str(&format!("  on {w}"));
    }
    if let Some(p) = r.partition {
        s.push_str(&format!(" p{p}"));
    }
    if let Some(k) = &r.key {
        s.push_str(&format!("  key {k}"));
    }
    match r.state {
        TaskState::Succeeded => {
            if let Some(d) = r.duration_ms {
                s.push_str(&format!("  {d} ms"));
            }
            if let Some(res) = &r.result {
                let text = res.get();
                let cut = text.char_indices().nth(60).map_or(text.len(), |(i, _)| i);
                let more = if cut < text.len() { "…" } else { "" };
                s.push_str(&format!("  → {}{more}", &text[..cut]));
            }
        }
        TaskState::Retrying | TaskState::Failed | TaskState::Cancelled => {
            if let Some(e) = &r.error {
                let kind = serde_json::to_value(e.kind).unwrap_or_default();
                s.push_str(&format!(
                    "  {}: {}",
                    kind.as_str().unwrap_or("error"),
                    e.message
                ));
            }
            if let Some(next) = r.next_run_at
                && r.state == TaskState::Retrying
            {
                s.push_str(&format!(
                    "  (next attempt at {})",
                    next.format("%H:%M:%S%.3f")
                ));
            }
        }
        _ => {}
    }
    s
}
