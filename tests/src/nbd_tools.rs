//! What the workspace's `nbd_*.rs` test targets share: `qcowx-nbd` against real NBD
//! clients, QEMU's (`qemu-io`, `qemu-img` with `nbd+unix://` and `nbd://` URIs) and
//! libnbd's (`nbdinfo`, `nbdcopy`, `nbdsh`). They use it as `qcowx_tests::nbd_tools`.
//!
//! Every test starts its own server process on a temporary Unix socket (or a free TCP
//! port), talks to it with the tools, stops it (SIGTERM, or SIGKILL where the test is
//! about crashes) and waits for it with a time limit, then checks the image with
//! qcowx and with `qemu-img check`. The tools come from Debian packages `qemu-utils`,
//! `libnbd-bin` and `python3-libnbd`; a missing tool fails the test with a message
//! naming its package (scripts/test installs them).
//!
//! The server binary is built on first use with the same cargo profile as this test
//! (`cargo build -p qcowx-nbd`); set `QCOWX_NBD=/path/to/qcowx-nbd` to use another.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use crate::*;
use qcowx_core::{CreateOptions, Image};

// ---- tools ------------------------------------------------------------------------------

/// Python helpers prepended to every nbdsh script.
pub const PY_PRELUDE: &str = r#"
import nbd
def expect_err(name, f, *a, **k):
    try:
        f(*a, **k)
    except nbd.Error as e:
        assert e.errno == name, "%s%r: expected %s, got %s: %s" % (f.__name__, a, name, e.errno, e.string)
        return
    raise AssertionError("%s%r: expected %s, but it succeeded" % (f.__name__, a, name))
"#;

/// Runs an nbdsh script (the handle is `h`, not yet connected); fails the test if
/// the script fails. Returns stdout.
pub fn nbdsh_ok(script: &str) -> String {
    let full = format!("{PY_PRELUDE}\n{script}");
    let out = run(nbdsh().args(["-c", &full]));
    assert!(
        out.status.success(),
        "nbdsh script failed:\n{script}\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---- the server under test ---------------------------------------------------------------

/// The Unix socket path a test's server listens on, inside its temporary folder.
pub fn sock_in(dir: &TempDir) -> PathBuf {
    dir.path().join("nbd.sock")
}

/// A new qcowx image of `size` bytes (64 KiB clusters), closed.
pub fn new_image(path: &Path, size: u64) {
    let img = Image::create(path, &CreateOptions::new(size)).expect("create image");
    img.close().expect("close");
}

/// `qemu-io -f raw URI -c ...`, which must succeed.
pub fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> Output {
    let mut c = qemu_io();
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io {uri}: {}",
        describe(&out)
    );
    out
}

/// The bytes of an export, through nbdcopy.
pub fn export_bytes(server: &QcowxNbd, export: &str, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    run_ok(nbdcopy().arg(server.uri(export)).arg(scratch));
    std::fs::read(scratch).expect("read copy")
}

/// Per-byte runs `(start, end, value)` merged where the value repeats.
pub fn merge_runs<T: PartialEq + Copy>(
    runs: impl IntoIterator<Item = (u64, u64, T)>,
) -> Vec<(u64, u64, T)> {
    let mut out: Vec<(u64, u64, T)> = Vec::new();
    for (s, e, v) in runs {
        if e <= s {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == s && last.2 == v => last.1 = e,
            _ => out.push((s, e, v)),
        }
    }
    out
}

/// `qemu-img map --output=json` entries as (start, length, JSON object).
pub fn map_entries(v: &serde_json::Value) -> Vec<(u64, u64, serde_json::Value)> {
    v.as_array()
        .expect("map JSON is an array")
        .iter()
        .map(|e| {
            let g = |k: &str| {
                e[k].as_u64()
                    .unwrap_or_else(|| panic!("{k} missing in {e}"))
            };
            let (s, l) = if e.get("start").is_some() {
                (g("start"), g("length"))
            } else {
                (g("offset"), g("length"))
            };
            (s, l, e.clone())
        })
        .collect()
}

// ---- images ------------------------------------------------------------------------------

/// An image with a default VDI, a snapshot of it, a forked VDI and its snapshot:
/// `default` (0x01 at 0, later 0x02), `default@s1` (0x01), `web` (forked from s1,
/// then 0x03 at 1M), `web@w1`.
pub fn image_with_vdis(path: &Path) {
    let image = Arc::new(Image::create(path, &CreateOptions::new(4 << 20)).expect("create"));
    image.write_at(&[0x01; 65536], 0).unwrap();
    image.snapshot("default", "s1").unwrap();
    image.write_at(&[0x02; 65536], 0).unwrap();
    image.fork("s1", "web").unwrap();
    let web = image.open_root("web").unwrap();
    web.write_at(&[0x03; 65536], 1 << 20).unwrap();
    image.snapshot("web", "w1").unwrap();
    image.close().unwrap();
}
