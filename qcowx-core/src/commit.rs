//! Commit: what an overlay stores itself written into its backing file (what
//! `qemu-img commit` does).
//!
//! [`commit`] walks the top image's default VDI with [`Image::block_status`] in windows
//! of [`STATUS_WINDOW`] and writes every range the top stores itself (data, and ranges
//! recorded as zeros) into the backing file at the same guest offsets; ranges the top
//! leaves unallocated are not touched. The backing file may be qcow2 (opened for
//! writing without its own backing chain) or raw, and is grown first when it is
//! smaller than the top, as QEMU grows it. Only once the backing file is written and
//! flushed is the top emptied (every cluster of its default VDI unallocated, so it
//! reads through to the backing file, exactly as before), unless
//! [`CommitOptions::keep_top`] asks to keep it.
//!
//! ```
//! use qcowx_core::commit::{commit, CommitOptions};
//! use qcowx_core::{CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcowx_core::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! Image::create(dir.path().join("base.qcow2"), &CreateOptions::new(1 << 20))?.close()?;
//! let mut opts = CreateOptions::new(1 << 20);
//! opts.backing_file = Some("base.qcow2".into());
//! opts.backing_format = Some("qcow2".into());
//! let top = Image::create(dir.path().join("top.qcow2"), &opts)?;
//! top.write_at(b"committed", 4096)?;
//! top.close()?;
//! drop(top); // its backing file is open (shared) while it lives
//!
//! let report = commit(&dir.path().join("top.qcow2"), &CommitOptions::default(), &mut |_, _| {})?;
//! assert_eq!(report.data_bytes, 65536); // the cluster the top stored
//! let mut buf = [0u8; 9];
//! Image::open(dir.path().join("base.qcow2"))?.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"committed");
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use crate::convert::COPY_CHUNK;
use crate::engine::backing::{resolve, ImageFormat};
use crate::engine::{ExtentStatus, Image, OpenOptions, STATUS_WINDOW};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, OpenMode, Storage};

/// How [`commit`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOptions {
    /// Leave the top image as it is after the commit (`qemu-img commit -d`); by
    /// default it is emptied, so it reads through to the backing file.
    pub keep_top: bool,
    /// The file to commit into (`qemu-img commit -b`): accepted only when it is the
    /// top's immediate backing file (compared by canonical path).
    pub base: Option<PathBuf>,
}

impl CommitOptions {
    /// The default options: commit into the backing file and empty the top.
    ///
    /// ```
    /// use qcowx_core::commit::CommitOptions;
    ///
    /// let opts = CommitOptions::new();
    /// assert!(!opts.keep_top && opts.base.is_none());
    /// let keep = CommitOptions { keep_top: true, ..CommitOptions::new() };
    /// assert!(keep.keep_top);
    /// ```
    pub fn new() -> CommitOptions {
        CommitOptions::default()
    }
}

/// What a [`commit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitReport {
    /// The backing file written.
    pub base: PathBuf,
    /// Its format.
    pub base_format: ImageFormat,
    /// The backing file's virtual size before the commit, when it was grown to the
    /// top's.
    pub grown_from: Option<u64>,
    /// Bytes of data copied into the backing file.
    pub data_bytes: u64,
    /// Bytes made to read as zeros in the backing file.
    pub zero_bytes: u64,
    /// Whether the top was emptied.
    pub emptied: bool,
}

/// The backing file, open for writing.
enum Base {
    Qcow2(Box<Image>),
    Raw { storage: FileStorage, name: String },
}

impl Base {
    fn size(&self) -> Result<u64> {
        match self {
            Base::Qcow2(img) => Ok(img.size()),
            Base::Raw { storage, name } => storage
                .len()
                .map_err(|source| Error::io(name, "stat", 0, source)),
        }
    }

    fn grow(&self, size: u64) -> Result<()> {
        match self {
            Base::Qcow2(img) => img.resize(size),
            Base::Raw { storage, name } => storage
                .set_len(size)
                .map_err(|source| Error::io(name, "grow", size, source)),
        }
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Base::Qcow2(img) => img.write_at(buf, offset),
            Base::Raw { storage, name } => storage
                .write_at(buf, offset)
                .map_err(|source| Error::io(name, "write", offset, source)),
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Base::Qcow2(img) => img.write_zeroes(offset, len, true),
            Base::Raw { storage, name } => {
                if storage.punch_hole(offset, len).is_ok() {
                    return Ok(());
                }
                // No hole punching here: zeros are written instead.
                let zeros = vec![0u8; COPY_CHUNK.min(len as usize)];
                let mut at = offset;
                while at < offset + len {
                    let n = (zeros.len() as u64).min(offset + len - at) as usize;
                    storage
                        .write_at(&zeros[..n], at)
                        .map_err(|source| Error::io(name, "write zeros", at, source))?;
                    at += n as u64;
                }
                Ok(())
            }
        }
    }

    fn close(self) -> Result<()> {
        match self {
            Base::Qcow2(img) => img.close(),
            Base::Raw { storage, name } => storage
                .sync_data()
                .map_err(|source| Error::io(&name, "sync", 0, source)),
        }
    }
}

/// Writes what the default VDI of the qcow2 image at `top` stores itself into its
/// backing file (qcow2 or raw), then empties the top so it reads through to the
/// backing file, unless [`CommitOptions::keep_top`]; `progress` is told the bytes of
/// the virtual disk walked and the total. The backing file is locked exclusively for
/// the whole commit, and so is the top unless `keep_top` (then it is only read).
/// Refused, with nothing written, when the top has no backing file,
/// when [`CommitOptions::base`] names another file, and when the backing file cannot
/// be opened for writing (in use elsewhere, read-only); the top is changed only after
/// the backing file holds its data and is flushed. qcowx writes no version 2 (compat
/// 0.10) image: a version 2 top commits only with `keep_top`, and a version 2 qcow2
/// backing file is refused.
///
/// ```
/// use qcowx_core::commit::{commit, CommitOptions};
/// use qcowx_core::{CreateOptions, ExtentStatus, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("base.raw"), vec![7u8; 1 << 20]).unwrap();
/// let mut opts = CreateOptions::new(2 << 20); // bigger than its base
/// opts.backing_file = Some("base.raw".into());
/// opts.backing_format = Some("raw".into());
/// let top = Image::create(dir.path().join("top.qcow2"), &opts)?;
/// top.write_at(&[1; 65536], 1 << 20)?;
/// top.write_zeroes(0, 65536, false)?;
/// top.close()?;
/// drop(top);
///
/// let top_path = dir.path().join("top.qcow2");
/// let mut walked = 0;
/// let report = commit(&top_path, &CommitOptions::new(), &mut |done, _| walked = done)?;
/// assert_eq!((report.data_bytes, report.zero_bytes), (65536, 65536));
/// assert_eq!(report.grown_from, Some(1 << 20));
/// assert_eq!(walked, 2 << 20);
/// let raw = std::fs::read(dir.path().join("base.raw")).unwrap();
/// assert_eq!(raw.len(), 2 << 20);
/// assert_eq!((raw[0], raw[65536], raw[1 << 20]), (0, 7, 1));
///
/// // The top stores nothing now, and reads what it read before.
/// let top = Image::open(&top_path)?;
/// let status = top.block_status(0, 2 << 20)?;
/// assert!(status.iter().all(|e| e.depth > 0 || e.status == ExtentStatus::Unallocated));
/// let mut b = [9u8; 1];
/// top.read_at(&mut b, 65536)?;
/// assert_eq!(b, [7]);
/// # Ok(()) }
/// ```
pub fn commit(
    top: &Path,
    opts: &CommitOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitReport> {
    let img = OpenOptions::new()
        .write(!opts.keep_top)
        .open_backing(false)
        .open(top)?;
    let info = img.info()?;
    let Some(backing_name) = info.backing_file else {
        return Err(Error::InvalidArgument(format!(
            "{}: the image has no backing file: there is nothing to commit into",
            top.display()
        )));
    };
    let base_path = resolve(Some(top), &backing_name);
    if let Some(want) = &opts.base {
        let canon = |p: &Path| {
            std::fs::canonicalize(p)
                .map_err(|source| Error::io(p.display().to_string(), "resolve", 0, source))
        };
        if canon(want)? != canon(&base_path)? {
            return Err(Error::InvalidArgument(format!(
                "-b {}: not the backing file of {} (its backing file is {}); only the \
                 immediate backing file can be committed into",
                want.display(),
                top.display(),
                base_path.display()
            )));
        }
    }
    let format = match &info.backing_format {
        Some(f) => ImageFormat::from_name(f)?,
        None => ImageFormat::probe(&base_path)?,
    };
    let base_name = base_path.display().to_string();
    let base = match format {
        ImageFormat::Qcow2 => Base::Qcow2(Box::new(
            OpenOptions::new()
                .write(true)
                .open_backing(false)
                .open(&base_path)?,
        )),
        ImageFormat::Raw => Base::Raw {
            storage: FileStorage::open(&base_path, OpenMode::read_write())
                .map_err(|e| Error::from_open(&base_name, e))?,
            name: base_name,
        },
    };
    let size = img.size();
    let base_size = base.size()?;
    let grown_from = (base_size < size).then_some(base_size);
    if grown_from.is_some() {
        base.grow(size)?;
    }

    let (mut data_bytes, mut zero_bytes) = (0, 0);
    let mut buf = crate::storage::io_buf(0);
    let mut window = 0;
    progress(0, size);
    while window < size {
        let len = STATUS_WINDOW.min(size - window);
        for e in img.block_status(window, len)? {
            if e.depth > 0 {
                continue;
            }
            match e.status {
                ExtentStatus::Unallocated => {}
                ExtentStatus::Zero | ExtentStatus::AllocatedZero => {
                    base.zero(e.offset, e.length)?;
                    zero_bytes += e.length;
                }
                ExtentStatus::Data => {
                    let end = e.offset + e.length;
                    let mut at = e.offset;
                    while at < end {
                        let n = (COPY_CHUNK as u64).min(end - at) as usize;
                        buf.resize(n, 0);
                        img.read_at(&mut buf, at)?;
                        base.write(&buf, at)?;
                        at += n as u64;
                    }
                    data_bytes += e.length;
                }
            }
        }
        window += len;
        progress(window, size);
    }
    base.close()?;

    if !opts.keep_top {
        img.unallocate(0, size)?;
    }
    img.close()?;
    Ok(CommitReport {
        base: base_path,
        base_format: format,
        grown_from,
        data_bytes,
        zero_bytes,
        emptied: !opts.keep_top,
    })
}
