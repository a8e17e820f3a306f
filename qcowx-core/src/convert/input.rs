//! The inputs of a conversion besides images: [`RawFile`], and [`open_input`], which
//! opens a file of either format as a [`Content`].

use std::path::{Path, PathBuf};

use super::content::Content;
use crate::engine::backing::ImageFormat;
use crate::engine::chain::raw_extents;
use crate::engine::Extent;
use crate::error::{Error, Result};
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, OpenMode, Storage};

/// A raw disk image file opened for reading. Its block status comes from the file
/// system (`SEEK_DATA`/`SEEK_HOLE`): holes read as zeros and are reported as
/// [`ExtentStatus::Zero`](crate::ExtentStatus::Zero).
#[derive(Debug)]
pub struct RawFile {
    storage: FileStorage,
    name: String,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    /// Opens the raw file at `path` read-only with the image lock `lock`.
    ///
    /// ```
    /// use qcowx_core::convert::{convert, ConvertOptions, Content, ImageFormat, RawFile};
    /// use qcowx_core::{Image, LockMode};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let raw = dir.path().join("disk.raw");
    /// std::fs::write(&raw, b"raw bytes").unwrap();
    /// let src = RawFile::open(&raw, LockMode::Shared)?;
    /// assert_eq!(src.size()?, 9);
    /// // Into a qcow2 image, as `qemu-img convert -O qcow2` does.
    /// let out = dir.path().join("disk.qcow2");
    /// convert(&src, &out, &ConvertOptions::new(ImageFormat::Qcow2), &mut |_, _| {})?;
    /// let mut buf = [0u8; 9];
    /// Image::open(&out)?.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"raw bytes");
    /// # Ok(()) }
    /// ```
    pub fn open(path: &Path, lock: LockMode) -> Result<RawFile> {
        let name = path.display().to_string();
        let storage = FileStorage::open(path, OpenMode::read_only().with_lock(lock))
            .map_err(|e| Error::from_open(&name, e))?;
        let size = storage
            .len()
            .map_err(|e| Error::io(name.as_str(), "stat", 0, e))?;
        Ok(RawFile {
            storage,
            name,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl Content for RawFile {
    fn name(&self) -> &str {
        &self.name
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange {
                file: self.name.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(self.name.as_str(), "read", offset, e))
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(raw_extents(self.storage.file(), self.size, offset, len))
    }
}

/// Opens the disk image at `path` for reading: a qcow2 image (with its backing chain)
/// or a raw file. `format` is probed from the file when `None`.
///
/// ```
/// use qcowx_core::convert::{open_input, ImageFormat};
/// use qcowx_core::{CreateOptions, Image, LockMode};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let raw = dir.path().join("disk.raw");
/// std::fs::write(&raw, vec![5u8; 8192]).unwrap();
/// let qcow = dir.path().join("disk.qcow2");
/// Image::create(&qcow, &CreateOptions::new(8192))?.close()?;
///
/// let a = open_input(&raw, None, LockMode::Shared)?; // probed: raw
/// assert_eq!(a.size()?, 8192);
/// let mut buf = [0u8; 2];
/// a.read_at(&mut buf, 100)?;
/// assert_eq!(buf, [5, 5]);
/// let b = open_input(&qcow, Some(ImageFormat::Qcow2), LockMode::Shared)?;
/// assert_eq!(b.size()?, 8192);
/// # Ok(()) }
/// ```
pub fn open_input(
    path: &Path,
    format: Option<ImageFormat>,
    lock: LockMode,
) -> Result<Box<dyn Content>> {
    let format = match format {
        Some(f) => f,
        None => ImageFormat::probe(path)?,
    };
    Ok(match format {
        ImageFormat::Raw => Box::new(RawFile::open(path, lock)?),
        ImageFormat::Qcow2 => Box::new(crate::engine::OpenOptions::new().lock(lock).open(path)?),
    })
}
