//! The work envelope (SPEC §3): a batch sealed as JSON → zstd → AES-256-GCM → HMAC-SHA256, its
//! NATS headers, and its verification.
//!
//! Pure: bytes and values in, bytes and values out; the NATS adapter maps [`EnvelopeHeaders`]
//! to and from a header map with [`EnvelopeHeaders::to_pairs`] and
//! [`EnvelopeHeaders::from_lookup`].
//!
//! Sealing a batch with key `(kid, secret)`, the first of the [`Keyring`]:
//!
//! 1. plaintext = JSON array of the tasks;
//! 2. compressed = zstd(plaintext, [`CodecConfig::level`]);
//! 3. `enc_key = HKDF-SHA256(ikm = secret, salt = batch id, info = "drover/enc/v1")`, where the
//!    salt is the 26 ASCII bytes of the batch ULID as written in `Drover-Batch`;
//! 4. `aad = "v1|" kid "|" batch "|" queue "|" partition "|" count "|" ts "|" epoch` (decimal);
//! 5. body = nonce (12 OS-random bytes) ‖ AES-256-GCM(enc_key, nonce, compressed, aad) (tag last);
//! 6. `Drover-Sig` = base64 (standard, padded) of HMAC-SHA256(mac_key, aad ‖ body), with the
//!    per-key `mac_key` of [`crate::keyring`].
//!
//! Opening checks, in this order, each failure its own [`OpenError`] variant: headers well
//! formed and matching the subject → kid known → HMAC (constant time) → decrypt → decompress
//! under [`CodecConfig::max_decompressed`] → JSON array → count. Only an unknown kid is worth
//! retrying ([`OpenError::is_retryable`]); every other failure means quarantine.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Cursor;
use std::thread::LocalKey;
use std::time::{SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, aead};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::TryRng as _;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use ulid::Ulid;
use zstd::zstd_safe::{self, CCtx, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

use crate::keyring::{KEY_LEN, Key, Keyring, is_valid_kid, wipe};
use crate::names::{Names, is_valid_queue};

/// JetStream de-duplication id; always equal to [`HDR_BATCH`].
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";
/// The batch id, a ULID in its canonical 26-character upper-case form.
pub const HDR_BATCH: &str = "Drover-Batch";
/// Number of tasks in the batch (decimal, ≥ 1).
pub const HDR_COUNT: &str = "Drover-Count";
/// Queue the batch belongs to; must equal the subject's queue token.
pub const HDR_QUEUE: &str = "Drover-Queue";
/// Partition the batch belongs to; must equal the subject's partition token.
pub const HDR_PARTITION: &str = "Drover-Partition";
/// Leader term that sealed the batch (SPEC §5).
pub const HDR_EPOCH: &str = "Drover-Epoch";
/// When the batch was sealed, in milliseconds since the Unix epoch.
pub const HDR_TS: &str = "Drover-Ts";
/// Id of the key that sealed the batch.
pub const HDR_KID: &str = "Drover-Kid";
/// The construction; always [`ENC`].
pub const HDR_ENC: &str = "Drover-Enc";
/// Base64 (standard, padded) HMAC-SHA256 of `aad ‖ body`.
pub const HDR_SIG: &str = "Drover-Sig";
/// Every envelope header, in the order [`EnvelopeHeaders::to_pairs`] emits them.
pub const HEADER_NAMES: [&str; 10] = [
    HDR_MSG_ID,
    HDR_BATCH,
    HDR_COUNT,
    HDR_QUEUE,
    HDR_PARTITION,
    HDR_EPOCH,
    HDR_TS,
    HDR_KID,
    HDR_ENC,
    HDR_SIG,
];

/// The only value of `Drover-Enc` this version writes and accepts.
pub const ENC: &str = "zstd+aes256gcm";
/// HKDF `info` of the per-envelope encryption key.
pub const ENC_INFO: &[u8] = b"drover/enc/v1";
/// First field of the aad.
pub const AAD_VERSION: &str = "v1";
/// Bytes of nonce at the start of the body.
pub const NONCE_LEN: usize = 12;
/// Bytes of GCM tag at the end of the body.
pub const TAG_LEN: usize = 16;
/// Bytes of the HMAC-SHA256 signature.
pub const SIG_LEN: usize = 32;
/// Default zstd level.
pub const DEFAULT_LEVEL: i32 = 3;
/// Default cap on the decompressed plaintext: 16 MiB.
pub const DEFAULT_MAX_DECOMPRESSED: usize = 16 * 1024 * 1024;

type HmacSha256 = Hmac<Sha256>;

// ---- configuration and inputs ------------------------------------------------------------------

/// How batches are compressed and how much an opened one may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    /// zstd compression level used when sealing (1..=22, negative for the fast modes).
    #[serde(default = "default_level")]
    pub level: i32,
    /// Largest plaintext, in bytes, that opening will decompress; larger is `too_large`.
    #[serde(default = "default_max_decompressed")]
    pub max_decompressed: usize,
}

const fn default_level() -> i32 {
    DEFAULT_LEVEL
}

const fn default_max_decompressed() -> usize {
    DEFAULT_MAX_DECOMPRESSED
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            level: DEFAULT_LEVEL,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }
}

/// Identity, place and time of one batch: everything sealed besides the tasks and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMeta {
    /// Batch id (also the `Nats-Msg-Id` and the HKDF salt).
    pub batch: Ulid,
    /// Queue (must be a valid queue name).
    pub queue: String,
    /// Partition within the queue.
    pub partition: u32,
    /// Leader term of the sealer.
    pub epoch: u64,
    /// Sealing time, ms since the Unix epoch.
    pub ts_ms: u64,
}

impl BatchMeta {
    /// Meta for a new batch sealed now: a fresh ULID, and its timestamp as `ts_ms`.
    pub fn new(queue: impl Into<String>, partition: u32, epoch: u64) -> Self {
        let batch = new_batch_id();
        Self {
            batch,
            queue: queue.into(),
            partition,
            epoch,
            ts_ms: batch.timestamp_ms(),
        }
    }
}

/// A fresh batch id: a ULID of the current time.
pub fn new_batch_id() -> Ulid {
    Ulid::generate()
}

/// The current time in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---- headers -----------------------------------------------------------------------------------

/// The envelope's NATS headers, parsed. `Nats-Msg-Id` (= batch) and `Drover-Enc` (= [`ENC`])
/// are implied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeHeaders {
    /// `Drover-Batch` (and `Nats-Msg-Id`).
    pub batch: Ulid,
    /// `Drover-Count`.
    pub count: u32,
    /// `Drover-Queue`.
    pub queue: String,
    /// `Drover-Partition`.
    pub partition: u32,
    /// `Drover-Epoch`.
    pub epoch: u64,
    /// `Drover-Ts`.
    pub ts_ms: u64,
    /// `Drover-Kid`.
    pub kid: String,
    /// `Drover-Sig`, decoded.
    pub sig: [u8; SIG_LEN],
}

impl EnvelopeHeaders {
    /// The batch id as written in `Drover-Batch`.
    pub fn batch_id(&self) -> String {
        self.batch.to_string()
    }

    /// The signature as written in `Drover-Sig`.
    pub fn sig_base64(&self) -> String {
        STANDARD.encode(self.sig)
    }

    /// The headers as `(name, value)` pairs, in [`HEADER_NAMES`] order.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let batch = self.batch_id();
        vec![
            (HDR_MSG_ID, batch.clone()),
            (HDR_BATCH, batch),
            (HDR_COUNT, self.count.to_string()),
            (HDR_QUEUE, self.queue.clone()),
            (HDR_PARTITION, self.partition.to_string()),
            (HDR_EPOCH, self.epoch.to_string()),
            (HDR_TS, self.ts_ms.to_string()),
            (HDR_KID, self.kid.clone()),
            (HDR_ENC, ENC.to_owned()),
            (HDR_SIG, self.sig_base64()),
        ]
    }

    /// Parses the headers from a lookup (`|name| map.get(name)`), strictly: every header must be
    /// present; numbers are canonical decimals (no sign, no leading zero); the batch is a
    /// canonical ULID equal to `Nats-Msg-Id`; queue and kid match their patterns; `Drover-Enc`
    /// is [`ENC`]; the signature is padded standard base64 of 32 bytes. Any failure is
    /// [`OpenError::BadHeaders`].
    pub fn from_lookup<'h>(
        mut lookup: impl FnMut(&'static str) -> Option<&'h str>,
    ) -> Result<Self, OpenError> {
        let mut get = |name: &'static str| {
            lookup(name).ok_or_else(|| OpenError::BadHeaders(format!("{name} is missing")))
        };
        let enc = get(HDR_ENC)?;
        if enc != ENC {
            return Err(bad(
                HDR_ENC,
                enc,
                "is not the known construction \"zstd+aes256gcm\"",
            ));
        }
        let batch_raw = get(HDR_BATCH)?;
        let batch = parse_ulid(batch_raw)
            .ok_or_else(|| bad(HDR_BATCH, batch_raw, "is not a canonical ULID"))?;
        let msg_id = get(HDR_MSG_ID)?;
        if msg_id != batch_raw {
            return Err(bad(HDR_MSG_ID, msg_id, "differs from Drover-Batch"));
        }
        let count_raw = get(HDR_COUNT)?;
        let count = parse_decimal(count_raw)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n >= 1)
            .ok_or_else(|| bad(HDR_COUNT, count_raw, "is not a decimal count of at least 1"))?;
        let queue = get(HDR_QUEUE)?;
        if !is_valid_queue(queue) {
            return Err(bad(HDR_QUEUE, queue, "is not a valid queue name"));
        }
        let partition_raw = get(HDR_PARTITION)?;
        let partition = parse_decimal(partition_raw)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(HDR_PARTITION, partition_raw, "is not a decimal u32"))?;
        let epoch_raw = get(HDR_EPOCH)?;
        let epoch = parse_decimal(epoch_raw)
            .ok_or_else(|| bad(HDR_EPOCH, epoch_raw, "is not a decimal u64"))?;
        let ts_raw = get(HDR_TS)?;
        let ts_ms =
            parse_decimal(ts_raw).ok_or_else(|| bad(HDR_TS, ts_raw, "is not a decimal u64"))?;
        let kid = get(HDR_KID)?;
        if !is_valid_kid(kid) {
            return Err(bad(HDR_KID, kid, "is not a valid key id"));
        }
        let sig_raw = get(HDR_SIG)?;
        let sig = STANDARD
            .decode(sig_raw)
            .ok()
            .and_then(|v| <[u8; SIG_LEN]>::try_from(v.as_slice()).ok())
            .ok_or_else(|| bad(HDR_SIG, sig_raw, "is not padded base64 of 32 bytes"))?;
        Ok(Self {
            batch,
            count,
            queue: queue.to_owned(),
            partition,
            epoch,
            ts_ms,
            kid: kid.to_owned(),
            sig,
        })
    }

    /// The associated data: `v1|kid|batch|queue|partition|count|ts|epoch`.
    pub fn aad(&self) -> Vec<u8> {
        let mut buf = [0u8; ulid::ULID_LEN];
        let batch = self.batch.array_to_str(&mut buf);
        aad(
            &self.kid,
            batch,
            &self.queue,
            self.partition,
            self.count,
            self.ts_ms,
            self.epoch,
        )
    }
}

fn aad(
    kid: &str,
    batch: &str,
    queue: &str,
    partition: u32,
    count: u32,
    ts_ms: u64,
    epoch: u64,
) -> Vec<u8> {
    let mut s = String::with_capacity(96 + kid.len() + queue.len());
    // Writing into a String cannot fail.
    let _ = write!(
        s,
        "{AAD_VERSION}|{kid}|{batch}|{queue}|{partition}|{count}|{ts_ms}|{epoch}"
    );
    s.into_bytes()
}

/// A canonical decimal: ASCII digits only, no sign, no leading zero (except `0`), fits in u64.
fn parse_decimal(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 20
        && b.iter().all(u8::is_ascii_digit)
        && (b.len() == 1 || b.first() != Some(&b'0'));
    if ok { s.parse().ok() } else { None }
}

/// A ULID in its canonical form only (upper case, no overflow), so one batch has one spelling.
fn parse_ulid(s: &str) -> Option<Ulid> {
    let id = Ulid::from_string(s).ok()?;
    let mut buf = [0u8; ulid::ULID_LEN];
    (id.array_to_str(&mut buf) == s).then_some(id)
}

fn bad(name: &str, value: &str, what: &str) -> OpenError {
    OpenError::BadHeaders(format!("{name} {} {what}", shown(value)))
}

/// A value quoted for an error message, cut to 64 characters.
fn shown(value: &str) -> String {
    if value.chars().count() > 64 {
        let cut: String = value.chars().take(64).collect();
        format!("{cut:?}…")
    } else {
        format!("{value:?}")
    }
}

// ---- errors ------------------------------------------------------------------------------------

/// Why a batch could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A batch holds at least one task.
    #[error("a batch holds at least one task, got none")]
    Empty,
    /// More tasks than `Drover-Count` can say.
    #[error("a batch holds at most 4294967295 tasks, got {0}")]
    TooMany(usize),
    /// The queue is not a valid queue name.
    #[error("invalid queue name {0:?}: must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    InvalidQueue(String),
    /// The tasks did not serialize.
    #[error("the tasks do not serialize to JSON: {0}")]
    Json(String),
    /// zstd failed.
    #[error("zstd compression failed: {0}")]
    Compress(String),
    /// The cipher or MAC refused its input (not expected to happen).
    #[error("encryption failed")]
    Crypto,
    /// The OS random source failed to produce a nonce.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// Why an envelope was refused, in verification order. [`OpenError::reason`] gives a stable
/// label for metrics and quarantine records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// A header is missing or malformed.
    #[error("malformed envelope headers: {0}")]
    BadHeaders(String),
    /// Queue or partition in the headers differ from where the message arrived.
    #[error("envelope does not belong here: {0}")]
    SubjectMismatch(String),
    /// The kid is not in this keyring (a key rollout may be under way): NAK with a delay.
    #[error("unknown key id {0:?} (is a key rollout under way?)")]
    UnknownKid(String),
    /// The HMAC does not verify: tampered, or signed with another secret.
    #[error("signature does not verify")]
    BadSignature,
    /// AES-GCM refused the body.
    #[error("decryption failed")]
    DecryptFailed,
    /// The plaintext is larger than the cap.
    #[error("plaintext exceeds the cap of {cap} bytes")]
    TooLarge {
        /// The cap ([`CodecConfig::max_decompressed`]).
        cap: usize,
    },
    /// zstd refused the decrypted bytes.
    #[error("zstd decompression failed: {0}")]
    DecompressFailed(String),
    /// The plaintext is not a JSON array of the expected element type. The message gives the
    /// position, never the content.
    #[error("plaintext is not a JSON array of tasks: {0}")]
    BadJson(String),
    /// The array's length differs from `Drover-Count`.
    #[error("Drover-Count says {expected} tasks but the batch holds {actual}")]
    CountMismatch {
        /// `Drover-Count`.
        expected: u32,
        /// Elements in the array.
        actual: usize,
    },
}

impl OpenError {
    /// Every [`reason`](Self::reason), in verification order (for pre-registering metric labels).
    pub const REASONS: [&'static str; 9] = [
        "bad_headers",
        "subject_mismatch",
        "unknown_kid",
        "bad_signature",
        "decrypt_failed",
        "too_large",
        "decompress_failed",
        "bad_json",
        "count_mismatch",
    ];

    /// A stable snake_case label of the failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadHeaders(_) => "bad_headers",
            Self::SubjectMismatch(_) => "subject_mismatch",
            Self::UnknownKid(_) => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::DecryptFailed => "decrypt_failed",
            Self::TooLarge { .. } => "too_large",
            Self::DecompressFailed(_) => "decompress_failed",
            Self::BadJson(_) => "bad_json",
            Self::CountMismatch { .. } => "count_mismatch",
        }
    }

    /// `true` for an unknown kid.
    pub fn is_unknown_kid(&self) -> bool {
        matches!(self, Self::UnknownKid(_))
    }

    /// `true` if redelivery may succeed (NAK with a delay): only an unknown kid, since a key
    /// rollout may not have reached this process yet. Everything else is final (`+TERM` and
    /// quarantine).
    pub fn is_retryable(&self) -> bool {
        self.is_unknown_kid()
    }
}

// ---- sealing -----------------------------------------------------------------------------------

/// Sizes of one sealed batch, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealStats {
    /// Tasks in the batch.
    pub count: u32,
    /// Bytes of JSON plaintext.
    pub plaintext_bytes: usize,
    /// Bytes after zstd.
    pub compressed_bytes: usize,
    /// Bytes of the body (nonce + ciphertext + tag).
    pub body_bytes: usize,
}

impl SealStats {
    /// plaintext / compressed (0 when nothing was compressed).
    pub fn ratio(&self) -> f64 {
        if self.compressed_bytes == 0 {
            0.0
        } else {
            self.plaintext_bytes as f64 / self.compressed_bytes as f64
        }
    }
}

/// A sealed batch: headers to set on the NATS message, and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The headers (see [`EnvelopeHeaders::to_pairs`]).
    pub headers: EnvelopeHeaders,
    /// The message body.
    pub body: Vec<u8>,
    /// Sizes, for metrics.
    pub stats: SealStats,
}

impl Sealed {
    /// `(headers, body)`.
    pub fn into_parts(self) -> (EnvelopeHeaders, Vec<u8>) {
        (self.headers, self.body)
    }
}

/// Seals `tasks` (serialized as one JSON array) with the ring's signing key.
pub fn seal<T: Serialize>(
    ring: &Keyring,
    config: &CodecConfig,
    meta: BatchMeta,
    tasks: &[T],
) -> Result<Sealed, SealError> {
    check_count(tasks.len())?;
    let plaintext = serde_json::to_vec(tasks).map_err(|e| SealError::Json(e.to_string()))?;
    seal_json(ring, config, meta, &plaintext, tasks.len())
}

/// Seals `plaintext`, which the caller promises is a JSON array of `count` elements (opening
/// checks it, so a broken promise makes the envelope unopenable, never unsafe).
pub fn seal_json(
    ring: &Keyring,
    config: &CodecConfig,
    meta: BatchMeta,
    plaintext: &[u8],
    count: usize,
) -> Result<Sealed, SealError> {
    let level = config.level;
    seal_with(ring, meta, count, plaintext.len(), |body| {
        body.reserve(zstd_safe::compress_bound(plaintext.len()) + TAG_LEN);
        let start = body.len() as u64;
        with_ctx(&CCTX, CCtx::try_create, |cctx| {
            let mut out = Cursor::new(&mut *body);
            out.set_position(start);
            cctx.compress(&mut out, plaintext, level)
                .map(|_| ())
                .map_err(|code| SealError::Compress(zstd_safe::get_error_name(code).to_owned()))
        })
        .unwrap_or_else(|| Err(SealError::Compress("no zstd context".to_owned())))
    })
}

fn check_count(count: usize) -> Result<u32, SealError> {
    match u32::try_from(count) {
        Ok(0) => Err(SealError::Empty),
        Ok(n) => Ok(n),
        Err(_) => Err(SealError::TooMany(count)),
    }
}

/// Builds the body around bytes `compress` appends after the nonce, encrypts and signs it.
fn seal_with(
    ring: &Keyring,
    meta: BatchMeta,
    count: usize,
    plaintext_bytes: usize,
    compress: impl FnOnce(&mut Vec<u8>) -> Result<(), SealError>,
) -> Result<Sealed, SealError> {
    let count = check_count(count)?;
    if !is_valid_queue(&meta.queue) {
        return Err(SealError::InvalidQueue(meta.queue));
    }
    let key = ring.signing_key();
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::SysRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| SealError::Random(e.to_string()))?;
    let mut body = Vec::with_capacity(
        NONCE_LEN + zstd_safe::compress_bound(plaintext_bytes).max(64) + TAG_LEN,
    );
    body.extend_from_slice(&nonce);
    compress(&mut body)?;
    let compressed_bytes = body.len().saturating_sub(NONCE_LEN);

    let mut batch_buf = [0u8; ulid::ULID_LEN];
    let batch = meta.batch.array_to_str(&mut batch_buf);
    let aad = aad(
        key.kid(),
        batch,
        &meta.queue,
        meta.partition,
        count,
        meta.ts_ms,
        meta.epoch,
    );
    let cipher = cipher_for(key, batch).ok_or(SealError::Crypto)?;
    let tag = cipher
        .encrypt_inout_detached(
            &aead::Nonce::<Aes256Gcm>::from(nonce),
            &aad,
            body.get_mut(NONCE_LEN..).ok_or(SealError::Crypto)?.into(),
        )
        .map_err(|_| SealError::Crypto)?;
    body.extend_from_slice(&tag);
    body.shrink_to_fit();
    let mut mac = new_mac(key).ok_or(SealError::Crypto)?;
    mac.update(&aad);
    mac.update(&body);
    let sig: [u8; SIG_LEN] = mac.finalize().into_bytes().into();

    let stats = SealStats {
        count,
        plaintext_bytes,
        compressed_bytes,
        body_bytes: body.len(),
    };
    let headers = EnvelopeHeaders {
        batch: meta.batch,
        count,
        queue: meta.queue,
        partition: meta.partition,
        epoch: meta.epoch,
        ts_ms: meta.ts_ms,
        kid: key.kid().to_owned(),
        sig,
    };
    Ok(Sealed {
        headers,
        body,
        stats,
    })
}

/// AES-256-GCM under `HKDF-SHA256(ikm = secret, salt = batch, info = "drover/enc/v1")`.
fn cipher_for(key: &Key, batch: &str) -> Option<Aes256Gcm> {
    let mut okm = [0u8; KEY_LEN];
    Hkdf::<Sha256>::new(Some(batch.as_bytes()), key.secret())
        .expand(ENC_INFO, &mut okm)
        .ok()?;
    let cipher = Aes256Gcm::new_from_slice(&okm).ok();
    wipe(&mut okm);
    cipher
}

fn new_mac(key: &Key) -> Option<HmacSha256> {
    <HmacSha256 as KeyInit>::new_from_slice(key.mac_key()).ok()
}

// ---- opening -----------------------------------------------------------------------------------

/// Where the envelope arrived, which its `Drover-Queue`/`Drover-Partition` must match.
#[derive(Debug, Clone, Copy)]
pub enum Expected<'a> {
    /// The NATS subject it arrived on, `<prefix>.work.<queue>.<partition>`.
    Subject {
        /// The naming scheme (prefix) in use.
        names: &'a Names,
        /// The subject.
        subject: &'a str,
    },
    /// An explicit queue and partition (e.g. for sealed data at rest).
    Location {
        /// Expected queue.
        queue: &'a str,
        /// Expected partition.
        partition: u32,
    },
}

/// Sizes of one opened batch, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenStats {
    /// Tasks in the batch.
    pub count: usize,
    /// Bytes of the body.
    pub body_bytes: usize,
    /// Bytes of zstd data inside it.
    pub compressed_bytes: usize,
    /// Bytes of JSON plaintext.
    pub plaintext_bytes: usize,
}

/// An opened batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened<T> {
    /// The tasks, in sealed order.
    pub tasks: Vec<T>,
    /// Sizes, for metrics.
    pub stats: OpenStats,
}

/// Verifies and opens an envelope into its tasks (the whole order of checks of SPEC §3).
pub fn open<T: DeserializeOwned>(
    ring: &Keyring,
    config: &CodecConfig,
    expected: Expected<'_>,
    headers: &EnvelopeHeaders,
    body: &[u8],
) -> Result<Opened<T>, OpenError> {
    let (plaintext, mut stats) = verify_and_decompress(ring, config, expected, headers, body)?;
    let tasks: Vec<T> = serde_json::from_slice(&plaintext).map_err(json_error)?;
    check_parsed_count(headers, tasks.len())?;
    stats.count = tasks.len();
    Ok(Opened { tasks, stats })
}

/// Like [`open`], but returns the verified JSON plaintext (its array length already checked
/// against `Drover-Count`) instead of parsing the elements.
pub fn open_json(
    ring: &Keyring,
    config: &CodecConfig,
    expected: Expected<'_>,
    headers: &EnvelopeHeaders,
    body: &[u8],
) -> Result<(Vec<u8>, OpenStats), OpenError> {
    let (plaintext, mut stats) = verify_and_decompress(ring, config, expected, headers, body)?;
    let elements: Vec<IgnoredAny> = serde_json::from_slice(&plaintext).map_err(json_error)?;
    check_parsed_count(headers, elements.len())?;
    stats.count = elements.len();
    Ok((plaintext, stats))
}

/// Parses the headers with `lookup`, then [`open`]s a message that arrived on `subject`.
pub fn open_message<'h, T: DeserializeOwned>(
    ring: &Keyring,
    config: &CodecConfig,
    names: &Names,
    subject: &str,
    lookup: impl FnMut(&'static str) -> Option<&'h str>,
    body: &[u8],
) -> Result<(EnvelopeHeaders, Opened<T>), OpenError> {
    let headers = EnvelopeHeaders::from_lookup(lookup)?;
    let opened = open(
        ring,
        config,
        Expected::Subject { names, subject },
        &headers,
        body,
    )?;
    Ok((headers, opened))
}

fn check_parsed_count(headers: &EnvelopeHeaders, actual: usize) -> Result<(), OpenError> {
    if usize::try_from(headers.count).ok() == Some(actual) {
        Ok(())
    } else {
        Err(OpenError::CountMismatch {
            expected: headers.count,
            actual,
        })
    }
}

/// serde_json's messages can quote the plaintext; keep only the category and position.
fn json_error(e: serde_json::Error) -> OpenError {
    let what = match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "unexpected end",
    };
    OpenError::BadJson(format!("{what} at line {} column {}", e.line(), e.column()))
}

fn check_location(headers: &EnvelopeHeaders, expected: Expected<'_>) -> Result<(), OpenError> {
    let (queue, partition) = match expected {
        Expected::Subject { names, subject } => {
            names.parse_work_subject(subject).ok_or_else(|| {
                OpenError::SubjectMismatch(format!(
                    "{} is not a work subject under prefix {names}",
                    shown(subject)
                ))
            })?
        }
        Expected::Location { queue, partition } => (queue, partition),
    };
    if headers.queue == queue && headers.partition == partition {
        Ok(())
    } else {
        Err(OpenError::SubjectMismatch(format!(
            "headers say queue {:?} partition {}, but it came for queue {} partition {partition}",
            headers.queue,
            headers.partition,
            shown(queue)
        )))
    }
}

/// Every check up to and including decompression; returns the plaintext.
fn verify_and_decompress(
    ring: &Keyring,
    config: &CodecConfig,
    expected: Expected<'_>,
    headers: &EnvelopeHeaders,
    body: &[u8],
) -> Result<(Vec<u8>, OpenStats), OpenError> {
    check_location(headers, expected)?;
    let key = ring
        .get(&headers.kid)
        .ok_or_else(|| OpenError::UnknownKid(headers.kid.clone()))?;

    let mut batch_buf = [0u8; ulid::ULID_LEN];
    let batch = headers.batch.array_to_str(&mut batch_buf);
    let aad = aad(
        &headers.kid,
        batch,
        &headers.queue,
        headers.partition,
        headers.count,
        headers.ts_ms,
        headers.epoch,
    );
    let mut mac = new_mac(key).ok_or(OpenError::BadSignature)?;
    mac.update(&aad);
    mac.update(body);
    mac.verify_slice(&headers.sig)
        .map_err(|_| OpenError::BadSignature)?;

    if body.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError::DecryptFailed);
    }
    let (nonce, rest) = body.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce = aead::Nonce::<Aes256Gcm>::try_from(nonce).map_err(|_| OpenError::DecryptFailed)?;
    let tag = aead::Tag::<Aes256Gcm>::try_from(tag).map_err(|_| OpenError::DecryptFailed)?;
    let cipher = cipher_for(key, batch).ok_or(OpenError::DecryptFailed)?;
    let mut compressed = ciphertext.to_vec();
    cipher
        .decrypt_inout_detached(&nonce, &aad, compressed.as_mut_slice().into(), &tag)
        .map_err(|_| OpenError::DecryptFailed)?;

    let plaintext = decompress_capped(&compressed, config.max_decompressed)?;
    let stats = OpenStats {
        count: 0,
        body_bytes: body.len(),
        compressed_bytes: compressed.len(),
        plaintext_bytes: plaintext.len(),
    };
    Ok((plaintext, stats))
}

// ---- zstd --------------------------------------------------------------------------------------

thread_local! {
    static CCTX: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's cached zstd context from `slot`, or with a fresh one from
/// `create` if the cached one is busy or gone; `None` if zstd cannot allocate a context.
fn with_ctx<C, R>(
    slot: &'static LocalKey<RefCell<Option<C>>>,
    create: fn() -> Option<C>,
    f: impl FnOnce(&mut C) -> R,
) -> Option<R> {
    let mut f = Some(f);
    let cached = slot.try_with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = create();
        }
        let ctx = slot.as_mut()?;
        f.take().map(|f| f(ctx))
    });
    match (cached, f) {
        (Ok(Some(r)), _) => Some(r),
        (_, Some(f)) => create().map(|mut ctx| f(&mut ctx)),
        (_, None) => None,
    }
}

/// Smallest growth step of the output buffer when the frame does not declare its size.
const GROW_MIN: usize = 64 * 1024;

/// The largest zstd window (log2) a frame may ask for when the plaintext is capped at `cap`.
/// A frame whose plaintext fits never needs a window larger than the plaintext; below 8 MiB
/// (log 23, what streaming compression up to level 19 uses) the limit is not lowered further,
/// so the decoder's window memory stays bounded by `max(cap, 8 MiB)`.
fn window_log_max(cap: usize) -> u32 {
    let bits = usize::BITS - cap.saturating_sub(1).leading_zeros();
    bits.clamp(23, 31)
}

/// Streams `src` through zstd into a buffer that never grows past `cap + 1` bytes (sized
/// exactly when the frame declares its size; otherwise doubled, so at most ~1.5 × cap is held
/// while the last reallocation copies).
fn decompress_capped(src: &[u8], cap: usize) -> Result<Vec<u8>, OpenError> {
    let too_large = OpenError::TooLarge { cap };
    let limit = cap.saturating_add(1);
    let initial = match zstd_safe::get_frame_content_size(src) {
        Ok(Some(n)) if n > cap as u64 => return Err(too_large),
        // The declared size is authenticated but still only a hint: the loop enforces the cap.
        Ok(Some(n)) => usize::try_from(n).unwrap_or(limit),
        _ => src.len().saturating_mul(4).max(GROW_MIN),
    }
    .min(limit);
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(initial)
        .map_err(|_| too_large.clone())?;
    let fail = |what: &str| OpenError::DecompressFailed(what.to_owned());
    let zstd_fail =
        |code: usize| OpenError::DecompressFailed(zstd_safe::get_error_name(code).into());

    with_ctx(&DCTX, DCtx::try_create, |dctx| {
        dctx.reset(ResetDirective::SessionOnly).map_err(zstd_fail)?;
        dctx.set_parameter(DParameter::WindowLogMax(window_log_max(cap)))
            .map_err(zstd_fail)?;
        let mut input = InBuffer::around(src);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(too_large.clone());
                }
                // Double, but jump straight to the limit rather than end just short of it
                // (which would cost one more reallocation of the whole buffer).
                let want = out.capacity().saturating_mul(2).max(GROW_MIN);
                let target = if want >= limit || limit - want < want / 2 {
                    limit
                } else {
                    want
                };
                out.try_reserve_exact(target - out.len())
                    .map_err(|_| too_large.clone())?;
            }
            let (in_before, out_before) = (input.pos(), out.len());
            let hint = {
                let mut output = OutBuffer::around_pos(&mut out, out_before);
                dctx.decompress_stream(&mut output, &mut input)
                    .map_err(zstd_fail)?
            };
            if out.len() > cap {
                return Err(too_large.clone());
            }
            if hint == 0 && input.pos() == src.len() {
                return Ok(());
            }
            if input.pos() == in_before && out.len() == out_before {
                return Err(fail("truncated or stalled frame"));
            }
        }
    })
    .unwrap_or_else(|| Err(fail("no zstd context")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new([("k1", [1u8; 32])]).unwrap()
    }

    fn meta() -> BatchMeta {
        BatchMeta {
            batch: Ulid::from_parts(1_700_000_000_000, 42),
            queue: "default".into(),
            partition: 7,
            epoch: 3,
            ts_ms: 1_700_000_000_123,
        }
    }

    const HERE: Expected<'static> = Expected::Location {
        queue: "default",
        partition: 7,
    };

    /// Seals `compressed` verbatim (bypassing zstd) so later stages can be exercised.
    fn seal_raw(compressed: &[u8], count: usize) -> Sealed {
        seal_with(&ring(), meta(), count, 0, |body| {
            body.extend_from_slice(compressed);
            Ok(())
        })
        .unwrap()
    }

    /// Re-signs `body` for `headers` with the test key.
    fn resign(headers: &mut EnvelopeHeaders, body: &[u8]) {
        let ring = ring();
        let mut mac = new_mac(ring.signing_key()).unwrap();
        mac.update(&headers.aad());
        mac.update(body);
        headers.sig = mac.finalize().into_bytes().into();
    }

    #[test]
    fn aad_format() {
        let s = seal(&ring(), &CodecConfig::default(), meta(), &[1, 2]).unwrap();
        let aad = String::from_utf8(s.headers.aad()).unwrap();
        let batch = meta().batch.to_string();
        assert_eq!(aad, format!("v1|k1|{batch}|default|7|2|1700000000123|3"));
    }

    #[test]
    fn pairs_round_trip() {
        let s = seal(&ring(), &CodecConfig::default(), meta(), &["a"]).unwrap();
        let pairs = s.headers.to_pairs();
        assert_eq!(
            pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
            HEADER_NAMES.to_vec()
        );
        let back =
            EnvelopeHeaders::from_lookup(|n| pairs.iter().find(|p| p.0 == n).map(|p| p.1.as_str()))
                .unwrap();
        assert_eq!(back, s.headers);
    }

    #[test]
    fn canonical_numbers_only() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "00",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "18446744073709551616",
            "1e3",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
        let id = meta().batch.to_string();
        assert!(parse_ulid(&id).is_some());
        assert!(parse_ulid(&id.to_lowercase()).is_none());
        assert!(parse_ulid("ZZZZZZZZZZZZZZZZZZZZZZZZZZ").is_none());
    }

    #[test]
    fn window_log() {
        assert_eq!(window_log_max(DEFAULT_MAX_DECOMPRESSED), 24);
        assert_eq!(window_log_max(0), 23);
        assert_eq!(window_log_max(1 << 28), 28);
        assert_eq!(window_log_max(usize::MAX), 31);
    }

    #[test]
    fn reasons_are_listed_in_order() {
        let all = [
            OpenError::BadHeaders(String::new()),
            OpenError::SubjectMismatch(String::new()),
            OpenError::UnknownKid(String::new()),
            OpenError::BadSignature,
            OpenError::DecryptFailed,
            OpenError::TooLarge { cap: 0 },
            OpenError::DecompressFailed(String::new()),
            OpenError::BadJson(String::new()),
            OpenError::CountMismatch {
                expected: 0,
                actual: 0,
            },
        ];
        let reasons: Vec<_> = all.iter().map(OpenError::reason).collect();
        assert_eq!(reasons, OpenError::REASONS);
        assert!(OpenError::UnknownKid("x".into()).is_retryable());
        assert!(!OpenError::BadSignature.is_retryable());
    }

    #[test]
    fn ciphertext_tampered_and_resigned_fails_decryption() {
        let s = seal(&ring(), &CodecConfig::default(), meta(), &[1]).unwrap();
        let (mut h, mut body) = s.into_parts();
        body[NONCE_LEN] ^= 1;
        resign(&mut h, &body);
        let e = open::<u32>(&ring(), &CodecConfig::default(), HERE, &h, &body).unwrap_err();
        assert_eq!(e, OpenError::DecryptFailed);
        // Too short to hold nonce and tag, but correctly signed.
        let short = vec![0u8; NONCE_LEN + TAG_LEN - 1];
        resign(&mut h, &short);
        let e = open::<u32>(&ring(), &CodecConfig::default(), HERE, &h, &short).unwrap_err();
        assert_eq!(e, OpenError::DecryptFailed);
    }

    #[test]
    fn garbage_inside_a_valid_envelope_fails_decompression() {
        let s = seal_raw(b"not zstd at all", 1);
        let e =
            open::<u32>(&ring(), &CodecConfig::default(), HERE, &s.headers, &s.body).unwrap_err();
        assert_eq!(e.reason(), "decompress_failed");
        // A truncated frame.
        let frame = zstd::bulk::compress(b"[1,2,3]", 3).unwrap();
        let s = seal_raw(&frame[..frame.len() - 2], 1);
        let e =
            open::<u32>(&ring(), &CodecConfig::default(), HERE, &s.headers, &s.body).unwrap_err();
        assert_eq!(e.reason(), "decompress_failed");
        // Empty compressed stream.
        let s = seal_raw(b"", 1);
        let e =
            open::<u32>(&ring(), &CodecConfig::default(), HERE, &s.headers, &s.body).unwrap_err();
        assert_eq!(e.reason(), "decompress_failed");
    }

    #[test]
    fn streamed_frames_without_size_and_multiple_frames_decode() {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, b"[1,").unwrap();
        let mut frames = enc.finish().unwrap();
        frames.extend(zstd::bulk::compress(b"2,3]", 3).unwrap());
        let s = seal_raw(&frames, 3);
        let o = open::<u32>(&ring(), &CodecConfig::default(), HERE, &s.headers, &s.body).unwrap();
        assert_eq!(o.tasks, [1, 2, 3]);
    }

    #[test]
    fn cap_applies_to_streamed_frames() {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let mut spaces = std::io::Read::take(std::io::repeat(b' '), 1 << 20);
        std::io::copy(&mut spaces, &mut enc).unwrap();
        let frame = enc.finish().unwrap();
        assert!(zstd_safe::get_frame_content_size(&frame).unwrap().is_none());
        assert_eq!(
            decompress_capped(&frame, 100_000).unwrap_err(),
            OpenError::TooLarge { cap: 100_000 }
        );
        assert_eq!(decompress_capped(&frame, 1 << 20).unwrap().len(), 1 << 20);
        // Exactly at the cap with a declared size.
        let frame = zstd::bulk::compress(&[b' '; 1000], 3).unwrap();
        assert_eq!(decompress_capped(&frame, 1000).unwrap().len(), 1000);
        assert!(decompress_capped(&frame, 999).is_err());
    }

    #[test]
    fn seal_refuses_bad_input() {
        let cfg = CodecConfig::default();
        let none: [u32; 0] = [];
        assert_eq!(
            seal(&ring(), &cfg, meta(), &none).unwrap_err(),
            SealError::Empty
        );
        let mut m = meta();
        m.queue = "Bad|Queue".into();
        assert!(matches!(
            seal(&ring(), &cfg, m, &[1]).unwrap_err(),
            SealError::InvalidQueue(_)
        ));
    }

    #[test]
    fn config_defaults_from_serde() {
        let c: CodecConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, CodecConfig::default());
        assert!(serde_json::from_str::<CodecConfig>(r#"{"levle":1}"#).is_err());
    }
}
