//! Backing chains as lists of files, and the data/hole layout of raw files.
//!
//! [`backing_chain`] follows an image's backing file names down to the base and
//! reports each layer (path, format, virtual size) without keeping any of them open:
//! `qcowx import` walks the list bottom-up, `qcowx map` uses the layer sizes and files
//! to report extents as `qemu-img map` does. [`raw_extents`] asks the file system
//! which parts of a raw file hold data (`SEEK_DATA`/`SEEK_HOLE`).

use std::path::{Path, PathBuf};

use crate::engine::backing::{self, Link};
pub use crate::engine::backing::{ImageFormat, MAX_BACKING_DEPTH};
use crate::engine::open_error;
use crate::engine::{Extent, ExtentStatus, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, OpenMode, Storage};

/// One file of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// The path, as given for the top and as resolved (against the folder of the image
    /// that names it) below: the name `qemu-img map` prints.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Its virtual size in bytes (a raw file's length).
    pub virtual_size: u64,
    /// Its cluster size (qcow2 layers only).
    pub cluster_size: Option<u64>,
}

/// The backing chain of the image at `top`, top first and base last.
///
/// `format` is the top's format (probed when `None`); the formats below are the
/// recorded backing formats, probed when absent. Each qcow2 layer is opened briefly,
/// without its backing file, with `lock` (use [`LockMode::ForceShare`] to look at
/// images in use). Loops and chains deeper than [`MAX_BACKING_DEPTH`] are refused.
///
/// ```
/// use qcowx_core::engine::chain::{backing_chain, ImageFormat};
/// use qcowx_core::{CreateOptions, Image, LockMode};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("base.raw"), vec![0u8; 1 << 20]).unwrap();
/// let mut opts = CreateOptions::new(2 << 20);
/// opts.backing_file = Some("base.raw".into());
/// opts.backing_format = Some("raw".into());
/// let top = dir.path().join("top.qcow2");
/// Image::create(&top, &opts)?.close()?;
///
/// let chain = backing_chain(&top, None, LockMode::Shared)?;
/// let layers: Vec<_> = chain.iter().map(|l| (l.format, l.virtual_size)).collect();
/// assert_eq!(layers, [(ImageFormat::Qcow2, 2 << 20), (ImageFormat::Raw, 1 << 20)]);
/// assert_eq!(chain[1].path, dir.path().join("base.raw"));
/// # Ok(()) }
/// ```
pub fn backing_chain(
    top: &Path,
    format: Option<ImageFormat>,
    lock: LockMode,
) -> Result<Vec<ChainLayer>> {
    Ok(walk(top, format, lock, false)?
        .into_iter()
        .map(|(layer, _)| layer)
        .collect())
}

/// A layer of a chain, open (without its backing file) with the lock it was walked
/// with.
pub(crate) enum OpenLayer {
    Qcow2(Box<Image>),
    Raw(FileStorage),
}

/// [`backing_chain`], with every layer kept open: for callers that go on to read the
/// layers (an import), so that each is opened and locked once.
pub(crate) fn open_chain(
    top: &Path,
    format: Option<ImageFormat>,
    lock: LockMode,
) -> Result<Vec<(ChainLayer, OpenLayer)>> {
    Ok(walk(top, format, lock, true)?
        .into_iter()
        .filter_map(|(layer, open)| open.map(|o| (layer, o)))
        .collect())
}

/// Walks the chain under `top`, top first; with `keep`, each layer's open handle
/// comes with it, else each is closed as soon as it has been read.
fn walk(
    top: &Path,
    format: Option<ImageFormat>,
    lock: LockMode,
    keep: bool,
) -> Result<Vec<(ChainLayer, Option<OpenLayer>)>> {
    let mut out: Vec<(ChainLayer, Option<OpenLayer>)> = Vec::new();
    let canon = std::fs::canonicalize(top).map_err(|source| Error::Io {
        file: top.display().to_string(),
        op: "open",
        offset: 0,
        source,
    })?;
    let format = match format {
        Some(f) => f,
        None => ImageFormat::probe(top)?,
    };
    let mut link = Link {
        path: top.to_path_buf(),
        canon,
        format,
    };
    let mut seen: Vec<PathBuf> = Vec::new();
    loop {
        seen.push(link.canon.clone());
        let path = link.path;
        match link.format {
            ImageFormat::Raw => {
                let storage = FileStorage::open(&path, OpenMode::read_only().with_lock(lock))
                    .map_err(|e| open_error(&path.display().to_string(), e))?;
                let virtual_size = storage.len().map_err(|source| Error::Io {
                    file: path.display().to_string(),
                    op: "stat",
                    offset: 0,
                    source,
                })?;
                let layer = ChainLayer {
                    path,
                    format: ImageFormat::Raw,
                    virtual_size,
                    cluster_size: None,
                };
                out.push((layer, keep.then_some(OpenLayer::Raw(storage))));
                return Ok(out);
            }
            ImageFormat::Qcow2 => {
                let img = OpenOptions::new()
                    .lock(lock)
                    .open_backing(false)
                    .open(&path)?;
                let info = img.info()?;
                let open = if keep {
                    Some(OpenLayer::Qcow2(Box::new(img)))
                } else {
                    img.close()?;
                    None
                };
                let layer = ChainLayer {
                    path: path.clone(),
                    format: ImageFormat::Qcow2,
                    virtual_size: info.virtual_size,
                    cluster_size: Some(info.cluster_size),
                };
                out.push((layer, open));
                let Some(name) = info.backing_file else {
                    return Ok(out);
                };
                link = backing::follow(
                    &path.display().to_string(),
                    Some(&path),
                    &name,
                    info.backing_format.as_deref(),
                    &seen,
                )?;
            }
        }
    }
}

/// The layout of `[offset, offset+len)` of a raw file of `size` bytes: data ranges as
/// [`ExtentStatus::Data`] and holes as [`ExtentStatus::Zero`] (both with the host
/// offset, which equals the guest offset), as the file system reports them with
/// `SEEK_DATA`/`SEEK_HOLE`. A range past the end of the file is a hole. When the file
/// system cannot tell, everything inside the file is data.
///
/// ```
/// use qcowx_core::engine::chain::raw_extents;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// let file = std::fs::File::create(&path).unwrap();
/// file.set_len(1 << 20).unwrap(); // all hole
/// let extents = raw_extents(&file, 1 << 20, 0, 1 << 20);
/// // Every byte is covered, in order; a file system without SEEK_HOLE reports data.
/// assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
/// assert_eq!(extents[0].offset, 0);
/// assert!(extents.iter().all(|e| e.host_offset == Some(e.offset)));
/// ```
pub fn raw_extents(file: &std::fs::File, size: u64, offset: u64, len: u64) -> Vec<Extent> {
    let runs = crate::storage::data_runs(file, size, offset, len).unwrap_or_else(|| {
        let inside = offset.saturating_add(len).min(size).max(offset);
        vec![
            (offset, inside, true),
            (inside, offset.saturating_add(len), false),
        ]
    });
    runs.into_iter()
        .filter(|&(start, stop, _)| stop > start)
        .map(|(start, stop, data)| Extent {
            offset: start,
            length: stop - start,
            status: if data {
                ExtentStatus::Data
            } else {
                ExtentStatus::Zero
            },
            depth: 0,
            host_offset: Some(start),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn raw_extents_reports_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let ext = raw_extents(&f, 4 << 20, 0, 5 << 20);
        // Whatever the file system's granularity, the written range is data, the
        // start and the tail of the file are holes, and the extents tile the range.
        let mut pos = 0;
        for e in &ext {
            assert_eq!(e.offset, pos);
            assert_eq!(e.host_offset, Some(e.offset));
            pos += e.length;
        }
        assert_eq!(pos, 5 << 20);
        let at = |off: u64| {
            ext.iter()
                .find(|e| e.offset <= off && off < e.offset + e.length)
                .unwrap()
                .status
        };
        assert_eq!(at(1 << 20), ExtentStatus::Data);
        assert_eq!(at((1 << 20) + 65535), ExtentStatus::Data);
        assert_eq!(at(4 << 20), ExtentStatus::Zero);
        assert_eq!(at((4 << 20) + 100), ExtentStatus::Zero);
    }

    #[test]
    fn chain_of_a_missing_file_names_it() {
        let err =
            backing_chain(Path::new("/nonexistent/x.qcow2"), None, LockMode::Shared).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.qcow2"), "{err}");
    }
}
