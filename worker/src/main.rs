//! `drover-worker`: a stateless worker that runs the tasks of the partitions it owns (SPEC §6).

use clap::Parser;
use drover_shared::config::{ComponentArgs, ConnectArgs};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "drover-worker",
    version,
    about = "Drover worker: pulls the partitions assigned to it, verifies and runs tasks, reports outcomes"
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
    let args = Args::parse();
    eprintln!(
        "drover-worker: this build has the protocol core only; the worker loop is not built yet ({} queue(s) requested)",
        args.queues.len()
    );
    let _ = (
        args.connect,
        args.component,
        args.concurrency,
        args.capacity,
    );
    ExitCode::from(2)
}
