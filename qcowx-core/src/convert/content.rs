//! What a conversion reads and reports: the [`Content`] trait (a readable disk) with
//! its implementations for images and VDIs, [`ExportStats`], and the progress
//! callback's type.

use std::path::Path;

use crate::engine::{Extent, Image};
use crate::error::Result;
use crate::vdi::Disk;

/// The largest buffer an export reads and writes at once.
pub const COPY_CHUNK: usize = 4 << 20;

/// What an [`export`](super::export) or [`convert`](super::convert) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Virtual size of the source, and of the output.
    pub virtual_size: u64,
    /// Bytes the source reported as data (read and inspected).
    pub data_bytes: u64,
    /// Bytes written to the output (data bytes that are not all zeros; for a
    /// compressed output, the guest bytes of the clusters written).
    pub written_bytes: u64,
    /// Clusters stored compressed (compressed qcow2 outputs only).
    pub compressed_clusters: u64,
    /// Bytes that could not be read and were copied as zeros
    /// ([`ConvertOptions::salvage`](super::ConvertOptions::salvage) only).
    pub unreadable_bytes: u64,
}

/// A readable disk: what [`convert`](super::convert) copies and `compare` compares. Implemented by
/// [`Image`] (its default VDI, backing chain included), [`Disk`] (any VDI or
/// snapshot) and [`RawFile`](super::RawFile); an embedder implements it to convert from anything else.
///
/// ```
/// use std::path::Path;
/// use qcowx_core::convert::{convert, Content, ConvertOptions, ImageFormat};
/// use qcowx_core::{Extent, ExtentStatus, Image};
///
/// /// A disk of `size` bytes that holds `0xab` in its first MiB and nothing after.
/// struct Pattern {
///     size: u64,
/// }
///
/// impl Content for Pattern {
///     fn name(&self) -> &str {
///         "pattern"
///     }
///     fn path(&self) -> Option<&Path> {
///         None
///     }
///     fn size(&self) -> qcowx_core::Result<u64> {
///         Ok(self.size)
///     }
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> qcowx_core::Result<()> {
///         for (i, b) in buf.iter_mut().enumerate() {
///             *b = if offset + (i as u64) < 1 << 20 { 0xab } else { 0 };
///         }
///         Ok(())
///     }
///     fn block_status(&self, offset: u64, len: u64) -> qcowx_core::Result<Vec<Extent>> {
///         let data_end = (1u64 << 20).clamp(offset, offset + len);
///         let mut out = Vec::new();
///         for (start, end, status) in [
///             (offset, data_end, ExtentStatus::Data),
///             (data_end, offset + len, ExtentStatus::Zero),
///         ] {
///             if end > start {
///                 out.push(Extent { offset: start, length: end - start, status, depth: 0, host_offset: None });
///             }
///         }
///         Ok(out)
///     }
/// }
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let out = dir.path().join("pattern.qcow2");
/// let stats = convert(&Pattern { size: 8 << 20 }, &out, &ConvertOptions::new(ImageFormat::Qcow2), &mut |_, _| {})?;
/// assert_eq!(stats.written_bytes, 1 << 20, "only the data range is written");
/// let img = Image::open(&out)?;
/// let mut b = [0u8; 2];
/// img.read_at(&mut b, (1 << 20) - 1)?;
/// assert_eq!(b, [0xab, 0]);
/// # Ok(()) }
/// ```
pub trait Content: Send + Sync {
    /// A name for messages (the file name).
    fn name(&self) -> &str;
    /// The file holding the content, when it is a file.
    fn path(&self) -> Option<&Path>;
    /// Every file the content is read from (a conversion refuses to write over one):
    /// by default [`Content::path`]'s.
    fn files(&self) -> Vec<&Path> {
        self.path().into_iter().collect()
    }
    /// Virtual size in bytes.
    fn size(&self) -> Result<u64>;
    /// Reads `buf.len()` bytes at `offset` (inside the virtual size).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The allocation status of `[offset, offset+len)` (inside the virtual size):
    /// ranges that are not [`ExtentStatus::Data`](crate::ExtentStatus::Data) read as zeros.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// The image whose active layer this is, when it is one: where
    /// [`ConvertOptions::bitmaps`](super::ConvertOptions::bitmaps) finds the bitmaps to copy (default: none).
    fn image(&self) -> Option<&Image> {
        None
    }
}

impl Content for Image {
    fn name(&self) -> &str {
        self.file_name()
    }
    fn path(&self) -> Option<&Path> {
        Image::path(self)
    }
    fn size(&self) -> Result<u64> {
        Ok(Image::size(self))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Image::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Image::block_status(self, offset, len)
    }
    fn image(&self) -> Option<&Image> {
        Some(self)
    }
}

impl Content for Disk {
    fn name(&self) -> &str {
        self.image().file_name()
    }
    fn path(&self) -> Option<&Path> {
        self.image().path()
    }
    fn size(&self) -> Result<u64> {
        Ok(Disk::size(self))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Disk::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Disk::block_status(self, offset, len)
    }
}

/// What a progress callback is told: bytes of the virtual disk walked so far, and
/// the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);
