//! `<prefix>.api.schedule.{put,delete,pause,resume,trigger}` (SPEC §1.3, §1.4) over
//! `drover-schedules`. Served by every replica in the API's queue group (see `crate::api`).
//!
//! `put` validates the schedule like a submission (its task template goes through the intake's
//! own validation), makes `DROVER_TRIGGERS` capture a trigger subject *before* the schedule is
//! stored (so no message published after the reply is lost), then writes the key. `delete`
//! removes the key, then drops subjects no schedule uses from the trigger stream (its messages
//! stay). `pause`/`resume` rewrite the key by compare-and-set. `trigger` submits one run now,
//! id `cron-<id>-m<unix millis>`, whether or not the schedule is paused.

use super::request::{self, PutReply, StateReply, TriggerReply};
use super::{submit_run, sync_trigger_subjects};
use crate::intake::{self, IntakeLimits};
use async_nats::jetstream::{self, kv};
use drover_shared::cron::Schedule;
use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::names::Names;
use drover_shared::task::format_time;
use futures::TryStreamExt;
use std::collections::BTreeSet;
use tracing::info;

/// Compare-and-set attempts of pause/resume.
const CAS_ATTEMPTS: usize = 5;

/// The schedule endpoints of one replica.
pub(crate) struct ScheduleApi {
    js: jetstream::Context,
    names: Names,
    limits: IntakeLimits,
    kv: kv::Store,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("{what}: {e}; retry the request later"),
    )
}

fn reply<T: serde::Serialize>(r: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(r)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot encode the reply: {e}")))
}

impl ScheduleApi {
    /// Opens `drover-schedules`.
    pub(crate) async fn open(
        js: jetstream::Context,
        names: Names,
        limits: IntakeLimits,
    ) -> Result<Self, String> {
        let bucket = names.bucket("schedules");
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| format!("open {bucket}: {e}"))?;
        Ok(Self {
            js,
            names,
            limits,
            kv,
        })
    }

    /// Answers `op` (the last subject token) with `body`.
    pub(crate) async fn handle(&self, op: &str, body: &[u8]) -> Result<Vec<u8>, ApiError> {
        match op {
            "put" => self.put(body).await,
            "delete" => self.delete(&request::parse_schedule_id(body)?).await,
            "pause" => {
                self.set_paused(&request::parse_schedule_id(body)?, true)
                    .await
            }
            "resume" => {
                self.set_paused(&request::parse_schedule_id(body)?, false)
                    .await
            }
            "trigger" => self.trigger(&request::parse_schedule_id(body)?).await,
            other => Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no such endpoint: schedule.{other}; use schedule.put, delete, pause, resume or trigger"
                ),
            )),
        }
    }

    async fn put(&self, body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let schedule = Schedule::parse(body, self.names.prefix())?;
        // The run must pass the intake exactly as it will be submitted.
        let now = chrono::Utc::now();
        let sample = schedule.task_json(&schedule.manual_task_id(now), None)?;
        intake::prepare(
            &self.names,
            &self.names.submit_subject(&schedule.queue),
            &sample,
            None,
            1,
            now.timestamp_millis(),
            self.limits,
        )
        .map_err(|r| {
            let mut e = r.error;
            e.message = format!("task template: {}", e.message);
            e.field = e.field.map(|f| format!("task.{f}"));
            e.index = None;
            e
        })?;
        if let Some(subject) = &schedule.trigger_subject {
            let one = BTreeSet::from([subject.clone()]);
            sync_trigger_subjects(&self.js, &self.names, &one, false)
                .await
                .map_err(|e| e.to_api())?;
        }
        let value = serde_json::to_vec(&schedule).map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("cannot encode schedule: {e}"))
        })?;
        let existed = self
            .kv
            .entry(&schedule.id)
            .await
            .map_err(|e| unavailable("cannot read the schedule", e))?
            .is_some_and(|e| e.operation == kv::Operation::Put);
        let revision = self
            .kv
            .put(&schedule.id, value.into())
            .await
            .map_err(|e| unavailable("cannot store the schedule", e))?;
        let next_fire = match (schedule.paused, schedule.expr()?) {
            (false, Some(expr)) => expr.next_after(now).map(|t| format_time(&t)),
            _ => None,
        };
        info!(schedule = %schedule.id, created = !existed, "schedule stored");
        reply(&PutReply {
            ok: true,
            id: &schedule.id,
            created: !existed,
            revision,
            next_fire,
        })
    }

    async fn read(&self, id: &str) -> Result<(Schedule, u64), ApiError> {
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(|e| unavailable("cannot read the schedule", e))?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(|| request::not_found(id))?;
        let schedule: Schedule = serde_json::from_slice(&entry.value).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("the stored schedule {id:?} is unreadable: {e}; put it again"),
            )
        })?;
        Ok((schedule, entry.revision))
    }

    async fn delete(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let (schedule, _) = self.read(id).await?;
        self.kv
            .delete(id)
            .await
            .map_err(|e| unavailable("cannot delete the schedule", e))?;
        if schedule.trigger_subject.is_some() {
            let subjects = self.trigger_subjects().await?;
            sync_trigger_subjects(&self.js, &self.names, &subjects, true)
                .await
                .map_err(|e| e.to_api())?;
        }
        info!(schedule = %id, "schedule deleted");
        reply(&StateReply {
            ok: true,
            id,
            paused: None,
            deleted: true,
        })
    }

    /// The trigger subjects of every stored schedule.
    async fn trigger_subjects(&self) -> Result<BTreeSet<String>, ApiError> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| unavailable("cannot list schedules", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("cannot list schedules", e))?;
        let mut out = BTreeSet::new();
        for key in keys {
            if let Ok(Some(v)) = self.kv.get(&key).await
                && let Ok(s) = serde_json::from_slice::<Schedule>(&v)
                && let Some(t) = s.trigger_subject
            {
                out.insert(t);
            }
        }
        Ok(out)
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<Vec<u8>, ApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut schedule, revision) = self.read(id).await?;
            schedule.paused = paused;
            let value = serde_json::to_vec(&schedule).map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("cannot encode schedule: {e}"))
            })?;
            match self.kv.update(id, value.into(), revision).await {
                Ok(_) => {
                    info!(schedule = %id, paused, "schedule updated");
                    return reply(&StateReply {
                        ok: true,
                        id,
                        paused: Some(paused),
                        deleted: false,
                    });
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable("cannot update the schedule", e)),
            }
        }
        Err(unavailable(
            "the schedule kept changing",
            "too many concurrent writers",
        ))
    }

    async fn trigger(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let (schedule, _) = self.read(id).await?;
        let task_id = schedule.manual_task_id(chrono::Utc::now());
        submit_run(&self.js, &self.names, &schedule, &task_id, None)
            .await
            .map_err(|e| e.to_api())?;
        info!(schedule = %id, task_id = %task_id, "schedule triggered by request");
        reply(&TriggerReply {
            ok: true,
            id,
            task_id: &task_id,
            queue: &schedule.queue,
        })
    }
}
