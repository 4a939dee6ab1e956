//! [`Secret`]: a configuration string that never shows itself.
//!
//! `Debug`, `Display` and `Serialize` all print [`MASK`], so a secret cannot leak through a log
//! line, `--print-config` or a derived `Debug` of the structure holding it. Deserializing accepts
//! only a string and, when given anything else, says what it found without echoing the value.
//! The only way to the text is [`Secret::expose`].

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// What every secret prints as.
pub const MASK: &str = "***";

/// A secret string (a password, an inline keyring, an HTTP header value). Its memory is
/// overwritten with zeros when it is dropped (best effort: copies made while parsing are not).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret text. Hand it only to what needs it (a NATS connect, a key parser), never to a
    /// log or an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `true` when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        crate::keyring::wipe(&mut bytes);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{MASK:?}")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(MASK)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_string(SecretVisitor)
    }
}

/// Accepts a string; for anything else names the kind found, never the value (serde's default
/// `invalid type` message would print it).
struct SecretVisitor;

fn not_a_string<E: de::Error>(found: &str) -> E {
    E::custom(format_args!(
        "invalid type: {found}, expected a string (the value is secret and not shown)"
    ))
}

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }

    fn visit_char<E: de::Error>(self, v: char) -> Result<Secret, E> {
        Ok(Secret(v.to_string()))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(not_a_string("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(not_a_string("an integer"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(not_a_string("an integer"))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Secret, E> {
        Err(not_a_string("an integer"))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Secret, E> {
        Err(not_a_string("an integer"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(not_a_string("a float"))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
        Err(not_a_string("bytes"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Secret, E> {
        Err(not_a_string("nothing"))
    }

    fn visit_none<E: de::Error>(self) -> Result<Secret, E> {
        Err(not_a_string("nothing"))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Secret, D::Error> {
        deserializer.deserialize_string(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Secret, D::Error> {
        deserializer.deserialize_string(self)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(not_a_string("an array"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(not_a_string("a table or date-time"))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(not_a_string("an enum"))
    }
}
