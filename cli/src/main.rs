//! `drover`: submit, inspect and operate a Drover fleet, run one locally (`drover up`), and
//! benchmark one (`drover bench`).

mod bench;
mod cmd;
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
    /// Submit a task through the validated API and print its id (`--wait` for the outcome).
    Submit(Box<cmd::submit::SubmitArgs>),
    /// Show a task's record (exit 1 if it failed, was cancelled or upstream failed).
    Status(cmd::status::StatusArgs),
    /// Wait until tasks are terminal (exit 1 if any did not succeed).
    Wait(cmd::wait::WaitArgs),
    /// Cancel a task (scheduled and queued tasks never start; running ones are aborted).
    Cancel(cmd::cancel::CancelArgs),
    /// List task records, most recently submitted first.
    Tasks(cmd::tasks::TasksArgs),
    /// List live workers, their load and the partitions they own.
    Workers(cmd::workers::WorkersArgs),
    /// Show which dispatcher leads.
    Leader(cmd::leader::LeaderArgs),
    /// Show the backlog per queue (and per partition of one queue).
    Queues(cmd::queues::QueuesArgs),
    /// Dead, rejected and quarantined messages: ls, show, replay, purge.
    #[command(subcommand)]
    Dlq(cmd::dlq::DlqCommand),
    /// Open a sealed envelope of the work stream by stream sequence.
    Inspect(cmd::inspect::InspectArgs),
    /// Load-test a fleet (spawned locally by default) next to raw JetStream on the same server.
    Bench(bench::BenchArgs),
    /// Cron and event-triggered schedules: add, ls, rm, pause, resume, trigger.
    #[command(subcommand)]
    Schedule(cmd::schedule::ScheduleCommand),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a flag error as one line (`--help`/`--version` print in full) and exits 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(cmd::Exit::Usage as u8)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("error: invalid arguments")
        .trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("error: {first} (see --help)");
    ExitCode::from(cmd::Exit::Usage as u8)
}

/// Runs an operator command; its error is printed as one line and mapped to its exit code.
fn finish(result: Result<cmd::Exit, cmd::CliError>) -> ExitCode {
    match result {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("error: {}", cmd::output::one_line(&e.message));
            e.exit.into()
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Submit(a) => Ok(finish(cmd::submit::run(*a).await)),
        Command::Status(a) => Ok(finish(cmd::status::run(a).await)),
        Command::Wait(a) => Ok(finish(cmd::wait::run(a).await)),
        Command::Cancel(a) => Ok(finish(cmd::cancel::run(a).await)),
        Command::Tasks(a) => Ok(finish(cmd::tasks::run(a).await)),
        Command::Workers(a) => Ok(finish(cmd::workers::run(a).await)),
        Command::Leader(a) => Ok(finish(cmd::leader::run(a).await)),
        Command::Queues(a) => Ok(finish(cmd::queues::run(a).await)),
        Command::Dlq(a) => Ok(finish(cmd::dlq::run(a).await)),
        Command::Inspect(a) => Ok(finish(cmd::inspect::run(a).await)),
        Command::Schedule(a) => Ok(finish(cmd::schedule::run(a).await)),
        Command::Up(args) => local::up(args).await,
        Command::Bench(args) => bench::run(args).await,
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
