//! The `least_loaded` strategy (SPEC §4): keyless tasks go to the partition of their queue with
//! the fewest pending messages.
//!
//! A partition's load is what its durable consumer holds: messages not yet delivered
//! (`num_pending`) plus delivered and not yet acked (`num_ack_pending`, the batch a worker is
//! running). A busy or stuck worker's partitions fill up, so new keyless work goes elsewhere.
//! The leader reads the P consumers at most every [`REFRESH`] and, in between, counts the
//! tasks it sent itself, so a burst spreads instead of piling onto the partition that was
//! emptiest at the last reading. Ties are broken in round-robin order. Pure: the shell in
//! `leader` feeds observations and asks for picks.

use std::time::{Duration, Instant};

/// How old an observation of the partitions' loads may get before the leader reads them again.
pub const REFRESH: Duration = Duration::from_millis(250);

/// Estimated pending messages per partition of one queue.
#[derive(Debug, Clone)]
pub struct Loads {
    pending: Vec<u64>,
    observed_at: Option<Instant>,
}

impl Loads {
    /// No observation yet for `partitions` partitions.
    pub fn new(partitions: u32) -> Self {
        Self {
            pending: vec![0; partitions.max(1) as usize],
            observed_at: None,
        }
    }

    /// `true` when there is no observation younger than [`REFRESH`] at `now`.
    pub fn needs_refresh(&self, now: Instant) -> bool {
        self.observed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH)
    }

    /// Takes a reading: `pending[p]` for the partitions read (`None`: unreadable, keep the
    /// estimate).
    pub fn observe(&mut self, pending: &[Option<u64>], now: Instant) {
        for (estimate, seen) in self.pending.iter_mut().zip(pending) {
            if let Some(n) = seen {
                *estimate = *n;
            }
        }
        self.observed_at = Some(now);
    }

    /// The least loaded partition, scanning from `start` (the round-robin turn) so that ties
    /// rotate; counts `tasks` more pending on it.
    pub fn pick(&mut self, start: u32, tasks: u64) -> u32 {
        let n = self.pending.len();
        let start = start as usize % n;
        let best = (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&p| self.pending[p])
            .unwrap_or(0);
        self.pending[best] = self.pending[best].saturating_add(tasks);
        best as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_partition_with_the_fewest_pending() {
        let mut l = Loads::new(4);
        l.observe(&[Some(50), Some(3), Some(40), Some(7)], Instant::now());
        assert_eq!(l.pick(0, 1), 1);
    }

    #[test]
    fn own_dispatches_count_until_the_next_reading() {
        let t0 = Instant::now();
        let mut l = Loads::new(3);
        l.observe(&[Some(10), Some(0), Some(2)], t0);
        let picks: Vec<u32> = (0..5).map(|i| l.pick(i, 1)).collect();
        // 1 takes two (0 → 1 → 2 pending), then 2 and 1 share; 0 (10 pending) gets none.
        assert_eq!(picks, [1, 1, 2, 1, 1]);
        // An array counts as many tasks as it holds.
        let mut l = Loads::new(2);
        l.observe(&[Some(0), Some(5)], t0);
        assert_eq!(l.pick(0, 100), 0);
        assert_eq!(l.pick(0, 1), 1);
    }

    #[test]
    fn ties_rotate_from_the_round_robin_turn() {
        let mut l = Loads::new(4);
        l.observe(&[Some(0); 4], Instant::now());
        assert_eq!(l.pick(2, 0), 2);
        assert_eq!(l.pick(3, 0), 3);
        assert_eq!(l.pick(5, 0), 1);
    }

    #[test]
    fn unreadable_partitions_keep_their_estimate_and_readings_expire() {
        let t0 = Instant::now();
        let mut l = Loads::new(2);
        assert!(l.needs_refresh(t0));
        l.observe(&[Some(1), Some(9)], t0);
        l.observe(&[None, Some(0)], t0);
        assert_eq!(l.pick(0, 1), 1);
        assert!(!l.needs_refresh(t0 + REFRESH / 2));
        assert!(l.needs_refresh(t0 + REFRESH));
    }
}
