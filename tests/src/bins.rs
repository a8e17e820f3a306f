//! The workspace's binaries, built with cargo once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::{describe, run_timeout};

/// Builds binary `bin` of workspace package `package` with the cargo profile of the
/// running test binary (`cargo build -p PACKAGE --bin BIN`) and returns its path.
fn build_workspace_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile dir>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(p) => {
            cmd.args(["--profile", p]);
        }
    }
    let out = run_timeout(&mut cmd, Duration::from_secs(1200));
    assert!(
        out.status.success(),
        "building {bin} failed: {}",
        describe(&out)
    );
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The `qcowx-nbd` binary: `$QCOWX_NBD` when set, else the binary cargo built for the
/// running test (`$CARGO_BIN_EXE_qcowx-nbd`, set in the tests of `qcowx-nbd`), else
/// built with this test's cargo profile on first use.
pub fn qcowx_nbd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        match std::env::var_os("QCOWX_NBD").or_else(|| std::env::var_os("CARGO_BIN_EXE_qcowx-nbd"))
        {
            Some(p) => PathBuf::from(p),
            None => build_workspace_bin("qcowx-nbd", "qcowx-nbd"),
        }
    })
}

/// The `qcowx` command-line binary: `$QCOWX_CLI` when set, else the binary cargo built
/// for the running test (`$CARGO_BIN_EXE_qcowx`, set in the tests of `qcowx-cli`),
/// else built with this test's cargo profile on first use.
pub fn qcowx_cli_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        match std::env::var_os("QCOWX_CLI").or_else(|| std::env::var_os("CARGO_BIN_EXE_qcowx")) {
            Some(p) => PathBuf::from(p),
            None => build_workspace_bin("qcowx-cli", "qcowx"),
        }
    })
}
