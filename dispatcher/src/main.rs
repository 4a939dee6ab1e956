//! `drover-dispatcher`: one replica of the highly available dispatcher (SPEC §5).

use clap::Parser;
use drover_dispatcher::batcher::BatcherConfig;
use drover_dispatcher::election::LeaseConfig;
use drover_dispatcher::intake::Strategy;
use drover_dispatcher::leader::LeaderConfig;
use drover_dispatcher::run::{DispatcherSettings, run};
use drover_shared::config::{ComponentArgs, ConnectArgs, LogFormat, default_id};
use drover_shared::envelope::CodecConfig;
use drover_shared::keyring::{KEYS_ENV, Keyring};
use drover_shared::topology::{QueueConsumerConfig, TopologyConfig};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "drover-dispatcher",
    version,
    about = "Drover dispatcher: elects a leader that validates, routes, batches, seals and dispatches tasks"
)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    component: ComponentArgs,
    /// Partitions of a queue the first time it is seen.
    #[arg(long, env = "DROVER_PARTITIONS", default_value_t = 64)]
    partitions: u32,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.component.log_format);
    let keys = match std::env::var(KEYS_ENV) {
        Ok(v) => match Keyring::parse(&v) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("error: {KEYS_ENV}: {e}");
                return ExitCode::from(2);
            }
        },
        Err(_) => {
            eprintln!(
                "error: no envelope keys: set {KEYS_ENV} (make one with `drover keys gen`); there is no built-in default key"
            );
            return ExitCode::from(2);
        }
    };
    let topology = TopologyConfig::default();
    let settings = DispatcherSettings {
        id: args.component.id.clone().unwrap_or_else(default_id),
        lease: LeaseConfig {
            lease: topology.lease(),
            margin: Duration::from_millis(250),
        },
        leader: LeaderConfig {
            batcher: BatcherConfig::default(),
            codec: CodecConfig::default(),
            default_partitions: args.partitions.clamp(1, 1024),
            strategy: Strategy::RoundRobin,
            default_timeout_ms: drover_shared::task::DEFAULT_TIMEOUT_MS,
            max_chunk: 1024,
            track_queued: true,
            queue_consumers: QueueConsumerConfig {
                max_in_flight: 1,
                ack_wait: topology.worker_ttl(),
            },
        },
        topology,
        keys: Arc::new(keys),
        connect: args.connect,
        addr: None,
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
        match run(settings, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// First SIGTERM/SIGINT: graceful shutdown (hand over leadership). Second: exit at once.
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
