//! The keyring: key ids and 32-byte secrets that seal envelopes (SPEC §3, §8).
//!
//! A [`Keyring`] is an ordered, non-empty list of `(kid, secret)`. The **first** key signs and
//! encrypts; **every** key is accepted when verifying, so a rotation is: add the new key at the
//! front everywhere, wait until no envelope sealed with the old key is left, then drop the old key.
//!
//! Keys come from `DROVER_KEYS` (`kid:base64,kid2:base64`) or a file in the same format (one item
//! per line or comma separated, `#` starts a comment). Secrets are never printed: `Debug`,
//! `Display` and every error name the key by its kid and position only, and secrets are wiped
//! from memory when the keyring is dropped.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use hkdf::Hkdf;
use rand::TryRng as _;
use sha2::Sha256;

/// Length of a secret, in bytes.
pub const KEY_LEN: usize = 32;
/// Longest accepted key id.
pub const MAX_KID_LEN: usize = 32;
/// HKDF `info` of the per-key MAC key (`salt` is empty).
pub const MAC_INFO: &[u8] = b"drover/mac/v1";
/// The environment variable that holds the keyring.
pub const KEYS_ENV: &str = "DROVER_KEYS";

/// `true` if `kid` matches the key id pattern `[A-Za-z0-9_-]{1,32}`.
pub fn is_valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where an item of a key list sits: its line (1-based) and its number among all items (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemPos {
    /// Line of the item (always 1 for a one-line `DROVER_KEYS` value).
    pub line: usize,
    /// Number of the item among all non-empty items, counting from 1.
    pub item: usize,
}

impl fmt::Display for ItemPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item {} (line {})", self.item, self.line)
    }
}

/// Why a keyring could not be built. Messages name the item and its kid, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// No key at all.
    #[error("the keyring is empty: give at least one `kid:base64` item (32-byte secret)")]
    Empty,
    /// An item without the `:` between kid and secret.
    #[error("key {at}: expected `kid:base64`, found no ':'")]
    MissingSeparator {
        /// Position of the item.
        at: ItemPos,
    },
    /// The kid does not match `[A-Za-z0-9_-]{1,32}`. The text is not echoed: a kid and a secret
    /// given in the wrong order would otherwise print the secret.
    #[error(
        "key {at}: invalid key id ({len} characters): use 1-32 characters from A-Z, a-z, 0-9, '_' and '-'"
    )]
    InvalidKid {
        /// Position of the item (`line`/`item` 0 when the kid was given programmatically).
        at: ItemPos,
        /// Length of the rejected kid.
        len: usize,
    },
    /// Two items with the same kid.
    #[error("key {at} ({kid}): duplicate key id")]
    DuplicateKid {
        /// Position of the second occurrence.
        at: ItemPos,
        /// The repeated kid.
        kid: String,
    },
    /// The secret is not standard base64.
    #[error("key {at} ({kid}): the secret is not valid standard base64")]
    BadBase64 {
        /// Position of the item.
        at: ItemPos,
        /// Its kid.
        kid: String,
    },
    /// The secret decodes to the wrong number of bytes.
    #[error("key {at} ({kid}): the secret decodes to {len} bytes, expected 32")]
    WrongLength {
        /// Position of the item.
        at: ItemPos,
        /// Its kid.
        kid: String,
        /// Decoded length.
        len: usize,
    },
    /// The key file could not be read.
    #[error("cannot read key file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The OS random source failed (key generation).
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// 32 secret bytes, wiped when dropped, never printed.
#[derive(Clone)]
pub(crate) struct Secret([u8; KEY_LEN]);

impl Secret {
    pub(crate) fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Overwrites `bytes` with zeros in a way the optimiser cannot drop as a dead store.
pub(crate) fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

/// One key of a ring: its kid, its secret and the MAC key derived from it.
#[derive(Clone)]
pub struct Key {
    kid: String,
    secret: Secret,
    mac_key: Secret,
}

impl Key {
    /// A key from its kid and secret; derives the MAC key
    /// (`HKDF-SHA256(ikm = secret, salt = "", info = "drover/mac/v1")`).
    pub fn new(kid: impl Into<String>, secret: [u8; KEY_LEN]) -> Result<Self, KeyringError> {
        let kid = kid.into();
        if !is_valid_kid(&kid) {
            return Err(KeyringError::InvalidKid {
                at: ItemPos { line: 0, item: 0 },
                len: kid.len(),
            });
        }
        Ok(Self::derive(kid, Secret::new(secret)))
    }

    fn derive(kid: String, secret: Secret) -> Self {
        let mut mac = [0u8; KEY_LEN];
        // 32 bytes is far below HKDF's 255·32 limit: expand cannot fail.
        let _ = Hkdf::<Sha256>::new(Some(&[]), secret.bytes()).expand(MAC_INFO, &mut mac);
        let mac_key = Secret::new(mac);
        wipe(&mut mac);
        Self {
            kid,
            secret,
            mac_key,
        }
    }

    /// A key with a fresh secret from the OS random source.
    pub fn generate(kid: impl Into<String>) -> Result<Self, KeyringError> {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::SysRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| KeyringError::Random(e.to_string()))?;
        let key = Self::new(kid, bytes);
        wipe(&mut bytes);
        key
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        self.secret.bytes()
    }

    pub(crate) fn mac_key(&self) -> &[u8; KEY_LEN] {
        self.mac_key.bytes()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// An ordered, non-empty list of keys: the first signs and encrypts, all verify.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// A ring from keys in order (the first signs). Fails on an empty list or a repeated kid.
    pub fn from_keys(keys: impl IntoIterator<Item = Key>) -> Result<Self, KeyringError> {
        let mut ring: Vec<Key> = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            if ring.iter().any(|k| k.kid == key.kid) {
                return Err(KeyringError::DuplicateKid {
                    at: ItemPos {
                        line: 0,
                        item: i + 1,
                    },
                    kid: key.kid.clone(),
                });
            }
            ring.push(key);
        }
        if ring.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Self { keys: ring })
    }

    /// A ring from `(kid, secret)` pairs in order (the first signs).
    pub fn new<K: Into<String>>(
        pairs: impl IntoIterator<Item = (K, [u8; KEY_LEN])>,
    ) -> Result<Self, KeyringError> {
        let keys = pairs
            .into_iter()
            .enumerate()
            .map(|(i, (kid, secret))| {
                Key::new(kid, secret).map_err(|e| match e {
                    KeyringError::InvalidKid { len, .. } => KeyringError::InvalidKid {
                        at: ItemPos {
                            line: 0,
                            item: i + 1,
                        },
                        len,
                    },
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_keys(keys)
    }

    /// Parses the `DROVER_KEYS` form `kid:base64,kid2:base64`.
    ///
    /// Secrets are standard base64 of exactly 32 bytes, with or without padding. Items may be
    /// separated by commas or newlines, whitespace around items is ignored, and `#` starts a
    /// comment that runs to the end of its line.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let mut keys: Vec<Key> = Vec::new();
        let mut item = 0;
        for (line_no, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            for raw in line.split(',') {
                let raw = raw.trim();
                if raw.is_empty() {
                    continue;
                }
                item += 1;
                let at = ItemPos {
                    line: line_no + 1,
                    item,
                };
                let key = parse_item(raw, at)?;
                if keys.iter().any(|k| k.kid == key.kid) {
                    return Err(KeyringError::DuplicateKid {
                        at,
                        kid: key.kid.clone(),
                    });
                }
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Self { keys })
    }

    /// Reads a key file: the `DROVER_KEYS` format, one item per line or comma separated, with
    /// `#` comments.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyringError> {
        let path = path.as_ref();
        let mut text = std::fs::read_to_string(path).map_err(|e| KeyringError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let ring = Self::parse(&text);
        // The text holds every secret in base64; don't leave it in freed memory.
        wipe_string(&mut text);
        ring
    }

    /// A ring of one fresh key with kid `kid` (for `drover keys gen`).
    pub fn generate(kid: &str) -> Result<Self, KeyringError> {
        Self::from_keys([Key::generate(kid)?])
    }

    /// The ring in `DROVER_KEYS` form (`kid:base64,...`, padded standard base64).
    ///
    /// The result contains every secret: hand it only to a secret store, never to a log.
    pub fn to_env_string(&self) -> String {
        let mut out = String::new();
        for (i, key) in self.keys.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&key.kid);
            out.push(':');
            STANDARD.encode_string(key.secret(), &mut out);
        }
        out
    }

    /// The key that signs and encrypts (the first one).
    pub fn signing_key(&self) -> &Key {
        // Non-empty by construction.
        &self.keys[0]
    }

    /// The key with id `kid`, if the ring holds it.
    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// All keys, the signing key first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// All kids, the signing kid first.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// Number of keys (at least 1).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always `false`: a keyring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl std::str::FromStr for Keyring {
    type Err = KeyringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Display for Keyring {
    /// `k2 (signing), k1`: kids only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kid) in self.kids().enumerate() {
            if i == 0 {
                write!(f, "{kid} (signing)")?;
            } else {
                write!(f, ", {kid}")?;
            }
        }
        Ok(())
    }
}

fn parse_item(raw: &str, at: ItemPos) -> Result<Key, KeyringError> {
    let (kid, b64) = raw
        .split_once(':')
        .ok_or(KeyringError::MissingSeparator { at })?;
    let (kid, b64) = (kid.trim(), b64.trim());
    if !is_valid_kid(kid) {
        return Err(KeyringError::InvalidKid { at, len: kid.len() });
    }
    let mut decoded =
        STANDARD_PAD_INDIFFERENT
            .decode(b64)
            .map_err(|_| KeyringError::BadBase64 {
                at,
                kid: kid.to_owned(),
            })?;
    if decoded.len() != KEY_LEN {
        let len = decoded.len();
        wipe(&mut decoded);
        return Err(KeyringError::WrongLength {
            at,
            kid: kid.to_owned(),
            len,
        });
    }
    let mut secret = [0u8; KEY_LEN];
    secret.copy_from_slice(&decoded);
    wipe(&mut decoded);
    let key = Key::derive(kid.to_owned(), Secret::new(secret));
    wipe(&mut secret);
    Ok(key)
}

/// Zeroes a string's bytes (they stay valid UTF-8: all NUL).
fn wipe_string(s: &mut String) {
    let mut bytes = std::mem::take(s).into_bytes();
    wipe(&mut bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // bytes 0..32

    #[test]
    fn parses_one_key_with_and_without_padding() {
        let ring = Keyring::parse(&format!("k1:{B64_A}")).unwrap();
        assert_eq!(ring.kids().collect::<Vec<_>>(), ["k1"]);
        let expect: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(ring.signing_key().secret(), &expect);
        let unpadded = B64_A.trim_end_matches('=');
        let ring2 = Keyring::parse(&format!("  k1 : {unpadded} ,")).unwrap();
        assert_eq!(ring2.signing_key().secret(), &expect);
        assert_eq!(ring.signing_key().mac_key(), ring2.signing_key().mac_key());
        assert_ne!(ring.signing_key().mac_key(), ring.signing_key().secret());
    }

    #[test]
    fn mac_key_is_hkdf_of_the_secret() {
        let ring = Keyring::parse(&format!("k1:{B64_A}")).unwrap();
        let mut expect = [0u8; 32];
        Hkdf::<Sha256>::new(None, ring.signing_key().secret())
            .expand(b"drover/mac/v1", &mut expect)
            .unwrap();
        assert_eq!(ring.signing_key().mac_key(), &expect);
    }

    #[test]
    fn env_string_round_trips() {
        let ring = Keyring::new([("new", [7u8; 32]), ("old", [9u8; 32])]).unwrap();
        let text = ring.to_env_string();
        let back: Keyring = text.parse().unwrap();
        assert_eq!(back.kids().collect::<Vec<_>>(), ["new", "old"]);
        assert_eq!(back.get("old").unwrap().secret(), &[9u8; 32]);
        assert_eq!(back.to_env_string(), text);
    }

    #[test]
    fn kid_pattern() {
        assert!(is_valid_kid("a"));
        assert!(is_valid_kid("K_2024-01"));
        assert!(is_valid_kid(&"x".repeat(32)));
        assert!(!is_valid_kid(""));
        assert!(!is_valid_kid(&"x".repeat(33)));
        assert!(!is_valid_kid("a b"));
        assert!(!is_valid_kid("a|b"));
        assert!(!is_valid_kid("é"));
    }

    #[test]
    fn wipe_zeroes() {
        let mut b = [1u8; 8];
        wipe(&mut b);
        assert_eq!(b, [0u8; 8]);
    }
}
