//! `drover-worker`: a stateless worker that runs the tasks of the partitions it owns (SPEC §6).

use clap::Parser;
use drover_shared::config::{ComponentArgs, ConnectArgs};
use drover_worker::Worker;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "drover-worker",
    version,
    about = "Drover worker: pulls the partitions assigned to it, verifies and runs tasks, reports outcomes",
    after_help = "Configuration layers: defaults < TOML (--config) < DROVER_* variables < flags. \
                  Envelope keys come from DROVER_KEYS or [keys] file; make them with `drover keys gen`."
)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    component: ComponentArgs,
    /// Queues to serve, comma-separated.
    #[arg(
        long,
        env = "DROVER_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    queues: Vec<String>,
    /// Tasks run at once (default 4 × cores).
    #[arg(long, env = "DROVER_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Weight in the partition ring.
    #[arg(long, env = "DROVER_CAPACITY", default_value_t = 1)]
    capacity: u32,
}

fn main() -> ExitCode {
    let settings = match drover_shared::ops::service::start(|a: &Args| &a.component) {
        Ok((_, settings)) => settings,
        Err(code) => return code,
    };
    let worker = match Worker::builder(settings).build() {
        Ok(w) => w,
        // Missing keys, a bad queue name: a usage problem, exit 2 with the message.
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    drover_shared::ops::service::run_service(|shutdown| worker.run(shutdown))
}
