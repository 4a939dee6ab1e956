//! The compact live status line of `drover up`: who leads, how many workers heartbeat, how fast
//! tasks are dispatched and how much waits — read the way any operator could, from the
//! election and worker buckets, the streams, and the leader's `/metrics`.

use async_nats::jetstream;
use drover_shared::names::Names;
use futures::StreamExt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One reading of the fleet.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Leader id and epoch.
    pub leader: Option<(String, u64)>,
    /// Workers with a live heartbeat.
    pub workers: usize,
    /// Messages waiting in the intake.
    pub intake_backlog: u64,
    /// Envelopes waiting for (or held by) workers.
    pub work_backlog: u64,
    /// The leader's `drover_tasks_dispatched_total`.
    pub dispatched: Option<u64>,
}

/// Reads a [`Snapshot`]; parts that cannot be read stay empty.
pub async fn snapshot(js: &jetstream::Context, names: &Names) -> Snapshot {
    let mut s = Snapshot::default();
    let mut leader_addr = None;
    if let Ok(kv) = js.get_key_value(names.bucket("election")).await
        && let Ok(Some(v)) = kv.get("leader").await
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&v)
    {
        s.leader = Some((
            v["id"].as_str().unwrap_or("?").to_owned(),
            v["epoch"].as_u64().unwrap_or(0),
        ));
        leader_addr = v["addr"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok());
    }
    if let Ok(kv) = js.get_key_value(names.bucket("workers")).await
        && let Ok(keys) = kv.keys().await
    {
        s.workers = keys
            .filter(|k| futures::future::ready(k.is_ok()))
            .count()
            .await;
    }
    if let Ok(mut st) = js.get_stream(names.submit_stream()).await
        && let Ok(info) = st.info().await
    {
        s.intake_backlog = info.state.messages;
    }
    if let Ok(mut st) = js.get_stream(names.work_stream()).await
        && let Ok(info) = st.info().await
    {
        s.work_backlog = info.state.messages;
    }
    if let Some(addr) = leader_addr {
        s.dispatched =
            tokio::task::spawn_blocking(move || metric(addr, "drover_tasks_dispatched_total"))
                .await
                .ok()
                .flatten();
    }
    s
}

/// The value of counter `name` on the `/metrics` page at `addr`.
fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Prints one status line every `every` until `stop` resolves.
pub async fn follow(
    js: &jetstream::Context,
    names: &Names,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut before: Option<(Instant, u64)> = None;
    loop {
        let s = snapshot(js, names).await;
        let rate = match (before, s.dispatched) {
            (Some((t, n)), Some(now)) if now >= n => {
                format!("{:.0}/s", (now - n) as f64 / t.elapsed().as_secs_f64())
            }
            _ => "-".into(),
        };
        if let Some(n) = s.dispatched {
            before = Some((Instant::now(), n));
        }
        let leader = s
            .leader
            .as_ref()
            .map_or("none".to_owned(), |(id, e)| format!("{id} (epoch {e})"));
        println!(
            "status  leader {leader} · workers {} · dispatched {} ({rate}) · backlog intake {} / work {}",
            s.workers,
            s.dispatched.map_or("-".into(), |n| n.to_string()),
            s.intake_backlog,
            s.work_backlog,
        );
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
