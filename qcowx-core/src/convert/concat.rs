//! [`Concat`]: several disks read one after the other as one, what `qemu-img convert`
//! copies when it is given several sources.

use std::path::Path;

use super::content::Content;
use crate::engine::Extent;
use crate::error::{Error, Result};

/// Several [`Content`]s end to end: the first's bytes, then the second's, and so on.
/// Its size is the sum of theirs; its block status is each part's, moved to where the
/// part starts (without host offsets, which name different files).
///
/// ```
/// use qcowx_core::convert::{convert, Concat, Content, ConvertOptions, ImageFormat, RawFile};
/// use qcowx_core::LockMode;
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
/// std::fs::write(&a, [1u8; 512]).unwrap();
/// std::fs::write(&b, [2u8; 1024]).unwrap();
/// let both = Concat::new(vec![
///     Box::new(RawFile::open(&a, LockMode::Shared)?),
///     Box::new(RawFile::open(&b, LockMode::Shared)?),
/// ])?;
/// assert_eq!(both.size()?, 1536);
/// assert_eq!(both.files(), [a.as_path(), b.as_path()]);
/// let mut buf = [0u8; 4];
/// both.read_at(&mut buf, 510)?;
/// assert_eq!(buf, [1, 1, 2, 2]);
/// let extents = both.block_status(0, 1536)?;
/// assert_eq!(extents.last().map(|e| e.offset + e.length), Some(1536));
///
/// // As `qemu-img convert a.raw b.raw -O raw out.raw` does.
/// let out = dir.path().join("out.raw");
/// convert(&both, &out, &ConvertOptions::new(ImageFormat::Raw), &mut |_, _| {})?;
/// assert_eq!(std::fs::read(&out).unwrap()[510..514], [1, 1, 2, 2]);
/// # Ok(()) }
/// ```
pub struct Concat {
    parts: Vec<Box<dyn Content>>,
    /// Where each part starts, and (last) the total size.
    starts: Vec<u64>,
    name: String,
}

impl Concat {
    /// The parts, in order. Refused when there are none or their sizes add up past
    /// what a disk can be (`u64`).
    pub fn new(parts: Vec<Box<dyn Content>>) -> Result<Concat> {
        if parts.is_empty() {
            return Err(Error::InvalidArgument("no source to concatenate".into()));
        }
        let mut starts = vec![0u64];
        for p in &parts {
            let end = starts[starts.len() - 1]
                .checked_add(p.size()?)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{}: the sources' sizes add up past 2^64 bytes",
                        p.name()
                    ))
                })?;
            starts.push(end);
        }
        let name = parts
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(" + ");
        Ok(Concat {
            parts,
            starts,
            name,
        })
    }

    /// Calls `f(part, offset in the part, at in the range, bytes)` for each piece of
    /// `[offset, offset + len)`, in order.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&dyn Content, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.total())
            .ok_or_else(|| Error::OutOfRange {
                file: self.name.clone(),
                offset,
                len,
                size: self.total(),
            })?;
        let mut pos = offset;
        // The last part starting at or before `pos`: parts of size 0 are skipped.
        let mut i = self.starts.partition_point(|&s| s <= pos).saturating_sub(1);
        while pos < end && i < self.parts.len() {
            let (start, stop) = (self.starts[i], self.starts[i + 1]);
            let n = stop.min(end) - pos;
            if n > 0 {
                f(self.parts[i].as_ref(), pos - start, pos - offset, n)?;
                pos += n;
            }
            i += 1;
        }
        Ok(())
    }

    fn total(&self) -> u64 {
        self.starts[self.starts.len() - 1]
    }
}

impl Content for Concat {
    fn name(&self) -> &str {
        &self.name
    }
    fn path(&self) -> Option<&Path> {
        None
    }
    fn files(&self) -> Vec<&Path> {
        self.parts.iter().flat_map(|p| p.files()).collect()
    }
    fn size(&self) -> Result<u64> {
        Ok(self.total())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.pieces(offset, buf.len() as u64, |part, at, from, n| {
            part.read_at(&mut buf[from as usize..(from + n) as usize], at)
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        self.pieces(offset, len, |part, at, from, n| {
            for e in part.block_status(at, n)? {
                out.push(Extent {
                    offset: e.offset - at + offset + from,
                    host_offset: None,
                    ..e
                });
            }
            Ok(())
        })?;
        Ok(out)
    }
}
