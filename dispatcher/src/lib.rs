//! # drover-dispatcher
//!
//! The dispatcher replica set (SPEC §5): every replica serves the request API and metrics; one,
//! elected through the `drover-election` KV bucket, consumes the intake, batches, seals and
//! publishes envelopes, writes assignments and handles outcomes.
//!
//! Decisions are pure state machines driven by a thin NATS loop:
//!
//! | module | decides |
//! |---|---|
//! | [`assign`] | which worker owns each partition of each queue, and when `assignment.<queue>` is rewritten |
//! | [`election`] | when this replica leads, renews, steps down and hands over |
//! | [`handover`] | when a new leader may dispatch after its predecessor (crash or graceful hand-over) |
//! | [`batcher`] | when a partition's pending tasks leave as one envelope |
//! | [`intake`] | which queue a submission is for, whether it is valid, task ids, partitions |
//! | [`api`] | how each request of the API (§1.3) is answered, on every replica: submit, status, cancel, retry |
//! | [`outcomes`] | what each worker outcome does: retry timer, dead-letter copy, record, event (via `drover_shared::outcome::decide`) |
//! | [`delays`] | delayed tasks' timers (fired ahead, held, dispatched on time) and uniqueness windows |
//! | [`due`] | whether a fired timer's task runs (now, or held until its due instant) |
//! | [`deps`] | when a task with `depends_on` starts or fails upstream, and where shard tasks go |
//! | [`due`] | whether a fired retry timer's task runs again |
//! | [`schedule`] | when cron schedules fire (misfire, overlap, DST) and which task each trigger message makes; the schedule API |
//! | [`provisioning`] | how long a replica waits before provisioning again after a transient failure |
//! | [`load`] | which partition a keyless task of a `least_loaded` queue goes to |
//! | [`events`] | which lifecycle events are published, grouped per queue and state |
//! | [`supervise`] | when a leader role that failed mid-term (JetStream briefly unavailable) starts again |

pub mod api;
pub mod assign;
pub mod batcher;
pub mod delays;
pub mod deps;
pub mod due;
pub mod election;
pub mod events;
pub mod handover;
pub mod intake;
pub mod leader;
pub mod load;
pub mod metrics;
pub mod outcomes;
pub mod provisioning;
pub mod records;
pub mod run;
pub mod schedule;
pub mod supervise;
