//! What to write for one queue, given what is stored: the pure core of the compare-and-set
//! step ([`super::reconcile`]).

use super::plan::Target;
use super::record::AssignmentRecord;
use drover_shared::ring::{self, RingError};

/// What to do about one queue's stored assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The stored record comes from a later term: this leader has been deposed; write nothing.
    Deposed {
        /// The stored record's epoch.
        stored_epoch: u64,
    },
    /// The stored record is already what this leader would write.
    Unchanged,
    /// Write this record (by compare-and-set on the revision that was read).
    Write(AssignmentRecord),
}

/// The decision for `target` given the `stored` record of `assignment.<queue>` (if any), for a
/// leader in term `epoch`.
///
/// The new assignment is [`ring::rebalance`] sticky to the stored one, so a membership change
/// moves few partitions; with no live member it is empty (nobody pulls). It is written when it
/// differs from the stored one — or when the stored one comes from an earlier term: the first
/// write of a term stamps its epoch on every queue, so a deposed leader's late compare-and-set
/// fails even where the assignment itself did not change. `version` is the stored one plus 1.
pub fn decide(
    target: &Target,
    stored: Option<&AssignmentRecord>,
    epoch: u64,
) -> Result<Decision, RingError> {
    if let Some(s) = stored
        && s.epoch > epoch
    {
        return Ok(Decision::Deposed {
            stored_epoch: s.epoch,
        });
    }
    let prev = stored.map(AssignmentRecord::assignment);
    let next = ring::rebalance(
        prev.as_ref(),
        &target.queue,
        target.partitions,
        &target.members,
    )?
    .unwrap_or_default();
    if let Some(s) = stored
        && s.epoch == epoch
        && s.partitions == *next.partitions()
        && s.members == *next.members()
    {
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Write(AssignmentRecord {
        epoch,
        version: stored.map_or(0, |s| s.version) + 1,
        partitions: next.partitions().clone(),
        members: next.members().clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::ring::Member;

    const EPOCH: u64 = 42;

    fn target(queue: &str, partitions: u32, members: &[(&str, u32)]) -> Target {
        Target {
            queue: queue.into(),
            partitions,
            members: members.iter().map(|(id, w)| Member::new(*id, *w)).collect(),
        }
    }

    fn written(d: Decision) -> AssignmentRecord {
        match d {
            Decision::Write(r) => r,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn decide_writes_sticky_versioned_assignments_once() {
        let t = target("default", 16, &[("a", 1), ("b", 2), ("c", 1)]);
        let first = written(decide(&t, None, EPOCH).unwrap());
        assert_eq!((first.epoch, first.version), (EPOCH, 1));
        assert_eq!(first.partitions.len(), 16);
        assert_eq!(first.members.len(), 3);
        for (id, w) in [("a", 1), ("b", 2), ("c", 1)] {
            let cap = ring::max_load(16, w, 4) as usize;
            assert!(first.owned_by(id).count() <= cap);
        }
        // Same members, same term: nothing to write.
        assert_eq!(decide(&t, Some(&first), EPOCH), Ok(Decision::Unchanged));
        // A join moves at most twice what the newcomer gains; the version goes up.
        let t2 = target("default", 16, &[("a", 1), ("b", 2), ("c", 1), ("d", 1)]);
        let second = written(decide(&t2, Some(&first), EPOCH).unwrap());
        assert_eq!(second.version, 2);
        let gained = second.owned_by("d").count();
        assert!(gained > 0);
        assert!(ring::moved(&first.assignment(), &second.assignment()) <= 2 * gained);
        // A new term stamps its epoch even though nothing moved.
        let stamped = written(decide(&t2, Some(&second), EPOCH + 1).unwrap());
        assert_eq!((stamped.epoch, stamped.version), (EPOCH + 1, 3));
        assert_eq!(stamped.partitions, second.partitions);
        // A later term's record: refuse.
        assert_eq!(
            decide(&t2, Some(&stamped), EPOCH),
            Ok(Decision::Deposed {
                stored_epoch: EPOCH + 1
            })
        );
    }

    #[test]
    fn decide_empties_a_queue_without_workers_once() {
        let t = target("default", 16, &[("a", 1)]);
        let first = written(decide(&t, None, EPOCH).unwrap());
        let empty = target("default", 16, &[]);
        let second = written(decide(&empty, Some(&first), EPOCH).unwrap());
        assert!(second.partitions.is_empty() && second.members.is_empty());
        assert_eq!(
            decide(&empty, Some(&second), EPOCH),
            Ok(Decision::Unchanged)
        );
        // Workers coming back get everything again.
        let third = written(decide(&t, Some(&second), EPOCH).unwrap());
        assert_eq!(third.owned_by("a").count(), 16);
        // No record and no workers: an empty record is written (once).
        let fresh = written(decide(&empty, None, EPOCH).unwrap());
        assert_eq!((fresh.version, fresh.partitions.len()), (1, 0));
        assert_eq!(
            decide(&target("q", 0, &[("a", 1)]), None, EPOCH),
            Err(RingError::PartitionCount(0))
        );
    }
}
