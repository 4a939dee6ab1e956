//! A held task at rest: `held.<id>` in `drover-state`, holding its parents, its shard count and
//! the task sealed with the envelope codec (SPEC §3 "the same codec seals delayed tasks").

use crate::outcomes::DELAYED_PARTITION;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use drover_shared::envelope::{self, BatchMeta, CodecConfig, EnvelopeHeaders, Expected};
use drover_shared::keyring::Keyring;
use drover_shared::task::{Shards, Task};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Key prefix of held tasks in `drover-state`.
pub const HELD_PREFIX: &str = "held.";

/// The `drover-state` key of held task `id`.
pub fn held_key(id: &str) -> String {
    format!("{HELD_PREFIX}{id}")
}

/// The value of `held.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldEntry {
    /// Task id.
    pub id: String,
    /// Queue.
    pub queue: String,
    /// The ids it waits for.
    pub parents: Vec<String>,
    /// Shard count when released: 0 = `"all"`, 1 = not sharded.
    #[serde(default = "one")]
    pub shards: u32,
    /// Envelope headers of the sealed task.
    pub headers: BTreeMap<String, String>,
    /// The sealed body, base64.
    pub body: String,
}

fn one() -> u32 {
    1
}

/// Why a held entry cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Sealing failed.
    #[error("cannot seal held task: {0}")]
    Seal(String),
    /// The entry is not a held entry, or its sealed task does not open.
    #[error("held entry unusable ({reason}): {detail}")]
    Open {
        /// Stable reason (`invalid_entry` or the codec's reason).
        reason: &'static str,
        /// What went wrong.
        detail: String,
    },
}

/// The stored shard count of `shards`.
pub fn shards_code(shards: Shards) -> u32 {
    match shards {
        Shards::All => 0,
        Shards::One => 1,
        Shards::Count(n) => n,
    }
}

/// The shard count of a stored code.
pub fn shards_of(code: u32) -> Shards {
    match code {
        0 => Shards::All,
        1 => Shards::One,
        n => Shards::Count(n),
    }
}

impl HeldEntry {
    /// Seals `task` into an entry.
    pub fn seal(
        keys: &Keyring,
        codec: &CodecConfig,
        epoch: u64,
        task: &Task,
        parents: &[String],
        shards: Shards,
    ) -> Result<Self, StoreError> {
        let meta = BatchMeta::new(&task.queue, DELAYED_PARTITION, epoch);
        let sealed = envelope::seal(keys, codec, meta, std::slice::from_ref(task))
            .map_err(|e| StoreError::Seal(e.to_string()))?;
        let (headers, body) = sealed.into_parts();
        Ok(Self {
            id: task.id.clone(),
            queue: task.queue.clone(),
            parents: parents.to_vec(),
            shards: shards_code(shards),
            headers: headers
                .to_pairs()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            body: STANDARD.encode(body),
        })
    }

    /// Parses a stored value.
    pub fn parse(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Open {
            reason: "invalid_entry",
            detail: e.to_string(),
        })
    }

    /// The JSON stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Opens the sealed task (verifying signature, queue and id).
    pub fn open(&self, keys: &Keyring, codec: &CodecConfig) -> Result<Task, StoreError> {
        let bad = |reason: &'static str, detail: String| StoreError::Open { reason, detail };
        let body = STANDARD
            .decode(&self.body)
            .map_err(|e| bad("invalid_entry", e.to_string()))?;
        let headers =
            EnvelopeHeaders::from_lookup(|name| self.headers.get(name).map(String::as_str))
                .map_err(|e| bad(e.reason(), e.to_string()))?;
        let opened = envelope::open::<Task>(
            keys,
            codec,
            Expected::Location {
                queue: &self.queue,
                partition: DELAYED_PARTITION,
            },
            &headers,
            &body,
        )
        .map_err(|e| bad(e.reason(), e.to_string()))?;
        match opened.tasks.into_iter().next() {
            Some(t) if t.id == self.id && t.queue == self.queue => Ok(t),
            _ => Err(bad(
                "invalid_entry",
                format!("the sealed task is not {} of queue {}", self.id, self.queue),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn keys() -> Keyring {
        Keyring::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
    }

    fn task() -> Task {
        Task {
            id: "child".into(),
            queue: "q".into(),
            task_type: "echo".into(),
            payload: RawValue::from_string(r#"{"secret":1}"#.into()).unwrap(),
            attempt: 1,
            max_attempts: 3,
            timeout_ms: 1000,
            key: None,
            backoff: None,
            shard: None,
            parent: None,
            submitted_ms: 7,
            meta: Default::default(),
        }
    }

    #[test]
    fn sealed_entries_round_trip_and_hide_the_payload() {
        let codec = CodecConfig::default();
        let e = HeldEntry::seal(
            &keys(),
            &codec,
            9,
            &task(),
            &["a".into(), "b".into()],
            Shards::All,
        )
        .unwrap();
        let json = e.to_json();
        assert!(!String::from_utf8_lossy(&json).contains("secret"));
        let back = HeldEntry::parse(&json).unwrap();
        assert_eq!(back, e);
        assert_eq!(shards_of(back.shards), Shards::All);
        let t = back.open(&keys(), &codec).unwrap();
        assert_eq!(t.id, "child");
        assert_eq!(t.payload.get(), r#"{"secret":1}"#);
        assert_eq!(held_key("child"), "held.child");
    }

    #[test]
    fn tampered_entries_do_not_open() {
        let codec = CodecConfig::default();
        let mut e = HeldEntry::seal(&keys(), &codec, 9, &task(), &[], Shards::One).unwrap();
        e.queue = "other".into();
        assert!(e.open(&keys(), &codec).is_err());
        assert!(HeldEntry::parse(b"{}").is_err());
        assert_eq!(shards_of(shards_code(Shards::Count(5))), Shards::Count(5));
    }
}
