//! A tiny HTTP/1.0 GET client for the nats-server monitoring endpoints (`/healthz`, `/varz`,
//! `/jsz`). HTTP/1.0 makes the server close the connection after the response, so the whole
//! response is simply everything read until EOF; no chunked encoding, no keep-alive.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Responses larger than this are cut off (the monitoring endpoints answer far less).
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// One HTTP response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The body, lossily decoded as UTF-8.
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_str(&self.body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("body is not JSON ({e}): {}", self.body),
            )
        })
    }
}

/// `GET path` from `addr`, the whole exchange bounded by `timeout`.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    tokio::time::timeout(timeout, get(addr, path))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("GET http://{addr}{path} took longer than {timeout:?}"),
            )
        })?
}

async fn get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .await?;
    parse_response(&raw)
}

/// Splits a raw HTTP/1.x response into status and body.
fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{why}: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    };
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("HTTP response without end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(invalid("malformed HTTP status line"));
    };
    if !version.starts_with("HTTP/") {
        return Err(invalid("not an HTTP response"));
    }
    let status = code
        .parse()
        .map_err(|_| invalid("non-numeric HTTP status"))?;
    let body = String::from_utf8_lossy(&raw[head_end + 4..]).into_owned();
    Ok(HttpResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let raw = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{\"status\":\"unavailable\"}";
        let resp = parse_response(raw).unwrap();
        assert_eq!(resp.status, 503);
        assert_eq!(resp.json().unwrap()["status"], "unavailable");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_response(b"hello").is_err());
        assert!(parse_response(b"SSH-2.0 x\r\n\r\n").is_err());
    }
}
