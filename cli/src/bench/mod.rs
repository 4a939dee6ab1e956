//! `drover bench <scenario>`: a load generator against a local fleet it starts itself (`--spawn`,
//! the default) or an existing one (`--nats-url`). Every run first measures raw JetStream on the
//! same server ([`raw`]), so each Drover throughput is also reported as a ratio to it.
//!
//! | module | scenario |
//! |---|---|
//! | [`throughput`] | N `noop` tasks, single or array submits, pipelined; first submit → last `succeeded` |
//! | [`latency`] | fixed submit rates; submit → handler start (`started_at`) and → `succeeded` seen in KV |
//! | [`failover`] | 3 dispatchers under a steady load; SIGKILL / SIGTERM the leader, time to the next term's envelope |
//! | [`recovery`] | SIGKILL a worker holding running `sleep` tasks; time until they start elsewhere |
//! | [`memory`] | RSS of a dispatcher and a worker, idle and through a 100k-task backlog |
//! | [`fleet`] | the spawned nats-server and components (reusing `drover up`'s), readiness, the record watch |
//! | [`raw`] | the raw JetStream baseline of the run |
//! | [`report`] | rows, the table, `--output json`, the SVG plots |

mod failover;
mod fleet;
mod latency;
mod memory;
mod raw;
mod recovery;
mod report;
mod throughput;

use crate::cmd::output::Format;
use anyhow::{Context as _, bail};
use fleet::Target;
use indicatif::{ProgressBar, ProgressStyle};
use report::{Report, Section};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// What `drover bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N `noop` tasks submitted as fast as the server takes them; first submit → last `succeeded`.
    Throughput,
    /// Fixed submit rates (`--rates`); submit → handler start and submit → `succeeded`.
    Latency,
    /// SIGKILL and SIGTERM the leader of 3 dispatchers under load (needs --spawn).
    Failover,
    /// SIGKILL a worker holding running tasks; time until they restart elsewhere (needs --spawn).
    Recovery,
    /// RSS of a dispatcher and a worker, idle and through a backlog (needs --spawn).
    Memory,
    /// Every scenario in turn (throughput with single and array submits).
    All,
}

/// Flags of `drover bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Start a project-local nats-server in a temporary directory and a fleet per scenario (the
    /// default unless --nats-url is given).
    #[arg(long, conflicts_with = "nats_url")]
    pub spawn: bool,
    /// Benchmark an existing fleet at this NATS URL (throughput and latency only) instead.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Prefix of the existing fleet (with --nats-url).
    #[arg(long, default_value = drover_shared::names::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Tasks for `throughput` (also the size of the raw baseline, at most 200,000; `memory` uses
    /// at most 100,000).
    #[arg(long, default_value_t = 200_000)]
    pub tasks: usize,
    /// Tasks per submit message for `throughput` (1: single submits; `all` runs 1 and this, or
    /// 100 when this is 1).
    #[arg(long, default_value_t = 1)]
    pub array: usize,
    /// Submit rates of `latency`, tasks per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "200,5000")]
    pub rates: Vec<u32>,
    /// Seconds each `latency` rate runs.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Signals per kind for `failover` (SIGKILL, then SIGTERM) and workers killed by `recovery`.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Seconds between two leader kills in `failover`.
    #[arg(long, default_value_t = 5.0)]
    pub kill_every: f64,
    /// Submit rate under which `failover` kills leaders, tasks per second.
    #[arg(long, default_value_t = 2_000)]
    pub failover_rate: u32,
    /// Workers a spawned fleet runs (`recovery` runs at least 3).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The nats-server binary to spawn (default: the one `nats/install.sh` installs).
    #[arg(long, env = "DROVER_NATS_SERVER")]
    pub nats_server: Option<PathBuf>,
    /// Output format: `table` for people, `json` for scripts (see docs/cli.md).
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Write throughput.svg and latency.svg into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl BenchArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.tasks == 0 || self.array == 0 || self.trials == 0 || self.workers == 0 {
            bail!("--tasks, --array, --trials and --workers must be at least 1");
        }
        if self.rates.is_empty() || self.rates.contains(&0) || self.failover_rate == 0 {
            bail!("rates must be at least 1 task per second");
        }
        if !(self.duration > 0.0 && self.kill_every > 0.0) {
            bail!("--duration and --kill-every must be positive");
        }
        let needs_spawn = matches!(
            self.scenario,
            Scenario::Failover | Scenario::Recovery | Scenario::Memory | Scenario::All
        );
        if self.nats_url.is_some() && needs_spawn {
            bail!(
                "`{}` signals or measures fleet processes, so it needs a fleet this command starts: \
                 drop --nats-url (the default is --spawn); against an existing fleet run \
                 `throughput` or `latency`",
                format!("{:?}", self.scenario).to_lowercase()
            );
        }
        Ok(())
    }
}

/// A progress bar on stderr, or a hidden one when stderr is not a terminal.
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style =
        ProgressStyle::with_template("{msg:>24} [{bar:32}] {pos}/{len} {per_sec} eta {eta}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(len).with_style(style);
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A line about what the bench is doing, on stderr when it is a terminal.
pub(crate) fn note(line: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("{line}");
    }
}

/// `drover bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    args.check()?;
    let target = Target::open(&args).await?;
    let result = measure(&args, &target).await;
    target.close(result.is_ok()).await;
    let report = result?;
    match args.output {
        Format::Table => print!("{}", report.render_table()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot render the report")?
        ),
    }
    if let Some(dir) = &args.plot {
        let written = report::plot(&report, dir)?;
        for path in written {
            note(&format!("wrote {}", path.display()));
        }
    }
    let lost = report.lost();
    if lost > 0 {
        eprintln!("error: {lost} task(s) did not reach `succeeded`; see the report");
        return Ok(ExitCode::from(crate::cmd::Exit::Failed as u8));
    }
    Ok(ExitCode::SUCCESS)
}

/// The raw baseline, then the scenarios asked for.
async fn measure(args: &BenchArgs, target: &Target) -> anyhow::Result<Report> {
    // `all` measures both single and array submits (arrays of --array, 100 unless given);
    // `throughput` alone measures what --array says.
    let all = args.scenario == Scenario::All;
    let single = (all || args.array == 1).then_some(1);
    let array = if args.array > 1 { args.array } else { 100 };
    let arrays =
        (all || (args.scenario == Scenario::Throughput && args.array > 1)).then_some(array);
    let raw = raw::measure(target, args.tasks, arrays).await?;
    let mut report = Report::new(target.describe(), raw);
    let plan: Vec<Scenario> = match args.scenario {
        Scenario::All => vec![
            Scenario::Throughput,
            Scenario::Latency,
            Scenario::Failover,
            Scenario::Recovery,
            Scenario::Memory,
        ],
        s => vec![s],
    };
    for scenario in plan {
        let sections: Vec<Section> = match scenario {
            Scenario::Throughput => {
                let mut out = Vec::new();
                if let Some(k) = single {
                    out.push(throughput::run(target, args, k, &report.raw).await?);
                }
                if all || args.array > 1 {
                    out.push(throughput::run(target, args, array, &report.raw).await?);
                }
                out
            }
            Scenario::Latency => vec![latency::run(target, args).await?],
            Scenario::Failover => vec![failover::run(target, args).await?],
            Scenario::Recovery => vec![recovery::run(target, args).await?],
            Scenario::Memory => vec![memory::run(target, args).await?],
            Scenario::All => Vec::new(),
        };
        report.sections.extend(sections);
    }
    Ok(report)
}
