//! The layers above the defaults — the TOML file, `DROVER_*` variables, command-line flags —
//! and how they merge.
//!
//! All three become values in one `toml::Table`: the file's table, then each variable and each
//! flag inserted at its path (tables merge key by key, anything else replaces). The table is then
//! deserialized once, so a setting has a single type and a single rule wherever it comes from.
//! Each value set by the environment or a flag is first tried on its own, so a bad one is
//! reported with its variable or flag. The origin of every value is kept for validation messages.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::{Table, Value};

use super::Settings;
use super::error::SettingsError;
use super::flags::FlagOverrides;
use super::secret::MASK;

/// Every setting variable starts with this.
pub const ENV_PREFIX: &str = "DROVER_";

/// Separator of path parts in a generic variable: `DROVER_DISPATCHER__MAX_BATCH`.
pub const ENV_PATH_SEPARATOR: &str = "__";

/// The named variables of SPEC §10 (and the worker's flags) and the setting each one sets.
/// Any other setting is reached with the generic form `DROVER_<SECTION>__<FIELD>`.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("DROVER_NATS_URL", "nats.url"),
    ("DROVER_CREDS", "nats.creds"),
    ("DROVER_USER", "nats.user"),
    ("DROVER_PASSWORD", "nats.password"),
    ("DROVER_TLS_CA", "nats.tls_ca"),
    ("DROVER_TLS_CERT", "nats.tls_cert"),
    ("DROVER_TLS_KEY", "nats.tls_key"),
    ("DROVER_PREFIX", "nats.prefix"),
    ("DROVER_ID", "id"),
    ("DROVER_METRICS_ADDR", "metrics.addr"),
    ("DROVER_LOG_FORMAT", "log.format"),
    ("DROVER_LOG", "log.level"),
    ("DROVER_KEYS", "keys.inline"),
    ("DROVER_QUEUES", "worker.queues"),
    ("DROVER_CONCURRENCY", "worker.concurrency"),
    ("DROVER_CAPACITY", "worker.capacity"),
];

/// `DROVER_*` variables that are not settings and that the loader leaves alone: the file path
/// (`DROVER_CONFIG`, read by [`super::load_from_process`]) and variables of the tooling.
pub const ENV_NOT_SETTINGS: &[&str] = &[
    "DROVER_CONFIG",
    "DROVER_NATS_SERVER",
    "DROVER_TEST_KEEP_NATS",
];

/// Settings that live elsewhere, with the pointer a user who writes them gets.
const MOVED: &[(&[&str], &str)] = &[
    (
        &["dispatcher", "lease_ms"],
        "the lease is `topology.lease_ms` (the max_age of the election bucket, which every \
         replica must share; env DROVER_TOPOLOGY__LEASE_MS)",
    ),
    (
        &["worker", "ttl_ms"],
        "the worker TTL is `topology.worker_ttl_ms` (the max_age of the workers bucket and the \
         ack wait of partition consumers; env DROVER_TOPOLOGY__WORKER_TTL_MS)",
    ),
];

/// Paths whose values are secrets (`*` matches any one part). A value at, above or below one
/// of these is scrubbed from error messages.
const SECRET_PATHS: &[&[&str]] = &[
    &["nats", "password"],
    &["keys", "inline"],
    &["worker", "http", "*", "headers"],
    &["worker", "exec", "*", "env"],
];

/// Setting paths, each as its parts.
type PathGroup = &'static [&'static [&'static str]];

/// Alternatives of which one layer's choice replaces a lower layer's: `DROVER_KEYS` over a
/// `keys.file` from the file, `--creds` over a file's user and password, and back.
const EXCLUSIVE: &[(PathGroup, PathGroup)] = &[
    (&[&["keys", "inline"]], &[&["keys", "file"]]),
    (
        &[&["nats", "creds"]],
        &[&["nats", "user"], &["nats", "password"]],
    ),
];

// ---- environment --------------------------------------------------------------------------------

/// What a `DROVER_*` variable is.
enum EnvName {
    /// A setting at this path.
    Setting(Vec<String>),
    /// Not a setting (tooling, or `DROVER_CONFIG`).
    NotSetting,
    /// `DROVER_SOMETHING` without `__` that is no known name: ignored, reported by
    /// [`unrecognized_env`].
    Unknown,
}

fn classify(name: &str) -> Result<EnvName, String> {
    if ENV_NOT_SETTINGS.contains(&name) {
        return Ok(EnvName::NotSetting);
    }
    if let Some((_, path)) = ENV_ALIASES.iter().find(|(var, _)| *var == name) {
        return Ok(EnvName::Setting(split_path(path)));
    }
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(EnvName::NotSetting);
    };
    if !rest.contains(ENV_PATH_SEPARATOR) {
        return Ok(EnvName::Unknown);
    }
    let parts: Vec<String> = rest
        .split(ENV_PATH_SEPARATOR)
        .map(str::to_ascii_lowercase)
        .collect();
    if parts.iter().any(String::is_empty) {
        return Err(format!(
            "empty path part: use {ENV_PREFIX}<SECTION>{ENV_PATH_SEPARATOR}<FIELD>, e.g. \
             DROVER_DISPATCHER__MAX_BATCH"
        ));
    }
    Ok(EnvName::Setting(parts))
}

/// `DROVER_*` variables of `env` that the loader ignores because they name nothing it knows
/// (no `__` and not one of [`ENV_ALIASES`] or [`ENV_NOT_SETTINGS`]); likely typos worth a
/// warning, like `DROVER_NATS_ULR`.
pub fn unrecognized_env<I, K, V>(env: I) -> Vec<String>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    env.into_iter()
        .filter(|(k, _)| matches!(classify(k.as_ref()), Ok(EnvName::Unknown)))
        .map(|(k, _)| k.as_ref().to_owned())
        .collect()
}

/// The TOML value a variable's text stands for: a TOML literal if it is one (`512`, `true`,
/// `["a","b"]`, `{ partitions = 8 }`, `"quoted"`), else nothing.
fn parse_env_value(raw: &str) -> Option<Value> {
    let mut doc: Table = toml::from_str(&format!("v = {raw}")).ok()?;
    if doc.len() != 1 {
        return None;
    }
    doc.remove("v")
}

fn env_entries<K: AsRef<str>, V: AsRef<str>>(
    env: impl IntoIterator<Item = (K, V)>,
) -> Result<Vec<Entry>, SettingsError> {
    let mut out = Vec::new();
    for (k, v) in env {
        let (var, raw) = (k.as_ref(), v.as_ref());
        let path = match classify(var) {
            Ok(EnvName::Setting(path)) => path,
            Ok(EnvName::NotSetting | EnvName::Unknown) => continue,
            Err(message) => {
                return Err(SettingsError::Env {
                    var: var.to_owned(),
                    message,
                });
            }
        };
        if raw.is_empty() {
            continue; // an empty variable counts as unset (`DROVER_CREDS=` in a compose file)
        }
        // The literal first, so `512` is a number for a number; the plain text second, so
        // `DROVER_USER=123` or `DROVER_LOG=info` is still a string for a string.
        let mut candidates = Vec::with_capacity(2);
        candidates.extend(parse_env_value(raw));
        candidates.push(Value::String(raw.to_owned()));
        out.push(Entry::new(var.to_owned(), path, candidates));
    }
    Ok(out)
}

// ---- origins ------------------------------------------------------------------------------------

/// Which layer set each leaf value; unset paths are defaults.
#[derive(Debug, Default)]
pub(crate) struct Origins(BTreeMap<Vec<String>, String>);

impl Origins {
    fn record(&mut self, path: &mut Vec<String>, value: &Value, origin: &str) {
        match value {
            Value::Table(t) if !t.is_empty() => {
                for (k, v) in t {
                    path.push(k.clone());
                    self.record(path, v, origin);
                    path.pop();
                }
            }
            _ => {
                self.remove_under(path);
                self.0.insert(path.clone(), origin.to_owned());
            }
        }
    }

    fn remove_under(&mut self, path: &[String]) {
        self.0.retain(|k, _| !k.starts_with(path));
    }

    /// The origin of the value at `path`, or of the nearest ancestor set as a whole.
    pub(crate) fn get(&self, path: &[&str]) -> Option<&str> {
        (1..=path.len()).rev().find_map(|n| {
            let key: Vec<String> = path[..n].iter().map(|s| (*s).to_owned()).collect();
            self.0.get(&key).map(String::as_str)
        })
    }
}

// ---- paths --------------------------------------------------------------------------------------

pub(super) fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

/// `a.b."c.d"`: parts joined with dots, quoted when they are not bare TOML keys.
pub(crate) fn display_path<S: AsRef<str>>(parts: &[S]) -> String {
    let mut out = String::new();
    for (i, p) in parts.iter().enumerate() {
        let p = p.as_ref();
        if i > 0 {
            out.push('.');
        }
        let bare = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if bare {
            out.push_str(p);
        } else {
            out.push_str(&format!("{p:?}"));
        }
    }
    out
}

/// Puts `value` at `path`, creating tables on the way; a table merges into an existing table
/// key by key, anything else replaces.
fn insert(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty setting path".to_owned());
    };
    let mut cur = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = cur
            .entry(part.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match entry {
            Value::Table(t) => t,
            other => {
                return Err(format!(
                    "`{}` is {}, not a table",
                    display_path(&path[..=i]),
                    kind(other)
                ));
            }
        };
    }
    match (cur.get_mut(last), value) {
        (Some(Value::Table(old)), Value::Table(new)) => {
            for (k, v) in new {
                insert(old, std::slice::from_ref(&k), v)?;
            }
        }
        (_, value) => {
            cur.insert(last.clone(), value);
        }
    }
    Ok(())
}

fn remove(table: &mut Table, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = table;
    for part in parents {
        match cur.get_mut(*part) {
            Some(Value::Table(t)) => cur = t,
            _ => return,
        }
    }
    cur.remove(*last);
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// `true` if `path` names a secret, lies inside one, or holds one (an ancestor table).
fn is_secret_path<S: AsRef<str>>(path: &[S]) -> bool {
    SECRET_PATHS.iter().any(|pattern| {
        pattern
            .iter()
            .zip(path)
            .all(|(want, got)| *want == "*" || *want == got.as_ref())
    })
}

/// `true` if `value`, set at `at`, sets something at or under `target`.
fn touches(at: &[String], value: &Value, target: &[&str]) -> bool {
    if at.len() >= target.len() {
        return at.iter().zip(target).all(|(a, t)| a == t);
    }
    if !at.iter().zip(target).all(|(a, t)| a == t) {
        return false;
    }
    let mut cur = value;
    for part in &target[at.len()..] {
        match cur {
            Value::Table(t) => match t.get(*part) {
                Some(v) => cur = v,
                None => return false,
            },
            _ => return false,
        }
    }
    true
}

/// The first setting of `table` that lives elsewhere, with its pointer.
fn moved_key(table: &Table) -> Option<String> {
    MOVED.iter().find_map(|(path, hint)| {
        let (last, parents) = path.split_last()?;
        let mut cur = table;
        for p in parents {
            cur = cur.get(*p)?.as_table()?;
        }
        cur.contains_key(*last)
            .then(|| format!("`{}` is not a setting: {hint}", display_path(path)))
    })
}

/// Every string of `table` that sits at, above or below a secret path.
fn secret_strings(table: &Table) -> Vec<String> {
    fn walk(path: &mut Vec<String>, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if !s.is_empty() && is_secret_path(path) => out.push(s.clone()),
            Value::Table(t) => {
                for (k, v) in t {
                    path.push(k.clone());
                    walk(path, v, out);
                    path.pop();
                }
            }
            Value::Array(a) => {
                for v in a {
                    walk(path, v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (k, v) in table {
        walk(&mut vec![k.clone()], v, &mut out);
    }
    out
}

fn scrub(mut message: String, secrets: &[String]) -> String {
    for s in secrets {
        if !s.is_empty() {
            message = message.replace(s.as_str(), MASK);
        }
    }
    message
}

// ---- merging ------------------------------------------------------------------------------------

/// One value of the environment or flag layer.
pub(super) struct Entry {
    /// The variable or flag.
    origin: String,
    path: Vec<String>,
    /// Readings of the value to try in order; the first that fits the setting wins.
    candidates: Vec<Value>,
    /// Secret strings among the candidates, to scrub from messages.
    secrets: Vec<String>,
}

impl Entry {
    pub(super) fn new(origin: String, path: Vec<String>, candidates: Vec<Value>) -> Self {
        let mut secrets = Vec::new();
        for candidate in &candidates {
            let mut alone = Table::new();
            if insert(&mut alone, &path, candidate.clone()).is_ok() {
                secrets.extend(secret_strings(&alone));
            }
        }
        Self {
            origin,
            path,
            candidates,
            secrets,
        }
    }
}

#[derive(Clone, Copy)]
enum Layer {
    Env,
    Flags,
}

impl Layer {
    fn error(self, origin: &str, message: String) -> SettingsError {
        match self {
            Self::Env => SettingsError::Env {
                var: origin.to_owned(),
                message,
            },
            Self::Flags => SettingsError::Flag {
                flag: origin.to_owned(),
                message,
            },
        }
    }
}

fn deserialize(table: Table) -> Result<Settings, toml::de::Error> {
    Settings::deserialize(Value::Table(table))
}

/// Applies one layer's entries to `table`.
fn apply(
    table: &mut Table,
    origins: &mut Origins,
    mut entries: Vec<Entry>,
    layer: Layer,
) -> Result<(), SettingsError> {
    // Parents before children, so `DROVER_QUEUES__A='{...}'` then `DROVER_QUEUES__A__PAUSED`.
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for pair in entries.windows(2) {
        if pair[0].path == pair[1].path {
            return Err(layer.error(
                &pair[1].origin,
                format!(
                    "sets `{}`, which {} sets too; keep one of them",
                    display_path(&pair[1].path),
                    pair[0].origin
                ),
            ));
        }
    }

    // Choose each entry's reading against the layers below it alone, so an error names it.
    let base = table.clone();
    let mut chosen = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut first_error = None;
        let mut pick = None;
        for candidate in &entry.candidates {
            let mut t = base.clone();
            let fit = insert(&mut t, &entry.path, candidate.clone()).and_then(|()| {
                if let Some(hint) = moved_key(&t) {
                    return Err(hint);
                }
                deserialize(t).map(drop).map_err(|e| e.message().to_owned())
            });
            match fit {
                Ok(()) => {
                    pick = Some(candidate.clone());
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match pick {
            Some(value) => chosen.push((entry.origin, entry.path, value)),
            None => {
                let message = first_error.unwrap_or_default();
                let message = format!(
                    "{} (setting `{}`)",
                    scrub(message, &entry.secrets),
                    display_path(&entry.path)
                );
                return Err(layer.error(&entry.origin, message));
            }
        }
    }

    // A choice made here replaces the other alternative chosen below.
    for (left, right) in EXCLUSIVE {
        let hits = |group: &[&[&str]]| {
            chosen
                .iter()
                .any(|(_, at, v)| group.iter().any(|target| touches(at, v, target)))
        };
        let (l, r) = (hits(left), hits(right));
        let cleared: &[&[&str]] = match (l, r) {
            (true, false) => right,
            (false, true) => left,
            _ => &[],
        };
        for path in cleared {
            remove(table, path);
            let owned: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
            origins.remove_under(&owned);
        }
    }

    for (origin, path, value) in chosen {
        origins.record(&mut path.clone(), &value, &origin);
        insert(table, &path, value).map_err(|m| layer.error(&origin, m))?;
    }
    Ok(())
}

/// Line and column (1-based) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn file_error(origin: &str, text: &str, e: &toml::de::Error, secrets: &[String]) -> SettingsError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unzip();
    SettingsError::File {
        origin: origin.to_owned(),
        line,
        column,
        // Not `e.to_string()`: that quotes the offending line, which may hold a secret.
        message: scrub(e.message().trim_end().to_owned(), secrets),
    }
}

/// Defaults → `file` → `env` → `flags`, merged and validated.
pub(crate) fn load_layers<K: AsRef<str>, V: AsRef<str>>(
    file: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (K, V)>,
    flags: &FlagOverrides,
) -> Result<Settings, SettingsError> {
    let mut table = Table::new();
    let mut origins = Origins::default();
    if let Some((origin, text)) = file {
        table = toml::from_str(text).map_err(|e| file_error(origin, text, &e, &[]))?;
        let secrets = secret_strings(&table);
        if let Some(message) = moved_key(&table) {
            return Err(SettingsError::File {
                origin: origin.to_owned(),
                line: None,
                column: None,
                message,
            });
        }
        // Once more as settings: structure errors then carry the line and column.
        toml::from_str::<Settings>(text).map_err(|e| file_error(origin, text, &e, &secrets))?;
        origins.record(&mut Vec::new(), &Value::Table(table.clone()), origin);
    }
    apply(&mut table, &mut origins, env_entries(env)?, Layer::Env)?;
    apply(&mut table, &mut origins, flags.entries()?, Layer::Flags)?;
    let secrets = secret_strings(&table);
    let settings = deserialize(table)
        .map_err(|e| SettingsError::Merged(scrub(e.message().to_owned(), &secrets)))?;
    settings.validate_with(&origins)?;
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_literals() {
        assert_eq!(parse_env_value("512"), Some(Value::Integer(512)));
        assert_eq!(parse_env_value("true"), Some(Value::Boolean(true)));
        assert_eq!(parse_env_value("info"), None);
        assert_eq!(parse_env_value("nats://a:4222,nats://b:4222"), None);
        assert_eq!(parse_env_value("1\nx = 2"), None);
    }

    #[test]
    fn paths_display_quoted_when_needed() {
        assert_eq!(
            display_path(&["worker", "exec", "img.resize"]),
            r#"worker.exec."img.resize""#
        );
        assert_eq!(display_path(&["queues", "emails"]), "queues.emails");
    }

    #[test]
    fn secret_paths_match_above_at_and_below() {
        assert!(is_secret_path(&["keys"]));
        assert!(is_secret_path(&["keys", "inline"]));
        assert!(is_secret_path(&[
            "worker",
            "http",
            "hook",
            "headers",
            "authorization"
        ]));
        assert!(!is_secret_path(&["keys", "file"]));
        assert!(!is_secret_path(&["worker", "http", "hook", "url"]));
    }

    #[test]
    fn classify_generic_and_aliases() {
        assert!(
            matches!(classify("DROVER_NATS_URL"), Ok(EnvName::Setting(p)) if p == ["nats", "url"])
        );
        assert!(
            matches!(classify("DROVER_DISPATCHER__MAX_BATCH"), Ok(EnvName::Setting(p)) if p == ["dispatcher", "max_batch"])
        );
        assert!(matches!(classify("DROVER_NATS_ULR"), Ok(EnvName::Unknown)));
        assert!(matches!(classify("DROVER_CONFIG"), Ok(EnvName::NotSetting)));
        assert!(matches!(classify("HOME"), Ok(EnvName::NotSetting)));
        assert!(classify("DROVER_A____B").is_err());
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("abc", 0), (1, 1));
    }
}
