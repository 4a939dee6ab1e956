//! The validated submit path (SPEC §1.1): validate exactly as the intake will, list the tasks
//! whose ids already have records as duplicates, publish the submission into `DROVER_SUBMIT` as
//! the one message the client sent, and reply only after its PubAck.
//!
//! One message, byte for byte: the intake then accepts or rejects the whole array as one
//! (workflows stay together), payloads pass through untouched, and it assigns the very ids this
//! endpoint replies with — a task's own id, else one derived from the forwarded `Nats-Msg-Id`,
//! else `_s<stream seq>` from the PubAck's sequence (SPEC's id rule, the same on both paths).
//! Duplicates inside a partly new array are left in the message: the intake drops them by the
//! same record check, and the reply lists them.
//!
//! Unique keys (`unique_key`) are claimed here, before publishing, so a second submission within
//! the window gets a `duplicate` error reply rather than a rejected record later. The claims
//! carry a random token that the published message repeats in `Drover-Unique-Claim`, so the
//! intake recognises them as this submission's own (see [`crate::delays`]).

use super::request::{self, PLACEHOLDER_SEQ, PlannedId, SubmitReply};
use super::{Api, to_reply, unavailable};
use crate::delays::unique::ClaimResult;
use crate::delays::{self, Claim, HDR_UNIQUE_CLAIM};
use crate::intake::{self, IntakeLimits};
use async_nats::{HeaderMap, Message};
use drover_shared::error::ApiError;
use futures::StreamExt;
use std::collections::HashSet;

/// Record look-ups in flight at once for one submission.
const LOOKUPS_IN_FLIGHT: usize = 64;

impl Api {
    pub(super) async fn submit(&self, token: &str, msg: &Message) -> Result<Vec<u8>, ApiError> {
        let names = &self.ctx.names;
        let queue = request::check_queue(names, token)?;
        let msg_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned());
        let limits = IntakeLimits {
            max_payload: self.ctx.max_payload,
            default_timeout_ms: self.ctx.default_timeout_ms,
        };
        let accepted = intake::prepare(
            names,
            &names.submit_subject(queue),
            &msg.payload,
            msg_id.as_deref(),
            PLACEHOLDER_SEQ,
            chrono::Utc::now().timestamp_millis(),
            limits,
        )
        .map_err(|r| r.error)?;
        self.check_dependencies(&accepted).await?;
        let planned = request::plan_ids(&accepted.tasks, msg_id.as_deref());
        let mut duplicates = self.existing(&planned).await?;

        let ids: Vec<String> = if duplicates.len() == planned.len() {
            // Nothing new: publish nothing. Every id is known here (an id from the stream
            // sequence is never a duplicate), so none needs a sequence.
            duplicates.clone()
        } else {
            let mut headers = HeaderMap::new();
            if let Some(m) = request::forward_msg_id(msg_id.as_deref(), &planned) {
                headers.insert("Nats-Msg-Id", m);
            }
            let claimed = self.claim_unique(queue, &accepted, &planned).await?;
            if let Some((token, _)) = &claimed {
                headers.insert(HDR_UNIQUE_CLAIM, token.as_str());
            }
            let published = async {
                self.ctx
                    .js
                    .publish_with_headers(names.submit_subject(queue), headers, msg.payload.clone())
                    .await
                    .map_err(|e| unavailable("cannot publish the submission", e))?
                    .await
                    .map_err(|e| {
                        unavailable("the submission was not stored in the intake stream", e)
                    })
            }
            .await;
            let ack = match published {
                Ok(ack) => ack,
                Err(e) => {
                    if let Some((_, keys)) = &claimed {
                        self.release(keys).await;
                    }
                    return Err(e);
                }
            };
            let ids: Vec<String> = planned.iter().map(|p| p.resolve(ack.sequence)).collect();
            if ack.duplicate {
                // The stream holds this message already (same Nats-Msg-Id within its duplicate
                // window): every task of it was submitted before.
                duplicates = ids.clone();
            }
            ids
        };
        to_reply(&SubmitReply {
            ok: true,
            ids: &ids,
            queue,
            duplicates: &duplicates,
        })
    }

    /// Claims the unique keys of `accepted`'s tasks under a fresh token; `None` when no task has
    /// one. A key held by another task answers `duplicate` (and gives back what was claimed).
    async fn claim_unique(
        &self,
        queue: &str,
        accepted: &intake::Accepted,
        planned: &[PlannedId],
    ) -> Result<Option<(String, Vec<String>)>, ApiError> {
        if accepted.plans.iter().all(|p| p.unique.is_none()) {
            return Ok(None);
        }
        let token = format!("{:032x}", rand::random::<u128>());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut keys = Vec::new();
        for (index, (plan, id)) in accepted.plans.iter().zip(planned).enumerate() {
            let Some(window) = &plan.unique else { continue };
            let key = delays::unique_kv_key(queue, &window.key);
            let claim = Claim::new(queue, window, id.known(), Some(&token), now_ms);
            let result = self
                .unique
                .claim(
                    &key,
                    &claim,
                    delays::ttl_secs(window.window_ms),
                    id.known(),
                    Some(&token),
                )
                .await;
            match result {
                Ok(ClaimResult::Claimed | ClaimResult::Own) => keys.push(key),
                Ok(ClaimResult::Taken(holder)) => {
                    self.release(&keys).await;
                    return Err(holder.duplicate_error((planned.len() > 1).then_some(index)));
                }
                Err(e) => {
                    self.release(&keys).await;
                    return Err(unavailable("cannot claim the unique key", e));
                }
            }
        }
        Ok(Some((token, keys)))
    }

    /// Gives back unique keys claimed for a submission that was not stored after all.
    async fn release(&self, keys: &[String]) {
        for key in keys {
            if let Err(e) = self.unique.release(key).await {
                tracing::warn!(key = %key, error = %e, "cannot release a unique key; it expires with its window");
            }
        }
    }

    /// Rejects the submission if a task depends on an id that is neither in it nor a task with a
    /// record (`missing_dependency`, the same check the intake makes; cycles are found by
    /// validation).
    async fn check_dependencies(&self, accepted: &intake::Accepted) -> Result<(), ApiError> {
        let inside: HashSet<&str> = accepted.tasks.iter().map(|t| t.id.as_str()).collect();
        let outside: HashSet<String> = accepted
            .scheduling
            .values()
            .flat_map(|s| s.depends_on.iter())
            .filter(|d| !inside.contains(d.as_str()))
            .cloned()
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        let tasks = &self.tasks;
        let lookups: Vec<_> = outside
            .into_iter()
            .map(|id| async move { tasks.entry(id.clone()).await.map(|e| e.map(|_| id)) })
            .collect();
        let mut found = HashSet::new();
        let mut results = futures::stream::iter(lookups).buffer_unordered(LOOKUPS_IN_FLIGHT);
        while let Some(result) = results.next().await {
            if let Some(id) = result.map_err(|e| unavailable("cannot read task records", e))? {
                found.insert(id);
            }
        }
        let list: Vec<(&str, &[String])> = accepted
            .tasks
            .iter()
            .map(|t| {
                let deps = accepted
                    .scheduling
                    .get(&t.id)
                    .map(|s| s.depends_on.as_slice())
                    .unwrap_or(&[]);
                (t.id.as_str(), deps)
            })
            .collect();
        match crate::deps::plan::find_missing(&list, accepted.tasks.len() > 1, |id| {
            found.contains(id)
        }) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The known ids that already have a record (any entry on the key, as the intake's create
    /// with expected sequence 0 sees it), in submit order.
    async fn existing(&self, planned: &[PlannedId]) -> Result<Vec<String>, ApiError> {
        let known: Vec<String> = planned
            .iter()
            .filter_map(PlannedId::known)
            .map(str::to_owned)
            .collect();
        let tasks = &self.tasks;
        let lookups: Vec<_> = known
            .iter()
            .cloned()
            .map(|id| async move { tasks.entry(id.clone()).await.map(|e| e.map(|_| id)) })
            .collect();
        let mut found = HashSet::new();
        let mut results = futures::stream::iter(lookups).buffer_unordered(LOOKUPS_IN_FLIGHT);
        while let Some(result) = results.next().await {
            if let Some(id) = result.map_err(|e| unavailable("cannot read task records", e))? {
                found.insert(id);
            }
        }
        Ok(known.into_iter().filter(|id| found.contains(id)).collect())
    }
}
