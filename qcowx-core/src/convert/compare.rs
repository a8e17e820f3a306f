//! Content comparison of two disks, as `qemu-img compare` does it.
//!
//! [`compare`] walks both disks' block status and reads only where at least one of
//! them holds data; ranges that read as zeros in both are skipped. Over the common
//! size the bytes must be equal; when the sizes differ, the larger disk's extra part
//! must read as zeros. The first mismatch is reported at 512-byte granularity (the
//! start of the first sector that differs), as `qemu-img compare` reports it.
//!
//! In strict mode (`qemu-img compare -s`) the sizes must be equal too, and so must the
//! block status, judged as QEMU judges it: data against zeros, a zero cluster against
//! an unallocated one, stored against compressed, and a run of one status that reaches
//! the end of the disk against one that does not all differ.

use super::content::{Content, COPY_CHUNK};
use crate::engine::{Extent, ExtentStatus, STATUS_WINDOW};
use crate::error::Result;
use crate::storage::io_buf;

/// How [`compare`] compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareOptions {
    /// `qemu-img compare -s`: different sizes or allocation make the disks differ.
    pub strict: bool,
}

/// The first difference [`compare`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The content of the 512-byte sector at this offset differs (past the common
    /// size: it is not all zeros).
    Content(u64),
    /// Strict mode: the virtual sizes differ.
    Size,
    /// Strict mode: the block status differs from this offset.
    Status(u64),
}

/// What [`compare`] found.
///
/// ```
/// use qcowx_core::convert::{compare, CompareOptions, Mismatch};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let a = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let b = Image::create(dir.path().join("b.qcow2"), &CreateOptions::new(2 << 20))?;
/// let r = compare(&a, &b, CompareOptions::default(), &mut |_, _| {})?;
/// assert!(r.identical()); // b's extra MiB reads as zeros
/// b.write_at(b"x", 4096 + 7)?;
/// let r = compare(&a, &b, CompareOptions::default(), &mut |_, _| {})?;
/// assert_eq!((r.mismatch, r.mismatch_offset()), (Some(Mismatch::Content(4096)), Some(4096)));
/// let r = compare(&a, &b, CompareOptions { strict: true }, &mut |_, _| {})?;
/// assert_eq!((r.mismatch, r.mismatch_offset()), (Some(Mismatch::Size), None));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareReport {
    /// Virtual size of the first disk.
    pub size_a: u64,
    /// Virtual size of the second disk.
    pub size_b: u64,
    /// The first difference, or `None` when the disks compare equal.
    pub mismatch: Option<Mismatch>,
}

impl CompareReport {
    /// Whether the disks compare equal (without strict mode, a size difference whose
    /// extra part reads as zeros counts as equal, as in `qemu-img compare`).
    pub fn identical(&self) -> bool {
        self.mismatch.is_none()
    }

    /// The offset of the first difference (`None` for none, or for sizes).
    pub fn mismatch_offset(&self) -> Option<u64> {
        match self.mismatch? {
            Mismatch::Content(at) | Mismatch::Status(at) => Some(at),
            Mismatch::Size => None,
        }
    }
}

/// What strict mode tells apart at an offset, as QEMU's block status flags tell it:
/// data stored in place, data stored compressed, data over a hole, zeros recorded,
/// nothing; and whether the run of that status from there reaches the end of the disk
/// (QEMU's `BDRV_BLOCK_EOF`, which its strict mode compares too).
type StrictClass = (ExtentStatus, bool, bool);

/// Where the last run of one block status begins on `c` (`size` bytes): the status
/// QEMU reports from any offset past it carries the end-of-disk flag. A run of data
/// ends where its host offsets stop following on, as QEMU's runs of data do.
fn tail_start(c: &dyn Content, size: u64) -> Result<u64> {
    let mut run_start = 0u64;
    let mut last: Option<Extent> = None;
    let mut window = 0u64;
    while window < size {
        let wlen = STATUS_WINDOW.min(size - window);
        for e in c.block_status(window, wlen)? {
            let continues = last.is_some_and(|l| {
                l.status == e.status
                    && match (l.host_offset, e.host_offset) {
                        (None, None) => true,
                        (Some(h), Some(n)) => h + l.length == n,
                        _ => false,
                    }
            });
            if !continues {
                run_start = e.offset;
            }
            last = Some(e);
        }
        window += wlen;
    }
    Ok(run_start)
}

/// The strict class of `ext` (sorted, tiling the window) at `at`, on a disk whose
/// [`tail_start`] is `tail`; `None` past the disk's end.
fn class_at(ext: &[Extent], tail: u64, at: u64) -> Option<StrictClass> {
    ext.iter()
        .find(|e| e.offset <= at && at < e.offset + e.length)
        .map(|e| (e.status, e.host_offset.is_some(), at >= tail))
}

/// Whether `ext` (sorted, tiling the window) says data anywhere in `[start, end)`.
fn data_at(ext: &[Extent], start: u64, end: u64) -> bool {
    ext.iter()
        .any(|e| e.status == ExtentStatus::Data && e.offset < end && start < e.offset + e.length)
}

/// Boundaries of the extents inside `[start, end)`.
fn cuts(ext: &[Extent], start: u64, end: u64, out: &mut Vec<u64>) {
    for e in ext {
        for b in [e.offset, e.offset + e.length] {
            if b > start && b < end {
                out.push(b);
            }
        }
    }
}

/// The first sector-aligned offset (relative to `base`) where `a` and `b` differ.
fn first_diff(a: &[u8], b: &[u8], base: u64) -> Option<u64> {
    // Whole slices first (memcmp); only a difference is looked for sector by sector.
    if a == b {
        return None;
    }
    let mut off = 0usize;
    while off < a.len() {
        let at = base + off as u64;
        let end = ((at / 512 + 1) * 512 - base).min(a.len() as u64) as usize;
        if a[off..end] != b[off..end] {
            return Some((at / 512 * 512).max(base));
        }
        off = end;
    }
    None
}

/// Compares the contents of `a` and `b`, as `opts` say. `progress` is called with the
/// bytes walked so far and the total (the larger size).
///
/// ```
/// use qcowx_core::convert::{compare, CompareOptions, Mismatch};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let a = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let b = Image::create(dir.path().join("b.qcow2"), &CreateOptions::new(1 << 20))?;
/// a.write_at(&[0u8; 4096], 0)?; // zeros, stored as data
/// let plain = compare(&a, &b, CompareOptions::default(), &mut |_, _| {})?;
/// assert!(plain.identical());
/// let strict = compare(&a, &b, CompareOptions { strict: true }, &mut |_, _| {})?;
/// assert_eq!(strict.mismatch, Some(Mismatch::Status(0)));
/// # Ok(()) }
/// ```
pub fn compare(
    a: &dyn Content,
    b: &dyn Content,
    opts: CompareOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CompareReport> {
    let size_a = a.size()?;
    let size_b = b.size()?;
    let total = size_a.max(size_b);
    let mut report = CompareReport {
        size_a,
        size_b,
        mismatch: None,
    };
    if opts.strict && size_a != size_b {
        report.mismatch = Some(Mismatch::Size);
        return Ok(report);
    }
    let tails = if opts.strict {
        (tail_start(a, size_a)?, tail_start(b, size_b)?)
    } else {
        (0, 0)
    };
    let mut buf_a = io_buf(0);
    let mut buf_b = io_buf(0);
    let mut window = 0u64;
    while window < total {
        let wend = (window + STATUS_WINDOW).min(total);
        // Status of each side inside the window (nothing past a side's end).
        let status = |c: &dyn Content, size: u64| -> Result<Vec<Extent>> {
            if window >= size {
                return Ok(Vec::new());
            }
            c.block_status(window, wend.min(size) - window)
        };
        let ea = status(a, size_a)?;
        let eb = status(b, size_b)?;
        let mut bounds = vec![window, wend];
        cuts(&ea, window, wend, &mut bounds);
        cuts(&eb, window, wend, &mut bounds);
        for s in [size_a, size_b, tails.0, tails.1] {
            if s > window && s < wend {
                bounds.push(s);
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        for pair in bounds.windows(2) {
            let (start, end) = (pair[0], pair[1]);
            let in_a = start < size_a;
            let in_b = start < size_b;
            let data_a = in_a && data_at(&ea, start, end);
            let data_b = in_b && data_at(&eb, start, end);
            if opts.strict {
                // The pieces are cut at every extent boundary and at both tails, so
                // each side has one class across the piece.
                if class_at(&ea, tails.0, start) != class_at(&eb, tails.1, start) {
                    report.mismatch = Some(Mismatch::Status(start));
                    progress(total, total);
                    return Ok(report);
                }
            }
            if !data_a && !data_b {
                continue;
            }
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(COPY_CHUNK as u64) as usize;
                buf_a.resize(n, 0);
                buf_b.resize(n, 0);
                if data_a {
                    a.read_at(&mut buf_a, pos)?;
                } else {
                    buf_a.fill(0);
                }
                if data_b {
                    b.read_at(&mut buf_b, pos)?;
                } else {
                    buf_b.fill(0);
                }
                if let Some(at) = first_diff(&buf_a, &buf_b, pos) {
                    report.mismatch = Some(Mismatch::Content(at));
                    progress(total, total);
                    return Ok(report);
                }
                pos += n as u64;
                progress(pos, total);
            }
        }
        window = wend;
        progress(window, total);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_two_images() -> Result<()> {
        use crate::{CreateOptions, Image};
        let dir = tempfile::tempdir().unwrap();
        let a = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
        let b = Image::create(dir.path().join("b.qcow2"), &CreateOptions::new(2 << 20))?;
        a.write_at(b"same", 4096)?;
        b.write_at(b"same", 4096)?;
        let opts = CompareOptions::default();
        assert!(compare(&a, &b, opts, &mut |_, _| {})?.identical());
        b.write_at(b"!", (1 << 20) + 1000)?;
        assert_eq!(
            compare(&a, &b, opts, &mut |_, _| {})?.mismatch,
            Some(Mismatch::Content((1 << 20) + 512))
        );
        let strict = CompareOptions { strict: true };
        assert_eq!(
            compare(&a, &b, strict, &mut |_, _| {})?.mismatch,
            Some(Mismatch::Size)
        );
        Ok(())
    }

    #[test]
    fn first_diff_is_sector_aligned() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(first_diff(&a, &b, 4096), None);
        b[1000] = 1;
        assert_eq!(first_diff(&a, &b, 4096), Some(4096 + 512));
        b[3] = 1;
        assert_eq!(first_diff(&a, &b, 4096), Some(4096));
        // A base inside a sector: sectors are absolute, never before the base.
        let base = 4096 + 100;
        let mut b = a.clone();
        b[500] = 1; // absolute 4696, in the sector at 4608
        assert_eq!(first_diff(&a, &b, base), Some(4608));
        b[10] = 1; // absolute 4206, in the sector that starts before the base
        assert_eq!(first_diff(&a, &b, base), Some(base));
        // The last byte of a slice that ends inside a sector.
        let (a, mut b) = (vec![7u8; 1000], vec![7u8; 1000]);
        b[999] = 0;
        assert_eq!(first_diff(&a, &b, 0), Some(512));
    }
}
