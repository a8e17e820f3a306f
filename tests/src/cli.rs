//! The `qcowx` command-line tool and QEMU's tools run in a test directory, with the
//! assertions the CLI tests make on what they print and how they exit.
//!
//! Import with `use qcowx_tests::cli::*;`: the names (`qemu_img`, `run`, …) are those
//! of the CLI tests and take a directory, unlike the crate-level helpers of the same
//! purpose.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::qcowx_cli_bin;

/// Runs `prog ARGS` in `dir` (stdin closed) and returns its output whatever its exit
/// status. Panics if it cannot be started: for a QEMU tool with "PROG not found:
/// install qemu-utils (scripts/test does)".
pub fn run<P: AsRef<OsStr>>(prog: P, args: &[&str], dir: &Path) -> Output {
    let prog = prog.as_ref();
    match Command::new(prog).args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && prog != qcowx_cli_bin() => {
            panic!(
                "{} not found: install qemu-utils (scripts/test does)",
                prog.to_string_lossy()
            )
        }
        Err(e) => panic!("cannot run {}: {e}", prog.to_string_lossy()),
    }
}

/// Runs `qcowx ARGS` in `dir`.
pub fn qcowx(dir: &Path, args: &[&str]) -> Output {
    run(qcowx_cli_bin(), args, dir)
}

/// Runs `qemu-img ARGS` in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run("qemu-img", args, dir)
}

/// Runs `qemu-img ARGS` in `dir` and expects exit 0.
pub fn qemu_ok(dir: &Path, args: &[&str]) -> Output {
    let out = qemu_img(dir, args);
    assert_code(&out, 0, &format!("qemu-img {args:?}"));
    out
}

/// Runs `qemu-io -f FMT -c CMD... FILE` in `dir` and expects exit 0 with no failed
/// command (`read -P` pattern mismatches included).
pub fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let out = run("qemu-io", &args, dir);
    assert_code(&out, 0, &format!("qemu-io {cmds:?} {file}"));
    assert!(!stdout(&out).contains("failed"), "{}", stdout(&out));
}

/// Standard output, as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Standard error, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit code `code` and no panic message on stderr; `what` names the command.
pub fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}:\nstdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    assert!(
        !stderr(out).contains("panicked"),
        "{what} panicked: {}",
        stderr(out)
    );
}

/// Asserts exit 0 (see [`assert_code`]).
pub fn assert_ok(out: &Output, what: &str) {
    assert_code(out, 0, what);
}

/// Stdout parsed as JSON; panics with both outputs when it is not JSON.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(out), stderr(out)))
}

/// Runs `qcowx` and expects exit 0.
pub fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = qcowx(dir, args);
    assert_ok(&out, &format!("qcowx {args:?}"));
    out
}

/// Runs `qcowx` and expects exit 0 and nothing on stderr (no progress bars in pipes).
pub fn ok_quiet(dir: &Path, args: &[&str]) -> Output {
    let out = ok(dir, args);
    assert!(
        out.stderr.is_empty(),
        "qcowx {args:?} wrote to stderr: {}",
        stderr(&out)
    );
    out
}

/// Runs `qcowx`, expects exit `code` with a `qcowx: ` message containing every
/// `needles`, and returns its output.
fn failing(dir: &Path, code: i32, args: &[&str], needles: &[&str]) -> Output {
    let out = qcowx(dir, args);
    assert_code(&out, code, &format!("qcowx {args:?}"));
    let err = stderr(&out);
    assert!(err.starts_with("qcowx: "), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
    }
    out
}

/// Runs `qcowx` and expects exit `code` with a `qcowx: ` message containing every
/// `needles`; returns stderr.
pub fn fails_code(dir: &Path, code: i32, args: &[&str], needles: &[&str]) -> String {
    stderr(&failing(dir, code, args, needles))
}

/// [`fails_code`] with exit 1.
pub fn fails(dir: &Path, args: &[&str], needles: &[&str]) -> String {
    fails_code(dir, 1, args, needles)
}

/// [`fails_code`], and nothing on stdout.
pub fn fails_quiet(dir: &Path, code: i32, args: &[&str], needles: &[&str]) -> String {
    let out = failing(dir, code, args, needles);
    assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    stderr(&out)
}

/// Runs `qcowx ARGS` in `dir` with stdout a pipe whose read end is closed before it
/// writes, and expects a clean exit: 0, nothing on stderr.
pub fn ok_into_closed_stdout(dir: &Path, args: &[&str]) {
    let mut child = Command::new(qcowx_cli_bin())
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the child writes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 0, &format!("{args:?} into a closed pipe"));
    assert!(out.stderr.is_empty(), "{args:?}: {}", stderr(&out));
}

/// Runs `qcowx` and expects a usage error: exit 2, nothing on stdout. Returns stderr.
pub fn usage_error(dir: &Path, args: &[&str]) -> String {
    let out = qcowx(dir, args);
    assert_code(&out, 2, &format!("qcowx {args:?}"));
    assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    stderr(&out)
}

/// `qemu-img check --output=json FILE` exits 0 and reports no check error, no
/// corruption and no leak.
pub fn assert_qemu_check_clean(dir: &Path, file: &str) {
    let out = qemu_img(dir, &["check", "--output=json", file]);
    assert_code(&out, 0, &format!("qemu-img check {file}"));
    let v = json(&out);
    assert_eq!(v["check-errors"], 0, "{v:#}");
    assert!(v.get("corruptions").is_none(), "{v:#}");
    assert!(v.get("leaks").is_none(), "{v:#}");
}

/// `qemu-img convert [-l snapshot.name=S] -O raw FILE` (the active layer for `None`),
/// as bytes.
pub fn qemu_raw(dir: &Path, file: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out_name = format!(
        "qemu-{}.raw",
        snapshot.unwrap_or("active").replace(':', "_")
    );
    let opt;
    let mut args = vec!["convert"];
    if let Some(s) = snapshot {
        opt = format!("snapshot.name={s}");
        args.extend(["-l", &opt]);
    }
    args.extend(["-O", "raw", file, &out_name]);
    qemu_ok(dir, &args);
    let bytes = std::fs::read(dir.join(&out_name)).unwrap();
    std::fs::remove_file(dir.join(&out_name)).unwrap();
    bytes
}

/// The names of `names`, as a set.
pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The snapshot names `qemu-img snapshot -l` lists for `file` in `dir`.
pub fn qemu_snapshot_names(dir: &Path, file: &str) -> Vec<String> {
    let out = qemu_ok(dir, &["snapshot", "-l", file]);
    stdout(&out)
        .lines()
        .skip(2) // "Snapshot list:" and the column titles
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Random writes, zero writes and discards (seeded) over the first `size_mb` MiB of
/// `file`, in one `qcowx io`, so the content is varied but cheap to describe.
pub fn scribble(dir: &Path, file: &str, seed: u64, writes: usize, size_mb: u64) {
    let mut rng = crate::Rng::new(seed);
    let mut args: Vec<String> = vec!["io".into()];
    for _ in 0..writes {
        let off = rng.below(size_mb * 16) * 65536;
        let len = (rng.range(1, 40) * 4096).min(size_mb * 1048576 - off);
        args.push("-c".into());
        args.push(match rng.below(6) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {}", 65536.min(size_mb * 1048576 - off)),
            _ => format!("write -P {} {off} {len}", rng.range(1, 255)),
        });
    }
    args.push(file.into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(dir, &refs);
}

/// Two folders with the same files: `qemu` for qemu-img, `qcowx` for qcowx, so a
/// command line written for `qemu-img` can be run by both and the outcomes compared.
pub struct Twins {
    _dir: tempfile::TempDir,
    /// The folder qemu-img runs in.
    pub qemu: PathBuf,
    /// The folder qcowx runs in.
    pub qcowx: PathBuf,
}

impl Default for Twins {
    fn default() -> Twins {
        Twins::new()
    }
}

impl Twins {
    /// Two empty folders.
    pub fn new() -> Twins {
        let dir = tempfile::tempdir().unwrap();
        let (qemu, qcowx) = (dir.path().join("qemu"), dir.path().join("qcowx"));
        std::fs::create_dir(&qemu).unwrap();
        std::fs::create_dir(&qcowx).unwrap();
        Twins {
            _dir: dir,
            qemu,
            qcowx,
        }
    }

    /// Runs `args` under both tools; both must exit `code` (0, or any failure for
    /// `None`). Returns (qemu-img's, qcowx's) outputs.
    pub fn both(&self, args: &[&str], code: Option<i32>) -> (Output, Output) {
        let theirs = qemu_img(&self.qemu, args);
        let ours = qcowx(&self.qcowx, args);
        match code {
            Some(c) => {
                assert_code(&theirs, c, &format!("qemu-img {args:?}"));
                assert_code(&ours, c, &format!("qcowx {args:?}"));
            }
            None => {
                assert!(!theirs.status.success(), "qemu-img {args:?} succeeded");
                assert!(!ours.status.success(), "qcowx {args:?} succeeded");
            }
        }
        (theirs, ours)
    }

    /// `qemu-img info --output=json FILE` of both copies, as qemu-img reads them.
    pub fn infos(&self, file: &str) -> (Value, Value) {
        let info = |d: &Path| json(&qemu_ok(d, &["info", "-U", "--output=json", file]));
        (info(&self.qemu), info(&self.qcowx))
    }

    /// Both folders: qemu-img's, then qcowx's.
    pub fn dirs(&self) -> [&Path; 2] {
        [&self.qemu, &self.qcowx]
    }

    /// Runs `qemu-img ARGS` in both folders (to make the same files in each).
    pub fn prepare(&self, args: &[&str]) {
        for d in self.dirs() {
            qemu_ok(d, args);
        }
    }

    /// Runs `qemu-io -f FMT -c CMD... FILE` in both folders.
    pub fn prepare_io(&self, fmt: &str, file: &str, cmds: &[&str]) {
        for d in self.dirs() {
            qemu_io(d, fmt, file, cmds);
        }
    }

    /// The bytes of `file` in both folders.
    pub fn files(&self, file: &str) -> (Vec<u8>, Vec<u8>) {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        (read(&self.qemu), read(&self.qcowx))
    }

    /// The guest content of both copies (qemu-img reads both).
    pub fn contents(&self, file: &str) -> (Vec<u8>, Vec<u8>) {
        (
            qemu_raw(&self.qemu, file, None),
            qemu_raw(&self.qcowx, file, None),
        )
    }
}
