//! `drover-dispatcher`: one replica of the highly available dispatcher (SPEC §5).

use clap::Parser;
use drover_dispatcher::run::{Replica, run};
use drover_shared::config::{ComponentArgs, ConnectArgs};
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
}

fn main() -> ExitCode {
    let settings = match drover_shared::ops::service::start(|a: &Args| &a.component) {
        Ok((_, settings)) => settings,
        Err(code) => return code,
    };
    let replica = match Replica::from_settings(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    drover_shared::ops::service::run_service(|shutdown| run(replica, shutdown))
}
