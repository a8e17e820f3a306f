//! Shared code for the qcowx benches.
//!
//! Two parts:
//!
//! - The driver behind the `qcowx-bench` binary: a work-alike of `qemu-img bench` that
//!   runs the same request sequence against an image opened with `qcowx-core`
//!   ([`parse_args`], [`BenchOptions`], [`run`]).
//! - Fixtures for the criterion benches and the tests: finding and running `qemu-img`
//!   ([`qemu_img`], [`run_tool`]) and building images ([`fill`]).
//!
//! # The request sequence
//! `qemu-img bench` issues `COUNT` requests of `BUFFER_SIZE` bytes. The first starts at
//! `OFFSET`; each next one starts `STEP_SIZE` bytes later (`STEP_SIZE` 0 or absent means
//! `BUFFER_SIZE`), wrapped modulo the virtual disk size. QEMU 10.0 wraps modulo the whole
//! size (later QEMU wraps modulo `size - BUFFER_SIZE`); this driver follows QEMU 10.0,
//! the version the comparison script runs against, so both programs touch the same
//! bytes. A request that would run past the end of the disk fails the run, as it does
//! in QEMU 10.0. Up to `DEPTH` requests are in flight: here, `DEPTH` threads share one
//! `Arc<Image>` and take the next request of the sequence as they finish one.

#![warn(missing_docs)]

pub mod snapshots;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use qcowx_core::{Image, LockMode, OpenOptions};

/// Upper bound on the number of worker threads, whatever `-d` says.
pub const MAX_THREADS: usize = 1024;

/// Largest value `qemu-img bench` accepts for count, depth, buffer size and step size.
const INT_MAX: u64 = i32::MAX as u64;

/// What went wrong in `qcowx-bench`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The image could not be opened or closed.
    #[error("Could not open '{path}': {source}")]
    Open {
        /// The image path.
        path: String,
        /// What qcowx-core said.
        source: qcowx_core::Error,
    },
    /// A request failed.
    #[error("Failed request at offset {offset}: {source}")]
    Request {
        /// Guest offset of the request.
        offset: u64,
        /// What qcowx-core said.
        source: qcowx_core::Error,
    },
    /// A flush failed.
    #[error("Failed flush request: {0}")]
    Flush(qcowx_core::Error),
    /// Closing the image (flush, refcounts) failed after the run.
    #[error("Failed to close the image: {0}")]
    Close(qcowx_core::Error),
    /// Writing the report failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// The options of one run, as `qemu-img bench` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// `-c`: number of requests (default 75000).
    pub count: u64,
    /// `-d`: requests in flight (default 64).
    pub depth: u64,
    /// `-s`: bytes per request (default 4096).
    pub buffer_size: u64,
    /// `-S`: distance between the starts of consecutive requests (0: the buffer size).
    pub step: u64,
    /// `-o`: offset of the first request.
    pub offset: u64,
    /// `-w`: write instead of read.
    pub write: bool,
    /// `--pattern`: the byte written (default 0).
    pub pattern: u8,
    /// `--flush-interval`: flush whenever the number of requests not yet issued is a
    /// multiple of this (0: never). Write runs only.
    pub flush_interval: u64,
    /// Wait for requests in flight before each flush (cleared by `--no-drain`).
    pub drain: bool,
    /// `-U`: open without taking the image lock (read runs only).
    pub force_share: bool,
    /// `-t`: accepted for compatibility and ignored (qcowx always goes through the page
    /// cache, like QEMU's `writeback` mode).
    pub cache: Option<String>,
    /// The image.
    pub file: PathBuf,
}

impl BenchOptions {
    /// Defaults of `qemu-img bench` for `file`.
    pub fn new(file: impl Into<PathBuf>) -> BenchOptions {
        BenchOptions {
            count: 75000,
            depth: 64,
            buffer_size: 4096,
            step: 0,
            offset: 0,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
            force_share: false,
            cache: None,
            file: file.into(),
        }
    }

    /// The step actually used: `step`, or the buffer size when it is 0.
    pub fn effective_step(&self) -> u64 {
        if self.step == 0 {
            self.buffer_size
        } else {
            self.step
        }
    }

    /// Guest offset of request `index` (0-based) on a disk of `disk_size` bytes.
    pub fn request_offset(&self, index: u64, disk_size: u64) -> u64 {
        request_offset(self.offset, self.effective_step(), disk_size, index)
    }
}

/// Guest offset of request `index` of the `qemu-img bench` sequence (QEMU 10.0 rule):
/// the first request is at `start` as given; each later one is `step` bytes after the
/// previous, wrapped modulo `disk_size` (0 on an empty disk).
pub fn request_offset(start: u64, step: u64, disk_size: u64, index: u64) -> u64 {
    if index == 0 {
        return start;
    }
    if disk_size == 0 {
        return 0;
    }
    // ((start + step) % n + step) % n ... == (start + index * step) % n.
    let at = (u128::from(start) + u128::from(index) * u128::from(step)) % u128::from(disk_size);
    at as u64
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Run the benchmark.
    Run(BenchOptions),
    /// Print the usage text.
    Help,
}

/// Usage text of `qcowx-bench`.
pub const USAGE: &str = "\
Usage: qcowx-bench [-c COUNT] [-d DEPTH] [-f qcow2] [-o OFFSET] [-s BUFFER_SIZE]
                   [-S STEP_SIZE] [-t CACHE] [-i AIO] [-n] [-q] [-U]
                   [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]
                   FILENAME

Runs the request sequence of `qemu-img bench` against a QCOW2 image through qcowx-core.

  -c, --count COUNT            number of I/O requests (default 75000)
  -d, --depth DEPTH            requests in flight: DEPTH threads share the image
                               (default 64, at most 1024 threads)
  -s, --buffer-size SIZE       bytes per request (default 4096; suffixes k, M, G)
  -S, --step-size SIZE         start of each next request (default: BUFFER_SIZE)
  -o, --offset OFFSET          start of the first request (default 0)
  -w, --write                  write instead of read
      --pattern PATTERN        byte to write (default 0)
      --flush-interval N       flush when the requests not yet issued are a multiple of N
      --no-drain               flush without waiting for requests in flight
  -U, --force-share            open without taking the image lock (reads only)
  -f, --format FMT             only qcow2 is accepted
  -t, --cache CACHE            accepted and ignored: qcowx always uses the page cache
  -i, --aio AIO, -n, --native  accepted and ignored
  -q, --quiet                  accepted (qemu-img bench prints the same either way)
  -h, --help                   print this help
";

/// Parses a size like `qemu-img` does for `-s`, `-S` and `-o`: a decimal (or `0x` hex)
/// number with an optional binary suffix `b`/`B` (bytes), `k`/`K`, `m`/`M`, `g`/`G`,
/// `t`/`T`, `p`/`P`, `e`/`E`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && !t.starts_with("0x") && !t.starts_with("0X") => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let value = parse_int(digits)?;
    value.checked_mul(1u64 << shift)
}

/// Parses an integer in C's base-0 notation: decimal, `0x` hex or leading-0 octal.
fn parse_int(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    if t.len() > 1 && t.starts_with('0') {
        return u64::from_str_radix(&t[1..], 8).ok();
    }
    t.parse().ok()
}

fn usage(msg: impl Into<String>) -> BenchError {
    BenchError::Usage(msg.into())
}

fn ranged(what: &str, text: &str, min: u64, max: u64, size: bool) -> Result<u64, BenchError> {
    let v = if size {
        parse_size(text)
    } else {
        parse_int(text)
    };
    match v {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(usage(format!(
            "Invalid {what} specified: '{text}'. Must be between {min} and {max}."
        ))),
    }
}

/// Parses the arguments after the program name.
pub fn parse_args<I, S>(args: I) -> Result<Invocation, BenchError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args = args
        .into_iter()
        .map(Into::into)
        .collect::<Vec<String>>()
        .into_iter();
    let mut o = BenchOptions::new(PathBuf::new());
    let mut files: Vec<String> = Vec::new();
    let mut format: Option<String> = None;
    let mut only_files = false;

    // (option name, value) pairs, in order.
    let mut take = |name: &str,
                    value: Option<String>,
                    o: &mut BenchOptions|
     -> Result<bool, BenchError> {
        let need = |v: Option<String>| {
            v.ok_or_else(|| usage(format!("option '{name}' requires an argument")))
        };
        match name {
            "c" | "count" => o.count = ranged("request count", &need(value)?, 1, INT_MAX, true)?,
            "d" | "depth" => o.depth = ranged("queue depth", &need(value)?, 1, INT_MAX, true)?,
            "s" | "buffer-size" => {
                o.buffer_size = ranged("buffer size", &need(value)?, 1, INT_MAX, true)?
            }
            "S" | "step-size" => o.step = ranged("step size", &need(value)?, 0, INT_MAX, true)?,
            "o" | "offset" => o.offset = ranged("offset", &need(value)?, 0, i64::MAX as u64, true)?,
            "pattern" => o.pattern = ranged("pattern byte", &need(value)?, 0, 255, false)? as u8,
            "flush-interval" => {
                o.flush_interval = ranged("flush interval", &need(value)?, 0, INT_MAX, true)?
            }
            "f" | "format" => format = Some(need(value)?),
            "t" | "cache" => {
                let v = need(value)?;
                match v.as_str() {
                    "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe" => {}
                    _ => return Err(usage(format!("Invalid cache option: {v}"))),
                }
                o.cache = Some(v);
            }
            "i" | "aio" => {
                need(value)?;
            }
            "w" | "write" => o.write = true,
            "no-drain" => o.drain = false,
            "U" | "force-share" => o.force_share = true,
            "n" | "native" | "q" | "quiet" => {}
            "h" | "help" => return Ok(true),
            "image-opts" => return Err(usage("--image-opts is not supported")),
            other => return Err(usage(format!("unrecognized option '{other}'\n{USAGE}"))),
        }
        Ok(false)
    };
    let takes_value = |name: &str| {
        matches!(
            name,
            "c" | "d"
                | "s"
                | "S"
                | "o"
                | "f"
                | "t"
                | "i"
                | "count"
                | "depth"
                | "buffer-size"
                | "step-size"
                | "offset"
                | "format"
                | "cache"
                | "aio"
                | "pattern"
                | "flush-interval"
        )
    };

    while let Some(arg) = args.next() {
        if only_files || arg == "-" || !arg.starts_with('-') {
            files.push(arg);
            continue;
        }
        if arg == "--" {
            only_files = true;
            continue;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            };
            let value = if takes_value(&name) {
                inline.or_else(|| args.next())
            } else if inline.is_some() {
                return Err(usage(format!(
                    "option '--{name}' doesn't allow an argument"
                )));
            } else {
                None
            };
            if take(&name, value, &mut o)? {
                return Ok(Invocation::Help);
            }
            continue;
        }
        // A cluster of short options, getopt style: "-wq", "-c100", "-c 100".
        let shorts: Vec<char> = arg[1..].chars().collect();
        let mut i = 0;
        while i < shorts.len() {
            let name = shorts[i].to_string();
            if takes_value(&name) {
                let rest: String = shorts[i + 1..].iter().collect();
                let value = if rest.is_empty() {
                    args.next()
                } else {
                    Some(rest)
                };
                if take(&name, value, &mut o)? {
                    return Ok(Invocation::Help);
                }
                break;
            }
            if take(&name, None, &mut o)? {
                return Ok(Invocation::Help);
            }
            i += 1;
        }
    }

    if let Some(f) = format {
        if f != "qcow2" {
            return Err(usage(format!(
                "qcowx-bench only benchmarks qcow2 images, not '{f}'"
            )));
        }
    }
    if o.flush_interval != 0 && !o.write {
        return Err(usage("--flush-interval is only available in write tests"));
    }
    if o.flush_interval != 0 && o.flush_interval < o.depth {
        return Err(usage("Flush interval can't be smaller than depth"));
    }
    if o.force_share && o.write {
        return Err(usage("--force-share/-U can only be used for read tests"));
    }
    match files.len() {
        1 => o.file = PathBuf::from(files.remove(0)),
        0 => return Err(usage(format!("Expecting one image file name\n{USAGE}"))),
        _ => return Err(usage(format!("Unexpected argument: {}", files[1]))),
    }
    Ok(Invocation::Run(o))
}

/// The result of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunReport {
    /// Time from the first request to the completion of the last one (what
    /// `qemu-img bench` prints).
    pub elapsed: Duration,
    /// Number of requests completed.
    pub requests: u64,
    /// Bytes transferred.
    pub bytes: u64,
}

/// Opens the image, prints the `Sending ...` line, runs the requests, prints
/// `Run completed in X seconds.` and closes the image (outside the timed part, as
/// `qemu-img bench` does).
pub fn run(opts: &BenchOptions, out: &mut dyn Write) -> Result<RunReport, BenchError> {
    let path = opts.file.display().to_string();
    let mut oo = OpenOptions::new().write(opts.write);
    if opts.force_share {
        oo = oo.lock(LockMode::ForceShare);
    }
    let image = oo.open(&opts.file).map_err(|source| BenchError::Open {
        path: path.clone(),
        source,
    })?;
    writeln!(
        out,
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        opts.count,
        if opts.write { "write" } else { "read" },
        opts.buffer_size,
        opts.depth,
        opts.offset,
        opts.effective_step()
    )?;
    if opts.flush_interval != 0 {
        writeln!(out, "Sending flush every {} requests", opts.flush_interval)?;
    }
    out.flush()?;
    let image = Arc::new(image);
    let result = run_requests(&image, opts);
    // Close outside the timed part; report a request error first.
    let closed = image.close().map_err(BenchError::Close);
    let report = result?;
    closed?;
    writeln!(
        out,
        "Run completed in {:.3} seconds.",
        report.elapsed.as_secs_f64()
    )?;
    Ok(report)
}

/// Runs the request sequence of `opts` against an open image and times it.
pub fn run_requests(image: &Arc<Image>, opts: &BenchOptions) -> Result<RunReport, BenchError> {
    let threads = opts.depth.min(opts.count).clamp(1, MAX_THREADS as u64) as usize;
    let size = image.size();
    let shared = Shared {
        image,
        opts,
        size,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        sched: Mutex::new(Sched {
            issued: 0,
            in_flight: 0,
            paused: false,
        }),
        wake: Condvar::new(),
        ready: Barrier::new(threads + 1),
        go: Mutex::new(false),
    };
    let t0 = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                shared.ready.wait();
                let mut go = shared.go.lock().unwrap_or_else(|p| p.into_inner());
                while !*go {
                    go = shared.wake.wait(go).unwrap_or_else(|p| p.into_inner());
                }
                drop(go);
                if opts.flush_interval == 0 {
                    shared.worker_plain();
                } else {
                    shared.worker_flushing();
                }
            });
        }
        // Every worker exists; start the clock before any of them may issue a request.
        shared.ready.wait();
        let t0 = Instant::now();
        *shared.go.lock().unwrap_or_else(|p| p.into_inner()) = true;
        shared.wake.notify_all();
        // Leaving the scope joins every worker.
        t0
    });
    let elapsed = t0.elapsed();
    if let Some(e) = shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(RunReport {
        elapsed,
        requests: opts.count,
        bytes: opts.count * opts.buffer_size,
    })
}

struct Sched {
    issued: u64,
    in_flight: u64,
    paused: bool,
}

struct Shared<'a> {
    image: &'a Image,
    opts: &'a BenchOptions,
    size: u64,
    next: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<BenchError>>,
    sched: Mutex<Sched>,
    /// Signals `go`, scheduler changes and failures.
    wake: Condvar,
    ready: Barrier,
    go: Mutex<bool>,
}

impl Shared<'_> {
    fn fail(&self, e: BenchError) {
        self.failed.store(true, Ordering::Relaxed);
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        // Take the scheduler lock so no waiter misses the wake-up.
        drop(self.sched.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_all();
    }

    fn io(&self, buf: &mut [u8], index: u64) -> Result<(), BenchError> {
        let offset = self.opts.request_offset(index, self.size);
        let r = if self.opts.write {
            self.image.write_at(buf, offset)
        } else {
            self.image.read_at(buf, offset)
        };
        r.map_err(|source| BenchError::Request { offset, source })
    }

    fn buffer(&self) -> Vec<u8> {
        vec![self.opts.pattern; self.opts.buffer_size as usize]
    }

    /// No flushes: take the next request index until all are issued.
    fn worker_plain(&self) {
        let mut buf = self.buffer();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.opts.count {
                return;
            }
            if let Err(e) = self.io(&mut buf, index) {
                self.fail(e);
                return;
            }
        }
    }

    /// With `--flush-interval`: QEMU's rule. When a request completes and the number of
    /// requests not yet issued is a multiple of the interval, flush; with draining,
    /// issue nothing new until the requests in flight have completed and the flush is
    /// done.
    fn worker_flushing(&self) {
        let mut buf = self.buffer();
        let count = self.opts.count;
        let interval = self.opts.flush_interval;
        loop {
            let index = {
                let mut st = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if self.failed.load(Ordering::Relaxed) || st.issued >= count {
                        return;
                    }
                    if !st.paused {
                        break;
                    }
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.issued += 1;
                st.in_flight += 1;
                st.issued - 1
            };
            if let Err(e) = self.io(&mut buf, index) {
                self.fail(e);
                return;
            }
            let mut st = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            let remaining = count - st.issued;
            st.in_flight -= 1;
            if !remaining.is_multiple_of(interval) {
                continue;
            }
            if self.opts.drain {
                st.paused = true;
                if st.in_flight > 0 {
                    // The last request in flight flushes.
                    continue;
                }
                drop(st);
                let r = self.image.flush();
                let mut st = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                st.paused = false;
                drop(st);
                self.wake.notify_all();
                if let Err(e) = r {
                    self.fail(BenchError::Flush(e));
                    return;
                }
            } else {
                drop(st);
                if let Err(e) = self.image.flush() {
                    self.fail(BenchError::Flush(e));
                    return;
                }
            }
        }
    }
}

// ---- fixtures ---------------------------------------------------------------------

/// The message a bench or test panics with when QEMU's tools are missing.
pub const QEMU_MISSING: &str = "qemu-img not found: install qemu-utils (scripts/test does)";

/// Path of a QEMU tool (`qemu-img`, `qemu-io`): `/usr/bin/NAME` or the first `NAME` on
/// `PATH`. Panics with [`QEMU_MISSING`] when it is not installed.
pub fn qemu_tool(name: &str) -> PathBuf {
    let fixed = Path::new("/usr/bin").join(name);
    if fixed.is_file() {
        return fixed;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{QEMU_MISSING}");
}

/// Path of `qemu-img`; panics with [`QEMU_MISSING`] when it is missing.
pub fn qemu_img() -> PathBuf {
    qemu_tool("qemu-img")
}

/// Runs a QEMU tool with `args` and returns its standard output. Panics (with the
/// tool's standard error) when it fails: fixtures have no other way to report.
pub fn run_tool(tool: &str, args: &[&str]) -> String {
    let exe = qemu_tool(tool);
    let out = Command::new(&exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{} {:?} failed: {}{}",
        exe.display(),
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `byte` over `[0, len)` of an open image in 1 MiB requests.
pub fn fill(image: &Image, len: u64, byte: u8) -> qcowx_core::Result<()> {
    let chunk = vec![byte; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(chunk.len() as u64) as usize;
        image.write_at(&chunk[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> BenchOptions {
        match parse_args(args.iter().copied()) {
            Ok(Invocation::Run(o)) => o,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn parses_qemu_img_bench_options() {
        let o = opts(&[
            "-c",
            "100",
            "-d8",
            "-s",
            "64k",
            "-S",
            "1M",
            "-o",
            "512",
            "-w",
            "--pattern=0x5a",
            "-t",
            "none",
            "-f",
            "qcow2",
            "img.qcow2",
        ]);
        assert_eq!(o.count, 100);
        assert_eq!(o.depth, 8);
        assert_eq!(o.buffer_size, 65536);
        assert_eq!(o.step, 1 << 20);
        assert_eq!(o.offset, 512);
        assert!(o.write);
        assert_eq!(o.pattern, 0x5a);
        assert_eq!(o.cache.as_deref(), Some("none"));
        assert_eq!(o.file, PathBuf::from("img.qcow2"));

        let o = opts(&["-wq", "--flush-interval", "64", "--no-drain", "x"]);
        assert!(o.write && !o.drain);
        assert_eq!(o.flush_interval, 64);
        assert_eq!(o.depth, 64);
        assert_eq!(o.effective_step(), 4096);
    }

    #[test]
    fn rejects_what_qemu_img_rejects() {
        for bad in [
            &["-c", "0", "x"][..],
            &["-d", "0", "x"],
            &["-s", "0", "x"],
            &["--pattern", "256", "-w", "x"],
            &["--flush-interval", "64", "x"],
            &["-w", "--flush-interval", "8", "-d", "16", "x"],
            &["-f", "raw", "x"],
            &["-t", "bogus", "x"],
            &["-c"],
            &[],
            &["a", "b"],
            &["--bogus", "x"],
        ] {
            assert!(
                matches!(parse_args(bad.iter().copied()), Err(BenchError::Usage(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(parse_args(["-h"]).ok(), Some(Invocation::Help));
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn sequence_wraps_modulo_the_disk_size() {
        // The first request is unwrapped, later ones wrap (QEMU 10.0's rule).
        let size = 1 << 20;
        let got: Vec<u64> = (0..5)
            .map(|i| request_offset(3 << 20, 400 << 10, size, i))
            .collect();
        let mut want = vec![3 << 20];
        let mut cur: u64 = 3 << 20;
        for _ in 1..5 {
            cur = (cur + (400 << 10)) % size;
            want.push(cur);
        }
        assert_eq!(got, want);
        assert_eq!(request_offset(0, 4096, 0, 7), 0);
    }
}
