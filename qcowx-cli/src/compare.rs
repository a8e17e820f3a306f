//! Content comparison of two disks, as `qemu-img compare` does it.
//!
//! [`compare`] walks both disks' block status and reads only where at least one of
//! them holds data; ranges that read as zeros in both are skipped. Over the common
//! size the bytes must be equal; when the sizes differ, the larger disk's extra part
//! must read as zeros. The first mismatch is reported at 512-byte granularity (the
//! start of the first sector that differs), as `qemu-img compare` reports it.

use qcowx_core::convert::{Content, COPY_CHUNK};
use qcowx_core::engine::STATUS_WINDOW;
use qcowx_core::Result;
use qcowx_core::{Extent, ExtentStatus};

/// What [`compare`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareReport {
    /// Virtual size of the first disk.
    pub size_a: u64,
    /// Virtual size of the second disk.
    pub size_b: u64,
    /// The offset of the first 512-byte sector whose content differs (past the
    /// common size: that is not all zeros), or `None` when the contents are equal.
    pub mismatch: Option<u64>,
}

impl CompareReport {
    /// Whether the disks read the same (a size difference whose extra part reads as
    /// zeros counts as the same, as in `qemu-img compare` without `-s`).
    pub fn identical(&self) -> bool {
        self.mismatch.is_none()
    }
}

/// Sub-ranges of `[start, end)` where `ext` (sorted, tiling the window) says data.
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
    let i = a.iter().zip(b).position(|(x, y)| x != y)?;
    let at = base + i as u64;
    Some((at / 512 * 512).max(base))
}

/// Compares the contents of `a` and `b`. `progress` is called with the bytes walked
/// so far and the total (the larger size).
pub fn compare(
    a: &dyn Content,
    b: &dyn Content,
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
    let mut buf_a: Vec<u8> = Vec::new();
    let mut buf_b: Vec<u8> = Vec::new();
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
        for s in [size_a, size_b] {
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
                    report.mismatch = Some(at);
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
        use qcowx_core::{CreateOptions, Image};
        let dir = tempfile::tempdir().unwrap();
        let a = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
        let b = Image::create(dir.path().join("b.qcow2"), &CreateOptions::new(2 << 20))?;
        a.write_at(b"same", 4096)?;
        b.write_at(b"same", 4096)?;
        assert!(compare(&a, &b, &mut |_, _| {})?.identical());
        b.write_at(b"!", (1 << 20) + 1000)?;
        assert_eq!(
            compare(&a, &b, &mut |_, _| {})?.mismatch,
            Some((1 << 20) + 512)
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
    }
}
