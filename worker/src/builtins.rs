//! The built-in handlers for demos and tests (SPEC §6.1): `noop`, `echo`, `sleep`, `fail`.

use crate::handler::TaskContext;
use drover_shared::task::{ErrorKind, TaskError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// One built-in handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Returns `null`.
    Noop,
    /// Returns the payload.
    Echo,
    /// `{"ms":N}`: waits N ms (returns early, as cancelled, when the attempt is cancelled).
    Sleep,
    /// `{"message":"..."}`: fails with kind `handler` and that message.
    Fail,
}

#[derive(Deserialize)]
struct SleepArgs {
    #[serde(default)]
    ms: u64,
}

#[derive(Deserialize)]
struct FailArgs {
    #[serde(default)]
    message: Option<String>,
}

fn invalid(message: String) -> TaskError {
    TaskError {
        kind: ErrorKind::Invalid,
        message,
    }
}

impl Builtin {
    /// Every built-in.
    pub const ALL: [Builtin; 4] = [Self::Noop, Self::Echo, Self::Sleep, Self::Fail];

    /// Its task type.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::Echo => "echo",
            Self::Sleep => "sleep",
            Self::Fail => "fail",
        }
    }

    /// Runs it.
    pub async fn run(
        self,
        ctx: &TaskContext,
        payload: &RawValue,
    ) -> Result<Box<RawValue>, TaskError> {
        let null = || RawValue::from_string("null".to_owned()).expect("valid JSON");
        match self {
            Self::Noop => Ok(null()),
            Self::Echo => Ok(payload.to_owned()),
            Self::Sleep => {
                let args: SleepArgs = if payload.get() == "null" {
                    SleepArgs { ms: 0 }
                } else {
                    serde_json::from_str(payload.get())
                        .map_err(|e| invalid(format!("sleep expects {{\"ms\":N}}: {e}")))?
                };
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(null()),
                    () = ctx.cancellation().cancelled() => Err(TaskError {
                        kind: ErrorKind::Cancelled,
                        message: "sleep interrupted".to_owned(),
                    }),
                }
            }
            Self::Fail => {
                let args: FailArgs =
                    serde_json::from_str(payload.get()).unwrap_or(FailArgs { message: None });
                Err(TaskError {
                    kind: ErrorKind::Handler,
                    message: args
                        .message
                        .unwrap_or_else(|| "failed on request".to_owned()),
                })
            }
        }
    }
}
