//! The leader's dependency actor: one task per leadership term owning the in-memory
//! [`Index`] of held tasks. It is rebuilt from the `held.*` entries when the term starts, learns
//! of new held tasks from the intake, of terminal records from the outcome handler and of
//! cancels from `<prefix>.ctl.cancel.>`, releases children whose parents all succeeded through
//! its own dispatch [`Pipeline`], and marks the dependents of a failed parent `upstream_failed`,
//! transitively.
//!
//! Events are handled one at a time, in order, so a child held by the intake before its
//! parent's outcome is recorded is always either found by that outcome or sees the parent's
//! success itself when it is checked.

use super::plan::{self, Index, Parent, Readiness};
use super::shards;
use super::store::{HELD_PREFIX, HeldEntry, held_key, shards_of};
use crate::intake::Scheduling;
use crate::leader::{LeaderContext, Pipeline, Routed};
use crate::records::{CAS_ATTEMPTS, Records, WriteError};
use async_nats::jetstream::kv;
use drover_shared::task::{Task, TaskRecord, TaskState};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a release whose dispatch failed waits before it is tried again.
const RELEASE_RETRY: Duration = Duration::from_millis(500);
/// Held children checked (parents read, released) together.
const CHECK_CHUNK: usize = 256;

/// What the actor is told.
#[derive(Debug)]
enum Event {
    /// The intake held `id` until `parents` succeed.
    Held { id: String, parents: Vec<String> },
    /// `id`'s record became terminal in `state`.
    Finished { id: String, state: TaskState },
    /// A cancel request named `id`.
    Cancelled { id: String },
    /// Check `id` again (after a failed release).
    Recheck { id: String },
}

/// The handle through which the intake and the outcome handler tell the actor of the current
/// term what happened. The default handle (no actor) drops everything: a new leader's rebuild
/// reads the durable state instead.
#[derive(Clone, Debug, Default)]
pub struct Deps {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Deps {
    /// `id` is held until every id of `parents` succeeded.
    pub fn held(&self, id: &str, parents: &[String]) {
        self.send(Event::Held {
            id: id.to_owned(),
            parents: parents.to_vec(),
        });
    }

    /// `id`'s record is now terminal in `state` (ignored for other states).
    pub fn finished(&self, id: &str, state: TaskState) {
        if state.is_terminal() {
            self.send(Event::Finished {
                id: id.to_owned(),
                state,
            });
        }
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event);
        }
    }
}

/// Starts the actor of leadership term `epoch`; it stops when `cancel` fires. `ctx.deps` of the
/// context given is ignored (the actor tells itself directly).
pub fn spawn(ctx: LeaderContext, epoch: u64, cancel: CancellationToken) -> Deps {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Deps { tx: Some(tx) };
    let me = handle.clone();
    tokio::spawn(run(ctx, epoch, cancel, rx, me));
    handle
}

struct Actor {
    ctx: LeaderContext,
    pipeline: Pipeline,
    records: Records,
    state: kv::Store,
    index: Index,
    me: Deps,
}

async fn run(
    ctx: LeaderContext,
    epoch: u64,
    cancel: CancellationToken,
    mut rx: mpsc::UnboundedReceiver<Event>,
    me: Deps,
) {
    // Opening and rebuilding fail while JetStream is briefly unavailable (a node restarting):
    // try again for as long as the term lasts. Events sent meanwhile wait in the channel.
    let mut failures = 0u32;
    let (mut actor, mut cancels) = loop {
        match Actor::open(&ctx, epoch, me.clone()).await {
            Ok(opened) => break opened,
            Err(e) => {
                failures += 1;
                let delay = crate::supervise::retry_delay(failures);
                warn!(error = %e, retry_in = ?delay, "dependency actor cannot start; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            e = rx.recv() => match e {
                Some(e) => actor.handle(e).await,
                None => break,
            },
            m = cancels.next() => match m {
                Some(m) => {
                    let id = m.subject.as_str().rsplit('.').next().unwrap_or_default().to_owned();
                    actor.handle(Event::Cancelled { id }).await;
                }
                None => break,
            },
        }
    }
}

impl Actor {
    /// Opens the buckets and the cancel subscription and rebuilds the index from the `held.*`
    /// entries.
    async fn open(
        ctx: &LeaderContext,
        epoch: u64,
        me: Deps,
    ) -> Result<(Self, async_nats::Subscriber), String> {
        let records = Records::open(&ctx.js, &ctx.names).await?;
        let state = ctx
            .js
            .get_key_value(ctx.names.bucket("state"))
            .await
            .map_err(|e| format!("open state bucket: {e}"))?;
        let cancels = ctx
            .js
            .client()
            .subscribe(ctx.names.cancel_subject(">"))
            .await
            .map_err(|e| format!("subscribe to cancels: {e}"))?;
        let mut actor = Actor {
            pipeline: Pipeline::new(ctx.clone(), epoch),
            ctx: ctx.clone(),
            records,
            state,
            index: Index::default(),
            me,
        };
        actor.rebuild().await?;
        Ok((actor, cancels))
    }

    /// Loads every `held.*` entry into the index, then checks each against its parents (which
    /// may have finished while no leader was there to notice).
    async fn rebuild(&mut self) -> Result<(), String> {
        let mut keys = self
            .state
            .keys()
            .await
            .map_err(|e| format!("list held tasks: {e}"))?;
        let mut held = Vec::new();
        while let Some(k) = keys.next().await {
            match k {
                Ok(k) if k.starts_with(HELD_PREFIX) => held.push(k),
                Ok(_) => {}
                Err(e) => return Err(format!("list held tasks: {e}")),
            }
        }
        for key in &held {
            match self.state.get(key).await {
                Ok(Some(v)) => match HeldEntry::parse(&v) {
                    Ok(e) => {
                        self.index.hold(&e.id, &e.parents);
                    }
                    Err(e) => warn!(%key, error = %e, "unreadable held entry ignored"),
                },
                Ok(None) => {}
                Err(e) => return Err(format!("read {key}: {e}")),
            }
        }
        info!(held = self.index.len(), "dependency index rebuilt");
        let ids: Vec<String> = held
            .iter()
            .filter_map(|k| k.strip_prefix(HELD_PREFIX).map(str::to_owned))
            .collect();
        self.check_many(ids).await;
        Ok(())
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Held { id, parents } => {
                self.index.hold(&id, &parents);
                self.check_many(vec![id]).await;
            }
            Event::Recheck { id } => self.check_many(vec![id]).await,
            Event::Finished { id, state } => self.finished(id, state).await,
            Event::Cancelled { id } => match self.records.read(&id).await {
                Ok(c) => {
                    if let Some(r) = c.record.filter(|r| r.state.is_terminal()) {
                        self.finished(id, r.state).await;
                    }
                }
                Err(e) => warn!(task_id = %id, error = %e, "cannot read a cancelled task"),
            },
        }
    }

    /// `id` ended in `state`: forget it if it was held, release or fail its children.
    async fn finished(&mut self, id: String, state: TaskState) {
        let mut work = vec![(id, state)];
        while let Some((id, state)) = work.pop() {
            if self.index.remove(&id).is_some() {
                self.drop_entry(&id).await;
            }
            let children = self.index.children_of(&id);
            if state == TaskState::Succeeded {
                // All children at once: their checks, claims and one dispatch overlap, so the
                // last of a fan-out does not wait for its siblings' round trips.
                self.check_many(children).await;
            } else {
                for child in children {
                    if let Some(done) = self.fail(&child, &id, state).await {
                        work.push(done);
                    }
                }
            }
        }
    }

    /// Reads the parents of held `children` (concurrently, [`CHECK_CHUNK`] children at a time)
    /// and releases or fails each child when they decide it; the ready ones are released
    /// together ([`Self::release_many`]).
    async fn check_many(&mut self, children: Vec<String>) {
        for chunk in children.chunks(CHECK_CHUNK) {
            let jobs: Vec<(&String, Vec<String>)> = chunk
                .iter()
                .filter_map(|c| self.index.parents_of(c).map(|p| (c, p.to_vec())))
                .collect();
            let reads = jobs.iter().map(|(_, parents)| {
                futures::future::try_join_all(parents.iter().map(|p| self.records.read(p)))
            });
            let results = futures::future::join_all(reads).await;
            let mut ready = Vec::new();
            let mut blocked = Vec::new();
            for ((child, parents), states) in jobs.into_iter().zip(results) {
                let states = match states {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(task_id = %child, error = %e, "cannot read dependencies; checked again later");
                        self.recheck_later(child);
                        continue;
                    }
                };
                // No record while a child is held: not written yet (`tracking = "terminal"` or
                // a parent of the same chunk) — it exists, it was checked at intake.
                let view = parents.iter().zip(&states).map(|(p, c)| {
                    let parent = match c.record.as_ref() {
                        None => Parent::Pending,
                        Some(r) => Parent::of(Some(r)),
                    };
                    (p.as_str(), parent)
                });
                match plan::readiness(view) {
                    Readiness::Wait => {}
                    Readiness::Ready => ready.push(child.clone()),
                    Readiness::Blocked { parent, state } => {
                        blocked.push((child.clone(), parent, state));
                    }
                }
            }
            if !ready.is_empty() {
                self.release_many(ready).await;
            }
            for (child, parent, state) in blocked {
                if let Some((id, state)) = self.fail(&child, &parent, state).await {
                    Box::pin(self.finished(id, state)).await;
                }
            }
        }
    }

    fn recheck_later(&self, id: &str) {
        let me = self.me.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(RELEASE_RETRY).await;
            me.send(Event::Recheck { id });
        });
    }

    /// Dispatches held children whose parents all succeeded: per child (concurrently) read the
    /// held entry and claim by `scheduled → queued` (compare-and-set); then route (fan out
    /// shards) and publish them together, then delete the held entries.
    async fn release_many(&mut self, children: Vec<String>) {
        let taken: Vec<(String, Vec<String>)> = children
            .into_iter()
            .filter_map(|c| self.index.remove(&c).map(|p| (c, p)))
            .collect();
        let prepared =
            futures::future::join_all(taken.iter().map(|(c, _)| self.prepare_release(c))).await;
        let mut go: Vec<(String, Vec<String>, HeldEntry, Task)> = Vec::new();
        let mut ended = Vec::new();
        for ((child, parents), prep) in taken.into_iter().zip(prepared) {
            match prep {
                Prepared::Go(entry, task) => go.push((child, parents, *entry, *task)),
                Prepared::Skip => {}
                Prepared::Ended(state) => {
                    self.drop_entry(&child).await;
                    if state.is_terminal() && state != TaskState::Succeeded {
                        ended.push((child, state));
                    }
                }
                Prepared::Later(why, e) => {
                    warn!(task_id = %child, error = %e, "{why}; checked again later");
                    self.index.hold(&child, &parents);
                    self.recheck_later(&child);
                }
            }
        }
        let mut scheduling = HashMap::new();
        let mut routed = Vec::with_capacity(go.len());
        let mut sent = Vec::with_capacity(go.len());
        for (child, parents, entry, task) in go {
            let partition = match self.pipeline.route(&task).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(task_id = %child, error = %e, "cannot route a released task; checked again later");
                    self.index.hold(&child, &parents);
                    self.recheck_later(&child);
                    continue;
                }
            };
            scheduling.insert(
                task.id.clone(),
                Scheduling {
                    depends_on: Vec::new(),
                    shards: shards_of(entry.shards),
                },
            );
            routed.push(Routed {
                task,
                from: sent.len(),
                partition,
            });
            sent.push((child, parents));
        }
        if !routed.is_empty() {
            let routed = shards::expand(&mut self.pipeline, routed, &scheduling).await;
            let failed = self.pipeline.send(routed).await;
            let mut released = Vec::new();
            for (i, (child, parents)) in sent.into_iter().enumerate() {
                if failed.contains(&i) {
                    warn!(task_id = %child, "released task not dispatched; checked again later");
                    self.index.hold(&child, &parents);
                    self.recheck_later(&child);
                } else {
                    self.ctx.metrics.deps_released.inc();
                    debug!(task_id = %child, "dependencies succeeded; dispatched");
                    released.push(child);
                }
            }
            futures::future::join_all(released.iter().map(|c| self.drop_entry(c))).await;
        }
        for (child, state) in ended {
            Box::pin(self.finished(child, state)).await;
        }
    }

    /// The held entry of `child`, opened, and the claim of its record.
    async fn prepare_release(&self, child: &str) -> Prepared {
        let entry = match self.state.get(held_key(child)).await {
            Ok(Some(v)) => match HeldEntry::parse(&v) {
                Ok(e) => e,
                Err(e) => {
                    warn!(task_id = %child, error = %e, "held entry unusable; dropped");
                    return Prepared::Skip;
                }
            },
            Ok(None) => return Prepared::Skip,
            Err(e) => return Prepared::Later("cannot read held entry", e.to_string()),
        };
        let task = match entry.open(&self.ctx.keys, &self.ctx.config.codec) {
            Ok(t) => t,
            Err(e) => {
                warn!(task_id = %child, error = %e, "held task does not open; kept for a key rollout");
                return Prepared::Skip;
            }
        };
        match self.claim(child).await {
            Ok(Claim::Go) => Prepared::Go(Box::new(entry), Box::new(task)),
            Ok(Claim::Done(state)) => Prepared::Ended(state),
            Err(e) => Prepared::Later("cannot claim a released task", e),
        }
    }

    /// Moves the child's record from `scheduled` to `queued`. A record already `queued` was
    /// claimed by a leader that died before deleting the entry: dispatch again.
    async fn claim(&self, id: &str) -> Result<Claim, String> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.records.read(id).await?;
            let Some(record) = current.record else {
                return Ok(Claim::Go);
            };
            match record.state {
                TaskState::Scheduled => {
                    let mut next = record.clone();
                    next.state = TaskState::Queued;
                    match self.records.write(id, current.revision, &next).await {
                        Ok(_) => {
                            self.ctx.events.emit(&next);
                            return Ok(Claim::Go);
                        }
                        Err(WriteError::Conflict) => continue,
                        Err(WriteError::Nats(e)) => return Err(e),
                    }
                }
                TaskState::Queued => return Ok(Claim::Go),
                other => return Ok(Claim::Done(other)),
            }
        }
        Err(format!("the record of {id} kept changing"))
    }

    /// Records a held child `upstream_failed` because `parent` ended in `state`. Returns the
    /// child's own end, for its dependents, when it changed.
    async fn fail(
        &mut self,
        child: &str,
        parent: &str,
        state: TaskState,
    ) -> Option<(String, TaskState)> {
        let parents = self.index.remove(child)?;
        for _ in 0..CAS_ATTEMPTS {
            let current = match self.records.read(child).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(task_id = %child, error = %e, "cannot read a blocked task; checked again later");
                    self.index.hold(child, &parents);
                    self.recheck_later(child);
                    return None;
                }
            };
            let base = match current.record {
                Some(r) if r.state.is_terminal() => {
                    self.drop_entry(child).await;
                    return Some((child.to_owned(), r.state));
                }
                Some(r) => r,
                None => match self.entry_record(child).await {
                    Some(r) => r,
                    None => {
                        self.drop_entry(child).await;
                        return None;
                    }
                },
            };
            let record = plan::upstream_failed(base, parent, state, chrono::Utc::now());
            match self.records.write(child, current.revision, &record).await {
                Ok(_) => {
                    info!(task_id = %child, %parent, "upstream_failed");
                    self.ctx.metrics.deps_upstream_failed.inc();
                    self.ctx.events.emit(&record);
                    self.drop_entry(child).await;
                    return Some((child.to_owned(), TaskState::UpstreamFailed));
                }
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Nats(e)) => {
                    warn!(task_id = %child, error = %e, "cannot write upstream_failed; checked again later");
                    self.index.hold(child, &parents);
                    self.recheck_later(child);
                    return None;
                }
            }
        }
        self.index.hold(child, &parents);
        self.recheck_later(child);
        None
    }

    /// A record for a held task whose record is gone (expired): from its sealed task.
    async fn entry_record(&self, id: &str) -> Option<TaskRecord> {
        let v = self.state.get(held_key(id)).await.ok()??;
        let task = HeldEntry::parse(&v)
            .ok()?
            .open(&self.ctx.keys, &self.ctx.config.codec)
            .ok()?;
        Some(plan::scheduled_record(&task))
    }

    async fn drop_entry(&self, id: &str) {
        if let Err(e) = self.state.purge(held_key(id)).await {
            debug!(task_id = %id, error = %e, "held entry not removed; the next rebuild drops it");
        }
    }
}

enum Claim {
    Go,
    Done(TaskState),
}

/// A held child made ready for dispatch, or why not.
enum Prepared {
    /// Claimed: dispatch it.
    Go(Box<HeldEntry>, Box<Task>),
    /// Nothing to do (no entry, or an entry that cannot be used now).
    Skip,
    /// Its record is already past `scheduled`/`queued`, in this state.
    Ended(TaskState),
    /// A read or write failed: hold it again and check later.
    Later(&'static str, String),
}
