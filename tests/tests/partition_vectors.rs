//! SPEC §4 promises that Drover's key → partition function equals the NATS server's
//! `{{partition(P,1)}}` subject mapping for keys without a `.`, so any client can compute where a
//! keyed task goes. This checks the promise against the real server: a mapping
//! `pv.<P>.* -> pvout.<P>.{{partition(P,1)}}.{{wildcard(1)}}` per partition count, one message
//! per key, and the partition token the server chose compared with
//! [`partition_for_key`].

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use drover_shared::partition::partition_for_key;
use drover_tests::NatsServer;
use futures::StreamExt;

/// Partition counts checked: the edge 1, small and prime counts, powers of two, and a count
/// larger than the number of keys.
const PARTITION_COUNTS: [u32; 8] = [1, 2, 7, 16, 64, 100, 1024, 65_521];

/// Distinct keys per partition count.
const KEYS: usize = 1_200;

/// The longest key SPEC §1.1 allows, in bytes.
const MAX_KEY_BYTES: usize = 256;

/// Characters keys are made of: letters, digits, `-`, `_` and some multi-byte UTF-8 (no `.`,
/// whitespace or wildcards, which cannot be part of one subject token).
const ALPHABET: &[char] = &[
    'a', 'b', 'c', 'k', 'q', 'x', 'z', 'A', 'M', 'Z', '0', '1', '5', '9', '-', '_', 'é', 'ß', 'ø',
    'Ω', 'ж', '日', '本', '語', '🚀', '🦀',
];

/// A small deterministic generator (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("fits")
    }
}

/// `count` distinct keys: a few fixed edge cases, then random ones of 1..=64 characters, and
/// some as long as allowed.
fn keys(count: usize) -> Vec<String> {
    let mut rng = Rng(0x0d0f_e12a_5eed_1234);
    let mut seen = HashSet::new();
    let mut keys = Vec::with_capacity(count);
    let fixed = [
        "0",
        "a",
        "-",
        "_",
        "customer-42",
        "order_17",
        "🚀",
        "日本語",
    ];
    for key in fixed.iter().map(|k| (*k).to_owned()) {
        if seen.insert(key.clone()) {
            keys.push(key);
        }
    }
    while keys.len() < count {
        let mut key = String::new();
        if keys.len() % 100 == 0 {
            while key.len() + 4 <= MAX_KEY_BYTES {
                key.push(ALPHABET[rng.below(ALPHABET.len())]);
            }
        } else {
            for _ in 0..=rng.below(64) {
                key.push(ALPHABET[rng.below(ALPHABET.len())]);
            }
        }
        if seen.insert(key.clone()) {
            keys.push(key);
        }
    }
    keys
}

fn mappings_config() -> String {
    let mut config = String::from("mappings {\n");
    for p in PARTITION_COUNTS {
        config.push_str(&format!(
            "  \"pv.{p}.*\": \"pvout.{p}.{{{{partition({p},1)}}}}.{{{{wildcard(1)}}}}\"\n"
        ));
    }
    config.push_str("}\n");
    config
}

#[tokio::test]
async fn partition_for_key_matches_the_servers_partition_mapping() -> Result<()> {
    let server = NatsServer::builder()
        .extra_config(mappings_config())
        .start()
        .await;
    let client = server.connect().await;
    let mut mapped = client.subscribe("pvout.>").await?;
    client.flush().await?;

    let keys = keys(KEYS);
    let publisher = {
        let client = client.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            for p in PARTITION_COUNTS {
                for key in &keys {
                    client
                        .publish(format!("pv.{p}.{key}"), key.clone().into())
                        .await?;
                }
            }
            client.flush().await?;
            anyhow::Ok(())
        })
    };

    let expected = PARTITION_COUNTS.len() * keys.len();
    // (P, key) -> partition the server chose.
    let mut server_partitions = BTreeMap::new();
    while server_partitions.len() < expected {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), mapped.next()).await
        else {
            bail!(
                "received {} of {expected} mapped messages; the rest never arrived",
                server_partitions.len()
            );
        };
        let subject = msg.subject.as_str();
        let [_, p, partition, key] = subject.splitn(4, '.').collect::<Vec<_>>()[..] else {
            bail!("unexpected mapped subject {subject}");
        };
        ensure!(
            key.as_bytes() == &msg.payload[..],
            "the mapping changed the key: {subject}"
        );
        let previous = server_partitions.insert(
            (p.parse::<u32>()?, key.to_owned()),
            partition.parse::<u32>()?,
        );
        ensure!(previous.is_none(), "{subject} arrived twice");
    }
    publisher.await??;

    let mut mismatches = Vec::new();
    for ((p, key), server_partition) in &server_partitions {
        let ours = partition_for_key(key, *p);
        if ours != *server_partition {
            mismatches.push(format!(
                "P={p} key={key:?}: server {server_partition}, ours {ours}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {expected} keys map differently (server v{}):\n{}",
        mismatches.len(),
        server.version(),
        mismatches.join("\n")
    );
    // The keys really spread: with 1200 keys every one of 16 partitions is hit.
    let used: HashSet<u32> = server_partitions
        .iter()
        .filter(|((p, _), _)| *p == 16)
        .map(|(_, part)| *part)
        .collect();
    assert_eq!(used.len(), 16);
    Ok(())
}
