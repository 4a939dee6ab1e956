//! Keeps each of the leader's roles (intake, outcomes, due timers, schedules, assignment)
//! running for the whole leadership term.
//!
//! A role fails when JetStream is briefly unavailable — a NATS node restarting, a stream or
//! consumer leader moving ("JetStream system temporarily unavailable", request timeouts). The
//! lease can survive that (it is renewed through the election bucket, which may be placed on
//! healthy nodes), so a role that simply ended would leave a leader that renews but does not
//! dispatch: the chaos suite saw the whole pipeline stand still for up to 110 s that way. Every
//! role is therefore restarted, with a capped backoff, until the term ends. Restarting is safe
//! because each role already starts the way a new leader's does (the intake waits for its own
//! unacked messages like a predecessor's; outcomes are idempotent by `(id, attempt)`; held due
//! timers were NAKed on the way out).

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The first delay before a failed role is started again.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest delay between two starts of a failing role.
pub const MAX_RETRY: Duration = Duration::from_secs(2);

/// A role that ran this long without failing starts its backoff from [`FIRST_RETRY`] again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// What a role's returning `Ok` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDone {
    /// Its work for the term is over (the assigner found a later term's assignment: deposed).
    Stop,
    /// It should never end before the term does: start it again.
    Restart,
}

/// The delay before the next start of a role that failed `failures` times in a row:
/// [`FIRST_RETRY`] doubled per failure, at most [`MAX_RETRY`].
pub fn retry_delay(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

/// Runs `start()` until `term` is cancelled, starting it again after a failure (or an early
/// `Ok` when `on_done` is [`OnDone::Restart`]) with [`retry_delay`] between starts. Returns
/// what the last run returned, if it succeeded.
pub async fn supervise<F, Fut, T, E>(
    role: &'static str,
    term: CancellationToken,
    on_done: OnDone,
    mut start: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let mut failures = 0u32;
    loop {
        let began = Instant::now();
        let result = start().await;
        if term.is_cancelled() {
            return result.ok();
        }
        if began.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        failures += 1;
        let delay = retry_delay(failures);
        match result {
            Ok(done) if on_done == OnDone::Stop => {
                info!(role, "leader role finished for this term");
                return Some(done);
            }
            Ok(_) => {
                warn!(role, retry_in = ?delay, "leader role ended before the term did; restarting")
            }
            Err(e) => error!(role, error = %e, retry_in = ?delay, "leader role failed; restarting"),
        }
        tokio::select! {
            () = term.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_double_from_the_first_and_stop_at_the_cap() {
        assert_eq!(retry_delay(1), Duration::from_millis(100));
        assert_eq!(retry_delay(2), Duration::from_millis(200));
        assert_eq!(retry_delay(4), Duration::from_millis(800));
        assert_eq!(retry_delay(5), Duration::from_millis(1600));
        assert_eq!(retry_delay(6), MAX_RETRY);
        assert_eq!(retry_delay(500), MAX_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_role_is_started_again_until_it_runs() {
        let starts = Arc::new(AtomicU32::new(0));
        let term = CancellationToken::new();
        let s = starts.clone();
        let t = term.clone();
        supervise("test", term.clone(), OnDone::Restart, move || {
            let (s, t) = (s.clone(), t.clone());
            async move {
                // Fails three times (JetStream unavailable), then runs until the term ends.
                if s.fetch_add(1, Ordering::SeqCst) < 3 {
                    return Err("JetStream system temporarily unavailable");
                }
                t.cancel();
                Ok(())
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_end_restarts_unless_the_role_is_done() {
        let starts = Arc::new(AtomicU32::new(0));
        let term = CancellationToken::new();
        let s = starts.clone();
        supervise("assign", term.clone(), OnDone::Stop, move || {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        })
        .await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "a finished role is not restarted"
        );

        let s = starts.clone();
        let t = term.clone();
        supervise("intake", term, OnDone::Restart, move || {
            let (s, t) = (s.clone(), t.clone());
            async move {
                // The pull stream ended (a consumer deleted, say): started again.
                if s.fetch_add(1, Ordering::SeqCst) == 3 {
                    t.cancel();
                }
                Ok::<(), String>(())
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_term_stops_the_retries() {
        let term = CancellationToken::new();
        let t = term.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            t.cancel();
        });
        let began = Instant::now();
        supervise("outcomes", term, OnDone::Restart, || async {
            Err::<(), _>("request timed out")
        })
        .await;
        assert!(began.elapsed() < Duration::from_secs(6));
    }
}
