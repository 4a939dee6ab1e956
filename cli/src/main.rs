//! `drover`: submit, inspect and operate a Drover fleet, and run one locally (`drover up`).

mod local;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_shared::config::ConnectArgs;
use drover_shared::keyring::Keyring;
use drover_shared::topology::{self, TopologyConfig};
use std::process::ExitCode;
use std::time::Duration;

/// Exit codes scripts can rely on.
mod exit {
    /// The command could not run: NATS unreachable, a timeout.
    pub const UNREACHABLE: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Drover: a distributed task dispatcher and worker fleet on NATS JetStream",
    long_about = "Drover: a distributed task dispatcher and worker fleet on NATS JetStream.\n\n\
                  Start a local fleet with `drover up`, then submit tasks from this CLI or any NATS client."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local fleet: install and start a project-local nats-server, provision it, and keep
    /// it running until Ctrl-C.
    Up(local::UpArgs),
    /// Create or update every stream, bucket and consumer Drover needs (idempotent; never deletes).
    Init {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Replicas of every stream and bucket (1 on a laptop, 3 in production).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// Manage envelope keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Print new key material in DROVER_KEYS form (`kid:base64`). Keep it secret.
    Gen {
        /// Key id of the new key.
        #[arg(long, default_value = "k1")]
        kid: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) => local::up(args).await,
        Command::Init { connect, replicas } => {
            let names = connect.names()?;
            let client = match drover_shared::connect::connect(
                &connect,
                "drover-cli",
                Duration::from_secs(5),
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(exit::UNREACHABLE));
                }
            };
            let cfg = TopologyConfig {
                replicas,
                ..TopologyConfig::default()
            };
            let report = topology::provision(&client, &names, &cfg)
                .await
                .context("provisioning failed")?;
            for e in &report.entries {
                println!("{:<9} {:<40} {:?}", e.kind, e.name, e.change);
            }
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::Gen { kid }) => {
            let ring = Keyring::generate(&kid)?;
            println!("{}", ring.to_env_string());
            eprintln!(
                "# export DROVER_KEYS=<the line above> for every dispatcher and worker; keep it secret"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
