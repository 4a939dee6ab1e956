//! `drover inspect <seq>`: read one envelope of `<PREFIX>_WORK` by stream sequence, verify and
//! open it with the keyring (SPEC §3), and print its headers and tasks. Key material is never
//! printed; a failure to open is exit 1 with the codec's stable reason.

use super::nats::Ctx;
use super::output::{Format, key_values};
use super::{CliError, Common, Exit, print_json};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use drover_shared::envelope::{CodecConfig, open_message};
use drover_shared::keyring::{KEYS_ENV, Keyring};
use std::path::{Path, PathBuf};

/// Where `drover up` keeps the local fleet's keys.
pub const LOCAL_KEYS_FILE: &str = ".drover/keys";

/// Flags of `drover inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Stream sequence of the envelope in the work stream (`nats stream get DROVER_WORK <seq>`
    /// shows the same message, sealed).
    pub seq: u64,
    /// Key file (DROVER_KEYS format). Default: $DROVER_KEYS, else .drover/keys.
    #[arg(long, env = "DROVER_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
}

/// Where the keys came from, for messages (never the keys themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `--keys-file`.
    File(PathBuf),
    /// `$DROVER_KEYS`.
    Env,
    /// `.drover/keys`, as `drover up` writes it.
    Local(PathBuf),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "--keys-file {}", p.display()),
            Self::Env => write!(f, "${KEYS_ENV}"),
            Self::Local(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The keyring: `--keys-file`, else `$DROVER_KEYS`, else `.drover/keys`; a usage error naming
/// the source when none is there or it does not parse.
pub fn load_keys(
    file: Option<&Path>,
    env: Option<&str>,
    local: &Path,
) -> Result<(Keyring, KeySource), CliError> {
    let (parsed, source) = if let Some(p) = file {
        (Keyring::from_file(p), KeySource::File(p.to_owned()))
    } else if let Some(text) = env.filter(|t| !t.trim().is_empty()) {
        (Keyring::parse(text), KeySource::Env)
    } else if local.is_file() {
        (
            Keyring::from_file(local),
            KeySource::Local(local.to_owned()),
        )
    } else {
        return Err(CliError::usage(format!(
            "no keys to open envelopes with: set {KEYS_ENV}, pass --keys-file, or run in the directory of `drover up` ({LOCAL_KEYS_FILE})"
        )));
    };
    let ring = parsed.map_err(|e| CliError::usage(format!("bad keys in {source}: {e}")))?;
    Ok((ring, source))
}

/// `drover inspect`.
pub async fn run(args: InspectArgs) -> Result<Exit, CliError> {
    let env = std::env::var(KEYS_ENV).ok();
    let (ring, source) = load_keys(
        args.keys_file.as_deref(),
        env.as_deref(),
        Path::new(LOCAL_KEYS_FILE),
    )?;
    let ctx = Ctx::connect(&args.common).await?;
    let stream = ctx.stream(&ctx.names.work_stream()).await?;
    let m = stream.get_raw_message(args.seq).await.map_err(|e| {
        if e.kind() == LastRawMessageErrorKind::NoMessageFound {
            CliError::failed(format!(
                "no message {} in {}: acked envelopes leave the work-queue stream (`nats stream info {}` shows the range)",
                args.seq,
                ctx.names.work_stream(),
                ctx.names.work_stream()
            ))
        } else {
            CliError::nats(
                &format!("cannot read message {} of {}", args.seq, ctx.names.work_stream()),
                e,
            )
        }
    })?;
    let subject = m.subject.to_string();
    let headers = super::dlq::header_map(Some(&m.headers));
    let opened = open_message::<serde_json::Value>(
        &ring,
        &CodecConfig::default(),
        &ctx.names,
        &subject,
        |name| m.headers.get(name).map(|v| v.as_str()),
        &m.payload,
    );
    let (h, opened) = match opened {
        Ok(o) => o,
        Err(e) => {
            let hint = if e.is_unknown_kid() {
                "; the envelope was sealed with a key id this keyring does not have"
            } else if e.reason() == "bad_signature" {
                "; wrong keys (same key id, different secret) or a tampered message"
            } else {
                ""
            };
            return Err(CliError::failed(format!(
                "cannot open envelope {} with the keys from {source}: {} ({e}){hint}",
                args.seq,
                e.reason()
            )));
        }
    };
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "seq": m.sequence,
            "subject": subject,
            "headers": headers,
            "batch": h.batch_id(),
            "queue": h.queue,
            "partition": h.partition,
            "epoch": h.epoch,
            "kid": h.kid,
            "count": h.count,
            "sizes": {
                "body": opened.stats.body_bytes,
                "compressed": opened.stats.compressed_bytes,
                "plaintext": opened.stats.plaintext_bytes,
            },
            "tasks": opened.tasks,
        })),
        Format::Table => {
            let ts = i64::try_from(h.ts_ms)
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| super::output::time_with_age(t, chrono::Utc::now()))
                .unwrap_or_else(|| h.ts_ms.to_string());
            print!(
                "{}",
                key_values(&[
                    ("seq", m.sequence.to_string()),
                    ("subject", subject.clone()),
                    ("batch", h.batch_id()),
                    ("queue", h.queue.clone()),
                    ("partition", h.partition.to_string()),
                    ("epoch", h.epoch.to_string()),
                    ("sealed", ts),
                    ("kid", h.kid.clone()),
                    ("count", h.count.to_string()),
                    (
                        "sizes",
                        format!(
                            "{} B body, {} B zstd, {} B JSON",
                            opened.stats.body_bytes,
                            opened.stats.compressed_bytes,
                            opened.stats.plaintext_bytes
                        )
                    ),
                ])
            );
            println!("headers");
            for (k, vs) in &headers {
                for v in vs {
                    println!("  {k}: {v}");
                }
            }
            println!("tasks");
            for t in &opened.tasks {
                println!("  {}", serde_json::to_string(t).unwrap_or_default());
            }
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        let ring = Keyring::generate("f1").unwrap();
        std::fs::write(&file, ring.to_env_string()).unwrap();
        let env = Keyring::generate("e1").unwrap().to_env_string();
        let missing = dir.path().join("none");

        let (r, s) = load_keys(Some(&file), Some(&env), &missing).unwrap();
        assert_eq!(
            (r.signing_key().kid(), s),
            ("f1", KeySource::File(file.clone()))
        );
        let (r, s) = load_keys(None, Some(&env), &file).unwrap();
        assert_eq!((r.signing_key().kid(), s), ("e1", KeySource::Env));
        let (r, s) = load_keys(None, Some("  "), &file).unwrap();
        assert_eq!(
            (r.signing_key().kid(), s),
            ("f1", KeySource::Local(file.clone()))
        );
        let e = load_keys(None, None, &missing).unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        let e = load_keys(None, Some("k1:notbase64"), &missing).unwrap_err();
        assert!(
            e.message.starts_with("bad keys in $DROVER_KEYS"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("notbase64"), "{}", e.message);
    }
}
