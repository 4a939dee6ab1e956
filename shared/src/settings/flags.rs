//! The flag layer: [`FlagOverrides`] holds the values typed on the command line, and only
//! those, so clap's defaults and its `env = "DROVER_*"` readings never pass for flags and the
//! order defaults → file → environment → flags holds whatever the binaries' parsers declare.

use std::path::Path;

use toml::Value;

use super::error::SettingsError;
use super::layers::{Entry, split_path};
use super::secret::Secret;
use super::sections::{list, log_format};
use crate::config::LogFormat;

/// Values given on the command line, and only those: a field is `Some` when the flag was typed,
/// never because of a default or an environment variable (those are other layers).
///
/// Build it with [`FlagOverrides::from_arg_matches`], which reads the flags of
/// [`crate::config::ConnectArgs`], [`crate::config::ComponentArgs`] and the worker's
/// `--queues/--concurrency/--capacity` and keeps only values whose
/// [`clap::parser::ValueSource`] is the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagOverrides {
    /// `--nats-url` (comma-separated list).
    pub nats_url: Option<String>,
    /// `--creds`.
    pub creds: Option<std::path::PathBuf>,
    /// `--user`.
    pub user: Option<String>,
    /// `--password`.
    pub password: Option<Secret>,
    /// `--tls-ca`.
    pub tls_ca: Option<std::path::PathBuf>,
    /// `--tls-cert`.
    pub tls_cert: Option<std::path::PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<std::path::PathBuf>,
    /// `--prefix`.
    pub prefix: Option<String>,
    /// `--id`.
    pub id: Option<String>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--queues` (worker).
    pub queues: Option<Vec<String>>,
    /// `--concurrency` (worker).
    pub concurrency: Option<usize>,
    /// `--capacity` (worker).
    pub capacity: Option<u32>,
}

impl FlagOverrides {
    /// The values of `matches` that were given on the command line. Arguments the command does
    /// not define are skipped, so one call serves the dispatcher, the worker and `drover`.
    pub fn from_arg_matches(matches: &clap::ArgMatches) -> Self {
        Self {
            nats_url: typed(matches, "nats_url"),
            creds: typed(matches, "creds"),
            user: typed(matches, "user"),
            password: typed::<String>(matches, "password").map(Secret::from),
            tls_ca: typed(matches, "tls_ca"),
            tls_cert: typed(matches, "tls_cert"),
            tls_key: typed(matches, "tls_key"),
            prefix: typed(matches, "prefix"),
            id: typed(matches, "id"),
            metrics_addr: typed(matches, "metrics_addr"),
            log_format: typed(matches, "log_format"),
            queues: many(matches, "queues"),
            concurrency: typed(matches, "concurrency"),
            capacity: typed(matches, "capacity"),
        }
    }

    /// The flags as layer entries.
    pub(super) fn entries(&self) -> Result<Vec<Entry>, SettingsError> {
        let mut out = Vec::new();
        let mut add = |flag: &str, path: &str, value: Value| {
            out.push(Entry::new(flag.to_owned(), split_path(path), vec![value]));
        };
        let s = |v: &str| Value::String(v.to_owned());
        if let Some(v) = &self.nats_url {
            add("--nats-url", "nats.url", strings(list::split(v)));
        }
        for (flag, path, p) in [
            ("--creds", "nats.creds", &self.creds),
            ("--tls-ca", "nats.tls_ca", &self.tls_ca),
            ("--tls-cert", "nats.tls_cert", &self.tls_cert),
            ("--tls-key", "nats.tls_key", &self.tls_key),
        ] {
            if let Some(p) = p {
                add(flag, path, path_value(flag, p)?);
            }
        }
        for (flag, path, v) in [
            ("--user", "nats.user", &self.user),
            ("--prefix", "nats.prefix", &self.prefix),
            ("--id", "id", &self.id),
            ("--metrics-addr", "metrics.addr", &self.metrics_addr),
        ] {
            if let Some(v) = v {
                add(flag, path, s(v));
            }
        }
        if let Some(f) = self.log_format {
            add("--log-format", "log.format", s(log_format::as_str(f)));
        }
        if let Some(q) = &self.queues {
            add("--queues", "worker.queues", strings(q.clone()));
        }
        if let Some(n) = self.concurrency {
            let n = i64::try_from(n).map_err(|_| SettingsError::Flag {
                flag: "--concurrency".to_owned(),
                message: format!("{n} is too large"),
            })?;
            add("--concurrency", "worker.concurrency", Value::Integer(n));
        }
        if let Some(n) = self.capacity {
            add("--capacity", "worker.capacity", Value::Integer(n.into()));
        }
        if let Some(p) = &self.password {
            add("--password", "nats.password", s(p.expose()));
        }
        Ok(out)
    }
}

fn from_command_line(m: &clap::ArgMatches, id: &str) -> bool {
    // `try_contains_id` first: `value_source` panics (debug builds) on an id the command lacks.
    matches!(m.try_contains_id(id), Ok(true))
        && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
}

fn typed<T: Clone + Send + Sync + 'static>(m: &clap::ArgMatches, id: &str) -> Option<T> {
    if !from_command_line(m, id) {
        return None;
    }
    m.try_get_one::<T>(id).ok().flatten().cloned()
}

fn many(m: &clap::ArgMatches, id: &str) -> Option<Vec<String>> {
    if !from_command_line(m, id) {
        return None;
    }
    let values = m.try_get_many::<String>(id).ok().flatten()?;
    Some(values.cloned().collect())
}

fn strings(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

fn path_value(flag: &str, p: &Path) -> Result<Value, SettingsError> {
    p.to_str()
        .map(|s| Value::String(s.to_owned()))
        .ok_or_else(|| SettingsError::Flag {
            flag: flag.to_owned(),
            message: "the path is not valid UTF-8".to_owned(),
        })
}
