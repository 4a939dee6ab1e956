//! The task model of SPEC §1.1–§1.2: parsing and validating submissions, assigning ids, checking
//! workflows, the normalized task that travels in envelopes, and the task record kept in
//! `drover-tasks`.
//!
//! Parsing is field by field over raw JSON so that every error names its field and the rule it
//! broke, and so that a task's `payload` passes through byte for byte, never re-encoded.
mod record;
mod spec;
mod workflow;

pub use record::*;
pub use spec::*;
pub use workflow::*;

/// Default total attempts (`max_attempts`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Largest allowed `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Default per-attempt timeout of a queue, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Largest shard count.
pub const MAX_SHARDS: u32 = 1024;
/// Largest `key` and `unique_key`, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Most entries in `depends_on`.
pub const MAX_DEPENDENCIES: usize = 1024;
/// Most entries in `meta`.
pub const MAX_META_ENTRIES: usize = 64;
/// Largest `meta` key, in bytes.
pub const MAX_META_KEY_BYTES: usize = 128;
/// Largest `meta` value, in bytes.
pub const MAX_META_VALUE_BYTES: usize = 1024;

/// Every field a task object may have, in documentation order.
pub const TASK_FIELDS: &[&str] = &[
    "type",
    "payload",
    "id",
    "key",
    "max_attempts",
    "backoff",
    "timeout_ms",
    "run_at",
    "delay_ms",
    "depends_on",
    "shards",
    "unique_key",
    "unique_for_ms",
    "meta",
];

// ---- patterns -----------------------------------------------------------------------------------

/// `true` if `s` matches the task-type pattern `[A-Za-z0-9_.:-]{1,64}`.
pub fn is_valid_type(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// `true` if `s` matches the client id pattern `[A-Za-z0-9][A-Za-z0-9_-]{0,127}`.
///
/// Ids starting with `_` are reserved for generated ones and so are not valid client ids.
pub fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=128).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// `true` if `s` is a valid client id or a generated one (`_` followed by id characters).
pub fn is_valid_any_id(s: &str) -> bool {
    match s.strip_prefix('_') {
        Some(rest) => {
            s.len() <= 160
                && !rest.is_empty()
                && rest
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        }
        None => is_valid_id(s),
    }
}

const ID_RULE: &str = "must match [A-Za-z0-9][A-Za-z0-9_-]{0,127} (ids starting with '_' are reserved for generated ids)";
