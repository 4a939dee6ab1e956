//! Dependencies and workflows (SPEC §1.1 `depends_on`, §1.2 `scheduled`/`upstream_failed`) and
//! sharded broadcast (`shards`): the leader holds a task until its parents succeed, fails it
//! `upstream_failed` when one does not, and fans sharded tasks out over distinct workers.
//!
//! * [`plan`] — pure: readiness of a dependent, what each task of a message comes to, the
//!   in-memory parent → children [`plan::Index`].
//! * [`shards`] — pure shard planning (distinct workers from `assignment.<queue>`) and the
//!   parent's aggregation, plus the fan-out step of the dispatch pipeline.
//! * [`store`] — the held task at rest: key `held.<id>` in `drover-state`, the task sealed with
//!   the envelope codec (queue = task queue, partition 0, epoch = the holding leader's term).
//! * [`intake`] — the intake's two steps: reject a message naming an unknown dependency
//!   (`missing_dependency`), then write `scheduled` records and held entries (or terminal
//!   `upstream_failed` records) before the message is acked.
//! * [`actor`] — one task per leadership term that owns the index: rebuilt from `held.*` when
//!   the term starts, fed by the intake (held), the outcome handler (terminal records) and
//!   `<prefix>.ctl.cancel.>` (cancels); it releases children through its own dispatch pipeline.
//!
//! **Durability.** A held task is durable before its intake message is acked: its `scheduled`
//! record (created with expected sequence 0, the duplicate check) and its `held.<id>` entry. A
//! release claims the child by compare-and-set `scheduled → queued` on its record, dispatches,
//! then deletes the entry; a leader that dies anywhere in between leaves the entry, and the next
//! leader's rebuild re-evaluates it (a record already `queued` is dispatched again — the one
//! duplicate window, SPEC §7). A parent's success or failure is noticed through the outcome
//! path or, after a failover, by the rebuild reading every held task's parents.

pub mod actor;
pub mod intake;
pub mod plan;
pub mod shards;
pub mod store;

pub use actor::{Deps, spawn};
