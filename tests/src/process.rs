//! One `nats-server` child process: spawning it so it cannot outlive the test process, sending it
//! signals, and reaping it.
//!
//! Signals go only to a child that has not been reaped yet, so a recycled pid is never hit.
//! Every child is spawned by one long-lived thread and asks the kernel (Linux
//! `PR_SET_PDEATHSIG`) for a SIGKILL when that thread dies, which happens only when the whole test
//! process exits: a test binary that is killed, aborts or calls `exit` (as the libtest harness
//! does, without running destructors of statics) leaves no orphaned servers behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from the process-lifetime spawner thread (see the module docs).
pub(crate) fn spawn_from_long_lived_thread(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("nats-server-spawner".into())
            .spawn(move || {
                // Lives as long as the process: the Sender sits in a static and is never dropped.
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the nats-server spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("nats-server spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("nats-server spawner thread dropped the request"))?
}

/// A running (or exited but not yet reaped) `nats-server` process.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    /// Starts `binary -c config`, with stdout and stderr appended to `log`. A marker line
    /// separates the output of successive starts in the same log.
    pub(crate) fn spawn(binary: &Path, config: &Path, log: &Path) -> io::Result<Self> {
        let mut log_file = OpenOptions::new().create(true).append(true).open(log)?;
        writeln!(
            log_file,
            "----- drover-tests: starting {} -c {} -----",
            binary.display(),
            config.display()
        )?;
        let stderr: File = log_file.try_clone()?;

        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(stderr));
        // SAFETY: the closure runs in the forked child before exec and calls only the
        // async-signal-safe `prctl`, `getppid` and `_exit`.
        #[cfg(target_os = "linux")]
        unsafe {
            let parent = libc::getpid();
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: nobody will ever reap us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = spawn_from_long_lived_thread(command)?;
        Ok(Self { child })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (it is reaped then).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal`. A process that already exited is not an error.
    pub(crate) fn signal(&mut self, signal: libc::c_int) {
        if self.exited().is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: plain syscall; the child is not reaped yet, so the pid is still ours.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ESRCH),
                "kill({pid}, {signal}) failed: {err}"
            );
        }
    }

    /// SIGKILL and reap. Returns once the process is gone.
    pub(crate) fn kill_and_reap(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits (up to `timeout`) until the kernel reports the process as stopped (`stopped = true`)
    /// or as not stopped. Best effort: returns quietly where `/proc` is unavailable.
    pub(crate) fn wait_stopped_state(&mut self, stopped: bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let stat_path = PathBuf::from(format!("/proc/{}/stat", self.child.id()));
        while Instant::now() < deadline && self.exited().is_none() {
            let Ok(stat) = std::fs::read_to_string(&stat_path) else {
                return;
            };
            // "pid (comm) S ...": the state is the first field after the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            let is_stopped = matches!(state, Some("T" | "t"));
            if is_stopped == stopped {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}
