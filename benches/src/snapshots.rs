//! Fixtures and timing helpers for the snapshot benches: the criterion bench
//! `benches/snapshots.rs` and the `compare-snapshots` script.
//!
//! `benches/compare` needs a few library-level measurements that no command-line tool
//! makes (the latency of [`Image::snapshot`] itself, without process start, open and
//! close; [`Image::gc`] and [`Image::diff`] alone), and a fast way to give an image
//! thousands of snapshots. The `qcowx-bench-tool` binary provides them: it calls
//! [`tool_main`] (see [`TOOL_USAGE`]).
//!
//! Every helper takes snapshots of the default VDI through the public API, on images in
//! ordinary files, with every `fdatasync` qcowx-core issues — except
//! [`open_unsynced`], which setup code uses to build images with many snapshots fast
//! (see [`NoSync`]).

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcowx_core::storage::{FileStorage, OpenMode, Storage};
use qcowx_core::{GcReport, Image, OpenOptions, RootKind};

use crate::run_tool;

/// The VDI every helper snapshots.
pub const VDI: &str = "default";

/// Usage of the `tool` mode of the `snapshots` bench binary.
pub const TOOL_USAGE: &str = "\
Usage: qcowx-bench-tool populate [--sync] FILE COUNT [PREFIX]
       qcowx-bench-tool latency [--nosync] FILE SAMPLES [PREFIX]
       qcowx-bench-tool gc [--nosync] FILE
       qcowx-bench-tool diff FILE FROM TO SAMPLES

populate  takes snapshots of the default VDI named PREFIXnnnnn (default prefix 'p')
          until FILE has COUNT live snapshots, on storage whose fdatasync does
          nothing (one real fdatasync at the end) unless --sync is given; prints
          added=N seconds=S (the snapshot calls) total_seconds=S (open to sync)
          synced=BOOL
latency   takes SAMPLES snapshots of the default VDI, timing each Image::snapshot call
          alone, deletes each one after it is timed, then runs gc (untimed) so the
          table is back to what it was; prints samples=N median_us=.. min_us=..
          max_us=.. first_us=..; with --nosync, on storage whose fdatasync does
          nothing (the cost of the code and its writes, without the disk flushes)
gc        opens FILE, runs Image::gc and closes it, timing the three separately;
          prints open_s=.. gc_s=.. close_s=.. roots_removed=.. clusters_freed=..
          bytes_freed=.. file_before=.. file_after=..; with --nosync, on storage
          whose fdatasync does nothing (the scan and its writes, without the disk
          flushes; one real fdatasync after close)
diff      opens FILE read-only and runs Image::diff FROM TO SAMPLES times; prints
          samples=N median_us=.. min_us=.. ranges=N bytes=N
";

/// A [`FileStorage`] whose `fdatasync` does nothing: for building fixtures only.
///
/// Taking a snapshot costs three `fdatasync` calls, whose latency on a small VM is a few
/// milliseconds and very uneven, so giving an image 65,000 snapshots one durable
/// operation at a time takes many minutes. The bytes written are the same; only
/// durability between operations is given up, and [`Unsynced::finish`] makes
/// everything durable at the end.
pub use qcowx_core::storage::DeferredSync as NoSync;

/// An image opened for writing on [`NoSync`] storage.
#[derive(Debug)]
pub struct Unsynced {
    /// The open image.
    pub image: Image,
    storage: Arc<NoSync>,
}

impl Unsynced {
    /// Closes the image (refcounts, dirty bit) and makes the file durable with one
    /// `fdatasync` on the real file.
    pub fn finish(self) -> qcowx_core::Result<()> {
        self.image.close()?;
        self.storage.sync_now().map_err(|e| qcowx_core::Error::Io {
            file: self
                .storage
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            op: "fdatasync",
            offset: 0,
            source: e,
        })
    }
}

/// Opens `path` for writing on [`NoSync`] storage (exclusive image lock, as
/// [`Image::open_rw`] takes).
pub fn open_unsynced(path: &Path) -> qcowx_core::Result<Unsynced> {
    let file =
        FileStorage::open(path, OpenMode::read_write()).map_err(|e| qcowx_core::Error::Io {
            file: path.display().to_string(),
            op: "open",
            offset: 0,
            source: e.into(),
        })?;
    let storage = Arc::new(NoSync::new(file));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::from_storage(dynamic, &OpenOptions::new().write(true))?;
    Ok(Unsynced { image, storage })
}

/// Number of live snapshots (not VDIs, not deleted) of an open image.
pub fn snapshot_count(image: &Image) -> qcowx_core::Result<usize> {
    Ok(image
        .list()?
        .iter()
        .filter(|r| r.kind == RootKind::Snapshot)
        .count())
}

/// What [`populate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Populated {
    /// Snapshots taken.
    pub added: usize,
    /// Time spent in [`Image::snapshot`] calls (all of them, back to back).
    pub elapsed: Duration,
}

/// Takes snapshots of the default VDI until `image` has `count` live snapshots. New
/// snapshots are named `PREFIX` followed by a 5-digit (or longer) number, skipping
/// names already taken.
pub fn populate(image: &Image, count: usize, prefix: &str) -> qcowx_core::Result<Populated> {
    let roots = image.list()?;
    let taken: HashSet<String> = roots.iter().map(|r| r.name.clone()).collect();
    let have = roots
        .iter()
        .filter(|r| r.kind == RootKind::Snapshot)
        .count();
    let mut added = 0;
    let mut n = have;
    let t0 = Instant::now();
    while have + added < count {
        let name = format!("{prefix}{n:05}");
        n += 1;
        if taken.contains(&name) {
            continue;
        }
        image.snapshot(VDI, &name)?;
        added += 1;
    }
    Ok(Populated {
        added,
        elapsed: t0.elapsed(),
    })
}

/// Takes `samples` snapshots of the default VDI named `PREFIXn`, timing each
/// [`Image::snapshot`] call alone, and deletes each one right after (untimed), so every
/// sample sees the same live snapshots (deleted entries stay in the table until gc).
pub fn time_snapshots(
    image: &Image,
    samples: usize,
    prefix: &str,
) -> qcowx_core::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let name = format!("{prefix}{i}");
        let t0 = Instant::now();
        image.snapshot(VDI, &name)?;
        times.push(t0.elapsed());
        image.delete_snapshot(&name)?;
    }
    Ok(times)
}

/// The median of `times` (the mean of the two middle values for an even count; zero
/// for none).
pub fn median(times: &[Duration]) -> Duration {
    let mut v = times.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

/// Creates a QCOW2 image of `size` bytes (64 KiB clusters) with `qemu-img create -o
/// preallocation=metadata`: every cluster is allocated (an L2 entry and a refcount) but
/// no data is written, so the file stays sparse where the file system supports holes.
/// Panics when `qemu-img` is missing or fails (a fixture has no other way to report).
pub fn preallocated(path: &Path, size: u64) {
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536,preallocation=metadata",
            path.to_str().expect("utf-8 path"),
            &size.to_string(),
        ],
    );
}

/// Errors of the tool mode.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The command line is wrong.
    #[error("{0}\n{TOOL_USAGE}")]
    Usage(String),
    /// qcowx-core failed.
    #[error("{0}")]
    Image(#[from] qcowx_core::Error),
    /// Writing the report failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

fn number(text: &str, what: &str) -> Result<usize, ToolError> {
    text.parse()
        .map_err(|_| ToolError::Usage(format!("{what} must be a number, not '{text}'")))
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// Runs the tool mode with the arguments after `tool`, writing its report to `out`.
pub fn tool_run(args: &[String], out: &mut dyn Write) -> Result<(), ToolError> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["populate", rest @ ..] => {
            let (synced, rest) = match rest {
                ["--sync", rest @ ..] => (true, rest),
                _ => (false, rest),
            };
            let (file, count, prefix) = match rest {
                [file, count] => (*file, *count, "p"),
                [file, count, prefix] => (*file, *count, *prefix),
                _ => return Err(ToolError::Usage(format!("bad arguments: {args:?}"))),
            };
            let count = number(count, "COUNT")?;
            let t0 = Instant::now();
            let p = if synced {
                let image = Image::open_rw(file)?;
                let p = populate(&image, count, prefix)?;
                image.close()?;
                p
            } else {
                let u = open_unsynced(Path::new(file))?;
                let p = populate(&u.image, count, prefix)?;
                u.finish()?;
                p
            };
            writeln!(
                out,
                "added={} seconds={:.3} total_seconds={:.3} synced={}",
                p.added,
                p.elapsed.as_secs_f64(),
                t0.elapsed().as_secs_f64(),
                synced
            )?;
        }
        ["latency", rest @ ..] => {
            let (nosync, rest) = match rest {
                ["--nosync", rest @ ..] => (true, rest),
                _ => (false, rest),
            };
            let (file, samples, prefix) = match rest {
                [file, samples] => (*file, *samples, "lat"),
                [file, samples, prefix] => (*file, *samples, *prefix),
                _ => return Err(ToolError::Usage(format!("bad arguments: {args:?}"))),
            };
            let samples = number(samples, "SAMPLES")?;
            if samples == 0 {
                return Err(ToolError::Usage("SAMPLES must be at least 1".into()));
            }
            let times = if nosync {
                let u = open_unsynced(Path::new(file))?;
                let times = time_snapshots(&u.image, samples, prefix)?;
                u.image.gc()?;
                u.finish()?;
                times
            } else {
                let image = Image::open_rw(file)?;
                let times = time_snapshots(&image, samples, prefix)?;
                image.gc()?;
                image.close()?;
                times
            };
            let min = times.iter().min().copied().unwrap_or_default();
            let max = times.iter().max().copied().unwrap_or_default();
            writeln!(
                out,
                "samples={} median_us={} min_us={} max_us={} first_us={}",
                times.len(),
                micros(median(&times)),
                micros(min),
                micros(max),
                micros(times[0])
            )?;
        }
        ["gc", rest @ ..] => {
            let (nosync, file) = match rest {
                ["--nosync", file] => (true, *file),
                [file] => (false, *file),
                _ => return Err(ToolError::Usage(format!("bad arguments: {args:?}"))),
            };
            let timed_gc = |img: &Image| -> qcowx_core::Result<(Duration, GcReport)> {
                let t1 = Instant::now();
                let r = img.gc()?;
                Ok((t1.elapsed(), r))
            };
            let t0 = Instant::now();
            let (open, gc, r, close) = if nosync {
                let u = open_unsynced(Path::new(file))?;
                let open = t0.elapsed();
                let (gc, r) = timed_gc(&u.image)?;
                let t2 = Instant::now();
                u.finish()?;
                (open, gc, r, t2.elapsed())
            } else {
                let image = Image::open_rw(file)?;
                let open = t0.elapsed();
                let (gc, r) = timed_gc(&image)?;
                let t2 = Instant::now();
                image.close()?;
                (open, gc, r, t2.elapsed())
            };
            writeln!(
                out,
                "open_s={:.6} gc_s={:.6} close_s={:.6} roots_removed={} clusters_freed={} bytes_freed={} file_before={} file_after={}",
                open.as_secs_f64(),
                gc.as_secs_f64(),
                close.as_secs_f64(),
                r.roots_removed,
                r.clusters_freed,
                r.bytes_freed,
                r.file_size_before,
                r.file_size_after
            )?;
        }
        ["diff", file, from, to, samples] => {
            let samples = number(samples, "SAMPLES")?;
            if samples == 0 {
                return Err(ToolError::Usage("SAMPLES must be at least 1".into()));
            }
            let image = Image::open(file)?;
            let mut times = Vec::with_capacity(samples);
            let mut ranges = Vec::new();
            for _ in 0..samples {
                let t0 = Instant::now();
                ranges = image.diff(from, to)?;
                times.push(t0.elapsed());
            }
            let min = times.iter().min().copied().unwrap_or_default();
            writeln!(
                out,
                "samples={} median_us={} min_us={} ranges={} bytes={}",
                times.len(),
                micros(median(&times)),
                micros(min),
                ranges.len(),
                ranges.iter().map(|r| r.length).sum::<u64>()
            )?;
        }
        ["-h" | "--help"] => write!(out, "{TOOL_USAGE}")?,
        _ => return Err(ToolError::Usage(format!("bad arguments: {args:?}"))),
    }
    Ok(())
}

/// Entry point of the tool mode: runs [`tool_run`] on standard output and returns the
/// process exit code (0 on success; 2 for a usage error; 1 otherwise, after printing
/// the error to standard error).
pub fn tool_main(args: &[String]) -> i32 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match tool_run(args, &mut out) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcowx-bench-tool: {e}");
            if matches!(e, ToolError::Usage(_)) {
                2
            } else {
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(5), ms(1), ms(3)]), ms(3));
        assert_eq!(
            median(&[ms(4), ms(1), ms(3), ms(2)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(&[]), Duration::ZERO);
    }

    #[test]
    fn populate_and_time_on_a_temp_image() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.qcow2");
        let image = Image::create(&path, &qcowx_core::CreateOptions::new(8 << 20)).expect("create");
        image.snapshot(VDI, "p00001").expect("snapshot");
        let p = populate(&image, 5, "p").expect("populate");
        assert_eq!(p.added, 4);
        assert_eq!(snapshot_count(&image).expect("count"), 5);
        let times = time_snapshots(&image, 3, "lat").expect("time");
        assert_eq!(times.len(), 3);
        assert_eq!(snapshot_count(&image).expect("count"), 5);
        image.close().expect("close");
    }

    #[test]
    fn tool_reports_and_rejects() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.qcow2");
        Image::create(&path, &qcowx_core::CreateOptions::new(8 << 20))
            .expect("create")
            .close()
            .expect("close");
        let file = path.to_str().expect("utf-8").to_string();
        let run = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let mut out = Vec::new();
            tool_run(&args, &mut out).map(|()| String::from_utf8(out).expect("utf-8"))
        };
        let text = run(&["populate", &file, "3"]).expect("populate");
        assert!(text.starts_with("added=3 "), "{text}");
        let text = run(&["latency", &file, "2"]).expect("latency");
        assert!(text.starts_with("samples=2 median_us="), "{text}");
        let text = run(&["latency", "--nosync", &file, "2"]).expect("latency");
        assert!(text.starts_with("samples=2 median_us="), "{text}");
        let text = run(&["diff", &file, "p00000", "default", "2"]).expect("diff");
        assert!(text.starts_with("samples=2 median_us="), "{text}");
        assert!(text.ends_with(" ranges=0 bytes=0\n"), "{text}");
        let text = run(&["gc", "--nosync", &file]).expect("gc");
        assert!(text.contains(" roots_removed=0 "), "{text}");
        let text = run(&["gc", &file]).expect("gc");
        assert!(text.contains(" roots_removed=0 "), "{text}");
        let image = Image::open(&path).expect("open");
        assert_eq!(snapshot_count(&image).expect("count"), 3);
        drop(image);
        assert!(matches!(
            run(&["latency", &file, "0"]),
            Err(ToolError::Usage(_))
        ));
        assert!(matches!(run(&["bogus"]), Err(ToolError::Usage(_))));
    }
}
