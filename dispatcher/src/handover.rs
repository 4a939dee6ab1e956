//! Passing the intake from one leader to the next (SPEC §5): the leader's intake pull that can
//! be released without leaving a delivery behind, the hand-over record, and the successor's
//! start gate.
//!
//! A new leader dispatches only once its predecessor's intake deliveries are settled, so they
//! come back before anything newer and per-key order holds. After a crash that means waiting
//! until they are due for redelivery (`ack_wait` after the last delivery). After a graceful
//! hand-over it need not wait: the old leader releases its pull request with a subscription
//! drain (UNSUB, then every message the server sent before it is still read), NAKs everything
//! it holds (confirmed, no delay: the server redelivers NAKed messages before newer ones), and
//! records the intake consumer's delivered sequence under [`HANDOVER_KEY`] in `drover-election`
//! before it deletes its lease. A successor that finds the consumer's delivered sequence still
//! equal to that record knows no delivery happened since, so every pending message is a NAKed
//! one and it starts at once. The decision is the pure [`gate`].

use crate::leader::{LeaderError, nats_err};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tracing::{debug, info};

/// Key in `drover-election` of the last graceful hand-over's record (it expires with the
/// bucket's max_age, like the lease).
pub const HANDOVER_KEY: &str = "handover";

/// How long a released intake pull may take to drain before the release counts as unclean.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Slack after `ack_wait` before a crashed predecessor's deliveries count as due again.
const REDELIVERY_SLACK: Duration = Duration::from_millis(50);

/// Longest single wait of the gate before it looks at the consumer again.
const GATE_POLL: Duration = Duration::from_millis(50);

/// What a leader records when it hands over gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The term that ended.
    pub epoch: u64,
    /// The intake consumer's delivered (consumer) sequence once every delivery of that term was
    /// acked or NAKed and its pull request was gone.
    pub delivered: u64,
}

/// What the intake consumer looks like to a new leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeView {
    /// Messages delivered and not acked (NAKed ones included).
    pub ack_pending: u64,
    /// The consumer's delivered (consumer) sequence.
    pub delivered: u64,
    /// Time since the last delivery.
    pub since_last_delivery: Duration,
    /// The consumer's `ack_wait`.
    pub ack_wait: Duration,
}

/// The gate's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Dispatch now.
    Start(StartReason),
    /// Look again after this long.
    Wait(Duration),
}

/// Why a new leader may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    /// Nothing is pending.
    NothingPending,
    /// The predecessor handed over and nothing was delivered since.
    HandedOver,
    /// The predecessor's deliveries are due for redelivery.
    Redeliverable,
}

/// When a new leader may start dispatching (SPEC §5, per-key order across failover).
pub fn gate(view: IntakeView, handover: Option<Handover>) -> Gate {
    if view.ack_pending == 0 {
        return Gate::Start(StartReason::NothingPending);
    }
    if handover.is_some_and(|h| h.delivered == view.delivered) {
        return Gate::Start(StartReason::HandedOver);
    }
    let due = view.ack_wait + REDELIVERY_SLACK;
    if view.since_last_delivery >= due {
        Gate::Start(StartReason::Redeliverable)
    } else {
        Gate::Wait((due - view.since_last_delivery).min(GATE_POLL))
    }
}

/// Reads the intake consumer as [`IntakeView`].
pub async fn view(consumer: &PullConsumer) -> Result<IntakeView, LeaderError> {
    let info = consumer
        .get_info()
        .await
        .map_err(|e| nats_err("read intake consumer")(&e))?;
    let ack_wait = info.config.ack_wait;
    let since_last_delivery = info
        .delivered
        .last_active
        .map(|t| {
            let now = time::OffsetDateTime::now_utc();
            (now - t).try_into().unwrap_or(Duration::ZERO)
        })
        .unwrap_or(ack_wait + REDELIVERY_SLACK);
    Ok(IntakeView {
        ack_pending: info.num_ack_pending as u64,
        delivered: info.delivered.consumer_sequence,
        since_last_delivery,
        ack_wait,
    })
}

/// The last graceful hand-over's record, if there is a readable one.
pub async fn last_handover(election: &kv::Store) -> Option<Handover> {
    match election.get(HANDOVER_KEY).await {
        Ok(Some(v)) => serde_json::from_slice(&v).ok(),
        _ => None,
    }
}

/// Waits until [`gate`] lets a new leader of `epoch` start, or `cancel` fires.
pub async fn wait_for_predecessor(
    consumer: &PullConsumer,
    election: Option<&kv::Store>,
    epoch: u64,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), LeaderError> {
    let started = std::time::Instant::now();
    loop {
        let v = view(consumer).await?;
        let handover = match election {
            Some(kv) if v.ack_pending > 0 => last_handover(kv).await,
            _ => None,
        };
        match gate(v, handover) {
            Gate::Start(reason) => {
                info!(
                    epoch,
                    reason = ?reason,
                    pending = v.ack_pending,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "predecessor's intake settled"
                );
                return Ok(());
            }
            Gate::Wait(d) => tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(d) => {}
            },
        }
    }
}

/// Records a graceful hand-over of `epoch`: the intake consumer's delivered sequence now. Call
/// only after the intake pull was released cleanly and while the lease is still valid.
pub async fn record(
    consumer: &PullConsumer,
    election: &kv::Store,
    epoch: u64,
) -> Result<(), LeaderError> {
    let v = view(consumer).await?;
    let h = Handover {
        epoch,
        delivered: v.delivered,
    };
    let body = serde_json::to_vec(&h).unwrap_or_default();
    election
        .put(HANDOVER_KEY, body.into())
        .await
        .map_err(|e| nats_err("record the hand-over")(&e))?;
    debug!(
        epoch,
        delivered = v.delivered,
        pending = v.ack_pending,
        "hand-over recorded"
    );
    Ok(())
}

/// The leader's intake pull on a subscription of its own, so that leadership can end without a
/// request still open (see [`IntakePull::release`]). Like async-nats' pull stream it asks for
/// the next batch before the outstanding ones have arrived (see [`IntakePull::top_up`]), so
/// messages keep flowing while a chunk is being dispatched.
pub struct IntakePull {
    consumer: PullConsumer,
    js: jetstream::Context,
    sub: Subscriber,
    inbox: String,
    batch: usize,
    expires: Duration,
    /// Messages the open requests may still bring.
    credit: usize,
    /// Moving average of the size of delivered submissions, in bytes.
    avg_bytes: f64,
}

/// About how many bytes of submissions one intake pull asks for: arrays make submissions large
/// (100 tasks ≈ 25 KB), and 512 of them in flight would be 12 MB in the leader's hands. The
/// bound is kept by asking for fewer messages when they are large ([`IntakePull::request_size`]),
/// not by the pull request's `max_bytes`: with `max_bytes` set, nats-server 2.15 delivered a
/// backlog of single submits 3-4 × slower (dispatch bench: 19 k instead of 61-74 k tasks/s).
const PULL_BYTES: f64 = 2.0 * 1024.0 * 1024.0;

/// How long past its `expires` a pull request may stay silent before it is taken for lost: a
/// request dies without its 408 when the consumer's leader does (a node killed, a leader
/// change), and credit kept for it would stop the intake for good.
const LOST_REQUEST_SLACK: Duration = Duration::from_millis(500);

impl IntakePull {
    /// Subscribes an inbox for pulls of up to `batch` messages that expire after `expires`.
    pub async fn open(
        js: &jetstream::Context,
        consumer: PullConsumer,
        batch: usize,
        expires: Duration,
    ) -> Result<Self, LeaderError> {
        let client = js.client();
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats_err("subscribe the intake inbox")(&e))?;
        Ok(Self {
            consumer,
            js: js.clone(),
            sub,
            inbox,
            batch: batch.max(1),
            expires,
            credit: 0,
            avg_bytes: 512.0,
        })
    }

    /// Messages one pull asks for: `batch`, or fewer when recent submissions are large, so that
    /// a pull brings about [`PULL_BYTES`].
    fn request_size(&self) -> usize {
        ((PULL_BYTES / self.avg_bytes.max(1.0)) as usize).clamp(1, self.batch)
    }

    /// Asks for another batch when less than half of one is outstanding, so the next chunk is
    /// on its way while the leader dispatches the chunk in hand.
    pub async fn top_up(&mut self) -> Result<(), LeaderError> {
        let size = self.request_size();
        if self.credit > size / 2 {
            return Ok(());
        }
        let cfg = jetstream::consumer::pull::BatchConfig {
            batch: size,
            expires: Some(self.expires),
            ..Default::default()
        };
        self.consumer
            .request_batch(cfg, self.inbox.clone().into())
            .await
            .map_err(|e| nats_err("pull intake")(&e))?;
        self.credit += size;
        Ok(())
    }

    /// Accounts one message of the subscription; `Some` for a delivery.
    fn take(&mut self, m: async_nats::Message) -> Option<jetstream::Message> {
        match m.status {
            Some(StatusCode::IDLE_HEARTBEAT) => None,
            Some(code) if code != StatusCode::OK => {
                // 408 expired, 409 terminated, 404 nothing: a request is over; the server says
                // how much of it was left.
                if code != StatusCode::TIMEOUT {
                    debug!(code = %code, description = ?m.description, "intake pull ended");
                }
                let left = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|v| v.as_str().parse::<usize>().ok());
                self.credit = match left {
                    Some(n) => self.credit.saturating_sub(n),
                    None => 0,
                };
                None
            }
            _ => {
                self.credit = self.credit.saturating_sub(1);
                self.avg_bytes = 0.9 * self.avg_bytes + 0.1 * m.payload.len() as f64;
                Some(jetstream::Message {
                    message: m,
                    context: self.js.clone(),
                })
            }
        }
    }

    /// The next delivery; requests more as needed. `None` when the connection's subscription
    /// ended.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, LeaderError>> {
        loop {
            if let Err(e) = self.top_up().await {
                return Some(Err(e));
            }
            let m = match tokio::time::timeout(self.expires + LOST_REQUEST_SLACK, self.sub.next())
                .await
            {
                Ok(m) => m?,
                Err(_silent) => {
                    // Every open request has expired by now; whatever did not say so was lost.
                    if self.credit > 0 {
                        debug!(
                            credit = self.credit,
                            "intake pull requests lost; asking again"
                        );
                    }
                    self.credit = 0;
                    continue;
                }
            };
            let terminated = m.status == Some(StatusCode::REQUEST_TERMINATED);
            if let Some(d) = self.take(m) {
                return Some(Ok(d));
            }
            if terminated {
                // E.g. a consumer leader change: do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// A delivery already received, without waiting.
    pub fn next_now(&mut self) -> Option<jetstream::Message> {
        loop {
            let m = futures::FutureExt::now_or_never(self.sub.next())??;
            if let Some(d) = self.take(m) {
                return Some(d);
            }
        }
    }

    /// Ends the pull: unsubscribes with a drain, so the server drops the open request and every
    /// message it delivered before is still read; returns them. `None` when the drain did not
    /// finish in time (some delivery may be unaccounted for).
    pub async fn release(mut self) -> Option<Vec<jetstream::Message>> {
        self.sub.drain().await.ok()?;
        let mut held = Vec::new();
        let drained = tokio::time::timeout(RELEASE_TIMEOUT, async {
            while let Some(m) = self.sub.next().await {
                if let Some(d) = self.take(m) {
                    held.push(d);
                }
            }
        })
        .await;
        drained.ok().map(|()| held)
    }
}

/// NAKs `messages` without delay and waits for the server to confirm each, so they are due
/// before anything newer when the next leader pulls. `true` when every NAK was confirmed.
pub async fn nak_confirmed(messages: Vec<jetstream::Message>) -> bool {
    let n = messages.len();
    let results = futures::future::join_all(
        messages
            .iter()
            .map(|m| m.double_ack_with(AckKind::Nak(None))),
    )
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        debug!(failed, of = n, "intake NAKs not confirmed");
    }
    failed == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pending: u64, delivered: u64, since_ms: u64) -> IntakeView {
        IntakeView {
            ack_pending: pending,
            delivered,
            since_last_delivery: Duration::from_millis(since_ms),
            ack_wait: Duration::from_millis(1500),
        }
    }

    #[test]
    fn nothing_pending_starts_at_once() {
        assert_eq!(
            gate(view(0, 10, 0), None),
            Gate::Start(StartReason::NothingPending)
        );
    }

    #[test]
    fn a_handover_with_no_delivery_since_starts_at_once() {
        let h = Handover {
            epoch: 3,
            delivered: 10,
        };
        assert_eq!(
            gate(view(7, 10, 5), Some(h)),
            Gate::Start(StartReason::HandedOver)
        );
    }

    #[test]
    fn a_delivery_after_the_handover_means_waiting_for_redelivery() {
        let h = Handover {
            epoch: 3,
            delivered: 10,
        };
        assert_eq!(
            gate(view(7, 11, 5), Some(h)),
            Gate::Wait(GATE_POLL),
            "someone pulled after the record: its deliveries may be unsettled"
        );
        assert_eq!(
            gate(view(7, 11, 1500 + 40), Some(h)),
            Gate::Wait(Duration::from_millis(10))
        );
        assert_eq!(
            gate(view(7, 11, 1550), Some(h)),
            Gate::Start(StartReason::Redeliverable)
        );
    }

    #[test]
    fn a_crash_waits_until_the_deliveries_are_due_again() {
        assert_eq!(gate(view(3, 10, 0), None), Gate::Wait(GATE_POLL));
        assert_eq!(
            gate(view(3, 10, 2000), None),
            Gate::Start(StartReason::Redeliverable)
        );
    }
}
