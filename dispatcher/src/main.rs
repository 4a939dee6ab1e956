//! `drover-dispatcher`: one replica of the highly available dispatcher (SPEC §5).

use clap::{CommandFactory, FromArgMatches, Parser};
use drover_dispatcher::run::{Replica, run};
use drover_shared::config::{ComponentArgs, ConnectArgs};
use drover_shared::settings::{self, FlagOverrides};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "drover-dispatcher",
    version,
    about = "Drover dispatcher: elects a leader that validates, routes, batches, seals and dispatches tasks",
    after_help = "Configuration layers: defaults < TOML (--config) < DROVER_* variables < flags. \
                  Envelope keys come from DROVER_KEYS or [keys] file; make them with `drover keys gen`."
)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    component: ComponentArgs,
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
    let replica = match Replica::from_settings(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    drover_shared::ops::service::run_service(|shutdown| run(replica, shutdown))
}
