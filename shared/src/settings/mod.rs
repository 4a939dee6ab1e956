//! The layered configuration of `drover-dispatcher` and `drover-worker` (SPEC §9 "Config",
//! §10): defaults → TOML file (`--config`, `DROVER_CONFIG`) → `DROVER_*` variables → flags, then
//! validated as a whole. User documentation: `docs/configuration.md`.
//!
//! * [`Settings`] is the whole configuration, one struct for both components; its sections are
//!   serde structs that deny unknown fields and default every field.
//! * [`load`] is pure: the file's text, the environment as pairs and the flags given on the
//!   command line ([`FlagOverrides`]) in, a validated [`Settings`] or a [`SettingsError`] out.
//!   [`load_from_process`] reads the real file and process environment.
//! * Environment variables: the named ones of SPEC §10 ([`ENV_ALIASES`]), and for every field
//!   `DROVER_<SECTION>__<FIELD>` (`DROVER_DISPATCHER__MAX_BATCH=512`,
//!   `DROVER_QUEUES__EMAILS__PARTITIONS=8`), read as a TOML literal when it is one and as text
//!   otherwise.
//! * [`print_config`] renders the result as TOML with every secret ([`Secret`]) as `"***"`.
//!
//! | file | holds |
//! |---|---|
//! | `sections.rs` | `[nats]`, `[keys]`, `[dispatcher]`, `[worker]`, `[queues.*]`, `[metrics]`, `[log]` |
//! | `handlers.rs` | `[worker.exec.*]` and `[worker.http.*]` |
//! | `secret.rs` | [`Secret`], the masked string |
//! | `layers.rs` | environment mapping, merging, origins of values, scrubbing of messages |
//! | `flags.rs` | [`FlagOverrides`]: only what was typed on the command line |
//! | `validate.rs` | field and cross-field rules |
//! | `error.rs` | [`SettingsError`], [`Violation`] |
//!
//! A typical `main`:
//!
//! ```no_run
//! # use drover_shared::settings::{self, FlagOverrides};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let matches = clap::Command::new("demo").get_matches(); // the binary's own parser
//! let flags = FlagOverrides::from_arg_matches(&matches);
//! let config = settings::load_from_process(None, &flags)?.resolved();
//! println!("{}", settings::print_config(&config));
//! # Ok(()) }
//! ```

mod error;
mod flags;
mod handlers;
mod layers;
mod secret;
mod sections;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope::CodecConfig;
use crate::keyring::Keyring;
use crate::names::{NameError, Names};
use crate::topology::TopologyConfig;

pub use error::{SettingsError, Violation};
pub use flags::FlagOverrides;
pub use handlers::{BreakerSettings, CwdPolicy, ExecHandler, HttpHandler};
pub use layers::{ENV_ALIASES, ENV_NOT_SETTINGS, ENV_PATH_SEPARATOR, ENV_PREFIX, unrecognized_env};
pub use secret::{MASK, Secret};
pub use sections::{
    DEFAULT_METRICS_ADDR, DEFAULT_NATS_URL, DispatcherSettings, Events, KeysSettings, LogSettings,
    MetricsSettings, NatsSettings, QueueSettings, Strategy, Tracking, WorkerSettings,
};
pub use validate::{MAX_BATCH_LIMIT, MAX_PARTITIONS, NEVER_PASSED_ENV};

/// The variable naming the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "DROVER_CONFIG";

/// The whole configuration of a Drover component. Every field has a default, so an empty file
/// (or none) is a working local setup once keys are given.
///
/// `Serialize` masks secrets (see [`print_config`]): the output is for people, and reading it
/// back does not restore passwords or keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// This process's id (worker key, leader value); unset means `<host>-<pid>-<4 random hex>`.
    pub id: Option<String>,
    /// `[nats]`: servers, authentication, TLS and the name prefix.
    pub nats: NatsSettings,
    /// `[topology]`: replicas, storage, lease, worker TTL, retention and stream sizes.
    pub topology: TopologyConfig,
    /// `[codec]`: envelope compression level and decompression cap.
    pub codec: CodecConfig,
    /// `[keys]`: where the envelope keyring comes from.
    pub keys: KeysSettings,
    /// `[dispatcher]`: leader margin, batching, tracking and events.
    pub dispatcher: DispatcherSettings,
    /// `[worker]`: queues, concurrency, heartbeats and handlers.
    pub worker: WorkerSettings,
    /// `[queues.<name>]`: predeclared queues and their options.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub queues: BTreeMap<String, QueueSettings>,
    /// `[metrics]`: the `/metrics`, `/healthz`, `/readyz` endpoint.
    pub metrics: MetricsSettings,
    /// `[log]`: format and level.
    pub log: LogSettings,
}

impl Settings {
    /// The names under `nats.prefix`.
    pub fn names(&self) -> Result<Names, NameError> {
        Names::new(&self.nats.prefix)
    }

    /// The envelope keyring from `keys.inline` (`DROVER_KEYS`) or `keys.file`;
    /// [`SettingsError::NoKeys`] when neither is set. Reads the file, if any.
    pub fn keyring(&self) -> Result<Keyring, SettingsError> {
        match (&self.keys.inline, &self.keys.file) {
            (Some(inline), _) => {
                Keyring::parse(inline.expose()).map_err(|source| SettingsError::Keys {
                    origin: "keys.inline".to_owned(),
                    source,
                })
            }
            (None, Some(file)) => Keyring::from_file(file).map_err(|source| SettingsError::Keys {
                origin: file.display().to_string(),
                source,
            }),
            (None, None) => Err(SettingsError::NoKeys),
        }
    }

    /// The options of queue `name`: its `[queues.<name>]` table, or the defaults.
    pub fn queue(&self, name: &str) -> QueueSettings {
        self.queues.get(name).cloned().unwrap_or_default()
    }

    /// The leader lease (`topology.lease_ms`).
    pub fn lease(&self) -> Duration {
        self.topology.lease()
    }

    /// The leader's safety margin (`dispatcher.lease_margin_ms`).
    pub fn lease_margin(&self) -> Duration {
        Duration::from_millis(self.dispatcher.lease_margin_ms)
    }

    /// The settings with the machine-dependent defaults filled in: `id` (a fresh
    /// `<host>-<pid>-<hex>`) and `worker.concurrency` (4 × cores). Call once at start, before
    /// printing or running, so `--print-config` shows what the process uses.
    #[must_use]
    pub fn resolved(mut self) -> Self {
        self.id.get_or_insert_with(crate::config::default_id);
        self.worker.concurrency = Some(self.worker.effective_concurrency());
        self
    }
}

/// Loads the configuration from its layers, lowest first: defaults, the TOML text `toml` (if
/// any), the environment `env` (all of it may be passed: only `DROVER_*` names are read), and
/// the command-line `flags`. Pure: reads no file and no process state.
///
/// Errors name the file line, the variable, the flag or the field path, and never contain a
/// secret value.
pub fn load<I, K, V>(
    toml: Option<&str>,
    env: I,
    flags: &FlagOverrides,
) -> Result<Settings, SettingsError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    layers::load_layers(toml.map(|t| ("config", t)), env, flags)
}

/// [`load`] with the real inputs: the file at `config` (the `--config` flag), else at
/// `$DROVER_CONFIG`, else none; and the process environment.
pub fn load_from_process(
    config: Option<&Path>,
    flags: &FlagOverrides,
) -> Result<Settings, SettingsError> {
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if !k.starts_with(ENV_PREFIX) {
            continue;
        }
        let v = v.into_string().map_err(|_| SettingsError::Env {
            var: k.to_owned(),
            message: "the value is not valid UTF-8".to_owned(),
        })?;
        env.push((k.to_owned(), v));
    }
    let path: Option<PathBuf> = match config {
        Some(p) => Some(p.to_owned()),
        None => env
            .iter()
            .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v)),
    };
    let text = match &path {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| SettingsError::Read {
            path: p.display().to_string(),
            message: e.to_string(),
        })?),
        None => None,
    };
    let origin = path.as_ref().map(|p| p.display().to_string());
    let file = origin.as_deref().zip(text.as_deref());
    layers::load_layers(file, env, flags)
}

/// The configuration as TOML, for `--print-config`: every field, defaults included, with every
/// secret (NATS password, inline keys, HTTP header values) shown as `"***"`.
pub fn print_config(settings: &Settings) -> String {
    let body = toml::to_string(settings).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
    format!("# Effective Drover configuration (secrets shown as \"{MASK}\").\n\n{body}")
}
