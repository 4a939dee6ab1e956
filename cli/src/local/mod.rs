//! `drover up`: a local fleet on a project-local nats-server that this process starts, owns and
//! stops: dispatchers and workers as child processes, a live status line, and `--demo`.

mod demo;
mod status;

use anyhow::{Context, bail};
use drover_shared::config::ConnectArgs;
use drover_shared::keyring::{KEYS_ENV, Keyring};
use drover_shared::names::Names;
use drover_shared::topology::{self, TopologyConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Flags of `drover up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory for the server's store, logs and pid (created if missing).
    #[arg(long, default_value = ".drover")]
    dir: PathBuf,
    /// Client port of the local nats-server.
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// Monitoring port of the local nats-server (/healthz, /varz, /jsz).
    #[arg(long, default_value_t = 8222)]
    monitor_port: u16,
    /// Submit a mixed demo workload (echo, sleep, keyed tasks in order, a failing task that
    /// retries into the dead-letter queue), follow it to the end, stop the fleet and exit.
    #[arg(long)]
    demo: bool,
    /// The nats-server binary to run (default: the one `nats/install.sh` installs).
    #[arg(long, env = "DROVER_NATS_SERVER")]
    nats_server: Option<PathBuf>,
    /// Prefix of every subject, stream, bucket and consumer.
    #[arg(long, env = "DROVER_PREFIX", default_value = drover_shared::names::DEFAULT_PREFIX)]
    prefix: String,
    /// Dispatcher replicas to run (one leads, the others stand by).
    #[arg(long, default_value_t = 2)]
    dispatchers: usize,
    /// Worker processes to run.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seconds between live status lines (0: none).
    #[arg(long, default_value_t = 5)]
    status_every: u64,
}

/// Envelope keys for the local fleet: `DROVER_KEYS` if set, else `<dir>/keys`, made on first use
/// (readable by this user only).
pub(crate) fn local_keys(dir: &Path) -> anyhow::Result<String> {
    if let Ok(k) = std::env::var(KEYS_ENV)
        && !k.trim().is_empty()
    {
        Keyring::parse(&k).with_context(|| format!("{KEYS_ENV} is set but invalid"))?;
        return Ok(k);
    }
    let path = dir.join("keys");
    if !path.exists() {
        let ring = Keyring::generate("local1")?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        writeln!(f, "{}", ring.to_env_string())?;
    }
    let ring =
        Keyring::from_file(&path).with_context(|| format!("bad key file {}", path.display()))?;
    Ok(ring.to_env_string())
}

/// A Drover component started by `drover up` (or `drover bench`), stopped with SIGTERM when the
/// fleet stops.
pub(crate) struct Component {
    name: String,
    child: Child,
}

impl Component {
    /// Starts binary `bin` (beside this executable) as `--id <name>`, logging to
    /// `<dir>/<name>.log`.
    pub(crate) fn start(
        bin: &str,
        name: &str,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?.with_file_name(bin);
        if !exe.is_file() {
            bail!(
                "{} is missing; build every binary first: cargo build --release --workspace --bins",
                exe.display()
            );
        }
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["--id", name])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: prctl only: the component gets SIGTERM if `drover up` dies.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// SIGTERM, then up to 10 s, then SIGKILL.
    pub(crate) async fn stop(mut self) {
        if !terminate(&mut self.child).await {
            eprintln!("{} did not stop in 10 s; killed it", self.name);
        }
    }

    /// The `--id` it was started with.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`) without waiting.
    pub(crate) fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits up to `timeout` for it to exit (after a signal), then kills it.
    pub(crate) async fn reap(mut self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// SIGTERM to `child`, then up to 10 s for it to exit, then SIGKILL. `false` if it had to be
/// killed.
async fn terminate(child: &mut Child) -> bool {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_ok()
    {
        return true;
    }
    let _ = child.kill().await;
    false
}

/// The project checkout: the directory holding `nats/install.sh`, searched from the current
/// directory upwards, then where this binary was built from.
pub(crate) fn project_root() -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    cwd.ancestors()
        .map(Path::to_path_buf)
        .chain(std::iter::once(built_from))
        .find(|d| d.join("nats/install.sh").is_file())
        .context("cannot find nats/install.sh in this directory or above; run `drover up` inside a Drover checkout, or pass --nats-server")
}

/// Runs `nats/install.sh` (idempotent) and returns the binary it reports.
pub(crate) async fn install_nats(root: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(root.join("nats/install.sh"))
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("cannot run nats/install.sh")?;
    if !out.status.success() {
        bail!("nats/install.sh failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(path))
}

pub(crate) fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// One GET of `/healthz`; `true` on a 200.
fn healthy(monitor: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&monitor, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

/// The local nats-server: stopped with SIGTERM (then SIGKILL) when dropped or shut down, and
/// killed by the kernel if this process dies first.
pub(crate) struct LocalNats {
    child: Child,
}

impl LocalNats {
    /// Starts `bin` with `nats/single.conf` on loopback `port`/`monitor_port`, its store and log
    /// in `dir`, and waits until it is healthy.
    pub(crate) async fn start(
        bin: &Path,
        root: &Path,
        dir: &Path,
        port: u16,
        monitor_port: u16,
    ) -> anyhow::Result<Self> {
        for (what, port) in [("client", port), ("monitoring", monitor_port)] {
            if !port_free(port) {
                bail!(
                    "{what} port {port} is already in use (another nats-server or `drover up`?); pass --port/--monitor-port"
                );
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let log = dir.join("nats.log");
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(root.join("nats/single.conf"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor_port.to_string()])
            .arg("-sd")
            .arg(dir.join("jetstream"))
            .arg("-l")
            .arg(&log)
            .arg("-P")
            .arg(dir.join("nats.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child when
        // this process exits, so no nats-server outlives a killed `drover up`.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut me = Self { child };
        let monitor = SocketAddr::from(([127, 0, 0, 1], monitor_port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(monitor) {
            if let Some(status) = me.child.try_wait()? {
                bail!(
                    "nats-server exited ({status}) during start; see {}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not become healthy in 30 s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(me)
    }

    /// SIGTERM, then up to 10 s, then SIGKILL.
    pub(crate) async fn shutdown(mut self) {
        terminate(&mut self.child).await;
    }
}

/// `drover up`.
pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let names = Names::new(&args.prefix)?;
    let root = project_root()?;
    let bin = match &args.nats_server {
        Some(b) => b.clone(),
        None => install_nats(&root).await?,
    };
    let nats = LocalNats::start(&bin, &root, &args.dir, args.port, args.monitor_port).await?;
    let result = fleet(&args, &names).await;
    nats.shutdown().await;
    println!("stopped; data kept in {}", args.dir.display());
    result
}

/// Provisions, starts the dispatchers and workers, runs until Ctrl-C (or the demo ends), stops
/// them.
async fn fleet(args: &UpArgs, names: &Names) -> anyhow::Result<ExitCode> {
    let keys = local_keys(&args.dir)?;
    let url = format!("nats://127.0.0.1:{}", args.port);
    let mut components = Vec::new();
    let result = async {
        let client = serve(args, names, &url).await?;
        let env = [
            ("DROVER_KEYS", keys.as_str()),
            ("DROVER_NATS_URL", url.as_str()),
            ("DROVER_PREFIX", names.prefix()),
        ];
        for i in 1..=args.dispatchers {
            components.push(Component::start(
                "drover-dispatcher",
                &format!("dispatcher-{i}"),
                &args.dir,
                &env,
            )?);
        }
        for i in 1..=args.workers {
            components.push(Component::start(
                "drover-worker",
                &format!("worker-{i}"),
                &args.dir,
                &env,
            )?);
        }
        println!(
            "fleet        {} dispatcher(s), {} worker(s) started (logs in {})",
            args.dispatchers,
            args.workers,
            args.dir.display()
        );
        let js = async_nats::jetstream::new(client.clone());
        print_endpoints(&js, names, args.workers).await;
        println!();
        if args.demo {
            demo::run(&client, names).await?;
            return Ok(ExitCode::SUCCESS);
        }
        // SIGTERM too (a service manager, `kill`): stopping here stops the fleet and server
        // below; dying by the default action would leave them running. Handlers first, then
        // the line that tells a supervisor (or a test) it may signal.
        let stop = drover_shared::ops::service::stop_requested();
        println!("Running; press Ctrl-C to stop.");
        if args.status_every == 0 {
            stop.await;
        } else {
            status::follow(&js, names, Duration::from_secs(args.status_every), stop).await;
        }
        Ok(ExitCode::SUCCESS)
    }
    .await;
    for c in components {
        c.stop().await;
    }
    result
}

/// Waits (up to 20 s) for a leader and the workers, then prints where their `/metrics` live.
async fn print_endpoints(js: &async_nats::jetstream::Context, names: &Names, workers: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = status::snapshot(js, names).await;
        // The epoch joins the leader value right after the winning create.
        let led = snap.leader.as_ref().is_some_and(|(_, epoch)| *epoch > 0);
        if (led && snap.workers >= workers) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut lines = Vec::new();
    if let Ok(kv) = js.get_key_value(names.bucket("election")).await
        && let Ok(Some(v)) = kv.get("leader").await
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&v)
    {
        lines.push(format!(
            "leader       {} (epoch {})  metrics http://{}/metrics",
            v["id"].as_str().unwrap_or("?"),
            v["epoch"],
            v["addr"].as_str().unwrap_or("?")
        ));
    } else {
        lines.push("leader       none yet; see the dispatcher-*.log files".to_owned());
    }
    if let Ok(kv) = js.get_key_value(names.bucket("workers")).await
        && let Ok(mut keys) = kv.keys().await
    {
        while let Some(Ok(key)) = futures::StreamExt::next(&mut keys).await {
            if let Ok(Some(v)) = kv.get(&key).await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&v)
            {
                lines.push(format!(
                    "worker       {key}  metrics http://{}/metrics",
                    v["addr"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    for l in lines {
        println!("{l}");
    }
}

async fn serve(args: &UpArgs, names: &Names, url: &str) -> anyhow::Result<async_nats::Client> {
    let url = url.to_owned();
    let connect = ConnectArgs {
        nats_url: url.clone(),
        creds: None,
        user: None,
        password: None,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        prefix: names.prefix().to_owned(),
    };
    let client =
        drover_shared::connect::connect(&connect, "drover-up", Duration::from_secs(10)).await?;
    let report = topology::provision(&client, names, &TopologyConfig::default()).await?;
    println!(
        "nats-server  {url}  (monitoring http://127.0.0.1:{}/, store {})",
        args.monitor_port,
        args.dir.display()
    );
    println!("provisioned  {report}");
    println!();
    println!("Submit a task from any NATS client, e.g. the nats CLI:");
    println!(
        "  nats -s {url} pub {} '{{\"type\":\"echo\",\"payload\":\"hello\"}}'",
        names.submit_subject("default")
    );
    println!("Inspect:");
    println!("  nats -s {url} stream report");
    println!("  nats -s {url} kv ls");
    println!("  nats -s {url} kv get {} leader", names.bucket("election"));
    Ok(client)
}
