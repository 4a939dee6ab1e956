//! The `least_loaded` strategy (SPEC §4): keyless tasks go to the partition with the fewest
//! pending messages, away from partitions whose worker is busy (here: none acks at all).

use async_nats::jetstream;
use drover_shared::names::Names;
use drover_tests::observe::wait_leader;
use drover_tests::{DroverProcess, NatsServer, TEST_KEYS};
use std::time::{Duration, Instant};

/// Backlog put on each of the partitions 0..3.
const BACKLOG: u64 = 50;

#[tokio::test]
async fn least_loaded_routes_keyless_tasks_away_from_busy_partitions() {
    let server = NatsServer::start().await;
    let names = Names::default();
    let _d = DroverProcess::start(
        "d1",
        "drover-dispatcher",
        &[
            "--nats-url".into(),
            server.client_url(),
            "--id".into(),
            "d1".into(),
        ],
        &[
            ("DROVER_KEYS", TEST_KEYS.into()),
            ("DROVER_LOG", "info".into()),
            ("DROVER_QUEUES__LL__PARTITIONS", "4".into()),
            ("DROVER_QUEUES__LL__STRATEGY", "least_loaded".into()),
        ],
    );
    let js = jetstream::new(server.connect().await);
    wait_leader(&js, &names, None, Duration::from_secs(20)).await;
    // The leader declares the predeclared queue's partition consumers.
    let work = js.get_stream(names.work_stream()).await.unwrap();
    let pending = |p: u32| {
        let work = work.clone();
        let name = names.work_consumer("ll", p);
        async move {
            work.consumer_info(name)
                .await
                .ok()
                .map(|i| i.num_pending + i.num_ack_pending as u64)
        }
    };
    let t0 = Instant::now();
    while pending(3).await.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no consumers for ll"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Partitions 0, 1 and 2 are busy: a backlog nobody takes.
    for p in 0..3 {
        for _ in 0..BACKLOG {
            js.publish(names.work_subject("ll", p), "backlog".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    // 30 keyless submits, one message each, paced so the leader re-reads the loads meanwhile.
    for i in 0..30 {
        let body = serde_json::json!({"type": "noop", "id": format!("ll-{i}")});
        js.publish(names.submit_subject("ll"), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let submit = js.get_stream(names.submit_stream()).await.unwrap();
    let t0 = Instant::now();
    while submit.get_info().await.unwrap().state.messages > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "intake not drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loads = [
        pending(0).await.unwrap(),
        pending(1).await.unwrap(),
        pending(2).await.unwrap(),
        pending(3).await.unwrap(),
    ];
    eprintln!("pending per partition after 30 keyless tasks: {loads:?}");
    assert_eq!(
        &loads[..3],
        &[BACKLOG; 3],
        "nothing went to the busy partitions"
    );
    assert!(loads[3] >= 1, "the idle partition took the tasks");
    // Every task was dispatched (its record exists) — all of them to partition 3.
    let tasks = js.get_key_value(names.bucket("tasks")).await.unwrap();
    for i in 0..30 {
        assert!(
            tasks.get(format!("ll-{i}")).await.unwrap().is_some(),
            "ll-{i} has no record"
        );
    }
}
