//! Envelope and keyring tests against the public API (SPEC §3, §8): round trips, tampering of
//! every byte, subject binding, rotation, caps, a reference implementation of the wire format,
//! and property tests that no input panics.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use drover_shared::envelope::{
    self, BatchMeta, CodecConfig, ENC, EnvelopeHeaders, Expected, HDR_BATCH, HDR_KID, HDR_MSG_ID,
    HDR_SIG, HEADER_NAMES, OpenError, Opened, SealError, Sealed,
};
use drover_shared::keyring::{Key, Keyring, KeyringError};
use drover_shared::names::Names;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use ulid::Ulid;

// ---- a per-thread peak-memory probe ------------------------------------------------------------

/// The system allocator, counting the live bytes of the current thread while a probe runs.
struct PeakProbe;

thread_local! {
    static PROBING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static MAX_BLOCK: Cell<usize> = const { Cell::new(0) };
}

fn note(grow: usize, shrink: usize) {
    let _ = PROBING.try_with(|on| {
        if on.get() {
            MAX_BLOCK.set(MAX_BLOCK.get().max(grow.saturating_sub(shrink)));
            let live = LIVE.get().saturating_sub(shrink) + grow;
            LIVE.set(live);
            PEAK.set(PEAK.get().max(live));
        }
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping only touches
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for PeakProbe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size(), 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(0, layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // A moving realloc briefly holds both blocks.
            note(layout.size() + new_size, layout.size());
            note(0, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: PeakProbe = PeakProbe;

/// What [`probe`] saw.
#[derive(Debug)]
struct Usage {
    /// Peak of bytes allocated and not yet freed (a moving realloc counts both blocks).
    peak: usize,
    /// Largest single block.
    max_block: usize,
}

/// Runs `f` and reports this thread's heap usage meanwhile.
fn probe<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    LIVE.set(0);
    PEAK.set(0);
    MAX_BLOCK.set(0);
    PROBING.set(true);
    let r = f();
    PROBING.set(false);
    let usage = Usage {
        peak: PEAK.get(),
        max_block: MAX_BLOCK.get(),
    };
    (r, usage)
}

// ---- fixtures ----------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Task {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    queue: String,
    attempt: u32,
    max_attempts: u32,
    payload: Value,
    meta: serde_json::Map<String, Value>,
}

fn task(i: usize) -> Task {
    Task {
        id: format!("{}-{i}", Ulid::from_parts(1_700_000_000_000, i as u128)),
        kind: "noop".into(),
        queue: "default".into(),
        attempt: 1,
        max_attempts: 3,
        payload: serde_json::json!({"n": i, "text": "x".repeat(i % 50)}),
        meta: serde_json::Map::new(),
    }
}

fn ring_of(kid: &str, byte: u8) -> Keyring {
    Keyring::new([(kid, [byte; 32])]).unwrap()
}

fn ring() -> Keyring {
    ring_of("k1", 1)
}

const QUEUE: &str = "default";
const PARTITION: u32 = 7;

fn meta() -> BatchMeta {
    BatchMeta {
        batch: Ulid::from_parts(1_700_000_000_000, 0xDEAD_BEEF),
        queue: QUEUE.into(),
        partition: PARTITION,
        epoch: 12,
        ts_ms: 1_700_000_000_321,
    }
}

fn subject() -> String {
    Names::default().work_subject(QUEUE, PARTITION)
}

fn cfg() -> CodecConfig {
    CodecConfig::default()
}

/// Opens a message as the worker does: headers from `pairs`, location from the subject.
fn open_pairs<T: serde::de::DeserializeOwned>(
    ring: &Keyring,
    config: &CodecConfig,
    subject: &str,
    pairs: &[(&'static str, String)],
    body: &[u8],
) -> Result<Opened<T>, OpenError> {
    let lookup = |name: &'static str| pairs.iter().find(|p| p.0 == name).map(|p| p.1.as_str());
    envelope::open_message(ring, config, &Names::default(), subject, lookup, body).map(|r| r.1)
}

fn sealed_small() -> Sealed {
    envelope::seal(&ring(), &cfg(), meta(), &[serde_json::json!({"a": 1})]).unwrap()
}

// ---- round trips -------------------------------------------------------------------------------

#[test]
fn round_trip_one_task() {
    let tasks = vec![task(0)];
    let sealed = envelope::seal(&ring(), &cfg(), meta(), &tasks).unwrap();
    assert_eq!(sealed.headers.count, 1);
    assert_eq!(sealed.headers.kid, "k1");
    let pairs = sealed.headers.to_pairs();
    let opened: Opened<Task> =
        open_pairs(&ring(), &cfg(), &subject(), &pairs, &sealed.body).unwrap();
    assert_eq!(opened.tasks, tasks);
    assert_eq!(opened.stats.count, 1);
    assert_eq!(opened.stats.plaintext_bytes, sealed.stats.plaintext_bytes);
    assert_eq!(opened.stats.compressed_bytes, sealed.stats.compressed_bytes);
    assert_eq!(sealed.stats.body_bytes, sealed.body.len());
    assert_eq!(sealed.body.len(), 12 + sealed.stats.compressed_bytes + 16);
}

#[test]
fn round_trip_thousand_tasks() {
    let tasks: Vec<Task> = (0..1000).map(task).collect();
    let sealed = envelope::seal(&ring(), &cfg(), meta(), &tasks).unwrap();
    assert_eq!(sealed.headers.count, 1000);
    assert!(sealed.stats.ratio() > 2.0, "{:?}", sealed.stats);
    let (headers, body) = sealed.into_parts();
    let opened: Opened<Task> = envelope::open(
        &ring(),
        &cfg(),
        Expected::Location {
            queue: QUEUE,
            partition: PARTITION,
        },
        &headers,
        &body,
    )
    .unwrap();
    assert_eq!(opened.tasks, tasks);
}

#[test]
fn open_json_returns_the_verified_plaintext() {
    let tasks: Vec<Task> = (0..3).map(task).collect();
    let sealed = envelope::seal(&ring(), &cfg(), meta(), &tasks).unwrap();
    let expected = Expected::Subject {
        names: &Names::default(),
        subject: &subject(),
    };
    let (json, stats) =
        envelope::open_json(&ring(), &cfg(), expected, &sealed.headers, &sealed.body).unwrap();
    assert_eq!(json, serde_json::to_vec(&tasks).unwrap());
    assert_eq!(stats.count, 3);
}

#[test]
fn every_seal_uses_a_fresh_nonce() {
    let a = sealed_small();
    let b = sealed_small();
    assert_ne!(a.body[..12], b.body[..12]);
    assert_ne!(a.headers.sig, b.headers.sig);
}

#[test]
fn batch_meta_new_uses_a_fresh_ulid_and_its_time() {
    let before = envelope::now_ms();
    let m = BatchMeta::new("mail", 3, 9);
    let n = BatchMeta::new("mail", 3, 9);
    assert_ne!(m.batch, n.batch);
    assert_eq!(m.ts_ms, m.batch.timestamp_ms());
    assert!(m.ts_ms >= before && m.ts_ms <= envelope::now_ms());
}

#[test]
fn headers_carry_the_spec_names_and_values() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    let get = |n: &str| pairs.iter().find(|p| p.0 == n).unwrap().1.clone();
    let batch = meta().batch.to_string();
    assert_eq!(get("Nats-Msg-Id"), batch);
    assert_eq!(get("Drover-Batch"), batch);
    assert_eq!(get("Drover-Count"), "1");
    assert_eq!(get("Drover-Queue"), "default");
    assert_eq!(get("Drover-Partition"), "7");
    assert_eq!(get("Drover-Epoch"), "12");
    assert_eq!(get("Drover-Ts"), "1700000000321");
    assert_eq!(get("Drover-Kid"), "k1");
    assert_eq!(get("Drover-Enc"), "zstd+aes256gcm");
    let sig = get("Drover-Sig");
    assert_eq!(sig.len(), 44);
    assert!(sig.ends_with('='));
}

// ---- tampering ---------------------------------------------------------------------------------

const MASKS: [u8; 9] = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff];

#[test]
fn every_single_byte_change_to_the_body_is_rejected() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    assert!(s.body.len() < 100, "keep the body small: {}", s.body.len());
    let mut tried = 0;
    for i in 0..s.body.len() {
        for mask in MASKS {
            let mut body = s.body.clone();
            body[i] ^= mask;
            let e = open_pairs::<Value>(&ring(), &cfg(), &subject(), &pairs, &body).unwrap_err();
            assert_eq!(e, OpenError::BadSignature, "byte {i} mask {mask:#x}");
            tried += 1;
        }
    }
    assert_eq!(tried, s.body.len() * MASKS.len());
    // The untouched message still opens.
    open_pairs::<Value>(&ring(), &cfg(), &subject(), &pairs, &s.body).unwrap();
}

fn mutate(value: &str, i: usize, mask: u8) -> String {
    let mut bytes = value.as_bytes().to_vec();
    bytes[i] ^= mask;
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn every_single_byte_change_to_every_header_is_rejected() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    let mut tried = 0;
    for name in HEADER_NAMES {
        let value = pairs.iter().find(|p| p.0 == name).unwrap().1.clone();
        for i in 0..value.len() {
            for mask in MASKS {
                let changed = mutate(&value, i, mask);
                assert_ne!(changed, value);
                let mut p = pairs.clone();
                p.iter_mut().find(|p| p.0 == name).unwrap().1 = changed.clone();
                let r = open_pairs::<Value>(&ring(), &cfg(), &subject(), &p, &s.body);
                assert!(r.is_err(), "{name} = {changed:?} was accepted");
                tried += 1;
            }
        }
    }
    assert!(tried > 1000, "{tried}");
}

#[test]
fn changing_the_batch_consistently_is_rejected_by_the_signature() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    let other = Ulid::from_parts(1_700_000_000_000, 0xDEAD_BEEE).to_string();
    let mut p = pairs.clone();
    for pair in p.iter_mut() {
        if pair.0 == HDR_BATCH || pair.0 == HDR_MSG_ID {
            pair.1 = other.clone();
        }
    }
    let e = open_pairs::<Value>(&ring(), &cfg(), &subject(), &p, &s.body).unwrap_err();
    assert_eq!(e.reason(), "bad_signature");
}

#[test]
fn each_missing_or_non_canonical_header_is_bad_headers() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    for name in HEADER_NAMES {
        let p: Vec<_> = pairs.iter().filter(|p| p.0 != name).cloned().collect();
        let e = open_pairs::<Value>(&ring(), &cfg(), &subject(), &p, &s.body).unwrap_err();
        assert_eq!(e.reason(), "bad_headers", "without {name}");
        assert!(e.to_string().contains(name), "{e}");
    }
    let cases = [
        ("Drover-Count", "01"),
        ("Drover-Count", "+1"),
        ("Drover-Count", "0"),
        ("Drover-Partition", "07"),
        ("Drover-Epoch", "-12"),
        ("Drover-Ts", "1e3"),
        ("Drover-Enc", "zstd+aes128gcm"),
        ("Drover-Kid", "k|1"),
        ("Drover-Queue", "Default"),
        ("Drover-Sig", "AAAA"),
    ];
    for (name, value) in cases {
        let mut p = pairs.clone();
        p.iter_mut().find(|p| p.0 == name).unwrap().1 = value.into();
        let e = open_pairs::<Value>(&ring(), &cfg(), &subject(), &p, &s.body).unwrap_err();
        assert_eq!(e.reason(), "bad_headers", "{name}={value}");
    }
    // A lower-case ULID is the same id, but not the canonical spelling.
    let mut p = pairs.clone();
    for pair in p.iter_mut() {
        if pair.0 == HDR_BATCH || pair.0 == HDR_MSG_ID {
            pair.1 = pair.1.to_lowercase();
        }
    }
    let e = open_pairs::<Value>(&ring(), &cfg(), &subject(), &p, &s.body).unwrap_err();
    assert_eq!(e.reason(), "bad_headers");
}

#[test]
fn headers_that_disagree_with_the_subject_are_rejected() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    let names = Names::default();
    for subject in [
        names.work_subject(QUEUE, PARTITION + 1),
        names.work_subject("other", PARTITION),
        Names::new("acme").unwrap().work_subject(QUEUE, PARTITION),
        "drover.work.default".to_owned(),
        "drover.submit.default".to_owned(),
        String::new(),
    ] {
        let e = open_pairs::<Value>(&ring(), &cfg(), &subject, &pairs, &s.body).unwrap_err();
        assert_eq!(e.reason(), "subject_mismatch", "{subject}");
    }
    let e = envelope::open::<Value>(
        &ring(),
        &cfg(),
        Expected::Location {
            queue: QUEUE,
            partition: 0,
        },
        &s.headers,
        &s.body,
    )
    .unwrap_err();
    assert_eq!(e.reason(), "subject_mismatch");
    // A correctly signed envelope for another partition, replayed onto this one.
    let mut m = meta();
    m.partition = 8;
    let other = envelope::seal(&ring(), &cfg(), m, &[1]).unwrap();
    let e = open_pairs::<Value>(
        &ring(),
        &cfg(),
        &subject(),
        &other.headers.to_pairs(),
        &other.body,
    )
    .unwrap_err();
    assert!(matches!(e, OpenError::SubjectMismatch(_)), "{e}");
}

#[test]
fn empty_and_truncated_bodies_are_rejected() {
    let s = sealed_small();
    let pairs = s.headers.to_pairs();
    let n = s.body.len();
    for body in [
        &[][..],
        &s.body[..1],
        &s.body[..12],
        &s.body[..28],
        &s.body[..n - 1],
        &s.body[1..],
    ] {
        let e = open_pairs::<Value>(&ring(), &cfg(), &subject(), &pairs, body).unwrap_err();
        assert_eq!(e.reason(), "bad_signature", "len {}", body.len());
    }
    let mut longer = s.body.clone();
    longer.push(0);
    assert!(open_pairs::<Value>(&ring(), &cfg(), &subject(), &pairs, &longer).is_err());
}

// ---- keys and rotation -------------------------------------------------------------------------

#[test]
fn same_kid_with_another_secret_is_a_bad_signature() {
    let s = sealed_small();
    let e = open_pairs::<Value>(
        &ring_of("k1", 2),
        &cfg(),
        &subject(),
        &s.headers.to_pairs(),
        &s.body,
    )
    .unwrap_err();
    assert_eq!(e, OpenError::BadSignature);
    assert!(!e.is_retryable());
}

#[test]
fn unknown_kid_is_the_retryable_error() {
    let s = sealed_small();
    let e = open_pairs::<Value>(
        &ring_of("k2", 1),
        &cfg(),
        &subject(),
        &s.headers.to_pairs(),
        &s.body,
    )
    .unwrap_err();
    assert_eq!(e, OpenError::UnknownKid("k1".into()));
    assert_eq!(e.reason(), "unknown_kid");
    assert!(e.is_unknown_kid());
    assert!(e.is_retryable());
}

#[test]
fn rotation_old_kid_still_opens_new_kid_signs() {
    let old = ring_of("k1", 1);
    let rotated = Keyring::new([("k2", [2u8; 32]), ("k1", [1u8; 32])]).unwrap();
    assert_eq!(rotated.signing_key().kid(), "k2");

    let from_old = envelope::seal(&old, &cfg(), meta(), &[task(1)]).unwrap();
    let opened: Opened<Task> = open_pairs(
        &rotated,
        &cfg(),
        &subject(),
        &from_old.headers.to_pairs(),
        &from_old.body,
    )
    .unwrap();
    assert_eq!(opened.tasks, [task(1)]);

    let from_new = envelope::seal(&rotated, &cfg(), meta(), &[task(2)]).unwrap();
    assert_eq!(from_new.headers.kid, "k2");
    let pairs = from_new.headers.to_pairs();
    let opened: Opened<Task> =
        open_pairs(&rotated, &cfg(), &subject(), &pairs, &from_new.body).unwrap();
    assert_eq!(opened.tasks, [task(2)]);
    // A process that has not got the new key yet NAKs and retries later.
    let e = open_pairs::<Task>(&old, &cfg(), &subject(), &pairs, &from_new.body).unwrap_err();
    assert!(e.is_retryable());
    // Forging the kid to an accepted old one does not help.
    let mut forged = pairs.clone();
    forged.iter_mut().find(|p| p.0 == HDR_KID).unwrap().1 = "k1".into();
    let e = open_pairs::<Task>(&rotated, &cfg(), &subject(), &forged, &from_new.body).unwrap_err();
    assert_eq!(e, OpenError::BadSignature);
}

// ---- caps, counts, JSON ------------------------------------------------------------------------

const HUNDRED_MB: usize = 100 * 1024 * 1024;

#[test]
fn decompression_bomb_with_declared_size_is_too_large() {
    let zeros = vec![0u8; HUNDRED_MB];
    let s = envelope::seal_json(&ring(), &cfg(), meta(), &zeros, 1).unwrap();
    drop(zeros);
    assert!(s.body.len() < 64 * 1024, "{}", s.body.len());
    let (r, usage) =
        probe(|| open_pairs::<Value>(&ring(), &cfg(), &subject(), &s.headers.to_pairs(), &s.body));
    assert_eq!(
        r.unwrap_err(),
        OpenError::TooLarge {
            cap: envelope::DEFAULT_MAX_DECOMPRESSED
        }
    );
    // The declared size is refused before any output buffer exists.
    assert!(usage.peak < 1024 * 1024, "{usage:?}");
}

#[test]
fn decompression_bomb_without_declared_size_stops_at_the_cap() {
    // A correctly signed envelope around a streamed 100 MB frame of zeros that does not
    // declare its size, built with the reference implementation below.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let mut zeros = std::io::Read::take(std::io::repeat(0), HUNDRED_MB as u64);
    std::io::copy(&mut zeros, &mut enc).unwrap();
    let frame = enc.finish().unwrap();
    let (pairs, body) = reference_seal(&[1u8; 32], "k1", &meta(), 1, &frame);
    for cap in [envelope::DEFAULT_MAX_DECOMPRESSED, 1024 * 1024] {
        let config = CodecConfig {
            max_decompressed: cap,
            ..cfg()
        };
        let (r, usage) = probe(|| open_pairs::<Value>(&ring(), &config, &subject(), &pairs, &body));
        assert_eq!(r.unwrap_err(), OpenError::TooLarge { cap });
        // No block beyond the cap (+1 byte to detect overflow); while the last doubling copies,
        // the old half-size block is still held.
        assert!(usage.max_block <= cap + 1, "cap {cap}: {usage:?}");
        assert!(
            usage.peak <= cap + cap / 2 + 256 * 1024,
            "cap {cap}: {usage:?}"
        );
    }
}

#[test]
fn plaintext_over_a_small_cap_is_too_large() {
    let tasks: Vec<Task> = (0..1000).map(task).collect();
    let s = envelope::seal(&ring(), &cfg(), meta(), &tasks).unwrap();
    let small = CodecConfig {
        max_decompressed: s.stats.plaintext_bytes - 1,
        ..cfg()
    };
    let e = open_pairs::<Task>(&ring(), &small, &subject(), &s.headers.to_pairs(), &s.body)
        .unwrap_err();
    assert_eq!(e.reason(), "too_large");
    let exact = CodecConfig {
        max_decompressed: s.stats.plaintext_bytes,
        ..cfg()
    };
    open_pairs::<Task>(&ring(), &exact, &subject(), &s.headers.to_pairs(), &s.body).unwrap();
}

#[test]
fn count_mismatch_signed_correctly_is_rejected() {
    for (json, count) in [(&b"[1,2,3]"[..], 2), (b"[1,2,3]", 4), (b"[1]", 2)] {
        let s = envelope::seal_json(&ring(), &cfg(), meta(), json, count).unwrap();
        let e = open_pairs::<u32>(&ring(), &cfg(), &subject(), &s.headers.to_pairs(), &s.body)
            .unwrap_err();
        assert_eq!(
            e,
            OpenError::CountMismatch {
                expected: count as u32,
                actual: json.iter().filter(|&&b| b == b',').count() + 1
            }
        );
        let expected = Expected::Location {
            queue: QUEUE,
            partition: PARTITION,
        };
        let e = envelope::open_json(&ring(), &cfg(), expected, &s.headers, &s.body).unwrap_err();
        assert_eq!(e.reason(), "count_mismatch");
    }
}

#[test]
fn non_array_or_wrong_type_is_bad_json_without_echoing_content() {
    for json in [
        &b"{\"secret\":1}"[..],
        b"[\"secret-payload\"]",
        b"[1,",
        b"\xff",
        b"",
    ] {
        let s = envelope::seal_json(&ring(), &cfg(), meta(), json, 1).unwrap();
        let e = open_pairs::<u32>(&ring(), &cfg(), &subject(), &s.headers.to_pairs(), &s.body)
            .unwrap_err();
        assert_eq!(e.reason(), "bad_json", "{json:?}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}

#[test]
fn seal_refuses_empty_batches_and_bad_queues() {
    let none: [Task; 0] = [];
    assert_eq!(
        envelope::seal(&ring(), &cfg(), meta(), &none).unwrap_err(),
        SealError::Empty
    );
    assert_eq!(
        envelope::seal_json(&ring(), &cfg(), meta(), b"[]", 0).unwrap_err(),
        SealError::Empty
    );
    let mut m = meta();
    m.queue = "no|pipes".into();
    assert!(matches!(
        envelope::seal(&ring(), &cfg(), m, &[1]),
        Err(SealError::InvalidQueue(_))
    ));
}

// ---- a reference implementation of SPEC §3, written from the text ------------------------------

fn hkdf32(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, &mut out)
        .unwrap();
    out
}

fn reference_aad(kid: &str, m: &BatchMeta, count: u32) -> String {
    format!(
        "v1|{kid}|{}|{}|{}|{count}|{}|{}",
        m.batch, m.queue, m.partition, m.ts_ms, m.epoch
    )
}

/// Seals already-compressed bytes exactly as SPEC §3 says.
fn reference_seal(
    secret: &[u8; 32],
    kid: &str,
    m: &BatchMeta,
    count: u32,
    compressed: &[u8],
) -> (Vec<(&'static str, String)>, Vec<u8>) {
    let batch = m.batch.to_string();
    let enc_key = hkdf32(secret, batch.as_bytes(), b"drover/enc/v1");
    let mac_key = hkdf32(secret, b"", b"drover/mac/v1");
    let aad = reference_aad(kid, m, count);
    let nonce = [9u8; 12];
    let ct = Aes256Gcm::new_from_slice(&enc_key)
        .unwrap()
        .encrypt(
            &nonce.into(),
            Payload {
                msg: compressed,
                aad: aad.as_bytes(),
            },
        )
        .unwrap();
    let mut body = nonce.to_vec();
    body.extend_from_slice(&ct);
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&mac_key).unwrap();
    mac.update(aad.as_bytes());
    mac.update(&body);
    let sig = STANDARD.encode(mac.finalize().into_bytes());
    let pairs = vec![
        ("Nats-Msg-Id", batch.clone()),
        ("Drover-Batch", batch),
        ("Drover-Count", count.to_string()),
        ("Drover-Queue", m.queue.clone()),
        ("Drover-Partition", m.partition.to_string()),
        ("Drover-Epoch", m.epoch.to_string()),
        ("Drover-Ts", m.ts_ms.to_string()),
        ("Drover-Kid", kid.to_owned()),
        ("Drover-Enc", ENC.to_owned()),
        ("Drover-Sig", sig),
    ];
    (pairs, body)
}

#[test]
fn reference_sealed_envelope_opens() {
    let tasks: Vec<Task> = (0..5).map(task).collect();
    let compressed = zstd::bulk::compress(&serde_json::to_vec(&tasks).unwrap(), 3).unwrap();
    let (pairs, body) = reference_seal(&[1u8; 32], "k1", &meta(), 5, &compressed);
    let opened: Opened<Task> = open_pairs(&ring(), &cfg(), &subject(), &pairs, &body).unwrap();
    assert_eq!(opened.tasks, tasks);
}

#[test]
fn sealed_envelope_verifies_with_the_reference() {
    let tasks: Vec<Task> = (0..5).map(task).collect();
    let s = envelope::seal(&ring(), &cfg(), meta(), &tasks).unwrap();
    let secret = [1u8; 32];
    let aad = reference_aad("k1", &meta(), 5);
    assert_eq!(s.headers.aad(), aad.as_bytes());
    let mac_key = hkdf32(&secret, b"", b"drover/mac/v1");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&mac_key).unwrap();
    mac.update(aad.as_bytes());
    mac.update(&s.body);
    let sig = s
        .headers
        .to_pairs()
        .into_iter()
        .find(|p| p.0 == HDR_SIG)
        .unwrap()
        .1;
    mac.verify_slice(&STANDARD.decode(sig).unwrap()).unwrap();
    let enc_key = hkdf32(
        &secret,
        meta().batch.to_string().as_bytes(),
        b"drover/enc/v1",
    );
    let nonce: [u8; 12] = s.body[..12].try_into().unwrap();
    let compressed = Aes256Gcm::new_from_slice(&enc_key)
        .unwrap()
        .decrypt(
            &nonce.into(),
            Payload {
                msg: &s.body[12..],
                aad: aad.as_bytes(),
            },
        )
        .unwrap();
    let plain = zstd::stream::decode_all(&compressed[..]).unwrap();
    assert_eq!(plain, serde_json::to_vec(&tasks).unwrap());
}

// ---- keyring -----------------------------------------------------------------------------------

const SECRET_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SECRET_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

fn assert_hides_secrets(text: &str) {
    for s in [SECRET_A, SECRET_B] {
        assert!(
            !text.contains(s.trim_end_matches('=')),
            "secret in {text:?}"
        );
        assert!(!text.contains(&s[..16]), "secret prefix in {text:?}");
    }
}

#[test]
fn keyring_parses_drover_keys() {
    let ring: Keyring = format!(" new:{SECRET_B} , old:{}", SECRET_A.trim_end_matches('='))
        .parse()
        .unwrap();
    assert_eq!(ring.kids().collect::<Vec<_>>(), ["new", "old"]);
    assert_eq!(ring.signing_key().kid(), "new");
    assert!(ring.get("old").is_some());
    assert!(ring.get("nope").is_none());
    assert_eq!(ring.len(), 2);
    assert!(!ring.is_empty());
    assert_eq!(
        ring.to_env_string(),
        format!("new:{SECRET_B},old:{SECRET_A}")
    );
    assert_hides_secrets(&format!("{ring:?}"));
    assert_hides_secrets(&format!("{ring}"));
    assert_hides_secrets(&format!("{:?}", ring.signing_key()));
    assert_eq!(format!("{ring}"), "new (signing), old");
}

#[test]
fn keyring_errors_name_position_and_kid_never_the_secret() {
    let short = STANDARD.encode([5u8; 16]);
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        (" , # nothing\n".into(), "empty"),
        (
            format!("a:{SECRET_A},a:{SECRET_B}"),
            "item 2 (line 1) (a): duplicate",
        ),
        (
            format!("a:{SECRET_A},b:{}*", &SECRET_B[..20]),
            "item 2 (line 1) (b): the secret is not valid",
        ),
        (
            format!("a:{SECRET_A}\nb:{short}"),
            "item 2 (line 2) (b): the secret decodes to 16 bytes",
        ),
        (
            SECRET_A.to_string(),
            "item 1 (line 1): expected `kid:base64`",
        ),
        (
            format!("{SECRET_A}:a"),
            "item 1 (line 1): invalid key id (44 characters)",
        ),
        (format!("bad kid:{SECRET_A}"), "invalid key id"),
        (
            format!("a:{SECRET_A}:{SECRET_B}"),
            "(a): the secret is not valid",
        ),
    ];
    for (text, want) in cases {
        let e = Keyring::parse(&text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "{text:?}: {msg}");
        assert_hides_secrets(&msg);
        assert_hides_secrets(&format!("{e:?}"));
    }
    assert_eq!(Keyring::parse("").unwrap_err(), KeyringError::Empty);
    assert!(matches!(
        Keyring::parse(&format!("a:{SECRET_A},a:{SECRET_B}")),
        Err(KeyringError::DuplicateKid { .. })
    ));
    assert!(matches!(
        Key::new("", [0u8; 32]),
        Err(KeyringError::InvalidKid { .. })
    ));
    assert!(matches!(Keyring::from_keys([]), Err(KeyringError::Empty)));
}

#[test]
fn keyring_from_file_with_comments_and_lines() {
    let path = std::env::temp_dir().join(format!(
        "drover-keys-{}-{}.txt",
        std::process::id(),
        Ulid::generate()
    ));
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "# Drover keys, newest first").unwrap();
    writeln!(f, "new:{SECRET_B}   # rotated in 2026").unwrap();
    writeln!(f).unwrap();
    writeln!(f, "  old:{SECRET_A}, ").unwrap();
    drop(f);
    let ring = Keyring::from_file(&path).unwrap();
    assert_eq!(ring.kids().collect::<Vec<_>>(), ["new", "old"]);
    std::fs::remove_file(&path).unwrap();
    let e = Keyring::from_file(&path).unwrap_err();
    assert!(matches!(e, KeyringError::Io { .. }), "{e}");
    assert!(e.to_string().contains("drover-keys-"));
}

#[test]
fn generated_keys_are_random_and_round_trip() {
    let a = Keyring::generate("gen-1").unwrap();
    let b = Keyring::generate("gen-1").unwrap();
    let (ea, eb) = (a.to_env_string(), b.to_env_string());
    assert_ne!(ea, eb);
    assert!(ea.starts_with("gen-1:"));
    assert!(!format!("{a:?}{a}").contains(&ea["gen-1:".len()..]));
    let back = Keyring::parse(&ea).unwrap();
    let s = envelope::seal(&a, &cfg(), meta(), &[1]).unwrap();
    let opened: Opened<u32> =
        open_pairs(&back, &cfg(), &subject(), &s.headers.to_pairs(), &s.body).unwrap();
    assert_eq!(opened.tasks, [1]);
    assert!(Keyring::generate("not valid!").is_err());
}

// ---- nothing panics ----------------------------------------------------------------------------

fn header_value() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        3 => "\\PC{0,40}".prop_map(Some),
        3 => "[0-9A-Za-z+/=|_-]{0,48}".prop_map(Some),
        2 => (0u64..u64::MAX).prop_map(|n| Some(n.to_string())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_headers_and_bodies_never_panic(
        values in proptest::collection::vec(header_value(), 10),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        subject in "\\PC{0,40}",
    ) {
        let pairs: Vec<(&'static str, String)> = HEADER_NAMES
            .iter()
            .zip(values)
            .filter_map(|(n, v)| v.map(|v| (*n, v)))
            .collect();
        let r = open_pairs::<Value>(&ring(), &cfg(), &subject, &pairs, &body);
        prop_assert!(r.is_err());
    }

    #[test]
    fn random_bodies_under_valid_headers_are_rejected(
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let s = sealed_small();
        let r = open_pairs::<Value>(&ring(), &cfg(), &subject(), &s.headers.to_pairs(), &body);
        prop_assert_eq!(r.unwrap_err(), OpenError::BadSignature);
    }

    #[test]
    fn random_signed_plaintext_never_panics(
        plain in proptest::collection::vec(any::<u8>(), 0..256),
        count in 1usize..4,
    ) {
        let s = envelope::seal_json(&ring(), &cfg(), meta(), &plain, count).unwrap();
        let r = open_pairs::<Value>(&ring(), &cfg(), &subject(), &s.headers.to_pairs(), &s.body);
        if let Err(e) = r {
            prop_assert!(["bad_json", "count_mismatch"].contains(&e.reason()), "{}", e);
        }
    }

    #[test]
    fn random_signed_compressed_bytes_never_panic(
        compressed in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let (pairs, body) = reference_seal(&[1u8; 32], "k1", &meta(), 1, &compressed);
        let r = open_pairs::<Value>(&ring(), &cfg(), &subject(), &pairs, &body);
        prop_assert!(r.is_err());
    }

    #[test]
    fn random_header_lookups_never_panic(values in proptest::collection::vec(header_value(), 10)) {
        let _ = EnvelopeHeaders::from_lookup(|name| {
            HEADER_NAMES.iter().position(|n| *n == name).and_then(|i| values[i].as_deref())
        });
    }

    #[test]
    fn random_key_lists_never_panic_nor_echo(text in "\\PC{0,120}") {
        if let Err(e) = Keyring::parse(&text) {
            let _ = (e.to_string(), format!("{e:?}"));
        }
    }
}
