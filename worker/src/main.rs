//! `drover-worker`: a stateless worker that runs the tasks of the partitions it owns (SPEC §6).

use clap::{CommandFactory, FromArgMatches, Parser};
use drover_shared::config::{ComponentArgs, ConnectArgs, LogFormat};
use drover_shared::settings::{self, FlagOverrides};
use drover_worker::Worker;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

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

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
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
    init_tracing(settings.log.format, &settings.log.level);
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        match worker.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// First SIGTERM/SIGINT: drain (stop pulling, let running tasks finish, NAK the rest,
/// deregister). Second: exit at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}
