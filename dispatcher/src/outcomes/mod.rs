//! The leader's outcome handling (SPEC §5 order of durable steps, §7): consume
//! `DROVER_OUTCOMES`, and for each outcome carry out [`drover_shared::outcome::decide`] —
//! a retry timer on `DROVER_DELAYED`, a dead-letter copy, the `retrying`/terminal record, an
//! event — then ack.
//!
//! Order per outcome: timer or DLQ copy → record (compare-and-set on the revision read) → ack of
//! the message once every outcome in it is done. A crash between any two steps redelivers the
//! message; the decision is idempotent by `(id, attempt)` and the timer and DLQ publishes carry
//! `Nats-Msg-Id`s derived from `(id, attempt, started_ms)`, so a redelivery neither schedules
//! twice nor copies twice (within the stream's duplicate window), while a new series started by
//! `drover.api.retry` (attempts counted from 1 again) gets ids of its own.
//!
//! **Sealed timers.** A retry's next attempt waits in `DROVER_DELAYED` (published by
//! [`crate::delays::timer::publish`], the delayed tasks' own path) sealed with the envelope
//! codec (SPEC §3), as a one-task envelope whose `BatchMeta` is `queue = <task queue>`,
//! `partition = 0` ([`DELAYED_PARTITION`]) and `epoch = <the scheduling leader's epoch>`. The
//! partition is chosen only when the timer fires (routing may have changed meanwhile), so the
//! sealed partition is a fixed convention, checked on opening. The schedule message goes to
//! `<prefix>.delayed.<queue>.<id>` with `Nats-Schedule: @at <RFC 3339>` ([`crate::delays::HOLD_AHEAD`]
//! before the due instant, which travels in `Drover-Due`) and
//! `Nats-Schedule-Target: <prefix>.due.<queue>` (a retry due sooner goes straight to
//! `<prefix>.due.<queue>`); the server (2.12+) then publishes a copy with
//! the same body and headers (minus `Nats-Schedule-*`, `Nats-Msg-Id`, `Nats-Expected-*`; plus
//! `Nats-Scheduler` and `Nats-Schedule-Next: purge`) to the target and removes the schedule.
//! [`crate::due`] consumes those copies.

mod consume;

pub use consume::consume;
pub(crate) use consume::quarantine;

use crate::api::HDR_TASK_ID;
use drover_shared::outcome::Outcome;
use drover_shared::task::TaskError;

/// The partition sealed into a delayed task's envelope (see the module docs).
pub const DELAYED_PARTITION: u32 = 0;

/// Header of a dead-letter copy: the error kind (`handler`, `timeout`, …).
pub const HDR_ERROR_KIND: &str = "Drover-Error-Kind";
/// Header of a dead-letter or quarantine copy: what went wrong, on one line.
pub const HDR_ERROR: &str = "Drover-Error";
/// Header of a dead-letter copy: the attempt that failed last.
pub const HDR_ATTEMPT: &str = "Drover-Attempt";
/// Header of a quarantine copy: the stable reason (`invalid_outcome`, `bad_signature`, …).
pub const HDR_REASON: &str = "Drover-Reason";
/// Header of a quarantine copy: the subject the message arrived on.
pub const HDR_SUBJECT: &str = "Drover-Subject";

/// One header line: no CR/LF, at most 1 KiB.
pub fn header_line(text: &str) -> String {
    let mut s = text.replace(['\r', '\n'], " ");
    if s.len() > 1024 {
        let mut end = 1024;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Headers of the dead-letter copy of a task that failed for good with `outcome`.
pub fn dead_letter_headers(outcome: &Outcome) -> Vec<(&'static str, String)> {
    let task = &outcome.task;
    let error = outcome.error.clone().unwrap_or_else(|| TaskError {
        kind: drover_shared::task::ErrorKind::Handler,
        message: "failed without an error".into(),
    });
    let kind = serde_json::to_value(error.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    vec![
        (
            "Nats-Msg-Id",
            format!("dlq-{}-{}-{}", task.id, task.attempt, outcome.started_ms),
        ),
        (HDR_TASK_ID, task.id.clone()),
        (HDR_ERROR_KIND, kind),
        (HDR_ERROR, header_line(&error.message)),
        (HDR_ATTEMPT, task.attempt.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::{ErrorKind, Task, TaskSpec};
    use serde_json::value::RawValue;

    fn task() -> Task {
        Task {
            id: "t1".into(),
            payload: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
            attempt: 2,
            ..Task::first_attempt(&TaskSpec::new("echo"), "mail", 1000, 0)
        }
    }

    #[test]
    fn dead_letter_headers_name_the_task_and_error() {
        let o = Outcome::failed(
            task(),
            TaskError {
                kind: ErrorKind::UnknownType,
                message: "no handler\r\nfor echo".into(),
            },
            7,
            8,
        );
        let h = dead_letter_headers(&o);
        assert!(h.contains(&(HDR_TASK_ID, "t1".to_owned())));
        assert!(h.contains(&(HDR_ERROR_KIND, "unknown_type".to_owned())));
        assert!(h.contains(&(HDR_ERROR, "no handler  for echo".to_owned())));
        assert!(h.contains(&("Nats-Msg-Id", "dlq-t1-2-7".to_owned())));
        assert_eq!(header_line(&"é".repeat(600)).len(), 1024);
    }
}
