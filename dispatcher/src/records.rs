//! The leader's reads and compare-and-set writes of `drover-tasks` records (SPEC §1.2, §5).
//!
//! Every write names the revision it read (`Nats-Expected-Last-Subject-Sequence`; 0 when there
//! was no record), so a concurrent writer — the API cancelling, a worker writing `running`, or a
//! deposed leader — makes it fail with [`WriteError::Conflict`] instead of being overwritten.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, kv};
use drover_shared::kv_batch;
use drover_shared::names::Names;
use drover_shared::task::TaskRecord;
use std::collections::HashMap;

/// How many times a writer reads, decides and writes again after losing a compare-and-set.
pub const CAS_ATTEMPTS: usize = 8;

/// Fewer outcomes than this are read one by one: a batched read costs a subscription and an
/// end-of-batch message, which only pays from a few keys on.
pub const BATCHED_READ_MIN: usize = 3;

/// A record as read, with the revision to write over.
#[derive(Debug, Clone)]
pub struct Current {
    /// The record, if the key holds one (absent, deleted, or unreadable: `None`).
    pub record: Option<TaskRecord>,
    /// Revision of the key's last entry; 0 if it never had one.
    pub revision: u64,
}

/// Why a record write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Someone wrote the record since it was read.
    #[error("the record changed since it was read")]
    Conflict,
    /// NATS failed.
    #[error("{0}")]
    Nats(String),
}

/// Access to `drover-tasks` for the leader.
#[derive(Clone)]
pub struct Records {
    js: jetstream::Context,
    kv: kv::Store,
    bucket: String,
}

impl Records {
    /// Opens the bucket.
    pub async fn open(js: &jetstream::Context, names: &Names) -> Result<Self, String> {
        let bucket = names.bucket("tasks");
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| format!("open {bucket}: {e}"))?;
        Ok(Self {
            js: js.clone(),
            kv,
            bucket,
        })
    }

    /// The current record of `id`.
    pub async fn read(&self, id: &str) -> Result<Current, String> {
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(|e| format!("read record {id}: {e}"))?;
        Ok(match entry {
            None => Current {
                record: None,
                revision: 0,
            },
            Some(e) => Current {
                record: (e.operation == kv::Operation::Put)
                    .then(|| serde_json::from_slice(&e.value).ok())
                    .flatten(),
                revision: e.revision,
            },
        })
    }

    /// The current records of `ids`, in one batched direct get ([`drover_shared::kv_batch`]);
    /// ids without a record map to revision 0. `None` when the batched read failed or there are
    /// fewer than [`BATCHED_READ_MIN`] ids (callers then read one by one).
    pub async fn read_many(&self, ids: Vec<String>) -> Option<HashMap<String, Current>> {
        if ids.len() < BATCHED_READ_MIN {
            return None;
        }
        let mut found = match kv_batch::get_many(&self.js.client(), &self.bucket, &ids).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "batched record read failed; reading one by one");
                return None;
            }
        };
        Some(
            ids.into_iter()
                .map(|id| {
                    let current = match found.remove(&id) {
                        None => Current {
                            record: None,
                            revision: 0,
                        },
                        Some(e) => Current {
                            record: e
                                .is_put
                                .then(|| serde_json::from_slice(&e.value).ok())
                                .flatten(),
                            revision: e.revision,
                        },
                    };
                    (id, current)
                })
                .collect(),
        )
    }

    /// Writes `record` as `id` over revision `expected`; returns the new revision.
    pub async fn write(
        &self,
        id: &str,
        expected: u64,
        record: &TaskRecord,
    ) -> Result<u64, WriteError> {
        let body = serde_json::to_vec(record).map_err(|e| WriteError::Nats(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", expected.to_string());
        let result = match self
            .js
            .publish_with_headers(format!("$KV.{}.{id}", self.bucket), headers, body.into())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(WriteError::Conflict),
            Err(e) => Err(WriteError::Nats(format!("write record {id}: {e}"))),
        }
    }
}
