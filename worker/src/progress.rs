//! [`TaskContext::progress`](crate::TaskContext::progress) (SPEC §6.1): the latest fraction a
//! running attempt reported, written best-effort into its task record as `meta.progress` (text,
//! `"0.420"`), so `drover status`, `nats kv get drover-tasks <id>` and anyone watching the key see
//! it. The record stays the one place a task is observed (SPEC §1.2); nothing else is added.
//!
//! Rate limited per attempt by the pure [`Limiter`]: at most one write per [`MIN_INTERVAL`],
//! only when the value (in thousandths) changed, and the final `1.0` regardless of the interval
//! (a report made while the previous write is still retrying is dropped). Each write is a
//! compare-and-set on the revision just read, made only while the record says `running` for
//! this attempt, so it can never overwrite a terminal record the leader wrote meanwhile; it is
//! retried briefly while the `running` record is still on its way (with `tracking = "terminal"`
//! there is none, and progress stays a metric). The leader builds the terminal record from the
//! task (`drover_shared::outcome::decide`), so `meta.progress` shows while the attempt runs and
//! is gone once it ended: the terminal state says more.

use async_nats::jetstream::kv;
use drover_shared::ops::Counter;
use drover_shared::task::{TaskRecord, TaskState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::debug;

/// Shortest time between two progress writes of one attempt.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// Key in the record's `meta` holding the progress.
pub const META_KEY: &str = "progress";

/// Which progress reports of one attempt are written.
#[derive(Debug, Clone, Default)]
pub struct Limiter {
    /// The last written value (thousandths) and when.
    last: Option<(Instant, u32)>,
}

impl Limiter {
    /// A report of `fraction` at `now`: `Some(thousandths)` when it is to be written.
    pub fn admit(&mut self, fraction: f64, now: Instant) -> Option<u32> {
        let value = (fraction.clamp(0.0, 1.0) * 1000.0).round() as u32;
        let write = match self.last {
            None => true,
            Some((_, v)) if v == value => false,
            Some(_) if value == 1000 => true,
            Some((at, _)) => now.duration_since(at) >= MIN_INTERVAL,
        };
        if write {
            self.last = Some((now, value));
            Some(value)
        } else {
            None
        }
    }
}

/// `thousandths` as the text stored in `meta.progress`.
pub fn format(thousandths: u32) -> String {
    format!("{}.{:03}", thousandths / 1000, thousandths % 1000)
}

/// The progress sink of one attempt: counts every report in `counter` and writes the admitted
/// ones into the record of `id` in `tasks`.
pub fn sink(tasks: kv::Store, counter: Counter, attempt: u32) -> crate::handler::ProgressSink {
    let limiter = Mutex::new(Limiter::default());
    let writing = Arc::new(AtomicBool::new(false));
    Arc::new(move |id: &str, fraction: f64| {
        counter.inc();
        let admitted = limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(fraction, Instant::now());
        let Some(value) = admitted else { return };
        // One write at a time per attempt; a report arriving meanwhile is dropped.
        if writing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tasks, id, writing) = (tasks.clone(), id.to_owned(), writing.clone());
        tokio::spawn(async move {
            if let Err(e) = write(&tasks, &id, attempt, value).await {
                debug!(task_id = %id, error = %e, "progress not recorded");
            }
            writing.store(false, Ordering::Release);
        });
    })
}

/// Tries to write one report this often at most: the `running` record is itself written
/// best-effort just before the handler starts, so the first report can race it.
const TRIES: u32 = 10;

/// Pause between two tries.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// Writes `meta.progress` into the record of `id` while it says `running` for `attempt`;
/// retries shortly while the `running` write is still on its way or won a race.
async fn write(tasks: &kv::Store, id: &str, attempt: u32, value: u32) -> Result<(), String> {
    let mut why = String::new();
    for _ in 0..TRIES {
        let entry = tasks
            .entry(id)
            .await
            .map_err(|e| e.to_string())?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or("no record")?;
        let mut record: TaskRecord =
            serde_json::from_slice(&entry.value).map_err(|e| e.to_string())?;
        if record.state.is_terminal() || record.attempt > attempt {
            return Err(format!(
                "record is {:?}, attempt {}",
                record.state, record.attempt
            ));
        }
        if record.state == TaskState::Running && record.attempt == attempt {
            record.meta.insert(META_KEY.to_owned(), format(value));
            let body = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
            match tasks.update(id, body.into(), entry.revision).await {
                Ok(_) => return Ok(()),
                Err(e) => why = e.to_string(),
            }
        } else {
            why = format!("record not running yet ({:?})", record.state);
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_report_is_written_then_at_most_every_interval() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        assert_eq!(l.admit(0.1, t0), Some(100));
        assert_eq!(l.admit(0.2, t0 + Duration::from_millis(100)), None);
        assert_eq!(l.admit(0.3, t0 + MIN_INTERVAL), Some(300));
        assert_eq!(
            l.admit(0.4, t0 + MIN_INTERVAL + Duration::from_millis(1)),
            None
        );
    }

    #[test]
    fn unchanged_values_are_not_written_and_the_end_always_is() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        assert_eq!(l.admit(0.5, t0), Some(500));
        assert_eq!(
            l.admit(0.5001, t0 + Duration::from_secs(5)),
            None,
            "same thousandth"
        );
        assert_eq!(l.admit(1.0, t0 + Duration::from_millis(1)), Some(1000));
        assert_eq!(l.admit(1.0, t0 + Duration::from_secs(9)), None);
    }

    #[test]
    fn out_of_range_values_are_clamped_and_formatted() {
        let mut l = Limiter::default();
        assert_eq!(l.admit(7.0, Instant::now()), Some(1000));
        assert_eq!(format(1000), "1.000");
        assert_eq!(format(420), "0.420");
        assert_eq!(format(5), "0.005");
        assert_eq!(Limiter::default().admit(-1.0, Instant::now()), Some(0));
    }
}
