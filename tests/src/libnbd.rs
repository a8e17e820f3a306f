//! libnbd from Python.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use std::ffi::OsString;

use crate::{describe, require_command, run};

/// A `python3` command whose interpreter has libnbd's `nbd` module.
///
/// Debian's `python3-libnbd` installs the module for `/usr/bin/python3`, so that
/// interpreter is used when it exists (a pyenv or venv `python3` earlier in `PATH`
/// would not have the module). Panics with "install python3-libnbd" when `import nbd`
/// fails: tests that need libnbd fail, they never skip.
pub fn python3_libnbd() -> Command {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    let py = PYTHON.get_or_init(|| {
        let py = if Path::new("/usr/bin/python3").exists() {
            PathBuf::from("/usr/bin/python3")
        } else {
            PathBuf::from("python3")
        };
        let ok = Command::new(&py)
            .args(["-c", "import nbd"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            panic!(
                "{}: the Python module nbd is missing: install python3-libnbd (scripts/test does)",
                py.display()
            );
        }
        py
    });
    Command::new(py)
}

/// Python (libnbd) that reads byte ranges of NBD exports into files: argv[1] is a JSON
/// list of `[uri, [[offset, length], ...]]`, argv[2] the output directory; export `i`'s
/// ranges go, concatenated, to `read-i.bin`.
const LIBNBD_READ_PY: &str = r#"
import json, sys, nbd
spec = json.load(open(sys.argv[1]))
for i, (uri, ranges) in enumerate(spec):
    h = nbd.NBD()
    h.connect_uri(uri)
    with open("%s/read-%d.bin" % (sys.argv[2], i), "wb") as f:
        for off, ln in ranges:
            while ln > 0:
                n = min(ln, 4 << 20)
                f.write(h.pread(n, off))
                off += n
                ln -= n
    h.shutdown()
"#;

/// Reads byte ranges of NBD exports with libnbd (one `python3` process for all of
/// them): for each `(uri, ranges)` the bytes of its ranges, concatenated in order.
/// `scratch` is a directory for temporary files. Panics, with the script's output,
/// if any connection or read fails.
pub fn libnbd_read_ranges(reads: &[(String, Vec<(u64, u64)>)], scratch: &Path) -> Vec<Vec<u8>> {
    let spec = serde_json::Value::Array(
        reads
            .iter()
            .map(|(uri, ranges)| {
                serde_json::json!([uri, ranges.iter().map(|&(o, l)| [o, l]).collect::<Vec<_>>()])
            })
            .collect(),
    );
    let spec_path = scratch.join("libnbd-read.json");
    let script = scratch.join("libnbd-read.py");
    std::fs::write(&spec_path, spec.to_string()).expect("write the read list");
    std::fs::write(&script, LIBNBD_READ_PY).expect("write the read script");
    let out = run(python3_libnbd().arg(&script).arg(&spec_path).arg(scratch));
    assert!(
        out.status.success(),
        "reading {:?} through libnbd failed: {}",
        reads.iter().map(|r| &r.0).collect::<Vec<_>>(),
        describe(&out)
    );
    (0..reads.len())
        .map(|i| {
            let p = scratch.join(format!("read-{i}.bin"));
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            let _ = std::fs::remove_file(&p);
            bytes
        })
        .collect()
}

/// A command for a libnbd tool. `nbdsh` runs `python3 -m nbd` from `PATH`; Debian's
/// `python3-libnbd` installs the module for `/usr/bin/python3`, so that comes first
/// (a pyenv or venv python3 earlier in `PATH` would not have it).
pub fn tool_command(tool: &str) -> Command {
    let mut c = Command::new(tool);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut p = OsString::from("/usr/bin:");
    p.push(path);
    c.env("PATH", p);
    c
}

/// An `nbdinfo` command (Debian package `libnbd-bin`; a missing tool fails the test).
pub fn nbdinfo() -> Command {
    require_command(
        "nbdinfo",
        "libnbd-bin",
        tool_command("nbdinfo").arg("--version"),
    );
    tool_command("nbdinfo")
}

/// An `nbdcopy` command (Debian package `libnbd-bin`; a missing tool fails the test).
pub fn nbdcopy() -> Command {
    require_command(
        "nbdcopy",
        "libnbd-bin",
        tool_command("nbdcopy").arg("--version"),
    );
    tool_command("nbdcopy")
}

/// An `nbdsh` command (Debian packages `python3-libnbd` and `libnbd-bin`; a missing
/// tool fails the test).
pub fn nbdsh() -> Command {
    require_command(
        "nbdsh",
        "python3-libnbd (and libnbd-bin)",
        tool_command("nbdsh").args(["-c", "import nbd"]),
    );
    tool_command("nbdsh")
}
