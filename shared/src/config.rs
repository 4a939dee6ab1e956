//! Command-line and environment settings shared by `drover-dispatcher`, `drover-worker` and
//! `drover` (SPEC §10). Each binary flattens these into its own `clap` parser, so a flag, its
//! `DROVER_*` variable and its default are spelled once.

use crate::names::{NameError, Names};
use std::path::PathBuf;

/// How to reach NATS and which names to use there.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// NATS server URL(s), comma-separated for a cluster.
    #[arg(long, env = "DROVER_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "DROVER_CREDS")]
    pub creds: Option<PathBuf>,
    /// NATS user name.
    #[arg(long, env = "DROVER_USER")]
    pub user: Option<String>,
    /// NATS password (never printed).
    #[arg(long, env = "DROVER_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// CA certificate to verify the server with.
    #[arg(long, env = "DROVER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long, env = "DROVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS.
    #[arg(long, env = "DROVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Prefix of every subject, stream, bucket and consumer.
    #[arg(long, env = "DROVER_PREFIX", default_value = crate::names::DEFAULT_PREFIX)]
    pub prefix: String,
}

impl ConnectArgs {
    /// The names under `--prefix`.
    pub fn names(&self) -> Result<Names, NameError> {
        Names::new(&self.prefix)
    }
}

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings of a long-running component (dispatcher, worker).
#[derive(Debug, Clone, clap::Args)]
pub struct ComponentArgs {
    /// TOML configuration file.
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This process's id; default `<host>-<pid>-<4 random hex>`.
    #[arg(long, env = "DROVER_ID")]
    pub id: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz (port 0 picks a free one).
    #[arg(long, env = "DROVER_METRICS_ADDR", default_value = "127.0.0.1:0")]
    pub metrics_addr: String,
    /// Log format; the level comes from `DROVER_LOG` (default `info`).
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The default process id: `<host>-<pid>-<4 random hex>`, unique across container restarts.
pub fn default_id() -> String {
    let host = hostname();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// This machine's host name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}
