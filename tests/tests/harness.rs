//! Tests of the harness itself against real `nats-server` processes: a single node (JetStream,
//! SIGSTOP/SIGCONT, SIGKILL + restart on the same store, specific versions, extra config) and a
//! 3-node cluster (an R3 stream survives losing a node, the node rejoins, the whole cluster
//! recovers from a crash of every node).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::jetstream::{self, stream};
use drover_tests::{NatsCluster, NatsServer, http_get, nats_server_binary_version};

/// Generous bound for anything that waits on an election or a reconnect on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// Retries `op` until it succeeds or [`PATIENCE`] runs out (then returns the last error).
async fn eventually<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), op()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: still failing after {PATIENCE:?}")));
            }
            Err(_) if Instant::now() >= deadline => {
                bail!("{what}: still timing out after {PATIENCE:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn stream_config(name: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{}.>", name.to_lowercase())],
        num_replicas: replicas,
        ..Default::default()
    }
}

async fn publish_acked(
    js: &jetstream::Context,
    subject: String,
    payload: &'static str,
) -> Result<()> {
    js.publish(subject, payload.into()).await?.await?;
    Ok(())
}

/// Publishes `subject` until JetStream acknowledges it, with the subject as the message id so a
/// retry after a lost ack is deduplicated. Right after `create_stream` on a cluster, the node the
/// client talks to may not yet know the stream's subjects ("no stream found for given subject").
async fn publish_until_acked(js: &jetstream::Context, subject: String) -> Result<()> {
    eventually(&format!("publish {subject}"), || async {
        let headers = async_nats::HeaderMap::from_iter([(
            async_nats::header::NATS_MESSAGE_ID,
            async_nats::HeaderValue::from(subject.as_str()),
        )]);
        js.publish_with_headers(subject.clone(), headers, "x".into())
            .await?
            .await?;
        Ok(())
    })
    .await
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> Result<u64> {
    Ok(js.get_stream(name).await?.get_info().await?.state.messages)
}

#[tokio::test]
async fn single_node_runs_jetstream() -> Result<()> {
    let server = NatsServer::start().await;
    assert!(server.client_url().starts_with("nats://127.0.0.1:"));
    assert!(server.pid().is_some());
    let js = jetstream::new(server.connect().await);
    js.create_stream(stream_config("ORDERS", 1)).await?;
    for _ in 0..10 {
        publish_acked(&js, "orders.new".into(), "x").await?;
    }
    assert_eq!(stream_messages(&js, "ORDERS").await?, 10);

    let health = server.monitor_get("/healthz").await?;
    assert_eq!(health.status, 200, "{}", health.body);
    Ok(())
}

#[tokio::test]
async fn sigstop_freezes_the_server_and_sigcont_resumes_it() -> Result<()> {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    client.request("$JS.API.INFO", "".into()).await?;

    server.stop();
    let frozen = tokio::time::timeout(
        Duration::from_millis(500),
        client.request("$JS.API.INFO", "".into()),
    )
    .await;
    assert!(
        !matches!(frozen, Ok(Ok(_))),
        "a stopped server answered a request"
    );
    let monitor = SocketAddr::from((Ipv4Addr::LOCALHOST, server.monitor_port()));
    assert!(
        http_get(monitor, "/healthz", Duration::from_millis(300))
            .await
            .is_err(),
        "a stopped server answered /healthz"
    );

    server.cont();
    eventually("request after SIGCONT", || async {
        client.request("$JS.API.INFO", "".into()).await?;
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigkill_and_restart_keep_the_store() -> Result<()> {
    let server = NatsServer::start().await;
    let url = server.client_url();
    let js = jetstream::new(server.connect().await);
    js.create_stream(stream_config("KEEP", 1)).await?;
    for i in 0..50 {
        publish_acked(&js, format!("keep.{i}"), "payload").await?;
    }

    let pid = server.pid().context("running server has a pid")?;
    server.kill();
    assert_eq!(server.pid(), None);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed server was not reaped"
    );

    server.restart().await;
    assert_eq!(server.client_url(), url, "a restart keeps the ports");
    assert_ne!(server.pid(), Some(pid));
    // The client reconnects by itself.
    let messages = eventually("stream info after restart", || stream_messages(&js, "KEEP")).await?;
    assert_eq!(messages, 50);
    publish_acked(&js, "keep.after".into(), "payload").await?;
    Ok(())
}

#[tokio::test]
async fn dropping_a_server_kills_and_reaps_it() {
    let server = NatsServer::start().await;
    let pid = server.pid().expect("running server has a pid");
    let store = server.store_dir();
    server.stop(); // even a stopped server dies
    drop(server);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!store.exists(), "the temporary store is removed");
}

#[tokio::test]
async fn a_specific_version_and_extra_config() -> Result<()> {
    let server = NatsServer::builder()
        .version("2.11.11")
        .max_mem(64 << 20)
        .max_file(256 << 20)
        .extra_config("max_payload: 2MB")
        .jetstream_extra("max_buffered_msgs: 10000")
        .start()
        .await;
    assert_eq!(server.version(), "2.11.11");
    let varz = server.monitor_get("/varz").await?.json()?;
    assert_eq!(varz["version"], "2.11.11");
    assert_eq!(varz["max_payload"], 2 << 20);
    let jsz = server.monitor_get("/jsz").await?.json()?;
    assert_eq!(jsz["config"]["max_memory"], 64 << 20);
    assert_eq!(jsz["config"]["max_storage"], 256 << 20);
    Ok(())
}

#[test]
#[should_panic(expected = "bash nats/install.sh 0.0.1")]
fn a_missing_version_names_the_install_command() {
    nats_server_binary_version("0.0.1");
}

/// The index of the node leading `stream`.
async fn stream_leader(
    cluster: &NatsCluster,
    js: &jetstream::Context,
    stream: &str,
) -> Result<usize> {
    let info = js.get_stream(stream).await?.get_info().await?;
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .ok_or_else(|| anyhow!("stream {stream} has no leader"))?;
    cluster
        .nodes()
        .iter()
        .position(|n| n.name() == leader)
        .ok_or_else(|| anyhow!("leader {leader} is not a node of the cluster"))
}

/// The message count a node's own replica of `stream` holds, from its `/jsz`.
async fn replica_messages(cluster: &NatsCluster, node: usize, stream: &str) -> Result<u64> {
    let jsz = cluster
        .node(node)
        .monitor_get("/jsz?streams=true")
        .await?
        .json()?;
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|acc| acc["stream_detail"].as_array().into_iter().flatten())
        .find(|s| s["name"] == stream)
        .and_then(|s| s["state"]["messages"].as_u64())
        .ok_or_else(|| anyhow!("node {node} has no replica of {stream}"))
}

#[tokio::test]
async fn cluster_r3_stream_survives_a_node_and_the_node_rejoins() -> Result<()> {
    let cluster = NatsCluster::start(3).await;
    assert_eq!(cluster.client_urls().split(',').count(), 3);
    assert!(cluster.meta_leader_index().await.is_some());
    let js = jetstream::new(cluster.connect().await);
    js.create_stream(stream_config("R3", 3)).await?;
    for i in 0..20 {
        publish_until_acked(&js, format!("r3.{i}")).await?;
    }

    // Losing the stream leader is the harder case: the survivors must elect a new one.
    let victim = stream_leader(&cluster, &js, "R3").await?;
    cluster.kill(victim);
    for i in 0..20 {
        publish_until_acked(&js, format!("r3.down.{i}")).await?;
    }
    let leader = eventually("new stream leader", || stream_leader(&cluster, &js, "R3")).await?;
    assert_ne!(leader, victim);

    cluster.restart(victim).await;
    eventually("the restarted node catches up", || async {
        let n = replica_messages(&cluster, victim, "R3").await?;
        if n < 40 {
            bail!("node {victim} holds {n} of 40 messages");
        }
        Ok(n)
    })
    .await?;
    assert_eq!(stream_messages(&js, "R3").await?, 40);
    Ok(())
}

#[tokio::test]
async fn cluster_recovers_from_every_node_crashing() -> Result<()> {
    let cluster = NatsCluster::start(3).await;
    let js = jetstream::new(cluster.connect().await);
    js.create_stream(stream_config("CRASH", 3)).await?;
    for i in 0..10 {
        publish_until_acked(&js, format!("crash.{i}")).await?;
    }
    cluster.restart_all().await;
    let messages = eventually("stream info after the crash", || {
        stream_messages(&js, "CRASH")
    })
    .await?;
    assert_eq!(messages, 10);
    publish_until_acked(&js, "crash.after".into()).await?;
    Ok(())
}
