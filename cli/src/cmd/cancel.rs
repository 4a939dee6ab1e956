//! `drover cancel <id>`: cancel a task through `<prefix>.api.cancel`. A scheduled or queued task
//! never starts; a running one is aborted by its worker. Cancelling a task that already ended is
//! refused (exit 1).

use super::nats::Ctx;
use super::output::Format;
use super::{CliError, Common, Exit, print_json};
use async_nats::HeaderMap;

/// Flags of `drover cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// Task id.
    pub id: String,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// `drover cancel`.
pub async fn run(args: CancelArgs) -> Result<Exit, CliError> {
    if !drover_shared::task::is_valid_any_id(&args.id) {
        return Err(CliError::usage(format!(
            "{:?} is not a task id: ids match [A-Za-z0-9][A-Za-z0-9_-]{{0,127}} (or start with '_' when generated)",
            args.id
        )));
    }
    let ctx = Ctx::connect(&args.common).await?;
    let body = serde_json::json!({ "id": args.id })
        .to_string()
        .into_bytes();
    let reply = ctx.api("cancel", body, HeaderMap::new()).await?;
    match ctx.format {
        Format::Json => print_json(&reply),
        Format::Table => println!(
            "cancelled {} (was {})",
            args.id,
            reply["previous_state"].as_str().unwrap_or("?")
        ),
    }
    Ok(Exit::Ok)
}
