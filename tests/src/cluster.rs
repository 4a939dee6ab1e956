//! [`NatsCluster`]: N real `nats-server` processes forming one JetStream cluster over loopback,
//! each a [`NatsServer`] with its own ports, store and log, all killed on drop.
//!
//! Ready means every node answers `/healthz` with 200 (which in clustered mode requires contact
//! with the JetStream meta leader and being current with it) and every node's `/jsz` names the
//! same meta leader with all N peers known. Each cluster gets a unique cluster name, so nodes of
//! two test clusters never join each other even if a port is reused.

use std::time::{Duration, Instant};

use crate::ports::free_port;
use crate::server::{
    ClusterSpec, Collisions, NatsServer, NatsServerBuilder, NotReady, POLL_INTERVAL,
    START_ATTEMPTS, test_connect_options, unique_name,
};

/// Options for starting a [`NatsCluster`]; from [`NatsCluster::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .start().await"]
pub struct NatsClusterBuilder {
    size: usize,
    server: NatsServerBuilder,
}

impl NatsClusterBuilder {
    /// Every node starts with these server options (binary or version, extra config, JetStream
    /// limits, startup timeout; the timeout bounds the whole cluster's start).
    pub fn server(mut self, server: NatsServerBuilder) -> Self {
        self.server = server;
        self
    }

    /// Starts the nodes and waits until the cluster is ready (see the [module docs](self)).
    ///
    /// # Panics
    /// If `size` is 0, a binary is missing, or the cluster is not ready within the startup
    /// timeout (with the reason and the log tail of the node concerned).
    pub async fn start(self) -> NatsCluster {
        assert!(self.size > 0, "a cluster needs at least one node");
        let timeout = self.server.get_startup_timeout();
        for attempt in 1..=START_ATTEMPTS {
            let cluster = self.prepare();
            for node in &cluster.nodes {
                node.respawn();
            }
            let deadline = Instant::now() + timeout;
            match cluster.wait_ready(deadline, Collisions::Fail).await {
                Ok(()) => return cluster,
                Err((_, NotReady::PortCollision)) if attempt < START_ATTEMPTS => continue,
                Err((index, why)) => panic!("{}", cluster.failure_report(index, &why)),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Nodes with fresh ports, not started.
    fn prepare(&self) -> NatsCluster {
        let name = unique_name("drover-cluster");
        let route_ports: Vec<u16> = (0..self.size).map(|_| free_port()).collect();
        let nodes = (0..self.size)
            .map(|i| {
                let spec = ClusterSpec {
                    name: name.clone(),
                    port: route_ports[i],
                    routes: route_ports
                        .iter()
                        .enumerate()
                        .filter(|&(j, _)| j != i)
                        .map(|(_, &port)| port)
                        .collect(),
                };
                NatsServer::prepare(self.server.clone(), format!("{name}-n{i}"), Some(spec))
            })
            .collect();
        NatsCluster {
            name,
            nodes,
            timeout: self.server.get_startup_timeout(),
        }
    }
}

/// A JetStream cluster of real `nats-server` processes on loopback. See the [module docs](self).
///
/// Nodes are numbered from 0. Every method takes `&self`, so a cluster can be shared
/// (`Arc<NatsCluster>`) with the tasks that inject faults.
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    nodes: Vec<NatsServer>,
    timeout: Duration,
}

impl NatsCluster {
    /// Starts a cluster of `size` nodes (3 for R3 streams) with default options and waits until
    /// it is ready.
    ///
    /// # Panics
    /// As [`NatsClusterBuilder::start`].
    pub async fn start(size: usize) -> NatsCluster {
        Self::builder(size).start().await
    }

    /// Options for a cluster of `size` nodes.
    pub fn builder(size: usize) -> NatsClusterBuilder {
        NatsClusterBuilder {
            size,
            server: NatsServer::builder(),
        }
    }

    /// The cluster name, unique per test cluster.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Node `index`.
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node(&self, index: usize) -> &NatsServer {
        self.nodes.get(index).unwrap_or_else(|| {
            panic!(
                "cluster {} has {} nodes, no node {index}",
                self.name,
                self.nodes.len()
            )
        })
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Every node's client URL, in index order.
    pub fn server_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::client_url).collect()
    }

    /// Every node's client URL, comma-separated (the form of `--nats-url` / `DROVER_NATS_URL`).
    pub fn client_urls(&self) -> String {
        self.server_urls().join(",")
    }

    /// Connects a client that knows every node, with [`test_connect_options`].
    ///
    /// # Panics
    /// If no node accepts the connection.
    pub async fn connect(&self) -> async_nats::Client {
        self.connect_with(test_connect_options()).await
    }

    /// Connects a client that knows every node, with `options`.
    ///
    /// # Panics
    /// If no node accepts the connection.
    pub async fn connect_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        options
            .connect(self.server_urls())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to cluster {} ({}): {e}",
                    self.name,
                    self.client_urls()
                )
            })
    }

    /// SIGKILL node `index` (see [`NatsServer::kill`]).
    pub fn kill(&self, index: usize) {
        self.node(index).kill();
    }

    /// SIGSTOP node `index` (see [`NatsServer::stop`]).
    pub fn stop(&self, index: usize) {
        self.node(index).stop();
    }

    /// SIGCONT node `index` (see [`NatsServer::cont`]).
    pub fn cont(&self, index: usize) {
        self.node(index).cont();
    }

    /// Restarts node `index` with its ports and store (killing it first if it runs) and waits
    /// until it is healthy again, which includes being current with the meta leader. The other
    /// nodes must provide a quorum; use [`restart_all`](Self::restart_all) otherwise.
    ///
    /// # Panics
    /// If the node is not healthy within the startup timeout.
    pub async fn restart(&self, index: usize) {
        self.node(index).restart().await;
    }

    /// Kills every running node and starts all of them again at once (a whole-cluster crash and
    /// recovery), then waits until the cluster is ready.
    ///
    /// # Panics
    /// If the cluster is not ready within the startup timeout.
    pub async fn restart_all(&self) {
        for node in &self.nodes {
            node.kill();
        }
        for node in &self.nodes {
            node.respawn();
        }
        self.wait_healthy().await;
    }

    /// Waits until every node runs and is healthy and all agree on a JetStream meta leader.
    ///
    /// # Panics
    /// If that does not happen within the startup timeout.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + self.timeout;
        if let Err((index, why)) = self.wait_ready(deadline, Collisions::Respawn).await {
            panic!("{}", self.failure_report(index, &why));
        }
    }

    /// The JetStream meta leader's server name, as the first running node that knows one says.
    pub async fn meta_leader(&self) -> Option<String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            if let Some(meta) = Self::meta_view(node).await
                && !meta.leader.is_empty()
            {
                return Some(meta.leader);
            }
        }
        None
    }

    /// The index of the node that is the JetStream meta leader.
    pub async fn meta_leader_index(&self) -> Option<usize> {
        let leader = self.meta_leader().await?;
        self.nodes.iter().position(|n| n.name() == leader)
    }

    /// Waits for every node's health, then for one meta leader known to all with every peer.
    async fn wait_ready(
        &self,
        deadline: Instant,
        collisions: Collisions,
    ) -> Result<(), (usize, NotReady)> {
        for (index, node) in self.nodes.iter().enumerate() {
            node.wait_ready(deadline, collisions)
                .await
                .map_err(|why| (index, why))?;
        }
        loop {
            let Err(last) = self.agreed_meta_leader().await else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err((
                    0,
                    NotReady::Timeout(format!("meta group not ready: {last}")),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Ok when every node's `/jsz` names the same meta leader and knows all peers, and the
    /// leader sees every follower as current (so stream placement finds all peers at once).
    async fn agreed_meta_leader(&self) -> Result<(), String> {
        let mut leader: Option<String> = None;
        for node in &self.nodes {
            let meta = Self::meta_view(node)
                .await
                .ok_or_else(|| format!("{}: no meta_cluster in /jsz", node.name()))?;
            if meta.leader.is_empty() {
                return Err(format!("{}: no meta leader yet", node.name()));
            }
            if meta.peers + 1 < self.nodes.len() {
                return Err(format!(
                    "{}: knows {} of {} meta peers",
                    node.name(),
                    meta.peers + 1,
                    self.nodes.len()
                ));
            }
            if meta.leader == node.name() && !meta.followers_current {
                return Err(format!(
                    "leader {}: not every follower is current",
                    node.name()
                ));
            }
            match &leader {
                None => leader = Some(meta.leader),
                Some(l) if *l == meta.leader => {}
                Some(l) => {
                    return Err(format!(
                        "{} says the meta leader is {}, another node says {l}",
                        node.name(),
                        meta.leader
                    ));
                }
            }
        }
        Ok(())
    }

    /// A node's view of the meta group from `/jsz`.
    async fn meta_view(node: &NatsServer) -> Option<MetaView> {
        let jsz = node.monitor_get("/jsz").await.ok()?.json().ok()?;
        let meta = jsz.get("meta_cluster")?;
        let replicas = meta["replicas"].as_array().cloned().unwrap_or_default();
        Some(MetaView {
            leader: meta["leader"].as_str().unwrap_or_default().to_owned(),
            peers: replicas.len(),
            followers_current: replicas.iter().all(|r| r["current"] == true),
        })
    }

    fn failure_report(&self, index: usize, why: &NotReady) -> String {
        format!(
            "cluster {} ({} nodes) is not ready: node {index}: {}",
            self.name,
            self.nodes.len(),
            self.node(index).failure_report(why)
        )
    }
}

/// What a node's `/jsz` says about the meta group.
struct MetaView {
    /// The leader's server name, empty while there is none.
    leader: String,
    /// The peers other than the answering node (`replicas`).
    peers: usize,
    /// Whether every one of those peers is `current`; meaningful on the leader only.
    followers_current: bool,
}
