//! Partition assignment against a real nats-server (SPEC §4–§6): the leader, a real
//! `drover-dispatcher` process, watches `drover-workers` and writes `assignment.<queue>` by
//! compare-and-set. Workers are simulated by heartbeat keys the test renews every 500 ms;
//! stopping the renewal is an expiry after the 3 s TTL.

use async_nats::jetstream::{self, context::Context, kv};
use drover_dispatcher::assign::{AssignmentRecord, Reconciled, Target, assignment_key, reconcile};
use drover_shared::names::Names;
use drover_shared::ring::{self, Member};
use drover_shared::topology::{self, TopologyConfig};
use drover_tests::{DroverProcess, NatsServer};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The worker TTL (`drover-workers` max_age) of the default topology.
const TTL: Duration = Duration::from_secs(3);

const P: u32 = 16;

fn dispatcher(server_url: &str, name: &str) -> DroverProcess {
    DroverProcess::dispatcher(name, server_url, P)
}

/// The leader value of `drover-election`: `(id, epoch)` once the leader has renewed (the
/// first value, written by `create`, carries no epoch yet).
async fn leader(js: &Context, names: &Names) -> Option<(String, u64)> {
    let kv = js.get_key_value(names.bucket("election")).await.ok()?;
    let v = kv.get("leader").await.ok()??;
    let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
    Some((v["id"].as_str()?.to_owned(), v["epoch"].as_u64()?))
}

async fn wait_leader(js: &Context, names: &Names, not: Option<&str>) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((id, epoch)) = leader(js, names).await
            && Some(id.as_str()) != not
        {
            return (id, epoch);
        }
        assert!(Instant::now() < deadline, "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A simulated worker: a task renewing its `drover-workers` key every 500 ms.
struct SimWorker {
    id: String,
    capacity: u32,
    renewals: tokio::task::JoinHandle<()>,
    last_beat: Arc<Mutex<Option<Instant>>>,
}

impl SimWorker {
    fn start(kv: &kv::Store, id: &str, queues: &[&str], capacity: u32) -> Self {
        let record = serde_json::json!({
            "id": id, "queues": queues, "capacity": capacity, "running": 0,
            "load": {"cpu": 0.0, "mem": 0}, "version": "test", "started_at": "2025-01-01T00:00:00Z",
            "host": "test", "pid": 0, "addr": null,
        });
        let last_beat = Arc::new(Mutex::new(None));
        let (kv, key, beat) = (kv.clone(), id.to_owned(), last_beat.clone());
        let renewals = tokio::spawn(async move {
            loop {
                if kv.put(&key, record.to_string().into()).await.is_ok() {
                    *beat.lock().unwrap() = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Self {
            id: id.to_owned(),
            capacity,
            renewals,
            last_beat,
        }
    }

    /// Stops renewing (the key expires after the TTL); returns the time of the last renewal.
    fn stop(&self) -> Instant {
        self.renewals.abort();
        self.last_beat
            .lock()
            .unwrap()
            .expect("renewed at least once")
    }
}

async fn assignment(state: &kv::Store, queue: &str) -> Option<(AssignmentRecord, u64)> {
    let e = state.entry(assignment_key(queue)).await.ok()??;
    if e.operation != kv::Operation::Put {
        return None;
    }
    Some((
        AssignmentRecord::parse(&e.value).expect("a readable record"),
        e.revision,
    ))
}

/// Polls `assignment.<queue>` until `ok` holds.
async fn wait_assignment(
    state: &kv::Store,
    queue: &str,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&AssignmentRecord) -> bool,
) -> AssignmentRecord {
    let deadline = Instant::now() + timeout;
    loop {
        let current = assignment(state, queue).await;
        if let Some((rec, _)) = &current
            && ok(rec)
        {
            return rec.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; last seen {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every partition owned by one of `live`, whose records are exactly `live`'s, within the
/// SPEC bound ⌈1.25·P·wᵢ/Σw⌉.
fn check_balanced(rec: &AssignmentRecord, live: &[&SimWorker]) {
    let members: BTreeMap<String, u32> = live.iter().map(|w| (w.id.clone(), w.capacity)).collect();
    assert_eq!(rec.members, members, "members are the live workers");
    assert_eq!(
        rec.partitions.keys().copied().collect::<Vec<_>>(),
        (0..P).collect::<Vec<_>>(),
        "every partition has an owner"
    );
    let total: u64 = live.iter().map(|w| u64::from(w.capacity)).sum();
    for w in live {
        let owned = rec.owned_by(&w.id).count();
        let cap = ring::max_load(P, w.capacity, total) as usize;
        assert!(
            owned <= cap,
            "{} owns {owned} of {P}, more than its cap {cap}",
            w.id
        );
    }
}

/// Owner → partitions owned, for logs.
fn owners(rec: &AssignmentRecord) -> BTreeMap<String, usize> {
    let mut loads = BTreeMap::new();
    for owner in rec.partitions.values() {
        *loads.entry(owner.clone()).or_default() += 1;
    }
    loads
}

#[tokio::test]
async fn assignment_follows_joins_leaves_and_expiry() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let d = dispatcher(&server.client_url(), "d1");
    let js = jetstream::new(server.connect().await);
    let (_, epoch) = wait_leader(&js, &names, None).await;
    assert!(epoch > 0);
    let workers = js.get_key_value(names.bucket("workers")).await.unwrap();
    let state = js.get_key_value(names.bucket("state")).await.unwrap();

    // A malformed record is skipped (with a warning), never a crash.
    workers.put("garbage", "{oops".into()).await.unwrap();

    // Three workers with mixed capacities start together.
    let started = Instant::now();
    let w1 = SimWorker::start(&workers, "w1", &["default"], 1);
    let w2 = SimWorker::start(&workers, "w2", &["default"], 2);
    let w3 = SimWorker::start(&workers, "w3", &["default"], 1);
    let first = wait_assignment(&state, "default", Duration::from_secs(5), "3 joins", |r| {
        r.members.len() == 3
    })
    .await;
    eprintln!(
        "3 workers assigned after {:?}: version {}, loads {:?}",
        started.elapsed(),
        first.version,
        owners(&first)
    );
    check_balanced(&first, &[&w1, &w2, &w3]);
    assert_eq!(first.epoch, epoch, "stamped with the leader's epoch");
    assert!(
        first.version <= 2,
        "a burst of joins is coalesced (version {})",
        first.version
    );
    assert!(d.log().contains("garbage"), "the bad record is reported");

    // A fourth joins: it gains partitions; at most twice that many move.
    let w4 = SimWorker::start(&workers, "w4", &["default"], 1);
    let joined = Instant::now();
    let second = wait_assignment(&state, "default", Duration::from_secs(5), "4th join", |r| {
        r.members.contains_key("w4")
    })
    .await;
    eprintln!(
        "join reassigned after {:?}: loads {:?}",
        joined.elapsed(),
        owners(&second)
    );
    check_balanced(&second, &[&w1, &w2, &w3, &w4]);
    assert_eq!(second.version, first.version + 1, "one write per change");
    let gained = second.owned_by("w4").count();
    let moved = ring::moved(&first.assignment(), &second.assignment());
    assert!(gained > 0);
    assert!(moved <= 2 * gained, "moved {moved}, w4 gained {gained}");

    // Renewals alone write nothing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (same, _) = assignment(&state, "default").await.unwrap();
    assert_eq!(same, second, "heartbeats do not rewrite the assignment");

    // w2 stops renewing: its partitions move to the others within TTL + 1 s of its last beat.
    let last = w2.stop();
    let third = wait_assignment(
        &state,
        "default",
        TTL + Duration::from_secs(3),
        "expiry",
        |r| !r.members.contains_key("w2"),
    )
    .await;
    let took = last.elapsed();
    eprintln!(
        "expiry reassigned {took:?} after the last heartbeat: loads {:?}",
        owners(&third)
    );
    assert!(
        took <= TTL + Duration::from_secs(1),
        "expiry took {took:?} after the last heartbeat"
    );
    check_balanced(&third, &[&w1, &w3, &w4]);
    let lost = second.owned_by("w2").count();
    let moved = ring::moved(&second.assignment(), &third.assignment());
    assert!(moved <= 2 * lost, "moved {moved}, w2 lost {lost}");
    assert_eq!(third.epoch, epoch);

    // All stop: the queue's assignment empties, so nobody pulls.
    let lasts = [w1.stop(), w3.stop(), w4.stop()];
    let empty = wait_assignment(
        &state,
        "default",
        TTL + Duration::from_secs(3),
        "all gone",
        |r| r.partitions.is_empty(),
    )
    .await;
    let took = lasts.iter().max().unwrap().elapsed();
    eprintln!("all expired; empty assignment {took:?} after the last heartbeat");
    assert!(took <= TTL + Duration::from_secs(1), "took {took:?}");
    assert!(empty.members.is_empty());
    assert_eq!(empty.epoch, epoch);
    // Written once: nothing more while the fleet stays empty.
    let (_, rev) = assignment(&state, "default").await.unwrap();
    tokio::time::sleep(Duration::from_millis(TTL.as_millis() as u64 + 500)).await;
    assert_eq!(assignment(&state, "default").await.unwrap().1, rev);

    // Every write of this leader carries its epoch, versions one apart.
    let mut history = state.history(assignment_key("default")).await.unwrap();
    let mut versions = Vec::new();
    while let Some(e) = futures::StreamExt::next(&mut history).await {
        let rec = AssignmentRecord::parse(&e.unwrap().value).unwrap();
        assert_eq!(rec.epoch, epoch);
        versions.push(rec.version);
    }
    assert!(
        versions.windows(2).all(|v| v[1] == v[0] + 1),
        "{versions:?}"
    );
    // The queue record comes from the leader declaring `[queues.default]` (partitions = P), not
    // from the assigner.
    let record: serde_json::Value =
        serde_json::from_slice(&state.get("queue.default").await.unwrap().unwrap()).unwrap();
    assert_eq!(record["partitions"], P);
    assert!(d.is_running());
}

#[tokio::test]
async fn queue_records_set_partitions_and_queues_without_workers_get_empty_assignments() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let _d = dispatcher(&server.client_url(), "d1");
    let js = jetstream::new(server.connect().await);
    let (_, epoch) = wait_leader(&js, &names, None).await;
    let workers = js.get_key_value(names.bucket("workers")).await.unwrap();
    let state = js.get_key_value(names.bucket("state")).await.unwrap();

    state
        .put(
            "queue.emails",
            r#"{"partitions":4,"created_epoch":1}"#.into(),
        )
        .await
        .unwrap();
    let empty = wait_assignment(
        &state,
        "emails",
        Duration::from_secs(5),
        "queue record",
        |_| true,
    )
    .await;
    assert!(empty.partitions.is_empty());
    assert_eq!((empty.epoch, empty.version), (epoch, 1));

    let w = SimWorker::start(&workers, "mailer", &["emails", "default"], 1);
    let emails = wait_assignment(&state, "emails", Duration::from_secs(5), "join", |r| {
        !r.partitions.is_empty()
    })
    .await;
    assert_eq!(emails.owned_by("mailer").collect::<Vec<_>>(), [0, 1, 2, 3]);
    let default = wait_assignment(&state, "default", Duration::from_secs(5), "join", |r| {
        !r.partitions.is_empty()
    })
    .await;
    assert_eq!(default.owned_by("mailer").count(), P as usize);
    w.stop();
}

#[tokio::test]
async fn a_new_leader_keeps_the_assignment_and_stamps_its_epoch() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let url = server.client_url();
    let ds = [dispatcher(&url, "d1"), dispatcher(&url, "d2")];
    let js = jetstream::new(server.connect().await);
    let (first_leader, first_epoch) = wait_leader(&js, &names, None).await;
    let workers = js.get_key_value(names.bucket("workers")).await.unwrap();
    let state = js.get_key_value(names.bucket("state")).await.unwrap();
    let fleet: Vec<SimWorker> = (1..=3)
        .map(|i| SimWorker::start(&workers, &format!("w{i}"), &["default"], i))
        .collect();
    let before = wait_assignment(&state, "default", Duration::from_secs(5), "joins", |r| {
        r.members.len() == 3
    })
    .await;
    assert_eq!(before.epoch, first_epoch);

    let killed = Instant::now();
    ds.iter().find(|d| d.name() == first_leader).unwrap().kill();
    let (_, second_epoch) = wait_leader(&js, &names, Some(&first_leader)).await;
    assert!(second_epoch > first_epoch);
    let after = wait_assignment(
        &state,
        "default",
        Duration::from_secs(10),
        "new term",
        |r| r.epoch == second_epoch,
    )
    .await;
    eprintln!(
        "new leader stamped its epoch {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(after.partitions, before.partitions, "no partition moved");
    assert_eq!(after.version, before.version + 1);
    let refs: Vec<&SimWorker> = fleet.iter().collect();
    check_balanced(&after, &refs);
}

#[tokio::test]
async fn a_deposed_leader_stops_assigning() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let d = dispatcher(&server.client_url(), "d1");
    let js = jetstream::new(server.connect().await);
    let (_, epoch) = wait_leader(&js, &names, None).await;
    let workers = js.get_key_value(names.bucket("workers")).await.unwrap();
    let state = js.get_key_value(names.bucket("state")).await.unwrap();
    let _w1 = SimWorker::start(&workers, "w1", &["default"], 1);
    wait_assignment(&state, "default", Duration::from_secs(5), "join", |r| {
        r.members.len() == 1
    })
    .await;

    // A later term writes (as a newer leader would); this leader must not write over it.
    let newer = AssignmentRecord {
        epoch: epoch + 1000,
        version: 99,
        ..AssignmentRecord::default()
    };
    state
        .put(assignment_key("default"), newer.to_json().into())
        .await
        .unwrap();
    let _w2 = SimWorker::start(&workers, "w2", &["default"], 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(assignment(&state, "default").await.unwrap().0, newer);
    assert!(d.log().contains("deposed"), "{}", d.log());
}

/// The compare-and-set step itself, against a real bucket and without a dispatcher.
#[tokio::test]
async fn the_compare_and_set_step_refuses_a_later_terms_record() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = Names::new("cas").unwrap();
    topology::provision(&client, &names, &TopologyConfig::default())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let state = js.get_key_value(names.bucket("state")).await.unwrap();
    let target = Target {
        queue: "default".into(),
        partitions: P,
        members: vec![Member::new("a", 1), Member::new("b", 1)],
    };

    // Term 5 creates the record, and writing again changes nothing.
    let Reconciled::Written {
        record, revision, ..
    } = reconcile(&state, &target, 5).await.unwrap()
    else {
        panic!("expected a write");
    };
    assert_eq!(
        (record.epoch, record.version, record.partitions.len()),
        (5, 1, 16)
    );
    assert_eq!(
        reconcile(&state, &target, 5).await.unwrap(),
        Reconciled::Unchanged
    );

    // Term 9 takes over and writes; term 5's update on the revision it read fails...
    let term9 = reconcile(&state, &target, 9).await.unwrap();
    assert!(
        matches!(&term9, Reconciled::Written { record, .. } if record.epoch == 9 && record.version == 2)
    );
    let late = state
        .update(assignment_key("default"), record.to_json().into(), revision)
        .await;
    assert_eq!(
        late.unwrap_err().kind(),
        kv::UpdateErrorKind::WrongLastRevision
    );
    // ...and its next planning step sees the later term, refuses and returns.
    let (stored, rev) = assignment(&state, "default").await.unwrap();
    let changed = Target {
        members: vec![Member::new("a", 1)],
        ..target.clone()
    };
    assert_eq!(
        reconcile(&state, &changed, 5).await.unwrap(),
        Reconciled::Deposed { epoch: 9 }
    );
    assert_eq!(
        assignment(&state, "default").await.unwrap(),
        (stored, rev),
        "nothing written"
    );

    // A deleted record (an operator's `nats kv del`) is written over, not an error.
    state.delete(assignment_key("default")).await.unwrap();
    let again = reconcile(&state, &changed, 9).await.unwrap();
    assert!(
        matches!(again, Reconciled::Written { record, .. } if record.owned_by("a").count() == 16)
    );
}
