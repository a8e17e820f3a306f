//! `qcowx bench`: `qemu-img bench`'s simple image benchmark — `count` requests of
//! `buffer_size` bytes, reads or writes, `depth` of them in flight at once, starting at
//! `offset` and stepping `step` bytes (wrapping before the end of the disk).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::engine::Image;
use crate::error::{Error, Result};

/// What [`run`] sends; the defaults are `qemu-img bench`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// Requests to send.
    pub count: u64,
    /// Requests in flight at once.
    pub depth: u64,
    /// The first request's offset.
    pub offset: u64,
    /// Bytes per request.
    pub buffer_size: u64,
    /// From one request's offset to the next (default: the buffer size).
    pub step: Option<u64>,
    /// Writes instead of reads.
    pub write: bool,
    /// The byte written (writes only).
    pub pattern: u8,
    /// A flush after every this many requests (writes only; at least `depth`).
    pub flush_interval: Option<u64>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            count: 75000,
            depth: 64,
            offset: 0,
            buffer_size: 4096,
            step: None,
            write: false,
            pattern: 0,
            flush_interval: None,
        }
    }
}

impl BenchOptions {
    /// Refuses options [`run`] cannot follow on a disk of `disk` bytes.
    ///
    /// ```
    /// use qcowx_core::bench::BenchOptions;
    /// let opts = BenchOptions { write: true, flush_interval: Some(8), ..BenchOptions::default() };
    /// assert!(opts.check(1 << 30).is_err(), "fewer than the 64 in flight");
    /// assert!(BenchOptions::default().check(1 << 30).is_ok());
    /// assert!(BenchOptions::default().check(512).is_err(), "a request larger than the disk");
    /// ```
    pub fn check(&self, disk: u64) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(why));
        if self.depth == 0 || self.buffer_size == 0 {
            return bad("the depth and the buffer size must be at least 1".into());
        }
        if self.buffer_size > 1 << 30 {
            return bad("the buffer size is at most 1 GiB".into());
        }
        if self.buffer_size > disk {
            return bad(format!(
                "the buffer size {} is larger than the disk ({disk} bytes)",
                self.buffer_size
            ));
        }
        if let Some(n) = self.flush_interval {
            if !self.write {
                return bad("a flush interval is for writes (-w)".into());
            }
            if n < self.depth {
                return bad("the flush interval can't be smaller than the depth".into());
            }
        }
        Ok(())
    }

    /// The offset of request `i`: `offset + i × step`, wrapping as qemu-img wraps it
    /// (modulo the disk size less one buffer).
    ///
    /// ```
    /// use qcowx_core::bench::BenchOptions;
    /// let opts = BenchOptions { offset: 4096, step: Some(8192), ..BenchOptions::default() };
    /// assert_eq!(opts.offset_of(0, 1 << 20), 4096);
    /// assert_eq!(opts.offset_of(2, 1 << 20), 4096 + 2 * 8192);
    /// // 1 MiB less one 4 KiB request is where the offsets wrap.
    /// assert_eq!(opts.offset_of(128, 1 << 20), (4096 + 128 * 8192) % ((1 << 20) - 4096));
    /// ```
    pub fn offset_of(&self, i: u64, disk: u64) -> u64 {
        let step = self.step.unwrap_or(self.buffer_size);
        if disk <= self.buffer_size {
            return 0;
        }
        let span = disk - self.buffer_size;
        let start = self.offset % span;
        ((u128::from(start) + u128::from(i) * u128::from(step)) % u128::from(span)) as u64
    }
}

/// Runs the benchmark on `img` and returns how long it took.
///
/// ```
/// use qcowx_core::bench::{run, BenchOptions};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let opts = BenchOptions { count: 100, depth: 4, write: true, pattern: 7, ..BenchOptions::default() };
/// run(&img, &opts)?;
/// let mut b = [0u8; 1];
/// img.read_at(&mut b, 99 * 4096)?;
/// assert_eq!(b, [7]);
/// assert_eq!(opts.offset_of(300, 1 << 20), (300 * 4096) % ((1 << 20) - 4096));
/// # Ok(()) }
/// ```
pub fn run(img: &Image, opts: &BenchOptions) -> Result<Duration> {
    opts.check(img.size())?;
    let disk = img.size();
    let next = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..opts.depth.min(opts.count.max(1)))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    // Page-aligned, as qemu-img bench's buffers are (see storage::IoBuf).
                    let mut buf = crate::storage::io_buf(0);
                    buf.resize(opts.buffer_size as usize, opts.pattern);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= opts.count {
                            return Ok(());
                        }
                        let at = opts.offset_of(i, disk);
                        if opts.write {
                            img.write_at(&buf, at)?;
                            if opts
                                .flush_interval
                                .is_some_and(|n| (i + 1).is_multiple_of(n))
                            {
                                img.flush()?;
                            }
                        } else {
                            img.read_at(&mut buf, at)?;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| Error::InvalidArgument("a benchmark thread panicked".into()))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}
