//! The leader is SIGKILLed again and again while 20,000 tasks stream through the intake
//! (issue 3): no task may go missing from `DROVER_WORK`, keyed tasks keep their submit order,
//! and every duplicate is counted and traced to a leader that died (SPEC §5, §7).

use async_nats::jetstream;
use drover_shared::names::Names;
use drover_tests::observe::{leader_value, wait_for_tasks, wait_leader};
use drover_tests::{DroverProcess, NatsServer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SINGLES: usize = 16_000;
const ARRAYS: usize = 40;
const ARRAY_LEN: usize = 100;
const TOTAL: usize = SINGLES + ARRAYS * ARRAY_LEN;
const KEYS: usize = 20;

/// Task `i`: every other one keyed, carrying its sequence number within its key.
fn task(i: usize, next_per_key: &mut HashMap<usize, u64>) -> serde_json::Value {
    let mut t = serde_json::json!({"type": "noop", "id": format!("c{i}")});
    if i.is_multiple_of(2) {
        let k = (i / 2) % KEYS;
        let n = next_per_key.entry(k).or_default();
        t["key"] = format!("key-{k}").into();
        t["payload"] = serde_json::json!({ "n": *n });
        *n += 1;
    }
    t
}

#[tokio::test]
async fn leader_killed_repeatedly_during_a_20k_intake_loses_nothing() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let url = server.client_url();
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let fleet: Arc<Mutex<Vec<DroverProcess>>> = Arc::new(Mutex::new(
        (1..=3)
            .map(|i| DroverProcess::dispatcher(&format!("d{i}"), &url, 16))
            .collect(),
    ));
    wait_leader(&js, &names, None, Duration::from_secs(30)).await;

    // Submit in paced chunks so that the intake spans several leader terms.
    let submitter = {
        let js = js.clone();
        let subject = names.submit_subject("default");
        tokio::spawn(async move {
            let mut per_key = HashMap::new();
            let mut bodies: Vec<Vec<u8>> = (0..SINGLES)
                .map(|i| serde_json::to_vec(&task(i, &mut per_key)).unwrap())
                .collect();
            for a in 0..ARRAYS {
                let arr: Vec<_> = (0..ARRAY_LEN)
                    .map(|j| task(SINGLES + a * ARRAY_LEN + j, &mut per_key))
                    .collect();
                bodies.push(serde_json::to_vec(&arr).unwrap());
            }
            for chunk in bodies.chunks(800) {
                let mut acks = Vec::with_capacity(chunk.len());
                for body in chunk {
                    acks.push(
                        js.publish(subject.clone(), body.clone().into())
                            .await
                            .unwrap(),
                    );
                }
                for a in acks {
                    a.await.expect("the intake stream takes every submission");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // Kill whoever leads, as soon as it has led for a moment, until the submitter is done;
    // replace each victim so that three replicas keep campaigning.
    let started = Instant::now();
    let mut killed_epochs = BTreeSet::new();
    let mut spawned = 3;
    let mut last_leader: Option<String> = None;
    while !submitter.is_finished() || killed_epochs.len() < 4 {
        let id = wait_leader(&js, &names, last_leader.as_deref(), Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let Some(value) = leader_value(&js, &names).await else {
            continue;
        };
        if value["id"].as_str() != Some(id.as_str()) {
            continue;
        }
        let epoch = value["epoch"].as_u64().expect("leader value has an epoch");
        {
            let mut fleet = fleet.lock().unwrap();
            let victim = fleet.iter().position(|d| d.name() == id).expect("known");
            fleet[victim].kill();
            fleet.remove(victim);
            spawned += 1;
            fleet.push(DroverProcess::dispatcher(&format!("d{spawned}"), &url, 16));
        }
        killed_epochs.insert(epoch);
        eprintln!(
            "{:>6.1?}: SIGKILLed leader {id} (epoch {epoch})",
            started.elapsed()
        );
        last_leader = Some(id);
        if killed_epochs.len() >= 12 {
            break;
        }
    }
    submitter.await.unwrap();

    let tasks = wait_for_tasks(&js, &names, TOTAL, Duration::from_secs(120)).await;

    // Nothing missing.
    let mut copies: HashMap<&str, Vec<u64>> = HashMap::new();
    for d in &tasks {
        copies.entry(d.task.id.as_str()).or_default().push(d.epoch);
    }
    let missing: Vec<String> = (0..TOTAL)
        .map(|i| format!("c{i}"))
        .filter(|id| !copies.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} tasks missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(copies.len(), TOTAL, "no task that was never submitted");

    // Every duplicate comes from a crash window: its first copy was sealed by a leader that was
    // killed, and the later copy by a later leader.
    let mut duplicates = 0;
    for (id, epochs) in &copies {
        if epochs.len() > 1 {
            duplicates += epochs.len() - 1;
            assert!(
                killed_epochs.contains(&epochs[0]),
                "{id} duplicated, but its first copy's epoch {} was never killed",
                epochs[0]
            );
            assert!(
                epochs.windows(2).all(|w| w[0] < w[1]),
                "{id}: copies from epochs {epochs:?}, not one per leader term"
            );
        }
    }

    // Keyed tasks keep submit order: ignoring re-sent copies, each key's sequence counts up.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for d in &tasks {
        let Some(key) = &d.task.key else { continue };
        let n = serde_json::from_str::<serde_json::Value>(d.task.payload.get()).unwrap()["n"]
            .as_u64()
            .unwrap();
        match seen.get(key) {
            Some(&high) if n <= high => {} // a copy re-sent after a crash
            Some(&high) => assert_eq!(n, high + 1, "key {key}: {n} after {high}"),
            None => assert_eq!(n, 0, "key {key} starts at {n}"),
        }
        let high = seen.entry(key.clone()).or_insert(n);
        *high = (*high).max(n);
    }
    assert_eq!(seen.len(), KEYS);

    eprintln!(
        "{} leaders SIGKILLed during the intake of {TOTAL} tasks: 0 missing, {duplicates} duplicates ({} envelopes' worth of tasks, all from killed leaders' terms)",
        killed_epochs.len(),
        tasks.len()
    );
}
