//! The dispatcher process: connect, provision, campaign, and lead while elected (SPEC §5).
//!
//! The election loop drives the pure [`Election`] state machine: it turns timer ticks, watch
//! events and request results into [`Event`]s and carries out the [`Action`]s. Leading runs in
//! its own task with its own cancellation token, cancelled the moment the machine says to stop.

use crate::assign::{self, AssignConfig, AssignContext};
use crate::batcher::BatcherConfig;
use crate::election::{Action, Election, Event, LeaseConfig, StepDown};
use crate::events::EventSink;
use crate::intake::Strategy;
use crate::leader::{self, LeaderConfig, LeaderContext};
use crate::metrics::DispatcherMetrics;
use crate::supervise::{OnDone, supervise};
use crate::{due, outcomes};
use async_nats::jetstream::{self, kv};
use drover_shared::config::ConnectArgs;
use drover_shared::keyring::Keyring;
use drover_shared::ops::{self, Health, Metrics};
use drover_shared::settings::{self, QueueSettings, Settings};
use drover_shared::topology::{QueueConsumerConfig, TopologyConfig};
use futures::StreamExt;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Most JetStream publishes the dispatcher keeps waiting for acks at once.
pub const MAX_ACKS_IN_FLIGHT: usize = 16_384;

/// What one replica runs with, derived from the layered [`Settings`].
#[derive(Clone)]
pub struct Replica {
    /// How to reach NATS.
    pub connect: ConnectArgs,
    /// This replica's id.
    pub id: String,
    /// Stream and bucket sizing.
    pub topology: TopologyConfig,
    /// Lease timing; `lease` is the election bucket's max_age (`topology.lease_ms`).
    pub lease: LeaseConfig,
    /// Dispatch pipeline settings.
    pub leader: LeaderConfig,
    /// Envelope keys.
    pub keys: Arc<Keyring>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: String,
}

impl Replica {
    /// Derives a replica from validated settings; fails without keys.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let keys = settings.keyring()?;
        let nats = &settings.nats;
        let connect = ConnectArgs {
            nats_url: nats.url.join(","),
            creds: nats.creds.clone(),
            user: nats.user.clone(),
            password: nats.password.as_ref().map(|p| p.expose().to_owned()),
            tls_ca: nats.tls_ca.clone(),
            tls_cert: nats.tls_cert.clone(),
            tls_key: nats.tls_key.clone(),
            prefix: nats.prefix.clone(),
        };
        let d = &settings.dispatcher;
        let defaults = QueueSettings::default();
        let strategy = |s: settings::Strategy| match s {
            settings::Strategy::Random => Strategy::Random,
            settings::Strategy::LeastLoaded => Strategy::LeastLoaded,
            settings::Strategy::RoundRobin => Strategy::RoundRobin,
        };
        Ok(Self {
            connect,
            id: settings
                .id
                .clone()
                .unwrap_or_else(drover_shared::config::default_id),
            topology: settings.topology.clone(),
            lease: LeaseConfig {
                lease: settings.lease(),
                margin: settings.lease_margin(),
            },
            leader: LeaderConfig {
                batcher: BatcherConfig {
                    max_batch: d.max_batch,
                    max_batch_bytes: d.max_batch_bytes,
                    linger: Duration::from_millis(d.linger_ms),
                },
                codec: settings.codec,
                default_partitions: defaults.partitions,
                queue_partitions: settings
                    .queues
                    .iter()
                    .map(|(name, q)| (name.clone(), q.partitions))
                    .collect(),
                strategy: strategy(defaults.strategy),
                queue_strategies: settings
                    .queues
                    .iter()
                    .map(|(name, q)| (name.clone(), strategy(q.strategy)))
                    .collect(),
                default_timeout_ms: defaults.timeout_ms,
                max_chunk: d.intake_fetch,
                track_queued: d.tracking == settings::Tracking::Full,
                queue_consumers: QueueConsumerConfig {
                    max_in_flight: i64::from(defaults.max_in_flight),
                    ack_wait: settings.topology.worker_ttl(),
                },
                events: d.events,
            },
            keys: Arc::new(keys),
            metrics_addr: settings.metrics.addr.clone(),
        })
    }
}

/// The value of `drover-election.leader` (SPEC §10).
#[derive(Debug, Serialize)]
struct LeaderValue<'a> {
    id: &'a str,
    host: &'a str,
    pid: u32,
    since: &'a str,
    addr: Option<&'a str>,
    epoch: Option<u64>,
}

/// Runs one replica until `shutdown` fires; on shutdown a leader hands over (NAKs held intake,
/// deletes its lease) so a standby takes over at once.
pub async fn run(settings: Replica, shutdown: CancellationToken) -> anyhow::Result<()> {
    let names = settings.connect.names()?;
    let mut registry = Metrics::new("dispatcher", env!("CARGO_PKG_VERSION"));
    let metrics = Arc::new(DispatcherMetrics::register(&mut registry));
    let health = Health::new();
    let addr = ops::serve(
        &settings.metrics_addr,
        Arc::new(registry),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    )
    .await?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    health.set_live(true);
    let settings = Replica {
        metrics_addr: addr.to_string(),
        ..settings
    };
    let client = drover_shared::connect::connect(
        &settings.connect,
        &format!("drover-dispatcher {}", settings.id),
        Duration::from_secs(10),
    )
    .await?;
    let Some(report) = crate::provisioning::provision_until_done(
        &client,
        &names,
        &settings.topology,
        &health,
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    info!(id = %settings.id, %report, "provisioned");
    // Pipelined publishes wait for room instead of failing when many acks are outstanding.
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let election_kv = js.get_key_value(names.bucket("election")).await?;

    // Every replica, leader or not, answers the request API.
    let api_ctx = crate::api::ApiContext {
        client: client.clone(),
        js: js.clone(),
        names: names.clone(),
        replica: settings.id.clone(),
        max_payload: client.server_info().max_payload,
        default_timeout_ms: settings.leader.default_timeout_ms,
    };
    let api_shutdown = shutdown.clone();
    let api = tokio::spawn(async move {
        if let Err(e) = crate::api::serve_api(api_ctx, api_shutdown).await {
            error!(error = %e, "request API failed; this replica answers no requests");
        }
    });

    let ctx = LeaderContext {
        js: js.clone(),
        names: names.clone(),
        keys: settings.keys.clone(),
        config: Arc::new(settings.leader.clone()),
        max_payload: client.server_info().max_payload,
        metrics: metrics.clone(),
        events: EventSink::spawn(
            js.clone(),
            names.clone(),
            settings.leader.events,
            metrics.clone(),
            shutdown.clone(),
        ),
        deps: Default::default(),
    };
    campaign(&settings, &election_kv, ctx, shutdown).await;
    // It answers what it already received, for up to api::DRAIN_DEADLINE.
    let _ = api.await;
    health.set_live(false);
    client.flush().await.ok();
    Ok(())
}

/// The election loop.
async fn campaign(
    settings: &Replica,
    kv: &kv::Store,
    ctx: LeaderContext,
    shutdown: CancellationToken,
) {
    let host = drover_shared::config::hostname();
    let since = drover_shared::task::format_time(&chrono::Utc::now());
    let value = |epoch: Option<u64>| -> bytes::Bytes {
        serde_json::to_vec(&LeaderValue {
            id: &settings.id,
            host: &host,
            pid: std::process::id(),
            since: &since,
            addr: Some(settings.metrics_addr.as_str()),
            epoch,
        })
        .unwrap_or_default()
        .into()
    };

    let mut election = Election::new(settings.lease, Instant::now());
    let (tx, mut rx) = mpsc::channel::<Event>(8);
    let mut watch = match kv.watch("leader").await {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch the election key; campaigning on the timer until it can");
            None
        }
    };
    // No watch: try again at every tick.
    let mut rewatch = watch.is_none();
    let mut leading: Option<(CancellationToken, tokio::task::JoinHandle<bool>)> = None;
    // On shutdown: whether the intake was released cleanly, and until when the lease was ours.
    let mut released = false;
    let metrics = ctx.metrics.clone();
    let mut leaderless_since: Option<Instant> = None;
    let mut epoch: Option<u64> = None;

    loop {
        let deadline = election
            .next_deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => Event::Shutdown,
            Some(ev) = rx.recv() => ev,
            _ = tokio::time::sleep_until(deadline) => Event::Tick,
            entry = async {
                match watch.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => match entry {
                None => {
                    // The watch ended (its consumer could not be recreated): watch again, or
                    // campaign on the timer alone until the next tick retries.
                    warn!("the election watch ended; watching again");
                    watch = kv.watch("leader").await.ok();
                    if watch.is_none() {
                        rewatch = true;
                    }
                    continue;
                }
                Some(Ok(e)) if e.operation != kv::Operation::Put => {
                    debug!(operation = ?e.operation, revision = e.revision, "lease gone");
                    leaderless_since.get_or_insert_with(Instant::now);
                    Event::KeyGone
                }
                Some(Ok(_)) => {
                    if let Some(t) = leaderless_since.take() {
                        metrics.leaderless.inc_by(t.elapsed().as_secs_f64());
                    }
                    continue;
                }
                Some(Err(_)) => continue,
            },
        };
        if rewatch && event == Event::Tick {
            watch = kv.watch("leader").await.ok();
            rewatch = watch.is_none();
        }
        let is_shutdown = event == Event::Shutdown;
        if is_shutdown && epoch.is_some() {
            info!(epoch, "shutting down: handing leadership over");
        }
        let (valid_until, epoch_of_term) = (election.valid_until(), epoch);
        for action in election.on_event(event, Instant::now()) {
            match action {
                Action::Create => {
                    let (kv, tx, v) = (kv.clone(), tx.clone(), value(None));
                    tokio::spawn(async move {
                        let sent_at = Instant::now();
                        let ev = match kv.create("leader", v).await {
                            Ok(revision) => Event::Created { revision, sent_at },
                            Err(_) => Event::CreateFailed,
                        };
                        let _ = tx.send(ev).await;
                    });
                }
                Action::Renew { revision } => {
                    let (kv, tx, v) = (kv.clone(), tx.clone(), value(epoch));
                    tokio::spawn(async move {
                        let sent_at = Instant::now();
                        let ev = match kv.update("leader", v, revision).await {
                            Ok(revision) => {
                                debug!(
                                    revision,
                                    took_ms = sent_at.elapsed().as_millis() as u64,
                                    "lease renewed"
                                );
                                Event::Renewed { revision, sent_at }
                            }
                            Err(_) => Event::RenewFailed,
                        };
                        let _ = tx.send(ev).await;
                    });
                }
                Action::StartLeading { epoch: e } => {
                    info!(epoch = e, id = %settings.id, "elected leader");
                    metrics.leader.set(1);
                    metrics.leader_changes.inc();
                    epoch = Some(e);
                    let token = CancellationToken::new();
                    let assign_ctx = AssignContext {
                        js: ctx.js.clone(),
                        names: ctx.names.clone(),
                        config: AssignConfig::new(
                            ctx.config.default_partitions,
                            settings.topology.worker_ttl(),
                        ),
                    };
                    let (mut ctx, t) = (ctx.clone(), token.clone());
                    // The term's dependency actor: rebuilt from held entries, fed by intake
                    // and outcomes.
                    ctx.deps = crate::deps::spawn(ctx.clone(), e, t.clone());
                    let handle = tokio::spawn(async move {
                        // Predeclared queues get their records beside the roles, not before
                        // them: while JetStream recovers from a node loss it can take seconds.
                        tokio::spawn({
                            let ctx = ctx.clone();
                            async move { leader::declare_queues(&ctx, e).await }
                        });
                        // Each role is restarted if it fails mid-term (crate::supervise).
                        let assigning =
                            tokio::spawn(supervise("assignment", t.clone(), OnDone::Stop, {
                                let (assign_ctx, t) = (assign_ctx, t.clone());
                                move || assign::assign_loop(assign_ctx.clone(), e, t.clone())
                            }));
                        let outcomes =
                            tokio::spawn(supervise("outcomes", t.clone(), OnDone::Restart, {
                                let (ctx, t) = (ctx.clone(), t.clone());
                                move || outcomes::consume(ctx.clone(), e, t.clone())
                            }));
                        let due =
                            tokio::spawn(supervise("due timers", t.clone(), OnDone::Restart, {
                                let (ctx, t) = (ctx.clone(), t.clone());
                                move || due::consume(ctx.clone(), e, t.clone())
                            }));
                        let schedules =
                            tokio::spawn(supervise("schedules", t.clone(), OnDone::Restart, {
                                let (ctx, t) = (ctx.clone(), t.clone());
                                move || crate::schedule::eval::run(ctx.clone(), e, t.clone())
                            }));
                        // Whether the intake was released cleanly (for the hand-over record).
                        let released = supervise("intake", t.clone(), OnDone::Restart, || {
                            leader::lead(ctx.clone(), e, t.clone())
                        })
                        .await
                        .unwrap_or(false);
                        let _ = assigning.await;
                        let _ = outcomes.await;
                        let _ = due.await;
                        let _ = schedules.await;
                        released
                    });
                    leading = Some((token, handle));
                }
                Action::StopLeading { reason } => {
                    if reason != StepDown::Shutdown {
                        warn!(reason = reason.as_str(), "stopped leading");
                    }
                    metrics.leader.set(0);
                    metrics
                        .step_downs
                        .get_or_create(&[("reason", reason.as_str())])
                        .inc();
                    epoch = None;
                    if let Some((token, handle)) = leading.take() {
                        token.cancel();
                        if reason == StepDown::Shutdown {
                            // Let it NAK what it holds before the lease goes.
                            released = matches!(
                                tokio::time::timeout(Duration::from_secs(5), handle).await,
                                Ok(Ok(true))
                            );
                        }
                    }
                }
                Action::Resign { revision } => {
                    // Record the hand-over only while the lease is surely still ours: then no
                    // successor has pulled since our release (crate::handover).
                    if released
                        && let (Some(until), Some(e)) = (valid_until, epoch_of_term)
                        && Instant::now() < until
                    {
                        record_handover(&ctx, kv, e).await;
                    }
                    resign(kv, &settings.id, revision).await
                }
            }
        }
        if is_shutdown {
            break;
        }
    }
    if let Some((token, handle)) = leading.take() {
        token.cancel();
        let _ = handle.await;
    }
}

/// Records a graceful hand-over of `epoch` (the intake consumer's delivered sequence after our
/// release), so the successor need not wait for redelivery; a failure only costs that wait.
async fn record_handover(ctx: &LeaderContext, kv: &kv::Store, epoch: u64) {
    let names = &ctx.names;
    let recorded = match leader::leader_consumer(
        ctx,
        &names.submit_stream(),
        &names.intake_consumer(),
    )
    .await
    {
        Ok(consumer) => crate::handover::record(&consumer, kv, epoch).await,
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        warn!(error = %e, "could not record the hand-over; the successor waits for redelivery");
    }
}

/// Deletes our lease so a standby takes over at once. A renewal still in flight when the
/// shutdown came may have moved the revision on: if the key still holds our value, delete at its
/// current revision (a compare-and-set still, so a successor's lease is never removed).
async fn resign(kv: &kv::Store, id: &str, mut revision: u64) {
    for _ in 0..3 {
        match kv.delete_expect_revision("leader", Some(revision)).await {
            Ok(()) => {
                info!("handed over leadership");
                return;
            }
            Err(e) => match kv.entry("leader").await {
                Ok(Some(entry))
                    if entry.operation == kv::Operation::Put
                        && entry.revision != revision
                        && serde_json::from_slice::<serde_json::Value>(&entry.value)
                            .is_ok_and(|v| v["id"].as_str() == Some(id)) =>
                {
                    debug!(error = %e, revision = entry.revision, "lease renewed meanwhile; deleting at its new revision");
                    revision = entry.revision;
                }
                _ => {
                    warn!(error = %e, "could not delete the lease; it expires on its own");
                    return;
                }
            },
        }
    }
    warn!("could not delete the lease; it expires on its own");
}
