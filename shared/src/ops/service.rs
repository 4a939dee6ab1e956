//! What every long-running Drover binary does around its library's `run`: tracing to stderr in
//! text or JSON, a multi-threaded runtime, and the two-signal shutdown (the first SIGTERM/SIGINT
//! starts a graceful drain, a second exits at once).

use crate::config::LogFormat;
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit status of a second signal: the process did not finish draining.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Logs to stderr with `level` (an `EnvFilter` directive; `info` if it does not parse) in
/// `format`.
pub fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

/// Runs `service(shutdown)` on a new multi-threaded runtime until it returns. The first
/// SIGTERM or SIGINT cancels `shutdown` (the service drains); a second exits the process at
/// once with [`EXIT_INTERRUPTED`]. An error is printed as one line and exits 1.
pub fn run_service<F, Fut, E>(service: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        match service(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// First SIGTERM/SIGINT: cancel `shutdown`. Second: exit at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(EXIT_INTERRUPTED);
}
