//! A dispatcher that cannot provision yet keeps retrying, not ready, and leads once provisioning
//! works (SPEC §2, §5). A fresh cluster refusing R3 placement for a few seconds is not
//! reproducible on demand (a just-killed peer still counts for placement), so the test takes the
//! other transient failure: a cluster without a meta quorum, whose requests time out.

use async_nats::jetstream;
use drover_shared::names::Names;
use drover_tests::observe::wait_leader;
use drover_tests::{DroverProcess, NatsCluster, TEST_KEYS, free_port, http_get};
use std::time::{Duration, Instant};

#[tokio::test]
async fn provisioning_is_retried_until_the_cluster_has_a_quorum() {
    let cluster = NatsCluster::start(3).await;
    // One node of three left: no meta quorum, every JetStream request times out.
    cluster.kill(1);
    cluster.kill(2);
    let port = free_port();
    let d = DroverProcess::start(
        "d1",
        "drover-dispatcher",
        &[
            "--nats-url".into(),
            cluster.node(0).client_url(),
            "--id".into(),
            "d1".into(),
        ],
        &[
            ("DROVER_KEYS", TEST_KEYS.into()),
            ("DROVER_LOG", "info".into()),
            ("DROVER_TOPOLOGY__REPLICAS", "3".into()),
            ("DROVER_TOPOLOGY__LEASE_MS", "5000".into()),
            ("DROVER_METRICS__ADDR", format!("127.0.0.1:{port}")),
        ],
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();

    // It retries, stays alive and reports not ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains("provisioning failed; retrying") {
        assert!(d.is_running(), "the dispatcher exited:\n{}", d.log());
        assert!(
            Instant::now() < deadline,
            "no retry logged within 60 s:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = http_get(addr, "/readyz", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ready.status, 503, "not ready while provisioning fails");
    assert!(d.is_running());

    // The node comes back: provisioning succeeds, the replica is ready and leads.
    cluster.node(1).respawn();
    cluster.node(2).respawn();
    cluster.wait_healthy().await;
    let js = jetstream::new(cluster.connect().await);
    wait_leader(&js, &Names::default(), None, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http_get(addr, "/readyz", Duration::from_secs(5)).await;
        if ready.is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        d.log().contains("provisioning succeeded after retries"),
        "{}",
        d.log()
    );
}
