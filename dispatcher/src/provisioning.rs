//! Provisioning at start, retried: a fresh R3 cluster refuses placement for a few seconds
//! ("insufficient resources", "no suitable peers") and a server in the middle of an election
//! times out, so a replica keeps trying with backoff, not ready (`/readyz`) meanwhile, instead of
//! exiting. Errors that waiting cannot fix (server too old, no JetStream, an incompatible
//! stream) still end the process.

use drover_shared::names::Names;
use drover_shared::ops::Health;
use drover_shared::topology::{self, ProvisionReport, TopologyConfig, TopologyError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// First pause after a failed attempt.
const FIRST_DELAY: Duration = Duration::from_millis(250);

/// Longest pause between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Pause after failed attempt number `attempt` (1-based): 250 ms, doubling, at most 5 s.
pub fn backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    FIRST_DELAY.saturating_mul(factor).min(MAX_DELAY)
}

/// Provisions until it works; `Ok(None)` when `shutdown` fired first. `health` is not ready
/// (with the last error as the reason) while attempts fail, and ready once one succeeded.
pub async fn provision_until_done(
    client: &async_nats::Client,
    names: &Names,
    cfg: &TopologyConfig,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Option<ProvisionReport>, TopologyError> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match topology::provision(client, names, cfg).await {
            Ok(report) => {
                if attempt > 1 {
                    info!(attempts = attempt, "provisioning succeeded after retries");
                }
                health.set_ready(true, "provisioned");
                return Ok(Some(report));
            }
            Err(e) if e.is_retryable() => {
                let delay = backoff(attempt);
                warn!(
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "provisioning failed; retrying (not ready until it succeeds)"
                );
                health.set_ready(false, &format!("provisioning: {e}"));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_250_ms_up_to_5_s() {
        let ms: Vec<u128> = (1..=8).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(backoff(0), FIRST_DELAY);
        assert_eq!(backoff(u32::MAX), MAX_DELAY);
    }
}
