//! Drover's own binaries as real child processes: built once per test run, started with their
//! output in a log file, signalled (SIGKILL, SIGSTOP, SIGCONT, SIGTERM) and killed on drop.

use crate::process::spawn_from_long_lived_thread;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The path of Drover binary `bin` (`drover-dispatcher`, `drover-worker`, `drover`), built with
/// `cargo build` (every workspace binary at once) the first time one is asked for in this test
/// process, so tests always run the current code.
///
/// An optimized harness (`cargo bench`) builds and runs release binaries, so benchmarks measure
/// what users run; tests use the debug build that `cargo test` already made, unless
/// `DROVER_TEST_RELEASE_BINS` is set (a test's own latency report on release binaries).
///
/// # Panics
/// If the build fails, with cargo's output.
pub fn drover_bin(bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(bin) {
        return p.clone();
    }
    let root = crate::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `DROVER_TEST_RELEASE_BINS=1`: a debug test run measures release binaries.
    let release = !cfg!(debug_assertions) || std::env::var_os("DROVER_TEST_RELEASE_BINS").is_some();
    let args: &[&str] = if release {
        &["build", "--quiet", "--release", "--workspace", "--bins"]
    } else {
        // The same package and target set as `cargo test --workspace`, so features unify the
        // same way and nothing the test run already built is rebuilt.
        &["build", "--quiet", "--workspace", "--bins", "--tests"]
    };
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root).args(args);
    // `cargo test` runs each test binary with its package's variables (CARGO_MANIFEST_DIR,
    // CARGO_PKG_*, OUT_DIR, ...), which differ between test crates. Build scripts that track
    // such a variable (ring, under async-nats) would rerun and rebuild half the dependency tree
    // on every switch between crates, so the nested build gets the environment the outer
    // `cargo test` had: cargo's own configuration variables stay, per-package ones go.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let per_package =
            (name.starts_with("CARGO_") && !is_cargo_config_var(name)) || name == "OUT_DIR";
        if per_package {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .output()
        .expect("cannot run cargo to build a Drover binary");
    assert!(
        out.status.success(),
        "cargo build --bin {bin} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let path = target
        .join(if release { "release" } else { "debug" })
        .join(bin);
    assert!(
        path.is_file(),
        "built {bin} but {} is missing",
        path.display()
    );
    built.insert(bin.to_owned(), path.clone());
    path
}

/// Whether `name` is one of cargo's configuration variables (`CARGO_HOME`, `CARGO_TARGET_DIR`,
/// `CARGO_BUILD_*`, `CARGO_PROFILE_*`, …) rather than one it sets for a package's test run.
fn is_cargo_config_var(name: &str) -> bool {
    const KEEP: &[&str] = &["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL"];
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_BUILD_",
        "CARGO_PROFILE_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
        "CARGO_TARGET_",
    ];
    KEEP.contains(&name)
        || (KEEP_PREFIXES.iter().any(|p| name.starts_with(p)) && name != "CARGO_TARGET_TMPDIR")
}

/// A fixed envelope keyring for tests (a secret nowhere else).
pub const TEST_KEYS: &str = "test1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A Drover process started by a test.
#[derive(Debug)]
pub struct DroverProcess {
    name: String,
    child: Mutex<Option<Child>>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl DroverProcess {
    /// Starts `bin` with `args` and `env` (on top of a clean environment that keeps only `PATH`
    /// and `HOME`), logging stdout and stderr to a file.
    pub fn start(name: &str, bin: &str, args: &[String], env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join(format!("{name}.log"));
        let file = File::create(&log).expect("log file");
        let mut cmd = Command::new(drover_bin(bin));
        cmd.args(args)
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        // SAFETY: prctl only; no allocation between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child =
            spawn_from_long_lived_thread(cmd).unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        Self {
            name: name.to_owned(),
            child: Mutex::new(Some(child)),
            log,
            _dir: dir,
        }
    }

    /// A `drover-dispatcher` replica with id `name` on `server_url`, keyed with [`TEST_KEYS`],
    /// whose `default` queue has `partitions` partitions.
    pub fn dispatcher(name: &str, server_url: &str, partitions: u32) -> Self {
        Self::start(
            name,
            "drover-dispatcher",
            &[
                "--nats-url".into(),
                server_url.into(),
                "--id".into(),
                name.into(),
            ],
            &[
                ("DROVER_KEYS", TEST_KEYS.into()),
                ("DROVER_LOG", "info".into()),
                ("DROVER_QUEUES__DEFAULT__PARTITIONS", partitions.to_string()),
            ],
        )
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().ok()?.as_ref().map(Child::id)
    }

    /// Sends `sig` (if the process has not been reaped).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes, holding its connections open.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn cont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit (SIGKILL after that).
    pub fn terminate(&self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut().map(Child::try_wait) {
                    None => return None,
                    Some(Ok(Some(status))) => {
                        guard.take();
                        return Some(status);
                    }
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `true` while the process runs.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(guard.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log is.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for DroverProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, tail(&self.log(), 60));
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
