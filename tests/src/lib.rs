//! # drover-tests
//!
//! Integration and chaos tests for Drover run against real `nats-server` processes; NATS is never
//! mocked. This library is the harness they share.
//!
//! | item | what it does |
//! |---|---|
//! | [`NatsServer`] | one server with JetStream, random loopback ports, temp store, killed on drop; kill / stop / cont / restart |
//! | [`NatsCluster`] | an N-node JetStream cluster over loopback, ready once a meta leader is elected; per-node faults |
//! | [`nats_server_binary`], [`nats_server_binary_version`] | the installed server binaries (`bash nats/install.sh [VERSION]`) |
//! | [`test_connect_options`] | client options with fast reconnects, used by every `connect()` |
//! | [`http_get`] | a tiny HTTP GET for the monitoring endpoints |
//! | [`DroverProcess`], [`drover_bin`] | Drover's own binaries as real child processes, built once per run |
//! | [`chaos`] | a whole fleet (3-node cluster, R3, 3 dispatchers, 3 workers) under steady load with injected faults, and the checker of its guarantees |
//! | [`observe`] | decoding `DROVER_WORK` with the test keys, waiting for the intake to drain, finding the leader |
//! | [`free_port`] | free loopback ports, never handed out twice in one process |
//!
//! The binary is `$DROVER_NATS_SERVER`, else `<workspace>/nats/bin/nats-server`; without it every
//! test fails with a message saying to run `bash nats/install.sh`. Nothing is skipped silently.
//!
//! ```no_run
//! # async fn demo() {
//! use drover_tests::NatsServer;
//!
//! let server = NatsServer::start().await;
//! let client = server.connect().await;
//! let js = async_nats::jetstream::new(client);
//! server.stop(); // SIGSTOP: requests time out
//! server.cont(); // SIGCONT
//! server.kill(); // SIGKILL
//! server.restart().await; // same ports and store
//! # let _ = js;
//! # }
//! ```

#![warn(missing_docs)]

pub mod binary;
pub mod chaos;
pub mod cluster;
pub mod fleet;
pub mod http;
pub mod observe;
pub mod ports;
mod process;
pub mod server;

pub use binary::{
    NATS_SERVER_ENV, binary_version, nats_server_binary, nats_server_binary_version, workspace_root,
};
pub use cluster::{NatsCluster, NatsClusterBuilder};
pub use fleet::{DroverProcess, TEST_KEYS, drover_bin};
pub use http::{HttpResponse, http_get};
pub use ports::free_port;
pub use server::{
    DEFAULT_STARTUP_TIMEOUT, KEEP_DIRS_ENV, NatsServer, NatsServerBuilder, test_connect_options,
};

#[cfg(test)]
mod tests {
    /// Servers and clusters are shared with fault-injecting tasks through `Arc`.
    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::NatsServer>();
        send_sync::<crate::NatsCluster>();
    }
}
