//! The dispatch batcher (SPEC §3, issue "intake"): tasks accumulate per `(queue, partition)` and
//! leave as one envelope when the batch reaches `max_batch` tasks or `max_batch_bytes`, when its
//! oldest task has waited `linger`, or at once when the intake goes idle (adaptive linger: a lone
//! task is never held back waiting for company).
//!
//! Pure: items are opaque, time is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Flush rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most tasks per envelope.
    pub max_batch: usize,
    /// Most plaintext bytes per envelope (before compression).
    pub max_batch_bytes: usize,
    /// Longest a task waits for others while the intake is busy.
    pub linger: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_batch_bytes: 256 * 1024,
            linger: Duration::from_millis(1),
        }
    }
}

/// Where a batch goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// Queue name.
    pub queue: String,
    /// Partition of the queue.
    pub partition: u32,
}

/// A batch ready to be sealed and published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<T> {
    /// Destination.
    pub route: Route,
    /// Items in arrival order.
    pub items: Vec<T>,
    /// Sum of the items' sizes.
    pub bytes: usize,
}

#[derive(Debug)]
struct Pending<T> {
    items: Vec<T>,
    bytes: usize,
    since: Instant,
}

/// Per-partition accumulation.
#[derive(Debug)]
pub struct Batcher<T> {
    cfg: BatcherConfig,
    pending: BTreeMap<Route, Pending<T>>,
}

impl<T> Batcher<T> {
    /// An empty batcher.
    pub fn new(cfg: BatcherConfig) -> Self {
        Self {
            cfg,
            pending: BTreeMap::new(),
        }
    }

    /// `true` when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Items waiting, over all partitions.
    pub fn len(&self) -> usize {
        self.pending.values().map(|p| p.items.len()).sum()
    }

    /// Adds `item` of `size` bytes for `route`. Returns the batches that must leave now: the
    /// partition's pending batch if this item would push it past `max_batch_bytes` (so a batch
    /// never exceeds the byte limit unless a single item does), and the batch this item
    /// completes.
    pub fn push(&mut self, route: Route, item: T, size: usize, now: Instant) -> Vec<Batch<T>> {
        let mut out = Vec::new();
        let cfg = self.cfg;
        if let Some(p) = self.pending.get(&route)
            && !p.items.is_empty()
            && p.bytes + size > cfg.max_batch_bytes
            && let Some(b) = self.take(&route)
        {
            out.push(b);
        }
        let p = self
            .pending
            .entry(route.clone())
            .or_insert_with(|| Pending {
                items: Vec::new(),
                bytes: 0,
                since: now,
            });
        p.items.push(item);
        p.bytes += size;
        if p.items.len() >= cfg.max_batch.max(1) || p.bytes >= cfg.max_batch_bytes {
            out.extend(self.take(&route));
        }
        out
    }

    /// Batches whose oldest item has waited `linger` by `now`.
    pub fn flush_due(&mut self, now: Instant) -> Vec<Batch<T>> {
        let linger = self.cfg.linger;
        let due: Vec<Route> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= linger)
            .map(|(r, _)| r.clone())
            .collect();
        due.iter().filter_map(|r| self.take(r)).collect()
    }

    /// Every pending batch (the intake is idle, or the leader is handing over).
    pub fn flush_all(&mut self) -> Vec<Batch<T>> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(route, p)| Batch {
                route,
                items: p.items,
                bytes: p.bytes,
            })
            .collect()
    }

    /// When the oldest pending batch is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| p.since + self.cfg.linger)
            .min()
    }

    fn take(&mut self, route: &Route) -> Option<Batch<T>> {
        self.pending.remove(route).map(|p| Batch {
            route: route.clone(),
            items: p.items,
            bytes: p.bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: u32) -> Route {
        Route {
            queue: "q".into(),
            partition: p,
        }
    }

    fn cfg(max_batch: usize, max_bytes: usize) -> BatcherConfig {
        BatcherConfig {
            max_batch,
            max_batch_bytes: max_bytes,
            linger: Duration::from_millis(5),
        }
    }

    #[test]
    fn flushes_on_count() {
        let t = Instant::now();
        let mut b = Batcher::new(cfg(3, 1 << 20));
        assert!(b.push(r(0), 1, 10, t).is_empty());
        assert!(b.push(r(1), 9, 10, t).is_empty());
        assert!(b.push(r(0), 2, 10, t).is_empty());
        let out = b.push(r(0), 3, 10, t);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].items, vec![1, 2, 3]);
        assert_eq!(out[0].bytes, 30);
        assert_eq!(b.len(), 1, "partition 1 still waits");
    }

    #[test]
    fn never_exceeds_the_byte_limit_unless_one_item_does() {
        let t = Instant::now();
        let mut b = Batcher::new(cfg(100, 100));
        assert!(b.push(r(0), 'a', 60, t).is_empty());
        let out = b.push(r(0), 'b', 60, t);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].items.clone(), out[0].bytes), (vec!['a'], 60));
        // A single oversized item leaves alone, after flushing what was there.
        let out = b.push(r(0), 'c', 500, t);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].items, vec!['b']);
        assert_eq!(out[1].items, vec!['c']);
        assert!(b.is_empty());
    }

    #[test]
    fn linger_and_idle_flush() {
        let t = Instant::now();
        let mut b = Batcher::new(cfg(100, 1 << 20));
        b.push(r(0), 1, 1, t);
        b.push(r(1), 2, 1, t + Duration::from_millis(3));
        assert_eq!(b.next_deadline(), Some(t + Duration::from_millis(5)));
        assert!(b.flush_due(t + Duration::from_millis(4)).is_empty());
        let due = b.flush_due(t + Duration::from_millis(5));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].route, r(0));
        let all = b.flush_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].items, vec![2]);
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn keeps_arrival_order_within_a_partition() {
        let t = Instant::now();
        let mut b = Batcher::new(cfg(1000, 1 << 20));
        for i in 0..500 {
            b.push(r(i % 3), i, 1, t);
        }
        for batch in b.flush_all() {
            assert!(batch.items.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
