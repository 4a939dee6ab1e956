//! The chaos harness (issue 7): a whole Drover fleet of real processes — a 3-node NATS cluster
//! with R3 streams, 3 dispatchers, 3 workers — under a steady load, with faults injected while it
//! runs, and a checker that proves nothing was lost and accounts for every extra execution.
//!
//! * **Execution sink.** Every task runs the `chaos` exec handler, a shell script that appends
//!   `<id> <attempt> <worker> start <ms>` before and `… end <ms>` after a short sleep to one file
//!   (`O_APPEND` writes of one short line are atomic). The identity comes from the
//!   `DROVER_TASK_ID`, `DROVER_ATTEMPT` and `DROVER_WORKER_ID` variables every exec run gets; the
//!   times are wall-clock milliseconds of the same host as the NATS servers' record times.
//! * **Load.** [`ChaosFleet::start_load`] publishes tasks at a steady rate with plain JetStream
//!   publishes (`Nats-Msg-Id` = task id), retrying each with the same id until it is acked, and
//!   records every accepted id with its PubAck time.
//! * **Faults.** [`ChaosFleet::inject`] runs one [`FaultKind`] and logs what, when and to whom
//!   ([`FaultRecord`]) so extra executions can be attributed.
//! * **Check.** [`ChaosFleet::wait_quiescent`] waits until the pipeline is empty, every accepted
//!   task has a terminal record and the sink is still; [`check`] (pure) turns the observation into
//!   a [`ChaosReport`]: lost tasks, attempts started after success was recorded, extra executions
//!   per fault (or unattributed), recovery times.

use crate::observe::{leader_id, wait_leader};
use crate::{DroverProcess, NatsCluster, TEST_KEYS};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::Context};
use drover_shared::names::Names;
use drover_shared::topology::{self, TopologyConfig};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// The queue the chaos load goes to.
pub const QUEUE: &str = "default";

/// The task type of the recording exec handler.
pub const TASK_TYPE: &str = "chaos";

/// Milliseconds since the Unix epoch, the clock of the sink and of the fault log.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Timing and size of a chaos fleet.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Partitions of the queue.
    pub partitions: u32,
    /// Tasks submitted per second while the load runs.
    pub rate_per_sec: u32,
    /// How long one execution sleeps, in milliseconds.
    pub task_ms: u64,
    /// Leader lease (`topology.lease_ms`).
    pub lease_ms: u64,
    /// Worker TTL (`topology.worker_ttl_ms`).
    pub worker_ttl_ms: u64,
    /// Worker heartbeat period.
    pub heartbeat_ms: u64,
    /// Worker fence margin.
    pub fence_margin_ms: u64,
    /// Tasks one worker runs at once.
    pub concurrency: usize,
    /// Task ids are `<id_prefix><n>`.
    pub id_prefix: String,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            partitions: 8,
            rate_per_sec: 40,
            task_ms: 200,
            lease_ms: 3_000,
            worker_ttl_ms: 3_000,
            heartbeat_ms: 500,
            fence_margin_ms: 500,
            concurrency: 16,
            id_prefix: "t".into(),
        }
    }
}

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL the leading dispatcher (a fresh replica replaces it).
    KillLeader,
    /// SIGKILL one worker (a fresh worker replaces it).
    KillWorker,
    /// SIGSTOP one worker for longer than its TTL, then SIGCONT.
    StopWorker,
    /// SIGKILL one NATS node, then restart it with its store.
    KillNatsNode,
    /// SIGTERM every dispatcher at once, then start three fresh ones.
    RestartDispatchers,
    /// SIGTERM one worker at a time, each replaced by a fresh one before the next goes.
    RollingRestartWorkers,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::KillLeader,
        FaultKind::KillWorker,
        FaultKind::StopWorker,
        FaultKind::KillNatsNode,
        FaultKind::RestartDispatchers,
        FaultKind::RollingRestartWorkers,
    ];

    /// A short stable name.
    pub fn name(self) -> &'static str {
        match self {
            Self::KillLeader => "kill-leader",
            Self::KillWorker => "kill-worker",
            Self::StopWorker => "stop-worker",
            Self::KillNatsNode => "kill-nats-node",
            Self::RestartDispatchers => "restart-dispatchers",
            Self::RollingRestartWorkers => "rolling-restart-workers",
        }
    }

    /// How long before the fault an execution may have ended and still have been cut off by it
    /// (its outcome not yet durable), and how long after the fault ended one may still start
    /// and be undone by it, in milliseconds.
    fn reach_ms(self) -> (i64, i64) {
        match self {
            // A worker's own run: the outcome is published right after the process ends.
            Self::KillWorker | Self::StopWorker | Self::RollingRestartWorkers => (3_000, 1_000),
            // A leader's envelope sealed just before it died, or a server whose loss fences
            // workers and stalls outcomes: any run around the fault.
            Self::KillLeader | Self::RestartDispatchers | Self::KillNatsNode => (10_000, 10_000),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One injected fault, as the fault log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRecord {
    /// 1-based number in the log.
    pub seq: usize,
    /// What.
    pub kind: FaultKind,
    /// Which process or node (`d2`, `w3`, `nats-1`, `d4,d5,d6`).
    pub target: String,
    /// The workers whose runs the fault cut off; empty for a fleet-wide fault.
    pub workers: Vec<String>,
    /// When it was injected (ms since the epoch).
    pub at_ms: i64,
    /// When the injection ended (the SIGCONT, the restarted node healthy, the last replacement
    /// registered).
    pub end_ms: i64,
    /// When the fleet had recovered by the fault's own measure (a new leader elected, the node
    /// healthy, the replacement registered), if it did.
    pub recovered_ms: Option<i64>,
}

impl FaultRecord {
    /// `#3 kill-leader d2`.
    pub fn label(&self) -> String {
        format!("#{} {} {}", self.seq, self.kind, self.target)
    }
}

/// One run of the chaos handler, read from the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// The worker that ran it.
    pub worker: String,
    /// When the process started, ms since the epoch.
    pub start_ms: i64,
    /// When it finished, if it did.
    pub end_ms: Option<i64>,
}

/// Parses the sink: `<id> <attempt> <worker> start|end <ms>` lines; start and end of one run
/// are paired by (id, attempt, worker) in order. Malformed lines are ignored.
pub fn parse_sink(text: &str) -> Vec<Execution> {
    let mut out: Vec<Execution> = Vec::new();
    let mut open: HashMap<(String, u32, String), Vec<usize>> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [id, attempt, worker, what, ms] = f[..] else {
            continue;
        };
        let (Ok(attempt), Ok(ms)) = (attempt.parse::<u32>(), ms.parse::<i64>()) else {
            continue;
        };
        let key = (id.to_owned(), attempt, worker.to_owned());
        match what {
            "start" => {
                open.entry(key).or_default().push(out.len());
                out.push(Execution {
                    task_id: id.to_owned(),
                    attempt,
                    worker: worker.to_owned(),
                    start_ms: ms,
                    end_ms: None,
                });
            }
            "end" => {
                if let Some(list) = open.get_mut(&key)
                    && !list.is_empty()
                {
                    let i = list.remove(0);
                    out[i].end_ms = Some(ms);
                }
            }
            _ => {}
        }
    }
    out
}

/// A task the intake accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Task id.
    pub id: String,
    /// When its PubAck arrived, ms since the epoch.
    pub ack_ms: i64,
}

/// A task's record at quiescence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView {
    /// `state`.
    pub state: String,
    /// When the record's current revision was written (server time, ms since the epoch).
    pub written_ms: i64,
}

impl RecordView {
    /// Whether the state is terminal.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state.as_str(),
            "succeeded" | "failed" | "cancelled" | "upstream_failed"
        )
    }
}

/// What one fault did, in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSummary {
    /// [`FaultRecord::label`].
    pub label: String,
    /// Kind.
    pub kind: FaultKind,
    /// From injection to the end of the injection, ms.
    pub duration_ms: i64,
    /// From injection to the fault's own recovery measure ([`FaultRecord::recovered_ms`]), ms.
    pub recovered_after_ms: Option<i64>,
    /// From injection to the first start of a task accepted after it: the pipeline moves again.
    pub progress_after_ms: Option<i64>,
    /// The slowest accept → first start among tasks accepted in the 10 s after the injection.
    pub worst_latency_ms: Option<i64>,
    /// Extra executions attributed to it.
    pub extra_executions: usize,
}

/// The checker's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChaosReport {
    /// Accepted tasks.
    pub tasks: usize,
    /// Accepted tasks without a terminal record or without any execution.
    pub lost: Vec<String>,
    /// Terminal states other than `succeeded`, with counts.
    pub not_succeeded: BTreeMap<String, usize>,
    /// Executions in the sink (of accepted tasks).
    pub executions: usize,
    /// Executions beyond the first of each task.
    pub extra_executions: usize,
    /// Extra executions by fault label.
    pub extra_by_fault: BTreeMap<String, usize>,
    /// Extra executions by fault kind.
    pub extra_by_kind: BTreeMap<FaultKind, usize>,
    /// Extra executions no fault explains (described).
    pub unattributed: Vec<String>,
    /// Executions that started after their task's success was recorded (described).
    pub started_after_success: Vec<String>,
    /// Executions of ids that were never accepted.
    pub unknown_executions: usize,
    /// Per fault, in order.
    pub faults: Vec<FaultSummary>,
}

impl ChaosReport {
    /// Whether the run kept every guarantee: nothing lost, every task succeeded, no attempt
    /// after success, every extra execution attributed.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.not_succeeded.is_empty()
            && self.unattributed.is_empty()
            && self.started_after_success.is_empty()
            && self.unknown_executions == 0
    }

    /// Panics with the whole report unless [`is_clean`](Self::is_clean).
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "chaos guarantees broken:\n{self}");
    }
}

fn first<T: fmt::Debug>(v: &[T]) -> &[T] {
    &v[..v.len().min(10)]
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "tasks {}, lost {}, executions {}, extra executions {} ({} unattributed), \
             started after success {}, not succeeded {:?}, unknown executions {}",
            self.tasks,
            self.lost.len(),
            self.executions,
            self.extra_executions,
            self.unattributed.len(),
            self.started_after_success.len(),
            self.not_succeeded,
            self.unknown_executions,
        )?;
        if !self.lost.is_empty() {
            writeln!(f, "  lost: {:?}", first(&self.lost))?;
        }
        if !self.unattributed.is_empty() {
            writeln!(f, "  unattributed: {:?}", first(&self.unattributed))?;
        }
        if !self.started_after_success.is_empty() {
            writeln!(
                f,
                "  started after success: {:?}",
                first(&self.started_after_success)
            )?;
        }
        for kind in FaultKind::ALL {
            let n = self.faults.iter().filter(|s| s.kind == kind).count();
            if n > 0 {
                writeln!(
                    f,
                    "  {kind}: {n} injected, {} extra executions",
                    self.extra_by_kind.get(&kind).copied().unwrap_or(0)
                )?;
            }
        }
        let ms = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
        for s in &self.faults {
            writeln!(
                f,
                "  {}: lasted {} ms, recovered after {}, progress after {}, worst latency {}, {} extra",
                s.label,
                s.duration_ms,
                ms(s.recovered_after_ms),
                ms(s.progress_after_ms),
                ms(s.worst_latency_ms),
                s.extra_executions
            )?;
        }
        Ok(())
    }
}

/// The pure checker: from what was accepted, the records, the sink and the fault log, the
/// report (see the [module docs](self)).
///
/// An extra execution (any run of a task after its first, by start time) is attributed to the
/// latest fault injected before it started whose reach covers the run before it: that run was
/// active (started, not yet ended) within `[fault − before, fault end + after]` (see
/// `FaultKind::reach_ms`), and, for a worker fault, ran on a worker the fault hit.
pub fn check(
    accepted: &[Accepted],
    records: &HashMap<String, RecordView>,
    executions: &[Execution],
    faults: &[FaultRecord],
) -> ChaosReport {
    let mut report = ChaosReport {
        tasks: accepted.len(),
        ..ChaosReport::default()
    };
    let mut runs: HashMap<&str, Vec<&Execution>> = HashMap::new();
    let known: HashMap<&str, i64> = accepted.iter().map(|a| (a.id.as_str(), a.ack_ms)).collect();
    for e in executions {
        if known.contains_key(e.task_id.as_str()) {
            runs.entry(e.task_id.as_str()).or_default().push(e);
        } else {
            report.unknown_executions += 1;
        }
    }
    for list in runs.values_mut() {
        list.sort_by_key(|e| e.start_ms);
    }
    let mut extra_per_fault = vec![0usize; faults.len()];
    for a in accepted {
        let record = records.get(&a.id);
        let list = runs.get(a.id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        match record {
            Some(r) if r.is_terminal() && !list.is_empty() => {}
            _ => {
                report.lost.push(a.id.clone());
                continue;
            }
        }
        let record = record.expect("checked above");
        if record.state != "succeeded" {
            *report
                .not_succeeded
                .entry(record.state.clone())
                .or_default() += 1;
        } else {
            for e in list.iter().filter(|e| e.start_ms > record.written_ms) {
                report.started_after_success.push(format!(
                    "{} attempt {} on {} started {} ms after success was recorded",
                    e.task_id,
                    e.attempt,
                    e.worker,
                    e.start_ms - record.written_ms
                ));
            }
        }
        report.executions += list.len();
        for pair in list.windows(2) {
            let (prev, cur) = (pair[0], pair[1]);
            report.extra_executions += 1;
            match attribute(prev, cur, faults) {
                Some(i) => extra_per_fault[i] += 1,
                None => report.unattributed.push(format!(
                    "{}: attempt {} on {} at {} then attempt {} on {} at {}",
                    cur.task_id,
                    prev.attempt,
                    prev.worker,
                    prev.start_ms,
                    cur.attempt,
                    cur.worker,
                    cur.start_ms
                )),
            }
        }
    }
    for (i, fault) in faults.iter().enumerate() {
        let extra = extra_per_fault[i];
        if extra > 0 {
            report.extra_by_fault.insert(fault.label(), extra);
            *report.extra_by_kind.entry(fault.kind).or_default() += extra;
        }
        let next_at = faults.get(i + 1).map_or(i64::MAX, |n| n.at_ms);
        let first_start = |id: &str| runs.get(id).and_then(|l| l.first()).map(|e| e.start_ms);
        let progress_after_ms = accepted
            .iter()
            .filter(|a| a.ack_ms >= fault.at_ms)
            .filter_map(|a| first_start(&a.id))
            .min()
            .map(|s| s - fault.at_ms);
        let worst_latency_ms = accepted
            .iter()
            .filter(|a| a.ack_ms >= fault.at_ms && a.ack_ms < (fault.at_ms + 10_000).min(next_at))
            .filter_map(|a| first_start(&a.id).map(|s| s - a.ack_ms))
            .max();
        report.faults.push(FaultSummary {
            label: fault.label(),
            kind: fault.kind,
            duration_ms: fault.end_ms - fault.at_ms,
            recovered_after_ms: fault.recovered_ms.map(|r| r - fault.at_ms),
            progress_after_ms,
            worst_latency_ms,
            extra_executions: extra,
        });
    }
    report.lost.sort();
    report
}

/// The index of the fault that explains `cur` running again after `prev`, if any.
fn attribute(prev: &Execution, cur: &Execution, faults: &[FaultRecord]) -> Option<usize> {
    let prev_end = prev.end_ms.unwrap_or(cur.start_ms.max(prev.start_ms));
    faults
        .iter()
        .enumerate()
        .filter(|(_, f)| f.at_ms <= cur.start_ms)
        .filter(|(_, f)| {
            let (before, after) = f.kind.reach_ms();
            prev_end >= f.at_ms - before && prev.start_ms <= f.end_ms + after
        })
        .filter(|(_, f)| f.workers.is_empty() || f.workers.contains(&prev.worker))
        .max_by_key(|(_, f)| f.at_ms)
        .map(|(i, _)| i)
}

/// A small deterministic generator (splitmix64) for seeded fault schedules.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The steady load generator while it runs.
struct Load {
    stop: Arc<AtomicBool>,
    ticker: JoinHandle<Vec<JoinHandle<()>>>,
}

/// A chaos fleet: see the [module docs](self). Everything is killed on drop.
pub struct ChaosFleet {
    cluster: Arc<NatsCluster>,
    names: Names,
    js: Context,
    cfg: ChaosConfig,
    dir: tempfile::TempDir,
    dispatchers: Mutex<Vec<DroverProcess>>,
    workers: Mutex<Vec<DroverProcess>>,
    /// Processes that were killed or stopped, kept so their logs can be saved.
    retired: Mutex<Vec<DroverProcess>>,
    spawned_dispatchers: AtomicUsize,
    spawned_workers: AtomicUsize,
    faults: Mutex<Vec<FaultRecord>>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    next_task: Arc<AtomicU64>,
    load: Mutex<Option<Load>>,
}

impl fmt::Debug for ChaosFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosFleet")
            .field("cluster", &self.cluster.name())
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// How long the fleet may take to come up or to settle.
const SETTLE: Duration = Duration::from_secs(120);

impl ChaosFleet {
    /// Starts the cluster, three dispatchers and three workers, and waits until a leader is
    /// elected, the workers are registered and the queue is assigned.
    ///
    /// # Panics
    /// If any part does not come up within two minutes.
    pub async fn start(cfg: ChaosConfig) -> Self {
        let cluster = Arc::new(NatsCluster::start(3).await);
        let client = cluster.connect().await;
        let names = Names::default();
        provision_with_retries(&client, &names, &cfg).await;
        let js = jetstream::new(client);
        let dir = tempfile::tempdir().expect("temp dir");
        let fleet = Self {
            cluster,
            names,
            js,
            cfg,
            dir,
            dispatchers: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            spawned_dispatchers: AtomicUsize::new(0),
            spawned_workers: AtomicUsize::new(0),
            faults: Mutex::new(Vec::new()),
            accepted: Arc::new(Mutex::new(Vec::new())),
            next_task: Arc::new(AtomicU64::new(0)),
            load: Mutex::new(None),
        };
        std::fs::write(fleet.worker_config_path(), fleet.worker_config()).expect("config");
        std::fs::write(fleet.sink_path(), b"").expect("sink");
        for _ in 0..3 {
            fleet.spawn_dispatcher();
        }
        wait_leader(&fleet.js, &fleet.names, None, SETTLE).await;
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(fleet.spawn_worker());
        }
        for name in &names {
            fleet.wait_worker_registered(name).await;
        }
        fleet.wait_assigned().await;
        fleet
    }

    /// The cluster.
    pub fn cluster(&self) -> &Arc<NatsCluster> {
        &self.cluster
    }

    /// JetStream on the cluster.
    pub fn js(&self) -> &Context {
        &self.js
    }

    /// The configuration.
    pub fn config(&self) -> &ChaosConfig {
        &self.cfg
    }

    /// The execution sink.
    pub fn sink_path(&self) -> PathBuf {
        self.dir.path().join("executions.log")
    }

    fn worker_config_path(&self) -> PathBuf {
        self.dir.path().join("worker.toml")
    }

    /// The workers' TOML: the `chaos` exec handler appending to the sink.
    fn worker_config(&self) -> String {
        let sink = self.sink_path();
        let sleep = format!("{}.{:03}", self.cfg.task_ms / 1000, self.cfg.task_ms % 1000);
        let script = format!(
            "S='{sink}'; \
             printf '%s %s %s start %s\\n' \"$DROVER_TASK_ID\" \"$DROVER_ATTEMPT\" \"$DROVER_WORKER_ID\" \"$(date +%s%3N)\" >> \"$S\"; \
             sleep {sleep}; \
             printf '%s %s %s end %s\\n' \"$DROVER_TASK_ID\" \"$DROVER_ATTEMPT\" \"$DROVER_WORKER_ID\" \"$(date +%s%3N)\" >> \"$S\"",
            sink = sink.display()
        );
        let script = toml_string(&script);
        format!(
            "[worker]\nconcurrency = {}\n\n[worker.exec.{TASK_TYPE}]\nargv = [\"/bin/sh\", \"-c\", {script}]\nenv_allow = [\"PATH\"]\n",
            self.cfg.concurrency
        )
    }

    /// Environment common to every Drover process of the fleet.
    fn common_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DROVER_KEYS", TEST_KEYS.into()),
            (
                "DROVER_LOG",
                std::env::var("DROVER_CHAOS_LOG").unwrap_or_else(|_| "info".into()),
            ),
            ("DROVER_TOPOLOGY__REPLICAS", "3".into()),
            ("DROVER_TOPOLOGY__LEASE_MS", self.cfg.lease_ms.to_string()),
            (
                "DROVER_TOPOLOGY__WORKER_TTL_MS",
                self.cfg.worker_ttl_ms.to_string(),
            ),
        ]
    }

    fn spawn_dispatcher(&self) -> String {
        let n = self.spawned_dispatchers.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("d{n}");
        let mut env = self.common_env();
        env.push((
            "DROVER_QUEUES__DEFAULT__PARTITIONS",
            self.cfg.partitions.to_string(),
        ));
        let env: Vec<(&str, String)> = env;
        let p = DroverProcess::start(
            &name,
            "drover-dispatcher",
            &[
                "--nats-url".into(),
                self.cluster.client_urls(),
                "--id".into(),
                name.clone(),
            ],
            &env,
        );
        lock(&self.dispatchers).push(p);
        name
    }

    fn spawn_worker(&self) -> String {
        let n = self.spawned_workers.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("w{n}");
        let mut env = self.common_env();
        env.push(("DROVER_CONFIG", path_string(&self.worker_config_path())));
        env.push((
            "DROVER_WORKER__HEARTBEAT_MS",
            self.cfg.heartbeat_ms.to_string(),
        ));
        env.push((
            "DROVER_WORKER__FENCE_MARGIN_MS",
            self.cfg.fence_margin_ms.to_string(),
        ));
        let p = DroverProcess::start(
            &name,
            "drover-worker",
            &[
                "--nats-url".into(),
                self.cluster.client_urls(),
                "--id".into(),
                name.clone(),
                "--queues".into(),
                QUEUE.into(),
            ],
            &env,
        );
        lock(&self.workers).push(p);
        name
    }

    async fn wait_worker_registered(&self, name: &str) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(kv) = self.js.get_key_value(self.names.bucket("workers")).await
                && matches!(kv.get(name).await, Ok(Some(_)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker {name} did not register within {SETTLE:?}:\n{}",
                self.logs_of(&self.workers, name)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_assigned(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(kv) = self.js.get_key_value(self.names.bucket("state")).await
                && matches!(kv.get(format!("assignment.{QUEUE}")).await, Ok(Some(_)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{QUEUE} was not assigned within {SETTLE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs_of(&self, set: &Mutex<Vec<DroverProcess>>, name: &str) -> String {
        lock(set)
            .iter()
            .filter(|p| p.name() == name)
            .map(DroverProcess::log)
            .collect()
    }

    /// Starts the steady load (see the [module docs](self)); a no-op while it runs.
    pub fn start_load(&self) {
        let mut load = lock(&self.load);
        if load.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let js = self.js.clone();
        let subject = self.names.submit_subject(QUEUE);
        let accepted = self.accepted.clone();
        let next = self.next_task.clone();
        let prefix = self.cfg.id_prefix.clone();
        let period = Duration::from_micros(1_000_000 / u64::from(self.cfg.rate_per_sec.max(1)));
        let stopped = stop.clone();
        let ticker = tokio::spawn(async move {
            let mut handles = Vec::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id = format!("{prefix}{n:07}");
                let js = js.clone();
                let subject = subject.clone();
                let accepted = accepted.clone();
                handles.push(tokio::spawn(async move {
                    if let Some(ack_ms) = publish_until_acked(&js, subject, &id).await {
                        lock(&accepted).push(Accepted { id, ack_ms });
                    }
                }));
                handles.retain(|h| !h.is_finished());
            }
            handles
        });
        *load = Some(Load { stop, ticker });
    }

    /// Stops the load and waits until every publish in flight is acked (or given up).
    pub async fn stop_load(&self) {
        let load = lock(&self.load).take();
        if let Some(load) = load {
            load.stop.store(true, Ordering::Relaxed);
            for h in load.ticker.await.unwrap_or_default() {
                let _ = h.await;
            }
        }
    }

    /// Every task accepted so far.
    pub fn accepted(&self) -> Vec<Accepted> {
        lock(&self.accepted).clone()
    }

    /// The fault log so far.
    pub fn faults(&self) -> Vec<FaultRecord> {
        lock(&self.faults).clone()
    }

    /// Every execution in the sink so far.
    pub fn executions(&self) -> Vec<Execution> {
        parse_sink(&std::fs::read_to_string(self.sink_path()).unwrap_or_default())
    }

    fn log_fault(
        &self,
        kind: FaultKind,
        target: String,
        workers: Vec<String>,
        at_ms: i64,
        recovered_ms: Option<i64>,
    ) {
        let mut faults = lock(&self.faults);
        let record = FaultRecord {
            seq: faults.len() + 1,
            kind,
            target,
            workers,
            at_ms,
            end_ms: now_ms(),
            recovered_ms,
        };
        eprintln!(
            "chaos: {} (lasted {} ms)",
            record.label(),
            record.end_ms - record.at_ms
        );
        faults.push(record);
    }

    /// Injects one fault; `pick` chooses among candidates (a worker, a node) given their count.
    pub async fn inject(&self, kind: FaultKind, pick: &mut impl FnMut(usize) -> usize) {
        match kind {
            FaultKind::KillLeader => self.kill_leader().await,
            FaultKind::KillWorker => self.kill_worker(pick).await,
            FaultKind::StopWorker => self.stop_worker(pick).await,
            FaultKind::KillNatsNode => self.kill_nats_node(pick).await,
            FaultKind::RestartDispatchers => self.restart_dispatchers().await,
            FaultKind::RollingRestartWorkers => self.rolling_restart_workers().await,
        }
    }

    /// SIGKILLs the leader and starts a fresh replica; recovered once another leader is elected.
    pub async fn kill_leader(&self) {
        let id = wait_leader(&self.js, &self.names, None, SETTLE).await;
        let at = now_ms();
        {
            let mut ds = lock(&self.dispatchers);
            if let Some(i) = ds.iter().position(|d| d.name() == id) {
                ds[i].kill();
                lock(&self.retired).push(ds.remove(i));
            }
        }
        self.spawn_dispatcher();
        wait_leader(&self.js, &self.names, Some(&id), SETTLE).await;
        self.log_fault(FaultKind::KillLeader, id, Vec::new(), at, Some(now_ms()));
    }

    fn pick_worker(&self, pick: &mut impl FnMut(usize) -> usize) -> String {
        let ws = lock(&self.workers);
        let i = pick(ws.len()) % ws.len().max(1);
        ws[i].name().to_owned()
    }

    /// SIGKILLs one worker and starts a fresh one; recovered once it is registered.
    pub async fn kill_worker(&self, pick: &mut impl FnMut(usize) -> usize) {
        let victim = self.pick_worker(pick);
        let at = now_ms();
        {
            let mut ws = lock(&self.workers);
            if let Some(i) = ws.iter().position(|w| w.name() == victim) {
                ws[i].kill();
                lock(&self.retired).push(ws.remove(i));
            }
        }
        let fresh = self.spawn_worker();
        self.wait_worker_registered(&fresh).await;
        self.log_fault(
            FaultKind::KillWorker,
            victim.clone(),
            vec![victim],
            at,
            Some(now_ms()),
        );
    }

    /// SIGSTOPs one worker for its TTL plus a second, then SIGCONTs it; recovered once it
    /// heartbeats again.
    pub async fn stop_worker(&self, pick: &mut impl FnMut(usize) -> usize) {
        let victim = self.pick_worker(pick);
        let at = now_ms();
        self.signal_worker(&victim, libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(self.cfg.worker_ttl_ms + 1_000)).await;
        self.signal_worker(&victim, libc::SIGCONT);
        self.wait_worker_registered(&victim).await;
        self.log_fault(
            FaultKind::StopWorker,
            victim.clone(),
            vec![victim],
            at,
            Some(now_ms()),
        );
    }

    fn signal_worker(&self, name: &str, sig: libc::c_int) {
        for w in lock(&self.workers).iter().filter(|w| w.name() == name) {
            w.signal(sig);
        }
    }

    /// The index of the NATS node leading the intake consumer, when it has a leader.
    pub async fn intake_consumer_leader(&self) -> Option<usize> {
        let stream = self.js.get_stream(self.names.submit_stream()).await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&self.names.intake_consumer())
            .await
            .ok()?;
        let leader = consumer
            .info()
            .await
            .ok()?
            .cluster
            .as_ref()?
            .leader
            .clone()?;
        self.cluster.nodes().iter().position(|n| n.name() == leader)
    }

    /// The index of the NATS node the leading dispatcher is connected to (from each node's
    /// `/connz`: the dispatcher names its connection `drover-dispatcher <id>`).
    pub async fn leader_connection_node(&self) -> Option<usize> {
        let id = leader_id(&self.js, &self.names).await?;
        let want = format!("drover-dispatcher {id}");
        for (i, node) in self.cluster.nodes().iter().enumerate() {
            let Ok(connz) = node
                .monitor_get("/connz?limit=1024")
                .await
                .and_then(|r| r.json())
            else {
                continue;
            };
            let serves = connz["connections"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(want.as_str())));
            if serves {
                return Some(i);
            }
        }
        None
    }

    /// SIGKILLs one NATS node, restarts it two seconds later and waits until it is healthy.
    pub async fn kill_nats_node(&self, pick: &mut impl FnMut(usize) -> usize) {
        let i = pick(self.cluster.size()) % self.cluster.size();
        let at = now_ms();
        self.cluster.kill(i);
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.cluster.restart(i).await;
        self.log_fault(
            FaultKind::KillNatsNode,
            format!("nats-{i}"),
            Vec::new(),
            at,
            Some(now_ms()),
        );
    }

    /// SIGTERMs every dispatcher at once, waits for them to exit, starts three fresh ones;
    /// recovered once one of them leads.
    pub async fn restart_dispatchers(&self) {
        let old: Vec<DroverProcess> = std::mem::take(&mut *lock(&self.dispatchers));
        let at = now_ms();
        for d in &old {
            d.signal(libc::SIGTERM);
        }
        wait_exited(&old, Duration::from_secs(30)).await;
        let old_names: Vec<String> = old.iter().map(|d| d.name().to_owned()).collect();
        lock(&self.retired).extend(old);
        let fresh: Vec<String> = (0..3).map(|_| self.spawn_dispatcher()).collect();
        let deadline = Instant::now() + SETTLE;
        let recovered = loop {
            if let Some(id) = leader_id(&self.js, &self.names).await
                && fresh.contains(&id)
            {
                break now_ms();
            }
            assert!(Instant::now() < deadline, "no new dispatcher leads");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.log_fault(
            FaultKind::RestartDispatchers,
            old_names.join(","),
            Vec::new(),
            at,
            Some(recovered),
        );
    }

    /// SIGTERMs each worker in turn, waiting for its exit and for a fresh replacement to
    /// register before the next.
    pub async fn rolling_restart_workers(&self) {
        let names: Vec<String> = lock(&self.workers)
            .iter()
            .map(|w| w.name().to_owned())
            .collect();
        let at = now_ms();
        for name in &names {
            let old = {
                let mut ws = lock(&self.workers);
                let i = ws.iter().position(|w| w.name() == *name).expect("known");
                ws.remove(i)
            };
            old.signal(libc::SIGTERM);
            wait_exited(std::slice::from_ref(&old), Duration::from_secs(40)).await;
            lock(&self.retired).push(old);
            let fresh = self.spawn_worker();
            self.wait_worker_registered(&fresh).await;
        }
        self.log_fault(
            FaultKind::RollingRestartWorkers,
            names.join(","),
            names.clone(),
            at,
            Some(now_ms()),
        );
    }

    /// Waits until the pipeline is empty (`DROVER_SUBMIT`, `DROVER_WORK`, `DROVER_OUTCOMES`), every
    /// accepted task has a terminal record and the sink has not grown for three seconds; returns
    /// the records.
    ///
    /// # Panics
    /// After `timeout`, with what is still missing.
    pub async fn wait_quiescent(&self, timeout: Duration) -> HashMap<String, RecordView> {
        let deadline = Instant::now() + timeout;
        let accepted = self.accepted();
        let mut sink_len = u64::MAX;
        let mut still_since = Instant::now();
        loop {
            let len = std::fs::metadata(self.sink_path()).map_or(0, |m| m.len());
            if len != sink_len {
                sink_len = len;
                still_since = Instant::now();
            }
            let empty = self.streams_empty().await;
            let records = self.records().await;
            let open: Vec<&str> = accepted
                .iter()
                .filter(|a| !records.get(&a.id).is_some_and(RecordView::is_terminal))
                .map(|a| a.id.as_str())
                .collect();
            if empty && open.is_empty() && still_since.elapsed() >= Duration::from_secs(3) {
                return records;
            }
            if Instant::now() >= deadline {
                let pipeline = self.pipeline_state().await;
                self.save_logs(&pipeline);
                panic!(
                    "not quiescent after {timeout:?}: streams empty {empty}, {} of {} tasks \
                     without a terminal record, e.g. {:?}; records of those: {:?}\n{}\n{}",
                    open.len(),
                    accepted.len(),
                    first(&open),
                    first(&open)
                        .iter()
                        .map(|id| records.get(*id))
                        .collect::<Vec<_>>(),
                    pipeline,
                    self.fleet_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// What the server holds: every stream's message count and leader, every consumer's
    /// pending/ack-pending/waiting counts and leader, and the `drover-state` and
    /// `drover-workers` keys — what a stalled pipeline needs to be diagnosed.
    pub async fn pipeline_state(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("---- pipeline ----\n");
        for name in [
            self.names.submit_stream(),
            self.names.work_stream(),
            self.names.outcomes_stream(),
            self.names.delayed_stream(),
        ] {
            let Ok(mut stream) = self.js.get_stream(&name).await else {
                let _ = writeln!(out, "{name}: cannot be read");
                continue;
            };
            let Ok(info) = stream.info().await.cloned() else {
                let _ = writeln!(out, "{name}: no info");
                continue;
            };
            let _ = writeln!(
                out,
                "{name}: messages {} first {} last {}, leader {:?}",
                info.state.messages,
                info.state.first_sequence,
                info.state.last_sequence,
                info.cluster.as_ref().and_then(|c| c.leader.clone())
            );
            let mut consumers = stream.consumers();
            while let Some(Ok(c)) = consumers.next().await {
                let _ = writeln!(
                    out,
                    "  {}: pending {} ack_pending {} redelivered {} waiting {} delivered {} \
                     ack_floor {}, leader {:?}",
                    c.name,
                    c.num_pending,
                    c.num_ack_pending,
                    c.num_redelivered,
                    c.num_waiting,
                    c.delivered.stream_sequence,
                    c.ack_floor.stream_sequence,
                    c.cluster.as_ref().and_then(|x| x.leader.clone())
                );
            }
        }
        for bucket in ["state", "workers", "election"] {
            let Ok(kv) = self.js.get_key_value(self.names.bucket(bucket)).await else {
                continue;
            };
            let Ok(mut keys) = kv.keys().await else {
                continue;
            };
            while let Some(Ok(key)) = keys.next().await {
                if key.starts_with("held.") {
                    continue;
                }
                if let Ok(Some(v)) = kv.get(&key).await {
                    let _ = writeln!(
                        out,
                        "{bucket} {key} = {}",
                        String::from_utf8_lossy(&v)
                            .chars()
                            .take(600)
                            .collect::<String>()
                    );
                }
            }
        }
        out
    }

    /// With `DROVER_CHAOS_LOGS=<dir>`: writes every process's whole log (live and retired) and
    /// `pipeline` there, for a post-mortem of a failed run.
    pub fn save_logs(&self, pipeline: &str) {
        let Some(dir) = std::env::var_os("DROVER_CHAOS_LOGS").map(PathBuf::from) else {
            return;
        };
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("pipeline.txt"), pipeline);
        for set in [&self.dispatchers, &self.workers, &self.retired] {
            for p in lock(set).iter() {
                let _ = std::fs::write(dir.join(format!("{}.log", p.name())), p.log());
            }
        }
        for (i, node) in self.cluster.nodes().iter().enumerate() {
            let _ = std::fs::copy(node.log_path(), dir.join(format!("nats-{i}.log")));
        }
    }

    /// The tails of every running process's log.
    pub fn fleet_logs(&self) -> String {
        let mut out = String::new();
        for set in [&self.dispatchers, &self.workers] {
            for p in lock(set).iter() {
                let log = p.log();
                let lines: Vec<&str> = log.lines().collect();
                out.push_str(&format!("---- {} ----\n", p.name()));
                out.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
                out.push('\n');
            }
        }
        out
    }

    async fn streams_empty(&self) -> bool {
        for name in [
            self.names.submit_stream(),
            self.names.work_stream(),
            self.names.outcomes_stream(),
        ] {
            let Ok(s) = self.js.get_stream(&name).await else {
                return false;
            };
            match s.get_info().await {
                Ok(i) if i.state.messages == 0 => {}
                _ => return false,
            }
        }
        true
    }

    /// Every record of `drover-tasks`: state and when its current revision was written.
    pub async fn records(&self) -> HashMap<String, RecordView> {
        let mut out = HashMap::new();
        let Ok(kv) = self.js.get_key_value(self.names.bucket("tasks")).await else {
            return out;
        };
        let Ok(mut watch) = kv.watch_with_history(">").await else {
            return out;
        };
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
            let Ok(Some(Ok(entry))) = next else { break };
            let state = serde_json::from_slice::<serde_json::Value>(&entry.value)
                .ok()
                .and_then(|v| v["state"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let written_ms =
                i64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            let done = entry.delta == 0;
            out.insert(entry.key.clone(), RecordView { state, written_ms });
            if done {
                break;
            }
        }
        out
    }

    /// Stops the load, waits for quiescence and checks (see [`check`]).
    pub async fn finish(&self, timeout: Duration) -> ChaosReport {
        self.stop_load().await;
        let records = self.wait_quiescent(timeout).await;
        check(
            &self.accepted(),
            &records,
            &self.executions(),
            &self.faults(),
        )
    }
}

/// Provisions the R3 topology exactly as the fleet's processes will (so theirs is a no-op),
/// retrying while a fresh cluster still refuses placement ("no suitable peers" until every
/// peer's storage is known to the meta leader) or times out.
///
/// # Panics
/// If it still fails after a minute.
async fn provision_with_retries(client: &async_nats::Client, names: &Names, cfg: &ChaosConfig) {
    let topology = TopologyConfig {
        replicas: 3,
        lease_ms: cfg.lease_ms,
        worker_ttl_ms: cfg.worker_ttl_ms,
        ..TopologyConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match topology::provision(client, names, &topology).await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: provisioning failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("cannot provision the R3 topology: {e}"),
        }
    }
}

/// Publishes task `id` until the intake acks it (same `Nats-Msg-Id` each time, so a retry of a
/// stored message is a duplicate); the ack time, or `None` after two minutes.
async fn publish_until_acked(js: &Context, subject: String, id: &str) -> Option<i64> {
    let body = serde_json::to_vec(&serde_json::json!({"type": TASK_TYPE, "id": id})).expect("json");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let sent = js
            .publish_with_headers(subject.clone(), headers, body.clone().into())
            .await;
        if let Ok(ack) = sent
            && ack.await.is_ok()
        {
            return Some(now_ms());
        }
        if Instant::now() >= deadline {
            eprintln!("chaos: {id} was never acked");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every process in `procs` has exited; SIGKILLs those still running after
/// `timeout`.
async fn wait_exited(procs: &[DroverProcess], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while procs.iter().any(DroverProcess::is_running) {
        if Instant::now() >= deadline {
            for p in procs.iter().filter(|p| p.is_running()) {
                eprintln!("chaos: {} did not exit on SIGTERM; killing it", p.name());
                p.kill();
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
