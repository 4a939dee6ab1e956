//! `drover leader`: the dispatcher holding the lease, from the `leader` key of
//! `<prefix>-election` (`{"id","host","pid","since","addr","epoch"}`, SPEC §10). No leader is
//! exit 1.

use super::nats::Ctx;
use super::output::{Format, age, key_values, or_dash, time_with_age};
use super::{CliError, Common, Exit, print_json};
use async_nats::jetstream::kv::Operation;
use serde::Deserialize;

/// Flags of `drover leader`.
#[derive(Debug, clap::Args)]
pub struct LeaderArgs {
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// The leader value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LeaderValue {
    /// Replica id.
    pub id: String,
    /// Host.
    pub host: Option<String>,
    /// Pid.
    pub pid: Option<u64>,
    /// Leading since (RFC 3339).
    pub since: Option<String>,
    /// Metrics address.
    pub addr: Option<String>,
    /// Term (absent until the first renewal).
    pub epoch: Option<u64>,
}

/// `drover leader`.
pub async fn run(args: LeaderArgs) -> Result<Exit, CliError> {
    let ctx = Ctx::connect(&args.common).await?;
    let kv = ctx.bucket("election").await?;
    let entry = kv
        .entry("leader")
        .await
        .map_err(|e| CliError::nats("cannot read the election bucket", e))?
        .filter(|e| e.operation == Operation::Put);
    let Some(entry) = entry else {
        if ctx.format == Format::Json {
            print_json(&serde_json::json!({ "leader": null }));
        }
        return Err(CliError::failed(format!(
            "no leader: no dispatcher holds the lease in {} (are the dispatchers running?)",
            ctx.names.bucket("election")
        )));
    };
    let value: serde_json::Value = serde_json::from_slice(&entry.value)
        .map_err(|e| CliError::failed(format!("the leader value is not JSON: {e}")))?;
    let renewed = super::nats::to_chrono(entry.created.unix_timestamp_nanos());
    let now = chrono::Utc::now();
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "leader": value,
            "revision": entry.revision,
            "renewed_at": drover_shared::task::format_time(&renewed),
        })),
        Format::Table => {
            let l: LeaderValue = serde_json::from_value(value).unwrap_or_default();
            let since = l
                .since
                .as_deref()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|t| time_with_age(t.with_timezone(&chrono::Utc), now));
            print!(
                "{}",
                key_values(&[
                    ("leader", l.id.clone()),
                    ("host", or_dash(l.host.as_ref())),
                    ("pid", or_dash(l.pid)),
                    ("epoch", or_dash(l.epoch)),
                    ("since", or_dash(since.or(l.since.clone()))),
                    ("renewed", age(renewed, now)),
                    ("addr", or_dash(l.addr.as_ref())),
                ])
            );
        }
    }
    Ok(Exit::Ok)
}
