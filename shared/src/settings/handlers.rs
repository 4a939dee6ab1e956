//! Handler tables of the worker: `[worker.exec.<type>]` (an external process per task) and
//! `[worker.http.<type>]` (a POST per task) (SPEC §6.1). What runs comes only from here, never
//! from a task.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::secret::Secret;

// ---- exec ---------------------------------------------------------------------------------------

/// Where an `exec` handler's process runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CwdPolicy {
    /// A fresh, empty temporary directory per run, removed afterwards (`"fresh"`).
    #[default]
    Fresh,
    /// This absolute directory, shared by every run.
    Fixed(PathBuf),
}

impl Serialize for CwdPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fresh => s.serialize_str("fresh"),
            Self::Fixed(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for CwdPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "fresh" {
            Ok(Self::Fresh)
        } else if s.starts_with('/') {
            Ok(Self::Fixed(PathBuf::from(s)))
        } else {
            Err(de::Error::custom(format_args!(
                "invalid cwd `{s}`: expected \"fresh\" or an absolute directory"
            )))
        }
    }
}

impl fmt::Display for CwdPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fresh => f.write_str("fresh"),
            Self::Fixed(p) => write!(f, "{}", p.display()),
        }
    }
}

const fn default_memory_mb() -> u64 {
    1_024
}
const fn default_timeout_grace_ms() -> u64 {
    5_000
}
const fn default_max_output_bytes() -> usize {
    64 * 1024
}
const fn default_stderr_tail_bytes() -> usize {
    4 * 1024
}

/// One `exec` handler: the payload goes to the process's stdin, its stdout is the result (JSON if
/// it parses, else a string), a non-zero exit is a failure carrying the stderr tail.
///
/// Each run gets its own process group, a scrubbed environment and rlimits; on timeout the group
/// gets SIGTERM, then SIGKILL after `timeout_grace_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecHandler {
    /// Program and arguments; the first item is an absolute path or a name looked up in `PATH`.
    pub argv: Vec<String>,
    /// Names of the worker's environment variables passed to the process; all others are
    /// removed. `DROVER_KEYS` and `DROVER_PASSWORD` can never be passed.
    pub env_allow: Vec<String>,
    /// Variables set for the process, by name, after `env_allow` (a name in both takes this
    /// value). Values are secrets (they often carry tokens): never printed.
    pub env: BTreeMap<String, Secret>,
    /// Working directory: `"fresh"` (a new temporary directory per run) or an absolute path.
    pub cwd: CwdPolicy,
    /// Address-space limit of the process in MiB (`RLIMIT_AS`).
    pub memory_mb: u64,
    /// CPU-time limit in seconds (`RLIMIT_CPU`); unset means the attempt timeout, rounded up.
    pub cpu_secs: Option<u64>,
    /// Time between SIGTERM and SIGKILL on timeout or cancel, in milliseconds.
    pub timeout_grace_ms: u64,
    /// Most stdout bytes kept as the result; more fails the attempt (1..=64 MiB).
    pub max_output_bytes: usize,
    /// Bytes of the end of stderr kept in the error of a failed run (0..=64 KiB).
    pub stderr_tail_bytes: usize,
}

impl Default for ExecHandler {
    fn default() -> Self {
        Self {
            argv: Vec::new(),
            env_allow: Vec::new(),
            env: BTreeMap::new(),
            cwd: CwdPolicy::Fresh,
            memory_mb: default_memory_mb(),
            cpu_secs: None,
            timeout_grace_ms: default_timeout_grace_ms(),
            max_output_bytes: default_max_output_bytes(),
            stderr_tail_bytes: default_stderr_tail_bytes(),
        }
    }
}

// ---- http ---------------------------------------------------------------------------------------

const fn default_http_timeout_ms() -> u64 {
    30_000
}
const fn default_max_response_bytes() -> usize {
    64 * 1024
}
const fn default_breaker_failures() -> u32 {
    5
}
const fn default_breaker_cooldown_ms() -> u64 {
    30_000
}

/// The per-target circuit breaker of an `http` handler: after `failures` consecutive failures
/// the breaker opens and attempts fail at once for `cooldown_ms`, then one attempt is let
/// through (half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker (≥ 1).
    pub failures: u32,
    /// How long the breaker stays open, in milliseconds (≥ 1).
    pub cooldown_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: default_breaker_failures(),
            cooldown_ms: default_breaker_cooldown_ms(),
        }
    }
}

/// One `http` handler: POST the payload to `url`; a 2xx answer is success and its body the
/// result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpHandler {
    /// Target, `http://` or `https://`.
    pub url: String,
    /// Request timeout in milliseconds (≥ 1); the attempt's own deadline applies as well.
    pub timeout_ms: u64,
    /// Extra request headers. Values are secrets (they often carry tokens): never printed.
    pub headers: BTreeMap<String, Secret>,
    /// Most response-body bytes kept as the result; a longer body fails the attempt
    /// (1..=64 MiB).
    pub max_response_bytes: usize,
    /// Circuit breaker of this target.
    pub breaker: BreakerSettings,
}

impl Default for HttpHandler {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout_ms: default_http_timeout_ms(),
            headers: BTreeMap::new(),
            max_response_bytes: default_max_response_bytes(),
            breaker: BreakerSettings::default(),
        }
    }
}
