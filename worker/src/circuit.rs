//! A circuit breaker as a pure state machine (SPEC §7): closed → open after `failures`
//! consecutive failures, open for a cool-down, then half-open letting one probe through. Time is
//! passed in, so every transition is tested exactly; the HTTP handler owns one per target.
//!
//! Each admitted call carries a [`Ticket`]. Its result counts only while the breaker is still in
//! the phase that admitted it: a late answer to a call started before the breaker opened changes
//! nothing, and in the half-open phase only the probe decides.

use std::time::{Duration, Instant};

/// What a breaker reports about itself (for metrics and `drover workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail at once until the cool-down ends.
    Open,
    /// The cool-down is over: the next call (one at a time) is a probe.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The value of a state gauge: 0 closed, 1 half-open, 2 open.
    pub const fn gauge_value(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The breaker is open until `until`, after `failures` consecutive failures.
    Open {
        /// When the cool-down ends and a probe may go.
        until: Instant,
        /// The consecutive failures that opened it.
        failures: u32,
    },
    /// The cool-down is over but the one probe is still running.
    ProbeInFlight,
}

/// Proof that a call was admitted; hand it back with the call's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "report the call's result with the ticket"]
pub struct Ticket {
    generation: u64,
    probe: bool,
}

impl Ticket {
    /// Whether this call is the half-open probe.
    pub const fn is_probe(self) -> bool {
        self.probe
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed { consecutive: u32 },
    Open { until: Instant, failures: u32 },
    HalfOpen { probe_in_flight: bool },
}

/// One target's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    phase: Phase,
    /// Bumped on every phase change; tickets from an older phase are ignored.
    generation: u64,
}

impl Breaker {
    /// A closed breaker that opens after `failures` consecutive failures (a value of 0 acts as
    /// 1) and stays open for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            threshold: failures.max(1),
            cooldown,
            phase: Phase::Closed { consecutive: 0 },
            generation: 0,
        }
    }

    /// The state at `now` (an open breaker whose cool-down has ended reports half-open).
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.phase {
            Phase::Closed { .. } => CircuitState::Closed,
            Phase::Open { until, .. } if now < until => CircuitState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Consecutive failures counted so far in the closed phase.
    pub fn consecutive_failures(&self) -> u32 {
        match self.phase {
            Phase::Closed { consecutive } => consecutive,
            Phase::Open { failures, .. } => failures,
            Phase::HalfOpen { .. } => self.threshold,
        }
    }

    /// Asks to start a call at `now`.
    pub fn try_acquire(&mut self, now: Instant) -> Result<Ticket, Rejection> {
        match self.phase {
            Phase::Closed { .. } => Ok(self.ticket(false)),
            Phase::Open { until, failures } if now < until => {
                Err(Rejection::Open { until, failures })
            }
            Phase::Open { .. }
            | Phase::HalfOpen {
                probe_in_flight: false,
            } => {
                self.enter(Phase::HalfOpen {
                    probe_in_flight: true,
                });
                Ok(self.ticket(true))
            }
            Phase::HalfOpen {
                probe_in_flight: true,
            } => Err(Rejection::ProbeInFlight),
        }
    }

    /// The admitted call succeeded: a closed breaker forgets its failures, a probe closes it.
    pub fn on_success(&mut self, ticket: Ticket) {
        if ticket.generation != self.generation {
            return;
        }
        match self.phase {
            Phase::Closed { .. } => self.phase = Phase::Closed { consecutive: 0 },
            Phase::HalfOpen { .. } if ticket.probe => self.enter(Phase::Closed { consecutive: 0 }),
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }

    /// The admitted call failed at `now`: count it, opening the breaker at the threshold; a
    /// failed probe opens it again for a full cool-down.
    pub fn on_failure(&mut self, ticket: Ticket, now: Instant) {
        if ticket.generation != self.generation {
            return;
        }
        match self.phase {
            Phase::Closed { consecutive } => {
                let consecutive = consecutive.saturating_add(1);
                if consecutive >= self.threshold {
                    self.open(now, consecutive);
                } else {
                    self.phase = Phase::Closed { consecutive };
                }
            }
            Phase::HalfOpen { .. } if ticket.probe => self.open(now, self.threshold),
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }

    /// The admitted call ended without saying anything about the target (it was cancelled):
    /// a probe frees its slot so the next call probes instead.
    pub fn on_abandoned(&mut self, ticket: Ticket) {
        if ticket.generation == self.generation && ticket.probe {
            self.phase = Phase::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    fn open(&mut self, now: Instant, failures: u32) {
        // A cool-down too long for the clock ends "never" in practice (about a century).
        let until = now
            .checked_add(self.cooldown)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        self.enter(Phase::Open { until, failures });
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.generation = self.generation.wrapping_add(1);
    }

    fn ticket(&self, probe: bool) -> Ticket {
        Ticket {
            generation: self.generation,
            probe,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One step of a table test: what happens at `at` ms and what the breaker must say after.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A call is admitted, then fails at the same time.
        Fail,
        /// A call is admitted, then succeeds.
        Succeed,
        /// A call must be rejected because the breaker is open until `t0 + .0` ms.
        RejectOpenUntil(u64),
    }

    fn run(threshold: u32, steps: &[(u64, Step, CircuitState)]) {
        let t0 = Instant::now();
        let mut b = Breaker::new(threshold, COOL);
        for (i, &(at, step, want)) in steps.iter().enumerate() {
            let now = t0 + ms(at);
            match step {
                Step::Fail => {
                    let t = b
                        .try_acquire(now)
                        .unwrap_or_else(|e| panic!("step {i}: {e:?}"));
                    b.on_failure(t, now);
                }
                Step::Succeed => {
                    let t = b
                        .try_acquire(now)
                        .unwrap_or_else(|e| panic!("step {i}: {e:?}"));
                    b.on_success(t);
                }
                Step::RejectOpenUntil(until) => match b.try_acquire(now) {
                    Err(Rejection::Open { until: u, .. }) => {
                        assert_eq!(u, t0 + ms(until), "step {i}")
                    }
                    other => panic!("step {i}: expected open, got {other:?}"),
                },
            }
            assert_eq!(b.state(now), want, "step {i} ({step:?} at {at} ms)");
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        use CircuitState::*;
        use Step::*;
        run(
            3,
            &[
                (0, Fail, Closed),
                (1, Fail, Closed),
                (2, Succeed, Closed), // resets the count
                (3, Fail, Closed),
                (4, Fail, Closed),
                (5, Fail, Open), // third in a row
                (6, RejectOpenUntil(10_005), Open),
                (10_004, RejectOpenUntil(10_005), Open),
            ],
        );
    }

    #[test]
    fn half_open_probe_closes_on_success() {
        use CircuitState::*;
        use Step::*;
        run(
            1,
            &[
                (0, Fail, Open),
                (9_999, RejectOpenUntil(10_000), Open),
                (10_000, Succeed, Closed),
                (10_001, Succeed, Closed),
                (10_002, Fail, Open),
            ],
        );
    }

    #[test]
    fn failed_probe_reopens_for_a_full_cooldown() {
        use CircuitState::*;
        use Step::*;
        run(
            2,
            &[
                (0, Fail, Closed),
                (0, Fail, Open),
                (12_000, Fail, Open),
                (12_001, RejectOpenUntil(22_000), Open),
                (22_000, Succeed, Closed),
            ],
        );
    }

    #[test]
    fn only_one_probe_at_a_time() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        let t = b.try_acquire(t0).unwrap();
        b.on_failure(t, t0);
        let later = t0 + COOL;
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        let probe = b.try_acquire(later).unwrap();
        assert!(probe.is_probe());
        assert_eq!(b.try_acquire(later), Err(Rejection::ProbeInFlight));
        // A cancelled probe frees the slot; the next call probes.
        b.on_abandoned(probe);
        let probe2 = b.try_acquire(later).unwrap();
        assert!(probe2.is_probe());
        b.on_success(probe2);
        assert_eq!(b.state(later), CircuitState::Closed);
    }

    #[test]
    fn results_of_an_earlier_phase_are_ignored() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, COOL);
        // Three calls start while closed.
        let a = b.try_acquire(t0).unwrap();
        let c = b.try_acquire(t0).unwrap();
        let d = b.try_acquire(t0).unwrap();
        b.on_failure(a, t0);
        b.on_failure(c, t0);
        assert_eq!(b.state(t0), CircuitState::Open);
        // A late success of a call from the closed phase does not close it.
        b.on_success(d);
        assert_eq!(b.state(t0 + ms(1)), CircuitState::Open);
        // Nor does a late failure extend the cool-down.
        b.on_failure(d, t0 + ms(5_000));
        assert!(matches!(
            b.try_acquire(t0 + ms(5_001)),
            Err(Rejection::Open { until, failures: 2 }) if until == t0 + COOL
        ));
        // A closed-phase ticket answering during half-open changes nothing either.
        let probe = b.try_acquire(t0 + COOL).unwrap();
        b.on_success(d);
        b.on_abandoned(d);
        assert_eq!(b.try_acquire(t0 + COOL), Err(Rejection::ProbeInFlight));
        b.on_success(probe);
        assert_eq!(b.state(t0 + COOL), CircuitState::Closed);
    }

    #[test]
    fn zero_threshold_acts_as_one_and_huge_cooldown_does_not_panic() {
        let t0 = Instant::now();
        let mut b = Breaker::new(0, Duration::MAX);
        let t = b.try_acquire(t0).unwrap();
        b.on_failure(t, t0);
        // `now + Duration::MAX` overflows: the breaker still opens, for a very long time.
        assert_eq!(b.state(t0 + Duration::from_secs(3600)), CircuitState::Open);
    }

    #[test]
    fn state_names_and_gauge_values() {
        assert_eq!(CircuitState::Closed.as_str(), "closed");
        assert_eq!(CircuitState::HalfOpen.as_str(), "half_open");
        assert_eq!(CircuitState::Open.as_str(), "open");
        assert_eq!(CircuitState::Closed.gauge_value(), 0);
        assert_eq!(CircuitState::HalfOpen.gauge_value(), 1);
        assert_eq!(CircuitState::Open.gauge_value(), 2);
    }
}
