//! `drover-worker`: a stateless worker that runs the tasks of the partitions it owns (SPEC §6).

use clap::{CommandFactory, FromArgMatches, Parser};
use drover_shared::config::{ComponentArgs, ConnectArgs};
use drover_shared::settings::{self, FlagOverrides};
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
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let flags = FlagOverrides::from_arg_matches(&matches);
    let settings = match settings::load_from_process(args.component.config.as_deref(), &flags) {
        Ok(s) => s.resolved(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", settings::print_config(&settings));
        return ExitCode::SUCCESS;
    }
    drover_shared::ops::service::init_tracing(settings.log.format, &settings.log.level);
    for var in settings::unrecognized_env(std::env::vars()) {
        tracing::warn!(variable = %var, "unknown DROVER_ variable ignored (a typo?)");
    }
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
