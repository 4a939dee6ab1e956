//! Turning a handler's output bytes into a task result, and keeping the end of an error stream:
//! shared by the `exec` and `http` handlers.

use drover_shared::outcome::MAX_RESULT_BYTES;
use serde_json::value::RawValue;

/// The result for `bytes`: `null` when they are empty or only whitespace, the JSON value itself
/// when they parse as JSON (surrounding whitespace dropped), otherwise a JSON string holding the
/// bytes verbatim (invalid UTF-8 replaced by U+FFFD).
pub fn to_result(bytes: &[u8]) -> Box<RawValue> {
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return raw("null".to_owned());
    }
    if let Ok(text) = std::str::from_utf8(trimmed)
        && let Ok(value) = serde_json::from_str::<Box<RawValue>>(text)
    {
        return value;
    }
    let text = String::from_utf8_lossy(bytes);
    // Serializing a string cannot fail; fall back to `null` rather than panic regardless.
    serde_json::to_string(&text).map_or_else(|_| raw("null".to_owned()), raw)
}

/// [`to_result`], refused (with the reason) when the result's JSON text is longer than
/// [`MAX_RESULT_BYTES`]: it could not travel in an outcome message. Output that is not JSON
/// grows when escaped as a string (up to six bytes per control byte), so the check is on the
/// JSON, not on the output's length.
pub fn to_bounded_result(bytes: &[u8]) -> Result<Box<RawValue>, String> {
    let result = to_result(bytes);
    let len = result.get().len();
    if len > MAX_RESULT_BYTES {
        return Err(format!(
            "the result is {len} bytes as JSON ({} bytes of output), more than the {MAX_RESULT_BYTES} \
             bytes an outcome can carry; return less (e.g. a reference to where the data is)",
            bytes.len()
        ));
    }
    Ok(result)
}

/// A `RawValue` from text this module made and knows to be valid JSON.
fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).unwrap_or_else(|_| {
        // Unreachable: every caller passes valid JSON. `null` keeps the promise of no panics.
        RawValue::from_string("null".to_owned()).unwrap_or_default()
    })
}

/// Keeps the last `cap` bytes written to it.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    cap: usize,
    buf: Vec<u8>,
    dropped: bool,
}

impl Tail {
    /// An empty tail keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: Vec::new(),
            dropped: false,
        }
    }

    /// Appends `bytes`, forgetting the oldest beyond the cap.
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= self.cap {
            self.dropped |= !self.buf.is_empty() || bytes.len() > self.cap;
            self.buf.clear();
            self.buf
                .extend_from_slice(&bytes[bytes.len().saturating_sub(self.cap)..]);
            return;
        }
        let excess = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        if excess > 0 {
            self.buf.drain(..excess);
            self.dropped = true;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The kept bytes as text for a message: trimmed, with `…` in front when older bytes were
    /// dropped. Empty when nothing (but whitespace) was written.
    pub fn to_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else if self.dropped {
            format!("…{text}")
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_and_empty_output() {
        for (input, want) in [
            (&b"{\"a\": 1}\n"[..], "{\"a\": 1}"),
            (b"  [1,2]  ", "[1,2]"),
            (b"42", "42"),
            (b"\"quoted\"\n", "\"quoted\""),
            (b"hello world\n", "\"hello world\\n\""),
            (b"{not json", "\"{not json\""),
            (b"1 2", "\"1 2\""),
            (b"", "null"),
            (b" \n\t", "null"),
            (b"\xff\xfe ok", "\"\u{fffd}\u{fffd} ok\""),
        ] {
            assert_eq!(to_result(input).get(), want, "input {input:?}");
        }
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        assert_eq!(t.to_text(), "abc");
        t.push(b"def");
        assert_eq!(t.to_text(), "…bcdef");
        t.push(b"0123456789");
        assert_eq!(t.to_text(), "…56789");
        let mut exact = Tail::new(3);
        exact.push(b"xyz");
        assert_eq!(exact.to_text(), "xyz");
        let mut none = Tail::new(0);
        none.push(b"lost");
        assert_eq!(none.to_text(), "");
        assert_eq!(Tail::new(4).to_text(), "");
    }
}
