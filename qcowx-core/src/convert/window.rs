//! Part of a disk as a disk of its own: [`Window`], and [`dd_range`], the part
//! `qemu-img dd` copies.

use std::path::Path;

use super::content::Content;
use crate::engine::Extent;
use crate::error::{Error, Result};

/// `len` bytes of `inner` from `start`, read as a disk of `len` bytes (what `qcowx dd`
/// converts).
///
/// ```
/// use qcowx_core::convert::{Content, Window};
/// use qcowx_core::{CreateOptions, ExtentStatus, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// img.write_at(&[7; 65536], 65536)?;
/// let w = Window::new(&img, 32768, 65536)?;
/// let mut b = [0u8; 2];
/// w.read_at(&mut b, 32767)?;
/// assert_eq!(b, [0, 7]);
/// let ext = w.block_status(0, 65536)?;
/// assert_eq!((ext[1].offset, ext[1].status), (32768, ExtentStatus::Data));
/// # Ok(()) }
/// ```
pub struct Window<'a> {
    inner: &'a dyn Content,
    start: u64,
    len: u64,
}

impl<'a> Window<'a> {
    /// The window `[start, start + len)` of `inner`, which must lie inside it.
    pub fn new(inner: &'a dyn Content, start: u64, len: u64) -> Result<Window<'a>> {
        let size = inner.size()?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!(
                "{}: {len} bytes from {start} run past the end of the disk ({size} bytes)",
                inner.name()
            )));
        }
        Ok(Window { inner, start, len })
    }
}

impl Content for Window<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn size(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, self.start + offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = self.inner.block_status(self.start + offset, len)?;
        for e in &mut out {
            e.offset -= self.start;
        }
        Ok(out)
    }
}

/// The bytes `qemu-img dd bs=BS count=COUNT skip=SKIP` copies from a disk of `size`
/// bytes, as `(start, len)`, computed as qemu-img computes them: the input ends at
/// `COUNT × BS` (when that is shorter than the disk) and the copy starts at
/// `SKIP × BS`, so `skip` also shortens what `count` allows. `None` when the start
/// lies past that end: qemu-img then warns "cannot skip to specified offset" and
/// writes an empty output.
///
/// ```
/// use qcowx_core::convert::dd_range;
///
/// assert_eq!(dd_range(4096, 512, None, 0), Some((0, 4096)));
/// assert_eq!(dd_range(4096, 512, Some(4), 0), Some((0, 2048)));
/// assert_eq!(dd_range(4096, 512, Some(4), 2), Some((1024, 1024)));
/// assert_eq!(dd_range(4096, 512, None, 8), Some((4096, 0)));
/// assert_eq!(dd_range(4096, 512, None, 9), None);
/// ```
pub fn dd_range(size: u64, bs: u64, count: Option<u64>, skip: u64) -> Option<(u64, u64)> {
    let end = match count.and_then(|c| c.checked_mul(bs)) {
        Some(limit) if limit < size => limit,
        _ => size,
    };
    let start = skip.checked_mul(bs).filter(|&s| s <= end)?;
    Some((start, end - start))
}
