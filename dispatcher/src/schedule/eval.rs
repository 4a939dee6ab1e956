//! The leader's schedule evaluator (SPEC §1.4), one per leader term.
//!
//! * Watches `drover-schedules` with history, and for each schedule reads `cron.<id>` from
//!   `drover-state`: the last fire time handled, so a new leader continues where the old one
//!   stopped.
//! * Sleeps until the earliest next fire instant (no polling), then per due schedule asks the
//!   pure [`plan_fires`] which fire times to run (misfire policy after downtime), publishes each
//!   run into the intake and only then advances `cron.<id>` by compare-and-set. Fire times are
//!   counted from the later of `cron.<id>` and the time the schedule was last written, so a new,
//!   edited or resumed schedule does not catch up on times before that write.
//! * `overlap: skip` skips a fire while the record of the schedule's previous run is not
//!   terminal (a run whose record is not there yet counts as not finished for
//!   [`PENDING_WITHOUT_RECORD`]).
//! * Consumes `DROVER_TRIGGERS` (durable consumer) once the schedules are loaded: each message
//!   makes one task per schedule with that `trigger_subject` (id `trig-<schedule>-<stream seq>`,
//!   payload: the message), acked after the PubAcks of those tasks. A message no schedule claims
//!   is retried a few times (its schedule may be arriving on the watch) and then dropped with a
//!   warning. The stream's subject list is kept a superset of the schedules' trigger subjects.

use super::{ScheduleError, submit_run, sync_trigger_subjects};
use crate::leader::LeaderContext;
use crate::records::Records;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv};
use chrono::{DateTime, Utc};
use drover_shared::cron::{CronExpr, CronState, Overlap, Schedule, plan_fires};
use drover_shared::task::format_time;
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a run without a record yet counts as not finished (for `overlap: skip`).
pub const PENDING_WITHOUT_RECORD: chrono::TimeDelta = chrono::TimeDelta::minutes(10);
/// Deliveries of a trigger message no schedule claims before it is dropped.
pub const UNCLAIMED_DELIVERIES: i64 = 5;
/// Delay before a failed fire or a lost watch is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// One schedule as the evaluator tracks it.
struct Tracked {
    schedule: Schedule,
    expr: Option<CronExpr>,
    /// When the schedule was last written (its KV entry's time).
    written: DateTime<Utc>,
    state: Option<CronState>,
    /// Revision of `cron.<id>`; 0 when the key does not exist.
    state_rev: u64,
    /// The next instant to evaluate at (`None`: never, e.g. paused or event-triggered).
    next: Option<DateTime<Utc>>,
}

impl Tracked {
    /// Fire times after this instant are still to be handled.
    fn from(&self) -> DateTime<Utc> {
        let last = self
            .state
            .as_ref()
            .and_then(|s| DateTime::from_timestamp(s.last_fire, 0));
        last.map_or(self.written, |l| l.max(self.written))
    }

    fn plan_next(&mut self) {
        self.next = match (&self.expr, self.schedule.paused) {
            (Some(expr), false) => expr.next_after(self.from()),
            _ => None,
        };
    }
}

/// The buckets and streams the evaluator works on.
struct Evaluator {
    ctx: LeaderContext,
    state_kv: kv::Store,
    records: Records,
    tracked: HashMap<String, Tracked>,
}

fn state_key(id: &str) -> String {
    format!("cron.{id}")
}

/// Runs the evaluator until `cancel` fires.
pub async fn run(
    ctx: LeaderContext,
    epoch: u64,
    cancel: CancellationToken,
) -> Result<(), ScheduleError> {
    let names = ctx.names.clone();
    let schedules_kv = ctx
        .js
        .get_key_value(names.bucket("schedules"))
        .await
        .map_err(|e| ScheduleError::nats("open the schedule bucket", e))?;
    let state_kv = ctx
        .js
        .get_key_value(names.bucket("state"))
        .await
        .map_err(|e| ScheduleError::nats("open the state bucket", e))?;
    let records = Records::open(&ctx.js, &names)
        .await
        .map_err(|e| ScheduleError::nats("open task records", e))?;
    let mut ev = Evaluator {
        ctx,
        state_kv,
        records,
        tracked: HashMap::new(),
    };
    info!(epoch, "leading: evaluating schedules");
    while !cancel.is_cancelled() {
        if let Err(e) = ev.watch_and_fire(&schedules_kv, &cancel).await {
            warn!(error = %e, "schedule evaluation interrupted; starting over");
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }
    Ok(())
}

impl Evaluator {
    /// One watch of the schedules, with the timer and the trigger consumer beside it, until the
    /// watch fails or `cancel` fires.
    async fn watch_and_fire(
        &mut self,
        schedules_kv: &kv::Store,
        cancel: &CancellationToken,
    ) -> Result<(), ScheduleError> {
        let names = self.ctx.names.clone();
        let pending = self
            .ctx
            .js
            .get_stream(format!("KV_{}", names.bucket("schedules")))
            .await
            .map_err(|e| ScheduleError::nats("open the schedule stream", e))?
            .cached_info()
            .state
            .messages;
        let mut watch = schedules_kv
            .watch_with_history(">")
            .await
            .map_err(|e| ScheduleError::nats("watch schedules", e))?;
        self.tracked.clear();
        let mut synced = pending == 0;
        let mut subjects_dirty = true;
        let mut triggers = None;
        loop {
            if synced && subjects_dirty {
                let subjects: BTreeSet<String> = self
                    .tracked
                    .values()
                    .filter_map(|t| t.schedule.trigger_subject.clone())
                    .collect();
                if let Err(e) = sync_trigger_subjects(&self.ctx.js, &names, &subjects, false).await
                {
                    warn!(error = %e, "cannot update the trigger stream's subjects");
                }
                subjects_dirty = false;
            }
            if synced && triggers.is_none() {
                triggers = Some(self.open_triggers().await?);
            }
            let wake = self.tracked.values().filter_map(|t| t.next).min();
            let sleep = wake.map(|w| (w - Utc::now()).to_std().unwrap_or(Duration::ZERO));
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = async { tokio::time::sleep(sleep.unwrap_or_default()).await },
                    if synced && sleep.is_some() => {
                    self.fire_due().await;
                }
                item = watch.next() => {
                    let entry = match item {
                        Some(Ok(entry)) => entry,
                        Some(Err(e)) => return Err(ScheduleError::nats("watch schedules", e)),
                        None => return Err(ScheduleError::nats("watch schedules", "the watch ended")),
                    };
                    if entry.delta == 0 {
                        synced = true;
                    }
                    subjects_dirty |= self.on_entry(entry).await;
                }
                msg = async {
                    match triggers.as_mut() {
                        Some(t) => t.next().await,
                        None => std::future::pending().await,
                    }
                } => match msg {
                    Some(Ok(msg)) => self.on_trigger(msg).await,
                    Some(Err(e)) => debug!(error = %e, "trigger pull"),
                    None => triggers = None,
                },
            }
        }
    }

    async fn open_triggers(&self) -> Result<jetstream::consumer::pull::Stream, ScheduleError> {
        let names = &self.ctx.names;
        let consumer: PullConsumer = self
            .ctx
            .js
            .get_stream(names.triggers_stream())
            .await
            .map_err(|e| ScheduleError::nats("open the trigger stream", e))?
            .get_consumer(&names.triggers_consumer())
            .await
            .map_err(|e| ScheduleError::nats("open the trigger consumer", e))?;
        consumer
            .stream()
            .max_messages_per_batch(64)
            .expires(Duration::from_secs(1))
            .heartbeat(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| ScheduleError::nats("pull triggers", e))
    }

    /// Applies one schedule change; returns `true` when trigger subjects may have changed.
    async fn on_entry(&mut self, entry: kv::Entry) -> bool {
        let id = entry.key.clone();
        if entry.operation != kv::Operation::Put {
            let was = self.tracked.remove(&id);
            debug!(schedule = %id, "schedule removed");
            return was.is_some_and(|t| t.schedule.trigger_subject.is_some());
        }
        let schedule: Schedule = match serde_json::from_slice(&entry.value) {
            Ok(s) => s,
            Err(e) => {
                warn!(schedule = %id, error = %e, "unreadable schedule; ignored");
                self.tracked.remove(&id);
                return false;
            }
        };
        let expr = match schedule.expr() {
            Ok(e) => e,
            Err(e) => {
                warn!(schedule = %id, error = %e, "invalid schedule; ignored");
                self.tracked.remove(&id);
                return false;
            }
        };
        let nanos = i64::try_from(entry.created.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let written = DateTime::from_timestamp_nanos(nanos);
        let (state, state_rev) = self.read_state(&id).await;
        let has_trigger = schedule.trigger_subject.is_some();
        let mut t = Tracked {
            schedule,
            expr,
            written,
            state,
            state_rev,
            next: None,
        };
        t.plan_next();
        debug!(schedule = %id, next = ?t.next, "schedule loaded");
        let old = self.tracked.insert(id, t);
        has_trigger || old.is_some_and(|o| o.schedule.trigger_subject.is_some())
    }

    async fn read_state(&self, id: &str) -> (Option<CronState>, u64) {
        match self.state_kv.entry(state_key(id)).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice(&e.value).ok(), e.revision)
            }
            Ok(Some(e)) => (None, e.revision),
            Ok(None) => (None, 0),
            Err(e) => {
                warn!(schedule = %id, error = %e, "cannot read the schedule's state; starting from its write time");
                (None, 0)
            }
        }
    }

    /// Fires every schedule whose next instant has come.
    async fn fire_due(&mut self) {
        let now = Utc::now();
        let due: Vec<String> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.next.is_some_and(|n| n <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Err(e) = self.fire(&id).await {
                warn!(schedule = %id, error = %e, "firing failed; trying again shortly");
                if let Some(t) = self.tracked.get_mut(&id) {
                    t.next = Some(Utc::now() + RETRY);
                }
            }
        }
    }

    async fn fire(&mut self, id: &str) -> Result<(), ScheduleError> {
        let now = Utc::now();
        let Some(t) = self.tracked.get(id) else {
            return Ok(());
        };
        let Some(expr) = &t.expr else { return Ok(()) };
        let plan = plan_fires(
            expr,
            t.schedule.misfire,
            t.schedule.catch_up_limit,
            t.from(),
            now,
        );
        if plan.missed > 0 {
            info!(schedule = %id, missed = plan.missed, policy = ?t.schedule.misfire, "fire times missed");
        }
        let schedule = t.schedule.clone();
        for fire in plan.fires {
            let previous = self.tracked.get(id).and_then(|t| t.state.clone());
            let state = if schedule.overlap == Overlap::Skip
                && self.previous_unfinished(previous.as_ref(), now).await
            {
                info!(schedule = %id, fire = %format_time(&fire), "previous run not finished; fire skipped");
                CronState {
                    last_fire: fire.timestamp(),
                    ..previous.unwrap_or(CronState {
                        last_fire: 0,
                        last_task: None,
                        last_run_at: None,
                    })
                }
            } else {
                let task_id = schedule.fire_task_id(fire);
                let duplicate =
                    submit_run(&self.ctx.js, &self.ctx.names, &schedule, &task_id, None).await?;
                debug!(schedule = %id, task_id = %task_id, duplicate, "fired");
                CronState {
                    last_fire: fire.timestamp(),
                    last_task: Some(task_id),
                    last_run_at: Some(format_time(&Utc::now())),
                }
            };
            self.write_state(id, state).await?;
        }
        if let Some(to) = plan.advance_to {
            let handled = self
                .tracked
                .get(id)
                .and_then(|t| t.state.as_ref())
                .map(|s| s.last_fire);
            if handled.is_none_or(|h| h < to.timestamp()) {
                let mut state = self
                    .tracked
                    .get(id)
                    .and_then(|t| t.state.clone())
                    .unwrap_or(CronState {
                        last_fire: 0,
                        last_task: None,
                        last_run_at: None,
                    });
                state.last_fire = to.timestamp();
                self.write_state(id, state).await?;
            }
        }
        if let Some(t) = self.tracked.get_mut(id) {
            t.plan_next();
        }
        Ok(())
    }

    /// `true` while the previous run of a schedule has not reached a terminal state.
    async fn previous_unfinished(&self, previous: Option<&CronState>, now: DateTime<Utc>) -> bool {
        let Some(task) = previous.and_then(|p| p.last_task.as_deref()) else {
            return false;
        };
        match self.records.read(task).await {
            Ok(current) => match current.record {
                Some(r) => !r.state.is_terminal(),
                None => previous
                    .and_then(|p| p.last_run_at.as_deref())
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|at| now - at.with_timezone(&Utc) < PENDING_WITHOUT_RECORD),
            },
            Err(e) => {
                warn!(task_id = %task, error = %e, "cannot read the previous run; assuming it is running");
                true
            }
        }
    }

    /// Writes `cron.<id>` over the revision last seen; on a conflict (another leader wrote it)
    /// adopts what is stored.
    async fn write_state(&mut self, id: &str, state: CronState) -> Result<(), ScheduleError> {
        let Some(rev) = self.tracked.get(id).map(|t| t.state_rev) else {
            return Ok(());
        };
        let body = serde_json::to_vec(&state)
            .map_err(|e| ScheduleError::nats("encode schedule state", e))?;
        let key = state_key(id);
        let written = if rev == 0 {
            self.state_kv.create(&key, body.into()).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            })
        } else {
            self.state_kv
                .update(&key, body.into(), rev)
                .await
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                })
        };
        match written {
            Ok(revision) => {
                if let Some(t) = self.tracked.get_mut(id) {
                    t.state = Some(state);
                    t.state_rev = revision;
                }
                Ok(())
            }
            Err((true, _)) => {
                let (stored, revision) = self.read_state(id).await;
                warn!(schedule = %id, "schedule state written by another leader; adopting it");
                if let Some(t) = self.tracked.get_mut(id) {
                    t.state = stored;
                    t.state_rev = revision;
                }
                Ok(())
            }
            Err((false, e)) => Err(ScheduleError::nats("write schedule state", e)),
        }
    }

    /// Turns one trigger message into one task per schedule claiming its subject.
    async fn on_trigger(&self, msg: jetstream::Message) {
        let (seq, delivered) = msg
            .info()
            .map_or((0, 1), |i| (i.stream_sequence, i.delivered));
        let subject = msg.subject.as_str();
        let claiming: Vec<&Schedule> = self
            .tracked
            .values()
            .map(|t| &t.schedule)
            .filter(|s| s.trigger_subject.as_deref() == Some(subject))
            .collect();
        if claiming.is_empty() {
            if delivered < UNCLAIMED_DELIVERIES {
                let _ = msg.ack_with(AckKind::Nak(Some(RETRY))).await;
            } else {
                warn!(%subject, seq, "no schedule has this trigger subject; message dropped");
                let _ = msg.ack().await;
            }
            return;
        }
        for s in claiming {
            if s.paused {
                debug!(schedule = %s.id, seq, "paused; trigger message not run");
                continue;
            }
            let task_id = s.trigger_task_id(seq);
            if let Err(e) = submit_run(
                &self.ctx.js,
                &self.ctx.names,
                s,
                &task_id,
                Some(&msg.payload),
            )
            .await
            {
                warn!(schedule = %s.id, error = %e, "cannot submit a triggered run; redelivering");
                let _ = msg.ack_with(AckKind::Nak(Some(RETRY))).await;
                return;
            }
            debug!(schedule = %s.id, task_id = %task_id, "triggered");
        }
        if let Err(e) = msg.double_ack().await {
            debug!(error = %e, "trigger ack");
        }
    }
}
