//! Finding the `nats-server` binary the tests run: the project-local install of `nats/install.sh`,
//! or the one `DROVER_NATS_SERVER` names. A missing binary is a loud failure naming the command
//! that installs it, never a silently skipped test.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable that overrides which `nats-server` binary the tests run.
pub const NATS_SERVER_ENV: &str = "DROVER_NATS_SERVER";

/// The workspace root: the directory holding the workspace `Cargo.toml` and `nats/`.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The default `nats-server`: `$DROVER_NATS_SERVER` if set, else `<workspace>/nats/bin/nats-server`
/// (the pinned version `nats/install.sh` installs).
///
/// # Panics
/// If the binary does not exist, with a message naming `bash nats/install.sh`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = env::var_os(NATS_SERVER_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{NATS_SERVER_ENV} is set to {}, which is not a file; point it at a nats-server binary \
             or unset it to use the project's pinned server (installed by `bash nats/install.sh`)",
            path.display()
        );
        return path;
    }
    let path = workspace_root().join("nats/bin/nats-server");
    assert!(
        path.is_file(),
        "nats-server not found at {}.\nInstall the pinned server with `bash nats/install.sh` \
         (run from the workspace root, {}), or set {NATS_SERVER_ENV} to a nats-server binary.",
        path.display(),
        workspace_root().display()
    );
    path
}

/// The binary of one specific server version, `<workspace>/nats/bin/<version>/nats-server`
/// (`DROVER_NATS_SERVER` does not apply).
///
/// # Panics
/// If that version is not installed, with a message naming `bash nats/install.sh <version>`.
pub fn nats_server_binary_version(version: &str) -> PathBuf {
    let version = version.trim_start_matches('v');
    let path = workspace_root()
        .join("nats/bin")
        .join(version)
        .join("nats-server");
    assert!(
        path.is_file(),
        "nats-server {version} not found at {}.\nInstall it with `bash nats/install.sh {version}` \
         (run from the workspace root, {}).",
        path.display(),
        workspace_root().display()
    );
    path
}

/// The version `binary --version` reports, without the leading `v` (e.g. `2.15.1`).
///
/// # Panics
/// If the binary does not run or prints something that is not a version.
pub fn binary_version(binary: &Path) -> String {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("could not run {} --version: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    // "nats-server: v2.15.1"
    let version = stdout
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim_start_matches('v');
    assert!(
        output.status.success() && version.starts_with(|c: char| c.is_ascii_digit()),
        "{} --version did not report a version (exit {}, stdout {stdout:?}, stderr {:?})",
        binary.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    version.to_owned()
}
