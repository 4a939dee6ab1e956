//! Uniqueness claims in `drover-unique` (the NATS half of [`super::Claim`]): create-if-absent with
//! a per-message TTL (`Nats-TTL`), recognising the caller's own earlier claim.
//!
//! The create is a publish to `$KV.<bucket>.<key>` with `Nats-Expected-Last-Subject-Sequence`
//! set to the revision of what is there: 0 for nothing, or the revision of a delete marker (a
//! released claim, or the marker the server leaves when a claim's TTL ends). It is written by
//! hand rather than with the KV client's create so the TTL is always on the message, also when
//! re-creating a key after a marker.

use super::Claim;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use drover_shared::names::Names;

/// Reads and creates before giving up when the key keeps changing.
const ATTEMPTS: usize = 5;

/// What a claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// The key was free and is now held by this claim.
    Claimed,
    /// The key is held by this same task or submission (a redelivery, a retry).
    Own,
    /// Another task holds the key.
    Taken(Box<Claim>),
}

/// The `drover-unique` bucket.
#[derive(Clone)]
pub struct UniqueStore {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    bucket: String,
}

impl UniqueStore {
    /// Opens the bucket's stream.
    pub async fn open(js: &jetstream::Context, names: &Names) -> Result<Self, String> {
        let bucket = names.bucket("unique");
        let stream = js
            .get_stream(format!("KV_{bucket}"))
            .await
            .map_err(|e| format!("open {bucket}: {e}"))?;
        Ok(Self {
            js: js.clone(),
            stream,
            bucket,
        })
    }

    /// Claims `key` with `claim` for `ttl_secs`, unless another task holds it. `task` and `token`
    /// say which holders count as the caller itself.
    pub async fn claim(
        &self,
        key: &str,
        claim: &Claim,
        ttl_secs: u64,
        task: Option<&str>,
        token: Option<&str>,
    ) -> Result<ClaimResult, String> {
        let subject = format!("$KV.{}.{key}", self.bucket);
        let body = serde_json::to_vec(claim).map_err(|e| e.to_string())?;
        for _ in 0..ATTEMPTS {
            let (revision, holder) = self.last(&subject, claim).await?;
            if let Some(holder) = holder {
                return Ok(if holder.is_own(task, token) {
                    ClaimResult::Own
                } else {
                    ClaimResult::Taken(Box::new(holder))
                });
            }
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", revision.to_string());
            headers.insert("Nats-TTL", format!("{ttl_secs}s"));
            let result = match self
                .js
                .publish_with_headers(subject.clone(), headers, body.clone().into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(ClaimResult::Claimed),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(format!("claim unique key {key}: {e}")),
            }
        }
        Err(format!(
            "unique key {key} kept changing while being claimed"
        ))
    }

    /// Gives `key` back (a delete marker that itself expires), e.g. when the submission that
    /// claimed it is rejected or not stored after all. Best-effort.
    pub async fn release(&self, key: &str) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        headers.insert("Nats-TTL", "1s");
        self.js
            .publish_with_headers(
                format!("$KV.{}.{key}", self.bucket),
                headers,
                bytes::Bytes::new(),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The revision of the key's last entry (0 for none) and its live holder, if any. A value
    /// that is not a [`Claim`] (written by another tool) holds the key for nobody in particular.
    async fn last(&self, subject: &str, wanted: &Claim) -> Result<(u64, Option<Claim>), String> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(m) => {
                let marker = m.headers.get("Nats-Marker-Reason").is_some()
                    || m.headers
                        .get("KV-Operation")
                        .is_some_and(|v| matches!(v.as_str(), "DEL" | "PURGE"));
                if marker {
                    return Ok((m.sequence, None));
                }
                let holder = serde_json::from_slice::<Claim>(&m.payload).unwrap_or(Claim {
                    task: None,
                    claim: None,
                    queue: wanted.queue.clone(),
                    unique_key: wanted.unique_key.clone(),
                    until: "its TTL ends".to_owned(),
                });
                Ok((m.sequence, Some(holder)))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok((0, None)),
            Err(e) => Err(format!("read unique key {subject}: {e}")),
        }
    }
}
