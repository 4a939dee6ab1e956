//! [`NatsServer`]: one real `nats-server` process with JetStream, on random loopback ports, with
//! its config, log and store in a temporary directory, SIGKILLed and reaped on drop.
//!
//! Starting waits until the monitoring endpoint `GET /healthz` answers 200 (for a cluster node
//! that includes contact with the JetStream meta leader) and `/varz` names this server, so a
//! foreign process that happens to hold the monitoring port is never mistaken for it. A port that
//! another process grabbed before the server bound it makes the server exit with "address already
//! in use"; [`NatsServerBuilder::start`] then starts over on fresh ports, and
//! [`NatsServer::restart`] (which must keep its ports) retries until its deadline.

use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::{binary_version, nats_server_binary, nats_server_binary_version};
use crate::http::{HttpResponse, http_get};
use crate::ports::free_port;
use crate::process::ServerProcess;

/// How long a server may take to become healthy unless the builder says otherwise. Generous: a
/// loaded 2-core machine running several test binaries is the norm, not the exception.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Set this environment variable (to anything) to keep the temporary directories (config, log,
/// store) of servers that are dropped while their test panics.
pub const KEEP_DIRS_ENV: &str = "DROVER_TEST_KEEP_NATS";

/// How often readiness is polled.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Time limit of one request to the monitoring port.
const MONITOR_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How many fresh sets of ports a start tries before giving up on port collisions.
pub(crate) const START_ATTEMPTS: u32 = 5;

/// Log lines shown in failure messages.
const LOG_TAIL_LINES: usize = 40;

/// A name unique within this machine's test runs: `<prefix>-<pid>-<counter>`.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Fast reconnects (at most 250 ms apart) and a 5 s connect timeout: the client options
/// [`NatsServer::connect`] and [`NatsCluster::connect`](crate::NatsCluster::connect) use. Start
/// from these when a test needs more options.
pub fn test_connect_options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(
                u64::try_from(attempts)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(25),
            )
            .min(Duration::from_millis(250))
        })
}

/// The cluster block of a node's config (set by [`NatsCluster`](crate::NatsCluster)).
#[derive(Debug, Clone)]
pub(crate) struct ClusterSpec {
    /// Cluster name, unique per test cluster so two test clusters never join.
    pub(crate) name: String,
    /// This node's route listen port.
    pub(crate) port: u16,
    /// The route ports of the other nodes.
    pub(crate) routes: Vec<u16>,
}

/// Options for starting a [`NatsServer`]; from [`NatsServer::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .start().await"]
pub struct NatsServerBuilder {
    binary: Option<PathBuf>,
    extra_config: String,
    jetstream_extra: String,
    max_mem: Option<u64>,
    max_file: Option<u64>,
    startup_timeout: Duration,
}

impl Default for NatsServerBuilder {
    fn default() -> Self {
        Self {
            binary: None,
            extra_config: String::new(),
            jetstream_extra: String::new(),
            max_mem: None,
            max_file: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }
}

impl NatsServerBuilder {
    /// Runs this binary instead of the default one ([`nats_server_binary`]).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Runs the installed server of this version ([`nats_server_binary_version`]).
    ///
    /// # Panics
    /// If that version is not installed, naming `bash nats/install.sh <version>`.
    pub fn version(self, version: &str) -> Self {
        self.binary(nats_server_binary_version(version))
    }

    /// Appends `text` to the server's config file, at the top level (e.g. `mappings { ... }`,
    /// `accounts { ... }`, `max_payload: 2MB`). Repeated calls append again. Settings inside the
    /// `jetstream { }` block go through [`jetstream_extra`](Self::jetstream_extra) instead: a
    /// second `jetstream` block would replace the harness's one.
    pub fn extra_config(mut self, text: impl AsRef<str>) -> Self {
        self.extra_config.push_str(text.as_ref());
        self.extra_config.push('\n');
        self
    }

    /// Appends `text` inside the config's `jetstream { }` block (e.g. `sync_interval: always`).
    pub fn jetstream_extra(mut self, text: impl AsRef<str>) -> Self {
        self.jetstream_extra.push_str(text.as_ref());
        self.jetstream_extra.push('\n');
        self
    }

    /// JetStream's memory storage limit (`max_memory_store`), in bytes. Default: the server's
    /// own (75 % of RAM).
    pub fn max_mem(mut self, bytes: u64) -> Self {
        self.max_mem = Some(bytes);
        self
    }

    /// JetStream's file storage limit (`max_file_store`), in bytes. Default: the server's own
    /// (most of the free disk). Streams with `max_bytes` reserve that much against this limit.
    pub fn max_file(mut self, bytes: u64) -> Self {
        self.max_file = Some(bytes);
        self
    }

    /// How long a start or restart may take to become healthy (default
    /// [`DEFAULT_STARTUP_TIMEOUT`]).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// The startup timeout in force.
    pub(crate) fn get_startup_timeout(&self) -> Duration {
        self.startup_timeout
    }

    /// Starts the server and waits until it is healthy.
    ///
    /// # Panics
    /// If the binary is missing (naming the install command), or the server does not become
    /// healthy within the startup timeout (with the reason and the tail of its log).
    pub async fn start(self) -> NatsServer {
        let deadline_each = self.startup_timeout;
        for attempt in 1..=START_ATTEMPTS {
            let server = NatsServer::prepare(self.clone(), unique_name("drover-nats"), None);
            server.respawn();
            match server
                .wait_ready(Instant::now() + deadline_each, Collisions::Fail)
                .await
            {
                Ok(()) => return server,
                Err(NotReady::PortCollision) if attempt < START_ATTEMPTS => continue,
                Err(why) => panic!("{}", server.failure_report(&why)),
            }
        }
        unreachable!("the last attempt returns or panics")
    }
}

/// Why a server is not ready.
#[derive(Debug)]
pub(crate) enum NotReady {
    /// It exited because a port was taken.
    PortCollision,
    /// It exited for another reason.
    Exited(ExitStatus),
    /// It is not running (killed and not restarted).
    NotRunning,
    /// The deadline passed; the last observation.
    Timeout(String),
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PortCollision => write!(f, "a port it needs is in use by another process"),
            Self::Exited(status) => write!(f, "the process exited ({status})"),
            Self::NotRunning => write!(f, "the process is not running (killed, not restarted)"),
            Self::Timeout(last) => write!(f, "not healthy before the deadline; last check: {last}"),
        }
    }
}

/// What waiting does when the server exits on a port collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Collisions {
    /// Report it, so the caller can start over on fresh ports.
    Fail,
    /// Start again on the same ports until the deadline (restarts must keep their ports).
    Respawn,
}

/// The running process and where its current run's output starts in the log.
#[derive(Debug, Default)]
struct Run {
    process: Option<ServerProcess>,
    log_offset: u64,
}

/// One `nats-server` with JetStream on random loopback ports. See the [module docs](self).
///
/// Every method takes `&self`, so a server can be shared (`Arc<NatsServer>`) between a test and
/// the tasks that inject faults.
#[derive(Debug)]
pub struct NatsServer {
    settings: NatsServerBuilder,
    binary: PathBuf,
    version: String,
    name: String,
    client_port: u16,
    monitor_port: u16,
    cluster: Option<ClusterSpec>,
    /// `None` only while dropping with [`KEEP_DIRS_ENV`] set.
    dir: Option<TempDir>,
    run: Mutex<Run>,
}

impl NatsServer {
    /// Starts a server with default options (the pinned binary, JetStream on) and waits until it
    /// is healthy.
    ///
    /// # Panics
    /// As [`NatsServerBuilder::start`].
    pub async fn start() -> NatsServer {
        Self::builder().start().await
    }

    /// Options for a server: binary or version, extra config, JetStream limits, startup timeout.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// A server with fresh ports and a fresh temporary directory, not started.
    pub(crate) fn prepare(
        settings: NatsServerBuilder,
        name: String,
        cluster: Option<ClusterSpec>,
    ) -> NatsServer {
        let binary = settings.binary.clone().unwrap_or_else(nats_server_binary);
        let version = binary_version(&binary);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for {name}: {e}"));
        let server = NatsServer {
            settings,
            binary,
            version,
            name,
            client_port: free_port(),
            monitor_port: free_port(),
            cluster,
            dir: Some(dir),
            run: Mutex::new(Run::default()),
        };
        let store = server.store_dir();
        fs::create_dir_all(&store)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", store.display()));
        fs::write(server.config_path(), server.config_text())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", server.config_path().display()));
        server
    }

    /// The config file's text.
    fn config_text(&self) -> String {
        let s = &self.settings;
        let mut jetstream = format!("  store_dir: \"{}\"\n", self.store_dir().display());
        if let Some(bytes) = s.max_mem {
            jetstream.push_str(&format!("  max_memory_store: {bytes}\n"));
        }
        if let Some(bytes) = s.max_file {
            jetstream.push_str(&format!("  max_file_store: {bytes}\n"));
        }
        for line in s.jetstream_extra.lines() {
            jetstream.push_str(&format!("  {line}\n"));
        }
        let cluster = match &self.cluster {
            None => String::new(),
            Some(spec) => {
                let routes: String = spec
                    .routes
                    .iter()
                    .map(|port| format!("    \"nats-route://127.0.0.1:{port}\"\n"))
                    .collect();
                format!(
                    "cluster {{\n  name: \"{}\"\n  listen: \"127.0.0.1:{}\"\n  routes: [\n{routes}  ]\n}}\n",
                    spec.name, spec.port
                )
            }
        };
        format!(
            "# Written by drover-tests for one test server.\n\
             server_name: \"{name}\"\n\
             listen: \"127.0.0.1:{client}\"\n\
             http: \"127.0.0.1:{monitor}\"\n\
             jetstream {{\n{jetstream}}}\n\
             {cluster}\
             {extra}",
            name = self.name,
            client = self.client_port,
            monitor = self.monitor_port,
            extra = s.extra_config,
        )
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory is only taken while dropping")
            .path()
    }

    fn lock_run(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's name (`server_name`), unique per test server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version the binary reports, e.g. `2.15.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The binary this server runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `nats://127.0.0.1:<client port>`.
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The HTTP monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// `http://127.0.0.1:<monitor port>`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The route port, for a cluster node.
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster.as_ref().map(|spec| spec.port)
    }

    /// The JetStream store directory; it survives restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir().join("store")
    }

    /// The generated config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("server.conf")
    }

    /// The log file: the server's stdout and stderr, of every run, separated by marker lines.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("server.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The last `lines` lines of the log without the harness's own noise: every `/healthz` poll
    /// that fails makes the server log a "Healthcheck failed" warning, so those are collapsed
    /// into one line saying how many there were and what the last one said.
    fn diagnostic_log_tail(&self, lines: usize) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let (health, other): (Vec<&str>, Vec<&str>) = log
            .lines()
            .partition(|line| line.contains("Healthcheck failed"));
        let mut tail = other[other.len().saturating_sub(lines)..].join("\n");
        if let Some(last) = health.last() {
            tail.push_str(&format!(
                "\n({} failed health checks by the harness left out; the last: {last})",
                health.len()
            ));
        }
        tail
    }

    /// The log written since the current run started.
    fn log_of_current_run(&self) -> String {
        let offset = self.lock_run().log_offset;
        let log = fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// The process id, while a process runs (or is stopped).
    pub fn pid(&self) -> Option<u32> {
        let mut run = self.lock_run();
        let process = run.process.as_mut()?;
        process.exited().is_none().then(|| process.pid())
    }

    /// Whether a process runs (stopped counts as running).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Connects a client with [`test_connect_options`].
    ///
    /// # Panics
    /// If the connection fails.
    pub async fn connect(&self) -> async_nats::Client {
        self.connect_with(test_connect_options()).await
    }

    /// Connects a client with `options`.
    ///
    /// # Panics
    /// If the connection fails.
    pub async fn connect_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        options
            .connect(self.client_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to {} ({}): {e}",
                    self.name,
                    self.client_url()
                )
            })
    }

    /// `GET path` on the monitoring port (e.g. `/jsz`, `/varz`, `/healthz?js-enabled-only=true`).
    pub async fn monitor_get(&self, path: &str) -> io::Result<HttpResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.monitor_port));
        http_get(addr, path, MONITOR_REQUEST_TIMEOUT).await
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, `libc::SIGUSR2` for lame duck mode) to the process,
    /// if one runs.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(process) = self.lock_run().process.as_mut() {
            process.signal(signal);
        }
    }

    /// SIGKILL: the process dies at once, without flushing or saying goodbye to clients or
    /// peers, and is reaped before this returns. The store stays; [`restart`](Self::restart)
    /// brings the server back.
    pub fn kill(&self) {
        let process = self.lock_run().process.take();
        if let Some(process) = process {
            process.kill_and_reap();
        }
    }

    /// SIGSTOP: the process freezes (its sockets stay open, nothing is answered) until
    /// [`cont`](Self::cont). Returns once the kernel reports it stopped.
    pub fn stop(&self) {
        let mut run = self.lock_run();
        if let Some(process) = run.process.as_mut() {
            process.signal(libc::SIGSTOP);
            process.wait_stopped_state(true, Duration::from_secs(5));
        }
    }

    /// SIGCONT: a stopped process resumes. Returns once the kernel reports it running.
    pub fn cont(&self) {
        let mut run = self.lock_run();
        if let Some(process) = run.process.as_mut() {
            process.signal(libc::SIGCONT);
            process.wait_stopped_state(false, Duration::from_secs(5));
        }
    }

    /// Kills the process if it runs (SIGKILL), starts it again with the same ports, config and
    /// store, and waits until it is healthy.
    ///
    /// # Panics
    /// If it does not become healthy within the startup timeout (with the log tail).
    pub async fn restart(&self) {
        self.respawn();
        self.wait_healthy().await;
    }

    /// Kills the process if it runs (SIGKILL) and starts it again with the same ports, config
    /// and store, without waiting for it; [`wait_healthy`](Self::wait_healthy) waits. For
    /// restarting several cluster nodes at once, none of which is healthy before a quorum runs.
    pub fn respawn(&self) {
        self.kill();
        let mut run = self.lock_run();
        run.log_offset = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let process = ServerProcess::spawn(&self.binary, &self.config_path(), &self.log_path())
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} for {}: {e}",
                    self.binary.display(),
                    self.name
                )
            });
        run.process = Some(process);
    }

    /// Waits until the running server is healthy (`/healthz` answers 200), restarting it on the
    /// same ports if it exited because one of them was briefly taken.
    ///
    /// # Panics
    /// If it is not running, exits, or is not healthy within the startup timeout (with the log
    /// tail).
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + self.settings.startup_timeout;
        if let Err(why) = self.wait_ready(deadline, Collisions::Respawn).await {
            panic!("{}", self.failure_report(&why));
        }
    }

    /// Polls until healthy, the process exits, or `deadline`.
    pub(crate) async fn wait_ready(
        &self,
        deadline: Instant,
        collisions: Collisions,
    ) -> Result<(), NotReady> {
        loop {
            if let Some(why) = self.exit_reason() {
                let collided = matches!(why, NotReady::Exited(_))
                    && self.log_of_current_run().contains("address already in use");
                match (collided, collisions) {
                    (true, Collisions::Fail) => return Err(NotReady::PortCollision),
                    (true, Collisions::Respawn) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        self.respawn();
                        continue;
                    }
                    _ => return Err(why),
                }
            }
            let last = match self.monitor_get("/healthz").await {
                Ok(resp) if resp.status == 200 => match self.answers_as_itself().await {
                    Ok(()) => return Ok(()),
                    Err(why) => why,
                },
                Ok(resp) => format!("/healthz answered {}: {}", resp.status, resp.body.trim()),
                Err(e) => format!("/healthz: {e}"),
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(last));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether the process is gone, and why.
    fn exit_reason(&self) -> Option<NotReady> {
        let mut run = self.lock_run();
        match run.process.as_mut() {
            None => Some(NotReady::NotRunning),
            Some(process) => process.exited().map(NotReady::Exited),
        }
    }

    /// Checks that the monitoring port is ours: `/varz` names this server.
    async fn answers_as_itself(&self) -> Result<(), String> {
        let varz = self
            .monitor_get("/varz")
            .await
            .and_then(|resp| resp.json())
            .map_err(|e| format!("/varz: {e}"))?;
        match varz["server_name"].as_str() {
            Some(name) if name == self.name => Ok(()),
            other => Err(format!(
                "the monitoring port is answered by another server ({other:?})"
            )),
        }
    }

    /// A failure message with everything needed to diagnose it.
    pub(crate) fn failure_report(&self, why: &NotReady) -> String {
        format!(
            "nats-server {name} (v{version}, {binary}, client port {client}, monitor port \
             {monitor}) did not become healthy: {why}\n\
             --- config {config_path} ---\n{config}\n\
             --- last {LOG_TAIL_LINES} log lines ({log_path}) ---\n{tail}\n---",
            name = self.name,
            version = self.version,
            binary = self.binary.display(),
            client = self.client_port,
            monitor = self.monitor_port,
            config_path = self.config_path().display(),
            config = fs::read_to_string(self.config_path()).unwrap_or_default(),
            log_path = self.log_path().display(),
            tail = self.diagnostic_log_tail(LOG_TAIL_LINES),
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- drover-tests: last 15 log lines of nats-server {} ({}) ---\n{}\n---",
                self.name,
                self.log_path().display(),
                self.diagnostic_log_tail(15)
            );
            if std::env::var_os(KEEP_DIRS_ENV).is_some()
                && let Some(dir) = self.dir.take()
            {
                eprintln!("drover-tests: kept {}", dir.keep().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn hold(port: u16) -> TcpListener {
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free for the test to hold")
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_as_a_collision() {
        let server = NatsServer::prepare(NatsServer::builder(), unique_name("collide"), None);
        let _taken = hold(server.client_port());
        server.respawn();
        let result = server
            .wait_ready(Instant::now() + DEFAULT_STARTUP_TIMEOUT, Collisions::Fail)
            .await;
        assert!(
            matches!(result, Err(NotReady::PortCollision)),
            "{result:?}: {}",
            server.log_tail(5)
        );
    }

    #[tokio::test]
    async fn waiting_retries_the_same_ports_until_they_are_free() {
        let server = NatsServer::prepare(NatsServer::builder(), unique_name("collide"), None);
        let taken = hold(server.monitor_port());
        server.respawn();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(taken);
        });
        server.wait_healthy().await;
        release.await.unwrap();
        assert!(server.log_tail(1000).contains("address already in use"));
    }
}
