//! Where a bench runs: a spawned project-local nats-server (the pieces of `drover up`) with one
//! fleet per scenario under its own prefix, or an existing fleet; readiness waits, and decoding
//! the `drover-tasks` records a scenario follows.

use super::BenchArgs;
use crate::local::{self, Component, LocalNats};
use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, kv};
use drover_shared::bench::js_context;
use drover_shared::config::ConnectArgs;
use drover_shared::names::Names;
use drover_shared::topology::{self, TopologyConfig};
use futures::StreamExt;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The queue every bench task goes to.
pub(crate) const QUEUE: &str = "default";

/// The spawned server and what the fleets need to join it.
pub(crate) struct Spawned {
    dir: PathBuf,
    nats: LocalNats,
    keys: String,
}

/// The NATS server a bench runs against.
pub(crate) struct Target {
    /// Connection to the server.
    pub client: async_nats::Client,
    /// JetStream context with a deep PubAck window.
    pub js: jetstream::Context,
    /// Its client URL.
    pub url: String,
    /// Set with --spawn.
    spawned: Option<Spawned>,
    /// The existing fleet's prefix (without --spawn).
    prefix: String,
    /// A short token making this run's ids, fleets and scratch streams unique.
    pub run_id: String,
}

/// Milliseconds since the Unix epoch, as a float (µs resolution).
pub(crate) fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

impl Target {
    /// Connects to `--nats-url`, or starts a nats-server in a fresh temporary directory.
    pub async fn open(args: &BenchArgs) -> anyhow::Result<Self> {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let run_id = format!("b{:x}", millis % 0xff_ffff_ffff);
        let (url, spawned) = match &args.nats_url {
            Some(url) => (url.clone(), None),
            None => {
                let root = local::project_root()?;
                let bin = match &args.nats_server {
                    Some(b) => b.clone(),
                    None => local::install_nats(&root).await?,
                };
                let dir = std::env::temp_dir().join(format!("drover-bench-{run_id}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let keys = local::local_keys(&dir)?;
                let (port, monitor) = (free_port()?, free_port()?);
                super::note(&format!(
                    "starting nats-server on 127.0.0.1:{port} (store and logs in {})",
                    dir.display()
                ));
                let nats = LocalNats::start(&bin, &root, &dir, port, monitor).await?;
                (
                    format!("nats://127.0.0.1:{port}"),
                    Some(Spawned { dir, nats, keys }),
                )
            }
        };
        let connect = ConnectArgs {
            nats_url: url.clone(),
            creds: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            prefix: args.prefix.clone(),
        };
        let client =
            drover_shared::connect::connect(&connect, "drover-bench", Duration::from_secs(10))
                .await?;
        Ok(Self {
            js: js_context(client.clone()),
            client,
            url,
            spawned,
            prefix: args.prefix.clone(),
            run_id,
        })
    }

    /// `true` when this run started the server (and starts the fleets).
    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    /// What the report says about the target.
    pub fn describe(&self) -> serde_json::Value {
        let info = self.client.server_info();
        serde_json::json!({
            "mode": if self.is_spawned() { "spawn" } else { "nats-url" },
            "nats_server": info.version,
            "url": self.url,
        })
    }

    /// Stops the spawned server; its directory is removed after a successful run and kept (and
    /// named) otherwise.
    pub async fn close(self, ok: bool) {
        if let Some(s) = self.spawned {
            s.nats.shutdown().await;
            if ok {
                let _ = std::fs::remove_dir_all(&s.dir);
            } else {
                eprintln!("bench logs kept in {}", s.dir.display());
            }
        }
    }

    /// A fleet for one scenario. Spawned: provisions prefix `bench-<short>` and starts
    /// `dispatchers` and `workers` processes, then waits until every partition of the queue is
    /// assigned to a live worker. Existing fleet: checks that a leader and a worker are there.
    pub async fn fleet(
        &self,
        short: &str,
        dispatchers: usize,
        workers: usize,
    ) -> anyhow::Result<Fleet> {
        let Some(s) = &self.spawned else {
            let names = Names::new(&self.prefix)?;
            let fleet = Fleet {
                js: self.js.clone(),
                names,
                components: Vec::new(),
                env: Vec::new(),
                dir: PathBuf::new(),
                started: 0,
                short: short.to_owned(),
            };
            fleet.wait_ready(0).await?;
            return Ok(fleet);
        };
        let names = Names::new(&format!("bench-{short}"))?;
        topology::provision(&self.client, &names, &TopologyConfig::default())
            .await
            .context("provisioning the bench prefix failed")?;
        let mut fleet = Fleet {
            js: self.js.clone(),
            env: vec![
                ("DROVER_KEYS".into(), s.keys.clone()),
                ("DROVER_NATS_URL".into(), self.url.clone()),
                ("DROVER_PREFIX".into(), names.prefix().to_owned()),
                (
                    "DROVER_LOG".into(),
                    std::env::var("DROVER_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                ),
            ],
            names,
            components: Vec::new(),
            dir: s.dir.clone(),
            started: 0,
            short: short.to_owned(),
        };
        for _ in 0..dispatchers {
            fleet.start("drover-dispatcher")?;
        }
        for _ in 0..workers {
            fleet.start("drover-worker")?;
        }
        fleet.wait_ready(workers).await?;
        Ok(fleet)
    }
}

/// The leader lease value: who leads, in which epoch.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Leader {
    /// Dispatcher id.
    pub id: String,
    /// Term.
    #[serde(default)]
    pub epoch: u64,
}

/// The processes of one scenario (none against an existing fleet) and its names.
pub(crate) struct Fleet {
    /// The scenario's names.
    pub names: Names,
    js: jetstream::Context,
    /// Running components.
    pub components: Vec<Component>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    started: usize,
    short: String,
}

impl Fleet {
    /// Starts one more `bin` (`drover-dispatcher` / `drover-worker`); returns its id.
    pub fn start(&mut self, bin: &str) -> anyhow::Result<String> {
        self.started += 1;
        let kind = if bin.ends_with("worker") { "w" } else { "d" };
        let name = format!("{}-{kind}{}", self.short, self.started);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.components
            .push(Component::start(bin, &name, &self.dir, &env)?);
        Ok(name)
    }

    /// Removes component `name` from the fleet (to signal and reap it).
    pub fn take(&mut self, name: &str) -> Option<Component> {
        let i = self.components.iter().position(|c| c.name() == name)?;
        Some(self.components.remove(i))
    }

    /// Stops every component (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(self) {
        for c in self.components {
            c.stop().await;
        }
    }

    /// The current leader, if one holds the lease.
    pub async fn leader(&self, js: &jetstream::Context) -> Option<Leader> {
        let kv = js.get_key_value(self.names.bucket("election")).await.ok()?;
        let v = kv.get("leader").await.ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Waits up to `timeout` for a leader in an epoch above `above`.
    pub async fn wait_leader(
        &self,
        js: &jetstream::Context,
        above: u64,
        timeout: Duration,
    ) -> anyhow::Result<Leader> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader(js).await
                && l.epoch > above
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "no dispatcher of prefix {} took the lead (epoch > {above}) within {timeout:?}",
                    self.names.prefix()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ids of the workers with a live heartbeat.
    pub async fn live_workers(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        if let Ok(kv) = self.js.get_key_value(self.names.bucket("workers")).await
            && let Ok(mut keys) = kv.keys().await
        {
            while let Some(Ok(k)) = keys.next().await {
                out.insert(k);
            }
        }
        out
    }

    /// The owners of [`QUEUE`]'s partitions in its current assignment.
    async fn owners(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        if let Ok(kv) = self.js.get_key_value(self.names.bucket("state")).await
            && let Ok(Some(v)) = kv.get(format!("assignment.{QUEUE}")).await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&v)
            && let Some(parts) = v["partitions"].as_object()
        {
            out.extend(parts.values().filter_map(|w| w.as_str().map(str::to_owned)));
        }
        out
    }

    /// Waits (up to 60 s) for a leader and for `workers` live workers (at least one when 0)
    /// that own every partition of [`QUEUE`] between them.
    pub async fn wait_ready(&self, workers: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let want = workers.max(1);
        loop {
            let leader = self.leader(&self.js).await.filter(|l| l.epoch > 0);
            let live = self.live_workers().await;
            let owners = self.owners().await;
            let settled = owners.len() >= want.min(live.len()) && owners.is_subset(&live);
            if leader.is_some() && live.len() >= want && !owners.is_empty() && settled {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the fleet of prefix {} was not ready in 60 s: leader {:?}, {} live worker(s) \
                     (want {want}), partitions owned by {:?}",
                    self.names.prefix(),
                    leader.map(|l| l.id),
                    live.len(),
                    owners
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The fields of a `drover-tasks` record a bench reads.
#[derive(Debug, Deserialize)]
pub(crate) struct RecordView<'a> {
    /// State.
    #[serde(borrow)]
    pub state: &'a str,
    /// Worker of the current attempt.
    #[serde(default, borrow)]
    pub worker: Option<&'a str>,
    /// Start of the current attempt (RFC 3339, ms).
    #[serde(default, borrow)]
    pub started_at: Option<&'a str>,
}

impl RecordView<'_> {
    /// `started_at` in ms since the epoch.
    pub fn started_ms(&self) -> Option<i64> {
        let s = self.started_at?;
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// `true` for a terminal state other than `succeeded`.
    pub fn failed(&self) -> bool {
        matches!(self.state, "failed" | "cancelled" | "upstream_failed")
    }
}

/// A watch of every new record revision of `drover-tasks` from now on.
pub(crate) async fn watch_records(
    js: &jetstream::Context,
    names: &Names,
) -> anyhow::Result<kv::Watch> {
    let kv = js
        .get_key_value(names.bucket("tasks"))
        .await
        .with_context(|| {
            format!(
                "no {} bucket: is the fleet provisioned?",
                names.bucket("tasks")
            )
        })?;
    kv.watch_all()
        .await
        .context("cannot watch the task records")
}

/// Follows `watch` until every id in `ids` is terminal (or nothing new arrived for `stall`);
/// returns (succeeded, failed, time of the last one seen). `on_success` is called per success.
pub(crate) async fn follow_until_done(
    watch: &mut kv::Watch,
    ids: &mut HashSet<String>,
    stall: Duration,
    mut on_success: impl FnMut(&str, &RecordView<'_>, Instant),
) -> anyhow::Result<(usize, usize, Option<Instant>)> {
    let (mut ok, mut failed, mut last) = (0, 0, None);
    while !ids.is_empty() {
        let entry = match tokio::time::timeout(stall, watch.next()).await {
            Err(_) => break,
            Ok(None) => bail!("the record watch ended"),
            Ok(Some(Err(e))) => bail!("the record watch failed: {e}"),
            Ok(Some(Ok(entry))) => entry,
        };
        if entry.operation != kv::Operation::Put || !ids.contains(&entry.key) {
            continue;
        }
        let Ok(view) = serde_json::from_slice::<RecordView>(&entry.value) else {
            continue;
        };
        if view.state == "succeeded" {
            let now = Instant::now();
            ids.remove(&entry.key);
            ok += 1;
            last = Some(now);
            on_success(&entry.key, &view, now);
        } else if view.failed() {
            ids.remove(&entry.key);
            failed += 1;
        }
    }
    Ok((ok, failed, last))
}

/// What a drained throughput run left behind: the records of its ids.
pub(crate) struct Drained {
    /// Ids whose record is `succeeded`.
    pub succeeded: usize,
    /// Ids whose record is terminal and not `succeeded`.
    pub failed: usize,
    /// When the server stored the last `succeeded` record (its `Nats-Time-Stamp`).
    pub last_success: Option<chrono::DateTime<chrono::Utc>>,
}

/// Waits until the pipeline has drained — `submitted` set, and `DROVER_SUBMIT`, `DROVER_WORK`
/// and `DROVER_OUTCOMES` empty (work-queue streams: a message leaves once acked, and the leader
/// acks an outcome only after writing its records) — or until nothing in them moved for
/// `stall`; then reads the records of `ids` with batched direct gets. Polling three stream
/// infos every 20 ms instead of watching `drover-tasks` keeps the observer from adding a
/// delivery per record write to the server's work. `on_progress` gets the submit messages the
/// intake has taken so far.
pub(crate) async fn drain_and_read(
    js: &jetstream::Context,
    names: &Names,
    ids: &[String],
    submitted: &AtomicUsize,
    done_submitting: &AtomicBool,
    stall: Duration,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<Drained> {
    let mut streams = Vec::new();
    for name in [
        names.submit_stream(),
        names.work_stream(),
        names.outcomes_stream(),
    ] {
        streams.push(
            js.get_stream(&name)
                .await
                .with_context(|| format!("no stream {name}: is the fleet provisioned?"))?,
        );
    }
    let mut last_seen = Vec::new();
    let mut moved_at = Instant::now();
    loop {
        let mut held = Vec::with_capacity(streams.len());
        for s in &mut streams {
            held.push(s.info().await.map(|i| i.state.messages).unwrap_or(u64::MAX));
        }
        let taken = (submitted.load(Ordering::Relaxed) as u64).saturating_sub(held[0]);
        on_progress(taken);
        let finished = done_submitting.load(Ordering::Relaxed);
        if finished && held.iter().all(|&n| n == 0) {
            break;
        }
        if held != last_seen {
            last_seen = held;
            moved_at = Instant::now();
        } else if finished && moved_at.elapsed() >= stall {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bucket = names.bucket("tasks");
    let mut out = Drained {
        succeeded: 0,
        failed: 0,
        last_success: None,
    };
    for slice in ids.chunks(8192) {
        let entries = drover_shared::kv_batch::get_many(&js.client(), &bucket, slice)
            .await
            .context("read the task records")?;
        for e in entries.values().filter(|e| e.is_put) {
            let Ok(view) = serde_json::from_slice::<RecordView>(&e.value) else {
                continue;
            };
            if view.state == "succeeded" {
                out.succeeded += 1;
                out.last_success = out.last_success.max(e.stored_at);
            } else if view.failed() {
                out.failed += 1;
            }
        }
    }
    Ok(out)
}

/// Follows `watch` in a task of its own for a load of unknown size: ids starting with `prefix`
/// that reach `succeeded` (or fail) are counted; once `stop` is set it ends when as many ids
/// as `submitted` are terminal, or when none turned terminal for `stall`. Returns (succeeded,
/// failed).
pub(crate) fn count_outcomes(
    mut watch: kv::Watch,
    prefix: String,
    stop: Arc<AtomicBool>,
    submitted: Arc<AtomicUsize>,
    stall: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<(usize, usize)>> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (HashSet::new(), HashSet::new());
        let mut progress_at = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed)
                && (ok.len() + failed.len() >= submitted.load(Ordering::Relaxed)
                    || progress_at.elapsed() > stall)
            {
                break;
            }
            let entry = match tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
                Err(_) => continue,
                Ok(None) => bail!("the record watch ended"),
                Ok(Some(Err(e))) => bail!("the record watch failed: {e}"),
                Ok(Some(Ok(entry))) => entry,
            };
            if entry.operation != kv::Operation::Put || !entry.key.starts_with(&prefix) {
                continue;
            }
            let Ok(view) = serde_json::from_slice::<RecordView>(&entry.value) else {
                continue;
            };
            if view.state == "succeeded" {
                failed.remove(&entry.key);
                if ok.insert(entry.key) {
                    progress_at = Instant::now();
                }
            } else if view.failed() && !ok.contains(&entry.key) && failed.insert(entry.key) {
                progress_at = Instant::now();
            }
        }
        Ok((ok.len(), failed.len()))
    })
}
