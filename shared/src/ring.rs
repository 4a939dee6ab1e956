//! Partition → worker routing (SPEC §4): a consistent hash ring with virtual nodes and bounded
//! load, made sticky so that membership changes move few partitions.
//!
//! # The ring
//!
//! Every worker ([`Member`]) puts [`VNODES_PER_WEIGHT`] × `weight` virtual nodes on a 64-bit
//! ring; every partition of a queue has one point on the same ring. Both points are a stable hash
//! written out here ([`vnode_point`], [`partition_point`]: FNV-1a 64 over a domain-separated byte
//! string, then the MurmurHash3 `fmix64` finaliser), so every process on every platform builds the
//! same ring. Workers are sorted by id first; the order callers list them in never matters. The
//! *natural* owner of a partition is the worker of the first virtual node clockwise from its
//! point; walking further clockwise gives its second choice, and so on.
//!
//! # Bounded load
//!
//! No worker ever owns more than [`max_load`] = ⌈1.25·P·wᵢ/Σw⌉ partitions of a queue (the SPEC
//! cap). Fresh placement is stricter: a partition goes to the first worker clockwise whose load
//! is below its fair share [`fair_load`] = ⌈P·wᵢ/Σw⌉ (Mirrokni, Thorup and Zadimoghaddam's
//! bounded-load walk with ε = 0 plus rounding up). Starting close to the fair share leaves the
//! 25 % headroom of the SPEC cap free to absorb later joins without reshuffling.
//!
//! # Stickiness and the move bound
//!
//! A pure function of the worker set cannot keep the SPEC's move bound: when a worker joins,
//! every cap shrinks, and a greedy fill re-run from scratch cascades (partitions shift between
//! workers that did not change; in the tests a stateless fill moved over 20× what the joining
//! or leaving worker gained or lost). So the leader calls [`rebalance`] with the assignment it
//! published last, and the result depends on it:
//!
//! 1. **keep** — every partition whose previous owner is still a member stays where it is;
//! 2. **claim** — a worker that joined (absent from the previous [`Assignment::members`], or
//!    whose weight grew) takes partitions nearest first on the ring (by clockwise distance from
//!    the partition's point to the worker's next virtual node): first from workers above their
//!    new cap (which would have to shed them anyway), up to its own cap; then from workers above
//!    their exact fair share, up to its fair share;
//! 3. **shed** — a worker still above its SPEC cap releases its excess, the partitions farthest
//!    from its virtual nodes first;
//! 4. **place** — orphaned partitions (owner gone, or shed) walk the ring in ring order: a shed
//!    partition first looks for a joined worker below its cap, then any worker below its fair
//!    share; an orphan of a departed worker goes straight to the fair-share walk;
//! 5. **level** — the move budget left over (below) moves partitions from unchanged workers
//!    above their rounded-up fair share, most loaded first, to workers below theirs. Joins leave
//!    the other workers' loads where they were while their fair shares shrink; without this
//!    step those surpluses pile up over many events until a later join must shed more than the
//!    newcomer can take. With it, loads stay within one partition of the fair share.
//!
//! The **move budget** counts the moves the change itself accounts for — each partition claimed
//! by or shed to a joined worker, each orphan of a departed worker — minus each shed partition
//! that had to go to an unchanged worker. Levelling spends only a positive budget, one move per
//! partition. Hence, for a single join or leave of a worker `x`:
//!
//! * **Leave.** Nobody joined, so nothing is claimed; the total weight fell, so every cap grew
//!   and nobody sheds. `x`'s `ℓ` partitions move, and levelling adds at most `ℓ`:
//!   moved ≤ 2ℓ. (If `x` owned nothing, nothing moves.)
//! * **Join.** `x` never sheds or donates, so its gain `g` is at least claims + sheds sent to
//!   it; moved ≤ claims + sheds + levelling ≤ 2 × (claims + sheds sent to `x`) ≤ 2g — provided
//!   the sheds sent elsewhere do not outnumber `x`'s gains (the budget stays non-negative).
//!   That is the one step not guaranteed by construction: a shed reaches an unchanged worker
//!   only once `x` is at its SPEC cap, and because loads stay within one partition of the fair
//!   share, caps rarely bind at all. The property tests (`shared/tests/ring.rs`) check the
//!   bound over random fleets, weights, partition counts, and long sequences of joins and
//!   leaves; the worst ratio observed is exactly 2 (levelling spending its whole budget).
//!   A join always gives `x` at least one partition.
//!
//! [`assign`] is [`rebalance`] without a previous assignment: the deterministic fresh placement,
//! for a first assignment or a test. Calling [`rebalance`] with its own output and the same
//! members returns it unchanged (nothing joined or left, so the budget is zero).
//!
//! Building a [`Ring`] hashes 160·Σw virtual nodes (a few milliseconds for 200 workers of
//! weight up to 4); a [`Ring`] can be reused for every queue of the same worker set, where one
//! [`Ring::rebalance`] takes well under a millisecond for P = 1024.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Virtual nodes per unit of worker weight (SPEC §4).
pub const VNODES_PER_WEIGHT: u32 = 160;

/// The largest accepted worker weight. It bounds the ring's size (and so its build time): 200
/// workers of this weight make about two million virtual nodes.
pub const MAX_WEIGHT: u32 = 64;

/// The largest accepted partition count of a queue (SPEC §4 defaults to 64).
pub const MAX_PARTITIONS: u32 = 65_536;

/// Why a ring or an assignment could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The partition count is outside `1..=MAX_PARTITIONS`.
    #[error("partitions must be between 1 and {MAX_PARTITIONS}, got {0}")]
    PartitionCount(u32),
    /// The same worker id was listed more than once.
    #[error("worker {id:?} is listed more than once; worker ids must be unique")]
    DuplicateMember {
        /// The repeated worker id.
        id: String,
    },
    /// A worker's weight is above [`MAX_WEIGHT`].
    #[error("worker {id:?} has weight {weight}; weights must be between 1 and {MAX_WEIGHT}")]
    WeightTooLarge {
        /// The worker's id.
        id: String,
        /// The weight it asked for.
        weight: u32,
    },
}

/// A worker as the ring sees it: its id and its weight (its `capacity`, SPEC §6).
///
/// A weight of 0 means "takes no partitions" (for instance while draining): such a member is
/// dropped, exactly as if it had not been listed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// The worker id (its key in `drover-workers`).
    pub id: String,
    /// The ring weight, the worker's `capacity`; 1..=[`MAX_WEIGHT`], 0 = excluded.
    pub weight: u32,
}

impl Member {
    /// A member with the given id and weight.
    pub fn new(id: impl Into<String>, weight: u32) -> Self {
        Self {
            id: id.into(),
            weight,
        }
    }
}

/// Which worker owns each partition of one queue, and the members it was computed for.
///
/// Serialized as `{"partitions":{"0":"worker-a",...},"members":{"worker-a":1,...}}`; the leader
/// adds its `epoch` and `version` around it (SPEC §4). Keep `members` when storing it: it tells
/// the next [`rebalance`] which workers are new. An assignment read back from storage is only a
/// hint to [`rebalance`], which ignores owners that are no longer members and partitions out of
/// range; one computed here always has an owner for every partition `0..P`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    partitions: BTreeMap<u32, String>,
    #[serde(default)]
    members: BTreeMap<String, u32>,
}

impl Assignment {
    /// Builds an assignment from stored parts (partition → owner id, member id → weight), e.g.
    /// to resume after a leader change. If `members` is empty, [`rebalance`] takes the owners
    /// as the previous members.
    pub fn from_parts(partitions: BTreeMap<u32, String>, members: BTreeMap<String, u32>) -> Self {
        Self {
            partitions,
            members,
        }
    }

    /// The owner of `partition`, if it has one.
    pub fn owner(&self, partition: u32) -> Option<&str> {
        self.partitions.get(&partition).map(String::as_str)
    }

    /// Partition → owner id, in partition order.
    pub fn partitions(&self) -> &BTreeMap<u32, String> {
        &self.partitions
    }

    /// Member id → weight of the workers this assignment was computed for.
    pub fn members(&self) -> &BTreeMap<String, u32> {
        &self.members
    }

    /// The number of partitions that have an owner.
    pub fn len(&self) -> usize {
        self.partitions.len()
    }

    /// `true` if no partition has an owner.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// The partitions owned by `id`, ascending.
    pub fn owned_by<'a>(&'a self, id: &'a str) -> impl Iterator<Item = u32> + 'a {
        self.partitions
            .iter()
            .filter(move |(_, owner)| owner.as_str() == id)
            .map(|(&p, _)| p)
    }

    /// How many partitions `id` owns.
    pub fn load(&self, id: &str) -> usize {
        self.owned_by(id).count()
    }

    /// Owner id → number of partitions owned, for every owner.
    pub fn loads(&self) -> BTreeMap<&str, usize> {
        let mut loads = BTreeMap::new();
        for owner in self.partitions.values() {
            *loads.entry(owner.as_str()).or_insert(0) += 1;
        }
        loads
    }
}

/// The SPEC cap: the most partitions (of `partitions`) a worker of weight `weight` may own when
/// the members' weights sum to `total_weight`, ⌈1.25·P·w/Σw⌉ (it can exceed P for a dominant
/// worker). Returns 0 when `total_weight` is 0.
pub fn max_load(partitions: u32, weight: u32, total_weight: u64) -> u32 {
    ceil_div(
        5 * u128::from(partitions) * u128::from(weight),
        4 * u128::from(total_weight),
    )
}

/// A worker's fair share rounded up, ⌈P·w/Σw⌉: the limit of fresh placement and the target of a
/// joining worker. Returns 0 when `total_weight` is 0.
pub fn fair_load(partitions: u32, weight: u32, total_weight: u64) -> u32 {
    ceil_div(
        u128::from(partitions) * u128::from(weight),
        u128::from(total_weight),
    )
}

fn ceil_div(num: u128, den: u128) -> u32 {
    if den == 0 {
        return 0;
    }
    u32::try_from(num.div_ceil(den)).unwrap_or(u32::MAX)
}

/// The number of partitions whose owner differs between `before` and `after` (a partition
/// owned in only one of them counts as moved).
pub fn moved(before: &Assignment, after: &Assignment) -> usize {
    let changed_or_dropped = before
        .partitions
        .iter()
        .filter(|(p, owner)| after.partitions.get(p) != Some(owner))
        .count();
    let added = after
        .partitions
        .keys()
        .filter(|p| !before.partitions.contains_key(p))
        .count();
    changed_or_dropped + added
}

/// The ring point of virtual node `index` of worker `id`.
pub fn vnode_point(id: &str, index: u32) -> u64 {
    vnode_point_from(vnode_prefix(id), index)
}

/// The ring point of `partition` of `queue`.
pub fn partition_point(queue: &str, partition: u32) -> u64 {
    let h = fnv1a64(FNV64_OFFSET_BASIS, b"drover/partition/v1\0");
    let h = fnv1a64(h, queue.as_bytes());
    let h = fnv1a64(h, b"\0");
    fmix64(fnv1a64(h, &partition.to_be_bytes()))
}

const FNV64_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The FNV-1a 64 state after the part of a virtual node's input that depends only on the id.
fn vnode_prefix(id: &str) -> u64 {
    let h = fnv1a64(FNV64_OFFSET_BASIS, b"drover/vnode/v1\0");
    let h = fnv1a64(h, id.as_bytes());
    fnv1a64(h, b"\0")
}

fn vnode_point_from(prefix: u64, index: u32) -> u64 {
    fmix64(fnv1a64(prefix, &index.to_be_bytes()))
}

/// FNV-1a 64 continued from `state` over `bytes`.
fn fnv1a64(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV64_PRIME))
}

/// MurmurHash3's 64-bit finaliser: spreads inputs that differ only in their last bytes (FNV's
/// weak spot) over the whole ring.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A built hash ring over a set of members; reuse it for every queue of the same worker set.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Sorted by id, all with weight ≥ 1.
    members: Vec<Member>,
    total_weight: u64,
    /// Every virtual node as (point, member index), sorted.
    points: Vec<(u64, u32)>,
    /// Each member's virtual node points, sorted.
    member_points: Vec<Vec<u64>>,
}

impl Ring {
    /// Builds the ring of `workers` (any order; weight-0 members are dropped).
    pub fn new(workers: &[Member]) -> Result<Self, RingError> {
        let mut members: Vec<Member> = workers.iter().filter(|m| m.weight > 0).cloned().collect();
        members.sort();
        for pair in members.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(RingError::DuplicateMember {
                    id: pair[0].id.clone(),
                });
            }
        }
        if let Some(m) = members.iter().find(|m| m.weight > MAX_WEIGHT) {
            return Err(RingError::WeightTooLarge {
                id: m.id.clone(),
                weight: m.weight,
            });
        }
        let total_weight = members.iter().map(|m| u64::from(m.weight)).sum();
        let mut points = Vec::new();
        let mut member_points = Vec::with_capacity(members.len());
        for (i, m) in members.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            let prefix = vnode_prefix(&m.id);
            let mut own: Vec<u64> = (0..m.weight * VNODES_PER_WEIGHT)
                .map(|v| vnode_point_from(prefix, v))
                .collect();
            own.sort_unstable();
            points.extend(own.iter().map(|&pt| (pt, idx)));
            member_points.push(own);
        }
        points.sort_unstable();
        Ok(Self {
            members,
            total_weight,
            points,
            member_points,
        })
    }

    /// The members, sorted by id (weight-0 members removed).
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// `true` if the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The sum of the members' weights.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Fresh placement of `partitions` partitions of `queue`; `None` when the ring is empty.
    pub fn assign(&self, queue: &str, partitions: u32) -> Result<Option<Assignment>, RingError> {
        self.rebalance(None, queue, partitions)
    }

    /// The new assignment of `queue`, moving as few partitions of `prev` as the bounds allow
    /// (see the module documentation); `None` when the ring is empty. `prev` is a hint: owners
    /// that are not members and partitions `>= partitions` in it are ignored.
    pub fn rebalance(
        &self,
        prev: Option<&Assignment>,
        queue: &str,
        partitions: u32,
    ) -> Result<Option<Assignment>, RingError> {
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(RingError::PartitionCount(partitions));
        }
        if self.members.is_empty() {
            return Ok(None);
        }
        let mut state = State::new(self, queue, partitions);
        if let Some(prev) = prev {
            state.keep(prev);
            state.claim();
            state.shed();
        }
        state.place(prev.is_some());
        state.level();
        Ok(Some(state.finish()))
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.members
            .binary_search_by(|m| m.id.as_str().cmp(id))
            .ok()
    }

    /// Clockwise distance from `point` to member `m`'s next virtual node.
    fn distance(&self, m: usize, point: u64) -> u64 {
        let own = &self.member_points[m];
        let i = own.partition_point(|&pt| pt < point);
        let next = own.get(i).or_else(|| own.first()).copied().unwrap_or(point);
        next.wrapping_sub(point)
    }

    /// Walks clockwise from `point` to the first member accepted by `ok`.
    fn walk(&self, point: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|&(pt, _)| pt < point);
        let (head, tail) = self.points.split_at(start);
        tail.iter()
            .chain(head)
            .map(|&(_, m)| m as usize)
            .find(|&m| ok(m))
    }
}

/// The working state of one [`Ring::rebalance`] call.
struct State<'r> {
    ring: &'r Ring,
    partitions: u32,
    /// Ring point of each partition.
    point: Vec<u64>,
    /// Owner (member index) of each partition, `None` while orphaned.
    owner: Vec<Option<usize>>,
    /// Partitions per member.
    load: Vec<u32>,
    cap: Vec<u32>,
    fair: Vec<u32>,
    /// Members that joined (or gained weight) since the previous assignment.
    joined: Vec<bool>,
    /// Partitions released by `shed`, placed with a preference for joined members.
    shed: Vec<bool>,
    /// Moves the change itself accounts for (partitions gained by joined members, partitions
    /// of departed members) minus moves between unchanged members; `level` may spend it.
    budget: i64,
}

impl<'r> State<'r> {
    fn new(ring: &'r Ring, queue: &str, partitions: u32) -> Self {
        let n = ring.members.len();
        let w = ring.total_weight;
        Self {
            ring,
            partitions,
            point: (0..partitions).map(|p| partition_point(queue, p)).collect(),
            owner: vec![None; partitions as usize],
            load: vec![0; n],
            cap: ring
                .members
                .iter()
                .map(|m| max_load(partitions, m.weight, w))
                .collect(),
            fair: ring
                .members
                .iter()
                .map(|m| fair_load(partitions, m.weight, w))
                .collect(),
            joined: vec![false; n],
            shed: vec![false; partitions as usize],
            budget: 0,
        }
    }

    /// Step 1: keep every previous owner that is still a member; mark who joined.
    fn keep(&mut self, prev: &Assignment) {
        for (&p, id) in prev.partitions.range(..self.partitions) {
            if let Some(m) = self.ring.index_of(id) {
                self.owner[p as usize] = Some(m);
                self.load[m] += 1;
            }
        }
        for (m, member) in self.ring.members.iter().enumerate() {
            let before = if prev.members.is_empty() {
                prev.partitions
                    .values()
                    .any(|id| *id == member.id)
                    .then_some(member.weight)
            } else {
                prev.members.get(&member.id).copied()
            };
            self.joined[m] = before.is_none_or(|w| member.weight > w);
        }
    }

    /// `load·Σw − P·w`: how far member `m` is above (positive) or below its exact fair share,
    /// scaled by Σw.
    fn surplus(&self, m: usize) -> i128 {
        i128::from(self.load[m]) * i128::from(self.ring.total_weight)
            - i128::from(self.partitions) * i128::from(self.ring.members[m].weight)
    }

    fn reassign(&mut self, p: u32, to: usize) {
        if let Some(from) = self.owner[p as usize] {
            self.load[from] -= 1;
        }
        self.owner[p as usize] = Some(to);
        self.load[to] += 1;
    }

    /// Step 2: joined members take partitions, nearest first: up to their cap from members
    /// above their new cap (those would have to shed anyway), then up to their fair share from
    /// members above their exact fair share.
    fn claim(&mut self) {
        if !self.joined.contains(&true) {
            return;
        }
        let mut wants: Vec<(u64, u32, usize)> = Vec::new();
        for m in (0..self.joined.len()).filter(|&m| self.joined[m]) {
            for p in 0..self.partitions {
                if self.owner[p as usize].is_some_and(|o| !self.joined[o]) {
                    wants.push((self.ring.distance(m, self.point[p as usize]), p, m));
                }
            }
        }
        wants.sort_unstable();
        self.claim_pass(&wants, |s, m, o| {
            s.load[m] < s.cap[m] && s.load[o] > s.cap[o]
        });
        self.claim_pass(&wants, |s, m, o| s.load[m] < s.fair[m] && s.surplus(o) > 0);
    }

    fn claim_pass(
        &mut self,
        wants: &[(u64, u32, usize)],
        ok: impl Fn(&Self, usize, usize) -> bool,
    ) {
        for &(_, p, m) in wants {
            let Some(o) = self.owner[p as usize] else {
                continue;
            };
            if !self.joined[o] && ok(self, m, o) {
                self.reassign(p, m);
                self.budget += 1;
            }
        }
    }

    /// Member `m`'s partitions, farthest from its virtual nodes first.
    fn farthest_first(&self, m: usize) -> Vec<u32> {
        let mut own: Vec<(u64, u32)> = (0..self.partitions)
            .filter(|&p| self.owner[p as usize] == Some(m))
            .map(|p| (self.ring.distance(m, self.point[p as usize]), p))
            .collect();
        own.sort_unstable_by(|a, b| b.cmp(a));
        own.into_iter().map(|(_, p)| p).collect()
    }

    /// Step 3: members above their SPEC cap release the partitions farthest from them.
    fn shed(&mut self) {
        for m in 0..self.load.len() {
            let excess = self.load[m].saturating_sub(self.cap[m]) as usize;
            for p in self.farthest_first(m).into_iter().take(excess) {
                self.owner[p as usize] = None;
                self.shed[p as usize] = true;
                self.load[m] -= 1;
            }
        }
    }

    /// The fair-limited walk: the first member clockwise from `point` below its fair share.
    /// Fair-share slots always suffice (Σ fair ≥ P); the fallbacks only guard the invariant.
    fn walk_fair(&self, point: u64) -> usize {
        self.ring
            .walk(point, |m| self.load[m] < self.fair[m])
            .or_else(|| self.ring.walk(point, |m| self.load[m] < self.cap[m]))
            .or_else(|| (0..self.load.len()).min_by_key(|&m| self.load[m]))
            .unwrap_or(0)
    }

    /// Step 4: every orphan walks the ring from its point, in ring order. A shed partition
    /// first looks for a joined member below its cap.
    fn place(&mut self, sticky: bool) {
        let mut order: Vec<(u64, u32)> = (0..self.partitions)
            .filter(|&p| self.owner[p as usize].is_none())
            .map(|p| (self.point[p as usize], p))
            .collect();
        order.sort_unstable();
        for (point, p) in order {
            if !self.shed[p as usize] {
                let to = self.walk_fair(point);
                self.reassign(p, to);
                self.budget += i64::from(sticky);
            } else if let Some(to) = self
                .ring
                .walk(point, |m| self.joined[m] && self.load[m] < self.cap[m])
            {
                self.reassign(p, to);
                self.budget += 1;
            } else {
                let to = self.walk_fair(point);
                self.reassign(p, to);
                self.budget -= 1;
            }
        }
    }

    /// Step 5: spend what is left of the move budget on moving partitions from unchanged
    /// members above their fair share (left there by earlier joins) to members below theirs,
    /// so later changes find loads close to fair.
    fn level(&mut self) {
        while self.budget > 0 {
            let donor = (0..self.load.len())
                .filter(|&m| !self.joined[m] && self.load[m] > self.fair[m])
                .max_by_key(|&m| (self.surplus(m), std::cmp::Reverse(m)));
            let Some(donor) = donor else {
                return;
            };
            let Some(p) = self.farthest_first(donor).first().copied() else {
                return;
            };
            let Some(to) = self
                .ring
                .walk(self.point[p as usize], |m| self.load[m] < self.fair[m])
            else {
                return;
            };
            self.reassign(p, to);
            self.budget -= 1;
        }
    }

    fn finish(self) -> Assignment {
        let members = &self.ring.members;
        Assignment {
            partitions: self
                .owner
                .iter()
                .enumerate()
                .filter_map(|(p, o)| Some((u32::try_from(p).ok()?, members[(*o)?].id.clone())))
                .collect(),
            members: members.iter().map(|m| (m.id.clone(), m.weight)).collect(),
        }
    }
}

/// Fresh placement of `partitions` partitions of `queue` over `workers` (any order); `None`
/// when no worker has a positive weight. Deterministic across processes and platforms.
pub fn assign(
    queue: &str,
    partitions: u32,
    workers: &[Member],
) -> Result<Option<Assignment>, RingError> {
    Ring::new(workers)?.assign(queue, partitions)
}

/// The next assignment of `queue` for `workers`, sticky to `prev` (the last one published):
/// every partition has an owner, no worker exceeds [`max_load`], and a single join or leave
/// moves at most twice the partitions the changed worker gains or loses. `None` when no worker
/// has a positive weight.
pub fn rebalance(
    prev: Option<&Assignment>,
    queue: &str,
    partitions: u32,
    workers: &[Member],
) -> Result<Option<Assignment>, RingError> {
    Ring::new(workers)?.rebalance(prev, queue, partitions)
}
