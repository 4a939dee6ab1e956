//! The NATS shell every command shares: connecting, one request-reply call to the dispatcher
//! API, and scanning the latest values of a KV bucket or the messages of a stream with an
//! ordered consumer (one pass, no polling).

use super::{CliError, Common, output::Format};
use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::push, kv, stream};
use chrono::{DateTime, Utc};
use drover_shared::error::ErrorReply;
use drover_shared::names::Names;
use futures::StreamExt;
use std::time::Duration;

/// How long connecting may take before the command gives up with exit 3.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one API request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest scan of a bucket or stream.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected command.
#[derive(Clone)]
pub struct Ctx {
    /// The connection.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
    /// Names under `--prefix`.
    pub names: Names,
    /// `--output`.
    pub format: Format,
}

/// The names under `--prefix`, or a usage error.
pub fn names(common: &Common) -> Result<Names, CliError> {
    common
        .connect
        .names()
        .map_err(|e| CliError::usage(e.to_string()))
}

impl Ctx {
    /// Connects, failing with exit 3 when no server answers within [`CONNECT_TIMEOUT`].
    pub async fn connect(common: &Common) -> Result<Self, CliError> {
        let names = names(common)?;
        let client =
            drover_shared::connect::connect(&common.connect, "drover-cli", CONNECT_TIMEOUT)
                .await
                .map_err(|e| CliError::unreachable(e.to_string()))?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            names,
            format: common.output,
        })
    }

    /// One request to `<prefix>.api.<endpoint>` with a JSON body; the JSON success reply, or
    /// the error reply as a [`CliError`]. No dispatcher answering is exit 3.
    pub async fn api(
        &self,
        endpoint: &str,
        body: Vec<u8>,
        headers: HeaderMap,
    ) -> Result<serde_json::Value, ApiCallError> {
        let subject = self.names.api(endpoint);
        let reply = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.client
                .request_with_headers(subject.clone(), headers, body.into()),
        )
        .await
        .map_err(|_| ApiCallError::Timeout(subject.clone()))?
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => ApiCallError::NoResponders(subject.clone()),
            RequestErrorKind::TimedOut => ApiCallError::Timeout(subject.clone()),
            RequestErrorKind::MaxPayloadExceeded => ApiCallError::Other(CliError::usage(format!(
                "the request is larger than the server's max_payload: {e}"
            ))),
            _ => ApiCallError::Other(CliError::nats(&format!("request on {subject}"), e)),
        })?;
        let value: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| {
            ApiCallError::Other(CliError::failed(format!(
                "the reply on {subject} is not JSON: {e}"
            )))
        })?;
        if value.get("error").is_some() {
            let err: ErrorReply = serde_json::from_value(value).map_err(|e| {
                ApiCallError::Other(CliError::failed(format!(
                    "the error reply on {subject} is malformed: {e}"
                )))
            })?;
            return Err(ApiCallError::Api(err.error));
        }
        Ok(value)
    }

    /// A KV bucket `<prefix>-<suffix>`.
    pub async fn bucket(&self, suffix: &str) -> Result<kv::Store, CliError> {
        let name = self.names.bucket(suffix);
        self.js.get_key_value(&name).await.map_err(|e| {
            CliError::nats(
                &format!("cannot open bucket {name} (is the topology provisioned? `drover init`)"),
                e,
            )
        })
    }

    /// A stream by name.
    pub async fn stream(&self, name: &str) -> Result<stream::Stream, CliError> {
        self.js.get_stream(name).await.map_err(|e| {
            CliError::nats(
                &format!("cannot open stream {name} (is the topology provisioned? `drover init`)"),
                e,
            )
        })
    }

    /// The latest live value of every key of bucket `<prefix>-<suffix>` under `key_filter`
    /// (`>` for all), in stream order; deleted and purged keys are left out.
    pub async fn latest(&self, suffix: &str, key_filter: &str) -> Result<Vec<KvValue>, CliError> {
        let bucket = self.names.bucket(suffix);
        let stream = self.stream(&format!("KV_{bucket}")).await?;
        let prefix = format!("$KV.{bucket}.");
        let msgs = scan(
            &self.client,
            &stream,
            &[format!("{prefix}{key_filter}")],
            DeliverPolicy::LastPerSubject,
            false,
        )
        .await?;
        Ok(msgs
            .into_iter()
            .filter(|m| {
                !m.headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
            })
            .filter_map(|m| {
                Some(KvValue {
                    key: m.subject.strip_prefix(&prefix)?.to_owned(),
                    value: m.payload,
                    created: m.time,
                })
            })
            .collect())
    }
}

/// Why an API call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiCallError {
    /// Nobody subscribes to the subject: no dispatcher runs.
    #[error("no dispatcher answers on {0}; is drover-dispatcher running (and --prefix right)?")]
    NoResponders(String),
    /// No reply in time.
    #[error(
        "no reply on {0} within {REQUEST_TIMEOUT:?}; the dispatchers may be overloaded or cut off"
    )]
    Timeout(String),
    /// The dispatcher answered with an error.
    #[error("{0}")]
    Api(drover_shared::error::ApiError),
    /// Something else.
    #[error("{0}")]
    Other(CliError),
}

impl From<ApiCallError> for CliError {
    fn from(e: ApiCallError) -> Self {
        match e {
            ApiCallError::NoResponders(_) | ApiCallError::Timeout(_) => {
                CliError::unreachable(e.to_string())
            }
            ApiCallError::Api(a) => CliError::from_api(&a),
            ApiCallError::Other(c) => c,
        }
    }
}

/// One latest value of a KV key.
#[derive(Debug, Clone)]
pub struct KvValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: bytes::Bytes,
    /// When it was written (server time).
    pub created: DateTime<Utc>,
}

/// One message of a scan.
#[derive(Debug, Clone)]
pub struct Scanned {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// Headers (without the JetStream status headers of a headers-only delivery).
    pub headers: Option<HeaderMap>,
    /// Body (empty for a headers-only scan).
    pub payload: bytes::Bytes,
    /// Store time.
    pub time: DateTime<Utc>,
}

/// Converts the server's timestamp to chrono.
pub fn to_chrono(t: impl Into<i128>) -> DateTime<Utc> {
    let nanos: i128 = t.into();
    DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

/// Every message of `stream` on `filters` (none = all) that `policy` selects, delivered once by
/// an ordered push consumer and read until the consumer reports nothing pending; at most
/// [`SCAN_TIMEOUT`].
pub async fn scan(
    client: &async_nats::Client,
    stream: &stream::Stream,
    filters: &[String],
    policy: DeliverPolicy,
    headers_only: bool,
) -> Result<Vec<Scanned>, CliError> {
    let name = stream.cached_info().config.name.clone();
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: match filters {
                [one] => one.clone(),
                _ => String::new(),
            },
            filter_subjects: if filters.len() > 1 {
                filters.to_vec()
            } else {
                Vec::new()
            },
            deliver_policy: policy,
            headers_only,
            ..Default::default()
        })
        .await
        .map_err(|e| CliError::nats(&format!("cannot read {name}"), e))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(Vec::new());
    }
    let read = async {
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| CliError::nats(&format!("cannot read {name}"), e))?;
        let mut out = Vec::new();
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| CliError::nats(&format!("reading {name}"), e))?;
            let info = m
                .info()
                .map_err(|e| CliError::failed(format!("reading {name}: {e}")))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let time = to_chrono(info.published.unix_timestamp_nanos());
            out.push(Scanned {
                seq,
                subject: m.subject.to_string(),
                headers: m.headers.clone(),
                payload: if headers_only {
                    bytes::Bytes::new()
                } else {
                    m.payload.clone()
                },
                time,
            });
            if pending == 0 {
                break;
            }
        }
        Ok::<_, CliError>(out)
    };
    tokio::time::timeout(SCAN_TIMEOUT, read)
        .await
        .map_err(|_| {
            CliError::unreachable(format!("reading {name} took longer than {SCAN_TIMEOUT:?}"))
        })?
}
