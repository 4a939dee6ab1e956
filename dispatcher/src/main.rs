//! `drover-dispatcher`: one replica of the highly available dispatcher (SPEC §5).

use clap::Parser;
use drover_shared::config::{ComponentArgs, ConnectArgs};
use std::process::ExitCode;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "drover-dispatcher: this build has the protocol core only; the dispatch loop is not built yet (would connect to {})",
        args.connect.nats_url
    );
    let _ = args.component;
    ExitCode::from(2)
}
