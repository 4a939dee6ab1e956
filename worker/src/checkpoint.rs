//! Handler checkpoints (SPEC §2 `drover-checkpoints`, §6.1): `TaskContext::checkpoint(bytes)`
//! stores the bytes sealed with the envelope codec under the task id; any later attempt, on
//! any worker, reads them back with `last_checkpoint()`.
//!
//! Sealing: the plaintext is a one-element JSON array `[{"id","attempt","data"}]` (`data`
//! base64), sealed with [`BatchMeta`] `queue` = the task's queue, `partition` = 0, `epoch` =
//! the attempt that wrote it, and a fresh batch ULID (the HKDF salt). The KV value is JSON
//! `{"headers":{<envelope headers>},"body":"<base64>"}`, so it is self-contained for
//! `nats kv get`. Opening checks the whole envelope (kid, HMAC, decryption, …) plus that the
//! sealed `id` is the key's task, so a checkpoint cannot be moved to another task.

use async_nats::jetstream::kv;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use drover_shared::envelope::{self, BatchMeta, CodecConfig, EnvelopeHeaders, Expected};
use drover_shared::keyring::Keyring;
use drover_shared::task::Task;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a checkpoint could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The KV bucket could not be reached.
    #[error("checkpoint store unavailable: {0}")]
    Store(String),
    /// Sealing failed.
    #[error("cannot seal the checkpoint: {0}")]
    Seal(String),
    /// The stored value is not a checkpoint this keyring opens.
    #[error("stored checkpoint does not open: {0}")]
    Open(String),
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    headers: BTreeMap<String, String>,
    body: String,
}

#[derive(Serialize, Deserialize)]
struct Plain {
    id: String,
    attempt: u32,
    data: String,
}

/// Access to `drover-checkpoints`.
#[derive(Clone)]
pub struct Checkpoints {
    kv: Option<kv::Store>,
    keys: Arc<Keyring>,
    codec: CodecConfig,
}

impl Checkpoints {
    /// Checkpoints in `kv`, sealed with `keys`. `None` stores nothing (every call fails with
    /// [`CheckpointError::Store`]).
    pub fn new(kv: Option<kv::Store>, keys: Arc<Keyring>, codec: CodecConfig) -> Self {
        Self { kv, keys, codec }
    }

    fn kv(&self) -> Result<&kv::Store, CheckpointError> {
        self.kv
            .as_ref()
            .ok_or_else(|| CheckpointError::Store("no checkpoint bucket".to_owned()))
    }

    /// Seals `data` for `task` into the stored JSON value (pure).
    pub fn seal(&self, task: &Task, data: &[u8]) -> Result<Vec<u8>, CheckpointError> {
        let plain = [Plain {
            id: task.id.clone(),
            attempt: task.attempt,
            data: STANDARD.encode(data),
        }];
        let meta = BatchMeta::new(task.queue.clone(), 0, u64::from(task.attempt));
        let sealed = envelope::seal(&self.keys, &self.codec, meta, &plain)
            .map_err(|e| CheckpointError::Seal(e.to_string()))?;
        let value = Sealed {
            headers: sealed
                .headers
                .to_pairs()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            body: STANDARD.encode(&sealed.body),
        };
        serde_json::to_vec(&value).map_err(|e| CheckpointError::Seal(e.to_string()))
    }

    /// Opens a stored value of `task`'s checkpoint (pure).
    pub fn open(&self, task: &Task, value: &[u8]) -> Result<Vec<u8>, CheckpointError> {
        let bad = |e: String| CheckpointError::Open(e);
        let stored: Sealed = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
        let body = STANDARD
            .decode(&stored.body)
            .map_err(|e| bad(e.to_string()))?;
        let headers = EnvelopeHeaders::from_lookup(|n| stored.headers.get(n).map(String::as_str))
            .map_err(|e| bad(e.reason().to_owned()))?;
        let opened = envelope::open::<Plain>(
            &self.keys,
            &self.codec,
            Expected::Location {
                queue: &task.queue,
                partition: 0,
            },
            &headers,
            &body,
        )
        .map_err(|e| bad(e.reason().to_owned()))?;
        let plain = opened
            .tasks
            .into_iter()
            .next()
            .ok_or_else(|| bad("empty".to_owned()))?;
        if plain.id != task.id {
            return Err(bad("sealed for another task".to_owned()));
        }
        STANDARD.decode(plain.data).map_err(|e| bad(e.to_string()))
    }

    /// Stores `data` as `task`'s checkpoint.
    pub async fn store(&self, task: &Task, data: &[u8]) -> Result<(), CheckpointError> {
        let value = self.seal(task, data)?;
        self.kv()?
            .put(&task.id, value.into())
            .await
            .map_err(|e| CheckpointError::Store(e.to_string()))?;
        Ok(())
    }

    /// The last checkpoint of `task`, if any.
    pub async fn load(&self, task: &Task) -> Result<Option<Vec<u8>>, CheckpointError> {
        let value = self
            .kv()?
            .get(&task.id)
            .await
            .map_err(|e| CheckpointError::Store(e.to_string()))?;
        match value {
            Some(v) if !v.is_empty() => self.open(task, &v).map(Some),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::task::TaskSpec;

    fn task(id: &str) -> Task {
        Task {
            id: id.into(),
            attempt: 2,
            ..Task::first_attempt(&TaskSpec::new("x"), "q", 1000, 0)
        }
    }

    #[test]
    fn seals_and_opens_only_for_its_task() {
        let keys = Arc::new(Keyring::generate("k1").unwrap());
        let c = Checkpoints::new(None, keys, CodecConfig::default());
        let sealed = c.seal(&task("a"), b"\x00\x01state").unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("state"));
        assert_eq!(c.open(&task("a"), &sealed).unwrap(), b"\x00\x01state");
        assert!(c.open(&task("b"), &sealed).is_err());
        let mut other = task("a");
        other.queue = "r".into();
        assert!(c.open(&other, &sealed).is_err());
        let stranger = Checkpoints::new(
            None,
            Arc::new(Keyring::generate("k1").unwrap()),
            CodecConfig::default(),
        );
        assert!(stranger.open(&task("a"), &sealed).is_err());
        assert!(c.open(&task("a"), b"{}").is_err());
    }
}
