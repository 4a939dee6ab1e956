//! The worker's fence (SPEC §6): a pure state machine over heartbeat results and time. A worker
//! whose last successful heartbeat was *sent* more than `ttl − margin` ago may already have
//! been replaced (its key expired, its partitions moved), so it fences itself: it starts no
//! task, cancels running ones, and acks or NAKs nothing. Only a later successful heartbeat
//! (which re-registers the key) lifts the fence.
//!
//! Validity is counted from the heartbeat's send time, not its reply time, so a reply that took
//! long cannot stretch it; time is an input (`now`), so tests are exact.

use std::time::{Duration, Instant};

/// What the caller does after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceAction {
    /// Fence now: cancel the running attempts, abandon the batches in flight, pull nothing.
    Fence,
    /// The fence is lifted: pulling and starting may resume.
    Unfence,
}

/// The fence state machine.
#[derive(Debug, Clone)]
pub struct Fence {
    validity: Duration,
    last_ok_sent: Option<Instant>,
    fenced: bool,
}

impl Fence {
    /// A fence for a worker with `ttl` (the workers bucket's max_age) and safety `margin`. It
    /// starts fenced: nothing may start before the first successful heartbeat.
    pub fn new(ttl: Duration, margin: Duration) -> Self {
        Self {
            validity: ttl.saturating_sub(margin),
            last_ok_sent: None,
            fenced: true,
        }
    }

    /// `true` while fenced as of the last event (see [`Fence::check`] for the time-based test).
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// When the fence falls if no heartbeat succeeds before then (`None` while fenced).
    pub fn deadline(&self) -> Option<Instant> {
        if self.fenced {
            return None;
        }
        self.last_ok_sent.map(|t| t + self.validity)
    }

    /// `true` if, at `now`, the worker may act (start, ack, publish): not fenced and the last
    /// successful heartbeat still valid. Pure: does not change the state.
    pub fn may_act(&self, now: Instant) -> bool {
        !self.fenced && self.deadline().is_some_and(|d| now < d)
    }

    /// A heartbeat sent at `sent_at` succeeded (its reply came at `now`).
    pub fn on_heartbeat_ok(&mut self, sent_at: Instant, now: Instant) -> Option<FenceAction> {
        let newer = self.last_ok_sent.is_none_or(|t| sent_at > t);
        if newer {
            self.last_ok_sent = Some(sent_at);
        }
        let valid = self.last_ok_sent.is_some_and(|t| now < t + self.validity);
        if self.fenced && valid {
            self.fenced = false;
            return Some(FenceAction::Unfence);
        }
        self.check(now)
    }

    /// A heartbeat failed. Nothing changes until time runs out (see [`Fence::check`]).
    pub fn on_heartbeat_failed(&mut self, now: Instant) -> Option<FenceAction> {
        self.check(now)
    }

    /// Fences if the last successful heartbeat is too old at `now`.
    pub fn check(&mut self, now: Instant) -> Option<FenceAction> {
        if !self.fenced && !self.may_act(now) {
            self.fenced = true;
            return Some(FenceAction::Fence);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn starts_fenced_and_lifts_on_the_first_heartbeat() {
        let t0 = Instant::now();
        let mut f = Fence::new(3000 * MS, 500 * MS);
        assert!(f.is_fenced());
        assert!(!f.may_act(t0));
        assert_eq!(f.on_heartbeat_failed(t0), None);
        assert_eq!(
            f.on_heartbeat_ok(t0, t0 + 10 * MS),
            Some(FenceAction::Unfence)
        );
        assert!(f.may_act(t0 + 2499 * MS));
        assert!(!f.may_act(t0 + 2500 * MS));
        assert_eq!(f.deadline(), Some(t0 + 2500 * MS));
    }

    #[test]
    fn fences_from_the_send_time_of_the_last_success() {
        let t0 = Instant::now();
        let mut f = Fence::new(3000 * MS, 500 * MS);
        f.on_heartbeat_ok(t0, t0 + 2000 * MS);
        assert_eq!(f.check(t0 + 2400 * MS), None);
        assert_eq!(
            f.on_heartbeat_failed(t0 + 2500 * MS),
            Some(FenceAction::Fence)
        );
        assert_eq!(f.check(t0 + 9000 * MS), None, "fences once");
        // A late reply to an old heartbeat does not lift the fence.
        assert_eq!(f.on_heartbeat_ok(t0 + 1000 * MS, t0 + 9000 * MS), None);
        assert!(f.is_fenced());
        // A fresh one does.
        assert_eq!(
            f.on_heartbeat_ok(t0 + 9000 * MS, t0 + 9010 * MS),
            Some(FenceAction::Unfence)
        );
    }

    #[test]
    fn a_reply_that_arrives_after_its_own_validity_does_not_unfence() {
        let t0 = Instant::now();
        let mut f = Fence::new(3000 * MS, 500 * MS);
        assert_eq!(f.on_heartbeat_ok(t0, t0 + 2600 * MS), None);
        assert!(f.is_fenced());
    }

    #[test]
    fn a_stopped_process_fences_on_wake_before_anything_else() {
        // SIGSTOP for longer than the TTL: the first thing checked after waking fences.
        let t0 = Instant::now();
        let mut f = Fence::new(3000 * MS, 500 * MS);
        f.on_heartbeat_ok(t0, t0);
        let woke = t0 + 10_000 * MS;
        assert!(!f.may_act(woke));
        assert_eq!(f.check(woke), Some(FenceAction::Fence));
    }
}
