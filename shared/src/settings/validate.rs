//! The rules a merged configuration must keep, field by field and across fields. Every broken
//! rule becomes a [`Violation`] naming the field path, the rule and the value (never a secret),
//! and all of them are reported at once.

use std::fmt::Display;
use std::ops::RangeInclusive;

use super::Settings;
use super::error::{SettingsError, Violation};
use super::layers::{Origins, display_path};
use crate::keyring::{KEYS_ENV, Keyring};
use crate::names::{Names, is_valid_queue};
use crate::task::is_valid_type;

/// Most tasks in one envelope.
pub const MAX_BATCH_LIMIT: usize = 4096;
/// Most partitions of one queue (SPEC §4).
pub const MAX_PARTITIONS: u32 = 1024;
/// Environment variables an `exec` handler can never receive.
pub const NEVER_PASSED_ENV: &[&str] = &[KEYS_ENV, "DROVER_PASSWORD"];

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

struct Check<'a> {
    origins: &'a Origins,
    out: Vec<Violation>,
}

impl Check<'_> {
    fn fail(&mut self, path: &[&str], rule: impl Into<String>) {
        self.out.push(Violation {
            path: display_path(path),
            rule: rule.into(),
            origin: self.origins.get(path).map(str::to_owned),
        });
    }

    fn range<T: PartialOrd + Display>(&mut self, path: &[&str], v: T, r: RangeInclusive<T>) {
        if !r.contains(&v) {
            self.fail(
                path,
                format!("must be {}..={}, got {v}", r.start(), r.end()),
            );
        }
    }

    fn at_least<T: PartialOrd + Display>(&mut self, path: &[&str], v: T, min: T) {
        if v < min {
            self.fail(path, format!("must be at least {min}, got {v}"));
        }
    }

    fn byte_limit(&mut self, path: &[&str], v: i64) {
        if v == 0 || v < -1 {
            self.fail(
                path,
                format!("must be -1 (no limit) or a positive size, got {v}"),
            );
        }
    }

    fn not_empty_path(&mut self, path: &[&str], p: Option<&std::path::PathBuf>) {
        if p.is_some_and(|p| p.as_os_str().is_empty()) {
            self.fail(path, "must not be empty (leave it out instead)");
        }
    }
}

impl Settings {
    /// Checks every rule; the error lists all broken ones.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_with(&Origins::default())
    }

    pub(crate) fn validate_with(&self, origins: &Origins) -> Result<(), SettingsError> {
        let mut c = Check {
            origins,
            out: Vec::new(),
        };
        self.check_top(&mut c);
        self.check_nats(&mut c);
        self.check_keys(&mut c);
        self.check_codec_topology(&mut c);
        self.check_dispatcher(&mut c);
        self.check_worker(&mut c);
        self.check_handlers(&mut c);
        self.check_queues(&mut c);
        if c.out.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::Invalid(c.out))
        }
    }

    fn check_top(&self, c: &mut Check<'_>) {
        if let Some(id) = &self.id
            && !is_valid_process_id(id)
        {
            c.fail(
                &["id"],
                format!("must match [A-Za-z0-9_-]{{1,128}}, got {id:?}"),
            );
        }
        if !is_host_port(&self.metrics.addr) {
            c.fail(
                &["metrics", "addr"],
                format!(
                    "must be host:port (port 0 picks one), got {:?}",
                    self.metrics.addr
                ),
            );
        }
        if self.log.level.trim().is_empty() {
            c.fail(&["log", "level"], "must not be empty (e.g. \"info\")");
        }
    }

    fn check_nats(&self, c: &mut Check<'_>) {
        let n = &self.nats;
        if n.url.is_empty() {
            c.fail(&["nats", "url"], "must list at least one server");
        }
        for (i, url) in n.url.iter().enumerate() {
            let item = i + 1;
            if has_userinfo(url) {
                // The URL is not quoted: it holds a password or token.
                c.fail(
                    &["nats", "url"],
                    format!(
                        "server {item} carries credentials (`user:password@`); use nats.user and \
                         nats.password (DROVER_USER, DROVER_PASSWORD) or nats.creds instead"
                    ),
                );
            } else if url.is_empty() || url.contains(char::is_whitespace) {
                c.fail(
                    &["nats", "url"],
                    format!("server {item} is empty or has spaces: {url:?}"),
                );
            } else if let Some((scheme, _)) = url.split_once("://")
                && !matches!(scheme, "nats" | "tls" | "ws" | "wss")
            {
                c.fail(
                    &["nats", "url"],
                    format!(
                        "server {item} has scheme {scheme:?}; use nats://, tls://, ws:// or wss://"
                    ),
                );
            }
        }
        if Names::new(&n.prefix).is_err() {
            c.fail(
                &["nats", "prefix"],
                format!(
                    "must be 1-32 characters from a-z, 0-9, '_' and '-', starting with a letter, got {:?}",
                    n.prefix
                ),
            );
        }
        match (&n.user, &n.password) {
            (Some(_), None) => c.fail(
                &["nats", "user"],
                "needs nats.password (DROVER_PASSWORD) as well",
            ),
            (None, Some(_)) => c.fail(
                &["nats", "password"],
                "needs nats.user (DROVER_USER) as well",
            ),
            _ => {}
        }
        if n.creds.is_some() && (n.user.is_some() || n.password.is_some()) {
            c.fail(
                &["nats", "creds"],
                "excludes nats.user and nats.password: authenticate one way",
            );
        }
        if n.tls_cert.is_some() != n.tls_key.is_some() {
            let path: &[&str] = if n.tls_cert.is_some() {
                &["nats", "tls_cert"]
            } else {
                &["nats", "tls_key"]
            };
            c.fail(
                path,
                "needs both nats.tls_cert and nats.tls_key for mutual TLS",
            );
        }
        c.not_empty_path(&["nats", "creds"], n.creds.as_ref());
        c.not_empty_path(&["nats", "tls_ca"], n.tls_ca.as_ref());
        c.not_empty_path(&["nats", "tls_cert"], n.tls_cert.as_ref());
        c.not_empty_path(&["nats", "tls_key"], n.tls_key.as_ref());
    }

    fn check_keys(&self, c: &mut Check<'_>) {
        let k = &self.keys;
        if k.inline.is_some() && k.file.is_some() {
            c.fail(
                &["keys", "inline"],
                format!("excludes keys.file: give one ({KEYS_ENV} sets keys.inline)"),
            );
        }
        if let Some(inline) = &k.inline
            && let Err(e) = Keyring::parse(inline.expose())
        {
            // Keyring errors name the item and kid, never the secret.
            c.fail(&["keys", "inline"], format!("is not a valid keyring: {e}"));
        }
        c.not_empty_path(&["keys", "file"], k.file.as_ref());
    }

    fn check_codec_topology(&self, c: &mut Check<'_>) {
        c.range(
            &["codec", "level"],
            self.codec.level,
            zstd::compression_level_range(),
        );
        c.range(
            &["codec", "max_decompressed"],
            self.codec.max_decompressed,
            64 * KIB..=1024 * MIB,
        );
        let t = &self.topology;
        c.range(&["topology", "replicas"], t.replicas, 1..=5);
        c.range(&["topology", "lease_ms"], t.lease_ms, 100..=300_000);
        c.range(
            &["topology", "worker_ttl_ms"],
            t.worker_ttl_ms,
            100..=3_600_000,
        );
        c.at_least(
            &["topology", "task_retention_secs"],
            t.task_retention_secs,
            1,
        );
        c.range(
            &["topology", "duplicate_window_ms"],
            t.duplicate_window_ms,
            1..=86_400_000,
        );
        c.byte_limit(&["topology", "submit_max_bytes"], t.submit_max_bytes);
        c.byte_limit(&["topology", "work_max_bytes"], t.work_max_bytes);
        c.byte_limit(&["topology", "events_max_bytes"], t.events_max_bytes);
        c.byte_limit(&["topology", "dlq_max_bytes"], t.dlq_max_bytes);
        c.byte_limit(&["topology", "tasks_max_bytes"], t.tasks_max_bytes);
        c.at_least(
            &["topology", "events_max_age_secs"],
            t.events_max_age_secs,
            1,
        );
        c.at_least(
            &["topology", "intake_max_ack_pending"],
            t.intake_max_ack_pending,
            1,
        );
    }

    fn check_dispatcher(&self, c: &mut Check<'_>) {
        let d = &self.dispatcher;
        let lease = self.topology.lease_ms;
        if d.lease_margin_ms > lease / 2 {
            c.fail(
                &["dispatcher", "lease_margin_ms"],
                format!(
                    "must be at most half of topology.lease_ms ({lease}), got {}: the leader \
                     would step down before it could renew",
                    d.lease_margin_ms
                ),
            );
        }
        c.range(
            &["dispatcher", "max_batch"],
            d.max_batch,
            1..=MAX_BATCH_LIMIT,
        );
        let cap = self.codec.max_decompressed;
        if !(KIB..=cap).contains(&d.max_batch_bytes) {
            c.fail(
                &["dispatcher", "max_batch_bytes"],
                format!(
                    "must be {KIB}..={cap} (up to codec.max_decompressed, or workers could not \
                     open the batch), got {}",
                    d.max_batch_bytes
                ),
            );
        }
        c.range(&["dispatcher", "linger_ms"], d.linger_ms, 0..=1_000);
        let pending =
            usize::try_from(self.topology.intake_max_ack_pending.max(1)).unwrap_or(usize::MAX);
        if !(1..=pending).contains(&d.intake_fetch) {
            c.fail(
                &["dispatcher", "intake_fetch"],
                format!(
                    "must be 1..={pending} (up to topology.intake_max_ack_pending), got {}",
                    d.intake_fetch
                ),
            );
        }
    }

    fn check_worker(&self, c: &mut Check<'_>) {
        let w = &self.worker;
        if w.queues.is_empty() {
            c.fail(&["worker", "queues"], "must name at least one queue");
        }
        for (i, q) in w.queues.iter().enumerate() {
            if !is_valid_queue(q) {
                c.fail(
                    &["worker", "queues"],
                    format!(
                        "queue {} must match [a-z0-9][a-z0-9_-]{{0,63}}, got {q:?}",
                        i + 1
                    ),
                );
            } else if w.queues[..i].contains(q) {
                c.fail(&["worker", "queues"], format!("names {q:?} twice"));
            }
        }
        if let Some(n) = w.concurrency {
            c.range(&["worker", "concurrency"], n, 1..=65_536);
        }
        c.range(&["worker", "capacity"], w.capacity, 1..=1_000);
        c.range(&["worker", "max_redeliveries"], w.max_redeliveries, 1..=100);
        let ttl = self.topology.worker_ttl_ms;
        if w.heartbeat_ms == 0 || w.heartbeat_ms.saturating_mul(2) >= ttl {
            c.fail(
                &["worker", "heartbeat_ms"],
                format!(
                    "must be at least 1 and less than half of topology.worker_ttl_ms ({ttl}), got {}",
                    w.heartbeat_ms
                ),
            );
        } else if w.fence_margin_ms.saturating_add(2 * w.heartbeat_ms) > ttl {
            c.fail(
                &["worker", "fence_margin_ms"],
                format!(
                    "must be at most topology.worker_ttl_ms − 2 × worker.heartbeat_ms ({}), got {}: \
                     a worker would fence itself after a single late heartbeat",
                    ttl - 2 * w.heartbeat_ms,
                    w.fence_margin_ms
                ),
            );
        }
    }

    fn check_handlers(&self, c: &mut Check<'_>) {
        for (ty, h) in &self.worker.exec {
            let at = |field: &'static str| ["worker", "exec", ty.as_str(), field];
            if !is_valid_type(ty) {
                c.fail(
                    &["worker", "exec", ty],
                    "is not a task type: use 1-64 characters from A-Z, a-z, 0-9, '_', '.', ':' and '-'",
                );
            }
            if h.argv.first().is_none_or(String::is_empty) {
                c.fail(
                    &at("argv"),
                    "must name the program to run (e.g. [\"/usr/bin/convert\", \"-\", \"png:-\"])",
                );
            }
            for name in &h.env_allow {
                if NEVER_PASSED_ENV.contains(&name.as_str()) {
                    c.fail(
                        &at("env_allow"),
                        format!("must not pass {name}: it is a secret of the worker"),
                    );
                } else if !is_env_name(name) {
                    c.fail(
                        &at("env_allow"),
                        format!("{name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                    );
                }
            }
            for name in h.env.keys() {
                if NEVER_PASSED_ENV.contains(&name.as_str()) {
                    c.fail(
                        &at("env"),
                        format!(
                            "must not set {name}: the name is reserved for the worker's secrets"
                        ),
                    );
                } else if !is_env_name(name) {
                    c.fail(
                        &at("env"),
                        format!("{name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                    );
                }
            }
            c.at_least(&at("memory_mb"), h.memory_mb, 16);
            if let Some(cpu) = h.cpu_secs {
                c.at_least(&at("cpu_secs"), cpu, 1);
            }
            c.range(&at("timeout_grace_ms"), h.timeout_grace_ms, 0..=600_000);
            c.range(&at("max_output_bytes"), h.max_output_bytes, 1..=64 * MIB);
            c.range(&at("stderr_tail_bytes"), h.stderr_tail_bytes, 0..=64 * KIB);
        }
        for (ty, h) in &self.worker.http {
            let at = |field: &'static str| ["worker", "http", ty.as_str(), field];
            if !is_valid_type(ty) {
                c.fail(
                    &["worker", "http", ty],
                    "is not a task type: use 1-64 characters from A-Z, a-z, 0-9, '_', '.', ':' and '-'",
                );
            }
            if self.worker.exec.contains_key(ty) {
                c.fail(
                    &["worker", "http", ty],
                    format!("is also worker.exec.{ty}: a type has one handler"),
                );
            }
            if has_userinfo(&h.url) {
                c.fail(
                    &at("url"),
                    "carries credentials (`user:password@`); send them in a header instead",
                );
            } else if !(h.url.starts_with("http://") || h.url.starts_with("https://"))
                || h.url.contains(char::is_whitespace)
            {
                c.fail(
                    &at("url"),
                    format!("must be an http:// or https:// URL, got {:?}", h.url),
                );
            }
            c.at_least(&at("timeout_ms"), h.timeout_ms, 1);
            c.range(
                &at("max_response_bytes"),
                h.max_response_bytes,
                1..=64 * MIB,
            );
            for name in h.headers.keys() {
                if !is_header_name(name) {
                    c.fail(&at("headers"), format!("{name:?} is not a header name"));
                }
            }
            c.at_least(
                &["worker", "http", ty, "breaker", "failures"],
                h.breaker.failures,
                1,
            );
            c.at_least(
                &["worker", "http", ty, "breaker", "cooldown_ms"],
                h.breaker.cooldown_ms,
                1,
            );
        }
    }

    fn check_queues(&self, c: &mut Check<'_>) {
        for (name, q) in &self.queues {
            if !is_valid_queue(name) {
                c.fail(
                    &["queues", name],
                    "is not a queue name: must match [a-z0-9][a-z0-9_-]{0,63}",
                );
            }
            c.range(
                &["queues", name, "partitions"],
                q.partitions,
                1..=MAX_PARTITIONS,
            );
            c.at_least(&["queues", name, "timeout_ms"], q.timeout_ms, 1);
            c.range(
                &["queues", name, "max_in_flight"],
                q.max_in_flight,
                1..=1_024,
            );
        }
    }
}

fn is_valid_process_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `host:port` with a numeric port (`127.0.0.1:0`, `[::]:9090`, `metrics.local:9090`).
fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

/// `true` if the URL's authority holds `user@` or `user:password@`.
fn has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An HTTP field name: one or more `tchar` (RFC 9110 §5.6.2).
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
