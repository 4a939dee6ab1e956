//! Schedules (SPEC §1.4), pure: the schedule object and its validation, cron expressions in IANA
//! time zones with the DST rules of the SPEC, and the misfire/overlap decisions of the leader's
//! evaluator. No NATS, no clock: every function takes the time it needs.
//!
//! Cron patterns are parsed and evaluated by the `croner` crate (5 fields, or 6 with seconds
//! first; day-of-month and day-of-week combine with OR when both are restricted, as in Vixie
//! cron; DST-aware search over `chrono-tz` zones). Drover adds `@every <dur>` (aligned to the Unix
//! epoch, so every leader computes the same fire times) and one rule croner leaves open: in a DST
//! overlap a wall-clock time fires once, at its first occurrence, for every pattern.

use crate::error::{ApiError, ErrorCode};
use crate::names::is_valid_queue;
use crate::task::{TaskSpec, is_valid_id};
use chrono::{DateTime, LocalResult, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Longest schedule id: `cron-<id>-<unix seconds>` and `trig-<id>-<stream seq>` must stay task ids
/// (at most 128 characters).
pub const MAX_SCHEDULE_ID_LEN: usize = 96;
/// Default of `catch_up_limit`.
pub const DEFAULT_CATCH_UP_LIMIT: u32 = 100;
/// Largest `catch_up_limit`.
pub const MAX_CATCH_UP_LIMIT: u32 = 10_000;
/// A fire evaluated at most this late is on time; later, it was missed and `misfire` decides.
pub const MISFIRE_GRACE_MS: i64 = 1_000;
/// Most fire times one evaluation walks through (bounds the work after a very long downtime).
pub const MAX_WALK: usize = 100_000;

/// The fields a schedule object may have (SPEC §1.4, plus `queue`).
pub const SCHEDULE_FIELDS: &[&str] = &[
    "id",
    "cron",
    "timezone",
    "task",
    "queue",
    "misfire",
    "catch_up_limit",
    "overlap",
    "paused",
    "trigger_subject",
];

/// What the evaluator does with fire times missed while no leader evaluated the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// One run now for all missed times (the default).
    #[default]
    FireOnce,
    /// No run for missed times.
    Skip,
    /// Every missed time, oldest first, at most `catch_up_limit` (the newest ones).
    CatchUp,
}

/// Whether a fire starts while the schedule's previous run is not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Always (the default).
    #[default]
    Allow,
    /// Skip the fire while the previous run's record is not terminal.
    Skip,
}

/// A validated schedule, as stored in `drover-schedules` under its id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    /// Schedule id (task id pattern, at most [`MAX_SCHEDULE_ID_LEN`] characters).
    pub id: String,
    /// Cron pattern or `@every <dur>`; absent for an event-triggered schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// IANA time zone of `cron`.
    #[serde(default = "utc")]
    pub timezone: String,
    /// The task template: a task object without `id` and `run_at`.
    pub task: Box<RawValue>,
    /// The queue its tasks are submitted to.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Missed fire times after downtime.
    #[serde(default)]
    pub misfire: Misfire,
    /// Most missed times `catch_up` runs.
    #[serde(default = "default_catch_up_limit")]
    pub catch_up_limit: u32,
    /// Overlapping runs.
    #[serde(default)]
    pub overlap: Overlap,
    /// A paused schedule does not fire.
    #[serde(default)]
    pub paused: bool,
    /// Subject whose messages each create one task (instead of `cron`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_subject: Option<String>,
}

fn utc() -> String {
    "UTC".into()
}
fn default_queue() -> String {
    "default".into()
}
fn default_catch_up_limit() -> u32 {
    DEFAULT_CATCH_UP_LIMIT
}

impl Schedule {
    /// Parses and validates a schedule object; `prefix` is the Drover subject prefix (trigger
    /// subjects must stay out of Drover's own subjects, except under `<prefix>.trigger.`).
    pub fn parse(bytes: &[u8], prefix: &str) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!("not valid JSON: {e}; a schedule is a JSON object {{\"id\",\"cron\",\"task\",...}}"),
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(ApiError::new(
                ErrorCode::InvalidJson,
                "a schedule is a JSON object {\"id\",\"cron\",\"task\",...}",
            ));
        };
        check_fields(&obj)?;
        let s: Schedule = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "{e}; expected id: string, cron: string, timezone: string, task: object, queue: string, misfire: \"fire_once\"|\"skip\"|\"catch_up\", catch_up_limit: integer, overlap: \"allow\"|\"skip\", paused: boolean, trigger_subject: string"
                ),
            )
        })?;
        s.validate(prefix)?;
        Ok(s)
    }

    /// Checks every rule of a schedule object.
    pub fn validate(&self, prefix: &str) -> Result<(), ApiError> {
        check_id(&self.id)?;
        if !is_valid_queue(&self.queue) {
            return Err(ApiError::invalid_field(
                "queue",
                format!(
                    "{:?} is not a queue name; use one matching [a-z0-9][a-z0-9_-]{{0,63}}",
                    self.queue
                ),
            ));
        }
        match (&self.cron, &self.trigger_subject) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_field(
                    "trigger_subject",
                    "a schedule fires either on time (`cron`) or on messages (`trigger_subject`), not both; drop one of them",
                ));
            }
            (None, None) => {
                return Err(ApiError::invalid_field(
                    "cron",
                    "missing: give `cron` (e.g. \"*/5 * * * *\" or \"@every 30s\") or `trigger_subject`",
                ));
            }
            (Some(cron), None) => {
                CronExpr::parse(cron, &self.timezone)?;
            }
            (None, Some(subject)) => check_trigger_subject(subject, prefix)?,
        }
        parse_zone(&self.timezone)?;
        if !(1..=MAX_CATCH_UP_LIMIT).contains(&self.catch_up_limit) {
            return Err(ApiError::invalid_field(
                "catch_up_limit",
                format!(
                    "{} is out of range; use 1..={MAX_CATCH_UP_LIMIT}",
                    self.catch_up_limit
                ),
            ));
        }
        check_template(&self.task)
    }

    /// The parsed time expression, `None` for an event-triggered schedule.
    pub fn expr(&self) -> Result<Option<CronExpr>, ApiError> {
        self.cron
            .as_deref()
            .map(|c| CronExpr::parse(c, &self.timezone))
            .transpose()
    }

    /// The id of the task of fire time `t`: `cron-<schedule id>-<unix seconds>`.
    pub fn fire_task_id(&self, t: DateTime<Utc>) -> String {
        format!("cron-{}-{}", self.id, t.timestamp())
    }

    /// The id of the task of a manual trigger at `now`: `cron-<schedule id>-m<unix millis>`.
    pub fn manual_task_id(&self, now: DateTime<Utc>) -> String {
        format!("cron-{}-m{}", self.id, now.timestamp_millis())
    }

    /// The id of the task of the trigger message at stream sequence `seq`.
    pub fn trigger_task_id(&self, seq: u64) -> String {
        format!("trig-{}-{seq}", self.id)
    }

    /// The submission of one run: the template with `id` set and, when `payload` is given, its
    /// payload replaced (trigger messages: the message itself; non-JSON bytes become a string).
    pub fn task_json(&self, id: &str, payload: Option<&[u8]>) -> Result<Vec<u8>, ApiError> {
        let mut obj: Map<String, Value> = serde_json::from_str(self.task.get())
            .map_err(|e| ApiError::invalid_field("task", format!("not an object: {e}")))?;
        obj.insert("id".into(), Value::String(id.to_owned()));
        if let Some(p) = payload {
            let v = serde_json::from_slice::<Value>(p)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(p).into_owned()));
            obj.insert("payload".into(), v);
        }
        serde_json::to_vec(&obj)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot encode task: {e}")))
    }
}

fn check_fields(obj: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(k) = obj.keys().find(|k| !SCHEDULE_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::new(
            ErrorCode::UnknownField,
            format!(
                "unknown field `{k}`; a schedule has the fields {}",
                SCHEDULE_FIELDS.join(", ")
            ),
        )
        .with_field(k.clone()));
    }
    for required in ["id", "task"] {
        if !obj.contains_key(required) {
            return Err(ApiError::invalid_field(
                required,
                "missing; a schedule needs `id` and `task`",
            ));
        }
    }
    Ok(())
}

/// Checks a schedule id.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) && id.len() <= MAX_SCHEDULE_ID_LEN {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "id",
            format!(
                "{id:?} is not a schedule id; use one matching [A-Za-z0-9][A-Za-z0-9_-]* of at most {MAX_SCHEDULE_ID_LEN} characters"
            ),
        ))
    }
}

fn check_template(task: &RawValue) -> Result<(), ApiError> {
    let obj: Map<String, Value> = serde_json::from_str(task.get()).map_err(|_| {
        ApiError::invalid_field(
            "task",
            "must be a task object such as {\"type\":\"report\",\"payload\":{...}}",
        )
    })?;
    for (field, why) in [
        (
            "id",
            "runs get ids of their own (cron-<schedule>-<unix seconds>); remove `task.id`",
        ),
        (
            "run_at",
            "an absolute start time cannot repeat; use `task.delay_ms` or the cron expression",
        ),
        (
            "depends_on",
            "a repeating task cannot depend on fixed ids; remove `task.depends_on`",
        ),
    ] {
        if obj.contains_key(field) {
            return Err(ApiError::invalid_field(format!("task.{field}"), why));
        }
    }
    TaskSpec::from_json(task.get().as_bytes()).map_err(|mut e| {
        e.message = format!("task template: {}", e.message);
        e.field = Some(format!("task.{}", e.field.as_deref().unwrap_or("")))
            .map(|f| f.trim_end_matches('.').to_owned());
        e
    })?;
    Ok(())
}

fn check_trigger_subject(subject: &str, prefix: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        ApiError::invalid_field(
            "trigger_subject",
            format!(
                "{subject:?} {why}; use a plain subject such as \"orders.created\" or \"{prefix}.trigger.orders\""
            ),
        )
    };
    if subject.is_empty() || subject.len() > 255 {
        return Err(bad("is empty or longer than 255 bytes"));
    }
    if subject
        .split('.')
        .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err(bad(
            "has an empty token or a wildcard (wildcards are not supported)",
        ));
    }
    if subject
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad("contains whitespace"));
    }
    if subject.starts_with('$') {
        return Err(bad("is a system subject"));
    }
    if subject.starts_with(&format!("{prefix}.")) && !is_under_trigger_prefix(subject, prefix) {
        return Err(bad(&format!(
            "is one of Drover's own subjects; only {prefix}.trigger.… is free for triggers"
        )));
    }
    Ok(())
}

fn is_under_trigger_prefix(subject: &str, prefix: &str) -> bool {
    subject.starts_with(&format!("{prefix}.trigger."))
}

/// The subjects `DROVER_TRIGGERS` must capture: its own `<prefix>.trigger.>` and every trigger
/// subject outside it, sorted and without repeats.
pub fn trigger_stream_subjects<'a>(
    prefix: &str,
    trigger_subjects: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut out: Vec<String> = trigger_subjects
        .into_iter()
        .filter(|s| !is_under_trigger_prefix(s, prefix))
        .map(str::to_owned)
        .collect();
    out.push(format!("{prefix}.trigger.>"));
    out.sort();
    out.dedup();
    out
}

// ---- time expressions ---------------------------------------------------------------------------

/// A parsed `cron` field in its zone.
#[derive(Debug, Clone)]
pub enum CronExpr {
    /// A cron pattern evaluated in `zone`.
    Pattern {
        /// The parsed pattern.
        cron: Box<croner::Cron>,
        /// Its zone.
        zone: Tz,
    },
    /// `@every <dur>`: every multiple of `secs` seconds since the Unix epoch.
    Every {
        /// The interval in whole seconds (≥ 1).
        secs: i64,
    },
}

/// Parses an IANA zone name.
pub fn parse_zone(zone: &str) -> Result<Tz, ApiError> {
    zone.parse::<Tz>().map_err(|_| {
        ApiError::invalid_field(
            "timezone",
            format!(
                "{zone:?} is not an IANA time zone; use a name such as \"UTC\", \"Europe/Berlin\" or \"America/New_York\""
            ),
        )
    })
}

impl CronExpr {
    /// Parses `expr` (5 fields, 6 with seconds first, or `@every <dur>`) in zone `zone`.
    pub fn parse(expr: &str, zone: &str) -> Result<Self, ApiError> {
        let expr = expr.trim();
        if let Some(dur) = expr.strip_prefix("@every") {
            let secs = parse_every(dur.trim())?;
            return Ok(Self::Every { secs });
        }
        let zone = parse_zone(zone)?;
        let fields = expr.split_whitespace().count();
        let hint = "use 5 fields `min hour dom mon dow` (e.g. \"*/5 * * * *\"), 6 with seconds first (e.g. \"*/10 * * * * *\"), or \"@every 30s\"";
        if expr.starts_with('@') {
            if ![
                "@yearly",
                "@annually",
                "@monthly",
                "@weekly",
                "@daily",
                "@hourly",
            ]
            .iter()
            .any(|n| expr.eq_ignore_ascii_case(n))
            {
                return Err(ApiError::invalid_field(
                    "cron",
                    format!(
                        "{expr:?} is not a known shorthand; {hint}, or one of @yearly @monthly @weekly @daily @hourly"
                    ),
                ));
            }
        } else if !(5..=6).contains(&fields) {
            return Err(ApiError::invalid_field(
                "cron",
                format!("{expr:?} has {fields} fields; {hint}"),
            ));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .dom_and_dow(false)
            .build()
            .parse(expr)
            .map_err(|e| ApiError::invalid_field("cron", format!("{expr:?}: {e}; {hint}")))?;
        // A pattern that never matches (e.g. 30 February) is useless: say so now.
        let probe = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default()
            .with_timezone(&zone);
        if cron.find_next_occurrence(&probe, false).is_err() {
            return Err(ApiError::invalid_field(
                "cron",
                format!("{expr:?} never matches a date; {hint}"),
            ));
        }
        Ok(Self::Pattern {
            cron: Box::new(cron),
            zone,
        })
    }

    /// The first fire time strictly after `t` (whole seconds), or `None` when there is none.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Every { secs } => {
                let s = t.timestamp();
                let next = (s.div_euclid(*secs) + 1) * secs;
                DateTime::from_timestamp(next, 0)
            }
            Self::Pattern { cron, zone } => {
                let mut cursor = t.with_timezone(zone);
                for _ in 0..8 {
                    let c = cron.find_next_occurrence(&cursor, false).ok()?;
                    // In an overlap a wall-clock time fires once: at its first occurrence.
                    let repeated = matches!(
                        zone.from_local_datetime(&c.naive_local()),
                        LocalResult::Ambiguous(first, _) if first.timestamp() != c.timestamp()
                    );
                    if !repeated {
                        return Some(c.with_timezone(&Utc));
                    }
                    cursor = c;
                }
                None
            }
        }
    }
}

fn parse_every(dur: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::invalid_field(
            "cron",
            format!(
                "\"@every {dur}\" is not an interval; use whole seconds or more with units s, m, h, d, e.g. \"@every 30s\", \"@every 1h30m\""
            ),
        )
    };
    if dur.is_empty() {
        return Err(bad());
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in dur.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: i64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() || total < 1 {
        return Err(bad());
    }
    Ok(total)
}

// ---- the evaluator's decisions ------------------------------------------------------------------

/// The value of `cron.<id>` in `drover-state`: how far the schedule has been evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronState {
    /// The last fire time handled (fired or skipped), unix seconds.
    pub last_fire: i64,
    /// The task of the last run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task: Option<String>,
    /// When the last run was submitted (RFC 3339), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<String>,
}

/// What one evaluation of a schedule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirePlan {
    /// Fire times to create a task for, oldest first (each one's id is its own time).
    pub fires: Vec<DateTime<Utc>>,
    /// The fire time the state advances to after them (`None`: nothing was due).
    pub advance_to: Option<DateTime<Utc>>,
    /// How many due times were dropped by the misfire policy.
    pub missed: usize,
}

/// The due fire times of a schedule at `now`, evaluated from `from` (exclusive: the last fire
/// time handled, or the time the schedule was last written, whichever is later), and what
/// `misfire` makes of them. A fire is missed when it is more than [`MISFIRE_GRACE_MS`] old.
pub fn plan_fires(
    expr: &CronExpr,
    misfire: Misfire,
    catch_up_limit: u32,
    from: DateTime<Utc>,
    now: DateTime<Utc>,
) -> FirePlan {
    let mut due = Vec::new();
    let mut t = from;
    while let Some(next) = expr.next_after(t) {
        if next > now || due.len() >= MAX_WALK {
            break;
        }
        due.push(next);
        t = next;
    }
    let Some(&last) = due.last() else {
        return FirePlan {
            fires: Vec::new(),
            advance_to: None,
            missed: 0,
        };
    };
    let on_time = |f: &DateTime<Utc>| (now - *f).num_milliseconds() <= MISFIRE_GRACE_MS;
    let fires: Vec<DateTime<Utc>> = match misfire {
        Misfire::FireOnce => vec![last],
        Misfire::Skip => due.iter().copied().filter(on_time).collect(),
        Misfire::CatchUp => {
            let keep = due.len().min(catch_up_limit as usize);
            due[due.len() - keep..].to_vec()
        }
    };
    FirePlan {
        missed: due.len() - fires.len(),
        fires,
        advance_to: Some(last),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, zone: &str, after: &str) -> String {
        let e = CronExpr::parse(expr, zone).unwrap();
        e.next_after(utc(after)).unwrap().to_rfc3339()
    }

    fn series(expr: &str, zone: &str, after: &str, n: usize) -> Vec<String> {
        let e = CronExpr::parse(expr, zone).unwrap();
        let mut t = utc(after);
        (0..n)
            .map(|_| {
                t = e.next_after(t).unwrap();
                t.to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn five_and_six_fields() {
        assert_eq!(
            next("*/5 * * * *", "UTC", "2026-01-01T00:00:00Z"),
            "2026-01-01T00:05:00+00:00"
        );
        assert_eq!(
            next("*/10 * * * * *", "UTC", "2026-01-01T00:00:00Z"),
            "2026-01-01T00:00:10+00:00"
        );
        assert_eq!(
            series("* * * * * *", "UTC", "2026-01-01T00:00:00.500Z", 2),
            ["2026-01-01T00:00:01+00:00", "2026-01-01T00:00:02+00:00"]
        );
    }

    #[test]
    fn dom_and_dow_combine_with_or() {
        // 13th of the month OR a Friday: 2026-03-06 is a Friday, the 13th comes later.
        assert_eq!(
            series("0 0 13 * 5", "UTC", "2026-03-01T00:00:00Z", 3),
            [
                "2026-03-06T00:00:00+00:00",
                "2026-03-13T00:00:00+00:00",
                "2026-03-20T00:00:00+00:00"
            ]
        );
        // Only one restricted: that one alone decides.
        assert_eq!(
            next("0 0 13 * *", "UTC", "2026-03-01T00:00:00Z"),
            "2026-03-13T00:00:00+00:00"
        );
    }

    #[test]
    fn every_is_epoch_aligned() {
        assert_eq!(
            series("@every 30s", "UTC", "2026-01-01T00:00:10Z", 2),
            ["2026-01-01T00:00:30+00:00", "2026-01-01T00:01:00+00:00"]
        );
        assert_eq!(
            next("@every 1h30m", "Europe/Berlin", "2026-01-01T00:00:00Z"),
            "2026-01-01T01:30:00+00:00"
        );
        for bad in ["@every", "@every 0s", "@every 5", "@every 5x", "@every -5s"] {
            let e = CronExpr::parse(bad, "UTC").unwrap_err();
            assert!(e.message.contains("@every 30s"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn spring_forward_gap_moves_to_next_valid_instant() {
        // Berlin 2026-03-29: 02:00 CET → 03:00 CEST; 02:30 does not exist.
        assert_eq!(
            next("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z"),
            // 03:00 CEST = 01:00 UTC, the first valid instant after the gap.
            "2026-03-29T01:00:00+00:00"
        );
        // The next day it is 02:30 CEST again.
        assert_eq!(
            next("30 2 * * *", "Europe/Berlin", "2026-03-29T02:00:00Z"),
            "2026-03-30T00:30:00+00:00"
        );
        // New York 2026-03-08: 02:00 EST → 03:00 EDT.
        assert_eq!(
            next("15 2 * * *", "America/New_York", "2026-03-07T12:00:00Z"),
            "2026-03-08T07:00:00+00:00"
        );
    }

    #[test]
    fn fall_back_overlap_fires_once_at_first_occurrence() {
        // Berlin 2026-10-25: 03:00 CEST → 02:00 CET; 02:30 happens twice.
        assert_eq!(
            series("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            // 02:30 CEST = 00:30 UTC; then the next day 02:30 CET = 01:30 UTC.
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
        );
        // An hourly pattern does not repeat the wall-clock 02:30 either.
        assert_eq!(
            series("30 * * * *", "Europe/Berlin", "2026-10-24T23:45:00Z", 3),
            [
                "2026-10-25T00:30:00+00:00", // 02:30 CEST
                "2026-10-25T02:30:00+00:00", // 03:30 CET (02:30 CET skipped)
                "2026-10-25T03:30:00+00:00"
            ]
        );
        // New York 2026-11-01: 02:00 EDT → 01:00 EST; 01:30 happens twice.
        assert_eq!(
            series("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00"]
        );
    }

    #[test]
    fn invalid_expressions_and_zones_say_what_is_right() {
        for bad in [
            "* * * *",
            "* * * * * * *",
            "61 * * * *",
            "hello",
            "@sometimes",
        ] {
            let e = CronExpr::parse(bad, "UTC").unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidField, "{bad}");
            assert_eq!(e.field.as_deref(), Some("cron"));
            assert!(e.message.contains("*/5 * * * *"), "{bad}: {}", e.message);
        }
        let e = CronExpr::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("timezone"));
        assert!(e.message.contains("Europe/Berlin"), "{}", e.message);
        let e = CronExpr::parse("0 0 30 2 *", "UTC").unwrap_err();
        assert!(e.message.contains("never matches"), "{}", e.message);
    }

    #[test]
    fn schedule_objects_are_validated() {
        let ok = br#"{"id":"nightly","cron":"0 3 * * *","timezone":"Europe/Berlin","task":{"type":"report","payload":{"a":1}},"misfire":"catch_up","catch_up_limit":5,"overlap":"skip"}"#;
        let s = Schedule::parse(ok, "drover").unwrap();
        assert_eq!(s.misfire, Misfire::CatchUp);
        assert_eq!(s.queue, "default");
        assert_eq!(
            s.fire_task_id(utc("2026-01-01T00:00:00Z")),
            "cron-nightly-1767225600"
        );
        let task: Value = serde_json::from_slice(&s.task_json("x", None).unwrap()).unwrap();
        assert_eq!(task["id"], "x");
        assert_eq!(task["payload"]["a"], 1);
        let task: Value =
            serde_json::from_slice(&s.task_json("x", Some(b"not json")).unwrap()).unwrap();
        assert_eq!(task["payload"], "not json");

        let cases: &[(&[u8], ErrorCode, &str)] = &[
            (
                br#"{"id":"a","cron":"* * * * *","task":{"type":"t"},"color":1}"#,
                ErrorCode::UnknownField,
                "color",
            ),
            (
                br#"{"id":"a","cron":"* * * * *","task":{"type":"t","bogus":1}}"#,
                ErrorCode::UnknownField,
                "task.bogus",
            ),
            (
                br#"{"id":"a","cron":"* * * * *","task":{"type":"t","id":"x"}}"#,
                ErrorCode::InvalidField,
                "task.id",
            ),
            (
                br#"{"id":"a","task":{"type":"t"}}"#,
                ErrorCode::InvalidField,
                "cron",
            ),
            (
                br#"{"id":"a","cron":"* * * * *","trigger_subject":"x","task":{"type":"t"}}"#,
                ErrorCode::InvalidField,
                "trigger_subject",
            ),
            (
                br#"{"id":"a","trigger_subject":"drover.submit.x","task":{"type":"t"}}"#,
                ErrorCode::InvalidField,
                "trigger_subject",
            ),
            (
                br#"{"id":"a","trigger_subject":"orders.*","task":{"type":"t"}}"#,
                ErrorCode::InvalidField,
                "trigger_subject",
            ),
            (
                br#"{"id":"a","cron":"* * * * *","timezone":"Nowhere","task":{"type":"t"}}"#,
                ErrorCode::InvalidField,
                "timezone",
            ),
            (
                br#"{"id":"_a","cron":"* * * * *","task":{"type":"t"}}"#,
                ErrorCode::InvalidField,
                "id",
            ),
            (
                br#"{"id":"a","cron":"* * * * *","task":{"type":"t"},"misfire":"later"}"#,
                ErrorCode::InvalidField,
                "",
            ),
            (
                br#"{"id":"a","cron":"* * * * *","task":{"type":"t"},"catch_up_limit":0}"#,
                ErrorCode::InvalidField,
                "catch_up_limit",
            ),
        ];
        for (body, code, field) in cases {
            let e = Schedule::parse(body, "drover").unwrap_err();
            assert_eq!(e.code, *code, "{}: {e}", String::from_utf8_lossy(body));
            if !field.is_empty() {
                assert_eq!(e.field.as_deref(), Some(*field), "{e}");
            }
        }
        assert!(
            Schedule::parse(
                br#"{"id":"a","trigger_subject":"drover.trigger.orders","task":{"type":"t"}}"#,
                "drover"
            )
            .is_ok()
        );
    }

    #[test]
    fn trigger_subjects_outside_the_own_prefix_are_added() {
        assert_eq!(
            trigger_stream_subjects("drover", ["orders.new", "drover.trigger.x", "orders.new"]),
            ["drover.trigger.>", "orders.new"]
        );
    }

    #[test]
    fn misfire_policies() {
        let every = CronExpr::parse("* * * * * *", "UTC").unwrap();
        let from = utc("2026-01-01T00:00:00Z");
        // On time: exactly the one due fire, whatever the policy.
        for m in [Misfire::FireOnce, Misfire::Skip, Misfire::CatchUp] {
            let p = plan_fires(&every, m, 100, from, utc("2026-01-01T00:00:01.020Z"));
            assert_eq!(p.fires, [utc("2026-01-01T00:00:01Z")], "{m:?}");
        }
        // Ten seconds of downtime.
        let now = utc("2026-01-01T00:00:10.300Z");
        let p = plan_fires(&every, Misfire::FireOnce, 100, from, now);
        assert_eq!(p.fires, [utc("2026-01-01T00:00:10Z")]);
        assert_eq!(p.missed, 9);
        let p = plan_fires(&every, Misfire::Skip, 100, from, now);
        assert_eq!(
            p.fires,
            [utc("2026-01-01T00:00:10Z")],
            "the current one is on time"
        );
        let every5 = CronExpr::parse("*/5 * * * * *", "UTC").unwrap();
        let p = plan_fires(
            &every5,
            Misfire::Skip,
            100,
            from,
            utc("2026-01-01T00:00:11.500Z"),
        );
        assert!(p.fires.is_empty(), "00:00:10 is 1.5 s late: missed");
        assert_eq!(p.advance_to, Some(utc("2026-01-01T00:00:10Z")));
        assert_eq!(p.missed, 2);
        let p = plan_fires(&every, Misfire::CatchUp, 100, from, now);
        assert_eq!(p.fires.len(), 10);
        assert_eq!(p.fires[0], utc("2026-01-01T00:00:01Z"));
        let p = plan_fires(&every, Misfire::CatchUp, 3, from, now);
        assert_eq!(
            p.fires,
            [
                utc("2026-01-01T00:00:08Z"),
                utc("2026-01-01T00:00:09Z"),
                utc("2026-01-01T00:00:10Z")
            ]
        );
        // Nothing due.
        let p = plan_fires(
            &every,
            Misfire::CatchUp,
            3,
            from,
            utc("2026-01-01T00:00:00.900Z"),
        );
        assert_eq!(p.advance_to, None);
    }
}
