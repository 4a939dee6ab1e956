//! What every long-running Drover binary does around its library's `run`: tracing to stderr in
//! text or JSON, a multi-threaded runtime, and the two-signal shutdown (the first SIGTERM/SIGINT
//! starts a graceful drain, a second exits at once).

use crate::config::{ComponentArgs, LogFormat};
use crate::settings::{self, FlagOverrides, Settings};
use clap::{CommandFactory, FromArgMatches};
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit status of a second signal: the process did not finish draining.
pub const EXIT_INTERRUPTED: i32 = 130;

/// How every Drover binary starts: parses its command line `A`, loads the layered settings
/// (defaults < TOML < `DROVER_*` < flags), prints them with secrets masked and stops for
/// `--print-config`, starts logging and warns about unknown `DROVER_*` variables.
/// `component` picks the [`ComponentArgs`] out of `A`.
///
/// # Errors
/// The exit code to return: 0 after `--print-config`, 2 for a configuration that does not load
/// (the message is on stderr).
pub fn start<A: CommandFactory + FromArgMatches>(
    component: impl Fn(&A) -> &ComponentArgs,
) -> Result<(A, Settings), ExitCode> {
    let matches = A::command().get_matches();
    let args = A::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let flags = FlagOverrides::from_arg_matches(&matches);
    let component = component(&args);
    let settings = match settings::load_from_process(component.config.as_deref(), &flags) {
        Ok(s) => s.resolved(),
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(2));
        }
    };
    if component.print_config {
        print!("{}", settings::print_config(&settings));
        return Err(ExitCode::SUCCESS);
    }
    init_tracing(settings.log.format, &settings.log.level);
    for var in settings::unrecognized_env(std::env::vars()) {
        tracing::warn!(variable = %var, "unknown DROVER_ variable ignored (a typo?)");
    }
    Ok((args, settings))
}

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

/// A future that completes at the first SIGTERM or SIGINT (never, when the handlers cannot be
/// installed): for foreground commands that stop what they started, such as `drover up`. The
/// handlers are installed by this call, not when the future is first polled, so a signal sent
/// right after the caller announced itself is not left to the default action (which kills).
/// Call it within a Tokio runtime.
pub fn stop_requested() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    }
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
