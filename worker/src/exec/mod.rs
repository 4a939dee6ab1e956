//! `exec` handlers (SPEC §6.1): one external process per attempt, run from the worker's own
//! configuration (`[worker.exec.<type>]`), never from the task (SPEC §8).
//!
//! The sandbox of one run:
//! * **argv** from the configuration only; the task's payload goes to stdin, byte for byte.
//! * **Own session and process group** (`setsid` in the child before `exec`), so every signal
//!   reaches the whole tree the program starts.
//! * **Scrubbed environment**: empty, plus the `env_allow` names copied from the worker and the
//!   `env` values; `DROVER_KEYS` and `DROVER_PASSWORD` are never copied, whatever the list says.
//!   Then the attempt's identity ([`Identity`]: `DROVER_TASK_ID`, `DROVER_TASK_TYPE`,
//!   `DROVER_QUEUE`, `DROVER_ATTEMPT`, `DROVER_WORKER_ID`, and `DROVER_SHARD_INDEX` /
//!   `DROVER_SHARD_TOTAL` for a shard), set last: the configuration cannot spoof or pre-set them.
//! * **Working directory**: a fresh empty `0700` directory per run, removed afterwards
//!   (`cwd = "fresh"`), or a fixed configured one.
//! * **rlimits** set in the child: `RLIMIT_AS` = `memory_mb`, `RLIMIT_CPU` = `cpu_secs` (soft;
//!   hard one second later), `RLIMIT_CORE` = 0.
//! * **End**: on the deadline or a cancel the group gets SIGTERM, then SIGKILL after
//!   `timeout_grace_ms`. When the leader has exited, for whatever reason, the group gets SIGKILL
//!   too, so no background process of a run outlives it (a process that starts a session of its
//!   own with `setsid` leaves the group and is out of reach: rlimits still bound it).
//!
//! The result is stdout: JSON when it parses, else a JSON string, `null` when empty
//! ([`output::to_result`]). More than `max_output_bytes` of stdout kills the group and fails the
//! attempt with kind `handler` (a cut result could be mistaken for a whole one).

pub(crate) mod output;
mod signal;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use drover_shared::settings::{CwdPolicy, ExecHandler, NEVER_PASSED_ENV};
use drover_shared::task::{ErrorKind, ShardInfo, TaskError};
use rustix::process::{Pid, Resource, Rlimit, Signal, getrlimit, kill_process_group, setrlimit};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use output::Tail;

const MIB: u64 = 1024 * 1024;

/// How long the output pipes may stay open after the process group was killed (a process that
/// left the group may still hold them).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs one attempt of an `exec` handler: `payload` on stdin, stdout as the result.
///
/// Errors are task errors ready for the outcome: `timeout` when `deadline` passed, `cancelled`
/// when `cancel` fired, `killed` when a signal (a limit) ended the process, `handler` for a
/// non-zero exit (with the stderr tail), too much output or a process that could not start.
/// Never panics; dropping the future kills the process group.
pub async fn run(
    config: &ExecHandler,
    payload: &RawValue,
    identity: &Identity,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<Box<RawValue>, TaskError> {
    let workdir = Workdir::create(&config.cwd).await?;
    let result = run_in(config, payload, identity, deadline, cancel, workdir.path()).await;
    workdir.remove().await;
    result
}

/// Who runs what: the attempt's identity, given to the process as `DROVER_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Task id (`DROVER_TASK_ID`).
    pub task_id: String,
    /// Task type (`DROVER_TASK_TYPE`).
    pub task_type: String,
    /// Queue (`DROVER_QUEUE`).
    pub queue: String,
    /// 1-based attempt number (`DROVER_ATTEMPT`).
    pub attempt: u32,
    /// The running worker's id (`DROVER_WORKER_ID`).
    pub worker_id: String,
    /// Shard position (`DROVER_SHARD_INDEX`, `DROVER_SHARD_TOTAL`), for shard tasks.
    pub shard: Option<ShardInfo>,
}

/// Every variable name [`Identity::env`] may set; a configured value for any of them is dropped
/// (a shard variable included when the task is not a shard), so the process can trust them.
pub const IDENTITY_ENV: &[&str] = &[
    "DROVER_TASK_ID",
    "DROVER_TASK_TYPE",
    "DROVER_QUEUE",
    "DROVER_ATTEMPT",
    "DROVER_WORKER_ID",
    "DROVER_SHARD_INDEX",
    "DROVER_SHARD_TOTAL",
];

impl Identity {
    /// The identity of the attempt `ctx` describes.
    pub fn of(ctx: &crate::handler::TaskContext) -> Self {
        Self {
            task_id: ctx.id().to_owned(),
            task_type: ctx.task_type().to_owned(),
            queue: ctx.queue().to_owned(),
            attempt: ctx.attempt(),
            worker_id: ctx.worker_id().to_owned(),
            shard: ctx.shard(),
        }
    }

    /// The variables, in [`IDENTITY_ENV`] order; the shard pair only for a shard.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("DROVER_TASK_ID", self.task_id.clone()),
            ("DROVER_TASK_TYPE", self.task_type.clone()),
            ("DROVER_QUEUE", self.queue.clone()),
            ("DROVER_ATTEMPT", self.attempt.to_string()),
            ("DROVER_WORKER_ID", self.worker_id.clone()),
        ];
        if let Some(shard) = self.shard {
            env.push(("DROVER_SHARD_INDEX", shard.index.to_string()));
            env.push(("DROVER_SHARD_TOTAL", shard.total.to_string()));
        }
        env
    }
}

async fn run_in(
    config: &ExecHandler,
    payload: &RawValue,
    identity: &Identity,
    deadline: Instant,
    cancel: &CancellationToken,
    dir: &Path,
) -> Result<Box<RawValue>, TaskError> {
    if cancel.is_cancelled() {
        return Err(task_error(ErrorKind::Cancelled, "cancelled before start"));
    }
    if Instant::now() >= deadline {
        return Err(task_error(
            ErrorKind::Timeout,
            "deadline passed before start",
        ));
    }
    let (program, args) = match config.argv.split_first() {
        Some((p, a)) if !p.is_empty() => (resolve_program(p).await?, a),
        _ => return Err(handler_error("no program configured (argv is empty)")),
    };
    let limits = Limits::for_run(config, deadline);

    let mut cmd = Command::new(&program);
    cmd.args(args)
        .env_clear()
        .envs(child_env(config, identity))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before `exec`; it only makes raw system calls
    // (setsid, setrlimit) through rustix, which neither allocate nor take locks, so it is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || limits.apply());
    }
    let mut child = cmd.spawn().map_err(|e| {
        handler_error(format!(
            "cannot start {}: {}",
            program.display(),
            io_message(&e)
        ))
    })?;
    let Some(group) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw)
    else {
        return Err(handler_error(
            "the process ended before it could be tracked",
        ));
    };
    let mut group = Group {
        pgid: group,
        armed: true,
    };

    let stdin = child.stdin.take();
    let input = payload.get().as_bytes().to_vec();
    let writer = tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            // A program that does not read its stdin gets EPIPE here: not an error of the run.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
    });
    let (overflow_tx, mut overflow_rx) = oneshot::channel();
    let stdout = child.stdout.take();
    let max_output = config.max_output_bytes;
    let out_reader = tokio::spawn(async move {
        match stdout {
            Some(s) => read_capped(s, max_output, overflow_tx).await,
            None => Captured::default(),
        }
    });
    let stderr = child.stderr.take();
    let tail_cap = config.stderr_tail_bytes;
    let err_reader = tokio::spawn(async move {
        match stderr {
            Some(s) => read_tail(s, tail_cap).await,
            None => Tail::new(0),
        }
    });

    let grace = Duration::from_millis(config.timeout_grace_ms);
    let end = tokio::select! {
        biased;
        status = child.wait() => End::Exited(status),
        () = cancel.cancelled() => End::Cancelled(terminate(&mut child, &group, grace).await),
        () = sleep_until(deadline) => End::Timeout(terminate(&mut child, &group, grace).await),
        Ok(()) = &mut overflow_rx => {
            group.signal(Signal::KILL);
            let _ = child.wait().await;
            End::Overflow
        }
    };
    // Whatever ended the run, nothing of its group lives on.
    if group.signal(Signal::KILL) {
        tracing::debug!(
            pgid = group.pgid.as_raw_nonzero().get(),
            "killed processes left behind by an exec run"
        );
    }
    // The group is empty now; its id may be reused later, so no further signal goes to it.
    group.armed = false;
    writer.abort();

    let drained = timeout(DRAIN_TIMEOUT, async {
        let out = out_reader.await.unwrap_or_default();
        let err = err_reader.await.unwrap_or_else(|_| Tail::new(0));
        (out, err)
    })
    .await;
    let Ok((out, err)) = drained else {
        return Err(handler_error(
            "the output pipes stayed open after the process group was killed \
             (a process left the group with setsid?)",
        ));
    };
    conclude(config, end, out, &err)
}

/// How the run ended.
#[derive(Debug)]
enum End {
    /// The leader exited by itself.
    Exited(io::Result<ExitStatus>),
    /// Stopped on cancel; whether SIGKILL was needed.
    Cancelled(Terminated),
    /// Stopped on the deadline.
    Timeout(Terminated),
    /// Stopped because stdout passed the cap.
    Overflow,
}

/// How a stop went: whether the group ignored SIGTERM for the whole grace period.
#[derive(Debug, Clone, Copy)]
struct Terminated {
    needed_kill: bool,
}

impl Terminated {
    fn describe(self, grace: Duration) -> String {
        if self.needed_kill {
            format!(
                "process group sent SIGTERM, then SIGKILL after {} ms",
                grace.as_millis()
            )
        } else {
            "process group ended on SIGTERM".to_owned()
        }
    }
}

/// The task result or error for how the run ended.
fn conclude(
    config: &ExecHandler,
    end: End,
    out: Captured,
    err: &Tail,
) -> Result<Box<RawValue>, TaskError> {
    let grace = Duration::from_millis(config.timeout_grace_ms);
    let status = match end {
        End::Cancelled(t) => {
            return Err(task_error(
                ErrorKind::Cancelled,
                format!("cancelled; {}", t.describe(grace)),
            ));
        }
        End::Timeout(t) => {
            return Err(task_error(
                ErrorKind::Timeout,
                format!("deadline passed; {}", t.describe(grace)),
            ));
        }
        End::Overflow => return Err(overflow_error(config)),
        End::Exited(Err(e)) => {
            return Err(handler_error(format!(
                "waiting for the process failed: {}",
                io_message(&e)
            )));
        }
        End::Exited(Ok(status)) => status,
    };
    if out.overflowed {
        return Err(overflow_error(config));
    }
    if let Some(code) = status.code() {
        if code == 0 {
            return output::to_bounded_result(&out.bytes).map_err(handler_error);
        }
        return Err(handler_error(with_tail(format!("exit status {code}"), err)));
    }
    let sig = status.signal().unwrap_or(0);
    let mut message = format!("killed by {}", signal::describe(sig));
    if let Some(hint) = signal::limit_hint(sig, config) {
        message.push_str(", ");
        message.push_str(&hint);
    }
    Err(task_error(ErrorKind::Killed, with_tail(message, err)))
}

fn overflow_error(config: &ExecHandler) -> TaskError {
    handler_error(format!(
        "stdout passed max_output_bytes ({} bytes); the process group was killed",
        config.max_output_bytes
    ))
}

fn with_tail(mut message: String, err: &Tail) -> String {
    let tail = err.to_text();
    if !tail.is_empty() {
        message.push_str(": ");
        message.push_str(&tail);
    }
    message
}

fn task_error(kind: ErrorKind, message: impl Into<String>) -> TaskError {
    TaskError {
        kind,
        message: message.into(),
    }
}

fn handler_error(message: impl Into<String>) -> TaskError {
    task_error(ErrorKind::Handler, message)
}

/// An I/O error's text without Rust's debug decoration.
fn io_message(e: &io::Error) -> String {
    e.to_string()
}

/// SIGTERM to the group, then SIGKILL if the leader is still there after `grace`; waits for the
/// leader either way.
async fn terminate(child: &mut Child, group: &Group, grace: Duration) -> Terminated {
    group.signal(Signal::TERM);
    tokio::select! {
        _ = child.wait() => Terminated { needed_kill: false },
        () = sleep(grace) => {
            group.signal(Signal::KILL);
            let _ = child.wait().await;
            Terminated { needed_kill: true }
        }
    }
}

/// The process group of a run. Dropping it while armed kills the group, so a run whose future
/// is dropped (the worker fenced itself, say) leaves nothing behind.
#[derive(Debug)]
struct Group {
    pgid: Pid,
    armed: bool,
}

impl Group {
    /// Sends `sig` to every process of the group; `true` when at least one received it.
    fn signal(&self, sig: Signal) -> bool {
        kill_process_group(self.pgid, sig).is_ok()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::KILL);
        }
    }
}

/// The rlimits of a run, computed in the worker and applied in the child.
#[derive(Debug, Clone, Copy)]
struct Limits {
    address_space: u64,
    cpu_secs: u64,
}

impl Limits {
    fn for_run(config: &ExecHandler, deadline: Instant) -> Self {
        let cpu_secs = config.cpu_secs.unwrap_or_else(|| {
            let left = deadline.saturating_duration_since(Instant::now());
            left.as_secs()
                .saturating_add(u64::from(left.subsec_nanos() > 0))
        });
        Self {
            address_space: config.memory_mb.saturating_mul(MIB),
            cpu_secs: cpu_secs.max(1),
        }
    }

    /// Runs in the child between fork and exec: new session, then the limits, each clamped to
    /// the hard limit the worker itself has (raising it would fail without privileges).
    fn apply(self) -> io::Result<()> {
        rustix::process::setsid()?;
        set_limit(Resource::As, self.address_space, self.address_space)?;
        set_limit(
            Resource::Cpu,
            self.cpu_secs,
            self.cpu_secs.saturating_add(1),
        )?;
        set_limit(Resource::Core, 0, 0)?;
        Ok(())
    }
}

fn set_limit(resource: Resource, soft: u64, hard: u64) -> io::Result<()> {
    let ceiling = getrlimit(resource).maximum;
    let clamp = |v: u64| Some(ceiling.map_or(v, |c| v.min(c)));
    setrlimit(
        resource,
        Rlimit {
            current: clamp(soft),
            maximum: clamp(hard),
        },
    )?;
    Ok(())
}

/// The child's whole environment: allowed worker variables, then the configured values, then
/// the attempt's identity (whose names the first two may not set).
fn child_env(config: &ExecHandler, identity: &Identity) -> Vec<(OsString, OsString)> {
    let refused = |name: &str| NEVER_PASSED_ENV.contains(&name) || IDENTITY_ENV.contains(&name);
    let mut env = Vec::new();
    for name in &config.env_allow {
        if refused(name) || config.env.contains_key(name) {
            continue;
        }
        if let Some(value) = std::env::var_os(name) {
            env.push((OsString::from(name), value));
        }
    }
    for (name, value) in &config.env {
        if !refused(name) {
            env.push((OsString::from(name), OsString::from(value.expose())));
        }
    }
    env.extend(
        identity
            .env()
            .into_iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value))),
    );
    env
}

/// `argv[0]` as a path: as given when it contains a `/`, else looked up in the worker's `PATH`
/// (the child's environment has no say in what runs).
async fn resolve_program(name: &str) -> Result<PathBuf, TaskError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if is_executable(&candidate).await {
            return Ok(candidate);
        }
    }
    Err(handler_error(format!(
        "program {name:?} not found in the worker's PATH"
    )))
}

async fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::metadata(path)
        .await
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Stdout as read: at most the cap, and whether more came.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    overflowed: bool,
}

/// Reads `r` to the end, or until it passes `cap` bytes (then says so on `overflow`).
async fn read_capped(
    mut r: impl AsyncRead + Unpin,
    cap: usize,
    overflow: oneshot::Sender<()>,
) -> Captured {
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                return Captured {
                    bytes,
                    overflowed: false,
                };
            }
            Ok(n) => {
                if bytes.len() + n > cap {
                    let _ = overflow.send(());
                    return Captured {
                        bytes: Vec::new(),
                        overflowed: true,
                    };
                }
                bytes.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// Reads `r` to the end, keeping its last `cap` bytes.
async fn read_tail(mut r: impl AsyncRead + Unpin, cap: usize) -> Tail {
    let mut tail = Tail::new(cap);
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => tail.push(&chunk[..n]),
        }
    }
}

/// The working directory of a run.
enum Workdir {
    /// A fresh directory, removed by [`Workdir::remove`].
    Fresh(tempfile::TempDir),
    /// The configured directory, left as it is.
    Fixed(PathBuf),
}

impl Workdir {
    async fn create(policy: &CwdPolicy) -> Result<Self, TaskError> {
        match policy {
            CwdPolicy::Fixed(dir) => Ok(Self::Fixed(dir.clone())),
            CwdPolicy::Fresh => {
                let made = tokio::task::spawn_blocking(|| {
                    use std::os::unix::fs::PermissionsExt;
                    tempfile::Builder::new()
                        .prefix("drover-exec-")
                        .permissions(std::fs::Permissions::from_mode(0o700))
                        .tempdir()
                })
                .await;
                match made {
                    Ok(Ok(dir)) => Ok(Self::Fresh(dir)),
                    Ok(Err(e)) => Err(handler_error(format!(
                        "cannot create a working directory: {}",
                        io_message(&e)
                    ))),
                    Err(_) => Err(handler_error("cannot create a working directory")),
                }
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            Self::Fresh(dir) => dir.path(),
            Self::Fixed(dir) => dir,
        }
    }

    /// Removes a fresh directory (off the runtime's threads: it may hold many files).
    async fn remove(self) {
        if let Self::Fresh(dir) = self {
            let path = dir.path().to_owned();
            let removed = tokio::task::spawn_blocking(move || dir.close()).await;
            if !matches!(removed, Ok(Ok(()))) {
                tracing::warn!(dir = %path.display(), "could not remove an exec working directory");
            }
        }
    }
}
