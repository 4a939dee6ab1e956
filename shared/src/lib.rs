//! # drover-shared
//!
//! The protocol core every Drover component and client builds on. Everything here except
//! [`connect`], [`topology`], [`ops`], [`kv_batch`] and [`bench`] is pure: plain functions over bytes and values, no tokio,
//! no NATS.
//!
//! | module | what it holds | SPEC |
//! |---|---|---|
//! | [`names`] | every subject, stream, bucket and consumer name, derived from one prefix | §1–§2 |
//! | [`task`] | the task submission model, its validation, and the task record | §1.1–§1.2 |
//! | [`error`] | the wire error object `{"error":{code,message,field?,index?}}` | §1.5 |
//! | [`keyring`] | key ids and secrets, `DROVER_KEYS` parsing, rotation | §3, §8 |
//! | [`envelope`] | the sealed batch: zstd → AES-256-GCM → HMAC-SHA256, and its verification | §3 |
//! | [`outcome`] | worker → leader outcome messages and the leader's per-outcome decision | §2, §5, §7 |
//! | [`partition`] | key → partition (FNV-1a 32 mod P) | §4 |
//! | [`ring`] | partition → worker: bounded-load consistent hashing | §4 |
//! | [`cron`] | schedules: the schedule object, cron expressions in IANA zones with the DST rules, misfire decisions | §1.4 |
//! | [`retry`] | the retry/backoff policy, jitter passed in | §1.1, §7 |
//! | [`config`] | flags and `DROVER_*` variables common to every binary | §10 |
//! | [`settings`] | layered configuration: defaults → TOML → `DROVER_*` → flags, validation, `--print-config` | §9, §10 |
//! | [`connect`] | NATS adapter: opening the connection | §10 |
//! | [`topology`] | NATS adapter: stream/KV/consumer definitions and idempotent provisioning | §2 |
//! | [`ops`] | I/O adapter: the `/metrics`, `/healthz`, `/readyz` HTTP server, `Health`, the metric registry | §9 |
//! | [`kv_batch`] | NATS adapter: the current entries of many KV keys in one batched direct get | §1.2, §6 |
//! | [`bench`] | NATS adapter for load generation: pipelined publishing, the raw JetStream baseline, percentiles, RSS (`drover bench`, `cargo bench`) | — |

#[cfg(feature = "nats")]
pub mod bench;
pub mod config;
#[cfg(feature = "nats")]
pub mod connect;
pub mod cron;
pub mod envelope;
pub mod error;
pub mod keyring;
#[cfg(feature = "nats")]
pub mod kv_batch;
pub mod names;
#[cfg(feature = "nats")]
pub mod ops;
pub mod outcome;
pub mod partition;
pub mod retry;
pub mod ring;
// Needs `topology::TopologyConfig`, which lives in the NATS adapter module.
#[cfg(feature = "nats")]
pub mod settings;
pub mod task;
#[cfg(feature = "nats")]
pub mod topology;
