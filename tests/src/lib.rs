//! Helpers shared by the workspace-level interoperability tests.
//!
//! The test targets of this package (`interop.rs`, `hostile.rs`, `model.rs`, …) use
//! QEMU's own tools as the oracle. This library gathers what they all need:
//!
//! * **Running QEMU tools** — [`qemu_img`] and [`qemu_io`] build commands (and panic
//!   with "qemu-img not found: install qemu-utils (scripts/test does)" when the tool is
//!   missing: tests that need QEMU fail, they never skip); [`run`] and [`run_ok`] run a
//!   command with a time limit and, on failure, panic with the command line, exit
//!   status, stdout and stderr. Wrappers for the common sub-commands:
//!   [`qemu_img_create`], [`qemu_io_ok`], [`convert_to_raw`], [`convert_snapshot_to_raw`],
//!   [`qemu_check`] / [`assert_qemu_check_clean`], [`assert_qemu_compare_eq`],
//!   [`qemu_map`], [`qemu_info`] / [`assert_info_matches_qemu`], [`QemuIoSession`] (a
//!   `qemu-io` process holding an image open). [`qemu_io_run`] and [`run`] never retry;
//!   [`run_ok`], [`qemu_io_ok`] and the check/compare wrappers retry transient lock
//!   failures (see [`LOCK_RETRY`]).
//! * **Opening images** — [`open_ro`], [`open_rw`] and [`open_retry`] ride out the
//!   transient lock conflicts a multi-threaded test binary causes (see [`LOCK_RETRY`]).
//! * **Comparing content** — [`assert_image_eq_file`] compares the whole content of a
//!   qcowx [`Image`] with a raw file (for example `qemu-img convert -O raw` output) in
//!   bounded chunks; [`assert_image_matches_qemu`] does the conversion too;
//!   [`assert_image_eq_bytes`] compares with an in-memory expectation.
//! * **Block status** — [`classify_block_status`] and [`classify_qemu_map`] turn qcowx
//!   extents and `qemu-img map --output=json` output into per-byte classifications that
//!   [`assert_same_classification`] compares (the two merge extents differently).
//! * **Deterministic data** — [`Rng`] (SplitMix64), [`pattern`], [`compressible`].
//! * **Expected content** — [`ExpectedDisk`], an in-memory model of a disk that mirrors
//!   qcowx's write / write-zeroes / discard semantics, and [`apply_random_ops`] to drive an
//!   image and a model with the same random operations.
//! * **Files** — [`tempdir`], [`read_at`], [`patch`], [`be32`], [`be64`]; and
//!   [`CappedStorage`], an in-memory storage with a size cap.
//! * **Bounded execution** — [`run_bounded`] runs a closure on its own thread with a time
//!   limit, catches panics and reports the largest single allocation it made (when the
//!   test binary installs [`alloc_limit::LimitAlloc`] as its global allocator).
//! * **Errors** — [`error_text`] renders an error with its whole `source()` chain.

#![warn(missing_docs)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{Extent, ExtentStatus, Image, OpenOptions};

pub use tempfile::TempDir;

// ---- running QEMU tools -------------------------------------------------------------

/// How long [`run`] lets one QEMU tool invocation take before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Chunk size used by the content comparisons (bounded memory).
pub const COMPARE_CHUNK: usize = 1 << 20;

fn require_tool(tool: &'static str, cell: &'static OnceLock<()>) {
    cell.get_or_init(|| {
        let found = Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            panic!("{tool} not found: install qemu-utils (scripts/test does)");
        }
    });
}

/// A `qemu-img` command with no arguments yet.
///
/// Panics with "qemu-img not found: install qemu-utils (scripts/test does)" when
/// `qemu-img` cannot be run.
pub fn qemu_img() -> Command {
    static FOUND: OnceLock<()> = OnceLock::new();
    require_tool("qemu-img", &FOUND);
    Command::new("qemu-img")
}

/// A `qemu-io` command with no arguments yet.
///
/// Panics with "qemu-io not found: install qemu-utils (scripts/test does)" when
/// `qemu-io` cannot be run.
pub fn qemu_io() -> Command {
    static FOUND: OnceLock<()> = OnceLock::new();
    require_tool("qemu-io", &FOUND);
    Command::new("qemu-io")
}

/// The command line of `cmd`, for messages.
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push('\'');
            s.push_str(&a);
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!(" (in {})", dir.display()));
    }
    s
}

/// Describes a finished process: exit status, stdout and stderr.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Runs `cmd` (stdin closed) and returns its output whatever its exit status.
///
/// Panics if it cannot be started or does not finish within [`TOOL_TIMEOUT`] (it is
/// killed then).
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, TOOL_TIMEOUT)
}

/// [`run`] with an explicit time limit.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let line = command_line(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_deadline(&mut child, timeout)
        .unwrap_or_else(|| panic!("`{line}` did not finish within {timeout:?}; killed it"));
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut v);
        }
        v
    })
}

/// Waits for `child` until `timeout`; kills it and returns `None` if it is still running.
fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for process {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
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

// ---- opening images ---------------------------------------------------------------------

/// How long [`open_retry`] and [`run_ok`] retry an image lock conflict.
///
/// Why a conflict can be transient: when any thread of the test binary spawns a
/// process, the child holds duplicates of all the binary's file descriptors until it
/// calls `exec` (close-on-exec closes them only then). Image locks are OFD locks, tied
/// to the open file description, so an image another test thread just closed can
/// still look locked for a moment. Tests that expect a lock conflict must not retry.
pub const LOCK_RETRY: Duration = Duration::from_secs(5);

/// Opens `path` with `opts`, retrying while the open fails with
/// [`qcowx_core::Error::Locked`], for up to [`LOCK_RETRY`]. Other errors (and the last
/// lock error) are returned.
pub fn open_retry(opts: &OpenOptions, path: &Path) -> qcowx_core::Result<Image> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        match opts.open(path) {
            Err(qcowx_core::Error::Locked { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens `path` read-only (see [`open_retry`]); panics on error.
pub fn open_ro(path: &Path) -> Image {
    open_retry(&OpenOptions::new(), path)
        .unwrap_or_else(|e| panic!("open {}: {}", path.display(), error_text(&e)))
}

/// Opens `path` read-write (see [`open_retry`]); panics on error.
pub fn open_rw(path: &Path) -> Image {
    open_retry(&OpenOptions::new().write(true), path)
        .unwrap_or_else(|e| panic!("open_rw {}: {}", path.display(), error_text(&e)))
}

/// Runs `qemu-img` with `args` and asserts success.
pub fn qemu_img_ok<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_ok(qemu_img().args(args))
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
    let c = qemu_check(path);
    assert!(
        c.code == 0
            && c.count("leaks") == 0
            && c.count("corruptions") == 0
            && c.count("check-errors") == 0,
        "qemu-img check {} is not clean: {}",
        path.display(),
        describe(&c.output)
    );
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

// ---- block status classification ----------------------------------------------------

/// What a guest byte is, independent of how a tool merges extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteClass {
    /// Data, found at this layer depth.
    Data(u32),
    /// Explicitly zero, recorded at this layer depth.
    Zero(u32),
    /// Not allocated anywhere in the chain (the depth is not compared: QEMU and qcowx
    /// count it differently when backing files are shorter than the overlay).
    Unallocated,
}

/// A run of bytes of one [`ByteClass`]: `(start, end, class)`, end exclusive.
pub type ClassRun = (u64, u64, ByteClass);

/// Classifies qcowx extents.
pub fn classify_block_status(extents: &[Extent]) -> Vec<ClassRun> {
    extents
        .iter()
        .map(|e| {
            let class = match e.status {
                ExtentStatus::Data => ByteClass::Data(e.depth),
                ExtentStatus::Zero => ByteClass::Zero(e.depth),
                ExtentStatus::Unallocated => ByteClass::Unallocated,
            };
            (e.offset, e.offset + e.length, class)
        })
        .collect()
}

/// Classifies `qemu-img map` extents: not present → unallocated; data → data; else
/// zero.
pub fn classify_qemu_map(map: &[MapExtent]) -> Vec<ClassRun> {
    map.iter()
        .map(|m| {
            let class = if !m.present {
                ByteClass::Unallocated
            } else if m.data {
                ByteClass::Data(m.depth)
            } else {
                ByteClass::Zero(m.depth)
            };
            (m.start, m.start + m.length, class)
        })
        .collect()
}

/// Asserts that two classifications agree on every byte of `[0, size)` (both must
/// cover it exactly, in order, without gaps). `what` names the image in messages.
pub fn assert_same_classification(what: &str, ours: &[ClassRun], qemu: &[ClassRun], size: u64) {
    for (name, runs) in [("qcowx", ours), ("qemu", qemu)] {
        let mut pos = 0;
        for &(s, e, _) in runs {
            assert_eq!(
                s, pos,
                "{what}: {name} runs have a gap or overlap at {pos}: {runs:?}"
            );
            assert!(e > s, "{what}: {name} has an empty run at {s}");
            pos = e;
        }
        assert_eq!(
            pos, size,
            "{what}: {name} runs end at {pos}, disk size {size}"
        );
    }
    let (mut i, mut j, mut pos) = (0, 0, 0);
    while pos < size {
        let (_, ea, ca) = ours[i];
        let (_, eb, cb) = qemu[j];
        let end = ea.min(eb);
        assert_eq!(
            ca, cb,
            "{what}: bytes {pos}..{end} are {ca:?} for qcowx but {cb:?} for qemu-img map\n\
             qcowx: {ours:?}\nqemu: {qemu:?}"
        );
        pos = end;
        if ea == end {
            i += 1;
        }
        if eb == end {
            j += 1;
        }
    }
}

/// Compares `img.block_status` over the whole disk with `qemu-img map` of `path`.
pub fn assert_block_status_matches_qemu(img: &Image, path: &Path) {
    let size = img.size();
    let ours = img
        .block_status(0, size)
        .unwrap_or_else(|e| panic!("block_status of {}: {e}", path.display()));
    let qemu = qemu_map(path);
    assert_same_classification(
        &path.display().to_string(),
        &classify_block_status(&ours),
        &classify_qemu_map(&qemu),
        size,
    );
}

// ---- content comparison ---------------------------------------------------------------

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn hex_around(buf: &[u8], at: usize) -> String {
    let s = at.saturating_sub(8);
    let e = (at + 8).min(buf.len());
    buf[s..e]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts that the whole virtual disk of `img` equals the raw file `raw` (which must
/// be exactly as long as the disk), reading both in [`COMPARE_CHUNK`] chunks.
pub fn assert_image_eq_file(img: &Image, raw: &Path) {
    let size = img.size();
    let file = File::open(raw).unwrap_or_else(|e| panic!("open {}: {e}", raw.display()));
    let raw_len = file.metadata().expect("stat raw file").len();
    assert_eq!(
        raw_len,
        size,
        "{}: raw file {} has {raw_len} bytes, the image's virtual size is {size}",
        img.file_name(),
        raw.display()
    );
    let mut ours = vec![0u8; COMPARE_CHUNK];
    let mut theirs = vec![0u8; COMPARE_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(COMPARE_CHUNK as u64) as usize;
        img.read_at(&mut ours[..n], pos)
            .unwrap_or_else(|e| panic!("qcowx read of {} at {pos}+{n}: {e}", img.file_name()));
        file.read_exact_at(&mut theirs[..n], pos)
            .unwrap_or_else(|e| panic!("read {} at {pos}: {e}", raw.display()));
        if let Some(d) = first_difference(&ours[..n], &theirs[..n]) {
            panic!(
                "{}: guest byte {} differs from {}: qcowx [{}] vs expected [{}] (from {})",
                img.file_name(),
                pos + d as u64,
                raw.display(),
                hex_around(&ours[..n], d),
                hex_around(&theirs[..n], d),
                (pos + d as u64).saturating_sub(8)
            );
        }
        pos += n as u64;
    }
}

/// Converts the qcow2 image at `path` with `qemu-img convert -O raw` into `scratch` and
/// asserts that `img` (normally the same image opened by qcowx) reads identically.
pub fn assert_image_matches_qemu(img: &Image, path: &Path, scratch: &Path) {
    let raw = scratch.join(format!(
        "{}.qemu.raw",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    ));
    let _ = std::fs::remove_file(&raw);
    convert_to_raw(path, &raw);
    assert_image_eq_file(img, &raw);
    let _ = std::fs::remove_file(&raw);
}

/// Asserts that the whole virtual disk of `img` equals `expected` (chunked reads).
pub fn assert_image_eq_bytes(img: &Image, expected: &[u8]) {
    let size = img.size();
    assert_eq!(
        size,
        expected.len() as u64,
        "{}: virtual size differs from the expected content",
        img.file_name()
    );
    let mut buf = vec![0u8; COMPARE_CHUNK];
    let mut pos = 0usize;
    while pos < expected.len() {
        let n = (expected.len() - pos).min(COMPARE_CHUNK);
        img.read_at(&mut buf[..n], pos as u64)
            .unwrap_or_else(|e| panic!("qcowx read of {} at {pos}+{n}: {e}", img.file_name()));
        if let Some(d) = first_difference(&buf[..n], &expected[pos..pos + n]) {
            panic!(
                "{}: guest byte {} differs: qcowx [{}] vs expected [{}] (from {})",
                img.file_name(),
                pos + d,
                hex_around(&buf[..n], d),
                hex_around(&expected[pos..pos + n], d),
                (pos + d).saturating_sub(8)
            );
        }
        pos += n;
    }
}

// ---- deterministic data ---------------------------------------------------------------

/// A small deterministic pseudo-random generator (SplitMix64). Same seed, same stream,
/// on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }
    /// A number in `lo..hi` (`hi` > `lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let w = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// `len` incompressible pseudo-random bytes determined by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes that compress well (short runs of a few values, plus text), determined
/// by `seed`.
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        match rng.below(3) {
            0 => {
                let b = rng.below(4) as u8;
                let n = rng.range(16, 400) as usize;
                v.extend(std::iter::repeat_n(b, n));
            }
            1 => v.extend_from_slice(b"qcowx compressible test data, "),
            _ => {
                let n = rng.range(1, 8) as usize;
                for _ in 0..n {
                    v.push(b'a' + rng.below(4) as u8);
                }
            }
        }
    }
    v.truncate(len);
    v
}

// ---- expected content model -------------------------------------------------------------

/// The expected content of a virtual disk, kept in memory, with qcowx's semantics for
/// write-zeroes and discard. Meant for disks of a few MiB to a few hundred MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedDisk {
    bytes: Vec<u8>,
    cluster_size: u64,
}

impl ExpectedDisk {
    /// A disk of `size` zero bytes with clusters of `cluster_size` (for discard).
    pub fn zeroed(size: u64, cluster_size: u64) -> ExpectedDisk {
        ExpectedDisk {
            bytes: vec![0; size as usize],
            cluster_size,
        }
    }
    /// A disk holding `bytes` (for example a raw file's content).
    pub fn from_bytes(bytes: Vec<u8>, cluster_size: u64) -> ExpectedDisk {
        ExpectedDisk {
            bytes,
            cluster_size,
        }
    }
    /// A disk holding the content of the raw file at `path`.
    pub fn from_raw_file(path: &Path, cluster_size: u64) -> ExpectedDisk {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        ExpectedDisk::from_bytes(bytes, cluster_size)
    }
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    /// Cluster size used by [`ExpectedDisk::discard`].
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }
    /// The whole content.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
    }
    /// Records that `[offset, offset+len)` reads as zeros (write-zeroes).
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.bytes[offset as usize..(offset + len) as usize].fill(0);
    }
    /// Records a qcowx discard of `[offset, offset+len)`: every whole cluster in the
    /// range reads as zeros, the partial clusters at its edges are unchanged. The last
    /// cluster of a disk whose size is not a cluster multiple counts as whole when the
    /// range reaches the end of the disk.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let cs = self.cluster_size;
        let size = self.size();
        let end = offset + len;
        let mut c = offset.next_multiple_of(cs);
        while c < end {
            let cend = (c + cs).min(size);
            if cend <= end {
                self.zero(c, cend - c);
            }
            c += cs;
        }
    }
    /// Writes the content to a raw file at `path`.
    pub fn save_raw(&self, path: &Path) {
        std::fs::write(path, &self.bytes)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// The kinds of operations [`apply_random_ops`] issues, with their weights.
#[derive(Debug, Clone, Copy)]
pub struct OpMix {
    /// Weight of `write_at` (random data, unaligned offsets and lengths).
    pub write: u64,
    /// Weight of `write_zeroes` (random `may_unmap`).
    pub zero: u64,
    /// Weight of `discard`.
    pub discard: u64,
}

impl Default for OpMix {
    fn default() -> Self {
        OpMix {
            write: 6,
            zero: 2,
            discard: 2,
        }
    }
}

/// Issues `count` random operations on `img` and records them in `model`.
///
/// Lengths are up to about three clusters (capped at 256 KiB), offsets are anywhere in
/// the disk; about a third of the operations are cluster-aligned. Panics on the first
/// failing operation, naming it.
pub fn apply_random_ops(
    img: &Image,
    model: &mut ExpectedDisk,
    rng: &mut Rng,
    count: usize,
    mix: OpMix,
) {
    let size = model.size();
    let cs = model.cluster_size();
    let max_len = (3 * cs).min(256 << 10).min(size);
    let total = mix.write + mix.zero + mix.discard;
    for i in 0..count {
        let aligned = rng.chance(1, 3);
        let (off, len) = if aligned {
            let clusters = size.div_ceil(cs);
            let c = rng.below(clusters);
            let off = c * cs;
            let n = rng.range(1, 4);
            (off, (n * cs).min(size - off))
        } else {
            let len = rng.range(1, max_len + 1);
            let off = rng.below(size - len + 1);
            (off, len)
        };
        let pick = rng.below(total);
        let name = img.file_name().to_string();
        if pick < mix.write {
            let data = pattern(rng.next_u64(), len as usize);
            img.write_at(&data, off)
                .unwrap_or_else(|e| panic!("{name}: op {i}: write_at({off}, {len}): {e}"));
            model.write(off, &data);
        } else if pick < mix.write + mix.zero {
            let unmap = rng.chance(1, 2);
            img.write_zeroes(off, len, unmap).unwrap_or_else(|e| {
                panic!("{name}: op {i}: write_zeroes({off}, {len}, {unmap}): {e}")
            });
            model.zero(off, len);
        } else {
            img.discard(off, len)
                .unwrap_or_else(|e| panic!("{name}: op {i}: discard({off}, {len}): {e}"));
            model.discard(off, len);
        }
    }
}

// ---- files ------------------------------------------------------------------------------

/// A fresh temporary directory (removed when dropped).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcowx-tests-")
        .tempdir()
        .expect("create a temporary directory")
}

/// Reads `len` bytes of the file at `path` from `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

/// Overwrites the bytes of the file at `path` at `offset` with `bytes`.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("patch {} at {offset}: {e}", path.display()));
}

/// The big-endian u32 of the file at `path` at `offset`.
pub fn be32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(read_at(path, offset, 4).try_into().expect("4 bytes"))
}

/// The big-endian u64 of the file at `path` at `offset`.
pub fn be64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(read_at(path, offset, 8).try_into().expect("8 bytes"))
}

/// An in-memory [`Storage`] that refuses to grow past a cap (an I/O error instead).
///
/// Hostile images can link data at absurd host offsets; a plain
/// [`qcowx_core::storage::MemStorage`] would try to grow to match, so tests that write
/// to such images use this wrapper to keep memory bounded.
#[derive(Debug)]
pub struct CappedStorage {
    inner: MemStorage,
    cap: u64,
}

impl CappedStorage {
    /// A storage holding `data` that may grow to `cap` bytes.
    pub fn new(data: Vec<u8>, cap: u64) -> CappedStorage {
        CappedStorage {
            inner: MemStorage::from_vec(data),
            cap,
        }
    }

    fn check(&self, end: Option<u64>) -> std::io::Result<()> {
        match end {
            Some(e) if e <= self.cap => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("capped test storage: cannot grow past {} bytes", self.cap),
            )),
        }
    }
}

impl Storage for CappedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check(Some(len))?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        None
    }
}

// ---- a qemu-io process holding an image open ----------------------------------------------

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

// ---- bounded execution ------------------------------------------------------------------

/// What [`run_bounded`] observed.
#[derive(Debug)]
pub struct Bounded<T> {
    /// The closure's result, or the panic message if it panicked.
    pub result: Result<T, String>,
    /// The largest single allocation the closure's thread requested, in bytes (0 unless
    /// the test binary uses [`alloc_limit::LimitAlloc`]).
    pub largest_alloc: usize,
}

/// Runs `f` on a new thread. Panics (naming `what`) if it does not finish within
/// `timeout` — the thread is left behind, so a hang becomes a test failure instead of
/// a stuck test run. A panic inside `f` is caught and returned as `Err(message)`.
pub fn run_bounded<T, F>(what: &str, timeout: Duration, f: F) -> Bounded<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(format!("bounded: {what}"))
        .spawn(move || {
            alloc_limit::reset_largest();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|p| panic_message(&*p));
            let _ = tx.send(Bounded {
                result: r,
                largest_alloc: alloc_limit::largest(),
            });
        })
        .expect("spawn a thread");
    match rx.recv_timeout(timeout) {
        Ok(b) => b,
        Err(_) => panic!("{what}: did not finish within {timeout:?} (hang?)"),
    }
}

/// The message of a caught panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}

/// An error and all its `source()`s, joined with `: `.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A global allocator that records the largest single allocation per thread and
/// refuses absurd ones.
///
/// Install it in a test binary to catch library code that sizes an allocation from
/// untrusted metadata:
///
/// ```text
/// #[global_allocator]
/// static ALLOC: qcowx_tests::alloc_limit::LimitAlloc = qcowx_tests::alloc_limit::LimitAlloc;
/// ```
///
/// Requests larger than [`alloc_limit::HARD_LIMIT`] fail (the process then aborts with
/// Rust's "memory allocation of N bytes failed" instead of exhausting the machine);
/// [`run_bounded`] reports the largest request of its closure.
pub mod alloc_limit {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Single allocations larger than this fail.
    pub const HARD_LIMIT: usize = 2 << 30;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        let _ = LARGEST.try_with(|l| {
            if size > l.get() {
                l.set(size);
            }
        });
    }

    /// Forgets the current thread's largest allocation.
    pub fn reset_largest() {
        let _ = LARGEST.try_with(|l| l.set(0));
    }

    /// The current thread's largest allocation request since the last reset, in bytes.
    pub fn largest() -> usize {
        LARGEST.try_with(Cell::get).unwrap_or(0)
    }

    /// See the [module documentation](self).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct LimitAlloc;

    // SAFETY: every call is forwarded to the system allocator unchanged, except that
    // requests over the limit return null, which callers of `GlobalAlloc` must handle.
    unsafe impl GlobalAlloc for LimitAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            if layout.size() > HARD_LIMIT {
                return std::ptr::null_mut();
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            if layout.size() > HARD_LIMIT {
                return std::ptr::null_mut();
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            if new_size > HARD_LIMIT {
                return std::ptr::null_mut();
            }
            // SAFETY: `ptr` came from `System` with `layout`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

// ---- the qcowx binaries, a running qcowx-nbd, libnbd from Python ---------------------------

/// How long [`QcowxNbd`] waits for a server to start listening or to exit.
pub const SERVER_WAIT: Duration = Duration::from_secs(60);

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

/// The `qcowx-nbd` binary: `$QCOWX_NBD` when set, else built with this test's cargo
/// profile on first use.
pub fn qcowx_nbd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("QCOWX_NBD") {
        Some(p) => PathBuf::from(p),
        None => build_workspace_bin("qcowx-nbd", "qcowx-nbd"),
    })
}

/// The `qcowx` command-line binary: `$QCOWX_CLI` when set, else built with this
/// test's cargo profile on first use.
pub fn qcowx_cli_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("QCOWX_CLI") {
        Some(p) => PathBuf::from(p),
        None => build_workspace_bin("qcowx-cli", "qcowx"),
    })
}

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

/// Sends signal `sig` (a name such as `KILL` or `TERM`) to process `pid` with
/// `kill(1)`; panics if `kill` fails.
pub fn send_signal(pid: u32, sig: &str) {
    let out = run(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string()));
    assert!(
        out.status.success(),
        "kill -{sig} {pid}: {}",
        describe(&out)
    );
}

/// A running `qcowx-nbd` serving one image on a Unix socket, with its control socket
/// in a runtime directory of the test's choosing (`QCOWX_RUNTIME_DIR`).
///
/// Dropping it kills the server (SIGKILL) if it is still running, so a failing test
/// leaves no server behind.
#[derive(Debug)]
pub struct QcowxNbd {
    child: Option<Child>,
    sock: PathBuf,
    runtime: PathBuf,
    control: Option<PathBuf>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl QcowxNbd {
    /// Starts `qcowx-nbd -k SOCK ARGS... IMAGE` with `QCOWX_RUNTIME_DIR=RUNTIME` and
    /// waits (up to [`SERVER_WAIT`]) until its banner says it listens.
    pub fn start(image: &Path, sock: &Path, runtime: &Path, args: &[&str]) -> QcowxNbd {
        let mut cmd = Command::new(qcowx_nbd_bin());
        cmd.arg("-k")
            .arg(sock)
            .args(args)
            .arg(image)
            .env("QCOWX_RUNTIME_DIR", runtime);
        let line = command_line(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = std::sync::Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                // After the banner nobody listens: keep reading so the server never
                // blocks on a full pipe.
                let _ = tx.send(l);
            }
        });
        let mut server = QcowxNbd {
            child: Some(child),
            sock: sock.to_path_buf(),
            runtime: runtime.to_path_buf(),
            control: None,
            stderr,
        };
        let deadline = Instant::now() + SERVER_WAIT;
        let mut banner = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    banner.push_str(&l);
                    banner.push('\n');
                    if let Some(p) = l.strip_prefix("control socket ") {
                        server.control = Some(PathBuf::from(p));
                    } else if l.trim_start().starts_with("nbdinfo --list") {
                        break; // the last line of the banner
                    }
                }
                Err(_) => panic!(
                    "`{line}` did not start listening within {SERVER_WAIT:?}\nstdout:\n{banner}\nstderr:\n{}",
                    server.stderr()
                ),
            }
        }
        server
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// The `nbd+unix://` URI of `export`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// The control socket the server announced, if any.
    pub fn control(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A `qcowx` command (no arguments yet) that finds this server's control socket:
    /// `qcowx snapshot|fork|delete|revert|gc|list` on the served image forward to it.
    pub fn qcowx(&self) -> Command {
        let mut cmd = Command::new(qcowx_cli_bin());
        cmd.env("QCOWX_RUNTIME_DIR", &self.runtime);
        cmd
    }

    /// Waits (up to [`SERVER_WAIT`]) for the server to exit, after a signal; kills it
    /// and panics if it does not.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        match wait_deadline(&mut child, SERVER_WAIT) {
            Some(status) => status,
            None => panic!(
                "qcowx-nbd did not exit within {SERVER_WAIT:?}\nstderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Stops the server with SIGTERM and asserts a clean exit (status 0, sockets
    /// removed): the image is closed, with exact refcounts.
    pub fn stop(mut self) {
        send_signal(self.pid(), "TERM");
        let status = self.wait_exit();
        assert!(
            status.success(),
            "qcowx-nbd exited with {status} after SIGTERM\nstderr:\n{}",
            self.stderr()
        );
        assert!(
            !self.sock.exists(),
            "{} left behind after shutdown",
            self.sock.display()
        );
        if let Some(c) = &self.control {
            assert!(!c.exists(), "{} left behind after shutdown", c.display());
        }
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QcowxNbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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
