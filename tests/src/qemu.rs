//! QEMU's tools as the oracle: `qemu-img` and `qemu-io` wrappers and a `qemu-io` process holding an image open.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::Image;

use crate::{command_line, describe, require_tool, run, wait_deadline, LOCK_RETRY};

/// A `qemu-img` command with no arguments yet.
///
/// Panics with "qemu-img not found: install qemu-utils (scripts/test does)" when
/// `qemu-img` cannot be run.
pub fn qemu_img() -> Command {
    require_tool("qemu-img", "qemu-utils", &["--version"]);
    Command::new("qemu-img")
}

/// A `qemu-io` command with no arguments yet.
///
/// Panics with "qemu-io not found: install qemu-utils (scripts/test does)" when
/// `qemu-io` cannot be run.
pub fn qemu_io() -> Command {
    require_tool("qemu-io", "qemu-utils", &["--version"]);
    Command::new("qemu-io")
}

/// Makes sure both `qemu-img` and `qemu-io` run (see [`require_tool`]).
pub fn require_qemu_tools() {
    require_tool("qemu-img", "qemu-utils", &["--version"]);
    require_tool("qemu-io", "qemu-utils", &["--version"]);
}

/// Whether a QEMU tool failed only because it could not take an image lock.
pub fn is_lock_failure(out: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && stderr.contains("Failed to get") && stderr.contains("lock")
}

/// Runs `cmd` and panics with its command line, status, stdout and stderr unless it
/// exits with status 0.
///
/// A failure to take the image lock is retried for up to [`LOCK_RETRY`] (see there
/// why such failures can be transient in a test binary); QEMU tools check the lock
/// before doing anything, so the retry cannot repeat work. Use [`run`] where a lock
/// failure is the expected outcome.
pub fn run_ok(cmd: &mut Command) -> Output {
    let line = command_line(cmd);
    let out = run_lock_retry(cmd);
    assert!(out.status.success(), "`{line}` failed: {}", describe(&out));
    out
}

/// [`run`], retrying for up to [`LOCK_RETRY`] while the tool fails only because it
/// could not take the image lock; returns the last output whatever its status.
pub fn run_lock_retry(cmd: &mut Command) -> Output {
    let deadline = Instant::now() + LOCK_RETRY;
    let mut out = run(cmd);
    while is_lock_failure(&out) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        out = run(cmd);
    }
    out
}

/// Runs `qemu-img` with `args` and asserts success.
pub fn qemu_img_ok<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_ok(qemu_img().args(args))
}

/// Runs `qemu-img` with `args` and returns its output whatever the exit status (no
/// lock retry).
pub fn qemu_img_run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(qemu_img().args(args))
}

/// Runs `qemu-img` with `args`, asserts that it fails and returns its stderr.
pub fn qemu_img_fails<S: AsRef<OsStr>>(args: &[S]) -> String {
    let mut cmd = qemu_img();
    cmd.args(args);
    let line = command_line(&cmd);
    let out = run(&mut cmd);
    assert!(
        !out.status.success(),
        "`{line}` succeeded: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Creates a qcow2 image with `qemu-img create -f qcow2 [-o opts] path size`.
///
/// `opts` is passed to `-o` when not empty (e.g. `"cluster_size=4096,compat=0.10"`).
pub fn qemu_img_create(path: &Path, size: u64, opts: &str) {
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run_ok(cmd.arg(path).arg(size.to_string()));
}

/// A `qemu-io -f fmt` command on `path` with one `-c` per command.
pub fn qemu_io_command<S: AsRef<str>>(fmt: &str, path: &Path, cmds: &[S]) -> Command {
    let mut cmd = qemu_io();
    cmd.args(["-f", fmt]);
    for c in cmds {
        cmd.args(["-c", c.as_ref()]);
    }
    cmd.arg(path);
    cmd
}

/// Runs `qemu-io -f fmt` on `path` with one `-c` per command and returns the output,
/// whatever the exit status (qemu-io exits non-zero when any command failed). No lock
/// retry: use this where a lock failure is the expected outcome.
pub fn qemu_io_run<S: AsRef<str>>(fmt: &str, path: &Path, cmds: &[S]) -> Output {
    run(&mut qemu_io_command(fmt, path, cmds))
}

/// Runs qemu-io like [`qemu_io_run`] (retrying transient lock failures, see
/// [`LOCK_RETRY`]) and asserts that every command succeeded (this includes pattern
/// verification of `read -P`).
pub fn qemu_io_ok<S: AsRef<str>>(fmt: &str, path: &Path, cmds: &[S]) -> Output {
    let out = run_lock_retry(&mut qemu_io_command(fmt, path, cmds));
    let listed: Vec<&str> = cmds.iter().map(|c| c.as_ref()).collect();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("Pattern verification failed"),
        "qemu-io on {} with {listed:?} failed: {}",
        path.display(),
        describe(&out)
    );
    out
}

/// Converts `src` to a raw file `dst` with `qemu-img convert -O raw`.
pub fn convert_to_raw(src: &Path, dst: &Path) {
    run_ok(qemu_img().args(["convert", "-O", "raw"]).arg(src).arg(dst));
}

/// Converts internal snapshot `snapshot` of `src` to a raw file `dst`
/// (`qemu-img convert -l snapshot.name=NAME -O raw`).
pub fn convert_snapshot_to_raw(src: &Path, snapshot: &str, dst: &Path) {
    run_ok(
        qemu_img()
            .args(["convert", "-l", &format!("snapshot.name={snapshot}")])
            .args(["-O", "raw"])
            .arg(src)
            .arg(dst),
    );
}

/// The outcome of `qemu-img check --output=json`.
#[derive(Debug)]
pub struct QemuCheck {
    /// Exit code (0 clean, 2 corruptions, 3 leaks only, 1 check could not run).
    pub code: i32,
    /// The parsed JSON report (`Value::Null` if stdout was not JSON).
    pub json: serde_json::Value,
    /// The raw process output.
    pub output: Output,
}

impl QemuCheck {
    /// A JSON counter of the report (`leaks`, `corruptions`, `check-errors`, …), 0 when
    /// absent.
    pub fn count(&self, key: &str) -> u64 {
        self.json.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
    }

    /// Asserts a clean report: exit 0, no leak, no corruption, no check error. `what`
    /// names the image in the message.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.code == 0
                && self.count("leaks") == 0
                && self.count("corruptions") == 0
                && self.count("check-errors") == 0,
            "{what}: qemu-img check is not clean: {}",
            describe(&self.output)
        );
    }
}

/// Runs `qemu-img check --output=json` on a qcow2 image.
pub fn qemu_check(path: &Path) -> QemuCheck {
    let out = run_lock_retry(
        qemu_img()
            .args(["check", "-f", "qcow2", "--output=json"])
            .arg(path),
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    QemuCheck {
        code: out.status.code().unwrap_or(-1),
        json,
        output: out,
    }
}

/// Asserts that `qemu-img check` finds no corruption, no leak and no check error.
pub fn assert_qemu_check_clean(path: &Path) {
    qemu_check(path).assert_clean(&path.display().to_string());
}

/// Writes the qcow2 image `bytes` to a temporary file and asserts that `qemu-img check`
/// finds it clean (see [`assert_qemu_check_clean`]); `what` names the image in the
/// message.
pub fn assert_qemu_check_clean_bytes(bytes: &[u8], what: &str) {
    let dir = crate::tempdir();
    let path = dir.path().join("image.qcow2");
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    qemu_check(&path).assert_clean(what);
}

/// Asserts that `qemu-img compare` finds `a` (format `a_fmt`) and `b` (format `b_fmt`)
/// identical.
pub fn assert_qemu_compare_eq(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = run_lock_retry(
        qemu_img()
            .args(["compare", "-f", a_fmt, "-F", b_fmt])
            .arg(a)
            .arg(b),
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} says they differ (or failed): {}",
        a.display(),
        b.display(),
        describe(&out)
    );
}

/// `qemu-img info --output=json` of `path` (add `-U` with `force_share`).
pub fn qemu_info(path: &Path, force_share: bool) -> serde_json::Value {
    let mut cmd = qemu_img();
    cmd.args(["info", "--output=json"]);
    if force_share {
        cmd.arg("-U");
    }
    let out = run_ok(cmd.arg(path));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info output is not JSON ({e}): {}", describe(&out)))
}

/// Asserts that qcowx's [`qcowx_core::ImageInfo`] of `img` agrees with
/// `qemu-img info --output=json -U` of `path`: virtual size, cluster size, compat,
/// refcount bits, lazy refcounts, extended L2, compression type, corrupt bit, backing
/// file and format, and the snapshot names.
pub fn assert_info_matches_qemu(img: &Image, path: &Path) {
    let ours = img
        .info()
        .unwrap_or_else(|e| panic!("info of {}: {e}", path.display()));
    let q = qemu_info(path, true);
    let what = path.display();
    let fs = &q["format-specific"]["data"];
    assert_eq!(
        q["virtual-size"].as_u64(),
        Some(ours.virtual_size),
        "{what}: virtual size"
    );
    assert_eq!(
        q["cluster-size"].as_u64(),
        Some(ours.cluster_size),
        "{what}: cluster size"
    );
    assert_eq!(fs["compat"].as_str(), Some(ours.compat), "{what}: compat");
    assert_eq!(
        fs["refcount-bits"].as_u64(),
        Some(u64::from(ours.refcount_bits)),
        "{what}: refcount bits"
    );
    assert_eq!(
        fs["corrupt"].as_bool().unwrap_or(false),
        ours.corrupt,
        "{what}: corrupt bit"
    );
    if ours.version >= 3 {
        assert_eq!(
            fs["lazy-refcounts"].as_bool(),
            Some(ours.lazy_refcounts),
            "{what}: lazy refcounts"
        );
        assert_eq!(
            fs["extended-l2"].as_bool(),
            Some(ours.extended_l2),
            "{what}: extended L2"
        );
        assert_eq!(
            fs["compression-type"].as_str(),
            Some(ours.compression_type),
            "{what}: compression type"
        );
    }
    assert_eq!(
        q["backing-filename"].as_str(),
        ours.backing_file.as_deref(),
        "{what}: backing file"
    );
    assert_eq!(
        q["backing-filename-format"].as_str(),
        ours.backing_format.as_deref(),
        "{what}: backing format"
    );
    let qemu_snaps: Vec<&str> = q["snapshots"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    let our_snaps: Vec<&str> = ours.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(qemu_snaps, our_snaps, "{what}: snapshots");
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that answered (0 = the image itself).
    pub depth: u32,
    /// Allocated somewhere in the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset, when QEMU reports one.
    pub offset: Option<u64>,
}

/// Runs `qemu-img map --output=json` on a qcow2 image and parses it.
pub fn qemu_map(path: &Path) -> Vec<MapExtent> {
    let out = run_ok(
        qemu_img()
            .args(["map", "-f", "qcow2", "--output=json"])
            .arg(path),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img map output is not JSON ({e}): {}", describe(&out)));
    let arr = v.as_array().expect("qemu-img map JSON is an array");
    arr.iter()
        .map(|e| {
            let u = |k: &str| {
                e.get(k)
                    .and_then(|x| x.as_u64())
                    .unwrap_or_else(|| panic!("map entry without {k}: {e}"))
            };
            let b = |k: &str| e.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
            MapExtent {
                start: u("start"),
                length: u("length"),
                depth: u("depth") as u32,
                present: b("present"),
                zero: b("zero"),
                data: b("data"),
                compressed: b("compressed"),
                offset: e.get("offset").and_then(|x| x.as_u64()),
            }
        })
        .collect()
}

/// A `qemu-io` process that keeps an image open, reading commands from a pipe.
///
/// Dropping it closes the pipe (qemu-io then exits), waits a bounded time and kills the
/// process if it is still running.
#[derive(Debug)]
pub struct QemuIoSession {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl QemuIoSession {
    /// Starts `qemu-io -f fmt [-r] path` (output to `log`), then waits until it has the
    /// image open by asking it to read the first 512 bytes and waiting (up to `timeout`)
    /// for the answer.
    pub fn start(
        fmt: &str,
        path: &Path,
        read_only: bool,
        log: &Path,
        timeout: Duration,
    ) -> QemuIoSession {
        let log_file = File::create(log).expect("create qemu-io log");
        let mut cmd = qemu_io();
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .args(["-f", fmt])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("clone log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn qemu-io: {e}"));
        let stdin = child.stdin.take();
        let mut s = QemuIoSession {
            child,
            stdin,
            log: log.to_path_buf(),
        };
        s.send("read 0 512");
        let deadline = Instant::now() + timeout;
        loop {
            let text = s.log_text();
            if text.contains("read 512/512 bytes") {
                return s;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("qemu-io exited early ({status}): {text}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-io did not open {} within {timeout:?}: {text}",
                path.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one command line to qemu-io.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("qemu-io stdin is open");
        writeln!(stdin, "{line}").expect("write to qemu-io");
        stdin.flush().expect("flush qemu-io stdin");
    }

    /// Everything qemu-io printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Closes qemu-io's stdin and waits (up to `timeout`) for it to exit; kills it
    /// otherwise. Returns whether it exited by itself.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        self.stdin = None;
        wait_deadline(&mut self.child, timeout).is_some()
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        if self.stdin.is_some() || matches!(self.child.try_wait(), Ok(None)) {
            self.finish(Duration::from_secs(10));
        }
    }
}
