//! Tests of the retry policy (SPEC §1.1, §7): exact delay sequences, jitter bounds, overflow,
//! validation and the serde shape of `backoff`.

use std::time::Duration;

use drover_shared::retry::{
    Backoff, DEFAULT_MAX_ATTEMPTS, MAX_DELAY_MS, RetryDecision, RetryError, RetryPolicy,
};
use proptest::prelude::*;

fn ms(values: &[u64]) -> Vec<Duration> {
    values.iter().copied().map(Duration::from_millis).collect()
}

#[test]
fn default_sequence_without_jitter_doubles_up_to_the_cap() {
    let b = Backoff::default();
    let got: Vec<Duration> = (1..=9).map(|n| b.delay(n, 0.0)).collect();
    assert_eq!(
        got,
        ms(&[1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000])
    );
}

#[test]
fn custom_sequence() {
    let b = Backoff::new(250, 3.0, 10_000, 0.5).unwrap();
    let got: Vec<Duration> = (1..=6).map(|n| b.delay(n, 0.0)).collect();
    assert_eq!(got, ms(&[250, 750, 2250, 6750, 10000, 10000]));

    let linear = Backoff::new(500, 1.0, 500, 0.0).unwrap();
    assert!((1..=50).all(|n| linear.delay(n, 1.0) == Duration::from_millis(500)));

    let fractional = Backoff::new(100, 1.5, 1_000, 0.0).unwrap();
    let got: Vec<Duration> = (1..=7).map(|n| fractional.delay(n, 0.0)).collect();
    // 100, 150, 225, 337.5 → 338, 506.25 → 506, 759.375 → 759, 1139.06 → capped
    assert_eq!(got, ms(&[100, 150, 225, 338, 506, 759, 1000]));
}

#[test]
fn iterator_form_matches_delay_and_resets() {
    let b = Backoff::default();
    let samples = [0.0, 1.0, -1.0, 0.5, 0.0, 0.0];
    let mut it = b.delays(samples);
    let first: Vec<Duration> = it.by_ref().take(4).collect();
    assert_eq!(first, ms(&[1000, 2400, 3200, 8800]));
    assert_eq!(it.next_retry(), 5);
    it.reset();
    assert_eq!(it.next_retry(), 1);
    assert_eq!(it.next(), Some(Duration::from_millis(1000)));
    assert_eq!(it.next(), Some(Duration::from_millis(2000)));
    assert_eq!(it.next(), None, "ends with the samples");

    let nominal: Vec<Duration> = b.delays(std::iter::repeat(0.0)).take(8).collect();
    let direct: Vec<Duration> = (1..=8).map(|n| b.delay(n, 0.0)).collect();
    assert_eq!(nominal, direct);
}

#[test]
fn extreme_samples_give_exactly_plus_minus_jitter() {
    let b = Backoff::default(); // jitter 0.2
    assert_eq!(b.delay(1, 1.0), Duration::from_millis(1200));
    assert_eq!(b.delay(1, -1.0), Duration::from_millis(800));
    assert_eq!(b.delay(3, 1.0), Duration::from_millis(4800));
    assert_eq!(b.delay(3, -1.0), Duration::from_millis(3200));
    assert_eq!(b.delay(20, 1.0), Duration::from_millis(72000));
    assert_eq!(b.delay(20, -1.0), Duration::from_millis(48000));
    assert_eq!(b.delay(2, 0.25), Duration::from_millis(2100));

    let full = Backoff::new(1000, 2.0, 60_000, 1.0).unwrap();
    assert_eq!(full.delay(1, -1.0), Duration::ZERO);
    assert_eq!(full.delay(1, 1.0), Duration::from_millis(2000));
}

#[test]
fn out_of_range_inputs_are_clamped_not_panics() {
    let b = Backoff::default();
    assert_eq!(b.delay(1, 7.0), b.delay(1, 1.0));
    assert_eq!(b.delay(1, -7.0), b.delay(1, -1.0));
    assert_eq!(b.delay(1, f64::NAN), b.delay(1, 0.0));
    assert_eq!(b.delay(1, f64::INFINITY), b.delay(1, 1.0));
    assert_eq!(
        b.delay(0, 0.0),
        b.delay(1, 0.0),
        "n = 0 counts as the first retry"
    );

    // Invalid values that were never validated still give a sane delay.
    let weird = Backoff {
        initial_ms: 1000,
        factor: f64::NAN,
        max_ms: 5000,
        jitter: f64::INFINITY,
    };
    assert_eq!(weird.delay(3, 0.0), Duration::from_millis(1000));
    let inverted = Backoff {
        initial_ms: 9000,
        factor: 2.0,
        max_ms: 5000,
        jitter: 0.0,
    };
    assert_eq!(inverted.delay(1, 0.0), Duration::from_millis(5000));
}

#[test]
fn huge_exponents_clamp_at_max() {
    let b = Backoff::new(1, 1e300, MAX_DELAY_MS, 0.0).unwrap();
    assert_eq!(b.delay(1, 0.0), Duration::from_millis(1));
    assert_eq!(b.delay(2, 0.0), Duration::from_millis(MAX_DELAY_MS));
    assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_millis(MAX_DELAY_MS));
    let d = Backoff::default();
    assert_eq!(d.delay(u32::MAX, 0.0), Duration::from_millis(60_000));
    assert_eq!(d.delay(1025, 0.0), Duration::from_millis(60_000));

    let zero = Backoff::new(0, 2.0, 0, 0.5).unwrap();
    assert_eq!(zero.delay(u32::MAX, 1.0), Duration::ZERO);
    let zero_initial = Backoff::new(0, 10.0, 1000, 0.5).unwrap();
    assert_eq!(zero_initial.delay(u32::MAX, 1.0), Duration::ZERO);
}

#[test]
fn validation_names_field_and_rule() {
    let cases: Vec<(Backoff, RetryError, &str)> = vec![
        (
            Backoff {
                factor: 0.5,
                ..Backoff::default()
            },
            RetryError::Factor(0.5),
            "backoff.factor",
        ),
        (
            Backoff {
                factor: f64::INFINITY,
                ..Backoff::default()
            },
            RetryError::Factor(f64::INFINITY),
            "backoff.factor",
        ),
        (
            Backoff {
                jitter: 1.5,
                ..Backoff::default()
            },
            RetryError::Jitter(1.5),
            "backoff.jitter",
        ),
        (
            Backoff {
                jitter: -0.1,
                ..Backoff::default()
            },
            RetryError::Jitter(-0.1),
            "backoff.jitter",
        ),
        (
            Backoff {
                initial_ms: 5000,
                max_ms: 4000,
                ..Backoff::default()
            },
            RetryError::MaxBelowInitial {
                initial_ms: 5000,
                max_ms: 4000,
            },
            "backoff.max_ms",
        ),
        (
            Backoff {
                max_ms: MAX_DELAY_MS + 1,
                ..Backoff::default()
            },
            RetryError::MaxTooLarge(MAX_DELAY_MS + 1),
            "backoff.max_ms",
        ),
    ];
    for (backoff, want, field) in cases {
        let err = backoff.validate().unwrap_err();
        assert_eq!(err, want);
        assert_eq!(err.field(), field);
        assert!(err.to_string().starts_with(field), "{err}");
    }

    let nan = Backoff {
        factor: f64::NAN,
        ..Backoff::default()
    };
    assert!(matches!(nan.validate(), Err(RetryError::Factor(f)) if f.is_nan()));
    let nan = Backoff {
        jitter: f64::NAN,
        ..Backoff::default()
    };
    assert!(matches!(nan.validate(), Err(RetryError::Jitter(j)) if j.is_nan()));

    assert!(Backoff::default().validate().is_ok());
    assert!(Backoff::new(0, 1.0, 0, 0.0).is_ok());
    assert!(Backoff::new(0, 1.0, MAX_DELAY_MS, 1.0).is_ok());

    for bad in [0, 101] {
        let err = RetryPolicy::new(bad, Backoff::default()).unwrap_err();
        assert_eq!(err, RetryError::MaxAttempts(bad));
        assert_eq!(err.field(), "max_attempts");
        assert_eq!(
            err.to_string(),
            format!("max_attempts must be between 1 and 100, got {bad}")
        );
    }
    assert!(RetryPolicy::new(1, Backoff::default()).is_ok());
    assert!(RetryPolicy::new(100, Backoff::default()).is_ok());
    let bad_backoff = RetryPolicy {
        max_attempts: 3,
        backoff: Backoff {
            jitter: 2.0,
            ..Backoff::default()
        },
    };
    assert_eq!(bad_backoff.validate(), Err(RetryError::Jitter(2.0)));
}

#[test]
fn serde_defaults_and_unknown_fields() {
    let b: Backoff = serde_json::from_str("{}").unwrap();
    assert_eq!(b, Backoff::default());
    assert_eq!(
        (b.initial_ms, b.factor, b.max_ms, b.jitter),
        (1000, 2.0, 60000, 0.2)
    );

    let b: Backoff = serde_json::from_str(r#"{"initial_ms":50,"jitter":0}"#).unwrap();
    assert_eq!(
        b,
        Backoff {
            initial_ms: 50,
            jitter: 0.0,
            ..Backoff::default()
        }
    );

    let err = serde_json::from_str::<Backoff>(r#"{"initial":50}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `initial`"), "{err}");
    assert!(serde_json::from_str::<Backoff>(r#"{"initial_ms":-1}"#).is_err());
    assert!(serde_json::from_str::<Backoff>(r#"{"factor":"2"}"#).is_err());

    let json = serde_json::to_value(Backoff::default()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"initial_ms":1000,"factor":2.0,"max_ms":60000,"jitter":0.2})
    );
    let back: Backoff = serde_json::from_value(json).unwrap();
    assert_eq!(back, Backoff::default());

    let p: RetryPolicy = serde_json::from_str(r#"{"backoff":{"max_ms":5000}}"#).unwrap();
    assert_eq!(p.max_attempts, DEFAULT_MAX_ATTEMPTS);
    assert_eq!(p.backoff.max_ms, 5000);
    assert_eq!(p.backoff.initial_ms, 1000);
    let err = serde_json::from_str::<RetryPolicy>(r#"{"retries":3}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `retries`"), "{err}");
    let err = serde_json::from_str::<RetryPolicy>(r#"{"backoff":{"x":1}}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `x`"), "{err}");
}

#[test]
fn decide_retries_until_max_attempts() {
    let p = RetryPolicy::default(); // 3 attempts
    assert_eq!(
        p.decide(1, true, 0.0),
        RetryDecision::Retry {
            attempt: 2,
            delay: Duration::from_millis(1000)
        }
    );
    assert_eq!(
        p.decide(2, true, 1.0),
        RetryDecision::Retry {
            attempt: 3,
            delay: Duration::from_millis(2400)
        }
    );
    assert_eq!(p.decide(3, true, 0.0), RetryDecision::GiveUp);
    assert_eq!(p.decide(4, true, 0.0), RetryDecision::GiveUp);
    assert_eq!(p.decide(1, false, 0.0), RetryDecision::GiveUp);
    assert_eq!(
        p.decide(0, true, 0.0),
        p.decide(1, true, 0.0),
        "attempt 0 counts as 1"
    );

    let once = RetryPolicy::new(1, Backoff::default()).unwrap();
    assert_eq!(once.decide(1, true, 0.0), RetryDecision::GiveUp);

    let many = RetryPolicy::new(100, Backoff::default()).unwrap();
    assert_eq!(
        many.decide(99, true, -1.0),
        RetryDecision::Retry {
            attempt: 100,
            delay: Duration::from_millis(48_000)
        }
    );
    assert_eq!(many.decide(100, true, 0.0), RetryDecision::GiveUp);
}

fn valid_backoff() -> impl Strategy<Value = Backoff> {
    (
        0u64..=100_000,
        1.0f64..=10.0,
        0u64..=MAX_DELAY_MS,
        0.0f64..=1.0,
    )
        .prop_map(|(initial_ms, factor, max_ms, jitter)| Backoff {
            initial_ms,
            factor,
            max_ms: max_ms.max(initial_ms),
            jitter,
        })
}

proptest! {
    // No regression files: integration tests have no lib.rs for proptest to put them next to.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn jittered_delay_stays_within_bounds(b in valid_backoff(), n in 0u32..=200, u in -1.0f64..=1.0) {
        prop_assert!(b.validate().is_ok());
        let nominal = b.nominal_ms(n);
        prop_assert!(nominal <= b.max_ms as f64);
        let d = b.delay(n, u).as_millis() as f64;
        // Rounded to whole milliseconds, so allow half a millisecond either side.
        prop_assert!(d >= nominal * (1.0 - b.jitter) - 0.5, "{d} < {nominal}·(1-{})", b.jitter);
        prop_assert!(d <= nominal * (1.0 + b.jitter) + 0.5, "{d} > {nominal}·(1+{})", b.jitter);
        prop_assert_eq!(b.delay(n, 0.0).as_millis() as f64, nominal.round());
    }

    #[test]
    fn delay_is_monotone_in_the_sample_and_the_retry(b in valid_backoff(), n in 1u32..=100, u in -1.0f64..=1.0, v in -1.0f64..=1.0) {
        let (lo, hi) = if u <= v { (u, v) } else { (v, u) };
        prop_assert!(b.delay(n, lo) <= b.delay(n, hi));
        prop_assert!(b.delay(n, 0.0) <= b.delay(n + 1, 0.0));
    }

    #[test]
    fn decide_never_exceeds_max_attempts(max in 1u32..=100, failed in 0u32..=200, retryable: bool, u in -1.0f64..=1.0) {
        let p = RetryPolicy::new(max, Backoff::default()).unwrap();
        match p.decide(failed, retryable, u) {
            RetryDecision::Retry { attempt, delay } => {
                prop_assert!(retryable);
                prop_assert_eq!(attempt, failed.max(1) + 1);
                prop_assert!(attempt <= max);
                prop_assert_eq!(delay, p.backoff.delay(failed, u));
            }
            RetryDecision::GiveUp => prop_assert!(!retryable || failed.max(1) >= max),
        }
    }
}
