//! The retry policy (SPEC §1.1, §7): how many attempts a task gets and how long to wait between
//! them.
//!
//! Everything here is pure. Randomness comes in as an argument — a *jitter sample* `u` in
//! `[-1, 1]` drawn by the caller — so the delay for a given sample is exact and tests need no
//! seeded generator:
//!
//! ```text
//! delay(n, u) = min(initial_ms · factorⁿ⁻¹, max_ms) · (1 + jitter · u)   (n = 1 after the first failure)
//! ```
//!
//! rounded to the nearest millisecond. With `u` uniform in `[-1, 1]` this is the SPEC's
//! `(1 ± jitter·u)` with `u` uniform in `[0, 1]` and a fair sign.
//!
//! [`Backoff`] is the task's `backoff` object and a serde value: unknown fields are an error and
//! missing ones take the defaults. Deserializing does not validate (so that a caller can report
//! the offending field per SPEC §1.5); call [`Backoff::validate`] or [`RetryPolicy::validate`].
//! The delay functions never panic, whatever the values: non-finite or out-of-range numbers
//! are clamped.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `backoff.initial_ms`: the delay before the first retry.
pub const DEFAULT_INITIAL_MS: u64 = 1_000;
/// Default `backoff.factor`: the growth of the delay per retry.
pub const DEFAULT_FACTOR: f64 = 2.0;
/// Default `backoff.max_ms`: the delay cap before jitter.
pub const DEFAULT_MAX_MS: u64 = 60_000;
/// Default `backoff.jitter`: the relative spread of a delay around its nominal value.
pub const DEFAULT_JITTER: f64 = 0.2;
/// The largest accepted `backoff.max_ms`: seven days.
pub const MAX_DELAY_MS: u64 = 7 * 24 * 60 * 60 * 1_000;
/// Default `max_attempts`: total attempts before a task is `failed`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The largest accepted `max_attempts`.
pub const MAX_ATTEMPTS: u32 = 100;

/// A field of a retry policy that failed validation, with the rule it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RetryError {
    /// `max_attempts` is outside `1..=100`.
    #[error("max_attempts must be between 1 and {MAX_ATTEMPTS}, got {0}")]
    MaxAttempts(u32),
    /// `backoff.factor` is not a finite number ≥ 1.
    #[error("backoff.factor must be a finite number >= 1.0, got {0}")]
    Factor(f64),
    /// `backoff.jitter` is not a number in `[0, 1]`.
    #[error("backoff.jitter must be a number between 0.0 and 1.0, got {0}")]
    Jitter(f64),
    /// `backoff.max_ms` is above [`MAX_DELAY_MS`].
    #[error("backoff.max_ms must be at most {MAX_DELAY_MS} (7 days), got {0}")]
    MaxTooLarge(u64),
    /// `backoff.max_ms` is below `backoff.initial_ms`.
    #[error("backoff.max_ms ({max_ms}) must be >= backoff.initial_ms ({initial_ms})")]
    MaxBelowInitial {
        /// The configured `initial_ms`.
        initial_ms: u64,
        /// The configured `max_ms`.
        max_ms: u64,
    },
}

impl RetryError {
    /// The path of the offending field in a task object, for the `field` of an error reply
    /// (SPEC §1.5).
    pub fn field(&self) -> &'static str {
        match self {
            Self::MaxAttempts(_) => "max_attempts",
            Self::Factor(_) => "backoff.factor",
            Self::Jitter(_) => "backoff.jitter",
            Self::MaxTooLarge(_) | Self::MaxBelowInitial { .. } => "backoff.max_ms",
        }
    }
}

/// Exponential backoff with jitter: the task's `backoff` object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// The nominal delay before the first retry, in milliseconds (default 1000).
    pub initial_ms: u64,
    /// The factor the nominal delay grows by per retry; finite, ≥ 1 (default 2.0).
    pub factor: f64,
    /// The cap on the nominal delay, in milliseconds; `initial_ms..=MAX_DELAY_MS` (default 60000).
    pub max_ms: u64,
    /// The relative spread of each delay, in `[0, 1]` (default 0.2): a delay `d` becomes a value
    /// in `[d·(1 − jitter), d·(1 + jitter)]`.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: DEFAULT_INITIAL_MS,
            factor: DEFAULT_FACTOR,
            max_ms: DEFAULT_MAX_MS,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl Backoff {
    /// A validated backoff.
    pub fn new(initial_ms: u64, factor: f64, max_ms: u64, jitter: f64) -> Result<Self, RetryError> {
        let backoff = Self {
            initial_ms,
            factor,
            max_ms,
            jitter,
        };
        backoff.validate()?;
        Ok(backoff)
    }

    /// The same backoff without jitter.
    pub const fn without_jitter(self) -> Self {
        Self {
            jitter: 0.0,
            ..self
        }
    }

    /// Checks every field against its rule; the first broken one is the error.
    pub fn validate(&self) -> Result<(), RetryError> {
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(RetryError::Factor(self.factor));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(RetryError::Jitter(self.jitter));
        }
        if self.max_ms > MAX_DELAY_MS {
            return Err(RetryError::MaxTooLarge(self.max_ms));
        }
        if self.max_ms < self.initial_ms {
            return Err(RetryError::MaxBelowInitial {
                initial_ms: self.initial_ms,
                max_ms: self.max_ms,
            });
        }
        Ok(())
    }

    /// The nominal delay of retry `n` in milliseconds, before jitter:
    /// `min(initial_ms · factorⁿ⁻¹, max_ms)`. `n = 0` counts as 1; any overflow clamps at
    /// `max_ms`.
    pub fn nominal_ms(&self, n: u32) -> f64 {
        let initial = self.initial_ms as f64;
        let max = self.max_ms as f64;
        if self.initial_ms == 0 || self.max_ms == 0 {
            return 0.0;
        }
        let exponent = i32::try_from(n.max(1) - 1).unwrap_or(i32::MAX);
        let factor = if self.factor.is_finite() {
            self.factor.max(1.0)
        } else {
            1.0
        };
        let nominal = initial * factor.powi(exponent);
        if nominal.is_finite() {
            nominal.min(max)
        } else {
            max
        }
    }

    /// The delay before retry `n` (`n = 1` after the first failed attempt) for the jitter
    /// sample `sample` in `[-1, 1]`: `nominal · (1 + jitter · sample)`, rounded to the nearest
    /// millisecond. A sample outside `[-1, 1]` is clamped into it, NaN counts as 0.
    pub fn delay(&self, n: u32, sample: f64) -> Duration {
        let sample = if sample.is_nan() {
            0.0
        } else {
            sample.clamp(-1.0, 1.0)
        };
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        let ms = (self.nominal_ms(n) * (1.0 + jitter * sample)).round();
        // `ms` is finite and in [0, 2·max_ms]; the float → int cast saturates anyway.
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The delays of retries 1, 2, 3, … paired with `samples` (one per delay); the iterator
    /// ends when `samples` does. `std::iter::repeat(0.0)` gives the nominal sequence.
    pub fn delays<I: IntoIterator<Item = f64>>(self, samples: I) -> Delays<I::IntoIter> {
        Delays {
            backoff: self,
            retry: 0,
            samples: samples.into_iter(),
        }
    }
}

/// The successive delays of a [`Backoff`], one per jitter sample (see [`Backoff::delays`]).
#[derive(Debug, Clone)]
pub struct Delays<I> {
    backoff: Backoff,
    retry: u32,
    samples: I,
}

impl<I> Delays<I> {
    /// Starts over at retry 1 (for instance after a success), keeping the remaining samples.
    pub fn reset(&mut self) {
        self.retry = 0;
    }

    /// The number of the retry whose delay the next call to `next` returns.
    pub fn next_retry(&self) -> u32 {
        self.retry.saturating_add(1)
    }
}

impl<I: Iterator<Item = f64>> Iterator for Delays<I> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let sample = self.samples.next()?;
        self.retry = self.retry.saturating_add(1);
        Some(self.backoff.delay(self.retry, sample))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.samples.size_hint()
    }
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run attempt `attempt` after `delay` (state `retrying`, timer in `DROVER_DELAYED`).
    Retry {
        /// The number of the next attempt (the failed one plus one).
        attempt: u32,
        /// How long to wait before it.
        delay: Duration,
    },
    /// Stop: the error is not retryable or the attempts are used up (state `failed`, a copy in
    /// the DLQ).
    GiveUp,
}

/// How many attempts a task gets and how long it waits between them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total attempts before `failed`, `1..=100` (default 3); 1 means no retry.
    pub max_attempts: u32,
    /// The delay between attempts.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: Backoff::default(),
        }
    }
}

impl RetryPolicy {
    /// A validated policy.
    pub fn new(max_attempts: u32, backoff: Backoff) -> Result<Self, RetryError> {
        let policy = Self {
            max_attempts,
            backoff,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks `max_attempts` and the backoff; the first broken rule is the error.
    pub fn validate(&self) -> Result<(), RetryError> {
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(RetryError::MaxAttempts(self.max_attempts));
        }
        self.backoff.validate()
    }

    /// The decision after attempt `failed_attempt` (1-based; 0 counts as 1) failed: give up if
    /// the error is not retryable or it was the last allowed attempt, else retry after
    /// `backoff.delay(failed_attempt, sample)`, with `sample` the caller's uniform draw in
    /// `[-1, 1]`.
    pub fn decide(&self, failed_attempt: u32, retryable: bool, sample: f64) -> RetryDecision {
        let failed_attempt = failed_attempt.max(1);
        if !retryable || failed_attempt >= self.max_attempts {
            return RetryDecision::GiveUp;
        }
        RetryDecision::Retry {
            attempt: failed_attempt + 1,
            delay: self.backoff.delay(failed_attempt, sample),
        }
    }
}
