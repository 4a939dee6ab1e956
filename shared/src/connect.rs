//! The NATS connection every component opens, from [`ConnectArgs`].

use crate::config::ConnectArgs;
use std::time::Duration;

/// Why connecting failed. The message names the URL and never a password.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {reason}")]
pub struct ConnectError {
    /// The URL(s) tried.
    pub url: String,
    /// What went wrong.
    pub reason: String,
}

/// Connects with the credentials, TLS settings and name given, failing within `timeout` when no
/// server answers (instead of retrying forever), then reconnecting forever once connected.
pub async fn connect(
    args: &ConnectArgs,
    client_name: &str,
    timeout: Duration,
) -> Result<async_nats::Client, ConnectError> {
    let err = |reason: String| ConnectError {
        url: args.nats_url.clone(),
        reason,
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(timeout)
        .retry_on_initial_connect()
        .max_reconnects(None);
    if let Some(path) = &args.creds {
        opts = async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| {
                err(format!(
                    "cannot read credentials file {}: {e}",
                    path.display()
                ))
            })?
            .name(client_name)
            .connection_timeout(timeout)
            .max_reconnects(None);
    }
    if let (Some(user), Some(password)) = (&args.user, &args.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &args.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let urls: Vec<async_nats::ServerAddr> = args
        .nats_url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("bad URL: {e}")))?;
    let client = tokio::time::timeout(timeout, opts.connect(urls))
        .await
        .map_err(|_| {
            err(format!(
                "no answer within {timeout:?}; is nats-server running?"
            ))
        })?
        .map_err(|e| err(e.to_string()))?;
    // `retry_on_initial_connect` returns before the first connection; wait for it.
    let deadline = tokio::time::Instant::now() + timeout;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() >= deadline {
            return Err(err(format!(
                "no answer within {timeout:?}; is nats-server running?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(client)
}
