//! Provisioning (SPEC §2) against real nats-server processes: idempotent, never deletes data,
//! R3 on a cluster, clear errors for an old server or an incompatible stream.

use async_nats::jetstream::{self, stream};
use drover_shared::names::Names;
use drover_shared::topology::{self, Change, QueueConsumerConfig, TopologyConfig, TopologyError};
use drover_tests::{NatsCluster, NatsServer};
use std::time::Duration;

fn unique_names(tag: &str) -> Names {
    // A distinct prefix per test keeps tests independent even on a shared server.
    Names::new(&format!("t{tag}")).unwrap()
}

#[tokio::test]
async fn provisioning_twice_is_a_noop_the_second_time() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = unique_names("idem");
    let cfg = TopologyConfig::default();

    let first = topology::provision(&client, &names, &cfg).await.unwrap();
    assert_eq!(
        first.count(Change::Created),
        first.entries.len(),
        "{first:?}"
    );
    assert_eq!(
        first.entries.len(),
        7 + 7 + 4,
        "7 streams, 7 buckets, 4 leader consumers"
    );
    let second = topology::provision(&client, &names, &cfg).await.unwrap();
    assert!(second.is_noop(), "second run changed something: {second:?}");

    let js = jetstream::new(client.clone());
    for name in ["SUBMIT", "WORK", "OUTCOMES"] {
        let mut s = js.get_stream(names.stream(name)).await.unwrap();
        let c = &s.info().await.unwrap().config;
        assert_eq!(c.retention, stream::RetentionPolicy::WorkQueue, "{name}");
        assert_eq!(
            c.discard,
            stream::DiscardPolicy::New,
            "{name}: work queues are discard-new"
        );
        assert!(c.max_age.is_zero(), "{name}: no max_age");
    }
    // The buckets are ordinary KV buckets to any client, with limit markers where SPEC §2 says.
    let election = js.get_key_value(names.bucket("election")).await.unwrap();
    let rev = election.create("leader", "{}".into()).await.unwrap();
    assert!(
        election.create("leader", "{}".into()).await.is_err(),
        "create is exclusive"
    );
    election.update("leader", "{}".into(), rev).await.unwrap();
    let mut s = js
        .get_stream(format!("KV_{}", names.bucket("election")))
        .await
        .unwrap();
    let c = &s.info().await.unwrap().config;
    assert_eq!(c.max_age, Duration::from_millis(1500));
    assert!(
        c.subject_delete_marker_ttl.is_some(),
        "limit markers make lease expiry visible"
    );
    js.get_key_value(names.bucket("tasks")).await.unwrap();
}

#[tokio::test]
async fn updates_what_drover_owns_and_keeps_everything_else() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = unique_names("upd");
    let cfg = TopologyConfig::default();
    topology::provision(&client, &names, &cfg).await.unwrap();
    let js = jetstream::new(client.clone());

    // An operator (or a schedule) added a trigger subject; a config change resizes events.
    let mut triggers = js.get_stream(names.triggers_stream()).await.unwrap();
    let mut c = triggers.info().await.unwrap().config.clone();
    c.subjects.push("orders.created".into());
    js.update_stream(&c).await.unwrap();
    js.publish("orders.created", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let bigger = TopologyConfig {
        events_max_bytes: 2 << 30,
        ..cfg.clone()
    };
    let report = topology::provision(&client, &names, &bigger).await.unwrap();
    let changed: Vec<_> = report
        .entries
        .iter()
        .filter(|e| e.change != Change::Unchanged)
        .map(|e| (e.name.as_str(), e.change))
        .collect();
    assert_eq!(changed, [(names.events_stream().as_str(), Change::Updated)]);

    let info = triggers.info().await.unwrap().clone();
    assert!(info.config.subjects.contains(&"orders.created".to_string()));
    assert_eq!(info.state.messages, 1, "no data lost");
    assert!(
        topology::provision(&client, &names, &bigger)
            .await
            .unwrap()
            .is_noop()
    );
}

#[tokio::test]
async fn an_incompatible_stream_is_reported_and_left_alone() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = unique_names("inc");
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: names.submit_stream(),
        subjects: vec![names.submit_subject("default")],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish(names.submit_subject("default"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let err = topology::provision(&client, &names, &TopologyConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, TopologyError::Incompatible { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&names.submit_stream()) && msg.contains("never deletes"),
        "{msg}"
    );
    let mut s = js.get_stream(names.submit_stream()).await.unwrap();
    assert_eq!(
        s.info().await.unwrap().state.messages,
        1,
        "the message is still there"
    );
}

#[tokio::test]
async fn a_full_work_queue_fails_the_publish_visibly() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = unique_names("full");
    let cfg = TopologyConfig {
        submit_max_bytes: 4096,
        ..TopologyConfig::default()
    };
    topology::provision(&client, &names, &cfg).await.unwrap();
    let js = jetstream::new(client.clone());
    let body = vec![b'x'; 512];
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..64 {
        match js
            .publish(names.submit_subject("default"), body.clone().into())
            .await
            .unwrap()
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(accepted > 0);
    let e = refused.expect("a full discard-new stream must refuse the publish");
    assert!(e.to_string().contains("maximum bytes"), "{e}");
    let mut s = js.get_stream(names.submit_stream()).await.unwrap();
    assert_eq!(
        s.info().await.unwrap().state.messages,
        accepted,
        "nothing was dropped"
    );
}

#[tokio::test]
async fn queue_consumers_are_provisioned_per_partition() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let names = unique_names("q");
    topology::provision(&client, &names, &TopologyConfig::default())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let qcfg = QueueConsumerConfig {
        max_in_flight: 1,
        ack_wait: Duration::from_secs(3),
    };
    let r = topology::provision_queue(&js, &names, "mail", 16, &qcfg)
        .await
        .unwrap();
    assert_eq!(r.count(Change::Created), 16);
    assert!(
        topology::provision_queue(&js, &names, "mail", 16, &qcfg)
            .await
            .unwrap()
            .is_noop()
    );
    let s = js.get_stream(names.work_stream()).await.unwrap();
    let info = s
        .consumer_info(names.work_consumer("mail", 7))
        .await
        .unwrap();
    assert_eq!(info.config.filter_subject, names.work_subject("mail", 7));
    assert_eq!(info.config.max_ack_pending, 1);
    assert_eq!(info.config.ack_wait, Duration::from_secs(3));
    let wider = QueueConsumerConfig {
        max_in_flight: 4,
        ..qcfg
    };
    let r = topology::provision_queue(&js, &names, "mail", 16, &wider)
        .await
        .unwrap();
    assert_eq!(r.count(Change::Updated), 16);
}

#[tokio::test]
async fn a_server_older_than_2_12_gets_a_clear_error() {
    let server = NatsServer::builder().version("2.11.11").start().await;
    let client = server.connect().await;
    let err = topology::provision(&client, &unique_names("old"), &TopologyConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, TopologyError::ServerTooOld { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("2.11.11") && msg.contains("2.12") && msg.contains("nats/install.sh"),
        "{msg}"
    );
}

#[tokio::test]
async fn r3_on_a_three_node_cluster() {
    let cluster = NatsCluster::start(3).await;
    let client = cluster.connect().await;
    let names = unique_names("r3");
    let cfg = TopologyConfig {
        replicas: 3,
        lease_ms: 5_000,
        ..TopologyConfig::default()
    };
    let first = topology::provision(&client, &names, &cfg).await.unwrap();
    assert_eq!(first.count(Change::Created), first.entries.len());
    let js = jetstream::new(client.clone());
    for name in [
        names.submit_stream(),
        names.work_stream(),
        format!("KV_{}", names.bucket("election")),
    ] {
        let mut s = js.get_stream(&name).await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{name}");
        let replicas = info.cluster.as_ref().map(|c| c.replicas.len()).unwrap_or(0);
        assert_eq!(replicas, 2, "{name}: a leader and two followers");
    }
    let second = topology::provision(&client, &names, &cfg).await.unwrap();
    assert!(second.is_noop(), "{second:?}");
}
