//! NATS adapter: the current entries of many keys of a KV bucket in one request — a batched
//! direct get (`multi_last`, nats-server ≥ 2.11, ADR-31) instead of one request per key.
//!
//! The server answers a `{"multi_last":[subjects],"batch":n}` request on
//! `$JS.API.DIRECT.GET.KV_<bucket>` with one message per key that has an entry (headers
//! `Nats-Subject`, `Nats-Sequence`, `KV-Operation`), then an end-of-batch status message (204);
//! keys without any entry are simply absent, and a request none of whose keys exist gets a 404.
//! Keys are asked for in chunks of [`MAX_KEYS_PER_REQUEST`], the chunks concurrently.

use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;

/// Most keys in one batched request (the server caps a batch's responses).
pub const MAX_KEYS_PER_REQUEST: usize = 256;

/// How long one batched request may take before it fails.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The current entry of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value (empty for a delete or purge marker).
    pub value: Bytes,
    /// The entry's stream sequence: the revision to compare-and-set against.
    pub revision: u64,
    /// `false` for delete/purge markers (and TTL limit markers): the key holds no value.
    pub is_put: bool,
    /// When the server stored the entry (`Nats-Time-Stamp`), when it said.
    pub stored_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Why a batched read failed (the caller falls back or retries).
#[derive(Debug, thiserror::Error)]
pub enum BatchGetError {
    /// The request could not be sent or its inbox not opened.
    #[error("batched KV read: {0}")]
    Nats(String),
    /// No end-of-batch arrived in time (a server without batched direct gets answers only once).
    #[error("batched KV read timed out")]
    Timeout,
    /// The server answered with an error status.
    #[error("batched KV read refused: {0}")]
    Refused(String),
}

/// The current entries of `keys` in `bucket`: one map entry per key that has ever been written
/// (and not purged away); absent keys are missing from the map.
pub async fn get_many(
    client: &async_nats::Client,
    bucket: &str,
    keys: &[String],
) -> Result<HashMap<String, Entry>, BatchGetError> {
    let chunks = keys
        .chunks(MAX_KEYS_PER_REQUEST)
        .map(|c| get_chunk(client, bucket, c));
    let mut out = HashMap::with_capacity(keys.len());
    for part in futures::future::join_all(chunks).await {
        out.extend(part?);
    }
    Ok(out)
}

async fn get_chunk(
    client: &async_nats::Client,
    bucket: &str,
    keys: &[String],
) -> Result<HashMap<String, Entry>, BatchGetError> {
    let prefix = format!("$KV.{bucket}.");
    let subjects: Vec<String> = keys.iter().map(|k| format!("{prefix}{k}")).collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "multi_last": subjects,
        "batch": keys.len(),
    }))
    .map_err(|e| BatchGetError::Nats(e.to_string()))?;
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| BatchGetError::Nats(e.to_string()))?;
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.KV_{bucket}"),
            inbox,
            Bytes::from(body),
        )
        .await
        .map_err(|e| BatchGetError::Nats(e.to_string()))?;
    let mut out = HashMap::with_capacity(keys.len());
    let collect = async {
        while let Some(m) = sub.next().await {
            match m.status.map(|s| s.as_u16()) {
                // End of batch. A batch the server cut short says how many are left: reading
                // the rest as absent would be wrong, so it fails (callers read one by one).
                Some(204) => {
                    let left = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Num-Pending"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    if left > 0 {
                        return Err(BatchGetError::Refused(format!(
                            "batch cut short, {left} entries left"
                        )));
                    }
                    return Ok(());
                }
                // None of the keys exists.
                Some(404) => return Ok(()),
                Some(s) if s != 200 => {
                    return Err(BatchGetError::Refused(format!(
                        "{s} {}",
                        m.description.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            let Some(h) = m.headers.as_ref() else {
                continue;
            };
            let Some(subject) = h.get("Nats-Subject").map(|v| v.as_str()) else {
                continue;
            };
            let Some(key) = subject.strip_prefix(&prefix) else {
                continue;
            };
            let revision = h
                .get("Nats-Sequence")
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(0);
            let op = h.get("KV-Operation").map(|v| v.as_str());
            let is_put = matches!(op, None | Some("PUT")) && h.get("Nats-Marker-Reason").is_none();
            let stored_at = h
                .get("Nats-Time-Stamp")
                .and_then(|v| chrono::DateTime::parse_from_rfc3339(v.as_str()).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            out.insert(
                key.to_owned(),
                Entry {
                    value: m.payload.clone(),
                    revision,
                    is_put,
                    stored_at,
                },
            );
        }
        Err(BatchGetError::Nats("inbox closed".into()))
    };
    match tokio::time::timeout(TIMEOUT, collect).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BatchGetError::Timeout),
    }
}
