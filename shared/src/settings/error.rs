//! Why a configuration could not be loaded. Every message names where the problem is (the file
//! with line and column, the environment variable, the flag, or the field path) and never
//! contains a secret value.

use std::fmt;

use crate::keyring::KeyringError;

/// One broken rule found by validation, e.g. `dispatcher.max_batch must be 1..=4096, got 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted path of the field (`dispatcher.max_batch`, `queues.emails.partitions`).
    pub path: String,
    /// What is wrong and what would be right (`must be 1..=4096, got 0`).
    pub rule: String,
    /// The layer that set the value (`DROVER_DISPATCHER__MAX_BATCH`, `--nats-url`, a file
    /// path), or `None` for a default.
    pub origin: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path, self.rule)?;
        if let Some(origin) = &self.origin {
            write!(f, " (set by {origin})")?;
        }
        Ok(())
    }
}

/// Why loading or using a configuration failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The configuration file is not valid TOML or does not fit the settings (unknown field,
    /// wrong type). The offending line is not quoted: it may hold a secret.
    #[error("{origin}{}: {message}", Location(*line, *column))]
    File {
        /// The file (its path, or `config` for text given directly).
        origin: String,
        /// Line of the problem, 1-based, when known.
        line: Option<usize>,
        /// Column of the problem, 1-based, when known.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A `DROVER_*` variable names no setting, or its value does not fit the setting.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A command-line flag's value does not fit its setting.
    #[error("flag {flag}: {message}")]
    Flag {
        /// The flag, e.g. `--nats-url`.
        flag: String,
        /// What is wrong.
        message: String,
    },
    /// The layers fit one by one but not together (should not happen; reported rather than
    /// panicking).
    #[error("the merged configuration does not parse: {0}")]
    Merged(String),
    /// The merged configuration breaks one or more rules.
    #[error("{}", Violations(.0))]
    Invalid(Vec<Violation>),
    /// Neither `keys.inline` (`DROVER_KEYS`) nor `keys.file` is set.
    #[error(
        "no envelope keys: set DROVER_KEYS=kid:base64 (make one with `drover keys gen`) or \
         `keys.file` in the config file; there is no built-in default key"
    )]
    NoKeys,
    /// The keyring could not be built (messages name the item and kid, never the secret).
    #[error("keyring from {origin}: {source}")]
    Keys {
        /// `keys.inline` or the key file's path.
        origin: String,
        /// The keyring's error.
        #[source]
        source: KeyringError,
    },
}

impl SettingsError {
    /// The violations of an [`SettingsError::Invalid`], empty for every other error.
    pub fn violations(&self) -> &[Violation] {
        match self {
            Self::Invalid(v) => v,
            _ => &[],
        }
    }
}

struct Location(Option<usize>, Option<usize>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(col)) => write!(f, ", line {line}, column {col}"),
            (Some(line), None) => write!(f, ", line {line}"),
            _ => Ok(()),
        }
    }
}

struct Violations<'a>(&'a [Violation]);

impl fmt::Display for Violations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for v in many {
                    write!(f, "\n  - {v}")?;
                }
                Ok(())
            }
        }
    }
}
