//! Tests of partition → worker routing (SPEC §4): the load bound, the move bound on joins and
//! leaves, determinism and order independence.

use std::collections::BTreeMap;

use drover_shared::ring::{
    Assignment, MAX_PARTITIONS, MAX_WEIGHT, Member, Ring, RingError, assign, fair_load, max_load,
    moved, partition_point, rebalance, vnode_point,
};
use proptest::prelude::*;

const PARTITION_COUNTS: [u32; 5] = [1, 7, 16, 64, 256];

fn fleet(weights: &[u32]) -> Vec<Member> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Member::new(format!("worker-{i:02}"), w))
        .collect()
}

fn total_weight(workers: &[Member]) -> u64 {
    workers.iter().map(|m| u64::from(m.weight)).sum()
}

/// Every partition has an owner among `workers`, and no owner exceeds the SPEC cap.
fn check_bounds(a: &Assignment, partitions: u32, workers: &[Member]) {
    assert_eq!(a.len(), partitions as usize, "every partition has an owner");
    assert!(a.partitions().keys().copied().eq(0..partitions));
    let total = total_weight(workers);
    let weights: BTreeMap<&str, u32> = workers.iter().map(|m| (m.id.as_str(), m.weight)).collect();
    for (owner, load) in a.loads() {
        let w = *weights
            .get(owner)
            .unwrap_or_else(|| panic!("{owner} is not a member"));
        let cap = max_load(partitions, w, total);
        assert!(
            load as u32 <= cap,
            "{owner} (weight {w}) owns {load} > cap {cap}"
        );
    }
    let members: BTreeMap<String, u32> = workers.iter().map(|m| (m.id.clone(), m.weight)).collect();
    assert_eq!(a.members(), &members);
}

/// Joins `joiner` to `workers` starting from `before`; returns (moved, gained).
fn join(
    before: &Assignment,
    partitions: u32,
    workers: &[Member],
    joiner: &Member,
) -> (usize, usize) {
    let mut after_set = workers.to_vec();
    after_set.push(joiner.clone());
    let after = rebalance(Some(before), "q", partitions, &after_set)
        .unwrap()
        .unwrap();
    check_bounds(&after, partitions, &after_set);
    (moved(before, &after), after.load(&joiner.id))
}

/// Removes `workers[index]` starting from `before`; returns (moved, lost).
fn leave(before: &Assignment, partitions: u32, workers: &[Member], index: usize) -> (usize, usize) {
    let mut after_set = workers.to_vec();
    let gone = after_set.remove(index);
    let lost = before.load(&gone.id);
    match rebalance(Some(before), "q", partitions, &after_set).unwrap() {
        Some(after) => {
            check_bounds(&after, partitions, &after_set);
            (moved(before, &after), lost)
        }
        None => {
            assert!(after_set.is_empty());
            (lost, lost)
        }
    }
}

/// A small deterministic generator for the sweeps (the property tests use proptest's).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn helpers() {
    assert_eq!(max_load(64, 1, 4), 20);
    assert_eq!(max_load(64, 1, 5), 16);
    assert_eq!(max_load(1, 1, 50), 1);
    assert_eq!(max_load(7, 4, 10), 4); // ⌈3.5⌉
    assert_eq!(max_load(16, 1, 20), 1); // exactly 1.0
    assert_eq!(max_load(16, 1, 0), 0);
    assert_eq!(fair_load(64, 1, 5), 13);
    assert_eq!(fair_load(64, 2, 4), 32);
    assert_eq!(fair_load(1, 1, 50), 1);

    let a = assign("q", 4, &fleet(&[1, 1])).unwrap().unwrap();
    assert_eq!(moved(&a, &a), 0);
    let mut flipped = a.partitions().clone();
    let owner0 = flipped[&0].clone();
    flipped.insert(
        0,
        if owner0 == "worker-00" {
            "worker-01"
        } else {
            "worker-00"
        }
        .into(),
    );
    flipped.remove(&3);
    let b = Assignment::from_parts(flipped, a.members().clone());
    assert_eq!(moved(&a, &b), 2, "one owner changed, one partition dropped");
    assert_eq!(moved(&b, &a), 2, "one owner changed, one partition added");
}

#[test]
fn balance_bound_holds_for_mixed_fleets() {
    let mut rng = Lcg(1);
    for n in 1..=50 {
        let weights: Vec<u32> = (0..n).map(|_| 1 + rng.below(4) as u32).collect();
        let workers = fleet(&weights);
        let ring = Ring::new(&workers).unwrap();
        let total = total_weight(&workers);
        for p in PARTITION_COUNTS {
            let a = ring.assign("default", p).unwrap().unwrap();
            check_bounds(&a, p, &workers);
            // Fresh placement is stricter than the SPEC cap: at most the fair share, rounded up.
            for m in &workers {
                assert!(a.load(&m.id) as u32 <= fair_load(p, m.weight, total));
            }
        }
    }
}

#[test]
fn empty_and_excluded_workers() {
    assert_eq!(assign("q", 8, &[]).unwrap(), None);
    let idle = [Member::new("a", 0), Member::new("b", 0)];
    assert_eq!(assign("q", 8, &idle).unwrap(), None);

    let a = assign("q", 8, &fleet(&[1, 2])).unwrap().unwrap();
    assert_eq!(rebalance(Some(&a), "q", 8, &[]).unwrap(), None);

    // Weight 0 is the same as not being listed.
    let mut with_zero = fleet(&[1, 2]);
    with_zero.push(Member::new("draining", 0));
    assert_eq!(assign("q", 8, &with_zero).unwrap(), Some(a.clone()));
    assert_eq!(Ring::new(&with_zero).unwrap().members().len(), 2);
}

#[test]
fn invalid_input_is_an_error() {
    let workers = fleet(&[1, 1]);
    assert_eq!(assign("q", 0, &workers), Err(RingError::PartitionCount(0)));
    assert_eq!(
        assign("q", MAX_PARTITIONS + 1, &workers),
        Err(RingError::PartitionCount(MAX_PARTITIONS + 1))
    );
    assert!(assign("q", MAX_PARTITIONS, &workers).unwrap().is_some());
    let dup = [
        Member::new("a", 1),
        Member::new("b", 1),
        Member::new("a", 2),
    ];
    assert_eq!(
        assign("q", 4, &dup),
        Err(RingError::DuplicateMember { id: "a".into() })
    );
    let heavy = [Member::new("big", MAX_WEIGHT + 1)];
    assert_eq!(
        assign("q", 4, &heavy),
        Err(RingError::WeightTooLarge {
            id: "big".into(),
            weight: MAX_WEIGHT + 1
        })
    );
    assert!(assign("q", 4, &[Member::new("ok", MAX_WEIGHT)]).is_ok());
    let msg = RingError::WeightTooLarge {
        id: "big".into(),
        weight: 65,
    }
    .to_string();
    assert!(msg.contains("between 1 and 64"), "{msg}");
}

#[test]
fn golden_hashes() {
    // The ring's coordinates must never change between releases or platforms: every leader
    // has to compute the same assignment.
    assert_eq!(vnode_point("worker-a", 0), GOLDEN_VNODE_A0);
    assert_eq!(vnode_point("worker-a", 159), GOLDEN_VNODE_A159);
    assert_eq!(partition_point("default", 0), GOLDEN_PARTITION_0);
    assert_eq!(partition_point("default", 63), GOLDEN_PARTITION_63);
}

// Also computed by an independent Python implementation of the documented hash (FNV-1a 64
// over "drover/vnode/v1\0" id "\0" index-as-u32-BE, then fmix64).
const GOLDEN_VNODE_A0: u64 = 0xaf30_71a2_6f57_d5ef;
const GOLDEN_VNODE_A159: u64 = 0xe8a0_e05e_7156_c579;
const GOLDEN_PARTITION_0: u64 = 0x1cae_813a_dc97_cf32;
const GOLDEN_PARTITION_63: u64 = 0x9bb7_a0e7_6712_0657;

/// FNV-1a 64 over `"<partition>=<owner>;"` for every partition: a compact fingerprint.
fn fingerprint(a: &Assignment) -> u64 {
    let text: String = a
        .partitions()
        .iter()
        .map(|(p, owner)| format!("{p}={owner};"))
        .collect();
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn golden_assignment() {
    let workers = [
        Member::new("worker-a", 1),
        Member::new("worker-b", 2),
        Member::new("worker-c", 1),
    ];
    let a = assign("default", 16, &workers).unwrap().unwrap();
    let got: Vec<&str> = (0..16).map(|p| a.owner(p).unwrap()).collect();
    assert_eq!(got, GOLDEN_16);

    let big = fleet(&[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]);
    let a = assign("default", 256, &big).unwrap().unwrap();
    assert_eq!(fingerprint(&a), GOLDEN_256_FINGERPRINT);

    // And a sticky step: worker-x joins the three-worker fleet.
    let before = assign("default", 16, &workers).unwrap().unwrap();
    let mut joined = workers.to_vec();
    joined.push(Member::new("worker-x", 1));
    let after = rebalance(Some(&before), "default", 16, &joined)
        .unwrap()
        .unwrap();
    let got: Vec<u32> = after.owned_by("worker-x").collect();
    assert_eq!(got, GOLDEN_16_JOIN_X);
}

const GOLDEN_16: [&str; 16] = [
    "worker-c", "worker-b", "worker-a", "worker-b", "worker-a", "worker-b", "worker-b", "worker-c",
    "worker-b", "worker-b", "worker-a", "worker-c", "worker-b", "worker-c", "worker-a", "worker-b",
];
const GOLDEN_256_FINGERPRINT: u64 = 0xf2a7_2359_4d68_e7ef;
const GOLDEN_16_JOIN_X: [u32; 4] = [7, 8, 9, 10];

#[test]
fn input_order_does_not_matter() {
    let mut rng = Lcg(2);
    for n in [1usize, 2, 5, 17, 50] {
        let weights: Vec<u32> = (0..n).map(|_| 1 + rng.below(4) as u32).collect();
        let workers = fleet(&weights);
        let mut reversed = workers.clone();
        reversed.reverse();
        let mut rotated = workers.clone();
        rotated.rotate_left(n / 2);
        for p in PARTITION_COUNTS {
            let a = assign("orders", p, &workers).unwrap();
            assert_eq!(assign("orders", p, &reversed).unwrap(), a);
            assert_eq!(assign("orders", p, &rotated).unwrap(), a);
            let prev = a.as_ref().unwrap();
            let mut grown = rotated.clone();
            grown.insert(0, Member::new("zz-new", 3));
            let r1 = rebalance(Some(prev), "orders", p, &grown).unwrap();
            grown.reverse();
            assert_eq!(rebalance(Some(prev), "orders", p, &grown).unwrap(), r1);
        }
    }
}

#[test]
fn queues_get_different_layouts() {
    let workers = fleet(&[1; 8]);
    let a = assign("alpha", 64, &workers).unwrap().unwrap();
    let b = assign("beta", 64, &workers).unwrap().unwrap();
    assert_ne!(a.partitions(), b.partitions());
}

#[test]
fn rebalance_with_unchanged_members_is_a_fixed_point() {
    let mut rng = Lcg(3);
    for n in [1usize, 3, 10, 40] {
        let weights: Vec<u32> = (0..n).map(|_| 1 + rng.below(4) as u32).collect();
        let workers = fleet(&weights);
        for p in PARTITION_COUNTS {
            let a = assign("q", p, &workers).unwrap().unwrap();
            assert_eq!(
                rebalance(Some(&a), "q", p, &workers).unwrap(),
                Some(a.clone())
            );
            let mut grown = workers.clone();
            grown.push(Member::new("new", 2));
            let b = rebalance(Some(&a), "q", p, &grown).unwrap().unwrap();
            assert_eq!(rebalance(Some(&b), "q", p, &grown).unwrap(), Some(b));
        }
    }
}

#[test]
fn serde_shape_and_restore() {
    let workers = [Member::new("a", 1), Member::new("b", 1)];
    let a = assign("q", 4, &workers).unwrap().unwrap();
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["members"], serde_json::json!({"a": 1, "b": 1}));
    for p in 0..4 {
        assert_eq!(json["partitions"][p.to_string()], a.owner(p).unwrap());
    }
    let back: Assignment = serde_json::from_value(json).unwrap();
    assert_eq!(back, a);

    // Stored without members (or by an older writer): the owners are taken as the members,
    // so a restore with the same workers moves nothing.
    let bare: Assignment = serde_json::from_value(
        serde_json::json!({"partitions": serde_json::to_value(a.partitions()).unwrap()}),
    )
    .unwrap();
    assert!(bare.members().is_empty());
    assert_eq!(
        rebalance(Some(&bare), "q", 4, &workers).unwrap(),
        Some(a.clone())
    );

    // A stale hint (unknown owners, partitions out of range) is tolerated.
    let mut hint = a.partitions().clone();
    hint.insert(0, "ghost".into());
    hint.insert(99, "a".into());
    let stale = Assignment::from_parts(hint, a.members().clone());
    let fixed = rebalance(Some(&stale), "q", 4, &workers).unwrap().unwrap();
    check_bounds(&fixed, 4, &workers);
}

#[test]
fn a_single_worker_owns_everything_and_hands_over_on_join() {
    let solo = fleet(&[1]);
    let a = assign("q", 64, &solo).unwrap().unwrap();
    assert_eq!(a.load("worker-00"), 64);
    let (m, gained) = join(&a, 64, &solo, &Member::new("worker-99", 4));
    assert_eq!(gained, 52, "⌈64·4/5⌉ = 52");
    assert_eq!(m, gained);
}

#[test]
fn fewer_partitions_than_workers() {
    let workers = fleet(&[1; 30]);
    let a = assign("q", 7, &workers).unwrap().unwrap();
    check_bounds(&a, 7, &workers);
    assert!(a.loads().values().all(|&l| l == 1));
    let (m, gained) = join(&a, 7, &workers, &Member::new("worker-new", 1));
    assert!(gained >= 1, "a joining worker always gets a partition");
    assert!(m <= 2 * gained);
    let (m, lost) = leave(&a, 7, &workers, 3);
    assert!(m <= 2 * lost);
}

/// A sweep over random fleets and long event sequences; prints the worst ratio observed
/// (`cargo test -p drover-shared --test ring -- --nocapture`).
#[test]
fn move_bound_sweep() {
    let mut rng = Lcg(7);
    let mut next_id = 0;
    let (mut worst, mut steps, mut moved_total, mut changed_total) = (0.0f64, 0, 0, 0);
    let (mut stateless_violations, mut stateless_worst) = (0, 0.0f64);
    for _ in 0..60 {
        let p = PARTITION_COUNTS[rng.below(5) as usize];
        let mut workers: Vec<Member> = (0..1 + rng.below(30))
            .map(|_| {
                next_id += 1;
                Member::new(format!("w{next_id}"), 1 + rng.below(4) as u32)
            })
            .collect();
        let mut current = assign("q", p, &workers).unwrap().unwrap();
        let mut fresh_before = current.clone();
        for _ in 0..25 {
            let joining = workers.len() <= 1 || (workers.len() < 50 && rng.below(2) == 0);
            let (after_set, changed_id) = if joining {
                next_id += 1;
                let m = Member::new(format!("w{next_id}"), 1 + rng.below(4) as u32);
                let id = m.id.clone();
                let mut v = workers.clone();
                v.push(m);
                (v, id)
            } else {
                let mut v = workers.clone();
                let gone = v.remove(rng.below(v.len() as u64) as usize);
                (v, gone.id)
            };
            let ring = Ring::new(&after_set).unwrap();
            let after = ring.rebalance(Some(&current), "q", p).unwrap().unwrap();
            check_bounds(&after, p, &after_set);
            let changed = if joining {
                after.load(&changed_id)
            } else {
                current.load(&changed_id)
            };
            let m = moved(&current, &after);
            assert!(
                m <= 2 * changed,
                "P={p} join={joining} moved {m} > 2×{changed}"
            );
            if changed > 0 {
                worst = worst.max(m as f64 / changed as f64);
            }
            // For contrast: recomputing from scratch (no stickiness).
            let fresh_after = ring.assign("q", p).unwrap().unwrap();
            let fresh_changed = if joining {
                fresh_after.load(&changed_id)
            } else {
                fresh_before.load(&changed_id)
            };
            let fresh_moved = moved(&fresh_before, &fresh_after);
            if fresh_moved > 2 * fresh_changed {
                stateless_violations += 1;
            }
            if fresh_changed > 0 {
                stateless_worst = stateless_worst.max(fresh_moved as f64 / fresh_changed as f64);
            }
            fresh_before = fresh_after;
            steps += 1;
            moved_total += m;
            changed_total += changed;
            current = after;
            workers = after_set;
        }
    }
    println!(
        "sticky: {steps} steps, worst moved/changed {worst:.2}, total moved {moved_total} for \
         {changed_total} changed; stateless: {stateless_violations} steps over 2x, worst {stateless_worst:.2}"
    );
    assert!(worst <= 2.0);
}

#[test]
fn large_fleet_is_fast_enough() {
    let weights: Vec<u32> = (0..200).map(|i| 1 + i % 4).collect();
    let workers = fleet(&weights);
    let start = std::time::Instant::now();
    let a = assign("q", 1024, &workers).unwrap().unwrap();
    let fresh = start.elapsed();
    check_bounds(&a, 1024, &workers);
    let mut grown = workers.clone();
    grown.push(Member::new("new", 4));
    let start = std::time::Instant::now();
    let b = rebalance(Some(&a), "q", 1024, &grown).unwrap().unwrap();
    let sticky = start.elapsed();
    check_bounds(&b, 1024, &grown);
    println!("P=1024, 200 workers: assign {fresh:?}, rebalance on join {sticky:?}");
    // Generous: this runs unoptimised; release builds take a few milliseconds.
    assert!(fresh.as_secs() < 5 && sticky.as_secs() < 5);
}

fn fleet_strategy(min: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(1u32..=4, min..=50)
}

proptest! {
    // No regression files: integration tests have no lib.rs for proptest to put them next to.
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn join_moves_at_most_twice_the_gain(
        weights in fleet_strategy(1),
        p in prop::sample::select(PARTITION_COUNTS.to_vec()),
        joiner_weight in 1u32..=4,
        joiner_name in "[a-z]{1,8}",
    ) {
        let workers = fleet(&weights);
        let before = assign("q", p, &workers).unwrap().unwrap();
        let joiner = Member::new(format!("new-{joiner_name}"), joiner_weight);
        let (m, gained) = join(&before, p, &workers, &joiner);
        prop_assert!(gained >= 1);
        prop_assert!(m <= 2 * gained, "moved {} > 2×{}", m, gained);
    }

    #[test]
    fn leave_moves_at_most_twice_the_loss(
        weights in fleet_strategy(1),
        p in prop::sample::select(PARTITION_COUNTS.to_vec()),
        which in any::<prop::sample::Index>(),
    ) {
        let workers = fleet(&weights);
        let before = assign("q", p, &workers).unwrap().unwrap();
        let (m, lost) = leave(&before, p, &workers, which.index(workers.len()));
        prop_assert!(m <= 2 * lost, "moved {} > 2×{}", m, lost);
    }

    #[test]
    fn event_sequences_keep_both_bounds(
        weights in prop::collection::vec(1u32..=4, 1..=20),
        p in prop::sample::select(PARTITION_COUNTS.to_vec()),
        events in prop::collection::vec((any::<bool>(), 1u32..=4, any::<prop::sample::Index>()), 1..=20),
    ) {
        let mut workers = fleet(&weights);
        let mut current = assign("q", p, &workers).unwrap().unwrap();
        for (i, (joining, weight, which)) in events.into_iter().enumerate() {
            if joining || workers.len() == 1 {
                let joiner = Member::new(format!("joiner-{i}"), weight);
                let (m, gained) = join(&current, p, &workers, &joiner);
                prop_assert!(m <= 2 * gained, "step {}: join moved {} > 2×{}", i, m, gained);
                workers.push(joiner);
            } else {
                let index = which.index(workers.len());
                let (m, lost) = leave(&current, p, &workers, index);
                prop_assert!(m <= 2 * lost, "step {}: leave moved {} > 2×{}", i, m, lost);
                workers.remove(index);
            }
            current = rebalance(Some(&current), "q", p, &workers).unwrap().unwrap();
        }
    }
}
