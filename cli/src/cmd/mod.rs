//! The operator and user commands of `drover` (SPEC §9): each submodule is one command, a thin
//! async shell over NATS around pure parsing and formatting functions.
//!
//! | module | command |
//! |---|---|
//! | [`submit`] | `submit`: validated submit through `<prefix>.api.submit.<queue>`, optional `--wait` |
//! | [`status`] | `status`: one record, through `<prefix>.api.status` (or the bucket when no dispatcher answers) |
//! | [`wait`] | `wait`: watch records in `<prefix>-tasks` until terminal |
//! | [`cancel`] | `cancel` through `<prefix>.api.cancel` |
//! | [`tasks`] | `tasks`: recent records from `<prefix>-tasks` |
//! | [`workers`] | `workers`: heartbeats and owned partitions |
//! | [`leader`] | `leader`: the election lease |
//! | [`queues`] | `queues`: backlog per queue and partition |
//! | [`dlq`] | `dlq ls/show/replay/purge` over `<PREFIX>_DLQ` |
//! | [`schedule`] | `schedule add/ls/rm/pause/resume/trigger` over `<prefix>.api.schedule.*` and `<prefix>-schedules` |
//! | [`inspect`] | `inspect`: open a sealed envelope of `<PREFIX>_WORK` |
//! | [`output`] | pure: tables, durations, ages |
//! | [`nats`] | the NATS helpers every command shares |
//!
//! Exit codes: 0 ok; 1 a task ended without success, a task/message/leader was not found, or an
//! operation was refused; 2 usage (bad flags or input, or a submission the API rejected as
//! invalid); 3 NATS unreachable, no dispatcher answering, or a timeout. Every error is one line
//! on stderr.

pub mod cancel;
pub mod dlq;
pub mod inspect;
pub mod leader;
pub mod nats;
pub mod output;
pub mod queues;
pub mod schedule;
pub mod status;
pub mod submit;
pub mod tasks;
pub mod wait;
pub mod workers;

use drover_shared::config::ConnectArgs;
use drover_shared::error::{ApiError, ErrorCode};
use output::Format;
use std::process::ExitCode;
use std::time::Duration;

/// Flags every operator command takes: how to reach NATS, and the output format.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Connection and naming.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Output format: `table` for people, `json` for scripts (stable fields, see docs/cli.md).
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table, env = "DROVER_OUTPUT")]
    pub output: Format,
}

/// The documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: a task failed (or was cancelled / upstream failed), something was not found, or the
    /// operation was refused.
    Failed = 1,
    /// 2: bad flags or input.
    Usage = 2,
    /// 3: NATS unreachable, no dispatcher answered, or a timeout.
    Unreachable = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A command's failure: one line for stderr and the exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// The exit code.
    pub exit: Exit,
    /// What went wrong and, where possible, what to do.
    pub message: String,
}

impl CliError {
    /// Exit 2.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
    /// Exit 1.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Failed,
            message: message.into(),
        }
    }
    /// Exit 3.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Unreachable,
            message: message.into(),
        }
    }

    /// The error an API error reply turns into: invalid input is usage (2), `unavailable` is
    /// 3, anything else (not found, not allowed, duplicate, internal) is 1.
    pub fn from_api(e: &ApiError) -> Self {
        let message = e.to_string();
        match e.code {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidField
            | ErrorCode::UnknownField
            | ErrorCode::TooLarge
            | ErrorCode::Cycle
            | ErrorCode::MissingDependency => Self::usage(message),
            ErrorCode::Unavailable => Self::unreachable(message),
            ErrorCode::NotFound
            | ErrorCode::NotAllowed
            | ErrorCode::Duplicate
            | ErrorCode::Internal => Self::failed(message),
        }
    }

    /// A NATS failure of `what`: a timeout or a missing responder is 3, anything else 1.
    pub fn nats(what: &str, e: impl std::fmt::Display) -> Self {
        let text = output::one_line(&e.to_string());
        let lower = text.to_ascii_lowercase();
        if lower.contains("timed out")
            || lower.contains("timeout")
            || lower.contains("no responders")
            || lower.contains("disconnected")
        {
            Self::unreachable(format!("{what}: {text}"))
        } else {
            Self::failed(format!("{what}: {text}"))
        }
    }
}

/// Parses a duration: `500ms`, `30s`, `5m`, `2h`, `1d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 500ms, 30s, 5m, 2h, 1d"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    let secs = n * scale;
    if !secs.is_finite() || secs > 1e12 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Prints `value` as one pretty JSON document on stdout.
pub fn print_json(value: &serde_json::Value) {
    // A Value always serializes.
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn api_errors_map_to_exit_codes() {
        let e = |code| ApiError::new(code, "m");
        assert_eq!(
            CliError::from_api(&e(ErrorCode::InvalidField)).exit,
            Exit::Usage
        );
        assert_eq!(
            CliError::from_api(&e(ErrorCode::NotFound)).exit,
            Exit::Failed
        );
        assert_eq!(
            CliError::from_api(&e(ErrorCode::NotAllowed)).exit,
            Exit::Failed
        );
        assert_eq!(
            CliError::from_api(&e(ErrorCode::Unavailable)).exit,
            Exit::Unreachable
        );
        assert_eq!(
            CliError::nats("x", "request timed out").exit,
            Exit::Unreachable
        );
        assert_eq!(CliError::nats("x", "stream not found").exit, Exit::Failed);
        assert_eq!(CliError::nats("reading", "a\nb").message, "reading: a b");
    }
}
